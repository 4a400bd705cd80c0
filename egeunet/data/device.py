"""Batches assembled on the training device: the GPU path without per-step host work.

:class:`DeviceLoader` copies a split's uint8 images ``(N, 3, S, S)`` and masks
``(N, 1, S, S)`` to the device once (ISIC 2017 at 256 px: 0.42 GB), then gathers,
normalises and augments every batch there, as whole-batch tensor operations:

* normalisation as :func:`egeunet.data.dataset.normalize` (per-image min-max to 0..255,
  or ImageNet mean/std), before augmentation as in the published pipeline;
* horizontal flip, vertical flip and a rotation about the image centre by an angle in
  [0, 360), each with probability 0.5 per sample (one angle per run with
  ``per_run_angle``, the published bug), bilinear for images and nearest for masks, zeros
  outside: the transforms of :class:`egeunet.data.dataset.JointAugmentation`.

Order and augmentation come from one ``torch.Generator`` on the device, seeded by
``seed``: runs repeat, epochs differ, and its state is the whole resume state. The draws
differ from the CPU loader's, so a run on one pipeline is not batch-for-batch the same as
on the other. The same code runs on CPU (tested there).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from egeunet.data.dataset import (
    AUGMENT_PROBABILITY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALIZATIONS,
)
from egeunet.data.store import PreparedDataset


def normalize_batch(images: torch.Tensor, normalization: str) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 -> float32, per image, as ``dataset.normalize``."""
    pixels = images.to(torch.float32)
    if normalization == "minmax":
        low = pixels.amin((1, 2, 3), keepdim=True)
        high = pixels.amax((1, 2, 3), keepdim=True)
        spread = high - low
        scaled = (pixels - low) * (255.0 / spread.clamp_min(1e-12))
        return torch.where(spread > 0, scaled, torch.zeros_like(pixels))
    if normalization == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        return (pixels / 255.0 - mean) / std
    raise ValueError(
        f"unknown normalization {normalization!r}: expected one of {', '.join(NORMALIZATIONS)}"
    )


def rotation_grid(angles_deg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sampling grids ``(B, H, W, 2)`` that rotate images counter-clockwise (as displayed)
    by ``angles_deg`` about their centre, like torchvision's ``rotate`` (no expansion)."""
    radians = angles_deg.to(torch.float32) * (math.pi / 180.0)
    cos, sin = torch.cos(radians), torch.sin(radians)
    # Output pixel -> input pixel is the inverse rotation; normalised coordinates scale x
    # by 2/W and y by 2/H, hence the aspect factors off the diagonal.
    theta = torch.zeros(len(angles_deg), 2, 3, device=angles_deg.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (height / width)
    theta[:, 1, 0] = sin * (width / height)
    theta[:, 1, 1] = cos
    return F.affine_grid(theta, [len(angles_deg), 1, height, width], align_corners=False)


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    generator: torch.Generator,
    run_angle: float | None = None,
    p: float = AUGMENT_PROBABILITY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample flips and rotation of float ``images (B, C, H, W)`` and ``masks
    (B, 1, H, W)``, drawn from ``generator`` (on the tensors' device)."""
    batch, _, height, width = images.shape
    draws = torch.rand(batch, 4, generator=generator, device=images.device)
    hflip, vflip, rotate = (draws[:, i] < p for i in range(3))
    images = torch.where(hflip.view(-1, 1, 1, 1), images.flip(3), images)
    masks = torch.where(hflip.view(-1, 1, 1, 1), masks.flip(3), masks)
    images = torch.where(vflip.view(-1, 1, 1, 1), images.flip(2), images)
    masks = torch.where(vflip.view(-1, 1, 1, 1), masks.flip(2), masks)
    angles = draws[:, 3] * 360.0 if run_angle is None else torch.full_like(draws[:, 3], run_angle)
    # Every sample goes through the grid (no host sync to ask whether any rotates); the
    # unrotated ones are taken back unchanged.
    grid = rotation_grid(angles, height, width)
    rotated_images = F.grid_sample(images, grid, mode="bilinear", align_corners=False)
    rotated_masks = F.grid_sample(masks, grid, mode="nearest", align_corners=False)
    images = torch.where(rotate.view(-1, 1, 1, 1), rotated_images, images)
    masks = torch.where(rotate.view(-1, 1, 1, 1), rotated_masks, masks)
    return images, masks


class DeviceLoader:
    """Batches ``(images (B, 3, S, S), masks (B, 1, S, S))`` float32 on ``device``.

    A drop-in for the DataLoader the trainer uses: ``len()`` batches per pass, a
    ``generator`` whose state is the resume state, ``num_workers == 0``.
    """

    num_workers = 0

    def __init__(
        self,
        prepared: PreparedDataset,
        ids: Sequence[str],
        batch_size: int,
        shuffle: bool,
        seed: int,
        augment: bool,
        normalization: str = "minmax",
        per_run_angle: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {normalization!r}: expected one of "
                f"{', '.join(NORMALIZATIONS)}"
            )
        self.device = torch.device(device)
        rows = np.asarray(prepared.index_of(list(ids)))
        images, masks = np.asarray(prepared.images[rows]), np.asarray(prepared.masks[rows])
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.masks = torch.from_numpy(masks)[:, None].contiguous().to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.normalization = normalization
        self.run_angle = (
            float(np.random.default_rng(seed).uniform(0, 360)) if per_run_angle else None
        )
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def fast_forward(self, epochs: int) -> None:
        """Nothing to replay: restoring ``generator``'s state restores everything."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = len(self.images)
        if self.shuffle:
            order = torch.randperm(count, generator=self.generator, device=self.device)
        else:
            order = torch.arange(count, device=self.device)
        for start in range(0, count, self.batch_size):
            index = order[start : start + self.batch_size]
            images = normalize_batch(self.images[index], self.normalization)
            masks = self.masks[index].to(torch.float32)
            if self.augment:
                images, masks = augment_batch(images, masks, self.generator, self.run_angle)
            yield images, masks
