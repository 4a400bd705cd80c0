"""Offline inference: file discovery, original-size masks, unreadable files, checkpoint layouts."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import numpy as np
import pytest
import torch
from engine_helpers import TINY_MODEL, save_tiny_checkpoint
from PIL import Image

from egeunet.checkpoint import load_model, model_payload
from egeunet.cli import main as cli_main
from egeunet.data import normalize
from egeunet.model import EGEUNet
from egeunet.predict import find_inputs, overlay, predict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def checkpoint(tmp_path):
    path = tmp_path / "tiny.pt"
    return path, save_tiny_checkpoint(path)


def write_images(folder):
    rng = np.random.default_rng(0)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "same.png")
    Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)).save(folder / "rgba.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "notes.txt").write_text("not an image")


def test_predict_writes_masks_at_original_size(checkpoint, tmp_path):
    path, model = checkpoint
    write_images(tmp_path / "in")
    logged = []
    summary = predict(path, tmp_path / "in", tmp_path / "out", batch_size=3, log=logged.append)
    assert sorted(p.split("/")[-1] for p in summary.written) == [
        "gray.png", "rgba.png", "same.png", "wide.jpg"
    ]  # fmt: skip
    assert list(summary.failed) == [str(tmp_path / "in" / "broken.png")]
    assert len(logged) == 1 and "broken.png" in logged[0]
    sizes = {"same": (32, 32), "wide": (37, 50), "gray": (20, 24), "rgba": (40, 40)}
    for stem, size in sizes.items():
        mask = np.asarray(Image.open(tmp_path / "out" / f"{stem}_mask.png"))
        assert mask.shape == size and set(np.unique(mask)) <= {0, 255}
        overlay_image = Image.open(tmp_path / "out" / f"{stem}_overlay.png")
        assert overlay_image.size == (size[1], size[0])
    document = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(document["written"]) == 4 and len(document["failed"]) == 1
    assert "4 image(s)" in summary.message() and "broken.png" in summary.message()

    # At the model's own size the mask is exactly the thresholded model output.
    pixels = np.array(Image.open(tmp_path / "in" / "same.png"))
    x = normalize(torch.from_numpy(pixels).permute(2, 0, 1), "minmax")[None]
    with torch.no_grad():
        expected = (torch.sigmoid(model(x)[0])[0, 0] >= 0.5).numpy()
    mask = np.asarray(Image.open(tmp_path / "out" / "same_mask.png")) > 0
    assert 0 < expected.sum() < expected.size  # a test that can tell masks apart
    np.testing.assert_array_equal(mask, expected)


def test_threshold_changes_the_mask(checkpoint, tmp_path):
    path, _ = checkpoint
    write_images(tmp_path / "in")
    low = predict(path, tmp_path / "in" / "same.png", tmp_path / "low", threshold=0.05)
    high = predict(path, tmp_path / "in" / "same.png", tmp_path / "high", threshold=0.95)
    assert low.written and high.written
    area = [
        np.asarray(Image.open(d / "same_mask.png")).sum()
        for d in (tmp_path / "low", tmp_path / "high")
    ]
    assert area[0] > area[1]
    with pytest.raises(ValueError, match="threshold"):
        predict(path, tmp_path / "in", tmp_path / "x", threshold=1.5)


def test_find_inputs_keeps_layout_and_avoids_collisions(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for name in ("a/x.png", "a/sub/y.jpg", "b/x.png", "a/readme.md"):
        (tmp_path / name).write_bytes(b"")
    flat = find_inputs([tmp_path / "a"])
    assert [str(stem) for _, stem in flat] == ["x"]
    deep = find_inputs([tmp_path / "a"], recursive=True)
    assert sorted(str(stem) for _, stem in deep) == ["sub/y", "x"]
    both = find_inputs([tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"])
    assert [str(stem) for _, stem in both] == ["x", "x-1"]
    with pytest.raises(FileNotFoundError, match="missing"):
        find_inputs([tmp_path / "missing"])


def test_overlay_tints_and_outlines():
    image = np.zeros((6, 6, 3), np.uint8)
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    result = overlay(image, mask, (200, 0, 0), alpha=0.5)
    assert tuple(result[1, 1]) == (200, 0, 0)  # outline: full colour
    assert tuple(result[2, 2]) == (100, 0, 0)  # inside: blended
    assert tuple(result[0, 0]) == (0, 0, 0)  # outside: untouched


def test_cli_predict_exit_codes(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    write_images(tmp_path / "in")
    argv = ["predict", "--checkpoint", str(path), "--input", str(tmp_path / "in"), "--output"]
    assert cli_main([*argv, str(tmp_path / "out")]) == 0
    assert "skipped" in capsys.readouterr().out
    only_broken = ["--input", str(tmp_path / "in" / "broken.png")]
    assert (
        cli_main(
            ["predict", "--checkpoint", str(path), *only_broken, "--output", str(tmp_path / "o2")]
        )
        == 1
    )
    missing = ["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o3")]
    assert cli_main(["predict", "--checkpoint", str(path), *missing]) == 2
    # A folder without images (here: only in a subfolder) is an error, not "0 predicted".
    (tmp_path / "nested" / "inner").mkdir(parents=True)
    write_images(tmp_path / "nested" / "inner" / "images")
    nested = ["--input", str(tmp_path / "nested"), "--output", str(tmp_path / "o4")]
    capsys.readouterr()
    assert cli_main(["predict", "--checkpoint", str(path), *nested]) == 2
    assert "no image files found" in capsys.readouterr().err
    assert not (tmp_path / "o4").exists()


def test_cli_weights_and_checkpoint_name_the_same_option(checkpoint, tmp_path):
    """``--weights`` (as in ``egeunet app`` and ``egeunet export``) and the older
    ``--checkpoint`` give the same masks."""
    path, _ = checkpoint
    write_images(tmp_path / "in")
    masks = {}
    for option in ("--weights", "--checkpoint"):
        out = tmp_path / option.strip("-")
        argv = ["predict", option, str(path), "--input", str(tmp_path / "in"), "--output"]
        assert cli_main([*argv, str(out), "--no-overlays"]) == 0
        masks[option] = {p.name: p.read_bytes() for p in sorted(out.glob("*_mask.png"))}
    assert len(masks["--weights"]) == 4 and masks["--weights"] == masks["--checkpoint"]


def test_load_model_errors(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_model(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pt"):
        load_model(garbage)
    # Foreign files fail inside torch.load in other ways: KeyError for text, EOFError for
    # an empty file, UnpicklingError for objects weights_only refuses. All must name it.
    text, empty, unsafe = tmp_path / "text.pt", tmp_path / "empty.pt", tmp_path / "unsafe.pt"
    text.write_text("hello\n")
    empty.write_bytes(b"")
    torch.save({"where": PurePosixPath("/etc")}, unsafe)
    for bad in (text, empty, unsafe):
        with pytest.raises(ValueError, match=rf"checkpoint .*{bad.name} could not be read"):
            load_model(bad)
    damaged = tmp_path / "damaged.pt"
    torch.save({**model_payload(EGEUNet(TINY_MODEL)), "model_config": {"colour": 1}}, damaged)
    with pytest.raises(ValueError, match=r"damaged\.pt has a damaged model record"):
        load_model(damaged)
    state = load_model(path).model.state_dict()
    raw = tmp_path / "raw.pt"
    torch.save(state, raw)
    assert load_model(raw, TINY_MODEL).layout == "state_dict"
    with pytest.raises(ValueError, match="does not fit"):
        load_model(raw)  # default widths do not fit the tiny weights


def test_authors_checkpoint_loads_through_the_converter(reference_checkpoint, tmp_path):
    raw = tmp_path / "official.pth"
    torch.save(reference_checkpoint["state_dict"], raw)
    wrapped = tmp_path / "official_wrapped.pth"
    torch.save({"epoch": 1, "model_state_dict": reference_checkpoint["state_dict"]}, wrapped)
    for path in (raw, wrapped):
        loaded = load_model(path)
        assert loaded.layout == "official"
        with torch.no_grad():  # float64, as the model's own reference test does
            outputs = loaded.model.double()(reference_checkpoint["input"].double())
        probabilities = [o.sigmoid().float() for o in outputs]
        for ours, theirs in zip(
            probabilities[1:], reference_checkpoint["deep_supervision"], strict=True
        ):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        # The fixture's final map carries float32 rounding of up to ~7e-5 (see test_model).
        torch.testing.assert_close(probabilities[0], reference_checkpoint["out"], atol=1e-4, rtol=0)
    image = tmp_path / "lesion.png"
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(image)
    summary = predict(raw, image, tmp_path / "out", device="cpu")
    assert summary.written == [str(image)]
    assert np.asarray(Image.open(tmp_path / "out" / "lesion_mask.png")).shape == (48, 64)


def test_predict_refuses_a_read_only_output_folder(checkpoint, tmp_path):
    path, _ = checkpoint
    write_images(tmp_path / "in")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"output folder .*shared/out cannot be created"):
            predict(path, tmp_path / "in", shared / "out")
        assert list(shared.iterdir()) == []
    finally:
        shared.chmod(0o755)


def test_masks_follow_the_exif_orientation(checkpoint, tmp_path):
    """A camera JPEG stored 40 wide and 20 high with EXIF orientation 6 (rotate 90 degrees)
    is shown 20 wide and 40 high; its mask must have the shown size to line up."""
    path, _ = checkpoint
    folder = tmp_path / "photos"
    folder.mkdir()
    stored = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation tag
    stored.save(folder / "phone.jpg", exif=exif)
    predict(path, folder, tmp_path / "out")
    assert np.asarray(Image.open(tmp_path / "out" / "phone_mask.png")).shape == (40, 20)
    assert Image.open(tmp_path / "out" / "phone_overlay.png").size == (20, 40)
    # The notebook's upload widget reads it the same way.
    from egeunet.lesion import LesionExplorer, Segmenter

    explorer = LesionExplorer(Segmenter(path, "cpu"))
    explorer.load("phone.jpg", (folder / "phone.jpg").read_bytes())
    assert explorer.image.shape == (40, 20, 3) and explorer.mask().shape == (40, 20)


def test_predict_feeds_the_model_the_pixels_prepare_caches(tmp_path):
    """A large JPEG is decoded at reduced scale before the resize; predict must do exactly
    what prepare did, or a model would see other pixels at inference than in evaluation."""
    from egeunet.data import PreparedDataset, prepare_dataset
    from egeunet.predict import read_image

    root = tmp_path / "authors"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((1024, 768), Image.BICUBIC)  # smooth, large
    image.save(root / "train" / "images" / "big.jpg", quality=90)
    mask = np.zeros((768, 1024), np.uint8)
    mask[200:500, 300:700] = 255
    Image.fromarray(mask).save(root / "train" / "masks" / "big_mask.png")
    Image.fromarray(coarse).save(root / "val" / "images" / "small.png")
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(root / "val" / "masks" / "small_mask.png")
    prepared = PreparedDataset(prepare_dataset("folder", root, tmp_path / "prepared", 64))
    cached = prepared.images[prepared.index_of(["big"])[0]]

    original, model_input = read_image(root / "train" / "images" / "big.jpg", 64)
    assert original.shape == (768, 1024, 3)
    np.testing.assert_array_equal(model_input, cached)
    from_bytes = read_image((root / "train" / "images" / "big.jpg").read_bytes(), 64, "big.jpg")
    np.testing.assert_array_equal(from_bytes[1], cached)
    # Resizing the fully decoded image instead gives other pixels: the check has teeth.
    full = np.asarray(Image.fromarray(original).resize((64, 64), Image.BILINEAR))
    assert np.abs(full.astype(int) - cached.astype(int)).max() > 0
