"""The adapter graph on 2 intra-op threads at MiniLM's layer sizes: rows of a mixed batch, LoRAs of several
rank chunks included, equal the torch engine's on every call. onnxruntime parallelises kernels only above
some size, so races (a ScatterND add summed duplicate rows wrongly in 10 of 200 calls) stay invisible
on the tiny test model and at 1 thread."""

from __future__ import annotations

import numpy as np
import pytest

from adapters_store import describe_base, open_store
from serving.engine import Engine, EngineSettings, InferenceItem
from tests.test_engine_support import import_peft, result_values, save_ia3, save_lora
from training.onnx_export import ExportSettings, export_base, export_lora_base

TOL = 1e-4
CALLS = 60  # a racy kernel showed up on ~1 call in 20 here
WORDS = "the quick brown fox jumps over a lazy dog while seven tired engineers watch the build".split()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    from tests.helpers.models import make_tiny_bert

    root = tmp_path_factory.mktemp("wide")
    folder = make_tiny_bert(root / "model", seed=5, hidden=384, layers=1)
    store = open_store(str(root / "store"))
    base = store.register_base(describe_base("wide", folder))
    for i, r in enumerate((24, 17, 8)):  # 3, 3 and 1 rank chunks
        d = save_lora(folder, root / f"l{i}", 30 + i, r, 2 * r, ["query", "value"])
        store.put(import_peft(d, f"l{i}", "a", base))
    d = save_ia3(folder, root / "ia3", seed=40)
    store.put(import_peft(d, "i", "a", base))
    settings = ExportSettings(threads=2, fusion="plain")
    export_base(store, "wide", settings=settings)
    export_lora_base(store, "wide", targets=("query", "value"), settings=settings)
    return store


def test_mixed_rows_equal_torch_on_every_call_at_two_threads(wide):
    rng = np.random.default_rng(0)
    tenants = ["l0", "l1", "l2", "i", None]
    ort_engine = Engine(
        wide, base="wide", settings=EngineSettings(threads=2, runtime="onnx", max_batch_rows=64)
    )
    torch_engine = Engine(
        wide, base="wide", settings=EngineSettings(threads=2, runtime="torch", max_batch_rows=64)
    )
    for call in range(CALLS):
        items = []
        for j in range(32):
            t = tenants[(j + call) % len(tenants)]
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(20, 60))))
            items.append(InferenceItem(t or "anyone", "a" if t else None, "embed", text=text))
        got, want = ort_engine.infer(items), torch_engine.infer(items)
        for item, g, w in zip(items, got, want, strict=True):
            np.testing.assert_allclose(
                result_values(g).numpy(),
                result_values(w).numpy(),
                atol=TOL,
                err_msg=f"call {call}, {item.tenant}",
            )
    assert ort_engine.ort.calls == CALLS and ort_engine.ort.fallbacks == {}
