"""Offline data sets as in-memory tensors, and fast mini-batching with batched augmentation.

``load_dataset("fashion-mnist")`` returns normalised train / validation / test splits;
``batches(splits.train, 128, shuffle=True, seed=epoch, augment=True, device="cuda")`` iterates over one of them.
"""
from .batching import Batches, augment_batch, batches, crop_and_flip, crop_padding
from .datasets import (
    DATA_DIR_ENV,
    DatasetNotFoundError,
    DatasetSplits,
    ImageDataset,
    as_image_dataset,
    channel_stats,
    check_labels,
    dataset_names,
    load_data_path,
    load_dataset,
    normalize,
    split_indices,
)
from .idx import IDXFormatError, parse_idx, read_idx

__all__ = [
    "Batches",
    "DATA_DIR_ENV",
    "DatasetNotFoundError",
    "DatasetSplits",
    "IDXFormatError",
    "ImageDataset",
    "as_image_dataset",
    "augment_batch",
    "batches",
    "channel_stats",
    "check_labels",
    "crop_and_flip",
    "crop_padding",
    "dataset_names",
    "load_data_path",
    "load_dataset",
    "normalize",
    "parse_idx",
    "read_idx",
    "split_indices",
]
