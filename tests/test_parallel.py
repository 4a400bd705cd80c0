"""Training steps shared with a helper process (egeunet.engine.parallel)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from engine_helpers import TINY, Killed, kill_after_epoch
from torch.utils.data import default_collate

from egeunet.engine import TrainConfig, train
from egeunet.engine.parallel import share_loss, split_batch
from egeunet.engine.trainer import Trainer, resolve_processes

CPU = torch.device("cpu")


def helper_processes() -> list[int]:
    """Live helper processes started by this process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid() and b"egeunet.engine.parallel" in command:
            found.append(int(stat.parent.name))
    return found


def test_split_batch_gives_the_first_share_the_extra_image():
    assert split_batch(list(range(8))) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_batch([1, 2, 3]) == [[1, 2], [3]]
    assert split_batch([1]) == [[1], []]
    assert split_batch([]) == [[], []]


def test_resolve_processes(monkeypatch):
    monkeypatch.delenv("EGEUNET_PROCESSES", raising=False)
    monkeypatch.setattr("egeunet.engine.trainer.usable_cores", lambda: 2)
    assert resolve_processes(None, CPU, None, TINY) == 2
    assert resolve_processes(None, CPU, 1, TINY) == 1
    assert resolve_processes(None, CPU, 4, TINY) == 2
    assert resolve_processes(None, torch.device("cuda"), None, TINY) == 1
    workers = TrainConfig.from_dict({**TINY.to_dict(), "num_workers": 1})
    assert resolve_processes(None, CPU, None, workers) == 1
    monkeypatch.setattr("egeunet.engine.trainer.usable_cores", lambda: 1)
    assert resolve_processes(None, CPU, None, TINY) == 1
    assert resolve_processes(2, CPU, 1, TINY) == 2
    with pytest.raises(ValueError, match="processes: expected 1 or 2, got 3"):
        resolve_processes(3, CPU, None, TINY)
    with pytest.raises(ValueError, match="needs device cpu"):
        resolve_processes(2, torch.device("cuda"), None, TINY)
    with pytest.raises(ValueError, match="num_workers 0"):
        resolve_processes(2, CPU, None, workers)
    # Batches built as whole device tensors (--pipeline device) stay in one process.
    assert resolve_processes(None, CPU, None, TINY, pipeline="device") == 1
    with pytest.raises(ValueError, match="the loader pipeline"):
        resolve_processes(2, CPU, None, TINY, pipeline="device")
    monkeypatch.setenv("EGEUNET_PROCESSES", "1")
    assert resolve_processes(None, CPU, 2, TINY) == 1
    assert resolve_processes(2, CPU, 2, TINY) == 2  # an explicit choice wins
    monkeypatch.setenv("EGEUNET_PROCESSES", "two")
    with pytest.raises(ValueError, match="EGEUNET_PROCESSES: expected 1 or 2, got 'two'"):
        resolve_processes(None, CPU, None, TINY)


def _flat_grad(parameters) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in parameters])


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def test_a_shared_step_is_the_whole_batch_step(tmp_path):
    """The helper computes its share as this process would, and the summed gradient is the
    single-process gradient of the same batch (same samples, same augmentation)."""
    config = TrainConfig.from_dict({**TINY.to_dict(), "batch_size": 3})
    single = Trainer(config, tmp_path / "single", progress=False, threads=1, processes=1)
    shared = Trainer(config, tmp_path / "shared", progress=False, threads=1, processes=2)
    try:
        keys = next(iter(single.train_loader.batch_sampler))
        assert keys == next(iter(shared.train_loader.batch_sampler))
        own, other = split_batch(keys)
        assert (len(own), len(other)) == (2, 1)
        dataset = single.train_loader.dataset
        # In this process: each share's weighted gradient, summed in the same order.
        single.optimizer.zero_grad(set_to_none=True)
        share_loss(single.model, single.loss_fn, [dataset[k] for k in own], len(keys))
        share_loss(single.model, single.loss_fn, [dataset[k] for k in other], len(keys))
        shares = _flat_grad(single.parameters)
        images, masks = default_collate([dataset[k] for k in keys])
        expected_loss = single.step(images, masks, epoch=1, batch=1)
        whole = _flat_grad(single.parameters)

        shared.start_helper()
        loss = shared.parallel_step(own, other, len(keys), epoch=1, batch=1)
        got = _flat_grad(shared.parameters)
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
        assert _relative(got, shares) < 1e-5
        # Against the whole batch at once, float32 rounding differs: the first
        # convolution's weight gradient (0..255 inputs, a GroupNorm after it) is a
        # difference of large sums. Without the helper's share the error would be ~1.
        assert _relative(got, whole) < 0.05
    finally:
        shared.close()
    assert helper_processes() == []


def test_train_with_a_helper_resumes_and_leaves_no_process(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(Killed):
        train(TINY, run_dir, progress=False, on_epoch_end=kill_after_epoch(2), processes=2)
    assert helper_processes() == []
    metrics = train(TINY, run_dir, resume=True, progress=False, processes=2)
    assert helper_processes() == []
    assert metrics["epochs"] == TINY.epochs
    assert json.loads((run_dir / "config.json").read_text())["processes"] == [2]
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == 1 + TINY.epochs


def test_a_run_resumed_in_another_arrangement_records_both(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(Killed):
        train(
            TINY, run_dir, progress=False, on_epoch_end=kill_after_epoch(1), threads=1,
            processes=1,
        )  # fmt: skip
    described = json.loads((run_dir / "config.json").read_text())
    assert (described["processes"], described["num_threads"]) == ([1], 1)
    train(TINY, run_dir, resume=True, progress=False, threads=2, processes=2)
    described = json.loads((run_dir / "config.json").read_text())
    assert (described["processes"], described["num_threads"]) == ([1, 2], 2)
    assert helper_processes() == []


def test_a_dead_helper_is_an_error_not_a_hang(tmp_path):
    trainer = Trainer(TINY, tmp_path / "run", progress=False, threads=1, processes=2)
    try:
        trainer.train_epoch(1)
        trainer.helper.process.kill()
        trainer.helper.process.wait()
        with pytest.raises(RuntimeError, match="helper process exited"):
            trainer.train_epoch(2)
    finally:
        trainer.close()


KILLED_TRAINER = """
import os, signal, sys
from egeunet.engine.trainer import Trainer
from tests.engine_helpers import TINY
trainer = Trainer(TINY, sys.argv[1], progress=False, threads=1, processes=2)
trainer.train_epoch(1)
print(trainer.helper.process.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_helper_ends_when_the_trainer_is_killed(tmp_path):
    import subprocess
    import sys
    import time

    result = subprocess.run(
        [sys.executable, "-c", KILLED_TRAINER, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    helper = int(result.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while _running(helper) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _running(helper), "the helper outlived its killed trainer"


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an unreaped process has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_helper_failing_at_startup_is_an_error_naming_why(tmp_path):
    from egeunet.engine.parallel import GradientHelper

    missing = TrainConfig.from_dict(
        {**TINY.to_dict(), "dataset": "isic2017", "data_root": str(tmp_path / "nothing")}
    )
    with pytest.raises(RuntimeError, match=r"helper process exited with code 1 \(.*nothing"):
        GradientHelper(missing, ["a"], batch_size=2, threads=1)
    assert helper_processes() == []


def test_closing_mid_step_neither_hangs_nor_leaves_the_helper(tmp_path):
    """As after Ctrl-C between handing out a share and summing it."""
    import threading

    trainer = Trainer(TINY, tmp_path / "run", progress=False, threads=1, processes=2)
    trainer.start_helper()
    keys = next(iter(trainer.train_loader.batch_sampler))
    trainer.helper.start_step(split_batch(keys)[1], len(keys), trainer.parameters)
    closing = threading.Thread(target=trainer.close, daemon=True)  # a hang fails, not blocks
    closing.start()
    closing.join(timeout=30)
    assert not closing.is_alive(), "close() hung on a helper waiting mid-step"
    assert helper_processes() == []


def test_an_error_mid_step_closes_the_helper_and_training_goes_on(tmp_path):
    trainer = Trainer(TINY, tmp_path / "run", progress=False, threads=1, processes=2)
    try:
        trainer.start_helper()
        keys = next(iter(trainer.train_loader.batch_sampler))
        other = split_batch(keys)[1]
        with pytest.raises(IndexError):  # a sample that does not exist, in this process's share
            trainer.parallel_step([(10**6, 0)], other, len(keys), epoch=1, batch=1)
        assert trainer.helper is None and helper_processes() == []
        loss, images = trainer.train_epoch(1)  # a new helper
        assert images == TINY.max_train_images and loss > 0
    finally:
        trainer.close()
    assert helper_processes() == []
