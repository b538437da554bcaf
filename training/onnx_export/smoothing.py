"""Activation rescaling of a BERT-family encoder before dynamic int8: the graph ORT quantizes computes the
same function in fp32, with activations whose per-tensor int8 range is no longer set by a few outliers.

ORT's dynamic int8 MatMul quantizes each activation with ONE (min, max) range per tensor. On MiniLM two
kinds of outlier set that range far above the typical value:

- a few input channels of Q/K/V, the attention output and the FFN up-projection. SmoothQuant (Xiao et
  al., 2023) divides input channel j by ``s_j = a_j**alpha / w_j**(1 - alpha)`` (a_j: the channel's
  calibration max, w_j: the weight column's max) and multiplies the weight's column by ``s_j``: the same
  product in fp32. BERT is post-LayerNorm, so a LayerNorm's output also feeds the residual and the scale
  cannot fold into it as in pre-LN models: Q/K/V share one scaled input (one Mul) and so does the FFN
  up-projection. The attention output's input is softmax @ V, so its scale folds into V's rows for free.
- one or two channels of the FFN down-projection's input, on the [CLS] token (layer 0 of MiniLM: 24.4
  against a median channel max of 1.2). Rescaling those moves the outlier into the weight, whose
  per-channel int8 then suffers instead; they are *split off*: zeroed in the up-projection (the
  activation maps 0 to 0, so they leave the int8 MatMul's range) and computed beside it in fp32 as
  rank-1 terms (two skinny MatMuls the quantizer is told to leave in fp32).

Measured on MiniLM (probe set, every weight MatMul int8): fake-int8 min cosine vs fp32 0.974 for
neither, 0.986 with rescaling alone; with both, as stored, ORT measured 0.9913 at the gate (docs/onnx.md).
The scales and the split channels are fitted on ``CALIBRATION_SENTENCES``, disjoint from the probe set
the int8 gate grades.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adapters_store.onnx_artifacts import SmoothingRecord
from training.onnx_export.quantize import FP32_SCOPE, fake_quantized, min_cosine, outputs_of
from training.onnx_export.validate import Feed

SITES = ("qkv", "attention_output", "intermediate")  # the rescaled inputs of each layer


@dataclass(frozen=True)
class SmoothingSettings:
    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    """SmoothQuant migration strengths tried (0: activations alone, 1: all of their range moved into
    the weights), one per kind of input in ``SITES``, chosen by the calibration texts' min cosine."""
    start: float = 0.5
    """The strength every kind starts from (SmoothQuant's default)."""
    outlier_ratio: float = 4.0
    """An FFN down-projection input channel is split off when its calibration max exceeds this many
    times the median channel max (MiniLM: 11-21x for the [CLS] channels, a few more at 4-6x)."""
    max_outliers: int = 4
    """At most this many split channels per layer (each costs a dot product over the hidden size)."""


class InputScaled(nn.Module):
    """``module(x * inv, ...)``: one Mul shared by every Linear inside ``module`` that reads x."""

    def __init__(self, module: nn.Module, inv: torch.Tensor):
        super().__init__()
        self.module = module
        self.register_buffer("inv", inv)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.module(hidden_states * self.inv, *args, **kwargs)


class FP32Channels(nn.Module):
    """``act(x @ w_up + b_up) @ w_down``: a few channels of an FFN, in fp32 beside its int8 MatMuls.
    Two skinny MatMuls (k = 1-4 columns) rather than broadcast products, which cost two full [tokens,
    k, hidden] passes per layer; the quantizer leaves MatMuls under this module's name in fp32
    (``quantize.FP32_SCOPE``)."""

    def __init__(self, w_up: torch.Tensor, b_up: torch.Tensor, act: nn.Module, w_down: torch.Tensor):
        super().__init__()
        self.register_buffer("w_up", w_up)  # [hidden, k]
        self.register_buffer("b_up", b_up)  # [k]
        self.register_buffer("w_down", w_down)  # [k, hidden]
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.act(torch.matmul(x, self.w_up) + self.b_up), self.w_down)


class SplitOutput(nn.Module):
    """BERT's FFN output block (dense, dropout, LayerNorm over the residual) with some input channels
    computed in fp32 from the block's residual input instead of through ``dense``."""

    def __init__(self, output: nn.Module, up: nn.Linear, act: nn.Module, channels: torch.Tensor):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = output.dense, output.dropout, output.LayerNorm
        with torch.no_grad():
            side = FP32Channels(
                up.weight[channels].t().contiguous(),  # [hidden, k]
                up.bias[channels].clone(),
                act,
                output.dense.weight[:, channels].t().contiguous(),  # [k, hidden]
            )
            self.register_buffer("channels", channels.clone())
            up.weight[channels] = 0  # act(0) = 0: the channel is exactly 0 in the dense path
            up.bias[channels] = 0
            output.dense.weight[:, channels] = 0
        setattr(self, FP32_SCOPE, side)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        out = self.dense(hidden_states) + getattr(self, FP32_SCOPE)(input_tensor)
        return self.LayerNorm(self.dropout(out) + input_tensor)


def smoothable(model: nn.Module) -> bool:
    """True for encoders laid out as BERT's (the modules this rewrite touches, with biases)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not layers:
        return False
    try:
        for layer in layers:
            att = layer.attention
            linears = [att.self.query, att.self.key, att.self.value, att.output.dense]
            linears += [layer.intermediate.dense, layer.output.dense]
            _ = layer.output.LayerNorm, layer.output.dropout, layer.intermediate.intermediate_act_fn
    except AttributeError:
        return False
    return all(isinstance(lin, nn.Linear) and lin.bias is not None for lin in linears)


def smoothed_copy(
    module: nn.Module, calibration: Sequence[Feed], settings: SmoothingSettings = SmoothingSettings()
) -> tuple[nn.Module, SmoothingRecord]:
    """A rewritten copy of ``module`` (a features wrapper whose ``.model`` is smoothable): equal in fp32,
    with flatter activations. ``module`` itself is left as it was (it stays the reference).

    The strength per kind of input is tuned by coordinate search from ``settings.start``: the copy
    whose fake-int8 run (every encoder MatMul, as ORT's dynamic int8) keeps the highest min cosine
    against ``module`` on the calibration texts wins. Measured on MiniLM, per-MatMul error minimising
    chose strengths that made the whole model worse, hence the end-to-end criterion."""
    if not smoothable(module.model):
        raise ValueError("smoothed_copy needs a BERT-layout encoder")
    maxima = _input_maxima(module, calibration)
    reference = outputs_of(module, calibration)

    def score(alphas: dict[str, float]) -> float:
        trial = _rewritten(module, maxima, alphas, settings)
        with fake_quantized([m for m in trial.model.encoder.modules() if isinstance(m, nn.Linear)]):
            return min_cosine(trial, calibration, reference)

    alphas = dict.fromkeys(SITES, settings.start)
    best = score(alphas)
    for site in SITES:
        for alpha in settings.alphas:
            if alpha != alphas[site]:
                trial = {**alphas, site: alpha}
                if (got := score(trial)) > best:
                    best, alphas = got, trial
    out = _rewritten(module, maxima, alphas, settings)
    split = {
        str(i): [int(c) for c in layer.output.channels]
        for i, layer in enumerate(out.model.encoder.layer)
        if isinstance(layer.output, SplitOutput)
    }
    rows = sum(int(f["input_ids"].shape[0]) for f in calibration)
    return out, SmoothingRecord(
        alphas=alphas,
        outlier_ratio=settings.outlier_ratio,
        split_channels=split,
        calibration_rows=rows,
        calibration_min_cosine=best,
    )


def _rewritten(
    module: nn.Module, maxima: dict[str, torch.Tensor], alphas: dict[str, float], settings: SmoothingSettings
) -> nn.Module:
    out = copy.deepcopy(module).eval()

    def scale(key: str, site: str, *linears: nn.Linear) -> torch.Tensor:
        alpha = alphas[site]
        w = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0).clamp_min(1e-5)
        return (maxima[key].clamp_min(1e-5) ** alpha / w ** (1 - alpha)).clamp_min(1e-5)

    with torch.no_grad():
        for i, layer in enumerate(out.model.encoder.layer):
            att, inter = layer.attention, layer.intermediate
            qkv = (att.self.query, att.self.key, att.self.value)
            s = scale(f"{i}.qkv", "qkv", *qkv)
            for lin in qkv:
                lin.weight.mul_(s)
            dense, value = att.output.dense, att.self.value
            s_ctx = scale(f"{i}.attention_output", "attention_output", dense)
            value.weight.div_(s_ctx[:, None])
            value.bias.div_(s_ctx)
            dense.weight.mul_(s_ctx)
            down = maxima[f"{i}.down"]
            channels = torch.nonzero(down > settings.outlier_ratio * down.median()).flatten()
            channels = channels[torch.argsort(down[channels], descending=True)][: settings.max_outliers]
            if len(channels) and float(inter.intermediate_act_fn(torch.zeros(1))) == 0.0:
                # split first: the side path reads the unscaled input, so it takes the unscaled rows
                channels = channels.sort().values
                layer.output = SplitOutput(layer.output, inter.dense, inter.intermediate_act_fn, channels)
            s_up = scale(f"{i}.intermediate", "intermediate", inter.dense)
            inter.dense.weight.mul_(s_up)
            att.self = InputScaled(att.self, 1 / s)
            layer.intermediate = InputScaled(inter, 1 / s_up)
    return out


def _input_maxima(module: nn.Module, calibration: Sequence[Feed]) -> dict[str, torch.Tensor]:
    """Each rescaled input's max |x| per channel over the calibration feeds' real tokens (padding would
    skew them), keyed 'layer.site' (and 'layer.down' for the FFN down-projection's input)."""
    keys: dict[nn.Module, str] = {}
    for i, layer in enumerate(module.model.encoder.layer):
        keys[layer.attention.self.query] = f"{i}.qkv"
        keys[layer.attention.output.dense] = f"{i}.attention_output"
        keys[layer.intermediate.dense] = f"{i}.intermediate"
        keys[layer.output.dense] = f"{i}.down"
    maxima: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []

    def hook(lin: nn.Module, args: tuple) -> None:
        x = args[0][mask[0]] if args[0].dim() == 3 else args[0]
        m = x.reshape(-1, x.shape[-1]).abs().amax(0)
        key = keys[lin]
        maxima[key] = torch.maximum(maxima[key], m) if key in maxima else m

    hooks = [lin.register_forward_pre_hook(hook) for lin in keys]
    try:
        with torch.no_grad():  # not inference_mode: these rewrite weights afterwards
            for feed in calibration:
                mask[:] = [torch.from_numpy(feed["attention_mask"]).bool()]
                module(*(torch.from_numpy(v) for v in feed.values()))
    finally:
        for h in hooks:
            h.remove()
    return maxima
