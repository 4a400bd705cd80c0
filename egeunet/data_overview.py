"""A prepared dataset at a glance (what ``01_data`` shows and writes): counts per split,
original image sizes, lesion-area fractions and a grid of examples with their masks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from egeunet import figures
from egeunet.data import PreparedDataset
from egeunet.fileio import atomic_open, write_json_atomic, write_text_atomic

SPLIT_PROTOCOLS = ("challenge", "paper")
EXAMPLES_FOLDER = "example_images"


def split_counts(prepared: PreparedDataset) -> pd.DataFrame:
    """Images per part (train/val/test) of each split protocol, one row per part."""
    rows = []
    for protocol in SPLIT_PROTOCOLS:
        for part, ids in prepared.split(protocol).items():
            rows.append({"split": protocol, "part": part, "images": len(ids)})
    return pd.DataFrame(rows, columns=["split", "part", "images"])


def image_table(prepared: PreparedDataset) -> pd.DataFrame:
    """One row per image: id, original height and width, lesion fraction of the source
    mask, and the part of the paper split it belongs to."""
    sizes = prepared.original_sizes  # (N, 2): height, width
    part_of = {i: part for part, ids in prepared.split("paper").items() for i in ids}
    return pd.DataFrame(
        {
            "id": prepared.ids,
            "original_height": sizes[:, 0],
            "original_width": sizes[:, 1],
            "lesion_fraction": prepared.lesion_fractions,
            "paper_part": [part_of.get(i, "") for i in prepared.ids],
        }
    )


def example_indices(count: int, total: int, seed: int) -> np.ndarray:
    """``count`` distinct row numbers out of ``total``, drawn with ``seed``, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(count, total), replace=False))


def example_grid(prepared: PreparedDataset, rows: np.ndarray) -> Figure:
    """The images at ``rows`` with their lesion masks overlaid."""
    return figures.overlay_grid(
        [prepared.images[i] for i in rows],
        [prepared.masks[i] for i in rows],
        [prepared.ids[i] for i in rows],
    )


def distributions(table: pd.DataFrame) -> Figure:
    """Histograms of original image heights, widths and lesion-area fractions."""
    return figures.distribution_panels(
        table,
        {
            "original_height": "original height (px)",
            "original_width": "original width (px)",
            "lesion_fraction": "lesion area / image area",
        },
    )


@dataclass
class DataOverview:
    """Tables and figures of one dataset, as ``01_data`` shows them."""

    prepared: PreparedDataset
    counts: pd.DataFrame
    images: pd.DataFrame
    distributions: Figure
    examples: Figure
    example_rows: np.ndarray

    def summary(self) -> dict:
        fractions = self.images["lesion_fraction"]
        return {
            "dataset": self.prepared.name,
            "size": self.prepared.size,
            "num_images": len(self.prepared),
            "manifest_hash": self.prepared.manifest_hash,
            "splits": {f"{r.split}/{r.part}": int(r.images) for r in self.counts.itertuples()},
            "lesion_fraction": {
                "mean": float(fractions.mean()),
                "median": float(fractions.median()),
                "min": float(fractions.min()),
                "max": float(fractions.max()),
            },
            "original_sizes": sorted(
                {
                    f"{h}x{w}"
                    for h, w in zip(
                        self.images["original_height"], self.images["original_width"], strict=True
                    )
                }
            ),
        }

    def save(self, output_dir: str | Path) -> list[Path]:
        """Write summary.json, split_counts.csv, images.csv and both figures (PNG+SVG)."""
        output_dir = Path(output_dir)
        write_json_atomic(output_dir / "summary.json", self.summary())
        write_text_atomic(output_dir / "split_counts.csv", self.counts.to_csv(index=False))
        write_text_atomic(output_dir / "images.csv", self.images.to_csv(index=False))
        paths = [
            output_dir / "summary.json",
            output_dir / "split_counts.csv",
            output_dir / "images.csv",
        ]
        paths += figures.save_figure(self.distributions, output_dir / "distributions")
        paths += figures.save_figure(self.examples, output_dir / "examples")
        paths += self.save_example_images(output_dir / EXAMPLES_FOLDER)
        return paths

    def save_example_images(self, folder: Path) -> list[Path]:
        """The example images themselves (no overlay) as ``<id>.png``: inputs for trying
        inference (``05_inference``) on images the model can be checked against."""
        paths = []
        for row in self.example_rows:
            path = folder / f"{self.prepared.ids[row]}.png"
            with atomic_open(path, "wb") as handle:
                Image.fromarray(np.asarray(self.prepared.images[row])).save(handle, format="PNG")
            paths.append(path)
        return paths


def overview(prepared: PreparedDataset, num_examples: int = 8, seed: int = 0) -> DataOverview:
    """Everything ``01_data`` shows for ``prepared``."""
    images = image_table(prepared)
    rows = example_indices(num_examples, len(prepared), seed)
    return DataOverview(
        prepared,
        split_counts(prepared),
        images,
        distributions(images),
        example_grid(prepared, rows),
        rows,
    )
