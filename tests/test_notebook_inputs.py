"""What notebooks use when a path parameter is left empty (egeunet.notebook_inputs)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from egeunet import notebook_inputs as inputs


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project checkout, the kernel started in its notebooks/ folder."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "egeunet"\n')
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    monkeypatch.setattr(inputs, "WEIGHTS_FOLDER", tmp_path / "weights")
    return tmp_path


def make_run(folder, dataset: str, age: int, epochs_done: int = 2):
    """A run folder with config.json, history.csv and checkpoints/best.pt, ``age`` s old."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": {"dataset": dataset, "epochs": 5}}))
    (folder / "history.csv").write_text("epoch\n" + "".join(f"{e}\n" for e in range(epochs_done)))
    best = folder / "checkpoints" / "best.pt"
    best.write_bytes(b"weights")
    stamp = 1_700_000_000 - age
    for path in (best, folder):
        os.utime(path, (stamp, stamp))
    return best


def test_newest_study_is_the_one_whose_runs_changed_last(project):
    with pytest.raises(FileNotFoundError, match="make study"):
        inputs.newest_study()
    for name, age in (("isic", 1000), ("quick", 10)):
        runs = project / "reports" / name / "runs"
        runs.mkdir(parents=True)
        os.utime(runs, (1_700_000_000 - age,) * 2)
    chosen = inputs.newest_study()
    assert chosen.path == project / "reports" / "quick"
    assert "reports/quick" in chosen.note and "also found: isic" in chosen.note


def test_default_weights_prefer_shipped_then_real_data_then_newest(project):
    with pytest.raises(FileNotFoundError, match="make study"):
        inputs.default_weights()
    synthetic = make_run(project / "reports" / "quick" / "runs" / "s-egeunet-seed1", "synthetic", 0)
    assert inputs.default_weights().path == synthetic
    real = make_run(project / "reports" / "isic" / "runs" / "i-egeunet-seed1", "isic2017", 500, 3)
    chosen = inputs.default_weights()
    assert chosen.path == real
    assert "no shipped weights are installed" in chosen.note
    assert "trained on isic2017, 3 of 5 epochs, not finished" in chosen.note
    (project / "weights").mkdir()
    (project / "weights" / "isic2017.pt").write_bytes(b"shipped")
    assert inputs.default_weights().note == "the shipped weights 'isic2017'"
    (project / "weights" / "isic2018.pt").write_bytes(b"shipped")  # the default, when both are
    assert inputs.default_weights().note == "the shipped weights 'isic2018'"


def test_example_images_are_generated_once_at_several_sizes(project):
    chosen = inputs.example_images()
    assert chosen.path == project / "runs" / "example_images"  # under the project root
    files = sorted(chosen.path.glob("*.png"))
    sizes = {Image.open(f).size for f in files}
    assert len(files) == len(inputs.EXAMPLE_SIZES) == len(sizes)
    first = np.asarray(Image.open(files[0]))
    assert first.std() > 5  # a picture, not a blank
    stamp = files[0].stat().st_mtime_ns
    inputs.example_images()
    assert files[0].stat().st_mtime_ns == stamp


def test_given_or_default(project):
    (project / "data").mkdir()
    lines = []
    assert inputs.given_or_default("data", "data_root", inputs.newest_study, lines.append) == (
        project / "data"
    )
    assert lines == []
    chosen = inputs.given_or_default("", "input_path", inputs.example_images, lines.append)
    assert chosen.is_dir() and lines[0].startswith("input_path: 4 example images")
    with pytest.raises(FileNotFoundError, match="looked for"):
        inputs.given_or_default("nowhere", "data_root", inputs.newest_study)


def test_recorded_study_file(project):
    study = project / "reports" / "quick"
    study.mkdir(parents=True)
    assert inputs.recorded_study_file(study) is None
    (project / "studies").mkdir()
    (project / "studies" / "quick.yaml").write_text("name: quick\n")
    (study / "report.json").write_text(json.dumps({"study_file": "../../studies/quick.yaml"}))
    assert inputs.recorded_study_file(study).resolve() == project / "studies" / "quick.yaml"
