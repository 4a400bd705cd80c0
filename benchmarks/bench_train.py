"""Training and inference speed of EGE-UNet on this machine; prints figures, asserts nothing.

    python benchmarks/bench_train.py [--data-root DIR] [--batches 25] [--repeats 3] [--threads N]

Figures, at 256x256 and batch 8 unless told otherwise:

* whole pipeline: the engine's own training epoch (cached uint8 data, normalisation,
  augmentation, forward, loss, backward, AdamW step) on ISIC 2017 prepared from
  ``<repo>/../shared/data/isic2017`` (or ``--data-root``), else on the synthetic set;
* forward + backward + step alone, on one fixed batch;
* inference latency per image at batch 1 and batch 8 (eval mode, inference_mode);
* torch's thread count and the load average, since other processes on a small machine
  change every figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ISIC2017 = REPO.parent / "shared" / "data" / "isic2017"


def _best_rate(run, images_per_call: int, calls: int, repeats: int) -> float:
    """Images per second of the fastest of ``repeats`` timings of ``calls`` calls."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            run()
        best = max(best, images_per_call * calls / (time.perf_counter() - started))
    return best


def whole_pipeline(
    data_root: Path | None, batches: int, size: int, batch_size: int, repeats: int
) -> tuple[str, list[float]]:
    """Images per second of ``repeats`` timed training epochs of ``batches`` batches each,
    after one warm-up epoch."""
    from egeunet.engine import TrainConfig, Trainer

    dataset = "isic2017" if data_root is not None else "synthetic"
    config = TrainConfig(
        dataset=dataset,
        data_root=str(data_root) if data_root else None,
        image_size=size,
        batch_size=batch_size,
        epochs=repeats + 1,
        max_train_images=batches * batch_size,
        max_eval_images=batch_size,
        device="cpu",
    )
    rates = []
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, run_dir, progress=False)
        trainer.train_epoch(1)  # warm-up: first-call allocations, page cache
        for epoch in range(2, repeats + 2):
            started = time.perf_counter()
            _, images = trainer.train_epoch(epoch)
            rates.append(images / (time.perf_counter() - started))
    return f"{dataset} ({len(trainer.prepared)} prepared images)", rates


def model_only(size: int, batch_size: int, calls: int) -> float:
    from egeunet.losses import DeepSupervisionLoss
    from egeunet.model import EGEUNet

    torch.manual_seed(0)
    model = EGEUNet()
    loss_fn = DeepSupervisionLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    images = torch.rand(batch_size, 3, size, size) * 255
    masks = (torch.rand(batch_size, 1, size, size) > 0.5).float()

    def step() -> None:
        loss = loss_fn(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    return _best_rate(step, batch_size, calls, repeats=3)


def inference_ms_per_image(size: int, batch_size: int, calls: int) -> float:
    from egeunet.model import EGEUNet

    model = EGEUNet().eval()
    images = torch.rand(batch_size, 3, size, size) * 255

    def run() -> None:
        with torch.inference_mode():
            model(images)

    run()
    return 1000.0 / _best_rate(run, batch_size, calls, repeats=3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root", type=Path, help="ISIC 2017 folder (default: shared data if present)"
    )
    parser.add_argument(
        "--batches", type=int, default=25, help="batches timed for the whole pipeline"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of the whole pipeline")
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads (default: torch's choice)"
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_root = args.data_root or (DEFAULT_ISIC2017 if DEFAULT_ISIC2017.is_dir() else None)
    size, batch = args.image_size, args.batch_size

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    data, rates = whole_pipeline(data_root, args.batches, size, batch, args.repeats)
    print(
        f"training, whole pipeline on {data}, {size}x{size}, batch {batch}: "
        f"{statistics.median(rates):.1f} images/s (median of {len(rates)} epochs of "
        f"{args.batches} batches; min {min(rates):.1f}, max {max(rates):.1f})"
    )
    rate = model_only(size, batch, calls=max(3, args.batches // 5))
    print(f"training, forward+backward+step alone, batch {batch}: {rate:.1f} images/s")
    for inference_batch in (1, 8):
        ms = inference_ms_per_image(size, inference_batch, calls=10)
        print(f"inference latency, batch {inference_batch}: {ms:.1f} ms/image")
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
