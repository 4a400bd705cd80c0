"""Real-data check (slow): the published recipe learns ISIC 2017 in 20 epochs.

Twenty epochs on the 2000 ISIC 2017 challenge training images, selected and evaluated on
its 150 validation images (protocol "challenge"), must reach a pooled DSC of at least
0.80. About 16 minutes on two idle CPU cores; run with ``pytest -m slow tests/test_engine_slow.py``.
"""

from __future__ import annotations

import csv

import pytest

from egeunet.engine import TrainConfig, train

pytestmark = pytest.mark.slow


def test_twenty_epochs_on_isic2017_reach_dsc_080(shared_data, tmp_path):
    config = TrainConfig(
        dataset="isic2017",
        data_root=str(shared_data / "isic2017"),
        protocol="challenge",
        epochs=20,
        num_prediction_samples=4,
    )
    metrics = train(config, tmp_path / "isic2017-20", progress=False)
    with open(tmp_path / "isic2017-20" / "history.csv", newline="") as handle:
        curve = [(row["epoch"], row["val_loss"], row["val_dsc"]) for row in csv.DictReader(handle)]
    print("epoch, val_loss, val_dsc:", curve)
    print("train seconds:", metrics["train_seconds"])
    assert metrics["counts"] == {"train": 2000, "val": 150, "test": 150}
    assert metrics["pooled"]["dsc"] >= 0.80
