"""Executors: the local one, and the dask one on a real LocalCluster of worker processes.

The cluster tests hand the executors a stand-in run function (tests/dask_helpers.py) that
checkpoints after every "epoch" and resumes like a real run, so worker death and resume are
tested in seconds; test_real_study_* (at the end, marked slow) drives execute_run and
03_train itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from dask_helpers import (
    DIED_MARKER,
    attempts_of,
    execute_run_killed_once,
    expected_value,
    fake_training_run,
    kill_marker,
)
from kernel_helpers import ensure_kernel

from egeunet import executors
from egeunet.executors import (
    DaskExecutor,
    LocalExecutor,
    Placement,
    WorkerResources,
    make_executor,
    place_spec,
    plan_placements,
)
from egeunet.study import RunSpec

SEEDS = (1, 2, 3, 4)


def make_specs(root: Path, epochs: int = 3, extra: dict[int, dict] | None = None) -> list[RunSpec]:
    """Four stand-in runs, one per seed; ``extra`` maps run index -> added parameters."""
    extra = extra or {}
    return [
        RunSpec(
            run_id=f"synthetic-seed{seed}",
            notebook="unused.ipynb",
            run_dir=str(root / f"seed{seed}"),
            parameters={
                "seed": seed,
                "epochs": epochs,
                "seconds_per_epoch": 0.1,
                **extra.get(index, {}),
            },
            threads=None,
            device="auto",
        )
        for index, seed in enumerate(SEEDS)
    ]


class EventLog:
    """Records on_event calls as (event, run_id, status)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    def __call__(self, event, spec, outcome) -> None:
        self.calls.append((event, spec.run_id, outcome.status if outcome else None))

    def of(self, run_id: str) -> list[tuple[str, str | None]]:
        return [(event, status) for event, rid, status in self.calls if rid == run_id]


def worker_pids(executor: DaskExecutor) -> set[int]:
    return set(executor.client.run(os.getpid).values())


@pytest.fixture(scope="module")
def worker_lines() -> list[str]:
    """Progress lines the module's dask executor relayed from its workers."""
    return []


@pytest.fixture(scope="module")
def dask_executor(worker_lines):
    """A LocalCluster of 2 worker processes that retries a run once after its worker died."""
    with make_executor(
        "dask", workers=2, retries=1, run_fn=fake_training_run, log=worker_lines.append
    ) as executor:
        yield executor


# --- argument checks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"kind": "slurm"}, "kind"),
        ({"kind": "dask", "retries": -1}, "retries"),
        ({"kind": "dask", "workers": 0}, "workers"),
        ({"kind": "local", "scheduler": "tcp://127.0.0.1:1"}, "dask executor only"),
        ({"kind": "local", "workers": 0}, "workers"),
        ({"kind": "dask", "workers": 2, "scheduler": "tcp://127.0.0.1:1"}, "not both"),
    ],
)
def test_make_executor_rejects_bad_arguments(arguments, named):
    with pytest.raises(ValueError, match=named):
        make_executor(**arguments)


def test_make_executor_kinds():
    assert isinstance(make_executor(), LocalExecutor)
    assert isinstance(make_executor("dask", workers=1), DaskExecutor)  # nothing starts yet


# --- placement planning (known answers) ---------------------------------------------------


def resources(address, name, host="node1", cpus=8, nthreads=1, gpus=0, visible=""):
    return WorkerResources(address, name, host, tuple(range(cpus)), nthreads, gpus, visible)


def test_plan_shares_cores_among_workers_of_a_host_and_pins_one_gpu_each():
    plan = plan_placements(
        [
            resources("a", "10", gpus=4),
            resources("b", "2", gpus=4),
            resources("c", "3", gpus=4, nthreads=2),  # two task slots on one worker
            resources("d", "0", host="node2", cpus=6, gpus=0),
        ]
    )
    # node1: 8 cores over 4 slots -> 2 threads; GPUs by name order 2, 3, 10.
    assert plan == {
        "b": Placement(2, "cuda:0"),
        "c": Placement(2, "cuda:1"),
        "a": Placement(2, "cuda:2"),
        "d": Placement(6, None),
    }


def test_plan_keeps_separate_cpusets_and_gpu_sets_apart():
    # Two batch jobs on one node: each has its own cores and its own visible GPU.
    first = WorkerResources("a", "job-1", "node1", (0, 1, 2, 3), 1, 1, "0")
    second = WorkerResources("b", "job-2", "node1", (4, 5, 6, 7), 1, 1, "1")
    assert plan_placements([first, second]) == {
        "a": Placement(4, "cuda:0"),
        "b": Placement(4, "cuda:0"),
    }


def test_plan_gives_at_least_one_thread_and_wraps_gpus():
    plan = plan_placements([resources(str(i), str(i), cpus=2, gpus=2) for i in range(3)])
    assert [plan[str(i)] for i in range(3)] == [
        Placement(1, "cuda:0"),
        Placement(1, "cuda:1"),
        Placement(1, "cuda:0"),
    ]


def test_place_spec_keeps_cpu_requests_and_smaller_thread_limits(tmp_path):
    spec = make_specs(tmp_path)[0]
    on_gpu = Placement(threads=4, device="cuda:1")
    assert (place_spec(spec, on_gpu).threads, place_spec(spec, on_gpu).device) == (4, "cuda:1")
    cpu_only = place_spec(dataclasses.replace(spec, device="cpu", threads=2), on_gpu)
    assert (cpu_only.threads, cpu_only.device) == (2, "cpu")
    no_gpu = place_spec(dataclasses.replace(spec, threads=16), Placement(4, None))
    assert (no_gpu.threads, no_gpu.device) == (4, "auto")


def test_describe_worker_reports_what_this_process_may_use():
    import torch

    worker = SimpleNamespace(address="tcp://w:1", name=3, state=SimpleNamespace(nthreads=2))
    described = executors.describe_worker(worker)
    assert (described.address, described.name, described.nthreads) == ("tcp://w:1", "3", 2)
    assert described.cpus == tuple(sorted(os.sched_getaffinity(0)))
    assert described.gpus == torch.cuda.device_count()
    gpus = torch.cuda.device_count()
    assert executors.default_worker_count() == (gpus or len(os.sched_getaffinity(0)))


# --- the local executor -----------------------------------------------------------------


def test_local_executor_runs_in_order_and_isolates_failures(tmp_path):
    specs = make_specs(tmp_path, epochs=2, extra={1: {"raise": True}})
    log = EventLog()
    with make_executor("local", run_fn=fake_training_run) as executor:
        outcomes = executor.run(specs, log)
    assert [o.run_id for o in outcomes] == [s.run_id for s in specs]
    assert [o.status for o in outcomes] == ["finished", "failed", "finished", "finished"]
    assert outcomes[0].metrics["value"] == expected_value(1, 2)
    assert outcomes[0].metrics["pid"] == os.getpid()  # in this process
    assert [event for event, _, _ in log.calls] == ["start", "end"] * 4
    assert log.of(specs[1].run_id) == [("start", None), ("end", "failed")]


def test_local_executor_turns_a_raising_run_function_into_a_failed_outcome(tmp_path):
    def broken(spec):
        raise RuntimeError("kernel vanished")

    outcome = LocalExecutor(run_fn=broken).run(make_specs(tmp_path)[:1])[0]
    assert (outcome.status, outcome.error) == ("failed", "RuntimeError: kernel vanished")


def test_local_executor_side_by_side_runs_children_and_relays_their_lines(tmp_path):
    specs = make_specs(tmp_path, epochs=2, extra={1: {"raise": True}})
    events = EventLog()
    lines = []
    with make_executor("local", workers=2, run_fn=fake_training_run, log=lines.append) as ex:
        outcomes = ex.run(specs, events)
    assert [o.run_id for o in outcomes] == [s.run_id for s in specs]  # in the specs' order
    assert [o.status for o in outcomes] == ["finished", "failed", "finished", "finished"]
    assert outcomes[3].metrics["value"] == expected_value(4, 2)
    pids = {o.metrics["pid"] for o in outcomes if o.metrics}
    assert os.getpid() not in pids and len(pids) == 3  # a fresh child process per run
    cores = len(os.sched_getaffinity(0))
    assert {o.metrics["threads"] for o in outcomes if o.metrics} == {max(1, cores // 2)}
    for spec in specs:  # every start before its end, and at most two at once
        assert [kind for kind, _ in events.of(spec.run_id)] == ["start", "end"]
    running = 0
    for event, _, _ in events.calls:
        running += 1 if event == "start" else -1
        assert running <= 2
    assert sorted(lines) == sorted(
        f"[{spec.run_id}] epoch {epoch}" for spec in specs if spec != specs[1] for epoch in (1, 2)
    )


def test_local_executor_side_by_side_survives_a_child_that_dies(tmp_path):
    specs = make_specs(tmp_path, epochs=3, extra={0: {"die_at_epoch": 1}})
    outcomes = LocalExecutor(run_fn=fake_training_run, workers=2).run(specs[:2])
    assert outcomes[0].status == "failed" and "BrokenProcessPool" in outcomes[0].error
    assert outcomes[1].status == "finished"  # the other run is unaffected
    assert outcomes[1].metrics["value"] == expected_value(2, 3)


# --- the dask executor on a real LocalCluster ---------------------------------------------


def test_dask_gives_the_local_results_and_places_runs_on_the_workers(
    dask_executor, worker_lines, tmp_path
):
    local = make_executor("local", run_fn=fake_training_run).run(make_specs(tmp_path / "local"))
    worker_lines.clear()
    log = EventLog()
    specs = make_specs(tmp_path / "dask")
    outcomes = dask_executor.run(specs, log)

    assert [o.status for o in outcomes] == ["finished"] * 4
    assert [o.metrics["value"] for o in outcomes] == [o.metrics["value"] for o in local]
    assert [o.metrics["value"] for o in outcomes] == [expected_value(s, 3) for s in SEEDS]
    pids = {o.metrics["pid"] for o in outcomes}
    assert pids <= worker_pids(dask_executor) and len(pids) == 2  # both workers ran runs
    cores = len(os.sched_getaffinity(0))
    assert {o.metrics["threads"] for o in outcomes} == {max(1, cores // 2)}
    for spec in specs:
        assert log.of(spec.run_id) == [("start", None), ("end", "finished")]
        # each epoch's progress line travelled from the worker to this process's log
        assert [line for line in worker_lines if line.startswith(f"[{spec.run_id}]")] == [
            f"[{spec.run_id}] epoch {epoch}" for epoch in (1, 2, 3)
        ]


def test_dask_skips_finished_runs_on_a_second_pass(dask_executor, tmp_path):
    specs = make_specs(tmp_path)
    first = dask_executor.run(specs)
    again = dask_executor.run(specs)
    assert [o.status for o in again] == ["skipped"] * 4
    assert [o.metrics for o in again] == [o.metrics for o in first]


def test_dask_retries_a_run_whose_worker_was_killed_and_it_resumes(dask_executor, tmp_path):
    specs = make_specs(tmp_path, epochs=4, extra={2: {"die_at_epoch": 2}})
    log = EventLog()
    before = worker_pids(dask_executor)
    outcomes = dask_executor.run(specs, log)

    assert [o.status for o in outcomes] == ["finished"] * 4
    killed = outcomes[2]
    assert Path(specs[2].run_dir, DIED_MARKER).exists()
    assert len(attempts_of(specs[2].run_dir)) == 2
    assert killed.metrics["resumed_from_epoch"] == 2  # continued, not started over
    assert killed.metrics["value"] == expected_value(SEEDS[2], 4)
    assert log.of(specs[2].run_id) == [("start", None), ("start", None), ("end", "finished")]
    dask_executor.client.wait_for_workers(2, timeout=60)
    assert len(worker_pids(dask_executor) - before) == 1  # the nanny started a new worker
    assert dask_executor.client.run_on_scheduler(allowed_failures) == 1  # = retries


def allowed_failures(dask_scheduler) -> int:
    return dask_scheduler.allowed_failures


def test_dask_on_an_existing_scheduler_reports_a_killed_run_failed_after_retries(tmp_path):
    from distributed import LocalCluster

    specs = make_specs(tmp_path, extra={0: {"die_at_epoch": 1}})
    with LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster:
        scheduler = cluster.scheduler
        assert scheduler.allowed_failures == 3  # dask's default
        with make_executor(
            "dask", scheduler=cluster.scheduler_address, retries=0, run_fn=fake_training_run
        ) as executor:
            assert scheduler.allowed_failures == 0
            outcomes = executor.run(specs)
        assert scheduler.allowed_failures == 3  # restored when the executor closed
        assert cluster.status.name == "running"  # someone else's cluster is left running

    assert [o.status for o in outcomes] == ["failed", "finished", "finished", "finished"]
    assert "KilledWorker" in outcomes[0].error and "after 1 attempt" in outcomes[0].error
    assert outcomes[0].metrics is None and len(attempts_of(specs[0].run_dir)) == 1

    # The killed run's folder is resumable: running it again continues from epoch 1.
    resumed = LocalExecutor(run_fn=fake_training_run).run(specs[:1])[0]
    assert (resumed.status, resumed.metrics["resumed_from_epoch"]) == ("finished", 1)
    assert resumed.metrics["value"] == expected_value(SEEDS[0], 3)


def test_dask_executor_closes_the_cluster_it_started(tmp_path):
    with make_executor("dask", workers=1, run_fn=fake_training_run) as executor:
        pids = worker_pids(executor)
        (outcome,) = executor.run(make_specs(tmp_path, epochs=1)[:1])
    # One worker has every core this process may use.
    assert outcome.metrics["threads"] == len(os.sched_getaffinity(0))
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def test_dask_executor_names_an_unreachable_scheduler(monkeypatch):
    monkeypatch.setattr(executors, "CONNECT_TIMEOUT", "1s")
    executor = make_executor("dask", scheduler="tcp://127.0.0.1:9")
    with pytest.raises(ValueError, match=r"--scheduler 'tcp://127.0.0.1:9'"):
        executor.run([])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still answers kill(0); it is gone once its state says so.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- a real synthetic study: papermill runs of 03_train through both executors -----------

REAL_TRAIN = {
    "image_size": 64,
    "epochs": 2,
    "batch_size": 4,
    "max_train_images": 8,
    "max_eval_images": 8,
}
TIMING_KEYS = {"train_seconds"}


def real_study_specs(root: Path, reports: str, threads: int) -> list[RunSpec]:
    """The four training runs of a tiny synthetic study (2 variants x 2 seeds), on the CPU
    with ``threads`` torch threads (the same for both executors, so results can match)."""
    from egeunet.study import load_study

    study_file = root / "dask.yaml"
    study_file.write_text(
        yaml.safe_dump(
            {
                "name": "dask",
                "datasets": ["synthetic"],
                "protocols": ["paper"],
                "seeds": [1, 2],
                "variants": {"egeunet": {}, "unet": {"ghpa": False, "gab": False}},
                "train": REAL_TRAIN,
                "data_overview": False,
                "complexity": False,
                "inference": False,
                "report": False,
            }
        )
    )
    train = load_study(study_file, reports_root=root / reports).train
    return [dataclasses.replace(spec, device="cpu", threads=threads) for spec in train]


def comparable_metrics(run_dir: str) -> dict:
    metrics = json.loads(Path(run_dir, "metrics.json").read_text())
    return {key: value for key, value in metrics.items() if key not in TIMING_KEYS}


@pytest.mark.slow  # 1.5 to 2.5 minutes on 2 shared cores
def test_real_study_on_dask_matches_local_even_with_a_worker_killed(tmp_path, monkeypatch):
    ensure_kernel()
    monkeypatch.setenv("EGEUNET_CACHE", str(tmp_path / "cache"))  # workers and kernels inherit it
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # what each of 2 workers gets
    local_specs = real_study_specs(tmp_path, "local", threads)
    dask_specs = real_study_specs(tmp_path, "dask", threads)
    kill_marker(dask_specs[1].run_dir).parent.mkdir(parents=True, exist_ok=True)
    kill_marker(dask_specs[1].run_dir).touch()

    started = time.monotonic()
    local = make_executor("local").run(local_specs)
    local_seconds = time.monotonic() - started
    log, lines = EventLog(), []
    started = time.monotonic()
    with make_executor(
        "dask", workers=2, retries=1, run_fn=execute_run_killed_once, log=lines.append
    ) as executor:
        remote = executor.run(dask_specs, log)
    dask_seconds = time.monotonic() - started
    print(f"4 runs: local {local_seconds:.1f} s, dask (2 workers, one killed) {dask_seconds:.1f} s")

    assert [o.status for o in local] == ["finished"] * 4, [o.error for o in local]
    assert [o.status for o in remote] == ["finished"] * 4, [o.error for o in remote]
    for local_spec, dask_spec in zip(local_specs, dask_specs, strict=True):
        assert comparable_metrics(dask_spec.run_dir) == comparable_metrics(local_spec.run_dir)
    killed = dask_specs[1]
    assert log.of(killed.run_id) == [("start", None), ("start", None), ("end", "finished")]
    recorded = json.loads(Path(killed.run_dir, "outcome.json").read_text())
    assert recorded["parameters"]["resume"] is True  # the retry continued from last.pt
    assert recorded["parameters"]["num_threads"] == threads
    # Per-epoch progress printed by execute_run on the workers reached this process (the
    # killed run may have saved epoch 2 before it died, leaving no epoch to report).
    for spec in dask_specs[:1] + dask_specs[2:]:
        assert any(line.startswith(f"[{spec.run_id}] epoch 2/2") for line in lines), lines
