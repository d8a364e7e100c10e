"""docs/errors.md, the bad-input table, is generated from the cases below and each row is a test.

Every case builds the bad input, and the test asserts the error's type and the first line of its
message exactly as the table shows it (messages are cut at ``WIDTH`` characters there). To
regenerate the table after changing a message: ``python tests/system/test_errors_doc.py``.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_jacbp import callbacks, datasets, jacobian, layers, losses, privacy, toeplitz

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "errors.md"
WIDTH = 170
HEADER = """# Bad input

Each row raises an error that names the argument, the value and the fix. The table is generated
by `python tests/system/test_errors_doc.py` from the cases in that file, and the test suite
checks every row: the input raises exactly this error with exactly this first line (cut at {width}
characters here). `<dir>` stands for a temporary directory.

| input | error (first line) |
|---|---|
"""


def _dense_units():
    layers.Dense(0)


def _conv_filters():
    layers.Conv2D(-2, 3)


def _kernel_larger_than_input():
    keras.Sequential([keras.Input((3, 3, 1)), layers.Conv2D(1, 5, name="conv2d")])


def _dense_without_batch_axis():
    layers.Dense(3, name="dense")(np.ones(4, "float32"))


def _conv_on_vectors():
    keras.Sequential([keras.Input((784,)), layers.Conv2D(2, 3, name="conv2d")])


def _unknown_activation():
    layers.Dense(3, activation="relux")


def _unknown_padding():
    layers.Conv2D(2, 3, padding="full")


def _unknown_bias():
    layers.Conv2D(2, 3, bias="shared")


def _groups():
    layers.Conv2D(4, 3, groups=3)


def _data_format():
    layers.Conv2D(2, 3, data_format="NCHW")


def _strides():
    layers.Conv2D(2, 3, strides=0)


def _pool_strides():
    layers.MaxPooling2D(2, strides=-1)


def _label_out_of_range():
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    loss(np.array([0, 9]), np.zeros((2, 4), "float32"))


def _label_not_integer():
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    loss(np.array([0.0, 1.5]), np.zeros((2, 4), "float32"))


def _label_shape():
    loss = losses.CategoricalCrossentropy(from_logits=True)
    loss(np.array([0.0, 1.0]), np.zeros((2, 4), "float32"))


def _binary_label():
    loss = losses.BinaryCrossentropy(from_logits=True)
    loss(np.array([[2.0], [2.0]]), np.zeros((2, 1), "float32"))


def _probe_misfit():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3)], name="sequential")
    check = callbacks.GradientCheck((np.zeros((4, 5), "float32"), np.zeros((4,), "int32")))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(
        np.zeros((4, 4), "float32"), np.zeros((4, 3), "float32"), callbacks=[check], verbose=0
    )


def _probe_empty():
    callbacks.GradientCheck((np.zeros((0, 4), "float32"), np.zeros((0, 3), "float32")))


def _on_mismatch():
    callbacks.GradientCheck((np.zeros((2, 4)), np.zeros((2, 3))), on_mismatch="ignore")


def _add_single():
    x = keras.Input((3,))
    layers.Add()(x)


def _add_shapes():
    layers.Add()([keras.Input((3,)), keras.Input((2,))])


def _bn_axis():
    keras.Sequential(
        [keras.Input((4, 4, 2)), layers.BatchNormalization(axis=1, name="batch_normalization")]
    )


def _bn_synchronized():
    layers.BatchNormalization(synchronized=True)


def _dropout_rate():
    layers.Dropout(1.5)


def _per_example_train_bn():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            layers.Dense(2),
            layers.BatchNormalization(name="batch_normalization_2"),
        ]
    )
    jacobian.per_example_gradients(
        model,
        np.zeros((2, 3), "float32"),
        np.zeros((2, 2), "float32"),
        loss=losses.MeanSquaredError(),
        training=True,
    )


def _two_inputs():
    a, b = keras.Input((3,)), keras.Input((3,))
    model = keras.Model([a, b], layers.Add()([a, b]), name="functional_1")
    jacobian.parameter_jacobian(model, [np.zeros((1, 3)), np.zeros((1, 3))])


def _stock_layer():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    jacobian.parameter_jacobian(model, np.zeros((1, 3), "float32"))


def _jacobian_budget():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3)])
    jacobian.parameter_jacobian(model, np.zeros((2, 4), "float32"), max_bytes=10)


def _toeplitz_budget():
    toeplitz.conv_matrix(np.zeros((3, 3, 1, 1)), (64, 64, 1), budget_bytes=1024 * 1024)


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], data: bytes) -> None:
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + data)


def _idx_magic(tmp: Path):
    _write_idx(tmp / "bad", 0x805, (1, 1, 1, 1, 1), b"\0")
    datasets.read_idx(tmp / "bad", expected_magic=0x803)


def _idx_truncated(tmp: Path):
    _write_idx(tmp / "trunc", 0x801, (10,), b"\0" * 5)
    datasets.read_idx(tmp / "trunc")


def _idx_counts(tmp: Path):
    for name, magic, dims in (
        ("train-images-idx3-ubyte", 0x803, (3, 28, 28)),
        ("train-labels-idx1-ubyte", 0x801, (4,)),
        ("t10k-images-idx3-ubyte", 0x803, (1, 28, 28)),
        ("t10k-labels-idx1-ubyte", 0x801, (1,)),
    ):
        size = int(np.prod(dims))
        with gzip.open(tmp / f"{name}.gz", "wb") as f:
            f.write(struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + b"\0" * size)
    datasets.load_idx(tmp)


def _sparse_input():
    layer = layers.Dense(2, name="dense")
    layer(tf.sparse.from_dense(np.eye(3, dtype="float32")))


def _relu_threshold():
    layers.ReLU(threshold=None)


def _unwritable_log_dir(tmp: Path):
    (tmp / "a_file").write_text("not a directory")
    callbacks.GradientCheck((np.zeros((2, 4)), np.zeros((2, 3))), log_dir=tmp / "a_file" / "logs")


def _unbatched_probe():
    probe = tf.data.Dataset.from_tensor_slices((np.zeros((4, 3)), np.zeros((4,))))
    callbacks.GradientCheck(probe)


def _empty_model():
    jacobian.parameter_jacobian(keras.Sequential(name="empty"), np.zeros((1, 3)))


def _max_bytes_not_a_number():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3)])
    jacobian.parameter_jacobian(model, np.zeros((2, 4), "float32"), max_bytes="1GB")


def _transposed_image():
    model = keras.Sequential([keras.Input((28, 14, 1)), layers.Flatten(), layers.Dense(2)])
    jacobian.parameter_jacobian(model, np.zeros((1, 14, 28, 1), "float32"))


def _y_wrong_length():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3)])
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    jacobian.per_example_gradients(model, np.zeros((3, 4), "float32"), np.zeros(2, "int32"), loss)


def _idx_overflow(tmp: Path):
    _write_idx(tmp / "huge", 0x803, (2**21, 2**21, 2**22), b"")
    datasets.read_idx(tmp / "huge")


def _private_stock_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    privacy.make_private(model, l2_norm_clip=1.0, noise_multiplier=1.1)


def _unknown_activation_callable():
    layers.Dense(2, activation=lambda z: z**3)


def _conv_transpose_output_padding():
    layers.Conv2DTranspose(2, 3, strides=2, output_padding=2)


def _layer_norm_batch_axis():
    layers.LayerNormalization(axis=0)(np.ones((2, 3), "float32"))


def _embedding_id_out_of_range():
    layers.Embedding(5, 2)(np.array([[1, 7]]))


def _conv1d_toeplitz_route():
    layers.Conv1D(2, 3, toeplitz="dense")


def _upsampling_bicubic():
    layers.UpSampling2D(2, interpolation="bicubic")


def _concatenate_batch_axis():
    layers.Concatenate(axis=0)([np.ones((2, 3), "float32"), np.ones((2, 3), "float32")])


# (input, the callable, the error type). Callables taking one argument get a temporary directory.
CASES: list[tuple[str, Callable, type[Exception]]] = [
    ("units <= 0", _dense_units, ValueError),
    ("filters <= 0", _conv_filters, ValueError),
    ("kernel larger than a valid input", _kernel_larger_than_input, ValueError),
    ("1-D input (no batch axis) into Dense", _dense_without_batch_axis, ValueError),
    ("2-D input into Conv2D", _conv_on_vectors, ValueError),
    ("unknown activation", _unknown_activation, ValueError),
    ("unknown padding", _unknown_padding, ValueError),
    ("unknown bias mode", _unknown_bias, ValueError),
    ("groups not dividing filters", _groups, ValueError),
    ("data_format='NCHW'", _data_format, ValueError),
    ("zero or negative strides", _strides, ValueError),
    ("zero or negative pooling strides", _pool_strides, ValueError),
    ("label out of range", _label_out_of_range, ValueError),
    ("label not an integer", _label_not_integer, ValueError),
    ("label of the wrong shape", _label_shape, ValueError),
    ("binary label outside [0, 1]", _binary_label, ValueError),
    ("GradientCheck probe that does not fit the model", _probe_misfit, ValueError),
    ("GradientCheck probe of zero samples", _probe_empty, ValueError),
    ("unknown on_mismatch", _on_mismatch, ValueError),
    ("Add on a single tensor", _add_single, ValueError),
    ("Add of incompatible shapes", _add_shapes, ValueError),
    ("BatchNormalization over another axis than the last", _bn_axis, ValueError),
    ("BatchNormalization synchronized=True", _bn_synchronized, ValueError),
    ("Dropout rate outside [0, 1]", _dropout_rate, ValueError),
    (
        "per-example gradients through train-mode BatchNormalization",
        _per_example_train_bn,
        ValueError,
    ),
    ("parameter_jacobian of a model with two inputs", _two_inputs, ValueError),
    ("parameter_jacobian on a model with a stock Keras layer", _stock_layer, TypeError),
    ("parameter_jacobian over its memory budget", _jacobian_budget, ValueError),
    ("Toeplitz matrix over the memory budget", _toeplitz_budget, ValueError),
    ("IDX file with a bad magic number", _idx_magic, ValueError),
    ("IDX file with truncated data", _idx_truncated, ValueError),
    ("IDX images and labels of different counts", _idx_counts, ValueError),
    ("IDX header whose sizes overflow", _idx_overflow, ValueError),
    ("SparseTensor input to a layer", _sparse_input, TypeError),
    ("ReLU threshold=None", _relu_threshold, ValueError),
    ("GradientCheck log_dir that cannot be written", _unwritable_log_dir, ValueError),
    ("GradientCheck probe: an unbatched tf.data.Dataset", _unbatched_probe, ValueError),
    ("parameter_jacobian of an empty model", _empty_model, ValueError),
    ("parameter_jacobian max_bytes not a number", _max_bytes_not_a_number, TypeError),
    ("parameter_jacobian on a transposed image", _transposed_image, ValueError),
    ("per_example_gradients with y of the wrong length", _y_wrong_length, ValueError),
    ("make_private on a model with stock Keras layers", _private_stock_model, TypeError),
    ("activation: a callable without a Jacobian", _unknown_activation_callable, ValueError),
    ("Conv2DTranspose output_padding >= strides", _conv_transpose_output_padding, ValueError),
    ("LayerNormalization over the batch axis", _layer_norm_batch_axis, ValueError),
    (
        "Embedding id outside [0, input_dim)",
        _embedding_id_out_of_range,
        tf.errors.InvalidArgumentError,
    ),
    ("Conv1D toeplitz='dense'", _conv1d_toeplitz_route, ValueError),
    ("UpSampling2D interpolation='bicubic'", _upsampling_bicubic, ValueError),
    ("Concatenate along the batch axis", _concatenate_batch_axis, ValueError),
]


def first_line(error: BaseException, tmp: Path) -> str:
    """The message's first line, the temporary directory as ``<dir>``, cut at ``WIDTH``.

    Keras' header for errors raised inside ``call`` ("Exception encountered when calling ...")
    and its terminal bold codes are skipped; object addresses read ``0x...``.
    """
    lines = [
        re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
        for line in str(error).strip().splitlines()
        if line.strip() and not line.startswith("Exception encountered when calling")
    ]
    line = re.sub(r" at 0x[0-9a-f]+", " at 0x...", lines[0]).replace(os.fspath(tmp), "<dir>")
    return line if len(line) <= WIDTH else line[: WIDTH - 3] + "..."


def run_case(fn: Callable, tmp: Path) -> BaseException:
    """Call the case; return the exception it raised (an AssertionError if none)."""
    # Layer names count from zero again ("dense", not "dense_7"); free_memory=False skips the
    # garbage collection clear_session runs by default, seconds in a long test worker.
    try:
        keras.backend.clear_session(free_memory=False)
    except TypeError:  # an older Keras 3 without the argument
        keras.backend.clear_session()
    try:
        fn(tmp) if fn.__code__.co_argcount else fn()
    except Exception as err:  # noqa: BLE001 - the error is what the case produces
        return err
    raise AssertionError(f"{fn.__name__} raised no error")


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def table(tmp: Path) -> str:
    """docs/errors.md as the cases produce it today."""
    rows = []
    for name, fn, _ in CASES:
        err = run_case(fn, tmp)
        rows.append(
            f"| {_escape(name)} | `{type(err).__name__}: {_escape(first_line(err, tmp))}` |"
        )
    return HEADER.format(width=WIDTH) + "\n".join(rows) + "\n"


def documented_rows() -> dict[str, str]:
    """``{input: error cell}`` as docs/errors.md shows them."""
    rows = {}
    for line in DOC.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| input") and "`" in line:
            name, cell = line[2:].split(" | `", 1)
            rows[name.replace("\\|", "|")] = cell.rstrip("` |").replace("\\|", "|")
    return rows


def test_every_case_is_a_row_and_every_row_a_case():
    assert list(documented_rows()) == [name for name, _, _ in CASES]


@pytest.mark.parametrize("name,fn,kind", CASES, ids=[c[0] for c in CASES])
def test_documented_error(name, fn, kind, tmp_path):
    err = run_case(fn, tmp_path)
    assert isinstance(err, kind), f"{name}: expected {kind.__name__}, got {err!r}"
    assert f"{type(err).__name__}: {first_line(err, tmp_path)}" == documented_rows()[name]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        DOC.write_text(table(Path(tmp)))
    print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
