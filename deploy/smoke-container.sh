#!/usr/bin/env bash
# Build the loraplex container image and prove it serves: one command, on a machine with podman.
#
#   deploy/smoke-container.sh            # PYTHON=.venv/bin/python by default; prints a summary table
#
# What it does (every step fails the script if it fails):
#   1. `bentoml build` (bentofile.yaml) and `podman build` of the bento's OWN generated Dockerfile;
#   2. a store on the host (base minilm + its ONNX exports), mounted into the container;
#   3. starts the image as its non-root user with a read-only root filesystem and no capabilities,
#      measures cold start (container start -> /readyz 200) and the image size;
#   4. registers a tenant's LoRA adapter over HTTP, classifies with it on the onnxruntime runtime;
#   5. SIGTERM with requests in flight: /readyz turns 503, every in-flight request answers 200, the
#      container exits 0.
#
# The product's Dockerfile and bentofile stay standard (`bentoml containerize` / `docker build` on a
# normal host). The local adaptations of THIS machine live only here, each switchable:
#   - LORAPLEX_BASE_IMAGE: stand-in for python:3.11-slim (no registry for base images here), built from
#     Debian packages with mmdebstrap unless it exists;
#   - the OCI runtime shim (deploy/oci-runtime-shim) when the sandbox refuses container rlimits;
#   - the CPU torch wheel from the local wheel folder (pip's find-links) instead of the CPU index.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
WORK=${LORAPLEX_SMOKE_DIR:-$(mktemp -d /tmp/loraplex-smoke.XXXXXX)}
IMAGE=${LORAPLEX_IMAGE:-localhost/loraplex:smoke}
BASE_IMAGE=${LORAPLEX_BASE_IMAGE:-localhost/loraplex-python:3.11}
DEBIAN_IMAGE=localhost/debian-py:bookworm
WHEELS=${LORAPLEX_WHEELS:-$("$PY" -m pip config get global.find-links 2>/dev/null || echo /opt/wheels)}
RESULTS=${LORAPLEX_SMOKE_RESULTS:-$REPO/benchmarks/results/container.md}
ADMIN_TOKEN=smoke-admin-token-0123456789
TENANT_TOKEN=smoke-acme-token-0123456789
NAME=loraplex-smoke-$$
mkdir -p "$WORK"
export BENTOML_HOME=$WORK/bentoml BENTOML_DO_NOT_TRACK=True HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
now() { date +%s.%N; }
fail() { log "FAILED: $*"; [ -n "${CID:-}" ] && podman logs --tail 60 "$NAME" >&2 || true; exit 1; }

command -v podman >/dev/null || fail "podman is not installed (apt-get install podman runc)"
# 0. The OCI runtime: plain podman first, the rlimit-dropping shim where the sandbox refuses rlimits.
PODMAN=(podman)
probe_image=$(podman image exists "$BASE_IMAGE" && echo "$BASE_IMAGE" || echo "$DEBIAN_IMAGE")
if podman image exists "$probe_image" && ! podman run --rm --network=none "$probe_image" true 2>/dev/null; then
  log "containers fail with the default OCI runtime here: using deploy/oci-runtime-shim"
  cat > "$WORK/containers.conf" <<EOF
[engine]
runtime = "loraplex-shim"
[engine.runtimes]
loraplex-shim = ["$REPO/deploy/oci-runtime-shim"]
EOF
  export CONTAINERS_CONF=$WORK/containers.conf
fi

# 1. The local stand-in for python:3.11-slim (Debian 12's Python is 3.11).
if ! podman image exists "$BASE_IMAGE"; then
  if ! podman image exists "$DEBIAN_IMAGE"; then
    log "making $DEBIAN_IMAGE with mmdebstrap (about 3 minutes)"
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs.tar" >&2
    podman import "$WORK/rootfs.tar" "$DEBIAN_IMAGE" >/dev/null
    rm -f "$WORK/rootfs.tar"
  fi
  if [ -z "${CONTAINERS_CONF:-}" ] && ! podman run --rm --network=none "$DEBIAN_IMAGE" true 2>/dev/null; then
    log "using deploy/oci-runtime-shim"
    printf '[engine]\nruntime = "loraplex-shim"\n[engine.runtimes]\nloraplex-shim = ["%s"]\n' \
      "$REPO/deploy/oci-runtime-shim" > "$WORK/containers.conf"
    export CONTAINERS_CONF=$WORK/containers.conf
  fi
  log "making $BASE_IMAGE (python3.11 + pip, like python:3.11-slim)"
  cat > "$WORK/Containerfile.base" <<'EOF'
FROM localhost/debian-py:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip \
    && ln -sf /usr/bin/python3 /usr/local/bin/python && rm -rf /var/lib/apt/lists/*
# python:3.11-slim's pip installs system-wide; Debian's refuses without this.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt UV_NATIVE_TLS=1
EOF
  "${PODMAN[@]}" build --network=host -v /etc/ssl/certs:/etc/ssl/certs:ro -t "$BASE_IMAGE" \
    -f "$WORK/Containerfile.base" "$WORK" >&2
fi

# 2. The bento and its generated Dockerfile.
log "bentoml build"
tag=$(cd "$REPO" && "$PY" -m bentoml build -o tag | tail -1 | sed 's/^__tag__://')
[[ $tag == loraplex:* ]] || fail "bentoml build printed no tag"
ctx=$WORK/context
rm -rf "$ctx" && cp -r "$BENTOML_HOME/bentos/loraplex/${tag#loraplex:}" "$ctx"
grep -q "^FROM python:3.11-slim" "$ctx/env/docker/Dockerfile" || fail "unexpected generated Dockerfile"
# Local adaptation: the CPU torch wheel from the local wheel folder (the CPU index is unreachable here).
sed -i -e '\#^--extra-index-url https://download.pytorch.org/whl/cpu#d' -e 's/^torch==2.13.0$/torch==2.13.0+cpu/' \
  "$ctx/env/python/requirements.txt"
printf -- '--find-links /wheels\n' >> "$ctx/env/python/requirements.txt"
log "podman build (the bento's own Dockerfile, FROM $BASE_IMAGE)"
t0=$(now)
"${PODMAN[@]}" build --from "$BASE_IMAGE" --network=host -v /etc/ssl/certs:/etc/ssl/certs:ro \
  -v "$WHEELS:/wheels:ro" -f env/docker/Dockerfile -t "$IMAGE" "$ctx" >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; fail "podman build"; }
build_s=$(echo "$(now) - $t0" | bc)
steps=$(grep -c '^STEP' "$WORK/build.log" || true)
cached=$(grep -c 'Using cache' "$WORK/build.log" || true)
size_bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
image_user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
[ "$image_user" = bentoml ] || fail "image user is '$image_user', not bentoml"

# 3. A store on the host: base minilm (resolves to the package inside the image) + ONNX exports.
store=$WORK/store
if [ ! -f "$store/bases/minilm.json" ]; then
  log "registering base minilm and exporting it to ONNX (plain + LoRA graph)"
  "$PY" -m training.cli base register minilm --store "$store" >/dev/null
  "$PY" -m training.cli onnx export --base minilm --store "$store" >/dev/null
  "$PY" -m training.cli onnx export --base minilm --lora-targets query,value --store "$store" >/dev/null
fi
# The image runs as uid/gid 1034 (bentoml): a mounted store must be readable and writable by it.
chown -R 1034:1034 "$store"
peft=$WORK/peft-acme
[ -d "$peft" ] || "$PY" -c "
from pathlib import Path
from tests.helpers.bundles import save_peft_lora
from tests.helpers.models import minilm_dir
save_peft_lora(minilm_dir(), Path('$peft'), num_labels=2, seed=3)"

port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
trap 'podman rm -f -t 2 "$NAME" >/dev/null 2>&1 || true' EXIT
log "starting the container (non-root, read-only root filesystem, no capabilities)"
t0=$(now)
CID=$("${PODMAN[@]}" run -d --name "$NAME" -p "127.0.0.1:$port:3000" \
  --read-only --tmpfs /tmp -e BENTOML_HOME=/tmp/bentoml --cap-drop ALL --security-opt no-new-privileges \
  -v "$store:/store" -e LORAPLEX_STORE=/store -e LORAPLEX_RUNTIME=onnx -e LORAPLEX_DRAIN_S=3 \
  -e LORAPLEX_ADMIN_TOKEN=$ADMIN_TOKEN -e "LORAPLEX_TENANT_TOKENS=acme:$TENANT_TOKEN" "$IMAGE")
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz")" = 200 ]; do
  [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" = true ] || fail "container exited before ready"
  (( $(echo "$(now) - $t0 > 300" | bc) )) && fail "not ready after 300 s"
  sleep 0.2
done
cold_s=$(echo "$(now) - $t0" | bc)
uid=$(podman exec "$NAME" id -u)
[ "$uid" != 0 ] || fail "the server runs as root"
log "ready after ${cold_s}s (uid $uid)"

# 4. Register over HTTP, classify on onnxruntime.
files=()
for f in "$peft"/*; do files+=(-F "files=@$f"); done
up=$(curl -sf -X POST "$url/v1/admin/tenants/acme/adapters/sentiment/versions" \
  -H "Authorization: Bearer $ADMIN_TOKEN" "${files[@]}" -F labels=negative,positive -F alias=production) \
  || fail "upload over HTTP"
digest=$(echo "$up" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["digest"])')
classify() {
  curl -s -o /dev/null -w '%{http_code}\n' "$url/v1/classify" -H "Authorization: Bearer $TENANT_TOKEN" \
    -H 'Content-Type: application/json' -d '{"items": [{"adapter": "sentiment", "text": "great service"}]}'
}
answer=$(curl -sf "$url/v1/classify" -H "Authorization: Bearer $TENANT_TOKEN" -H 'Content-Type: application/json' \
  -d '{"items": [{"adapter": "sentiment", "text": "great service"}], "include": ["digest"]}') || fail "classify"
echo "$answer" | "$PY" -c "
import json, sys
a = json.load(sys.stdin)[0]
assert a['digest'] == '$digest' and a['labels'] and len(a['scores']) == 2, a" || fail "classify answer: $answer"

podman logs "$NAME" > "$WORK/container.log" 2>&1
grep -q "runtime onnx" "$WORK/container.log" || fail "the server did not start on the onnx runtime"
mem=$(podman stats --no-stream --format '{{.MemUsage}}' "$NAME" | cut -d/ -f1 | tr -d ' ')
log "classified on onnxruntime; container memory $mem"

# 4b. A training job inside the container (training/ and its packages ship in the bento): the tenant
#     posts a small CSV, the job trains a head on the served backbone, registers and promotes it.
"$PY" - "$WORK/job.csv" <<'PYEOF'
import csv, sys
rows = {
    "billing": ["refund my invoice", "I was charged twice", "update my payment card", "wrong amount on my bill"],
    "login": ["cannot sign in", "reset my password", "my account is locked", "two factor code never arrives"],
    "shipping": ["where is my parcel", "the delivery is late", "track my order", "package arrived damaged"],
}
with open(sys.argv[1], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["text", "label"])
    for _ in range(3):
        for label, texts in rows.items():
            w.writerows([t, label] for t in texts)
PYEOF
job=$(curl -sf -X POST "$url/v1/jobs" -H "Authorization: Bearer $TENANT_TOKEN" \
  -F "dataset=@$WORK/job.csv;type=text/csv" -F name=tickets -F strategy=head -F alias=production \
  -F 'options={"epochs": 3}') || fail "submit a training job"
job_id=$(echo "$job" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["id"])')
job_t0=$(now)
while :; do
  status=$(curl -sf "$url/v1/jobs/$job_id" -H "Authorization: Bearer $TENANT_TOKEN" \
    | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["status"])') || fail "job status"
  case $status in succeeded) break ;; failed|cancelled)
    curl -s "$url/v1/jobs/$job_id" -H "Authorization: Bearer $TENANT_TOKEN" >&2; fail "training job $status" ;;
  esac
  (( $(echo "$(now) - $job_t0 > 600" | bc) )) && fail "training job still $status after 600 s"
  sleep 2
done
job_s=$(echo "$(now) - $job_t0" | bc)
curl -sf "$url/v1/classify" -H "Authorization: Bearer $TENANT_TOKEN" -H 'Content-Type: application/json' \
  -d '{"items": [{"adapter": "tickets", "text": "refund my invoice payment"}]}' \
  | "$PY" -c "
import json, sys
a = json.load(sys.stdin)[0]
assert sorted(a['labels']) == ['billing', 'login', 'shipping'] and a['version'] == 1, a" \
  || fail "classify with the job's adapter"
log "a training job in the container trained, registered and served in ${job_s}s"

# 5. SIGTERM with requests in flight: readiness 503 first, every request answered, exit 0.
for i in $(seq 8); do (for j in $(seq 10); do classify; done > "$WORK/inflight-$i.txt") & done
sleep 0.5
t0=$(now)
podman kill --signal TERM "$NAME" >/dev/null
saw503=no
for _ in $(seq 40); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/readyz")" = 503 ] && { saw503=yes; break; }
  sleep 0.1
done
rc=$(podman wait "$NAME")
stop_s=$(echo "$(now) - $t0" | bc)
wait
codes=$(cat "$WORK"/inflight-*.txt | sort | uniq -c | tr -s ' ' | paste -sd, -)
[ "$saw503" = yes ] || fail "/readyz never answered 503 while draining"
[ "$rc" = 0 ] || fail "container exit status $rc after SIGTERM"
podman logs "$NAME" > "$WORK/container.log" 2>&1
grep -q "draining" "$WORK/container.log" || fail "no drain in the log"
# Requests sent after the listener closed get no answer (000): that is the load balancer's job
# (readiness 503 took the replica out); none may have failed with an HTTP error status.
bad=$(cat "$WORK"/inflight-*.txt | grep -v -e '^200$' -e '^000$' || true)
[ -z "$bad" ] || fail "requests failed during the drain: $codes"

load=$(cut -d' ' -f1-3 /proc/loadavg)
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
size_mb=$(echo "$size_bytes / 1000000" | bc)
mkdir -p "$(dirname "$RESULTS")"
cat > "$RESULTS" <<EOF
# Container smoke ($(date -u '+%Y-%m-%d %H:%M UTC'), load average $load, $(nproc) CPUs, $cpu)

\`deploy/smoke-container.sh\`: podman $(podman --version | cut -d' ' -f3), the bento's generated Dockerfile
FROM a local Debian 12 stand-in for python:3.11-slim, real all-MiniLM-L6-v2, LORAPLEX_RUNTIME=onnx.

| metric | value |
|---|---|
| image size | $size_mb MB |
| image build (podman build; steps taken from the layer cache) | ${build_s%.*} s (${cached} of ${steps} cached) |
| cold start: container start -> /readyz 200 | $(printf '%.1f' "$cold_s") s |
| container memory after one adapter is loaded | $mem |
| training job in the container (head, 36 rows, 3 epochs): submit -> succeeded, then served | $(printf '%.1f' "$job_s") s |
| user in the container | uid $uid (bentoml), read-only root filesystem, no capabilities |
| SIGTERM with 8 clients sending: readiness 503 seen / exit status / time to exit | $saw503 / $rc / $(printf '%.1f' "$stop_s") s |
| in-flight answers during the drain (count code) | $codes |
EOF
cat "$RESULTS"
log "OK"
