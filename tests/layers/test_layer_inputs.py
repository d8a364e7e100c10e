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


@pytest.mark.parametrize(
    "merge, kwargs",
    [("Add", {}), ("Multiply", {}), ("Concatenate", {"axis": 1}), ("Concatenate", {"axis": 2})],
    ids=["Add", "Multiply", "Concatenate axis 1", "Concatenate axis 2"],
)
def test_integer_tensors_keep_their_masks_in_merge_layers(merge, kwargs):
    """Keras' own merge tests: integer tensors masked by ``Masking`` keep their masks through
    the cast to the compute dtype, so the output's mask (and Multiply's values) are stock's."""
    masking = keras.layers.Masking()
    x1 = masking(tf.constant([[[0, 0], [1, 2], [0, 0], [3, 4]]]))
    x2 = masking(tf.constant([[[0, 0], [0, 0], [1, 2], [3, 4]]]))
    ours = getattr(layers, merge)(**kwargs)([x1, x2])
    stock = getattr(keras.layers, merge)(**kwargs)([x1, x2])
    assert ours.dtype == tf.float32
    np.testing.assert_array_equal(ours, tf.cast(stock, tf.float32))
    assert stock._keras_mask is not None
    np.testing.assert_array_equal(ours._keras_mask, stock._keras_mask)
