"""``egeunet data prepare`` and ``egeunet data splits`` end to end."""

from __future__ import annotations

import json

from data_helpers import ISIC2017_TRAIN, write_isic_folders

from egeunet.cli import main
from egeunet.data import cache_folder


def test_prepare_and_splits_print_counts_and_write_kfold(tmp_path, capsys):
    out = tmp_path / "synthetic"
    args = [
        "data",
        "prepare",
        "--dataset",
        "synthetic",
        "--out",
        str(out),
        "--size",
        "64",
        "--num-synthetic",
        "26",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{out}: 26 images at 64x64, 0 non-binary masks binarised" in printed
    assert "  challenge: train 16, val 4, test 6" in printed
    assert "  paper: train 14, test 6" in printed

    assert main(["data", "splits", str(out), "--kfold", "4"]) == 0
    printed = capsys.readouterr().out
    assert "  kfold-4-0: train 15, test 5" in printed and "  kfold-4-3: train 15, test 5" in printed
    saved = json.loads((out / "splits" / "kfold-4-1.json").read_text())
    assert saved["counts"] == {"train": 15, "test": 5} and len(saved["test"]) == 5


def test_prepare_reports_bad_input_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(
        [
            "data",
            "prepare",
            "--dataset",
            "isic2017",
            "--source",
            str(empty),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"egeunet data: error: data source folder {empty} is empty"
    )
    assert main(["data", "prepare", "--dataset", "isic2017", "--out", str(tmp_path / "o")]) == 2
    assert "needs a source folder" in capsys.readouterr().err
    assert main(["data", "splits", str(tmp_path / "o")]) == 2
    assert "is not a prepared dataset folder" in capsys.readouterr().err


def test_prepare_real_layout_via_cli_default_output(tmp_path, capsys, monkeypatch):
    write_isic_folders(tmp_path / "raw", ISIC2017_TRAIN, range(4))
    monkeypatch.chdir(tmp_path)
    assert (
        main(["data", "prepare", "--dataset", "isic2017", "--source", "raw", "--size", "32"]) == 0
    )
    assert (tmp_path / "data" / "prepared" / "isic2017-32" / "manifest.json").is_file()
    assert "  paper: train 3, test 1" in capsys.readouterr().out


def test_cache_folder_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("EGEUNET_CACHE", str(tmp_path / "cache"))
    writable = tmp_path / "raw"
    writable.mkdir()
    assert (
        cache_folder("isic2017", writable, 256, None, None, 0)
        == writable / "prepared" / "isic2017-256"
    )
    assert (
        cache_folder("isic2017", writable, 256, tmp_path / "c", None, 0)
        == tmp_path / "c" / "isic2017-256"
    )
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        folder = cache_folder("isic2018", read_only, 128, None, None, 0)
    finally:
        read_only.chmod(0o755)
    assert folder.parent == tmp_path / "cache" and folder.name.startswith("isic2018-128-")
    assert (
        cache_folder("synthetic", None, 256, None, 100, 3)
        == tmp_path / "cache" / "synthetic-256-n100-s3"
    )
