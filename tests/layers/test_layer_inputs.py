"""Inputs stock Keras layers accept or explain, which the tf_jacbp layers must too (issue 13,
item 10): an integer tensor passed straight to a layer is cast to its compute dtype, as stock
``keras.layers.Dense`` does; a ``tf.SparseTensor`` gets an error that names it and the fix."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_jacbp import layers


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: layers.Dense(3), (2, 4)),
        (lambda: layers.Conv2D(2, 2), (2, 3, 3, 1)),
    ],
    ids=["Dense", "Conv2D"],
)
@pytest.mark.parametrize("int_dtype", ["int32", "int64", "uint8"])
def test_integer_input_is_cast_to_the_compute_dtype(make, shape, int_dtype):
    layer = make()
    x = np.random.default_rng(0).integers(0, 5, size=shape)
    expected = layer(x.astype("float32"))
    got = layer(tf.constant(x.astype(int_dtype)))
    assert got.dtype == expected.dtype == tf.float32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(layer(x.astype(int_dtype)), expected)  # NumPy, like stock


def test_integer_input_trains_like_stock_keras():
    x = np.random.default_rng(1).integers(0, 5, size=(8, 4))
    y = np.random.default_rng(2).normal(size=(8, 3)).astype("float32")
    model = keras.Sequential([keras.Input((4,), dtype="int32"), layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_sparse_input_names_the_sparse_tensor_and_the_fix():
    x = tf.sparse.from_dense(tf.constant([[1.0, 0.0, 2.0, 0.0]]))
    with pytest.raises((TypeError, ValueError), match=r"SparseTensor.*tf\.sparse\.to_dense"):
        layers.Dense(3)(x)
