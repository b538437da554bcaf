"""``loraplex onnx export``: the click group the lead mounts in training/cli.py (``main.add_command``)."""

from __future__ import annotations

import json

import click

from training.cli_support import store_option


@click.group("onnx")
def onnx_group() -> None:
    """ONNX exports of registered bases (served with runtime 'onnx')."""


@onnx_group.command("export")
@click.option("--base", "base_name", required=True, help="Registered base model name.")
@click.option(
    "--quantize", type=click.Choice(["int8"]), default=None, help="Also build an int8 graph (gated)."
)
@click.option(
    "--lora-targets",
    default=None,
    help="Build the LoRA graph instead, for these comma-separated targets (e.g. query,value).",
)
@store_option
@click.option(
    "--threads", default=2, show_default=True, type=click.IntRange(1, 64), help="Threads while validating."
)
@click.option(
    "--exporter",
    type=click.Choice(["legacy", "dynamo"]),
    default="legacy",
    show_default=True,
    help="torch.onnx exporter for the plain graph (the LoRA graph always uses legacy).",
)
@click.option("--force", is_flag=True, help="Re-export even if a validated artifact is stored.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored export manifest as JSON.")
def export_command(base_name, quantize, lora_targets, store_url, threads, exporter, force, as_json) -> None:
    """Export BASE's backbone + pooling to ONNX, validate it against PyTorch, store it under the base."""
    from adapters_store import open_store
    from training.onnx_export.export import ExportSettings, export_base
    from training.onnx_export.lora_graph import export_lora_base

    store = open_store(store_url)
    settings = ExportSettings(threads=threads, force=force, exporter=exporter)
    if lora_targets and quantize:
        raise click.UsageError("--lora-targets and --quantize are separate exports; run them one at a time")
    if lora_targets:
        targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
        report = export_lora_base(store, base_name, targets=targets, settings=settings)
    else:
        report = export_base(store, base_name, quantize=quantize, settings=settings)
    m = report.manifest
    if as_json:
        click.echo(json.dumps(m.model_dump(mode="json"), indent=2))
        return
    state = (
        "already stored (use --force to rebuild)" if report.reused else f"stored in {report.seconds:.1f} s"
    )
    click.echo(f"{m.base} {m.variant}: {m.graph_file} {m.size / 2**20:.1f} MiB, {state}")
    click.echo(
        f"  validated vs {m.validated_against}: max abs diff {m.validation.max_abs_diff:.2e} "
        f"(scaled {m.validation.max_scaled_diff:.2e}), "
        f"min cosine {m.validation.min_cosine:.6f} over {len(m.validation.shapes)} probe batches"
    )
    if m.quantization is not None:
        tried = ", ".join(
            f"{a.plan} {a.min_cosine:.4f}{'' if a.accepted else ' (refused)'}"
            for a in m.quantization.attempts
        )
        click.echo(f"  int8 plan {m.quantization.plan!r}; tried: {tried}")
    for extra in report.also_stored:
        click.echo(f"  also stored the {extra} graph")
