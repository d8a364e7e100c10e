"""Conv2D: every mode of the harness, Lemmas 2-3, the Jacobian accessors, the memory guard, bad
input, and LeNet-5 on the offline MNIST digits."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conv_checks import (
    UpdatesMatchReference,
    assert_another_size_after_an_eager_call,
    assert_contract_is_autodiff,
    assert_fit_applies_the_reference_gradients,
    assert_input_jacobian_is_autodiff,
    assert_one_trace_gives_the_reference_gradients,
    assert_parameter_jacobian_is_autodiff,
    assert_per_example_rows_sum_to_the_backward,
    assert_sparse_path_equals_dense,
    assert_unknown_size_per_example_equals_static,
    batches,
    built,
    compiled_sgd,
    dataset,
)

import tf_jacbp
from tf_jacbp import toeplitz, tolerances
from tf_jacbp.layers.conv import Conv2D
from tf_jacbp.layers.dense import Dense
from tf_jacbp.layout import vec_parameter, vec_parameter_batch
from tf_jacbp.testing import check_layer as run_layer_test


@pytest.mark.parametrize(
    "input_shape, kwargs, modes",
    [
        ((5, 6, 2), {"filters": 3, "kernel_size": 3, "padding": "same", "activation": "relu"}, 1),
        ((7, 6, 3), {"filters": 2, "kernel_size": (2, 3), "strides": 2, "bias": "untied"}, 1),
        ((6, 5, 1), {"filters": 2, "kernel_size": 2, "strides": (2, 1), "padding": "same"}, 0),
        (
            (7, 7, 2),
            {
                "filters": 2,
                "kernel_size": 3,
                "dilation_rate": 2,
                "padding": "same",
                "activation": "tanh",
            },
            1,
        ),
        (
            (5, 5, 2),
            {
                "filters": 3,
                "kernel_size": 4,
                "padding": "same",
                "bias": "untied",
                "activation": "sigmoid",
                "kernel_regularizer": "l2",
            },
            1,
        ),
        ((6, 4, 2), {"filters": 2, "kernel_size": (3, 1), "strides": 3, "use_bias": False}, 0),
        # softmax over the filters (the last axis of the image-shaped z)
        (
            (5, 5, 2),
            {"filters": 3, "kernel_size": 3, "padding": "same", "activation": "softmax"},
            0,
        ),
        # an activation whose D needs z (not only a)
        ((5, 6, 2), {"filters": 2, "kernel_size": 3, "activation": "elu", "bias": "untied"}, 0),
    ],
)
def test_conv2d_every_mode(input_shape, kwargs, modes, tmp_path):
    """modes=0: the formulas only (``check_layer(modes=False)``); fit modes, mixed precision and
    saving are the class's, run for the configurations with modes=1 (dilation and untied bias
    among them)."""
    run_layer_test(
        lambda dtype: Conv2D(dtype=dtype, **kwargs),
        input_shape,
        tmp_dir=tmp_path,
        modes=bool(modes),
    )


def _built(input_shape, seed=0, **kwargs):
    return built(Conv2D, input_shape, seed, **kwargs)


def test_lemma_2_toeplitz_matrix_of_the_layer():
    """The paper's 3 x 3 input and 2 x 2 kernel: ``toeplitz_matrix()`` is docs/math.md's 4 x 9."""
    layer = Conv2D(1, 2, use_bias=False, dtype="float64")
    layer.build((None, 3, 3, 1))
    k1, k2, k3, k4 = 2.0, 3.0, 5.0, 7.0
    layer.kernel.assign(np.array([[k1, k2], [k3, k4]]).reshape(2, 2, 1, 1))
    expected = [
        [k1, k2, 0, k3, k4, 0, 0, 0, 0],
        [0, k1, k2, 0, k3, k4, 0, 0, 0],
        [0, 0, 0, k1, k2, 0, k3, k4, 0],
        [0, 0, 0, 0, k1, k2, 0, k3, k4],
    ]
    np.testing.assert_array_equal(layer.toeplitz_matrix(), expected)
    np.testing.assert_array_equal(layer.input_jacobian(np.ones((3, 3, 1))), expected)


@pytest.mark.parametrize("bias", ["tied", "untied"])
def test_lemma_3_conv_layer_is_a_dense_layer_with_w_equal_t_transpose(bias):
    """``X * K_i + B_i = W_i^T x + b_i`` with ``W_i = T(K_i)^T``, ``b_i = vec(B_i)``: same outputs,
    and the same input and bias gradients; the kernel gradient is the Dense one summed over the
    entries of ``T`` that share each kernel entry."""
    input_shape = (6, 5, 2)
    conv = _built(
        input_shape,
        filters=3,
        kernel_size=(3, 2),
        strides=(2, 1),
        padding="same",
        bias=bias,
        activation="tanh",
    )
    index = conv.conv_index
    rows = index.shape[0]
    dense = Dense(rows, activation="tanh", dtype="float64")
    dense.build((None, index.shape[1]))
    b = np.broadcast_to(conv.bias.numpy(), index.output_shape).reshape(-1)  # row-major vec(B)
    dense.set_weights([np.asarray(conv.toeplitz_matrix()).T, b])
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(4, *input_shape)))
    delta = tf.constant(rng.normal(size=(4, rows)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_conv = tf.reshape(conv(x), [4, -1])
        y_dense = dense(tf.reshape(x, [4, -1]))
        loss_conv = tf.reduce_sum(delta * y_conv)
        loss_dense = tf.reduce_sum(delta * y_dense)
    rtol = tolerances.rtol("float64")
    assert tolerances.relative_error(y_conv, y_dense) <= rtol
    assert (
        tolerances.relative_error(tape.gradient(loss_conv, x), tape.gradient(loss_dense, x)) <= rtol
    )
    dw = tape.gradient(loss_dense, dense.kernel).numpy().T  # dL/dT, (R, N)
    dk = np.bincount(
        index.entry_index.reshape(-1),
        dw.reshape(-1),
        minlength=conv.kernel.shape.num_elements() + 1,
    )
    dk = dk[:-1].reshape(conv.kernel.shape, order="F")  # Vec(K) is column-major
    assert tolerances.relative_error(tape.gradient(loss_conv, conv.kernel), dk) <= rtol
    db = tape.gradient(loss_dense, dense.bias).numpy().reshape(index.output_shape)
    db = db.sum(axis=(0, 1)) if bias == "tied" else db
    assert tolerances.relative_error(tape.gradient(loss_conv, conv.bias), db) <= rtol


@pytest.mark.parametrize("bias", ["tied", "untied"])
def test_parameter_jacobian_equals_autodiff_and_its_transpose_is_the_backward(bias):
    """``J_{Vec(K), Vec(b)} z`` in theta order against ``tape.jacobian``; ``J^T delta`` equals the
    fast backward pass (the patch-matrix product)."""
    input_shape = (5, 4, 2)
    layer = _built(
        input_shape, filters=3, kernel_size=(2, 3), strides=(1, 2), padding="same", bias=bias
    )
    assert_parameter_jacobian_is_autodiff(layer, input_shape)


@pytest.mark.parametrize("activation", [None, "tanh"])
def test_input_jacobian_is_d_times_t_and_equals_autodiff(activation):
    input_shape = (5, 6, 2)
    layer = _built(
        input_shape, filters=2, kernel_size=3, strides=2, padding="same", activation=activation
    )
    assert_input_jacobian_is_autodiff(layer, input_shape)


@pytest.mark.parametrize("bias", ["tied", "untied"])
def test_per_example_backward_sums_to_the_backward(bias):
    input_shape = (6, 5, 2)
    layer = _built(input_shape, filters=3, kernel_size=3, strides=(2, 1), padding="same", bias=bias)
    assert_per_example_rows_sum_to_the_backward(layer, input_shape)


def _small_cnn():
    from tf_jacbp.layers.flatten import Flatten
    from tf_jacbp.layers.pooling import AveragePooling2D, MaxPooling2D

    return keras.Sequential(
        [
            keras.Input((7, 6, 2), dtype="float64"),
            Conv2D(3, 3, padding="same", activation="tanh", dtype="float64"),
            MaxPooling2D(2, padding="same", dtype="float64"),
            Conv2D(2, 2, bias="untied", dtype="float64"),
            AveragePooling2D((2, 1), dtype="float64"),
            Flatten(dtype="float64"),
            Dense(3, dtype="float64"),
        ]
    )


def test_algorithm_1_through_conv_pooling_and_flatten():
    """``tf_jacbp.jacobian``'s explicit chain over Conv2D, pooling and Flatten equals autodiff
    of the reference route: ``J_theta z[L]``, per-example gradients, and the named factors."""
    from tf_jacbp import jacobian

    model = _small_cnn()
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(2, 7, 6, 2)))
    variables = jacobian.parameter_variables(model)
    with tf.GradientTape(persistent=True) as tape:
        with tf_jacbp.reference_mode():
            z = model(x)
    expected = tf.concat(  # (batch, n_out, |theta|), columns in Vec order per variable
        [
            tf.reshape(
                vec_parameter_batch(tf.reshape(tape.jacobian(z, v), [-1, *v.shape])), [2, 3, -1]
            )
            for v in variables
        ],
        axis=-1,
    )
    rtol = tolerances.rtol("float64")
    got = jacobian.parameter_jacobian(model, x)
    assert tolerances.relative_error(got, expected) <= rtol
    y = np.array([0, 2])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    per_example = jacobian.per_example_gradients(model, x, y, loss=loss)
    for i in range(2):
        with tf.GradientTape() as tape:
            with tf_jacbp.reference_mode():
                value = loss(y[i : i + 1], model(x[i : i + 1]))
        grads = tape.gradient(value, variables)
        flat = tf.concat([vec_parameter(g) for g in grads], axis=0)
        assert tolerances.relative_error(per_example[i], flat) <= rtol
    factors = jacobian.layer_jacobians(model, x[:1])
    names = [name.split(": ", 1)[1] for name in factors]
    assert names.count("T(K)") == 2 and "J (selection by the arg-max)" in names
    assert "J (averaging)" in names and "J = I" in names


@pytest.mark.parametrize("compiled", [False, True])
def test_memory_guard_sparse_path_gives_the_same_outputs_and_gradients(compiled):
    """A budget below a dense training step switches to a ``tf.SparseTensor``, with a warning;
    nothing else changes."""
    input_shape, kwargs = (
        (32, 32, 2),
        {"filters": 3, "kernel_size": 3, "padding": "same", "activation": "relu", "bias": "untied"},
    )
    assert_sparse_path_equals_dense(Conv2D, input_shape, kwargs, compiled)


def test_memory_guard_error_states_the_size_and_the_setting():
    index = toeplitz.conv_index((3, 3, 2, 3), (7, 6, 2), padding="same")
    budget = index.sparse_bytes("float32") - 1
    with pytest.raises(ValueError) as info:
        keras.Sequential(
            [
                keras.Input((7, 6, 2)),
                Conv2D(3, 3, padding="same", toeplitz="materialize", toeplitz_budget_bytes=budget),
            ]
        )
    message = str(info.value)
    assert f"{index.dense_bytes('float32')} bytes" in message
    assert f"{index.sparse_bytes('float32')} bytes" in message
    assert "toeplitz_budget_bytes" in message and "set_budget_bytes" in message


def test_memory_guard_reads_the_process_wide_budget_at_build():
    index = toeplitz.conv_index((3, 3, 2, 3), (32, 32, 2), padding="same")
    try:
        toeplitz.set_budget_bytes(index.step_bytes("float32", sparse=True))
        layer = Conv2D(3, 3, padding="same", toeplitz="materialize")
        with pytest.warns(UserWarning, match="sparse T"):
            layer.build((None, 32, 32, 2))
        assert layer.sparse_toeplitz
    finally:
        toeplitz.set_budget_bytes(None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"filters": 0}, "filters=0"),
        ({"filters": -2}, "filters=-2"),
        ({"filters": 2.0}, "filters=2.0"),
        ({"padding": "full"}, "padding='full'"),
        ({"bias": "shared"}, "bias='shared'"),
        ({"groups": 3}, r"filters must be evenly divisible.*groups=3, filters=2"),
        ({"groups": 0}, "groups=0"),
        ({"data_format": "nchw"}, "data_format='nchw'"),
        ({"strides": 0}, "strides=0"),
        ({"strides": (1, -1)}, r"strides=\(1, -1\)"),
        ({"dilation_rate": 0}, "dilation_rate=0"),
        ({"dilation_rate": -2}, "dilation_rate=-2"),
        ({"kernel_size": 0}, "kernel_size=0"),
        ({"strides": 2, "dilation_rate": 2}, "dilation_rate"),
        ({"toeplitz_budget_bytes": 0}, "toeplitz_budget_bytes"),
        ({"padding": "causal"}, "got padding='causal'"),
        ({"lora_rank": 4}, "lora_rank=4"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Conv2D(**{"filters": 2, "kernel_size": 3, **kwargs})


def test_kernel_larger_than_a_valid_input():
    with pytest.raises(ValueError, match=r"kernel_size \(5, 5\).*padding='same'"):
        keras.Sequential([keras.Input((4, 9, 1)), Conv2D(2, 5)])


def test_two_dimensional_input_is_an_error():
    with pytest.raises(ValueError, match=r"\(batch, height, width, channels\).*\(None, 784\)"):
        keras.Sequential([keras.Input((784,)), Conv2D(2, 3)])


def _variable_size_model():
    """``Input((None, None, 1))`` -> two Conv2D: the Toeplitz matrices depend on the size."""
    return keras.Sequential(
        [
            keras.Input((None, None, 1), dtype="float64"),
            Conv2D(2, 3, padding="same", activation="tanh", dtype="float64"),
            Conv2D(1, (2, 3), strides=(2, 1), dtype="float64"),
        ]
    )


def test_variable_image_size_fits_three_sizes_with_the_reference_gradients():
    """A model on ``keras.Input((None, None, 1))``: ``fit`` on 6 x 7, then 9 x 5, 4 x 4 and 6 x 7
    images (no ``make_train_function``) applies at each step the reference route's gradient. The
    first size is traced static (its NumPy maps cached); Keras then relaxes its step to unknown
    sizes, served by the maps computed when the graph runs, so no other size is cached."""
    model = compiled_sgd(_variable_size_model())
    shapes = [(6, 7, 1), (9, 5, 1), (4, 4, 1), (6, 7, 1)]
    assert_fit_applies_the_reference_gradients(model, batches(model, shapes, seed=0))
    conv = model.layers[0]
    assert conv.conv_index is None and sorted(conv._indices) == [(6, 7)]


def test_variable_image_size_fits_a_dataset_of_three_sizes():
    """One ``fit`` over a dataset whose batches have three sizes (traced once, size unknown):
    each step's update is the reference route's gradient of its batch."""
    model = compiled_sgd(_variable_size_model())
    data = batches(model, [(5, 8, 1), (7, 4, 1), (10, 6, 1)], seed=1)
    check = UpdatesMatchReference(data)
    model.fit(dataset(data), steps_per_epoch=3, verbose=0, shuffle=False, callbacks=[check])
    assert len(check.errors) == 3 and max(check.errors) <= tolerances.rtol("float64")
    assert model.layers[0]._indices == {}


@pytest.mark.parametrize("jit_compile", [False, True])
def test_unknown_size_signature_gives_the_reference_gradients(jit_compile):
    """A ``tf.function`` traced once for unknown sizes (with XLA too: it compiles per concrete
    shape) gives the reference route's input and parameter gradients at each size."""
    model = _variable_size_model()
    shapes = [(5, 5, 1), (8, 6, 1), (7, 9, 1)]
    assert_one_trace_gives_the_reference_gradients(model, shapes, seed=1, jit_compile=jit_compile)
    assert model.layers[0]._indices == {}


@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({"filters": 2, "kernel_size": 3, "padding": "same"}, (7, 5)),
        ({"filters": 3, "kernel_size": (2, 3), "strides": (2, 3)}, (8, 10)),
        ({"filters": 2, "kernel_size": 2, "strides": 2, "padding": "same"}, (5, 7)),
        ({"filters": 1, "kernel_size": 3, "dilation_rate": (2, 1), "padding": "same"}, (6, 4)),
    ],
)
def test_dynamic_toeplitz_matrix_equals_the_static_one_exactly(kwargs, size):
    """``T(K)^T`` and the patch matrices built from maps computed at run time (unknown size when
    traced) are the static route's, entry for entry: a wrong index anywhere shows."""
    layer = Conv2D(dtype="float64", **kwargs)
    layer.build((None, None, None, 2))
    layer.set_weights([np.random.default_rng(2).normal(size=w.shape) for w in layer.weights])
    kernel = layer.read_parameters()[0]
    x = tf.constant(np.random.default_rng(3).normal(size=(2, *size, 2)))

    @tf.function(input_signature=[tf.TensorSpec((None, None, None, 2), "float64")])
    def dynamic(x):
        index, sparse = layer.index_for(x)
        assert not sparse and x.shape[1] is None
        return index.transpose_matrix(kernel), index.patches(x)

    static, _ = layer.toeplitz_index(x.shape)
    t, patches = dynamic(x)
    np.testing.assert_array_equal(t, static.transpose_matrix(kernel))
    np.testing.assert_array_equal(patches, static.patches(x))


def test_unknown_size_memory_guard_runs_when_the_graph_runs():
    """The budget cannot be checked when tracing an unknown size: a size whose dense ``T`` fits
    runs, a larger one is an error naming the budget, the setting and the size."""
    layer = Conv2D(
        2, 3, padding="same", dtype="float64", toeplitz="materialize", toeplitz_budget_bytes=10**6
    )
    layer.build((None, None, None, 1))
    call = tf.function(layer, input_signature=[tf.TensorSpec((None, None, None, 1), "float64")])
    small = np.random.default_rng(4).normal(size=(1, 10, 10, 1))  # T: 200 x 100 float64
    reference = layer.reference(small, *layer.read_parameters())
    assert tolerances.relative_error(call(small), reference) <= tolerances.rtol("float64")
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"(?s)over the budget of 1000000 bytes.*toeplitz_budget_bytes.*\[3200\] \[1600\]",
    ):
        call(np.zeros((1, 40, 40, 1)))  # T: 3200 x 1600 float64, 41 MB
    # XLA ignores assertions (documented in tf_jacbp.toeplitz_dynamic): the guard does not run.
    xla = tf.function(layer, input_signature=call.input_signature, jit_compile=True)
    assert xla(np.zeros((1, 40, 40, 1))).shape == (1, 40, 40, 2)


def test_unknown_size_checks_the_window_when_the_graph_runs():
    layer = Conv2D(2, 5, dtype="float64", toeplitz="materialize")
    layer.build((None, None, None, 1))
    call = tf.function(layer, input_signature=[tf.TensorSpec((None, None, None, 1), "float64")])
    assert call(np.zeros((1, 6, 5, 1))).shape == (1, 2, 1, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="padding valid has no output"):
        call(np.zeros((1, 6, 4, 1)))


def test_variable_size_guards_each_size_when_it_is_seen():
    """On inputs of varying size the memory guard runs per size at its first call: a size whose
    dense step fits stays dense, a larger one goes sparse with the warning (and the layer stops
    claiming XLA support), one over even the sparse budget is the guard's error."""
    kwargs = {"filters": 3, "kernel_size": 3, "padding": "same", "dtype": "float64"}
    budget = toeplitz.conv_index((3, 3, 2, 3), (32, 32, 2), padding="same").step_bytes(
        "float64", sparse=True
    )
    layer = Conv2D(toeplitz="materialize", toeplitz_budget_bytes=budget, **kwargs)
    layer.build((None, None, None, 2))
    reference = Conv2D(**kwargs)
    reference.build((None, None, None, 2))
    reference.set_weights(layer.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 2))
    assert tolerances.relative_error(layer(x), reference(x)) <= tolerances.rtol("float64")
    assert not layer.toeplitz_index(x.shape)[1] and layer.supports_jit
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 2))
    with pytest.warns(UserWarning, match="sparse T"):
        y = layer(x)
    assert tolerances.relative_error(y, reference(x)) <= tolerances.rtol("float64")
    assert layer.toeplitz_index(x.shape)[1] and not layer.supports_jit
    with pytest.raises(ValueError, match="toeplitz_budget_bytes"):
        layer(np.zeros((1, 64, 64, 2)))


def test_variable_size_checks_each_size_when_it_is_seen():
    layer = Conv2D(2, 5, dtype="float64")
    layer.build((None, None, None, 1))
    assert layer(np.zeros((1, 6, 5, 1))).shape == (1, 2, 1, 2)
    with pytest.raises(ValueError, match=r"kernel_size \(5, 5\).*along the width.*'same'"):
        layer(np.zeros((1, 6, 4, 1)))
    with pytest.raises(ValueError, match="bias='untied'.*bias='tied'"):
        keras.Sequential([keras.Input((None, None, 3)), Conv2D(2, 3, bias="untied")])
    with pytest.raises(ValueError, match="input's shape"):
        layer.toeplitz_matrix()
    assert layer.toeplitz_matrix((6, 5, 1)).shape == (4, 30)


def test_changed_channel_count_after_build_is_an_error():
    layer = Conv2D(2, 3)
    layer(np.zeros((1, 6, 6, 1), "float32"))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 1"):
        layer(np.zeros((1, 6, 6, 3), "float32"))


def test_get_config_round_trip():
    layer = Conv2D(
        4,
        (3, 2),
        strides=2,
        padding="same",
        activation="relu",
        bias="untied",
        toeplitz_budget_bytes=12345,
    )
    clone = Conv2D.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "softmax"])
@pytest.mark.parametrize("bias", ["tied", "untied"])
def test_one_route_with_the_activation_equals_two_routes(activation, bias):
    """``call`` (the layer and ``D`` in one custom gradient) gives the same output and gradients
    as routing the layer and the activation separately."""
    from tf_jacbp.layers.base import route

    layer = _built(
        (6, 5, 2), filters=3, kernel_size=3, padding="same", activation=activation, bias=bias
    )
    x = tf.constant(np.random.default_rng(1).normal(size=(4, 6, 5, 2)))
    upstream = tf.constant(np.random.default_rng(2).normal(size=(4, 6, 5, 3)))

    def grads(apply):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = apply()
            loss = tf.reduce_sum(upstream * y)
        return [y, *tape.gradient(loss, [x, *layer.trainable_variables])]

    def two_routes():
        z = route(layer, x, layer.read_parameters())
        return route(layer.activation, z)

    for ours, theirs in zip(grads(lambda: layer(x)), grads(two_routes), strict=True):
        assert tolerances.relative_error(ours, theirs) <= tolerances.rtol("float64")


@pytest.mark.parametrize("bias", ["tied", None])
def test_unknown_size_per_example_rows_and_norms_equal_the_static_ones(bias):
    """Algorithm 1's per-example gradients and their squared norms, traced for an unknown size,
    equal the static route's (the norms take the outer form there: ``P`` is not known)."""
    layer = Conv2D(3, 3, strides=2, padding="same", use_bias=bias is not None, dtype="float64")
    layer.build((None, None, None, 2))
    assert_unknown_size_per_example_equals_static(layer, (7, 6, 2), seed=6)


CONTRACT_CASES = [
    ((5, 6, 2), {"filters": 3, "kernel_size": 3, "padding": "same"}),
    ((7, 6, 3), {"filters": 2, "kernel_size": (2, 3), "strides": 2, "bias": "untied"}),
    ((7, 7, 2), {"filters": 2, "kernel_size": 3, "dilation_rate": 2, "padding": "same"}),
    ((6, 4, 2), {"filters": 2, "kernel_size": (3, 1), "strides": 3, "use_bias": False}),
    # Gram form of the norms (few positions, P (M + F) < M F)
    ((3, 3, 4), {"filters": 8, "kernel_size": 3}),
]


@pytest.mark.parametrize("input_shape, kwargs", CONTRACT_CASES)
def test_contract_products_are_autodiff_for_three_vectors(input_shape, kwargs):
    """``vjp_input`` and ``vjp_params`` (summed and per sample) for ``V = 3`` vectors per sample,
    and ``squared_norms``, against autodiff of the reference route."""
    assert_contract_is_autodiff(built(Conv2D, input_shape, **kwargs), input_shape)


@pytest.mark.parametrize("input_shape, kwargs", [c for c in CONTRACT_CASES if "bias" not in c[1]])
def test_contract_products_for_an_unknown_size_are_autodiff(input_shape, kwargs):
    layer = built(Conv2D, (None, None, input_shape[-1]), **kwargs)
    assert_contract_is_autodiff(layer, input_shape, unknown_size=True)


def test_a_layer_called_eagerly_at_one_size_takes_another_as_keras_does():
    """Built by its first (eager) call at 8 x 8, the layer takes 9 x 7 next, as
    ``keras.layers.Conv2D`` does; an untied bias (one per output entry) still fixes the size."""
    assert_another_size_after_an_eager_call(
        Conv2D, keras.layers.Conv2D, (8, 8, 3), (9, 7, 3), filters=4, kernel_size=3
    )
    untied = Conv2D(2, 3, bias="untied")
    untied(np.zeros((1, 8, 8, 1), "float32"))
    with pytest.raises(ValueError, match="expected axis 1 of input shape to have value 8"):
        untied(np.zeros((1, 9, 8, 1), "float32"))


# The convolutions' modules are written in keras.ops: TensorFlow only through tf_jacbp.backend
# (issue 21 item 2), and the Keras-argument refusal comes from layers.base, not dense.py (item 9).
CONV_MODULES = ["conv", "conv1d", "conv3d", "conv_transpose", "toeplitz_layer"]


@pytest.mark.parametrize("module", CONV_MODULES)
def test_conv_module_does_not_use_tensorflow(module):
    import ast
    import importlib

    source = importlib.import_module(f"tf_jacbp.layers.{module}").__file__
    tree = ast.parse(open(source, encoding="utf-8").read())
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            uses += [a.name for a in node.names if a.name.split(".")[0] == "tensorflow"]
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if (node.module or "").split(".")[0] == "tensorflow" or "tf" in names:
                uses.append(f"from {node.module} import {', '.join(names)}")
            if node.module == "tf_jacbp.layers.dense":
                uses.append(f"from tf_jacbp.layers.dense import {', '.join(names)}")
        elif isinstance(node, ast.Name) and node.id == "tf":
            uses.append(f"tf at line {node.lineno}")
    assert not uses, f"tf_jacbp/layers/{module}.py uses TensorFlow or dense.py: {uses}"
