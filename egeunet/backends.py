"""The models ``egeunet predict``, the app and the lesion explorer segment with: a
checkpoint in PyTorch (:class:`TorchBackend`) or an ONNX file from ``egeunet export`` in
ONNX Runtime (:class:`OnnxBackend`, importing onnxruntime only when used). Both take
normalised ``(B, 3, S, S)`` batches, give ``(B, S, S)`` lesion probabilities, and say the
``size`` and ``normalization`` their inputs need.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from egeunet.checkpoint import LoadedModel, load_model, resolve_weights
from egeunet.data.dataset import NORMALIZATIONS
from egeunet.model import SIZE_MULTIPLE, is_image_size

BACKENDS = ("torch", "onnxruntime")
DEFAULT_IMAGE_SIZE = 256
DEFAULT_NORMALIZATION = "minmax"
ONNX_FORMAT = "egeunet-onnx-v1"
INPUT_NAME = "input"
OUTPUT_NAME = "probability"


def metadata_key(name: str) -> str:
    return f"egeunet.{name}"


def resolve_device(name: str) -> torch.device:
    """ "auto" -> CUDA when available, else CPU; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return device


def model_input_settings(loaded: LoadedModel, checkpoint: str | os.PathLike) -> tuple[int, str]:
    """(image size, normalization) the checkpoint's model was trained with (defaults for
    checkpoints that do not say); ValueError naming the checkpoint for unusable values."""
    train_config = loaded.train_config or {}
    size = train_config.get("image_size", DEFAULT_IMAGE_SIZE)
    normalization = train_config.get("normalization", DEFAULT_NORMALIZATION)
    if not is_image_size(size):
        raise ValueError(
            f"checkpoint {checkpoint} has a damaged train config: image_size {size!r} is not "
            f"a positive multiple of {SIZE_MULTIPLE}"
        )
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"checkpoint {checkpoint} has a damaged train config: normalization "
            f"{normalization!r} is not one of {', '.join(NORMALIZATIONS)}"
        )
    return size, normalization


class TorchBackend:
    """A checkpoint's model in PyTorch: lesion probabilities for normalised batches."""

    name = "torch"

    def __init__(self, weights: str | os.PathLike, device: str = "auto") -> None:
        self.source = resolve_weights(weights)
        loaded = load_model(self.source)
        self.size, self.normalization = model_input_settings(loaded, self.source)
        self.device = resolve_device(device)
        self.model = loaded.model.to(self.device)

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, S, S)`` float32 lesion probabilities of a normalised ``(B, 3, S, S)`` batch."""
        return torch.sigmoid(self.model(batch.to(self.device))[0][:, 0].float())


class OnnxBackend:
    """An ONNX file from :func:`export_onnx` in ONNX Runtime (CPU): lesion probabilities for
    normalised batches, like :class:`TorchBackend`."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int = 0) -> None:
        if device not in ("auto", "cpu"):
            raise ValueError(
                f"device: the onnxruntime backend runs on the CPU only, got {device!r}"
            )
        self.source = Path(path)
        if not self.source.is_file():
            raise FileNotFoundError(f"ONNX model {self.source} does not exist")
        try:
            import onnxruntime
        except ImportError:
            raise ValueError(
                "the onnxruntime backend needs the onnxruntime package: pip install onnxruntime"
            ) from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (physical cores)
        options.log_severity_level = 3  # errors only
        try:
            self.session = onnxruntime.InferenceSession(
                str(self.source), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # a foreign or damaged file fails in many ways
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"ONNX model {self.source} could not be read: {first_line}") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.size, self.normalization = self._input_settings()

    def _input_settings(self) -> tuple[int, str]:
        found = self.metadata.get(metadata_key("format"))
        if found != ONNX_FORMAT:
            raise ValueError(
                f"ONNX model {self.source} was not written by `egeunet export` (metadata "
                f"{metadata_key('format')} is {found!r}, not {ONNX_FORMAT!r})"
            )
        size = self.metadata.get(metadata_key("image_size"), "")
        normalization = self.metadata.get(metadata_key("normalization"))
        if (
            not size.isdigit()
            or not is_image_size(int(size))
            or normalization not in NORMALIZATIONS
        ):
            raise ValueError(
                f"ONNX model {self.source} has damaged metadata: image_size {size!r}, "
                f"normalization {normalization!r}"
            )
        return int(size), normalization

    def probabilities(self, batch: Tensor) -> Tensor:
        """``(B, S, S)`` float32 lesion probabilities of a normalised ``(B, 3, S, S)`` batch."""
        pixels = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        (probability,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        return torch.from_numpy(probability[:, 0])


def load_backend(weights: str | os.PathLike, backend: str = "torch", device: str = "auto"):
    """The model to segment with: :class:`TorchBackend` for a checkpoint (file or shipped
    name), or :class:`OnnxBackend` for an ONNX file ``egeunet export``
    wrote. Both have ``size``, ``normalization`` and ``probabilities(batch)``."""
    if backend == "torch":
        return TorchBackend(weights, device)
    if backend == "onnxruntime":
        return OnnxBackend(weights, device)
    raise ValueError(f"backend: unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
