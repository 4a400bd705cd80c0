"""The published training loss, computed from logits.

``BceDice`` is binary cross-entropy (mean over every pixel) plus the soft Dice loss
``1 - mean_b (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` with per-sample sums and
smoothing 1, where ``p = sigmoid(logits)``. The BCE term is computed in the log-sum-exp
form ``max(x, 0) - x t + log(1 + exp(-|x|))``, so saturated logits give finite losses and
gradients where ``sigmoid`` followed by ``log`` would not.

:func:`bce_dice` computes it in one pass over logits and target (the BCE sum and the
three per-sample Dice sums) with a closed-form gradient in one more
(:class:`_BceDiceFunction`), both compiled into fused loops by
:data:`egeunet.model.fused_kernels` while the trainer has them on;
:func:`bce_dice_written_out` is the same formula with autograd through every op (the
reference the tests and the benchmark baseline use).

``DeepSupervisionLoss`` weights the five side maps (deepest first) by 0.1, 0.2, 0.3, 0.4,
0.5 and the final map by 1, as the published code does; a model without deep supervision
returns only the final map and is scored by ``BceDice`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from egeunet.model import fused_kernels, refuse_higher_order_gradients

SIDE_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5)
"""Published weights of the side maps, deepest level (H/32) first."""

DICE_SMOOTHING = 1.0


def _probabilities_and_softplus(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``sigmoid(x)`` and ``log(1 + exp(-|x|))`` from one ``exp``, finite for any ``x``."""
    exp = torch.exp(-logits.abs())
    one_plus = 1 + exp
    return torch.where(logits >= 0, 1.0, exp) / one_plus, torch.log(one_plus)


def _bce_dice_sums(logits: Tensor, target: Tensor) -> tuple[Tensor, ...]:
    """For ``(B, N)`` logits and target: the BCE summed over every element, and per sample
    ``sum(p t)``, ``sum(p)`` and ``sum(t)``, each ``(B,)``."""
    probabilities, softplus = _probabilities_and_softplus(logits)
    bce = (logits.clamp_min(0) - logits * target + softplus).sum()
    return bce, (probabilities * target).sum(1), probabilities.sum(1), target.sum(1)


def _bce_dice_input_gradient(
    logits: Tensor, target: Tensor, dice: Tensor, denominator: Tensor, bce_scale: Tensor,
    dice_scale: Tensor,
) -> Tensor:  # fmt: skip
    """d loss / d logits for ``(B, N)`` inputs, with ``dice`` and ``denominator`` ``(B, 1)``:
    ``bce_scale (p - t) - dice_scale (2 t - dice) / denominator * p (1 - p)``."""
    probabilities, _ = _probabilities_and_softplus(logits)
    dice_gradient = (2 * target - dice) / denominator * (probabilities * (1 - probabilities))
    return (probabilities - target) * bce_scale - dice_gradient * dice_scale


def _bce_dice_from_sums(
    sums: tuple[Tensor, ...], numel: int, smoothing: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, per-sample Dice, per-sample Dice denominator) from :func:`_bce_dice_sums`."""
    bce, overlap, predicted, actual = sums
    denominator = predicted + actual + smoothing
    dice = (2.0 * overlap + smoothing) / denominator
    return bce / numel + (1.0 - dice.mean()), dice, denominator


class _BceDiceFunction(torch.autograd.Function):
    """``BceDice`` of ``(B, N)`` float logits and target, with a closed-form backward.

    With ``p = sigmoid(x)``, ``M = B N`` elements and per sample
    ``dice = (2 sum(p t) + s) / D``, ``D = sum(p) + sum(t) + s``:
    ``d loss / d x = (p - t) / M - (2 t - dice) / D * p (1 - p) / B``.
    Against autograd through the written-out formula: the same gradient (float64 check in
    the tests), two passes over the maps instead of about twenty.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
        sums = fused_kernels.run(_bce_dice_sums, logits, target)
        loss, dice, denominator = _bce_dice_from_sums(sums, logits.numel(), smoothing)
        ctx.save_for_backward(logits, target, dice, denominator)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        refuse_higher_order_gradients("the BCE + Dice loss")
        logits, target, dice, denominator = ctx.saved_tensors
        gradient = fused_kernels.run(
            _bce_dice_input_gradient, logits, target, dice[:, None], denominator[:, None],
            grad / logits.numel(), grad / logits.shape[0],
        )  # fmt: skip
        return gradient, None, None


def _check_shapes(logits: Tensor, target: Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape"
        )


def bce_dice_written_out(
    logits: Tensor, target: Tensor, smoothing: float = DICE_SMOOTHING
) -> Tensor:
    """``BceDice`` as written: ATen's BCE plus the Dice formula, autograd through each op;
    logits and target ``(B, K, H, W)``, target in [0, 1] (it may need gradients)."""
    _check_shapes(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probabilities = torch.sigmoid(logits).flatten(1)  # (B, K*H*W)
    target = target.flatten(1)
    overlap = (probabilities * target).sum(1)
    total = probabilities.sum(1) + target.sum(1)
    dice = (2.0 * overlap + smoothing) / (total + smoothing)  # (B,)
    return bce + (1.0 - dice.mean())


def bce_dice(logits: Tensor, target: Tensor, smoothing: float = DICE_SMOOTHING) -> Tensor:
    """``BCE(logits, target) + Dice loss`` of ``(B, K, H, W)`` logits and target in [0, 1]
    (same shape), in one fused pass with a closed-form gradient for the logits. A target
    that needs gradients goes through :func:`bce_dice_written_out`. Half-precision logits
    are computed in float32 (a sum over a batch of maps overflows float16)."""
    _check_shapes(logits, target)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    target = target.to(logits.dtype)
    if target.requires_grad:
        return bce_dice_written_out(logits, target, smoothing)
    flat_logits, flat_target = logits.flatten(1), target.flatten(1)  # (B, K*H*W)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _BceDiceFunction.apply(flat_logits, flat_target, smoothing)
    sums = fused_kernels.run(_bce_dice_sums, flat_logits, flat_target)
    return _bce_dice_from_sums(sums, logits.numel(), smoothing)[0]


class BceDice(nn.Module):
    """``BCE(logits, target) + Dice loss``; logits and target ``(B, K, H, W)``, target in [0, 1].

    Computed in float32 whatever the logits' dtype, as under autocast.
    """

    def __init__(self, smoothing: float = DICE_SMOOTHING) -> None:
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return bce_dice(logits.float(), target, self.smoothing)


class DeepSupervisionLoss(nn.Module):
    """``BceDice(final) + sum_i w_i BceDice(side_i)`` over a model's output tuple.

    ``forward(outputs, target)`` takes ``(final,)`` or ``(final, side_1, ..., side_n)``
    with ``n == len(side_weights)``, sides ordered deepest first like the model returns them.
    """

    def __init__(
        self, side_weights: Sequence[float] = SIDE_WEIGHTS, smoothing: float = DICE_SMOOTHING
    ) -> None:
        super().__init__()
        self.side_weights = tuple(float(w) for w in side_weights)
        self.bce_dice = BceDice(smoothing)

    def forward(self, outputs: Sequence[Tensor], target: Tensor) -> Tensor:
        final, *sides = outputs
        loss = self.bce_dice(final, target)
        if not sides:
            return loss
        if len(sides) != len(self.side_weights):
            raise ValueError(
                f"expected the final map and {len(self.side_weights)} side maps, "
                f"got {len(sides)} side maps"
            )
        for weight, side in zip(self.side_weights, sides, strict=True):
            loss = loss + weight * self.bce_dice(side, target)
        return loss
