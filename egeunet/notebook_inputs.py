"""What a notebook uses when a path parameter is left empty, so Run All works as it stands.

- :func:`newest_study`: the study folder under ``reports/`` whose runs changed last (after
  ``make study``: ``reports/quick``; in a fresh checkout: the committed ``reports/isic``).
- :func:`default_weights`: the weights the package ships (``egeunet/weights/``, trained by
  the ISIC study) or, until they are installed, the newest checkpoint a study left in the
  project, preferring one trained on real images; it says which and why.
- :func:`example_images`: a few dermoscopy-like images drawn by the synthetic generator
  (:mod:`egeunet.data.synthetic`), written once. The repository stores no ISIC images.

Each returns what it chose together with a sentence for the notebook to print.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from egeunet.checkpoint import DEFAULT_SHIPPED_WEIGHTS, SHIPPED_WEIGHTS, WEIGHTS_FOLDER
from egeunet.paths import project_root, resolve_existing, resolve_output

REPORTS = "reports"
RUNS = "runs"
EXAMPLES_FOLDER = "runs/example_images"
EXAMPLE_SIZES = ((288, 384), (384, 384), (256, 320), (320, 272))  # (height, width)
EXAMPLE_SEED = 2023


@dataclass(frozen=True)
class Choice:
    """A path a notebook will use, and one sentence saying what it is."""

    path: Path
    note: str


def given_or_default(
    value: str, what: str, default: Callable[[], Choice], log: Callable[[str], None] = print
) -> Path:
    """The existing path ``value`` names (:func:`~egeunet.paths.resolve_existing`), or,
    when ``value`` is empty, what ``default()`` chooses, its note passed to ``log``."""
    if value:
        return resolve_existing(value, what)
    chosen = default()
    log(f"{what}: {chosen.note}")
    return chosen.path


def _shown(path: Path) -> str:
    """``path`` relative to the project root where it lies inside it."""
    root = project_root()
    if root is not None:
        try:
            return str(path.resolve().relative_to(root))
        except ValueError:
            pass
    return str(path)


def _last_change(folder: Path) -> float:
    """The latest modification time of ``folder`` and the entries directly inside it."""
    times = [folder.stat().st_mtime]
    times += [entry.stat().st_mtime for entry in folder.iterdir()]
    return max(times)


def newest_study(reports: str | os.PathLike = REPORTS) -> Choice:
    """The study folder (one holding ``runs/``) under ``reports`` whose runs changed last.
    FileNotFoundError, saying how to make one, when there is none."""
    folder = resolve_output(reports)
    studies = [p.parent for p in folder.glob(f"*/{RUNS}") if p.is_dir()] if folder.is_dir() else []
    if not studies:
        raise FileNotFoundError(
            f"no study folder with runs/ under {folder}: run a study first (`make study`, "
            "a few minutes), or set study_dir"
        )
    newest = max(studies, key=lambda study: _last_change(study / RUNS))
    others = sorted(p.name for p in studies if p != newest)
    also = f" (also found: {', '.join(others)}; set study_dir for another)" if others else ""
    return Choice(newest, f"the newest study found: {_shown(newest)}{also}")


def _run_description(checkpoint: Path) -> tuple[bool, str]:
    """Whether the run that wrote ``checkpoint`` trained on real images, and a few words on
    it (dataset, epochs done of those planned), from its ``config.json``/``history.csv``."""
    run = checkpoint.parent.parent
    try:
        config = json.loads((run / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False, "a run without config.json"
    config = config.get("config", config)
    dataset = str(config.get("dataset", "?"))
    history = run / "history.csv"
    done = max(len(history.read_text("utf-8").splitlines()) - 1, 0) if history.is_file() else 0
    planned = config.get("epochs", "?")
    state = "finished" if (run / "metrics.json").is_file() else "not finished"
    words = f"trained on {dataset}, {done} of {planned} epochs, {state}"
    return dataset != "synthetic", words


def default_weights(reports: str | os.PathLike = REPORTS) -> Choice:
    """The shipped weights (``isic2018``, the app's default too, then ``isic2017``) when
    installed; else the newest ``best.pt`` under ``reports/*/runs`` and ``runs/``, one
    trained on real images first. FileNotFoundError, saying what to pass, when there is none."""
    for name in sorted(SHIPPED_WEIGHTS, key=lambda n: n != DEFAULT_SHIPPED_WEIGHTS):
        file = SHIPPED_WEIGHTS[name]
        if (WEIGHTS_FOLDER / file).is_file():
            return Choice(WEIGHTS_FOLDER / file, f"the shipped weights {name!r}")
    found = [
        *resolve_output(reports).glob(f"*/{RUNS}/*/checkpoints/best.pt"),
        *resolve_output(RUNS).glob("*/checkpoints/best.pt"),
    ]
    if not found:
        raise FileNotFoundError(
            f"no shipped weights are installed ({WEIGHTS_FOLDER} has none) and no "
            "checkpoint was found under reports/*/runs or runs/: run `make study` (minutes), "
            "or set checkpoint to a checkpoint file"
        )
    described = {path: _run_description(path) for path in found}
    chosen = max(found, key=lambda path: (described[path][0], path.stat().st_mtime))
    return Choice(
        chosen,
        f"no shipped weights are installed ({_shown(WEIGHTS_FOLDER)} has none), so this "
        f"uses the newest checkpoint found: {_shown(chosen)} "
        f"({described[chosen][1]})",
    )


def example_images(folder: str | os.PathLike = EXAMPLES_FOLDER) -> Choice:
    """A few generated lesion images of different sizes in ``folder`` (made once)."""
    import numpy as np
    from PIL import Image

    from egeunet.data.synthetic import generate_sample

    folder = resolve_output(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, (height, width) in enumerate(EXAMPLE_SIZES):
        path = folder / f"example_{index + 1}.png"
        if not path.is_file():
            image, _ = generate_sample(EXAMPLE_SEED, "test", index, max(height, width))
            Image.fromarray(np.asarray(image)[:height, :width]).save(path)
    return Choice(
        folder,
        f"{len(EXAMPLE_SIZES)} example images drawn by the synthetic generator in "
        f"{_shown(folder)} (no ISIC images are stored in this repository)",
    )


def recorded_study_file(study_dir: str | os.PathLike) -> Path | None:
    """The study file a study folder's report was last built with (its ``report.json``),
    where that file still exists; None otherwise."""
    record = Path(study_dir) / "report.json"
    try:
        relative = json.loads(record.read_text("utf-8")).get("study_file")
    except (OSError, ValueError):
        return None
    path = Path(study_dir) / relative if relative else None
    return path if path is not None and path.is_file() else None
