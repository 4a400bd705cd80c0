"""Split rules: published counts, 7:3 elsewhere, seeded and order-independent, k-fold."""

from __future__ import annotations

import pytest

from egeunet.data.splits import kfold_split, paper_pool, paper_split


def ids(n: int) -> list[str]:
    return [f"ISIC_{i:07d}" for i in range(n)]


@pytest.mark.parametrize(
    ("dataset", "n", "train", "test"),
    [
        ("isic2017", 2150, 1500, 650),  # 2000 + 150, published
        ("isic2018", 2694, 1886, 808),  # 2594 + 100, published
        ("isic2018", 2594, 1816, 778),  # training set only: 7:3
        ("synthetic", 200, 140, 60),
        ("folder", 47, 33, 14),
    ],
)
def test_paper_split_counts(dataset, n, train, test):
    split = paper_split(dataset, ids(n))
    assert (len(split["train"]), len(split["test"])) == (train, test)
    assert set(split["train"]).isdisjoint(split["test"])
    assert sorted(split["train"] + split["test"]) == ids(n)


def test_paper_split_known_answer_and_independent_of_input_order():
    pool = [f"id{i:02d}" for i in range(10)]
    expected = {
        "train": ["id00", "id02", "id03", "id04", "id05", "id06", "id07"],
        "test": ["id01", "id08", "id09"],
    }
    assert paper_split("folder", pool) == expected
    assert paper_split("folder", list(reversed(pool))) == expected
    assert paper_split("folder", pool, seed=1) != expected


def test_paper_pool_is_train_plus_val_never_test():
    challenge = {"train": ["b", "a"], "val": ["c"], "test": ["d"]}
    assert paper_pool(challenge) == ["a", "b", "c"]


def test_kfold_partitions_the_pool():
    pool = ids(23)
    tests = [kfold_split(pool, 5, fold)["test"] for fold in range(5)]
    assert sorted(sample for test in tests for sample in test) == pool
    assert sorted(len(t) for t in tests) == [4, 4, 5, 5, 5]
    fold = kfold_split(pool, 5, 2)
    assert set(fold["train"]) == set(pool) - set(fold["test"])


def test_kfold_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"fold must be in 0\.\.4"):
        kfold_split(ids(10), 5, 5)
    with pytest.raises(ValueError, match="k-fold needs 2 <= k <= 10"):
        kfold_split(ids(10), 11, 0)
