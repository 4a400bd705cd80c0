"""Parameter, MAC, FLOP and latency counts for EGE-UNet variants.

Conventions (also printed in the header of ``egeunet complexity``):

* ``macs_g``: multiply-accumulates of convolutions only (Conv1d and Conv2d, bias not
  counted), per image. This is the thop convention behind the paper's "0.072 GFLOPs".
  Counted twice, by a forward-hook walk over the conv modules and by fvcore's conv
  handle; the two must agree.
* ``fvcore_default_g``: fvcore's ``FlopCountAnalysis`` total with its default handles
  (conv as MACs, GroupNorm, LayerNorm, bilinear upsampling; 0.0805 G for the default
  model, as on the authors' code: both write the channel LayerNorm out in elementwise
  ops, which fvcore skips by default).
* ``fvcore_full_g``: the same plus handles for the ops fvcore skips by default: one
  operation per output element for elementwise ops (add, sub, mul, div, pow, square,
  sqrt, rsqrt, sigmoid, GELU; two for addcmul), one per input element for reductions
  (mean) and max-pooling. ``uncounted_ops`` lists any op still without a handle.
* ``latency_ms_b1`` / ``latency_ms_b8``: median CPU wall time per image of an eval-mode
  forward pass under ``torch.inference_mode`` at batch 1 and 8, after warm-up, with
  ``threads`` torch threads.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from egeunet.model import (
    GHPA_BRANCHES,
    SIZE_MULTIPLE,
    EGEUNet,
    EGEUNetConfig,
    count_parameters,
    is_image_size,
)
from egeunet.report_format import markdown_table

PAPER_MACS_G = 0.072
PAPER_PARAMS = 53_374


def switch_variants() -> list[EGEUNetConfig]:
    """The 8 combinations of the ghpa, gab and deep_supervision switches, full model first."""
    return [
        EGEUNetConfig(ghpa=g, gab=b, deep_supervision=d)
        for g, b, d in itertools.product((True, False), repeat=3)
    ]


def branch_variants() -> list[EGEUNetConfig]:
    """The full model with one GHPA branch removed at a time (micro ablations)."""
    return [
        EGEUNetConfig(ghpa_branches=tuple(b for b in GHPA_BRANCHES if b != removed))
        for removed in GHPA_BRANCHES
    ]


def conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv1d/Conv2d call during ``model(x)``, per image.

    A conv producing ``N`` output elements from ``C_in / groups`` input channels with a
    kernel of ``K`` taps costs ``N * C_in / groups * K`` MACs (bias not counted).
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        taps = 1
        for k in module.kernel_size:
            taps *= k
        total += output.numel() * (module.in_channels // module.groups) * taps

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d))
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    # Conv1d layers in GHPA act on a batch-independent (1, C, L) tensor; everything else
    # scales with the batch. Callers pass a batch of one.
    return total // x.shape[0]


def _fvcore_nn():
    """``fvcore.nn``, imported without the FutureWarning its import raises on recent torch
    (its focal loss module calls ``torch.jit.script`` at import time): nothing a user of
    this module can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*torch\.jit\.script.*", FutureWarning)
        import fvcore.nn

    return fvcore.nn


def _numel(value) -> int:
    _fvcore_nn()
    from fvcore.nn.jit_handles import get_shape

    shape = get_shape(value)
    n = 1
    for s in shape or ():
        n *= s
    return n


def _per_output_element(inputs, outputs) -> int:
    return _numel(outputs[0])


def _per_input_element(inputs, outputs) -> int:
    return _numel(inputs[0])


def _two_per_output_element(inputs, outputs) -> int:
    return 2 * _numel(outputs[0])


EXTRA_FVCORE_HANDLES = {
    "aten::add": _per_output_element,
    "aten::add_": _per_output_element,
    "aten::sub": _per_output_element,
    "aten::mul": _per_output_element,
    "aten::mul_": _per_output_element,
    "aten::div": _per_output_element,
    "aten::pow": _per_output_element,
    "aten::square": _per_output_element,
    "aten::addcmul": _two_per_output_element,  # a * b + c
    "aten::sqrt": _per_output_element,
    "aten::rsqrt": _per_output_element,
    "aten::gelu": _per_output_element,
    "aten::sigmoid": _per_output_element,
    "aten::mean": _per_input_element,
    "aten::max_pool2d": _per_input_element,
}
"""Handles for the ops fvcore leaves uncounted by default (see the module docstring)."""


@dataclass(frozen=True)
class FvcoreCounts:
    default_total: int
    full_total: int
    conv: int
    uncounted_ops: tuple[str, ...]
    by_operator: dict[str, int]


def fvcore_counts(model: nn.Module, x: torch.Tensor) -> FvcoreCounts:
    """fvcore FLOP counts of ``model(x)`` per image, with default and with extra handles."""
    FlopCountAnalysis = _fvcore_nn().FlopCountAnalysis

    def analysis(extra: bool) -> FlopCountAnalysis:
        counter = FlopCountAnalysis(model, (x,))
        if extra:
            counter.set_op_handle(**EXTRA_FVCORE_HANDLES)
        counter.unsupported_ops_warnings(False)
        counter.uncalled_modules_warnings(False)
        return counter

    default = analysis(extra=False)
    full = analysis(extra=True)
    batch = x.shape[0]
    by_operator = {k: int(v) // batch for k, v in full.by_operator().items()}
    return FvcoreCounts(
        default_total=int(default.total()) // batch,
        full_total=int(full.total()) // batch,
        conv=by_operator.get("conv", 0),
        uncounted_ops=tuple(sorted(full.unsupported_ops())),
        by_operator=by_operator,
    )


def latency_ms_per_image(
    model: nn.Module, size: int, batch: int, warmup: int = 3, repeats: int = 10
) -> float:
    """Median wall time per image (ms) of an eval-mode forward pass on the CPU."""
    model = model.eval()
    x = torch.randn(batch, model.config.in_channels, size, size)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / batch


def complexity_row(
    config: EGEUNetConfig, size: int = 256, latency: bool = True, repeats: int = 10
) -> dict:
    """One table row for ``config`` at ``size`` x ``size``."""
    model = EGEUNet(config).eval()
    x = torch.zeros(1, config.in_channels, size, size)
    macs = conv_macs(model, x)
    fv = fvcore_counts(model, x)
    if fv.conv != macs:
        raise RuntimeError(f"conv MACs disagree for {config.name}: hooks {macs}, fvcore {fv.conv}")
    row = {
        "variant": config.name,
        "ghpa": config.ghpa,
        "gab": config.gab,
        "deep_supervision": config.deep_supervision,
        "ghpa_branches": ",".join(config.ghpa_branches) if config.ghpa else "",
        "params_total": count_parameters(model),
        "params_trainable": count_parameters(model, trainable_only=True),
        "macs_g": macs / 1e9,
        "fvcore_default_g": fv.default_total / 1e9,
        "fvcore_full_g": fv.full_total / 1e9,
        "uncounted_ops": ";".join(fv.uncounted_ops),
        "threads": torch.get_num_threads(),
    }
    if latency:
        row["latency_ms_b1"] = latency_ms_per_image(model, size, batch=1, repeats=repeats)
        row["latency_ms_b8"] = latency_ms_per_image(model, size, batch=8, repeats=repeats)
    return row


def complexity_table(
    size: int = 256,
    variants: Iterable[EGEUNetConfig] | None = None,
    latency: bool = True,
    repeats: int = 10,
    progress: bool = False,
):
    """A pandas DataFrame with one :func:`complexity_row` per variant (default: the 8
    switch combinations). ``progress``: a tqdm bar over the variants (a widget in
    JupyterLab, text in a terminal)."""
    import pandas as pd
    from tqdm.auto import tqdm

    variants = list(variants) if variants is not None else switch_variants()
    rows = []
    with tqdm(variants, desc="variants", unit="variant", disable=not progress) as bar:
        for variant in bar:
            bar.set_postfix_str(variant.name)
            rows.append(complexity_row(variant, size, latency, repeats))
    return pd.DataFrame(rows)


def paper_reported_complexity() -> dict:
    """What the paper reports for EGE-UNet (Ruan et al., MICCAI 2023, Table 1)."""
    return {"variant": "egeunet", "params_total": PAPER_PARAMS, "macs_g": PAPER_MACS_G}


def conventions_header(size: int) -> str:
    return (
        f"Complexity per image at {size}x{size} on the CPU. params: all parameters (trainable). "
        "macs_g: conv multiply-accumulates, bias excluded (thop convention; the paper's "
        "'GFLOPs'). fvcore_default_g: fvcore FlopCountAnalysis with default handles. "
        "fvcore_full_g: plus 1 op per output element for elementwise ops "
        "(add/sub/mul/div/pow/square/sqrt/rsqrt/sigmoid/GELU; 2 for addcmul) and 1 per input "
        "element for mean/max-pool; uncounted_ops: ops still without a handle. "
        "latency_ms_b1/b8: median ms per image (eval, inference_mode) at batch 1/8 after "
        "warm-up, with `threads` torch threads."
    )


def format_table(table, fmt: str, size: int) -> str:
    """Render ``table`` as markdown, csv or json (json keeps the header in ``conventions``)."""
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        import json

        return json.dumps(
            {
                "size": size,
                "conventions": conventions_header(size),
                "rows": table.to_dict("records"),
            },
            indent=2,
        )
    if fmt == "markdown":
        shown = table.copy()
        for column in ("macs_g", "fvcore_default_g", "fvcore_full_g"):
            shown[column] = shown[column].map(lambda v: f"{v:.4f}")
        for column in ("latency_ms_b1", "latency_ms_b8"):
            if column in shown:
                shown[column] = shown[column].map(lambda v: f"{v:.2f}")
        return f"{conventions_header(size)}\n\n{markdown_table(shown)}"
    raise ValueError(f"--format: expected markdown, csv or json, got {fmt!r}")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "complexity",
        help="parameters, MACs, fvcore FLOPs and CPU latency of every variant",
        description=conventions_header(256),
    )
    parser.add_argument(
        "--size", type=int, default=256, help="input height and width (multiple of 32)"
    )
    parser.add_argument("--format", choices=("markdown", "csv", "json"), default="markdown")
    parser.add_argument("--micro", action="store_true", help="also the GHPA-branch ablations")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed forward passes per batch size"
    )
    parser.add_argument("--output", help="also write the table to this file (atomically)")
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    if not is_image_size(args.size):
        raise ValueError(f"--size: must be a positive multiple of {SIZE_MULTIPLE}, got {args.size}")
    variants: Sequence[EGEUNetConfig] = switch_variants() + (
        branch_variants() if args.micro else []
    )
    table = complexity_table(args.size, variants, latency=not args.no_latency, repeats=args.repeats)
    text = format_table(table, args.format, args.size)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if args.output:
        from egeunet.fileio import write_text_atomic

        write_text_atomic(args.output, text)
    return 0
