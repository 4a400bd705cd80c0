"""Shipping trained weights inside the package, with where they came from.

``egeunet ship-weights --study reports/isic --dataset isic2018`` picks, among the study's
finished ``clean``-protocol runs of the full model on that dataset, the one whose best
epoch scored highest on its *validation* data (never on the test split), and writes

- ``egeunet/weights/<name>.pt``: the model (config and weights) with its training config
  and selection record, no optimiser state (about 250 KB), read back with
  ``torch.load(weights_only=True)``;
- ``egeunet/weights/<name>.json``: its provenance: the run, the commit and data manifest
  hash the run recorded, the training config, the validation score it was chosen by, its
  test metrics, and the SHA-256 of the ``.pt`` file, which
  :func:`egeunet.checkpoint.resolve_weights` checks before any shipped file is used.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import pandas as pd

from egeunet.checkpoint import (
    SHIPPED_WEIGHTS,
    WEIGHTS_FOLDER,
    load_model,
    model_payload,
    provenance_path,
    save_checkpoint,
)
from egeunet.fileio import sha256_file, write_json_atomic
from egeunet.model import EGEUNetConfig
from egeunet.runfolder import RunFolder, read_json
from egeunet.study_runs import collect_runs, model_name

SHIPPED_PROTOCOL = "clean"
"""Shipped weights are chosen on held-out validation data: the ``clean`` protocol."""

VALIDATION_SCORE = "val_dsc"
"""The history column the choice is made by: pooled DSC on the run's validation data."""


SHIPPED_RECORDS = ("train_config", "protocol", "selection", "data_manifest_hash")
"""What a shipped file keeps of its run's checkpoint besides the model: how to feed it
(image size, normalisation) and how it was chosen. Never optimiser or RNG state."""


def is_candidate(train_config: dict) -> bool:
    """Whether a run of this TrainConfig (config.json's ``config``) can supply shipped
    weights: the full model trained under the ``clean`` protocol."""
    full_model = EGEUNetConfig().name
    return train_config.get("protocol") == SHIPPED_PROTOCOL and (
        model_name(train_config) == full_model
    )


def validation_score(run_dir: str | Path, epoch: int) -> float:
    """The run's pooled validation DSC at ``epoch`` (its history.csv row)."""
    history_path = Path(run_dir) / "history.csv"
    history = pd.read_csv(history_path)
    rows = history.loc[history["epoch"] == epoch, VALIDATION_SCORE].dropna()
    if rows.empty:
        raise ValueError(f"{history_path}: no {VALIDATION_SCORE} recorded for epoch {epoch}")
    return float(rows.iloc[-1])


def candidate_runs(study_dir: str | Path, dataset: str) -> pd.DataFrame:
    """The study's finished clean-protocol runs of the full model on ``dataset``, with the
    validation score of each one's best epoch (column ``validation_dsc``), best first."""
    runs_dir = Path(study_dir) / "runs"
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"study {study_dir}: no runs folder ({runs_dir})")
    runs = collect_runs(runs_dir)
    if runs.empty:
        raise ValueError(f"study {study_dir}: no finished runs in {runs_dir}")
    full_model = EGEUNetConfig().name
    chosen = runs[
        (runs["dataset"] == dataset)
        & (runs["protocol"] == SHIPPED_PROTOCOL)
        & (runs["model"] == full_model)
        & (runs["variant"] == full_model)
    ].copy()
    if chosen.empty:
        found = ", ".join(sorted(runs["run_id"])) or "none"
        raise ValueError(
            f"study {study_dir}: no finished {SHIPPED_PROTOCOL}-protocol {full_model} run on "
            f"{dataset} (finished runs: {found}); shipped weights are never chosen on a test "
            "set, so they wait for those runs"
        )
    chosen["validation_dsc"] = [
        validation_score(row.run_dir, int(row.best_epoch)) for row in chosen.itertuples()
    ]
    return chosen.sort_values(["validation_dsc", "seed"], ascending=[False, True]).reset_index(
        drop=True
    )


def ship_run(
    run_dir: str | Path,
    name: str,
    out_folder: str | Path = WEIGHTS_FOLDER,
    chosen_from: list[dict] | None = None,
) -> Path:
    """Write the best checkpoint of ``run_dir`` as shipped weights ``name`` into
    ``out_folder`` (``<name>.pt`` and its provenance ``<name>.json``); returns the .pt path.
    ``chosen_from``: the candidate runs it was chosen among (run and validation DSC), kept
    in the provenance so a reader sees how many finished runs the choice had."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    metrics, config_doc = read_json(folder.metrics), read_json(folder.config)
    if metrics is None or config_doc is None:
        raise FileNotFoundError(f"{run_dir}: no metrics.json or config.json; not a finished run")
    source = run_dir / metrics.get("checkpoint", "checkpoints/best.pt")
    loaded = load_model(source)
    epoch = int(metrics["best_epoch"])
    if loaded.epoch is not None and loaded.epoch != epoch:
        raise ValueError(
            f"{source} holds epoch {loaded.epoch}, but {run_dir / 'metrics.json'} reports "
            f"best epoch {epoch}; the run folder is inconsistent"
        )
    out_folder = Path(out_folder)
    out_folder.mkdir(parents=True, exist_ok=True)
    weights_path = out_folder / f"{name}.pt"
    kept = {key: loaded.checkpoint[key] for key in SHIPPED_RECORDS if key in loaded.checkpoint}
    save_checkpoint(weights_path, model_payload(loaded.model, epoch=epoch, **kept))
    provenance = {
        "name": name,
        "file": weights_path.name,
        "sha256": sha256_file(weights_path),
        "size_bytes": weights_path.stat().st_size,
        "shipped": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source_run": run_dir.name,
        "source_checkpoint_sha256": sha256_file(source),
        "git_commit": config_doc.get("git_commit"),
        "package_version": config_doc.get("package_version"),
        "torch_version": config_doc.get("torch_version"),
        "data_manifest_hash": config_doc.get("data_manifest_hash"),
        "dataset": (config_doc.get("config") or {}).get("dataset"),
        "protocol": metrics.get("protocol"),
        "selection": metrics.get("selection"),
        "validation_source": config_doc.get("validation_source"),
        "counts": config_doc.get("counts"),
        "best_epoch": epoch,
        "validation_dsc": validation_score(run_dir, epoch),
        "chosen_from": chosen_from,
        "test": {
            "split": metrics.get("split"),
            "num_images": metrics.get("num_images"),
            "threshold": metrics.get("threshold"),
            "pooled": metrics.get("pooled"),
            "per_image": metrics.get("per_image"),
        },
        "train_config": config_doc.get("config"),
        "num_parameters": metrics.get("num_parameters"),
    }
    write_json_atomic(provenance_path(weights_path), provenance)
    return weights_path


def ship_best(
    study_dir: str | Path, dataset: str, name: str | None = None, out_folder=WEIGHTS_FOLDER
) -> tuple[Path, pd.DataFrame]:
    """Ship the study's best clean run on ``dataset`` (by validation DSC) as ``name``
    (default: the dataset's name); returns the written file and the candidates table."""
    candidates = candidate_runs(study_dir, dataset)
    chosen_from = [
        {"run": row.run_id, "validation_dsc": row.validation_dsc, "best_epoch": int(row.best_epoch)}
        for row in candidates.itertuples()
    ]
    weights = ship_run(candidates.loc[0, "run_dir"], name or dataset, out_folder, chosen_from)
    return weights, candidates


def run_ship_weights(args: argparse.Namespace) -> int:
    name = args.name or args.dataset
    if args.out is None and name not in SHIPPED_WEIGHTS:
        raise ValueError(
            f"--name {name}: shipped weights are named {', '.join(SHIPPED_WEIGHTS)}; "
            "give --out to write other names elsewhere"
        )
    out = Path(args.out) if args.out else WEIGHTS_FOLDER
    weights, candidates = ship_best(args.study, args.dataset, name, out)
    for row in candidates.itertuples():
        mark = "->" if row.Index == 0 else "  "
        print(
            f"{mark} {row.run_id}: validation DSC {row.validation_dsc:.4f} "
            f"(epoch {row.best_epoch}), test DSC {row.pooled_dsc:.4f}"
        )
    provenance = read_json(provenance_path(weights))
    print(
        f"shipped {weights} ({provenance['size_bytes']} bytes, sha256 "
        f"{provenance['sha256'][:12]}...) with its provenance {provenance_path(weights).name}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``egeunet ship-weights``."""
    parser = subparsers.add_parser(
        "ship-weights",
        help="ship a study's best clean run (chosen on validation data) as package weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--study", required=True, help="the study folder (holds runs/)")
    parser.add_argument("--dataset", required=True, help="e.g. isic2017 or isic2018")
    parser.add_argument("--name", help="name of the shipped weights (default: the dataset)")
    parser.add_argument(
        "--out", help=f"folder to write into (default: the package's {WEIGHTS_FOLDER})"
    )
    parser.set_defaults(func=run_ship_weights)
