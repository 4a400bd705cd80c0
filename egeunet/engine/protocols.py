"""Data for a protocol: which ids train, select and report (:func:`protocol_splits`), the
dataset a config names, and the loaders that feed the trainer and the evaluation.

* ``"paper"`` as published: train on the paper split's train part; its test part is
  evaluated every ``val_interval`` epochs and picks the checkpoint ("test-set model
  selection"), which is then reported on that same test part.
* ``"clean"``: select on data the test split never sees: the challenge split's val part
  when the challenge split also has a test part; otherwise a fixed 10% hold-out of the
  paper train part (seed ``HOLDOUT_SEED``), with the paper test part evaluated once, at
  the end, with best.pt ("validation-set model selection").
* ``"challenge"``: train on the challenge train part and select and report on its val
  part (e.g. ISIC 2017's 2000/150); selection and report share data, so it is labelled
  test-set model selection too.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from egeunet.data import PreparedDataset, SegmentationDataset, get_prepared, make_loader
from egeunet.data.device import DeviceLoader
from egeunet.engine.config import Protocol, TrainConfig

TEST_SELECTION = "test-set model selection"
VALIDATION_SELECTION = "validation-set model selection"
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 20230715


@dataclass
class ProtocolSplits:
    """The id lists a protocol trains, selects and reports on."""

    protocol: str
    selection: str
    train: list[str]
    val: list[str]
    test: list[str]
    val_source: str

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def part(self, name: str) -> list[str]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split: expected train, val or test, got {name!r}")
        return getattr(self, name)


def holdout(
    ids: Sequence[str], fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED
) -> tuple[list[str], list[str]]:
    """Split ``ids`` into (kept, held out) with a seeded shuffle; both keep the input order."""
    count = max(1, round(len(ids) * fraction))
    if count >= len(ids):
        raise ValueError(f"cannot hold out {count} of {len(ids)} training images for validation")
    chosen = set(np.random.default_rng(seed).permutation(len(ids))[:count].tolist())
    kept = [i for n, i in enumerate(ids) if n not in chosen]
    held = [i for n, i in enumerate(ids) if n in chosen]
    return kept, held


def protocol_splits(config: TrainConfig, prepared: PreparedDataset) -> ProtocolSplits:
    """Resolve ``config.protocol`` on ``prepared`` (caps from max_*_images applied)."""
    if config.protocol == Protocol.PAPER:
        paper = prepared.split("paper")
        splits = ProtocolSplits(
            "paper", TEST_SELECTION, paper["train"], paper["test"], paper["test"], "paper test"
        )
    elif config.protocol == Protocol.CHALLENGE:
        challenge = prepared.split("challenge")
        if "val" not in challenge:
            raise ValueError(f"protocol challenge: {prepared.name} has no challenge val split")
        splits = ProtocolSplits(
            "challenge", TEST_SELECTION, challenge["train"], challenge["val"], challenge["val"],
            "challenge val",
        )  # fmt: skip
    else:
        challenge = prepared.split("challenge")
        if "val" in challenge and "test" in challenge:
            splits = ProtocolSplits(
                "clean", VALIDATION_SELECTION, challenge["train"], challenge["val"],
                challenge["test"], "challenge val",
            )  # fmt: skip
        else:
            paper = prepared.split("paper")
            kept, held = holdout(paper["train"])
            source = f"{HOLDOUT_FRACTION:.0%} hold-out of paper train (seed {HOLDOUT_SEED})"
            splits = ProtocolSplits(
                "clean", VALIDATION_SELECTION, kept, held, paper["test"], source
            )
    if config.max_train_images:
        splits.train = splits.train[: config.max_train_images]
    if config.max_eval_images:
        splits.val = splits.val[: config.max_eval_images]
        splits.test = splits.test[: config.max_eval_images]
    for name, ids in splits.counts().items():
        if ids == 0:
            raise ValueError(
                f"protocol {config.protocol}: the {name} part of {prepared.name} is empty"
            )
    return splits


def open_dataset(config: TrainConfig) -> PreparedDataset:
    return get_prepared(config.dataset, config.data_root, size=config.image_size)


def make_split_loader(config: TrainConfig, prepared: PreparedDataset, ids: list[str], train: bool):
    dataset = SegmentationDataset(
        prepared,
        ids,
        augment=train,
        normalization=config.normalization,
        seed=config.seed,
        per_run_angle=config.per_run_angle,
    )
    return make_loader(
        dataset, config.batch_size, shuffle=train, seed=config.seed, num_workers=config.num_workers
    )


class Pipeline(enum.StrEnum):
    """Where training batches are built (:func:`resolve_pipeline`)."""

    AUTO = "auto"
    LOADER = "loader"
    DEVICE = "device"


PIPELINES = tuple(p.value for p in Pipeline)


def resolve_pipeline(name: str, device: torch.device) -> str:
    """ "auto" -> "device" (batches built on the GPU) on CUDA, "loader" (a DataLoader of
    per-sample CPU work) elsewhere; "loader" and "device" as given."""
    if name not in PIPELINES:
        raise ValueError(f"pipeline: expected one of {', '.join(PIPELINES)}, got {name!r}")
    if name == "auto":
        return "device" if device.type == "cuda" else "loader"
    return name


def make_device_loader(
    config: TrainConfig, prepared: PreparedDataset, ids: list[str], device, train: bool
) -> DeviceLoader:
    return DeviceLoader(
        prepared,
        ids,
        config.batch_size,
        shuffle=train,
        seed=config.seed,
        augment=train,
        normalization=config.normalization,
        per_run_angle=config.per_run_angle,
        device=device,
    )


def single_threaded_batches(loader) -> Iterator:
    """Iterate ``loader`` with torch limited to one thread while each batch is assembled.

    Per-sample work (normalisation, flips, rotation of one 256x256 image) is too small to
    gain from intra-op threads, and on a busy machine their synchronisation costs many
    times the work (measured on the shared 2-core machine: 2.6 ms vs 90 ms per augmented
    sample; on a quiet machine about 1 ms either way, and switching costs nothing). Loader workers
    already run single-threaded; this gives the in-process loader (``num_workers=0``) the
    same setting, and so the same results. The model keeps every thread.
    """
    if loader.num_workers > 0:
        yield from loader
        return
    iterator = iter(loader)
    while True:
        threads = torch.get_num_threads()  # read each time: the trainer may change it
        torch.set_num_threads(1)
        try:
            batch = next(iterator)
        except StopIteration:
            return
        finally:
            torch.set_num_threads(threads)
        yield batch
