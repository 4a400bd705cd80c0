"""The trainer: one run of :func:`train` into a run folder, epoch by epoch, step by step.

:meth:`Trainer.step` is one optimisation step (forward, loss, backward, update): the one
place to change for EMA, gradient clipping, accumulation or ``torch.compile``. Callbacks
run after every step (``on_step_end(trainer, loss)``) and after every epoch, once its
checkpoints and history are written (``on_epoch_end(epoch, history_row)``). A non-finite
loss stops the run with :class:`TrainingDiverged`, leaving the checkpoints of the last
good epoch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from egeunet.checkpoint import load_checkpoint, load_model, model_payload, save_checkpoint
from egeunet.engine.config import TrainConfig, config_changes
from egeunet.engine.evaluation import (
    Evaluation,
    evaluate_loader,
    metrics_document,
    write_evaluation,
    write_rows_csv,
)
from egeunet.engine.parallel import GradientHelper, share_loss, split_batch
from egeunet.engine.protocols import (
    make_device_loader,
    make_split_loader,
    open_dataset,
    protocol_splits,
    resolve_pipeline,
    single_threaded_batches,
)
from egeunet.engine.reproducibility import (
    capture_rng,
    check_training_checkpoint,
    fast_forward,
    record_machine,
    restore_rng,
    run_description,
    seed_everything,
)
from egeunet.fileio import folder_lock, require_writable, write_json_atomic
from egeunet.losses import DeepSupervisionLoss
from egeunet.metrics import EPOCH_METRICS, PROGRESS_METRICS, epoch_metrics
from egeunet.model import EGEUNet, fused_kernels
from egeunet.predict import resolve_device
from egeunet.runfolder import RunFolder
from egeunet.threads import AdaptiveThreads, usable_cores

HISTORY_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "lr",
    *(m.history_column for m in EPOCH_METRICS),
    "seconds",
    "images_per_second",
)
START_OVER = (
    "start over: if_exists='restart' in the 03_train notebook, --restart for egeunet "
    "train, or another run folder"
)

EpochCallback = Callable[[int, dict], None]
StepCallback = Callable[["Trainer", torch.Tensor], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving that epoch."""


def _format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """A tqdm bar per epoch (a widget in JupyterLab) when enabled; always one flushed
    summary line per epoch."""

    def __init__(self, enabled: bool | None, total_epochs: int) -> None:
        self.bars = sys.stderr.isatty() if enabled is None else enabled
        self.total_epochs = total_epochs

    def batches(self, iterable, epoch: int, total: int):
        if not self.bars:
            return iterable
        return tqdm(iterable, total=total, desc=f"epoch {epoch}/{self.total_epochs}", leave=False)

    def epoch_line(self, row: dict, eta_seconds: float) -> None:
        parts = [f"epoch {row['epoch']}/{self.total_epochs}", f"train_loss {row['train_loss']:.4f}"]
        if row.get("val_loss") is not None:
            parts.append(f"val_loss {row['val_loss']:.4f}")
            columns = [m.history_column for m in PROGRESS_METRICS]
            parts += [f"{c} {row[c]:.4f}" for c in columns if row.get(c) is not None]
        parts += [
            f"lr {row['lr']:.2e}",
            f"{row['seconds']:.1f} s",
            f"{row['images_per_second']:.1f} img/s",
            f"ETA {_format_duration(eta_seconds)}",
        ]
        self.line("  ".join(parts))

    def line(self, line: str) -> None:
        if self.bars:
            tqdm.write(line)
        else:
            print(line, flush=True)


@dataclass
class TrainingState:
    """What survives between epochs besides model and optimiser."""

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int | None = None
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def resolve_processes(
    processes: int | None,
    device: torch.device,
    threads: int | None,
    config: TrainConfig,
    pipeline: str = "loader",
) -> int:
    """Processes that compute a training step: 2 (a helper process, see
    :mod:`egeunet.engine.parallel`) or 1. ``None`` takes ``EGEUNET_PROCESSES`` when set,
    else chooses 2 on a CPU run whose threads (``threads``, else the usable cores) are 2
    or more, with batches built in this process by the loader pipeline; each process then
    gets half the threads (fixed: the adaptive threads apply to one process only).
    """
    if processes is None and os.environ.get("EGEUNET_PROCESSES"):
        try:
            processes = int(os.environ["EGEUNET_PROCESSES"])
        except ValueError:
            raise ValueError(
                f"EGEUNET_PROCESSES: expected 1 or 2, got {os.environ['EGEUNET_PROCESSES']!r}"
            ) from None
    shareable = device.type == "cpu" and not config.num_workers and pipeline == "loader"
    if processes is not None:
        if processes not in (1, 2):
            raise ValueError(f"processes: expected 1 or 2, got {processes!r}")
        if processes == 2 and not shareable:
            raise ValueError(
                "processes=2 (a helper process) needs device cpu, num_workers 0 and the "
                "loader pipeline"
            )
        return processes
    budget = threads if threads else usable_cores()
    return 2 if shareable and budget >= 2 else 1


class Trainer:
    """One run of :func:`train`: owns model, optimiser, loaders and the run folder."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | os.PathLike,
        progress: bool | None,
        threads: int | None = None,
        pipeline: str = "auto",
        on_step_end: StepCallback | None = None,
        processes: int | None = None,
    ) -> None:
        self.config = config
        self.run = RunFolder(Path(run_dir))
        self.device = resolve_device(config.device)
        # CPU threads: a fixed count, or the cores other processes leave free (None).
        self.threads = AdaptiveThreads(fixed=threads, adapt=self.device.type == "cpu")
        self.helper: GradientHelper | None = None
        self.amp = config.amp and self.device.type == "cuda"
        if config.amp and not self.amp:
            print("amp: mixed precision needs CUDA; training in float32", file=sys.stderr)
        seed_everything(config.seed)
        self.prepared = open_dataset(config)
        self.splits = protocol_splits(config, self.prepared)
        self.model = EGEUNet(config.model).to(self.device)
        self.loss_fn = DeepSupervisionLoss()
        fused_kernels.enable()  # compiled LayerNorm for training; plain ops if unavailable
        # foreach: one multi-tensor update for the ~300 small parameters instead of a loop
        # of per-tensor ops (the default on CUDA only); the same update. Not fused=True:
        # 0.9 against 3.3 ms per update on CPU, but its CPU kernel silently mis-updates a
        # channels-last parameter whose optimiser state was saved in another layout (as in
        # checkpoints of the earlier NCHW model).
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            betas=config.betas,
            weight_decay=config.weight_decay,
            foreach=True,
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=config.t_max, eta_min=config.eta_min
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.pipeline = resolve_pipeline(pipeline, self.device)
        # With a helper process, each process trains with half the threads (evaluation:
        # this process alone, with all of them).
        self.processes = resolve_processes(processes, self.device, threads, config, self.pipeline)
        self.process_threads = max(1, (threads or usable_cores()) // self.processes)
        if self.pipeline == "device":
            self.train_loader = make_device_loader(
                config, self.prepared, self.splits.train, self.device, train=True
            )
            self.val_loader = make_device_loader(
                config, self.prepared, self.splits.val, self.device, train=False
            )
        else:
            self.train_loader = make_split_loader(
                config, self.prepared, self.splits.train, train=True
            )
            self.val_loader = make_split_loader(config, self.prepared, self.splits.val, train=False)
        self.parameters = list(self.model.parameters())
        self.state = TrainingState()
        self.progress = Progress(progress, config.epochs)
        self.on_step_end = on_step_end

    # Checkpoints

    def _payload(self, full: bool) -> dict:
        payload = model_payload(
            self.model,
            epoch=self.state.epoch,
            train_config=self.config.to_dict(),
            protocol=self.splits.protocol,
            selection=self.splits.selection,
            data_manifest_hash=self.prepared.manifest_hash,
        )
        if full:
            payload.update(
                optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.scheduler.state_dict(),
                scaler_state=self.scaler.state_dict() if self.scaler else None,
                rng=capture_rng(),
                loader_generator=self.train_loader.generator.get_state(),
                training_state=asdict(self.state),
                num_threads=torch.get_num_threads(),
            )
        return payload

    def start(self, resume: bool, restart: bool = False) -> None:
        """Resume the run in the folder, or start one: ``restart`` first discards a run
        the folder holds; without it a folder holding a run is refused."""
        require_writable(self.run.root, "run folder")
        foreign = self.run.foreign_file()
        if foreign is not None:
            raise ValueError(
                f"run folder {self.run.root} holds {foreign}, which no egeunet run wrote; "
                "nothing was replaced: choose another run folder (--run-dir)"
            )
        if resume:
            self._resume()
            return
        if restart:
            self._discard()
        elif self.run.last.exists():
            raise ValueError(
                f"run folder {self.run.root} already holds a run: continue it (resume=True, "
                "--resume, if_exists='resume' in 03_train) or discard it (restart=True, "
                "--restart, if_exists='restart'), or choose another folder"
            )
        description = run_description(
            self.config, self.prepared, self.splits, self.device, self.amp
        )
        write_json_atomic(
            self.run.config,
            {**description, "pipeline": self.pipeline, "processes": [self.processes]},
        )

    def _discard(self) -> None:
        """Delete the files of the run this folder holds (only ours: foreign_file is None)."""
        for path in self.run.files():
            path.unlink(missing_ok=True)
        for panel in self.run.predictions.glob("*.png"):
            panel.unlink()

    def _resume(self) -> None:
        if not self.run.last.is_file():
            raise FileNotFoundError(
                f"cannot resume: {self.run.last} does not exist (no epoch finished there); "
                "start the run without resume"
            )
        checkpoint = load_checkpoint(self.run.last)
        check_training_checkpoint(checkpoint, self.run.last)
        changes = config_changes(checkpoint["train_config"], self.config)
        if changes:
            raise ValueError(
                f"cannot resume the run in {self.run.root} with a different configuration; "
                f"changed: {', '.join(changes)}. Keep the run's settings to continue it, or "
                f"{START_OVER}"
            )
        if checkpoint["data_manifest_hash"] != self.prepared.manifest_hash:
            raise ValueError(
                f"cannot resume: the data in {self.prepared.root} differs from the run's "
                f"(manifest hash {checkpoint['data_manifest_hash'][:12]}...)"
            )
        self.model.load_state_dict(checkpoint["model_state"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        self.scheduler.load_state_dict(checkpoint["scheduler_state"])
        if self.scaler and checkpoint.get("scaler_state"):
            self.scaler.load_state_dict(checkpoint["scaler_state"])
        self.state = TrainingState(**checkpoint["training_state"])
        # History is part of the checkpoint: a kill after last.pt but before history.csv
        # must not lose that epoch's row.
        write_rows_csv(self.run.history, self.state.history, HISTORY_COLUMNS)
        if self.config.epochs < self.state.epoch:
            raise ValueError(
                f"cannot resume with epochs {self.config.epochs}: {self.run.last} has already "
                f"trained {self.state.epoch} epochs; use epochs >= {self.state.epoch}, or "
                f"{START_OVER}"
            )
        threads = checkpoint.get("num_threads")
        if threads != torch.get_num_threads():
            print(
                f"resume: the run used {threads} torch threads, this process {torch.get_num_threads()}; "
                "CPU results will not be bit-identical to an uninterrupted run",
                file=sys.stderr,
            )
        restore_rng(checkpoint["rng"])
        fast_forward(self.train_loader, self.state.epoch)  # (validation does not augment)
        self.train_loader.generator.set_state(checkpoint["loader_generator"])
        description = json.loads(self.run.config.read_text(encoding="utf-8"))
        changed = record_machine(description, self.device)
        # Every arrangement the run trained with (older runs recorded none: one process),
        # and the most threads it had (the report's core-hours).
        processes = description.setdefault("processes", [1])
        if self.processes not in processes:
            processes.append(self.processes)
            changed = True
        threads = max(int(description.get("num_threads") or 1), torch.get_num_threads())
        if threads != description.get("num_threads"):
            description["num_threads"] = threads
            changed = True
        if self.config.epochs != checkpoint["train_config"]["epochs"]:
            description["config"]["epochs"] = self.config.epochs
            changed = True
        if changed:
            write_json_atomic(self.run.config, description)
        if self.config.epochs != checkpoint["train_config"]["epochs"]:
            # The shorter run's results no longer describe this run (best.pt moves on too):
            # a report must not show them under the new epoch count before it finishes.
            for stale in (self.run.metrics, self.run.per_image, self.run.cases):
                stale.unlink(missing_ok=True)

    # Steps and epochs

    def step(
        self, images: torch.Tensor, masks: torch.Tensor, epoch: int, batch: int
    ) -> torch.Tensor:
        """One optimisation step on a batch already on the device; returns the loss
        (detached). Raises :class:`TrainingDiverged` before updating on a non-finite loss."""
        with torch.autocast(self.device.type, enabled=self.amp):
            outputs = self.model(images)
        loss = self.loss_fn(outputs, masks)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"non-finite training loss ({loss.item()}) at epoch {epoch}, batch {batch}; "
                f"stopped. The last good state is {self._last_good()}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def parallel_step(
        self, own: list, other: list, total: int, epoch: int, batch: int
    ) -> torch.Tensor:
        """:meth:`step` shared with the helper process (:mod:`egeunet.engine.parallel`):
        ``own`` and ``other`` are the sample keys of this process's and the helper's share
        of a batch of ``total`` images."""
        assert self.helper is not None
        self.helper.start_step(other, total, self.parameters)
        try:
            dataset = self.train_loader.dataset
            self.optimizer.zero_grad(set_to_none=True)
            local = share_loss(self.model, self.loss_fn, [dataset[key] for key in own], total)
            loss = self.helper.sum_gradients(self.parameters, local)
        except BaseException:
            self.close()  # the helper waits mid-step; the next epoch starts a new one
            raise
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"non-finite training loss ({loss.item()}) at epoch {epoch}, batch {batch}; "
                f"stopped. The last good state is {self._last_good()}"
            )
        self.optimizer.step()
        return loss

    def start_helper(self) -> None:
        """Start the helper process (once; :meth:`close` stops it)."""
        if self.helper is None:
            self.helper = GradientHelper(
                self.config,
                self.splits.train,
                self.config.batch_size,
                self.process_threads,
            )
            self._close_helper = weakref.finalize(self, self.helper.close)

    def _parallel_steps(self, epoch: int) -> Iterator[tuple[torch.Tensor, int]]:
        """(loss, images) of each step of an epoch shared with the helper process, each
        process on its own threads."""
        self.start_helper()
        batches = self.progress.batches(
            self.train_loader.batch_sampler, epoch, len(self.train_loader)
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(self.process_threads)
        try:
            for batch, keys in enumerate(batches, start=1):
                own, other = split_batch(keys)
                yield self.parallel_step(own, other, len(keys), epoch, batch), len(keys)
        finally:
            torch.set_num_threads(threads)

    def _steps(self, epoch: int) -> Iterator[tuple[torch.Tensor, int]]:
        """(loss, images) of each step of an epoch in this process alone."""
        batches = self.progress.batches(
            single_threaded_batches(self.train_loader), epoch, len(self.train_loader)
        )
        for batch, (images, masks) in enumerate(batches, start=1):
            threads = torch.get_num_threads()
            if self.threads.check() != threads:
                self.progress.line(
                    f"epoch {epoch}, batch {batch}: {torch.get_num_threads()} torch threads "
                    f"(other processes keep {self.threads.changes[-1][0]} cores busy)"
                )
            images = images.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True)
            yield self.step(images, masks, epoch, batch), len(images)

    def _arrangement(self) -> str:
        if self.processes == 1:
            return f"{torch.get_num_threads()} threads"
        return (
            f"{self.processes} processes x {self.process_threads} threads per training step, "
            f"{torch.get_num_threads()} threads for evaluation"
        )

    def close(self) -> None:
        """Stop the helper process, if any (idempotent)."""
        if self.helper is not None:
            self._close_helper()
            self.helper = None

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over the training loader; returns (mean loss, images seen)."""
        self.model.train()
        total = torch.zeros((), dtype=torch.float64)
        seen = 0
        steps = self._parallel_steps(epoch) if self.processes > 1 else self._steps(epoch)
        for loss, images in steps:
            if self.on_step_end is not None:
                self.on_step_end(self, loss)
            total += loss.double().cpu() * images
            seen += images
        return float(total) / seen, seen

    def _last_good(self) -> str:
        if self.state.epoch == 0:
            return "none (no epoch finished)"
        return f"{self.run.last} (epoch {self.state.epoch})"

    def evaluate_validation(self) -> Evaluation:
        """Loss and metrics of the current model on the protocol's validation part, as
        after every epoch (in this process alone, with all its threads: shared with the
        helper process it was no faster)."""
        return evaluate_loader(
            self.model, self.val_loader, self.splits.val, self.loss_fn, self.device, self.amp
        )

    def _validate(self, epoch: int) -> Evaluation:
        evaluation = self.evaluate_validation()
        if not math.isfinite(evaluation.loss):
            raise TrainingDiverged(
                f"non-finite validation loss ({evaluation.loss}) after epoch {epoch}; stopped. "
                f"The last good state is {self._last_good()}"
            )
        return evaluation

    def run_epochs(self, on_epoch_end: EpochCallback | None) -> None:
        counts = ", ".join(f"{k} {v}" for k, v in self.splits.counts().items())
        self.progress.line(
            f"{self.config.model.name} on {self.prepared.name}: {self.splits.protocol} protocol "
            f"({self.splits.selection}; selection on {self.splits.val_source}), {counts}; "
            f"device {self.device}, {self._arrangement()}; run folder {self.run.root}"
        )
        for epoch in range(self.state.epoch + 1, self.config.epochs + 1):
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            train_loss, images = self.train_epoch(epoch)
            train_seconds = time.perf_counter() - started
            self.scheduler.step()
            row: dict = {"epoch": epoch, "train_loss": train_loss, "lr": lr, "val_loss": None}
            validate = epoch % self.config.val_interval == 0 or epoch == self.config.epochs
            evaluation = self._validate(epoch) if validate else None
            if evaluation is not None:
                row["val_loss"] = evaluation.loss
                row.update(epoch_metrics(evaluation.metrics.results()))
            row["seconds"] = time.perf_counter() - started
            row["images_per_second"] = images / train_seconds
            self.state.epoch = epoch
            self.state.train_seconds += row["seconds"]
            self.state.history.append(row)
            if evaluation is not None and evaluation.loss < self.state.best_loss:
                self.state.best_loss, self.state.best_epoch = evaluation.loss, epoch
                save_checkpoint(self.run.best, self._payload(full=False))
            save_checkpoint(self.run.last, self._payload(full=True))
            write_rows_csv(self.run.history, self.state.history, HISTORY_COLUMNS)
            mean_seconds = self.state.train_seconds / len(self.state.history)
            self.progress.epoch_line(row, mean_seconds * (self.config.epochs - epoch))
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)

    def finish(self) -> dict:
        """Evaluate best.pt on the protocol's test part and write the final files."""
        best = load_model(self.run.best).model.to(self.device)
        loader = make_split_loader(self.config, self.prepared, self.splits.test, train=False)
        evaluation = evaluate_loader(
            best, loader, self.splits.test, self.loss_fn, self.device, self.amp, compute_hd95=True
        )
        document = metrics_document(evaluation, self.splits, "test", self.config.model)
        document.update(
            best_epoch=self.state.best_epoch,
            train_seconds=round(self.state.train_seconds, 3),
            epochs=self.state.epoch,
            checkpoint="checkpoints/best.pt",
        )
        return write_evaluation(
            self.run, evaluation, document, best, self.prepared, self.splits.test, self.config,
            self.device,
        )  # fmt: skip


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool | None = None,
    *,
    restart: bool = False,
    on_epoch_end: EpochCallback | None = None,
    on_step_end: StepCallback | None = None,
    threads: int | None = None,
    pipeline: str = "auto",
    processes: int | None = None,
) -> dict:
    """Train ``config`` into ``run_dir`` and return the final metrics (also metrics.json).

    ``resume`` continues the run the folder holds (same configuration but for
    ``epochs``, ``device``, ``num_workers`` and ``data_root``); ``restart`` discards it
    first; with neither, a folder holding a run is refused. ``progress``: tqdm bars
    (True), epoch lines only (False), or bars when stderr is a terminal (None).
    ``on_epoch_end(epoch, history_row)`` runs after each epoch's checkpoints are written,
    ``on_step_end(trainer, loss)`` after each optimisation step. ``threads``: torch
    threads on CPU; None follows the cores other processes leave free
    (:class:`egeunet.threads.AdaptiveThreads`). ``pipeline``: where batches are built
    (:func:`~egeunet.engine.protocols.resolve_pipeline`). Raises
    :class:`TrainingDiverged` on a non-finite loss, and
    :class:`~egeunet.fileio.FolderBusy` (a ValueError) while another process trains in
    ``run_dir``.
    """
    if resume and restart:
        raise ValueError("give resume or restart, not both")
    run = RunFolder(Path(run_dir))
    require_writable(run.root, "run folder")
    with folder_lock(run.lock, f"run folder {run.root}"):
        run.remove_temporaries()
        trainer = Trainer(
            config, run_dir, progress, threads, pipeline, on_step_end=on_step_end,
            processes=processes,
        )  # fmt: skip
        try:
            trainer.start(resume, restart=restart)
            if resume and trainer.state.epoch >= config.epochs and trainer.run.metrics.is_file():
                return json.loads(trainer.run.metrics.read_text(encoding="utf-8"))
            trainer.run_epochs(on_epoch_end)
            trainer.close()
            return trainer.finish()
        finally:
            trainer.close()


IF_EXISTS = ("resume", "restart")
"""What :func:`train_run` does with a run the folder already holds."""


def train_run(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    if_exists: str = "resume",
    *,
    progress: bool | None = None,
    threads: int | None = None,
) -> dict:
    """:func:`train` for a folder that may hold a run already, as the 03_train notebook
    runs it: ``if_exists="resume"`` continues that run (or returns its metrics when it
    has finished; a run with other settings is refused, naming them), ``"restart"``
    deletes it and trains from scratch. An empty folder starts a run either way."""
    if if_exists not in IF_EXISTS:
        raise ValueError(
            f"if_exists: expected resume (continue the run in the folder) or restart "
            f"(delete it and start over), got {if_exists!r}"
        )
    resume = if_exists == "resume" and RunFolder(Path(run_dir)).last.is_file()
    return train(
        config,
        run_dir,
        resume=resume,
        restart=if_exists == "restart",
        progress=progress,
        threads=threads or None,
    )
