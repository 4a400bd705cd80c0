"""Known-answer tests of the published loss (BCE + per-sample soft Dice, deep supervision)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from egeunet.losses import BceDice, DeepSupervisionLoss, bce_dice, bce_dice_written_out
from egeunet.model import EGEUNet, EGEUNetConfig


def test_bce_dice_known_answer_at_zero_logits():
    # p = 0.5 everywhere: BCE = ln 2; one lesion pixel of four: Dice = (2*0.5 + 1) / (2 + 1 + 1).
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    loss = BceDice()(torch.zeros_like(target), target)
    assert loss.item() == pytest.approx(math.log(2) + 1 - 0.5, abs=1e-6)


def test_dice_is_averaged_per_sample_not_pooled():
    # Sample 1: Dice 2/4 = 0.5; sample 2 (no lesion): (0 + 1) / (2 + 0 + 1) = 1/3.
    target = torch.zeros(2, 1, 2, 2)
    target[0, 0, 0, 0] = 1.0
    loss = BceDice()(torch.zeros_like(target), target)
    per_sample = math.log(2) + 1 - (0.5 + 1 / 3) / 2
    pooled = math.log(2) + 1 - (2 * 0.5 + 1) / (4 + 1 + 1)
    assert loss.item() == pytest.approx(per_sample, abs=1e-6)
    assert abs(loss.item() - pooled) > 0.05


def test_bce_dice_matches_the_probability_formula():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=generator) * 3
    target = (torch.rand(3, 1, 8, 8, generator=generator) > 0.6).float()
    p = torch.sigmoid(logits)
    dice = (2 * (p * target).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    expected = F.binary_cross_entropy(p, target) + 1 - dice.mean()
    assert BceDice()(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_saturated_logits_give_finite_loss_and_gradients():
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    logits = torch.tensor([[[[-200.0, 200.0], [300.0, -300.0]]]], requires_grad=True)
    loss = BceDice()(logits, target)
    loss.backward()
    # Two pixels wrong by 200 (BCE 200 each), two right: BCE mean 100. Dice: p = (0, 1, 1, 0),
    # overlap 1, sums 2 + 2: 1 - 3/5.
    assert loss.item() == pytest.approx(100 + 1 - 3 / 5, rel=1e-6)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_fused_loss_matches_the_written_out_formula_in_value_and_gradient(scale):
    """The one-pass loss with its closed-form gradient against autograd through ATen's BCE
    and the Dice formula, in float64, with hard and soft targets and (scale 30) saturated
    logits; gradcheck compares the closed form with finite differences too."""
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1, 16, 12, generator=generator, dtype=torch.float64) * scale
    target = torch.rand(3, 1, 16, 12, generator=generator, dtype=torch.float64)
    target[0] = (target[0] > 0.5).double()
    target[1] = 0.0  # a sample without lesion
    ours_input = logits.clone().requires_grad_()
    ours = bce_dice(ours_input, target)
    (grad_ours,) = torch.autograd.grad(ours * 3, ours_input)
    reference_input = logits.clone().requires_grad_()
    reference = bce_dice_written_out(reference_input, target)
    (grad_reference,) = torch.autograd.grad(reference * 3, reference_input)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-12)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=1e-10, atol=1e-15)
    if scale == 1.0:  # finite differences are meaningless on saturated logits
        assert torch.autograd.gradcheck(
            lambda x: bce_dice(x, target), (logits.clone().requires_grad_(),)
        )


def test_fused_loss_without_gradients_is_the_same_value():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, 8, 8, generator=generator)
    target = (torch.rand(2, 1, 8, 8, generator=generator) > 0.5).float()
    with torch.no_grad():
        assert bce_dice(logits, target).item() == pytest.approx(
            bce_dice_written_out(logits, target).item(), rel=1e-6
        )


def test_half_precision_logits_are_summed_in_float32():
    """A batch of 8 maps at 256x256 sums to more than float16 can hold (65504)."""
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 1, 256, 256, generator=generator) * 2
    target = (torch.rand(8, 1, 256, 256, generator=generator) > 0.7).float()
    reference = bce_dice_written_out(logits.double(), target.double()).item()
    for dtype in (torch.float16, torch.bfloat16):
        loss = bce_dice(logits.to(dtype), target)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(reference, rel=1e-2), dtype


def test_a_target_that_needs_gradients_gets_them():
    logits = torch.randn(1, 1, 4, 4)
    target = torch.rand(1, 1, 4, 4, requires_grad=True)
    (gradient,) = torch.autograd.grad(bce_dice(logits, target), target)
    (expected,) = torch.autograd.grad(bce_dice_written_out(logits, target), target)
    torch.testing.assert_close(gradient, expected)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        BceDice()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 2))
    with pytest.raises(ValueError, match="differ in shape"):  # no silent broadcasting
        bce_dice(torch.zeros(2, 1, 4, 4), torch.zeros(1, 1, 4, 4))


def test_fused_loss_refuses_higher_order_gradients():
    logits = torch.randn(1, 1, 4, 4, requires_grad=True)
    loss = bce_dice(logits, torch.ones(1, 1, 4, 4))
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(loss, logits, create_graph=True)


def test_deep_supervision_weights_sides_deepest_first():
    generator = torch.Generator().manual_seed(1)
    target = (torch.rand(2, 1, 6, 6, generator=generator) > 0.5).float()
    maps = [torch.randn(2, 1, 6, 6, generator=generator) * (i + 1) for i in range(6)]
    single = [BceDice()(m, target).item() for m in maps]
    expected = single[0] + sum(
        w * s for w, s in zip((0.1, 0.2, 0.3, 0.4, 0.5), single[1:], strict=True)
    )
    assert DeepSupervisionLoss()(tuple(maps), target).item() == pytest.approx(expected, rel=1e-6)
    reversed_order = single[0] + sum(
        w * s for w, s in zip((0.5, 0.4, 0.3, 0.2, 0.1), single[1:], strict=True)
    )
    assert abs(expected - reversed_order) > 1e-3  # the test can tell the order apart


def test_without_deep_supervision_only_the_final_map_counts():
    target = torch.zeros(1, 1, 2, 2)
    target[0, 0, 1, 1] = 1
    logits = torch.full((1, 1, 2, 2), 0.3)
    assert DeepSupervisionLoss()((logits,), target).item() == pytest.approx(
        BceDice()(logits, target).item()
    )
    with pytest.raises(ValueError, match="side maps"):
        DeepSupervisionLoss()((logits, logits), target)


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_loss_trains_the_model(deep_supervision):
    torch.manual_seed(0)
    model = EGEUNet(EGEUNetConfig(widths=(4, 4, 8, 8, 12, 12), deep_supervision=deep_supervision))
    x = torch.rand(2, 3, 32, 32) * 255
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 8:24, 8:24] = 1
    outputs = model(x)
    assert len(outputs) == (6 if deep_supervision else 1)
    loss = DeepSupervisionLoss()(outputs, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
