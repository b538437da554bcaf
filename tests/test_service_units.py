"""Service pieces without a server: settings, tokens, limits, error bodies, uploads, batch answering."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from pydantic import ValidationError as PydanticValidationError

from adapters_store import describe_base, open_store
from adapters_store.errors import (
    Forbidden,
    InvalidRequest,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    UnsafeFormat,
    ValidationError,
)
from serving.auth import TokenBook, hash_token, load_tokens_file
from serving.gateway import GatewayMiddleware, GatewayState, normalise_error_body, required_role
from serving.inference import run_batch
from serving.limits import InflightLimiter, check_content_length, check_items, decode_image, read_body
from serving.management import rollback_target
from serving.schemas import ClassifyItem, EmbedItem
from serving.settings import LimitSettings, ServiceSettings, parse_tenant_tokens
from serving.uploads import bundle_from_upload, parse_labels
from tests.helpers.bundles import head_bundle, head_bundle_from, save_peft_lora


# -- settings ------------------------------------------------------------------------------------------
def test_settings_from_env_and_file(tmp_path):
    cfg = tmp_path / "svc.json"
    cfg.write_text(json.dumps({"base": "tiny", "cache_bytes": 1000, "limits": {"max_inputs": 5}}))
    env = {
        "LORAPLEX_CONFIG": str(cfg),
        "LORAPLEX_STORE": "/srv/store",
        "LORAPLEX_CACHE_BYTES": "2048",  # env wins over the file
        "LORAPLEX_TENANT_TOKENS": "acme:tok-acme-1,acme:tok-acme-2, globex:tok-globex",
        "LORAPLEX_PINS": "acme,globex/sentiment",
        "LORAPLEX_MAX_CHARS": "100",
        "LORAPLEX_INSECURE_DEV": "0",
    }
    s = ServiceSettings.from_env(env)
    assert (s.store, s.base, s.cache_bytes) == ("/srv/store", "tiny", 2048)
    assert plain(s.tenant_tokens) == {"acme": ("tok-acme-1", "tok-acme-2"), "globex": ("tok-globex",)}
    assert s.pins == ("acme", "globex/sentiment")
    assert (s.limits.max_inputs, s.limits.max_chars) == (5, 100)
    assert s.insecure_dev is False


@pytest.mark.parametrize(
    "env, needle",
    [
        ({}, "LORAPLEX_STORE: Field required"),
        ({"LORAPLEX_STORE": "x", "LORAPLEX_MAX_INPUTS": "0"}, "LORAPLEX_MAX_INPUTS: Input should be"),
        ({"LORAPLEX_STORE": "x", "LORAPLEX_BASE": "Bad/Name"}, "LORAPLEX_BASE: invalid base name"),
        ({"LORAPLEX_STORE": "x", "LORAPLEX_INSECURE_DEV": "maybe"}, "LORAPLEX_INSECURE_DEV must be"),
        (
            {"LORAPLEX_STORE": "x", "LORAPLEX_TENANT_TOKENS": "globex:tok-globex-1,acme:short"},
            "LORAPLEX_TENANT_TOKENS: entry 2 \\(tenant 'acme'\\): a token needs at least 8 characters",
        ),
        (
            {"LORAPLEX_STORE": "x", "LORAPLEX_TENANT_TOKENS": "no-colon"},
            "entry 1 must look like 'tenant:token'",
        ),
        ({"LORAPLEX_STORE": "x", "LORAPLEX_RUNTIME": "tpu"}, "LORAPLEX_RUNTIME: Input should be"),
        ({"LORAPLEX_STORE": "x", "LORAPLEX_ADMIN_TOKEN": "short"}, "LORAPLEX_ADMIN_TOKEN: a token needs"),
        ({"LORAPLEX_STORE": "x", "LORAPLEX_METRICS_AUTH": "open"}, "LORAPLEX_METRICS_AUTH: Input should be"),
    ],
)
def test_settings_errors_name_the_variable(env, needle):
    with pytest.raises(InvalidRequest, match=needle):
        ServiceSettings.from_env(env)


def test_settings_errors_from_the_config_file_name_the_file_and_key(tmp_path):
    cfg = tmp_path / "svc.yaml"
    cfg.write_text("limits:\n  max_inputs: 0\n")
    with pytest.raises(InvalidRequest, match=r"LORAPLEX_CONFIG file .*svc.yaml, key limits.max_inputs"):
        ServiceSettings.from_env({"LORAPLEX_CONFIG": str(cfg), "LORAPLEX_STORE": "x"})
    cfg.write_text("admin_token: tok-secret-value: x\n")  # YAML's own message quotes the line
    with pytest.raises(InvalidRequest, match="not valid YAML at line 1") as err:
        ServiceSettings.from_env({"LORAPLEX_CONFIG": str(cfg), "LORAPLEX_STORE": "x"})
    assert "secret" not in str(err.value)


def plain(tokens) -> dict[str, tuple[str, ...]]:
    return {k: tuple(t.get_secret_value() for t in v) for k, v in tokens.items()}


def test_parse_tenant_tokens_skips_blanks():
    parsed = parse_tenant_tokens("a:12345678,, b:abcdefgh ")
    assert plain(parsed) == {"a": ("12345678",), "b": ("abcdefgh",)}
    assert "12345678" not in repr(parsed)  # SecretStr from the moment they are read


# -- tokens ----------------------------------------------------------------------------------------------
def test_token_book_resolves_each_token_to_its_principal():
    book = TokenBook(
        ["admin-secret-1"],
        {"acme": ["acme-secret-1"], "globex": [f"sha256:{hash_token('g-secret-1').hex()}"]},
    )
    assert book.authenticate("Bearer admin-secret-1").role == "admin"
    assert book.authenticate("Bearer acme-secret-1").tenant == "acme"
    assert book.authenticate("bearer g-secret-1").tenant == "globex"  # pre-hashed entry
    for bad in ("Bearer acme-secret-2", "Bearer ", "acme-secret-1", None, "Basic YWJj"):
        with pytest.raises(Unauthorized):
            book.authenticate(bad)
    with pytest.raises(Forbidden):
        book.authenticate("Bearer admin-secret-1").require_tenant()
    with pytest.raises(Forbidden):
        book.authenticate("Bearer acme-secret-1").require_admin()


def test_token_book_refuses_no_tokens_duplicates_and_bad_hashes():
    with pytest.raises(InvalidRequest, match="INSECURE_DEV"):
        TokenBook([], {})
    with pytest.raises(InvalidRequest, match="repeats"):
        TokenBook(["same-token-1"], {"acme": ["same-token-1"]})
    with pytest.raises(InvalidRequest, match="64 hex"):
        TokenBook(["sha256:abc"], {})


def test_insecure_dev_trusts_the_tenant_header_only_in_dev_mode():
    dev = TokenBook([], {}, insecure_dev=True)
    assert dev.authenticate(None, dev_tenant="acme").tenant == "acme"
    assert dev.authenticate(None).role == "admin"
    strict = TokenBook(["admin-secret-1"], {})
    with pytest.raises(Unauthorized):
        strict.authenticate(None, dev_tenant="acme")


def test_tokens_file(tmp_path):
    p = tmp_path / "tokens.json"
    p.write_text(json.dumps({"admin": "adm-token-1", "tenants": {"acme": ["t-acme-1"], "b": "t-b-12345"}}))
    entries = {(e.principal.role, e.principal.tenant, e.secret) for e in load_tokens_file(p)}
    assert entries == {
        ("admin", None, "adm-token-1"),
        ("tenant", "acme", "t-acme-1"),
        ("tenant", "b", "t-b-12345"),
    }
    p.write_text("[1, 2]")
    with pytest.raises(InvalidRequest):
        load_tokens_file(p)


# -- limits ----------------------------------------------------------------------------------------------
def test_content_length_limit_before_reading():
    check_content_length({b"content-length": b"100"}, 100)
    with pytest.raises(PayloadTooLarge):
        check_content_length({b"content-length": b"101"}, 100)
    with pytest.raises(InvalidRequest):
        check_content_length({b"content-length": b"ten"}, 100)


def test_streamed_body_stops_at_the_limit():
    chunks = [b"x" * 60, b"y" * 60, b"z" * 60]
    reads = []

    async def receive():
        reads.append(1)
        body = chunks[len(reads) - 1]
        return {"type": "http.request", "body": body, "more_body": len(reads) < len(chunks)}

    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(receive, 100))
    assert len(reads) == 2  # the third chunk was never requested
    reads.clear()
    assert asyncio.run(read_body(receive, 1000)) == b"".join(chunks)


def test_check_items_limits():
    limits = LimitSettings(max_inputs=2, max_chars=10)
    check_items([ClassifyItem(adapter="a", text="0123456789")], limits)
    with pytest.raises(ValidationError, match="limit is 2"):
        check_items([EmbedItem(text="a")] * 3, limits)
    with pytest.raises(ValidationError, match=r"items\[0\].text has 11"):
        check_items([EmbedItem(text="x" * 11)], limits)
    with pytest.raises(ValidationError, match="at least one"):
        check_items([], limits)
    with pytest.raises(PayloadTooLarge, match=r"items\[0\].audio_b64"):  # refused before any decoding
        check_items([EmbedItem(audio_b64="A" * 2000)], LimitSettings(max_audio_bytes=1024))


def _png(w: int, h: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_decode_image_checks_pixels_and_format():
    limits = LimitSettings(max_image_pixels=64 * 64)
    arr = decode_image(_png(16, 8), limits)
    assert arr.shape == (8, 16, 3) and arr.dtype == np.uint8 and arr[0, 0].tolist() == [10, 20, 30]
    with pytest.raises(ValidationError, match="pixels"):
        decode_image(_png(65, 64), limits)
    with pytest.raises(InvalidRequest, match="base64"):
        decode_image("%%%not-base64", limits)
    with pytest.raises(ValidationError, match="readable"):
        decode_image(base64.b64encode(b"GIF89a-not-really").decode(), limits)


def test_inflight_limiter():
    lim = InflightLimiter(2)
    lim.acquire()
    lim.acquire()
    with pytest.raises(TooManyRequests):
        lim.acquire()
    lim.release()
    lim.acquire()


# -- error bodies and routes -------------------------------------------------------------------------------
def test_foreign_error_bodies_become_error_message():
    status, body = normalise_error_body(
        400, b'{"error":"1 validation error","detail":[{"msg":"Field required"}]}', "/v1/classify", True
    )
    assert status == 400 and json.loads(body) == {
        "error": "invalid_request",
        "message": "1 validation error: Field required",
    }
    status, body = normalise_error_body(404, b"Not Found", "/x", True)
    assert (status, json.loads(body)["error"]) == (404, "not_found")
    ours = b'{"error": "not_found", "message": "m"}'
    assert normalise_error_body(404, ours, "/x", True) == (404, ours)
    # BentoML sheds load with 503 once ready: the client sees 429; while loading 503 stays 503.
    assert normalise_error_body(503, b'{"error":"overloaded"}', "/v1/embed", True)[0] == 429
    assert normalise_error_body(503, b'{"error":"x"}', "/v1/embed", False)[0] == 503


@pytest.mark.parametrize(
    "path, role",
    [
        ("/v1/admin", "admin"),
        ("/v1/admin/tenants", "admin"),
        ("/v1/administrator", "tenant"),
        ("/v1/classify", "tenant"),
        ("/v1/adapters/x", "tenant"),
        ("/anything", "tenant"),
    ],
)
def test_required_role(path, role):
    assert required_role(path) == role


def test_gateway_sheds_load_with_429_and_counts_inflight():
    """Two slow requests hold the only two slots; the third is refused at once, not queued."""
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    state = GatewayState(tokens=TokenBook([], {"acme": ["acme-secret-1"]}), limiter=InflightLimiter(2))
    mw = GatewayMiddleware(slow_app, state)

    async def call():
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg):
            sent.append(msg)

        scope = {
            "type": "http",
            "path": "/v1/adapters",
            "method": "GET",
            "headers": [(b"authorization", b"Bearer acme-secret-1")],
        }
        await mw(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    async def main():
        first = [asyncio.create_task(call()) for _ in range(2)]
        await asyncio.sleep(0.05)
        third = await asyncio.wait_for(call(), timeout=2)
        release.set()
        return third, [await t for t in first], state.limiter.active

    third, firsts, active = asyncio.run(main())
    assert third[0] == 429 and json.loads(third[1])["error"] == "too_many_requests"
    assert [s for s, _ in firsts] == [200, 200] and active == 0


# -- uploads -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tiny_bert_dir):
    return describe_base("tiny", tiny_bert_dir)


def test_upload_of_peft_files_and_of_a_bundle(tiny_bert_dir, tiny_base, tmp_path):
    folder = save_peft_lora(tiny_bert_dir, tmp_path / "peft", num_labels=2)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    bundle = bundle_from_upload(dict(files), {"labels": "neg,pos"}, "acme", "intent", tiny_base)
    assert (bundle.manifest.kind, bundle.manifest.labels) == ("lora", ["neg", "pos"])
    assert bundle.files["adapter_model.safetensors"] == files["adapter_model.safetensors"]  # bytes unchanged

    head = head_bundle(tiny_base, tenant="acme", name="sent")
    upload = {**head.files, "manifest.json": head.manifest.to_json()}
    assert (
        bundle_from_upload(dict(upload), {}, "acme", "sent", tiny_base).manifest.digest
        == head.manifest.digest
    )
    with pytest.raises(ValidationError, match="upload URL"):
        bundle_from_upload(dict(upload), {}, "globex", "sent", tiny_base)
    tampered = {**upload, "head.safetensors": head.files["head.safetensors"] + b"x"}
    with pytest.raises(Exception, match="sha256"):
        bundle_from_upload(tampered, {}, "acme", "sent", tiny_base)
    with pytest.raises(ValidationError, match="PEFT folder"):
        bundle_from_upload({"README.md": b"hi"}, {}, "acme", "x", tiny_base)


def test_upload_file_names_refuse_pickles():
    from adapters_store.bundle import check_file_name

    with pytest.raises(UnsafeFormat):
        check_file_name("adapter_model.bin")


def test_parse_labels():
    assert parse_labels('["a", "b"]') == ["a", "b"]
    assert parse_labels(" a, b ,") == ["a", "b"]
    assert parse_labels("") is None
    with pytest.raises(ValidationError):
        parse_labels("[1, 2]")


def test_rollback_target_is_the_previous_existing_version(tiny_base, tmp_path):
    store = open_store(tmp_path / "store")
    base = store.register_base(tiny_base)
    for seed in range(3):
        store.put(head_bundle(base, tenant="acme", name="h", seed=seed))
    store.delete_version("acme", "h", 2)
    store.set_alias("acme", "h", "production", 3)
    assert rollback_target(store, "acme", "h", "production") == (3, 1)
    store.set_alias("acme", "h", "production", 1)
    with pytest.raises(InvalidRequest, match="no older"):
        rollback_target(store, "acme", "h", "production")


def test_adapter_view_pages_a_long_history(tiny_base, tmp_path, monkeypatch):
    from serving.management import adapter_view

    store = open_store(tmp_path / "store")
    base = store.register_base(tiny_base)
    for seed in range(6):
        store.put(head_bundle(base, tenant="acme", name="h", seed=seed))
    store.delete_version("acme", "h", 4)
    full = adapter_view(store, "acme", "h")
    assert [v["version"] for v in full["versions"]] == [1, 2, 3, 5, 6] and "next_before" not in full
    reads = []
    real = store.resolve
    monkeypatch.setattr(store, "resolve", lambda ref: reads.append(ref) or real(ref))
    page = adapter_view(store, "acme", "h", limit=2)
    assert [v["version"] for v in page["versions"]] == [5, 6] and page["next_before"] == 5
    assert page["total_versions"] == 5 and len(reads) == 2  # only the page's manifests are read
    page = adapter_view(store, "acme", "h", limit=2, before=page["next_before"])
    assert [v["version"] for v in page["versions"]] == [2, 3] and page["next_before"] == 2
    last = adapter_view(store, "acme", "h", limit=2, before=2)
    assert [v["version"] for v in last["versions"]] == [1] and "next_before" not in last


# -- one batch, many tenants ----------------------------------------------------------------------------------
def test_run_batch_answers_rows_of_many_tenants_and_fails_bad_rows_alone(tiny_base, tmp_path):
    import torch

    from serving.engine import Engine, EngineSettings

    torch.set_num_threads(1)
    store = open_store(tmp_path / "store")
    base = store.register_base(tiny_base)
    store.put(head_bundle(base, tenant="acme", name="h", seed=1))
    store.put(head_bundle(base, tenant="globex", name="h", seed=2))
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    items = []
    for tenant, adapter in [("acme", "h"), ("globex", "h"), ("acme", "missing"), ("globex", "h")]:
        item = ClassifyItem(adapter=adapter, text="the same words")
        item._tenant = tenant
        items.append(item)
    out = run_batch(engine, "classify", items, LimitSettings())
    assert [r.error.error if r.error else None for r in out] == [None, None, "not_found", None]
    assert out[2]._status == 404
    assert out[0].version == 1 and out[0].digest and out[0].digest != out[1].digest
    assert out[0].scores != out[1].scores  # tenants' heads differ on the same text
    assert out[1].scores == pytest.approx(out[3].scores)
    assert all(
        r.error.error == "unavailable" for r in run_batch(None, "classify", items[:2], LimitSettings())
    )


# -- wiring ------------------------------------------------------------------------------------------------------
def test_engine_settings_follow_service_settings_and_pass_the_runtime():
    from serving.service import engine_settings

    es = engine_settings(
        ServiceSettings(store="x", cache_bytes=1234, pins=("acme",), alias_ttl_s=0.5, threads=1)
    )
    assert (es.cache_bytes, es.pins, es.alias_ttl_s, es.threads) == (1234, ("acme",), 0.5, 1)
    assert engine_settings(ServiceSettings(store="x", runtime="onnx")).runtime == "onnx"
    assert engine_settings(ServiceSettings(store="x", runtime="onnx-int8")).runtime == "onnx-int8"
    with pytest.raises(Exception, match="runtime"):
        ServiceSettings(store="x", runtime="tensorrt")


def test_management_openapi_lists_every_route_with_its_methods():
    from serving.console_app import CONSOLE_ROUTES
    from serving.jobs_routes import JOB_ROUTES
    from serving.management import all_routes, openapi_spec

    extra = [*JOB_ROUTES, *CONSOLE_ROUTES]
    spec = openapi_spec(extra=extra)
    ops = {(path, m) for path, item in spec["paths"].items() for m in item}
    assert len(ops) == sum(len(r.methods - {"HEAD"}) for r in all_routes(extra))
    assert ("/v1/admin/tenants/{tenant}/tokens/{token_id}/rotate", "post") in ops
    assert ("/v1/jobs", "post") in ops and ("/v1/admin/tenants/{tenant}/jobs/{job}/cancel", "post") in ops
    assert ("/v1/admin/tenants/{tenant}/adapters/{name}/versions", "post") in ops
    assert ("/v1/admin/tenants/{tenant}/adapters/{name}/pin", "delete") in ops


def test_insecure_dev_mode_is_announced_loudly(caplog):
    from serving.auth import token_book_from_settings

    with caplog.at_level("WARNING", logger="loraplex.auth"):
        book = token_book_from_settings(ServiceSettings(store="x", insecure_dev=True))
    assert book.insecure_dev and "INSECURE DEV MODE" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="loraplex.auth"):
        token_book_from_settings(ServiceSettings(store="x", admin_token="admin-secret-1"))
    assert "INSECURE" not in caplog.text


def test_token_policy_reject_counts_with_the_base_tokenizer(tiny_bert_dir):
    from serving.limits import TokenCounter

    counter = TokenCounter(str(tiny_bert_dir / "tokenizer.json"))
    assert counter.count("hello world") == 4  # [CLS] hello world [SEP]
    counter.check("hello world", 4)
    with pytest.raises(ValidationError, match="5 tokens; the limit is 4"):
        counter.check("hello big world", 4)


def test_run_batch_decodes_images_for_an_image_backbone(tiny_vit_dir, tmp_path):
    """PNG in base64 -> HWC uint8 -> the engine's image path; a broken image fails its row alone."""
    import torch

    from serving.engine import Engine, EngineSettings

    torch.set_num_threads(1)
    store = open_store(tmp_path / "store")
    base = store.register_base(describe_base("vit", tiny_vit_dir))
    g = torch.Generator().manual_seed(0)
    head = {"out.weight": torch.randn(2, 32, generator=g), "out.bias": torch.zeros(2)}
    store.put(
        head_bundle_from(base, head, "acme", "shapes", ["round", "square"], task="image-classification")
    )
    engine = Engine(store, base="vit", settings=EngineSettings(threads=1))
    items = [
        ClassifyItem(adapter="shapes", image_b64=_png(16, 16)),
        ClassifyItem(adapter="shapes", image_b64="%%"),
        ClassifyItem(adapter="shapes", image_b64=_png(20, 12)),
    ]
    for item in items:
        item._tenant = "acme"
    out = run_batch(engine, "classify", items, LimitSettings())
    assert out[0].error is None and sorted(out[0].labels) == ["round", "square"], out[0]
    assert out[1].error.error == "invalid_request" and out[1]._status == 400
    assert out[2].error is None and sum(out[2].scores) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("limit", [1, 3])
def test_management_requests_take_turns(limit, monkeypatch):
    """LORAPLEX_MAX_MANAGEMENT: at most ``limit`` management requests run at once; the rest wait."""
    import asyncio
    import threading
    import time

    import httpx

    from serving import management
    from serving.auth import ADMIN
    from serving.gateway import PRINCIPAL_KEY

    running, peak, lock = [0], [0], threading.Lock()

    class SlowStore:
        def list_tenants(self):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.1)
            with lock:
                running[0] -= 1
            return ["acme"]

    ctx = management.ManagementContext(store=SlowStore(), base=object(), max_management=limit)
    app = management.build_app(ctx)

    async def as_admin(scope, receive, send):
        scope.setdefault("state", {})[PRINCIPAL_KEY] = ADMIN
        await app(scope, receive, send)

    async def burst():
        transport = httpx.ASGITransport(app=as_admin)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await asyncio.gather(*[client.get("/admin/tenants") for _ in range(6)])

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 6
    assert peak[0] == limit


def _wav(samples: np.ndarray, rate: int = 16000, channels: int = 1, width: int = 2) -> str:
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def test_decode_audio_takes_mono_16_bit_wav_at_the_base_rate_only():
    from serving.limits import decode_audio

    limits = LimitSettings(max_audio_seconds=1.0)
    pcm = (np.sin(np.arange(8000) / 5) * 20000).astype("<i2")
    wave_ = decode_audio(_wav(pcm), limits, 16000)
    assert wave_.dtype == np.float32 and wave_.shape == (8000,)
    np.testing.assert_allclose(wave_, pcm / 32768.0, atol=1e-7)
    for bad, match in [
        (_wav(pcm, rate=8000), "8000 Hz; this base takes mono 16-bit PCM WAV at 16000 Hz"),
        (_wav(np.repeat(pcm, 2), channels=2), "2 channel"),
        (_wav(pcm.astype(np.uint8), width=1), "8-bit"),
        (_wav(np.zeros(20000, "<i2")), "over the limit of 1.0 s"),
        (_wav(np.zeros(100, "<i2")), "too short"),
        (base64.b64encode(b"RIFF-not-really").decode(), "readable WAV"),
    ]:
        with pytest.raises(ValidationError, match=match):
            decode_audio(bad, limits, 16000)
    with pytest.raises(InvalidRequest, match="base64"):
        decode_audio("%%", limits, 16000)
    with pytest.raises(PayloadTooLarge):
        decode_audio(_wav(pcm), LimitSettings(max_audio_bytes=1024), 16000)


def test_run_batch_decodes_audio_for_an_audio_backbone(tmp_path):
    """WAV in base64 -> float32 waveform -> the engine's audio path; a bad WAV fails its row alone."""
    import torch

    from serving.engine import Engine, EngineSettings
    from tests.helpers.models import make_tiny_wav2vec2

    torch.set_num_threads(1)
    store = open_store(tmp_path / "store")
    store.register_base(describe_base("w2v", make_tiny_wav2vec2(tmp_path / "w2v")))
    engine = Engine(store, base="w2v", settings=EngineSettings(threads=1))
    pcm = (np.sin(np.arange(4000) / 3) * 10000).astype("<i2")
    items = [
        EmbedItem(audio_b64=_wav(pcm)),
        EmbedItem(audio_b64=_wav(pcm, rate=44100)),
        EmbedItem(text="words for an audio base"),
    ]
    for item in items:
        item._tenant = "acme"
    results = run_batch(engine, "embed", items, LimitSettings())
    assert results[0].error is None and len(results[0].embedding) == 32
    assert results[1].error.error == "validation_error" and "44100 Hz" in results[1].error.message
    assert results[2].error.error == "validation_error" and "reads audio" in results[2].error.message
    with pytest.raises(PydanticValidationError, match="exactly one"):
        EmbedItem(text="x", audio_b64=_wav(pcm))


def test_token_policy_reject_without_a_tokenizer_stops_the_start_before_any_worker(tiny_bert_dir, tmp_path):
    """Found in the worker (the service's __init__), BentoML restarted the worker forever; the start-up
    check that ``bentoml serve`` and ``loraplex serve`` run first now refuses it with one line."""
    import shutil

    from adapters_store.errors import InvalidSettings
    from serving.preflight import check_startup
    from serving.settings import LimitSettings

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "tokenizer.json").unlink()
    store = open_store(tmp_path / "store")
    store.register_base(describe_base("bare", folder))
    store.register_base(describe_base("tiny", tiny_bert_dir))
    reject = LimitSettings(token_policy="reject")
    settings = ServiceSettings(store=str(tmp_path / "store"), base="bare", admin_token="admin-secret-1")
    with pytest.raises(InvalidSettings, match="LORAPLEX_TOKEN_POLICY: 'reject' counts tokens") as err:
        check_startup(settings=settings.model_copy(update={"limits": reject}))
    assert "'bare'" in err.value.message and "truncate" in err.value.message
    check_startup(settings=settings)  # 'truncate' needs no tokenizer file
    ok = settings.model_copy(update={"limits": reject, "base": "tiny"})
    assert check_startup(settings=ok).base.name == "tiny"


def test_runtime_onnx_without_a_stored_export_stops_the_start(tiny_bert_dir, tmp_path):
    """It used to start, load the engine in the worker, fail there and answer 503 on /readyz forever."""
    from adapters_store.errors import InvalidSettings
    from serving.preflight import check_startup

    store = open_store(tmp_path / "store")
    store.register_base(describe_base("tiny", tiny_bert_dir))
    settings = ServiceSettings(store=str(tmp_path / "store"), base="tiny", admin_token="admin-secret-1")
    for runtime, hint in [("onnx", "--base tiny'"), ("onnx-int8", "--base tiny --quantize int8'")]:
        with pytest.raises(InvalidSettings, match=f"LORAPLEX_RUNTIME: '{runtime}' needs base 'tiny'") as err:
            check_startup(settings=settings.model_copy(update={"runtime": runtime}))
        assert hint in err.value.message
    for runtime in ("auto", "torch"):  # these start without an export
        check_startup(settings=settings.model_copy(update={"runtime": runtime}))


def test_the_startup_heap_is_frozen_once_the_engine_is_loaded(monkeypatch):
    """A full collection over the startup heap held the GIL ~0.4-0.6 s and stalled every request in
    flight; once the engine is loaded, everything alive is moved out of the collector's reach, after
    collecting the garbage already there (frozen garbage would never be freed)."""
    import gc
    import types
    import weakref

    import serving.engine
    import serving.service as service

    class Node:
        pass

    def cycle() -> weakref.ref:
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    class LoadedEngine:
        runtime, runtime_note = "torch", "test"

        def __init__(self, *_args, **_kwargs):
            self.kept = Node()  # alive when the heap is frozen

    monkeypatch.setattr(serving.engine, "Engine", LoadedEngine)
    monkeypatch.setattr(service.metrics, "set_ready", lambda _ready: None)
    owner = types.SimpleNamespace(
        store=None,
        settings=types.SimpleNamespace(base="tiny"),
        engine_settings=None,
        context=types.SimpleNamespace(engine=None),
        base=types.SimpleNamespace(name="tiny", fingerprint="0" * 64),
        engine=None,
        load_error=None,
    )
    garbage = cycle()
    gc.unfreeze()
    try:
        getattr(service.LoraplexService, "inner", service.LoraplexService)._load_engine(owner)
        assert garbage() is None  # collected before the freeze
        frozen = gc.get_freeze_count()
        assert frozen > 1000 and isinstance(owner.engine, LoadedEngine)
        assert not any(o is owner.engine.kept for o in gc.get_objects())  # out of every generation
    finally:
        gc.unfreeze()
