"""Fault injection and bad input (issue 15): nothing a user owns is overwritten, nothing
half-written is trusted, and every user error is one message naming the file or field.

Each test reproduces one failure found by probing the CLI: a kill at an injected point
(a patched function that raises, or a subprocess that exits between two writes), a
damaged file, or a value of the wrong kind.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import (
    ISIC2017_TRAIN,
    image_bytes,
    isic_id,
    write_isic_folders,
    zip_folder,
)
from engine_helpers import TINY, TINY_MODEL, save_tiny_checkpoint
from http_helpers import serving
from PIL import Image

import egeunet
import egeunet.data.prepare as prepare_module
from egeunet.checkpoint import load_checkpoint, model_payload, save_checkpoint
from egeunet.cli import main
from egeunet.data import PreparedDataset, get_prepared, prepare_dataset
from egeunet.data.download import download_isic
from egeunet.engine import train
from egeunet.engine import trainer as engine_trainer
from egeunet.fileio import FolderBusy, folder_lock, sha256_file
from egeunet.model import EGEUNet
from egeunet.predict import predict, read_image
from egeunet.study import remove_stale_sockets

DEAD_PID = 999999999  # above any pid_max: no such process
PACKAGE_ROOT = Path(egeunet.__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread", "synthetic_cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "finished"
    train(TINY, run_dir, progress=False)
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A copy of the finished run a test may change."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    save_tiny_checkpoint(tmp_path / "tiny.pt")
    return tmp_path / "tiny.pt"


def random_image(path: Path, seed: int, size: tuple[int, int] = (30, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def files_below(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def predict_with(checkpoint: Path, capsys, tmp_path: Path) -> tuple[int, str]:
    """(exit code, stderr) of ``egeunet predict`` with ``checkpoint`` on one new image."""
    image = tmp_path / "photo.png"
    random_image(image, 1)
    argv = ("predict", "--checkpoint", str(checkpoint), "--input", str(image), "--output")
    return run_cli(capsys, *argv, str(tmp_path / "out"))


def package_subprocess(code: str, *args: str, **kwargs) -> subprocess.Popen:
    """``python -c code args`` importing this checkout's egeunet."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **kwargs)


# --- 1. predict never overwrites what it did not write ------------------------------------


def test_predict_refuses_to_overwrite_a_users_mask_and_never_segments_it(
    checkpoint, tmp_path, capsys
):
    folder = tmp_path / "in"
    folder.mkdir()
    random_image(folder / "good1.jpg", 1)
    random_image(folder / "good2.jpg", 2)
    mask = np.zeros((30, 40), np.uint8)
    mask[5:20, 10:30] = 255
    Image.fromarray(mask).save(folder / "good1_mask.png")  # the user's real mask
    before = files_below(folder)
    argv = ("predict", "--checkpoint", str(checkpoint), "--input", str(folder))
    code, err = run_cli(capsys, *argv, "--output", str(folder))
    assert code == 2
    assert f"{folder / 'good1_mask.png'} exists and was not written by predict" in err
    assert files_below(folder) == before  # nothing replaced, nothing added
    code, err = run_cli(capsys, *argv, "--output", str(folder), "--overwrite")
    assert code == 2 and "was not written by predict" in err  # --overwrite is for its own
    assert files_below(folder) == before


def test_predict_replaces_its_own_outputs_only_with_overwrite(checkpoint, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    random_image(folder / "a.png", 1)
    predict(checkpoint, folder, out)
    pictures = {name: data for name, data in files_below(out).items() if name.endswith(".png")}
    assert sorted(pictures) == ["a_mask.png", "a_overlay.png"]
    with pytest.raises(
        ValueError, match=r"a_mask\.png .*exists from an earlier predict.*--overwrite"
    ):
        predict(checkpoint, folder, out)
    predict(checkpoint, folder, out, overwrite=True)
    assert {name: files_below(out)[name] for name in pictures} == pictures  # rewritten
    (out / "a_mask.png").write_bytes(image_bytes(np.zeros((30, 40), np.uint8), "PNG"))
    with pytest.raises(ValueError, match=r"a_mask\.png exists and was not written by predict"):
        predict(checkpoint, folder, out, overwrite=True)  # the user changed it since


def test_predict_does_not_segment_its_own_outputs_inside_the_input(checkpoint, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    random_image(folder / "a.png", 1)
    random_image(folder / "sub" / "b.png", 2)
    out = folder / "out"
    first = predict(checkpoint, folder, out, recursive=True)
    second = predict(checkpoint, folder, out, recursive=True, overwrite=True)
    inputs = [str(folder / "a.png"), str(folder / "sub" / "b.png")]
    assert first.written == second.written == inputs
    assert not list(folder.rglob("*_mask_mask.png"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == {
        inputs[0]: {"mask": "a_mask.png", "overlay": "a_overlay.png"},
        inputs[1]: {"mask": "sub/b_mask.png", "overlay": "sub/b_overlay.png"},
    }
    # Written into the input folder itself: its outputs are not inputs of the next run.
    inside = predict(checkpoint, folder / "sub", folder / "sub")
    again = predict(checkpoint, folder / "sub", folder / "sub", overwrite=True)
    assert inside.written == again.written == [inputs[1]]


# --- 2. one training per run folder --------------------------------------------------------


def test_a_run_folder_is_locked_while_a_process_trains_in_it(run_copy):
    lock = run_copy / ".train.lock"
    holder = package_subprocess(
        "import sys, time\n"
        "from egeunet.fileio import folder_lock\n"
        "with folder_lock(sys.argv[1], 'run folder'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(600)\n",
        str(lock),
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = rf"run folder {re.escape(str(run_copy))} is in use by process {holder.pid}"
        with pytest.raises(FolderBusy, match=message):
            train(TINY, run_copy, resume=True, progress=False)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert lock.read_text().strip() == str(holder.pid)  # left behind by the killed holder
    train(TINY, run_copy, resume=True, progress=False)  # a stale lock is taken over
    assert not lock.exists()


def test_the_lock_names_the_holder_in_process_too(tmp_path):
    lock = tmp_path / ".lock"
    busy = pytest.raises(FolderBusy, match=rf"^folder x is in use by process {os.getpid()} ")
    with folder_lock(lock, "folder y"), busy, folder_lock(lock, "folder x"):
        pass
    assert not (tmp_path / ".lock").exists()


# --- 3. downloads are verified before they are trusted ------------------------------------


@pytest.fixture
def isic_server(tmp_path):
    """(base URL, served 2017/ folder, request log) with the ISIC 2017 training archives."""
    served = tmp_path / "served" / "2017"
    served.mkdir(parents=True)
    write_isic_folders(tmp_path / "build", ISIC2017_TRAIN, range(3))
    for name in ISIC2017_TRAIN:
        zip_folder(tmp_path / "build" / name, served / f"{name}.zip")
    with serving(served.parent) as (base_url, requests):
        yield base_url, served, requests


def test_a_stale_part_file_is_not_trusted(isic_server, tmp_path, capfd):
    base_url, served, requests = isic_server
    raw = tmp_path / "raw"
    raw.mkdir()
    name = f"{ISIC2017_TRAIN[0]}.zip"
    (raw / f"{name}.part").write_bytes(np.random.default_rng(0).bytes(100_000))
    download_isic("isic2017", ["train"], raw, base_url=base_url, extract=False)
    assert (raw / name).read_bytes() == (served / name).read_bytes()
    # Resumed, failed the zip test, fetched again from the start.
    assert [r for r in requests if name in r[0]] == [
        (f"/2017/{name}", "bytes=100000-"),
        (f"/2017/{name}", None),
    ]
    assert json.loads((raw / f"{name}.sha256.json").read_text())["verified"] == "zip test"
    assert "known_hash" not in capfd.readouterr().err  # pooch's advice stays with pooch


def test_a_truncated_archive_is_not_trusted_and_the_user_is_told_what_to_delete(
    isic_server, tmp_path, capsys
):
    base_url, served, _ = isic_server
    raw = tmp_path / "raw"
    raw.mkdir()
    name = f"{ISIC2017_TRAIN[0]}.zip"
    full = (served / name).read_bytes()
    (raw / name).write_bytes(full[: len(full) // 2])
    argv = ("data", "download", "isic2017", "--splits", "train", "--to", str(raw))
    argv += ("--base-url", base_url, "--no-extract")
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert f"archive {raw / name} is damaged" in err and "delete it" in err
    assert not (raw / f"{name}.sha256.json").exists()
    # A record an earlier version wrote for such a file, unverified, is not trusted either.
    record = {"file": name, "sha256": sha256_file(raw / name)}
    (raw / f"{name}.sha256.json").write_text(json.dumps(record))
    assert run_cli(capsys, *argv) == (2, err)
    (raw / name).unlink()
    assert run_cli(capsys, *argv)[0] == 0
    assert (raw / name).read_bytes() == full


def test_an_archive_member_cannot_plant_another_archive(tmp_path):
    images, masks = ISIC2017_TRAIN
    served = tmp_path / "served" / "2017"
    served.mkdir(parents=True)
    write_isic_folders(tmp_path / "build", ISIC2017_TRAIN, range(3))
    zip_folder(tmp_path / "build" / masks, served / f"{masks}.zip")
    planted = zip_folder(tmp_path / "build" / images, tmp_path / "planted.zip")  # not masks
    zip_folder(tmp_path / "build" / images, served / f"{images}.zip")
    with zipfile.ZipFile(served / f"{images}.zip", "a") as bundle:
        bundle.write(planted, f"{masks}.zip")
    raw = tmp_path / "raw"
    refused = pytest.raises(ValueError, match=rf"member '{masks}\.zip' would replace")
    with serving(served.parent) as (base_url, _), refused:
        download_isic("isic2017", ["train"], raw, base_url=base_url)
    assert not (raw / f"{masks}.zip").exists() and not (raw / images).exists()


def test_downloads_clean_up_what_killed_runs_left(isic_server, tmp_path):
    base_url, _, _ = isic_server
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "tmpab12cd_9").write_bytes(b"")  # pooch's temporary file of a killed download
    (raw / "tmpnotempty").write_bytes(b"someone's data")
    (raw / f".{ISIC2017_TRAIN[0]}.zip.extracting-0123abcd").mkdir()
    (raw / f".{ISIC2017_TRAIN[0]}.old-4567cdef").mkdir()
    (raw / f".{ISIC2017_TRAIN[0]}.zip.sha256.json.a1b2c3.tmp").write_text("{")
    (raw / ".download.lock").write_text(f"{DEAD_PID}\n")  # stale: its process is gone
    download_isic("isic2017", ["train"], raw, base_url=base_url)
    leftovers = sorted(p.name for p in raw.iterdir() if not p.name.startswith("ISIC"))
    assert leftovers == ["tmpnotempty"]


# --- 4. 16-bit greyscale ------------------------------------------------------------------


def grey16_pair(folder: Path) -> tuple[Path, Path]:
    """The same gradient as a 16-bit greyscale PNG and as the 8-bit PNG it stands for."""
    folder.mkdir(parents=True, exist_ok=True)
    wide = (np.arange(40 * 48).reshape(40, 48) * 34).astype(np.uint16)
    Image.fromarray(wide).save(folder / "wide.png")
    narrow = ((wide.astype(np.int64) + 128) // 257).astype(np.uint8)
    Image.fromarray(np.stack([narrow] * 3, axis=-1)).save(folder / "narrow.png")
    assert Image.open(folder / "wide.png").mode == "I;16"
    return folder / "wide.png", folder / "narrow.png"


def test_16_bit_greyscale_is_scaled_not_clipped_in_prepare_and_predict(tmp_path):
    root = tmp_path / "authors"
    wide, narrow = grey16_pair(root / "train" / "images")
    (root / "train" / "masks").mkdir()
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 10:30] = 255
    for stem in ("wide", "narrow"):
        Image.fromarray(mask).save(root / "train" / "masks" / f"{stem}_mask.png")
    prepared = PreparedDataset(prepare_dataset("folder", root, tmp_path / "prepared", 32))
    rows = prepared.index_of(["wide", "narrow"])
    np.testing.assert_array_equal(prepared.images[rows[0]], prepared.images[rows[1]])
    original, model_input = read_image(wide, 32)
    np.testing.assert_array_equal(original, read_image(narrow, 32)[0])
    np.testing.assert_array_equal(model_input, prepared.images[rows[0]])


# --- 5. history is part of the checkpointed state ------------------------------------------


def read_history(run_dir: Path) -> list[dict]:
    """The rows of history.csv (none before it is first written)."""
    if not (run_dir / "history.csv").exists():
        return []
    with open(run_dir / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("killed_at", [2, 3])
def test_a_kill_between_last_pt_and_history_loses_no_epoch(killed_at, tmp_path):
    """Killed after last.pt of epoch ``killed_at`` was written, before history.csv was: in
    the middle of the run, or at its last epoch (which a resume does not train again)."""
    run_dir = tmp_path / "run"
    real_write = engine_trainer.write_rows_csv

    class Killed(BaseException):
        pass

    def write_rows_or_die(path, rows, columns):
        if path.name == "history.csv" and len(rows) == killed_at:
            raise Killed
        real_write(path, rows, columns)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_trainer, "write_rows_csv", write_rows_or_die)
        with pytest.raises(Killed):
            train(TINY, run_dir, progress=False)
    last = run_dir / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["epoch"] == killed_at
    assert len(read_history(run_dir)) == killed_at - 1
    (last.parent / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # a kill mid-save
    train(TINY, run_dir, resume=True, progress=False)
    history = read_history(run_dir)
    assert [int(row["epoch"]) for row in history] == [1, 2, 3]
    saved = load_checkpoint(last)["training_state"]["history"]
    assert [float(row["train_loss"]) for row in history] == [row["train_loss"] for row in saved]
    assert not list(last.parent.glob(".*.tmp"))


# --- 6. a user's config.json in --run-dir ---------------------------------------------------


def test_a_run_dir_holding_a_users_config_is_refused_not_replaced(tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"lr": 0.1, "note": "my own settings"}\n')
    with pytest.raises(ValueError, match=r"holds .*config\.json, which no egeunet run wrote"):
        train(TINY, run_dir, progress=False)
    assert files_below(run_dir) == {"config.json": b'{"lr": 0.1, "note": "my own settings"}\n'}


# --- 7, 8. prepare: a damaged zip member, --out naming a file -------------------------------


def test_a_zip_member_with_a_bad_crc_names_archive_and_member(tmp_path, capsys):
    folders, zipped = tmp_path / "folders", tmp_path / "zipped"
    zipped.mkdir()
    write_isic_folders(folders, ISIC2017_TRAIN, range(4), extras=False)
    for name in ISIC2017_TRAIN:
        zip_folder(folders / name, zipped / f"{name}.zip")
    archive = zipped / f"{ISIC2017_TRAIN[0]}.zip"
    member = f"{ISIC2017_TRAIN[0]}/{isic_id(2)}.png"
    content = archive.read_bytes()
    stored = (folders / ISIC2017_TRAIN[0] / f"{isic_id(2)}.png").read_bytes()
    at = content.index(stored) + len(stored) // 2  # a byte inside the stored member
    archive.write_bytes(content[:at] + bytes([content[at] ^ 0xFF]) + content[at + 1 :])
    argv = ["data", "prepare", "--dataset", "isic2017", "--source", str(zipped)]
    code, err = run_cli(capsys, *argv, "--out", str(tmp_path / "out"), "--size", "32")
    assert code == 2
    assert f"archive {archive} is damaged (member {member}: Bad CRC-32" in err
    assert "Traceback" not in err


def test_prepare_out_naming_a_file_fails_before_decoding(tmp_path, capsys, monkeypatch):
    write_isic_folders(tmp_path / "raw", ISIC2017_TRAIN, range(3))
    out = tmp_path / "out"
    out.write_text("a file of mine")

    def never(*args):
        raise AssertionError("decoded before the output was checked")

    monkeypatch.setattr(prepare_module, "_load_pair", never)
    argv = ["data", "prepare", "--dataset", "isic2017", "--source", str(tmp_path / "raw")]
    code, err = run_cli(capsys, *argv, "--out", str(out), "--size", "32")
    assert code == 2 and f"output {out} is an existing file, not a folder" in err
    assert out.read_text() == "a file of mine"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine too")
    code, err = run_cli(capsys, *argv, "--out", str(folder), "--size", "32")
    assert code == 2 and f"refusing to replace {folder}: it is not empty" in err


# --- 9, 10. bad config values, a damaged train config in a checkpoint -----------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("betas: 0.9", "betas: expected a list of 2 float values, got 0.9"),
        ('betas: ["a", "b"]', "betas: expected a list of 2 float values, got ['a', 'b']"),
        ("model: 5", "model: expected a mapping of model fields, got 5"),
        ("model: {widths: 8}", "model.widths: expected a list of int values, got 8"),
        (
            "model: {widths: [8, 16, 24, 32, 48, 66]}",
            "model.widths: every width must be a positive multiple of 4, got 66",
        ),
        ("lr: .inf", "lr: must be a finite number > 0, got inf"),
    ],
)
def test_config_values_of_the_wrong_kind_name_the_field(text, message, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(text + "\n")
    code, err = run_cli(capsys, "train", "--config", str(config), "--run-dir", str(tmp_path))
    assert code == 2 and err == f"egeunet train: error: {message}\n"


def test_cli_lr_inf_fails_validation(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--lr", "inf", "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "lr: must be a finite number > 0, got inf" in err


def test_a_train_config_that_is_not_a_mapping_is_a_clean_error(tmp_path, capsys):
    path = tmp_path / "odd.pt"
    save_checkpoint(path, model_payload(EGEUNet(TINY_MODEL), train_config="image_size: 32"))
    expected = f"checkpoint {path} has a damaged train config: expected a mapping, got str"
    assert predict_with(path, capsys, tmp_path) == (2, f"egeunet predict: error: {expected}\n")
    code, err = run_cli(capsys, "evaluate", "--checkpoint", str(path), "--dataset", "synthetic")
    assert code == 2 and expected in err


# --- Checkpoints: NaN weights, unsafe files, best.pt as last.pt -----------------------------


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, capsys):
    model = EGEUNet(TINY_MODEL)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    path = tmp_path / "nan.pt"
    save_checkpoint(path, model_payload(model, train_config={"image_size": 32}))
    code, err = predict_with(path, capsys, tmp_path)
    assert code == 2 and f"checkpoint {path} has NaN or infinite weights (head.weight)" in err
    assert not (tmp_path / "out").exists()


def test_the_unsafe_checkpoint_refusal_gives_no_advice_to_load_unsafely(tmp_path, capsys):
    path = tmp_path / "unsafe.pt"
    torch.save({"where": Path("/etc")}, path)
    code, err = predict_with(path, capsys, tmp_path)
    assert code == 2 and f"checkpoint {path} could not be read" in err
    assert "never runs code" in err and "PosixPath" in err
    for advice in ("weights_only", "Re-running", "safe_globals", "trust"):
        assert advice not in err


def test_resuming_from_a_best_pt_says_what_is_wrong(run_copy):
    checkpoints = run_copy / "checkpoints"
    shutil.copyfile(checkpoints / "best.pt", checkpoints / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt: it is not a training checkpoint .*best\.pt"):
        train(TINY, run_copy, resume=True, progress=False)


# --- Leftovers, damaged caches, messages ---------------------------------------------------


def test_leftovers_of_killed_prepares_are_removed_when_the_cache_is_current(tmp_path):
    out = tmp_path / "synthetic"
    prepare_dataset("synthetic", None, out, 32, num_synthetic=6)
    manifest = (out / "manifest.json").read_text()
    for name in (f".synthetic.partial-{DEAD_PID}-deadbeef", f".synthetic.old-{DEAD_PID}-cafe"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "images.npy").write_bytes(b"649 MB in real life")
    alive = tmp_path / f".synthetic.partial-{os.getpid()}-0123abcd"  # a running prepare's
    alive.mkdir()
    prepare_dataset("synthetic", None, out, 32, num_synthetic=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "synthetic"]
    assert (out / "manifest.json").read_text() == manifest


def test_a_kill_between_the_two_renames_puts_the_old_cache_back(tmp_path, monkeypatch):
    out = tmp_path / "synthetic"
    prepare_dataset("synthetic", None, out, 32, num_synthetic=6, seed=0)
    manifest = (out / "manifest.json").read_text()
    rebuild = package_subprocess(
        "import os, sys\n"
        "from egeunet.data import prepare\n"
        "real_replace = os.replace\n"
        "def replace_then_die(source, target):\n"
        "    real_replace(source, target)\n"
        "    if '.old-' in os.fspath(target):  # the old folder is aside, the new not in place\n"
        "        os._exit(9)\n"
        "os.replace = replace_then_die\n"
        "prepare.prepare_dataset('synthetic', None, sys.argv[1], 32, num_synthetic=6, seed=1)\n",
        str(out),
    )
    assert rebuild.wait() == 9
    assert not out.exists()  # what the kill left: no output folder at all
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [
        ".synthetic.lock",
        ".synthetic.old",
        ".synthetic.partial",
    ]

    def never(*args):
        raise AssertionError("rebuilt instead of putting the old folder back")

    monkeypatch.setattr(prepare_module.synthetic, "generate_sample", never)
    prepare_dataset("synthetic", None, out, 32, num_synthetic=6, seed=0)
    assert (out / "manifest.json").read_text() == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]  # stale lock file too


def test_a_truncated_cached_array_is_detected_against_the_manifest(tmp_path):
    prepared = get_prepared("synthetic", size=32, cache_dir=tmp_path, num_synthetic=6)
    images = prepared.root / "images.npy"
    expected = np.array(prepared.images)
    with open(images, "r+b") as handle:
        handle.truncate(images.stat().st_size - 100)
    with pytest.raises(ValueError, match=rf"{re.escape(str(images))} is truncated"):
        PreparedDataset(prepared.root).images  # noqa: B018
    rebuilt = get_prepared("synthetic", size=32, cache_dir=tmp_path, num_synthetic=6)
    np.testing.assert_array_equal(rebuilt.images, expected)  # the cache repaired itself


def test_an_unreadable_image_is_named_not_a_bytesio(tmp_path):
    root = tmp_path / "authors"
    write_isic_folders(root, ("train/images", "train/masks"), range(3), extras=False)
    broken = root / "train" / "images" / f"{isic_id(1)}.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ValueError) as caught:
        prepare_dataset("folder", root, tmp_path / "out", 32)
    assert str(caught.value) == (f"cannot read image {broken}: not an image format PIL recognises")
    with pytest.raises(ValueError, match=r"^cannot read image upload\.png: not an image"):
        read_image(b"not an image", 32, "upload.png")


def test_data_splits_kfold_0_is_an_error(tmp_path, capsys):
    out = prepare_dataset("synthetic", None, tmp_path / "s", 32, num_synthetic=6)
    code, err = run_cli(capsys, "data", "splits", str(out), "--kfold", "0")
    assert code == 2 and "k-fold needs 2 <= k" in err and "got k=0" in err
    assert not list((out / "splits").glob("kfold-*"))


def test_stale_kernel_sockets_are_removed_and_live_ones_kept(tmp_path):
    stale, live = tmp_path / "kernel-ipc-1", tmp_path / "kernel-ipc-2"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # closed without unlinking: what a killed kernel leaves
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(live))
        listening.listen()
        assert remove_stale_sockets(tmp_path) == [stale]
    assert not stale.exists() and live.exists()
