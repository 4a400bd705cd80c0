"""EGE-UNet: fidelity to the published model, parameter counts, shapes, gradients, config."""

from __future__ import annotations

import itertools

import pytest
import torch

from egeunet.model import (
    GHPA,
    GHPA_BRANCHES,
    ChannelLayerNorm,
    EGEUNet,
    EGEUNetConfig,
    GroupNorm,
    _upsample_side_map,
    convert_official_state_dict,
    count_parameters,
    is_official_state_dict,
    parameter_breakdown,
)

ALL_SWITCHES = list(itertools.product((True, False), repeat=3))

# Pinned parameter counts of the 8 switch combinations (ghpa, gab, deep_supervision).
PINNED_PARAMETERS = {
    (True, True, True): 53_374,
    (True, True, False): 52_449,
    (True, False, True): 34_406,
    (True, False, False): 34_273,
    (False, True, True): 126_142,
    (False, True, False): 125_217,
    (False, False, True): 107_174,
    (False, False, False): 107_041,
}


def make(switches: tuple[bool, bool, bool], **kwargs) -> EGEUNet:
    ghpa, gab, ds = switches
    return EGEUNet(EGEUNetConfig(ghpa=ghpa, gab=gab, deep_supervision=ds, **kwargs))


@pytest.fixture(scope="module")
def outputs(reference_checkpoint):
    """Our model, loaded from the published layout, run in float64 on the fixture input."""
    model = EGEUNet().double().eval()
    state = convert_official_state_dict(reference_checkpoint["state_dict"])
    model.load_state_dict({k: v.double() for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return model(reference_checkpoint["input"].double())


class TestPublishedModel:
    """Loading the authors' checkpoint layout reproduces their outputs."""

    def test_layout_is_recognised(self, reference_checkpoint):
        assert is_official_state_dict(reference_checkpoint["state_dict"])
        assert not is_official_state_dict(EGEUNet().state_dict())

    def test_side_maps_match(self, outputs, reference_checkpoint):
        expected = reference_checkpoint["deep_supervision"]
        assert len(outputs) == 1 + len(expected) == 6
        for ours, theirs in zip(outputs[1:], expected, strict=True):
            torch.testing.assert_close(ours.sigmoid().float(), theirs, atol=1e-5, rtol=0)

    def test_final_map_matches(self, outputs, reference_checkpoint):
        # The fixture was computed in float32; on this random-weight network float32
        # rounding alone moves the final map by up to ~7e-5 (the same code run with 1 or 2
        # threads differs by that much). We compare our float64 result, so the residual
        # is the fixture's own rounding: bounded at 1e-4, and 1e-5 for 98% of pixels.
        diff = (outputs[0].sigmoid().float() - reference_checkpoint["out"]).abs()
        assert diff.max() < 1e-4
        assert (diff > 1e-5).float().mean() < 0.02
        assert diff.mean() < 2e-6

    def test_float32_channels_last_matches_too(self, reference_checkpoint):
        # The layout the model trains in, at the precision the fixture was made in: side
        # maps within the reference note's 1e-5; the final map within the fixture's own
        # float32 rounding (see above). A less precise kernel (ATen's channels-last
        # GroupNorm gave 2.8e-5 and 3.9e-4) fails here.
        model = EGEUNet().eval()
        assert model.channels_last
        model.load_state_dict(convert_official_state_dict(reference_checkpoint["state_dict"]))
        with torch.no_grad():
            outputs = model(reference_checkpoint["input"])
        for ours, theirs in zip(outputs[1:], reference_checkpoint["deep_supervision"], strict=True):
            torch.testing.assert_close(ours.sigmoid(), theirs, atol=1e-5, rtol=0)
        assert (outputs[0].sigmoid() - reference_checkpoint["out"]).abs().max() < 1e-4

    def test_unknown_key_is_named(self):
        with pytest.raises(KeyError, match=r"mystery\.weight"):
            convert_official_state_dict({"mystery.weight": torch.zeros(1)})


class TestParameters:
    def test_default_is_the_published_count(self):
        assert count_parameters(EGEUNet()) == 53_374

    def test_hand_count_of_default(self):
        c = (8, 16, 24, 32, 48, 64)
        ghpa_inputs = (24, 32, 48, 64, 48, 32)  # inputs of encoder 4-6, decoder 1-3
        bridges = (48, 32, 24, 16, 8)  # channels at each skip, deepest first
        group_norm = 2 * (sum(c[:-1]) + sum(c[:-1]))
        layer_norm = sum(2 * 2 * d for d in ghpa_inputs) + sum(
            2 * (4 * (ch // 2 + 1) + (2 * ch + 4)) for ch in bridges
        )
        attention = sum((d // 4) * (8 * 8 + 8 + 8) for d in ghpa_inputs)
        breakdown = parameter_breakdown(EGEUNet())
        assert (group_norm, layer_norm, attention) == (512, 2_096, 4_960)
        assert breakdown.group_norm == group_norm
        assert breakdown.layer_norm == layer_norm
        assert breakdown.attention_tensors == attention
        assert breakdown.convolution == 45_806
        assert breakdown.other == 0
        assert breakdown.total == 53_374

    @pytest.mark.parametrize("switches", ALL_SWITCHES, ids=str)
    def test_pinned_counts(self, switches):
        assert count_parameters(make(switches)) == PINNED_PARAMETERS[switches]

    def test_removing_a_branch_removes_its_parameters(self):
        full = count_parameters(EGEUNet())
        for branch in GHPA_BRANCHES:
            kept = tuple(b for b in GHPA_BRANCHES if b != branch)
            assert count_parameters(EGEUNet(ghpa_branches=kept)) < full


class TestForward:
    @pytest.mark.parametrize("switches", ALL_SWITCHES, ids=str)
    @pytest.mark.parametrize("size", [(256, 256), (320, 224), (192, 256)], ids=str)
    def test_shapes_and_finite_gradients(self, switches, size):
        torch.manual_seed(0)
        model = make(switches)
        x = torch.rand(2, 3, *size) * 255
        outputs = model(x)
        assert len(outputs) == (6 if switches[2] else 1)
        for out in outputs:
            assert out.shape == (2, 1, *size)
        sum(o.mean() for o in outputs).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"

    def test_multiclass_and_grayscale(self):
        model = EGEUNet(in_channels=1, num_classes=3)
        outputs = model(torch.rand(1, 1, 64, 96))
        assert [tuple(o.shape) for o in outputs] == [(1, 3, 64, 96)] * 6
        assert all(o.is_contiguous() for o in outputs)  # NCHW whatever the layout inside

    @pytest.mark.parametrize("size", [(250, 256), (256, 100)])
    def test_size_not_multiple_of_32_is_rejected(self, size):
        with pytest.raises(ValueError, match="multiples of 32"):
            EGEUNet()(torch.rand(1, 3, *size))

    def test_wrong_channel_count_is_rejected(self):
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            EGEUNet()(torch.rand(1, 4, 64, 64))

    def test_batch_independence(self):
        model = EGEUNet().eval()
        x = torch.rand(3, 3, 64, 64) * 255
        with torch.no_grad():
            together = model(x)[0]
            alone = model(x[1:2])[0]
        # Logits reach tens here; float32 rounding differs between batch sizes.
        torch.testing.assert_close(together[1:2], alone, atol=1e-3, rtol=1e-3)

    def test_inactive_branches_pass_groups_through(self):
        torch.manual_seed(0)
        block = GHPA(16, 8, branches=()).eval()
        x = torch.randn(2, 16, 8, 8)
        with torch.no_grad():
            expected = block.project(block.norm_out(block.norm_in(x)))
            torch.testing.assert_close(block(x), expected)
        active = GHPA(16, 8, branches=("dw",))
        with torch.no_grad():
            assert not torch.allclose(active(x), active.project(active.norm_out(active.norm_in(x))))

    def test_channel_layer_norm_is_the_published_formula(self):
        torch.manual_seed(0)
        norm = ChannelLayerNorm(6)
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        x = torch.randn(2, 6, 5, 7, dtype=torch.float64) * 3 + 1
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        expected = (x - mean) / torch.sqrt(var + 1e-6)
        expected = (
            norm.weight.double()[:, None, None] * expected + norm.bias.double()[:, None, None]
        )
        torch.testing.assert_close(norm.double()(x), expected)

    @pytest.mark.parametrize("channels", [1, 5, 20])
    def test_channel_layer_norm_gradient(self, channels):
        # The closed-form backward against finite differences (float64) and against
        # autograd through the written-out formula (float32, channels-last input).
        torch.manual_seed(channels)
        norm = ChannelLayerNorm(channels).double()
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        x = (torch.randn(2, channels, 5, 7, dtype=torch.float64) * 3 + 1).requires_grad_()
        assert torch.autograd.gradcheck(norm, (x,))
        norm = norm.float()
        x = x.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_()
        grad = torch.randn(2, channels, 5, 7)
        norm(x).backward(grad)
        ours = (x.grad, norm.weight.grad, norm.bias.grad)
        x.grad = norm.weight.grad = norm.bias.grad = None
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        written = (x - mean) / torch.sqrt(var + 1e-6)
        (norm.weight[:, None, None] * written + norm.bias[:, None, None]).backward(grad)
        for a, b in zip(ours, (x.grad, norm.weight.grad, norm.bias.grad), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    def test_channel_layer_norm_keeps_low_precision_dtypes(self):
        norm = ChannelLayerNorm(4)
        x = torch.randn(1, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
        out = norm(x)
        out.float().sum().backward()
        assert out.dtype == x.grad.dtype == torch.bfloat16
        assert norm.weight.grad.dtype == torch.float32

    def test_mixed_precision_forward_and_backward(self):
        # The CUDA AMP path cannot run here; CPU autocast in bfloat16 goes through the same
        # dtype handling (LayerNorm in float32, loss in float32, float32 gradients). oneDNN
        # crashes on it in channels-last layout (torch 2.14.1), so the model refuses that
        # with a message saying how to switch to NCHW.
        from egeunet.losses import DeepSupervisionLoss

        torch.manual_seed(0)
        model = EGEUNet()
        x = torch.rand(2, 3, 64, 64) * 255
        masks = (torch.rand(2, 1, 64, 64) > 0.5).float()
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            pytest.raises(RuntimeError, match="contiguous_format"),
        ):
            model(x)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)  # inference is unaffected
        model.to(memory_format=torch.contiguous_format)
        assert not model.channels_last
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(x)
        assert outputs[0].dtype == torch.bfloat16
        loss = DeepSupervisionLoss()(outputs, masks)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            assert torch.isfinite(p.grad).all(), name

    def test_channels_last_layout_gives_the_same_function(self):
        # The model keeps channels-last weights and activations for speed; a model whose
        # weights are contiguous (NCHW) must compute the same maps.
        torch.manual_seed(0)
        model = EGEUNet().eval()
        contiguous = EGEUNet().eval()
        contiguous.load_state_dict(model.state_dict())
        contiguous.to(memory_format=torch.contiguous_format)
        assert model.channels_last and not contiguous.channels_last
        grayscale = EGEUNet(in_channels=1).to(memory_format=torch.contiguous_format)
        assert not grayscale.channels_last
        x = torch.rand(2, 3, 64, 96) * 255
        with torch.no_grad():
            for a, b in zip(model(x), contiguous(x), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)

    def test_fast_paths_give_the_published_gradients(self, monkeypatch):
        """Channels-last layout, the closed-form LayerNorm backward and the one-pass loss against
        plain autograd through the published formulas in NCHW: the whole model's loss and
        every parameter gradient (float64) must agree."""

        from egeunet import losses
        from egeunet.losses import DeepSupervisionLoss

        torch.manual_seed(0)
        model = EGEUNet().double()
        x = torch.rand(2, 3, 64, 96, dtype=torch.float64) * 255
        masks = (torch.rand(2, 1, 64, 96) > 0.5).double()

        def loss_and_gradients():
            model.zero_grad()
            loss = DeepSupervisionLoss()(model(x), masks)
            loss.backward()
            return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

        fast_loss, fast = loss_and_gradients()

        def written_out(self, x):
            mean = x.mean(1, keepdim=True)
            var = (x - mean).pow(2).mean(1, keepdim=True)
            x = (x - mean) / torch.sqrt(var + self.eps)
            return self.weight[:, None, None] * x + self.bias[:, None, None]

        monkeypatch.setattr(ChannelLayerNorm, "forward", written_out)
        monkeypatch.setattr(losses, "bce_dice", losses.bce_dice_written_out)
        model.to(memory_format=torch.contiguous_format)
        plain_loss, plain = loss_and_gradients()
        assert fast_loss == pytest.approx(plain_loss, rel=1e-6)
        # The loss itself is float32 (BceDice casts), so agreement is to float32 rounding.
        for name, gradient in plain.items():
            scale = gradient.abs().max().item()
            assert (fast[name] - gradient).abs().max().item() <= 1e-6 * scale, name

    def test_float32_gradients_agree_between_layouts(self):
        # oneDNN's float32 channels-last kernels against NCHW, on the whole training loss.
        from egeunet.losses import DeepSupervisionLoss

        torch.manual_seed(0)
        fast = EGEUNet()
        plain = EGEUNet()
        plain.load_state_dict(fast.state_dict())
        plain.to(memory_format=torch.contiguous_format)
        x = torch.rand(2, 3, 64, 64) * 255
        masks = (torch.rand(2, 1, 64, 64) > 0.5).float()
        for model in (fast, plain):
            DeepSupervisionLoss()(model(x), masks).backward()
        for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
            scale = b.grad.abs().max().item()
            assert (a.grad - b.grad).abs().max().item() <= 1e-3 * scale, name

    def test_group_norm_keeps_float32_precision_in_channels_last(self):
        # A large mean against the spread, as after the first conv on 0..255 inputs.
        torch.manual_seed(0)
        x = torch.randn(2, 8, 64, 64, dtype=torch.float64) * 20 + 300
        norm = GroupNorm(4, 8)
        with torch.no_grad():
            norm.weight.normal_()
            norm.bias.normal_()
        truth = torch.nn.functional.group_norm(x, 4, norm.weight.double(), norm.bias.double(), 1e-5)
        fast = x.float().contiguous(memory_format=torch.channels_last)
        out = norm(fast)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert (out.double() - truth).abs().max() < 1e-4
        assert norm(x.float()).is_contiguous()

    def test_higher_order_gradients_are_refused_not_wrong(self):
        norm = ChannelLayerNorm(5)
        x = torch.randn(1, 5, 4, 4, requires_grad=True)
        loss = norm(x).pow(3).sum() + x.pow(3).sum()
        with pytest.raises(RuntimeError, match="first-order gradients only"):
            torch.autograd.grad(loss, x, create_graph=True)

    def test_dilations_change_the_function(self):
        torch.manual_seed(0)
        x = torch.rand(1, 3, 64, 64) * 255
        a = EGEUNet().eval()
        b = EGEUNet(gab_dilations=(1, 1, 1, 1)).eval()
        b.load_state_dict(a.state_dict())
        with torch.no_grad():
            assert not torch.allclose(a(x)[0], b(x)[0])


class TestSideMapUpsampling:
    """The side maps' resize by matrix products is ``F.interpolate`` (bilinear, aligned
    corners), value and gradient, for any sizes it is used at."""

    @pytest.mark.parametrize(
        ("source", "target"),
        [((1, 1), (64, 96)), ((2, 3), (64, 96)), ((8, 8), (256, 256)), ((7, 10), (224, 320))],
        ids=str,
    )
    def test_same_values_and_gradients_as_interpolate(self, source, target):
        torch.manual_seed(0)
        mask = torch.randn(3, 2, *source, dtype=torch.float64, requires_grad=True)
        grad = torch.randn(3, 2, *target, dtype=torch.float64)
        ours = _upsample_side_map(mask, target)
        (ours_grad,) = torch.autograd.grad(ours, mask, grad)
        truth = torch.nn.functional.interpolate(
            mask, size=target, mode="bilinear", align_corners=True
        )
        (truth_grad,) = torch.autograd.grad(truth, mask, grad)
        torch.testing.assert_close(ours, truth, rtol=0, atol=1e-12)
        torch.testing.assert_close(ours_grad, truth_grad, rtol=0, atol=1e-10)

    def test_a_first_call_in_inference_mode_does_not_break_training(self):
        # The weights are cached: built under inference_mode they would be an inference
        # tensor, which a later float64 backward cannot save.
        from egeunet.model import _interpolation_matrix

        _interpolation_matrix.cache_clear()
        with torch.inference_mode():
            _upsample_side_map(torch.randn(1, 1, 3, 5, dtype=torch.float64), (24, 40))
        mask = torch.randn(1, 1, 3, 5, dtype=torch.float64, requires_grad=True)
        _upsample_side_map(mask, (24, 40)).sum().backward()
        assert mask.grad is not None

    def test_cpu_autocast_keeps_float32_interpolation(self):
        # Matrix products under bfloat16 autocast would lose ~3 significant digits.
        mask = torch.randn(2, 1, 8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = _upsample_side_map(mask, (64, 64))
        truth = torch.nn.functional.interpolate(
            mask, size=(64, 64), mode="bilinear", align_corners=True
        )
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, truth, rtol=0, atol=1e-6)

    def test_float32_is_more_exact_than_aten(self):
        torch.manual_seed(0)
        mask = torch.randn(8, 1, 64, 64)
        truth = torch.nn.functional.interpolate(
            mask.double(), size=(256, 256), mode="bilinear", align_corners=True
        )
        aten = torch.nn.functional.interpolate(
            mask, size=(256, 256), mode="bilinear", align_corners=True
        )
        ours = _upsample_side_map(mask, (256, 256))
        assert ours.dtype == torch.float32 and ours.is_contiguous()
        # Weights exact to float64 before the cast: several times closer than ATen's.
        assert (ours.double() - truth).abs().max() < 0.5 * (aten.double() - truth).abs().max()


class TestConfig:
    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"widths": (8, 16, 24, 32, 48, 63)}, "widths"),
            ({"widths": (8, 16, 24, 32, 48, 66)}, "widths"),
            ({"widths": (8, 16, 24, 32, 48)}, "widths"),
            ({"ghpa_branches": ("hw", "spatial")}, "ghpa_branches"),
            ({"ghpa_branches": ("hw", "hw")}, "ghpa_branches"),
            ({"gab_dilations": (1, 2, 5)}, "gab_dilations"),
            ({"num_classes": 0}, "num_classes"),
            ({"in_channels": 0}, "in_channels"),
        ],
    )
    def test_bad_config_names_the_field(self, kwargs, field):
        with pytest.raises(ValueError, match=field):
            EGEUNetConfig(**kwargs)

    def test_frozen_hashable_and_round_trips(self):
        config = EGEUNetConfig(widths=[8, 16, 24, 32, 48, 64], gab=False)
        assert hash(config) == hash(EGEUNetConfig(gab=False))
        assert EGEUNetConfig(**config.to_dict()) == config
        with pytest.raises(AttributeError):
            config.gab = True  # type: ignore[misc]

    def test_names(self):
        assert EGEUNetConfig().name == "egeunet"
        assert EGEUNetConfig(ghpa=False, gab=False, deep_supervision=False).name == "unet"
        assert EGEUNetConfig(gab=False, deep_supervision=False).name == "unet+ghpa"
        assert EGEUNetConfig(ghpa_branches=("hw", "dw")).name == "egeunet[hw,dw]"
