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
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

from egeunet.executors import EXECUTOR_KINDS, ExecutorKind
from egeunet.metrics import HEADLINE
from egeunet.notebook_runs import (  # noqa: F401  (re-exported: the runner's pieces)
    KERNEL_NAME,
    RUNTIME_PARAMETERS,
    HistoryTail,
    Log,
    _print_line,
    _run_parameters,
    check_kernel,
    execute_run,
    is_finished,
    remove_stale_sockets,
)
from egeunet.runfolder import (  # noqa: F401
    OUTCOME_FILE,
    RunOutcome,
    RunSpec,
    executed_notebook_path,
    read_outcome,
)
from egeunet.study_files import (  # noqa: F401
    NOTEBOOKS,
    PlannedRun,
    Study,
    check_parameters,
    check_study,
    default_study_file,
    load_study,
    notebooks_dir,
    planned_runs,
    read_study_document,
    training_run_id,
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
    value = (outcome.metrics or {}).get(HEADLINE.reduction, {}).get(HEADLINE.key)
    if isinstance(value, int | float):  # null when undefined
        where = HEADLINE.reduction.replace("_", "-")
        text += f" {where} {HEADLINE.label} {HEADLINE.shown(value):.2f}"
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
            takes_device = "device" in spec.parameters or "train" in spec.parameters
            where = f" on {spec.device}" if takes_device else ""
            plural = "s" if spec.threads != 1 else ""
            threads = f", {spec.threads} thread{plural}" if spec.threads else ""
            self.log(f"{prefix} start {spec.run_id}{where}{threads}")
        elif outcome is not None:
            self.log(f"{prefix} {describe_end(outcome)}")


def _run_locally(specs: list[RunSpec], log: Log, force: bool = False) -> list[RunOutcome]:
    """The overview, inference and report notebooks: one after another, in this process."""
    from egeunet.executors import LocalExecutor

    run_fn = functools.partial(execute_run, force=force, log=log)
    with LocalExecutor(run_fn, workers=1, log=log) as executor:
        return executor.run(specs, on_event=_ProgressPrinter(specs, log))


def run_study(
    study: Study,
    executor: str = ExecutorKind.LOCAL.value,
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
    if executor == ExecutorKind.LOCAL and workers is None:
        # Side by side, one run per core (each with one thread) or per GPU: on 2 CPU cores
        # two 1-thread runs train ~1.4x the images of one 2-thread run (docs/training.md).
        workers = min(default_worker_count(), max(1, len(study.train)))
    # Per-epoch lines reach the runner's log: directly in this process, and relayed from
    # dask workers by the executor (a log callable cannot travel to another process).
    # Side-by-side local runs print them from their child processes.
    in_process = executor == ExecutorKind.LOCAL and workers == 1
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
    study.add_argument("--executor", choices=EXECUTOR_KINDS, default=ExecutorKind.LOCAL.value)
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
