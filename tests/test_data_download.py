"""Downloading against a loopback HTTP server that serves archives the test builds."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from data_helpers import ISIC2017_TRAIN, ISIC2017_VAL, write_isic_folders, zip_folder
from http_helpers import serving

from egeunet.cli import main
from egeunet.data import PreparedDataset, prepare_dataset
from egeunet.data.download import download_isic, extract_archive
from egeunet.fileio import sha256_file


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list]]:
    """(base URL, served folder with 2017/<archive>.zip files, log of (path, Range) requests)."""
    served = tmp_path / "served"
    (served / "2017").mkdir(parents=True)
    build = tmp_path / "build"
    write_isic_folders(build, ISIC2017_TRAIN, range(5))
    for name in ISIC2017_TRAIN:
        zip_folder(build / name, served / "2017" / f"{name}.zip")
    for name in ISIC2017_VAL:  # the validation images hide a member that climbs out
        with zipfile.ZipFile(served / "2017" / f"{name}.zip", "w") as bundle:
            bundle.writestr(f"{name}/ISIC_0000100.png", b"fine")
            bundle.writestr("../evil", b"escaped")
    with serving(served) as (base_url, requests):
        yield base_url, served, requests


def test_download_records_hashes_extracts_and_prepares(server, tmp_path):
    base_url, served, _ = server
    raw = tmp_path / "raw"
    archives = download_isic("isic2017", ["train"], raw, base_url=base_url)
    assert [a.name for a in archives] == [f"{name}.zip" for name in ISIC2017_TRAIN]
    for archive in archives:
        assert sha256_file(archive) == sha256_file(served / "2017" / archive.name)
        record = json.loads((raw / f"{archive.name}.sha256.json").read_text())
        assert record["sha256"] == sha256_file(archive) and record["extracted"] is True
        assert record["url"] == f"{base_url}/2017/{archive.name}"
    prepared = PreparedDataset(prepare_dataset("isic2017", raw, tmp_path / "prepared", 32))
    assert prepared.split("challenge") == {"train": [f"ISIC_{n:07d}" for n in range(5)]}


def test_rerun_checks_the_recorded_hash_and_replaces_a_corrupted_archive(server, tmp_path):
    base_url, served, requests = server
    raw = tmp_path / "raw"
    download_isic("isic2017", ["train"], raw, base_url=base_url, extract=False)
    assert len(requests) == 2
    download_isic("isic2017", ["train"], raw, base_url=base_url, extract=False)
    assert len(requests) == 2  # nothing fetched again
    archive = raw / f"{ISIC2017_TRAIN[0]}.zip"
    archive.write_bytes(b"corrupted")
    download_isic("isic2017", ["train"], raw, base_url=base_url, extract=False)
    assert len(requests) == 3
    assert sha256_file(archive) == sha256_file(served / "2017" / archive.name)


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    base_url, served, requests = server
    raw = tmp_path / "raw"
    raw.mkdir()
    name = f"{ISIC2017_TRAIN[0]}.zip"
    full = (served / "2017" / name).read_bytes()
    (raw / f"{name}.part").write_bytes(full[:100])  # what an interrupted run left behind
    download_isic("isic2017", ["train"], raw, base_url=base_url, extract=False)
    assert (f"/2017/{name}", "bytes=100-") in requests
    assert (raw / name).read_bytes() == full
    assert not (raw / f"{name}.part").exists()


def test_a_wrong_known_hash_is_refused_and_nothing_is_kept(server, tmp_path):
    base_url, _, _ = server
    raw = tmp_path / "raw"
    name = f"{ISIC2017_TRAIN[0]}.zip"
    with pytest.raises(ValueError, match=name):
        download_isic("isic2017", ["train"], raw, base_url=base_url, known_sha256={name: "0" * 64})
    assert not (raw / name).exists()
    assert not (raw / f"{name}.sha256.json").exists()


def test_member_escaping_the_target_is_refused(server, tmp_path, monkeypatch):
    base_url, _, _ = server
    raw = tmp_path / "deep" / "raw"
    monkeypatch.setenv("EGEUNET_ISIC_BASE_URL", base_url)  # the override users have too
    with pytest.raises(ValueError, match=r"refusing to extract .*'\.\./evil'"):
        download_isic("isic2017", ["val"], raw)
    assert not (tmp_path / "deep" / "evil").exists()
    assert not (raw / ISIC2017_VAL[0]).exists()  # nothing of that archive was unpacked
    assert [p.name for p in raw.iterdir() if p.name.startswith(".")] == []


def test_absolute_and_symlink_members_are_refused(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("/etc/evil", b"x")
    with pytest.raises(ValueError, match="outside"):
        extract_archive(archive, tmp_path / "out")
    link = zipfile.ZipInfo("folder/link")
    link.external_attr = 0o120777 << 16
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr(link, "/etc/passwd")
    with pytest.raises(ValueError, match="symbolic link"):
        extract_archive(archive, tmp_path / "out")


def test_cli_download_and_its_errors(server, tmp_path, capsys):
    base_url, _, _ = server
    raw = tmp_path / "raw"
    code = main(
        [
            "data",
            "download",
            "isic2017",
            "--splits",
            "train",
            "--to",
            str(raw),
            "--base-url",
            base_url,
        ]
    )
    assert code == 0
    assert f"{ISIC2017_TRAIN[0]}.zip  ok" in capsys.readouterr().out
    assert main(["data", "download", "isic2017", "--splits", "train,extra", "--to", str(raw)]) == 2
    assert "unknown split(s) extra" in capsys.readouterr().err
    missing = main(
        [
            "data",
            "download",
            "isic2018",
            "--splits",
            "val",
            "--to",
            str(raw),
            "--base-url",
            base_url,
        ]
    )
    assert missing == 1
    assert "404" in capsys.readouterr().err
