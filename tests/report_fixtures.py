"""A fixture set of run folders, laid out as egeunet.engine writes them, with known values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from egeunet.cases import save_cases
from egeunet.model import EGEUNetConfig

LADDER = {
    "unet": EGEUNetConfig(ghpa=False, gab=False, deep_supervision=False),
    "unet+ghpa": EGEUNetConfig(gab=False, deep_supervision=False),
    "unet+ghpa+gab": EGEUNetConfig(deep_supervision=False),
    "egeunet": EGEUNetConfig(),
}
SEEDS = (1, 2, 3)
FULL_DSC = {1: 0.88, 2: 0.89, 3: 0.90}
# Pooled DSC of each variant minus the full model's, per seed.
OFFSETS = {
    "unet": {1: -0.02, 2: -0.03, 3: -0.01},
    "unet+ghpa": {1: -0.01, 2: -0.01, 3: -0.01},
    "unet+ghpa+gab": {1: 0.0, 2: -0.005, 3: 0.005},
    "egeunet": {1: 0.0, 2: 0.0, 3: 0.0},
}
PARAMS = {"unet": 40000, "unet+ghpa": 45000, "unet+ghpa+gab": 50000, "egeunet": 53374}
EPOCHS = 3
MANIFEST_HASH = "f" * 64


def write_run(
    runs_dir: Path,
    variant: str,
    seed: int,
    dataset: str = "isic2017",
    protocol: str = "paper",
    dsc: float | None = None,
    epochs: int = EPOCHS,
    model: str | None = None,
) -> Path:
    """A finished run folder ``<dataset>-<protocol>-<variant>-seed<seed>`` of the ladder
    model ``model`` (default: ``variant``) with pooled DSC ``dsc`` (default: the ladder's
    known value for this variant and seed) after ``epochs`` epochs."""
    run_dir = runs_dir / f"{dataset}-{protocol}-{variant}-seed{seed}"
    run_dir.mkdir(parents=True)
    model_config = LADDER[model or variant].to_dict()
    clean = protocol == "clean"
    config = {
        "dataset": dataset,
        "protocol": protocol,
        "seed": seed,
        "epochs": epochs,
        "t_max": EPOCHS,
        "eta_min": 1e-5,
        "lr": 1e-3,
        "image_size": 64,
        "model": model_config,
    }
    (run_dir / "config.json").write_text(
        json.dumps(
            {
                "config": config,
                "counts": {"train": 1350 if clean else 1500, "val": 150 if clean else 650},
                "validation_source": "10% hold-out of paper train" if clean else "paper test",
                "package_version": "0.1.0",
                "git_commit": "abc",
                "data_manifest_hash": MANIFEST_HASH,
                "device": "cpu",
                "num_threads": 1,
                "torch_version": "2.x",
            }
        )
    )
    if dsc is None:
        dsc = FULL_DSC[seed] + OFFSETS[model or variant][seed]
    iou = dsc / (2 - dsc)
    metrics = {
        "protocol": protocol,
        "selection": "validation-set model selection" if clean else "test-set model selection",
        "best_epoch": epochs,
        "pooled": {
            "iou": iou,
            "dsc": dsc,
            "accuracy": 0.95,
            "specificity": 0.97,
            "sensitivity": 0.9,
        },
        "per_image": {
            "dsc_mean": dsc - 0.02,
            "dsc_median": dsc,
            "iou_mean": iou - 0.02,
            "iou_median": iou,
            "isic_score": iou - 0.05,
            "hd95_mean": 7.0,
            "hd95_median": 5.0,
        },
        "split": "test",
        "num_images": 4,
        "train_seconds": 4.0 * epochs,
        "model": model_config,
        "num_parameters": PARAMS[model or variant],
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    write_history(run_dir, [0.5 + (dsc - 0.5) * e / epochs for e in range(1, epochs + 1)])
    pd.DataFrame(
        {
            "id": [f"img{i}" for i in range(4)],
            "dsc": [dsc - 0.1, dsc, dsc + 0.05, dsc - 0.3],
            "iou": [0.5, 0.6, 0.7, 0.3],
            "hd95": [3.0, 4.0, 5.0, 9.0],
        }
    ).to_csv(run_dir / "per_image.csv", index=False)
    if variant == "egeunet" and seed == 1 and protocol == "paper":
        rng = np.random.default_rng(0)
        masks = np.zeros((3, 32, 32), np.uint8)
        masks[:, 8:24, 8:24] = 1
        save_cases(
            run_dir,
            ["img2", "img1", "img3"],
            rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8),
            masks,
            masks.astype(np.float32) * 0.9,
            [0.95, 0.88, 0.58],
        )
    return run_dir


def write_history(run_dir: Path, val_dsc: list[float], seconds: float = 4.0) -> None:
    """history.csv with one row per value of ``val_dsc`` (pooled validation DSC per epoch),
    each epoch taking ``seconds`` at 10 training images per second."""
    epochs = len(val_dsc)
    pd.DataFrame(
        {
            "epoch": range(1, epochs + 1),
            "train_loss": np.linspace(1.0, 0.5, epochs),
            "val_loss": np.linspace(1.1, 0.6, epochs),
            "lr": [1e-3] * epochs,
            "val_dsc": val_dsc,
            "seconds": [seconds] * epochs,
            "images_per_second": [10.0] * epochs,
        }
    ).to_csv(run_dir / "history.csv", index=False)


def write_study(study_dir: Path) -> Path:
    """Twelve finished runs (4 variants x 3 seeds), one failed run and a complexity table."""
    runs_dir = study_dir / "runs"
    for variant in LADDER:
        for seed in SEEDS:
            write_run(runs_dir, variant, seed)
    failed = runs_dir / "isic2017-paper-egeunet-seed4"
    failed.mkdir()
    (failed / "outcome.json").write_text(
        json.dumps(
            {"run_id": failed.name, "status": "failed", "error": "RuntimeError: out of memory"}
        )
    )
    data_dir = runs_dir / "01_data-isic2017"
    data_dir.mkdir()
    (data_dir / "summary.json").write_text(
        json.dumps(
            {
                "dataset": "isic2017",
                "num_images": 2150,
                "size": 256,
                "splits": {
                    "challenge/train": 2000,
                    "challenge/val": 150,
                    "paper/train": 1500,
                    "paper/test": 650,
                },
                "lesion_fraction": {"median": 0.2},
            }
        )
    )
    # A second dataset without a challenge val split: its count is missing in the table.
    (runs_dir / "01_data-isic2018").mkdir()
    (runs_dir / "01_data-isic2018" / "summary.json").write_text(
        json.dumps(
            {
                "dataset": "isic2018",
                "num_images": 2594,
                "size": 256,
                "splits": {"challenge/train": 2594, "paper/train": 1816, "paper/test": 778},
            }
        )
    )
    (runs_dir / "02_complexity").mkdir()
    pd.DataFrame(
        {
            "variant": list(LADDER),
            "params_total": list(PARAMS.values()),
            "macs_g": [0.08, 0.07, 0.072, 0.0721],
        }
    ).to_csv(runs_dir / "02_complexity" / "complexity.csv", index=False)
    return study_dir


def write_study_file(path: Path) -> Path:
    """A study file for :func:`write_study`'s folder: its twelve paper runs in two stages,
    then three clean runs and one longer run that the folder does not have."""
    ladder = {
        "unet": {"ghpa": False, "gab": False, "deep_supervision": False},
        "unet+ghpa": {"gab": False, "deep_supervision": False},
        "unet+ghpa+gab": {"deep_supervision": False},
    }
    document = {
        "name": "fixture",
        "datasets": ["isic2017"],
        "protocols": ["paper", "clean"],
        "seeds": list(SEEDS),
        "variants": {"egeunet": {}, **ladder, "egeunet-long": {"epochs": 2 * EPOCHS}},
        "stages": [
            {"name": "1 headline", "protocols": ["paper"], "variants": ["egeunet"]},
            {"name": "2 ladder", "protocols": ["paper"], "variants": list(ladder)},
            {"name": "3 clean", "protocols": ["clean"], "variants": ["egeunet"]},
            {
                "name": "4 budget",
                "protocols": ["paper"],
                "variants": ["egeunet-long"],
                "seeds": [1],
            },
        ],
        "train": {"epochs": EPOCHS},
    }
    path.write_text(json.dumps(document))  # JSON is YAML
    return path
