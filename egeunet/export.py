"""``egeunet export``: the model as an ONNX file, and ONNX Runtime as a backend of predict.

:func:`export_onnx` traces the model of ``egeunet/model.py`` (no second definition) with
PyTorch's TorchScript-based ONNX exporter, in inference mode (plain tensor ops; the
training-only autograd Functions and fused kernels stay out of the graph). The file has:

* input ``input``: float32 ``(batch, 3, height, width)``, RGB, height and width any
  multiples of 32 (batch, height and width are dynamic), scaled as the metadata says;
* output ``probability``: float32 ``(batch, num_classes, height, width)``, the sigmoid of
  the final map's logits (channel 0 is the lesion);
* metadata (``metadata_props``, keys ``egeunet.*``): the output kind, the input scaling
  in words and by name (``egeunet.normalization``), the size the model was trained at, the
  size multiple, the default threshold, the model config and the source checkpoint's
  SHA-256.

:class:`OnnxBackend` runs such a file in ONNX Runtime on the CPU with predict's own
preprocessing; its probabilities agree with PyTorch's within 1e-4 (tests/test_export.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from egeunet.backends import (
    INPUT_NAME,
    ONNX_FORMAT,
    OUTPUT_NAME,
    OnnxBackend,
    TorchBackend,
    metadata_key,
    model_input_settings,
)
from egeunet.checkpoint import SHIPPED_WEIGHTS, load_model, resolve_weights
from egeunet.data import normalize
from egeunet.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from egeunet.fileio import atomic_open, require_writable, sha256_file
from egeunet.metrics import THRESHOLD
from egeunet.model import SIZE_MULTIPLE, fused_kernels, is_image_size

ONNX_OPSET = 17
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
INPUT_SCALING = {
    "minmax": "per image, over all three channels: (x - min) * 255 / (max - min) of the "
    "RGB pixels 0..255 (an image of one value gives zeros)",
    "imagenet": f"per channel: (x / 255 - mean) / std with mean {IMAGENET_MEAN} and std "
    f"{IMAGENET_STD}, of the RGB pixels 0..255",
}
RESIZING = (
    "resize the RGB image to image_size x image_size with an antialiased bilinear filter "
    "(PIL's Image.BILINEAR) before scaling; resize the probabilities back bilinearly "
    "(align_corners=False) and threshold them"
)


class ProbabilityOutput(nn.Module):
    """The model's final map as probabilities: what the ONNX file computes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.model(x)[0])


@contextlib.contextmanager
def _fused_kernels_off() -> Iterator[None]:
    """The compiled LayerNorm kernels off while tracing; restored afterwards."""
    was_enabled = fused_kernels.enabled
    fused_kernels.enable(False)
    try:
        yield
    finally:
        fused_kernels.enable(was_enabled)


def check_size(size: int) -> int:
    """``size`` if it is a positive multiple of 32, else ValueError naming ``--size``."""
    if not is_image_size(size):
        raise ValueError(f"--size: expected a positive multiple of {SIZE_MULTIPLE}, got {size!r}")
    return size


def onnx_metadata(
    source: Path, image_size: int, normalization: str, model_config: dict
) -> dict[str, str]:
    """The ``metadata_props`` an exported file carries (every value a string)."""
    return {
        metadata_key("format"): ONNX_FORMAT,
        metadata_key("output"): "probability",
        metadata_key("output_description"): "sigmoid of the final map's logits, "
        "(batch, num_classes, height, width); channel 0 is the lesion",
        metadata_key("input_description"): "float32 (batch, 3, height, width), RGB, height "
        f"and width multiples of {SIZE_MULTIPLE}",
        metadata_key("normalization"): normalization,
        metadata_key("input_scaling"): INPUT_SCALING[normalization],
        metadata_key("resizing"): RESIZING,
        metadata_key("image_size"): str(image_size),
        metadata_key("size_multiple"): str(SIZE_MULTIPLE),
        metadata_key("threshold"): str(THRESHOLD),
        metadata_key("model_config"): json.dumps(model_config),
        metadata_key("source"): source.name,
        metadata_key("source_sha256"): sha256_file(source),
    }


def export_onnx(
    weights: str | os.PathLike,
    out: str | os.PathLike,
    size: int | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write the model of ``weights`` (a checkpoint file or shipped name) to ``out`` as
    ONNX (see the module docstring); returns the metadata written. ``size`` is the side of
    the example traced (default: the size the model was trained at); the file accepts any
    multiple of 32. An existing ``out`` is replaced only with ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace it")
    require_writable(out.parent, "output folder")
    source = resolve_weights(weights)
    loaded = load_model(source)
    trained_size, normalization = model_input_settings(loaded, source)
    size = check_size(trained_size if size is None else size)
    model = ProbabilityOutput(loaded.model.to(memory_format=torch.contiguous_format)).eval()
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    buffer = io.BytesIO()
    with torch.no_grad(), _fused_kernels_off(), warnings.catch_warnings():
        # The model's input checks read shapes as Python values (TracerWarning): they
        # guard the input and never change the graph. The TorchScript exporter is
        # deprecated in favour of torch.export, which takes minutes on this model.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: DYNAMIC_AXES, OUTPUT_NAME: DYNAMIC_AXES},
        )
    import onnx

    proto = onnx.load_from_string(buffer.getvalue())
    metadata = onnx_metadata(source, trained_size, normalization, loaded.model.config.to_dict())
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = (
        f"EGE-UNet lesion segmentation ({loaded.model.config.name}), exported by egeunet "
        f"from {source.name}: see the egeunet.* metadata for input scaling and output"
    )
    onnx.checker.check_model(proto)
    with atomic_open(out, "wb") as handle:
        handle.write(proto.SerializeToString())
    return metadata


def check_image(size: int) -> np.ndarray:
    """A smooth (size, size, 3) uint8 picture of a dark oval on skin tones, for a check
    that needs no data."""
    rows, columns = np.mgrid[0:size, 0:size] / size
    inside = ((rows - 0.55) / 0.3) ** 2 + ((columns - 0.45) / 0.22) ** 2 < 1
    base = np.stack([215 - 30 * rows, 170 - 20 * columns, 150 + 0 * rows], axis=-1)
    base[inside] = base[inside] * 0.45
    return base.round().astype(np.uint8)


def largest_difference(onnx_file: str | os.PathLike, weights: str | os.PathLike) -> float:
    """Largest difference between the probabilities ONNX Runtime and PyTorch give for
    :func:`check_image` at the model's input size."""
    onnx_backend = OnnxBackend(onnx_file)
    torch_backend = TorchBackend(weights, "cpu")
    pixels = torch.from_numpy(check_image(onnx_backend.size)).permute(2, 0, 1)
    batch = normalize(pixels, onnx_backend.normalization)[None]
    with torch.inference_mode():
        difference = onnx_backend.probabilities(batch) - torch_backend.probabilities(batch)
    return float(difference.abs().max())


def run_export(args: argparse.Namespace) -> int:
    metadata = export_onnx(args.weights, args.out, args.size, args.overwrite)
    difference = largest_difference(args.out, args.weights)
    size = metadata[metadata_key("image_size")]
    print(
        f"wrote {args.out}: input {INPUT_NAME} float32 (batch, 3, height, width), height and "
        f"width multiples of {SIZE_MULTIPLE} (trained at {size}); output {OUTPUT_NAME} "
        f"(lesion probabilities)\n"
        f"input scaling ({metadata[metadata_key('normalization')]}): "
        f"{metadata[metadata_key('input_scaling')]}\n"
        f"ONNX Runtime vs PyTorch on a test image: largest probability difference "
        f"{difference:.1e}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model for deployment without PyTorch (ONNX)",
        description="Write the model of a checkpoint as an ONNX file: dynamic batch and "
        "image size (multiples of 32), lesion probabilities out, input scaling and the "
        "rest of the preprocessing in its metadata. Run it with "
        "`egeunet predict --onnx FILE` or any ONNX runtime.",
    )
    parser.add_argument(
        "--weights",
        required=True,
        help="a checkpoint file, or shipped weights: " + ", ".join(SHIPPED_WEIGHTS),
    )
    parser.add_argument("--format", choices=("onnx",), default="onnx", help="(default onnx)")
    parser.add_argument("--out", required=True, help="the file to write, e.g. model.onnx")
    parser.add_argument(
        "--size",
        type=int,
        help="side of the example traced (default: the size the model was trained at); "
        "the file takes any multiple of 32",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(func=run_export)
