"""The IDX file format the MNIST family is distributed in.

An IDX file is two zero bytes, a type byte, a rank byte, one big-endian 32-bit size per dimension,
then the data, big-endian, in C order. :func:`read_idx` reads one such file (plain or gzipped);
:func:`load_idx` reads the four standard files of an MNIST-style dataset, ``uint8 (N, rows, cols)``
images and ``uint8 (N,)`` labels. ``tf_jacbp.datasets`` re-exports both.

This module needs only NumPy.
"""

import gzip
import math
import os
import zlib

import numpy as np

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "MNIST_IDX_FILES", "load_idx", "read_idx"]

Split = tuple[np.ndarray, np.ndarray]
"""``(x, y)``: images ``uint8 (N, rows, cols)`` and labels ``uint8 (N,)``."""

IDX_IMAGES_MAGIC = 0x00000803
"""The magic number of an MNIST images file: type ``uint8``, 3 dimensions ``(N, rows, cols)``."""

IDX_LABELS_MAGIC = 0x00000801
"""The magic number of an MNIST labels file: type ``uint8``, 1 dimension ``(N,)``."""

MNIST_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The four files of an MNIST-style dataset, in the order training images, training labels, test
images, test labels; each may also carry a ``.gz`` suffix."""

_IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_FIX = "replace it with an intact copy of the file"


def read_idx(path: str | os.PathLike[str], expected_magic: int | None = None) -> np.ndarray:
    """Read one IDX file, gzipped or not (detected from the file's first bytes).

    An IDX file is two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), a rank byte, one big-endian 32-bit size per dimension, then the
    data, big-endian, in C order. The first four bytes read as one big-endian integer are the
    "magic number": 0x00000803 for MNIST's images, 0x00000801 for its labels.

    Args:
        path: The IDX file, plain or gzip-compressed.
        expected_magic: If given, the magic number the file must have (e.g. ``0x00000803`` for
            ``uint8`` images of rank 3).

    Returns:
        A writable array in native byte order whose dtype comes from the type byte and whose shape
        is the header's dimensions, e.g. ``uint8 (N, 28, 28)`` for MNIST images.

    Raises:
        ValueError: The file is not a valid IDX file, has a different magic number than
            ``expected_magic``, or holds fewer or more data bytes than its header declares. The
            message names the file, what was expected and what was found.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(
                f"{path}: expected a complete gzip-compressed IDX file, found a truncated or "
                f"corrupt gzip stream ({e}); {_IDX_FIX}."
            ) from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{path}: expected an IDX file starting with two zero bytes, found "
            f"{data[:4].hex() or 'an empty file'}; this is not an IDX file, {_IDX_FIX}."
        )
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: expected IDX magic number 0x{expected_magic:08x} "
            f"({_describe_magic(expected_magic)}), found 0x{magic:08x} ({_describe_magic(magic)}); "
            f"check that the file is the one its name says, or {_IDX_FIX}."
        )
    type_code, rank = data[2], data[3]
    if type_code not in _IDX_TYPES:
        raise ValueError(
            f"{path}: expected an IDX type byte in "
            f"{{{', '.join(f'0x{t:02x}' for t in _IDX_TYPES)}}}, found 0x{type_code:02x}; "
            f"{_IDX_FIX}."
        )
    header_len = 4 + 4 * rank
    if len(data) < header_len:
        raise ValueError(
            f"{path}: expected a {header_len}-byte header for {rank} dimensions, found only "
            f"{len(data)} bytes; the file is truncated, {_IDX_FIX}."
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=rank, offset=4))
    dtype = _IDX_TYPES[type_code]
    expected_bytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    found_bytes = len(data) - header_len
    if expected_bytes > np.iinfo(np.intp).max:
        raise ValueError(
            f"{path}: the header declares shape {shape} of {dtype.name}, {expected_bytes} data "
            f"bytes, more than an array can hold (2**{np.iinfo(np.intp).bits - 1} - 1), and the "
            f"file has {found_bytes}; the header is corrupt, {_IDX_FIX}."
        )
    if found_bytes != expected_bytes:
        problem = "truncated" if found_bytes < expected_bytes else "longer than its header says"
        raise ValueError(
            f"{path}: expected {expected_bytes} data bytes for shape {shape} of {dtype.name}, "
            f"found {found_bytes}; the file is {problem}, {_IDX_FIX}."
        )
    flat = np.frombuffer(data, dtype=dtype, offset=header_len)
    return np.array(flat.reshape(shape), dtype=dtype.newbyteorder("="))


def load_idx(directory: str | os.PathLike[str]) -> tuple[Split, Split]:
    """Load an MNIST-style dataset from a directory of the four standard IDX files.

    The files are ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or with a ``.gz`` suffix
    (the plain one is used if both exist).

    Args:
        directory: The directory holding the four files.

    Returns:
        ``(x_train, y_train), (x_test, y_test)``: images ``uint8 (N, rows, cols)`` and labels
        ``uint8 (N,)``, e.g. ``(60000, 28, 28)``/``(60000,)`` and ``(10000, 28, 28)``/``(10000,)``
        for MNIST and Fashion-MNIST.

    Raises:
        FileNotFoundError: One of the four files is missing; the message lists the names looked for.
        ValueError: A file is not a valid IDX file of the expected kind (images: magic 0x00000803,
            labels: 0x00000801), or a split has different numbers of images and labels.
    """
    directory = os.fspath(directory)
    paths = [_find_idx_file(directory, name) for name in MNIST_IDX_FILES]
    splits = []
    for images_path, labels_path in (paths[:2], paths[2:]):
        images = read_idx(images_path, expected_magic=IDX_IMAGES_MAGIC)
        labels = read_idx(labels_path, expected_magic=IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise ValueError(
                f"{images_path} and {labels_path}: expected as many labels as images, found "
                f"{len(images)} images and {len(labels)} labels; the two files do not belong "
                "together, replace them with a matching pair."
            )
        splits.append((images, labels))
    return splits[0], splits[1]


def _find_idx_file(directory: str, name: str) -> str:
    candidates = (name, name + ".gz")
    for candidate in candidates:
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{directory}: no IDX file {' or '.join(candidates)}; expected the four files "
        f"{', '.join(MNIST_IDX_FILES)} (each optionally .gz) in that directory."
    )


def _describe_magic(magic: int) -> str:
    """``0x00000803`` -> ``'uint8, 3 dims'``."""
    type_code, rank = (magic >> 8) & 0xFF, magic & 0xFF
    dtype = _IDX_TYPES.get(type_code)
    type_name = dtype.name if dtype is not None else f"unknown type 0x{type_code:02x}"
    return f"{type_name}, {rank} dims"
