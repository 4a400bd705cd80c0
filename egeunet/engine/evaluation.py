"""Evaluation: metrics of a model over a split, and the one writer of evaluation outputs.

:func:`write_evaluation` writes what a finished run and ``egeunet evaluate`` both leave in
their folder: ``per_image.csv``, ``predictions/`` (input | truth | prediction panels for a
fixed sample), ``cases.npz`` (best, median and worst images with their probabilities) and,
last, ``metrics.json`` (pooled and per-image metrics; its presence marks the folder done).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from egeunet.cases import CASE_LABELS, pick_cases, save_cases
from egeunet.checkpoint import LoadedModel, load_model, resolve_weights
from egeunet.data import PreparedDataset, SegmentationDataset
from egeunet.engine.config import TrainConfig
from egeunet.engine.protocols import (
    ProtocolSplits,
    make_split_loader,
    open_dataset,
    protocol_splits,
    single_threaded_batches,
)
from egeunet.fileio import json_safe, require_writable, write_json_atomic, write_text_atomic
from egeunet.losses import DeepSupervisionLoss
from egeunet.metrics import THRESHOLD, MetricAccumulator
from egeunet.model import EGEUNet, EGEUNetConfig, count_parameters
from egeunet.predict import comparison_panel, resolve_device, save_png
from egeunet.runfolder import RunFolder

UNKNOWN_SELECTION = "unknown model selection (the checkpoint records no training run)"
PREDICTION_SAMPLE_SEED = 0


@dataclass
class Evaluation:
    """Loss and metrics of one pass over a split."""

    loss: float
    metrics: MetricAccumulator


@torch.inference_mode()
def evaluate_loader(
    model: nn.Module,
    loader,
    ids: Sequence[str],
    loss_fn: nn.Module,
    device: torch.device,
    amp: bool = False,
    compute_hd95: bool = False,
    threshold: float = THRESHOLD,
) -> Evaluation:
    """Mean loss (weighted by images) and metrics of ``model`` over an unshuffled loader."""
    model.eval()
    accumulator = MetricAccumulator(threshold=threshold, compute_hd95=compute_hd95)
    total = torch.zeros((), dtype=torch.float64)
    seen = 0
    for images, masks in single_threaded_batches(loader):
        images, masks = images.to(device), masks.to(device)
        with torch.autocast(device.type, enabled=amp):
            outputs = model(images)
        total += loss_fn(outputs, masks).double().cpu() * len(images)
        probabilities = torch.sigmoid(outputs[0].float())
        accumulator.update(probabilities, masks, ids[seen : seen + len(images)])
        seen += len(images)
    if seen != len(ids):
        raise RuntimeError(f"the loader gave {seen} images for {len(ids)} ids")
    return Evaluation(loss=float(total) / max(seen, 1), metrics=accumulator)


def metrics_document(
    evaluation: Evaluation, splits: ProtocolSplits, split: str, model_config: EGEUNetConfig
) -> dict:
    """The metrics.json layout for one evaluation; undefined metrics (NaN) are None, as
    the strict JSON file stores them (null)."""
    results = evaluation.metrics.results()
    document = {
        "protocol": splits.protocol,
        "selection": splits.selection,
        "best_epoch": None,
        "pooled": results["pooled"],
        "per_image": results["per_image"],
        "split": split,
        "num_images": evaluation.metrics.num_images,
        "loss": evaluation.loss,
        "threshold": evaluation.metrics.threshold,
        "counts": splits.counts(),
        "validation_source": splits.val_source,
        "conventions": {
            "pooled": "one confusion matrix over every pixel of the split (the paper's); "
            "iou is the lesion IoU the paper calls mIoU",
            "per_image": "computed per image, then mean/median; isic_score = mean per-image "
            "Jaccard with values < 0.65 counted as 0; hd95 in pixels at the evaluated "
            "size, image diagonal when exactly one mask is empty",
            "undefined": "null where a ratio has a zero denominator, e.g. sensitivity of a "
            "split without lesion pixels",
        },
        "model": json.loads(json.dumps(model_config.to_dict())),
        "num_parameters": count_parameters(EGEUNet(model_config)),
    }
    return json_safe(document)


def write_rows_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    write_text_atomic(path, buffer.getvalue())


def write_prediction_samples(
    folder: Path,
    model: nn.Module,
    prepared: PreparedDataset,
    ids: Sequence[str],
    count: int,
    normalization: str,
    device: torch.device,
    threshold: float = THRESHOLD,
) -> list[str]:
    """``<id>.png`` panels (input | truth | prediction) for a fixed sample of ``ids``."""
    if count <= 0 or not ids:
        return []
    positions = np.random.default_rng(PREDICTION_SAMPLE_SEED).permutation(len(ids))[:count]
    chosen = [ids[p] for p in sorted(positions.tolist())]
    dataset = SegmentationDataset(prepared, chosen, augment=False, normalization=normalization)
    predictions = (_probabilities(model, dataset, device) >= threshold).numpy()
    rows = prepared.index_of(chosen)
    for image_id, row, prediction in zip(chosen, rows, predictions, strict=True):
        panel = comparison_panel(
            np.asarray(prepared.images[row]), np.asarray(prepared.masks[row]) > 0, prediction
        )
        save_png(folder / f"{image_id}.png", panel)
    return chosen


def _probabilities(model: nn.Module, dataset: SegmentationDataset, device: torch.device):
    """Lesion probabilities ``(N, H, W)`` of every image of ``dataset`` (one batch)."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).to(device)
    model.eval()
    with torch.inference_mode():
        return torch.sigmoid(model(images)[0].float())[:, 0].cpu()


def write_cases(
    path: Path,
    model: nn.Module,
    prepared: PreparedDataset,
    rows: list[dict],
    normalization: str,
    device: torch.device,
) -> Path:
    """``cases.npz``: the best, median and worst image of ``rows`` (per-image DSC) with
    truth and predicted probabilities at the evaluated size (:func:`egeunet.cases.save_cases`)."""
    per_image = pd.DataFrame(rows)
    chosen = pick_cases(per_image)
    ids = [chosen[label] for label in CASE_LABELS]
    scores = per_image.set_index("id").loc[ids, "dsc"].astype(float).tolist()
    dataset = SegmentationDataset(prepared, ids, augment=False, normalization=normalization)
    probabilities = _probabilities(model, dataset, device).numpy()
    index = prepared.index_of(ids)
    return save_cases(
        path.parent, ids, prepared.images[index], prepared.masks[index], probabilities, scores
    )


def write_evaluation(
    folder: RunFolder,
    evaluation: Evaluation,
    document: dict,
    model: nn.Module,
    prepared: PreparedDataset,
    ids: Sequence[str],
    config: TrainConfig,
    device: torch.device,
) -> dict:
    """Write an evaluation's files into ``folder`` (metrics.json last) and return ``document``."""
    rows = evaluation.metrics.per_image_rows()
    write_rows_csv(folder.per_image, rows, list(rows[0]))
    write_prediction_samples(
        folder.predictions, model, prepared, ids, config.num_prediction_samples,
        config.normalization, device, evaluation.metrics.threshold,
    )  # fmt: skip
    write_cases(folder.cases, model, prepared, rows, config.normalization, device)
    write_json_atomic(folder.metrics, document)
    return document


def evaluate(
    checkpoint: str | os.PathLike,
    split: str = "test",
    *,
    output: str | os.PathLike | None = None,
    dataset: str | None = None,
    data_root: str | os.PathLike | None = None,
    protocol: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    threshold: float = THRESHOLD,
    num_prediction_samples: int | None = None,
) -> dict:
    """Evaluate a checkpoint on ``split`` ("train", "val" or "test") of its protocol.

    The data and protocol come from the checkpoint's train config; ``dataset``,
    ``data_root`` and ``protocol`` override them (needed for the authors' raw
    checkpoints, which carry none). ``checkpoint`` is a file or the name of shipped weights
    (:data:`~egeunet.checkpoint.SHIPPED_WEIGHTS`). Writes metrics.json, per_image.csv,
    predictions/ and cases.npz into ``output`` (default: ``<run>/evaluations/<checkpoint>-
    <split>/`` for a checkpoint inside a run folder, ``evaluations/<name>-<split>/`` for
    shipped weights, else ``<checkpoint>-<split>/`` beside it).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    source = resolve_weights(checkpoint)
    loaded = load_model(source)
    if output:
        out = Path(output)
    elif source != Path(checkpoint):  # shipped weights: never write into the package
        out = Path("evaluations") / f"{checkpoint}-{split}"
    else:
        out = _default_evaluation_folder(source, split)
    require_writable(out, "evaluation output folder (--output)")
    given = {
        "dataset": dataset,
        "data_root": str(data_root) if data_root else None,
        "protocol": protocol,
        "batch_size": batch_size,
        "device": device,
        "num_prediction_samples": num_prediction_samples,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    if loaded.train_config is None and dataset is None:
        raise ValueError(
            f"checkpoint {checkpoint} carries no train config: pass dataset (--dataset) "
            "and, for real data, data_root (--data-root)"
        )
    base = TrainConfig.from_dict(loaded.train_config) if loaded.train_config else TrainConfig()
    config = replace(base, model=loaded.model.config, **overrides)
    prepared = open_dataset(config)
    splits = protocol_splits(config, prepared)
    ids = splits.part(split)
    torch_device = resolve_device(config.device)
    model = loaded.model.to(torch_device)
    loader = make_split_loader(config, prepared, ids, train=False)
    evaluation = evaluate_loader(
        model, loader, ids, DeepSupervisionLoss(), torch_device, compute_hd95=True,
        threshold=threshold,
    )  # fmt: skip
    document = metrics_document(evaluation, splits, split, config.model)
    document.update(
        selection=checkpoint_selection(loaded, config),
        best_epoch=loaded.epoch,
        checkpoint=str(checkpoint),
        checkpoint_layout=loaded.layout,
    )
    write_evaluation(
        RunFolder(out), evaluation, document, model, prepared, ids, config, torch_device
    )
    return {**document, "output": str(out)}


def checkpoint_selection(loaded: LoadedModel, config: TrainConfig) -> str:
    """How the evaluated checkpoint was chosen: a property of its training run, not of the
    protocol it is evaluated under. Under another protocol or dataset than its own run the
    label says so, as those splits may overlap the data the run trained or selected on."""
    recorded = loaded.checkpoint.get("selection") if loaded.layout == "egeunet" else None
    if recorded is None:
        return UNKNOWN_SELECTION
    trained = loaded.train_config or {}
    own = (trained.get("dataset"), loaded.checkpoint.get("protocol"))
    if own == (config.dataset, config.protocol):
        return recorded
    return (
        f"{recorded} ({own[1]} protocol on {own[0]}); evaluated under the {config.protocol} "
        f"protocol on {config.dataset}, whose splits may overlap its training or selection data"
    )


def _default_evaluation_folder(checkpoint: Path, split: str) -> Path:
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "evaluations" / f"{checkpoint.stem}-{split}"
    return checkpoint.parent / f"{checkpoint.stem}-{split}"
