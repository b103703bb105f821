"""Tiny synthetic IDX data sets for the command-line tests (gzip files in a temporary folder)."""
from __future__ import annotations

import gzip
import struct

import numpy as np


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_data(d, n_train: int = 5400, n_test: int = 200, n_labels: int | None = None) -> None:
    """8x8 images whose class (of 4) is the bright quadrant; ``n_labels`` < n_train writes a short label file."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 4, n)
        images = rng.integers(0, 60, (n, 8, 8))
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 2)
            images[i, 4 * r: 4 * r + 4, 4 * q: 4 * q + 4] += 180
        write_idx(d / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", labels[:n_labels] if split == "train" and n_labels else labels)
