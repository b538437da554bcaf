"""The Kubernetes manifests under deploy/k8s, checked offline: each overlay rendered (a pure-Python
kustomize, tests/helpers/kustomize.py), every object validated against the Kubernetes schemas
(``kubernetes-validate``, strict), security policies (``checkov``), lint (``yamllint``), and the
rules that tie the manifests to the product: settings that the service accepts, probes on its real
routes, a grace period that covers the drain, memory sized from the measured replica, and routing
that hashes on the bearer token.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers.kustomize import KustomizeError, build

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
K8S_VERSION = "1.33.0"  # oldest release the manifests promise to work on (docs/deploy.md)
IMAGE_UID = 1034  # BentoML's generated Dockerfile: user bentoml, BENTO_USER_UID=1034


def _objects(overlay: str) -> dict[str, dict]:
    return {o["kind"]: o for o in build(K8S / "overlays" / overlay)}


def _container(objs: dict[str, dict]) -> dict:
    (container,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _quantity_bytes(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([KMG]i?)?", q)
    assert m, q
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


def test_overlays_exist():
    assert {"production", "dev"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schema(overlay):
    import kubernetes_validate

    objs = build(K8S / "overlays" / overlay)
    assert {o["kind"] for o in objs} >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Ingress",
        "ServiceAccount",
        "NetworkPolicy",
    }
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    secret = yaml.safe_load((K8S / "secrets.example.yaml").read_text())
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)


def test_the_schema_check_really_rejects_a_broken_manifest():
    import kubernetes_validate

    deployment = copy.deepcopy(_objects("production")["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")  # a typo kubectl would drop silently
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_the_renderer_refuses_kustomize_features_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nconfigMapGenerator: []\n")
    with pytest.raises(KustomizeError, match="configMapGenerator"):
        build(tmp_path)


def test_yaml_lint():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig("extends: default\nrules: {line-length: {max: 120}, document-start: disable}")
    problems = [
        f"{path.relative_to(REPO)}:{p.line}: {p.message}"
        for path in sorted(K8S.rglob("*.yaml"))
        for p in linter.run(path.read_text(), config)
    ]
    assert problems == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_and_secret_files_are_ones_the_service_accepts(overlay, tmp_path):
    import configparser

    from serving.auth import token_book_from_settings
    from serving.settings import LimitSettings, ServiceSettings

    objs = _objects(overlay)
    container = _container(objs)
    env = dict(objs["ConfigMap"]["data"])
    known = {f"LORAPLEX_{f.upper()}" for f in [*ServiceSettings.model_fields, *LimitSettings.model_fields]}
    known |= {"LORAPLEX_S3_ENDPOINT"}  # read by the S3 store itself
    assert {k for k in env if k.startswith("LORAPLEX_")} <= known, "a misspelt setting is silently ignored"
    # Secrets come as files from the Secret volume; the example's files must be what the service reads.
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "secrets"]
    secret = yaml.safe_load((K8S / "secrets.example.yaml").read_text())["stringData"]
    for var in container["env"]:
        assert "secretKeyRef" not in var.get("valueFrom", {}), "secrets belong in files, not env"
        name, _, key = var["value"].rpartition("/")
        if name == mount["mountPath"]:
            assert key in secret, var
            (tmp_path / key).write_text(secret[key])
            env[var["name"]] = str(tmp_path / key)
    settings = ServiceSettings.from_env(env)  # raises on any value the service would refuse at start
    assert token_book_from_settings(settings).tenants == ["acme"]
    credentials = configparser.ConfigParser()
    credentials.read(env["AWS_SHARED_CREDENTIALS_FILE"])
    assert {"aws_access_key_id", "aws_secret_access_key"} <= set(credentials["default"])


def test_no_secret_in_the_configmap():
    config = _objects("production")["ConfigMap"]["data"]
    assert not any(word in k for k in config for word in ("TOKEN", "SECRET", "KEY")), config


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_drain_and_security(overlay):
    objs = _objects(overlay)
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    container = _container(objs)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["ports"][0]["containerPort"] == 3000  # the bento's port
    # Grace period: the drain (readiness 503 while still serving) plus the longest request.
    from serving.service import LoraplexService

    drain = float(objs["ConfigMap"]["data"]["LORAPLEX_DRAIN_S"])
    longest = LoraplexService.config["traffic"]["timeout"]
    assert pod["terminationGracePeriodSeconds"] >= drain + longest
    # The readiness probe must notice the drain well inside it.
    probe = container["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] < drain
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # writable scratch


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_pods(overlay):
    objs = _objects(overlay)
    labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        objs["Deployment"]["spec"]["selector"]["matchLabels"],
        objs["Service"]["spec"]["selector"],
        objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert (
        objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"]
        == objs["Deployment"]["metadata"]["name"]
    )
    hpa = objs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["minReplicas"] <= objs["Deployment"]["spec"]["replicas"] <= hpa["maxReplicas"]
    backend = objs["Ingress"]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == objs["Service"]["metadata"]["name"]


def test_tenant_affine_routing_hashes_on_the_bearer_token():
    annotations = _objects("production")["Ingress"]["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_authorization"
    assert "error" in annotations["nginx.ingress.kubernetes.io/proxy-next-upstream"]  # spill-over
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-next-upstream-tries"]) >= 2
    assert _objects("production")["Deployment"]["spec"]["replicas"] >= 3


def test_memory_is_sized_from_the_measured_replica():
    """request >= measured memory of a ready replica + the adapter cache budget at the measured RSS
    per cached byte (README, engine figures); both figures come from the results files."""
    per_byte = json.loads((REPO / "benchmarks" / "results" / "engine.json").read_text())["rss_growth_ratio"]
    measured = (REPO / "benchmarks" / "results" / "container.md").read_text()
    m = re.search(r"container memory after one adapter is loaded \| ([\d.]+)(MiB|MB|GiB|GB)", measured)
    assert m, "run deploy/smoke-container.sh to measure the replica"
    replica = float(m.group(1)) * {"MiB": 1 << 20, "MB": 10**6, "GiB": 1 << 30, "GB": 10**9}[m.group(2)]
    for overlay in OVERLAYS:
        objs = _objects(overlay)
        cache = int(objs["ConfigMap"]["data"]["LORAPLEX_CACHE_BYTES"])
        resources = _container(objs)["resources"]
        request = _quantity_bytes(resources["requests"]["memory"])
        assert request >= replica + per_byte * cache, overlay
        assert _quantity_bytes(resources["limits"]["memory"]) >= request


def _checkov() -> str | None:
    for candidate in (os.environ.get("LORAPLEX_CHECKOV"), str(REPO / ".venv-checkov" / "bin" / "checkov")):
        if candidate and Path(candidate).is_file():
            return candidate
    return shutil.which("checkov")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_no_security_misconfiguration(overlay, tmp_path):
    checkov = _checkov()
    if checkov is None:
        if os.environ.get("CI"):
            pytest.fail("checkov is missing: .ci/run installs it into .venv-checkov")
        pytest.skip(
            "checkov not installed (python3 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov)"
        )
    out = tmp_path / "rendered"
    out.mkdir()
    (out / f"{overlay}.yaml").write_text(yaml.safe_dump_all(build(K8S / "overlays" / overlay)))
    result = subprocess.run(
        [checkov, "-d", str(out), "--framework", "kubernetes", "-o", "json", "--quiet", "--compact"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(result.stdout) if result.stdout.strip() else {}
    if isinstance(report, list):
        report = report[0]
    failed = [
        f"{c['check_id']} {c['check_name']} ({c['resource']})"
        for c in report.get("results", {}).get("failed_checks", [])
    ]
    assert failed == [], "\n".join(failed)
    assert report.get("summary", {}).get("passed", 0) > 20, result.stdout[-2000:] + result.stderr[-2000:]
