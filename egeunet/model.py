"""EGE-UNet: an Efficient Group Enhanced U-Net (Ruan et al., MICCAI 2023), in one file.

The network is built from a frozen :class:`EGEUNetConfig`. Three switches turn the
paper's contributions on and off for ablations:

* ``ghpa``: Group multi-axis Hadamard Product Attention. Off: encoder stages 4-6 and
  decoder blocks 1-3 become plain 3x3 convolutions like encoder stages 1-3.
* ``gab``: Group Aggregation Bridge on every skip. Off: each skip adds the saved encoder
  feature to the decoder output directly.
* ``deep_supervision``: side outputs at the five decoder levels. Off: there are no side
  outputs, and the GAB fuses its two features without the mask channel.

All three off gives the plain U-Net baseline of the same widths.

Forward contract (see :meth:`EGEUNet.forward`): input ``(B, C_in, H, W)`` with ``H`` and
``W`` multiples of 32; output a tuple of logits (no sigmoid), the final map
``(B, K, H, W)`` first, then, with deep supervision, five side maps ``(B, K, H, W)``
ordered deepest level (H/32) first.

:func:`convert_official_state_dict` maps the authors' published checkpoint layout
(github.com/JCruan519/EGE-UNet, commit f52ba30) onto these modules.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GHPA_BRANCHES = ("hw", "ch", "cw", "dw")
"""GHPA's four channel-group branches: spatial H-W, channel-H, channel-W, depthwise."""

NUM_LEVELS = 5
"""Down-sampling steps of the encoder; inputs must be multiples of 2**NUM_LEVELS."""

SIZE_MULTIPLE = 2**NUM_LEVELS


def is_image_size(size: object) -> bool:
    """Whether ``size`` is a side EGE-UNet takes: a positive multiple of SIZE_MULTIPLE (32)."""
    return (
        isinstance(size, int)
        and not isinstance(size, bool)
        and size > 0
        and not size % SIZE_MULTIPLE
    )


@dataclass(frozen=True)
class EGEUNetConfig:
    """Everything that defines an EGE-UNet variant.

    Attributes:
        widths: channels of the six encoder stages (the decoder mirrors them). Each must
            be a positive multiple of 4 (GHPA and GAB split channels into 4 groups, and
            GroupNorm uses 4 groups).
        in_channels: channels of the input image.
        num_classes: channels of the final map (and of each side map).
        ghpa: GHPA blocks in encoder stages 4-6 and decoder blocks 1-3.
        gab: Group Aggregation Bridges on the skips.
        deep_supervision: side outputs at the five decoder levels (fed to the GABs).
        ghpa_branches: which GHPA branches are active; an inactive branch passes its
            channel group through unchanged.
        gab_dilations: dilation of the depthwise conv of each of GAB's four groups.
    """

    widths: tuple[int, ...] = (8, 16, 24, 32, 48, 64)
    in_channels: int = 3
    num_classes: int = 1
    ghpa: bool = True
    gab: bool = True
    deep_supervision: bool = True
    ghpa_branches: tuple[str, ...] = GHPA_BRANCHES
    gab_dilations: tuple[int, ...] = (1, 2, 5, 7)

    def __post_init__(self) -> None:
        # Accept lists (from JSON or YAML) but store tuples so the config stays hashable.
        for name in ("widths", "ghpa_branches", "gab_dilations"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.widths) != NUM_LEVELS + 1:
            raise ValueError(
                f"widths: expected {NUM_LEVELS + 1} channel widths, got {len(self.widths)}"
            )
        for width in self.widths:
            if not isinstance(width, int) or width <= 0 or width % 4:
                raise ValueError(
                    f"widths: every width must be a positive multiple of 4, got {width!r}"
                )
        if self.in_channels < 1:
            raise ValueError(f"in_channels: must be at least 1, got {self.in_channels}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes: must be at least 1, got {self.num_classes}")
        unknown = [b for b in self.ghpa_branches if b not in GHPA_BRANCHES]
        if unknown:
            raise ValueError(
                f"ghpa_branches: unknown branch {unknown[0]!r}; choose from {GHPA_BRANCHES}"
            )
        if len(set(self.ghpa_branches)) != len(self.ghpa_branches):
            raise ValueError(f"ghpa_branches: repeated branch in {self.ghpa_branches}")
        if len(self.gab_dilations) != 4 or any(
            not isinstance(d, int) or d < 1 for d in self.gab_dilations
        ):
            raise ValueError(
                f"gab_dilations: expected 4 positive integers, got {self.gab_dilations}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def name(self) -> str:
        """Short variant name, e.g. ``egeunet`` or ``unet+ghpa``."""
        if self.ghpa and self.gab and self.deep_supervision:
            base = "egeunet"
        else:
            parts = [
                s
                for s, on in (("ghpa", self.ghpa), ("gab", self.gab), ("ds", self.deep_supervision))
                if on
            ]
            base = "+".join(["unet", *parts])
        if self.ghpa and self.ghpa_branches != GHPA_BRANCHES:
            base += "[" + ",".join(self.ghpa_branches) + "]"
        if self.gab and self.gab_dilations != (1, 2, 5, 7):
            base += "[d=" + ",".join(map(str, self.gab_dilations)) + "]"
        return base


def _channel_layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The published formula over dim 1 of ``(B, C, H, W)``, in at least float32.

    Returns the output (in ``x``'s dtype), the normalised input ``(B, C, H, W)`` and the
    reciprocal standard deviation ``(B, 1, H, W)``, the last two kept for the backward.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)  # float16/bfloat16 -> float32
    x32 = x.to(dtype)
    mean = x32.mean(1, keepdim=True)
    centred = x32 - mean
    rstd = (centred.square().mean(1, keepdim=True) + eps).rsqrt()
    normalised = centred * rstd
    out = torch.addcmul(
        bias.to(dtype).view(1, -1, 1, 1), normalised, weight.to(dtype).view(1, -1, 1, 1)
    )
    return out.to(x.dtype), normalised, rstd


def _channel_layer_norm_output(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """:func:`_channel_layer_norm`'s output alone (inference: nothing kept for a backward)."""
    return _channel_layer_norm(x, weight, bias, eps)[0]


def refuse_higher_order_gradients(what: str) -> None:
    """Raise inside a closed-form backward asked to build a graph (``create_graph=True``).

    Such a backward is correct to first order only; ``once_differentiable`` would not do:
    ``torch.autograd.grad`` can silently drop its path and return a wrong second
    derivative instead of raising.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what} has a closed-form backward that gives first-order gradients only; "
            "higher-order gradients (create_graph=True) are not supported"
        )


def _channel_layer_norm_backward(
    grad: Tensor, normalised: Tensor, rstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form gradients of :func:`_channel_layer_norm` (see :class:`_ChannelLayerNormFunction`)."""
    grad = grad.to(normalised.dtype)
    scaled = grad * weight.to(normalised.dtype).view(1, -1, 1, 1)
    grad_x = (
        scaled
        - scaled.mean(1, keepdim=True)
        - normalised * (scaled * normalised).mean(1, keepdim=True)
    ) * rstd
    grad_weight = (grad * normalised).sum((0, 2, 3)).to(weight.dtype)
    grad_bias = grad.sum((0, 2, 3)).to(weight.dtype)
    return grad_x, grad_weight, grad_bias


class FusedKernels:
    """Chains of elementwise passes and reductions compiled into fused loops (inductor).

    The channel LayerNorm's forward and backward (five to eight passes each; for GAB's
    5-13 channels the channel reductions vectorise poorly in eager mode) and the training
    loss's sums and input gradient (:mod:`egeunet.losses`, six full-resolution maps per
    step): in eager mode every pass reads and writes the whole tensor. Each module-level
    function handed to :meth:`run` is compiled with ``torch.compile(dynamic=True)`` on first
    use (a few seconds per process, cached on disk by inductor); batch and spatial sizes
    stay symbolic, but dynamo compiles a variant per channel count (a Parameter's shape is
    static), per thread count and for batch size 1. Same formulas, float rounding aside
    (sums differ from eager in about the sixth digit); the float32 gradient and evaluation
    tests compare both paths, the float64 ones check the plain ops.

    The LayerNorm runs them in training and in the trainer's evaluation passes (forward
    only: 12-20% faster evaluation); tracing (fvcore) and ONNX export use the plain ops.
    Off by default in a library process (``egeunet predict``, ``egeunet evaluate`` and the
    app do not wait for compilation); the trainer turns them on, and
    ``EGEUNET_FUSED_KERNELS=0`` keeps them off everywhere. If compiling fails (no C++
    compiler, an unsupported platform), a warning says why once and the plain ops are used
    from then on; an error the plain ops raise too (bad inputs, out of memory) is raised as
    theirs and leaves the kernels on.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.failed: str | None = None
        self._compiled: dict[Callable, Callable] = {}

    def enable(self, enabled: bool = True) -> bool:
        """Switch the fused kernels on or off; returns whether they are now in use."""
        allowed = os.environ.get("EGEUNET_FUSED_KERNELS", "1") != "0"
        self.enabled = bool(enabled) and allowed and self.failed is None
        if self.enabled:
            # Variants per function: the model's channel counts (14 for the default widths,
            # up to ~30 with the ablations), times the thread counts the adaptive threads
            # use, times batch size 1 or more. Past the limits dynamo silently runs a
            # function eagerly, so they are sized for every core count this machine allows.
            variants = 32 * 2 * max(2, os.cpu_count() or 2)
            dynamo_config = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, variants)
            dynamo_config.accumulated_recompile_limit = max(
                dynamo_config.accumulated_recompile_limit, 8 * variants
            )
            # Inductor's CPU build says "No CUDA runtime is found" on every compile of a
            # CUDA build of torch on a machine without a GPU: nothing a user can act on.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        return self.enabled

    def run(self, plain: Callable, *args):
        """``plain(*args)`` (a module-level function: the cache is keyed by it), through its
        compiled kernel while the kernels are enabled."""
        if not self.enabled:
            return plain(*args)
        compiled = self._compiled.get(plain)
        if compiled is None:
            compiled = self._compiled[plain] = torch.compile(plain, dynamic=True)
        try:
            return compiled(*args)
        except Exception as error:
            compiler_error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        result = plain(*args)  # raises by itself if the inputs were at fault: kernels stay on
        self.failed, self.enabled = compiler_error, False
        warnings.warn(
            f"fused kernels unavailable ({compiler_error}); using plain PyTorch ops "
            "(same results, slower training)",
            RuntimeWarning,
            stacklevel=2,
        )
        return result

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor, eps: float):
        """The channel LayerNorm's forward (:func:`_channel_layer_norm`)."""
        return self.run(_channel_layer_norm, x, weight, bias, eps)

    def backward(self, grad: Tensor, normalised: Tensor, rstd: Tensor, weight: Tensor):
        """The channel LayerNorm's closed-form backward."""
        return self.run(_channel_layer_norm_backward, grad, normalised, rstd, weight)

    def output(self, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        """The channel LayerNorm's output without autograd (evaluation)."""
        return self.run(_channel_layer_norm_output, x, weight, bias, eps)


fused_kernels = FusedKernels()
"""The process-wide switch for :class:`FusedKernels` (``fused_kernels.enable()``)."""


class _ChannelLayerNormFunction(torch.autograd.Function):
    """The channel LayerNorm with a hand-written backward.

    On CPU, for the 5-13 channels of GAB's groups at high resolution, both alternatives are
    slower. Forward + backward at ``(8, 5, 128, 128)`` in channels-last layout, 2 threads,
    idle machine: the fused ``layer_norm`` kernel ~19 ms, autograd through the written-out
    formula ~6 ms, this ~4.6 ms (with the fused kernel, LayerNorm backward was a third of
    the training step's CPU time); compiled by :class:`FusedKernels`, about 3x less again.
    In closed form, with ``n`` the normalised input, ``r`` the reciprocal std and
    ``g = grad * weight``: ``dx = r * (g - mean_C(g) - n * mean_C(g * n))``,
    ``dweight = sum(grad * n)``, ``dbias = sum(grad)`` over batch and pixels.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        out, normalised, rstd = fused_kernels.forward(x, weight, bias, eps)
        ctx.save_for_backward(normalised, rstd, weight)
        ctx.input_dtype = x.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        refuse_higher_order_gradients("the channel LayerNorm")
        normalised, rstd, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = fused_kernels.backward(grad, normalised, rstd, weight)
        return grad_x.to(ctx.input_dtype), grad_weight, grad_bias, None


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a ``(B, C, H, W)`` tensor, at every pixel.

    The published formula: ``(x - mean) / sqrt(var + eps) * weight + bias``, with mean and
    biased variance over ``C``, computed in at least float32 (as autocast does for
    LayerNorm). When gradients are needed it runs as :class:`_ChannelLayerNormFunction`
    (same forward, a closed-form backward); without gradients through
    :meth:`FusedKernels.output` (compiled while the fused kernels are on, else plain tensor
    ops); under tracing (fvcore), as plain tensor ops.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():  # fvcore's counting: the plain ops
            return _channel_layer_norm_output(x, self.weight, self.bias, self.eps)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.weight.requires_grad or self.bias.requires_grad
        )
        if needs_grad:
            return _ChannelLayerNormFunction.apply(x, self.weight, self.bias, self.eps)
        return fused_kernels.output(x, self.weight, self.bias, self.eps)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` computed in NCHW layout, returned in the input's layout.

    ATen's channels-last GroupNorm kernel on CPU loses float32 precision when the mean is
    large against the spread (as after the first conv on 0..255 inputs): at
    ``(8, 8, 256, 256)`` its output is off by ~4e-3 and its input gradient by ~8e-4
    (relative), against ~2e-6 and ~2e-7 for the NCHW kernel, which is no slower end to end.

    Under ONNX export it is written out as :func:`_group_norm_by_rows` instead: exported
    as one reduction over every pixel of a group, it loses the same precision in ONNX
    Runtime, growing with the image (final probabilities off by ~7e-3 at 256x256).
    """

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return _group_norm_by_rows(x, self.num_groups, self.weight, self.bias, self.eps)
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        out = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _group_norm_by_rows(
    x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float
) -> Tensor:
    """``F.group_norm`` of ``(B, C, H, W)`` with its means taken row by row: over W, then
    H, then the group's channels (the same values, as every row has W pixels). Each
    reduction sums at most max(H, W, C) numbers, so a runtime that accumulates naively in
    float32 stays as precise as ATen; the variance is the mean square of the centred input
    (two passes), not E[x^2] - E[x]^2."""
    batch, channels, height, width = x.shape
    groups = x.reshape(batch, num_groups, channels // num_groups, height, width)

    def mean(t: Tensor) -> Tensor:
        return t.mean(4, keepdim=True).mean(3, keepdim=True).mean(2, keepdim=True)

    centred = groups - mean(groups)
    normalised = centred * torch.rsqrt(mean(centred.square()) + eps)
    return normalised.reshape(batch, channels, height, width) * weight.view(
        1, -1, 1, 1
    ) + bias.view(1, -1, 1, 1)


def _resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


@functools.lru_cache(maxsize=32)
def _interpolation_matrix(source: int, target: int) -> Tensor:
    """``(target, source)`` float64 weights of 1-D linear interpolation with aligned corners:
    row ``i`` samples position ``i * (source - 1) / (target - 1)``, two weights per row."""
    # Cached for the process: a plain CPU tensor, whatever mode or default device the
    # first caller had (an inference tensor could not be saved for a later backward).
    with torch.inference_mode(False):
        if source == 1:
            return torch.ones(target, 1, dtype=torch.float64, device="cpu")
        step = (source - 1) / (target - 1) if target > 1 else 0.0
        position = torch.arange(target, dtype=torch.float64, device="cpu") * step
        left = position.floor().long().clamp(max=source - 2)
        right_weight = position - left
        rows = torch.arange(target, device="cpu")
        matrix = torch.zeros(target, source, dtype=torch.float64, device="cpu")
        matrix[rows, left] = 1 - right_weight
        matrix[rows, left + 1] += right_weight
        return matrix


def _upsample_side_map(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A side map ``(B, K, h, w)`` resized bilinearly (aligned corners) to ``size``.

    On CPU, from a map at most a quarter of the target's height and width, as two small
    matrix products ``R @ mask @ C.T`` with the separable interpolation weights: the same
    function as ``F.interpolate`` (up to float rounding; its weights are even exact to
    float64 before the cast), and forward + backward several times faster there, where
    ATen's backward scatters every one of the ``H x W`` output gradients (measured at
    batch 8 to 256x256, 1 thread: 0.5-1.7 ms against 3.8 ms from 8x8 to 64x64). Under
    tracing or ONNX export (which keep the spatial size dynamic), under CPU autocast (which
    would run the products in bfloat16) and on other devices it is ``F.interpolate`` itself.
    """
    (height, width), (source_height, source_width) = size, mask.shape[2:]
    small = 4 * source_height <= height and 4 * source_width <= width
    if (
        not small
        or mask.device.type != "cpu"
        or torch.is_autocast_enabled("cpu")  # matrix products would run in bfloat16
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    ):
        return _resize(mask, size)
    dtype = torch.promote_types(mask.dtype, torch.float32)
    rows = _interpolation_matrix(source_height, height).to(dtype)
    columns = _interpolation_matrix(source_width, width).to(dtype)
    return (rows @ mask.to(dtype) @ columns.T).to(mask.dtype)  # (B, K, H, W)


class SpatialAttention(nn.Module):
    """GHPA's H-W branch: a learnable (C, 8, 8) map resized to (H, W), refined, multiplied in."""

    def __init__(self, channels: int, grid: int = 8) -> None:
        super().__init__()
        self.param = nn.Parameter(torch.ones(1, channels, grid, grid))
        self.refine = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
            nn.GELU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return x * self.refine(_resize(self.param, x.shape[2:]))


class AxisAttention(nn.Module):
    """GHPA's channel-H (``axis=2``) or channel-W (``axis=3``) branch.

    A learnable (C, 8) map is resized to (C, L) with L the size of that axis, refined by
    Conv1d layers with the C rows as channels, and multiplied in, broadcast over the batch
    and the other spatial axis.
    """

    def __init__(self, channels: int, axis: int, grid: int = 8) -> None:
        super().__init__()
        if axis not in (2, 3):
            raise ValueError(f"axis: must be 2 (H) or 3 (W), got {axis}")
        self.axis = axis
        self.param = nn.Parameter(torch.ones(1, 1, channels, grid))
        self.refine = nn.Sequential(
            nn.Conv1d(channels, channels, 3, padding=1, groups=channels),
            nn.GELU(),
            nn.Conv1d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        channels, length = x.shape[1], x.shape[self.axis]
        weights = self.refine(_resize(self.param, (channels, length))[0])  # (1, C, L)
        if self.axis == 2:
            return x * weights[..., :, None]  # (1, C, H, 1)
        return x * weights[..., None, :]  # (1, C, 1, W)


class DepthwiseBranch(nn.Module):
    """GHPA's fourth branch: 1x1 conv -> GELU -> depthwise 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 1),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class GHPA(nn.Module):
    """Group multi-axis Hadamard Product Attention block, ``(B, C_in, H, W) -> (B, C_out, H, W)``.

    LayerNorm, split channels into four groups, one attention branch per group (inactive
    branches pass their group through), concatenate, LayerNorm, depthwise 3x3 -> GELU ->
    1x1 conv to ``C_out``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, branches: tuple[str, ...] = GHPA_BRANCHES
    ) -> None:
        super().__init__()
        group = in_channels // 4
        self.norm_in = ChannelLayerNorm(in_channels)
        makers = {
            "hw": lambda: SpatialAttention(group),
            "ch": lambda: AxisAttention(group, axis=2),
            "cw": lambda: AxisAttention(group, axis=3),
            "dw": lambda: DepthwiseBranch(group),
        }
        self.branches = nn.ModuleList(
            makers[name]() if name in branches else nn.Identity() for name in GHPA_BRANCHES
        )
        self.norm_out = ChannelLayerNorm(in_channels)
        self.project = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels),
            nn.GELU(),
            nn.Conv2d(in_channels, out_channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        groups = torch.chunk(self.norm_in(x), 4, dim=1)  # 4 x (B, C_in/4, H, W)
        x = torch.cat([branch(g) for branch, g in zip(self.branches, groups, strict=True)], dim=1)
        return self.project(self.norm_out(x))


class GAB(nn.Module):
    """Group Aggregation Bridge: fuses a deeper feature, the skip feature and a side mask.

    ``forward(x_high (B, C_high, h, w), x_low (B, C, H, W), mask (B, M, H, W) or None)``
    returns ``(B, C, H, W)``. ``x_high`` is projected to ``C`` channels and resized to
    ``(H, W)``; both are split into four groups; group ``g`` is
    ``[x_high_g, x_low_g, mask]`` -> LayerNorm -> depthwise 3x3 conv with dilation
    ``dilations[g]``; the four results are concatenated -> LayerNorm -> 1x1 conv to ``C``.
    """

    def __init__(
        self,
        high_channels: int,
        channels: int,
        mask_channels: int,
        dilations: tuple[int, ...] = (1, 2, 5, 7),
    ) -> None:
        super().__init__()
        self.mask_channels = mask_channels
        self.project_high = nn.Conv2d(high_channels, channels, 1)
        group = channels // 2 + mask_channels
        self.groups = nn.ModuleList(
            nn.Sequential(
                ChannelLayerNorm(group),
                nn.Conv2d(group, group, 3, padding=d, dilation=d, groups=group),
            )
            for d in dilations
        )
        self.fuse = nn.Sequential(ChannelLayerNorm(4 * group), nn.Conv2d(4 * group, channels, 1))

    def forward(self, x_high: Tensor, x_low: Tensor, mask: Tensor | None) -> Tensor:
        if (mask is None) != (self.mask_channels == 0):
            raise ValueError(
                f"GAB built for {self.mask_channels} mask channels got mask={mask is not None}"
            )
        x_high = _resize(self.project_high(x_high), x_low.shape[2:])
        extra = [] if mask is None else [mask]
        parts = [
            block(torch.cat([h, low, *extra], dim=1))
            for block, h, low in zip(
                self.groups,
                torch.chunk(x_high, 4, dim=1),
                torch.chunk(x_low, 4, dim=1),
                strict=True,
            )
        ]
        return self.fuse(torch.cat(parts, dim=1))


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class EGEUNet(nn.Module):
    """EGE-UNet and its ablation variants (see the module docstring for the switches)."""

    def __init__(self, config: EGEUNetConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None:
            config = EGEUNetConfig(**overrides)
        elif overrides:
            config = EGEUNetConfig(**{**config.to_dict(), **overrides})
        self.config = config
        c = config.widths
        k = config.num_classes

        def block(i: int, o: int, deep: bool) -> nn.Module:
            return GHPA(i, o, config.ghpa_branches) if (deep and config.ghpa) else _conv3x3(i, o)

        # Encoder: stages 1-3 plain convs, 4-6 GHPA. Stages 1-5 are followed by
        # GroupNorm -> max-pool -> GELU; stage 6 by GELU only (stays at H/32).
        self.encoder = nn.ModuleList(
            [_conv3x3(config.in_channels, c[0])]
            + [block(i, o, deep=n >= 2) for n, (i, o) in enumerate(itertools.pairwise(c))]
        )
        self.encoder_norms = nn.ModuleList(GroupNorm(4, ch) for ch in c[:-1])
        # Decoder, deepest first: blocks 1-3 GHPA (c5->c4, c4->c3, c3->c2), 4-5 plain convs.
        # Each is followed by GroupNorm -> (blocks 2-5) bilinear x2 -> GELU.
        rev = c[::-1]
        self.decoder = nn.ModuleList(
            block(i, o, deep=n < 3) for n, (i, o) in enumerate(itertools.pairwise(rev))
        )
        self.decoder_norms = nn.ModuleList(GroupNorm(4, ch) for ch in rev[1:])
        # Side heads and bridges, deepest level (H/32) first.
        self.side_heads = (
            nn.ModuleList(nn.Conv2d(ch, k, 1) for ch in rev[1:])
            if config.deep_supervision
            else None
        )
        mask_channels = k if config.deep_supervision else 0
        self.bridges = (
            nn.ModuleList(
                GAB(high, low, mask_channels, config.gab_dilations)
                for high, low in itertools.pairwise(rev)
            )
            if config.gab
            else None
        )
        self.head = nn.Conv2d(c[0], k, 1)
        self.reset_parameters()
        # Channels-last weights and activations (see forward): oneDNN runs the depthwise
        # and 3-channel convolutions faster in this layout (about 40% less convolution time,
        # ~20% faster CPU training). Same function; state_dicts are unaffected.
        # model.to(memory_format=torch.contiguous_format) switches back to NCHW.
        self.to(memory_format=torch.channels_last)

    @property
    def channels_last(self) -> bool:
        """Whether the model runs in channels-last layout (set by its weights)."""
        # Stage 2's (c1, c0, 3, 3) weight: its two layouts differ for any widths (the
        # first conv's are the same when in_channels is 1).
        return self.encoder[1].weight.is_contiguous(memory_format=torch.channels_last)

    def reset_parameters(self) -> None:
        """The published initialisation: conv weights ~ N(0, sqrt(2 / fan_out)), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv1d):
                fan_out = m.kernel_size[0] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)

    def _records_gradients(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Segment a batch.

        Args:
            x: ``(B, in_channels, H, W)`` with ``H`` and ``W`` multiples of 32. The
                published recipe feeds per-image min-max scaled values in 0..255.

        Returns:
            Logits (apply a sigmoid for probabilities): ``(final,)`` without deep
            supervision, else ``(final, side_1, ..., side_5)``. Every map is
            ``(B, num_classes, H, W)``; side maps are ordered deepest level first (H/32,
            H/16, H/8, H/4, H/2), each resized bilinearly to ``(H, W)``.
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"input: expected shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        height, width = x.shape[2:]
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ValueError(
                f"input: height and width must be multiples of {SIZE_MULTIPLE}, got {height}x{width}"
            )

        if self.channels_last:
            if x.device.type == "cpu" and _cpu_bfloat16_autocast() and self._records_gradients(x):
                raise RuntimeError(
                    "training under CPU bfloat16 autocast crashes in oneDNN's channels-last "
                    "dilated depthwise convolution backward (GAB); call "
                    "model.to(memory_format=torch.contiguous_format) first"
                )
            x = x.contiguous(memory_format=torch.channels_last)
        skips = []  # encoder features at H/2 .. H/32, after their GELU
        for stage, norm in zip(self.encoder[:-1], self.encoder_norms, strict=True):
            x = F.gelu(F.max_pool2d(norm(stage(x)), 2))
            skips.append(x)
        x_high = F.gelu(self.encoder[-1](x))  # (B, c6, H/32, W/32)

        x = x_high
        sides = []
        for level, (block, norm) in enumerate(zip(self.decoder, self.decoder_norms, strict=True)):
            x = norm(block(x))
            if level > 0:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
            x = F.gelu(x)  # (B, c[5-level-1], H / 2**(5-level), ...)
            skip = skips[-1 - level]
            mask = self.side_heads[level](x) if self.side_heads is not None else None
            if self.bridges is not None:
                skip = self.bridges[level](x_high, skip, mask)
                x_high = skip
            x = x + skip
            if mask is not None:
                sides.append(_upsample_side_map(mask, (height, width)))

        final = F.interpolate(self.head(x), scale_factor=2.0, mode="bilinear", align_corners=True)
        # Standard (NCHW-contiguous) outputs whatever the layout inside; free for 1 class.
        return tuple(out.contiguous() for out in (final, *sides))


def _cpu_bfloat16_autocast() -> bool:  # checked first: cheap, and almost always False
    return torch.is_autocast_enabled("cpu") and (torch.get_autocast_dtype("cpu") == torch.bfloat16)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- The authors' checkpoint layout ----------------------------------------------------

_OFFICIAL_GHPA = {
    "norm1": "norm_in",
    "norm2": "norm_out",
    "ldw": "project",
    "params_xy": "branches.0.param",
    "conv_xy": "branches.0.refine",
    "params_zx": "branches.1.param",
    "conv_zx": "branches.1.refine",
    "params_zy": "branches.2.param",
    "conv_zy": "branches.2.refine",
    "dw": "branches.3.body",
}
_OFFICIAL_GAB = {
    "pre_project": "project_high",
    "g0": "groups.0",
    "g1": "groups.1",
    "g2": "groups.2",
    "g3": "groups.3",
    "tail_conv": "fuse",
}


def _official_key(key: str, config: EGEUNetConfig) -> str:
    head, _, rest = key.partition(".")
    stage = head.rstrip("0123456789")
    index = int(head[len(stage) :]) if head != stage else None
    if stage in ("encoder", "decoder") and index is not None:
        inner = rest.partition(".")[2]  # drop the nn.Sequential index "0."
        is_ghpa = config.ghpa and (
            (stage == "encoder" and index >= 4) or (stage == "decoder" and index <= 3)
        )
        if not is_ghpa:
            return f"{stage}.{index - 1}.{inner}"
        name, _, tail = inner.partition(".")
        return f"{stage}.{index - 1}.{_OFFICIAL_GHPA[name]}" + (f".{tail}" if tail else "")
    if stage in ("ebn", "dbn") and index is not None:
        return f"{stage[0]}{'ncoder' if stage == 'ebn' else 'ecoder'}_norms.{index - 1}.{rest}"
    if stage == "GAB" and index is not None:
        name, _, tail = rest.partition(".")
        # Official GAB5 bridges the deepest level; ours are ordered deepest first.
        return f"bridges.{NUM_LEVELS - index}.{_OFFICIAL_GAB[name]}.{tail}"
    if stage == "gt_conv" and index is not None:
        return f"side_heads.{index - 1}.{rest.partition('.')[2]}"
    if head == "final":
        return f"head.{rest}"
    raise KeyError(key)


def convert_official_state_dict(
    state_dict: Mapping[str, Tensor], config: EGEUNetConfig | None = None
) -> dict[str, Tensor]:
    """Rename the authors' published state_dict (``encoder1.0.weight``, ``GAB5.g0.1.weight``,
    ``gt_conv1.0.bias``, ...) to this module's names. Raises ``KeyError`` naming any key
    it does not recognise."""
    config = config or EGEUNetConfig()
    converted = {}
    for key, value in state_dict.items():
        try:
            converted[_official_key(key, config)] = value
        except KeyError:
            raise KeyError(f"not a key of the published EGE-UNet layout: {key!r}") from None
    return converted


def is_official_state_dict(state_dict: Mapping[str, object]) -> bool:
    return any(k.startswith(("encoder1.", "ebn1.", "GAB1.")) for k in state_dict)


@dataclass
class ParameterBreakdown:
    """Parameters by kind, as the reference note breaks them down."""

    convolution: int = 0
    group_norm: int = 0
    layer_norm: int = 0
    attention_tensors: int = 0
    other: int = 0
    by_module: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return (
            self.convolution
            + self.group_norm
            + self.layer_norm
            + self.attention_tensors
            + self.other
        )


def parameter_breakdown(model: nn.Module) -> ParameterBreakdown:
    """Count parameters by module kind: convolutions (weights and biases), GroupNorm,
    channel LayerNorm and the learnable GHPA attention tensors."""
    result = ParameterBreakdown()
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            result.convolution += own
        elif isinstance(module, nn.GroupNorm):
            result.group_norm += own
        elif isinstance(module, ChannelLayerNorm):
            result.layer_norm += own
        elif isinstance(module, (SpatialAttention, AxisAttention)):
            result.attention_tensors += own
        else:
            result.other += own
    return result
