"""Offline inference on ordinary image files, and the overlay pictures shared with training.

:func:`predict` segments every image PIL can read (files, or folders of files), in
batches: each image is decoded and resized to the model's input size (PIL's antialiased
bilinear filter) exactly as prepared datasets are, normalised as in training, and the
lesion probability map is resized back to the image's own size (bilinear) before it is
thresholded. For ``photo.jpg`` it writes ``photo_mask.png`` (0/255, the original width
and height) and ``photo_overlay.png``; folders keep their relative layout under the
output folder. Unreadable files are reported and skipped; ``summary.json`` lists what
was written and what failed.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from egeunet.checkpoint import load_model
from egeunet.data import normalize
from egeunet.data.prepare import open_for_model_input
from egeunet.fileio import atomic_open, require_writable, write_json_atomic

TRUTH_COLOUR = (0, 200, 0)
PREDICTION_COLOUR = (255, 40, 40)
DEFAULT_IMAGE_SIZE = 256
DEFAULT_NORMALIZATION = "minmax"


# --- Pictures ----------------------------------------------------------------------------


def overlay(
    image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.35
) -> np.ndarray:
    """Tint ``mask`` (H, W) bool on ``image`` (H, W, 3) uint8 and draw its outline solid."""
    mask = np.asarray(mask, dtype=bool)
    result = image.astype(np.float32)
    tint = np.asarray(colour, np.float32)
    result[mask] = (1 - alpha) * result[mask] + alpha * tint
    inner = mask.copy()
    inner[1:-1, 1:-1] = (
        mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    )
    result[mask & ~inner] = tint
    return result.round().astype(np.uint8)


def comparison_panel(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """(H, 3W + 8, 3) uint8: the input, the truth overlay and the prediction overlay."""
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate(
        [
            image,
            gap,
            overlay(image, truth, TRUTH_COLOUR),
            gap,
            overlay(image, prediction, PREDICTION_COLOUR),
        ],
        axis=1,
    )


def save_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    with atomic_open(path, "wb") as handle:
        Image.fromarray(pixels).save(handle, format="PNG")


# --- Inputs ------------------------------------------------------------------------------


def _image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


def find_inputs(
    inputs: Sequence[str | os.PathLike], recursive: bool = False
) -> list[tuple[Path, Path]]:
    """(file, output stem relative to the output folder) for every input.

    A folder contributes its files with an image extension PIL knows (``recursive``:
    also in subfolders), keeping their relative paths; a file is taken as given, whatever
    its extension. Stems that would collide get ``-1``, ``-2``, ... appended.
    """
    extensions = _image_extensions()
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(
                p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in extensions
            )
            found.extend((p, p.relative_to(path).with_suffix("")) for p in files)
        elif path.is_file():
            found.append((path, Path(path.stem)))
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    seen: set[Path] = set()
    unique = []
    for file, stem in found:
        candidate, n = stem, 0
        while candidate in seen:
            n += 1
            candidate = stem.with_name(f"{stem.name}-{n}")
        seen.add(candidate)
        unique.append((file, candidate))
    return unique


def read_image(
    source: str | os.PathLike | bytes, size: int, name: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(original (H, W, 3) uint8, model input (size, size, 3) uint8) of a file or its bytes.

    The model input is decoded and resized exactly as ``egeunet data prepare`` does
    (:func:`~egeunet.data.prepare.open_for_model_input`), so a prepared image and the
    same file given to ``predict`` reach the model as the same pixels. Both are turned
    upright as the EXIF orientation says (phone and camera JPEGs), so masks and overlays
    line up with the image as viewers show it. (``prepare`` keeps pixels as stored, to stay
    aligned with their masks; the two differ only for files with an EXIF rotation: none of
    the 4,791 ISIC 2017/2018 JPEGs we checked has one.) Raises ValueError naming the file (or
    ``name``) if it cannot be read.
    """

    def opened():
        return io.BytesIO(source) if isinstance(source, bytes) else source

    try:
        decoded, stored_size = open_for_model_input(opened(), size)
        with decoded:
            small = ImageOps.exif_transpose(decoded).convert("RGB")
        original = small
        if decoded.size != stored_size:  # decoded at reduced scale: the original needs its own
            with Image.open(opened()) as image:
                original = ImageOps.exif_transpose(image).convert("RGB")
        return np.asarray(original), np.array(small.resize((size, size), Image.BILINEAR))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        label = name or ("<bytes>" if isinstance(source, bytes) else source)
        raise ValueError(f"cannot read image {label}: {error}") from None


# --- Inference ---------------------------------------------------------------------------


@dataclass
class PredictSummary:
    """What a :func:`predict` call wrote and what it skipped."""

    output: Path
    written: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def message(self) -> str:
        text = (
            f"predicted {len(self.written)} image(s) into {self.output} in {self.seconds:.1f} s"
            f"; {len(self.failed)} unreadable file(s) skipped"
        )
        return text + "".join(f"\n  skipped {name}: {why}" for name, why in self.failed.items())

    def to_dict(self) -> dict:
        return {
            "output": str(self.output),
            "written": self.written,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
        }


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


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def probabilities_at_original_size(
    model: torch.nn.Module, batch: torch.Tensor, sizes: Sequence[tuple[int, int]]
) -> list[torch.Tensor]:
    """Lesion probabilities ``(H_i, W_i)`` for a normalised batch ``(B, 3, S, S)``."""
    probabilities = torch.sigmoid(model(batch)[0][:, :1].float())  # (B, 1, S, S)
    return [
        F.interpolate(p[None], size=hw, mode="bilinear", align_corners=False)[0, 0].cpu()
        for p, hw in zip(probabilities, sizes, strict=True)
    ]


def predict(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    output: str | os.PathLike,
    threshold: float = 0.5,
    batch_size: int = 8,
    device: str = "auto",
    recursive: bool = False,
    overlays: bool = True,
    log=None,
) -> PredictSummary:
    """Segment ``inputs`` with the model in ``checkpoint``; see the module docstring.

    ``log`` receives one line per skipped file (default: stderr).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    started = time.perf_counter()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = find_inputs(inputs, recursive)
    if not files:
        hint = "" if recursive else " (subfolders are searched only with --recursive)"
        names = ", ".join(str(item) for item in inputs)
        raise ValueError(f"input: no image files found in {names}{hint}")
    require_writable(output, "output folder")
    loaded = load_model(checkpoint)
    train_config = loaded.train_config or {}
    size = int(train_config.get("image_size", DEFAULT_IMAGE_SIZE))
    normalization = train_config.get("normalization", DEFAULT_NORMALIZATION)
    torch_device = resolve_device(device)
    model = loaded.model.to(torch_device)
    summary = PredictSummary(output=Path(output))
    for batch in _batches(files, batch_size):
        readable = []
        for path, stem in batch:
            try:
                readable.append((path, stem, *read_image(path, size)))
            except ValueError as error:
                summary.failed[str(path)] = str(error)
                log(f"skipped {path}: {error}")
        if not readable:
            continue
        tensor = torch.stack(
            [normalize(torch.from_numpy(r[3]).permute(2, 0, 1), normalization) for r in readable]
        ).to(torch_device)
        sizes = [r[2].shape[:2] for r in readable]
        for (path, stem, original, _), probability in zip(
            readable, probabilities_at_original_size(model, tensor, sizes), strict=True
        ):
            mask = (probability >= threshold).numpy()
            target = summary.output / stem
            save_png(target.with_name(f"{target.name}_mask.png"), mask.astype(np.uint8) * 255)
            if overlays:
                picture = overlay(original, mask, PREDICTION_COLOUR)
                save_png(target.with_name(f"{target.name}_overlay.png"), picture)
            summary.written.append(str(path))
    summary.seconds = time.perf_counter() - started
    write_json_atomic(summary.output / "summary.json", summary.to_dict())
    return summary
