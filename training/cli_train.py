"""``loraplex train``: the click command, its options generated from :class:`TrainConfig`'s fields.

One source of truth: a new config field becomes an option with its description as help text.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import ValidationError as PydanticValidationError
from pydantic.fields import FieldInfo

from adapters_store.errors import LoraplexError
from training.cli_support import fail, setup_output
from training.config import TrainConfig
from training.errors import TrainConfigError
from training.targets import defaults_help
from training.threads import auto_threads

# Positional-ish essentials get short help of their own; everything else comes from the field description.
_SKIP = {"store"}


def _option_type(annotation: Any) -> tuple[Any, bool]:
    """(click type, is_list) for a field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _option_type(args[0])
    if origin is Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if origin is list:
        return str, True
    return {int: int, float: float, bool: bool, Path: click.Path(path_type=Path), str: str}.get(
        annotation, str
    ), False


# The command line reads every input from files, so these are required there (the Python API also
# takes in-memory data instead).
_REQUIRED_ON_CLI = {"train_file"}


def _field_option(name: str, field: FieldInfo) -> click.Option:
    ctype, is_list = _option_type(field.annotation)
    flag = "--" + name.replace("_", "-")
    help_text = field.description or ""
    if field.is_required() or name in _REQUIRED_ON_CLI:
        return click.Option([flag], type=ctype, required=True, help=help_text + " [required]")
    if name == "target_modules":
        help_text += f" (comma-separated; {defaults_help()})"
    if ctype is bool:
        return click.Option(
            [f"{flag}/--no-{flag[2:]}"],
            default=field.default,
            show_default=field.default is not None,
            help=help_text,
        )
    if is_list:
        return click.Option([flag], type=str, default=None, help=help_text)
    return click.Option(
        [flag], type=ctype, default=field.default, show_default=field.default is not None, help=help_text
    )


def _field_errors(e: PydanticValidationError) -> str:
    """pydantic's errors as the options the user typed: ``--epochs: Input should be ...``."""
    parts = []
    for err in e.errors():
        loc = err.get("loc") or ("",)
        flag = "--" + str(loc[0]).replace("_", "-") if loc[0] else "options"
        parts.append(f"{flag}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _run(store: str, **options: Any) -> None:
    from training.pipeline import train

    setup_output()
    values = {k: v for k, v in options.items() if v is not None}
    if isinstance(values.get("target_modules"), str):
        values["target_modules"] = [m.strip() for m in values["target_modules"].split(",") if m.strip()]
    try:
        try:
            config = TrainConfig(store=store, **values)
        except PydanticValidationError as e:
            raise TrainConfigError(_field_errors(e)) from None
        if config.num_threads is None:
            threads, why = auto_threads()
            config.num_threads = threads
            click.echo(f"torch threads: {threads} ({why}; --num-threads overrides)", err=True)
        manifest = train(config)
    except LoraplexError as e:
        fail(e)
    m = manifest.metrics
    click.echo(f"registered {manifest.tenant}/{manifest.name}@{manifest.version} (kind {manifest.kind})")
    click.echo(
        json.dumps({k: m.get(k) for k in ("accuracy", "macro_f1", "trainable_params", "train_time_s")})
    )


def _build() -> click.Command:
    from adapters_store.registry import DEFAULT_STORE_URL

    params = [
        click.Option(
            ["--store"],
            default=DEFAULT_STORE_URL,
            show_default=True,
            help="store folder or URL (s3://bucket/prefix); env LORAPLEX_STORE",
        )
    ]
    params += [_field_option(n, f) for n, f in TrainConfig.model_fields.items() if n not in _SKIP]
    return click.Command(
        "train",
        callback=_run,
        params=params,
        help="Train an adapter on a registered base and register it in the store.\n\n"
        "Required: --base, --tenant, --name, --train-file. Errors print 'error: <message> [<code>]' and "
        "exit with status 2.\n\n"
        "Example: loraplex train --base minilm --tenant acme --name intent --strategy lora "
        "--train-file intents.csv",
    )


train_command = _build()

if __name__ == "__main__":
    train_command()
