"""Executors that carry out a study's runs.

An executor takes a list of :class:`egeunet.runfolder.RunSpec` and returns one
:class:`egeunet.runfolder.RunOutcome` per spec, in the order of the specs, calling
``on_event("start" | "end", spec, outcome)`` as runs begin and end so the study runner can
print one line each. Two kinds:

- ``"local"``: runs each spec in this process, one after another.
- ``"dask"``: submits each spec as one task to a dask.distributed cluster, either a
  LocalCluster of worker processes started here or an existing scheduler (for example one
  that dask-jobqueue runs on Slurm or PBS; see docs/distributed.md).

Build one with :func:`make_executor` and use it as a context manager, so a cluster it started
is closed again.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import inspect
import logging
import os
import queue
import socket
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Client, Future, LocalCluster

    from egeunet.runfolder import RunOutcome, RunSpec


class ExecutorKind(enum.StrEnum):
    """Where a study's training runs execute: this machine, or a Dask cluster."""

    LOCAL = "local"
    DASK = "dask"


EXECUTOR_KINDS = tuple(kind.value for kind in ExecutorKind)

RunFunction = Callable[["RunSpec"], "RunOutcome"]
EventHandler = Callable[[str, "RunSpec", "RunOutcome | None"], None]
Log = Callable[[str], None]

#: Seconds the dask executor waits for news (a run starting or ending) before checking again.
POLL_SECONDS = 0.2
#: Seconds to wait for an existing scheduler to answer before giving up.
CONNECT_TIMEOUT = "30s"


def make_executor(
    kind: str = "local",
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 1,
    run_fn: RunFunction | None = None,
    log: Log | None = None,
) -> Executor:
    """Build the executor a study runs on.

    Args:
        kind: ``"local"`` (in this process, one run after another) or ``"dask"``.
        scheduler: address of a running dask scheduler (``tcp://HOST:PORT``); dask only.
            When None, the dask executor starts a LocalCluster of ``workers`` processes.
        workers: number of worker processes of that LocalCluster (one run at a time each);
            default: one per GPU when torch sees GPUs, else one per CPU core this process
            may use. Dask only, and not with ``scheduler`` (an existing cluster has its own
            workers).
        retries: how many times a run is started again after the worker running it died
            (dask only); after that the run is reported failed.
        run_fn: the function that carries out one run; default
            :func:`egeunet.notebook_runs.execute_run`. For dask it must be a picklable top-level
            function importable on the workers.
        log: where the dask executor writes the progress lines a run prints on its worker
            (a ``run_fn`` taking a ``log`` argument, like execute_run, sends them here);
            default: print them.

    Raises:
        ValueError: for an unknown kind or a bad combination of arguments, naming it.
    """
    if kind not in EXECUTOR_KINDS:
        raise ValueError(f"executor: unknown kind {kind!r}; choose one of {list(EXECUTOR_KINDS)}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"executor: retries must be an integer >= 0, got {retries!r}")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ValueError(f"executor: workers must be an integer >= 1, got {workers!r}")
    if kind == ExecutorKind.LOCAL:
        if scheduler is not None:
            raise ValueError(
                "executor: --scheduler applies to the dask executor only (use --executor dask)"
            )
        return LocalExecutor(run_fn=run_fn, workers=workers or 1, log=log)
    if scheduler is not None and workers is not None:
        raise ValueError(
            "executor: give either --scheduler (an existing cluster, which has its own workers) "
            "or --workers (a LocalCluster started here), not both"
        )
    return DaskExecutor(
        scheduler=scheduler, workers=workers, retries=retries, run_fn=run_fn, log=log
    )


class Executor(abc.ABC):
    """Runs RunSpecs and reports each run's start and end. A context manager."""

    @abc.abstractmethod
    def run(
        self, specs: Sequence[RunSpec], on_event: EventHandler | None = None
    ) -> list[RunOutcome]:
        """Carry out every spec; return their outcomes in the order of ``specs``.

        A run that fails is returned as a ``"failed"`` outcome and does not stop the others.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the executor holds (a cluster it started). Safe to call twice."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """Runs the specs on this machine, ``workers`` at a time.

    One worker runs each spec in this process, one after another, with the spec as given.
    More workers run that many specs side by side, each in a child process of its own
    (``run_fn`` must then be picklable: a top-level function), with this machine's cores
    shared out as ``max(1, cores // workers)`` threads per run (a smaller ``threads`` in
    the spec is kept). The progress lines of a ``run_fn`` taking a ``log`` argument (like
    execute_run) come back through a queue to ``log``. This process only waits on its
    children and that queue; it adds no polling of its own.
    """

    def __init__(
        self, run_fn: RunFunction | None = None, workers: int = 1, log: Log | None = None
    ) -> None:
        self._run_fn = run_fn
        self.workers = workers
        self._log = log or _print_line

    def run(
        self, specs: Sequence[RunSpec], on_event: EventHandler | None = None
    ) -> list[RunOutcome]:
        run_fn = self._run_fn or default_run_function()
        notify = on_event or _ignore_event
        if self.workers > 1 and len(specs) > 1:
            return self._run_side_by_side(run_fn, specs, notify)
        outcomes = []
        for spec in specs:
            notify("start", spec, None)
            started = time.monotonic()
            try:
                outcome = run_fn(spec)
            except Exception as error:  # run functions should not raise; isolate it if one does
                outcome = failed_outcome(
                    spec, f"{type(error).__name__}: {error}", time.monotonic() - started
                )
            notify("end", spec, outcome)
            outcomes.append(outcome)
        return outcomes

    def _run_side_by_side(
        self, run_fn: RunFunction, specs: Sequence[RunSpec], notify: EventHandler
    ) -> list[RunOutcome]:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        placement = Placement(max(1, len(_usable_cpus()) // self.workers), None)
        placed = [place_spec(spec, placement) for spec in specs]
        outcomes: list[RunOutcome | None] = [None] * len(specs)
        waiting = deque(range(len(specs)))
        running: dict = {}  # future -> (index, start time, its pool)
        context = multiprocessing.get_context("spawn")  # no forked torch or threads
        lines = context.SimpleQueue()
        relay = threading.Thread(target=_relay_lines, args=(lines, self._log), daemon=True)
        relay.start()
        try:
            while waiting or running:
                while waiting and len(running) < self.workers:
                    index = waiting.popleft()
                    notify("start", placed[index], None)
                    # A pool per run: a child that dies breaks only its own run's pool.
                    pool = ProcessPoolExecutor(
                        1, mp_context=context, initializer=_set_line_queue, initargs=(lines,)
                    )
                    future = pool.submit(_run_in_child, run_fn, placed[index])
                    running[future] = (index, time.monotonic(), pool)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index, started, pool = running.pop(future)
                    pool.shutdown()
                    try:
                        outcome = future.result()
                    except Exception as error:  # the child died or the run function raised
                        outcome = failed_outcome(
                            placed[index],
                            f"{type(error).__name__}: {error}",
                            time.monotonic() - started,
                        )
                    notify("end", placed[index], outcome)
                    outcomes[index] = outcome
        finally:
            for _, _, pool in running.values():  # interrupted: children end with this process
                pool.shutdown(wait=False, cancel_futures=True)
        lines.put(None)  # every child has exited: nothing more can come
        relay.join()
        return [outcome for outcome in outcomes if outcome is not None]

    def close(self) -> None:
        """Nothing to release: a pool of child processes lives only inside run()."""


_child_lines = None  # a side-by-side child's queue of progress lines (set per process)


def _set_line_queue(lines) -> None:
    global _child_lines
    _child_lines = lines


def _run_in_child(run_fn: RunFunction, spec: RunSpec) -> RunOutcome:
    """A side-by-side run in its child process, its progress lines sent to the parent."""
    if "log" not in inspect.signature(run_fn).parameters or _child_lines is None:
        return run_fn(spec)
    return run_fn(spec, log=lambda line: _child_lines.put(str(line)))


def _relay_lines(lines, log: Log) -> None:
    while (line := lines.get()) is not None:
        log(line)


class DaskExecutor(Executor):
    """Runs each spec as one task on a dask.distributed cluster.

    Without a scheduler address it starts a LocalCluster of ``workers`` processes with one
    thread each (one run at a time per worker) and closes it on :meth:`close`. With an
    address it connects to that cluster and leaves it running.

    Placement: when a worker starts a run it sets the spec's ``threads`` to its share of the
    CPU cores it may use (cores // task slots of the workers sharing those cores; an explicit
    smaller ``threads`` in the spec is kept) and, where the worker sees GPUs, its ``device`` to
    one GPU per worker (``cuda:<i>``, i = the worker's rank among the workers on its host that
    see the same GPUs). A spec asking for ``"cpu"`` keeps it.

    Events: ``"start"`` fires when a worker actually starts a run (workers publish it as a
    dask event that this client subscribes to), so a run started again after its worker
    died gets a second ``"start"``. ``"end"`` fires as each run finishes (as_completed).
    Both are called in the thread that called :meth:`run`. Progress lines a run writes on
    its worker (per epoch) travel the same way and go to ``log``.

    Worker death: the scheduler's ``allowed_failures`` is set to ``retries``, so a run whose
    worker died is started again on a worker (it resumes from its run folder); once retries
    are used up dask raises KilledWorker and the run is reported failed while the others go
    on. On an existing scheduler the value is changed for the time this executor is open and
    restored on :meth:`close`. At most as many runs are submitted as the cluster has worker
    threads, so a dying worker takes down only the run it was executing.
    """

    def __init__(
        self,
        scheduler: str | None = None,
        workers: int | None = None,
        retries: int = 1,
        run_fn: RunFunction | None = None,
        log: Log | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.workers = workers
        self.retries = retries
        self._run_fn = run_fn
        self._log = log or _print_line
        self._cluster: LocalCluster | None = None
        self._client: Client | None = None
        self._previous_allowed_failures: int | None = None

    @property
    def client(self) -> Client:
        """The dask client, connecting (or starting the LocalCluster) on first use."""
        if self._client is None:
            self._client = self._connect()
        return self._client

    def __enter__(self) -> DaskExecutor:
        _ = self.client
        return self

    def close(self) -> None:
        client, cluster = self._client, self._cluster
        self._client, self._cluster = None, None
        if client is not None:
            if self._previous_allowed_failures is not None:
                _run_on_scheduler_quietly(
                    client, _swap_allowed_failures, self._previous_allowed_failures
                )
                self._previous_allowed_failures = None
            client.close()
        if cluster is not None:
            cluster.close()

    def _connect(self) -> Client:
        from distributed import Client, LocalCluster

        if self.scheduler is None:
            self._cluster = LocalCluster(
                n_workers=self.workers or default_worker_count(),
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # any free port: never clashes with another cluster
                silence_logs=logging.ERROR,
                scheduler_kwargs={"allowed_failures": self.retries},
            )
            return Client(self._cluster)
        try:
            client = Client(self.scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as error:
            raise ValueError(
                f"--scheduler {self.scheduler!r}: cannot connect to a dask scheduler there "
                f"({type(error).__name__}: {error})"
            ) from error
        self._previous_allowed_failures = _run_on_scheduler_quietly(
            client, _swap_allowed_failures, self.retries
        )
        if self._previous_allowed_failures is None:
            warnings.warn(
                f"could not set allowed-failures on the scheduler at {self.scheduler}; its own "
                "distributed.scheduler.allowed-failures setting decides how often a run whose "
                "worker died is retried",
                stacklevel=2,
            )
        return client

    def run(
        self, specs: Sequence[RunSpec], on_event: EventHandler | None = None
    ) -> list[RunOutcome]:
        from distributed import as_completed

        client = self.client
        run_fn = self._run_fn or default_run_function()
        topic = f"egeunet-runs-{uuid.uuid4().hex}"
        news: queue.SimpleQueue = queue.SimpleQueue()
        client.subscribe_topic(topic, news.put)
        relay = _EventRelay(specs, on_event or _ignore_event, self._log)
        waiting = deque(range(len(specs)))
        in_flight: dict[str, tuple[int, float, Future]] = {}
        # Results are fetched as soon as a run ends, so a finished run's outcome is not lost
        # (and recomputed) if its worker dies before the loop below gets to it.
        finished = as_completed(with_results=True, raise_errors=False)
        outcomes: list[RunOutcome | None] = [None] * len(specs)
        try:
            while waiting or in_flight:
                free_slots = self._free_slots(len(in_flight)) if waiting else 0
                while waiting and free_slots > 0:
                    index = waiting.popleft()
                    future = self._submit(run_fn, specs[index], index, topic)
                    in_flight[future.key] = (index, time.monotonic(), future)
                    finished.add(future)
                    free_slots -= 1
                _relay_news(news, relay, wait=POLL_SECONDS)
                for future, result in finished.next_batch(block=False):
                    _relay_news(news, relay, wait=0)
                    index, submitted, _ = in_flight.pop(future.key)
                    placed, outcome = self._outcome_of(future, result, relay.spec(index), submitted)
                    outcomes[index] = outcome
                    relay.ended(index, placed, outcome)
        finally:
            client.unsubscribe_topic(topic)
            if in_flight:  # interrupted: do not leave runs queued on the cluster
                client.cancel([future for _, _, future in in_flight.values()])
        return outcomes  # type: ignore[return-value]  # every slot was filled above

    def _submit(self, run_fn: RunFunction, spec: RunSpec, index: int, topic: str) -> Future:
        """Submit one run as a task, under a key unique to this submission."""
        key = f"egeunet-run-{spec.run_id}-{uuid.uuid4().hex[:8]}"
        return self.client.submit(run_on_worker, run_fn, spec, index, topic, key=key)

    def _free_slots(self, in_flight: int) -> int:
        """Runs that can start now: the cluster's task slots (at least one) not yet busy."""
        return max(1, sum(self.client.nthreads().values())) - in_flight

    def _outcome_of(
        self, future: Future, result: Any, spec: RunSpec, submitted: float
    ) -> tuple[RunSpec, RunOutcome]:
        """The (placed spec, outcome) of a task that ended with ``result``.

        ``result`` is what as_completed hands over: the task's return value when it finished,
        ``(type, exception, traceback)`` when it erred. Failures become failed outcomes.
        """
        from distributed import KilledWorker

        if future.status == "finished":
            return result
        seconds = time.monotonic() - submitted
        if future.status != "error":
            return spec, failed_outcome(spec, f"the cluster {future.status} the run", seconds)
        error = result[1]
        if isinstance(error, KilledWorker):
            attempts = error.allowed_failures + 1  # as the scheduler counted them
            message = (
                f"worker died while running it (KilledWorker) after {attempts} "
                f"attempt{'s' if attempts > 1 else ''}; its run folder is left resumable"
            )
        else:
            message = f"{type(error).__name__}: {error}"
        return spec, failed_outcome(spec, message, seconds)


@dataclasses.dataclass(frozen=True)
class WorkerResources:
    """What one dask worker can offer a run, as the worker itself sees it."""

    address: str
    name: str
    host: str
    cpus: tuple[int, ...]  # CPU ids this worker process may run on
    nthreads: int  # task slots: runs this worker carries out at once
    gpus: int  # GPUs torch sees in this worker
    visible_gpus: str  # CUDA_VISIBLE_DEVICES in this worker ("" when unset)


@dataclasses.dataclass(frozen=True)
class Placement:
    """How a run on one worker is limited: torch threads and, with GPUs, the device."""

    threads: int
    device: str | None  # "cuda:<i>", or None when the worker sees no GPU


def plan_placements(workers: Iterable[WorkerResources]) -> dict[str, Placement]:
    """Placement per worker address.

    Workers on one host that may use the same CPUs share them: each task slot gets
    ``max(1, cpus // slots)`` threads. Workers on one host that see the same GPUs are ranked
    by name and take GPU ``rank % gpus``, so each worker has a GPU of its own while there
    are enough.
    """
    groups: dict[tuple[str, tuple[int, ...]], list[WorkerResources]] = {}
    gpu_groups: dict[tuple[str, str], list[WorkerResources]] = {}
    for worker in workers:
        groups.setdefault((worker.host, worker.cpus), []).append(worker)
        gpu_groups.setdefault((worker.host, worker.visible_gpus), []).append(worker)
    threads: dict[str, int] = {}
    for (_, cpus), sharing in groups.items():
        slots = sum(worker.nthreads for worker in sharing)
        for worker in sharing:
            threads[worker.address] = max(1, len(cpus) // max(1, slots))
    plan: dict[str, Placement] = {}
    for sharing in gpu_groups.values():
        for rank, worker in enumerate(sorted(sharing, key=_name_order)):
            device = f"cuda:{rank % worker.gpus}" if worker.gpus > 0 else None
            plan[worker.address] = Placement(threads[worker.address], device)
    return plan


def place_spec(spec: RunSpec, placement: Placement) -> RunSpec:
    """The spec with its threads and device set for a worker's placement."""
    threads = placement.threads
    if spec.threads is not None:
        threads = max(1, min(spec.threads, placement.threads))
    device = spec.device
    if placement.device is not None and (device == "auto" or device.startswith("cuda")):
        device = placement.device
    return dataclasses.replace(spec, threads=threads, device=device)


def run_on_worker(
    run_fn: RunFunction, spec: RunSpec, index: int, topic: str
) -> tuple[RunSpec, RunOutcome]:
    """The dask task for one run: place the spec on this worker, announce the start, run it.

    Announcements and progress lines go to the client as dask events on ``topic``.
    """
    from distributed import get_worker

    worker = get_worker()
    placed = place_spec(spec, _placement_of(worker))
    worker.log_event(
        topic,
        {"index": index, "kind": "start", "threads": placed.threads, "device": placed.device},
    )
    if "log" not in inspect.signature(run_fn).parameters:
        return placed, run_fn(placed)

    def send_line(line: str) -> None:  # called from the run's own threads too: log_event is safe
        worker.log_event(topic, {"index": index, "kind": "line", "line": str(line)})

    return placed, run_fn(placed, log=send_line)


def describe_worker(dask_worker: Any) -> WorkerResources:
    """This worker's resources (run on each worker through ``Client.run``)."""
    return WorkerResources(
        address=dask_worker.address,
        name=str(dask_worker.name),
        host=socket.gethostname(),
        cpus=_usable_cpus(),
        nthreads=dask_worker.state.nthreads,
        gpus=_gpu_count(),
        visible_gpus=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    )


def default_worker_count() -> int:
    """Workers of a LocalCluster when none are asked for: one per GPU, else one per core."""
    return _gpu_count() or len(_usable_cpus())


def default_run_function() -> RunFunction:
    """:func:`egeunet.notebook_runs.execute_run`, imported when first needed."""
    from egeunet.notebook_runs import execute_run

    return execute_run


def failed_outcome(spec: RunSpec, error: str, seconds: float) -> RunOutcome:
    """A ``"failed"`` RunOutcome for a run that could not report one itself."""
    from egeunet.runfolder import RunOutcome

    return RunOutcome(
        run_id=spec.run_id, status="failed", error=error, seconds=float(seconds), metrics=None
    )


class _EventRelay:
    """Calls on_event once per start and end, a start always before its end, and passes
    progress lines to the log."""

    def __init__(self, specs: Sequence[RunSpec], on_event: EventHandler, log: Log) -> None:
        self._specs = specs
        self._on_event = on_event
        self.log = log
        self._placed: dict[int, RunSpec] = {}
        self._ended: set[int] = set()

    def spec(self, index: int) -> RunSpec:
        """The spec as last placed on a worker (as given if no start was seen)."""
        return self._placed.get(index, self._specs[index])

    def started(self, index: int, threads: int | None, device: str) -> None:
        if index in self._ended:  # a start that arrived after its run ended
            return
        placed = dataclasses.replace(self._specs[index], threads=threads, device=device)
        self._placed[index] = placed
        self._on_event("start", placed, None)

    def ended(self, index: int, placed: RunSpec, outcome: RunOutcome) -> None:
        if index not in self._placed:
            self._on_event("start", placed, None)
        self._ended.add(index)
        self._on_event("end", placed, outcome)


def _relay_news(news: queue.SimpleQueue, relay: _EventRelay, wait: float) -> None:
    """Pass on what the workers published (run starts, progress lines), waiting up to
    ``wait`` seconds for the first message."""
    try:
        _, message = news.get(timeout=wait) if wait > 0 else news.get_nowait()
    except queue.Empty:
        return
    while True:
        if message["kind"] == "start":
            relay.started(message["index"], message["threads"], message["device"])
        else:
            relay.log(message["line"])
        try:
            _, message = news.get_nowait()
        except queue.Empty:
            return


def _placement_of(worker: Any) -> Placement:
    """This worker's placement, planned from every worker the scheduler knows now."""
    from distributed import get_client

    own = describe_worker(worker)
    try:
        described = get_client().run(describe_worker, on_error="ignore")
        everyone = [resources for address, resources in described.items() if address != own.address]
    except (OSError, TimeoutError):  # the cluster is changing; plan from this worker alone
        everyone = []
    return plan_placements([own, *everyone])[own.address]


def _swap_allowed_failures(allowed_failures: int, dask_scheduler: Any) -> int:
    """Set the scheduler's allowed_failures; return the value it had."""
    previous = dask_scheduler.allowed_failures
    dask_scheduler.allowed_failures = allowed_failures
    return previous


def _run_on_scheduler_quietly(client: Client, function: Callable, *args: Any) -> Any:
    """``client.run_on_scheduler``, returning None when the scheduler refuses it."""
    try:
        return client.run_on_scheduler(function, *args)
    except Exception:  # e.g. "run_function" among the scheduler's blocked handlers
        return None


def _usable_cpus() -> tuple[int, ...]:
    """CPU ids this process may run on (its affinity, which batch systems restrict)."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


@lru_cache(maxsize=1)
def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def _name_order(worker: WorkerResources) -> tuple[int, str]:
    """Sort key putting worker "2" before "10" (and "cluster-2" before "cluster-10")."""
    return len(worker.name), worker.name


def _ignore_event(event: str, spec: RunSpec, outcome: RunOutcome | None) -> None:
    """The on_event used when the caller gives none."""


def _print_line(line: str) -> None:
    print(line, flush=True)
