"""Conv3D: the layer-test kit, agreement with keras.layers.Conv3D (values, input and kernel
gradients in float64), the 3-D Toeplitz matrix against autodiff, the contract's products and the
per-example rows, configuration, and bad arguments. Sizes stay tiny: ``T(K)`` is
``(output size) x (input size)``."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conv_checks import (
    UpdatesMatchReference,
    assert_contract_is_autodiff,
    assert_input_jacobian_is_autodiff,
    assert_one_trace_gives_the_reference_gradients,
    assert_parameter_jacobian_is_autodiff,
    assert_per_example_rows_sum_to_the_backward,
    assert_sparse_path_equals_dense,
    batches,
    built,
    compiled_sgd,
    dataset,
    values_and_gradients,
)

import tf_jacbp
from tf_jacbp import tolerances
from tf_jacbp.layers.conv3d import Conv3D
from tf_jacbp.testing import check_layer

RTOL64 = tolerances.rtol("float64")


def test_conv3d_every_mode(tmp_path):
    """Routes, finite differences, ``fit`` eagerly, as a graph and under XLA, mixed precision,
    the ``.keras`` round trip, on one small volume."""
    check_layer(
        lambda dtype: Conv3D(2, 2, padding="same", activation="tanh", dtype=dtype),
        (3, 3, 2, 2),
        tmp_dir=tmp_path,
    )


def test_conv3d_strided_untied_routes_agree():
    check_layer(
        lambda dtype: Conv3D(2, (2, 1, 2), strides=(1, 2, 1), bias="untied", dtype=dtype),
        (3, 3, 3, 1),
        modes=False,
    )


AGREEMENT = [
    ((3, 4, 3, 2), {"filters": 2, "kernel_size": 2}),
    ((4, 3, 5, 1), {"filters": 3, "kernel_size": (3, 2, 2), "padding": "same"}),
    ((5, 4, 4, 2), {"filters": 2, "kernel_size": 2, "strides": (2, 1, 3), "padding": "same"}),
    ((5, 5, 4, 1), {"filters": 2, "kernel_size": (2, 3, 2), "strides": 2}),
    ((5, 4, 5, 2), {"filters": 2, "kernel_size": 2, "dilation_rate": (2, 1, 2)}),
    ((4, 4, 3, 1), {"filters": 1, "kernel_size": 3, "dilation_rate": 2, "padding": "same"}),
    ((3, 3, 3, 3), {"filters": 2, "kernel_size": 3, "use_bias": False, "activation": "relu"}),
]


@pytest.mark.parametrize("input_shape, kwargs", AGREEMENT)
def test_agrees_with_keras_conv3d(input_shape, kwargs):
    """Outputs and gradients (input, kernel, bias) equal the stock ``keras.layers.Conv3D`` with the
    same weights, in float64, to 1e-12; the output shapes agree."""
    ours, stock = Conv3D(dtype="float64", **kwargs), keras.layers.Conv3D(dtype="float64", **kwargs)
    for layer in (ours, stock):
        layer.build((None, *input_shape))
    rng = np.random.default_rng(len(input_shape) + sum(input_shape))
    weights = [rng.normal(size=w.shape) for w in stock.weights]
    ours.set_weights(weights)
    stock.set_weights(weights)
    assert [w.shape for w in ours.weights] == [w.shape for w in stock.weights]
    x = tf.constant(rng.normal(size=(3, *input_shape)))
    assert ours.compute_output_shape(x.shape) == stock.compute_output_shape(x.shape)
    delta = tf.constant(rng.normal(size=stock.compute_output_shape(x.shape)))
    got, want = values_and_gradients(ours, x, delta), values_and_gradients(stock, x, delta)
    assert len(got) == len(want)
    for name, a, b in zip(["y", "dx", "dK", "db"], got, want, strict=False):
        assert a.shape == b.shape, name
        assert tolerances.relative_error(a, b) <= RTOL64, (name, kwargs, input_shape)


def test_lemma_2_in_three_dimensions():
    """A ``2 x 2 x 2`` volume and a ``2 x 2 x 2`` kernel, valid: one output, so ``T(K)`` is the
    single row ``Vec`` of the kernel in the input's row-major order; at a ``3 x 3 x 3`` volume
    ``T(K)`` is ``8 x 27`` and each row holds the 8 kernel entries once."""
    layer = Conv3D(1, 2, use_bias=False, dtype="float64")
    layer.build((None, 2, 2, 2, 1))
    kernel = np.arange(1.0, 9.0).reshape(2, 2, 2, 1, 1)
    layer.kernel.assign(kernel)
    np.testing.assert_array_equal(layer.toeplitz_matrix(), kernel.reshape(1, 8))
    t = np.asarray(layer.toeplitz_matrix((3, 3, 3, 1)))
    assert t.shape == (8, 27)
    for row in t:
        np.testing.assert_array_equal(np.sort(row[row != 0]), np.arange(1.0, 9.0))
    # Output (1, 0, 1) reads input (1 + p, q, 1 + r): column 9 (1 + p) + 3 q + (1 + r).
    for p in range(2):
        for q in range(2):
            for r in range(2):
                assert t[4 + 1, 9 * (1 + p) + 3 * q + 1 + r] == kernel[p, q, r, 0, 0]


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_input_jacobian_is_d_times_t_and_equals_autodiff(padding):
    layer = built(Conv3D, (3, 3, 3, 2), filters=2, kernel_size=2, padding=padding)
    assert_input_jacobian_is_autodiff(layer, (3, 3, 3, 2))
    tanh = built(Conv3D, (3, 2, 3, 1), filters=2, kernel_size=2, activation="tanh")
    assert_input_jacobian_is_autodiff(tanh, (3, 2, 3, 1))


@pytest.mark.parametrize("bias", ["tied", "untied"])
def test_parameter_jacobian_equals_autodiff_and_its_transpose_is_the_backward(bias):
    input_shape = (3, 4, 3, 2)
    layer = built(Conv3D, input_shape, filters=2, kernel_size=2, strides=(1, 2, 1), bias=bias)
    x, jacobian = assert_parameter_jacobian_is_autodiff(layer, input_shape)
    factors = layer.jacobian_factors(x[0])
    assert factors["T(K)"].shape == (jacobian.shape[1], 3 * 4 * 3 * 2)
    np.testing.assert_array_equal(factors["[I (x) X_patch | J_b]"], jacobian[0])


@pytest.mark.parametrize("bias", ["tied", "untied"])
def test_per_example_rows_and_norms(bias):
    """Per-example gradients sum to the batch gradient, the first equals a batch of one's, and
    their squared norms are ``per_example_squared_norms``'s (Gram or outer form)."""
    layer = built(Conv3D, (3, 3, 4, 2), filters=3, kernel_size=2, padding="same", bias=bias)
    assert_per_example_rows_sum_to_the_backward(layer, (3, 3, 4, 2))


CONTRACT_CASES = [
    ((3, 3, 3, 2), {"filters": 2, "kernel_size": 2}),
    ((4, 3, 4, 1), {"filters": 3, "kernel_size": (2, 2, 3), "strides": 2, "padding": "same"}),
    ((4, 4, 3, 2), {"filters": 2, "kernel_size": 2, "dilation_rate": 2, "bias": "untied"}),
    ((2, 3, 3, 3), {"filters": 2, "kernel_size": 1, "use_bias": False}),
]


@pytest.mark.parametrize("input_shape, kwargs", CONTRACT_CASES)
def test_contract_products_are_autodiff_for_three_vectors(input_shape, kwargs):
    """``vjp_input`` and ``vjp_params`` (summed and per sample) for ``V = 3`` vectors per sample,
    and ``squared_norms``, against autodiff of ``keras.ops.conv`` (the kernel
    ``(k_1, k_2, k_3, C, F)``, an untied bias ``(D_out, H_out, W_out, F)``)."""
    assert_contract_is_autodiff(built(Conv3D, input_shape, **kwargs), input_shape)


def test_per_example_gradients_of_a_model_are_its_batch_rows():
    """Algorithm 1 on a model with a ``Conv3D``: the per-example gradients of the loss average to
    the batch's (autodiff of the reference route) and the first is a batch of one's."""
    model = keras.Sequential(
        [
            keras.Input((3, 3, 3, 1), dtype="float64"),
            Conv3D(2, 2, activation="tanh", dtype="float64"),
            tf_jacbp.layers.Flatten(dtype="float64"),
            tf_jacbp.layers.Dense(2, dtype="float64"),
        ]
    )
    loss = tf_jacbp.losses.MeanSquaredError(dtype="float64")
    model.compile(loss=loss)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(3, 3, 3, 3, 1)), rng.normal(size=(3, 2))
    rows = tf_jacbp.jacobian.per_example_gradients(model, x, y, flatten=False)

    def gradient(x, y):
        with tf.GradientTape() as tape, tf_jacbp.reference_mode():
            value = loss(y, model(x))
        return tape.gradient(value, model.trainable_variables)

    for row, whole in zip(rows, gradient(x, y), strict=True):
        assert tolerances.relative_error(tf.reduce_mean(row, axis=0), whole) <= RTOL64
    for row, one in zip(rows, gradient(x[:1], y[:1]), strict=True):
        assert tolerances.relative_error(row[0], one) <= RTOL64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kernel_size": (2, 2)}, "kernel_size"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"strides": (1, 0, 1)}, "strides"),
        ({"dilation_rate": -1}, "dilation_rate=-1"),
        ({"strides": 2, "dilation_rate": 2}, "dilation_rate"),
        ({"filters": 0}, "filters=0"),
        ({"padding": "causal"}, "padding"),
        ({"data_format": "NCDHW"}, "data_format='NCDHW'"),
        ({"groups": 3}, "groups=3, filters=2"),
        ({"groups": True}, "groups=True"),
        ({"bias": "shared"}, "bias='shared'"),
        ({"toeplitz_budget_bytes": -1}, "toeplitz_budget_bytes"),
        ({"lora_rank": 2}, "lora_rank"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Conv3D(**{"filters": 2, "kernel_size": 2, **kwargs})


def test_bad_inputs_name_the_shape_and_the_fix():
    with pytest.raises(ValueError, match=r"spans 3 along the depth.*'same'"):
        keras.Sequential([keras.Input((2, 4, 4, 1)), Conv3D(2, 3)])
    with pytest.raises(ValueError, match=r"\(batch, depth, height, width, channels\)"):
        keras.Sequential([keras.Input((4, 4, 1)), Conv3D(2, 2)])
    with pytest.raises(ValueError, match="known channel count"):
        keras.Sequential([keras.Input((3, 3, 3, None)), Conv3D(2, 2)])


def test_get_config_round_trip_and_keras_config():
    layer = Conv3D(4, (2, 3, 1), strides=(1, 2, 1), padding="same", activation="relu")
    clone = Conv3D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    stock = keras.layers.Conv3D(4, (2, 3, 1), strides=(1, 2, 1), padding="same").get_config()
    ours = layer.get_config()
    for key in ("filters", "kernel_size", "strides", "padding", "dilation_rate", "groups"):
        assert ours[key] == stock[key], key


@pytest.mark.parametrize("compiled", [False, True])
def test_memory_guard_sparse_path_equals_dense(compiled):
    """Over the budget the 3-D ``T(K)`` goes sparse with a warning; values and gradients are the
    dense layer's (an ``8^3`` volume, whose dense step exceeds its sparse one)."""
    kwargs = {"filters": 2, "kernel_size": 2, "padding": "same"}
    assert_sparse_path_equals_dense(Conv3D, (8, 8, 8, 1), kwargs, compiled)


def test_weights_copy_from_a_stock_conv3d_in_a_model():
    """A model's ``keras.layers.Conv3D`` weights load into the same model with ``Conv3D``: the
    predictions agree (float32)."""
    stock = keras.Sequential([keras.Input((4, 4, 4, 2)), keras.layers.Conv3D(3, 2)])
    ours = keras.Sequential([keras.Input((4, 4, 4, 2)), Conv3D(3, 2)])
    ours.set_weights(stock.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 4, 2)).astype("float32")
    np.testing.assert_allclose(ours(x), stock(x), rtol=1e-5, atol=1e-5)


def test_a_subclass_overriding_build_has_it_run():
    class Noted(Conv3D):
        def build(self, input_shape):
            self.noted = tuple(input_shape)
            super().build(input_shape)

    layer = Noted(2, 2)
    layer(np.zeros((1, 3, 3, 3, 1), "float32"))
    assert layer.noted == (1, 3, 3, 3, 1)


@pytest.mark.parametrize("input_shape, kwargs", [c for c in CONTRACT_CASES if "bias" not in c[1]])
def test_contract_products_for_an_unknown_size_are_autodiff(input_shape, kwargs):
    """The same products traced for a volume of unknown size (the index maps computed when the
    graph runs, ``tf_jacbp.toeplitz_dynamic``)."""
    layer = built(Conv3D, (None, None, None, input_shape[-1]), **kwargs)
    assert_contract_is_autodiff(layer, input_shape, unknown_size=True)


def _volume_model():
    return keras.Sequential(
        [
            keras.Input((None, None, None, 2), dtype="float64"),
            Conv3D(2, 2, padding="same", activation="tanh", dtype="float64"),
            Conv3D(1, (2, 1, 2), strides=(1, 2, 1), dtype="float64"),
        ]
    )


def test_fit_on_volumes_of_three_sizes_applies_the_reference_gradients():
    """One ``fit`` over a dataset whose batches have three volume sizes (traced once, sizes
    unknown): each step's ``SGD(1.0)`` update is the reference route's gradient."""
    model = compiled_sgd(_volume_model())
    data = batches(model, [(3, 4, 3, 2), (4, 3, 2, 2), (2, 2, 4, 2)], seed=6)
    check = UpdatesMatchReference(data)
    model.fit(dataset(data), steps_per_epoch=3, verbose=0, shuffle=False, callbacks=[check])
    assert len(check.errors) == 3 and max(check.errors) <= RTOL64
    assert model.layers[0]._indices == {}


def test_one_trace_of_unknown_size_gives_the_reference_gradients():
    model = _volume_model()
    assert_one_trace_gives_the_reference_gradients(model, [(3, 3, 3, 2), (2, 4, 3, 2)], seed=2)
