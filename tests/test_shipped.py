"""Shipped weights: chosen on validation data, written model-only with their provenance,
checked against their recorded checksum before use, and (where installed) segmenting a
real ISIC image."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from egeunet import checkpoint
from egeunet.checkpoint import SHIPPED_WEIGHTS, load_checkpoint, load_model, resolve_weights
from egeunet.cli import main
from egeunet.engine import train
from egeunet.fileio import sha256_file
from egeunet.shipped import candidate_runs, ship_best
from tests.engine_helpers import TINY


@pytest.fixture(scope="module")
def study(tmp_path_factory, synthetic_cache, one_torch_thread) -> Path:
    """A study folder with two finished clean runs (seeds 1, 2) and one paper run."""
    study_dir = tmp_path_factory.mktemp("study")
    for protocol, seed in (("clean", 1), ("clean", 2), ("paper", 1)):
        config = dataclasses.replace(TINY, protocol=protocol, seed=seed, epochs=2)
        train(config, study_dir / "runs" / f"synthetic-{protocol}-egeunet-seed{seed}", threads=1)
    return study_dir


def _set_scores(run_dir: Path, validation: float, test: float) -> None:
    """Give a run's best epoch a chosen validation DSC and its metrics a chosen test DSC."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["pooled"]["dsc"] = test
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    history = pd.read_csv(run_dir / "history.csv")
    history.loc[history["epoch"] == metrics["best_epoch"], "val_dsc"] = validation
    history.to_csv(run_dir / "history.csv", index=False)


def test_choice_is_made_on_validation_never_on_test(study: Path) -> None:
    runs = study / "runs"
    _set_scores(runs / "synthetic-clean-egeunet-seed1", validation=0.70, test=0.95)
    _set_scores(runs / "synthetic-clean-egeunet-seed2", validation=0.80, test=0.60)
    _set_scores(runs / "synthetic-paper-egeunet-seed1", validation=0.99, test=0.99)
    candidates = candidate_runs(study, "synthetic")
    assert list(candidates["run_id"]) == [
        "synthetic-clean-egeunet-seed2",
        "synthetic-clean-egeunet-seed1",
    ]
    assert list(candidates["validation_dsc"]) == [0.80, 0.70]


def test_shipped_file_is_model_only_with_provenance(study: Path, tmp_path: Path) -> None:
    weights, _ = ship_best(study, "synthetic", "tiny", tmp_path)
    run_dir = study / "runs" / "synthetic-clean-egeunet-seed2"
    data = load_checkpoint(weights)
    assert set(data) == {
        *("format", "model_config", "model_state", "epoch", "train_config"),
        *("protocol", "selection", "data_manifest_hash"),
    }
    assert data["protocol"] == "clean" and data["train_config"]["seed"] == 2
    provenance = json.loads((tmp_path / "tiny.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    assert provenance["sha256"] == sha256_file(weights)
    assert provenance["source_run"] == run_dir.name
    assert provenance["protocol"] == "clean"
    assert provenance["git_commit"] == config["git_commit"]
    assert provenance["data_manifest_hash"] == config["data_manifest_hash"]
    assert provenance["validation_dsc"] == 0.80
    assert [c["run"] for c in provenance["chosen_from"]] == [
        "synthetic-clean-egeunet-seed2",
        "synthetic-clean-egeunet-seed1",
    ]
    assert provenance["test"]["pooled"]["dsc"] == 0.60
    assert provenance["train_config"]["seed"] == 2
    shipped, source = load_model(weights).model, load_model(run_dir / "checkpoints" / "best.pt")
    for key, value in source.model.state_dict().items():
        assert torch.equal(shipped.state_dict()[key], value), key


def test_no_clean_run_gives_a_clear_refusal(study: Path) -> None:
    with pytest.raises(ValueError, match="no finished clean-protocol egeunet run on isic2017"):
        candidate_runs(study, "isic2017")


def test_command_refuses_unknown_names_for_the_package_folder(study: Path, capsys) -> None:
    code = main(["ship-weights", "--study", str(study), "--dataset", "synthetic"])
    assert code == 2
    assert "--name synthetic: shipped weights are named" in capsys.readouterr().err


def test_command_ships_into_a_folder(study: Path, tmp_path: Path, capsys) -> None:
    code = main(
        ["ship-weights", "--study", str(study), "--dataset", "synthetic", "--out", str(tmp_path)]
    )
    assert code == 0
    output = capsys.readouterr().out
    assert "-> synthetic-clean-egeunet-seed2" in output
    assert (tmp_path / "synthetic.pt").is_file() and (tmp_path / "synthetic.json").is_file()


def test_tampered_shipped_weights_are_refused(study: Path, tmp_path, monkeypatch) -> None:
    weights, _ = ship_best(study, "synthetic", "isic2017", tmp_path)
    monkeypatch.setattr(checkpoint, "WEIGHTS_FOLDER", tmp_path)
    assert resolve_weights("isic2017") == weights
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"do not match the checksum in isic2017\.json"):
        resolve_weights("isic2017")
    (tmp_path / "isic2017.json").unlink()
    with pytest.raises(ValueError, match=r"provenance .* is missing or damaged"):
        resolve_weights("isic2017")


SHIPPED_DSC_FLOOR = 0.6
"""Mean DSC on eight real lesion images below which a shipped model is broken. A sanity
floor, not a measurement: some of these images may be in the model's training data."""


@pytest.mark.parametrize("name", sorted(SHIPPED_WEIGHTS))
def test_installed_shipped_weights_segment_real_lesions(
    name: str, shared_data: Path, tmp_path: Path
) -> None:
    path = checkpoint.WEIGHTS_FOLDER / SHIPPED_WEIGHTS[name]
    if not path.is_file():
        pytest.skip(f"{name}: not installed (a trimmed install; the package ships it)")
    from egeunet.predict import predict

    provenance = json.loads(path.with_suffix(".json").read_text())
    assert provenance["sha256"] == sha256_file(path)
    assert provenance["protocol"] == "clean"
    sample = shared_data / "isic2018_sample"
    if not sample.is_dir():
        pytest.skip(f"real data absent ({sample})")
    images = sorted((sample / "ISIC2018_Task1-2_Training_Input").glob("*.jpg"))[:8]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for image in images:
        (inputs / image.name).symlink_to(image)
    predict(name, inputs, tmp_path / "out", threshold=0.5, device="cpu")
    scores = []
    for image in images:
        mask = np.asarray(Image.open(tmp_path / "out" / f"{image.stem}_mask.png")) > 127
        truth_file = f"{image.stem}_segmentation.png"
        truth_path = sample / "ISIC2018_Task1_Training_GroundTruth" / truth_file
        truth = np.asarray(Image.open(truth_path)) > 127
        scores.append(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))
    assert np.mean(scores) > SHIPPED_DSC_FLOOR, f"{name}: DSC per image {np.round(scores, 3)}"


def test_evaluate_takes_shipped_names_and_writes_outside_the_package(
    study: Path, tmp_path: Path, monkeypatch
) -> None:
    from egeunet.engine import evaluate

    folder = tmp_path / "weights"
    ship_best(study, "synthetic", "isic2018", folder)
    monkeypatch.setattr(checkpoint, "WEIGHTS_FOLDER", folder)
    monkeypatch.chdir(tmp_path)
    result = evaluate("isic2018", "test", device="cpu")
    assert Path(result["output"]) == Path("evaluations") / "isic2018-test"
    assert (tmp_path / "evaluations" / "isic2018-test" / "metrics.json").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["isic2018.json", "isic2018.pt"]
