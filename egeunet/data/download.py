"""Fetch the ISIC challenge archives with pooch and unpack them safely.

Every archive is downloaded to ``<to>/<name>.zip`` through a ``.part`` file that survives an
interruption and is resumed with an HTTP Range request. Its SHA-256 is recorded in
``<name>.zip.sha256.json`` beside it; later runs check the file against that record (and
against any hash the caller passes), and pooch refuses a download whose hash differs.
Extraction checks every member first and refuses the whole archive if any member would land
outside the target folder (``../``, absolute paths, symbolic links).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import sys
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import pooch
import requests
from tqdm.auto import tqdm

from egeunet.data.sources import ISIC_ARCHIVE_FOLDERS
from egeunet.fileio import require_writable, sha256_file, write_json_atomic

ISIC_BASE_URL = "https://isic-challenge-data.s3.amazonaws.com"
BASE_URL_ENV = "EGEUNET_ISIC_BASE_URL"
_YEAR = {"isic2017": "2017", "isic2018": "2018"}
_CHUNK = 1 << 20


def archive_urls(dataset: str, splits: Sequence[str], base_url: str | None = None) -> list[str]:
    """URLs of the image and mask archives of ``splits`` (train, val, test)."""
    if dataset not in ISIC_ARCHIVE_FOLDERS:
        raise ValueError(f"unknown dataset {dataset!r} for download: expected isic2017 or isic2018")
    folders = ISIC_ARCHIVE_FOLDERS[dataset]
    unknown = [split for split in splits if split not in folders]
    if unknown or not splits:
        raise ValueError(
            f"unknown split(s) {', '.join(unknown) or '(none)'}: expected train, val, test"
        )
    base = (base_url or os.environ.get(BASE_URL_ENV) or ISIC_BASE_URL).rstrip("/")
    return [f"{base}/{_YEAR[dataset]}/{name}.zip" for split in splits for name in folders[split]]


def download_isic(
    dataset: str,
    splits: Sequence[str] = ("train", "val", "test"),
    to: str | os.PathLike = "data/raw",
    *,
    base_url: str | None = None,
    extract: bool = True,
    known_sha256: Mapping[str, str] | None = None,
    progress: bool | None = None,
) -> list[Path]:
    """Download (resumably) and optionally extract the archives; returns the archive paths.

    ``known_sha256`` maps archive file names to expected hashes. The base URL defaults to
    the ISIC challenge bucket and can be overridden (argument or $EGEUNET_ISIC_BASE_URL).
    """
    target = Path(to).expanduser()
    require_writable(target, "download folder")
    target.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty() if progress is None else progress
    archives = []
    for url in archive_urls(dataset, splits, base_url):
        name = url.rsplit("/", 1)[1]
        record = _read_record(target / name)
        expected = (known_sha256 or {}).get(name) or record.get("sha256")
        archive = fetch_archive(url, target, expected, show)
        record = _read_record(archive)
        unpacked = target / archive.stem
        if extract and not (record.get("extracted") and unpacked.is_dir()):
            extract_archive(archive, target)
            write_json_atomic(_record_path(archive), {**record, "extracted": True})
        archives.append(archive)
    return archives


def fetch_archive(url: str, target: Path, expected_sha256: str | None, progress: bool) -> Path:
    """Download ``url`` into ``target`` unless a file with the expected hash is there;
    record its SHA-256 beside it."""
    name = url.rsplit("/", 1)[1]
    archive = target / name
    known_hash = f"sha256:{expected_sha256}" if expected_sha256 else None
    try:
        pooch.retrieve(
            url,
            known_hash=known_hash,
            fname=name,
            path=target,
            downloader=ResumableDownloader(target / f"{name}.part", progress),
            progressbar=False,
        )
    except ValueError as error:  # pooch: hash mismatch
        raise ValueError(f"download of {url} rejected: {error}") from None
    # pooch has checked an expected hash (of the existing file or of the new download).
    digest = expected_sha256.lower() if expected_sha256 else sha256_file(archive)
    if _read_record(archive).get("sha256") == digest:
        return archive  # already recorded (and maybe extracted): keep the record
    write_json_atomic(
        _record_path(archive),
        {
            "url": url,
            "file": name,
            "sha256": digest,
            "bytes": archive.stat().st_size,
            "recorded": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return archive


def _record_path(archive: Path) -> Path:
    return archive.with_name(f"{archive.name}.sha256.json")


def _read_record(archive: Path) -> dict:
    """What an earlier download recorded about ``archive`` ({} if nothing usable)."""
    record = _record_path(archive)
    if not (archive.is_file() and record.is_file()):
        return {}
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class ResumableDownloader:
    """A pooch downloader that appends to a persistent ``.part`` file using HTTP Range
    requests, so an interrupted download continues where it stopped."""

    def __init__(self, part_file: Path, progress: bool, timeout: float = 60.0) -> None:
        self.part_file = part_file
        self.progress = progress
        self.timeout = timeout

    def __call__(
        self, url: str, output_file: str | os.PathLike, pooch_instance: object = None
    ) -> None:
        done = self.part_file.stat().st_size if self.part_file.is_file() else 0
        headers = {"Range": f"bytes={done}-"} if done else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as response:
            if response.status_code == 416:  # nothing left: the part file is complete
                pass
            else:
                response.raise_for_status()
                if response.status_code != 206:  # server ignored Range: start over
                    done = 0
                self._write(response, done)
        shutil.move(str(self.part_file), str(output_file))

    def _write(self, response: requests.Response, done: int) -> None:
        remaining = int(response.headers.get("Content-Length", 0)) or None
        total = done + remaining if remaining else None
        name = self.part_file.name.removesuffix(".part")
        with (
            open(self.part_file, "ab" if done else "wb") as handle,
            tqdm(
                total=total,
                initial=done,
                unit="B",
                unit_scale=True,
                desc=name,
                disable=not self.progress,
            ) as bar,
        ):
            for chunk in response.iter_content(_CHUNK):
                handle.write(chunk)
                bar.update(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())


def extract_archive(archive: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Extract a zip into ``target`` after checking that no member escapes it.

    Members are unpacked in a temporary folder inside ``target`` and each top-level entry
    is then renamed into place (replacing an older copy), so a failure leaves no partial
    folder. Returns the top-level paths created.
    """
    archive, target = Path(archive), Path(target).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    try:
        bundle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"cannot open archive {archive}: {error}") from None
    with bundle:
        for info in bundle.infolist():
            _check_member(info, archive, target)
        staging = target / f".{archive.name}.extracting-{uuid.uuid4().hex[:8]}"
        try:
            bundle.extractall(staging)
            placed = [_move_into(entry, target) for entry in sorted(staging.iterdir())]
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return placed


def _check_member(info: zipfile.ZipInfo, archive: Path, target: Path) -> None:
    name = info.filename
    path = PurePosixPath(name.replace("\\", "/"))
    escapes = path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")
    resolved = (target / path).resolve()
    if escapes or not resolved.is_relative_to(target.resolve()):
        raise ValueError(
            f"refusing to extract {archive}: member {name!r} would be written outside {target}"
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ValueError(f"refusing to extract {archive}: member {name!r} is a symbolic link")


def _move_into(entry: Path, target: Path) -> Path:
    destination = target / entry.name
    if destination.is_dir() and not destination.is_symlink():
        retired = target / f".{entry.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(destination, retired)
        os.replace(entry, destination)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            destination.unlink()
        os.replace(entry, destination)
    return destination
