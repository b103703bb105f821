"""Mini-batches straight from in-memory tensors, with batched (GPU-friendly) crop-and-flip augmentation.

All randomness comes from a CPU ``torch.Generator`` seeded by the caller, so a given seed yields the same
batches on every device and on every pass over the returned iterable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import torch
from torch.utils.data import TensorDataset

Device = Union[str, torch.device, None]


def crop_padding(image_size: int) -> int:
    """Padding of the random crop: 4 pixels for 32x32 images and larger, 2 for 28x28 (>= 16), else 1."""
    if image_size >= 32:
        return 4
    if image_size >= 16:
        return 2
    return 1


def augment_batch(images: torch.Tensor, generator: torch.Generator, padding: Optional[int] = None) -> torch.Tensor:
    """Random crop with ``padding`` (default :func:`crop_padding`) and random horizontal flip of a batch.

    Each image gets its own offset and flip, drawn from ``generator``; see :func:`crop_and_flip`.
    """
    height, width = images.shape[2:]
    pad = crop_padding(min(height, width)) if padding is None else padding
    shifts, flips = _draw_augmentation(images.shape[0], pad, generator)
    return crop_and_flip(images, shifts.to(images.device), flips.to(images.device))


def crop_and_flip(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Shift each image by ``shifts[i] = (dy, dx)`` pixels, then mirror it where ``flips[i]`` is True.

    Equivalent to padding and cropping: pixels shifted in from outside get the batch's minimum value, i.e. the
    background of MNIST-like images after normalisation. Pure tensor indexing on the images' device, no host
    sync; ``shifts`` (int64, N x 2) and ``flips`` (bool, N) must be on that device.
    """
    n, channels, height, width = images.shape
    device = images.device
    rows = (shifts[:, :1] + torch.arange(height, device=device))[:, None, :, None]
    cols = (shifts[:, 1:] + torch.arange(width, device=device))[:, None, None, :]
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    sample = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(channels, device=device)[None, :, None, None]
    shifted = images[sample, channel, rows.clamp(0, height - 1), cols.clamp(0, width - 1)]
    cropped = torch.where(inside, shifted, images.amin())
    return torch.where(flips[:, None, None, None], cropped.flip(3), cropped)


def _draw_augmentation(n: int, pad: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (dy, dx) shifts in [-pad, pad] and flip flags, drawn on the CPU."""
    shifts = torch.randint(-pad, pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return shifts, flips


@dataclass(frozen=True, eq=False)
class Batches:
    """A re-iterable, sized sequence of ``(images, labels)`` mini-batches over a two-tensor dataset."""

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    shuffle: bool
    seed: int
    augment: bool
    device: Device
    drop_last: bool

    def __len__(self) -> int:
        full, rest = divmod(self.labels.shape[0], self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        n = self.labels.shape[0]
        device = torch.device(self.device) if self.device is not None else self.images.device
        order = torch.randperm(n, generator=generator).to(self.images.device) if self.shuffle else None
        if self.augment:
            pad = crop_padding(min(self.images.shape[2:]))
            shifts, flips = (t.to(device) for t in _draw_augmentation(n, pad, generator))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            stop = min(start + self.batch_size, n)
            if order is None:
                x, y = self.images[start:stop], self.labels[start:stop]
            else:
                x, y = self.images[order[start:stop]], self.labels[order[start:stop]]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if self.augment:
                x = crop_and_flip(x, shifts[start:stop], flips[start:stop])
            yield x, y


def batches(
    ds: TensorDataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool = False,
    device: Device = None,
    limit: Optional[int] = None,
    drop_last: bool = False,
) -> Batches:
    """Mini-batches ``(x, y)`` of a ``TensorDataset`` of (images, labels), sliced from memory.

    ``shuffle`` draws a permutation from ``seed``; ``augment`` applies :func:`augment_batch` (crop + flip; do
    not use it on data where a mirror image changes the class, e.g. digits). ``device`` moves each batch there
    (keep the dataset itself on that device to avoid the copy). ``limit`` keeps only the first ``limit``
    samples of the dataset (before shuffling). The result can be iterated again and gives the same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(ds.tensors) != 2:
        raise ValueError(f"expected a TensorDataset of (images, labels), got {len(ds.tensors)} tensors")
    images, labels = ds.tensors
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        images, labels = images[:limit], labels[:limit]
    return Batches(images, labels, batch_size, shuffle, seed, augment, device, drop_last)
