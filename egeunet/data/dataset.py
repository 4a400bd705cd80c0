"""Training-time access to a prepared dataset: normalisation, joint augmentation, loaders.

Augmentation follows the published recipe: horizontal flip, vertical flip and rotation by
an angle in [0, 360), each applied with probability 0.5, acting jointly on the image
(bilinear) and the mask (``tv_tensors.Mask``, nearest neighbour) through
``torchvision.transforms.v2.functional``. The angle is drawn afresh for every sample;
``per_run_angle=True`` reproduces the published code, which draws one angle per run.

Randomness comes from an explicit per-sample seed. ``make_loader``'s sampler hands each
index out with a seed drawn from its own generator, so batches and augmentations depend
only on the loader's seed: the same with 0 or N workers, fresh in every epoch.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from egeunet.data.store import PreparedDataset


class Normalization(enum.StrEnum):
    """How pixels are scaled for the model: per-image min-max (published) or ImageNet's."""

    MINMAX = "minmax"
    IMAGENET = "imagenet"


NORMALIZATIONS = tuple(n.value for n in Normalization)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENT_PROBABILITY = 0.5

SampleKey = int | tuple[int, int]  # a position, or (position, augmentation seed)


class JointAugmentation:
    """Flips and rotation applied identically to an image and its mask."""

    def __init__(
        self, per_run_angle: bool = False, seed: int = 0, p: float = AUGMENT_PROBABILITY
    ) -> None:
        self.p = p
        # The published transform draws its angle once, when it is built.
        self.run_angle = (
            float(np.random.default_rng(seed).uniform(0, 360)) if per_run_angle else None
        )

    def __call__(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask, generator: torch.Generator
    ) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        hflip, vflip, rotate, angle_draw = torch.rand(4, generator=generator).tolist()
        if hflip < self.p:
            image, mask = F.horizontal_flip(image), F.horizontal_flip(mask)
        if vflip < self.p:
            image, mask = F.vertical_flip(image), F.vertical_flip(mask)
        if rotate < self.p:
            angle = self.run_angle if self.run_angle is not None else angle_draw * 360.0
            image = F.rotate(image, angle, interpolation=InterpolationMode.BILINEAR)
            mask = F.rotate(mask, angle)  # masks always use nearest neighbour
        return image, mask


def normalize(image: torch.Tensor, normalization: str) -> torch.Tensor:
    """(3, H, W) uint8 -> float32. "minmax": the published per-image min-max to 0..255
    (the fixed mean/std standardisation before it cancels out); "imagenet": mean/std."""
    pixels = image.to(torch.float32)
    if normalization == "minmax":
        low, high = pixels.min(), pixels.max()
        return (pixels - low) * (255.0 / (high - low)) if high > low else torch.zeros_like(pixels)
    if normalization == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (pixels / 255.0 - mean) / std
    raise ValueError(
        f"unknown normalization {normalization!r}: expected one of {', '.join(NORMALIZATIONS)}"
    )


class SegmentationDataset(Dataset):
    """Samples ``ids`` of a prepared dataset as (image (3, S, S), mask (1, S, S)) float32.

    Normalisation comes first and augmentation second, as in the published pipeline (so
    the zeros a rotation brings in are zeros in normalised units). Indexing with a plain
    int draws augmentation from a generator seeded by ``seed`` that advances per call;
    ``make_loader`` passes (index, seed) keys instead, for worker-independent results.
    """

    def __init__(
        self,
        prepared: PreparedDataset,
        ids: Sequence[str],
        augment: bool,
        normalization: str = "minmax",
        seed: int = 0,
        per_run_angle: bool = False,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {normalization!r}: expected one of {', '.join(NORMALIZATIONS)}"
            )
        self.prepared = prepared
        self.ids = list(ids)
        self.rows = prepared.index_of(self.ids)
        self.augment = augment
        self.normalization = normalization
        self.augmentation = JointAugmentation(per_run_angle=per_run_angle, seed=seed)
        self.seed = seed
        self._fallback: tuple[int | None, np.random.Generator] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        position, sample_seed = key if isinstance(key, tuple) else (key, None)
        row = int(self.rows[position])
        image = torch.from_numpy(np.array(self.prepared.images[row])).permute(2, 0, 1)  # (3, S, S)
        mask = torch.from_numpy(np.array(self.prepared.masks[row]))[None]  # (1, S, S) uint8
        image = tv_tensors.Image(normalize(image, self.normalization))
        mask = tv_tensors.Mask(mask)
        if self.augment:
            if sample_seed is None:
                sample_seed = self._next_fallback_seed()
            generator = torch.Generator().manual_seed(sample_seed)
            image, mask = self.augmentation(image, mask, generator)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).to(torch.float32)

    def _next_fallback_seed(self) -> int:
        """Seed for plain-int indexing: a stream per process, so DataLoader workers that
        received copies of this dataset do not repeat each other's augmentations."""
        worker = get_worker_info()
        worker_seed = worker.seed if worker is not None else None
        if self._fallback is None or self._fallback[0] != worker_seed:
            entropy = [self.seed] if worker_seed is None else [self.seed, worker_seed]
            self._fallback = (worker_seed, np.random.default_rng(entropy))
        return int(self._fallback[1].integers(2**62))


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields (index, augmentation seed) pairs; each pass draws a new order (if shuffling)
    and new seeds from a generator seeded once, so epochs differ but runs repeat."""

    def __init__(self, length: int, shuffle: bool, seed: int) -> None:
        self.length = length
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.rng.permutation(self.length) if self.shuffle else np.arange(self.length)
        seeds = self.rng.integers(0, 2**62, size=self.length)
        return iter(zip(order.tolist(), seeds.tolist(), strict=True))


def seed_worker(worker_id: int) -> None:
    """Seed Python and numpy in a worker from torch's per-worker seed; one thread each."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    torch.set_num_threads(1)


def make_loader(
    dataset: SegmentationDataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose batches (order and augmentation) depend only on ``seed``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SeededSampler(len(dataset), shuffle, seed),
        num_workers=num_workers,
        drop_last=drop_last,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
