"""Train/validation/test splits as id lists.

- ``challenge``: the official splits as the source gives them (train, val, test where present).
- ``paper``: the EGE-UNet protocol. The challenge train and validation sets are pooled and
  split 7:3 into train/test with a fixed seed: 1500/650 for ISIC 2017 (2000 + 150) and
  1886/808 for ISIC 2018 (2594 + 100), as published; other pool sizes keep the 7:3 ratio.
- ``kfold-<k>-<i>``: fold ``i`` of ``k`` over the same pool, fold ``i`` as "test".

Shuffles use numpy's PCG64 generator over the sorted ids, so a split depends only on the
ids and the seed, never on file order, platform or Python's hash seed.
"""

from __future__ import annotations

import re

import numpy as np

PAPER_SPLIT_SEED = 42  # the published training seed
PAPER_TRAIN_FRACTION = 0.7
# Pool size -> published number of training images, per dataset.
PUBLISHED_PAPER_TRAIN = {("isic2017", 2150): 1500, ("isic2018", 2694): 1886}
_KFOLD = re.compile(r"^kfold-(\d+)-(\d+)$")


def challenge_split(items: list[dict]) -> dict[str, list[str]]:
    """Official splits from manifest items ({"id", "split"}), ids sorted in each."""
    split: dict[str, list[str]] = {}
    for name in ("train", "val", "test"):
        ids = sorted(item["id"] for item in items if item["split"] == name)
        if ids:
            split[name] = ids
    return split


def paper_pool(challenge: dict[str, list[str]]) -> list[str]:
    """The ids the paper protocol splits: challenge train + validation (never test)."""
    return sorted(challenge.get("train", []) + challenge.get("val", []))


def paper_train_count(dataset: str, pool_size: int) -> int:
    if (dataset, pool_size) in PUBLISHED_PAPER_TRAIN:
        return PUBLISHED_PAPER_TRAIN[(dataset, pool_size)]
    return int(np.floor(pool_size * PAPER_TRAIN_FRACTION + 0.5))


def paper_split(
    dataset: str, pool: list[str], seed: int = PAPER_SPLIT_SEED
) -> dict[str, list[str]]:
    """Seeded 7:3 train/test split of ``pool`` (published counts where they apply)."""
    if len(pool) < 2:
        raise ValueError(f"the paper split needs at least 2 images, got {len(pool)}")
    ordered = np.array(sorted(pool))
    shuffled = ordered[np.random.default_rng(seed).permutation(len(ordered))]
    n_train = min(max(paper_train_count(dataset, len(pool)), 1), len(pool) - 1)
    return {
        "train": sorted(shuffled[:n_train].tolist()),
        "test": sorted(shuffled[n_train:].tolist()),
    }


def check_kfold(k: int, pool_size: int) -> None:
    """ValueError unless ``k`` folds can be made of ``pool_size`` images."""
    if not 2 <= k <= pool_size:
        raise ValueError(f"k-fold needs 2 <= k <= {pool_size} (number of images), got k={k}")


def kfold_split(
    pool: list[str], k: int, fold: int, seed: int = PAPER_SPLIT_SEED
) -> dict[str, list[str]]:
    """Fold ``fold`` (0-based) of a seeded ``k``-fold partition: that fold is "test"."""
    check_kfold(k, len(pool))
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in 0..{k - 1}, got {fold}")
    ordered = np.array(sorted(pool))
    folds = np.array_split(ordered[np.random.default_rng(seed).permutation(len(ordered))], k)
    test = sorted(folds[fold].tolist())
    held_out = set(test)
    return {"train": [i for i in ordered.tolist() if i not in held_out], "test": test}


def parse_kfold(name: str) -> tuple[int, int] | None:
    """(k, fold) for a name like ``kfold-5-2``, else None."""
    found = _KFOLD.match(name)
    return (int(found.group(1)), int(found.group(2))) if found else None


def split_document(name: str, split: dict[str, list[str]], **about: object) -> dict:
    """The JSON saved for a split: its name, how it was made, counts and the id lists."""
    counts = {part: len(ids) for part, ids in split.items()}
    return {"name": name, **about, "counts": counts, **split}


def default_splits(dataset: str, items: list[dict]) -> dict[str, dict]:
    """The split documents every prepared folder carries: challenge and paper."""
    challenge = challenge_split(items)
    paper = paper_split(dataset, paper_pool(challenge))
    return {
        "challenge": split_document("challenge", challenge, rule="official splits as given"),
        "paper": split_document(
            "paper",
            paper,
            rule="challenge train + val pooled, seeded 7:3 train/test (published counts)",
            seed=PAPER_SPLIT_SEED,
        ),
    }


def kfold_document(
    dataset_pool: list[str], k: int, fold: int, seed: int = PAPER_SPLIT_SEED
) -> dict:
    return split_document(
        f"kfold-{k}-{fold}",
        kfold_split(dataset_pool, k, fold, seed),
        rule=f"challenge train + val pooled, seeded {k}-fold, fold {fold} held out as test",
        seed=seed,
    )
