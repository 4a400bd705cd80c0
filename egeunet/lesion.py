"""Segmenting a user's own images and measuring the lesion (what ``05_inference`` does).

Files go through :func:`egeunet.predict.predict` (masks and overlays at each image's own
size); :func:`area_table` then measures every written mask. :class:`LesionExplorer` keeps
one image's probability map in memory so a threshold can be changed without running the
model again; :func:`interactive_view` wraps it in ipywidgets (a file upload and a
threshold slider) for JupyterLab.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image

from egeunet import figures
from egeunet.data import normalize
from egeunet.predict import (
    find_inputs,
    load_backend,
    probabilities_at_original_size,
    read_image,
)


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
    columns = [
        "image",
        "width",
        "height",
        "lesion_pixels",
        "total_pixels",
        "lesion_fraction",
        "lesion_area_mm2",
        "mask",
    ]
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


class LesionExplorer:
    """One image, its probabilities and a threshold: the state behind the widgets."""

    def __init__(self, segmenter: Segmenter, threshold: float = 0.5, pixel_size_mm: float = 0.0):
        self.segmenter = segmenter
        self.threshold = threshold
        self.pixel_size_mm = pixel_size_mm
        self.name = ""
        self.image: np.ndarray | None = None
        self.probability: np.ndarray | None = None

    def load(self, name: str, content: bytes) -> None:
        """Read an uploaded file's bytes (ValueError naming the file if unreadable)."""
        image, model_input = read_image(content, self.segmenter.size, name)  # as predict reads it
        self.name, self.image = name, image
        self.probability = self.segmenter.probabilities(model_input, image.shape[:2])

    def mask(self) -> np.ndarray:
        if self.probability is None:
            raise ValueError("no image loaded yet")
        return self.probability >= self.threshold

    def area(self) -> dict:
        return lesion_area(self.mask(), self.pixel_size_mm)

    def figure(self) -> Figure:
        mask = self.mask()
        share = 100 * self.area()["lesion_fraction"]
        return figures.picture_grid(
            [self.image, figures.overlay_mask(self.image, mask)],
            [self.name, f"lesion {share:.1f}% at threshold {self.threshold:.2f}"],
            columns=2,
        )


def interactive_view(explorer: LesionExplorer):
    """ipywidgets for JupyterLab: upload an image, move the threshold, see the overlay and
    the lesion area. Returns the widget box to display."""
    import ipywidgets as widgets
    from IPython.display import display

    upload = widgets.FileUpload(accept="image/*", multiple=False, description="image")
    slider = widgets.FloatSlider(
        value=explorer.threshold, min=0.05, max=0.95, step=0.05, description="threshold"
    )
    output = widgets.Output()

    def render(*_: object) -> None:
        explorer.threshold = slider.value
        with output:
            output.clear_output(wait=True)
            if explorer.probability is None:
                print("upload an image to segment it")
                return
            figures.show(explorer.figure())
            display(pd.DataFrame([explorer.area()]))

    def on_upload(change: dict) -> None:
        for item in change["new"]:
            try:
                explorer.load(item["name"], bytes(item["content"]))
            except ValueError as error:
                with output:
                    output.clear_output()
                    print(error)
                return
        render()

    upload.observe(on_upload, names="value")
    slider.observe(render, names="value")
    render()
    return widgets.VBox([widgets.HBox([upload, slider]), output])
