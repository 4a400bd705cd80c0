"""Copy the compact evidence of a study's runs into a folder that is committed.

A long study runs in one folder (a clone of a fixed commit) and its evidence is kept in
another (the repository's ``reports/<study>/``), so that a working session that ends
loses nothing and the next one continues where it stopped:

* every run: ``config.json``, ``history.csv``, ``metrics.json``, ``per_image.csv`` and
  the runner's ``outcome.json`` (what the report and the runner's skip/resume read);
* a run that has not finished: its ``checkpoints/last.pt`` and ``checkpoints/best.pt``
  too (~1.3 MB), so that ``egeunet study`` run on the evidence folder resumes it;
* a finished run: no checkpoints (they are removed from the evidence folder), except
  the ``checkpoints/best.pt`` (~310 KB, the model alone) of a ``clean``-protocol run of the
  full model: ``egeunet ship-weights --study reports/<study>`` chooses the shipped weights
  among those runs, which may finish in different sessions;
* ``runs/02_complexity/complexity.csv`` (the report's parameter and MAC counts) and each
  ``runs/01_data-<dataset>/summary.json`` and ``split_counts.csv`` (image counts).

Executed notebooks, prediction images and ``cases.npz`` (pixels of the dataset's
images) stay behind. ``egeunet evidence SOURCE DEST`` does this; docs/notebooks.md tells
the whole procedure.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from egeunet.fileio import atomic_open
from egeunet.notebook_runs import is_finished
from egeunet.runfolder import (
    BEST_CHECKPOINT,
    CONFIG_FILE,
    HISTORY_FILE,
    LAST_CHECKPOINT,
    METRICS_FILE,
    OUTCOME_FILE,
    PER_IMAGE_FILE,
    RunFolder,
    read_json,
)
from egeunet.shipped import is_candidate

RUN_FILES = (CONFIG_FILE, HISTORY_FILE, METRICS_FILE, PER_IMAGE_FILE, OUTCOME_FILE)
RESUME_FILES = (LAST_CHECKPOINT, BEST_CHECKPOINT)
STUDY_FILES = (  # glob patterns under runs/
    "02_complexity/complexity.csv",
    f"02_complexity/{OUTCOME_FILE}",
    "01_data-*/summary.json",  # counts per split (the report's data table), no pixels
    "01_data-*/split_counts.csv",
)


@dataclass
class EvidenceChanges:
    """What one copy changed in the evidence folder (paths relative to it)."""

    copied: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)


def _same_bytes(a: Path, b: Path) -> bool:
    return b.is_file() and a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def _copy(source: Path, dest: Path, changes: EvidenceChanges, relative: str) -> None:
    if _same_bytes(source, dest):
        return
    with open(source, "rb") as reading, atomic_open(dest, "wb") as writing:
        shutil.copyfileobj(reading, writing)
    changes.copied.append(relative)


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and RunFolder(path).config.is_file()


def _ships_from(run: Path) -> bool:
    """Whether ``run`` is one the shipped weights may be chosen from (its best.pt stays)."""
    config_doc = read_json(RunFolder(run).config) or {}
    return is_candidate(config_doc.get("config") or {})


def copy_evidence(source: str | Path, dest: str | Path) -> EvidenceChanges:
    """Bring ``dest`` (a study folder: ``dest/runs/<run>/``) up to date with ``source``.

    Raises:
        FileNotFoundError: ``source`` has no ``runs`` folder.
        ValueError: ``source`` and ``dest`` are the same folder.
    """
    source, dest = Path(source).resolve(), Path(dest).resolve()
    if not (source / "runs").is_dir():
        raise FileNotFoundError(f"{source}: no runs folder (is it a study folder?)")
    if source == dest:
        raise ValueError(f"evidence: source and destination are the same folder ({source})")
    changes = EvidenceChanges()
    for pattern in STUDY_FILES:
        for path in sorted((source / "runs").glob(pattern)):
            relative = str(path.relative_to(source / "runs"))
            _copy(path, dest / "runs" / relative, changes, relative)
    for run in sorted(p for p in (source / "runs").iterdir() if _is_run_folder(p)):
        target = dest / "runs" / run.name
        for name in RUN_FILES:
            if (run / name).is_file():
                _copy(run / name, target / name, changes, f"{run.name}/{name}")
        if is_finished(run) and RunFolder(run).metrics.is_file():
            changes.finished.append(run.name)
            kept = (BEST_CHECKPOINT,) if _ships_from(run) else ()
            for name in kept:
                if (run / name).is_file():
                    _copy(run / name, target / name, changes, f"{run.name}/{name}")
            for name in RESUME_FILES:
                if name not in kept and (target / name).exists():
                    (target / name).unlink()
                    changes.removed.append(f"{run.name}/{name}")
            continue
        changes.unfinished.append(run.name)
        for name in RESUME_FILES:
            if (run / name).is_file():
                _copy(run / name, target / name, changes, f"{run.name}/{name}")
    return changes


def run_evidence(args: argparse.Namespace) -> int:
    changes = copy_evidence(args.source, args.dest)
    print(
        f"evidence: {len(changes.finished)} finished run(s), {len(changes.unfinished)} "
        f"unfinished (resume state kept); {len(changes.copied)} file(s) copied, "
        f"{len(changes.removed)} checkpoint(s) of finished runs removed -> {args.dest}"
    )
    for name in changes.unfinished:
        print(f"  unfinished: {name}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``egeunet evidence``."""
    parser = subparsers.add_parser(
        "evidence",
        help="copy a study's compact run evidence (and resume state) into a committed folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="the study folder a study runs in (holds runs/)")
    parser.add_argument("dest", help="the evidence folder, e.g. reports/isic in the repository")
    parser.set_defaults(func=run_evidence)
