"""Conv2DTranspose: every mode of the harness, agreement with keras.layers.Conv2DTranspose,
``T(K)^T`` as the transpose of Conv2D's ``T(K)``, the Jacobian accessors, the memory guard, bad
input."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conv_checks import (
    assert_another_size_after_an_eager_call,
    assert_contract_is_autodiff,
    assert_fit_applies_the_reference_gradients,
    assert_input_jacobian_is_autodiff,
    assert_parameter_jacobian_is_autodiff,
    assert_per_example_rows_sum_to_the_backward,
    assert_sparse_path_equals_dense,
    assert_unknown_size_per_example_equals_static,
    batches,
    built,
    compiled_sgd,
    values_and_gradients,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tf_jacbp
from tf_jacbp import toeplitz, tolerances
from tf_jacbp.layers.conv import Conv2D
from tf_jacbp.layers.conv_transpose import Conv2DTranspose
from tf_jacbp.layout import vec_parameter, vec_parameter_batch
from tf_jacbp.testing import check_layer

RTOL = tolerances.rtol("float64")


@pytest.mark.parametrize(
    "input_shape, kwargs",
    [
        (
            (3, 4, 2),
            {
                "filters": 3,
                "kernel_size": (3, 2),
                "strides": 2,
                "padding": "same",
                "output_padding": (0, 1),
                "activation": "tanh",
                "kernel_regularizer": "l2",
            },
        ),
        ((4, 3, 1), {"filters": 2, "kernel_size": 3, "dilation_rate": (2, 1), "use_bias": False}),
    ],
)
def test_conv2d_transpose_every_mode(input_shape, kwargs, tmp_path):
    check_layer(lambda dtype: Conv2DTranspose(dtype=dtype, **kwargs), input_shape, tmp_dir=tmp_path)


def _spread(kernel, dilation_rate):
    """``K'[p d_h, q d_w] = K[p, q]``, zeros between: the undilated kernel of a dilated one."""
    (kh, kw), (dh, dw) = kernel.shape[:2], dilation_rate
    spread = np.zeros(((kh - 1) * dh + 1, (kw - 1) * dw + 1, *kernel.shape[2:]))
    spread[::dh, ::dw] = kernel
    return spread


@settings(max_examples=12, deadline=None)
@given(
    data=st.data(),
    size=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    kernel_size=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    channels=st.integers(1, 3),
    filters=st.integers(1, 3),
    padding=st.sampled_from(["valid", "same"]),
    use_bias=st.booleans(),
    dilated=st.booleans(),
)
def test_agrees_with_keras_conv2d_transpose(
    data, size, kernel_size, channels, filters, padding, use_bias, dilated
):
    """Same weights, float64: outputs and the gradients with respect to the input, the kernel and
    the bias equal ``keras.layers.Conv2DTranspose``'s to 1e-12. TensorFlow's CPU kernel has no
    dilation, so a dilated layer is compared with the stock layer of the spread-out kernel
    (``_spread``), and the stock dilated layer's ``compute_output_shape`` with ours."""
    pair = st.tuples(st.integers(1, 3), st.integers(1, 3))
    strides, dilation_rate = ((1, 1), data.draw(pair)) if dilated else (data.draw(pair), (1, 1))
    output_padding = data.draw(
        st.none() | st.tuples(*(st.integers(0, s - 1) for s in strides)), label="output_padding"
    )
    if padding == "same" and output_padding is not None:  # else no conv maps back (stock fails)
        extents = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation_rate, strict=True)]
        assume(all(e % 2 + p >= 1 for e, p in zip(extents, output_padding, strict=True)))
    kwargs = dict(
        filters=filters,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        output_padding=output_padding,
        use_bias=use_bias,
        dtype="float64",
    )
    ours = Conv2DTranspose(dilation_rate=dilation_rate, **kwargs)
    rng = np.random.default_rng(sum(size) + 7 * channels)
    x = tf.constant(rng.normal(size=(2, *size, channels)))
    ours.build(x.shape)
    ours.set_weights([rng.normal(size=w.shape) for w in ours.weights])
    stock_dilated = keras.layers.Conv2DTranspose(dilation_rate=dilation_rate, **kwargs)
    assert ours.compute_output_shape(x.shape) == tuple(stock_dilated.compute_output_shape(x.shape))
    weights = ours.get_weights()
    stock_kwargs = dict(kwargs)
    if dilated:
        weights[0] = _spread(weights[0], dilation_rate)
        stock_kwargs["kernel_size"] = weights[0].shape[:2]
    stock = keras.layers.Conv2DTranspose(**stock_kwargs)
    stock.build(x.shape)
    stock.set_weights(weights)
    upstream = tf.constant(rng.normal(size=ours.compute_output_shape(x.shape)))
    got = values_and_gradients(ours, x, upstream)
    want = values_and_gradients(stock, x, upstream)
    if dilated:  # the stock kernel gradient at the taps that the dilated kernel has
        want[2] = want[2][:: dilation_rate[0], :: dilation_rate[1]]
    names = ["output", "input gradient", "kernel gradient", "bias gradient"][: len(got)]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape, name
        assert tolerances.relative_error(g, w) <= RTOL, name


def _built(input_shape, seed=0, **kwargs):
    return built(Conv2DTranspose, input_shape, seed, **kwargs)


@pytest.mark.parametrize(
    "input_shape, kwargs",
    [
        ((2, 2, 1), {"kernel_size": 2}),
        ((3, 2, 2), {"kernel_size": (3, 2), "strides": 2, "padding": "same"}),
        ((3, 3, 2), {"kernel_size": 2, "strides": (3, 2), "output_padding": (2, 1)}),
        ((4, 3, 3), {"kernel_size": 3, "dilation_rate": 2, "padding": "same"}),
    ],
)
def test_toeplitz_matrix_is_the_transpose_of_conv2d_matrix(input_shape, kwargs):
    """The same matrix read the other way: ``toeplitz_matrix()`` transposed is the ``T(K)`` of the
    tf_jacbp Conv2D with the same kernel array, strides, padding and dilation on an image of the
    transposed layer's output shape, whose output has the transposed layer's input shape."""
    layer = _built(input_shape, filters=3, use_bias=False, **kwargs)
    out_shape = layer.compute_output_shape((None, *input_shape))[1:]
    conv_kwargs = {k: v for k, v in kwargs.items() if k != "output_padding"}
    conv = Conv2D(input_shape[2], use_bias=False, dtype="float64", **conv_kwargs)
    assert conv.compute_output_shape((None, *out_shape))[1:] == input_shape
    conv.build((None, *out_shape))
    conv.kernel.assign(layer.kernel)
    np.testing.assert_array_equal(np.transpose(layer.toeplitz_matrix()), conv.toeplitz_matrix())


def test_lemma_2_matrix_transposed():
    """A ``2 x 2`` input, the kernel ``[[k1, k2], [k3, k4]]``: ``y = T(K)^T x`` with Lemma 2's
    ``4 x 9`` matrix, each input entry spreading the whole kernel over the ``3 x 3`` output."""
    layer = Conv2DTranspose(1, 2, use_bias=False, dtype="float64")
    layer.build((None, 2, 2, 1))
    k1, k2, k3, k4 = 2.0, 3.0, 5.0, 7.0
    layer.kernel.assign(np.array([[k1, k2], [k3, k4]]).reshape(2, 2, 1, 1))
    lemma_2 = np.array(
        [
            [k1, k2, 0, k3, k4, 0, 0, 0, 0],
            [0, k1, k2, 0, k3, k4, 0, 0, 0],
            [0, 0, 0, k1, k2, 0, k3, k4, 0],
            [0, 0, 0, 0, k1, k2, 0, k3, k4],
        ]
    )
    np.testing.assert_array_equal(layer.toeplitz_matrix(), lemma_2.T)
    x = np.arange(1.0, 5.0)
    y = layer(x.reshape(1, 2, 2, 1))
    np.testing.assert_array_equal(np.reshape(y, [-1]), lemma_2.T @ x)


@pytest.mark.parametrize("use_bias", [True, False])
def test_parameter_jacobian_equals_autodiff_and_its_transpose_is_the_backward(use_bias):
    """``J_{Vec(K), b} y`` in theta order against ``tape.jacobian`` of the reference route; ``J^T
    delta`` equals the backward pass (the convolution's kernel gradient, roles swapped)."""
    input_shape = (3, 2, 2)
    layer = _built(
        input_shape,
        filters=3,
        kernel_size=(2, 3),
        strides=(2, 1),
        padding="same",
        use_bias=use_bias,
    )
    assert_parameter_jacobian_is_autodiff(layer, input_shape)


@pytest.mark.parametrize("activation", [None, "tanh"])
def test_input_jacobian_is_d_times_t_transpose_and_equals_autodiff(activation):
    input_shape = (3, 3, 2)
    layer = _built(
        input_shape, filters=2, kernel_size=3, strides=2, padding="same", activation=activation
    )
    x = assert_input_jacobian_is_autodiff(layer, input_shape)
    factors = layer.jacobian_factors(x[0])
    np.testing.assert_array_equal(factors["T(K)^T"], layer.toeplitz_matrix())
    np.testing.assert_array_equal(factors["J_{Vec(K), b} y"], layer.parameter_jacobian(x[0]))


def test_algorithm_1_through_a_conv_autoencoder():
    """``tf_jacbp.jacobian``'s explicit chain over Conv2D (down) and Conv2DTranspose (up) equals
    autodiff of the reference route: ``J_theta z[L]`` for an image output, per-example gradients,
    and the named factors (``T(K)`` down, ``T(K)^T`` up)."""
    from tf_jacbp import jacobian
    from tf_jacbp.testing import half_squared_error

    model = keras.Sequential(
        [
            keras.Input((5, 4, 1), dtype="float64"),
            Conv2D(2, 3, strides=2, padding="same", activation="tanh", dtype="float64"),
            Conv2DTranspose(
                1, 3, strides=2, padding="same", output_padding=(0, 1), dtype="float64"
            ),
        ]
    )
    assert model.output_shape == (None, 5, 4, 1)
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(2, 5, 4, 1)))
    variables = jacobian.parameter_variables(model)
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            z = tf.reshape(model(x), [2, -1])
    expected = tf.concat(
        [
            tf.reshape(vec_parameter_batch(tf.reshape(j, [-1, *v.shape])), [2, z.shape[1], -1])
            for j, v in zip(tape.jacobian(z, variables), variables, strict=True)
        ],
        axis=-1,
    )
    got = jacobian.parameter_jacobian(model, x)
    assert tolerances.relative_error(tf.reshape(got, expected.shape), expected) <= RTOL
    t = tf.constant(rng.normal(size=(2, 5, 4, 1)))
    per_example = jacobian.per_example_gradients(model, x, t, loss=half_squared_error)
    for i in range(2):
        with tf.GradientTape() as tape:
            with tf_jacbp.reference_mode():
                loss = tf.reduce_sum(half_squared_error(t[i : i + 1], model(x[i : i + 1])))
        flat = tf.concat([vec_parameter(g) for g in tape.gradient(loss, variables)], axis=0)
        assert tolerances.relative_error(per_example[i], flat) <= RTOL
    names = [name.split(": ", 1)[1] for name in jacobian.layer_jacobians(model, x[:1])]
    assert names.count("T(K)") == 1 and names.count("T(K)^T") == 1


@pytest.mark.parametrize(
    "input_shape, kwargs",
    [  # the Gram form (few positions) and the outer form (many) of patch_product_squared_norms
        ((2, 2, 3), {"filters": 4, "kernel_size": 3, "padding": "same"}),
        ((4, 3, 2), {"filters": 2, "kernel_size": 2, "strides": 2}),
    ],
)
def test_per_example_backward_and_squared_norms(input_shape, kwargs):
    """Per-sample gradients sum to the batch's and equal a batch of one's; their squared norms
    equal ``per_example_squared_norms``, which never forms them."""
    layer = _built(input_shape, **kwargs)
    assert_per_example_rows_sum_to_the_backward(layer, input_shape)


@pytest.mark.parametrize("compiled", [False, True])
def test_memory_guard_sparse_path_gives_the_same_outputs_and_gradients(compiled):
    """A budget below a dense training step switches to a sparse ``T``, with a warning."""
    input_shape, kwargs = (
        (16, 16, 2),
        {"filters": 2, "kernel_size": 3, "strides": 2, "padding": "same", "activation": "relu"},
    )
    assert_sparse_path_equals_dense(Conv2DTranspose, input_shape, kwargs, compiled)


def test_memory_guard_error_states_the_size_and_the_setting():
    # The transposed layer on (4, 5, 2) to (8, 10, 3) is the transpose of this convolution.
    index = toeplitz.conv_index((3, 3, 3, 2), (8, 10, 3), strides=2, padding="same")
    budget = index.sparse_bytes("float32") - 1
    with pytest.raises(ValueError) as info:
        keras.Sequential(
            [
                keras.Input((4, 5, 2)),
                Conv2DTranspose(
                    3,
                    3,
                    strides=2,
                    padding="same",
                    toeplitz="materialize",
                    toeplitz_budget_bytes=budget,
                ),
            ]
        )
    message = str(info.value)
    assert f"{index.dense_bytes('float32')} bytes" in message
    assert "Conv2DTranspose(..., toeplitz_budget_bytes=...)" in message
    assert "set_budget_bytes" in message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"filters": 0}, "filters=0"),
        ({"filters": 2.0}, "filters=2.0"),
        ({"kernel_size": 0}, "kernel_size=0"),
        ({"strides": (1, -1)}, r"strides=\(1, -1\)"),
        ({"dilation_rate": 0}, "dilation_rate=0"),
        ({"strides": 2, "dilation_rate": 2}, "dilation_rate"),
        ({"padding": "full"}, "padding='full'"),
        ({"padding": "causal"}, "padding='causal'"),
        ({"output_padding": 2, "strides": 2}, "output_padding=2"),
        ({"output_padding": (0, -1), "strides": 2}, r"output_padding=\(0, -1\)"),
        ({"output_padding": 1.5, "strides": 2}, "output_padding=1.5"),
        ({"output_padding": (0, 0, 0)}, r"output_padding=\(0, 0, 0\)"),
        ({"data_format": "first"}, "data_format='first'"),
        ({"groups": 2}, "groups=2"),
        ({"lora_rank": 4}, "lora_rank=4"),
        ({"toeplitz_budget_bytes": 0}, "toeplitz_budget_bytes"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Conv2DTranspose(**{"filters": 2, "kernel_size": 3, **kwargs})


def test_output_padding_without_a_transposed_convolution_is_an_error_naming_it():
    """``"same"``, an even kernel and ``output_padding=0``: Keras' size ``(n - 1) s`` maps back to
    ``n - 1``, not ``n``. The stock layer fails when called; ours names the argument at build."""
    with pytest.raises(ValueError, match=r"output_padding=\(0, 0\).*output_padding >= 1"):
        keras.Sequential(
            [
                keras.Input((3, 3, 1)),
                Conv2DTranspose(2, 2, strides=2, padding="same", output_padding=0),
            ]
        )
    stock = keras.layers.Conv2DTranspose(2, 2, strides=2, padding="same", output_padding=0)
    # TensorFlow's error class depends on its CPU kernels: oneDNN's raises AbortedError.
    with pytest.raises((tf.errors.InvalidArgumentError, tf.errors.AbortedError)):
        stock(np.zeros((1, 3, 3, 1), "float32"))


def test_bad_input_shapes_are_errors():
    with pytest.raises(ValueError, match=r"\(batch, height, width, channels\)"):
        keras.Sequential([keras.Input((784,)), Conv2DTranspose(2, 3)])
    with pytest.raises(ValueError, match="known channel count"):
        keras.Sequential([keras.Input((None, None, None)), Conv2DTranspose(2, 3)])


def test_inputs_of_varying_size_get_one_t_per_size():
    """Built for ``(None, None, C)``, the layer builds ``T(K)`` for each static size it is called
    with and agrees with the stock layer on each; a function traced once for an unknown size
    computes the maps when the graph runs and agrees too, with ``T^T`` exactly the static one."""
    model = keras.Sequential(
        [
            keras.Input((None, None, 2), dtype="float64"),
            Conv2DTranspose(3, 3, strides=2, dtype="float64"),
        ]
    )
    layer = model.layers[0]
    assert layer.conv_index is None and model.output_shape == (None, None, None, 3)
    stock = keras.layers.Conv2DTranspose(3, 3, strides=2, dtype="float64")
    stock.build((None, None, None, 2))
    stock.set_weights(layer.get_weights())
    rng = np.random.default_rng(8)
    signature = [tf.TensorSpec((None, None, None, 2), "float64")]
    unknown = tf.function(lambda x: layer(x), input_signature=signature)
    for size in ((2, 3), (4, 2), (2, 3)):
        x = tf.constant(rng.normal(size=(2, *size, 2)))
        upstream = tf.constant(rng.normal(size=stock.compute_output_shape(x.shape)))
        got = values_and_gradients(layer, x, upstream)
        want = values_and_gradients(stock, x, upstream)
        dynamic = values_and_gradients(unknown, x, upstream, layer.trainable_variables)
        for g, d, w in zip(got, dynamic, want, strict=True):
            assert tolerances.relative_error(g, w) <= RTOL
            assert tolerances.relative_error(d, w) <= RTOL
    assert sorted(layer._indices) == [(2, 3), (4, 2)]
    assert unknown.experimental_get_tracing_count() == 1
    kernel = layer.read_parameters()[0]
    transposed = tf.function(
        lambda x: layer.index_for(x)[0].transpose_matrix(kernel), input_signature=signature
    )
    x = tf.zeros((1, 3, 4, 2), "float64")
    np.testing.assert_array_equal(
        transposed(x), layer.toeplitz_index(x.shape)[0].transpose_matrix(kernel)
    )
    with pytest.raises(ValueError, match="varying size"):
        layer.toeplitz_matrix()
    assert layer.toeplitz_matrix((4, 2, 2)).shape == (9 * 5 * 3, 4 * 2 * 2)


def test_autoencoder_fits_three_image_sizes_with_the_reference_gradients():
    """Conv2D down, Conv2DTranspose up on ``keras.Input((None, None, 1))``: ``fit`` with SGD(1.0)
    on 6 x 8, 4 x 6 and 8 x 4 images (no ``make_train_function``) applies at each step the
    reference route's gradient, also after Keras relaxes its step to unknown sizes."""
    model = keras.Sequential(
        [
            keras.Input((None, None, 1), dtype="float64"),
            Conv2D(2, 3, strides=2, padding="same", activation="tanh", dtype="float64"),
            Conv2DTranspose(1, 3, strides=2, padding="same", dtype="float64"),
        ]
    )
    data = batches(model, [(6, 8, 1), (4, 6, 1), (8, 4, 1)], seed=9, autoencoder=True)
    assert_fit_applies_the_reference_gradients(compiled_sgd(model), data)
    assert sorted(model.layers[1]._indices) == [(3, 4)]


def test_unknown_size_checks_output_padding_when_the_graph_runs():
    """``output_padding`` without a transposed convolution (``"same"``, even kernel, 0) cannot be
    refused at build for an unknown size: the traced function refuses it when it runs."""
    layer = Conv2DTranspose(
        2, 2, strides=2, padding="same", output_padding=0, dtype="float64", toeplitz="materialize"
    )
    layer.build((None, None, None, 1))
    call = tf.function(layer, input_signature=[tf.TensorSpec((None, None, None, 1), "float64")])
    with pytest.raises(tf.errors.InvalidArgumentError, match="output_padding=\\(0, 0\\)"):
        call(np.zeros((1, 3, 3, 1)))


def test_output_shape_and_weights_copy_from_keras():
    """Keras' output-shape rules, and a kernel of Keras' shape ``(kh, kw, filters, channels)``."""
    for kwargs in (
        {"kernel_size": (2, 5), "strides": (3, 2)},
        {"kernel_size": 1, "strides": 3},
        {"kernel_size": 3, "strides": 2, "padding": "same"},
        {"kernel_size": 3, "strides": 3, "padding": "same", "output_padding": (1, 2)},
        {"kernel_size": 2, "strides": 2, "output_padding": 1},
        {"kernel_size": 3, "dilation_rate": (2, 3)},
    ):
        ours = Conv2DTranspose(4, **kwargs)
        stock = keras.layers.Conv2DTranspose(4, **kwargs)
        for shape in ((None, 5, 6, 3), (2, None, 6, 3)):
            assert ours.compute_output_shape(shape) == tuple(stock.compute_output_shape(shape))
        ours.build((None, 5, 6, 3))
        stock.build((None, 5, 6, 3))
        assert [w.shape for w in ours.weights] == [w.shape for w in stock.weights]


def test_get_config_round_trip():
    layer = Conv2DTranspose(
        4,
        (3, 2),
        strides=2,
        padding="same",
        output_padding=1,
        activation="relu",
        toeplitz_budget_bytes=12345,
    )
    config = layer.get_config()
    assert config["output_padding"] == (1, 1)
    clone = Conv2DTranspose.from_config(config)
    assert clone.get_config() == config


def test_unknown_size_per_example_rows_and_norms_equal_the_static_ones():
    """Per-example gradients and their squared norms, traced for an unknown size, equal the
    static route's."""
    layer = Conv2DTranspose(3, 3, strides=2, padding="same", dtype="float64")
    layer.build((None, None, None, 2))
    assert_unknown_size_per_example_equals_static(layer, (3, 4, 2), seed=7)


CONTRACT_CASES = [
    ((2, 2, 3), {"filters": 4, "kernel_size": 3, "padding": "same"}),
    ((4, 3, 2), {"filters": 2, "kernel_size": 2, "strides": 2}),
    ((3, 4, 2), {"filters": 3, "kernel_size": (2, 3), "dilation_rate": 2, "use_bias": False}),
    ((3, 3, 1), {"filters": 2, "kernel_size": 3, "strides": 2, "output_padding": 1}),
]


@pytest.mark.parametrize("input_shape, kwargs", CONTRACT_CASES)
def test_contract_products_are_autodiff_for_three_vectors(input_shape, kwargs):
    """``vjp_input`` and ``vjp_params`` (summed and per sample) for ``V = 3`` vectors per sample,
    and ``squared_norms``, against autodiff of the reference route."""
    assert_contract_is_autodiff(_built(input_shape, **kwargs), input_shape)


@pytest.mark.parametrize("input_shape, kwargs", CONTRACT_CASES[:2])
def test_contract_products_for_an_unknown_size_are_autodiff(input_shape, kwargs):
    layer = _built((None, None, input_shape[-1]), **kwargs)
    assert_contract_is_autodiff(layer, input_shape, unknown_size=True)


def test_a_layer_called_eagerly_at_one_size_takes_another_as_keras_does():
    """Built by its first (eager) call at 4 x 4, the layer takes 5 x 3 next, as
    ``keras.layers.Conv2DTranspose`` does (it refused: its ``input_spec`` fixed the size)."""
    assert_another_size_after_an_eager_call(
        Conv2DTranspose,
        keras.layers.Conv2DTranspose,
        (4, 4, 3),
        (5, 3, 3),
        filters=2,
        kernel_size=3,
        strides=2,
    )
