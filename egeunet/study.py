"""Studies: many papermill runs of the notebooks, resumable, then one report.

A study file (YAML) declares datasets, protocols, variants, seeds and the training
parameters they share; see ``studies/quick.yaml`` and docs/notebooks.md. The runner

1. checks every parameter against the notebooks' ``parameters`` cells
   (``papermill.inspect_notebook``) before anything launches;
2. runs ``01_data`` once per dataset and ``02_complexity`` once;
3. runs ``03_train`` once per dataset x protocol x variant x seed through an executor
   (:func:`egeunet.executors.make_executor`), skipping finished runs and resuming
   interrupted ones, each run's failure recorded without stopping the others;
4. runs ``04_report``, which rebuilds ``reports/<study>/REPORT.md`` from the run folders.

Every execution is a run folder ``reports/<study>/runs/<run_id>/`` with the executed
notebook beside it (``<run_id>.ipynb``) and an ``outcome.json`` the runner writes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import itertools
import json
import os
import re
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from egeunet.fileio import write_json_atomic

KERNEL_NAME = "egeunet"
OUTCOME_FILE = "outcome.json"
NOTEBOOKS = {
    "data": "01_data.ipynb",
    "complexity": "02_complexity.ipynb",
    "train": "03_train.ipynb",
    "report": "04_report.ipynb",
    "inference": "05_inference.ipynb",
}
STUDY_KEYS = {
    "name",
    "description",
    "datasets",
    "protocols",
    "seeds",
    "variants",
    "stages",
    "train",
    "data_overview",
    "complexity",
    "inference",
    "report",
    "data_root",
}
REQUIRED_KEYS = ("name", "datasets", "protocols", "seeds", "variants")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
TAIL_SECONDS = 1.0
RUNTIME_PARAMETERS = ("resume", "num_threads", "device")

Log = Callable[[str], None]


def _print_line(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """One papermill execution: which notebook, where its run folder is, with what.

    Attributes:
        run_id: stable, filesystem-safe name, e.g. ``isic2017-paper-egeunet-seed42``.
        notebook: path of the notebook to execute.
        run_dir: the run folder; the executed notebook is written beside it.
        parameters: papermill parameters.
        threads: torch threads inside the kernel (None leaves the default).
        device: torch device for notebooks that take a ``device`` parameter.
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
    run_dir = Path(run_dir)
    return run_dir.with_name(f"{run_dir.name}.ipynb")


def read_outcome(run_dir: str | Path) -> dict | None:
    """The last outcome the runner recorded for ``run_dir``, or None."""
    path = Path(run_dir) / OUTCOME_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError:
        return None  # a damaged outcome means "not known to be finished": run again


def is_finished(run_dir: str | Path, parameters: dict | None = None) -> bool:
    """Whether ``run_dir`` records a finished run (with these ``parameters``, if given:
    a run made with other parameters is not the one asked for, so it runs again, resuming
    where the engine allows it)."""
    outcome = read_outcome(run_dir)
    if not outcome or outcome.get("status") != "finished":
        return False
    return parameters is None or _comparable(outcome.get("parameters", {})) == _comparable(
        parameters
    )


def _comparable(parameters: dict) -> dict:
    """Parameters that define a run's result (not where or how fast it ran)."""
    return {k: v for k, v in parameters.items() if k not in RUNTIME_PARAMETERS}


def _read_metrics(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.json"
    try:
        return json.loads(path.read_text("utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None


@contextlib.contextmanager
def _thread_environment(threads: int | None) -> Iterator[None]:
    """OMP/MKL thread counts for a kernel started inside this block (it inherits them)."""
    if threads is None:
        yield
        return
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: str(threads) for name in THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class HistoryTail:
    """Prints a line for each new row of a run's ``history.csv`` while the run executes:
    the per-epoch progress (epoch, losses, validation DSC, seconds, estimated time left)."""

    def __init__(self, run_id: str, history: Path, epochs: int | None, log: Log) -> None:
        self.run_id, self.history, self.epochs, self.log = run_id, history, epochs, log
        self._seen = len(self._rows())  # rows from before a resume are not news
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _rows(self) -> list[dict[str, str]]:
        try:
            with open(self.history, newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        except (FileNotFoundError, csv.Error, UnicodeDecodeError):
            return []

    def _watch(self) -> None:
        while not self._stop.wait(TAIL_SECONDS):
            self.poll()

    def poll(self) -> None:
        rows = self._rows()
        for row in rows[self._seen :]:
            self.log(self.describe(row))
        self._seen = max(self._seen, len(rows))

    def describe(self, row: dict[str, str]) -> str:
        epoch = row.get("epoch", "?")
        parts = [f"[{self.run_id}] epoch {epoch}" + (f"/{self.epochs}" if self.epochs else "")]
        for key in ("train_loss", "val_loss", "val_dsc", "val_iou"):
            if row.get(key):
                parts.append(f"{key}={float(row[key]):.4f}")
        seconds = row.get("seconds")
        if seconds:
            parts.append(f"{float(seconds):.1f}s")
            if self.epochs and epoch.isdigit():
                left = max(0, self.epochs - int(epoch)) * float(seconds)
                parts.append(f"~{left:.0f} s left" if left < 120 else f"~{left / 60:.0f} min left")
        return " ".join(parts)

    def __enter__(self) -> HistoryTail:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()


def _describe_error(error: BaseException) -> str:
    """One line (plus the failing cell when papermill knows it) for an outcome."""
    ename = getattr(error, "ename", None)
    if ename:  # papermill.PapermillExecutionError: the exception raised inside the kernel
        cell = getattr(error, "exec_count", None)
        where = f" (cell {cell})" if cell is not None else ""
        return f"{ename}: {getattr(error, 'evalue', '')}{where}"
    return f"{type(error).__name__}: {error}"


def _notebook_parameters(notebook: str | Path) -> dict[str, dict]:
    import papermill

    return papermill.inspect_notebook(str(notebook))


def _run_parameters(spec: RunSpec, declared: dict[str, dict]) -> dict:
    """The spec's parameters plus what the runner decides: threads, device, resume."""
    parameters = dict(spec.parameters)
    if "num_threads" in declared and spec.threads is not None:
        parameters["num_threads"] = spec.threads
    if "device" in declared:
        parameters["device"] = spec.device
    if "resume" in declared:
        parameters["resume"] = (Path(spec.run_dir) / "checkpoints" / "last.pt").is_file()
    return parameters


def _record(spec: RunSpec, outcome: RunOutcome, started: str, parameters: dict) -> None:
    document = {
        **asdict(outcome),
        "notebook": spec.notebook,
        "started": started,
        "ended": datetime.now(UTC).isoformat(timespec="seconds"),
        "parameters": parameters,
    }
    write_json_atomic(Path(spec.run_dir) / OUTCOME_FILE, document)


KERNEL_SOCKETS = "kernel-ipc-*"  # where a kernel binds its Unix sockets (its working folder)


def remove_stale_sockets(folder: Path, pattern: str = KERNEL_SOCKETS) -> list[Path]:
    """Delete the Unix sockets in ``folder`` matching ``pattern`` that nothing listens on
    any more (left by the kernel of a killed run); returns them. Sockets in use stay."""
    stale = []
    for path in folder.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode) and not _socket_in_use(path):
                path.unlink()
                stale.append(path)
    return stale


def _socket_in_use(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket ``path`` (when it cannot
    be told, e.g. a path too long to connect to, it counts as in use)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return False
        except OSError:
            return True
    return True


def _kernel_manager_class() -> type:
    """Kernels talk to the runner over Unix sockets where there are any (no network port;
    ipykernel also warns about unencrypted TCP), over local TCP elsewhere (Windows)."""
    from jupyter_client.manager import AsyncKernelManager

    if os.name != "posix":
        return AsyncKernelManager

    class UnixSocketKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.transport = "ipc"

    return UnixSocketKernelManager


def execute_run(spec: RunSpec, *, force: bool = False, log: Log | None = None) -> RunOutcome:
    """Run one papermill execution of ``spec.notebook`` into ``spec.run_dir``.

    Skips a run whose folder records a finished outcome with the same parameters (unless
    ``force``); resumes an interrupted training run (``resume`` is set when
    ``checkpoints/last.pt`` exists); applies ``spec.threads`` (OMP/MKL variables of the
    kernel and the ``num_threads`` parameter) and ``spec.device``. The kernel's working
    directory is the run folder; Unix sockets a killed kernel left there are removed first.
    Never raises for a failed run: the error is returned and recorded in
    ``<run_dir>/outcome.json``. Per-epoch progress lines come from the run's
    ``history.csv`` as it grows.
    """
    import papermill

    log = log or _print_line
    run_dir = Path(spec.run_dir)
    if not force and is_finished(run_dir, spec.parameters):
        return RunOutcome(spec.run_id, "skipped", None, 0.0, _read_metrics(run_dir))
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    start = time.monotonic()
    parameters = dict(spec.parameters)
    try:
        parameters = _run_parameters(spec, _notebook_parameters(spec.notebook))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / OUTCOME_FILE).unlink(missing_ok=True)
        if os.name == "posix":
            remove_stale_sockets(run_dir)
        epochs = parameters.get("epochs") if isinstance(parameters.get("epochs"), int) else None
        with (
            _thread_environment(spec.threads),
            HistoryTail(spec.run_id, run_dir / "history.csv", epochs, log),
        ):
            papermill.execute_notebook(
                spec.notebook,
                str(executed_notebook_path(run_dir)),
                parameters=parameters,
                kernel_name=KERNEL_NAME,
                cwd=str(run_dir),  # stray relative writes land in the run folder
                progress_bar=False,
                log_output=False,
                request_save_on_cell_execute=True,
                kernel_manager_class=_kernel_manager_class(),
            )
        outcome = RunOutcome(
            spec.run_id, "finished", None, time.monotonic() - start, _read_metrics(run_dir)
        )
    except Exception as error:  # any failure of this run is its outcome, never the study's
        outcome = RunOutcome(
            spec.run_id, "failed", _describe_error(error), time.monotonic() - start, None
        )
    with contextlib.suppress(OSError):
        _record(spec, outcome, started_at, parameters)
    return outcome


# ---------------------------------------------------------------- study files


@dataclass(frozen=True)
class Study:
    """A parsed study file with every run it implies."""

    name: str
    path: Path
    study_dir: Path
    overview: list[RunSpec]
    train: list[RunSpec]
    inference: RunSpec | None
    report: RunSpec | None

    @property
    def runs_dir(self) -> Path:
        return self.study_dir / "runs"


def notebooks_dir() -> Path:
    """The project's ``notebooks/`` folder (``EGEUNET_NOTEBOOKS`` overrides it)."""
    override = os.environ.get("EGEUNET_NOTEBOOKS")
    return Path(override) if override else Path(__file__).resolve().parents[1] / "notebooks"


def default_study_file() -> Path:
    """``studies/quick.yaml`` in the working directory, else in the project."""
    local = Path("studies") / "quick.yaml"
    return local if local.is_file() else Path(__file__).resolve().parents[1] / local


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise ValueError(f"{path}: {message}")


def _list_of(document: dict, key: str, kind: type, path: Path) -> list:
    value = document[key]
    value = value if isinstance(value, list) else [value]
    _require(bool(value), path, f"{key}: must not be empty")
    for item in value:
        _require(
            isinstance(item, kind) and not isinstance(item, bool),
            path,
            f"{key}: expected {kind.__name__} values, got {item!r}",
        )
    return value


def _section(
    document: dict, key: str, path: Path, default: dict | bool | None = None
) -> dict | None:
    """An optional notebook section: a mapping of parameters, ``default`` ({} unless given)
    when absent, None when false (the notebook does not run)."""
    value = document.get(key, {} if default is None else default)
    if value is False:
        return None
    _require(isinstance(value, dict), path, f"{key}: expected a mapping of parameters or false")
    return dict(value)


def read_study_document(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: study file not found")
    try:
        document = yaml.safe_load(path.read_text("utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    _require(isinstance(document, dict), path, "expected a mapping at the top level")
    unknown = sorted(set(document) - STUDY_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; known keys: {sorted(STUDY_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in document]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")
    return document


@dataclass(frozen=True)
class _Layout:
    """Where a study's pieces are: its file, the notebooks, its runs and its data."""

    source: Path
    notebooks: Path
    runs_dir: Path
    data_root: str

    def spec(self, run_id: str, notebook: str, parameters: dict) -> RunSpec:
        """A RunSpec for ``NOTEBOOKS[notebook]`` in ``runs/<run_id>``. The study file's
        ``device`` and ``num_threads`` become the spec's ``device`` and ``threads``, so the
        runner and the executors, which set those parameters from the spec, keep them."""
        _require(
            bool(SAFE_NAME.match(run_id)),
            self.source,
            f"run id {run_id!r} is not a safe folder name; rename the variant",
        )
        threads = parameters.get("num_threads")
        has_threads = isinstance(threads, int) and not isinstance(threads, bool) and threads > 0
        return RunSpec(
            run_id,
            str(self.notebooks / NOTEBOOKS[notebook]),
            str(self.runs_dir / run_id),
            parameters,
            threads=threads if has_threads else None,
            device=str(parameters.get("device", "auto")),
        )

    def dataset_root(self, dataset: str) -> str:
        """A dataset's own folder: ``<data_root>/<dataset>`` when it exists (one data
        folder for several datasets), else the data root itself; "" when there is none."""
        if self.data_root and (Path(self.data_root) / dataset).is_dir():
            return str(Path(self.data_root) / dataset)
        return self.data_root


def training_run_id(dataset: str, protocol: str, variant: str, seed: int) -> str:
    return f"{dataset}-{protocol}-{variant}-seed{seed}"


STAGE_KEYS = ("name", "datasets", "protocols", "variants", "seeds")


def _stages(document: dict, path: Path) -> list[dict]:
    """The study's stages, in order: ``stages:`` when the file has it, else one stage of
    every dataset x protocol x variant x seed. Each stage may narrow ``datasets``,
    ``protocols``, ``variants`` (names from the top-level ``variants``) and ``seeds``;
    what it leaves out comes from the top level."""
    variants = document["variants"]
    _require(
        isinstance(variants, dict) and bool(variants),
        path,
        "variants: expected a mapping of variant name -> parameters",
    )
    everything = {
        "datasets": _list_of(document, "datasets", str, path),
        "protocols": _list_of(document, "protocols", str, path),
        "variants": list(variants),
        "seeds": _list_of(document, "seeds", int, path),
    }
    if "stages" not in document:
        return [{"name": "all", **everything}]
    listed = document["stages"]
    _require(
        isinstance(listed, list) and bool(listed) and all(isinstance(s, dict) for s in listed),
        path,
        "stages: expected a list of mappings (name, datasets, protocols, variants, seeds)",
    )
    stages = []
    for number, stage in enumerate(listed, start=1):
        where = f"stages[{number}]"
        for key in stage:
            _require(key in STAGE_KEYS, path, f"{where}: unknown key {key!r}; use {STAGE_KEYS}")
        resolved = {"name": str(stage.get("name", f"stage {number}"))}
        for key, kind in (("datasets", str), ("protocols", str), ("variants", str), ("seeds", int)):
            if key in stage:
                resolved[key] = _list_of(stage, key, kind, path)
                for value in resolved[key]:
                    _require(
                        value in everything[key],
                        path,
                        f"{where}.{key}: {value!r} is not in the top-level {key}",
                    )
            else:
                resolved[key] = everything[key]
        stages.append(resolved)
    return stages


@dataclass(frozen=True)
class PlannedRun:
    """One training run a study file declares: its stage, id, identity and the training
    parameters it shares with the others plus its variant's overrides."""

    stage: str
    run_id: str
    dataset: str
    protocol: str
    variant: str
    seed: int
    parameters: dict = field(default_factory=dict)


def _planned_runs(document: dict, path: Path) -> list[PlannedRun]:
    """Every training run, stage by stage (a run that two stages name belongs to the first
    that names it), each stage with its first seed first."""
    variants = document["variants"]
    shared = _section(document, "train", path) or {}
    planned = []
    seen = set()
    for stage in _stages(document, path):
        # Seed outermost: every dataset and variant of a stage gets its first seed first.
        for seed, dataset, protocol, variant in itertools.product(
            stage["seeds"], stage["datasets"], stage["protocols"], stage["variants"]
        ):
            overrides = variants[variant]
            _require(
                isinstance(overrides, dict | None),
                path,
                f"variants.{variant}: expected a mapping of parameters",
            )
            run_id = training_run_id(dataset, protocol, variant, seed)
            if run_id in seen:
                continue
            seen.add(run_id)
            parameters = {**shared, **(overrides or {})}
            planned.append(
                PlannedRun(stage["name"], run_id, dataset, protocol, variant, seed, parameters)
            )
    return planned


def planned_runs(path: str | Path) -> list[PlannedRun]:
    """The training runs of the study file at ``path``, in the order the runner starts them."""
    path = Path(path)
    return _planned_runs(read_study_document(path), path)


def _training_specs(document: dict, layout: _Layout) -> list[RunSpec]:
    """03_train once per seed x dataset x protocol x variant of each stage, stage by stage."""
    return [
        layout.spec(
            run.run_id,
            "train",
            {
                **run.parameters,
                "dataset": run.dataset,
                "data_root": layout.dataset_root(run.dataset),
                "protocol": run.protocol,
                "seed": run.seed,
                "run_dir": str(layout.runs_dir / run.run_id),
            },
        )
        for run in _planned_runs(document, layout.source)
    ]


def _overview_specs(document: dict, layout: _Layout) -> list[RunSpec]:
    """01_data once per dataset and 02_complexity once, unless switched off."""
    specs = []
    data_section = _section(document, "data_overview", layout.source)
    if data_section is not None:
        for dataset in document["datasets"]:
            run_id = f"01_data-{dataset}"
            parameters = {
                **data_section,
                "dataset": dataset,
                "data_root": layout.dataset_root(dataset),
                "output_dir": str(layout.runs_dir / run_id),
            }
            specs.append(layout.spec(run_id, "data", parameters))
    complexity_section = _section(document, "complexity", layout.source)
    if complexity_section is not None:
        run_id = "02_complexity"
        parameters = {**complexity_section, "output_dir": str(layout.runs_dir / run_id)}
        specs.append(layout.spec(run_id, "complexity", parameters))
    return specs


def _inference_spec(document: dict, layout: _Layout, has_examples: bool) -> RunSpec | None:
    """05_inference on the checkpoint of the first dataset, protocol and seed of the
    section's ``variant`` (default ``egeunet``, else the first variant), segmenting its
    ``input_path`` (relative to the study file) or 01_data's example images. On by default
    when 01_data runs."""
    from egeunet.data_overview import EXAMPLES_FOLDER

    path = layout.source
    section = _section(document, "inference", path, default={} if has_examples else False)
    if section is None:
        return None
    variants = document["variants"]
    variant = section.pop("variant", "egeunet" if "egeunet" in variants else next(iter(variants)))
    _require(variant in variants, path, f"inference.variant: {variant!r} is not a variant here")
    dataset = _list_of(document, "datasets", str, path)[0]
    source_run = training_run_id(
        dataset,
        _list_of(document, "protocols", str, path)[0],
        variant,
        _list_of(document, "seeds", int, path)[0],
    )
    if "input_path" in section:
        input_path = (path.parent / str(section.pop("input_path"))).resolve()
    else:
        _require(
            has_examples,
            path,
            "inference: give input_path, or keep data_overview for its example images",
        )
        input_path = layout.runs_dir / f"01_data-{dataset}" / EXAMPLES_FOLDER
    parameters = {
        **section,
        "checkpoint": str(layout.runs_dir / source_run / "checkpoints" / "best.pt"),
        "input_path": str(input_path),
        "output_dir": str(layout.runs_dir / "05_inference"),
        "interactive": False,
    }
    return layout.spec("05_inference", "inference", parameters)


def _report_spec(document: dict, layout: _Layout, study_dir: Path, name: str) -> RunSpec | None:
    section = _section(document, "report", layout.source)
    if section is None:
        return None
    parameters = {
        **section,
        "study_dir": str(study_dir),
        "study_name": name,
        "study_file": str(layout.source.resolve()),
    }
    return layout.spec("04_report", "report", parameters)


def load_study(
    path: str | Path,
    data_root: str | Path | None = None,
    reports_root: str | Path = "reports",
    notebooks: str | Path | None = None,
) -> Study:
    """Parse a study file into its runs. ``data_root`` overrides the file's ``data_root``
    (which is relative to the study file); reports go to ``<reports_root>/<name>/``."""
    path = Path(path)
    document = read_study_document(path)
    name = str(document["name"])
    _require(bool(SAFE_NAME.match(name)), path, f"name: {name!r} is not a safe folder name")
    if data_root is None and document.get("data_root"):
        data_root = path.parent / str(document["data_root"])
    study_dir = (Path(reports_root) / name).resolve()
    layout = _Layout(
        source=path,
        notebooks=Path(notebooks) if notebooks else notebooks_dir(),
        runs_dir=study_dir / "runs",
        data_root=str(Path(data_root).resolve()) if data_root else "",
    )
    train = _training_specs(document, layout)
    overview = _overview_specs(document, layout)
    has_examples = any(spec.run_id.startswith("01_data-") for spec in overview)
    inference = _inference_spec(document, layout, has_examples)
    report = _report_spec(document, layout, study_dir, name)
    return Study(name, path, study_dir, overview, train, inference, report)


# ---------------------------------------------------------------- parameter checks


TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
    "list[int]": lambda v: (
        isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
    ),
}


def check_parameters(spec: RunSpec, declared: dict[str, dict], source: Path) -> None:
    """Every parameter of ``spec`` must be declared in its notebook's parameters cell, with
    a value of the declared type; otherwise ValueError naming the parameter."""
    notebook = Path(spec.notebook).name
    for name, value in spec.parameters.items():
        if name not in declared:
            raise ValueError(
                f"{source}: unknown parameter {name!r} for {notebook} (run {spec.run_id}); "
                f"its parameters are: {', '.join(sorted(declared))}"
            )
        type_name = declared[name].get("inferred_type_name", "None")
        check = TYPE_CHECKS.get(type_name)
        if check is not None and not check(value):
            raise ValueError(
                f"{source}: parameter {name!r} of {notebook} (run {spec.run_id}) must be "
                f"{type_name}, got {value!r}"
            )


def check_study(study: Study) -> None:
    """Check every run's parameters against its notebook before anything launches."""
    declared: dict[str, dict[str, dict]] = {}
    extras = [spec for spec in (study.inference, study.report) if spec is not None]
    specs = [*study.overview, *study.train, *extras]
    for spec in specs:
        if spec.notebook not in declared:
            if not Path(spec.notebook).is_file():
                raise FileNotFoundError(f"{spec.notebook}: notebook not found (run {spec.run_id})")
            declared[spec.notebook] = _notebook_parameters(spec.notebook)
        check_parameters(spec, declared[spec.notebook], study.path)


def check_kernel(name: str = KERNEL_NAME) -> None:
    """The Jupyter kernel the notebooks run on must be registered."""
    from jupyter_client.kernelspec import KernelSpecManager

    if name not in KernelSpecManager().find_kernel_specs():
        raise ValueError(
            f"Jupyter kernel {name!r} is not registered; run "
            f"`python -m ipykernel install --user --name {name}` (the Makefile does this)"
        )


# ---------------------------------------------------------------- the runner


@dataclass
class StudyResult:
    """Outcomes of every execution of a study, in the order they ran."""

    study: Study
    outcomes: list[RunOutcome]

    @property
    def ok(self) -> bool:
        return all(o.status in ("finished", "skipped") for o in self.outcomes)

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def describe_end(outcome: RunOutcome) -> str:
    text = f"{outcome.status} {outcome.run_id} ({outcome.seconds:.1f}s)"
    pooled = (outcome.metrics or {}).get("pooled", {})
    if isinstance(pooled.get("dsc"), int | float):  # null when undefined
        text += f" pooled DSC {100 * pooled['dsc']:.2f}"
    if outcome.error:
        text += f": {outcome.error}"
    return text


class _ProgressPrinter:
    """One line per run start and end, numbered within the study."""

    def __init__(self, specs: list[RunSpec], log: Log) -> None:
        self.index = {spec.run_id: i + 1 for i, spec in enumerate(specs)}
        self.total = len(specs)
        self.log = log

    def __call__(self, event: str, spec: RunSpec, outcome: RunOutcome | None) -> None:
        prefix = f"[{self.index.get(spec.run_id, '?')}/{self.total}]"
        if event == "start":
            where = f" on {spec.device}" if "device" in spec.parameters else ""
            plural = "s" if spec.threads != 1 else ""
            threads = f", {spec.threads} thread{plural}" if spec.threads else ""
            self.log(f"{prefix} start {spec.run_id}{where}{threads}")
        elif outcome is not None:
            self.log(f"{prefix} {describe_end(outcome)}")


def _run_locally(specs: list[RunSpec], log: Log, force: bool = False) -> list[RunOutcome]:
    printer = _ProgressPrinter(specs, log)
    outcomes = []
    for spec in specs:
        printer("start", spec, None)
        outcome = execute_run(spec, force=force, log=log)
        printer("end", spec, outcome)
        outcomes.append(outcome)
    return outcomes


def run_study(
    study: Study,
    executor: str = "local",
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 1,
    log: Log | None = None,
) -> StudyResult:
    """Check, then run a study: overview notebooks, training runs through the executor,
    then the report. Failed runs are recorded and do not stop the others."""
    from egeunet.executors import default_worker_count, make_executor

    log = log or _print_line
    check_kernel()
    check_study(study)
    if executor == "local" and workers is None:
        # Side by side, one run per core (each with one thread) or per GPU: on 2 CPU cores
        # two 1-thread runs train ~1.4x the images of one 2-thread run (docs/training.md).
        workers = min(default_worker_count(), max(1, len(study.train)))
    # Per-epoch lines reach the runner's log: directly in this process, and relayed from
    # dask workers by the executor (a log callable cannot travel to another process).
    # Side-by-side local runs print them from their child processes.
    in_process = executor == "local" and workers == 1
    run_fn = functools.partial(execute_run, log=log) if in_process else None
    executor_instance = make_executor(
        executor, scheduler=scheduler, workers=workers, retries=retries, run_fn=run_fn, log=log
    )
    study.runs_dir.mkdir(parents=True, exist_ok=True)
    log(
        f"study {study.name}: {len(study.overview)} overview + {len(study.train)} training "
        f"run(s) -> {study.study_dir}"
    )
    outcomes = _run_locally(study.overview, log)
    with executor_instance:
        outcomes += executor_instance.run(study.train, on_event=_ProgressPrinter(study.train, log))
    # Inference and the report always run again: the runs they read may have changed.
    extras = [spec for spec in (study.inference, study.report) if spec is not None]
    outcomes += _run_locally(extras, log, force=True)
    result = StudyResult(study, outcomes)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("finished", "skipped", "failed")}
    where = f"; report: {study.study_dir / 'REPORT.md'}" if study.report is not None else ""
    log(f"study {study.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + where)
    return result


# ---------------------------------------------------------------- command line


def register(subparsers: argparse._SubParsersAction) -> None:
    """``egeunet study`` and ``egeunet report``."""
    study = subparsers.add_parser(
        "study",
        help="run a study file: notebooks under papermill, then the report",
        description="Run every notebook execution a study file declares (resumable), then "
        "build reports/<study>/REPORT.md. Exit code 0 when every run succeeded.",
    )
    study.add_argument(
        "study_file", nargs="?", default=None, help="study YAML (default: studies/quick.yaml)"
    )
    study.add_argument("--executor", choices=("local", "dask"), default="local")
    study.add_argument("--scheduler", default=None, help="dask scheduler address (dask only)")
    study.add_argument(
        "--workers",
        type=int,
        default=None,
        help="runs side by side: local child processes, or the dask LocalCluster's worker "
        "processes (default: one per GPU, else one per CPU core, each run with one thread)",
    )
    study.add_argument(
        "--retries",
        type=int,
        default=1,
        help="restarts of a run whose dask worker died (default 1)",
    )
    study.add_argument("--data-root", default=None, help="folder holding the datasets")
    study.add_argument("--reports-dir", default="reports", help="where reports/<study>/ goes")
    study.add_argument(
        "--check",
        action="store_true",
        help="only check the study file and notebook parameters, run nothing",
    )
    study.set_defaults(func=study_command)

    report = subparsers.add_parser(
        "report",
        help="rebuild a study's report from its run folders",
        description="Rebuild REPORT.md, REPORT.html, findings.md, tables/ and figures/ of a "
        "study folder from its run folders. With --check, build nothing there: rebuild into a "
        "temporary folder and compare its tables and findings with the folder's (exit code 1 "
        "when they differ).",
    )
    report.add_argument("study_dir", help="reports/<study> folder")
    report.add_argument(
        "--study",
        default=None,
        help="the study file (e.g. studies/isic.yaml): the run status lists every run it "
        "declares, stage by stage, also those not started",
    )
    report.add_argument(
        "--check",
        action="store_true",
        help="check that the folder's report is what its run folders build (with the study "
        "file it was built with, unless --study is given)",
    )
    report.add_argument(
        "--readme",
        default=None,
        help="also write the findings into this README's findings block for the study "
        "(with --check: check that block instead)",
    )
    report.set_defaults(func=report_command)


def study_command(args: argparse.Namespace) -> int:
    path = Path(args.study_file) if args.study_file else default_study_file()
    study = load_study(path, data_root=args.data_root, reports_root=args.reports_dir)
    if args.check:
        check_study(study)
        print(
            f"{path}: {len(study.overview)} overview and {len(study.train)} training runs, "
            "parameters OK"
        )
        return 0
    result = run_study(
        study,
        executor=args.executor,
        scheduler=args.scheduler,
        workers=args.workers,
        retries=args.retries,
    )
    for outcome in result.failed:
        print(f"failed: {outcome.run_id}: {outcome.error}", file=sys.stderr)
    return 0 if result.ok else 1


def report_command(args: argparse.Namespace) -> int:
    from egeunet.readme_findings import readme_problems, update_readme
    from egeunet.report import build_report, check_report

    if args.check:
        problems = check_report(args.study_dir, args.study)
        if args.readme:
            problems += readme_problems(args.study_dir, args.readme)
        for problem in problems:
            print(f"egeunet report --check: {problem}", file=sys.stderr)
        if not problems:
            print(f"{args.study_dir}: the report is what its run folders build")
        return 1 if problems else 0
    report = build_report(args.study_dir, study_file=args.study)
    print(
        f"{report.markdown_path} ({report.runs} runs, {report.failures} failed), "
        f"{report.findings_path}, {report.html_path}"
    )
    if args.readme:
        changed = update_readme(args.study_dir, args.readme)
        print(f"{args.readme}: findings {'updated' if changed else 'already up to date'}")
    return 0
