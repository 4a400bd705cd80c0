"""Known-answer tests of the pooled and per-image metrics, HD95 and the accumulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from egeunet.metrics import (
    ConfusionCounts,
    MetricAccumulator,
    _surface,
    hd95,
    isic_score,
    overlap_scores,
)

# Two 2x4 images. Image 0: TP 2, FP 1, FN 1, TN 4. Image 1: TP 0, FP 0, FN 2, TN 6.
TRUTH = np.array(
    [
        [[1, 1, 1, 0], [0, 0, 0, 0]],
        [[0, 0, 0, 0], [0, 0, 1, 1]],
    ],
    dtype=np.float32,
)
PROBS = np.array(
    [
        [[0.9, 0.5, 0.2, 0.7], [0.1, 0.0, 0.49, 0.3]],
        [[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.1, 0.2]],
    ],
    dtype=np.float32,
)


def test_pooled_known_answer():
    acc = MetricAccumulator(compute_hd95=False)
    acc.update(torch.from_numpy(PROBS)[:, None], torch.from_numpy(TRUTH)[:, None])
    # Pooled: TP 2, FP 1, FN 3, TN 10 (0.5 counts as lesion, 0.49 does not).
    assert acc.pooled_counts() == ConfusionCounts(tp=2, fp=1, fn=3, tn=10)
    pooled = acc.result("pooled")
    assert pooled["iou"] == pytest.approx(2 / 6)
    assert pooled["dsc"] == pytest.approx(4 / 8)
    assert pooled["accuracy"] == pytest.approx(12 / 16)
    assert pooled["specificity"] == pytest.approx(10 / 11)
    assert pooled["sensitivity"] == pytest.approx(2 / 5)
    # The paper's identity between its two headline numbers.
    assert pooled["dsc"] == pytest.approx(2 * pooled["iou"] / (1 + pooled["iou"]))


def test_per_image_known_answer():
    acc = MetricAccumulator(compute_hd95=False)
    acc.update(PROBS, TRUTH, ids=["a", "b"])
    rows = acc.per_image_rows()
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["dsc"] == pytest.approx(4 / 6)
    assert rows[0]["iou"] == pytest.approx(2 / 4)
    assert (rows[1]["dsc"], rows[1]["iou"]) == (0.0, 0.0)
    assert rows[0]["truth_pixels"] == 3 and rows[0]["predicted_pixels"] == 3
    summary = acc.result("per_image")
    assert summary["dsc_mean"] == pytest.approx(1 / 3)
    assert summary["iou_median"] == pytest.approx(0.25)
    assert summary["isic_score"] == 0.0  # both below 0.65
    assert math.isnan(summary["hd95_mean"])  # not computed


def test_empty_conventions():
    dsc, iou = overlap_scores(np.array([0, 0, 3]), np.array([0, 2, 0]), np.array([0, 0, 0]))
    np.testing.assert_allclose(dsc, [1.0, 0.0, 1.0])
    np.testing.assert_allclose(iou, [1.0, 0.0, 1.0])
    metrics = ConfusionCounts(tp=0, fp=0, fn=0, tn=5).metrics()
    assert math.isnan(metrics["sensitivity"]) and metrics["specificity"] == 1.0


def test_isic_score_zeroes_values_below_the_cutoff():
    assert isic_score([0.9, 0.6, 0.65, 0.0]) == pytest.approx((0.9 + 0.65) / 4)
    assert math.isnan(isic_score([]))


def test_unknown_reduction_is_named():
    with pytest.raises(ValueError, match="reduction 'mean'"):
        MetricAccumulator().result("mean")


def test_hd95_between_single_pixels():
    a = np.zeros((10, 12), bool)
    b = np.zeros((10, 12), bool)
    a[2, 2] = True
    b[5, 6] = True  # 3 down, 4 right
    assert hd95(a, b) == pytest.approx(5.0)
    assert hd95(a, a) == 0.0


def test_hd95_pools_both_directions_before_the_percentile():
    # Prediction: a one-pixel-thick line (all surface) at row 0, columns 0..9; truth: pixel
    # (0, 0). Distances: prediction->truth 0..9, truth->prediction 0. Pooled sorted
    # [0, 0, 1, ..., 9]: the 95th percentile sits at position 9.5 -> 8.5.
    prediction = np.zeros((5, 12), bool)
    prediction[0, :10] = True
    truth = np.zeros((5, 12), bool)
    truth[0, 0] = True
    assert hd95(prediction, truth) == pytest.approx(8.5)
    assert hd95(truth, prediction) == pytest.approx(8.5)


def test_hd95_surface_of_a_filled_square():
    square = np.zeros((9, 9), bool)
    square[2:7, 2:7] = True
    surface = _surface(square)
    assert surface.sum() == 16  # the 5x5 square's ring
    assert not surface[3:6, 3:6].any()
    shifted = np.roll(square, 3, axis=1)  # 3 pixels to the right
    # Left and right edges of the two rings are 3 apart (outermost ones); check against
    # brute force over surface coordinates.
    assert hd95(square, shifted) == pytest.approx(_brute_force_hd95(square, shifted))


def _brute_force_hd95(prediction: np.ndarray, truth: np.ndarray) -> float:
    p = np.argwhere(_surface(prediction))
    t = np.argwhere(_surface(truth))
    distances = cdist(p, t)
    return float(np.percentile(np.concatenate([distances.min(1), distances.min(0)]), 95))


def test_hd95_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(3)
    for _ in range(5):
        field = rng.random((40, 48))
        smooth = gaussian_filter(field, 4)
        prediction = smooth > np.quantile(smooth, 0.7)
        truth = np.roll(prediction, (rng.integers(-4, 5), rng.integers(-4, 5)), axis=(0, 1))
        truth[rng.random(truth.shape) > 0.97] ^= True
        assert hd95(prediction, truth) == pytest.approx(_brute_force_hd95(prediction, truth))


def test_hd95_empty_masks():
    empty = np.zeros((30, 40), bool)
    blob = empty.copy()
    blob[5:10, 5:10] = True
    assert hd95(empty, empty) == 0.0
    assert hd95(empty, blob) == pytest.approx(50.0)  # the diagonal of 30x40
    assert hd95(blob, empty) == pytest.approx(50.0)


def test_accumulator_batches_equal_one_pass():
    rng = np.random.default_rng(0)
    probs = rng.random((7, 1, 16, 16)).astype(np.float32)
    truth = (rng.random((7, 1, 16, 16)) > 0.5).astype(np.float32)
    whole = MetricAccumulator()
    whole.update(probs, truth)
    batched = MetricAccumulator()
    for start in range(0, 7, 3):
        batched.update(torch.from_numpy(probs[start : start + 3]), truth[start : start + 3])
    assert batched.num_images == 7
    assert batched.results() == whole.results()
    expected_hd = [hd95(p[0] >= 0.5, t[0] >= 0.5) for p, t in zip(probs, truth, strict=True)]
    assert [r["hd95"] for r in batched.per_image_rows()] == pytest.approx(expected_hd)


def test_bad_shapes_are_errors():
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="one channel"):
        acc.update(np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="differ in shape"):
        acc.update(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match="ids"):
        acc.update(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), ids=["x"])
