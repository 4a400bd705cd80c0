"""Reading a study's run folders: finished runs as table rows, their histories and
per-image scores, the progress of every run (done, unfinished, failed, not started) and
what each cost.

Everything here reads files only: each run's ``config.json``, ``metrics.json``,
``history.csv``, ``per_image.csv``, ``checkpoints/last.pt`` (whether it exists) and the
study runner's ``outcome.json``, plus the study file when one is given.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from egeunet.model import EGEUNetConfig
from egeunet.runfolder import HISTORY_FILE, PER_IMAGE_FILE, RunFolder, read_json
from egeunet.study_files import planned_runs

IDENTITY = ("run_id", "dataset", "protocol", "variant", "seed")
"""Columns that name a run, copied onto every row of its stacked CSV files."""


DONE, UNFINISHED, FAILED, NOT_STARTED = "done", "unfinished", "failed", "not started"
NOT_IN_STUDY = "not in the study file"
"""The stage of run folders that the study file given does not declare."""


def _read_json(path: Path) -> dict:
    return read_json(path) or {}


def _hashes(document: dict) -> dict[str, str]:
    found = {}
    for key, value in document.items():
        if isinstance(value, str) and "hash" in key:
            found[key] = value
    return found


def read_run(run_dir: str | Path) -> dict:
    """One finished run folder as a flat row: identity (run_id, dataset, protocol, variant,
    model, seed), the training budget (epochs, t_max, eta_min, lr), every pooled metric as
    ``pooled_<name>`` and every per-image summary as ``image_<name>``, and the data hashes
    recorded in config.json. ``variant`` is the model's name until
    :func:`collect_runs` gives same-model study variants their study names."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    for path in (run.config, run.metrics):
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: no {path.name}; is this a finished run folder?")
    config_doc = _read_json(run.config)
    metrics = _read_json(run.metrics)
    config = config_doc.get("config") or {}
    trained = EGEUNetConfig(**(config.get("model") or metrics.get("model") or {})).name
    row = {
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "data_folder": config_doc.get("data_folder"),
        "dataset": config.get("dataset", "unknown"),
        "protocol": metrics.get("protocol", config.get("protocol", "unknown")),
        "variant": trained,
        "model": trained,
        "seed": config.get("seed"),
        "epochs": config.get("epochs"),
        "t_max": config.get("t_max"),
        "eta_min": config.get("eta_min"),
        "lr": config.get("lr"),
        "image_size": config.get("image_size"),
        "selection": metrics.get("selection", ""),
        "validation_source": config_doc.get("validation_source", ""),
        "train_images": (config_doc.get("counts") or {}).get("train"),
        "best_epoch": metrics.get("best_epoch"),
        "num_images": metrics.get("num_images"),
        "num_parameters": metrics.get("num_parameters"),
        "train_seconds": metrics.get("train_seconds"),
    }
    row.update({f"pooled_{k}": v for k, v in metrics.get("pooled", {}).items()})
    row.update({f"image_{k}": v for k, v in metrics.get("per_image", {}).items()})
    row.update(_hashes(config_doc))
    return row


LOCAL_COLUMNS = ("run_dir", "data_folder")
"""Columns of :func:`collect_runs` that name places on this machine (not for tables)."""


def run_folders(runs_dir: str | Path) -> list[Path]:
    """Sub-folders of ``runs_dir`` that look like training run folders (hold config.json,
    history.csv or an outcome), sorted by name; the overview folders ``01_data-*`` and
    ``02_complexity`` are not runs."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return sorted(
        p
        for p in runs_dir.iterdir()
        if p.is_dir()
        and not p.name.startswith(("01_data-", "02_complexity", "05_inference"))
        and RunFolder(p).looks_like_training_run()
    )


def _failed_outcome(run_dir: Path) -> dict | None:
    """The study runner's outcome of ``run_dir`` if its last attempt failed, else None."""
    outcome = _read_json(RunFolder(run_dir).outcome)
    return outcome if outcome.get("status") == "failed" else None


def _is_done(run_dir: Path) -> bool:
    """A finished run: metrics.json written and no failed last attempt."""
    return RunFolder(run_dir).metrics.is_file() and _failed_outcome(run_dir) is None


def collect_runs(runs_dir: str | Path) -> pd.DataFrame:
    """One row per finished run under ``runs_dir``: a run folder with metrics.json whose
    last study outcome, if it has one, is not a failure. (A re-run that failed can leave
    the metrics of an earlier attempt behind; such a run is listed with the failures.)"""
    rows = [read_run(p) for p in run_folders(runs_dir) if _is_done(p)]
    table = pd.DataFrame(rows)
    if not table.empty:
        table = _separate_same_model_variants(table)
        table = table.sort_values(["dataset", "protocol", "variant", "seed"]).reset_index(drop=True)
    return table


def _study_label(row: pd.Series) -> str | None:
    """The variant name the study gave a run, read off its id
    ``<dataset>-<protocol>-<variant>-seed<seed>`` (None for other folder names)."""
    prefix, suffix = f"{row['dataset']}-{row['protocol']}-", f"-seed{row['seed']}"
    run_id = str(row["run_id"])
    if run_id.startswith(prefix) and run_id.endswith(suffix):
        return run_id[len(prefix) : -len(suffix)] or None
    return None


def _separate_same_model_variants(table: pd.DataFrame) -> pd.DataFrame:
    """Variants are named after their model, so two study variants with one model and other
    training settings (say ``egeunet`` and ``egeunet-300ep: {epochs: 300}``) would be
    pooled as extra seeds of one variant. A run takes its study name instead where that
    name extends its model's (``egeunet-300ep`` of model ``egeunet``), or where its model
    name holds runs of several study variants."""
    labels = table.apply(_study_label, axis=1)
    groups = table.groupby(["dataset", "protocol", "variant"])["run_id"].transform(
        lambda ids: labels[ids.index].nunique()
    )
    extends = pd.Series(
        [
            isinstance(label, str) and label.startswith(f"{model}-")
            for label, model in zip(labels, table["model"], strict=True)
        ],
        index=table.index,
    )
    rename = ((groups > 1) | extends) & labels.notna() & (labels != table["variant"])
    table = table.copy()
    table.loc[rename, "variant"] = labels[rename]
    return table


def collect_failures(runs_dir: str | Path) -> pd.DataFrame:
    """Runs (the overview notebooks' too) whose last outcome, written by the study
    runner, was a failure."""
    runs_dir = Path(runs_dir)
    folders = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    rows = []
    for folder in folders:
        outcome = _failed_outcome(folder)
        if outcome is not None:
            rows.append({"run_id": folder.name, "error": outcome.get("error") or ""})
    return pd.DataFrame(rows, columns=["run_id", "error"])


def _per_run_csv(runs: pd.DataFrame, filename: str) -> pd.DataFrame:
    frames = []
    for _, run in runs.iterrows():
        path = Path(run["run_dir"]) / filename
        if path.is_file():
            frame = pd.read_csv(path)
            for key in IDENTITY:
                frame[key] = run[key]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def collect_histories(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's history.csv, stacked, with the run's identity columns."""
    return _per_run_csv(runs, HISTORY_FILE)


def collect_per_image(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's per_image.csv, stacked, with the run's identity columns."""
    return _per_run_csv(runs, PER_IMAGE_FILE)


# ---------------------------------------------------------------- progress and cost


def _history(run_dir: Path) -> pd.DataFrame:
    path = RunFolder(run_dir).history
    try:
        return pd.read_csv(path) if path.is_file() else pd.DataFrame()
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _hardware(config_doc: dict) -> str:
    """Device, threads and the machines config.json records (older runs recorded none)."""
    parts = []
    if config_doc.get("device"):
        parts.append(str(config_doc["device"]))
    threads = config_doc.get("num_threads")
    if threads:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    arrangements = [n for n in config_doc.get("processes") or [] if n != 1]
    if arrangements:
        shared = " or ".join(str(n) for n in arrangements)
        parts.append(f"training steps shared by {shared} processes")
    machines = [m for m in config_doc.get("machines") or [] if isinstance(m, dict)]
    for machine in machines:
        name = machine.get("gpu") or machine.get("cpu")
        cores = machine.get("cpu_count")
        parts.append(f"{name} ({cores} cores)" if cores and not machine.get("gpu") else name)
    if parts and not machines:
        parts.append("machine not recorded")
    return ", ".join(str(part) for part in parts if part)


def model_name(config: dict) -> str | None:
    """The model a run's TrainConfig trains (the default one when it names no switches);
    None without a config or with model fields no EGEUNetConfig takes."""
    if not config:
        return None
    try:
        return EGEUNetConfig(**(config.get("model") or {})).name
    except (TypeError, ValueError):
        return None


def run_progress(run_dir: str | Path, planned_epochs: int | None = None) -> dict:
    """Where one run stands, from its folder alone: status (done, unfinished, failed or
    not started), epochs done and planned, whether it can resume (``last.pt``), the
    training wall time so far (sum of history ``seconds``), the median training images
    per second over its epochs, its hardware and the torch version and commit it ran."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    config_doc = _read_json(run.config)
    history = _history(run_dir)
    if _failed_outcome(run_dir) is not None:
        status = FAILED
    elif _is_done(run_dir):
        status = DONE
    elif len(history) or run.last.is_file():
        status = UNFINISHED
    else:
        status = NOT_STARTED
    config = config_doc.get("config") or {}
    epochs = config.get("epochs")
    speed = history["images_per_second"] if "images_per_second" in history else pd.Series()
    seconds = history["seconds"].sum() if "seconds" in history else float("nan")
    # The first epoch also prepares data and compiles kernels (several times a later one).
    later = history["seconds"].iloc[1:] if "seconds" in history else pd.Series()
    return {
        "dataset": config.get("dataset"),
        "protocol": config.get("protocol"),
        "model": model_name(config),
        "status": status,
        "epochs_done": len(history),
        "epochs_planned": epochs if epochs is not None else planned_epochs,
        "resumable": status == UNFINISHED and run.last.is_file(),
        "wall_hours": seconds / 3600 if len(history) else float("nan"),
        "images_per_second": speed.median() if len(speed) else float("nan"),
        "epoch_seconds": later.median() if len(later) else float("nan"),
        "hardware": _hardware(config_doc),
        "threads": config_doc.get("num_threads"),
        "torch": config_doc.get("torch_version", ""),
        "commit": config_doc.get("git_commit", ""),
    }


def study_status(runs_dir: str | Path, study_file: str | Path | None = None) -> pd.DataFrame:
    """Every training run with its progress (:func:`run_progress`): with ``study_file``,
    every run it declares, stage by stage (also those not started), then any other run
    folder found under stage "not in the study file"; without it, the run folders found
    (stage "")."""
    runs_dir = Path(runs_dir)
    rows = []
    listed = set()
    if study_file is not None:
        for run in planned_runs(study_file):
            epochs = run.parameters.get("epochs")
            progress = run_progress(
                runs_dir / run.run_id, epochs if isinstance(epochs, int) else None
            )
            planned = {
                "dataset": run.dataset,
                "protocol": run.protocol,
                "model": model_name(run.parameters),
            }
            progress.update({k: v for k, v in planned.items() if progress[k] is None})
            rows.append({"stage": run.stage, "run_id": run.run_id, **progress})
            listed.add(run.run_id)
    others = NOT_IN_STUDY if study_file is not None else ""
    for folder in run_folders(runs_dir):
        if folder.name not in listed:
            rows.append({"stage": others, "run_id": folder.name, **run_progress(folder)})
    columns = ["stage", "run_id", *run_progress(runs_dir / "-").keys()]
    status = pd.DataFrame(rows, columns=columns)
    status["remaining_hours"] = remaining_hours(status)
    return status


ESTIMATE_SOURCES = (
    ("run_id",),
    ("dataset", "model", "protocol"),
    ("dataset", "model"),
    ("dataset",),
    (),
)
"""Whose epoch times estimate a run's, nearest first: its own; those of runs of the same
dataset, model and protocol; the same dataset and model; the same dataset; any run."""


def remaining_hours(status: pd.DataFrame) -> pd.Series:
    """Training hours each run of :func:`study_status` still needs (0 for a finished run):
    its epochs left (all of them when it cannot resume) times the median ``epoch_seconds``
    of the measured runs nearest to it (:data:`ESTIMATE_SOURCES`); NaN while no run has a
    measured epoch. The figures are as
    fast as the machine was when those epochs ran: runs side by side, or other work beside
    them, make epochs slower."""
    measured = status.dropna(subset=["epoch_seconds"])
    estimates = []
    for _, row in status.iterrows():
        if row["status"] == DONE:
            estimates.append(0.0)
            continue
        planned = row["epochs_planned"]
        # A run that cannot resume (no last.pt) trains all its epochs again.
        done = row["epochs_done"] if row["resumable"] else 0
        left = max(planned - done, 0) if pd.notna(planned) else None
        seconds = float("nan")
        for keys in ESTIMATE_SOURCES:
            same = measured
            for key in keys:
                same = same[same[key] == row[key]]
            if len(same):
                seconds = same["epoch_seconds"].median()
                break
        estimates.append(left * seconds / 3600 if left is not None else float("nan"))
    return pd.Series(estimates, index=status.index, dtype=float)


def stage_summary(status: pd.DataFrame) -> pd.DataFrame:
    """Runs per stage (in study order) by status: done, unfinished, failed, not started;
    and the training hours the stage still needs (the sum of :func:`remaining_hours`, NaN
    while any of its runs has no estimate)."""
    if status.empty:
        return pd.DataFrame(
            columns=["stage", "runs", DONE, UNFINISHED, FAILED, NOT_STARTED, "remaining_hours"]
        )
    counts = pd.crosstab(status["stage"], status["status"]).reindex(
        columns=[DONE, UNFINISHED, FAILED, NOT_STARTED], fill_value=0
    )
    counts = counts.reindex(list(dict.fromkeys(status["stage"])))
    counts.insert(0, "runs", counts.sum(axis=1))
    if "remaining_hours" in status:
        by_stage = status.groupby("stage", sort=False)["remaining_hours"]
        counts["remaining_hours"] = by_stage.agg(lambda hours: hours.sum(skipna=False))
    return counts.reset_index()
