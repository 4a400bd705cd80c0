"""Find image/mask pairs in the layouts users arrive with.

Supported layouts (``discover_pairs``):

- the ISIC challenge archives for 2017 and 2018, as zip files or extracted folders, side by
  side in one folder (``ISIC-2017_Training_Data`` + ``ISIC-2017_Training_Part1_GroundTruth``,
  ...). Images and masks are paired by ISIC id (``ISIC_0000000.jpg`` with
  ``ISIC_0000000_segmentation.png``); superpixel images, CSV files and anything else are
  ignored;
- the layout the EGE-UNet authors distribute, ``<root>/{train,val,test}/{images,masks}/``
  (or just ``<root>/{images,masks}/``), paired by file stem (a mask's ``_segmentation`` or
  ``_mask`` suffix is ignored).

Pairing never relies on sort order. Problems raise ValueError / FileNotFoundError naming the
file or folder at fault.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from egeunet.fileio import sha256_json

REAL_DATASETS = ("isic2017", "isic2018", "folder")
SPLIT_ORDER = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# (image folder, mask folder) of each official split, as the challenge archives name them.
ISIC_ARCHIVE_FOLDERS: dict[str, dict[str, tuple[str, str]]] = {
    "isic2017": {
        "train": ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
        "val": ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
        "test": ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"),
    },
    "isic2018": {
        "train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
        "val": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
        "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
    },
}

_ISIC_IMAGE = re.compile(r"^(ISIC_\d+)\.(jpe?g|png)$", re.IGNORECASE)
_ISIC_MASK = re.compile(r"^(ISIC_\d+)_segmentation\.png$", re.IGNORECASE)
_MASK_SUFFIX = re.compile(r"(_segmentation|_mask)$", re.IGNORECASE)


# How reading a damaged zip member fails: bad CRC, bad header, truncated deflate stream.
ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError)


def damaged_archive(archive: Path, detail: str) -> ValueError:
    """The error for a zip archive whose content is damaged (``detail`` says where)."""
    return ValueError(f"archive {archive} is damaged ({detail}): delete it and download it again")


@dataclass(frozen=True)
class SourceFile:
    """One input file: a file on disk, or a member of a zip archive."""

    path: Path
    member: str | None = None
    archive: zipfile.ZipFile | None = field(default=None, compare=False, repr=False)

    @property
    def display(self) -> str:
        """Name used in messages and in the manifest."""
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    @property
    def name(self) -> str:
        return Path(self.member).name if self.member else self.path.name

    def read_bytes(self) -> bytes:
        if self.archive is None:
            return self.path.read_bytes()
        try:
            return self.archive.read(self.member)
        except ZIP_READ_ERRORS as error:
            raise damaged_archive(self.path, f"member {self.member}: {error}") from None

    def stat_key(self) -> list:
        """Cheap identity of the file's content (no read): size plus mtime or CRC."""
        if self.archive is None:
            stat = self.path.stat()
            return [str(self.path), stat.st_size, stat.st_mtime_ns]
        info = self.archive.getinfo(self.member)
        return [self.display, info.file_size, info.CRC]


@dataclass(frozen=True)
class SamplePair:
    """An image and its mask, keyed by the sample id, in one official split."""

    id: str
    split: str
    image: SourceFile
    mask: SourceFile


@dataclass
class DiscoveredSource:
    """The pairs found under ``root``; keeps zip archives open until ``close()``."""

    dataset: str
    root: Path
    layout: str
    pairs: list[SamplePair]
    archives: list[zipfile.ZipFile] = field(default_factory=list, repr=False)

    def split_counts(self) -> dict[str, int]:
        counts = {split: 0 for split in SPLIT_ORDER}
        for pair in self.pairs:
            counts[pair.split] += 1
        return {split: n for split, n in counts.items() if n}

    def fingerprint(self) -> str:
        """Hash of every input's name, size and mtime/CRC: unchanged inputs, same value."""
        keys = [[p.id, p.split, p.image.stat_key(), p.mask.stat_key()] for p in self.pairs]
        return sha256_json({"dataset": self.dataset, "layout": self.layout, "files": keys})

    def close(self) -> None:
        for archive in self.archives:
            archive.close()
        self.archives.clear()

    def __enter__(self) -> DiscoveredSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def discover_pairs(dataset: str, source: str | os.PathLike) -> DiscoveredSource:
    """Find every image/mask pair of ``dataset`` under ``source``.

    ``source`` may also be a folder that holds ``<dataset>/`` (e.g. the shared data root).
    """
    if dataset not in REAL_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {', '.join(REAL_DATASETS)}")
    root = Path(source).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data source folder {root} does not exist")
    if not any(root.iterdir()):
        raise ValueError(f"data source folder {root} is empty")
    if (
        dataset in ISIC_ARCHIVE_FOLDERS
        and (root / dataset).is_dir()
        and not _has_any_layout(dataset, root)
    ):
        root = root / dataset
    if dataset in ISIC_ARCHIVE_FOLDERS and _find_isic_inputs(dataset, root):
        discovered = _discover_isic(dataset, root)
    elif _authors_split_folders(root):
        discovered = _discover_authors(dataset, root)
    else:
        raise ValueError(_unknown_layout_message(dataset, root))
    if not discovered.pairs:
        discovered.close()
        raise ValueError(f"no image/mask pairs found in {root}")
    _check_unique_ids(discovered.pairs)
    return discovered


def _has_any_layout(dataset: str, root: Path) -> bool:
    return bool(_find_isic_inputs(dataset, root)) or bool(_authors_split_folders(root))


def _unknown_layout_message(dataset: str, root: Path) -> str:
    expected = "train/images + train/masks (authors' layout)"
    if dataset in ISIC_ARCHIVE_FOLDERS:
        image_dir, mask_dir = ISIC_ARCHIVE_FOLDERS[dataset]["train"]
        expected = f"{image_dir} + {mask_dir} (folders or .zip), or {expected}"
    return f"unknown layout in {root}: expected {expected}"


# ---------------------------------------------------------------------------------------
# ISIC challenge archives


def _locate(root: Path, name: str) -> Path | None:
    """The extracted folder ``root/name`` if present, else the archive ``root/name.zip``."""
    folder, archive = root / name, root / f"{name}.zip"
    if folder.is_dir():
        return folder
    if archive.is_file():
        return archive
    return None


def _find_isic_inputs(dataset: str, root: Path) -> dict[str, tuple[Path, Path | None]]:
    """Per split whose image folder/archive exists: (images, masks or None)."""
    found = {}
    for split, (image_name, mask_name) in ISIC_ARCHIVE_FOLDERS[dataset].items():
        images = _locate(root, image_name)
        if images is not None:
            found[split] = (images, _locate(root, mask_name))
    return found


def _discover_isic(dataset: str, root: Path) -> DiscoveredSource:
    discovered = DiscoveredSource(dataset, root, layout="isic-archive", pairs=[])
    try:
        for split, (image_location, mask_location) in _find_isic_inputs(dataset, root).items():
            if mask_location is None:
                mask_name = ISIC_ARCHIVE_FOLDERS[dataset][split][1]
                raise FileNotFoundError(
                    f"masks for {image_location} not found: expected {root / mask_name} "
                    f"(folder) or {root / mask_name}.zip"
                )
            images = _match_files(_list_files(image_location, discovered), _ISIC_IMAGE)
            masks = _match_files(_list_files(mask_location, discovered), _ISIC_MASK)
            if not images:
                raise ValueError(f"no ISIC images (ISIC_<id>.jpg) found in {image_location}")
            discovered.pairs.extend(_pair(split, images, masks, image_location, mask_location))
    except BaseException:
        discovered.close()
        raise
    return discovered


def _list_files(location: Path, discovered: DiscoveredSource) -> list[SourceFile]:
    """Regular files of a folder (recursively) or of a zip archive, hidden ones skipped."""
    if location.is_dir():
        return [
            SourceFile(path)
            for path in sorted(location.rglob("*"))
            if path.is_file() and not _is_hidden(path.relative_to(location).parts)
        ]
    try:
        archive = zipfile.ZipFile(location)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"cannot open archive {location}: {error}") from None
    discovered.archives.append(archive)
    return [
        SourceFile(location, info.filename, archive)
        for info in archive.infolist()
        if not info.is_dir() and not _is_hidden(Path(info.filename).parts)
    ]


def _is_hidden(parts: Iterable[str]) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _match_files(files: list[SourceFile], pattern: re.Pattern) -> dict[str, list[SourceFile]]:
    """Files whose name matches ``pattern``, grouped by the id it captures."""
    matched: dict[str, list[SourceFile]] = {}
    for file in files:
        found = pattern.match(file.name)
        if found:
            matched.setdefault(found.group(1).upper(), []).append(file)
    return matched


def _pair(
    split: str,
    images: dict[str, list[SourceFile]],
    masks: dict[str, list[SourceFile]],
    image_location: Path,
    mask_location: Path,
) -> Iterator[SamplePair]:
    """Pairs by id; any image without mask, mask without image or duplicate id is an error."""
    for kind, group in (("image", images), ("mask", masks)):
        duplicated = {key: files for key, files in group.items() if len(files) > 1}
        if duplicated:
            key, files = next(iter(sorted(duplicated.items())))
            names = ", ".join(file.display for file in files)
            raise ValueError(f"{len(duplicated)} duplicated {kind} id(s), e.g. {key}: {names}")
    _raise_unpaired(sorted(set(images) - set(masks)), images, "image", "mask", mask_location)
    _raise_unpaired(sorted(set(masks) - set(images)), masks, "mask", "image", image_location)
    for key in sorted(images):
        yield SamplePair(key, split, images[key][0], masks[key][0])


def _raise_unpaired(
    keys: list[str], files: dict[str, list[SourceFile]], kind: str, other: str, where: Path
) -> None:
    if keys:
        shown = ", ".join(files[key][0].display for key in keys[:5])
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        raise ValueError(f"{len(keys)} {kind}(s) without {other} in {where}: {shown}{more}")


# ---------------------------------------------------------------------------------------
# The authors' layout: <root>/{train,val,test}/{images,masks}/


def _authors_split_folders(root: Path) -> dict[str, Path]:
    """Split name -> folder holding images/ and masks/ (the root itself counts as train)."""
    found = {split: root / split for split in SPLIT_ORDER if (root / split / "images").is_dir()}
    if not found and (root / "images").is_dir():
        found["train"] = root
    return found


def _discover_authors(dataset: str, root: Path) -> DiscoveredSource:
    discovered = DiscoveredSource(dataset, root, layout="images-masks-folders", pairs=[])
    for split, folder in _authors_split_folders(root).items():
        image_dir, mask_dir = folder / "images", folder / "masks"
        if not mask_dir.is_dir():
            raise FileNotFoundError(f"mask folder {mask_dir} not found (images are in {image_dir})")
        images = _group_by_stem(_list_files(image_dir, discovered), strip_mask_suffix=False)
        masks = _group_by_stem(_list_files(mask_dir, discovered), strip_mask_suffix=True)
        if not images:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {image_dir}")
        discovered.pairs.extend(_pair(split, images, masks, image_dir, mask_dir))
    return discovered


def _group_by_stem(files: list[SourceFile], strip_mask_suffix: bool) -> dict[str, list[SourceFile]]:
    grouped: dict[str, list[SourceFile]] = {}
    for file in files:
        path = Path(file.name)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        stem = _MASK_SUFFIX.sub("", path.stem) if strip_mask_suffix else path.stem
        grouped.setdefault(stem, []).append(file)
    return grouped


def _check_unique_ids(pairs: list[SamplePair]) -> None:
    seen: dict[str, SamplePair] = {}
    for pair in pairs:
        if pair.id in seen:
            first = seen[pair.id]
            raise ValueError(
                f"sample id {pair.id} occurs in split {first.split} ({first.image.display}) "
                f"and in split {pair.split} ({pair.image.display})"
            )
        seen[pair.id] = pair
