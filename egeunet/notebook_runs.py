"""One papermill execution of a notebook into its run folder, as the study runner and its
executors perform it: skip when finished, resume when interrupted, threads and device set,
progress lines from the run's history, the outcome recorded in ``outcome.json``.
"""

from __future__ import annotations

import contextlib
import csv
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from egeunet.fileio import write_json_atomic
from egeunet.metrics import PROGRESS_METRICS
from egeunet.runfolder import (
    OUTCOME_FILE,
    RunFolder,
    RunOutcome,
    RunSpec,
    executed_notebook_path,
    read_metrics,
    read_outcome,
)
from egeunet.study_files import notebook_parameters, train_parameters_from_flat

KERNEL_NAME = "egeunet"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
TAIL_SECONDS = 1.0
RUNTIME_PARAMETERS = ("resume", "if_exists", "num_threads", "device", "progress")
"""Parameters that say where or how a run executes, not what it computes."""

Log = Callable[[str], None]


def _print_line(line: str) -> None:
    print(line, flush=True)


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
    """Parameters that define a run's result (not where or how fast it ran): a training
    run's whole configuration but its device, however its outcome recorded it."""
    recorded = train_parameters_from_flat(parameters)
    kept = {k: v for k, v in recorded.items() if k not in RUNTIME_PARAMETERS}
    if isinstance(kept.get("train"), dict):
        kept["train"] = {k: v for k, v in kept["train"].items() if k != "device"}
    return kept


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
        for key in ("train_loss", "val_loss", *(m.history_column for m in PROGRESS_METRICS)):
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


def _run_parameters(spec: RunSpec, declared: dict[str, dict]) -> dict:
    """The spec's parameters plus what the runner decides: threads, device (in the
    ``train`` mapping where the notebook takes one), continuing an interrupted run
    (``if_exists``) and progress as lines rather than bars."""
    parameters = dict(spec.parameters)
    if "num_threads" in declared and spec.threads is not None:
        parameters["num_threads"] = spec.threads
    if "train" in declared and isinstance(parameters.get("train"), dict):
        parameters["train"] = {**parameters["train"], "device": spec.device}
    elif "device" in declared:
        parameters["device"] = spec.device
    if "if_exists" in declared:
        parameters["if_exists"] = "resume"
    if "progress" in declared:
        parameters["progress"] = False
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
        return RunOutcome(spec.run_id, "skipped", None, 0.0, read_metrics(run_dir))
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    start = time.monotonic()
    parameters = dict(spec.parameters)
    try:
        parameters = _run_parameters(spec, notebook_parameters(spec.notebook))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / OUTCOME_FILE).unlink(missing_ok=True)
        if os.name == "posix":
            remove_stale_sockets(run_dir)
        settings = parameters.get("train") if isinstance(parameters.get("train"), dict) else {}
        epochs = settings.get("epochs") if isinstance(settings.get("epochs"), int) else None
        with (
            _thread_environment(spec.threads),
            HistoryTail(spec.run_id, RunFolder(run_dir).history, epochs, log),
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
            spec.run_id, "finished", None, time.monotonic() - start, read_metrics(run_dir)
        )
    except Exception as error:  # any failure of this run is its outcome, never the study's
        outcome = RunOutcome(
            spec.run_id, "failed", _describe_error(error), time.monotonic() - start, None
        )
    with contextlib.suppress(OSError):
        _record(spec, outcome, started_at, parameters)
    return outcome


def check_kernel(name: str = KERNEL_NAME) -> None:
    """The Jupyter kernel the notebooks run on must be registered."""
    from jupyter_client.kernelspec import KernelSpecManager

    if name not in KernelSpecManager().find_kernel_specs():
        raise ValueError(
            f"Jupyter kernel {name!r} is not registered; run "
            f"`python -m ipykernel install --user --name {name}` (the Makefile does this)"
        )
