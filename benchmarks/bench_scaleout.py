"""Scale-out benchmark: 3 replicas on one S3 store behind a real nginx that hashes on the bearer token.

Run: ``.venv/bin/python benchmarks/bench_scaleout.py`` (needs Debian's ``nginx``; about 6-8 minutes on
2 busy cores). Prints a markdown table and writes benchmarks/results/scaleout.md and .json.

Real parts: a SeaweedFS S3 server (``weed``), three ``bentoml serve`` processes of
``serving.service:LoraplexService`` on fixed ports, and nginx (``worker_processes 1``) with two front
ends on the same three replicas: ``hash $http_authorization consistent`` (tenant affinity, as the
ingress-nginx ``upstream-hash-by`` annotation in deploy/k8s does) and plain round-robin. Both retry a
replica that refuses the connection on the next one (``proxy_next_upstream error timeout``).
The base is a tiny random BERT (tests/helpers/models.py), not MiniLM: on 2 shared cores three MiniLM
replicas would measure the CPU, not the routing. Every tenant has its own LoRA (r=8, query+value, 3
labels); each replica's adapter cache holds about a third of them (``LORAPLEX_CACHE_BYTES``).

Phases, all under load from a minimal asyncio HTTP/1.1 client (closed loop, one sentence per request,
tenant drawn from a Zipf distribution over 300 tenants):
1. affinity vs round-robin, interleaved rounds: cache hit rate (from every replica's /v1/admin/cache)
   and requests/s;
2. an alias promote sent to replica 0: seconds until every replica answers with the new version
   (documented bound: LORAPLEX_ALIAS_TTL_S + 1 s);
3. kill -9 of one replica's process tree under load, while it takes uploads: failed requests and when
   they happened; every upload that got 201 is stored and verifies;
4. rolling restart (SIGTERM, drain, start again, wait ready; one replica at a time) under load:
   failed requests;
5. the S3 server SIGKILLed for 20 s under load: warm tenants' answers, cold tenants' 503 +
   Retry-After, time until cold tenants are served again; then the whole store verifies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import httpx  # noqa: E402
from bench_http import one_peft_lora, seeded_weights  # noqa: E402
from texts import sentences  # noqa: E402

from adapters_store import describe_base, open_store  # noqa: E402
from adapters_store.peft_import import bundle_from_peft_files  # noqa: E402
from tests.helpers.models import make_tiny_bert  # noqa: E402
from tests.helpers.seaweed import start_seaweed  # noqa: E402
from tests.service_support import ServeProcess, free_port, process_tree, wait_ready  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
LABELS = ["neg", "neu", "pos"]
ADMIN = "scaleout-admin-token-0123456789"
ALIAS_TTL_S = 2.0
DRAIN_S = 2.0


# -- setup -----------------------------------------------------------------------------------------
def seed_store(url: str, base_dir: Path, work: Path, tenants: list[str]) -> None:
    store = open_store(url)
    store.ensure_bucket()
    base = store.register_base(describe_base("tiny", base_dir))
    config, weights = one_peft_lora(base_dir, work / "peft")

    def put(i_tenant):
        i, tenant = i_tenant
        store.put(
            bundle_from_peft_files(config, seeded_weights(weights, i), tenant, "intent", base, labels=LABELS)
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, enumerate(tenants)))
    # tenant 0 (the hottest) gets a second version for the promote phase; production -> 1
    store.put(
        bundle_from_peft_files(
            config, seeded_weights(weights, 9999), tenants[0], "intent", base, labels=LABELS
        )
    )
    store.set_alias(tenants[0], "intent", "production", 1)


def adapter_nbytes(url: str, tenant: str) -> int:
    """What one adapter costs the engine cache (measured, not computed)."""
    from serving.engine import Engine, EngineSettings, InferenceItem

    engine = Engine(open_store(url), base="tiny", settings=EngineSettings(threads=1, runtime="torch"))
    engine.infer([InferenceItem(tenant=tenant, adapter="intent", task="classify", text="hello")])
    return int(engine.cache_stats()["bytes_used"])


def start_replica(port: int, env: dict[str, str], work: Path) -> ServeProcess:
    log_path = work / f"replica-{port}.log"
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:LoraplexService"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    return ServeProcess(proc, port, log_path, env)


def kill9(server: ServeProcess) -> None:
    workers = [p for p in process_tree(server.proc.pid) if p != server.proc.pid]
    os.killpg(server.proc.pid, signal.SIGKILL)
    for w in workers:
        try:
            os.kill(w, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.proc.wait(10)


NGINX_CONF = """
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx-body;
  proxy_temp_path {work}/nginx-proxy;
  upstream affinity {{
    hash $http_authorization consistent;
{servers}
  }}
  upstream roundrobin {{
{servers}
  }}
  proxy_next_upstream error timeout;
  proxy_next_upstream_tries 3;
  proxy_connect_timeout 2s;
  proxy_read_timeout 60s;
  client_max_body_size 64m;
  server {{ listen 127.0.0.1:{aff_port}; location / {{ proxy_pass http://affinity; }} }}
  server {{ listen 127.0.0.1:{rr_port}; location / {{ proxy_pass http://roundrobin; }} }}
}}
"""


def write_nginx_conf(work: Path, replica_ports: list[int], aff_port: int, rr_port: int) -> Path:
    servers = "\n".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in replica_ports)
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, servers=servers, aff_port=aff_port, rr_port=rr_port))
    return conf


def set_endpoints(nginx: subprocess.Popen, work: Path, fronts: dict[str, int], ports: list[int]) -> None:
    """What Kubernetes' endpoints controller does for ingress-nginx: the upstreams become the ready
    replicas. nginx reloads gracefully (old workers finish their requests)."""
    write_nginx_conf(work, ports, fronts["affinity"], fronts["round-robin"])
    nginx.send_signal(signal.SIGHUP)
    time.sleep(0.5)


def start_nginx(work: Path, replica_ports: list[int]) -> tuple[subprocess.Popen, int, int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise SystemExit("nginx is missing: apt-get install nginx")
    aff_port, rr_port = free_port(), free_port()
    conf = write_nginx_conf(work, replica_ports, aff_port, rr_port)
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(work), "-g", "daemon off;"],
        stdout=open(work / "nginx.out", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{aff_port}/livez", timeout=2)
            return proc, aff_port, rr_port
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"nginx did not start: {(work / 'nginx-error.log').read_text()[-2000:]}")


# -- load --------------------------------------------------------------------------------------------
class Load:
    """Closed-loop clients against one front end; records (t_end, status, tenant, retry_after)."""

    def __init__(
        self,
        port: int,
        tokens: dict[str, str],
        pick,
        texts: list[str],
        clients: int,
        pace: float = 0.0,
        keepalive: bool = True,
    ):
        self.port, self.tokens, self.pick, self.texts, self.clients = port, tokens, pick, texts, clients
        self.pace = pace  # seconds between one client's requests (0: closed loop)
        # keepalive=False: a new connection per request, for phases that reload nginx (a reload closes
        # idle client connections, which a real ingress-nginx endpoint update does not do)
        self.keepalive = keepalive
        self.records: list[tuple[float, int, str, str | None]] = []
        self.stop = asyncio.Event()

    def _request(self, tenant: str, i: int) -> bytes:
        body = json.dumps(
            {"items": [{"adapter": "intent", "text": self.texts[i % len(self.texts)]}]}
        ).encode()
        head = (
            f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.tokens[tenant]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def _worker(self, seed: int) -> None:
        rng = random.Random(seed)
        reader = writer = None
        i = seed
        while not self.stop.is_set():
            if self.pace:
                await asyncio.sleep(self.pace)
            tenant = self.pick(rng)
            i += 1
            status, retry = 0, None
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(self._request(tenant, i))
                status = int((await reader.readline()).split()[1])
                length, close = 0, not self.keepalive
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"retry-after":
                        retry = value.strip().decode()
                    elif name == b"connection" and value.strip().lower() == b"close":
                        # nginx closes a keep-alive connection after `keepalive_requests` (1,000)
                        # requests; sending on it again would count as a failure of the server
                        close = True
                await reader.readexactly(length)
                if close:
                    writer.close()
                    reader = writer = None
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                status = 0  # no HTTP answer at all
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)
            self.records.append((time.monotonic(), status, tenant, retry))
        if writer is not None:
            writer.close()

    async def run(self, seconds: float | None = None) -> None:
        tasks = [asyncio.create_task(self._worker(k)) for k in range(self.clients)]
        if seconds is not None:
            await asyncio.sleep(seconds)
            self.stop.set()
        await asyncio.gather(*tasks)


def zipf_picker(tenants: list[str], s: float):
    weights = [1.0 / (rank + 1) ** s for rank in range(len(tenants))]
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)

    def pick(rng: random.Random) -> str:
        import bisect

        return tenants[min(bisect.bisect_left(cum, rng.random() * total), len(tenants) - 1)]

    return pick


def cache_counts(replicas: list[ServeProcess]) -> tuple[int, int]:
    hits = misses = 0
    for r in replicas:
        stats = httpx.get(
            f"{r.url}/v1/admin/cache", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30
        ).json()
        hits, misses = hits + stats["hits"], misses + stats["misses"]
    return hits, misses


def summary(records, since: float = 0.0, until: float = float("inf")) -> dict:
    window = [r for r in records if since <= r[0] < until]
    codes: dict[str, int] = {}
    for r in window:
        codes[str(r[1])] = codes.get(str(r[1]), 0) + 1
    return {"requests": len(window), "ok": codes.get("200", 0), "codes": codes}


# -- phases ------------------------------------------------------------------------------------------
def phase_affinity(args, fronts, replicas, tokens, pick, texts) -> dict:
    rounds = []
    for r in range(args.rounds):
        order = ["affinity", "round-robin"] if r % 2 == 0 else ["round-robin", "affinity"]
        for mode in order:
            port = fronts[mode]
            asyncio.run(Load(port, tokens, pick, texts, args.clients).run(args.warmup))
            h0, m0 = cache_counts(replicas)
            load = Load(port, tokens, pick, texts, args.clients)
            t0 = time.monotonic()
            asyncio.run(load.run(args.seconds))
            elapsed = time.monotonic() - t0
            h1, m1 = cache_counts(replicas)
            s = summary(load.records)
            rounds.append(
                {
                    "round": r,
                    "mode": mode,
                    "hit_rate": (h1 - h0) / max(1, (h1 - h0) + (m1 - m0)),
                    "rps": s["ok"] / elapsed,
                    "requests": s["requests"],
                    "errors": s["requests"] - s["ok"],
                    "load": os.getloadavg()[0],
                }
            )
            print(
                f"  round {r} {mode:11s}: hit rate {rounds[-1]['hit_rate']:.3f}, {rounds[-1]['rps']:.1f} req/s",
                flush=True,
            )
    return {"rounds": rounds}


def phase_promote(replicas, tokens, tenant: str) -> dict:
    headers = {"Authorization": f"Bearer {tokens[tenant]}"}
    body = {"items": [{"adapter": "intent", "text": "where is my parcel"}]}
    for r in replicas:  # every replica has resolved production -> 1 (cached for up to the TTL)
        assert (
            httpx.post(f"{r.url}/v1/classify", json=body, headers=headers, timeout=30).json()[0]["version"]
            == 1
        )
    moved = httpx.put(
        f"{replicas[0].url}/v1/admin/tenants/{tenant}/adapters/intent/aliases/production",
        json={"version": 2},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    assert moved.status_code == 200, moved.text
    t0 = time.monotonic()  # the promote is committed when its answer arrives
    lags = {}
    pending = set(range(len(replicas)))
    while pending and time.monotonic() - t0 < 30:
        for i in sorted(pending):
            answer = httpx.post(
                f"{replicas[i].url}/v1/classify", json=body, headers=headers, timeout=30
            ).json()
            if answer[0]["version"] == 2:
                lags[i] = time.monotonic() - t0
                pending.discard(i)
        time.sleep(0.05)
    return {"lags_s": [lags.get(i) for i in range(len(replicas))], "bound_s": ALIAS_TTL_S + 1.0}


def phase_kill(args, fronts, replicas, tokens, pick, texts, store_url, base_dir, work) -> dict:
    victim = replicas[-1]
    writer_tenant = "uploads"
    config, weights = one_peft_lora(base_dir, work / "peft-upload")
    store = open_store(store_url)
    uploads: list[tuple[float, int, int | None]] = []
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            files = [
                ("files", ("adapter_config.json", config)),
                ("files", ("adapter_model.safetensors", seeded_weights(weights, 50_000 + n))),
            ]
            try:
                r = httpx.post(
                    f"{victim.url}/v1/admin/tenants/{writer_tenant}/adapters/w/versions",
                    files=files,
                    data={"labels": ",".join(LABELS)},
                    headers={"Authorization": f"Bearer {ADMIN}"},
                    timeout=30,
                )
                uploads.append(
                    (
                        time.monotonic(),
                        r.status_code,
                        r.json().get("version") if r.status_code == 201 else None,
                    )
                )
            except httpx.HTTPError:
                uploads.append((time.monotonic(), 0, None))
                time.sleep(0.2)

    load = Load(fronts["affinity"], tokens, pick, texts, args.clients)

    async def scenario():
        task = asyncio.create_task(load.run())
        await asyncio.sleep(4)
        kill_at = time.monotonic()
        kill9(victim)
        await asyncio.sleep(8)
        load.stop.set()
        await task
        return kill_at

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    kill_at = asyncio.run(scenario())
    stop.set()
    t.join(30)
    failures = [r for r in load.records if r[1] != 200]
    after = [r[0] - kill_at for r in failures]
    # Nothing lost: every upload answered 201 is stored and verifies; so does every stored version.
    committed = [v for _, status, v in uploads if status == 201]
    stored = store.version_numbers(writer_tenant, "w")
    for v in stored:
        store.verify(f"{writer_tenant}/w@{v}")
    return {
        "before": summary(load.records, until=kill_at),
        "after": summary(load.records, since=kill_at),
        "failed": len(failures),
        "failed_window_s": [min(after), max(after)] if after else None,
        "uploads_201": len(committed),
        "uploads_lost": sorted(set(committed) - set(stored)),
        "versions_stored_and_verified": len(stored),
    }


def phase_rolling(args, fronts, replicas, tokens, pick, texts, work, nginx) -> dict:
    """A Kubernetes rolling update, one replica at a time: SIGTERM (the pod starts its drain: readiness
    503, still serving), the endpoint leaves the ingress's upstreams 1 s later (propagation delay,
    shorter than the drain), the process exits, a new one starts on the same port and joins the
    upstreams once /readyz is 200. nginx applies each endpoint change by a graceful reload, so the
    clients open a connection per request here (a reload closes idle keep-alive connections)."""
    load = Load(fronts["affinity"], tokens, pick, texts, args.clients, keepalive=False)
    restarts = []
    ports = [r.port for r in replicas]

    async def scenario():
        task = asyncio.create_task(load.run())
        await asyncio.sleep(3)
        for i, r in enumerate(list(replicas)):
            t0 = time.monotonic()
            os.killpg(r.proc.pid, signal.SIGTERM)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(set_endpoints, nginx, work, fronts, [p for p in ports if p != r.port])
            await asyncio.to_thread(r.stop, 60.0)
            stopped = time.monotonic() - t0
            new = start_replica(r.port, r.env, work)
            await asyncio.to_thread(wait_ready, new, 300.0)
            await asyncio.to_thread(set_endpoints, nginx, work, fronts, ports)
            replicas[i] = new
            restarts.append({"replica": i, "stop_s": stopped, "restart_ready_s": time.monotonic() - t0})
            await asyncio.sleep(2)
        load.stop.set()
        await task

    asyncio.run(scenario())
    s = summary(load.records)
    return {
        "requests": s["requests"],
        "failed": s["requests"] - s["ok"],
        "codes": s["codes"],
        "restarts": restarts,
    }


def phase_s3_outage(args, fronts, replicas, tokens, texts, seaweed, warm: list[str], cold: list[str]) -> dict:
    port = fronts["affinity"]
    for tenant in warm:  # make sure they are resident on their replica
        httpx.post(
            f"http://127.0.0.1:{port}/v1/classify",
            json={"items": [{"adapter": "intent", "text": "hi"}]},
            headers={"Authorization": f"Bearer {tokens[tenant]}"},
            timeout=30,
        )
    warm_load = Load(port, tokens, lambda rng: rng.choice(warm), texts, max(2, args.clients // 2))
    cold_cycle = iter(cold * 100)

    # one never-loaded tenant every 0.5 s, from the moment S3 is down
    cold_load = Load(port, tokens, lambda rng: next(cold_cycle), texts, 1, pace=0.5)
    marks = {}

    async def scenario():
        warm_task = asyncio.create_task(warm_load.run())
        await asyncio.sleep(3)
        marks["down"] = time.monotonic()
        await asyncio.to_thread(seaweed.kill)
        tasks = [warm_task, asyncio.create_task(cold_load.run())]
        await asyncio.sleep(args.outage)
        marks["restart"] = time.monotonic()
        await asyncio.to_thread(seaweed.restart)
        marks["up"] = time.monotonic()
        await asyncio.sleep(15)
        warm_load.stop.set()
        cold_load.stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    down, up = marks["down"], marks["up"]
    cold_out = [r for r in cold_load.records if r[0] < marks["restart"]]
    recovered = [r[0] - up for r in cold_load.records if r[0] >= up and r[1] == 200]
    after_up = [r for r in cold_load.records if r[0] >= up]
    first_ok = min(recovered) if recovered else None
    later_bad = [r for r in after_up if first_ok is not None and r[0] - up > first_ok and r[1] != 200]
    return {
        "outage_s": marks["restart"] - down,
        "seaweed_restart_s": up - marks["restart"],
        "warm_during": summary(warm_load.records, since=down, until=up),
        "cold_during": {
            "requests": len(cold_out),
            "503": sum(1 for r in cold_out if r[1] == 503),
            "503_with_retry_after": sum(1 for r in cold_out if r[1] == 503 and r[3]),
            "codes": summary(cold_out)["codes"],
        },
        "cold_first_ok_after_s3_up_s": first_ok,
        "cold_failures_after_recovery": len(later_bad),
        "warm_after": summary(warm_load.records, since=up),
    }


def verify_store(url: str, tenants: list[str]) -> dict:
    store = open_store(url)

    def check(tenant):
        return [store.verify(f"{tenant}/intent@{v}").version for v in store.version_numbers(tenant, "intent")]

    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(check, tenants))
    return {
        "tenants": len(tenants),
        "versions_verified": sum(len(v) for v in versions),
        "missing": [t for t, v in zip(tenants, versions, strict=True) if not v],
    }


# -- report -------------------------------------------------------------------------------------------
def median(values):
    values = sorted(values)
    return (
        values[len(values) // 2]
        if len(values) % 2
        else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    )


def markdown(args, result: dict) -> str:
    aff = [r for r in result["affinity"]["rounds"] if r["mode"] == "affinity"]
    rr = [r for r in result["affinity"]["rounds"] if r["mode"] == "round-robin"]
    rng = lambda rows, k: f"{min(r[k] for r in rows):.3f}-{max(r[k] for r in rows):.3f}"  # noqa: E731
    lines = [
        f"# Scale-out: 3 replicas, one SeaweedFS store, nginx hashing on the bearer token ({result['when']})",
        "",
        f"Load average {result['load_before']} before, {result['load_after']} after (1/5/15 min) on "
        f"{os.cpu_count()} CPUs ({result['cpu']}), shared with other jobs. Tiny random BERT base, "
        f"{args.tenants} tenants with a LoRA each ({result['adapter_bytes']} bytes in the cache), each "
        f"replica's cache {result['cache_bytes']} bytes (about {result['cache_bytes'] // result['adapter_bytes']} "
        f"adapters); Zipf s={args.zipf} over tenants; {args.clients} closed-loop clients; "
        f"{args.rounds} interleaved rounds of {args.warmup:.0f} s warm-up + {args.seconds:.0f} s measured. "
        "`python benchmarks/bench_scaleout.py`.",
        "",
        "| check | affinity (hash on Authorization) | round-robin |",
        "|---|---|---|",
        f"| adapter cache hit rate, median (range) | **{median([r['hit_rate'] for r in aff]):.3f}** ({rng(aff, 'hit_rate')}) "
        f"| {median([r['hit_rate'] for r in rr]):.3f} ({rng(rr, 'hit_rate')}) |",
        f"| requests/s, median (range) | **{median([r['rps'] for r in aff]):.1f}** ({rng(aff, 'rps')}) "
        f"| {median([r['rps'] for r in rr]):.1f} ({rng(rr, 'rps')}) |",
        f"| failed requests | {sum(r['errors'] for r in aff)} of {sum(r['requests'] for r in aff)} "
        f"| {sum(r['errors'] for r in rr)} of {sum(r['requests'] for r in rr)} |",
        "",
    ]
    if "kill" not in result:  # --affinity-only
        return "\n".join(lines + [""])
    kill, roll, s3, promote = result["kill"], result["rolling"], result["s3"], result["promote"]
    window = kill["failed_window_s"]
    kill_window = "none" if window is None else f"all within {window[0]:.2f}-{window[1]:.2f} s of the kill"
    lines += [
        "| check | result |",
        "|---|---|",
        f"| alias promote on replica 0 seen by replicas 0/1/2 after (s) | "
        f"{' / '.join('never' if x is None else f'{x:.2f}' for x in promote['lags_s'])} (bound: TTL {ALIAS_TTL_S:.0f} s + 1 s = {promote['bound_s']:.0f} s) |",
        f"| kill -9 of replica 2 under load: failed requests | {kill['failed']} of {kill['after']['requests']} after the kill "
        f"({kill_window}; "
        f"codes {kill['after']['codes']}) |",
        f"| kill -9 while uploading to that replica | {kill['uploads_201']} uploads answered 201, {len(kill['uploads_lost'])} lost; "
        f"{kill['versions_stored_and_verified']} stored versions all verify |",
        f"| rolling restart (SIGTERM, {DRAIN_S:.0f} s drain, restart, ready; 3 replicas in turn) | "
        f"{roll['failed']} failed of {roll['requests']} (codes {roll['codes']}) |",
        f"| S3 killed for {s3['outage_s']:.1f} s: warm tenants | {s3['warm_during']['ok']} of {s3['warm_during']['requests']} answered 200 "
        f"(codes {s3['warm_during']['codes']}) |",
        f"| S3 down: never-loaded tenants | {s3['cold_during']['503']} of {s3['cold_during']['requests']} got 503, "
        f"{s3['cold_during']['503_with_retry_after']} with Retry-After (codes {s3['cold_during']['codes']}) |",
        f"| S3 back (weed restart took {s3['seaweed_restart_s']:.1f} s): first cold 200 after | "
        + (
            "never"
            if s3["cold_first_ok_after_s3_up_s"] is None
            else f"{s3['cold_first_ok_after_s3_up_s']:.2f} s"
        )
        + f"; {s3['cold_failures_after_recovery']} failures after it; warm after: {s3['warm_after']['ok']} of {s3['warm_after']['requests']} |",
        f"| store after everything | {result['store']['versions_verified']} versions of {result['store']['tenants']} tenants verify; "
        f"missing: {len(result['store']['missing'])} |",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tenants", type=int, default=300)
    ap.add_argument("--cold", type=int, default=40, help="extra tenants first used during the S3 outage")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=6.0)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--outage", type=float, default=20.0)
    ap.add_argument("--out", default="scaleout")
    ap.add_argument("--affinity-only", action="store_true", help="only phase 1 (hit rate and throughput)")
    args = ap.parse_args()

    started = time.monotonic()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="loraplex-scaleout-"))
    tenants = [f"t{i:03d}" for i in range(args.tenants)]
    cold = [f"cold{i:03d}" for i in range(args.cold)]
    tokens = {t: f"tok-{t}-0123456789" for t in tenants + cold}
    (work / "tokens.json").write_text(
        json.dumps({"admin": [ADMIN], "tenants": {t: [tok] for t, tok in tokens.items()}})
    )
    texts = sentences(200)
    seaweed = nginx = None
    replicas: list[ServeProcess] = []
    try:
        base_dir = make_tiny_bert(work / "tiny")
        seaweed = start_seaweed(work / "seaweed")
        url = seaweed.store_url(bucket="loraplex-scaleout")
        print(f"seeding {len(tenants) + len(cold)} tenants into {url}", flush=True)
        seed_store(url, base_dir, work, tenants + cold)
        nbytes = adapter_nbytes(url, tenants[-1])
        cache_bytes = nbytes * len(tenants) // 3
        env = dict(os.environ)
        env.update(
            {
                "LORAPLEX_STORE": url,
                "LORAPLEX_BASE": "tiny",
                "LORAPLEX_TOKENS_FILE": str(work / "tokens.json"),
                "LORAPLEX_CACHE_BYTES": str(cache_bytes),
                "LORAPLEX_ALIAS_TTL_S": str(ALIAS_TTL_S),
                "LORAPLEX_DRAIN_S": str(DRAIN_S),
                "LORAPLEX_THREADS": "1",
                "OMP_NUM_THREADS": "1",
                "BENTOML_HOME": str(work / "bentoml"),
                "PYTHONPATH": str(REPO),
            }
        )
        ports = [free_port() for _ in range(3)]
        replicas = [start_replica(p, env, work) for p in ports]
        for r in replicas:
            wait_ready(r, 300)
        nginx, aff_port, rr_port = start_nginx(work, ports)
        fronts = {"affinity": aff_port, "round-robin": rr_port}
        pick = zipf_picker(tenants, args.zipf)
        print("phase 1: affinity vs round-robin", flush=True)
        result: dict = {"affinity": phase_affinity(args, fronts, replicas, tokens, pick, texts)}
        if not args.affinity_only:
            print("phase 2: alias promote", flush=True)
            result["promote"] = phase_promote(replicas, tokens, tenants[0])
            print("phase 3: kill -9 one replica under load", flush=True)
            result["kill"] = phase_kill(args, fronts, replicas, tokens, pick, texts, url, base_dir, work)
            replicas[-1] = start_replica(replicas[-1].port, env, work)
            wait_ready(replicas[-1], 300)
            print("phase 4: rolling restart", flush=True)
            result["rolling"] = phase_rolling(args, fronts, replicas, tokens, pick, texts, work, nginx)
            print("phase 5: S3 outage", flush=True)
            result["s3"] = phase_s3_outage(args, fronts, replicas, tokens, texts, seaweed, tenants[:30], cold)
            result["store"] = verify_store(url, tenants + cold)
        result.update(
            {
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "load_before": load_before,
                "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
                "cpu": _cpu_model(),
                "adapter_bytes": nbytes,
                "cache_bytes": cache_bytes,
                "args": vars(args),
                "wall_s": time.monotonic() - started,
            }
        )
        text = markdown(args, result)
        print(text)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.out}.md").write_text(text)
        (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1, default=str))
    finally:
        for r in replicas:
            r.stop()
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        if seaweed is not None:
            seaweed.kill()
        if os.environ.get("LORAPLEX_KEEP_WORK") != "1":
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    main()
