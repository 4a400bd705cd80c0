"""Data benchmarks; prints figures (run: ``python benchmarks/bench_data.py``).

1. Preparing the 2150 ISIC 2017 pairs of ../shared/data from scratch (target: < 30 s on
   2 cores), and the no-op rerun.
2. Generating the default synthetic dataset (260 images at 256 px).
3. The share of a training epoch spent waiting for data while a real EGE-UNet trains on
   augmented batches of 8 at 256 px (target: < 10 %), for 0 and 2 loader workers.

Options: ``--data PATH`` (default: ../shared/data beside the repository), ``--batches N``
(training steps measured per setting, default 12), ``--isic2018`` to also time the 2594
ISIC 2018 pairs at 512x512, ``--skip-loader`` to leave out the (slow) training part.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from egeunet.data import PreparedDataset, SegmentationDataset, make_loader, prepare_dataset
from egeunet.model import EGEUNet

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--isic2018", action="store_true")
    parser.add_argument("--skip-loader", action="store_true")
    args = parser.parse_args()
    if not (args.data / "isic2017").is_dir():
        print(f"no ISIC 2017 data at {args.data}", file=sys.stderr)
        return 2
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as scratch:
        prepared = bench_prepare(args.data, Path(scratch), args.isic2018)
        bench_synthetic(Path(scratch))
        for workers in () if args.skip_loader else (0, 2):
            bench_loader_wait(prepared, workers, args.batches)
    return 0


def bench_prepare(data: Path, scratch: Path, with_isic2018: bool) -> PreparedDataset:
    out = scratch / "isic2017-256"
    for workers in (1, None):
        target = out if workers is None else scratch / "isic2017-256-single"
        started = time.perf_counter()
        prepare_dataset("isic2017", data, target, 256, num_workers=workers)
        label = "1 thread" if workers == 1 else f"{min(8, os.cpu_count() or 1)} threads"
        print(
            f"prepare isic2017 (2150 pairs, 256 px, {label}): {time.perf_counter() - started:.2f} s"
        )
    started = time.perf_counter()
    prepare_dataset("isic2017", data, out, 256)
    print(f"prepare isic2017 rerun on unchanged input: {time.perf_counter() - started:.3f} s")
    if with_isic2018:
        started = time.perf_counter()
        prepare_dataset("isic2018", data, scratch / "isic2018-256", 256)
        print(
            f"prepare isic2018 (2594 pairs from 512x512, 256 px): {time.perf_counter() - started:.2f} s"
        )
    return PreparedDataset(out)


def bench_synthetic(scratch: Path) -> None:
    started = time.perf_counter()
    prepare_dataset("synthetic", None, scratch / "synthetic", 256)
    print(f"generate + cache synthetic (260 images, 256 px): {time.perf_counter() - started:.2f} s")


def bench_loader_wait(prepared: PreparedDataset, workers: int, batches: int) -> None:
    """Train for ``batches`` steps; time spent in ``next(loader)`` versus the whole step."""
    torch.manual_seed(0)
    ids = prepared.split("paper")["train"]
    loader = make_loader(
        SegmentationDataset(prepared, ids, augment=True), 8, True, seed=0, num_workers=workers
    )
    model = EGEUNet()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    batches_iter = iter(loader)
    next(batches_iter)  # start-up (worker spawn) is not part of the steady state
    waited = total = 0.0
    for _ in range(batches):
        step_start = time.perf_counter()
        images, masks = next(batches_iter)
        waited += time.perf_counter() - step_start
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images)[0], masks)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        total += time.perf_counter() - step_start
    print(
        f"loader wait share, {workers} workers, {batches} steps of batch 8 at 256 px: "
        f"{100 * waited / total:.1f} % ({1000 * waited / batches:.1f} ms wait, "
        f"{1000 * total / batches:.0f} ms per step)"
    )


if __name__ == "__main__":
    sys.exit(main())
