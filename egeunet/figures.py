"""Figures for the notebooks and the study report.

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot state, so
nothing leaks between figures and no display backend is needed) and returns it;
:func:`save_figure` writes it as PNG and SVG. Notebooks display the returned figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from egeunet.fileio import atomic_open
from egeunet.overlay import PREDICTION_COLOUR, TRUTH_COLOUR, overlay

FIGURE_FORMATS = ("png", "svg")
# Byte-identical files from the same figure: no creation date, and SVG element ids hashed
# from a fixed salt instead of a random one, so rebuilding a committed report changes
# only the figures whose content changed.
STABLE_METADATA = {"png": {}, "svg": {"Date": None}}
STABLE_SVG = {"svg.hashsalt": "egeunet"}


def save_figure(
    figure: Figure,
    stem: str | Path,
    dpi: int = 150,
    max_svg_bytes: int | None = None,
    max_png_bytes: int | None = None,
) -> list[Path]:
    """Write ``figure`` to ``<stem>.png`` and ``<stem>.svg`` atomically; return the paths
    written, PNG first. An SVG over ``max_svg_bytes`` (pictures make them large) is not
    kept; a PNG over ``max_png_bytes`` is written again at lower resolution until it fits."""
    stem = Path(stem)
    paths = []
    for fmt in FIGURE_FORMATS:
        path = stem.with_name(f"{stem.name}.{fmt}")
        resolution = dpi
        while True:
            with atomic_open(path, "wb") as handle, matplotlib.rc_context(STABLE_SVG):
                figure.savefig(
                    handle,
                    format=fmt,
                    dpi=resolution,
                    bbox_inches="tight",
                    metadata=STABLE_METADATA[fmt],
                )
            size = path.stat().st_size
            if fmt != "png" or max_png_bytes is None or size <= max_png_bytes or resolution <= 40:
                break
            resolution = int(resolution * 0.7)
        if fmt == "svg" and max_svg_bytes is not None and size > max_svg_bytes:
            path.unlink()
            continue
        paths.append(path)
    return paths


def overlay_mask(
    image: np.ndarray, mask: np.ndarray, colour: Sequence[int] = PREDICTION_COLOUR
) -> np.ndarray:
    """:func:`egeunet.overlay.overlay` as float RGB in [0, 1], for matplotlib."""
    return overlay(image, mask, colour).astype(np.float32) / 255.0


def picture_grid(pictures: Sequence[np.ndarray], titles: Sequence[str], columns: int = 4) -> Figure:
    """RGB pictures (H, W, 3), uint8 or float in [0, 1], in a grid with a title each."""
    count = len(pictures)
    columns = max(1, min(columns, count))
    rows = max(1, -(-count // columns))
    figure = Figure(figsize=(2.6 * columns, 2.6 * rows))
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for index, axis in enumerate(axes):
        axis.set_axis_off()
        if index < count:
            axis.imshow(pictures[index])
            axis.set_title(titles[index], fontsize=8)
    figure.tight_layout()
    return figure


def overlay_grid(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    titles: Sequence[str],
    predictions: Sequence[np.ndarray] | None = None,
    columns: int = 4,
) -> Figure:
    """A grid of images (H, W, 3) uint8 with their masks (H, W) overlaid in green and,
    when given, predicted masks (H, W) in red."""
    pictures = []
    for index, image in enumerate(images):
        picture = overlay_mask(image, masks[index], TRUTH_COLOUR)
        if predictions is not None:
            picture = overlay_mask((picture * 255).astype(np.uint8), predictions[index])
        pictures.append(picture)
    return picture_grid(pictures, titles, columns)


def distribution_panels(table: pd.DataFrame, columns: dict[str, str], bins: int = 20) -> Figure:
    """Histograms of several columns of ``table`` side by side; ``columns`` maps a column
    name to its axis label."""
    figure = Figure(figsize=(4 * len(columns), 3.2))
    axes = np.atleast_1d(figure.subplots(1, len(columns), squeeze=False)).ravel()
    for axis, (column, label) in zip(axes, columns.items(), strict=True):
        sns.histplot(data=table, x=column, bins=bins, ax=axis)
        axis.set_xlabel(label)
    figure.tight_layout()
    return figure


def learning_curves(
    history: pd.DataFrame, order: Sequence[str] | None = None, title: str = ""
) -> Figure:
    """Training and validation loss and validation DSC per epoch, one line per variant
    (mean over seeds, band = standard deviation). ``history`` has columns variant, seed,
    epoch, train_loss, val_loss and val_dsc (missing columns are skipped)."""
    panels = [c for c in ("train_loss", "val_loss", "val_dsc") if c in history.columns]
    figure = Figure(figsize=(4.2 * max(1, len(panels)), 3.4))
    axes = np.atleast_1d(figure.subplots(1, max(1, len(panels)), squeeze=False)).ravel()
    for axis, column in zip(axes, panels, strict=False):
        sns.lineplot(
            data=history,
            x="epoch",
            y=column,
            hue="variant",
            hue_order=order,
            errorbar="sd",
            ax=axis,
            marker="o" if history["epoch"].nunique() <= 20 else None,
        )
        axis.set_title(column.replace("_", " "))
        axis.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def budget_curves(
    short: pd.DataFrame, long: pd.DataFrame, metric: str, label: str, title: str = ""
) -> Figure:
    """``metric`` per epoch of longer runs (one line per run) against shorter ones (mean
    over seeds, band = standard deviation), with a dotted line where the short budget
    ends. Both tables have columns variant, seed, epoch and ``metric``."""
    figure = Figure(figsize=(7.5, 3.6))
    axis = figure.subplots()
    sns.lineplot(data=short, x="epoch", y=metric, hue="variant", errorbar="sd", ax=axis)
    for (variant, seed), run in long.groupby(["variant", "seed"], sort=True):
        run = run.sort_values("epoch")
        axis.plot(run["epoch"], run[metric], color="tab:red", label=f"{variant}, seed {seed}")
    if len(short):
        axis.axvline(short["epoch"].max(), color="grey", linestyle=":", linewidth=1)
    axis.set_ylabel(label)
    axis.legend(fontsize=7)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    return figure


def ablation_bars(runs: pd.DataFrame, metric: str, label: str, order: Sequence[str]) -> Figure:
    """Bars of ``metric`` (in percent) per variant: mean over seeds with a standard-deviation
    error bar, each seed's value as a dot."""
    values = runs.assign(value=100 * runs[metric])
    summary = values.groupby("variant")["value"].agg(["mean", "std"]).reindex(order)
    figure = Figure(figsize=(1.3 * len(order) + 2.5, 3.6))
    axis = figure.subplots()
    positions = np.arange(len(order))
    axis.bar(positions, summary["mean"], yerr=summary["std"].fillna(0), capsize=4, alpha=0.7)
    for position, variant in zip(positions, order, strict=True):
        seeds = values.loc[values["variant"] == variant, "value"]
        axis.scatter(np.full(len(seeds), position), seeds, color="black", s=10, zorder=3)
    axis.set_xticks(positions, order, rotation=30, ha="right")
    axis.set_ylabel(f"{label} (%)")
    low = np.nanmin(values["value"]) if len(values) else 0.0
    axis.set_ylim(max(0.0, low - 5), min(100.0, np.nanmax(values["value"]) + 3))
    figure.tight_layout()
    return figure


def _label_points(
    axis, table: pd.DataFrame, label: str, x: str, y: str, offset: tuple[int, int]
) -> None:
    """Write each row's ``label`` beside its (x, y) point, ``offset`` in display points."""
    for _, row in table.iterrows():
        axis.annotate(
            row[label], (row[x], row[y]), fontsize=7, xytext=offset, textcoords="offset points"
        )


def _spread_labels(
    axis, labels: Sequence[tuple[str, float, float]], fontsize: int = 7, gap: float = 1.3
) -> None:
    """Write each ``(text, x, y)`` label to the right of its point; where labels would
    overlap (points close together), move them down one under the other, each joined to
    its point by a thin line. Call after the axis scales are set."""
    axis.autoscale_view()
    to_points = 72 / axis.figure.dpi
    placed: list[tuple[float, float, float]] = []  # (left, right, baseline) in points
    line = fontsize * gap
    order = sorted(labels, key=lambda label: -axis.transData.transform((label[1], label[2]))[1])
    for text, x, y in order:
        px, py = axis.transData.transform((x, y)) * to_points
        left, right = px + 4, px + 4 + 0.55 * fontsize * len(str(text))
        baseline = py + 2
        for other_left, other_right, other_baseline in placed:
            overlaps_x = left < other_right and other_left < right
            if overlaps_x and baseline > other_baseline - line:
                baseline = other_baseline - line
        placed.append((left, right, baseline))
        moved = baseline < py + 2 - 0.5
        axis.annotate(
            str(text),
            (x, y),
            xytext=(4, baseline - py),
            textcoords="offset points",
            fontsize=fontsize,
            va="bottom" if not moved else "center",
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if moved else None,
        )


def dsc_against_parameters(ours: pd.DataFrame, references: pd.DataFrame, title: str = "") -> Figure:
    """DSC (percent) against parameter count on a log axis. ``ours`` has columns variant,
    params, dsc_mean, dsc_std (percent); ``references`` has model, label, params and dsc
    (reported figures, one marker per label, e.g. "paper (third-party)")."""
    figure = Figure(figsize=(6.2, 4.2))
    axis = figure.subplots()
    axis.errorbar(
        ours["params"],
        ours["dsc_mean"],
        yerr=ours["dsc_std"].fillna(0),
        fmt="o",
        color="tab:blue",
        capsize=3,
        label="this study (mean ± sd over seeds)",
    )
    _label_points(axis, ours, "variant", "params", "dsc_mean", (4, 4))
    styles = iter(zip("sD^vP*", ("tab:red", "tab:orange", "tab:green", "tab:purple"), strict=False))
    for label, group in references.groupby("label", sort=False):
        marker, colour = next(styles, ("s", "tab:grey"))
        axis.scatter(
            group["params"],
            group["dsc"],
            marker=marker,
            color=colour,
            alpha=0.8,
            label=f"reported: {label}",
        )
    axis.set_xscale("log")
    axis.set_xlabel("parameters (log scale)")
    axis.set_ylabel("DSC (%)")
    axis.legend(fontsize=7)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    return figure


def per_image_distribution(
    per_image: pd.DataFrame, order: Sequence[str], title: str = ""
) -> Figure:
    """Box plot of per-image DSC per variant (all seeds pooled), points overlaid."""
    figure = Figure(figsize=(1.3 * len(order) + 2.5, 3.8))
    axis = figure.subplots()
    sns.boxplot(data=per_image, x="variant", y="dsc", order=order, ax=axis, fliersize=0)
    # The points, jittered sideways by a seeded generator (seaborn's stripplot draws from
    # numpy's global one, so the same data would give a different file each time).
    jitter = np.random.default_rng(0)
    for position, variant in enumerate(order):
        scores = per_image.loc[per_image["variant"] == variant, "dsc"].to_numpy()
        offsets = jitter.uniform(-0.08, 0.08, size=len(scores))
        axis.scatter(position + offsets, scores, s=4, color="black", alpha=0.4, linewidths=0)
    axis.set_ylabel("per-image DSC")
    axis.tick_params(axis="x", labelrotation=30)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    return figure


def case_grid(
    images: np.ndarray, masks: np.ndarray, predictions: np.ndarray, titles: Sequence[str]
) -> Figure:
    """One row per case: the image, the ground truth overlaid (green) and the prediction
    overlaid (red). images (N, H, W, 3) uint8, masks and predictions (N, H, W) in {0, 1}."""
    rows = len(images)
    figure = Figure(figsize=(7.5, 2.6 * rows))
    axes = figure.subplots(rows, 3, squeeze=False)
    for row in range(rows):
        panels = (
            images[row] / 255.0,
            overlay_mask(images[row], masks[row], TRUTH_COLOUR),
            overlay_mask(images[row], predictions[row], PREDICTION_COLOUR),
        )
        for column, (axis, picture) in enumerate(zip(axes[row], panels, strict=True)):
            axis.imshow(picture)
            axis.set_axis_off()
            if column == 0:
                axis.set_title(titles[row], fontsize=8, loc="left")
    axes[0][1].set_title("ground truth", fontsize=8)
    axes[0][2].set_title("prediction", fontsize=8)
    figure.tight_layout()
    return figure


def parameters_against_flops(table: pd.DataFrame, reported: pd.DataFrame | None = None) -> Figure:
    """Parameters against FLOPs (both log scale) per variant; ``table`` has columns variant,
    params_total, macs_g and fvcore_full_g (or fvcore_flops_g); ``reported`` (optional) has model, params and
    gflops as the paper reports them."""
    figure = Figure(figsize=(6.2, 4.2))
    axis = figure.subplots()
    axis.scatter(table["macs_g"], table["params_total"], label="conv MACs (paper convention)")
    fvcore_column = "fvcore_full_g" if "fvcore_full_g" in table.columns else "fvcore_flops_g"
    axis.scatter(
        table[fvcore_column],
        table["params_total"],
        marker="x",
        label="fvcore FLOPs (all ops counted)",
    )
    labels = list(zip(table["variant"], table["macs_g"], table["params_total"], strict=True))
    if reported is not None and len(reported):
        axis.scatter(
            reported["gflops"],
            reported["params"],
            marker="s",
            color="tab:red",
            label="reported by the paper",
        )
        labels += [
            (f"{model} (paper)", x, y)
            for model, x, y in zip(
                reported["model"], reported["gflops"], reported["params"], strict=True
            )
        ]
    axis.set_xscale("log")
    axis.set_yscale("log")
    _spread_labels(axis, labels)
    axis.set_xlabel("G(MACs or FLOPs) per image")
    axis.set_ylabel("parameters")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def show(figure: Figure, dpi: int = 110) -> None:
    """Display ``figure`` in a notebook as a PNG (works on any kernel, whatever the
    matplotlib backend, and under papermill)."""
    import io

    from IPython.display import Image, display

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    display(Image(data=buffer.getvalue()))
