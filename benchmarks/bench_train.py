"""Training and inference speed of EGE-UNet on this machine, as ratios to a baseline measured
in the same run; prints figures, asserts nothing.

    python benchmarks/bench_train.py [--data-root DIR] [--batches 25] [--repeats 3]
                                     [--threads N] [--skip-aggregate] [--skip-contention]

Absolute images/s differ two- to three-fold between machines of the same nominal kind, so
every figure is also given as a ratio to the **baseline**: a plain-PyTorch implementation
of the published formulas (NCHW layout, autograd through the written-out channel
LayerNorm, ``F.binary_cross_entropy_with_logits``, ``F.interpolate`` for the side maps,
per-tensor AdamW), its forward + backward + AdamW step alone on one fixed batch
(8 x 256 x 256), no data loading. Figures:

* baseline: that step, and its eval-mode latency at batch 1;
* whole pipeline: the engine's own training epoch (cached uint8 data, normalisation,
  augmentation, forward, loss, backward, AdamW step) on ISIC 2017 prepared from
  ``<repo>/../shared/data/isic2017`` (or ``--data-root``), else on the synthetic set, in
  the trainer's default arrangement (with 2 or more threads: two processes sharing every
  step, ``egeunet.engine.parallel``) and in one process with every thread;
* our forward + backward + step alone (same batch as the baseline);
* a study's aggregate: two whole pipelines side by side, one thread each, in two
  processes (how ``egeunet study`` runs on a 2-core machine);
* evaluation: the trainer's evaluation pass after an epoch (no autograd) over up to 650
  images, in both arrangements;
* inference latency per image at batch 1 and 8 (eval mode, inference_mode);
* contention: the whole pipeline while a busy-loop process (started and stopped here)
  keeps one core busy, in the trainer's default arrangement, in one process with its
  adaptive threads and in one process with 2 fixed threads, against one thread on an
  idle core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ISIC2017 = REPO.parent / "shared" / "data" / "isic2017"
# Spins until its parent is gone, so a benchmark killed mid-way leaves no busy process.
BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"


def _best_rate(run, images_per_call: int, calls: int, repeats: int) -> float:
    """Images per second of the fastest of ``repeats`` timings of ``calls`` calls."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            run()
        best = max(best, images_per_call * calls / (time.perf_counter() - started))
    return best


@contextlib.contextmanager
def published_baseline():
    """The model and loss as the published code computes them: written-out LayerNorm with
    autograd, ATen's BCE, ATen's bilinear resize of the side maps, NCHW layout (set by the
    caller on the model), no fused kernels."""
    from egeunet import losses
    from egeunet import model as model_module
    from egeunet.model import ChannelLayerNorm, fused_kernels

    def written_out(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]

    was_enabled = fused_kernels.enabled
    fused_kernels.enable(False)
    try:
        with (
            mock.patch.object(ChannelLayerNorm, "forward", written_out),
            mock.patch.object(losses, "bce_dice", losses.bce_dice_written_out),
            mock.patch.object(model_module, "_upsample_side_map", model_module._resize),
        ):
            yield
    finally:
        fused_kernels.enable(was_enabled)


def _model(baseline: bool):
    from egeunet.model import EGEUNet

    torch.manual_seed(0)
    model = EGEUNet()
    if baseline:
        model.to(memory_format=torch.contiguous_format)
    return model


def step_rate(size: int, batch_size: int, calls: int, baseline: bool) -> float:
    """Forward + backward + AdamW step alone on one fixed batch, images/s."""
    from egeunet.losses import DeepSupervisionLoss
    from egeunet.model import fused_kernels

    model = _model(baseline)
    loss_fn = DeepSupervisionLoss()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-3, weight_decay=1e-2, foreach=not baseline
    )
    images = torch.rand(batch_size, 3, size, size) * 255
    masks = (torch.rand(batch_size, 1, size, size) > 0.5).float()

    def step() -> None:
        loss = loss_fn(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    context = published_baseline() if baseline else contextlib.nullcontext()
    with context:
        if not baseline:
            fused_kernels.enable()
        step()
        step()
        return _best_rate(step, batch_size, calls, repeats=3)


def inference_ms_per_image(size: int, batch_size: int, calls: int, baseline: bool) -> float:
    model = _model(baseline).eval()
    images = torch.rand(batch_size, 3, size, size) * 255

    def run() -> None:
        with torch.inference_mode():
            model(images)

    with published_baseline() if baseline else contextlib.nullcontext():
        run()
        return 1000.0 / _best_rate(run, batch_size, calls, repeats=3)


def _trainer(
    data_root: Path | None, batches: int, size: int, batch_size: int, run_dir: str,
    processes: int | None,
):  # fmt: skip
    from egeunet.engine import TrainConfig, Trainer

    config = TrainConfig(
        dataset="isic2017" if data_root is not None else "synthetic",
        data_root=str(data_root) if data_root else None,
        image_size=size,
        batch_size=batch_size,
        epochs=100,
        max_train_images=batches * batch_size,
        device="cpu",
    )
    threads = None if os.environ.get("BENCH_THREADS") is None else int(os.environ["BENCH_THREADS"])
    return Trainer(config, run_dir, progress=False, threads=threads, processes=processes)


def whole_pipeline(
    data_root: Path | None, batches: int, size: int, batch_size: int, repeats: int,
    processes: int | None = None,
) -> dict:  # fmt: skip
    """Images/s of ``repeats`` timed training epochs of ``batches`` batches each, after one
    warm-up epoch (compilation, first-call allocations, page cache), and of one evaluation
    pass over the protocol's validation part (with the paper protocol on ISIC 2017: the
    650 test images, evaluated after every epoch), after one warm-up pass. ``processes``:
    the trainer's (None: its default, a helper process where it has 2 or more threads)."""
    rates = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = _trainer(data_root, batches, size, batch_size, run_dir, processes)
        trainer.train_epoch(1)
        for epoch in range(2, repeats + 2):
            started = time.perf_counter()
            _, images = trainer.train_epoch(epoch)
            rates.append(images / (time.perf_counter() - started))

        def evaluation_pass() -> float:
            started = time.perf_counter()
            trainer.evaluate_validation()
            return len(trainer.splits.val) / (time.perf_counter() - started)

        evaluation_pass()  # the first compiles the evaluation kernels, as epoch 1 of a run does
        eval_rate = evaluation_pass()
        trainer.close()
    return {
        "data": f"{trainer.prepared.name} ({len(trainer.prepared)} prepared images)",
        "rates": rates,
        "median": statistics.median(rates),
        "eval_rate": eval_rate,
        "eval_images": len(trainer.splits.val),
        "threads_at_end": torch.get_num_threads(),
        "processes": trainer.processes,
        "thread_changes": trainer.threads.changes,
    }


def pipeline_in_subprocesses(
    args: argparse.Namespace,
    data_root: Path | None,
    count: int,
    threads: int | None,
    processes: int | None = None,
) -> list[dict]:
    """``count`` whole pipelines at once, each in its own process with ``threads`` threads
    (None: the trainer's adaptive threads) and the trainer's ``processes``."""
    command = [sys.executable, __file__, "--pipeline-only", "--batches", str(args.batches)]
    command += ["--repeats", str(args.repeats), "--image-size", str(args.image_size)]
    command += ["--batch-size", str(args.batch_size)]
    command += ["--data-root", str(data_root)] if data_root else ["--synthetic"]
    environment = {k: v for k, v in os.environ.items() if k != "BENCH_THREADS"}
    if threads is None:
        environment["EGEUNET_ADAPTIVE_THREADS"] = "1"
    else:
        environment.update(BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    environment.pop("EGEUNET_PROCESSES", None)
    if processes is not None:
        environment["EGEUNET_PROCESSES"] = str(processes)
    children = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environment)
        for _ in range(count)
    ]
    results = []
    for process in children:
        out, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"benchmark subprocess failed (exit {process.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@contextlib.contextmanager
def busy_core():
    """A process spinning on one core for the duration of the block."""
    process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(1.0)
        yield
    finally:
        process.kill()
        process.wait()


def _ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root", type=Path, help="ISIC 2017 folder (default: shared data if present)"
    )
    parser.add_argument(
        "--batches", type=int, default=25, help="batches per timed whole-pipeline epoch"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of the whole pipeline")
    parser.add_argument(
        "--threads", type=int, help="torch threads of the single-run figures (default: all)"
    )
    parser.add_argument("--synthetic", action="store_true", help="the synthetic set, not ISIC")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-aggregate", action="store_true", help="no side-by-side runs")
    parser.add_argument("--skip-contention", action="store_true", help="no busy-core figures")
    parser.add_argument("--pipeline-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data_root = args.data_root or (DEFAULT_ISIC2017 if DEFAULT_ISIC2017.is_dir() else None)
    if args.synthetic:
        data_root = None
    size, batch = args.image_size, args.batch_size
    if args.pipeline_only:  # one side of the aggregate or contention figures, as JSON
        result = whole_pipeline(data_root, args.batches, size, batch, args.repeats)
        print(json.dumps({k: v for k, v in result.items() if k != "data"}))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    os.environ["BENCH_THREADS"] = str(threads)  # the single-run figures: fixed threads

    print(f"torch {torch.__version__}, threads {threads}, cpus {os.cpu_count()}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    calls = max(3, args.batches // 5)
    baseline = step_rate(size, batch, calls, baseline=True)
    baseline_ms = inference_ms_per_image(size, 1, calls=10, baseline=True)
    print(
        f"baseline (published formulas, NCHW, plain autograd), forward+backward+step, "
        f"batch {batch}: {baseline:.1f} images/s; eval latency batch 1: {baseline_ms:.1f} ms"
    )
    pipeline = whole_pipeline(data_root, args.batches, size, batch, args.repeats)
    one_process = whole_pipeline(data_root, args.batches, size, batch, args.repeats, processes=1)
    for label, result in (("default", pipeline), ("one process", one_process)):
        rates = result["rates"]
        count = result["processes"]
        each = max(1, threads // count)
        arrangement = (
            f"{count} process{'es' if count > 1 else ''} x {each} thread{'s' if each > 1 else ''}"
        )
        print(
            f"training, whole pipeline ({label}: {arrangement}) on {result['data']}, "
            f"{size}x{size}, batch {batch}: {result['median']:.1f} images/s = "
            f"{_ratio(result['median'], baseline)} baseline (median of {len(rates)} epochs "
            f"of {args.batches} batches; min {min(rates):.1f}, max {max(rates):.1f})"
        )
    ours = step_rate(size, batch, calls, baseline=False)
    print(
        f"training, forward+backward+step alone, batch {batch}: {ours:.1f} images/s = "
        f"{_ratio(ours, baseline)} baseline"
    )
    for label, result in (("default", pipeline), ("one process", one_process)):
        print(
            f"evaluation pass after an epoch ({label}; {result['eval_images']} validation "
            f"images, no autograd): {result['eval_rate']:.1f} images/s = "
            f"{_ratio(result['eval_rate'], baseline)} baseline training rate"
        )
    for inference_batch in (1, 8):
        ms = inference_ms_per_image(size, inference_batch, calls=10, baseline=False)
        relative = f" = {ms / baseline_ms:.2f}x baseline latency" if inference_batch == 1 else ""
        print(f"inference latency, batch {inference_batch}: {ms:.1f} ms/image{relative}")

    if not args.skip_aggregate:
        side_by_side = pipeline_in_subprocesses(args, data_root, count=2, threads=1)
        total = sum(result["median"] for result in side_by_side)
        each = ", ".join(f"{result['median']:.1f}" for result in side_by_side)
        print(
            f"study aggregate, two runs side by side with 1 thread each: {total:.1f} images/s "
            f"({each}) = {_ratio(total, baseline)} baseline; one run: "
            f"{pipeline['median']:.1f}"
        )
    if not args.skip_contention:
        (idle_one,) = pipeline_in_subprocesses(args, data_root, count=1, threads=1)
        with busy_core():
            (default,) = pipeline_in_subprocesses(args, data_root, count=1, threads=None)
            (adaptive,) = pipeline_in_subprocesses(
                args, data_root, count=1, threads=None, processes=1
            )
            (fixed_two,) = pipeline_in_subprocesses(
                args, data_root, count=1, threads=2, processes=1
            )
        print(
            f"contention, one core kept busy by another process: the default "
            f"({default['processes']} processes) {default['median']:.1f} images/s = "
            f"{default['median'] / idle_one['median']:.2f}x one idle core "
            f"({idle_one['median']:.1f}); one process with adaptive threads "
            f"{adaptive['median']:.1f} (ended on {adaptive['threads_at_end']} thread(s)) = "
            f"{adaptive['median'] / idle_one['median']:.2f}x; 2 fixed threads "
            f"{fixed_two['median']:.1f}"
        )
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
