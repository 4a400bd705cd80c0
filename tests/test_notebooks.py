"""The notebooks: paired .py/.ipynb in sync and committed without outputs, parameters cells
that papermill reads completely, and every notebook executed under papermill with tiny
parameters (synthetic data, 1 epoch, 16 images, CPU), its written files checked.

01-04 run the way a study runs them: through the study runner on a tiny study file; 05
then segments images with the checkpoint that study trained.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml
from jupytext.cli import jupytext as jupytext_cli
from kernel_helpers import ensure_kernel
from PIL import Image

from egeunet import study

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = [Path(name).stem for name in study.NOTEBOOKS.values()]


def parameters_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    return tagged[0]


def check_pair_in_sync(folder: Path, name: str) -> None:
    """The .ipynb and .py of ``name`` in ``folder`` hold the same cells (outputs and
    metadata a JupyterLab save adds do not matter)."""
    saved = nbformat.read(folder / f"{name}.ipynb", as_version=4)
    from_script = jupytext.read(folder / f"{name}.py")
    assert [c.source for c in saved.cells] == [c.source for c in from_script.cells], (
        f"{name}.ipynb and {name}.py differ: run `jupytext --sync notebooks/{name}.py`"
    )
    assert [c.cell_type for c in saved.cells] == [c.cell_type for c in from_script.cells]
    assert saved.metadata["kernelspec"]["name"] == study.KERNEL_NAME


def committed_text(path: Path) -> str:
    """``path`` as git holds it (the index: what the next commit stores, after the clean
    filter), or as it is on disk outside a git checkout or when untracked."""
    shown = subprocess.run(
        ["git", "show", f":./{path.name}"], cwd=path.parent, capture_output=True, text=True
    )
    return shown.stdout if shown.returncode == 0 else path.read_text(encoding="utf-8")


def check_committed_without_outputs(folder: Path, name: str) -> None:
    committed = nbformat.reads(committed_text(folder / f"{name}.ipynb"), as_version=4)
    for cell in committed.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name}: outputs in git; `make setup` installs the filter that strips them"
            )


@pytest.mark.parametrize("name", NAMES)
def test_pair_in_sync(name):
    check_pair_in_sync(NOTEBOOKS, name)


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    check_committed_without_outputs(NOTEBOOKS, name)


def jupyterlab_save(path: Path) -> None:
    """Change ``path`` as running it in JupyterLab and saving does: outputs, execution
    counts, language_info, widget state; then jupytext writes the paired .py (as the
    JupyterLab extension does on save) from the repository's jupytext.toml."""
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata["language_info"] = {"name": "python", "version": "3.11.2"}
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    for count, cell in enumerate(c for c in notebook.cells if c.cell_type == "code"):
        cell.execution_count = count + 1
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="ran\n")]
        cell.metadata["execution"] = {"iopub.status.idle": "2026-01-01T00:00:00Z"}
    nbformat.write(notebook, path)
    assert jupytext_cli(["--sync", "--quiet", str(path)]) == 0


def test_notebooks_saved_from_jupyterlab_keep_the_repository_clean(tmp_path):
    """A copy of the project's notebook files in a fresh git repository, with the filter
    ``make setup`` installs: after every notebook is run and saved as JupyterLab does,
    git sees no change, and the checks above still pass."""
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    for name in (".gitattributes", "jupytext.toml"):
        (repo / name).write_bytes((REPO / name).read_bytes())
    for path in NOTEBOOKS.glob("*.*"):
        if path.suffix in (".ipynb", ".py"):
            (repo / "notebooks" / path.name).write_bytes(path.read_bytes())
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(
        ["make", "-s", "-f", str(REPO / "Makefile"), "notebook-filter",
         f"BIN={Path(sys.executable).parent}"],
        cwd=repo, check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "notebooks"], cwd=repo, check=True)
    for name in NAMES:
        jupyterlab_save(repo / "notebooks" / f"{name}.ipynb")
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    status = subprocess.run(
        [*git, "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True
    )
    assert status.stdout == "", f"saving from JupyterLab changed what git holds:\n{status.stdout}"
    for name in NAMES:
        assert "ran" in (repo / "notebooks" / f"{name}.ipynb").read_text()  # outputs on disk
        check_pair_in_sync(repo / "notebooks", name)
        check_committed_without_outputs(repo / "notebooks", name)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_independent_annotated_literals(name):
    import papermill

    cell = parameters_cell(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4))
    statements = ast.parse(cell.source).body
    for statement in statements:
        assert isinstance(statement, ast.AnnAssign), f"{name}: {ast.unparse(statement)}"
        ast.literal_eval(statement.value)  # a literal, independent of every other parameter
    declared = papermill.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))
    # papermill skips lines it cannot parse (an "=" in a comment, say) with only a warning
    assert list(declared) == [s.target.id for s in statements]


TINY_TRAIN = {
    "image_size": 64,
    "epochs": 1,
    "batch_size": 4,
    "max_train_images": 16,
    "max_eval_images": 16,
    "device": "cpu",
    "num_threads": 1,  # a second thread only waits on this tiny model (see studies/quick.yaml)
}
TRAIN_FIELDS = {k: v for k, v in TINY_TRAIN.items() if k != "num_threads"}  # TrainConfig's


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """One run of the tiny study: 01 and 02 once, one 03 training run, 05 on a folder of
    the user's images (two readable, one broken) with that run's checkpoint, 04 last."""
    ensure_kernel()
    root = tmp_path_factory.mktemp("tiny")
    patch = pytest.MonkeyPatch()
    patch.setenv("EGEUNET_CACHE", str(root / "cache"))  # the kernels inherit it
    study_file = root / "tiny.yaml"
    user_images = root / "user_images"
    user_images.mkdir()
    rng = np.random.default_rng(0)
    for name, (width, height) in (("a.png", (80, 60)), ("b.jpg", (64, 64))):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(user_images / name)
    (user_images / "broken.png").write_bytes(b"not an image")
    study_file.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "datasets": ["synthetic"],
                "protocols": ["paper"],
                "seeds": [3],
                "variants": {"egeunet": {}},
                "train": TINY_TRAIN,
                "data_overview": {"image_size": 64, "num_examples": 4},
                "complexity": {
                    "image_size": 64,
                    "variant_set": "published",
                    "latency": False,
                    "num_threads": 1,
                },
                "inference": {"input_path": "user_images", "threshold": 0.5},
                "report": {},
            }
        )
    )
    lines: list[str] = []
    loaded = study.load_study(study_file, reports_root=root / "reports")
    result = study.run_study(loaded, log=lines.append)
    yield loaded, result, lines
    patch.undo()


def test_study_runs_every_notebook(tiny_study):
    loaded, result, lines = tiny_study
    assert [o.status for o in result.outcomes] == ["finished"] * 5, result.outcomes
    assert [o.run_id for o in result.outcomes] == [
        "01_data-synthetic",
        "02_complexity",
        "synthetic-paper-egeunet-seed3",
        "05_inference",
        "04_report",
    ]
    for outcome in result.outcomes:
        assert study.executed_notebook_path(loaded.runs_dir / outcome.run_id).is_file()
    assert any("[synthetic-paper-egeunet-seed3] epoch 1/1" in line for line in lines)


def test_01_data_writes_counts_and_figures(tiny_study):
    loaded, _, _ = tiny_study
    out = loaded.runs_dir / "01_data-synthetic"
    summary = json.loads((out / "summary.json").read_text())
    counts = pd.read_csv(out / "split_counts.csv")
    assert summary["size"] == 64
    challenge = counts[counts["split"] == "challenge"].set_index("part")["images"]
    paper = counts[counts["split"] == "paper"].set_index("part")["images"]
    assert summary["num_images"] == challenge.sum()
    # the paper protocol pools the challenge train and val parts and splits them 7:3
    assert paper.sum() == challenge["train"] + challenge["val"]
    assert paper["train"] == round(0.7 * paper.sum())
    images = pd.read_csv(out / "images.csv")
    assert len(images) == summary["num_images"]
    assert images["lesion_fraction"].between(0, 1).all() and images["lesion_fraction"].max() > 0
    for stem in ("distributions", "examples"):
        assert (out / f"{stem}.png").stat().st_size > 1000 and (out / f"{stem}.svg").is_file()


def test_02_complexity_writes_the_published_counts(tiny_study):
    loaded, _, _ = tiny_study
    table = pd.read_csv(loaded.runs_dir / "02_complexity" / "complexity.csv")
    assert list(table["variant"]) == ["egeunet"]
    assert table["params_total"].iloc[0] == 53_374
    assert (loaded.runs_dir / "02_complexity" / "params_vs_flops.png").is_file()


def test_03_train_writes_a_run_folder(tiny_study):
    loaded, _, _ = tiny_study
    run = loaded.runs_dir / "synthetic-paper-egeunet-seed3"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "paper" and metrics["num_parameters"] == 53_374
    assert 0.0 <= metrics["pooled"]["dsc"] <= 1.0
    assert len(pd.read_csv(run / "history.csv")) == 1
    config = json.loads((run / "config.json").read_text())
    assert "synthetic" in json.dumps(config) and (run / "checkpoints" / "best.pt").is_file()
    cases = np.load(run / "cases.npz")
    assert list(cases["labels"]) == ["best", "median", "worst"]
    assert cases["images"].shape[1:] == (64, 64, 3)
    per_image = pd.read_csv(run / "per_image.csv").set_index("id")
    assert list(cases["scores"]) == pytest.approx(list(per_image.loc[list(cases["ids"]), "dsc"]))


def test_04_report_is_built_from_the_runs(tiny_study):
    loaded, _, _ = tiny_study
    text = (loaded.study_dir / "REPORT.md").read_text()
    assert "## Findings" in text and "## 1. Main results" in text and "## 7. Complexity" in text
    main = pd.read_csv(loaded.study_dir / "tables" / "main_results.csv")
    run_metrics = json.loads(
        (loaded.runs_dir / "synthetic-paper-egeunet-seed3" / "metrics.json").read_text()
    )
    dsc = main[(main["metric"] == "DSC") & (main["convention"] == "pooled")]["mean"].iloc[0]
    assert dsc == pytest.approx(100 * run_metrics["pooled"]["dsc"])
    assert (loaded.study_dir / "figures" / "cases_synthetic-paper-egeunet-seed3.png").is_file()
    runs = pd.read_csv(loaded.study_dir / "tables" / "runs.csv")
    assert runs["data_manifest_hash"].iloc[0] in text
    split_table = text[text.index("Split manifests") :]
    assert "split_paper_hash" in split_table and re.search("[0-9a-f]{64}", split_table)
    # The runner hands the study file over: the run status lists the study's runs.
    status = pd.read_csv(loaded.study_dir / "tables" / "run_status.csv")
    assert list(status["run_id"]) == ["synthetic-paper-egeunet-seed3"]
    assert (loaded.study_dir / "findings.md").is_file()
    # One variant, one protocol: learning curves, per-image DSC and the cases (no ablation).
    assert (loaded.study_dir / "REPORT.html").read_text().count("<img") == 3


def test_05_inference_segments_a_folder(tiny_study):
    loaded, _, _ = tiny_study
    output = loaded.runs_dir / "05_inference"
    areas = pd.read_csv(output / "lesion_areas.csv").set_index("image")
    assert set(areas.index) == {"a.png", "b.jpg"}  # broken.png reported and skipped
    assert json.loads((output / "summary.json").read_text())["failed"]
    assert areas.loc["a.png", "total_pixels"] == 80 * 60
    mask = np.asarray(Image.open(output / "a_mask.png"))
    assert mask.shape == (60, 80)  # the image's own size, not the model's
    assert areas.loc["a.png", "lesion_pixels"] == int((mask > 0).sum())
    assert areas.loc["a.png", "lesion_fraction"] == pytest.approx((mask > 0).mean())
    assert (output / "a_overlay.png").is_file()


def test_lesion_explorer_follows_the_threshold(tiny_study):
    import io

    from egeunet.app import LesionApp
    from egeunet.lesion import LesionExplorer, Segmenter

    loaded, _, _ = tiny_study
    checkpoint = loaded.runs_dir / "synthetic-paper-egeunet-seed3" / "checkpoints" / "best.pt"
    explorer = LesionExplorer(Segmenter(checkpoint, "cpu"), threshold=0.5, pixel_size_mm=0.1)
    buffer = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(buffer, "PNG")
    explorer.load("upload.png", buffer.getvalue())
    assert explorer.probability.shape == (50, 70)
    for threshold in (0.05, 0.5, 0.95):
        explorer.threshold = threshold
        area = explorer.area()
        expected = int((explorer.probability >= threshold).sum())
        assert area["lesion_pixels"] == expected and area["total_pixels"] == 3500
        assert area["lesion_area_mm2"] == pytest.approx(expected * 0.01)
    explorer.threshold = 0.05
    low = explorer.area()["lesion_pixels"]
    explorer.threshold = 0.95
    assert explorer.area()["lesion_pixels"] <= low
    with pytest.raises(ValueError, match=r"broken\.png"):
        explorer.load("broken.png", b"not an image")
    assert LesionApp(explorer).widget is not None  # the widgets build without a front end


def test_interrupted_training_run_resumes_under_the_runner(tmp_path, monkeypatch):
    """Kill a real 03_train execution after its first epoch; running the same spec again
    continues from checkpoints/last.pt and completes every epoch once."""
    ensure_kernel()
    monkeypatch.setenv("EGEUNET_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "runs" / "interrupted"
    epochs = 30
    spec = study.RunSpec(
        run_id="interrupted",
        notebook=str(NOTEBOOKS / "03_train.ipynb"),
        run_dir=str(run_dir),
        parameters={
            "recipe": "published",
            "train": {**TRAIN_FIELDS, "epochs": epochs, "seed": 5},
            "run_dir": str(run_dir),
        },
        threads=1,
        device="cpu",
    )
    script = (
        "import pickle, sys; from egeunet.study import execute_run; "
        "execute_run(pickle.loads(bytes.fromhex(sys.argv[1])), log=lambda line: None)"
    )

    child = subprocess.Popen(
        [sys.executable, "-c", script, pickle.dumps(spec).hex()],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    history = run_dir / "history.csv"
    deadline = time.monotonic() + 120
    try:
        while not (history.is_file() and len(history.read_text().splitlines()) >= 2):
            assert child.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "no epoch finished within 2 minutes"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # papermill and its kernel, as a crash would
        child.wait()
    done_before = len(pd.read_csv(history))
    assert done_before < epochs and (run_dir / "checkpoints" / "last.pt").is_file()
    assert study.read_outcome(run_dir) is None  # not finished: the rerun must not skip it

    outcome = study.execute_run(spec, log=lambda line: None)
    assert outcome.status == "finished", outcome.error
    assert study.read_outcome(run_dir)["parameters"]["if_exists"] == "resume"
    assert list(pd.read_csv(history)["epoch"]) == list(range(1, epochs + 1))
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == epochs
