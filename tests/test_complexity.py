"""Complexity counts: the paper's figures, agreement of the two MAC counts, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from egeunet.cli import main
from egeunet.complexity import (
    branch_variants,
    complexity_row,
    conv_macs,
    fvcore_counts,
    switch_variants,
)
from egeunet.model import EGEUNet, EGEUNetConfig


def test_default_model_counts():
    row = complexity_row(EGEUNetConfig(), size=256, latency=False)
    assert row["params_total"] == row["params_trainable"] == 53_374
    assert round(row["macs_g"], 4) == 0.0721
    # fvcore at default settings: conv 0.0721 + GroupNorm and bilinear upsampling; the
    # channel LayerNorm is written out in elementwise ops, which fvcore skips by default.
    # The reference note gives 0.0805 G for the authors' code.
    counts = fvcore_counts(EGEUNet().eval(), torch.zeros(1, 3, 256, 256))
    assert counts.default_total == 80_524_800
    assert "layer_norm" not in counts.by_operator
    assert round(row["fvcore_default_g"], 4) == 0.0805
    # Every op counted: 0.0909 G, pinned so a change to the forward pass shows up here.
    assert round(row["fvcore_full_g"], 4) == 0.0909
    assert row["uncounted_ops"] == ""


def test_conv_macs_known_answer():
    # One 3x3 conv 3->8 at 32x32 with padding: 32*32*8 outputs, 3*9 MACs each.
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert conv_macs(conv, torch.zeros(1, 3, 32, 32)) == 32 * 32 * 8 * 27
    depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert conv_macs(depthwise, torch.zeros(1, 8, 32, 32)) == 32 * 32 * 8 * 9


def test_fvcore_extra_handles_count_elementwise_ops():
    class AddMul(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.gelu(x * x + x)

    counts = fvcore_counts(AddMul(), torch.zeros(1, 4, 8, 8))
    assert counts.default_total == 0
    assert counts.full_total == 3 * 4 * 8 * 8
    assert counts.uncounted_ops == ()


def test_variants():
    assert len(set(switch_variants())) == 8
    assert switch_variants()[0] == EGEUNetConfig()
    assert all(len(v.ghpa_branches) == 3 for v in branch_variants())


def test_cli_json(capsys):
    assert main(["complexity", "--format", "json", "--size", "64", "--no-latency"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == 64
    assert "thop convention" in report["conventions"]
    rows = {r["variant"]: r for r in report["rows"]}
    assert len(rows) == 8
    assert rows["egeunet"]["params_total"] == 53_374
    # MACs scale with the pixel count: (64/256)**2 of the 256x256 figure, within the
    # batch-independent GHPA Conv1d terms.
    assert rows["egeunet"]["macs_g"] == pytest.approx(0.0721 / 16, rel=0.01)


def test_cli_rejects_bad_size(capsys):
    assert main(["complexity", "--size", "100", "--no-latency"]) == 2
    assert "--size" in capsys.readouterr().err


def test_cli_markdown_with_latency(capsys, tmp_path):
    out = tmp_path / "table.md"
    args = ["complexity", "--size", "32", "--repeats", "1", "--output", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "latency_ms_b1" in text and "| egeunet " in text
    assert out.read_text() == text
