"""A corpus of bad inputs as data: every case is one HTTP request and the specific 4xx it must get.

``build_corpus(inputs)`` returns well over 200 :class:`Case` objects in these groups: ``names``
(path traversal in every name position), ``pickle`` (canary pickles under every name), ``lora``
(tensor keys, shapes, rank, targets, NaN/Inf), ``config`` (malformed ``adapter_config.json``),
``manifest`` (malformed bundle manifests, other base), ``safetensors`` (malformed headers),
``inference`` (bodies, content types, batches, texts, images), ``auth`` (tokens, cross-tenant) and
``http`` (methods, unknown routes, headers). Oversized and chunked bodies need a raw socket and are
in the test module itself.

The expected set is the exact status the documented API gives (docs/service.md); where two are
equally right (a ``/`` inside a path segment either fails routing, 404, or name validation, 400)
both are listed. Never a 5xx.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_st
from safetensors.numpy import save as save_st

# Status sets the API documents (docs/service.md).
BAD_NAME = frozenset({400})  # invalid_name
BAD_NAME_OR_ROUTE = frozenset({400, 404})  # a '/' may split the segment, so routing fails first
INVALID = frozenset({422})  # validation_error / unsafe_format / incompatible_base
UNSAFE = frozenset({422})
BAD_JSON = frozenset({400})
NOT_FOUND = frozenset({404})
MEDIA = frozenset({415})
TOO_LARGE = frozenset({413})
UNAUTHORIZED = frozenset({401})
FORBIDDEN = frozenset({403})
METHOD = frozenset({405})

LORA_PREFIX = "base_model.model.bert.encoder.layer"


@dataclass(frozen=True)
class Case:
    """One bad request. ``token`` is ``admin``, a tenant name, ``none`` (no header) or ``bad``."""

    id: str
    group: str
    method: str
    path: str
    expect: frozenset[int]
    token: str = "admin"
    json_body: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    files: tuple[tuple[str, bytes], ...] = ()
    data: dict[str, str] = field(default_factory=dict)
    error_code: str | None = None
    """When set, the ``error`` field of the JSON answer must equal it."""
    protocol: bool = False
    """Malformed HTTP refused by the server's HTTP parser before any route: a plain-text 400 is right."""


@dataclass(frozen=True)
class CorpusInputs:
    """Valid material the corpus mutates (built by the test from tiny random models)."""

    peft_config: bytes
    """``adapter_config.json`` of a valid r=4 query/value SEQ_CLS LoRA on the served base."""
    peft_weights: bytes
    """Its ``adapter_model.safetensors``."""
    head_files: dict[str, bytes]
    """A valid head bundle for acme/newhead: ``manifest.json`` and ``head.safetensors``."""
    other_peft_weights: bytes
    """A LoRA saved against a base with another hidden size (64)."""
    canary: Path
    """Unpickling any corpus pickle would create this path."""
    hidden: int = 32
    layers: int = 2


# -- helpers -------------------------------------------------------------------------------------
def upload_path(tenant: str = "acme", name: str = "newlora") -> str:
    return f"/v1/admin/tenants/{tenant}/adapters/{name}/versions"


def peft_upload(cid: str, group: str, config: bytes, weights: bytes, expect=INVALID, **kw) -> Case:
    files = (("adapter_config.json", config), ("adapter_model.safetensors", weights))
    return Case(cid, group, "POST", upload_path(), expect, files=files, data={"labels": "a,b,c"}, **kw)


def mutate_tensors(weights: bytes, fn: Callable[[dict[str, np.ndarray]], None]) -> bytes:
    tensors = dict(load_st(weights))
    fn(tensors)
    return save_st(tensors)


def mutate_config(config: bytes, **changes: Any) -> bytes:
    data = json.loads(config)
    for k, v in changes.items():
        if v is _DROP:
            data.pop(k, None)
        else:
            data[k] = v
    return json.dumps(data).encode()


_DROP = object()


def raw_safetensors(header: Any, body: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file with an arbitrary header (and optionally a lying header length)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


class _Canary:
    """Pickles to ``os.mkdir(canary)``: any unpickling of the bytes creates the canary folder."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def canary_pickles(canary: Path) -> dict[str, bytes]:
    """Plain pickles (protocols 0, 2, 5) and a torch-style zip checkpoint holding one."""
    import zipfile

    out = {f"proto{p}": pickle.dumps(_Canary(canary), protocol=p) for p in (0, 2, 5)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", out["proto2"])
        z.writestr("archive/version", "3\n")
    out["torchzip"] = buf.getvalue()
    return out


def png_bytes(w: int = 8, h: int = 8, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format=fmt)
    return buf.getvalue()


def png_bomb_header(w: int = 50_000, h: int = 50_000) -> bytes:
    """A PNG whose IHDR claims w x h pixels, with no real pixel data (decoding would explode)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# -- names: traversal in every position ------------------------------------------------------------
# Wire forms (as they appear in a URL). Every one is an invalid name once decoded, so none may succeed.
NAME_PAYLOADS: dict[str, str] = {
    "dotdot": "..",
    "dot": ".",
    "dotdot-x": "../x",
    "enc-slash": "..%2fx",
    "enc-dots": "%2e%2e",
    "enc-dots-slash": "%2e%2e%2fetc",
    "double-enc": "%252e%252e%252f",
    "double-enc-slash": "..%252f..%252fetc",
    "enc-backslash": "..%5cx",
    "backslash-mid": "x%5c..%5cy",
    "nul-mid": "x%00y",
    "nul-end": "x%00",
    "trailing-dot": "x.",
    "trailing-space": "x%20",
    "enc-absolute": "%2fetc%2fpasswd",
    "upper": "UPPER",
    "too-long": "a" * 65,
    "newline": "x%0ay",
    "overlong-utf8": "%c0%ae%c0%ae",
    "tilde": "~root",
    "star": "x%2a",
    "hidden": ".hidden",
    "leading-dash": "-x",
    "inner-dotdot": "x..y",
    "unicode": "%c3%bcnicode",
}


def _decoded(wire: str) -> str:
    from urllib.parse import unquote

    return unquote(wire)


def name_cases() -> list[Case]:
    cases: list[Case] = []
    head = "/v1/admin/tenants/acme/adapters/intent"
    for pid, w in NAME_PAYLOADS.items():
        d = _decoded(w)
        item = {"items": [{"adapter": d, "text": "hello"}]}
        cases += [
            Case(f"names/tenant-list/{pid}", "names", "GET", f"/v1/admin/tenants/{w}/adapters", BAD_NAME_OR_ROUTE),
            Case(f"names/adapter-show/{pid}", "names", "GET", f"/v1/admin/tenants/acme/adapters/{w}", BAD_NAME_OR_ROUTE),
            Case(f"names/adapter-delete/{pid}", "names", "DELETE", f"/v1/admin/tenants/acme/adapters/{w}", BAD_NAME_OR_ROUTE),
            Case(f"names/version/{pid}", "names", "GET", f"{head}/versions/{w}", BAD_NAME_OR_ROUTE),
            Case(f"names/alias-put/{pid}", "names", "PUT", f"{head}/aliases/{w}", BAD_NAME_OR_ROUTE, json_body={"version": 1}),
            Case(f"names/upload-tenant/{pid}", "names", "POST", upload_path(w, "x"), BAD_NAME_OR_ROUTE, files=(("adapter_config.json", b"{}"),)),
            Case(f"names/upload-name/{pid}", "names", "POST", upload_path("acme", w), BAD_NAME_OR_ROUTE, files=(("adapter_config.json", b"{}"),)),
            Case(f"names/tenant-route/{pid}", "names", "GET", f"/v1/adapters/{w}", BAD_NAME_OR_ROUTE, token="acme"),
            Case(f"names/classify-field/{pid}", "names", "POST", "/v1/classify", BAD_NAME, token="acme", json_body=item),
            Case(f"names/warm-selector/{pid}", "names", "POST", f"{head}/warm?selector={w}", BAD_NAME),
            Case(f"names/rollback-body/{pid}", "names", "POST", f"{head}/rollback", BAD_NAME, json_body={"alias": d}),
        ]  # fmt: skip
    return cases


# -- pickles: refused unopened, the canary never appears ---------------------------------------------
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "model.pt", "weights.pth", "x.pkl", "x.ckpt",
                "x.npy", "x.joblib", "x.pickle", "x.npz")  # fmt: skip


def pickle_cases(inp: CorpusInputs) -> list[Case]:
    cases: list[Case] = []
    for variant, blob in canary_pickles(inp.canary).items():
        for fname in PICKLE_NAMES:
            files = (("adapter_config.json", inp.peft_config), (fname, blob))
            cases.append(
                Case(f"pickle/{variant}/{fname}", "pickle", "POST", upload_path(), UNSAFE, files=files,
                     error_code="unsafe_format")
            )  # fmt: skip
        cases += [
            peft_upload(f"pickle/{variant}/as-safetensors", "pickle", inp.peft_config, blob),
            peft_upload(f"pickle/{variant}/as-config", "pickle", blob, inp.peft_weights),
            Case(f"pickle/{variant}/as-manifest", "pickle", "POST", upload_path("acme", "newhead"), INVALID,
                 files=(("manifest.json", blob), ("head.safetensors", inp.head_files["head.safetensors"]))),
            Case(f"pickle/{variant}/as-head", "pickle", "POST", upload_path("acme", "newhead"), INVALID,
                 files=(("manifest.json", inp.head_files["manifest.json"]), ("head.safetensors", blob))),
            Case(f"pickle/{variant}/inference-body", "pickle", "POST", "/v1/classify", MEDIA, token="acme",
                 content=blob, headers={"Content-Type": "application/python-pickle"}),
            Case(f"pickle/{variant}/inference-as-json", "pickle", "POST", "/v1/classify", BAD_JSON, token="acme",
                 content=blob, headers={"Content-Type": "application/json"}),
        ]  # fmt: skip
    return cases


# -- LoRA tensors: keys, shapes, rank, targets, other base, non-finite ---------------------------------
def _lk(layer: int, module: str, ab: str) -> str:
    return f"{LORA_PREFIX}.{layer}.attention.self.{module}.lora_{ab}.weight"


def _set(key: str, value: np.ndarray) -> Callable[[dict[str, np.ndarray]], None]:
    def fn(t: dict[str, np.ndarray]) -> None:
        t[key] = value

    return fn


def _drop(key: str) -> Callable[[dict[str, np.ndarray]], None]:
    return lambda t: t.pop(key)


def _poison(
    key: str, value: float, index: tuple[int, ...] = (0, 0)
) -> Callable[[dict[str, np.ndarray]], None]:
    def fn(t: dict[str, np.ndarray]) -> None:
        arr = t[key].copy()
        arr[index] = value
        t[key] = arr

    return fn


def _rank(r: int, hidden: int, layers: int) -> Callable[[dict[str, np.ndarray]], None]:
    def fn(t: dict[str, np.ndarray]) -> None:
        rng = np.random.default_rng(0)
        for layer in range(layers):
            for m in ("query", "value"):
                t[_lk(layer, m, "A")] = rng.normal(0, 0.01, (r, hidden)).astype(np.float32)
                t[_lk(layer, m, "B")] = rng.normal(0, 0.01, (hidden, r)).astype(np.float32)

    return fn


def lora_cases(inp: CorpusInputs) -> list[Case]:
    h, cfg, w = inp.hidden, inp.peft_config, inp.peft_weights
    keys = sorted(load_st(w))
    f32 = np.float32
    mutations: dict[str, Callable[[dict[str, np.ndarray]], None]] = {
        **{f"missing/{k.split('model.', 2)[-1]}": _drop(k) for k in keys},
        "extra/key-module": _set(_lk(0, "key", "A"), np.zeros((4, h), f32)),
        "extra/layer-9": _set(_lk(9, "query", "A"), np.zeros((4, h), f32)),
        "extra/unrelated": _set("evil", np.zeros((2, 2), f32)),
        "extra/embeddings-smuggled": _set("base_model.model.bert.embeddings.word_embeddings.weight",
                                          np.zeros((16, h), f32)),
        "shape/A-rank+1": _set(_lk(0, "query", "A"), np.zeros((5, h), f32)),
        "shape/A-in-1": _set(_lk(0, "query", "A"), np.zeros((4, h - 1), f32)),
        "shape/A-transposed": _set(_lk(0, "query", "A"), np.zeros((h, 4), f32)),
        "shape/B-out-1": _set(_lk(1, "value", "B"), np.zeros((h - 1, 4), f32)),
        "shape/B-rank+1": _set(_lk(1, "value", "B"), np.zeros((h, 5), f32)),
        "shape/B-3d": _set(_lk(1, "value", "B"), np.zeros((h, 4, 1), f32)),
        "shape/A-scalar": _set(_lk(0, "value", "A"), np.zeros((), f32)),
        "shape/classifier-in": _set("base_model.model.classifier.weight", np.zeros((3, h + 1), f32)),
        "shape/classifier-bias": _set("base_model.model.classifier.bias", np.zeros((4,), f32)),
        "dtype/int32": _set(_lk(0, "query", "A"), np.zeros((4, h), np.int32)),
        "dtype/bool": _set(_lk(0, "query", "B"), np.zeros((h, 4), np.bool_)),
        "nonfinite/nan-A": _poison(_lk(0, "query", "A"), np.nan),
        "nonfinite/inf-B": _poison(_lk(1, "value", "B"), np.inf),
        "nonfinite/neginf-A": _poison(_lk(1, "query", "A"), -np.inf, (3, h - 1)),
        "nonfinite/nan-classifier": _poison("base_model.model.classifier.weight", np.nan),
        "nonfinite/inf-classifier-bias": _poison("base_model.model.classifier.bias", np.inf, (1,)),
        "nonfinite/all-nan": lambda t: t.update({k: np.full_like(v, np.nan) for k, v in t.items()}),
        "nonfinite/nan-f16": lambda t: t.update(
            {_lk(0, "query", "A"): np.full((4, h), np.nan, np.float16)}
        ),
        "empty/no-tensors": lambda t: t.clear(),
    }  # fmt: skip
    cases = [peft_upload(f"lora/{k}", "lora", cfg, mutate_tensors(w, fn)) for k, fn in mutations.items()]
    big = mutate_tensors(w, _rank(300, h, inp.layers))
    cases += [
        peft_upload("lora/rank-over-limit-300", "lora", mutate_config(cfg, r=300, lora_alpha=300), big),
        peft_upload("lora/rank-config-8-tensors-4", "lora", mutate_config(cfg, r=8), w),
        peft_upload("lora/rank-pattern-over-limit", "lora",
                    mutate_config(cfg, rank_pattern={"query": 4096}), w),
        peft_upload("lora/unknown-target", "lora", mutate_config(cfg, target_modules=["nonexistent"]),
                    mutate_tensors(w, lambda t: t.update(
                        {k.replace(".query.", ".nonexistent."): t.pop(k) for k in list(t) if ".query." in k}))),
        peft_upload("lora/target-listed-not-present", "lora",
                    mutate_config(cfg, target_modules=["query", "value", "zzz_module"]), w),
        peft_upload("lora/other-base-hidden-64", "lora", cfg, inp.other_peft_weights),
        peft_upload("lora/use-dora", "lora", mutate_config(cfg, use_dora=True), w),
        peft_upload("lora/peft-type-prefix", "lora", mutate_config(cfg, peft_type="PREFIX_TUNING"), w),
        peft_upload("lora/peft-type-missing", "lora", mutate_config(cfg, peft_type=_DROP), w),
        peft_upload("lora/layer-replication", "lora", mutate_config(cfg, layer_replication=[[0, 4]]), w),
    ]  # fmt: skip
    return cases


# -- adapter_config.json malformed ----------------------------------------------------------------
def config_cases(inp: CorpusInputs) -> list[Case]:
    cfg, w = inp.peft_config, inp.peft_weights
    bodies: dict[str, bytes] = {
        "not-json": b"{this is not json",
        "empty": b"",
        "list": b"[1, 2, 3]",
        "string": b'"LORA"',
        "null": b"null",
        "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
        "deep-object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "invalid-utf8": b'{"r": "\xff\xfe"}',
        "nan-literal": mutate_config(cfg, r=1).replace(b'"r": 1', b'"r": NaN'),
        "r-missing": mutate_config(cfg, r=_DROP),
        "r-string": mutate_config(cfg, r="4"),
        "r-float": mutate_config(cfg, r=4.5),
        "r-negative": mutate_config(cfg, r=-4),
        "r-zero": mutate_config(cfg, r=0),
        "r-huge": mutate_config(cfg, r=10**30),
        "r-bool": mutate_config(cfg, r=True),
        "alpha-string": mutate_config(cfg, lora_alpha="eight"),
        "alpha-nan": mutate_config(cfg, lora_alpha=1).replace(b'"lora_alpha": 1', b'"lora_alpha": NaN'),
        "targets-int": mutate_config(cfg, target_modules=7),
        "targets-empty": mutate_config(cfg, target_modules=[]),
        "targets-nested": mutate_config(cfg, target_modules=[["query"]]),
        "alpha-pattern-string": mutate_config(cfg, alpha_pattern={"query": "x"}),
        "rank-pattern-list": mutate_config(cfg, rank_pattern=[4]),
        "rank-pattern-string": mutate_config(cfg, rank_pattern={"query": "x"}),
        "modules-to-save-int": mutate_config(cfg, modules_to_save=5),
    }
    return [peft_upload(f"config/{k}", "config", body, w) for k, body in bodies.items()]


# -- bundle manifests (head bundles uploaded with manifest.json) -----------------------------------
def _manifest(inp: CorpusInputs, fn: Callable[[dict[str, Any]], None]) -> bytes:
    data = json.loads(inp.head_files["manifest.json"])
    fn(data)
    return json.dumps(data).encode()


def _m(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def fn(d: dict[str, Any]) -> None:
        for k, v in changes.items():
            if v is _DROP:
                d.pop(k, None)
            else:
                d[k] = v

    return fn


def _file_entry(**changes: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["files"]["head.safetensors"].update(changes)


def manifest_cases(inp: CorpusInputs) -> list[Case]:
    head = inp.head_files["head.safetensors"]
    path = upload_path("acme", "newhead")
    other_fp = "0" * 64
    manifests: dict[str, bytes] = {
        "not-json": b"{not json",
        "empty": b"",
        "list": b"[]",
        "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
        "empty-object": b"{}",
        "schema-99": _manifest(inp, _m(schema_version=99)),
        "kind-unknown": _manifest(inp, _m(kind="evil")),
        "kind-full-without-model": _manifest(inp, _m(kind="full")),
        "task-unknown": _manifest(inp, _m(task="rm -rf")),
        "pooling-unknown": _manifest(inp, _m(pooling="max")),
        "tenant-mismatch": _manifest(inp, _m(tenant="globex")),
        "name-mismatch": _manifest(inp, _m(name="other")),
        "tenant-traversal": _manifest(inp, _m(tenant="../globex")),
        "other-base-fingerprint": _manifest(inp, lambda d: d["base"].update(fingerprint=other_fp)),
        "other-base-name": _manifest(inp, lambda d: d["base"].update(name="unregistered")),
        "base-name-traversal": _manifest(inp, lambda d: d["base"].update(name="../../bases/tiny")),
        "sha-mismatch": _manifest(inp, _file_entry(sha256="f" * 64)),
        "size-mismatch": _manifest(inp, _file_entry(size=1)),
        "size-negative": _manifest(inp, _file_entry(size=-1)),
        "file-traversal": _manifest(inp, lambda d: d["files"].update({"../x.safetensors": d["files"]["head.safetensors"]})),
        "file-listed-missing": _manifest(inp, lambda d: d["files"].update({"extra.safetensors": d["files"]["head.safetensors"]})),
        "file-pickle-listed": _manifest(inp, lambda d: d["files"].update({"model.bin": d["files"]["head.safetensors"]})),
        "labels-count": _manifest(inp, _m(labels=["a", "b"])),
        "labels-not-strings": _manifest(inp, _m(labels=[1, 2, 3])),
        "head-in-features": _manifest(inp, lambda d: d["head"].update(in_features=64)),
        "head-activation": _manifest(inp, lambda d: d["head"].update(activation="os.system")),
        "head-outputs-zero": _manifest(inp, lambda d: d["head"].update(num_outputs=0)),
        "files-empty": _manifest(inp, _m(files={})),
        "version-negative": _manifest(inp, _m(version=-1)),
        "unknown-field": _manifest(inp, _m(tenant_override="globex")),
    }  # fmt: skip
    cases = [
        Case(f"manifest/{k}", "manifest", "POST", path, INVALID, files=(("manifest.json", m), ("head.safetensors", head)))
        for k, m in manifests.items()
    ]  # fmt: skip
    cases.append(
        Case("manifest/extra-unlisted-file", "manifest", "POST", path, INVALID,
             files=(("manifest.json", inp.head_files["manifest.json"]), ("head.safetensors", head),
                    ("notes.txt", b"hello")))
    )  # fmt: skip
    cases.append(
        Case("manifest/file-sent-twice", "manifest", "POST", path, INVALID,
             files=(("manifest.json", inp.head_files["manifest.json"]), ("head.safetensors", head),
                    ("head.safetensors", head)))
    )  # fmt: skip
    cases.append(
        Case("manifest/nan-head", "manifest", "POST", path, INVALID, files=_head_bundle_with(
            inp, mutate_tensors(head, _poison("out.weight", np.nan))))
    )  # fmt: skip
    cases.append(
        Case("manifest/head-wrong-shape", "manifest", "POST", path, INVALID, files=_head_bundle_with(
            inp, mutate_tensors(head, _set("out.weight", np.zeros((3, 31), np.float32)))))
    )  # fmt: skip
    return cases


def _head_bundle_with(inp: CorpusInputs, head: bytes) -> tuple[tuple[str, bytes], ...]:
    """A manifest whose digests match the (bad) head file, so validation, not the digest, must catch it."""
    import hashlib

    m = _manifest(inp, _file_entry(sha256=hashlib.sha256(head).hexdigest(), size=len(head)))
    return (("manifest.json", m), ("head.safetensors", head))


# -- safetensors headers ---------------------------------------------------------------------------
def safetensors_cases(inp: CorpusInputs) -> list[Case]:
    t = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    body8 = b"\0" * 8
    files: dict[str, bytes] = {
        "empty": b"",
        "short": b"\x01\x02\x03",
        "len-2^63": raw_safetensors({"a": t}, body8, length=2**63),
        "len-max": raw_safetensors({"a": t}, body8, length=2**64 - 1),
        "len-past-file": raw_safetensors({"a": t}, body8, length=10_000),
        "oversized-header": raw_safetensors({"a": t, "__metadata__": {"pad": "x" * (1 << 20)}}, body8),
        "header-not-json": raw_safetensors(b"{nope", body8),
        "header-invalid-utf8": raw_safetensors(b'{"\xff": 1}', body8),
        "header-array": raw_safetensors([1, 2], body8),
        "header-null": raw_safetensors(None, body8),
        "header-deep": raw_safetensors(b"[" * 50_000 + b"]" * 50_000, body8),
        "offsets-past-end": raw_safetensors({"a": {**t, "data_offsets": [0, 800]}}, body8),
        "offsets-overlap": raw_safetensors({"a": t, "b": {**t, "data_offsets": [4, 12]}}, b"\0" * 12),
        "offsets-gap": raw_safetensors({"a": {**t, "data_offsets": [4, 12]}}, b"\0" * 12),
        "offsets-negative": raw_safetensors({"a": {**t, "data_offsets": [-8, 0]}}, body8),
        "offsets-reversed": raw_safetensors({"a": {**t, "data_offsets": [8, 0]}}, body8),
        "offsets-float": raw_safetensors({"a": {**t, "data_offsets": [0.0, 8.0]}}, body8),
        "offsets-three": raw_safetensors({"a": {**t, "data_offsets": [0, 4, 8]}}, body8),
        "trailing-bytes": raw_safetensors({"a": t}, body8 + b"\0" * 4),
        "dtype-unknown": raw_safetensors({"a": {**t, "dtype": "F128"}}, body8),
        "dtype-missing": raw_safetensors({"a": {"shape": [2], "data_offsets": [0, 8]}}, body8),
        "shape-negative": raw_safetensors({"a": {**t, "shape": [-2]}}, body8),
        "shape-float": raw_safetensors({"a": {**t, "shape": [2.0]}}, body8),
        "shape-huge": raw_safetensors({"a": {**t, "shape": [2**40, 2**40]}}, body8),
        "length-mismatch": raw_safetensors({"a": {**t, "shape": [3]}}, body8),
        "tensor-meta-string": raw_safetensors({"a": "F32"}, body8),
        "metadata-list": raw_safetensors({"a": t, "__metadata__": [1]}, body8),
    }
    cases = [peft_upload(f"safetensors/{k}", "safetensors", inp.peft_config, f) for k, f in files.items()]
    for k in ("len-2^63", "offsets-overlap", "header-deep", "trailing-bytes"):
        cases.append(
            Case(f"safetensors/head/{k}", "safetensors", "POST", upload_path("acme", "newhead"), INVALID,
                 files=_head_bundle_with(inp, files[k]))
        )  # fmt: skip
    return cases


# -- inference bodies, content types, batches, texts, images ----------------------------------------
def _items(*items: dict[str, Any]) -> dict[str, Any]:
    return {"items": list(items)}


def inference_cases() -> list[Case]:
    ok = {"adapter": "intent", "text": "hello"}
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    raw: dict[str, bytes] = {
        "empty": b"",
        "open-brace": b"{",
        "garbage": b"nul",
        "unclosed-list": b'{"items": [}',
        "deep-nesting": b"[" * 30_000 + b"]" * 30_000,  # under the 64 KiB body limit: the parser sees it
        "deep-items": b'{"items": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        "invalid-utf8": b'{"items": [{"adapter": "intent", "text": "\xff\xfe"}]}',
        "utf16": json.dumps(_items(ok)).encode("utf-16"),
        "trailing-garbage": json.dumps(_items(ok)).encode() + b"}}}",
        "single-quotes": b"{'items': []}",
    }
    bodies: dict[str, tuple[Any, frozenset[int]]] = {
        # NaN is not JSON; pydantic reads it as a float and the schema refuses it: either answer is right.
        "nan-literal": ({"items": [{"adapter": "intent", "text": float("nan")}]}, BAD_JSON | INVALID),
        "no-items": ({}, INVALID),
        "items-object": ({"items": {}}, INVALID),
        "items-empty": ({"items": []}, INVALID),
        "items-string": ({"items": "hello"}, INVALID),
        "items-ints": ({"items": [1, 2]}, INVALID),
        "item-no-text": (_items({"adapter": "intent"}), INVALID),
        "item-text-and-image": (_items({**ok, "image_b64": b64(png_bytes())}), INVALID),
        "item-text-int": (_items({"adapter": "intent", "text": 5}), INVALID),
        "item-text-list": (_items({"adapter": "intent", "text": ["a"]}), INVALID),
        "item-adapter-int": (_items({"adapter": 7, "text": "x"}), INVALID),
        "item-adapter-empty": (_items({"adapter": "", "text": "x"}), INVALID),
        "item-adapter-201": (_items({"adapter": "a" * 201, "text": "x"}), INVALID),
        "item-adapter-null": (_items({"adapter": None, "text": "x"}), INVALID),
        "item-tenant-field": (_items({**ok, "tenant": "globex"}), INVALID),
        "top-level-tenant": ({**_items(ok), "tenant": "globex"}, INVALID),
        "items-17": (_items(*[ok] * 17), INVALID),
        "huge-batch-1000": ({"items": [{"adapter": "i", "text": ""}] * 1000}, INVALID),
        "huge-batch-body": ({"items": [ok] * 3000}, TOO_LARGE),
        "text-2001": (_items({"adapter": "intent", "text": "x" * 2001}), INVALID),
        "text-over-body": (_items({"adapter": "intent", "text": "x" * 70_000}), TOO_LARGE),
        "adapter-missing": (_items({"adapter": "nosuch", "text": "x"}), NOT_FOUND),
        "version-missing": (_items({"adapter": "intent@99", "text": "x"}), NOT_FOUND),
        "version-zero": (_items({"adapter": "intent@0", "text": "x"}), BAD_NAME),
        "version-huge": (_items({"adapter": "intent@99999999999", "text": "x"}), BAD_NAME),
        "alias-missing": (_items({"adapter": "intent@nosuch", "text": "x"}), NOT_FOUND),
        "double-at": (_items({"adapter": "intent@@x", "text": "x"}), BAD_NAME),
        "cross-tenant-slash": (_items({"adapter": "globex/sentiment", "text": "x"}), BAD_NAME),
        "image-not-base64": (_items({"adapter": "intent", "image_b64": "***not base64***"}), BAD_JSON),
        "image-garbage": (_items({"adapter": "intent", "image_b64": b64(b"\x00garbage" * 10)}), INVALID),
        "image-truncated-png": (_items({"adapter": "intent", "image_b64": b64(png_bytes()[:40])}), INVALID),
        "image-gif": (_items({"adapter": "intent", "image_b64": b64(png_bytes(fmt="GIF"))}), INVALID),
        "image-bomb-header": (_items({"adapter": "intent", "image_b64": b64(png_bomb_header())}), INVALID),
        "image-on-text-base": (_items({"adapter": "intent", "image_b64": b64(png_bytes())}), INVALID),
    }
    cases: list[Case] = []
    for route in ("/v1/classify", "/v1/embed"):
        r = route.rsplit("/", 1)[1]
        json_ct = {"Content-Type": "application/json"}
        cases += [
            Case(f"inference/{r}/json/{k}", "inference", "POST", route, BAD_JSON, token="acme", content=v, headers=json_ct)
            for k, v in raw.items()
        ]  # fmt: skip
        for k, (body, expect) in bodies.items():
            if r == "embed" and k == "item-adapter-null":
                continue  # null is the bare backbone on /embed: valid
            cases.append(
                Case(
                    f"inference/{r}/body/{k}",
                    "inference",
                    "POST",
                    route,
                    expect,
                    token="acme",
                    json_body=body,
                )
            )
        for ct in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "application/xml",
            "",
        ):
            cases.append(
                Case(f"inference/{r}/ctype/{ct or 'none'}", "inference", "POST", route, MEDIA, token="acme",
                     content=json.dumps(_items(ok)).encode(), headers={"Content-Type": ct} if ct else {})
            )  # fmt: skip
    return cases


# -- auth: no token, wrong token, wrong role, cross-tenant (uniform 404) -----------------------------
def auth_cases() -> list[Case]:
    cls = _items({"adapter": "intent", "text": "x"})
    routes = [
        ("POST", "/v1/classify", cls),
        ("POST", "/v1/embed", _items({"text": "x"})),
        ("GET", "/v1/adapters", None),
        ("GET", "/v1/admin/tenants", None),
        ("DELETE", "/v1/admin/tenants/acme/adapters/intent", None),
        ("PUT", "/v1/admin/tenants/acme/adapters/intent/aliases/production", {"version": 2}),
    ]
    cases: list[Case] = []
    for method, path, body in routes:
        slug = f"{method}{path}".replace("/", "_")
        cases += [
            Case(f"auth/none/{slug}", "auth", method, path, UNAUTHORIZED, token="none", json_body=body),
            Case(f"auth/wrong/{slug}", "auth", method, path, UNAUTHORIZED, token="bad", json_body=body),
            Case(f"auth/basic/{slug}", "auth", method, path, UNAUTHORIZED, token="none", json_body=body,
                 headers={"Authorization": "Basic YWRtaW46YWRtaW4="}),
            Case(f"auth/empty-bearer/{slug}", "auth", method, path, UNAUTHORIZED, token="none", json_body=body,
                 headers={"Authorization": "Bearer "}),
        ]  # fmt: skip
        admin_route = path.startswith("/v1/admin")
        cases.append(
            Case(f"auth/wrong-role/{slug}", "auth", method, path, FORBIDDEN,
                 token="acme" if admin_route else "admin", json_body=body)
        )  # fmt: skip
    # acme asks for globex's and initech's adapters: exactly what a missing adapter gets.
    for other in ("sentiment", "topics", "topics@1", "sentiment@latest", "sentiment@production"):
        cases.append(
            Case(f"auth/cross-tenant/classify/{other}", "auth", "POST", "/v1/classify", NOT_FOUND, token="acme",
                 json_body=_items({"adapter": other, "text": "x"}), error_code="not_found")
        )  # fmt: skip
    cases += [
        Case("auth/cross-tenant/show/sentiment", "auth", "GET", "/v1/adapters/sentiment", NOT_FOUND, token="acme",
             error_code="not_found"),
        Case("auth/cross-tenant/show/topics", "auth", "GET", "/v1/adapters/topics", NOT_FOUND, token="globex",
             error_code="not_found"),
        Case("auth/spoofed-dev-header", "auth", "POST", "/v1/classify", NOT_FOUND, token="acme",
             headers={"X-Loraplex-Tenant": "globex"}, json_body=_items({"adapter": "sentiment", "text": "x"})),
        Case("auth/token-with-nul", "auth", "GET", "/v1/adapters", frozenset({400, 401}), token="none",
             headers={"Authorization": "Bearer acme-token-0123456789\x00"}, protocol=True),
        Case("auth/huge-token", "auth", "GET", "/v1/adapters", frozenset({400, 401, 431}), token="none",
             headers={"Authorization": "Bearer " + "A" * 60_000}),
    ]  # fmt: skip
    return cases


# -- HTTP level: methods, routes, headers ------------------------------------------------------------
def http_cases() -> list[Case]:
    return [
        Case("http/get-classify", "http", "GET", "/v1/classify", METHOD, token="acme"),
        Case("http/put-embed", "http", "PUT", "/v1/embed", METHOD, token="acme"),
        Case("http/delete-tenants", "http", "DELETE", "/v1/admin/tenants", METHOD),
        Case("http/patch-alias", "http", "PATCH", "/v1/admin/tenants/acme/adapters/intent/aliases/production", METHOD),
        Case("http/unknown-v1", "http", "GET", "/v1/nothing-here", NOT_FOUND, token="acme"),
        Case("http/unknown-admin", "http", "GET", "/v1/admin/nothing-here", NOT_FOUND),
        Case("http/content-length-text", "http", "POST", "/v1/classify", BAD_JSON, token="acme",
             content=b"{}", headers={"Content-Type": "application/json", "Content-Length": "abc"}, protocol=True),
        Case("http/alias-body-not-json", "http", "PUT", "/v1/admin/tenants/acme/adapters/intent/aliases/production",
             BAD_JSON | INVALID, content=b"{nope", headers={"Content-Type": "application/json"}),
        Case("http/alias-body-text", "http", "PUT", "/v1/admin/tenants/acme/adapters/intent/aliases/production",
             MEDIA, content=b"version=1", headers={"Content-Type": "text/plain"}),
        Case("http/alias-empty-body", "http", "PUT", "/v1/admin/tenants/acme/adapters/intent/aliases/production",
             INVALID),
        Case("http/alias-version-zero", "http", "PUT", "/v1/admin/tenants/acme/adapters/intent/aliases/production",
             INVALID, json_body={"version": 0}),
        Case("http/alias-version-missing", "http", "PUT", "/v1/admin/tenants/acme/adapters/intent/aliases/production",
             NOT_FOUND, json_body={"version": 999}),
        Case("http/alias-latest", "http", "PUT", "/v1/admin/tenants/acme/adapters/intent/aliases/latest",
             frozenset({409}), json_body={"version": 1}),
        Case("http/upload-json", "http", "POST", upload_path(), MEDIA, json_body={"files": []}),
        Case("http/upload-form-urlencoded", "http", "POST", upload_path(), MEDIA, data={"labels": "a"}),
        Case("http/upload-no-files", "http", "POST", upload_path(), INVALID, files=(), content=b"--zzz--\r\n",
             headers={"Content-Type": "multipart/form-data; boundary=zzz"}),
        Case("http/upload-bad-boundary", "http", "POST", upload_path(), BAD_JSON, content=b"--x\r\n\r\n",
             headers={"Content-Type": "multipart/form-data; boundary=zzz"}),
        Case("http/upload-17-files", "http", "POST", upload_path(), BAD_JSON | INVALID | TOO_LARGE,
             files=tuple((f"f{i}.json", b"{}") for i in range(17))),
        Case("http/rollback-no-older", "http", "POST", "/v1/admin/tenants/globex/adapters/sentiment/rollback",
             BAD_JSON, json_body={"alias": "production"}),
        Case("http/delete-version-missing", "http", "DELETE", "/v1/admin/tenants/acme/adapters/intent/versions/77",
             NOT_FOUND),
    ]  # fmt: skip


def build_corpus(inp: CorpusInputs) -> list[Case]:
    """Every case, ids unique."""
    cases = [
        *name_cases(),
        *pickle_cases(inp),
        *lora_cases(inp),
        *config_cases(inp),
        *manifest_cases(inp),
        *safetensors_cases(inp),
        *inference_cases(),
        *auth_cases(),
        *http_cases(),
        *symlink_cases(inp),
    ]
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "corpus case ids must be unique"
    return cases


# -- symlinks placed in the store (planted by the test before the server starts) -----------------------
def plant_symlinks(store_root: Path, outside: Path, intent_manifest: bytes) -> None:
    """Links an attacker with write access to the store folder might leave; none may be followed.

    ``acme/evil`` is a linked adapter folder holding a manifest; ``acme/intent`` gets a linked alias file
    ``evil.json``; tenant ``linked`` is a linked tenant folder; ``acme/wt`` links to an empty outside
    folder, so a put that followed it would write outside the store.
    """
    fake = json.loads(intent_manifest)
    fake.update(name="evil", version=1)
    evil = outside / "evil-adapter"
    (evil / "versions").mkdir(parents=True)
    (evil / "versions" / "1.json").write_text(json.dumps(fake))
    (outside / "alias.json").write_text(json.dumps({"version": 1}))
    tenant = outside / "tenant-dir"
    (tenant / "adapters" / "x" / "versions").mkdir(parents=True)
    (tenant / "adapters" / "x" / "versions" / "1.json").write_text(
        json.dumps({**fake, "tenant": "linked", "name": "x"})
    )
    (outside / "write-through").mkdir()
    adapters = store_root / "tenants" / "acme" / "adapters"
    (adapters / "evil").symlink_to(evil, target_is_directory=True)
    (adapters / "intent" / "aliases").mkdir(parents=True, exist_ok=True)
    (adapters / "intent" / "aliases" / "evil.json").symlink_to(outside / "alias.json")
    (store_root / "tenants" / "linked").symlink_to(tenant, target_is_directory=True)
    (adapters / "wt").symlink_to(outside / "write-through", target_is_directory=True)


def symlink_cases(inp: CorpusInputs) -> list[Case]:
    admin = "/v1/admin/tenants"
    return [
        Case("symlink/adapter-dir-show", "symlink", "GET", f"{admin}/acme/adapters/evil", NOT_FOUND),
        Case("symlink/adapter-dir-version", "symlink", "GET", f"{admin}/acme/adapters/evil/versions/1", NOT_FOUND),
        Case("symlink/adapter-dir-classify", "symlink", "POST", "/v1/classify", NOT_FOUND, token="acme",
             json_body=_items({"adapter": "evil@1", "text": "x"})),
        Case("symlink/adapter-dir-tenant-show", "symlink", "GET", "/v1/adapters/evil", NOT_FOUND, token="acme"),
        Case("symlink/alias-file-classify", "symlink", "POST", "/v1/classify", NOT_FOUND, token="acme",
             json_body=_items({"adapter": "intent@evil", "text": "x"})),
        Case("symlink/alias-file-delete", "symlink", "DELETE", f"{admin}/acme/adapters/intent/aliases/evil",
             NOT_FOUND),
        Case("symlink/tenant-dir-show", "symlink", "GET", f"{admin}/linked/adapters/x", NOT_FOUND),
        Case("symlink/tenant-dir-version", "symlink", "GET", f"{admin}/linked/adapters/x/versions/1", NOT_FOUND),
        Case("symlink/write-through-upload", "symlink", "POST", upload_path("acme", "wt"), INVALID,
             files=(("manifest.json", _renamed(inp.head_files["manifest.json"], "wt")),
                    ("head.safetensors", inp.head_files["head.safetensors"]))),
        Case("symlink/write-through-delete", "symlink", "DELETE", f"{admin}/acme/adapters/wt", NOT_FOUND),
    ]  # fmt: skip


def _renamed(manifest: bytes, name: str) -> bytes:
    data = json.loads(manifest)
    data["name"] = name
    return json.dumps(data).encode()
