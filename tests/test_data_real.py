"""Preparing the real ISIC data in ../shared/data (skipped when it is absent)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from egeunet.data import PreparedDataset, get_prepared, prepare_dataset

ISIC_ID = re.compile(r"^ISIC_\d{7}$")
# SHA-256 of the newline-joined ids of the ISIC 2017 paper test split (seed 42): any change
# of the split rule, the seed or the generator shows up here, on every machine.
ISIC2017_PAPER_TEST_SHA256 = "9118cd035004baca911bb68e9c63076b6fa7a6d93c1bcbe3cd9db47be93ac118"


@pytest.fixture(scope="session")
def isic2017(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    out = tmp_path_factory.mktemp("prepared") / "isic2017-256"
    return PreparedDataset(prepare_dataset("isic2017", shared_data, out, 256))


def test_isic2017_challenge_split_has_2000_train_and_150_val_isic_ids(isic2017):
    challenge = isic2017.split("challenge")
    assert {part: len(ids) for part, ids in challenge.items()} == {"train": 2000, "val": 150}
    assert all(ISIC_ID.match(sample) for sample in isic2017.ids)
    assert len(set(isic2017.ids)) == 2150
    assert isic2017.images.shape == (2150, 256, 256, 3)
    assert isic2017.original_sizes.tolist() == [[192, 256]] * 2150


def test_isic2017_paper_split_is_1500_650_and_stable(isic2017):
    paper = isic2017.split("paper")
    assert (len(paper["train"]), len(paper["test"])) == (1500, 650)
    assert set(paper["train"]).isdisjoint(paper["test"])
    assert set(paper["train"]) | set(paper["test"]) == set(isic2017.ids)
    assert (
        hashlib.sha256("\n".join(paper["test"]).encode()).hexdigest() == ISIC2017_PAPER_TEST_SHA256
    )


def test_isic2017_masks_are_binary_and_nonempty(isic2017):
    masks = isic2017.masks
    assert np.unique(masks).tolist() == [0, 1]
    assert isic2017.manifest["non_binary_masks"] == 0
    fractions = masks.reshape(len(masks), -1).mean(axis=1)
    assert (fractions > 0).all()
    # Fractions after resizing agree with the ones the manifest measured on the originals.
    np.testing.assert_allclose(fractions, isic2017.lesion_fractions, atol=0.02)


def test_isic2017_rerun_is_a_no_op(isic2017, shared_data):
    created = isic2017.manifest["created"]
    again = PreparedDataset(prepare_dataset("isic2017", shared_data, isic2017.root, 256))
    assert again.manifest["created"] == created


def test_isic2018_sample_prepares_47_pairs(shared_data, tmp_path):
    # An explicit cache_dir: the shared data must never be written to, whatever its mode.
    prepared = get_prepared(
        "isic2018", shared_data / "isic2018_sample", size=64, cache_dir=tmp_path
    )
    assert prepared.root == tmp_path / "isic2018-64"
    assert len(prepared) == 47
    assert prepared.ids[0] == "ISIC_0000000" and all(ISIC_ID.match(s) for s in prepared.ids)
    assert prepared.original_sizes.tolist() == [[224, 320]] * 47
    assert prepared.split("challenge") == {"train": prepared.ids}
    paper = prepared.split("paper")
    assert (len(paper["train"]), len(paper["test"])) == (33, 14)
    assert np.unique(prepared.masks).tolist() == [0, 1]
