"""Fetch the ISIC challenge archives with pooch and unpack them safely.

Every archive is downloaded to ``<to>/<name>.zip`` through a ``.part`` file that survives an
interruption and is resumed with an HTTP Range request. Nothing is trusted unverified: a
finished download, and an archive found in place without a record, must match the known
SHA-256 or, where none is known, pass a full zip test (every member's CRC); a resumed
download that fails is fetched once more from the start. Only then is its SHA-256 recorded
in ``<name>.zip.sha256.json`` beside it; later runs check the file against that record (and
against any hash the caller passes), and pooch replaces a file whose hash differs.
Extraction checks every member first and refuses the whole archive if any member would land
outside the target folder (``../``, absolute paths, symbolic links) or replace another
archive of the download, its record or its folder. One process at a time downloads into a
folder; it removes what killed runs left there (empty pooch temporary files, half
extractions, temporary record files).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import uuid
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import pooch
import requests
from tqdm.auto import tqdm

from egeunet.data.sources import ISIC_ARCHIVE_FOLDERS, ZIP_READ_ERRORS, damaged_archive
from egeunet.fileio import (
    folder_lock,
    remove_temporaries,
    require_writable,
    sha256_file,
    write_json_atomic,
)

ISIC_BASE_URL = "https://isic-challenge-data.s3.amazonaws.com"
BASE_URL_ENV = "EGEUNET_ISIC_BASE_URL"
LOCK_FILE = ".download.lock"
_YEAR = {"isic2017": "2017", "isic2018": "2018"}
_CHUNK = 1 << 20
# What killed runs leave in a download folder: pooch's temporary file (empty until the
# download is moved into it), and the staging and retired folders of extract_archive.
_POOCH_TEMPORARY = re.compile(r"^tmp[a-z0-9_]{8}$")
_EXTRACTION_LEFTOVER = re.compile(r"^\..+\.(extracting|old)-[0-9a-f]{8}$")


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
    urls = archive_urls(dataset, splits, base_url)
    require_writable(target, "download folder")
    target.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty() if progress is None else progress
    archives = []
    with folder_lock(target / LOCK_FILE, f"download folder {target}"):
        _remove_leftovers(target)
        for url in urls:
            name = url.rsplit("/", 1)[1]
            record = _read_record(target / name)
            expected = (known_sha256 or {}).get(name) or record.get("sha256")
            archive = fetch_archive(url, target, expected, show)
            record = _read_record(archive)
            unpacked = target / archive.stem
            if extract and not (record.get("extracted") and unpacked.is_dir()):
                extract_archive(archive, target, reserved=_download_names() - {archive.stem})
                write_json_atomic(_record_path(archive), {**record, "extracted": True})
            archives.append(archive)
    return archives


def _download_names() -> set[str]:
    """Every name a download folder's archives use: the archives, their ``.part`` files,
    records and extracted folders."""
    names = {LOCK_FILE}
    for folders in ISIC_ARCHIVE_FOLDERS.values():
        for stem in (stem for pair in folders.values() for stem in pair):
            names |= {stem, f"{stem}.zip", f"{stem}.zip.part", f"{stem}.zip.sha256.json"}
    return names


def _remove_leftovers(target: Path) -> None:
    """Delete what killed downloads left in ``target`` (call it holding the folder lock)."""
    remove_temporaries(target, "*.zip.sha256.json")
    for entry in target.iterdir():
        if entry.is_symlink():
            continue
        if _POOCH_TEMPORARY.match(entry.name) and entry.is_file() and not entry.stat().st_size:
            entry.unlink()
        elif _EXTRACTION_LEFTOVER.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def fetch_archive(url: str, target: Path, expected_sha256: str | None, progress: bool) -> Path:
    """Download ``url`` into ``target`` unless a file with the expected hash is there;
    verify it (that hash, or a full zip test where none is known) and record its SHA-256
    beside it."""
    name = url.rsplit("/", 1)[1]
    archive = target / name
    expected = expected_sha256.lower() if expected_sha256 else None
    downloader = ResumableDownloader(
        target / f"{name}.part", progress, verify=lambda path: archive_problem(path, expected)
    )
    try:
        with _pooch_quiet():
            pooch.retrieve(
                url,
                known_hash=f"sha256:{expected}" if expected else None,
                fname=name,
                path=target,
                downloader=downloader,
                progressbar=False,
            )
    except ValueError as error:  # a hash mismatch, or a download that failed its check
        raise ValueError(f"download of {url} rejected: {error}") from None
    if not downloader.verified:  # pooch kept the file in place: pooch checked a known
        problem = None if expected else zip_problem(archive)  # hash; test the zip otherwise
        if problem:
            raise damaged_archive(archive, problem)
    digest = expected or sha256_file(archive)
    if _read_record(archive).get("sha256") == digest:
        return archive  # already recorded (and maybe extracted): keep the record
    write_json_atomic(
        _record_path(archive),
        {
            "url": url,
            "file": name,
            "sha256": digest,
            "verified": "known sha256" if expected else "zip test",
            "bytes": archive.stat().st_size,
            "recorded": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return archive


@contextlib.contextmanager
def _pooch_quiet() -> Iterator[None]:
    """Silence pooch's informational lines (among them its advice to pass the hash of an
    unverified download as ``known_hash``); warnings and errors still show."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def archive_problem(path: Path, expected_sha256: str | None) -> str | None:
    """What is wrong with a downloaded archive (None if nothing): its SHA-256 differs from
    ``expected_sha256``, or, where none is known, the zip test fails."""
    if expected_sha256 is None:
        return zip_problem(path)
    digest = sha256_file(path)
    if digest != expected_sha256:
        return f"SHA-256 {digest} differs from the expected {expected_sha256}"
    return None


def zip_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete zip archive (a full read of every member, checking
    each CRC), or None if it is one."""
    try:
        with zipfile.ZipFile(path) as bundle:
            bad = bundle.testzip()
    except (*ZIP_READ_ERRORS, OSError) as error:
        return f"not a readable zip archive: {error}"
    return f"member {bad} fails its CRC check" if bad else None


def _record_path(archive: Path) -> Path:
    return archive.with_name(f"{archive.name}.sha256.json")


def _read_record(archive: Path) -> dict:
    """What an earlier download recorded about ``archive`` after verifying it ({} if
    nothing usable: records of older versions, which trusted unverified files, count as
    none)."""
    record = _record_path(archive)
    if not (archive.is_file() and record.is_file()):
        return {}
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) and data.get("verified") else {}


class ResumableDownloader:
    """A pooch downloader that appends to a persistent ``.part`` file using HTTP Range
    requests, so an interrupted download continues where it stopped.

    ``verify(path)`` says what is wrong with a finished ``.part`` file (None if nothing):
    one that fails after resuming (a stale or foreign ``.part``) is downloaded once more
    from the start; one that fails after a full download is deleted and the download
    refused (ValueError). ``verified`` tells whether a download passed the check.
    """

    def __init__(
        self,
        part_file: Path,
        progress: bool,
        timeout: float = 60.0,
        verify: Callable[[Path], str | None] | None = None,
    ) -> None:
        self.part_file = part_file
        self.progress = progress
        self.timeout = timeout
        self.verify = verify or (lambda path: None)
        self.verified = False

    def __call__(
        self, url: str, output_file: str | os.PathLike, pooch_instance: object = None
    ) -> None:
        resumed = self._fetch(url)
        problem = self.verify(self.part_file)
        if problem and resumed:
            self.part_file.unlink()
            self._fetch(url)
            problem = self.verify(self.part_file)
        if problem:
            self.part_file.unlink()
            raise ValueError(f"the downloaded archive is damaged ({problem}); nothing was kept")
        self.verified = True
        shutil.move(str(self.part_file), str(output_file))

    def _fetch(self, url: str) -> bool:
        """Complete the ``.part`` file; whether it continued an earlier one."""
        done = self.part_file.stat().st_size if self.part_file.is_file() else 0
        headers = {"Range": f"bytes={done}-"} if done else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as response:
            if response.status_code == 416:  # nothing left: the part file is complete
                return True
            response.raise_for_status()
            if response.status_code != 206:  # server ignored Range: start over
                done = 0
            self._write(response, done)
        return done > 0

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


def extract_archive(
    archive: str | os.PathLike, target: str | os.PathLike, reserved: Collection[str] = ()
) -> list[Path]:
    """Extract a zip into ``target`` after checking that no member escapes it or lands on
    a ``reserved`` top-level name (what other archives of the folder provide).

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
            _check_member(info, archive, target, reserved)
        staging = target / f".{archive.name}.extracting-{uuid.uuid4().hex[:8]}"
        try:
            try:
                bundle.extractall(staging)
            except ZIP_READ_ERRORS as error:
                raise damaged_archive(archive, str(error)) from None
            placed = [_move_into(entry, target) for entry in sorted(staging.iterdir())]
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return placed


def _check_member(
    info: zipfile.ZipInfo, archive: Path, target: Path, reserved: Collection[str]
) -> None:
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
    if path.parts and path.parts[0] in reserved:
        raise ValueError(
            f"refusing to extract {archive}: member {name!r} would replace "
            f"{target / path.parts[0]}, which belongs to another download"
        )


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
