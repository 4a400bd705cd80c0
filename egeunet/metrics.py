"""Segmentation metrics under two named reductions.

``"pooled"`` (the paper's convention): every pixel of a split goes into one confusion
matrix, thresholded at 0.5, and IoU (what the paper calls mIoU: the lesion IoU
TP / (TP + FP + FN)), DSC, accuracy, specificity and sensitivity are read off it. Large
lesions dominate it.

``"per_image"``: DSC, IoU and HD95 are computed for each image, then summarised by mean
and median, together with the ISIC 2017 challenge score (the mean per-image Jaccard with
every value below 0.65 counted as 0). Every image counts the same.

Conventions for the cases a ratio leaves undefined:

* per image, when prediction and truth are both empty, DSC = IoU = 1 (nothing to find,
  nothing found) and HD95 = 0;
* per image, when exactly one of them is empty, HD95 is the image diagonal
  ``sqrt(H^2 + W^2)``, the largest distance the image allows, so summaries stay finite
  and such images weigh as the worst case (their DSC and IoU are 0 by the formulas);
* pooled ratios with a zero denominator are NaN (e.g. sensitivity of a split without
  lesion pixels); files store them as null (``egeunet.fileio.write_json_atomic``).

HD95 follows MedPy's ``hd95``: surface pixels are the mask minus its erosion (4-connected
structuring element, pixels outside the image count as background); the distances from
each surface pixel of one mask to the nearest surface pixel of the other, in both
directions, are pooled and their 95th percentile taken. Units are pixels of the
evaluated image.

:class:`MetricAccumulator` takes batches, keeping only a confusion matrix and a few
scalars per image, so a split never has to be held in memory.

:data:`METRICS` is the registry every display derives from: history columns
(``val_<key>`` for per-epoch metrics), the per-epoch line, the ``egeunet train`` /
``evaluate`` summary, the study's progress lines and the report's tables. A new metric is
one :class:`Metric` entry plus the function that computes it (in
:meth:`ConfusionCounts.metrics` or :func:`summarize_per_image`) and its test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

REDUCTIONS = ("pooled", "per_image")
THRESHOLD = 0.5
"""The lesion probability threshold of every metric, prediction and default option."""
ISIC_JACCARD_CUTOFF = 0.65


@dataclass(frozen=True)
class Metric:
    """One metric of a metrics.json document: ``document[reduction][key]``.

    Attributes:
        key: its name inside its reduction, e.g. ``dsc`` or ``hd95_mean``.
        reduction: ``pooled`` (one confusion matrix over the split) or ``per_image``.
        label: how tables and summaries name it.
        unit: ``"%"`` for ratios (stored in [0, 1], shown x100) or a unit such as ``px``.
        higher_is_better: the direction of improvement.
        per_epoch: also computed at every validation, as history column ``val_<key>``.
        progress: shown in the per-epoch line and the study's progress lines.
        headline: the one figure that sums up a run (the study's end-of-run line).
        main_table: a row of the report's main results table.
    """

    key: str
    reduction: str
    label: str
    unit: str = "%"
    higher_is_better: bool = True
    per_epoch: bool = False
    progress: bool = False
    headline: bool = False
    main_table: bool = True

    @property
    def percent(self) -> bool:
        return self.unit == "%"

    @property
    def history_column(self) -> str:
        return f"val_{self.key}"

    @property
    def run_column(self) -> str:
        """Its column in the report's table of runs: ``pooled_<key>`` or ``image_<key>``."""
        return f"{'pooled' if self.reduction == 'pooled' else 'image'}_{self.key}"

    @property
    def titled(self) -> str:
        """The label with its unit where that is not percent, e.g. "HD95 mean (px)"."""
        return self.label if self.percent else f"{self.label} ({self.unit})"

    def shown(self, value: float) -> float:
        """``value`` as displayed: x100 for a percentage."""
        return 100 * value if self.percent else value


METRICS = (
    Metric("iou", "pooled", "IoU (paper's mIoU)", per_epoch=True, progress=True),
    Metric("dsc", "pooled", "DSC", per_epoch=True, progress=True, headline=True),
    Metric("accuracy", "pooled", "accuracy", per_epoch=True),
    Metric("specificity", "pooled", "specificity", per_epoch=True),
    Metric("sensitivity", "pooled", "sensitivity", per_epoch=True),
    Metric("dsc_mean", "per_image", "DSC mean", per_epoch=True),
    Metric("dsc_median", "per_image", "DSC median", main_table=False),
    Metric("iou_mean", "per_image", "IoU mean", per_epoch=True),
    Metric("iou_median", "per_image", "IoU median", main_table=False),
    Metric("isic_score", "per_image", "ISIC 2017 score"),
    Metric("hd95_mean", "per_image", "HD95 mean", unit="px", higher_is_better=False),
    Metric(
        "hd95_median", "per_image", "HD95 median", unit="px", higher_is_better=False,
        main_table=False,
    ),
)  # fmt: skip
"""Every metric, pooled first, in the order files and tables list them."""

POOLED_KEYS = tuple(m.key for m in METRICS if m.reduction == "pooled")
PER_IMAGE_KEYS = tuple(m.key for m in METRICS if m.reduction == "per_image")
EPOCH_METRICS = tuple(m for m in METRICS if m.per_epoch)
PROGRESS_METRICS = tuple(m for m in METRICS if m.progress)
HEADLINE = next(m for m in METRICS if m.headline)


def metric_for_column(column: str) -> Metric | None:
    """The metric of a report column (``pooled_dsc``, ``image_hd95_mean``), or None."""
    return next((m for m in METRICS if m.run_column == column), None)


def epoch_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """History columns ``val_<key>`` of the per-epoch metrics from ``results`` (both reductions)."""
    return {m.history_column: results[m.reduction][m.key] for m in EPOCH_METRICS}


_SURFACE_STRUCTURE = ndimage.generate_binary_structure(2, 1)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / float(denominator) if denominator else math.nan


@dataclass(frozen=True)
class ConfusionCounts:
    """Pixel counts of a binary confusion matrix."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: ConfusionCounts) -> ConfusionCounts:
        return ConfusionCounts(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    def metrics(self) -> dict[str, float]:
        """The pooled metrics of these counts (NaN where a denominator is 0)."""
        return {
            "iou": _ratio(self.tp, self.tp + self.fp + self.fn),
            "dsc": _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            "accuracy": _ratio(self.tp + self.tn, self.tp + self.fp + self.fn + self.tn),
            "specificity": _ratio(self.tn, self.tn + self.fp),
            "sensitivity": _ratio(self.tp, self.tp + self.fn),
        }


def binarize(values: torch.Tensor | np.ndarray, threshold: float = THRESHOLD) -> torch.Tensor:
    """``values >= threshold`` as a bool tensor, ``(B, 1, H, W)`` or ``(B, H, W)`` -> ``(B, H, W)``."""
    tensor = torch.as_tensor(values)
    if tensor.ndim == 4:
        if tensor.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {tuple(tensor.shape)}")
        tensor = tensor[:, 0]
    if tensor.ndim != 3:
        raise ValueError(f"expected (B, 1, H, W) or (B, H, W), got shape {tuple(tensor.shape)}")
    return tensor >= threshold


def confusion_per_image(prediction: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Bool ``(B, H, W)`` masks -> int64 ``(B, 4)`` columns TP, FP, FN, TN."""
    if prediction.shape != truth.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and truth {tuple(truth.shape)} differ in shape"
        )
    pixels = prediction[0].numel()
    tp = (prediction & truth).sum((1, 2))
    predicted = prediction.sum((1, 2))
    actual = truth.sum((1, 2))
    fp, fn = predicted - tp, actual - tp
    tn = pixels - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=1).to(torch.int64).cpu().numpy()


def overlap_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image DSC and IoU; 1 where prediction and truth are both empty."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    empty = (tp + fp + fn) == 0
    # On empty images both denominators are 0; divide by 1 there and overwrite with 1.
    dsc = np.where(empty, 1.0, 2 * tp / np.where(empty, 1.0, 2 * tp + fp + fn))
    iou = np.where(empty, 1.0, tp / np.where(empty, 1.0, tp + fp + fn))
    return dsc, iou


def isic_score(ious: Sequence[float] | np.ndarray, cutoff: float = ISIC_JACCARD_CUTOFF) -> float:
    """ISIC 2017 challenge score: mean per-image Jaccard, values below ``cutoff`` count as 0."""
    values = np.asarray(ious, dtype=np.float64)
    if values.size == 0:
        return math.nan
    return float(np.where(values < cutoff, 0.0, values).mean())


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_SURFACE_STRUCTURE, border_value=0)


def hd95(prediction: np.ndarray, truth: np.ndarray) -> float:
    """95th percentile symmetric Hausdorff distance in pixels between two 2-D bool masks.

    Both empty: 0. Exactly one empty: the image diagonal (see the module docstring).
    """
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape or prediction.ndim != 2:
        raise ValueError(
            f"hd95 needs two 2-D masks of one shape, got {prediction.shape} and {truth.shape}"
        )
    has_prediction, has_truth = prediction.any(), truth.any()
    if not has_prediction and not has_truth:
        return 0.0
    if not (has_prediction and has_truth):
        return float(math.hypot(*prediction.shape))
    prediction_surface, truth_surface = _surface(prediction), _surface(truth)
    # distance_transform_edt gives each nonzero pixel its distance to the nearest zero.
    to_truth = ndimage.distance_transform_edt(~truth_surface)[prediction_surface]
    to_prediction = ndimage.distance_transform_edt(~prediction_surface)[truth_surface]
    return float(np.percentile(np.concatenate([to_truth, to_prediction]), 95))


def summarize_per_image(
    dsc: np.ndarray, iou: np.ndarray, hd: np.ndarray | None
) -> dict[str, float]:
    """Mean/median DSC, IoU and HD95 (NaN when not computed) and the ISIC score."""

    def stat(values: np.ndarray | None, fn) -> float:
        return float(fn(values)) if values is not None and len(values) else math.nan

    return {
        "dsc_mean": stat(dsc, np.mean),
        "dsc_median": stat(dsc, np.median),
        "iou_mean": stat(iou, np.mean),
        "iou_median": stat(iou, np.median),
        "isic_score": isic_score(iou),
        "hd95_mean": stat(hd, np.mean),
        "hd95_median": stat(hd, np.median),
    }


class MetricAccumulator:
    """Collects a split batch by batch; ``result(reduction)`` reads the metrics off.

    ``update(probabilities, targets, ids=None)`` takes probabilities (not logits) and
    targets, each ``(B, 1, H, W)`` or ``(B, H, W)``; both are binarised with
    ``>= threshold``. Per image it keeps TP/FP/FN/TN, DSC, IoU and (if ``compute_hd95``)
    HD95.
    """

    def __init__(self, threshold: float = THRESHOLD, compute_hd95: bool = True) -> None:
        self.threshold = threshold
        self.compute_hd95 = compute_hd95
        self._counts: list[np.ndarray] = []  # (B, 4) per batch
        self._hd95: list[float] = []
        self._ids: list[str] = []

    @property
    def num_images(self) -> int:
        return len(self._ids)

    def update(
        self,
        probabilities: torch.Tensor | np.ndarray,
        targets: torch.Tensor | np.ndarray,
        ids: Sequence[str] | None = None,
    ) -> None:
        prediction = binarize(probabilities, self.threshold)
        truth = binarize(targets, THRESHOLD)
        counts = confusion_per_image(prediction, truth)
        if ids is None:
            ids = [str(self.num_images + i) for i in range(len(counts))]
        elif len(ids) != len(counts):
            raise ValueError(f"got {len(ids)} ids for a batch of {len(counts)} images")
        if self.compute_hd95:
            prediction_np, truth_np = prediction.cpu().numpy(), truth.cpu().numpy()
            self._hd95.extend(hd95(p, t) for p, t in zip(prediction_np, truth_np, strict=True))
        self._counts.append(counts)
        self._ids.extend(str(i) for i in ids)

    def _all_counts(self) -> np.ndarray:
        return np.concatenate(self._counts) if self._counts else np.zeros((0, 4), np.int64)

    def pooled_counts(self) -> ConfusionCounts:
        tp, fp, fn, tn = (int(v) for v in self._all_counts().sum(0))
        return ConfusionCounts(tp, fp, fn, tn)

    def result(self, reduction: str) -> dict[str, float]:
        """Metrics under ``reduction``: "pooled" (keys POOLED_KEYS) or "per_image" (PER_IMAGE_KEYS)."""
        if reduction == "pooled":
            return self.pooled_counts().metrics()
        if reduction == "per_image":
            counts = self._all_counts()
            dsc, iou = overlap_scores(counts[:, 0], counts[:, 1], counts[:, 2])
            hd = np.asarray(self._hd95) if self.compute_hd95 else None
            return summarize_per_image(dsc, iou, hd)
        raise ValueError(f"unknown reduction {reduction!r}: expected one of {REDUCTIONS}")

    def results(self) -> dict[str, dict[str, float]]:
        """Both reductions: ``{"pooled": {...}, "per_image": {...}}``."""
        return {reduction: self.result(reduction) for reduction in REDUCTIONS}

    def per_image_rows(self) -> list[dict]:
        """One row per image: id, dsc, iou, hd95 (if computed), tp, fp, fn, tn."""
        counts = self._all_counts()
        dsc, iou = overlap_scores(counts[:, 0], counts[:, 1], counts[:, 2])
        rows = []
        for n, image_id in enumerate(self._ids):
            row: dict = {"id": image_id, "dsc": float(dsc[n]), "iou": float(iou[n])}
            if self.compute_hd95:
                row["hd95"] = self._hd95[n]
            tp, fp, fn, tn = (int(v) for v in counts[n])
            row.update(tp=tp, fp=fp, fn=fn, tn=tn, truth_pixels=tp + fn, predicted_pixels=tp + fp)
            rows.append(row)
        return rows
