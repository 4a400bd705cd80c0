"""The run folder: where every file of a run lives, and readers for the ones others read.

A training run (``egeunet train``, the ``03_train`` notebook, a study's run) writes::

    <run>/config.json          resolved config, versions, data hash, protocol and counts
    <run>/history.csv          one row per epoch
    <run>/checkpoints/last.pt  full training state after the latest epoch (atomic)
    <run>/checkpoints/best.pt  weights with the lowest selection loss so far (atomic)
    <run>/metrics.json         final metrics of best.pt on the protocol's test split
    <run>/per_image.csv        per-image metrics of that evaluation
    <run>/predictions/         input | truth | prediction panels for a fixed sample
    <run>/cases.npz            best, median and worst test images with their predictions
    <run>/outcome.json         how the study runner's last execution of it ended
    <run>.ipynb                the executed notebook, beside the folder (study runs)

:class:`RunSpec` and :class:`RunOutcome` describe one execution for the study runner and
its executors. This module is a leaf: it imports nothing of egeunet but file helpers, so
the engine, the study runner, the executors and the report can all use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from egeunet.fileio import remove_temporaries

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
PER_IMAGE_FILE = "per_image.csv"
CASES_FILE = "cases.npz"
OUTCOME_FILE = "outcome.json"
PREDICTIONS_FOLDER = "predictions"
CHECKPOINTS_FOLDER = "checkpoints"
LAST_CHECKPOINT = f"{CHECKPOINTS_FOLDER}/last.pt"
BEST_CHECKPOINT = f"{CHECKPOINTS_FOLDER}/best.pt"


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder's files."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def history(self) -> Path:
        return self.root / HISTORY_FILE

    @property
    def last(self) -> Path:
        return self.root / LAST_CHECKPOINT

    @property
    def best(self) -> Path:
        return self.root / BEST_CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def per_image(self) -> Path:
        return self.root / PER_IMAGE_FILE

    @property
    def predictions(self) -> Path:
        return self.root / PREDICTIONS_FOLDER

    @property
    def cases(self) -> Path:
        return self.root / CASES_FILE

    @property
    def outcome(self) -> Path:
        return self.root / OUTCOME_FILE

    @property
    def notebook(self) -> Path:
        """The executed notebook of a study run: beside the folder, ``<run>.ipynb``."""
        return self.root.with_name(f"{self.root.name}.ipynb")

    @property
    def lock(self) -> Path:
        """Held while a process trains here (see :func:`~egeunet.fileio.folder_lock`)."""
        return self.root / ".train.lock"

    def files(self) -> tuple[Path, ...]:
        """The files a training run writes (predictions/ holds ``<id>.png`` panels besides)."""
        return (
            self.config, self.history, self.last, self.best, self.metrics, self.per_image,
            self.cases,
        )  # fmt: skip

    def foreign_file(self) -> Path | None:
        """A file with a run file's name that no run wrote here, or None: any such file
        when config.json is not a run description of ours (a user's own config, say)."""
        if is_run_description(self.config):
            return None
        return next((path for path in self.files() if path.exists()), None)

    def remove_temporaries(self) -> None:
        """Delete the temporary files killed runs left beside the run's files (call it
        holding the run's lock)."""
        for path in self.files():
            remove_temporaries(path.parent, path.name)
        remove_temporaries(self.predictions, "*.png")

    def looks_like_training_run(self) -> bool:
        """Whether the folder holds a training run's config, history or outcome."""
        return any(p.is_file() for p in (self.config, self.history, self.outcome))


def read_json(path: str | Path, *, strict: bool = True) -> dict | None:
    """The JSON mapping in ``path``; None when the file is missing. A damaged file raises
    ValueError naming it, or gives None with ``strict=False``."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        if not strict:
            return None
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        if not strict:
            return None
        raise ValueError(f"{path}: expected a JSON object")
    return data


def read_metrics(run_dir: str | Path) -> dict | None:
    """A run's metrics.json, or None (missing or damaged: not known to be finished)."""
    return read_json(RunFolder(Path(run_dir)).metrics, strict=False)


def read_outcome(run_dir: str | Path) -> dict | None:
    """The last outcome the study runner recorded for ``run_dir``, or None (a damaged
    outcome means "not known to be finished": run again)."""
    return read_json(RunFolder(Path(run_dir)).outcome, strict=False)


def read_description(run_dir: str | Path) -> dict | None:
    """A run's config.json (the run description :func:`egeunet.engine.train` writes:
    ``config`` plus protocol, counts, data hash and versions), or None."""
    return read_json(RunFolder(Path(run_dir)).config)


def read_train_config(run_dir: str | Path) -> dict | None:
    """The TrainConfig fields (``model`` nested) a run's config.json records, or None."""
    description = read_description(run_dir)
    if description is None:
        return None
    if not isinstance(description.get("config"), dict):
        raise ValueError(f"{RunFolder(Path(run_dir)).config}: not a run description (no config)")
    return description["config"]


def is_run_description(path: Path) -> bool:
    """Whether ``path`` is the config.json a training run writes into its run folder."""
    try:
        data = read_json(path, strict=False)
    except OSError:
        return False
    return (
        isinstance(data, dict)
        and isinstance(data.get("config"), dict)
        and "data_manifest_hash" in data
    )


@dataclass(frozen=True)
class RunSpec:
    """One papermill execution: which notebook, where its run folder is, with what.

    Attributes:
        run_id: stable, filesystem-safe name, e.g. ``isic2017-paper-egeunet-seed42``.
        notebook: path of the notebook to execute.
        run_dir: the run folder; the executed notebook is written beside it.
        parameters: papermill parameters.
        threads: torch threads inside the kernel (None leaves the default).
        device: torch device for notebooks that take a ``device`` parameter or a ``train``
            mapping.
    """

    run_id: str
    notebook: str
    run_dir: str
    parameters: dict = field(default_factory=dict)
    threads: int | None = None
    device: str = "auto"


@dataclass(frozen=True)
class RunOutcome:
    """How one run ended: ``finished``, ``skipped`` (already finished) or ``failed``."""

    run_id: str
    status: str
    error: str | None
    seconds: float
    metrics: dict | None


def executed_notebook_path(run_dir: str | Path) -> Path:
    """Where the executed notebook of a run is kept: beside its run folder."""
    return RunFolder(Path(run_dir)).notebook
