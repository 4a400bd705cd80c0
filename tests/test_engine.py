"""Training engine: run folder, protocols, resume bit-identity, NaN stop, config and CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from engine_helpers import TINY, TINY_MODEL, Killed, kill_after_epoch

from egeunet import engine
from egeunet.checkpoint import load_checkpoint
from egeunet.cli import main as cli_main
from egeunet.engine import (
    HOLDOUT_SEED,
    TEST_SELECTION,
    VALIDATION_SELECTION,
    ProtocolSplits,
    TrainConfig,
    TrainingDiverged,
    evaluate,
    holdout,
    protocol_splits,
    train,
)
from egeunet.engine import protocols as engine_protocols
from egeunet.engine import trainer as engine_trainer
from egeunet.engine.reproducibility import git_commit, machine_description
from egeunet.losses import DeepSupervisionLoss
from egeunet.model import EGEUNet, EGEUNetConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread", "synthetic_cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "paper"
    metrics = train(TINY, run_dir, progress=False)
    return run_dir, metrics


def read_history(run_dir):
    with open(run_dir / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_folder_contents(finished_run, capsys):
    run_dir, metrics = finished_run
    for name in ("config.json", "history.csv", "metrics.json", "per_image.csv", "cases.npz"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert len(list((run_dir / "predictions").glob("*.png"))) == 2

    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["protocol"] == "paper" and metrics["selection"] == TEST_SELECTION
    assert set(metrics["pooled"]) == {"iou", "dsc", "accuracy", "specificity", "sensitivity"}
    assert set(metrics["per_image"]) == {
        "dsc_mean", "dsc_median", "iou_mean", "iou_median", "isic_score", "hd95_mean", "hd95_median"
    }  # fmt: skip
    assert metrics["split"] == "test" and metrics["num_images"] == 4
    assert metrics["num_parameters"] == sum(p.numel() for p in EGEUNet(TINY_MODEL).parameters())
    assert metrics["model"]["widths"] == [4, 4, 8, 8, 12, 12]
    assert metrics["pooled"]["dsc"] == pytest.approx(
        2 * metrics["pooled"]["iou"] / (1 + metrics["pooled"]["iou"])
    )

    description = json.loads((run_dir / "config.json").read_text())
    assert TrainConfig.from_dict(description["config"]) == TINY
    assert description["selection"] == TEST_SELECTION
    assert description["counts"] == {"train": 12, "val": 4, "test": 4}
    assert len(description["data_manifest_hash"]) == 64
    assert {"package_version", "git_commit", "torch_version"} <= set(description)
    assert description["machines"] == [machine_description(torch.device("cpu"))]
    assert description["machines"][0]["cpu"] and description["machines"][0]["cpu_count"] >= 1

    history = read_history(run_dir)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    # Cosine schedule stepped per epoch, T_max 2: 1e-3, then halfway, then eta_min.
    lrs = [float(r["lr"]) for r in history]
    assert lrs == pytest.approx([1e-3, 1e-5 + (1e-3 - 1e-5) / 2, 1e-5], rel=1e-9)
    losses = [float(r["val_loss"]) for r in history]
    assert metrics["best_epoch"] == 1 + losses.index(min(losses))
    # Paper protocol: the reported test metrics are the selection epoch's.
    best_row = history[metrics["best_epoch"] - 1]
    assert float(best_row["val_dsc"]) == pytest.approx(metrics["pooled"]["dsc"])

    with open(run_dir / "per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {"id", "dsc", "iou", "hd95"} <= set(rows[0])


def test_evaluate_reproduces_the_final_metrics(finished_run):
    run_dir, metrics = finished_run
    document = evaluate(run_dir / "checkpoints" / "best.pt", "test", device="cpu")
    assert document["pooled"] == pytest.approx(metrics["pooled"])
    assert document["per_image"] == pytest.approx(metrics["per_image"])
    out = run_dir / "evaluations" / "best-test"
    assert (out / "metrics.json").is_file() and (out / "per_image.csv").is_file()
    assert (out / "cases.npz").is_file()  # the same writer as a finished run's
    train_part = evaluate(run_dir / "checkpoints" / "best.pt", "train", output=run_dir / "ev")
    assert train_part["num_images"] == 12


def test_resume_after_a_kill_is_bit_identical(finished_run, tmp_path):
    _, _ = finished_run
    uninterrupted = finished_run[0]

    run_dir = tmp_path / "resumed"
    with pytest.raises(Killed):
        train(TINY, run_dir, progress=False, on_epoch_end=kill_after_epoch(2))
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 2
    # Interrupted on another machine (as an older run folder, which recorded none).
    description = json.loads((run_dir / "config.json").read_text())
    description["machines"] = [{"cpu": "elsewhere", "cpu_count": 64}]
    (run_dir / "config.json").write_text(json.dumps(description))
    metrics = train(TINY, run_dir, resume=True, progress=False)
    machines = json.loads((run_dir / "config.json").read_text())["machines"]
    assert machines == [
        {"cpu": "elsewhere", "cpu_count": 64},
        machine_description(torch.device("cpu")),
    ]

    for name in ("last.pt", "best.pt"):
        expected = load_checkpoint(uninterrupted / "checkpoints" / name)["model_state"]
        got = load_checkpoint(run_dir / "checkpoints" / name)["model_state"]
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}: {key} differs"
    keep = ("epoch", "train_loss", "val_loss", "lr", "val_dsc")
    assert [{k: r[k] for k in keep} for r in read_history(run_dir)] == [
        {k: r[k] for k in keep} for r in read_history(uninterrupted)
    ]
    assert metrics["pooled"] == json.loads((uninterrupted / "metrics.json").read_text())["pooled"]


def test_resume_refusals(finished_run, tmp_path):
    run_dir, _ = finished_run
    with pytest.raises(ValueError, match="already holds a run"):
        train(TINY, run_dir, progress=False)
    with pytest.raises(FileNotFoundError, match=r"last\.pt"):
        train(TINY, tmp_path / "empty", resume=True, progress=False)
    changed = TrainConfig.from_dict({**TINY.to_dict(), "lr": 0.01})
    with pytest.raises(ValueError, match=r"changed: lr \(0\.001 -> 0\.01\)\. Keep .*restart"):
        train(changed, run_dir, resume=True, progress=False)
    switched = TrainConfig.from_dict(
        {**TINY.to_dict(), "model": {**TINY_MODEL.to_dict(), "gab": False}}
    )
    with pytest.raises(ValueError, match=r"changed: model\.gab \(True -> False\)"):
        train(switched, run_dir, resume=True, progress=False)
    # Fewer epochs than already trained: returning the longer run's metrics (and rewriting
    # config.json to the shorter count) would misreport the run.
    config_before = (run_dir / "config.json").read_text()
    shorter = TrainConfig.from_dict({**TINY.to_dict(), "epochs": TINY.epochs - 1})
    with pytest.raises(ValueError, match=r"cannot resume with epochs 2: .* already trained 3"):
        train(shorter, run_dir, resume=True, progress=False)
    assert (run_dir / "config.json").read_text() == config_before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"train": 0}

    class PoisonedLoss(DeepSupervisionLoss):
        def forward(self, outputs, target):
            loss = super().forward(outputs, target)
            if torch.is_grad_enabled():
                calls["train"] += 1
                if calls["train"] == 5:  # epoch 2 (3 batches per epoch), batch 2
                    return loss * float("nan")
            return loss

    monkeypatch.setattr(engine_trainer, "DeepSupervisionLoss", PoisonedLoss)
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"epoch 2, batch 2.*last\.pt \(epoch 1\)"):
        train(TINY, run_dir, progress=False)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert len(read_history(run_dir)) == 1
    assert not (run_dir / "metrics.json").exists()


def test_clean_protocol_selects_on_validation(tmp_path, capsys):
    config = TrainConfig.from_dict({**TINY.to_dict(), "protocol": "clean", "epochs": 1})
    metrics = train(config, tmp_path / "clean", progress=True)  # tqdm bars on stderr
    assert "epoch 1/1" in capsys.readouterr().err
    assert metrics["selection"] == VALIDATION_SELECTION
    description = json.loads((tmp_path / "clean" / "config.json").read_text())
    assert description["protocol"] == "clean"
    assert description["validation_source"] == "challenge val"
    assert metrics["counts"] == {"train": 12, "val": 4, "test": 4}


class FakePrepared:
    """Split lists only, like ISIC 2017 (challenge train/val, no challenge test)."""

    name = "fake"

    def __init__(self, challenge, paper):
        self._splits = {"challenge": challenge, "paper": paper}

    def split(self, name):
        return self._splits[name]


def test_clean_protocol_falls_back_to_a_seeded_holdout():
    ids = [f"im{i:03d}" for i in range(50)]
    prepared = FakePrepared(
        challenge={"train": ids[:40], "val": ids[40:]},
        paper={"train": ids[:35], "test": ids[35:]},
    )
    splits = protocol_splits(TrainConfig(protocol="clean"), prepared)
    assert splits.selection == VALIDATION_SELECTION
    assert splits.test == ids[35:]
    assert len(splits.val) == 4 and len(splits.train) == 31  # round(35 * 0.1) = 4
    assert not set(splits.val) & set(splits.train) and not set(splits.val) & set(splits.test)
    assert sorted(splits.train + splits.val) == ids[:35]
    assert (splits.train, splits.val) == holdout(ids[:35], 0.1, HOLDOUT_SEED)
    paper = protocol_splits(TrainConfig(protocol="paper"), prepared)
    assert paper.val == paper.test == ids[35:] and paper.selection == TEST_SELECTION
    challenge = protocol_splits(TrainConfig(protocol="challenge"), prepared)
    assert (challenge.train, challenge.val) == (ids[:40], ids[40:])
    assert isinstance(splits, ProtocolSplits)


def test_train_config_defaults_are_the_published_recipe():
    config = TrainConfig()
    assert (config.epochs, config.batch_size, config.lr, config.weight_decay) == (
        300,
        8,
        1e-3,
        1e-2,
    )
    assert (config.t_max, config.eta_min, config.seed, config.image_size) == (50, 1e-5, 42, 256)
    assert config.betas == (0.9, 0.999) and config.model == EGEUNetConfig()
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"epoch": 3}, "unknown train config key.*epoch"),
        ({"model": {"width": [8]}}, "model.width"),
        ({"protocol": "best"}, "protocol"),
        ({"epochs": "ten"}, r"epochs: expected int, got 'ten'"),
        ({"max_train_images": 2.5}, r"max_train_images: expected int or null, got 2\.5"),
        ({"amp": 1}, "amp: expected bool"),
        ({"image_size": 100}, "image_size"),
    ],
)
def test_train_config_rejects_bad_input(data, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(data)


def test_cli_overrides_and_config_file(tmp_path, monkeypatch, capsys):
    from egeunet.cli import build_parser
    from egeunet.engine_commands import config_from_args

    config_file = tmp_path / "c.yaml"
    config_file.write_text("epochs: 7\nlr: 0.002\nmodel:\n  gab: false\n")
    args = build_parser().parse_args(
        ["train", "--config", str(config_file), "--epochs", "2", "--model.widths", "4,4,8,8,12,12",
         "--betas", "0.8,0.9", "--max-eval-images", "none", "--amp", "yes", "--data-root", "d"]
    )  # fmt: skip
    config = config_from_args(args)
    assert config.epochs == 2 and config.lr == 0.002 and config.betas == (0.8, 0.9)
    assert config.model.gab is False and config.model.widths == (4, 4, 8, 8, 12, 12)
    assert config.max_eval_images is None and config.amp is True and config.data_root == "d"

    capsys.readouterr()
    assert cli_main(["train", "--epochs", "two"]) == 2
    assert "--epochs: expected an integer, got 'two'" in capsys.readouterr().err
    assert cli_main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_cli_train_then_evaluate(tmp_path, capsys):
    run_dir = tmp_path / "cli"
    argv = ["train", "--run-dir", str(run_dir), "--progress", "lines", "--epochs", "1"]
    for key, value in TINY.to_dict().items():
        if key not in ("model", "epochs", "betas"):
            argv += [f"--{key}", "none" if value is None else str(value)]
    argv += ["--model.widths", "4,4,8,8,12,12"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "test-set model selection" in out and "pooled" in out
    assert cli_main(["evaluate", "--checkpoint", str(run_dir / "checkpoints" / "best.pt")]) == 0
    assert "per image" in capsys.readouterr().out
    assert cli_main(["evaluate", "--weights", str(tmp_path / "none.pt")]) == 2


def test_restart_discards_the_old_run_and_steps_reach_the_callback(tmp_path):
    run_dir = tmp_path / "again"
    train(TrainConfig.from_dict({**TINY.to_dict(), "epochs": 1}), run_dir, progress=False)
    (run_dir / "predictions" / "stale.png").write_bytes(b"")
    steps = []
    shorter = TrainConfig.from_dict({**TINY.to_dict(), "epochs": 1, "lr": 0.01})
    metrics = train(
        shorter, run_dir, restart=True, progress=False,
        on_step_end=lambda trainer, loss: steps.append((trainer.state.epoch, float(loss))),
    )  # fmt: skip
    assert len(steps) == 3 and all(epoch == 0 and math.isfinite(v) for epoch, v in steps)
    assert not (run_dir / "predictions" / "stale.png").exists()
    assert json.loads((run_dir / "config.json").read_text())["config"]["lr"] == 0.01
    assert metrics["epochs"] == 1 and len(read_history(run_dir)) == 1
    with pytest.raises(ValueError, match="not both"):
        train(shorter, run_dir, resume=True, restart=True, progress=False)


def test_a_rerun_in_the_same_folder_continues_or_restarts_never_a_dead_end(tmp_path):
    from egeunet.engine import train_run

    run_dir = tmp_path / "notebook"
    once = TrainConfig.from_dict({**TINY.to_dict(), "epochs": 1})
    first = train_run(once, run_dir, "resume")  # an empty folder: a new run
    assert train_run(once, run_dir, "resume") == first  # finished: its metrics again
    longer = TrainConfig.from_dict({**TINY.to_dict(), "epochs": 2})
    assert train_run(longer, run_dir, "resume")["epochs"] == 2  # continued
    other = TrainConfig.from_dict({**TINY.to_dict(), "epochs": 1, "batch_size": 3})
    with pytest.raises(ValueError, match=r"changed: batch_size \(4 -> 3\).*if_exists='restart'"):
        train_run(other, run_dir, "resume")
    assert train_run(other, run_dir, "restart")["epochs"] == 1
    with pytest.raises(ValueError, match=r"if_exists: expected resume .* or restart"):
        train_run(other, run_dir, "again")


def test_progress_line_has_the_fields(capsys):
    progress = engine.Progress(False, total_epochs=10)
    row = {"epoch": 2, "train_loss": 0.5, "val_loss": 0.4, "val_dsc": 0.8, "lr": 1e-3,
           "seconds": 12.0, "images_per_second": 40.0}  # fmt: skip
    progress.epoch_line(row, eta_seconds=3725)
    line = capsys.readouterr().out
    assert line == (
        "epoch 2/10  train_loss 0.5000  val_loss 0.4000  val_dsc 0.8000  lr 1.00e-03  "
        "12.0 s  40.0 img/s  ETA 1:02:05\n"
    )
    assert math.isfinite(row["seconds"])


class FakeLoader:
    """Records torch's thread count while each batch is made."""

    num_workers = 0

    def __init__(self):
        self.seen = []

    def __iter__(self):
        for n in range(3):
            self.seen.append(torch.get_num_threads())
            yield n


def test_batches_are_assembled_single_threaded():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = FakeLoader()
        got = [
            (b, torch.get_num_threads()) for b in engine_protocols.single_threaded_batches(loader)
        ]
        assert got == [(0, 2), (1, 2), (2, 2)]  # the model runs with every thread
        assert loader.seen == [1, 1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_undefined_metrics_are_null_in_metrics_json_and_na_when_printed(tmp_path):
    # A split without lesion pixels, predicted empty: pooled IoU, DSC and sensitivity are
    # 0/0 (NaN in memory); the file must still be strict JSON.
    from egeunet.engine import Evaluation, metrics_document
    from egeunet.engine_commands import format_metrics
    from egeunet.fileio import write_json_atomic
    from egeunet.metrics import MetricAccumulator

    accumulator = MetricAccumulator()
    accumulator.update(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), ["a", "b"])
    splits = ProtocolSplits("paper", TEST_SELECTION, ["t"], ["a", "b"], ["a", "b"], "paper test")
    document = metrics_document(Evaluation(0.1, accumulator), splits, "test", TINY_MODEL)
    assert document["pooled"]["sensitivity"] is None and document["pooled"]["dsc"] is None
    assert document["pooled"]["specificity"] == 1.0

    write_json_atomic(tmp_path / "metrics.json", document)
    text = (tmp_path / "metrics.json").read_text(encoding="utf-8")
    assert "NaN" not in text
    assert json.loads(text)["pooled"]["sensitivity"] is None
    summary = format_metrics(json.loads(text))
    assert "sensitivity n/a" in summary and "specificity 1.0000" in summary


def test_nothing_is_written_beside_a_checkpoint_in_a_read_only_folder(finished_run, tmp_path):
    """The default evaluation folder is beside a foreign checkpoint; in a folder marked
    read-only (a shared reference folder, writable to root) it must be refused."""
    import shutil

    run_dir, _ = finished_run
    shared = tmp_path / "reference"
    shared.mkdir()
    shutil.copy(run_dir / "checkpoints" / "best.pt", shared / "published.pt")
    shared.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"evaluation output folder .*reference is read-only"):
            evaluate(shared / "published.pt", "test", device="cpu")
        with pytest.raises(ValueError, match=r"run folder .*reference/run cannot be created"):
            train(TINY, shared / "run", progress=False)
        assert sorted(p.name for p in shared.iterdir()) == ["published.pt"]
    finally:
        shared.chmod(0o755)


def test_evaluation_keeps_the_checkpoints_own_selection_label(finished_run, tmp_path):
    """A paper-protocol checkpoint (selected on the paper test part) evaluated under the
    clean protocol must not be labelled validation-set model selection."""
    from egeunet.checkpoint import LoadedModel
    from egeunet.engine import UNKNOWN_SELECTION, checkpoint_selection

    run_dir, _ = finished_run
    best = run_dir / "checkpoints" / "best.pt"
    same = evaluate(best, "test", output=tmp_path / "same", device="cpu")
    assert same["selection"] == TEST_SELECTION
    other = evaluate(best, "test", output=tmp_path / "clean", protocol="clean", device="cpu")
    assert other["protocol"] == "clean"
    assert other["selection"].startswith(f"{TEST_SELECTION} (paper protocol on synthetic)")
    assert VALIDATION_SELECTION not in other["selection"]
    written = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert written["selection"] == other["selection"]
    raw = LoadedModel(model=None, layout="official", checkpoint={})
    assert checkpoint_selection(raw, TINY) == UNKNOWN_SELECTION


def test_extending_a_finished_run_withdraws_its_old_results(finished_run, tmp_path):
    """Resumed with more epochs, a finished run's metrics.json belongs to the shorter run;
    left in place, a report would show it under the new epoch count if the run stops."""
    import shutil

    run_dir = tmp_path / "extended"
    shutil.copytree(finished_run[0], run_dir)
    longer = TrainConfig.from_dict({**TINY.to_dict(), "epochs": TINY.epochs + 2})

    class Killed(Exception):
        pass

    def kill(epoch, row):
        raise Killed

    with pytest.raises(Killed):
        train(longer, run_dir, resume=True, progress=False, on_epoch_end=kill)
    assert json.loads((run_dir / "config.json").read_text())["config"]["epochs"] == 5
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "per_image.csv").exists()
    metrics = train(longer, run_dir, resume=True, progress=False)
    assert metrics["epochs"] == 5 and (run_dir / "metrics.json").is_file()


def test_device_pipeline_trains_and_resumes_bit_identically(tmp_path):
    # The GPU path's batches (split on the device, augmented there) run on CPU too.
    uninterrupted = tmp_path / "whole"
    train(TINY, uninterrupted, progress=False, pipeline="device")
    description = json.loads((uninterrupted / "config.json").read_text())
    assert description["pipeline"] == "device"

    class Killed(Exception):
        pass

    def kill_after_first(epoch, row):
        if epoch == 1:
            raise Killed

    resumed = tmp_path / "resumed"
    with pytest.raises(Killed):
        train(TINY, resumed, progress=False, pipeline="device", on_epoch_end=kill_after_first)
    train(TINY, resumed, resume=True, progress=False, pipeline="device")
    expected = load_checkpoint(uninterrupted / "checkpoints" / "last.pt")["model_state"]
    got = load_checkpoint(resumed / "checkpoints" / "last.pt")["model_state"]
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    with pytest.raises(ValueError, match="pipeline: expected one of auto, loader, device"):
        train(TINY, tmp_path / "bad", progress=False, pipeline="gpu")


def test_commit_is_dirty_for_code_changes_not_for_run_outputs(tmp_path):
    """A study writing its run folders into a clone's reports/ leaves the commit clean;
    an edited source file marks it -dirty."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    (tmp_path / "egeunet").mkdir()
    (tmp_path / "reports").mkdir()
    (tmp_path / "egeunet" / "code.py").write_text("x = 1\n")
    (tmp_path / "reports" / "history.csv").write_text("epoch\n")

    def git(*args):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path, check=True, capture_output=True,
        )  # fmt: skip

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    package = tmp_path / "egeunet"
    head = git_commit(package)
    assert head is not None and len(head) == 40
    (tmp_path / "reports" / "history.csv").write_text("epoch\n1\n")
    assert git_commit(package) == head
    (tmp_path / "egeunet" / "code.py").write_text("x = 2\n")
    assert git_commit(package) == head + "-dirty"
