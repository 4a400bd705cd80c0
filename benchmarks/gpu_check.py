"""The GPU check: one prepared command for a machine with a CUDA GPU; prints figures.

    python benchmarks/gpu_check.py --data data/gpu-bundle/isic2017 --out OUT
        [--epochs 300] [--concurrent 4] [--device cuda] [--timed-batches 100]

1. Throughput of one run: the whole training pipeline with the device-resident batches
   (``pipeline="device"``), ISIC 2017 paper split, 256x256, batch 8; images/s of a timed
   stretch after a warm-up epoch.
2. Throughput of ``--concurrent`` runs sharing the one GPU, each in its own process (as
   ``egeunet study --workers N`` places them): the sum of their images/s.
3. The ``paper``-protocol ISIC 2017 EGE-UNet run, seed 42, ``--epochs`` epochs end to end;
   its compact evidence (config.json, history.csv, metrics.json, per_image.csv) and the
   log go to ``--out`` (files only, at most two folders deep, for the device tool).

``benchmarks/gpu_check.sh`` runs the GPU tests, then this. With ``--device cpu`` and
small numbers it runs anywhere (how it is tested without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

EVIDENCE = ("config.json", "history.csv", "metrics.json", "per_image.csv")


def _config(args: argparse.Namespace, epochs: int, seed: int = 42):
    from egeunet.engine import TrainConfig

    return TrainConfig(
        dataset=args.dataset,
        data_root=str(args.data),
        protocol="paper",
        image_size=args.image_size,
        epochs=epochs,
        seed=seed,
        device=args.device,
        max_train_images=args.max_train_images,
        max_eval_images=args.max_eval_images,
    )


def throughput(args: argparse.Namespace, seed: int = 42) -> float:
    """Images/s of ``--timed-batches`` training batches after one warm-up epoch."""
    from egeunet.engine import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(_config(args, epochs=3, seed=seed), run_dir, False, pipeline="device")
        trainer.train_epoch(1)
        trainer.model.train()
        seen, started = 0, None
        while seen < args.timed_batches * trainer.config.batch_size:
            for images, masks in trainer.train_loader:
                if started is None:
                    _synchronize(trainer.device)
                    started = time.perf_counter()
                loss = trainer.loss_fn(trainer.model(images), masks)
                trainer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                trainer.optimizer.step()
                seen += len(images)
                if seen >= args.timed_batches * trainer.config.batch_size:
                    break
        _synchronize(trainer.device)
        return seen / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def concurrent_throughput(args: argparse.Namespace) -> list[float]:
    command = [sys.executable, __file__, "--throughput-only", *sys.argv[1:]]
    processes = [
        subprocess.Popen(
            [*command, "--seed", str(42 + n)], stdout=subprocess.PIPE, text=True, env=os.environ
        )
        for n in range(args.concurrent)
    ]
    rates = []
    for process in processes:
        out, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"a concurrent run failed (exit {process.returncode})")
        rates.append(float(out.strip().splitlines()[-1]))
    return rates


def full_run(args: argparse.Namespace) -> dict:
    from egeunet.engine import train

    run_dir = Path(tempfile.mkdtemp(prefix="gpu-check-run-"))
    started = time.perf_counter()
    metrics = train(_config(args, epochs=args.epochs), run_dir, progress=False, pipeline="device")
    seconds = time.perf_counter() - started
    for name in EVIDENCE:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, args.out / name)
    return {
        "seconds": seconds,
        "pooled": metrics.get("pooled"),
        "best_epoch": metrics.get("best_epoch"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="ISIC 2017 folder (archive layout)"
    )
    parser.add_argument("--dataset", default="isic2017", help="isic2017 or isic2018")
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--timed-batches", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--max-train-images", type=int, default=None)
    parser.add_argument("--max-eval-images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    parser.add_argument("--throughput-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.throughput_only:
        print(throughput(args, seed=args.seed))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}", flush=True)
    one = throughput(args)
    print(f"one run, device pipeline, batch 8: {one:.0f} images/s", flush=True)
    if args.concurrent > 1:
        rates = concurrent_throughput(args)
        print(
            f"{args.concurrent} runs sharing the device: {sum(rates):.0f} images/s in all "
            f"({', '.join(f'{r:.0f}' for r in rates)})",
            flush=True,
        )
    result = full_run(args)
    print(
        f"paper-protocol {args.dataset} run, {args.epochs} epochs: {result['seconds'] / 60:.1f} min; "
        f"best epoch {result['best_epoch']}; pooled {json.dumps(result['pooled'])}",
        flush=True,
    )
    (args.out / "gpu_check.json").write_text(
        json.dumps({"one_run_images_per_s": one, **result}, indent=2, default=str)
    )


if __name__ == "__main__":
    main()
