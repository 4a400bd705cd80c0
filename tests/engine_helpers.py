"""The tiny model, train config and checkpoint the engine, predict and fault tests share."""

from __future__ import annotations

from pathlib import Path

import torch

from egeunet.checkpoint import model_payload, save_checkpoint
from egeunet.engine import TrainConfig, train
from egeunet.model import EGEUNet, EGEUNetConfig

TINY_MODEL = EGEUNetConfig(widths=(4, 4, 8, 8, 12, 12))
TINY = TrainConfig(
    image_size=32,
    epochs=3,
    batch_size=4,
    max_train_images=12,
    max_eval_images=4,
    model=TINY_MODEL,
    num_prediction_samples=2,
    device="cpu",
    t_max=2,
)


def save_tiny_checkpoint(path: Path) -> EGEUNet:
    """Save a seeded tiny model (32x32 input, minmax) whose head bias puts some pixels on
    each side of the 0.5 threshold; returns the model."""
    torch.manual_seed(0)
    model = EGEUNet(TINY_MODEL)
    with torch.no_grad():
        model.head.bias.fill_(0.05)
    config = {"image_size": 32, "normalization": "minmax"}
    save_checkpoint(path, model_payload(model.eval(), train_config=config, epoch=3))
    return model


def train_small_checkpoint(folder: Path) -> Path:
    """The published model trained for one epoch on 8 synthetic images at 64x64 (seconds
    on one thread): a real training checkpoint whose masks are neither empty nor full on
    lesion images. Needs ``EGEUNET_CACHE`` pointed at a temporary folder (the synthetic
    set is generated there). Returns ``checkpoints/best.pt``."""

    config = TrainConfig(
        dataset="synthetic",
        image_size=64,
        epochs=1,
        batch_size=4,
        max_train_images=8,
        max_eval_images=4,
        device="cpu",
    )
    train(config, folder, progress=False, threads=1)
    return folder / "checkpoints" / "best.pt"


class Killed(Exception):
    """Stands for a process killed mid-run (raised by :func:`kill_after_epoch`)."""


def kill_after_epoch(last: int):
    """An ``on_epoch_end`` callback that stops the run once epoch ``last`` is written."""

    def callback(epoch: int, row: dict) -> None:
        if epoch == last:
            raise Killed

    return callback
