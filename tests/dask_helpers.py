"""A stand-in for ``egeunet.study.execute_run`` that the executor tests hand to dask workers.

It lives in its own module (not in a test file) so worker processes can import it: pytest
puts ``tests/`` on ``sys.path`` and LocalCluster's spawned workers inherit ``sys.path``.

The stand-in behaves like a training run with checkpoints: it advances a deterministic state
one "epoch" at a time, saving it in the run folder after each epoch, resumes from the saved
state when started again, and skips a run whose ``metrics.json`` exists. Parameters:
``seed``, ``epochs``, ``seconds_per_epoch`` and, to simulate a worker killed mid-run,
``die_at_epoch``: on the first attempt that reaches that epoch the process kills itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from egeunet.fileio import write_json_atomic
from egeunet.study import RunOutcome, RunSpec

STATE_FILE = "state.json"
METRICS_FILE = "metrics.json"
ATTEMPTS_FILE = "attempts.txt"
DIED_MARKER = "died-once"


def advance(value: str, epoch: int) -> str:
    """One deterministic "epoch" of training: the next state from the current one."""
    return hashlib.sha256(f"{value}/{epoch}".encode()).hexdigest()[:16]


def expected_value(seed: int, epochs: int) -> str:
    """The final state of an uninterrupted run (the known answer)."""
    value = str(seed)
    for epoch in range(epochs):
        value = advance(value, epoch)
    return value


def fake_training_run(spec: RunSpec, log: Callable[[str], None] = print) -> RunOutcome:
    """Carry out one stand-in run in ``spec.run_dir``, writing a progress line per epoch to
    ``log``; never raises for a failed run."""
    started = time.monotonic()
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        return RunOutcome(spec.run_id, "skipped", None, time.monotonic() - started, metrics)
    with open(run_dir / ATTEMPTS_FILE, "a") as attempts:
        attempts.write(f"{os.getpid()}\n")
    parameters = spec.parameters
    if parameters.get("raise"):
        return RunOutcome(spec.run_id, "failed", "asked to fail", time.monotonic() - started, None)
    state_path = run_dir / STATE_FILE
    state = (
        json.loads(state_path.read_text())
        if state_path.exists()
        else {"epoch": 0, "value": str(parameters["seed"])}
    )
    first_epoch = state["epoch"]
    for epoch in range(first_epoch, parameters["epochs"]):
        if epoch == parameters.get("die_at_epoch") and not (run_dir / DIED_MARKER).exists():
            (run_dir / DIED_MARKER).touch()
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-run
        time.sleep(parameters.get("seconds_per_epoch", 0.0))
        state = {"epoch": epoch + 1, "value": advance(state["value"], epoch)}
        write_json_atomic(state_path, state)
        log(f"[{spec.run_id}] epoch {epoch + 1}")
    metrics = {
        "value": state["value"],
        "resumed_from_epoch": first_epoch,
        "pid": os.getpid(),
        "threads": spec.threads,
        "device": spec.device,
    }
    write_json_atomic(metrics_path, metrics)
    return RunOutcome(spec.run_id, "finished", None, time.monotonic() - started, metrics)


def attempts_of(run_dir: str | Path) -> list[int]:
    """Process ids of every attempt that started the run."""
    path = Path(run_dir) / ATTEMPTS_FILE
    return [int(line) for line in path.read_text().split()] if path.exists() else []


KILL_MARKER_SUFFIX = ".kill-after-first-epoch"


def kill_marker(run_dir: str | Path) -> Path:
    """Beside a run folder: asks :func:`execute_run_killed_once` to kill that run's worker."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + KILL_MARKER_SUFFIX)


def execute_run_killed_once(spec: RunSpec, log: Callable[[str], None] | None = None) -> RunOutcome:
    """``egeunet.study.execute_run``, except that a run with a kill marker has its worker
    process killed (SIGKILL) once its first epoch is saved; the marker is used up then."""
    from egeunet.study import execute_run

    marker = kill_marker(spec.run_dir)
    try:
        marker.rename(marker.with_name(marker.name + ".used"))
    except FileNotFoundError:
        return execute_run(spec, log=log)
    watcher = threading.Thread(target=_kill_after_first_epoch, args=(Path(spec.run_dir),))
    watcher.daemon = True
    watcher.start()
    return execute_run(spec, log=log)


def _kill_after_first_epoch(run_dir: Path) -> None:
    """Kill this process once the run folder has an epoch in history.csv and last.pt."""
    history = run_dir / "history.csv"
    checkpoint = run_dir / "checkpoints" / "last.pt"
    while True:
        rows = history.read_text().splitlines()[1:] if history.exists() else []
        if rows and checkpoint.exists():
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)
