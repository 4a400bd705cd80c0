"""The synthetic dataset: deterministic, disjoint splits, exact masks, and hard enough that
simple baselines and an untrained model score poorly while training learns it."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from egeunet.data import SegmentationDataset, get_prepared, make_loader
from egeunet.data.dataset import normalize
from egeunet.data.synthetic import generate_sample, split_counts


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (predicted & truth).sum() / max(1, predicted.sum() + truth.sum()))


def otsu_threshold(grey: np.ndarray) -> int:
    """Grey level maximising the between-class variance (Otsu 1979)."""
    share = np.bincount(grey.ravel(), minlength=256) / grey.size
    weight, mean = np.cumsum(share), np.cumsum(share * np.arange(256))
    between = (mean[-1] * weight - mean) ** 2 / (weight * (1 - weight) + 1e-12)
    return int(np.argmax(between))


def test_samples_are_deterministic_and_splits_use_disjoint_streams():
    image, mask = generate_sample(0, "train", 3, 64)
    again, again_mask = generate_sample(0, "train", 3, 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert mask.shape == (64, 64) and set(np.unique(mask).tolist()) == {0, 1}
    assert np.array_equal(image, again) and np.array_equal(mask, again_mask)
    others = [
        generate_sample(0, "val", 3, 64),
        generate_sample(0, "test", 3, 64),
        generate_sample(1, "train", 3, 64),
    ]
    assert all(not np.array_equal(mask, other_mask) for _, other_mask in others)


def test_split_counts_scale_with_the_total():
    assert split_counts(None) == {"train": 160, "val": 40, "test": 60}
    assert split_counts(13) == {"train": 8, "val": 2, "test": 3}
    assert sum(split_counts(1000).values()) == 1000
    with pytest.raises(ValueError, match="num_synthetic"):
        split_counts(2)


def test_masks_are_exact_lesions_of_varied_size_darker_than_skin():
    fractions, darker = [], 0
    for index in range(40):
        image, mask = generate_sample(5, "train", index, 128)
        fractions.append(mask.mean())
        grey = image.mean(axis=2)
        darker += grey[mask == 1].mean() < grey[mask == 0].mean()
    assert min(fractions) > 0.005 and max(fractions) < 0.75
    assert np.std(fractions) > 0.05
    assert darker >= 36  # pigmented lesions (a few faint ones may not be)


def test_hard_for_a_threshold_and_an_untrained_model():
    from egeunet.model import EGEUNet

    samples = [generate_sample(0, "test", index, 128) for index in range(24)]
    otsu = [
        dice(s.mean(2) < otsu_threshold(s.mean(2).astype(np.uint8)), m == 1) for s, m in samples
    ]
    assert 0.3 < np.mean(otsu) < 0.75
    torch.manual_seed(0)
    model = EGEUNet().eval()
    batch = torch.stack(
        [normalize(torch.from_numpy(s).permute(2, 0, 1), "minmax") for s, _ in samples]
    )
    with torch.no_grad():
        predicted = model(batch)[0][:, 0].numpy() > 0
    assert np.mean([dice(p, m == 1) for p, (_, m) in zip(predicted, samples, strict=True)]) < 0.45


def test_get_prepared_synthetic_caches_by_size_count_and_seed(tmp_path):
    prepared = get_prepared("synthetic", size=64, cache_dir=tmp_path, num_synthetic=13, seed=4)
    assert prepared.root == tmp_path / "synthetic-64-n13-s4"
    assert prepared.split("challenge") == {
        "train": [f"synthetic_train_{i:05d}" for i in range(8)],
        "val": [f"synthetic_val_{i:05d}" for i in range(2)],
        "test": [f"synthetic_test_{i:05d}" for i in range(3)],
    }
    paper = prepared.split("paper")
    assert (len(paper["train"]), len(paper["test"])) == (7, 3)
    assert not set(paper["test"]) & set(prepared.split("challenge")["test"])
    image, mask = generate_sample(4, "val", 1, 64)
    row = prepared.index_of(["synthetic_val_00001"])[0]
    assert np.array_equal(prepared.images[row], image) and np.array_equal(prepared.masks[row], mask)
    created = prepared.manifest["created"]
    assert (
        get_prepared("synthetic", size=64, cache_dir=tmp_path, num_synthetic=13, seed=4).manifest[
            "created"
        ]
        == created
    )
    assert (
        get_prepared("synthetic", size=64, cache_dir=tmp_path, num_synthetic=13, seed=5).root.name
        == "synthetic-64-n13-s5"
    )


@pytest.mark.slow
def test_a_trained_egeunet_learns_the_synthetic_task(tmp_path):
    """Short real training (BCE + Dice, AdamW as published) reaches a good validation DSC."""
    from egeunet.model import EGEUNet

    torch.manual_seed(0)
    prepared = get_prepared("synthetic", size=128, cache_dir=tmp_path)
    challenge = prepared.split("challenge")
    train = make_loader(
        SegmentationDataset(prepared, challenge["train"], augment=True), 8, True, seed=0
    )
    val = make_loader(
        SegmentationDataset(prepared, challenge["val"], augment=False), 20, False, seed=0
    )
    model = EGEUNet()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    started = time.perf_counter()
    for _ in range(30):
        model.train()
        for images, masks in train:
            logits = model(images)[0]
            probability = logits.sigmoid()
            overlap = (2 * (probability * masks).sum((1, 2, 3)) + 1) / (
                probability.sum((1, 2, 3)) + masks.sum((1, 2, 3)) + 1
            )
            loss = (
                torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
                + 1
                - overlap.mean()
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        scores = [dice(model(x)[0].numpy() > 0, y.numpy() > 0.5) for x, y in val]
    print(
        f"synthetic val DSC after 30 epochs at 128 px: {np.mean(scores):.3f} ({time.perf_counter() - started:.0f} s)"
    )
    assert np.mean(scores) > 0.8
