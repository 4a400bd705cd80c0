"""The compiled LayerNorm kernels (egeunet.model.FusedKernels) compute the same function."""

from __future__ import annotations

import pytest
import torch

from egeunet.losses import DeepSupervisionLoss
from egeunet.model import EGEUNet, FusedKernels, fused_kernels


@pytest.fixture
def kernels_on(monkeypatch):
    monkeypatch.setenv("EGEUNET_FUSED_KERNELS", "1")
    if not fused_kernels.enable():
        pytest.skip(f"torch.compile unavailable here: {fused_kernels.failed}")
    yield fused_kernels
    fused_kernels.enable(False)


def _loss_and_gradients(model: EGEUNet, x: torch.Tensor, masks: torch.Tensor):
    model.zero_grad()
    loss = DeepSupervisionLoss()(model(x), masks)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_training_gradients_match_the_plain_ops(kernels_on):
    torch.manual_seed(0)
    model = EGEUNet()
    x = torch.rand(2, 3, 64, 96) * 255
    masks = (torch.rand(2, 1, 64, 96) > 0.5).float()
    fused_loss, fused = _loss_and_gradients(model, x, masks)
    assert kernels_on.enabled and kernels_on.failed is None  # no silent fallback
    kernels_on.enable(False)
    plain_loss, plain = _loss_and_gradients(model, x, masks)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-5)
    for name, gradient in plain.items():
        scale = gradient.abs().max().item()
        assert (fused[name] - gradient).abs().max().item() <= 1e-4 * scale, name


def test_evaluation_runs_the_compiled_layer_norm_with_the_same_outputs(kernels_on):
    from egeunet.model import _channel_layer_norm_output

    torch.manual_seed(0)
    model = EGEUNet().eval()
    x = torch.rand(2, 3, 64, 96) * 255
    with torch.inference_mode():
        fused = model(x)
        assert kernels_on.enabled and _channel_layer_norm_output in kernels_on._compiled
        kernels_on.enable(False)
        plain = model(x)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("EGEUNET_FUSED_KERNELS", "0")
    kernels = FusedKernels()
    assert not kernels.enable()
    x, weight, bias = torch.randn(2, 5, 4, 4), torch.randn(5), torch.randn(5)
    kernels.forward(x, weight, bias, 1e-6)
    assert kernels._compiled == {}  # ran the plain ops, compiled nothing


def _kernels_compiled_as(monkeypatch, compile_to) -> FusedKernels:
    """Enabled kernels whose ``torch.compile`` returns ``compile_to(function)``."""
    monkeypatch.setenv("EGEUNET_FUSED_KERNELS", "1")
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: compile_to(function))
    kernels = FusedKernels()
    assert kernels.enable()
    return kernels


def test_a_compiler_failure_falls_back_to_the_plain_ops_with_one_warning(monkeypatch):
    kernels = _kernels_compiled_as(monkeypatch, lambda function: _broken)
    x = torch.randn(2, 5, 4, 4)
    weight, bias = torch.randn(5), torch.randn(5)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler here"):
        out, _, _ = kernels.forward(x, weight, bias, 1e-6)
    assert not kernels.enabled and "no C++ compiler here" in kernels.failed
    assert not kernels.enable()  # a failure is remembered
    mean = x.mean(1, keepdim=True)
    expected = (x - mean) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, expected * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))


def _broken(*args, **kwargs):
    raise RuntimeError("no C++ compiler here")


def test_an_error_of_the_inputs_is_raised_and_leaves_the_kernels_on(monkeypatch):
    kernels = _kernels_compiled_as(monkeypatch, lambda function: function)
    x = torch.randn(2, 5, 4, 4)
    with pytest.raises(RuntimeError):  # 5 channels against a 4-channel weight
        kernels.forward(x, torch.randn(4), torch.randn(4), 1e-6)
    assert kernels.enabled and kernels.failed is None
