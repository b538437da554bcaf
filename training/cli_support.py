"""What every ``loraplex`` command shares: one error format and exit status, warnings, quiet libraries.

Kept apart from ``training/cli.py`` so sub-commands defined elsewhere (``train``, ``demo``) use the same
rules without importing the root group.
"""

from __future__ import annotations

import logging
import warnings
from typing import NoReturn

import click

from adapters_store.errors import LoraplexError
from adapters_store.registry import DEFAULT_STORE_URL

# The one --store option of every command that opens a store.
store_option = click.option(
    "--store",
    "store_url",
    default=DEFAULT_STORE_URL,
    show_default=True,
    envvar="LORAPLEX_STORE",
    help="Store URL: a folder, file://..., or s3://bucket/prefix.",
)

EXIT_ERROR = 2  # what click itself uses for a usage error: one status for every refused command


def fail(error: LoraplexError) -> NoReturn:
    """Print ``error: <message> [<code>]`` on stderr and exit with :data:`EXIT_ERROR`."""
    click.echo(f"error: {error.message} [{error.code}]", err=True)
    raise SystemExit(EXIT_ERROR)


def fail_click(error: click.ClickException) -> NoReturn:
    """Click's own errors (unknown option, missing argument...) in the same one-line form and status."""
    usage = isinstance(error, click.UsageError)
    ctx = getattr(error, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if usage and ctx is not None else ""
    code = "usage_error" if usage else "command_failed"
    click.echo(f"error: {error.format_message()}{hint} [{code}]", err=True)
    raise SystemExit(EXIT_ERROR)


class _WarningLine(logging.Handler):
    """``warning: <message>`` on stderr, resolved at emit time (so a test runner's stderr gets it)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"warning: {record.getMessage()}", err=True)


def setup_output() -> None:
    """Training's warnings as one line each; third-party FutureWarnings (deprecations inside
    transformers/peft the user cannot act on) silenced. Idempotent."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    log = logging.getLogger("training")
    if not any(isinstance(h, _WarningLine) for h in log.handlers):
        handler = _WarningLine(level=logging.WARNING)
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)
