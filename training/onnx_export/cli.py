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
@click.option(
    "--fusion",
    type=click.Choice(["auto", "fused", "plain"]),
    default="auto",
    show_default=True,
    help="ORT transformer fusions for the fp32 graph: 'auto' keeps the fused graph only if it measures "
    "faster at export; 'fused' or 'plain' force one (both are validated against PyTorch).",
)
@click.option(
    "--ia3-targets",
    default=None,
    help="With --lora-targets: IA3 modules the LoRA graph also takes (comma-separated, e.g. "
    "key,value,output.dense; 'none' for a LoRA-only graph). Default: training's IA3 targets for the "
    "architecture, so the IA3 adapters training makes are served by the graph.",
)
@click.option(
    "--ia3-feedforward",
    default=None,
    help="With --ia3-targets: which of them are feed-forward modules (IA3 scales their input, PEFT's "
    "rule); comma-separated, default none.",
)
@click.option("--force", is_flag=True, help="Re-export even if a validated artifact is stored.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored export manifest as JSON.")
def export_command(
    base_name,
    quantize,
    lora_targets,
    store_url,
    threads,
    exporter,
    fusion,
    ia3_targets,
    ia3_feedforward,
    force,
    as_json,
) -> None:
    """Export BASE's backbone + pooling to ONNX, validate it against PyTorch, store it under the base."""
    from adapters_store import open_store
    from training.onnx_export.export import ExportSettings, export_base
    from training.onnx_export.lora_graph import export_lora_base

    store = open_store(store_url)
    settings = ExportSettings(threads=threads, force=force, exporter=exporter, fusion=fusion)
    if lora_targets and quantize:
        raise click.UsageError("--lora-targets and --quantize are separate exports; run them one at a time")
    if (ia3_targets or ia3_feedforward) and not lora_targets:
        raise click.UsageError(
            "--ia3-targets and --ia3-feedforward shape the LoRA graph: give --lora-targets too"
        )
    if ia3_feedforward and not ia3_targets:
        raise click.UsageError("--ia3-feedforward names some of the --ia3-targets: give --ia3-targets too")
    if lora_targets:
        ia3 = None  # training's defaults for the architecture
        if ia3_targets is not None:
            names = [] if ia3_targets.strip() == "none" else _names(ia3_targets)
            feedforward = _names(ia3_feedforward or "")
            if not set(feedforward) <= set(names):
                raise click.UsageError(
                    f"--ia3-feedforward {','.join(feedforward)} must be among --ia3-targets"
                )
            ia3 = (names, feedforward)
        report = export_lora_base(
            store, base_name, targets=tuple(_names(lora_targets)), settings=settings, ia3=ia3
        )
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
    if m.graph_optimization is not None:
        g = m.graph_optimization
        click.echo(f"  graph: {g.kept} ({g.reason})")
    if m.lora is not None:
        ia3 = ", ".join(
            [*(f"{t} (input)" for t in m.lora.ia3_in), *(f"{t} (output)" for t in m.lora.ia3_out)]
        )
        click.echo(f"  LoRA on {', '.join(m.lora.targets)}; IA3 on {ia3 or 'none'}")
    if m.quantization is not None:
        tried = ", ".join(
            f"{a.plan} {a.min_cosine:.4f}{'' if a.accepted else ' (refused)'}"
            for a in m.quantization.attempts
        )
        click.echo(f"  int8 plan {m.quantization.plan!r}; tried: {tried}")
    for extra in report.also_stored:
        click.echo(f"  also stored the {extra} graph")


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]
