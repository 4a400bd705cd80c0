"""Masks drawn on pictures: the one tint-and-outline overlay used by ``egeunet predict``,
the training runs' prediction panels, the app and the report's figures, with one pair of
colours (truth green, prediction red)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TRUTH_COLOUR = (0, 200, 0)
PREDICTION_COLOUR = (255, 40, 40)
OVERLAY_ALPHA = 0.35


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with at least one 4-neighbour outside it (the image's edge does
    not count as outside)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~interior


def overlay(
    image: np.ndarray, mask: np.ndarray, colour: Sequence[int], alpha: float = OVERLAY_ALPHA
) -> np.ndarray:
    """Tint ``mask`` (H, W) bool on ``image`` (H, W, 3) uint8 and draw its outline solid;
    returns uint8 RGB."""
    mask = np.asarray(mask, dtype=bool)
    result = image.astype(np.float32)
    tint = np.asarray(colour, np.float32)
    result[mask] = (1 - alpha) * result[mask] + alpha * tint
    result[boundary(mask)] = tint
    return result.round().astype(np.uint8)
