"""Offline inference on ordinary image files, and the overlay pictures shared with training.

:func:`predict` segments every image PIL can read (files, or folders of files), in
batches: each image is decoded and resized to the model's input size (PIL's antialiased
bilinear filter) exactly as prepared datasets are, normalised as in training, and the
lesion probability map is resized back to the image's own size (bilinear) before it is
thresholded. The model runs in PyTorch on a checkpoint (``backend="torch"``) or in ONNX
Runtime on a file ``egeunet export`` wrote (``backend="onnxruntime"``, :mod:`egeunet.export`):
the same preprocessing, the same masks (probabilities agree within 1e-4). For
``photo.jpg`` it writes ``photo_mask.png`` (0/255, the original width
and height) and ``photo_overlay.png``; folders keep their relative layout under the
output folder. Unreadable files are reported and skipped; ``summary.json`` maps each
input to its outputs and lists what failed.

It never replaces a file it did not write: ``.egeunet-predict.json`` in the output folder
records each file predict wrote there (with its SHA-256), and a run stops before writing
anything if one of its outputs exists and is not such a file; its own earlier outputs are
replaced only with ``overwrite``. Files in the output folder named like its outputs
(``*_mask.png``, ``*_overlay.png``) are never taken as inputs, so an output folder inside
an input folder is not segmented again.
"""

from __future__ import annotations

import io
import json
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

from egeunet.backends import (  # noqa: F401  (the backends were defined here before)
    BACKENDS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NORMALIZATION,
    TorchBackend,
    load_backend,
    model_input_settings,
    resolve_device,
)
from egeunet.data import normalize
from egeunet.data.prepare import DECODE_ERRORS, image_error, open_for_model_input, to_rgb
from egeunet.fileio import atomic_open, require_writable, sha256_file, write_json_atomic
from egeunet.metrics import THRESHOLD
from egeunet.overlay import PREDICTION_COLOUR, TRUTH_COLOUR, overlay

OUTPUT_SUFFIXES = {"mask": "_mask.png", "overlay": "_overlay.png"}
SUMMARY_FILE = "summary.json"
MANIFEST_FILE = ".egeunet-predict.json"


# --- Pictures ----------------------------------------------------------------------------


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


def encode_png(pixels: np.ndarray) -> bytes:
    """The PNG file of ``pixels`` ((H, W) or (H, W, 3) uint8), as predict writes it."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_pixels(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as the pixels of its PNG: 0 outside the lesion, 255 inside."""
    return np.asarray(mask, dtype=np.uint8) * 255


def save_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(encode_png(pixels))


# --- Inputs ------------------------------------------------------------------------------


def _image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


def find_inputs(
    inputs: Sequence[str | os.PathLike],
    recursive: bool = False,
    output: str | os.PathLike | None = None,
) -> list[tuple[Path, Path]]:
    """(file, output stem relative to the output folder) for every input.

    A folder contributes its files with an image extension PIL knows (``recursive``:
    also in subfolders), keeping their relative paths, except files inside ``output``
    named like predict's outputs; a file is taken as given, whatever its extension.
    Stems that would collide get ``-1``, ``-2``, ... appended.
    """
    extensions = _image_extensions()
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(
                p
                for p in path.glob(pattern)
                if p.is_file()
                and p.suffix.lower() in extensions
                and not (output is not None and is_predict_output(p, output))
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


def is_predict_output(path: Path, output: str | os.PathLike) -> bool:
    """Whether ``path`` lies in the folder ``output`` with a name predict gives its outputs."""
    inside = path.resolve().is_relative_to(Path(output).resolve())
    return inside and path.name.endswith(tuple(OUTPUT_SUFFIXES.values()))


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
            small = to_rgb(ImageOps.exif_transpose(decoded))
        original = small
        if decoded.size != stored_size:  # decoded at reduced scale: the original needs its own
            with Image.open(opened()) as image:
                original = to_rgb(ImageOps.exif_transpose(image))
        return np.asarray(original), np.array(small.resize((size, size), Image.BILINEAR))
    except DECODE_ERRORS as error:
        label = name or ("<bytes>" if isinstance(source, bytes) else source)
        raise image_error(label, error) from None


# --- Inference ---------------------------------------------------------------------------


@dataclass
class PredictSummary:
    """What a :func:`predict` call wrote and what it skipped. ``outputs`` maps each input
    predicted to its output files (``mask``, ``overlay``), relative to ``output``."""

    output: Path
    written: list[str] = field(default_factory=list)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
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
            "outputs": self.outputs,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
        }


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def probabilities_at_original_size(
    probabilities: torch.Tensor, sizes: Sequence[tuple[int, int]]
) -> list[torch.Tensor]:
    """Lesion probabilities ``(S, S)`` of a batch ``(B, S, S)`` resized (bilinear) to each
    image's own ``(H_i, W_i)``, on the CPU."""
    return [
        F.interpolate(p[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0].cpu()
        for p, hw in zip(probabilities, sizes, strict=True)
    ]


class OutputRecord:
    """The files predict wrote into an output folder (``.egeunet-predict.json``): each path
    relative to the folder with the SHA-256 of the file as written; ``None`` marks a file
    claimed by a run that stopped before writing it (a claim is made only for a path
    where nothing or predict's own file was)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / MANIFEST_FILE
        self.files: dict[str, str | None] = self._read()

    def _read(self) -> dict[str, str | None]:
        if not self.path.exists():
            return {}
        try:
            files = json.loads(self.path.read_text(encoding="utf-8"))["files"]
            valid = all(isinstance(v, str | None) for v in files.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            raise ValueError(
                f"{self.path} (predict's record of the files it wrote) is damaged: choose "
                "another output folder, or delete it after removing predict's earlier outputs"
            )
        return files

    def is_own(self, relative: str) -> bool:
        """Whether the file at ``relative`` is one predict wrote, unchanged since."""
        if relative not in self.files or not (self.folder / relative).is_file():
            return False
        recorded = self.files[relative]
        return recorded is None or sha256_file(self.folder / relative) == recorded

    def check_free(self, relatives: Sequence[str], overwrite: bool) -> None:
        """ValueError before anything is written if one of ``relatives`` exists and is not
        predict's own file, or (without ``overwrite``) is an earlier output."""
        existing = [r for r in relatives if (self.folder / r).exists()]
        foreign = [r for r in existing if not self.is_own(r)]
        if foreign:
            raise ValueError(
                f"output {self.folder / foreign[0]}{_more(foreign)} exists and was not written "
                "by predict; nothing was written: choose another output folder (--output)"
            )
        earlier = [r for r in existing if r != SUMMARY_FILE]
        if earlier and not overwrite:
            raise ValueError(
                f"output {self.folder / earlier[0]}{_more(earlier)} exists from an earlier "
                "predict; nothing was written: pass --overwrite to replace its outputs, or "
                "choose another output folder (--output)"
            )

    def claim(self, relatives: Sequence[str]) -> None:
        """Record ``relatives`` as predict's before writing them."""
        self.files.update(dict.fromkeys(relatives))
        self.save()

    def wrote(self, relative: str) -> None:
        self.files[relative] = sha256_file(self.folder / relative)

    def save(self) -> None:
        write_json_atomic(self.path, {"format": 1, "files": self.files})


def _more(items: Sequence) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def output_names(stem: Path, overlays: bool) -> dict[str, str]:
    """The outputs of the input with output stem ``stem``, relative to the output folder."""
    kinds = OUTPUT_SUFFIXES if overlays else {"mask": OUTPUT_SUFFIXES["mask"]}
    return {kind: stem.with_name(stem.name + suffix).as_posix() for kind, suffix in kinds.items()}


def predict(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    output: str | os.PathLike,
    threshold: float = THRESHOLD,
    batch_size: int = 8,
    device: str = "auto",
    recursive: bool = False,
    overlays: bool = True,
    overwrite: bool = False,
    log=None,
    backend: str = "torch",
) -> PredictSummary:
    """Segment ``inputs`` with the model in ``checkpoint``; see the module docstring.

    ``checkpoint``: a checkpoint file or the name of shipped weights (``backend="torch"``),
    or an ONNX file from ``egeunet export`` (``backend="onnxruntime"``). ``overwrite`` lets
    this run replace outputs an earlier predict wrote into ``output`` (never other files).
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
    files = find_inputs(inputs, recursive, output)
    if not files:
        hint = "" if recursive else " (subfolders are searched only with --recursive)"
        names = ", ".join(str(item) for item in inputs)
        raise ValueError(f"input: no image files found in {names}{hint}")
    require_writable(output, "output folder")
    model = load_backend(checkpoint, backend, device)
    size, normalization = model.size, model.normalization
    summary = PredictSummary(output=Path(output))
    record = OutputRecord(summary.output)
    planned = {str(path): output_names(stem, overlays) for path, stem in files}
    every_output = [name for names in planned.values() for name in names.values()]
    record.check_free([*every_output, SUMMARY_FILE], overwrite)
    record.claim([*every_output, SUMMARY_FILE])
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
        )
        sizes = [r[2].shape[:2] for r in readable]
        at_original_size = probabilities_at_original_size(model.probabilities(tensor), sizes)
        for (path, _, original, _), probability in zip(readable, at_original_size, strict=True):
            mask = (probability >= threshold).numpy()
            names = planned[str(path)]
            pictures = {"mask": mask_pixels(mask)}
            if overlays:
                pictures["overlay"] = overlay(original, mask, PREDICTION_COLOUR)
            for kind, picture in pictures.items():
                save_png(summary.output / names[kind], picture)
                record.wrote(names[kind])
            summary.written.append(str(path))
            summary.outputs[str(path)] = names
    summary.seconds = time.perf_counter() - started
    write_json_atomic(summary.output / SUMMARY_FILE, summary.to_dict())
    record.wrote(SUMMARY_FILE)
    record.save()
    return summary
