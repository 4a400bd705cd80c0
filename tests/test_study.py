"""The study runner: parameter checks before launch, failure isolation, exit code, skipping
finished runs, resuming interrupted ones, thread settings and progress lines.

These tests run real papermill executions of a small stand-in for 03_train (it writes the
run-folder files the real one does, in milliseconds) so the runner's behaviour is tested
without training; tests/test_notebooks.py runs the real notebooks through the runner.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import REPO_ROOT
from kernel_helpers import ensure_kernel

from egeunet import cli, study
from egeunet.study_files import notebook_parameters

STAND_IN_PARAMETERS = """\
recipe: str = "quick"  # named recipe
train: dict = {}  # TrainConfig fields
run_dir: str = "run"  # run folder
if_exists: str = "resume"  # resume or restart
num_threads: int = 0  # torch threads
progress: bool = True  # bars or lines"""

STAND_IN_BODY = """\
import json, os, pathlib
run = pathlib.Path(run_dir)
run.mkdir(parents=True, exist_ok=True)
resume = if_exists == "resume" and (run / "checkpoints" / "last.pt").is_file()
seed, epochs, device = train.get("seed", 0), train.get("epochs", 2), train.get("device", "auto")
with open(run / "executions.jsonl", "a") as log:
    log.write(json.dumps({"resume": resume, "omp": os.environ.get("OMP_NUM_THREADS"),
                          "num_threads": num_threads, "device": device,
                          "recipe": recipe, "progress": progress}) + "\\n")
if (run.parent / f"fail-seed{seed}").exists():  # a switch outside the parameters
    raise RuntimeError(f"seed {seed} fails on purpose")
rows = ["epoch,train_loss,val_loss,val_dsc,seconds"]
rows += [f"{e},{1 / e},{2 / e},{0.1 * e},0.5" for e in range(1, epochs + 1)]
(run / "history.csv").write_text("\\n".join(rows) + "\\n")
(run / "metrics.json").write_text(json.dumps({"pooled": {"dsc": 0.5 + seed / 100}}))"""


@pytest.fixture(scope="module", autouse=True)
def kernel():
    ensure_kernel()


@pytest.fixture
def notebooks(tmp_path: Path) -> Path:
    """A notebooks folder whose 03_train is the stand-in."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "egeunet",
        "display_name": "egeunet",
        "language": "python",
    }
    parameters = nbformat.v4.new_code_cell(STAND_IN_PARAMETERS)
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [parameters, nbformat.v4.new_code_cell(STAND_IN_BODY)]
    nbformat.write(notebook, folder / "03_train.ipynb")
    return folder


def write_study_file(path: Path, **overrides) -> Path:
    document = {
        "name": "tiny",
        "datasets": ["synthetic"],
        "protocols": ["paper"],
        "seeds": [1, 2, 3],
        "variants": {"egeunet": {}},
        "train": {"epochs": 2},
        "data_overview": False,
        "complexity": False,
        "report": False,
    }
    document.update(overrides)
    path.write_text(yaml.safe_dump(document))
    return path


def executions(run_dir: Path) -> list[dict]:
    path = run_dir / "executions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_failure_is_isolated_recorded_and_resumed(tmp_path, notebooks, monkeypatch, capsys):
    monkeypatch.setenv("EGEUNET_NOTEBOOKS", str(notebooks))
    study_file = write_study_file(tmp_path / "tiny.yaml")
    reports = tmp_path / "reports"
    arguments = ["study", str(study_file), "--reports-dir", str(reports)]

    runs = reports / "tiny" / "runs"
    runs.mkdir(parents=True)
    (runs / "fail-seed2").touch()
    assert cli.main(arguments) == 1  # one run failed
    failed = json.loads((runs / "synthetic-paper-egeunet-seed2" / "outcome.json").read_text())
    assert failed["status"] == "failed"
    assert "RuntimeError: seed 2 fails on purpose" in failed["error"]
    for seed in (1, 3):  # the others ran to the end despite the failure before them
        outcome = json.loads(
            (runs / f"synthetic-paper-egeunet-seed{seed}" / "outcome.json").read_text()
        )
        assert outcome["status"] == "finished"
        assert outcome["metrics"] == {"pooled": {"dsc": 0.5 + seed / 100}}
    assert (runs / "synthetic-paper-egeunet-seed1.ipynb").is_file()  # executed notebook kept
    out = capsys.readouterr()
    assert "[1/3] start synthetic-paper-egeunet-seed1" in out.out
    assert "[2/3] failed synthetic-paper-egeunet-seed2" in out.out
    assert "[synthetic-paper-egeunet-seed3] epoch 2/2 train_loss=0.5000 val_loss=1.0000" in out.out
    assert "failed: synthetic-paper-egeunet-seed2" in out.err

    # The failed run had saved a checkpoint before dying: the rerun resumes it, and skips
    # the two finished runs.
    checkpoint = runs / "synthetic-paper-egeunet-seed2" / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"stand-in")
    (runs / "fail-seed2").unlink()
    assert cli.main(arguments) == 0
    out = capsys.readouterr().out
    assert (
        "skipped synthetic-paper-egeunet-seed1" in out
        and "skipped synthetic-paper-egeunet-seed3" in out
    )
    assert [e["resume"] for e in executions(runs / "synthetic-paper-egeunet-seed2")] == [
        False,
        True,
    ]
    assert len(executions(runs / "synthetic-paper-egeunet-seed1")) == 1  # not run again


def test_unknown_parameter_fails_before_anything_runs(tmp_path, notebooks, monkeypatch, capsys):
    monkeypatch.setenv("EGEUNET_NOTEBOOKS", str(notebooks))
    study_file = write_study_file(tmp_path / "typo.yaml", train={"epoch": 2})
    reports = tmp_path / "reports"
    assert cli.main(["study", str(study_file), "--reports-dir", str(reports)]) == 2
    err = capsys.readouterr().err
    assert "unknown train config key(s): epoch" in err and str(study_file) in err
    assert not (reports / "tiny" / "runs").exists()  # nothing launched
    overview = write_study_file(tmp_path / "o.yaml", data_overview={"num_exampels": 2})
    with pytest.raises(ValueError, match="unknown parameter 'num_exampels' for 01_data"):
        loaded = study.load_study(
            overview, reports_root=tmp_path, notebooks=REPO_ROOT / "notebooks"
        )
        study.check_study(loaded)


def test_misspelt_variant_switch_and_wrong_type_are_named(tmp_path, notebooks):
    with pytest.raises(ValueError, match=r"a\.yaml: run .*variants\.unet.*key\(s\): gpha"):
        study.load_study(
            write_study_file(tmp_path / "a.yaml", variants={"unet": {"gpha": False}}),
            reports_root=tmp_path,
            notebooks=notebooks,
        )
    with pytest.raises(ValueError, match=r"b\.yaml: run .*epochs: expected int, got 'two'"):
        study.load_study(
            write_study_file(tmp_path / "b.yaml", train={"epochs": "two"}),
            reports_root=tmp_path,
            notebooks=notebooks,
        )
    spec = study.load_study(write_study_file(tmp_path / "c.yaml"), reports_root=tmp_path).train[0]
    bad = dataclasses.replace(spec, parameters={**spec.parameters, "if_exists": 1})
    declared = notebook_parameters(notebooks / "03_train.ipynb")
    with pytest.raises(
        ValueError, match=r"parameter 'if_exists' of 03_train\.ipynb .* must be str"
    ):
        study.check_parameters(bad, declared, tmp_path / "c.yaml")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seeds": ["one"]}, "seeds: expected int"),
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"variants": {"bad/name": {}}}, "not a safe folder name"),
        ({"name": "../escape"}, "name: '../escape' is not a safe folder name"),
    ],
)
def test_bad_study_files_name_the_problem(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        study.load_study(
            write_study_file(tmp_path / "bad.yaml", **overrides), reports_root=tmp_path
        )


def test_missing_study_file_and_missing_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.yaml"):
        study.load_study(tmp_path / "nowhere.yaml")
    path = tmp_path / "short.yaml"
    path.write_text("name: x\ndatasets: [synthetic]\n")
    with pytest.raises(ValueError, match="missing key 'protocols'"):
        study.load_study(path)


def test_execute_run_applies_threads_and_device(tmp_path, notebooks, capfd):
    spec = study.RunSpec(
        run_id="one",
        notebook=str(notebooks / "03_train.ipynb"),
        run_dir=str(tmp_path / "one"),
        parameters={"train": {"seed": 5}, "run_dir": str(tmp_path / "one")},
        threads=1,
        device="cpu",
    )
    outcome = study.execute_run(spec, log=lambda line: None)
    assert outcome.status == "finished" and outcome.metrics == {"pooled": {"dsc": 0.55}}
    assert executions(tmp_path / "one") == [
        {
            "resume": False, "omp": "1", "num_threads": 1, "device": "cpu", "recipe": "quick",
            "progress": False,
        }
    ]  # fmt: skip
    if sys.platform != "win32":  # the kernel spoke over a Unix socket, not unencrypted TCP
        assert "without encryption" not in capfd.readouterr().err
    assert study.execute_run(spec).status == "skipped"
    moved = dataclasses.replace(spec, threads=2, device="cuda")  # where it runs: still done
    assert study.execute_run(moved).status == "skipped"
    train = {**spec.parameters["train"], "epochs": 3}
    changed = dataclasses.replace(spec, parameters={**spec.parameters, "train": train})
    assert study.execute_run(changed, log=lambda line: None).status == "finished"
    assert study.execute_run(spec, force=True, log=lambda line: None).status == "finished"


def test_study_specs_cover_the_product_with_stable_ids(tmp_path):
    path = write_study_file(
        tmp_path / "grid.yaml",
        datasets=["isic2017", "isic2018"],
        protocols=["paper", "clean"],
        seeds=[1, 2],
        variants={"unet": {"ghpa": False}, "egeunet": {}},
    )
    (tmp_path / "data" / "isic2018").mkdir(parents=True)  # one dataset in its own subfolder
    loaded = study.load_study(path, data_root=tmp_path / "data", reports_root=tmp_path / "r")
    ids = [spec.run_id for spec in loaded.train]
    assert len(ids) == len(set(ids)) == 16
    assert "isic2018-clean-unet-seed2" in ids
    spec = next(s for s in loaded.train if s.run_id == "isic2018-clean-unet-seed2")
    train = spec.parameters["train"]
    assert train["model"]["ghpa"] is False and train["seed"] == 2
    assert train["data_root"] == str((tmp_path / "data" / "isic2018").resolve())
    other = next(s for s in loaded.train if s.run_id == "isic2017-clean-unet-seed2")
    assert other.parameters["train"]["data_root"] == str((tmp_path / "data").resolve())
    assert spec.run_dir == str(
        (tmp_path / "r" / "tiny" / "runs" / "isic2018-clean-unet-seed2").resolve()
    )


def test_stages_run_in_order_of_priority_each_run_once(tmp_path):
    path = write_study_file(
        tmp_path / "staged.yaml",
        datasets=["isic2017", "isic2018"],
        protocols=["paper", "clean"],
        seeds=[42, 43],
        variants={"egeunet": {}, "unet": {"ghpa": False}, "long": {"epochs": 9}},
        stages=[
            {"name": "headline", "protocols": ["paper"], "variants": ["egeunet"]},
            {"datasets": ["isic2017"], "protocols": ["paper"], "variants": ["unet", "egeunet"]},
            {"datasets": ["isic2017"], "variants": ["long"], "seeds": [42], "protocols": ["paper"]},
        ],
    )
    loaded = study.load_study(path, reports_root=tmp_path / "r")
    assert [spec.run_id for spec in loaded.train] == [
        "isic2017-paper-egeunet-seed42",  # seed outermost: both datasets' first seed first
        "isic2018-paper-egeunet-seed42",
        "isic2017-paper-egeunet-seed43",
        "isic2018-paper-egeunet-seed43",
        "isic2017-paper-unet-seed42",  # stage 2 repeats egeunet: it runs once, in stage 1
        "isic2017-paper-unet-seed43",
        "isic2017-paper-long-seed42",
    ]
    assert loaded.train[-1].parameters["train"]["epochs"] == 9
    assert loaded.train[0].parameters["train"]["epochs"] == 2


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"variants": ["nope"]}], r"stages\[1\]\.variants: 'nope' is not in the top-level"),
        ([{}, {"seeds": [7]}], r"stages\[2\]\.seeds: 7 is not in the top-level seeds"),
        ([{"colour": "red"}], r"stages\[1\]: unknown key 'colour'"),
        ({"name": "x"}, "stages: expected a list of mappings"),
    ],
)
def test_bad_stages_name_the_problem(tmp_path, stages, message):
    path = write_study_file(tmp_path / "bad.yaml", stages=stages)
    with pytest.raises(ValueError, match=message):
        study.load_study(path, reports_root=tmp_path)


def test_the_committed_isic_study_file_loads():
    loaded = study.load_study(REPO_ROOT / "studies" / "isic.yaml", reports_root="unused")
    ids = [spec.run_id for spec in loaded.train]
    assert len(ids) == len(set(ids)) == 22
    assert ids[:2] == ["isic2017-paper-egeunet-seed42", "isic2018-paper-egeunet-seed42"]
    assert ids[-1] == "isic2017-paper-egeunet-300ep-seed42"
    assert {spec.parameters["train"]["epochs"] for spec in loaded.train[:-1]} == {50}
    assert loaded.train[-1].parameters["train"]["epochs"] == 300


def test_run_spec_and_outcome_pickle():
    import pickle

    spec = study.RunSpec("a", "nb.ipynb", "runs/a", {"seed": 1}, threads=2, device="cpu")
    outcome = study.RunOutcome("a", "failed", "boom", 1.5, None)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert pickle.loads(pickle.dumps(outcome)) == outcome


def test_history_tail_reports_only_new_epochs(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text("epoch,train_loss,val_dsc,seconds\n1,0.9,0.5,2.0\n")
    lines: list[str] = []
    with study.HistoryTail("r", history, epochs=4, log=lines.append):
        history.write_text(history.read_text() + "2,0.8,0.6,3.0\n")
    assert lines == ["[r] epoch 2/4 train_loss=0.8000 val_dsc=0.6000 3.0s ~6 s left"]
    long = study.HistoryTail("r", history, epochs=300, log=lines.append)
    assert long.describe({"epoch": "100", "seconds": "30"}).endswith("30.0s ~100 min left")


def test_check_flag_runs_nothing(tmp_path, notebooks):
    study_file = write_study_file(tmp_path / "check.yaml")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "egeunet.cli",
            "study",
            str(study_file),
            "--check",
            "--reports-dir",
            str(tmp_path / "reports"),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "EGEUNET_NOTEBOOKS": str(notebooks)},
    )
    assert result.returncode == 0, result.stderr
    assert "3 training runs, parameters OK" in result.stdout
    assert not (tmp_path / "reports").exists()


def test_inference_uses_the_full_models_first_run_and_the_data_examples(tmp_path):
    path = write_study_file(
        tmp_path / "inf.yaml",
        variants={"unet": {"ghpa": False}, "egeunet": {}},
        data_overview={},
        inference={"threshold": 0.4},
    )
    loaded = study.load_study(path, reports_root=tmp_path / "r")
    runs = tmp_path.resolve() / "r" / "tiny" / "runs"
    assert loaded.inference.parameters == {
        "threshold": 0.4,
        "checkpoint": str(runs / "synthetic-paper-egeunet-seed1" / "checkpoints" / "best.pt"),
        "input_path": str(runs / "01_data-synthetic" / "example_images"),
        "output_dir": str(runs / "05_inference"),
        "interactive": False,
    }
    with pytest.raises(ValueError, match="inference: give input_path"):
        study.load_study(
            write_study_file(tmp_path / "no.yaml", inference={}), reports_root=tmp_path
        )
    with pytest.raises(ValueError, match=r"inference\.variant: 'big'"):
        study.load_study(
            write_study_file(tmp_path / "v.yaml", inference={"variant": "big"}),
            reports_root=tmp_path,
        )


def test_end_line_survives_an_undefined_pooled_dsc():
    outcome = study.RunOutcome("r", "finished", None, 1.0, {"pooled": {"dsc": None}})
    assert study.describe_end(outcome) == "finished r (1.0s)"
    outcome = study.RunOutcome("r", "finished", None, 1.0, {"pooled": {"dsc": 0.8765}})
    assert study.describe_end(outcome) == "finished r (1.0s) pooled DSC 87.65"


def test_study_file_device_and_threads_reach_the_specs(tmp_path):
    """``device`` and ``num_threads`` of the train section must survive _run_parameters and
    the dask placement, which both set those parameters from the spec."""
    from egeunet.executors import Placement, place_spec

    path = write_study_file(tmp_path / "s.yaml", train={"device": "cpu", "num_threads": 1})
    spec = study.load_study(path, reports_root=tmp_path / "r").train[0]
    assert (spec.device, spec.threads) == ("cpu", 1)
    declared = {"train": {}, "num_threads": {}, "if_exists": {}, "progress": {}}
    parameters = study._run_parameters(spec, declared)
    assert (parameters["train"]["device"], parameters["num_threads"]) == ("cpu", 1)
    assert (parameters["if_exists"], parameters["progress"]) == ("resume", False)
    placed = place_spec(spec, Placement(threads=2, device="cuda:0"))  # a 2-core GPU worker
    assert (placed.device, placed.threads) == ("cpu", 1)
    default = study.load_study(write_study_file(tmp_path / "d.yaml"), reports_root=tmp_path)
    assert (default.train[0].device, default.train[0].threads) == ("auto", None)


def test_run_study_hands_its_log_to_the_executor(tmp_path, monkeypatch):
    """Per-epoch lines relayed from dask workers must go to the runner's log."""
    import egeunet.executors

    received = {}

    class RecordingExecutor:
        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return None

        def run(self, specs, on_event):
            return []

    def fake_make_executor(kind, **kwargs):
        received.update(kwargs, kind=kind)
        return RecordingExecutor()

    monkeypatch.setattr(study, "check_kernel", lambda: None)
    monkeypatch.setattr(study, "check_study", lambda loaded: None)
    monkeypatch.setattr(egeunet.executors, "make_executor", fake_make_executor)
    loaded = study.load_study(write_study_file(tmp_path / "s.yaml"), reports_root=tmp_path)
    lines: list[str] = []
    study.run_study(loaded, executor="dask", workers=2, log=lines.append)
    assert received["kind"] == "dask" and received["log"] == lines.append
    assert any(line.startswith("study tiny:") for line in lines)
