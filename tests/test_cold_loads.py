"""Cold loads off the batch path: a request's adapters are loaded (and leased) before it is batched,
so another tenant's cold load never runs inside the forward of a batch holding warm rows."""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import pytest
import torch

from adapters_store import describe_base, open_store
from serving.engine import Engine, EngineSettings, InferenceItem
from serving.preload import LOADER_NICENESS, ColdLoads
from tests.helpers.bundles import lora_bundle
from tests.service_support import ADMIN, serve_ready, service_env, tenant_auth
from tests.test_engine_kinds import _full_bundle

torch.set_num_threads(1)


class SlowStore:
    """A real store whose reads of one adapter's bundle wait until ``gate`` is set."""

    def __init__(self, store, slow_name: str):
        self._store, self._slow, self.gate = store, slow_name, threading.Event()
        self.reads: list[str] = []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def read_bundle(self, manifest, **kwargs):
        self.reads.append(manifest.name)
        if manifest.name == self._slow:
            assert self.gate.wait(30)
        return self._store.read_bundle(manifest, **kwargs)


@pytest.fixture
def store(tmp_path, tiny_bert_dir):
    store = open_store(str(tmp_path / "store"))
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    for i, name in enumerate(("warm", "cold")):
        store.put(lora_bundle(tiny_bert_dir, base, tmp_path, tenant="acme", name=name, seed=i))
    store.put(_full_bundle(tiny_bert_dir, base, "acme", seed=5)[0])
    return store


def test_a_slow_cold_load_runs_while_warm_rows_are_answered(store):
    slow = SlowStore(store, "cold")
    engine = Engine(slow, base="tiny", settings=EngineSettings(threads=1))
    warm = [InferenceItem("acme", "warm", "classify", text="hi")]
    engine.infer(warm)  # now resident (loaded inside that batch: there was no gateway in front)
    in_batch = engine.cache_stats()["batch_path_loads"]
    loads = ColdLoads(lambda: engine)

    async def scenario() -> float:
        async with anyio.create_task_group() as tg:
            released = {}

            async def cold_request():
                released["fn"] = await loads("acme", ["cold", "warm"])

            tg.start_soon(cold_request)
            await anyio.sleep(0.2)  # the cold load is now blocked in its worker thread
            assert "cold" in slow.reads and "fn" not in released
            started = time.perf_counter()
            answer = await anyio.to_thread.run_sync(engine.infer, warm)  # a batch of warm rows
            took = time.perf_counter() - started
            assert not isinstance(answer[0], Exception)
            slow.gate.set()
        assert engine.is_resident("acme", "cold")
        stats = engine.cache_stats()
        assert stats["leased"] == 1  # held until the cold request is answered
        released["fn"]()
        assert engine.cache_stats()["leased"] == 0
        return took

    assert anyio.run(scenario) < 5  # not blocked by the 30 s gate
    cold = [InferenceItem("acme", "cold", "classify", text="hi")]
    assert not isinstance(engine.infer(cold)[0], Exception)
    assert engine.cache_stats()["batch_path_loads"] == in_batch == 1


def test_resident_adapters_cost_no_thread_and_bad_names_are_left_to_the_batch(store):
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    loads = ColdLoads(lambda: engine)
    engine.infer([InferenceItem("acme", "warm", "classify", text="hi")])
    before = engine.cache_stats()["hits"]
    release = anyio.run(loads, "acme", ["warm", None])
    release()
    assert engine.cache_stats()["hits"] == before  # answered from the resident check alone
    release = anyio.run(loads, "acme", ["missing", "../x"])  # errors are reported on the row later
    release()
    answer = engine.infer([InferenceItem("acme", "missing", "classify", text="hi")])[0]
    assert isinstance(answer, Exception) and answer.status == 404


def test_a_full_fine_tune_stays_leased_until_its_request_is_answered(store):
    """With one full-model slot, a second full load must not evict the first before its batch runs."""
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1, full_cache_size=1))
    release = anyio.run(ColdLoads(lambda: engine), "acme", ["ft"])
    assert engine.cache_stats()["full"]["leased"] == 1
    engine.invalidate("acme", "warm")  # unrelated change: the held full model stays
    assert engine.is_resident("acme", "ft")
    assert not isinstance(engine.infer([InferenceItem("acme", "ft", "classify", text="a")])[0], Exception)
    release()
    assert engine.cache_stats()["batch_path_loads"] == 0


def test_the_engine_names_full_fine_tunes_from_its_alias_cache_only(store):
    """The batcher runs full fine-tunes' rows after the shared ones; deciding that never reads the store."""
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    assert not engine.is_full("acme", "ft")  # not resolved yet: no store read to find out
    anyio.run(ColdLoads(lambda: engine), "acme", ["ft", "warm"])
    assert engine.is_full("acme", "ft") and not engine.is_full("acme", "warm")
    assert not engine.is_full("acme", "missing")


def test_a_warm_tenant_whose_alias_answer_expired_does_not_wait_behind_a_cold_load(store):
    """With the alias answer expired, a resident adapter only needs a store read to confirm its
    version: that must not queue behind another tenant's (here: endless) cold load."""
    slow = SlowStore(store, "cold")
    engine = Engine(slow, base="tiny", settings=EngineSettings(threads=1, alias_ttl_s=0))
    engine.infer([InferenceItem("acme", "warm", "classify", text="hi")])
    loads = ColdLoads(lambda: engine)
    loaded = engine.cache_stats()["loads"]

    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loads, "acme", ["cold"])
            await anyio.sleep(0.2)
            assert "cold" in slow.reads  # the loader is busy with it until the gate opens
            with anyio.fail_after(5):
                release = await loads("acme", ["warm"])
            release()
            slow.gate.set()

    anyio.run(scenario)
    assert engine.cache_stats()["loads"] == loaded + 1  # only "cold": "warm" was found resident


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="needs per-thread nice values (Linux)")
def test_cold_loads_run_in_a_thread_of_lower_cpu_priority(store):
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    seen = {}
    hold = engine.hold

    def spying_hold(tenant, adapters):
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return hold(tenant, adapters)

    engine.hold = spying_hold
    anyio.run(ColdLoads(lambda: engine), "acme", ["cold"])()
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen["nice"] == min(19, mine + LOADER_NICENESS) > mine
    assert engine.is_resident("acme", "cold")


def test_a_full_fine_tunes_pass_does_not_wait_for_the_shared_forward(store):
    """The service runs full fine-tunes' passes in a thread of their own while the next shared batch
    runs: that pass touches none of the shared wrappers, so it must not take their lock."""
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    engine.warm("acme/ft")
    with ThreadPoolExecutor(1) as pool, engine._forward_lock:  # a shared batch is running
        answer = pool.submit(engine.infer, [InferenceItem("acme", "ft", "classify", text="own pass")])
        result = answer.result(timeout=30)[0]
    assert result.labels is not None and result.digest == store.resolve("acme/ft").digest


def test_a_shared_pass_runs_on_the_engines_threads_whatever_the_thread_started_with(store):
    """torch keeps the intra-op thread count per thread, but a thread takes the process-wide last-set
    value when it first runs a parallel op: one starting while a full fine-tune's pass had set 1
    would run every shared batch on one thread."""
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=2))
    seen = {}

    def batcher_thread():
        torch.set_num_threads(1)  # as a thread that first ran during a full fine-tune's pass
        engine.infer([InferenceItem("acme", "warm", "classify", text="shared pass")])
        seen["threads"] = torch.get_num_threads()

    thread = threading.Thread(target=batcher_thread)
    thread.start()
    thread.join(30)
    assert seen["threads"] == 2


def test_rows_prepared_in_two_threads_at_once_keep_their_own_lengths(store):
    """A fast tokenizer sets truncation and padding on every call: two threads preparing rows at once
    (a full fine-tune's pass beside a shared batch) got each other's lengths (591 of 4,000 calls in a
    probe) unless preparation is serialised."""
    from serving.engine.forward import PreparedRow, encode_rows

    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    text = "a sentence long enough to be truncated at either of the two lengths " * 3
    rows = [PreparedRow(InferenceItem("acme", None, "embed", text=text), None, None, None)] * 4
    wrong: list[tuple[int, int]] = []

    def prepare(length: int) -> None:
        settings = engine.settings.model_copy(update={"max_seq_len": length})
        for _ in range(400):
            width = encode_rows(engine.backbone, rows, settings)["input_ids"].shape[1]
            if width != length:
                wrong.append((length, width))

    threads = [threading.Thread(target=prepare, args=(n,)) for n in (8, 16)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, as a loaded server does
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(switch)
    assert not wrong, f"{len(wrong)} calls got the other thread's length, e.g. {wrong[:3]}"


def test_a_request_cancelled_during_its_cold_load_does_not_keep_the_adapter_leased(store):
    slow = SlowStore(store, "cold")
    engine = Engine(slow, base="tiny", settings=EngineSettings(threads=1))
    loads = ColdLoads(lambda: engine)

    async def scenario() -> None:
        with anyio.move_on_after(0.3):  # the client goes away while its adapter loads
            await loads("acme", ["cold"])
        slow.gate.set()
        with anyio.fail_after(10):
            while not engine.is_resident("acme", "cold"):
                await anyio.sleep(0.02)

    anyio.run(scenario)
    time.sleep(0.1)  # the release runs in the loader thread just after the load
    assert engine.cache_stats()["leased"] == 0


def test_a_full_fine_tunes_weights_are_copied_by_torch_into_aligned_memory(store, monkeypatch):
    """``safetensors.torch.load`` holds the GIL while it copies ~90 MB (stalling the warm batches);
    serving from views of the stored bytes instead made the full model's forward ~4x slower."""
    import numpy as np

    from adapters_store.bundle import MODEL_WEIGHTS_FILE
    from serving.engine.loader import load_adapter

    def gil_holding_copy(*_):
        raise AssertionError("safetensors.torch.load copies with the GIL held")

    monkeypatch.setattr("serving.engine.loader.load_safetensors", gil_holding_copy, raising=False)
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    bundle = store.get("acme/ft")
    data = bundle.files[MODEL_WEIGHTS_FILE]
    start = np.frombuffer(data, np.uint8).ctypes.data
    params = list(load_adapter(bundle, engine.backbone).full_model.parameters())
    assert params and all(p.data_ptr() % 64 == 0 for p in params)  # torch's own allocations
    assert not any(start <= p.data_ptr() < start + len(data) for p in params)
    answer = engine.infer([InferenceItem("acme", "ft", "classify", text="own weights")])[0]
    assert not isinstance(answer, Exception)


def test_a_full_fine_tune_is_read_through_a_mapping_not_copied_into_the_heap(store, monkeypatch):
    """Reading a 90 MB full fine-tune into bytes cost ~70 ms of CPU per cold load (the storm's warm
    rows share the cores with it); the engine reads large blobs as read-only maps of the page cache
    and copies out of them once. The answers are those of a load from bytes."""
    import mmap
    import tracemalloc

    import adapters_store.local as local
    from adapters_store.bundle import MODEL_WEIGHTS_FILE

    text = [InferenceItem("acme", "ft", "classify", text="mapped or read")]
    size = store.resolve("acme/ft").files[MODEL_WEIGHTS_FILE].size
    monkeypatch.setattr(local, "MAP_FROM", size + 1)  # the tiny model's file is read as bytes
    from_bytes = Engine(store, base="tiny", settings=EngineSettings(threads=1)).infer(text)[0]
    monkeypatch.setattr(local, "MAP_FROM", size)  # ... and now mapped
    assert isinstance(
        store.read_bundle(store.resolve("acme/ft"), mapped=True).files[MODEL_WEIGHTS_FILE], mmap.mmap
    )
    assert isinstance(store.read_bundle(store.resolve("acme/ft")).files[MODEL_WEIGHTS_FILE], bytes)
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    tracemalloc.start()
    try:
        engine.warm("acme/ft")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 2, f"a cold load allocated {peak} bytes on the Python heap for a {size}-byte file"
    mapped = engine.infer(text)[0]
    assert mapped.logits is not None and mapped.logits == from_bytes.logits


def test_a_damaged_blob_read_through_a_mapping_is_still_refused(store, monkeypatch):
    import adapters_store.local as local
    from adapters_store.bundle import MODEL_WEIGHTS_FILE
    from adapters_store.errors import IntegrityError

    monkeypatch.setattr(local, "MAP_FROM", 1)
    entry = store.resolve("acme/ft").files[MODEL_WEIGHTS_FILE]
    blob = store.root / "tenants" / "acme" / "blobs" / entry.sha256
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store.read_bundle(store.resolve("acme/ft"), mapped=True)
    answer = Engine(store, base="tiny", settings=EngineSettings(threads=1)).infer(
        [InferenceItem("acme", "ft", "classify", text="damaged")]
    )[0]
    assert isinstance(answer, IntegrityError)


@pytest.mark.parametrize("name", ["cold", "ft"])
def test_a_cold_load_parses_each_safetensors_header_once(store, monkeypatch, name):
    """The store's validation already parsed and bounds-checked every header; the loader reads the
    tensors through those headers instead of parsing each file again (CPU a storm of loads takes)."""
    from adapters_store import validation
    from serving.engine import loader

    parsed: list[str] = []
    real = validation.parse_safetensors

    def counting(data, fname, limits):
        parsed.append(fname)
        return real(data, fname, limits)

    monkeypatch.setattr(validation, "parse_safetensors", counting)
    monkeypatch.setattr(loader, "parse_safetensors", counting, raising=False)  # a loader of its own
    engine = Engine(store, base="tiny", settings=EngineSettings(threads=1))
    bundle = store.get(f"acme/{name}")
    parsed.clear()
    loaded = loader.load_adapter(bundle, engine.backbone)
    files = sorted(f for f in bundle.files if f.endswith(".safetensors"))
    assert len(files) >= 1 and sorted(parsed) == files
    assert loaded.head is not None and (name != "ft" or loaded.full_model is not None)
    answer = engine.infer([InferenceItem("acme", name, "classify", text="parsed once")])[0]
    assert not isinstance(answer, Exception)


def test_a_full_fine_tunes_pass_runs_on_one_intra_op_thread(store, monkeypatch):
    """A full fine-tune's own torch pass must not wait at every op for a second intra-op thread that
    the event loop or a cold load has taken; the warm batches queue behind that pass. The shared pass
    keeps the configured threads, and the answers are those of a 2-thread pass."""
    from serving.engine import engine as engine_mod
    from serving.engine.forward import run_full

    engine = Engine(store, base="tiny", settings=EngineSettings(threads=2))
    rows = [InferenceItem("acme", "ft", "classify", text=t) for t in ("one thread", "is enough here")]
    leases: list = []
    prepared = [engine._prepare(r, leases, [None], 0) for r in rows]
    with torch.inference_mode():
        two_threads = run_full(prepared[0].adapter, prepared, engine.backbone, engine.settings)
    for lease in leases:
        lease.release()
    seen: list[tuple[str, int]] = []
    real_full, real_shared = engine_mod.run_full, engine_mod.run_shared

    def full(*args, **kwargs):
        seen.append(("full", torch.get_num_threads()))
        return real_full(*args, **kwargs)

    def shared(*args, **kwargs):
        seen.append(("shared", torch.get_num_threads()))
        return real_shared(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "run_full", full)
    monkeypatch.setattr(engine_mod, "run_shared", shared)
    answers = engine.infer(rows + [InferenceItem("acme", "warm", "classify", text="shared pass")])
    threads_after = torch.get_num_threads()
    torch.set_num_threads(1)  # as the rest of this module runs
    assert sorted(seen) == [("full", 1), ("shared", 2)]
    assert threads_after == 2  # restored after the pass
    for got, want in zip(answers[:2], two_threads, strict=True):
        assert got.labels == want.labels
        assert got.scores == pytest.approx(want.scores, abs=1e-5)


@pytest.mark.e2e
def test_over_http_cold_loads_never_run_inside_a_batch(tmp_path, tiny_bert_dir):
    """A real bentoml serve: concurrent warm and cold requests of many tenants; every cold adapter is
    loaded before its request is batched (the cache counts loads that ran inside a batch)."""
    store = open_store(str(tmp_path / "store"))
    base = store.register_base(describe_base("tiny", tiny_bert_dir))
    names = [f"t{i}" for i in range(12)]
    for i, name in enumerate(names):
        store.put(lora_bundle(tiny_bert_dir, base, tmp_path, tenant="acme", name=name, seed=10 + i))
    store.put(_full_bundle(tiny_bert_dir, base, "acme", seed=5)[0])
    env = service_env(str(tmp_path / "store"), tmp_path)
    server = serve_ready("serving.service:LoraplexService", env, tmp_path / "serve")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:

            def ask(name: str) -> int:
                r = client.post(
                    "/v1/classify",
                    json={"items": [{"adapter": name, "text": f"hello {name}"}]},
                    headers=tenant_auth("acme"),
                )
                return r.status_code

            assert ask("t0") == 200  # one warm tenant
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(ask, ["t0", *names[1:], "ft", "t0", "ft"] * 2))
            assert statuses == [200] * len(statuses)
            stats = client.get("/v1/admin/cache", headers=ADMIN).json()
        assert stats["loads"] == len(names) and stats["full"]["loads"] >= 1, stats
        assert stats["batch_path_loads"] == 0, stats
        assert stats["runtime"]["name"] == "torch" and "no stored ONNX export" in stats["runtime"]["note"]
    finally:
        server.stop()
