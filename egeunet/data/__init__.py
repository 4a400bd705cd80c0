"""Data for EGE-UNet: ISIC 2017/2018 sources, a synthetic default, preparation into cached
uint8 arrays, splits, and the training Dataset/DataLoader.

Typical use::

    prepared = get_prepared("isic2017", data_root="data/raw")      # or "synthetic"
    ids = prepared.split("paper")["train"]
    loader = make_loader(SegmentationDataset(prepared, ids, augment=True), 8, True, seed=42)
"""

from egeunet.data.dataset import (
    JointAugmentation,
    SeededSampler,
    SegmentationDataset,
    make_loader,
    normalize,
)
from egeunet.data.prepare import DATASETS, prepare_dataset, read_manifest
from egeunet.data.sources import discover_pairs
from egeunet.data.splits import PAPER_SPLIT_SEED, kfold_split, paper_split
from egeunet.data.store import PreparedDataset, cache_folder, get_prepared

__all__ = [
    "DATASETS",
    "PAPER_SPLIT_SEED",
    "JointAugmentation",
    "PreparedDataset",
    "SeededSampler",
    "SegmentationDataset",
    "cache_folder",
    "discover_pairs",
    "get_prepared",
    "kfold_split",
    "make_loader",
    "normalize",
    "paper_split",
    "prepare_dataset",
    "read_manifest",
]
