"""One configuration path: every TrainConfig field, model fields included, can be set from
Python, the command line and a study file, and comes out the same; recipes; resume
compatibility with run folders written before the engine became a package."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from egeunet import study
from egeunet.cli import build_parser
from egeunet.engine import RECIPES, TrainConfig
from egeunet.engine.config import config_changes, deep_merge, nest_model_fields
from egeunet.engine_commands import config_from_args
from egeunet.fieldtypes import field_default
from egeunet.model import EGEUNetConfig
from egeunet.notebook_runs import is_finished
from egeunet.runfolder import read_train_config

# A value other than the default for every field (what a user might set).
TRAIN_VALUES = {
    "dataset": "isic2017",
    "data_root": "/data/isic2017",
    "protocol": "clean",
    "image_size": 128,
    "epochs": 7,
    "batch_size": 4,
    "lr": 0.002,
    "weight_decay": 0.05,
    "betas": [0.8, 0.95],
    "t_max": 20,
    "eta_min": 0.0001,
    "seed": 3,
    "device": "cpu",
    "num_workers": 2,
    "val_interval": 2,
    "normalization": "imagenet",
    "per_run_angle": True,
    "amp": True,
    "max_train_images": 10,
    "max_eval_images": 5,
    "num_prediction_samples": 3,
}
MODEL_VALUES = {
    "widths": [4, 4, 8, 8, 12, 12],
    "in_channels": 1,
    "num_classes": 2,
    "ghpa": False,
    "gab": False,
    "deep_supervision": False,
    "ghpa_branches": ["hw", "ch"],
    "gab_dilations": [1, 2, 3, 4],
}
CASES = [(name, value) for name, value in TRAIN_VALUES.items()] + [
    (f"model.{name}", value) for name, value in MODEL_VALUES.items()
]


def test_the_table_covers_every_field():
    assert set(TRAIN_VALUES) | {"model"} == {f.name for f in fields(TrainConfig)}
    assert set(MODEL_VALUES) == {f.name for f in fields(EGEUNetConfig)}
    for name, value in TRAIN_VALUES.items():
        assert value != field_default(TrainConfig, name), name


def _setting(name: str, value) -> dict:
    if name.startswith("model."):
        return {"model": {name.removeprefix("model."): value}}
    return {name: value}


def _read(config: TrainConfig, name: str):
    data = config.to_dict()
    if name.startswith("model."):
        return data["model"][name.removeprefix("model.")]
    return data[name]


def write_study(folder: Path, variants: dict, **keys) -> Path:
    """A one-dataset, one-protocol study file with only training runs."""
    path = folder / "s.yaml"
    document = {
        "name": "s", "datasets": ["synthetic"], "protocols": ["paper"], "seeds": [1],
        "variants": variants, "data_overview": False, "complexity": False, "report": False,
    }  # fmt: skip
    path.write_text(yaml.safe_dump({**document, **keys}))
    return path


def _cli_text(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize(("name", "value"), CASES, ids=[name for name, _ in CASES])
def test_every_field_is_set_alike_from_python_cli_and_study_file(name, value, tmp_path):
    python = TrainConfig.from_dict(_setting(name, value))
    assert _read(python, name) == value

    args = build_parser().parse_args(["train", f"--{name.replace('_', '-')}", _cli_text(value)])
    assert _read(config_from_args(args), name) == value

    if name in ("dataset", "data_root", "protocol", "seed"):
        return  # set by the study's own keys (datasets, data_root, protocols, seeds)
    path = write_study(tmp_path, {"v": _setting(name, value)})
    spec = study.load_study(path, reports_root=tmp_path).train[0]
    assert _read(TrainConfig.from_dict(spec.parameters["train"]), name) == value


def test_study_runs_start_from_the_published_recipe_never_the_quick_one(tmp_path):
    path = write_study(tmp_path, {"egeunet": {}}, seeds=[5], train={"epochs": 2})
    spec = study.load_study(path, reports_root=tmp_path).train[0]
    assert spec.parameters["recipe"] == "published"
    config = TrainConfig.from_dict(spec.parameters["train"])
    assert config == TrainConfig(dataset="synthetic", epochs=2, seed=5)
    assert config.image_size == 256 and config.max_train_images is None  # not the quick recipe


def test_recipes():
    assert TrainConfig.from_recipe("published") == TrainConfig()
    quick = TrainConfig.from_recipe("quick", {"epochs": 2, "model": {"gab": False}})
    assert quick.dataset == "synthetic" and quick.image_size == RECIPES["quick"]["image_size"]
    assert quick.epochs == 2 and quick.model.gab is False and quick.model.ghpa is True
    with pytest.raises(ValueError, match="recipe: expected one of published, quick"):
        TrainConfig.from_recipe("fast")
    with pytest.raises(ValueError, match="unknown train config key"):
        TrainConfig.from_recipe("quick", {"epoch": 2})


def test_variants_deep_merge_into_train_and_flat_model_fields_are_short_for_model():
    shared = nest_model_fields({"epochs": 3, "model": {"gab_dilations": [1, 2, 3, 4]}})
    variant = nest_model_fields({"ghpa": False, "lr": 0.01})
    merged = deep_merge(shared, variant)
    assert merged == {
        "epochs": 3, "lr": 0.01, "model": {"gab_dilations": [1, 2, 3, 4], "ghpa": False}
    }  # fmt: skip
    with pytest.raises(ValueError, match="ghpa: given both"):
        nest_model_fields({"ghpa": False, "model": {"ghpa": True}})


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"lr": "fast"}, r"run synthetic-paper-v-seed1 .*variants\.v.*lr: expected float"),
        ({"colour": 1}, r"unknown train config key\(s\): colour"),
        ({"image_size": 100}, "image_size: must be a positive multiple of 32"),
        ({"ghpa": False, "model": {"ghpa": True}}, r"variants\.v: ghpa: given both"),
    ],
)
def test_a_bad_setting_stops_the_study_at_load_naming_run_and_field(tmp_path, variant, message):
    path = write_study(tmp_path, {"v": variant})
    with pytest.raises(ValueError, match=message):
        study.load_study(path, reports_root=tmp_path)


COMMITTED_RUN = REPO_ROOT / "reports" / "isic" / "runs" / "isic2017-paper-egeunet-seed42"


def test_a_committed_isic_run_resumes_under_its_study_file(tmp_path):
    """The run folders of the committed study were written before the engine became a
    package: the configuration the study file gives now must be the one they recorded,
    so the runner resumes them (only resumable fields may differ)."""
    run = tmp_path / COMMITTED_RUN.name
    run.mkdir()
    shutil.copy(COMMITTED_RUN / "config.json", run / "config.json")
    saved = read_train_config(run)
    loaded = study.load_study(REPO_ROOT / "studies" / "isic.yaml", reports_root=tmp_path)
    spec = next(s for s in loaded.train if s.run_id == COMMITTED_RUN.name)
    assert config_changes(saved, TrainConfig.from_dict(spec.parameters["train"])) == []


def test_an_outcome_recorded_with_flat_parameters_still_marks_the_run_finished(tmp_path):
    """outcome.json files written when 03_train took one parameter per field."""
    train = {"epochs": 2, "device": "cpu", "num_threads": 1}
    path = write_study(tmp_path, {"unet": {"ghpa": False}}, train=train)
    spec = study.load_study(path, reports_root=tmp_path).train[0]
    flat = {
        "epochs": 2, "device": "cpu", "num_threads": 1, "ghpa": False, "dataset": "synthetic",
        "data_root": "", "protocol": "paper", "seed": 1, "run_dir": spec.run_dir,
        "resume": False,
    }  # fmt: skip
    run = Path(spec.run_dir)
    run.mkdir(parents=True)
    outcome = {"status": "finished", "parameters": flat}
    (run / "outcome.json").write_text(json.dumps(outcome))
    assert is_finished(run, spec.parameters)
    (run / "outcome.json").write_text(json.dumps({**outcome, "parameters": {**flat, "epochs": 3}}))
    assert not is_finished(run, spec.parameters)
