"""Decode, resize and cache a dataset as memory-mappable uint8 arrays with a manifest.

A prepared folder holds:

- ``images.npy``: (N, S, S, 3) uint8, ``masks.npy``: (N, S, S) uint8 in {0, 1};
- ``manifest.json``: one item per sample (id, official split, source files and their
  SHA-256, original height/width, lesion area fraction, whether the mask was strictly
  binary), the count of non-binary masks, an input fingerprint and a content hash;
- ``splits/<name>.json``: id lists of the ``challenge`` and ``paper`` splits.

The folder is built under a temporary name beside ``out`` and renamed into place at the
end, so an interrupted run leaves no half cache; what a killed run leaves beside ``out``
(``.<out>.partial-<pid>-*``, ``.<out>.old-<pid>-*``) is removed, or put back, by the next
run. A rerun whose inputs have the same names, sizes and modification times (or CRCs
inside zips), and whose arrays are complete, returns at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from egeunet.data import splits as split_rules
from egeunet.data import synthetic
from egeunet.data.sources import SPLIT_ORDER, SamplePair, discover_pairs
from egeunet.fileio import (
    folder_lock,
    process_alive,
    require_writable,
    sha256_json,
    write_json_atomic,
)
from egeunet.model import NUM_LEVELS, SIZE_MULTIPLE, is_image_size

PREPARE_FORMAT = 1
DATASETS = ("isic2017", "isic2018", "synthetic", "folder")
MASK_THRESHOLD = 127  # after resizing, mask pixels > 127 are lesion
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PreparedSample:
    """One decoded sample at the target size plus what the manifest records about it."""

    image: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray  # (S, S) uint8 in {0, 1}
    record: dict


@dataclass(frozen=True)
class _Job:
    """What to build: the folder, manifest header, size, input fingerprint, the (id, split)
    of every row and how to load row i."""

    out: Path
    header: dict
    size: int
    fingerprint: str
    samples: list[tuple[str, str]]
    load: Callable[[int], PreparedSample]


def check_dataset_name(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")


def check_size(size: int) -> None:
    if not is_image_size(size):
        raise ValueError(
            f"size must be a positive multiple of {SIZE_MULTIPLE} (EGE-UNet halves it "
            f"{NUM_LEVELS} times), got {size!r}"
        )


def prepare_dataset(
    dataset: str,
    source: str | os.PathLike | None,
    out: str | os.PathLike,
    size: int = 256,
    *,
    num_synthetic: int | None = None,
    seed: int = 0,
    num_workers: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Prepare ``dataset`` from ``source`` into the folder ``out`` and return that folder.

    ``source`` is the folder with the ISIC archives (zipped or extracted) or the authors'
    ``{train,val}/{images,masks}`` folders; it is ignored for ``synthetic``, whose size is
    set by ``num_synthetic`` (total images, default 260) and ``seed``. Idempotent, atomic.
    """
    check_dataset_name(dataset)
    check_size(size)
    out = Path(out).expanduser()
    _check_replaceable(out)
    workers = num_workers or min(8, os.cpu_count() or 1)
    show = sys.stderr.isatty() if progress is None else progress
    if dataset == "synthetic":
        counts = synthetic.split_counts(num_synthetic)
        return _prepare_synthetic(out, size, counts, seed, workers, show)
    if source is None:
        raise ValueError(f"dataset {dataset!r} needs a source folder (--source / data_root)")
    with discover_pairs(dataset, source) as discovered:
        fingerprint = sha256_json([PREPARE_FORMAT, size, discovered.fingerprint()])
        if _is_current(out, fingerprint):
            return out
        header = {
            "dataset": dataset,
            "source": str(discovered.root.resolve()),
            "layout": discovered.layout,
        }
        pairs = discovered.pairs
        job = _Job(
            out,
            header,
            size,
            fingerprint,
            samples=[(pair.id, pair.split) for pair in pairs],
            load=lambda i: _load_pair(pairs[i], size, discovered.root),
        )
        return _build(job, workers, show)


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a prepared folder (FileNotFoundError if it is not one)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a prepared dataset folder (no {MANIFEST})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"manifest {path} is not valid JSON: {error}") from None


def _is_current(out: Path, fingerprint: str) -> bool:
    """Whether ``out`` holds a complete preparation of these inputs; leftovers of killed
    runs beside a current folder are removed."""
    try:
        manifest = read_manifest(out)
        if manifest.get("fingerprint") != fingerprint:
            return False
        for name, shape in array_shapes(manifest).items():
            check_array_file(out / f"{name}.npy", shape)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False
    _remove_leftovers(out, restore=False)
    return True


def array_shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    """The shape of each array a prepared folder with this manifest holds."""
    count, size = len(manifest["items"]), int(manifest["size"])
    return {"images": (count, size, size, 3), "masks": (count, size, size)}


def check_array_file(path: Path, shape: tuple[int, ...]) -> None:
    """ValueError naming ``path`` unless it is a complete uint8 ``.npy`` file of ``shape``
    (a missing file is FileNotFoundError); reads the header only."""
    if not path.is_file():
        raise FileNotFoundError(f"prepared array {path} is missing: prepare the data again")
    redo = f"delete {path.parent} and prepare the data again"
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            found, _, dtype = read_header(handle)
            data_offset = handle.tell()
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"prepared array {path} is damaged ({error}): {redo}") from None
    if found != shape or dtype != np.uint8:
        raise ValueError(f"{path} has shape {found} {dtype}, expected {shape} uint8: {redo}")
    expected = data_offset + int(np.prod(shape))
    actual = path.stat().st_size
    if actual < expected:
        raise ValueError(
            f"prepared array {path} is truncated ({actual} of {expected} bytes): {redo}"
        )


def _prepare_synthetic(
    out: Path, size: int, counts: dict[str, int], seed: int, workers: int, show: bool
) -> Path:
    params = {"generator_version": synthetic.GENERATOR_VERSION, "seed": seed, "counts": counts}
    fingerprint = sha256_json([PREPARE_FORMAT, size, params])
    if _is_current(out, fingerprint):
        return out
    streams = [(split, index) for split, n in counts.items() for index in range(n)]
    plan = [(synthetic.sample_id(split, index), split) for split, index in streams]

    def load(i: int) -> PreparedSample:
        image, mask = synthetic.generate_sample(seed, *streams[i], size)
        record = {"height": size, "width": size, "lesion_fraction": float(mask.mean())}
        return PreparedSample(image, mask, {**record, "mask_binary": True})

    header = {"dataset": "synthetic", "source": None, "layout": "synthetic", "synthetic": params}
    return _build(_Job(out, header, size, fingerprint, plan, load), workers, show)


# ---------------------------------------------------------------------------------------
# Decoding one pair


def _load_pair(pair: SamplePair, size: int, root: Path) -> PreparedSample:
    image_bytes, mask_bytes = pair.image.read_bytes(), pair.mask.read_bytes()
    image, (width, height) = _decode(image_bytes, pair.image.display, "RGB", size)
    mask, mask_size = _decode(mask_bytes, pair.mask.display, "L", None)
    if mask_size != (width, height):
        raise ValueError(
            f"mask {pair.mask.display} is {mask_size[0]}x{mask_size[1]} but its image "
            f"{pair.image.display} is {width}x{height}"
        )
    mask_pixels = np.asarray(mask)
    binary = bool(np.isin(mask_pixels, (0, 255)).all())
    if not binary and mask_pixels.max() <= 1:  # a 0/1 mask: scale it to 0/255 first
        mask = Image.fromarray(mask_pixels * np.uint8(255))
        mask_pixels = np.asarray(mask)
    resized_mask = np.asarray(mask.resize((size, size), Image.BILINEAR)) > MASK_THRESHOLD
    record = {
        "image": _relative(pair.image.display, root),
        "image_sha256": hashlib.sha256(image_bytes).hexdigest(),
        "mask": _relative(pair.mask.display, root),
        "mask_sha256": hashlib.sha256(mask_bytes).hexdigest(),
        "height": height,
        "width": width,
        "lesion_fraction": round(float((mask_pixels > MASK_THRESHOLD).mean()), 6),
        "mask_binary": binary,
    }
    resized_image = np.asarray(image.resize((size, size), Image.BILINEAR))
    return PreparedSample(resized_image, resized_mask.astype(np.uint8), record)


def _decode(
    data: bytes, name: str, mode: str, size: int | None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode fully (truncation is an error) and convert to ``mode``; returns the original
    (width, height). With ``size``, see :func:`open_for_model_input`."""
    try:
        image, original = open_for_model_input(io.BytesIO(data), size)
        return (to_rgb(image) if mode == "RGB" else image.convert(mode)), original
    except DECODE_ERRORS as error:
        raise image_error(name, error) from None


DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def image_error(name: str | os.PathLike, error: Exception) -> ValueError:
    """The ValueError for an image file ``name`` that failed to decode with ``error``."""
    if isinstance(error, UnidentifiedImageError):  # its text names a BytesIO, not the file
        return ValueError(f"cannot read image {name}: not an image format PIL recognises")
    return ValueError(f"cannot read image {name}: {error}")


# PIL modes of one channel with more than 8 bits (16-bit PNG and TIFF greyscale):
# converting them to RGB clips every value above 255, so they are scaled down first.
WIDE_GREY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB; 16-bit greyscale is scaled (65535 -> 255), not clipped."""
    if image.mode in WIDE_GREY_MODES:
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((wide + 128) // 257).astype(np.uint8))
    return image.convert("RGB")


def open_for_model_input(
    source: str | os.PathLike | BinaryIO, size: int | None
) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode an image on its way to a ``size`` x ``size`` model input.

    With ``size``, a JPEG may be decoded at a reduced scale (1/2, 1/4 or 1/8) that keeps
    at least twice the target resolution, which the bilinear resize then antialiases. The
    one place that decides this, so ``egeunet predict`` feeds the model the same pixels
    as a prepared dataset. Returns the image and its (width, height) on disk.
    """
    image = Image.open(source)
    original = image.size
    if size is not None:
        image.draft("RGB", (2 * size, 2 * size))
    image.load()
    return image, original


def _relative(display: str, root: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(Path(display).relative_to(root))
    return display


# ---------------------------------------------------------------------------------------
# Building the folder


def _build(job: _Job, workers: int, show: bool) -> Path:
    """Fill a temporary folder with arrays, manifest and splits, then move it to ``job.out``;
    one process at a time per folder."""
    started = time.perf_counter()
    require_writable(job.out.parent, "folder for the prepared dataset")
    job.out.parent.mkdir(parents=True, exist_ok=True)
    lock = job.out.parent / f".{job.out.name}.lock"
    with folder_lock(lock, f"prepared dataset folder {job.out}", wait=True):
        _remove_leftovers(job.out, restore=True)
        if _is_current(job.out, job.fingerprint):  # another process made it while we waited
            return job.out
        staging = job.out.parent / f".{job.out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            _write_folder(job, staging, workers, show, started)
            _swap_into_place(staging, job.out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return job.out


def _write_folder(job: _Job, staging: Path, workers: int, show: bool, started: float) -> None:
    count, size = len(job.samples), job.size
    images = np.lib.format.open_memmap(
        staging / "images.npy", mode="w+", dtype=np.uint8, shape=(count, size, size, 3)
    )
    masks = np.lib.format.open_memmap(
        staging / "masks.npy", mode="w+", dtype=np.uint8, shape=(count, size, size)
    )
    records = _fill(images, masks, job.load, count, workers, show, job.header["dataset"])
    images.flush()
    masks.flush()
    del images, masks
    items = [
        {"id": sample_id, "split": split, **record}
        for (sample_id, split), record in zip(job.samples, records, strict=True)
    ]
    manifest = _manifest(job, items, time.perf_counter() - started)
    for name, document in split_rules.default_splits(job.header["dataset"], items).items():
        write_json_atomic(staging / "splits" / f"{name}.json", document)
    write_json_atomic(staging / MANIFEST, manifest)


def _remove_leftovers(out: Path, restore: bool) -> None:
    """Clean up beside ``out`` after killed runs (their process is gone): delete staging
    folders; put an old folder moved aside back when ``restore`` and ``out`` is missing (a
    kill between the two renames of :func:`_swap_into_place`), else delete it. Restore only
    while holding the folder's lock."""
    for leftover in sorted(out.parent.glob(f".{out.name}.*-*")):
        kind, _, tail = leftover.name.removeprefix(f".{out.name}.").partition("-")
        pid = tail.split("-")[0]
        if kind not in ("partial", "old") or (pid.isdigit() and process_alive(int(pid))):
            continue  # not ours, or its process still runs (ids without pid: older versions)
        if kind == "old" and restore and not out.exists():
            os.replace(leftover, out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _fill(
    images: np.ndarray,
    masks: np.ndarray,
    load: Callable[[int], PreparedSample],
    count: int,
    workers: int,
    show: bool,
    label: str,
) -> list[dict]:
    """Decode every sample on a thread pool (PIL and numpy release the GIL) into the arrays."""

    def work(i: int) -> dict:
        sample = load(i)
        images[i] = sample.image
        masks[i] = sample.mask
        return sample.record

    executor = ThreadPoolExecutor(max_workers=workers)
    try:
        results: Iterable[dict] = executor.map(work, range(count))
        bar = tqdm(results, total=count, desc=f"prepare {label}", unit="img", disable=not show)
        return list(bar)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _manifest(job: _Job, items: list[dict], seconds: float) -> dict:
    non_binary = [item["id"] for item in items if not item["mask_binary"]]
    counts = {split: 0 for split in SPLIT_ORDER}
    for item in items:
        counts[item["split"]] += 1
    manifest = {
        "format": PREPARE_FORMAT,
        **job.header,
        "size": job.size,
        "num_images": len(items),
        "split_counts": {split: n for split, n in counts.items() if n},
        "non_binary_masks": len(non_binary),
        "non_binary_mask_ids": non_binary,
        "mask_threshold": MASK_THRESHOLD,
        "resize": "bilinear (images and masks), masks then binarised at > 127",
        "fingerprint": job.fingerprint,
        "egeunet_version": _package_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "prepare_seconds": round(seconds, 3),
        "items": items,
    }
    manifest["content_hash"] = content_hash(manifest)
    return manifest


def content_hash(manifest: dict) -> str:
    """Hash of what the arrays are made of (dataset, size, ids, splits, source hashes or
    generator parameters), independent of paths, times and machines."""
    keep = ("id", "split", "image_sha256", "mask_sha256")
    return sha256_json(
        {
            "format": manifest["format"],
            "dataset": manifest["dataset"],
            "size": manifest["size"],
            "synthetic": manifest.get("synthetic"),
            "items": [{key: item.get(key) for key in keep} for item in manifest["items"]],
        }
    )


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("egeunet")
    except metadata.PackageNotFoundError:
        return "unknown"


def _check_replaceable(out: Path) -> None:
    """ValueError unless ``out`` is missing, empty, or a prepared folder (which a newer
    preparation replaces): never a user's file or folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is an existing file, not a folder; choose a folder")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ValueError(f"refusing to replace {out}: it is not empty and not a prepared folder")


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an older ``out`` is moved aside first, then deleted."""
    retired = None
    _check_replaceable(out)
    if out.exists():
        retired = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, retired)
    os.replace(staging, out)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
