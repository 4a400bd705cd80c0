"""Inference latency of the exported ONNX model in ONNX Runtime beside PyTorch's, on this
CPU; prints figures, asserts nothing.

    python benchmarks/bench_onnx.py [--size 256] [--calls 10] [--threads N]

The published model (random weights: latency does not depend on them) is exported with
``egeunet export``'s code to a temporary file; both runtimes get the same thread count and
the same inputs, batch 1 and 8, and report the best of three timings of ``--calls`` calls
in ms per image. PyTorch's figures are bench_train's own (eval mode, inference_mode): our
model, and the baseline (the published formulas in plain PyTorch, NCHW) that every ratio
is taken against.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnxruntime
import torch
from bench_train import _best_rate, inference_ms_per_image

from egeunet.checkpoint import model_payload, save_checkpoint
from egeunet.export import OnnxBackend, export_onnx
from egeunet.model import EGEUNet


def onnx_ms_per_image(backend: OnnxBackend, size: int, batch_size: int, calls: int) -> float:
    images = torch.rand(batch_size, 3, size, size) * 255
    backend.probabilities(images)  # warm-up: ONNX Runtime plans memory on the first run
    return 1000.0 / _best_rate(lambda: backend.probabilities(images), batch_size, calls, 3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--calls", type=int, default=10, help="calls per timing")
    parser.add_argument("--threads", type=int, help="threads of both runtimes (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "random.pt"
        config = {"image_size": args.size, "normalization": "minmax"}
        save_checkpoint(checkpoint, model_payload(EGEUNet().eval(), train_config=config))
        export_onnx(checkpoint, Path(folder) / "model.onnx")
        backend = OnnxBackend(Path(folder) / "model.onnx", threads=threads)
        print(
            f"ONNX Runtime {onnxruntime.__version__} vs PyTorch {torch.__version__}, "
            f"{threads} thread(s), {args.size}x{args.size}, published model"
        )
        for batch_size in (1, 8):
            baseline_ms = inference_ms_per_image(args.size, batch_size, args.calls, baseline=True)
            torch_ms = inference_ms_per_image(args.size, batch_size, args.calls, baseline=False)
            onnx_ms = onnx_ms_per_image(backend, args.size, batch_size, args.calls)
            print(
                f"inference latency, batch {batch_size}: baseline {baseline_ms:.1f} ms/image, "
                f"PyTorch {torch_ms:.1f} ms/image ({torch_ms / baseline_ms:.2f}x the "
                f"baseline), ONNX Runtime {onnx_ms:.1f} ms/image ({onnx_ms / baseline_ms:.2f}x "
                f"the baseline, {onnx_ms / torch_ms:.2f}x PyTorch)"
            )


if __name__ == "__main__":
    main()
