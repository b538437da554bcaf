"""The ``AdapterStore`` protocol and its one implementation over a tiny object-storage interface.

Layout (keys are the same on local disk and on S3)::

    bases/<base>.json                                   registered base model (BaseModelEntry)
    bases/<base>/artifacts/<fingerprint>/<file>         derived artifacts (ONNX exports), never tenant-supplied
    tenants/<tenant>/blobs/<sha256>                     file contents, content-addressed, immutable
    tenants/<tenant>/adapters/<name>/versions/<N>.json  manifest of version N: the commit point
    tenants/<tenant>/adapters/<name>/aliases/<alias>.json   {"version": N}
    tenants/<tenant>/adapters/<name>/deleted/<N>.json   tombstone: a deleted number is never reused

A put uploads blobs first and then creates ``versions/<N>.json`` with a conditional create (O_EXCL-like
link on disk, ``If-None-Match: *`` on S3). A crash before that leaves only unreferenced blobs, which
``sweep_orphans`` removes after a grace period; a crash after it leaves a complete version. Puts on
one name take turns for N within a process; across processes the conditional create decides and the
loser re-lists, so both land with distinct versions. A number that was ever deleted is never reused.
"""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from adapters_store.base_models import BaseModelEntry
from adapters_store.bundle import SCHEMA_VERSION, AdapterManifest, Bundle
from adapters_store.errors import (
    Conflict,
    IncompatibleBase,
    IntegrityError,
    LoraplexError,
    NotFound,
    ValidationError,
)
from adapters_store.names import LATEST, AdapterRef, validate_alias, validate_name, validate_settable_alias
from adapters_store.quotas import QUOTA_PREFIX, TenantQuota, quota_key
from adapters_store.validation import StoreLimits, validate_bundle

_PUT_RETRIES = 64
# Puts on one name in one process take turns for a number (the conditional create still guards across
# processes): 32 threads racing for the same next number starved some of them into a 409.
_NUMBER_LOCKS = tuple(threading.Lock() for _ in range(64))


@runtime_checkable
class AdapterStore(Protocol):
    """What training writes and serving reads. ``open_store(url)`` returns one."""

    url: str
    limits: StoreLimits

    def register_base(self, entry: BaseModelEntry) -> BaseModelEntry: ...
    def get_base(self, name: str) -> BaseModelEntry: ...
    def list_bases(self) -> list[BaseModelEntry]: ...
    def put(self, bundle: Bundle, aliases: Sequence[str] = ()) -> AdapterManifest: ...
    def resolve(self, ref: AdapterRef | str) -> AdapterManifest: ...
    def resolve_version(self, ref: AdapterRef | str) -> int: ...
    def get(self, ref: AdapterRef | str) -> Bundle: ...
    def list_tenants(self) -> list[str]: ...
    def list_adapters(self, tenant: str) -> list[str]: ...
    def list_versions(self, tenant: str, name: str) -> list[AdapterManifest]: ...
    def version_numbers(self, tenant: str, name: str) -> list[int]: ...
    def aliases(self, tenant: str, name: str) -> dict[str, int]: ...
    def set_alias(self, tenant: str, name: str, alias: str, version: int) -> None: ...
    def delete_alias(self, tenant: str, name: str, alias: str) -> None: ...
    def delete_version(self, tenant: str, name: str, version: int, force: bool = False) -> dict[str, int]: ...
    def delete_adapter(self, tenant: str, name: str) -> int: ...
    def verify(self, ref: AdapterRef | str) -> AdapterManifest: ...
    def sweep_orphans(self, grace_s: float = 3600.0) -> int: ...
    def put_artifact(self, base: str, fingerprint: str, filename: str, data: bytes) -> None: ...
    def get_artifact(self, base: str, fingerprint: str, filename: str) -> bytes: ...
    def has_artifact(self, base: str, fingerprint: str, filename: str) -> bool: ...
    def quotas(self) -> dict[str, TenantQuota]: ...
    def set_quota(self, tenant: str, quota: TenantQuota) -> None: ...
    def delete_quota(self, tenant: str) -> None: ...


class ObjectStore(ABC):
    """The registry logic over five object primitives; ``LocalStore`` and ``S3Store`` supply them."""

    url: str
    limits: StoreLimits

    # -- primitives -------------------------------------------------------------------------------
    @abstractmethod
    def _read(self, key: str) -> bytes:
        """Bytes of ``key``; raise NotFound if absent."""

    def _read_mapped(self, key: str) -> bytes:
        """Bytes of ``key`` for reading only; a backend may map a large file instead of copying it
        (LocalStore). Raise NotFound if absent."""
        return self._read(key)

    @abstractmethod
    def _write(self, key: str, data: bytes) -> None:
        """Atomically create or replace ``key``."""

    @abstractmethod
    def _create(self, key: str, data: bytes) -> bool:
        """Atomically create ``key`` only if absent; False if it already existed."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Remove ``key`` (no error if absent)."""

    @abstractmethod
    def _list(self, prefix: str) -> list[tuple[str, float]]:
        """(key, modified time) of every object under ``prefix`` (a folder-like prefix ending in '/')."""

    def _keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, like ``_list`` without the modified times (listings need none)."""
        return [k for k, _ in self._list(prefix)]

    def _names(self, prefix: str) -> list[str]:
        """Names of the objects directly under ``prefix`` (not in sub-folders). Serving lists a version
        folder on every unaliased resolve, so backends override this with a cheaper listing."""
        out = []
        for key, _ in self._list(prefix):
            rest = key[len(prefix) :]
            if "/" not in rest:
                out.append(rest)
        return out

    # -- bases ------------------------------------------------------------------------------------
    def register_base(self, entry: BaseModelEntry) -> BaseModelEntry:
        key = f"bases/{validate_name(entry.name, 'base name')}.json"
        if not self._create(key, entry.model_dump_json(indent=2).encode()):
            existing = self.get_base(entry.name)
            if existing.fingerprint != entry.fingerprint:
                raise Conflict(
                    f"base {entry.name!r} is already registered with another fingerprint "
                    f"({existing.fingerprint[:12]}...); register the new weights under a new name"
                )
            return existing
        return entry

    def get_base(self, name: str) -> BaseModelEntry:
        data = self._read_or(
            f"bases/{validate_name(name, 'base name')}.json", f"base model {name!r} is not registered"
        )
        return BaseModelEntry.model_validate_json(data)

    def list_bases(self) -> list[BaseModelEntry]:
        keys = [k for k, _ in self._list("bases/") if k.count("/") == 1 and k.endswith(".json")]
        return [BaseModelEntry.model_validate_json(self._read(k)) for k in sorted(keys)]

    def _base_for(self, fingerprint: str, name: str) -> BaseModelEntry:
        try:
            base = self.get_base(name)
        except NotFound:
            raise IncompatibleBase(
                f"base {name!r} is not registered in this store; run 'loraplex base register'"
            ) from None
        if base.fingerprint != fingerprint:
            raise IncompatibleBase(
                f"base {name!r} in this store has fingerprint {base.fingerprint[:12]}..., "
                f"the bundle names {fingerprint[:12]}...; it was trained on other weights"
            )
        return base

    # -- adapters ---------------------------------------------------------------------------------
    def put(self, bundle: Bundle, aliases: Sequence[str] = ()) -> AdapterManifest:
        """Store ``bundle`` as the next version and point ``aliases`` at it. Everything (aliases
        included) is validated before the first write, so a refused put stores nothing."""
        m = bundle.manifest
        aliases = list(dict.fromkeys(validate_settable_alias(a) for a in aliases))
        base = self._base_for(m.base.fingerprint, m.base.name)
        spec = validate_bundle(bundle, base, self.limits)
        if spec is not None:  # the stored manifest carries the spec, so readers never re-derive it
            bundle = bundle.with_manifest(peft=spec, schema_version=SCHEMA_VERSION)
        stamped = self._commit(bundle)
        for alias in aliases:
            self._write_alias(m.tenant, m.name, alias, stamped.version)
        return stamped

    def _commit(self, bundle: Bundle) -> AdapterManifest:
        m = bundle.manifest
        root = self._adapter_root(m.tenant, m.name)
        for entry_name, data in bundle.files.items():
            # Rewritten on every put: refreshes the blob's age so a concurrent sweep keeps it.
            self._write(f"tenants/{m.tenant}/blobs/{m.files[entry_name].sha256}", data)
        with _NUMBER_LOCKS[hash((self.url, root)) % len(_NUMBER_LOCKS)]:
            version = self._next_version(m.tenant, m.name)
            for _ in range(_PUT_RETRIES):
                stamped = m.model_copy(update={"version": version})
                key = f"{root}versions/{version}.json"
                if self._create(key, stamped.to_json()):
                    # A delete writes its tombstone before removing the manifest, so no tombstone at or
                    # above N means N was never served before. Otherwise another process took N and it
                    # was deleted since we listed: '@N' must never name other weights, so withdraw.
                    if max(self._tombstones(root), default=0) < version:
                        return stamped
                    self._delete(key)
                # Taken by another process: jump past everything taken meanwhile, not one at a time.
                version = max(version + 1, self._next_version(m.tenant, m.name))
        raise Conflict(f"{m.tenant}/{m.name}: too many concurrent puts; retry")

    def resolve(self, ref: AdapterRef | str) -> AdapterManifest:
        ref = AdapterRef.parse(ref) if isinstance(ref, str) else ref
        version = ref.version
        if version is None:
            version = self._alias_target(ref)
        return self._manifest(ref.tenant, ref.name, version)

    def resolve_version(self, ref: AdapterRef | str) -> int:
        """The version number ``ref`` names now, without reading its manifest: one alias read (one
        listing of the version folder for ``latest``). Versions never change, so a caller holding
        that version's manifest can keep it; an explicit ``@N`` is returned as is (not checked)."""
        ref = AdapterRef.parse(ref) if isinstance(ref, str) else ref
        return ref.version if ref.version is not None else self._alias_target(ref)

    def get(self, ref: AdapterRef | str) -> Bundle:
        manifest = self.resolve(ref)
        return self.read_bundle(manifest)

    def read_bundle(self, manifest: AdapterManifest, mapped: bool = False) -> Bundle:
        """Fetch and verify every file of a resolved manifest. ``mapped``: large files may come as
        read-only memory maps rather than bytes (for a reader that only copies out of them: the
        engine's cold load, where reading a 90 MB full fine-tune into bytes cost ~70 ms of CPU)."""
        read = self._read_mapped if mapped else self._read
        files = {}
        for fname, entry in manifest.files.items():
            try:
                files[fname] = read(f"tenants/{manifest.tenant}/blobs/{entry.sha256}")
            except NotFound:
                raise IntegrityError(
                    f"{manifest.tenant}/{manifest.name}@{manifest.version}: file {fname!r} "
                    "is missing from the store"
                ) from None
        bundle = Bundle(manifest, files)
        bundle.verify()
        return bundle

    def verify(self, ref: AdapterRef | str) -> AdapterManifest:
        return self.get(ref).manifest

    def list_tenants(self) -> list[str]:
        return sorted({k.split("/")[1] for k in self._keys("tenants/") if "/versions/" in k})

    def list_adapters(self, tenant: str) -> list[str]:
        prefix = f"tenants/{validate_name(tenant, 'tenant')}/adapters/"
        return sorted({k[len(prefix) :].split("/")[0] for k in self._keys(prefix) if "/versions/" in k})

    def list_versions(self, tenant: str, name: str) -> list[AdapterManifest]:
        return [self._manifest(tenant, name, v) for v in self._versions(tenant, name)]

    def version_numbers(self, tenant: str, name: str) -> list[int]:
        """Stored version numbers, oldest first, from one folder listing (no manifest is read)."""
        return self._versions(tenant, name)

    def aliases(self, tenant: str, name: str) -> dict[str, int]:
        prefix = f"{self._adapter_root(tenant, name)}aliases/"
        out = {}
        for file_name in self._names(prefix):
            alias = file_name.removesuffix(".json")
            try:
                out[alias] = int(json.loads(self._read(prefix + file_name))["version"])
            except (NotFound, KeyError, ValueError, TypeError):
                continue  # deleted meanwhile, or damaged: an alias that does not parse points nowhere
        versions = self._versions(tenant, name)
        if versions:
            out[LATEST] = versions[-1]
        return out

    def set_alias(self, tenant: str, name: str, alias: str, version: int) -> None:
        alias = validate_settable_alias(alias)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValidationError(f"alias version must be an integer, got {version!r}")
        self._manifest(tenant, name, version)  # the target must exist
        self._write_alias(tenant, name, alias, version)

    def _write_alias(self, tenant: str, name: str, alias: str, version: int) -> None:
        self._write(
            f"{self._adapter_root(tenant, name)}aliases/{alias}.json",
            json.dumps({"version": version}).encode(),
        )

    def delete_alias(self, tenant: str, name: str, alias: str) -> None:
        key = f"{self._adapter_root(tenant, name)}aliases/{validate_alias(alias)}.json"
        self._read_or(key, f"{tenant}/{name} has no alias {alias!r}")
        self._delete(key)

    def delete_version(self, tenant: str, name: str, version: int, force: bool = False) -> dict[str, int]:
        """Remove one version. A version an alias points at is refused (409 naming the aliases): its
        traffic would silently fall back to ``latest``. With ``force`` those aliases are removed too
        and returned (alias -> the deleted version). Blobs go at the next sweep."""
        root = self._adapter_root(tenant, name)
        self._manifest(tenant, name, version)
        pointing = {a: v for a, v in self.aliases(tenant, name).items() if v == version and a != LATEST}
        if pointing and not force:
            names = ", ".join(sorted(pointing))
            raise Conflict(
                f"{tenant}/{name}@{version} is what alias(es) {names} point at; move them first "
                "(promote another version), or force the delete to remove them too "
                "('?force=true' over HTTP, '--force' in the CLI)"
            )
        for alias in sorted(pointing):
            self._delete(f"{root}aliases/{alias}.json")
        # A tombstone keeps the number taken: '@N' must never name different weights later.
        self._write(f"{root}deleted/{version}.json", json.dumps({"version": version}).encode())
        self._delete(f"{root}versions/{version}.json")
        self._compact_tombstones(root)
        return dict(sorted(pointing.items()))

    def _tombstones(self, root: str) -> dict[int, str]:
        prefix = f"{root}deleted/"
        stems = {prefix + n: n.removesuffix(".json") for n in self._names(prefix)}
        return {int(v): k for k, v in stems.items() if v.isascii() and v.isdigit()}

    def _compact_tombstones(self, root: str) -> None:
        # Only the highest matters; removing lower ones is safe under concurrency (the max stays).
        stones = self._tombstones(root)
        for number, key in stones.items():
            if number < max(stones):
                self._delete(key)

    def delete_adapter(self, tenant: str, name: str) -> int:
        versions = self._versions(tenant, name)
        if not versions:
            raise NotFound(f"adapter {tenant}/{name} does not exist")
        root = self._adapter_root(tenant, name)
        # The high-water mark outlives the adapter: uploading again continues after it, so 'name@1'
        # never names other weights (a replica may still hold the old resolution).
        high = max(versions[-1], max(self._tombstones(root), default=0))
        self._write(f"{root}deleted/{high}.json", json.dumps({"version": high}).encode())
        for key, _ in self._list(f"{root}aliases/"):
            self._delete(key)
        for v in versions:
            self._delete(f"{root}versions/{v}.json")
        self._compact_tombstones(root)
        return len(versions)

    def sweep_orphans(self, grace_s: float = 3600.0) -> int:
        """Delete blobs that no manifest references and that are older than ``grace_s`` seconds."""
        removed = 0
        now = time.time()
        for tenant in sorted({k.split("/")[1] for k, _ in self._list("tenants/")}):
            live = {
                e.sha256
                for n in self.list_adapters(tenant)
                for m in self.list_versions(tenant, n)
                for e in m.files.values()
            }
            for key, mtime in self._list(f"tenants/{tenant}/blobs/"):
                if key.rsplit("/", 1)[1] not in live and now - mtime > grace_s:
                    self._delete(key)
                    removed += 1
        return removed + self._sweep_backend(grace_s)

    def _sweep_backend(self, grace_s: float) -> int:
        """Backend-specific leftovers (temp files on disk); none by default."""
        return 0

    # -- artifacts (derived from a base, e.g. ONNX exports) -----------------------------------------
    def _artifact_key(self, base: str, fingerprint: str, filename: str) -> str:
        from adapters_store.bundle import check_file_name

        if not (len(fingerprint) == 64 and all(c in "0123456789abcdef" for c in fingerprint)):
            raise ValidationError("artifact fingerprint must be 64 lower-case hex digits")
        name = filename if filename.endswith((".onnx", ".data")) else check_file_name(filename)
        validate_name(name.rsplit(".", 1)[0].lower(), "artifact file name")
        return f"bases/{validate_name(base, 'base name')}/artifacts/{fingerprint}/{name}"

    def put_artifact(self, base: str, fingerprint: str, filename: str, data: bytes) -> None:
        self._base_for(fingerprint, base)
        self._write(self._artifact_key(base, fingerprint, filename), data)

    def get_artifact(self, base: str, fingerprint: str, filename: str) -> bytes:
        return self._read_or(
            self._artifact_key(base, fingerprint, filename),
            f"base {base!r} has no artifact {filename!r}; run 'loraplex onnx export --base {base}'",
        )

    def has_artifact(self, base: str, fingerprint: str, filename: str) -> bool:
        try:
            self._read(self._artifact_key(base, fingerprint, filename))
            return True
        except NotFound:
            return False

    # -- per-tenant quota overrides (see adapters_store.quotas) ------------------------------------
    def quotas(self) -> dict[str, TenantQuota]:
        """Every stored override by tenant (one listing, one small read each); damaged ones are skipped."""
        out = {}
        for file_name in self._names(QUOTA_PREFIX):
            tenant = file_name.removesuffix(".json")
            try:
                out[tenant] = TenantQuota.model_validate_json(self._read(quota_key(tenant)))
            except (LoraplexError, ValueError):
                continue  # deleted meanwhile, an odd name, or damaged: no override
        return out

    def set_quota(self, tenant: str, quota: TenantQuota) -> None:
        self._write(quota_key(tenant), quota.model_dump_json(exclude_none=True).encode())

    def delete_quota(self, tenant: str) -> None:
        self._delete(quota_key(tenant))

    # -- helpers ----------------------------------------------------------------------------------
    def _adapter_root(self, tenant: str, name: str) -> str:
        return f"tenants/{validate_name(tenant, 'tenant')}/adapters/{validate_name(name, 'adapter name')}/"

    def _versions(self, tenant: str, name: str) -> list[int]:
        prefix = f"{self._adapter_root(tenant, name)}versions/"
        stems = (n.removesuffix(".json") for n in self._names(prefix))
        return sorted(int(s) for s in stems if s.isascii() and s.isdigit())

    def _next_version(self, tenant: str, name: str) -> int:
        """One past the newest version, deleted ones included (their tombstones)."""
        deleted = max(self._tombstones(self._adapter_root(tenant, name)), default=0)
        return max(self._latest_version(tenant, name), deleted) + 1

    def _latest_version(self, tenant: str, name: str) -> int:
        versions = self._versions(tenant, name)
        return versions[-1] if versions else 0

    def _alias_target(self, ref: AdapterRef) -> int:
        if ref.selector == LATEST:
            latest = self._latest_version(ref.tenant, ref.name)
            if not latest:
                raise NotFound(f"adapter {ref.tenant}/{ref.name} does not exist")
            return latest
        key = f"{self._adapter_root(ref.tenant, ref.name)}aliases/{ref.selector}.json"
        data = self._read_or(key, f"adapter {ref.tenant}/{ref.name} has no alias {ref.selector!r}")
        try:
            return int(json.loads(data)["version"])
        except (KeyError, ValueError, TypeError):
            raise IntegrityError(f"alias {ref} is damaged") from None

    def _manifest(self, tenant: str, name: str, version: int) -> AdapterManifest:
        data = self._read_or(
            f"{self._adapter_root(tenant, name)}versions/{int(version)}.json",
            f"adapter {tenant}/{name} has no version {version}",
        )
        try:
            manifest = AdapterManifest.model_validate_json(data)
        except Exception:
            raise IntegrityError(f"stored manifest of {tenant}/{name}@{version} is damaged") from None
        if (manifest.tenant, manifest.name, manifest.version) != (tenant, name, version):
            raise IntegrityError(f"stored manifest of {tenant}/{name}@{version} names another adapter")
        return manifest

    def _read_or(self, key: str, message: str) -> bytes:
        try:
            return self._read(key)
        except NotFound:
            raise NotFound(message) from None


__all__ = ["AdapterStore", "ObjectStore", "LoraplexError"]
