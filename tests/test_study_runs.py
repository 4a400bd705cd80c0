"""Reading run folders: finished runs, same-model study variants, progress per stage of a
study file, and what each run cost."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from report_fixtures import EPOCHS, write_history, write_run, write_study, write_study_file

from egeunet import study_runs


@pytest.fixture
def study_dir(tmp_path):
    return write_study(tmp_path / "fixture")


def test_a_failed_rerun_hides_the_metrics_it_left_behind(tmp_path):
    """A run that finished, was run again and failed still holds the earlier attempt's
    metrics.json; it is listed with the failures, not with the results."""
    runs_dir = tmp_path / "runs"
    kept = write_run(runs_dir, "egeunet", 1)
    rerun = write_run(runs_dir, "egeunet", 2)
    (rerun / "outcome.json").write_text('{"status": "failed", "error": "KeyboardInterrupt"}')
    (kept / "outcome.json").write_text('{"status": "finished"}')
    assert list(study_runs.collect_runs(runs_dir)["run_id"]) == [kept.name]
    assert list(study_runs.collect_failures(runs_dir)["run_id"]) == [rerun.name]


def test_study_variants_sharing_a_model_stay_apart(study_dir):
    """``egeunet`` and ``egeunet-imagenet`` (same model, other normalisation) must not be
    pooled into one variant with six seeds."""
    runs_dir = study_dir / "runs"
    for seed in (1, 2, 3):
        source = runs_dir / f"isic2017-paper-egeunet-seed{seed}"
        shutil.copytree(source, runs_dir / f"isic2017-paper-egeunet-imagenet-seed{seed}")
    runs = study_runs.collect_runs(runs_dir)
    counts = runs.groupby("variant")["seed"].count()
    assert counts["egeunet"] == 3 and counts["egeunet-imagenet"] == 3
    assert counts["unet"] == 3  # variants whose study name is their model's keep it


def test_a_longer_run_of_the_full_model_keeps_its_name_even_alone(tmp_path):
    """``egeunet-300ep`` is the full model trained longer: even when no 50-epoch egeunet
    run of its dataset has finished, it is not taken for one."""
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, "egeunet-300ep", 1, epochs=2 * EPOCHS, model="egeunet")
    runs = study_runs.collect_runs(runs_dir)
    assert list(runs["variant"]) == ["egeunet-300ep"] and list(runs["model"]) == ["egeunet"]


def test_status_lists_every_run_of_the_study_file_by_stage(study_dir, tmp_path):
    runs_dir = study_dir / "runs"
    unfinished = runs_dir / "isic2017-clean-egeunet-seed1"
    unfinished.mkdir()
    write_history(unfinished, [0.5, 0.6])
    (unfinished / "checkpoints").mkdir()
    (unfinished / "checkpoints" / "last.pt").write_bytes(b"state")
    status = study_runs.study_status(runs_dir, write_study_file(tmp_path / "fixture.yaml"))
    by_run = status.set_index("run_id")
    assert by_run.loc["isic2017-clean-egeunet-seed1", "status"] == "unfinished"
    assert by_run.loc["isic2017-clean-egeunet-seed1", "epochs_done"] == 2
    assert by_run.loc["isic2017-clean-egeunet-seed1", "epochs_planned"] == EPOCHS
    assert bool(by_run.loc["isic2017-clean-egeunet-seed1", "resumable"])
    assert by_run.loc["isic2017-paper-egeunet-long-seed1", "epochs_planned"] == 2 * EPOCHS
    assert by_run.loc["isic2017-paper-egeunet-seed4", "stage"] == "not in the study file"
    summary = study_runs.stage_summary(status).set_index("stage")
    assert list(summary.index) == [
        "1 headline",
        "2 ladder",
        "3 clean",
        "4 budget",
        "not in the study file",
    ]
    assert summary.loc["1 headline", ["runs", "done"]].tolist() == [3, 3]
    assert summary.loc["2 ladder", ["runs", "done"]].tolist() == [9, 9]
    assert summary.loc["3 clean", ["done", "unfinished", "not started"]].tolist() == [0, 1, 2]
    assert summary.loc["4 budget", "not started"] == 1
    assert summary.loc["not in the study file", "failed"] == 1


def test_status_without_a_study_file_lists_the_runs_found(study_dir):
    status = study_runs.study_status(study_dir / "runs")
    assert len(status) == 13 and set(status["stage"]) == {""}
    assert not any(status["run_id"].str.startswith(("01_data", "02_complexity")))
    assert sorted(set(status["status"])) == ["done", "failed"]


def test_progress_reports_wall_time_speed_and_hardware(study_dir):
    progress = study_runs.run_progress(study_dir / "runs" / "isic2017-paper-unet-seed2")
    assert progress["status"] == "done" and progress["epochs_done"] == EPOCHS
    assert progress["wall_hours"] == pytest.approx(4.0 * EPOCHS / 3600)
    assert progress["images_per_second"] == pytest.approx(10.0)
    assert progress["hardware"] == "cpu, 1 thread, machine not recorded"
    assert progress["torch"] == "2.x"


def test_hardware_names_every_machine_a_run_trained_on():
    described = {
        "device": "cuda:0",
        "num_threads": 2,
        "machines": [
            {"cpu": "AMD EPYC", "cpu_count": 2},
            {"cpu": "Intel Xeon", "cpu_count": 16, "gpu": "NVIDIA H200"},
        ],
    }
    assert study_runs._hardware(described) == "cuda:0, 2 threads, AMD EPYC (2 cores), NVIDIA H200"
    # Runs from before machines were recorded say so instead of naming only the device.
    assert study_runs._hardware({"device": "cpu"}) == "cpu, machine not recorded"
    assert study_runs._hardware({}) == ""  # no config.json: nothing recorded at all
    shared = {"device": "cpu", "num_threads": 2, "processes": [1, 2], "machines": []}
    assert study_runs._hardware(shared) == (
        "cpu, 2 threads, training steps shared by 2 processes, machine not recorded"
    )
    assert (
        study_runs._hardware({**shared, "processes": [1]}) == "cpu, 2 threads, machine not recorded"
    )


def test_training_left_is_estimated_from_the_nearest_measured_epochs(study_dir, tmp_path):
    """Epochs left x the median epoch time of the run itself, else of the runs most like
    it; first epochs (data preparation, compilation) do not count."""
    runs_dir = study_dir / "runs"
    unfinished = runs_dir / "isic2017-clean-egeunet-seed1"
    unfinished.mkdir()
    write_history(unfinished, [0.5, 0.6], seconds=36.0)
    history = unfinished / "history.csv"
    table = pd.read_csv(history)
    table.loc[0, "seconds"] = 3600.0  # a slow first epoch is not a measure of the others
    table.to_csv(history, index=False)
    (unfinished / "config.json").write_text(
        json.dumps({"config": {"dataset": "isic2017", "protocol": "clean", "model": {}}})
    )
    (unfinished / "checkpoints").mkdir()
    (unfinished / "checkpoints" / "last.pt").write_bytes(b"state")
    status = study_runs.study_status(runs_dir, write_study_file(tmp_path / "fixture.yaml"))
    assert status.set_index("run_id").loc["isic2017-clean-egeunet-seed1", "model"] == "egeunet"
    left = status.set_index("run_id")["remaining_hours"]
    assert left["isic2017-paper-egeunet-seed1"] == 0.0  # done
    assert left["isic2017-clean-egeunet-seed1"] == pytest.approx((EPOCHS - 2) * 36.0 / 3600)
    # Not started: the clean egeunet run measured above, not the paper runs' 4 s epochs.
    assert left["isic2017-clean-egeunet-seed2"] == pytest.approx(EPOCHS * 36.0 / 3600)
    # The longer paper run of the same model: the finished paper egeunet runs' epochs.
    assert left["isic2017-paper-egeunet-long-seed1"] == pytest.approx(2 * EPOCHS * 4.0 / 3600)
    summary = study_runs.stage_summary(status).set_index("stage")
    assert summary.loc["3 clean", "remaining_hours"] == pytest.approx(
        (EPOCHS - 2 + 2 * EPOCHS) * 36.0 / 3600
    )
    assert summary.loc["1 headline", "remaining_hours"] == 0.0
    # Without its last.pt the run cannot resume: all its epochs are still to train.
    (unfinished / "checkpoints" / "last.pt").unlink()
    status = study_runs.study_status(runs_dir, write_study_file(tmp_path / "fixture.yaml"))
    left = status.set_index("run_id")["remaining_hours"]
    assert left["isic2017-clean-egeunet-seed1"] == pytest.approx(EPOCHS * 36.0 / 3600)


def test_training_left_is_unknown_before_any_epoch_is_measured(tmp_path):
    status = study_runs.study_status(tmp_path / "runs", write_study_file(tmp_path / "f.yaml"))
    assert status["remaining_hours"].isna().all()
    assert study_runs.stage_summary(status)["remaining_hours"].isna().all()
