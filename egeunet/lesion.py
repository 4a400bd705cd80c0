"""Segmenting a user's own images and measuring the lesion (what ``05_inference`` does).

Files go through :func:`egeunet.predict.predict` (masks and overlays at each image's own
size); :func:`area_table` then measures every written mask. :class:`LesionExplorer` keeps
uploaded images' probability maps in memory so a threshold can be changed without running
the model again; :mod:`egeunet.app` wraps it in widgets (JupyterLab, and the web app).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image

from egeunet import figures
from egeunet.data import normalize
from egeunet.metrics import THRESHOLD
from egeunet.predict import (
    find_inputs,
    load_backend,
    probabilities_at_original_size,
    read_image,
)

AREA_COLUMNS = ["lesion_pixels", "total_pixels", "lesion_fraction", "lesion_area_mm2"]


def lesion_area(mask: np.ndarray, pixel_size_mm: float = 0.0) -> dict:
    """Size of a binary ``mask`` (H, W): lesion pixels, their share of the image and, when
    the side of one pixel in millimetres is known (> 0), the area in mm^2 (else NaN)."""
    lesion = int(np.count_nonzero(mask))
    total = int(mask.size)
    return {
        "lesion_pixels": lesion,
        "total_pixels": total,
        "lesion_fraction": lesion / total if total else math.nan,
        "lesion_area_mm2": lesion * pixel_size_mm**2 if pixel_size_mm > 0 else math.nan,
    }


def area_table(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    output_dir: str | os.PathLike,
    pixel_size_mm: float = 0.0,
) -> pd.DataFrame:
    """One row per image that :func:`egeunet.predict.predict` segmented from ``inputs`` into
    ``output_dir``: its name, width, height and :func:`lesion_area` of its mask."""
    inputs = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    rows = []
    for source, stem in find_inputs(inputs, output=output_dir):
        mask_path = Path(output_dir) / stem.with_name(f"{stem.name}_mask.png")
        if not mask_path.is_file():
            continue  # unreadable input, reported by predict
        mask = np.asarray(Image.open(mask_path)) > 0
        rows.append(
            {
                "image": source.name,
                "width": mask.shape[1],
                "height": mask.shape[0],
                **lesion_area(mask, pixel_size_mm),
                "mask": str(mask_path),
            }
        )
    columns = ["image", "width", "height", *AREA_COLUMNS, "mask"]
    return pd.DataFrame(rows, columns=columns)


def overlay_figure(table: pd.DataFrame, output_dir: str | os.PathLike, columns: int = 4) -> Figure:
    """The overlays ``predict`` wrote for the rows of ``table``, titled with lesion shares."""
    pictures, titles = [], []
    for row in table.itertuples():
        overlay_path = Path(row.mask.replace("_mask.png", "_overlay.png"))
        if overlay_path.is_file():
            pictures.append(np.asarray(Image.open(overlay_path).convert("RGB")))
            titles.append(f"{row.image}: lesion {100 * row.lesion_fraction:.1f}%")
    return figures.picture_grid(pictures, titles, columns)


class Segmenter:
    """A model (checkpoint, shipped weights or ONNX file), ready to give lesion
    probabilities for RGB arrays exactly as ``predict`` computes them."""

    def __init__(
        self, weights: str | os.PathLike, device: str = "auto", backend: str = "torch"
    ) -> None:
        self.model = load_backend(weights, backend, device)
        self.size = self.model.size

    def probabilities(self, model_input: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Lesion probability (H, W) = ``size``, float32, from the (S, S, 3) uint8 model
        input that :func:`~egeunet.predict.read_image` gives, exactly as ``predict`` does."""
        tensor = torch.from_numpy(model_input.copy()).permute(2, 0, 1)  # (3, S, S)
        batch = normalize(tensor, self.model.normalization)[None]
        return probabilities_at_original_size(self.model.probabilities(batch), [size])[0].numpy()


@dataclass
class SegmentedImage:
    """One image as shown to the model's user: its pixels and lesion probabilities."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8, upright
    probability: np.ndarray  # (H, W) float32


class LesionExplorer:
    """Images, their probabilities and a threshold: the state behind the widgets.

    Images are kept by name (a repeated name gets ``-1``, ``-2``, ...); the last one loaded
    is the current one, which :meth:`mask` and :meth:`area` measure unless
    given another name. The threshold applies without running the model again.
    """

    def __init__(
        self, segmenter: Segmenter, threshold: float = THRESHOLD, pixel_size_mm: float = 0.0
    ):
        self.segmenter = segmenter
        self.threshold = threshold
        self.pixel_size_mm = pixel_size_mm
        self.images: dict[str, SegmentedImage] = {}
        self.current: str | None = None

    def load(self, name: str, content: bytes) -> str:
        """Segment an uploaded file's bytes and make it the current image; returns the name
        it is kept under. ValueError naming the file if it is unreadable."""
        image, model_input = read_image(content, self.segmenter.size, name)  # as predict reads it
        probability = self.segmenter.probabilities(model_input, image.shape[:2])
        unique, n = name, 0
        while unique in self.images:
            n += 1
            stem, dot, suffix = name.rpartition(".")
            unique = f"{stem}-{n}.{suffix}" if dot else f"{name}-{n}"
        self.images[unique] = SegmentedImage(unique, image, probability)
        self.current = unique
        return unique

    def _get(self, name: str | None) -> SegmentedImage:
        name = self.current if name is None else name
        if name is None:
            raise ValueError("no image loaded yet")
        if name not in self.images:
            raise KeyError(f"no image named {name!r} is loaded")
        return self.images[name]

    @property
    def name(self) -> str:
        return self.current or ""

    @property
    def image(self) -> np.ndarray | None:
        return self.images[self.current].image if self.current else None

    @property
    def probability(self) -> np.ndarray | None:
        return self.images[self.current].probability if self.current else None

    def mask(self, name: str | None = None) -> np.ndarray:
        """The lesion mask (H, W) bool of image ``name`` (default: the current one), from
        the same float32 comparison as predict's."""
        return self._get(name).probability >= np.float32(self.threshold)

    def area(self, name: str | None = None) -> dict:
        return lesion_area(self.mask(name), self.pixel_size_mm)

    def area_rows(self) -> pd.DataFrame:
        """One row per image: name, width, height, threshold and :func:`lesion_area`."""
        rows = [
            {
                "image": name,
                "width": item.image.shape[1],
                "height": item.image.shape[0],
                "threshold": self.threshold,
                **self.area(name),
            }
            for name, item in self.images.items()
        ]
        columns = ["image", "width", "height", "threshold", *AREA_COLUMNS]
        return pd.DataFrame(rows, columns=columns)
