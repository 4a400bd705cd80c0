"""SegmentationDataset and make_loader: normalisation, joint augmentation, determinism."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import image_bytes
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from egeunet.data import (
    PreparedDataset,
    SegmentationDataset,
    make_loader,
    normalize,
    prepare_dataset,
)

SIZE = 64


def l_shape(offset: int) -> np.ndarray:
    """An asymmetric L: a flip or a rotation always changes it. (SIZE, SIZE) in {0, 1}."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[10 + offset : 50, 14:22] = 1  # vertical bar
    mask[42:50, 14 : 44 - offset] = 1  # foot
    return mask


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    """Eight samples whose image is 30 outside and 200 inside the L, in every channel."""
    root = tmp_path_factory.mktemp("l_shapes")
    for folder in ("images", "masks"):
        (root / "train" / folder).mkdir(parents=True)
    for n in range(8):
        mask = l_shape(n)
        image = np.repeat((30 + 170 * mask)[..., None], 3, axis=2).astype(np.uint8)
        (root / "train" / "images" / f"s{n}.png").write_bytes(image_bytes(image, "PNG"))
        (root / "train" / "masks" / f"s{n}.png").write_bytes(image_bytes(mask * 255, "PNG"))
    return PreparedDataset(
        prepare_dataset("folder", root, root.parent / f"{root.name}-prepared", SIZE)
    )


def flips_of(mask: torch.Tensor) -> list[torch.Tensor]:
    h, v = F.horizontal_flip(mask), F.vertical_flip(mask)
    return [mask, h, v, F.vertical_flip(h)]


def test_without_augmentation_returns_the_cache_normalised(prepared):
    dataset = SegmentationDataset(prepared, prepared.ids, augment=False)
    image, mask = dataset[3]
    assert image.dtype == mask.dtype == torch.float32
    assert image.shape == (3, SIZE, SIZE) and mask.shape == (1, SIZE, SIZE)
    expected = torch.from_numpy(l_shape(3)).float()
    torch.testing.assert_close(mask[0], expected)
    torch.testing.assert_close(image, 255.0 * expected.expand(3, -1, -1))  # 30..200 -> 0..255


def test_normalize_known_answers():
    image = torch.tensor([10, 60, 110], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)
    torch.testing.assert_close(
        normalize(image, "minmax")[:, 0, 0], torch.tensor([0.0, 127.5, 255.0])
    )
    imagenet = normalize(image, "imagenet")[:, 0, 0]
    expected = (
        torch.tensor([10, 60, 110]) / 255.0 - torch.tensor([0.485, 0.456, 0.406])
    ) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(imagenet, expected)
    assert normalize(torch.full((3, 2, 2), 7, dtype=torch.uint8), "minmax").abs().sum() == 0
    with pytest.raises(ValueError, match="unknown normalization 'zscore'"):
        normalize(image, "zscore")


def test_augmentation_keeps_image_and_mask_aligned_and_uses_every_transform(prepared):
    dataset = SegmentationDataset(prepared, prepared.ids, augment=True, seed=3)
    original = torch.from_numpy(l_shape(5)).float()[None]
    seen_flips, rotated = set(), 0
    for seed in range(120):
        image, mask = dataset[(5, seed)]
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        # The image is 255 on the L and 0 elsewhere; bilinear vs nearest differ on edges only.
        agreement = ((image[0] > 127.5) == (mask[0] > 0.5)).float().mean()
        assert agreement > 0.97
        matches = [i for i, flipped in enumerate(flips_of(original)) if torch.equal(mask, flipped)]
        if matches:
            seen_flips.add(matches[0])
            torch.testing.assert_close(image, 255.0 * mask.expand(3, -1, -1))
        else:
            rotated += 1
    assert seen_flips == {0, 1, 2, 3}  # none, horizontal, vertical, both
    assert 35 <= rotated <= 85  # p = 0.5 of 120


def test_fresh_angle_per_sample_and_the_published_one_angle_per_run(prepared):
    original = torch.from_numpy(l_shape(0)).float()[None]

    def rotated_masks(dataset: SegmentationDataset) -> list[torch.Tensor]:
        masks = [dataset[(0, seed)][1] for seed in range(80)]
        return [m for m in masks if not any(torch.equal(m, f) for f in flips_of(original))]

    fresh = rotated_masks(SegmentationDataset(prepared, prepared.ids, augment=True))
    assert len({m.numpy().tobytes() for m in fresh}) > 0.8 * len(fresh)

    per_run = SegmentationDataset(prepared, prepared.ids, augment=True, seed=11, per_run_angle=True)
    angle = per_run.augmentation.run_angle
    allowed = [
        F.rotate(f, angle, interpolation=InterpolationMode.NEAREST) for f in flips_of(original)
    ]
    masks = rotated_masks(per_run)
    assert len(masks) > 20
    assert all(any(torch.equal(m, a) for a in allowed) for m in masks)


def batches(loader, epochs: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch for _ in range(epochs) for batch in loader]


def assert_same(first, second) -> None:
    assert len(first) == len(second)
    for (image_a, mask_a), (image_b, mask_b) in zip(first, second, strict=True):
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)


def test_same_seed_same_batches_twice_and_with_workers(prepared):
    def loader(seed: int, workers: int = 0):
        dataset = SegmentationDataset(prepared, prepared.ids, augment=True, seed=0)
        return make_loader(dataset, batch_size=3, shuffle=True, seed=seed, num_workers=workers)

    run = batches(loader(7))
    assert [len(b[0]) for b in run] == [3, 3, 2, 3, 3, 2]
    assert_same(run, batches(loader(7)))
    assert_same(run, batches(loader(7, workers=2)))
    other = batches(loader(8))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(run, other, strict=True))
    # Epochs differ: a new order and new augmentations each pass.
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(run[:3], run[3:], strict=True))


def test_loader_without_shuffle_keeps_order_and_drop_last(prepared):
    dataset = SegmentationDataset(prepared, prepared.ids, augment=False)
    loader = make_loader(dataset, batch_size=3, shuffle=False, seed=0, drop_last=True)
    masks = [mask for _, mask in loader]
    assert len(masks) == 2
    expected = torch.stack([torch.from_numpy(l_shape(n)).float()[None] for n in range(6)])
    torch.testing.assert_close(torch.cat(masks), expected)


def test_pickling_reopens_arrays_instead_of_copying(prepared):
    _ = prepared.images[0]
    blob = pickle.dumps(prepared)
    assert len(blob) < prepared.images.nbytes // 8
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.masks[2], prepared.masks[2])


def test_unknown_ids_and_settings_are_rejected(prepared):
    with pytest.raises(KeyError, match="'nope'"):
        SegmentationDataset(prepared, ["s0", "nope"], augment=False)
    with pytest.raises(ValueError, match="unknown normalization"):
        SegmentationDataset(prepared, prepared.ids, augment=False, normalization="zscore")
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        prepared.split("holdout")


def test_prepared_dataset_reports_missing_arrays(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared dataset folder"):
        PreparedDataset(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_text((Path(prepared.root) / "manifest.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"images\.npy"):
        _ = PreparedDataset(copy).images


def test_plain_int_indexing_is_seeded_and_fresh_per_call(prepared):
    def draws(seed: int) -> list[torch.Tensor]:
        dataset = SegmentationDataset(prepared, prepared.ids, augment=True, seed=seed)
        return [dataset[1][1] for _ in range(12)]

    first = draws(0)
    assert len({m.numpy().tobytes() for m in first}) > 4
    assert all(torch.equal(a, b) for a, b in zip(first, draws(0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, draws(1), strict=True))
