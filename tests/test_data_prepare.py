"""Preparing generated fixtures: pairing, known-answer resizing, manifest, bad input,
idempotence and atomicity."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import (
    ISIC2017_TRAIN,
    ISIC2017_VAL,
    image_bytes,
    isic_id,
    make_pair,
    write_isic_folders,
    zip_folder,
)
from PIL import Image

import egeunet.data.prepare as prepare_module
from egeunet.data import PreparedDataset, get_prepared, prepare_dataset

SIZE = 32


def expected_arrays(
    image: np.ndarray, mask: np.ndarray, size: int = SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """The specification: bilinear image resize; mask resized bilinearly, then > 127."""
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    lesion = np.asarray(Image.fromarray(mask).resize((size, size), Image.BILINEAR)) > 127
    return resized, lesion.astype(np.uint8)


@pytest.fixture
def isic_source(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "raw"
    written = write_isic_folders(root, ISIC2017_TRAIN, range(0, 7))
    written |= write_isic_folders(root, ISIC2017_VAL, range(100, 103))
    return root, written


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_prepare_matches_the_specification(isic_source, tmp_path):
    root, written = isic_source
    prepared = PreparedDataset(prepare_dataset("isic2017", root, tmp_path / "out", SIZE))
    assert prepared.ids == [isic_id(n) for n in range(7)] + [isic_id(n) for n in range(100, 103)]
    assert prepared.split("challenge") == {
        "train": [isic_id(n) for n in range(7)],
        "val": [isic_id(n) for n in range(100, 103)],
    }
    for row, sample in enumerate(prepared.ids):
        image, mask = expected_arrays(*written[sample])
        np.testing.assert_array_equal(prepared.images[row], image)
        np.testing.assert_array_equal(prepared.masks[row], mask)
    item = prepared.manifest["items"][3]
    image_file = root / ISIC2017_TRAIN[0] / f"{isic_id(3)}.png"
    assert item["image"] == f"{ISIC2017_TRAIN[0]}/{isic_id(3)}.png"
    assert item["image_sha256"] == hashlib.sha256(image_file.read_bytes()).hexdigest()
    assert (item["height"], item["width"]) == (40, 48)
    assert item["lesion_fraction"] == pytest.approx((written[isic_id(3)][1] > 127).mean(), abs=1e-6)
    assert prepared.manifest["non_binary_masks"] == 0
    assert prepared.original_sizes.tolist() == [[40, 48]] * 10
    assert leftovers(tmp_path) == []


def test_zipped_archives_give_the_same_cache_as_folders(isic_source, tmp_path):
    root, _ = isic_source
    from_folders = PreparedDataset(prepare_dataset("isic2017", root, tmp_path / "a", SIZE))
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for name in ISIC2017_TRAIN + ISIC2017_VAL:
        zip_folder(root / name, zipped / f"{name}.zip")
    from_zips = PreparedDataset(prepare_dataset("isic2017", zipped, tmp_path / "b", SIZE))
    assert from_zips.ids == from_folders.ids
    assert from_zips.manifest["layout"] == "isic-archive"
    np.testing.assert_array_equal(from_zips.images, from_folders.images)
    np.testing.assert_array_equal(from_zips.masks, from_folders.masks)
    assert from_zips.manifest_hash == from_folders.manifest_hash  # same bytes, other paths


def test_authors_layout_pairs_by_stem_not_by_sort_order(tmp_path):
    """Sorted, the image list (1, 10, 2, 20) and mask list (10_mask, 1_mask, 20_mask, 2_mask)
    disagree; pairing must still follow the stem."""
    root = tmp_path / "authors"
    numbers = [1, 10, 2, 20, 3]
    for split, subset in (("train", numbers[:4]), ("val", numbers[4:])):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for n in reversed(subset):
            image, mask = make_pair(n)
            (root / split / "images" / f"{n}.png").write_bytes(image_bytes(image, "PNG"))
            (root / split / "masks" / f"{n}_mask.png").write_bytes(image_bytes(mask, "PNG"))
    prepared = PreparedDataset(prepare_dataset("folder", root, tmp_path / "out", SIZE))
    assert prepared.split("challenge") == {"train": ["1", "10", "2", "20"], "val": ["3"]}
    for n in numbers:
        row = prepared.index_of([str(n)])[0]
        image, mask = expected_arrays(*make_pair(n))
        np.testing.assert_array_equal(prepared.masks[row], mask)
        assert prepared.images[row][..., 0].min() == prepared.images[row][..., 0].max() == n


def test_non_binary_masks_are_binarised_and_counted(tmp_path):
    root = tmp_path / "raw"
    write_isic_folders(root, ISIC2017_TRAIN, range(4), extras=False)
    mask_dir = root / ISIC2017_TRAIN[1]
    _, mask = make_pair(1)
    grey = mask.copy()
    grey[:, :2] = 128  # an antialiased edge
    (mask_dir / f"{isic_id(1)}_segmentation.png").write_bytes(image_bytes(grey, "PNG"))
    _, mask = make_pair(2)
    (mask_dir / f"{isic_id(2)}_segmentation.png").write_bytes(image_bytes(mask // 255, "PNG"))
    prepared = PreparedDataset(prepare_dataset("isic2017", root, tmp_path / "out", SIZE))
    assert prepared.manifest["non_binary_masks"] == 2
    assert prepared.manifest["non_binary_mask_ids"] == [isic_id(1), isic_id(2)]
    assert set(np.unique(prepared.masks).tolist()) == {0, 1}
    # The 0/1 mask keeps its lesion (it is scaled to 0/255 before the 127 threshold).
    np.testing.assert_array_equal(prepared.masks[2], expected_arrays(*make_pair(2))[1])


def test_rerun_on_unchanged_input_does_nothing_and_a_change_rebuilds(isic_source, tmp_path):
    root, _ = isic_source
    out = tmp_path / "out"
    prepare_dataset("isic2017", root, out, SIZE)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    manifest = (out / "manifest.json").read_text()
    prepare_dataset("isic2017", root, out, SIZE)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert (out / "manifest.json").read_text() == manifest

    changed = root / ISIC2017_TRAIN[0] / f"{isic_id(0)}.png"
    image, _ = make_pair(50)
    changed.write_bytes(image_bytes(image, "PNG"))
    prepared = PreparedDataset(prepare_dataset("isic2017", root, out, SIZE))
    assert prepared.manifest_hash != json.loads(manifest)["content_hash"]
    assert prepared.images[0][..., 0].max() == 50
    assert leftovers(tmp_path) == []


def test_interrupted_prepare_leaves_no_half_cache_and_keeps_the_old_one(
    isic_source, tmp_path, monkeypatch
):
    root, _ = isic_source
    out = tmp_path / "out"
    calls = []
    real_load = prepare_module._load_pair

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        return real_load(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_load_pair", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("isic2017", root, out, SIZE, num_workers=1)
    assert not out.exists()
    assert leftovers(tmp_path) == []

    monkeypatch.setattr(prepare_module, "_load_pair", real_load)
    good = PreparedDataset(prepare_dataset("isic2017", root, out, SIZE))
    manifest = (out / "manifest.json").read_text()
    (root / ISIC2017_TRAIN[0] / f"{isic_id(0)}.png").write_bytes(
        image_bytes(make_pair(9)[0], "PNG")
    )
    calls.clear()
    monkeypatch.setattr(prepare_module, "_load_pair", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("isic2017", root, out, SIZE, num_workers=1)
    assert (out / "manifest.json").read_text() == manifest
    assert PreparedDataset(out).images[0].tobytes() == good.images[0].tobytes()
    assert leftovers(tmp_path) == []


def test_staging_folder_of_a_killed_run_is_cleaned_up(isic_source, tmp_path):
    root, _ = isic_source
    abandoned = tmp_path / ".out.partial-999999999-deadbeef"  # no such process
    abandoned.mkdir()
    (abandoned / "images.npy").write_bytes(b"half")
    prepare_dataset("isic2017", root, tmp_path / "out", SIZE)
    assert not abandoned.exists()


# ---------------------------------------------------------------------------------------
# Bad input: a clear error naming the file or folder, and nothing written.


def _assert_fails_cleanly(root: Path, tmp_path: Path, error: type, *needles: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(error) as caught:
        prepare_dataset("isic2017", root, out, SIZE)
    for needle in needles:
        assert needle in str(caught.value)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_image_without_mask(isic_source, tmp_path):
    root, _ = isic_source
    (root / ISIC2017_TRAIN[1] / f"{isic_id(4)}_segmentation.png").unlink()
    _assert_fails_cleanly(root, tmp_path, ValueError, f"{isic_id(4)}.png", "without mask")


def test_mask_without_image(isic_source, tmp_path):
    root, _ = isic_source
    (root / ISIC2017_VAL[0] / f"{isic_id(101)}.png").unlink()
    _assert_fails_cleanly(
        root, tmp_path, ValueError, f"{isic_id(101)}_segmentation.png", "without image"
    )


def test_unreadable_image(isic_source, tmp_path):
    root, _ = isic_source
    (root / ISIC2017_TRAIN[0] / f"{isic_id(2)}.png").write_bytes(b"this is not an image")
    _assert_fails_cleanly(root, tmp_path, ValueError, "cannot read image", f"{isic_id(2)}.png")


def test_truncated_image(isic_source, tmp_path):
    root, _ = isic_source
    target = root / ISIC2017_TRAIN[0] / f"{isic_id(5)}.png"
    target.unlink()
    jpeg = image_bytes(make_pair(5)[0], "JPEG")
    (target.with_suffix(".jpg")).write_bytes(jpeg[: len(jpeg) // 2])
    _assert_fails_cleanly(root, tmp_path, ValueError, "cannot read image", f"{isic_id(5)}.jpg")


def test_mask_size_differs_from_image(isic_source, tmp_path):
    root, _ = isic_source
    mask = np.zeros((41, 48), np.uint8)
    (root / ISIC2017_TRAIN[1] / f"{isic_id(3)}_segmentation.png").write_bytes(
        image_bytes(mask, "PNG")
    )
    _assert_fails_cleanly(
        root, tmp_path, ValueError, f"{isic_id(3)}_segmentation.png", "48x41", "48x40"
    )


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_fails_cleanly(
        tmp_path / "empty", tmp_path, ValueError, "empty", str(tmp_path / "empty")
    )


def test_empty_image_folder(tmp_path):
    root = tmp_path / "raw"
    (root / ISIC2017_TRAIN[0]).mkdir(parents=True)
    (root / ISIC2017_TRAIN[1]).mkdir(parents=True)
    _assert_fails_cleanly(root, tmp_path, ValueError, "no ISIC images", ISIC2017_TRAIN[0])


def test_missing_mask_folder(tmp_path):
    root = tmp_path / "raw"
    write_isic_folders(root, ISIC2017_TRAIN, range(2))
    shutil.rmtree(root / ISIC2017_TRAIN[1])
    _assert_fails_cleanly(root, tmp_path, FileNotFoundError, ISIC2017_TRAIN[1])


def test_unknown_layout(tmp_path):
    root = tmp_path / "raw"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "a.jpg").write_bytes(b"x")
    _assert_fails_cleanly(
        root, tmp_path, ValueError, "unknown layout", str(root), "ISIC-2017_Training_Data"
    )


def test_missing_source_folder(tmp_path):
    _assert_fails_cleanly(
        tmp_path / "nowhere", tmp_path, FileNotFoundError, str(tmp_path / "nowhere")
    )


def test_same_id_in_two_splits(tmp_path):
    root = tmp_path / "raw"
    write_isic_folders(root, ISIC2017_TRAIN, range(3))
    write_isic_folders(root, ISIC2017_VAL, range(2, 4))
    _assert_fails_cleanly(root, tmp_path, ValueError, isic_id(2), "split train", "split val")


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'isic2019'"):
        prepare_dataset("isic2019", tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="unknown dataset 'isic2019'"):
        get_prepared("isic2019", tmp_path)
    assert not (tmp_path / "out").exists()


def test_bad_size_and_missing_data_root(tmp_path):
    with pytest.raises(ValueError, match="size must be a positive multiple of 32"):
        prepare_dataset("synthetic", None, tmp_path / "out", 100)
    with pytest.raises(ValueError, match="needs data_root"):
        get_prepared("isic2017")


def test_concurrent_prepares_of_one_folder_build_it_once(isic_source, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    root, _ = isic_source
    builds = []
    real_write = prepare_module._write_folder
    monkeypatch.setattr(
        prepare_module, "_write_folder", lambda *a: builds.append(1) or real_write(*a)
    )
    with ThreadPoolExecutor(3) as pool:
        folders = list(
            pool.map(lambda _: prepare_dataset("isic2017", root, tmp_path / "out", SIZE), range(3))
        )
    assert folders == [tmp_path / "out"] * 3
    assert len(builds) == 1
    assert len(PreparedDataset(tmp_path / "out")) == 10
    assert leftovers(tmp_path) == []


def test_prepare_writes_nothing_into_a_read_only_folder(tmp_path):
    """As root every folder is writable, so the permission bits must be what stops us."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=r"prepared dataset .*shared is read-only"):
            prepare_dataset("synthetic", None, shared / "prepared" / "synthetic-32", 32)
        assert list(shared.iterdir()) == []
    finally:
        shared.chmod(0o755)
