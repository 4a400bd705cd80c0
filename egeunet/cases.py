"""Best, median and worst cases of a run, kept in the run folder for the report.

A run's per-image scores (``per_image.csv``) rank its test images; :func:`pick_cases`
chooses the best, median and worst, and :func:`save_cases` stores those images with their
truth and predicted probabilities in ``<run_dir>/cases.npz`` (the engine's evaluation
writer does, for every finished run and evaluation) so the report can draw the
qualitative grid from files alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from egeunet.fileio import atomic_open
from egeunet.metrics import THRESHOLD
from egeunet.runfolder import CASES_FILE

CASE_LABELS = ("best", "median", "worst")


def pick_cases(per_image: pd.DataFrame, score: str = "dsc") -> dict[str, str]:
    """Ids of the best, median and worst image by ``score`` (ties broken by id)."""
    if per_image.empty:
        raise ValueError("per_image: no images to pick cases from")
    if score not in per_image.columns:
        raise KeyError(f"per_image: no column {score!r} (have {list(per_image.columns)})")
    ranked = per_image.sort_values([score, "id"], ascending=[False, True]).reset_index(drop=True)
    positions = {"best": 0, "median": (len(ranked) - 1) // 2, "worst": len(ranked) - 1}
    return {label: str(ranked.loc[positions[label], "id"]) for label in CASE_LABELS}


def save_cases(
    run_dir: str | Path,
    ids: list[str],
    images: np.ndarray,
    masks: np.ndarray,
    probabilities: np.ndarray,
    scores: list[float],
    labels: tuple[str, ...] = CASE_LABELS,
) -> Path:
    """Write ``cases.npz``: images (N, H, W, 3) uint8, masks (N, H, W) uint8 in {0, 1},
    probabilities (N, H, W) float16 in [0, 1], with ids, labels and scores."""
    count = len(ids)
    if not (len(images) == len(masks) == len(probabilities) == len(scores) == len(labels) == count):
        raise ValueError(
            "save_cases: ids, images, masks, probabilities, scores and labels differ in length"
        )
    path = Path(run_dir) / CASES_FILE
    with atomic_open(path, "wb") as handle:
        np.savez_compressed(
            handle,
            ids=np.asarray(ids, dtype=str),
            labels=np.asarray(labels, dtype=str),
            scores=np.asarray(scores, dtype=np.float64),
            images=np.asarray(images, dtype=np.uint8),
            masks=np.asarray(masks, dtype=np.uint8),
            probabilities=np.asarray(probabilities, dtype=np.float16),
        )
    return path


def load_cases(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays saved by :func:`save_cases`, or None when the run has none."""
    path = Path(run_dir) / CASES_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def case_figure(run_dir: str | Path, threshold: float = THRESHOLD):
    """The best/median/worst grid (image, truth, prediction) of a run's saved cases, or
    None when it saved none."""
    from egeunet.figures import case_grid

    cases = load_cases(run_dir)
    if cases is None:
        return None
    titles = [
        f"{label}: {case_id} (DSC {100 * score:.1f})"
        for label, case_id, score in zip(
            cases["labels"], cases["ids"], cases["scores"], strict=True
        )
    ]
    predictions = (cases["probabilities"] >= threshold).astype(np.uint8)
    return case_grid(cases["images"], cases["masks"], predictions, titles)
