"""Data-parallel training steps on CPU: a helper process takes part of every batch.

On a 2-core machine two processes with one thread each train faster than one process with
two threads: many of a step's parallel regions are too short to keep two threads busy,
while two processes each run their own whole step. So one run can use a helper process:
per step the trainer (rank 0) sends it the current parameters and the sample keys of its
share of the batch; both compute the gradient of their share of the batch loss (weighted
by their share of the images) and one all-reduce sums the two. The trainer alone updates,
evaluates and writes files. The loss is a mean over samples (BCE over every pixel of
equal-sized images, Dice averaged over samples) and the model has no batch statistics, so
the sum is the whole batch's gradient: the same step as one process, float rounding aside.

The helper loads its samples itself, from the same prepared cache with the same
per-sample augmentation seeds, so the batches are those of a single-process run.
Communication is a gloo process group of two, found through a file store in a temporary
folder and connected over the loopback interface (127.0.0.1: nothing listens on another
address); per step about 0.4 MB (parameters and gradients of the 53K-parameter model).
The helper stops when told, ignores Ctrl-C (the trainer decides), and ends on its own when
the trainer's process is gone. A trainer interrupted mid-step kills it (:meth:`close`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import default_collate

STOP, STEP = 0, 1
STARTUP_TIMEOUT = datetime.timedelta(minutes=10)  # covers the helper's first compilation
# An idle helper waits for the next step as long as the trainer pauses (a long validation,
# a notebook left between epochs, a suspended machine); a dead peer still fails at once.
COLLECTIVE_TIMEOUT = datetime.timedelta(days=7)
READY = "helper-ready"
HEADER = 3  # command, keys in the helper's share, images in the whole batch


def split_batch(keys: Sequence, parts: int = 2) -> list[list]:
    """The batch's keys in ``parts`` consecutive shares, the first ones the larger (the
    last ones empty when there are fewer keys than parts)."""
    size = math.ceil(len(keys) / parts)
    return [list(keys[i * size : (i + 1) * size]) for i in range(parts)]


def flat_gradients(parameters: Sequence[nn.Parameter], extra: Tensor) -> Tensor:
    """Every parameter's gradient (zeros where none) in logical order, then ``extra``."""
    chunks = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters
    ]
    return torch.cat([*chunks, extra.reshape(-1).to(torch.float32)])


def flat_parameters(parameters: Sequence[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in parameters])


def load_flat(tensors: Sequence[Tensor], flat: Tensor) -> None:
    """Copy ``flat`` (logical order) into ``tensors``, keeping each one's memory layout."""
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset : offset + count].view(tensor.shape))
        offset += count


def share_loss(model: nn.Module, loss_fn: nn.Module, samples: list, total: int) -> Tensor:
    """Forward and backward of ``samples`` ((image, mask) pairs), the loss weighted by their
    share of the ``total`` images of the batch; returns that weighted loss (detached)."""
    images, masks = default_collate(samples)
    loss = loss_fn(model(images), masks) * (len(samples) / total)
    loss.backward()
    return loss.detach()


class GradientHelper:
    """The trainer's side: starts the helper process and runs the exchanges.

    The helper builds the training dataset from ``config`` and ``ids`` as the trainer's
    loader does; ``threads``: torch threads of the helper.
    """

    def __init__(
        self,
        config,
        ids: Sequence[str],
        batch_size: int,
        threads: int,
    ) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="egeunet-helper-"))
        spec = {
            "config": config.to_dict(),
            "ids": list(ids),
            "batch_size": batch_size,
        }
        (self.folder / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
        environment["EGEUNET_HELPER_THREADS"] = str(threads)
        entry = (
            "import sys; from egeunet.engine.parallel import helper_main; helper_main(sys.argv[1])"
        )
        self.log = self.folder / "helper.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", entry, str(self.folder)],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            store = dist.FileStore(str(self.folder / "store"), 2)
            self._wait_until_ready(store)
            self.group = _loopback_group(store, 0)
        except BaseException:
            self.process.kill()
            self.process.wait()
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.batch_size = batch_size
        self.in_step = False
        self.header = torch.zeros(HEADER + 2 * batch_size, dtype=torch.int64)

    def start_step(self, keys: Sequence[tuple[int, int]], total: int, parameters) -> None:
        """Hand the helper its share (``keys``) of a batch of ``total`` images and the
        current parameters; it starts computing at once."""
        self._check_alive()
        self.header.zero_()
        self.header[:HEADER] = torch.tensor([STEP, len(keys), total])
        if keys:
            self.header[HEADER : HEADER + 2 * len(keys)] = torch.tensor(keys).reshape(-1)
        self.in_step = True
        with self._naming_a_dead_helper():
            self.group.broadcast(self.header, 0).wait()
            self.group.broadcast(flat_parameters(parameters), 0).wait()

    def sum_gradients(self, parameters: Sequence[nn.Parameter], loss: Tensor) -> Tensor:
        """Add the helper's gradients into ``parameters``' and its loss into ``loss``'s;
        returns the whole batch's loss."""
        flat = flat_gradients(parameters, loss)
        with self._naming_a_dead_helper():
            self.group.allreduce([flat]).wait()
        self.in_step = False
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        load_flat([p.grad for p in parameters], flat[:-1])
        return flat[-1].to(loss.dtype)

    def _wait_until_ready(self, store) -> None:
        """Wait for the helper to have loaded its data and model, checking every second
        that it is still running (a helper failing at startup is an error, not a wait)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT.total_seconds()
        while True:
            try:
                store.wait([READY], datetime.timedelta(seconds=1))
                return
            except Exception:  # the store's timeout error (its type varies between versions)
                self._check_alive()
                if time.monotonic() > deadline:  # the caller kills the helper
                    raise RuntimeError(
                        f"the training helper process did not start within {STARTUP_TIMEOUT}"
                    ) from None

    @contextlib.contextmanager
    def _naming_a_dead_helper(self):
        """A collective that fails because the helper died raises what :meth:`_check_alive`
        says (its exit code and last output line), not gloo's connection error."""
        try:
            yield
        except RuntimeError as error:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                raise error from None
            self._check_alive()
            raise

    def _check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            try:
                output = self.log.read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                output = ""
            last = output.splitlines()[-1] if output else "no output"
            raise RuntimeError(
                f"the training helper process exited with code {code} ({last}); "
                "--processes 1 (processes=1) trains without it"
            )

    def close(self) -> None:
        """Stop the helper (idempotent). Mid-step (this process interrupted between
        handing out a share and summing it) the helper waits in the all-reduce, where a
        stop message would not reach it: it is killed (it holds nothing to keep)."""
        if self.process.poll() is None and self.in_step:
            self.process.kill()
            self.process.wait()
        if self.process.poll() is None:
            try:
                self.header.zero_()
                self.header[0] = STOP
                self.group.broadcast(self.header, 0).wait()
                self.process.wait(timeout=30)
            except Exception:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _loopback_group(store, rank: int):
    """The gloo group of the trainer (rank 0) and the helper (rank 1), on 127.0.0.1."""
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = COLLECTIVE_TIMEOUT
    return dist.ProcessGroupGloo(store, rank, 2, options)


def _exit_with_parent(parent: int, folder: Path) -> None:
    """End this process once ``parent`` is gone (it cannot remove the folder then)."""
    while os.getppid() == parent:
        time.sleep(2.0)
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(1)


def helper_main(folder: str | os.PathLike) -> None:
    """The helper process: serve shares of training steps until told to stop."""
    from egeunet.data import SegmentationDataset
    from egeunet.engine.config import TrainConfig
    from egeunet.engine.protocols import open_dataset
    from egeunet.losses import DeepSupervisionLoss
    from egeunet.model import EGEUNet, fused_kernels

    folder = Path(folder)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and Jupyter interrupts reach us too
    threading.Thread(target=_exit_with_parent, args=(os.getppid(), folder), daemon=True).start()
    torch.set_num_threads(int(os.environ.get("EGEUNET_HELPER_THREADS", "1")))
    spec = json.loads((folder / "spec.json").read_text(encoding="utf-8"))
    config = TrainConfig.from_dict(spec["config"])
    dataset = SegmentationDataset(
        open_dataset(config),
        spec["ids"],
        augment=True,
        normalization=config.normalization,
        seed=config.seed,
        per_run_angle=config.per_run_angle,
    )
    model = EGEUNet(config.model).train()
    parameters = list(model.parameters())
    loss_fn = DeepSupervisionLoss()
    fused_kernels.enable()
    store = dist.FileStore(str(folder / "store"), 2)
    store.set(READY, "1")
    group = _loopback_group(store, 1)
    batch_size = spec["batch_size"]
    header = torch.zeros(HEADER + 2 * batch_size, dtype=torch.int64)
    flat = flat_parameters(parameters)
    while True:
        group.broadcast(header, 0).wait()
        command, count, total = header[:HEADER].tolist()
        if command == STOP:
            return
        group.broadcast(flat, 0).wait()
        with torch.no_grad():
            load_flat(parameters, flat)
        keys = header[HEADER : HEADER + 2 * count].reshape(count, 2).tolist()
        samples = [dataset[(position, seed)] for position, seed in keys]
        for p in parameters:
            p.grad = None
        loss = share_loss(model, loss_fn, samples, total) if samples else torch.zeros(())
        group.allreduce([flat_gradients(parameters, loss)]).wait()
