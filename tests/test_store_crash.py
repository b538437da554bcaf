"""kill -9 of a writer in the middle of puts: the store holds complete versions or none, and sweeps orphans."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from adapters_store import describe_base, open_store
from adapters_store.errors import NotFound
from tests.helpers.bundles import head_bundle

WRITER = textwrap.dedent("""
    import os, sys, time
    from adapters_store import Bundle, open_store
    store = open_store(sys.argv[1])
    bundles = [Bundle.read_dir(p) for p in sys.argv[3:]]
    if sys.argv[2] == "pause-before-commit":
        create = store._create
        def slow_create(key, data):
            if "/versions/" in key:
                print("blobs-written", flush=True)
                time.sleep(60)
            return create(key, data)
        store._create = slow_create
    i = 0
    while True:
        m = store.put(bundles[i % len(bundles)])
        print("committed", m.version, flush=True)
        i += 1
""")


def _spawn(url: str, mode: str, dirs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, url, mode, *map(str, dirs)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def _wait_for(proc: subprocess.Popen, word: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if word in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"writer exited with {proc.returncode}")
    raise AssertionError(f"writer never printed {word!r}")


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _check_all_versions_complete(store) -> int:
    count = 0
    for tenant in store.list_tenants():
        for name in store.list_adapters(tenant):
            for m in store.list_versions(tenant, name):
                store.verify(f"{tenant}/{name}@{m.version}")  # raises on any damaged or partial version
                count += 1
    return count


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_kill_writer_mid_put(kind, tmp_path, tiny_bert_dir, request):
    if kind == "local":
        url = str(tmp_path / "store")
    else:
        url = request.getfixturevalue("seaweed").store_url()
    store = open_store(url)
    if kind == "s3":
        store.ensure_bucket()
    base = store.register_base(describe_base("tiny-bert", tiny_bert_dir))
    dirs = [head_bundle(base, name="x", seed=s, num_labels=3).write_dir(tmp_path / f"b{s}") for s in range(3)]
    first = store.put(head_bundle(base, name="x", seed=99))

    # 1. Killed after its blobs are written, before the manifest: no new version, an orphan to sweep.
    orphan = head_bundle(base, name="x", seed=50).write_dir(tmp_path / "orphan")
    proc = _spawn(url, "pause-before-commit", [orphan])
    _wait_for(proc, "blobs-written")
    _kill(proc)
    assert [m.version for m in store.list_versions("acme", "x")] == [1]

    # 2. Killed at random points of a put loop, several times.
    rng = random.Random(0)
    for _ in range(3):
        proc = _spawn(url, "loop", dirs)
        _wait_for(proc, "committed")
        time.sleep(rng.uniform(0.0, 0.3))
        _kill(proc)
    count = _check_all_versions_complete(store)
    assert count >= 4
    assert store.get("acme/x@1").manifest.digest == first.digest  # the earlier version is untouched
    versions = [m.version for m in store.list_versions("acme", "x")]
    assert versions == list(range(1, len(versions) + 1))

    swept = store.sweep_orphans(grace_s=-1)
    assert swept >= 1  # the blob of step 1 (and temp files on disk) were orphans
    orphan_sha = head_bundle(base, seed=50).manifest.files["head.safetensors"].sha256
    with pytest.raises(NotFound):
        store._read(f"tenants/acme/blobs/{orphan_sha}")
    assert _check_all_versions_complete(store) == count
    if kind == "local":
        leftovers = [p for p in store.root.rglob(".tmp-*")]
        assert leftovers == []
