"""The in-process multi-tenant engine: one backbone, every tenant's adapter, mixed in one forward pass.

>>> engine = Engine(open_store("/data/store"), base="minilm")            # doctest: +SKIP
>>> engine.infer([InferenceItem("acme", "intent", "classify", text="cancel my order")])  # doctest: +SKIP
[InferenceResult(adapter='acme/intent', version=3, digest='9f2c...', labels=[...], scores=[...], ...)]

Rows fail one by one: a row with an unknown adapter, an adapter trained on another base or a damaged
file gets its :class:`LoraplexError`; the other rows are answered. ``full`` fine-tunes are the
expensive option: each needs a whole dedicated model copy, held in a separate LRU of
``settings.full_cache_size`` entries.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from adapters_store.bundle import AdapterManifest
from adapters_store.errors import IncompatibleBase, LoraplexError, ValidationError
from adapters_store.names import AdapterRef, validate_name
from serving.engine.backbone import load_backbone
from serving.engine.cache import AdapterCache, Lease
from serving.engine.forward import PreparedRow, run_full, run_shared, single_threaded
from serving.engine.items import TASKS, InferenceItem, InferenceResult
from serving.engine.loader import LoadedAdapter, load_adapter
from serving.engine.ort_runtime import OrtRuntime
from serving.engine.plan import chunk_rows, group_rows
from serving.engine.resolver import AliasResolver
from serving.engine.settings import EngineSettings

log = logging.getLogger(__name__)
_UNLIMITED = 1 << 62
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers in glibc's malloc.h


class Engine:
    """Serves every tenant of ONE registered base from ONE loaded backbone. Thread-safe."""

    def __init__(self, store: Any, base: str = "minilm", settings: EngineSettings | None = None):
        self.settings = settings or EngineSettings()
        torch.set_num_threads(self.settings.threads)
        keep_activation_memory()
        self.store = store
        self.base = store.get_base(base)
        self.backbone = load_backbone(self.base)
        self.runtime_note = ""  # why the runtime in use was chosen (logged at start, shown by the service)
        self.ort = self._load_ort(store)
        self.runtime = (
            "torch"
            if self.ort is None
            else ("onnx" if self.settings.runtime == "auto" else self.settings.runtime)
        )
        if self.ort is not None:
            self.runtime_note = self.ort.describe()
        self._cache = AdapterCache(self.settings.cache_bytes, pins=self.settings.pins)
        self._full = AdapterCache(_UNLIMITED, max_entries=self.settings.full_cache_size)
        self._resolver = AliasResolver(store, self.settings.alias_ttl_s)
        self._forward_lock = threading.Lock()  # the wrappers' batch context is shared state
        self._full_lock = threading.Lock()  # one full fine-tune's pass at a time (each on its own model)
        self._batch_loads = 0  # cold loads that ran inside infer(), i.e. on a batch's path
        self._count_lock = threading.Lock()

    def _load_ort(self, store: Any) -> OrtRuntime | None:
        runtime = self.settings.runtime
        if runtime == "torch":
            self.runtime_note = "runtime torch was asked for"
            return None
        if runtime == "auto" and not OrtRuntime.exported(store, self.base):
            self.runtime_note = (
                f"runtime auto: base {self.base.name!r} has no stored ONNX export (`loraplex base register` "
                f"builds it; or run `loraplex onnx export --base {self.base.name}`); serving on torch"
            )
            log.warning("%s", self.runtime_note)
            return None
        try:
            return OrtRuntime.load(
                store,
                self.base,
                "onnx" if runtime == "auto" else runtime,
                self.settings.threads,
                lora_slots=min(self.settings.max_batch_rows, 256),  # a pass holds at most that many
            )
        except Exception as e:  # a damaged or unloadable export
            if runtime != "auto":
                raise  # asked for explicitly: a broken export stops the start
            self.runtime_note = (
                f"runtime auto: the ONNX export of {self.base.name} is not usable ({e}); serving on torch"
            )
            log.warning("%s", self.runtime_note)
            return None

    # -- inference --------------------------------------------------------------------------------
    def infer(self, items: Sequence[InferenceItem]) -> list[InferenceResult | LoraplexError]:
        """Answer every row; same length and order as ``items``. Bad rows get their LoraplexError."""
        out: list[InferenceResult | LoraplexError | None] = [None] * len(items)
        leases: list[Lease] = []
        try:
            rows = [self._prepare(item, leases, out, i) for i, item in enumerate(items)]
            self._run_groups(rows, out)
        finally:
            for lease in leases:
                lease.release()
        return out  # type: ignore[return-value]

    def _prepare(self, item: InferenceItem, leases: list[Lease], out: list, index: int) -> PreparedRow | None:
        try:
            self._check_item(item)
            if item.adapter is None:
                if item.task == "classify":
                    raise ValidationError("the bare base has no classifier; name an adapter to classify")
                return PreparedRow(item, None, None, None)
            manifest, digest = self._resolver.resolve(item.tenant, item.adapter)
            if item.task == "classify" and manifest.task == "feature-extraction":
                raise ValidationError(
                    f"{manifest.tenant}/{manifest.name} is an embedding adapter; use task 'embed'"
                )
            lease = self._lease(manifest, digest, in_batch=True)
            leases.append(lease)
            return PreparedRow(item, lease.value, manifest.version, digest)
        except LoraplexError as e:
            out[index] = e
        except Exception as e:  # a loader bug must not fail the other rows
            log.exception("preparing row %d failed", index)
            out[index] = LoraplexError(f"could not prepare this row: {type(e).__name__}")
        return None

    def _check_item(self, item: InferenceItem) -> None:
        validate_name(item.tenant, "tenant")
        if item.task not in TASKS:
            raise ValidationError(f"task must be one of {', '.join(TASKS)}, got {item.task!r}")
        if self.backbone.modality == "text":
            if not isinstance(item.text, str) or not item.text.strip():
                raise ValidationError("this base reads text: give a non-empty 'text'")
        elif self.backbone.modality == "audio":
            wave = item.audio
            if (
                not isinstance(wave, np.ndarray)
                or wave.dtype != np.float32
                or wave.ndim != 1
                or wave.size < 400
            ):
                raise ValidationError(
                    f"this base reads audio: give 'audio' as a 1-D float32 waveform at "
                    f"{self.backbone.sampling_rate} Hz, at least 400 samples"
                )
            if not np.isfinite(wave).all():
                raise ValidationError("audio samples must be finite")
        else:
            img = item.image
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValidationError("this base reads images: give 'image' as an HxWx3 uint8 array")

    def _lease(self, manifest: AdapterManifest, digest: str, in_batch: bool = False) -> Lease:
        if manifest.base.fingerprint != self.base.fingerprint:
            raise IncompatibleBase(
                f"{manifest.tenant}/{manifest.name} v{manifest.version} was trained on base "
                f"{manifest.base.name!r}, not on {self.base.name!r} served here (fingerprints differ)"
            )
        cache = self._full if manifest.kind == "full" else self._cache
        owner = (manifest.tenant, manifest.name)
        return cache.acquire(digest, owner, lambda: self._load(manifest, digest, in_batch))

    # -- cold loads off the batch path ------------------------------------------------------------
    def is_resident(self, tenant: str, adapter: str) -> bool:
        """True when ``adapter`` resolves from the alias cache to a loaded adapter; never reads the store."""
        hit = self._resolver.peek(tenant, adapter)
        return hit is not None and (hit.digest in self._cache or hit.digest in self._full)

    def is_full(self, tenant: str, adapter: str) -> bool:
        """True when ``adapter`` resolves (from the alias cache only; never a store read) to a full
        fine-tune: its rows run their own backbone pass, so the batcher runs them after the shared rows."""
        hit = self._resolver.peek(tenant, adapter)
        return hit is not None and hit.manifest.kind == "full"

    def unloaded(self, tenant: str, adapters: Sequence[str]) -> list[str]:
        """Those of ``adapters`` whose current version is not loaded. Resolves them (an expired alias
        answer is a store read) but loads nothing, so a warm tenant whose alias answer expired is not
        queued behind other tenants' cold loads. Unresolvable ones are left to ``infer`` to report."""
        out = []
        for adapter in dict.fromkeys(adapters):
            try:
                digest = self._resolver.resolve(tenant, adapter).digest
            except LoraplexError:
                continue
            except Exception:  # a store bug: infer reports it on the row
                log.exception("resolving %s/%s failed", tenant, adapter)
                continue
            if digest not in self._cache and digest not in self._full:
                out.append(adapter)
        return out

    def hold(self, tenant: str, adapters: Sequence[str]) -> list[Lease]:
        """Resolve and load ``tenant``'s ``adapters`` now, outside any batch, and lease them so they stay
        resident until the caller releases the leases (after its rows were answered). A request does this
        before joining a batch, so a cold load (a full fine-tune is ~90 MB) never holds up the other
        tenants' rows of that batch. Failures are left for ``infer`` to report on the row."""
        leases = []
        for adapter in dict.fromkeys(adapters):
            try:
                manifest, digest = self._resolver.resolve(tenant, adapter)
                leases.append(self._lease(manifest, digest))
            except LoraplexError:
                continue
            except Exception:  # a loader bug: infer reports it on the row
                log.exception("preloading %s/%s failed", tenant, adapter)
        return leases

    def _load(
        self, manifest: AdapterManifest, digest: str, in_batch: bool = False
    ) -> tuple[LoadedAdapter, int]:
        if in_batch:
            with self._count_lock:
                self._batch_loads += 1
        read_bundle = getattr(self.store, "read_bundle", None)  # skips a second resolve when offered
        if read_bundle is not None:
            bundle = read_bundle(manifest, mapped=True)  # large files mapped: the loader copies out
        else:
            bundle = self.store.get(AdapterRef(manifest.tenant, manifest.name, str(manifest.version)))
        # A store that reads the resolved manifest's files returns that manifest itself; one that
        # resolves again may return a newer one (hashing a manifest costs ~0.2 ms of a cold load).
        if bundle.manifest is not manifest and bundle.manifest.digest != digest:
            raise ValidationError(f"{manifest.tenant}/{manifest.name} changed while loading; retry")
        loaded = load_adapter(bundle, self.backbone, digest)
        return loaded, loaded.nbytes

    def _run_groups(self, rows: list[PreparedRow | None], out: list) -> None:
        keys = [None if r is None else self._group_key(r) for r in rows]
        for key, idx in group_rows(keys).items():
            for chunk in chunk_rows(idx, self.settings.max_batch_rows):
                self._run_chunk(key, [rows[i] for i in chunk], chunk, out)

    def _group_key(self, row: PreparedRow) -> tuple:
        full = row.adapter.digest if row.adapter is not None and row.adapter.kind == "full" else None
        if self.backbone.modality == "audio":
            shape = row.item.audio.shape  # no attention mask: only equal lengths share a pass
        else:
            shape = row.item.image.shape if self.backbone.preprocessor is None else None
        return (full, shape)

    def _run_chunk(self, key: tuple, rows: list[PreparedRow], idx: list[int], out: list) -> None:
        try:
            if key[0] is not None:
                # A full fine-tune's pass touches no shared wrapper, so it holds its own lock, not the
                # forward lock: the service runs it in a thread of its own while the next shared batch
                # runs (serving.fairness). One intra-op thread: a 2-thread torch pass waits at every op
                # for a second thread that the event loop, a cold load or the onnxruntime pool just
                # used holds. Measured (issue 18, in-process, a 1-row full pass right after a 16-row
                # onnxruntime batch): 739 ms wall / 493 ms CPU median on 2 threads, 42 / 28 ms on one.
                with self._full_lock, torch.inference_mode(), single_threaded():
                    answers = run_full(rows[0].adapter, rows, self.backbone, self.settings)
            else:
                with self._forward_lock, torch.inference_mode():
                    _own_threads(self.settings.threads)
                    answers = run_shared(self.backbone, rows, self.settings, self.ort)
        except LoraplexError as e:
            answers = [e] * len(rows)
        except Exception as e:  # a bug must not take down other groups' rows
            log.exception("engine forward failed")
            answers = [LoraplexError(f"inference failed: {type(e).__name__}")] * len(rows)
        for i, answer in zip(idx, answers, strict=True):
            out[i] = answer

    # -- cache administration ---------------------------------------------------------------------
    def warm(self, ref: str) -> AdapterManifest:
        """Load ``tenant/name[@sel]`` into the cache now (validating it); returns its manifest."""
        parsed = AdapterRef.parse(ref)
        adapter = parsed.name if "@" not in ref else f"{parsed.name}@{parsed.selector}"
        manifest, digest = self._resolver.resolve(parsed.tenant, adapter)
        self._lease(manifest, digest).release()
        return manifest

    def pin(self, ref: str) -> None:
        """Never evict ``tenant`` or ``tenant/name``'s adapters (any version); a named adapter is warmed."""
        pattern = _owner_pattern(ref)
        self._cache.pin(pattern)
        self._full.pin(pattern)
        if "/" in pattern:
            self.warm(ref)

    def unpin(self, ref: str) -> None:
        pattern = _owner_pattern(ref)
        self._cache.unpin(pattern)
        self._full.unpin(pattern)

    def forget_resolutions(self, tenant: str, name: str | None = None) -> None:
        """After a register or an alias change: the next request resolves afresh. Loaded adapters stay:
        they are keyed by content digest, and no stored version's content ever changes."""
        self._resolver.forget(tenant, name)

    def invalidate(self, tenant: str, name: str | None = None, version: int | None = None) -> int:
        """After a delete: forget resolutions of ``tenant`` (or one adapter) and drop its loaded
        adapters (or only ``version``'s); returns the entries dropped."""
        self._resolver.forget(tenant, name)

        def match(owner: tuple[str, str], loaded: LoadedAdapter) -> bool:
            return (
                owner[0] == tenant
                and (name is None or owner[1] == name)
                and (version is None or loaded.manifest.version == version)
            )

        return self._cache.invalidate(match) + self._full.invalidate(match)

    def resident(self) -> list[dict[str, Any]]:
        """Which adapter versions this replica holds loaded: tenant, name, version, digest, bytes
        (an adapter-aware router's input; ``/metrics`` exports it when it is protected)."""
        return [
            {
                "tenant": tenant,
                "name": name,
                "version": value.manifest.version,
                "digest": value.digest,
                "bytes": nbytes,
            }
            for cache in (self._cache, self._full)
            for (tenant, name), value, nbytes in cache.resident()
        ]

    def cache_stats(self) -> dict[str, Any]:
        """Adapter cache counters (hits, misses, loads, evictions, load_time_s, bytes_used, entries,
        pinned, ...) plus ``full``: the same for the dedicated full-model LRU; ``batch_path_loads``:
        cold loads that ran inside a batch (the service loads before batching, so normally 0); and
        ``runtime``: which backbone runtime serves and how many passes ran on onnxruntime."""
        stats = self._cache.stats()
        stats["full"] = self._full.stats()
        stats["batch_path_loads"] = self._batch_loads
        stats["runtime"] = {
            "name": self.runtime,
            "note": self.runtime_note,
            "onnx_passes": self.ort.calls if self.ort is not None else 0,
            "torch_fallbacks": dict(self.ort.fallbacks) if self.ort is not None else {},
        }
        return stats

    def cache_residents(self) -> list[dict[str, Any]]:
        """The adapters loaded now (both caches), least recently used first."""
        return self._cache.residents() + self._full.residents()


def _own_threads(threads: int) -> None:
    """This thread's torch intra-op thread count is ``threads``. torch keeps the count per thread, but
    a thread takes the process-wide last-set value when it first runs a parallel op: one that starts
    while a full fine-tune's pass has set 1 elsewhere would keep 1 for good."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def keep_activation_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 128 << 20) -> bool:
    """Let freed activation memory be reused by the next pass instead of going back to the OS (glibc,
    process-wide). A pass allocates and frees dozens of 0.1-30 MB tensors; each block that comes from
    a fresh mapping, or from heap top that was trimmed, is paid again in page faults. On MiniLM batch
    32 (issue 18): with the mmap threshold pinned at 128 KB, ~24k faults per forward (~30% of its time,
    the threshold toggled in one process); with glibc's adaptive thresholds, ~500 per base pass and
    ~3,100 per 16-LoRA pass (its trims follow the allocation pattern); with these two fixed, 0, and
    the 16-LoRA pass 245 -> 308 rows/s (two processes run back to back). Resident LoRA adapters live
    in their own mappings (see loader), so holes left by evictions do not pin heap memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


def _owner_pattern(ref: str) -> str:
    tenant, _, rest = ref.partition("/")
    validate_name(tenant, "tenant")
    if not rest:
        return tenant
    return f"{tenant}/{validate_name(rest.partition('@')[0], 'adapter name')}"
