"""Builders for small on-disk data fixtures used by the tests/test_data_*.py files."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ISIC2017_TRAIN = ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth")
ISIC2017_VAL = ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth")


def isic_id(number: int) -> str:
    return f"ISIC_{number:07d}"


def image_bytes(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def make_pair(number: int, width: int = 48, height: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic RGB image whose red channel encodes ``number`` and a 0/255 mask
    whose lesion is a rectangle whose width also depends on ``number``."""
    rng = np.random.default_rng(number)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[..., 0] = number % 256
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, : 4 + number % (width - 4)] = 255
    return image, mask


def write_isic_folders(
    root: Path,
    folders: tuple[str, str] = ISIC2017_TRAIN,
    numbers: range | list[int] = range(6),
    extras: bool = True,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write ISIC-style image/mask folders (plus superpixels and a CSV that must be
    ignored); returns id -> (image, mask) arrays as written (images losslessly as PNG)."""
    image_dir, mask_dir = root / folders[0], root / folders[1]
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for number in numbers:
        image, mask = make_pair(number)
        sample = isic_id(number)
        (image_dir / f"{sample}.png").write_bytes(image_bytes(image, "PNG"))
        (mask_dir / f"{sample}_segmentation.png").write_bytes(image_bytes(mask, "PNG"))
        if extras:
            (image_dir / f"{sample}_superpixels.png").write_bytes(image_bytes(mask, "PNG"))
        written[sample] = (image, mask)
    if extras:
        (image_dir / f"{folders[0]}_metadata.csv").write_text("image_id,age\n")
    return written


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip ``folder`` as the ISIC archives do: members under ``<folder name>/``."""
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(folder.rglob("*")):
            bundle.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
    return archive
