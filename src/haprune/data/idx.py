"""Reader for the IDX format of (Fashion-)MNIST, gzip-compressed or plain, without numpy.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 size per dimension, then the values in C order. Only unsigned bytes (type code 0x08) are read: that is
what every image and label file of these data sets uses.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from typing import Tuple

import torch

from .._fileio import PathLike

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08


class IDXFormatError(ValueError):
    """The file is not a well-formed unsigned-byte IDX file."""


def read_idx(path: PathLike) -> torch.Tensor:
    """Read an IDX file (``.gz`` or plain, told apart by content) into a ``uint8`` tensor of its shape."""
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:  # truncated (EOFError), garbage (BadGzipFile is an OSError)
            raise IDXFormatError(f"{path}: the gzip data is truncated or corrupt ({type(e).__name__}: {e}); "
                                 "download or copy the file again") from None
    return parse_idx(raw, source=str(path))


def parse_idx(raw: bytes, source: str = "<bytes>") -> torch.Tensor:
    """Decode the bytes of an uncompressed IDX file; ``source`` names it in error messages."""
    shape, offset = _parse_header(raw, source)
    count = 1
    for size in shape:
        count *= size
    if len(raw) - offset != count:
        raise IDXFormatError(
            f"{source}: header announces shape {shape} ({count} values) but {len(raw) - offset} bytes follow; "
            "the file is truncated or corrupt, download or copy it again"
        )
    values = torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8)
    return values.reshape(shape)


def _parse_header(raw: bytes, source: str) -> Tuple[Tuple[int, ...], int]:
    """Return (shape, offset of the first value) from an IDX header."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXFormatError(f"{source}: not an IDX file (the magic number must start with two zero bytes)")
    type_code, ndim = raw[2], raw[3]
    if type_code != _UBYTE:
        raise IDXFormatError(f"{source}: IDX type code 0x{type_code:02x} is not supported, only unsigned bytes (0x08)")
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise IDXFormatError(f"{source}: IDX header truncated ({len(raw)} bytes, {ndim} dimensions announced)")
    shape = struct.unpack(f">{ndim}I", raw[4:offset])
    return tuple(shape), offset


__all__ = ["IDXFormatError", "parse_idx", "read_idx"]
