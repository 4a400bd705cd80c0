"""The device-resident batch pipeline (egeunet.data.device) on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from egeunet.data import get_prepared
from egeunet.data.dataset import SegmentationDataset, normalize
from egeunet.data.device import DeviceLoader, augment_batch, normalize_batch, rotation_grid


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return get_prepared("synthetic", size=64, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("normalization", ["minmax", "imagenet"])
def test_batch_normalisation_matches_the_per_sample_one(normalization):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    images[2] = 7  # a flat image: zeros under min-max
    expected = torch.stack([normalize(image, normalization) for image in images])
    torch.testing.assert_close(normalize_batch(images, normalization), expected)


@pytest.mark.parametrize("angle", [30.0, 90.0, 211.0])
@pytest.mark.parametrize("shape", [(64, 64), (48, 80)])
def test_rotation_matches_torchvision(angle, shape):
    torch.manual_seed(1)
    image = torch.rand(1, 3, *shape)
    mask = (torch.rand(1, 1, *shape) > 0.5).float()
    grid = rotation_grid(torch.tensor([angle]), *shape)
    ours = torch.nn.functional.grid_sample(image, grid, mode="bilinear", align_corners=False)
    theirs = TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    ours_mask = torch.nn.functional.grid_sample(mask, grid, mode="nearest", align_corners=False)
    theirs_mask = TF.rotate(mask, angle)
    assert (ours_mask == theirs_mask).float().mean() > 0.99  # ties at pixel edges aside


def test_flips_and_rotation_act_jointly_and_per_sample():
    # Off-centre squares: the image is its own mask, so a joint transform keeps the image
    # (bilinear) thresholded at 0.5 equal to the mask (nearest) but for edge pixels.
    masks = torch.zeros(64, 1, 32, 32)
    for n in range(64):
        top, left = 3 + n % 7, 4 + n % 5
        masks[n, :, top : top + 12, left : left + 9] = 1.0
    images = masks.repeat(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(0)
    out_images, out_masks = augment_batch(images, masks, generator, p=0.5)
    agreement = ((out_images[:, :1] > 0.5).float() == out_masks).float().mean((1, 2, 3))
    assert agreement.min() > 0.95
    changed = [not torch.equal(a, b) for a, b in zip(out_masks, masks, strict=True)]
    assert 0.7 < sum(changed) / len(changed) < 0.98  # 1 - 0.5**3 = 0.875 expected
    assert set(torch.unique(out_masks).tolist()) <= {0.0, 1.0}


def test_loader_covers_the_split_repeats_with_its_seed_and_resumes_from_its_state(prepared):
    ids = prepared.ids[:20]
    loader = DeviceLoader(prepared, ids, batch_size=8, shuffle=True, seed=3, augment=True)
    assert len(loader) == 3
    first = [images.clone() for images, _ in loader]
    assert [len(b) for b in first] == [8, 8, 4]
    assert first[0].dtype == torch.float32 and first[0].shape[1:] == (3, 64, 64)
    state = loader.generator.get_state()
    second = [images.clone() for images, _ in loader]
    assert not torch.equal(first[0], second[0])  # epochs differ
    again = DeviceLoader(prepared, ids, batch_size=8, shuffle=True, seed=3, augment=True)
    assert all(torch.equal(a, b) for (a, _), b in zip(again, first, strict=True))  # runs repeat
    resumed = DeviceLoader(prepared, ids, batch_size=8, shuffle=True, seed=3, augment=True)
    resumed.fast_forward(1)
    resumed.generator.set_state(state)
    assert all(torch.equal(a, b) for (a, _), b in zip(resumed, second, strict=True))


def test_unaugmented_unshuffled_batches_equal_the_cpu_loaders(prepared):
    ids = prepared.ids[:10]
    device = DeviceLoader(prepared, ids, batch_size=4, shuffle=False, seed=0, augment=False)
    dataset = SegmentationDataset(prepared, ids, augment=False)
    images = torch.cat([b for b, _ in device])
    masks = torch.cat([m for _, m in device])
    for position in range(len(ids)):
        image, mask = dataset[position]
        torch.testing.assert_close(images[position], image)
        torch.testing.assert_close(masks[position], mask)
    assert set(np.unique(masks.numpy())) <= {0.0, 1.0}


def test_bad_arguments_are_named(prepared):
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(prepared, prepared.ids[:4], batch_size=0, shuffle=False, seed=0, augment=False)
    with pytest.raises(ValueError, match="normalization"):
        DeviceLoader(
            prepared, prepared.ids[:4], 2, shuffle=False, seed=0, augment=False, normalization="z"
        )
