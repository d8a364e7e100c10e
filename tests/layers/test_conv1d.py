"""Conv1D: every mode of the harness, agreement with keras.layers.Conv1D (hypothesis-drawn
strides, paddings including causal, dilations), the 1-D Toeplitz matrix of Lemma 2, the Jacobian
accessors against autodiff, sequences of varying length, and bad arguments."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conv_checks import (
    assert_another_size_after_an_eager_call,
    assert_contract_is_autodiff,
    assert_fit_applies_the_reference_gradients,
    assert_input_jacobian_is_autodiff,
    assert_one_trace_gives_the_reference_gradients,
    assert_parameter_jacobian_is_autodiff,
    assert_per_example_rows_sum_to_the_backward,
    batches,
    built,
    compiled_sgd,
    values_and_gradients,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tf_jacbp import tolerances
from tf_jacbp.layers.conv1d import Conv1D
from tf_jacbp.testing import check_layer

RTOL64 = tolerances.rtol("float64")


@pytest.mark.parametrize(
    "input_shape, kwargs",
    [
        ((7, 2), {"filters": 3, "kernel_size": 3, "padding": "same", "activation": "relu"}),
        (
            (8, 3),
            {
                "filters": 2,
                "kernel_size": 3,
                "padding": "causal",
                "dilation_rate": 2,
                "use_bias": False,
                "activation": "tanh",
            },
        ),
        ((9, 1), {"filters": 2, "kernel_size": 2, "strides": 2, "bias": "untied"}),
    ],
)
def test_conv1d_every_mode(input_shape, kwargs, tmp_path):
    check_layer(lambda dtype: Conv1D(dtype=dtype, **kwargs), input_shape, tmp_dir=tmp_path)


@st.composite
def conv1d_configs(draw):
    """Keras Conv1D arguments and a sequence they fit: kernel 1-4, strides 1-3 or dilation 1-3
    (Keras refuses both above 1), every padding, 1-3 channels in and out, with or without
    bias."""
    kernel = draw(st.integers(1, 4))
    strides, dilation = draw(st.integers(1, 3)), 1
    if strides == 1:
        dilation = draw(st.integers(1, 3))
    padding = draw(st.sampled_from(["valid", "same", "causal"]))
    low = (kernel - 1) * dilation + 1 if padding == "valid" else 1
    length = draw(st.integers(low, low + 7))
    kwargs = {
        "filters": draw(st.integers(1, 3)),
        "kernel_size": kernel,
        "strides": strides,
        "padding": padding,
        "dilation_rate": dilation,
        "use_bias": draw(st.booleans()),
        "activation": draw(st.sampled_from([None, "tanh"])),
    }
    return kwargs, (length, draw(st.integers(1, 3))), draw(st.integers(0, 2**16))


@settings(derandomize=True, max_examples=15, deadline=None)
@given(conv1d_configs())
def test_agrees_with_keras_conv1d(config):
    """Outputs and gradients (input, kernel, bias) equal the stock ``keras.layers.Conv1D`` with
    the same weights, in float64, to 1e-12."""
    kwargs, input_shape, seed = config
    ours, stock = Conv1D(dtype="float64", **kwargs), keras.layers.Conv1D(dtype="float64", **kwargs)
    for layer in (ours, stock):
        layer.build((None, *input_shape))
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=w.shape) for w in stock.weights]
    ours.set_weights(weights)
    stock.set_weights(weights)
    x = tf.constant(rng.normal(size=(3, *input_shape)))
    assert ours.compute_output_shape(x.shape) == stock.compute_output_shape(x.shape)
    delta = tf.constant(rng.normal(size=stock.compute_output_shape(x.shape)))
    got, want = values_and_gradients(ours, x, delta), values_and_gradients(stock, x, delta)
    for name, a, b in zip(["y", "dx", "dK", "db"], got, want, strict=False):
        assert a.shape == b.shape, name
        assert tolerances.relative_error(a, b) <= RTOL64, (name, kwargs, input_shape)


def _built(input_shape, seed=0, **kwargs):
    return built(Conv1D, input_shape, seed, **kwargs)


def test_lemma_2_in_one_dimension():
    """A sequence of 4 and the kernel ``[k1, k2]``: ``T(K)`` is the 3 x 4 banded Toeplitz
    matrix; causal padding adds the column of the zero before the sequence (dropped), so its
    first row reads ``k2`` alone."""
    layer = Conv1D(1, 2, use_bias=False, dtype="float64")
    layer.build((None, 4, 1))
    k1, k2 = 2.0, 3.0
    layer.kernel.assign(np.array([k1, k2]).reshape(2, 1, 1))
    expected = [[k1, k2, 0, 0], [0, k1, k2, 0], [0, 0, k1, k2]]
    np.testing.assert_array_equal(layer.toeplitz_matrix(), expected)
    np.testing.assert_array_equal(layer.input_jacobian(np.ones((4, 1))), expected)
    causal = Conv1D(1, 2, padding="causal", use_bias=False, dtype="float64")
    causal.build((None, 4, 1))
    causal.kernel.assign(layer.kernel)
    expected = [[k2, 0, 0, 0], [k1, k2, 0, 0], [0, k1, k2, 0], [0, 0, k1, k2]]
    np.testing.assert_array_equal(causal.toeplitz_matrix(), expected)


@pytest.mark.parametrize("bias", ["tied", "untied"])
def test_parameter_jacobian_equals_autodiff_and_its_transpose_is_the_backward(bias):
    input_shape = (7, 2)
    layer = _built(input_shape, filters=3, kernel_size=3, strides=2, padding="same", bias=bias)
    x, jacobian = assert_parameter_jacobian_is_autodiff(layer, input_shape)
    rows = jacobian.shape[1]
    factors = layer.jacobian_factors(x[0])
    assert factors["T(K)"].shape == (rows, 14)
    np.testing.assert_array_equal(factors["[I (x) X_patch | J_b]"], jacobian[0])


@pytest.mark.parametrize("padding", ["causal", "valid"])
def test_input_jacobian_is_d_times_t_and_equals_autodiff(padding):
    layer = _built((6, 2), filters=2, kernel_size=3, padding=padding, activation="tanh")
    assert_input_jacobian_is_autodiff(layer, (6, 2))


@pytest.mark.parametrize("bias", ["tied", "untied"])
def test_per_example_rows_and_norms(bias):
    """Per-example gradients sum to the batch gradient, the first equals a batch of one's, and
    their squared norms equal ``per_example_squared_norms``."""
    layer = _built((8, 2), filters=3, kernel_size=3, padding="causal", dilation_rate=2, bias=bias)
    assert_per_example_rows_sum_to_the_backward(layer, (8, 2))


def _sequence_model():
    return keras.Sequential(
        [
            keras.Input((None, 2), dtype="float64"),
            Conv1D(3, 3, padding="causal", activation="tanh", dtype="float64"),
            Conv1D(1, 2, strides=2, dtype="float64"),
        ]
    )


def test_sequences_of_varying_length():
    """On ``keras.Input((None, C))`` a ``tf.function`` traced once for an unknown length (the
    maps of ``T(K)`` computed when the graph runs) gives the reference route's gradients at
    each length, and ``T^T`` equals the static one exactly."""
    model = _sequence_model()
    assert_one_trace_gives_the_reference_gradients(model, [(5, 2), (11, 2), (8, 2)], seed=4)
    assert model.layers[0]._indices == {}
    layer = model.layers[0]
    kernel = layer.read_parameters()[0]
    image_kernel = tf.reshape(kernel, [1, *kernel.shape])

    @tf.function(input_signature=[tf.TensorSpec((None, 1, None, 2), "float64")])
    def dynamic(x):
        return layer.index_for(x)[0].transpose_matrix(image_kernel)

    x = tf.zeros((1, 1, 7, 2), "float64")
    static = layer.toeplitz_index(x.shape)[0].transpose_matrix(image_kernel)
    np.testing.assert_array_equal(dynamic(x), static)


def test_fit_on_sequences_of_three_lengths_applies_the_reference_gradients():
    """``fit`` with SGD(1.0) on lengths 6, 9, 4 (no ``make_train_function``): every step's update
    is the reference route's gradient, also after Keras relaxes its step to unknown lengths."""
    model = compiled_sgd(_sequence_model())
    data = batches(model, [(6, 2), (9, 2), (4, 2)], seed=5)
    assert_fit_applies_the_reference_gradients(model, data)
    assert sorted(model.layers[0]._indices) == [(6,)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"data_format": "channels_middle"}, "data_format='channels_middle'"),
        ({"groups": 4}, "groups=4, filters=2"),
        ({"groups": -1}, "groups=-1"),
        ({"lora_rank": 2}, "lora_rank=2"),
        ({"quantization_config": "int8"}, "quantization_config='int8'"),
        ({"padding": "full"}, r"'valid' or 'same' or 'causal', got padding='full'"),
        ({"kernel_size": (2, 2)}, r"kernel_size=\(2, 2\)"),
        ({"strides": 0}, "strides=0"),
        ({"dilation_rate": -1}, "dilation_rate=-1"),
        ({"strides": 2, "dilation_rate": 2}, "dilation_rate"),
        ({"filters": 0}, "filters=0"),
        ({"bias": "shared"}, "bias='shared'"),
        ({"toeplitz_budget_bytes": -1}, "toeplitz_budget_bytes"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Conv1D(**{"filters": 2, "kernel_size": 3, **kwargs})


def test_bad_inputs_name_the_shape_and_the_fix():
    with pytest.raises(ValueError, match=r"kernel_size \(5,\).*spans 5 along the length.*'same'"):
        keras.Sequential([keras.Input((4, 1)), Conv1D(2, 5)])
    with pytest.raises(ValueError, match=r"\(batch, length, channels\).*\(None, 4, 4, 1\)"):
        keras.Sequential([keras.Input((4, 4, 1)), Conv1D(2, 3)])
    with pytest.raises(ValueError, match="known channel count"):
        keras.Sequential([keras.Input((5, None)), Conv1D(2, 3)])


def test_get_config_round_trip_and_keras_config():
    layer = Conv1D(4, 3, strides=2, padding="causal", activation="relu", toeplitz_budget_bytes=999)
    clone = Conv1D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    stock = keras.layers.Conv1D(4, 3, strides=2, padding="causal").get_config()
    ours = layer.get_config()
    for key in ("filters", "kernel_size", "strides", "padding", "dilation_rate", "groups"):
        assert ours[key] == stock[key], key


CONTRACT_CASES = [
    ((7, 2), {"filters": 3, "kernel_size": 3, "padding": "causal", "dilation_rate": 2}),
    ((8, 3), {"filters": 2, "kernel_size": 2, "strides": 3, "bias": "untied"}),
    ((6, 2), {"filters": 2, "kernel_size": 3, "padding": "same", "use_bias": False}),
]


@pytest.mark.parametrize("input_shape, kwargs", CONTRACT_CASES)
def test_contract_products_are_autodiff_for_three_vectors(input_shape, kwargs):
    """``vjp_input`` and ``vjp_params`` (summed and per sample) for ``V = 3`` vectors per sample,
    and ``squared_norms``, against autodiff of the reference route (the kernel ``(k, C, F)``,
    an untied bias ``(T_out, F)``)."""
    assert_contract_is_autodiff(built(Conv1D, input_shape, **kwargs), input_shape)


@pytest.mark.parametrize("input_shape, kwargs", [c for c in CONTRACT_CASES if "bias" not in c[1]])
def test_contract_products_for_an_unknown_length_are_autodiff(input_shape, kwargs):
    layer = built(Conv1D, (None, input_shape[-1]), **kwargs)
    assert_contract_is_autodiff(layer, input_shape, unknown_size=True)


def test_a_layer_called_eagerly_at_one_length_takes_another_as_keras_does():
    """Built by its first (eager) call at length 10, the layer takes length 12 next, as
    ``keras.layers.Conv1D`` does (it refused: its ``input_spec`` fixed the length)."""
    assert_another_size_after_an_eager_call(
        Conv1D, keras.layers.Conv1D, (10, 3), (12, 3), filters=4, kernel_size=3
    )
