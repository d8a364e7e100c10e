"""Conv2D: every mode of the harness, Lemmas 2-3, the Jacobian accessors, the memory guard, bad
input, and LeNet-5 on the offline MNIST digits."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_jacbp
from tf_jacbp import toeplitz, tolerances
from tf_jacbp.layers.conv import Conv2D
from tf_jacbp.layers.dense import Dense
from tf_jacbp.layout import vec_parameter, vec_parameter_batch
from tf_jacbp.testing import check_layer as run_layer_test


@pytest.mark.parametrize(
    "input_shape, kwargs",
    [
        ((5, 6, 2), {"filters": 3, "kernel_size": 3, "padding": "same", "activation": "relu"}),
        ((7, 6, 3), {"filters": 2, "kernel_size": (2, 3), "strides": 2, "bias": "untied"}),
        ((6, 5, 1), {"filters": 2, "kernel_size": 2, "strides": (2, 1), "padding": "same"}),
        (
            (7, 7, 2),
            {
                "filters": 2,
                "kernel_size": 3,
                "dilation_rate": 2,
                "padding": "same",
                "activation": "tanh",
            },
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
        ),
        ((6, 4, 2), {"filters": 2, "kernel_size": (3, 1), "strides": 3, "use_bias": False}),
        # softmax over the filters (the last axis of the image-shaped z)
        ((5, 5, 2), {"filters": 3, "kernel_size": 3, "padding": "same", "activation": "softmax"}),
        # an activation whose D needs z (not only a)
        ((5, 6, 2), {"filters": 2, "kernel_size": 3, "activation": "elu", "bias": "untied"}),
    ],
)
def test_conv2d_every_mode(input_shape, kwargs, tmp_path):
    run_layer_test(lambda dtype: Conv2D(dtype=dtype, **kwargs), input_shape, tmp_dir=tmp_path)


def _built(input_shape, seed=0, **kwargs):
    layer = Conv2D(dtype="float64", **kwargs)
    layer.build((None, *input_shape))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(size=w.shape) for w in layer.weights])
    return layer


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
    kernel, b = layer.read_parameters()
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(2, *input_shape)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([kernel, b])
        z = tf.reshape(layer.reference(x, kernel, b), [2, -1])
    rows = z.shape[1]

    def vec_per_row(jacobian, p):  # (2, R, *p.shape) -> (2, R, |p|), columns in Vec order
        return tf.reshape(vec_parameter_batch(tf.reshape(jacobian, [-1, *p.shape])), [2, rows, -1])

    expected = tf.concat(
        [vec_per_row(tape.jacobian(z, kernel), kernel), vec_per_row(tape.jacobian(z, b), b)], -1
    )
    jacobian = layer.parameter_jacobian(x)
    rtol = tolerances.rtol("float64")
    assert tolerances.relative_error(jacobian, expected) <= rtol
    assert tolerances.relative_error(layer.parameter_jacobian(x[0]), jacobian[0]) <= rtol
    delta = tf.constant(rng.normal(size=(1, *layer.conv_index.output_shape)))
    _, (dk, db) = layer.backward(delta, x[:1], None, kernel, b)
    fast = tf.concat([vec_parameter(dk), vec_parameter(db)], axis=0)
    materialized = tf.linalg.matvec(jacobian[0], tf.reshape(delta, [-1]), transpose_a=True)
    assert tolerances.relative_error(materialized, fast) <= rtol


@pytest.mark.parametrize("activation", [None, "tanh"])
def test_input_jacobian_is_d_times_t_and_equals_autodiff(activation):
    input_shape = (5, 6, 2)
    layer = _built(
        input_shape, filters=2, kernel_size=3, strides=2, padding="same", activation=activation
    )
    x = tf.constant(np.random.default_rng(3).normal(size=(1, *input_shape)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        with tf_jacbp.reference_mode():
            a = tf.reshape(layer(x), [-1])
    expected = tf.reshape(tape.jacobian(a, x), [a.shape[0], -1])
    got = layer.input_jacobian(x[0])
    assert tolerances.relative_error(got, expected) <= tolerances.rtol("float64")
    if activation is None:
        np.testing.assert_array_equal(got, layer.toeplitz_matrix())


@pytest.mark.parametrize("bias", ["tied", "untied"])
def test_per_example_backward_sums_to_the_backward(bias):
    input_shape = (6, 5, 2)
    layer = _built(input_shape, filters=3, kernel_size=3, strides=(2, 1), padding="same", bias=bias)
    params = layer.read_parameters()
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=(4, *input_shape)))
    dz = tf.constant(rng.normal(size=(4, *layer.conv_index.output_shape)))
    dx, per_sample = layer.per_example_backward(dz, x, None, *params)
    dx_sum, summed = layer.backward(dz, x, None, *params)
    rtol = tolerances.rtol("float64")
    assert tolerances.relative_error(dx, dx_sum) <= rtol
    for g, total in zip(per_sample, summed, strict=True):
        assert tolerances.relative_error(tf.reduce_sum(g, axis=0), total) <= rtol
    _, first = layer.backward(dz[:1], x[:1], None, *params)
    for g, one in zip(per_sample, first, strict=True):
        assert tolerances.relative_error(g[0], one) <= rtol


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


def _outputs_and_gradients(layer, x, delta, compiled):
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(delta * layer(x))
        return [layer(x), *tape.gradient(loss, [x, *layer.trainable_variables])]

    return [np.asarray(v) for v in (tf.function(step) if compiled else step)(x)]


@pytest.mark.parametrize("compiled", [False, True])
def test_memory_guard_sparse_path_gives_the_same_outputs_and_gradients(compiled):
    """A budget below a dense training step switches to a ``tf.SparseTensor``, with a warning;
    nothing else changes."""
    input_shape, kwargs = (
        (32, 32, 2),
        {"filters": 3, "kernel_size": 3, "padding": "same", "activation": "relu", "bias": "untied"},
    )
    dense = _built(input_shape, **kwargs)
    index = dense.conv_index
    budget = index.step_bytes("float64", sparse=True)
    assert index.step_bytes("float64", sparse=False) > budget
    with pytest.warns(UserWarning, match="sparse T"):
        sparse = _built(input_shape, toeplitz_budget_bytes=budget, **kwargs)
    assert not dense.sparse_toeplitz and sparse.sparse_toeplitz
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(3, *input_shape)))
    delta = tf.constant(rng.normal(size=(3, *index.output_shape)))
    for got, want in zip(
        _outputs_and_gradients(sparse, x, delta, compiled),
        _outputs_and_gradients(dense, x, delta, compiled),
        strict=True,
    ):
        assert tolerances.relative_error(got, want) <= tolerances.rtol("float64")


def test_memory_guard_error_states_the_size_and_the_setting():
    index = toeplitz.conv_index((3, 3, 2, 3), (7, 6, 2), padding="same")
    budget = index.sparse_bytes("float32") - 1
    with pytest.raises(ValueError) as info:
        keras.Sequential(
            [keras.Input((7, 6, 2)), Conv2D(3, 3, padding="same", toeplitz_budget_bytes=budget)]
        )
    message = str(info.value)
    assert f"{index.dense_bytes('float32')} bytes" in message
    assert f"{index.sparse_bytes('float32')} bytes" in message
    assert "toeplitz_budget_bytes" in message and "set_budget_bytes" in message


def test_memory_guard_reads_the_process_wide_budget_at_build():
    index = toeplitz.conv_index((3, 3, 2, 3), (32, 32, 2), padding="same")
    try:
        toeplitz.set_budget_bytes(index.step_bytes("float32", sparse=True))
        layer = Conv2D(3, 3, padding="same")
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
        ({"groups": 2}, "groups=2"),
        ({"data_format": "channels_first"}, "data_format='channels_first'"),
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


def _reference_gradients(model, x, y):
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            loss = tf.reduce_mean(tf.square(model(x) - y))
    return tape.gradient(loss, model.trainable_variables)


class _UpdatesMatchReference(keras.callbacks.Callback):
    """With ``SGD(1.0)`` a step's update is the gradient at the weights before it: at each batch
    of ``batches`` compare it with the reference route's gradient (mean squared error)."""

    def __init__(self, batches):
        super().__init__()
        self.batches, self.errors = batches, []

    def on_train_batch_begin(self, batch, logs=None):
        x, y = self.batches[batch]
        self.expected = _reference_gradients(self.model, x, y)
        self.before = [v.numpy() for v in self.model.trainable_variables]

    def on_train_batch_end(self, batch, logs=None):
        after = self.model.trainable_variables
        self.errors.append(
            max(
                tolerances.relative_error(b - v.numpy(), g)
                for b, v, g in zip(self.before, after, self.expected, strict=True)
            )
        )


def _batches(model, sizes, channels, seed):
    """One batch of 3 per spatial size; float32 values (fit may hand float64 over as float32)."""
    rng = np.random.default_rng(seed)
    out = []
    for size in sizes:
        x = rng.normal(size=(3, *size, channels)).astype("float32").astype("float64")
        y = rng.normal(size=model.compute_output_shape(x.shape)).astype("float32")
        out.append((x, y.astype("float64")))
    return out


def _dataset(batches):
    """The batches as a dataset whose spatial sizes are unknown: fit traces its step once."""
    shapes = [(None,) * len(part.shape[:-1]) + part.shape[-1:] for part in batches[0]]
    return tf.data.Dataset.from_generator(
        lambda: iter(batches),
        output_signature=tuple(tf.TensorSpec(s, "float64") for s in shapes),
    )


def _compiled_sgd(model):
    model.compile(
        optimizer=keras.optimizers.SGD(1.0), loss=keras.losses.MeanSquaredError(dtype="float64")
    )
    return model


def test_variable_image_size_fits_three_sizes_with_the_reference_gradients():
    """A model on ``keras.Input((None, None, 1))``: ``fit`` on 6 x 7, then 9 x 5, 4 x 4 and 6 x 7
    images (no ``make_train_function``) applies at each step the reference route's gradient. The
    first size is traced static (its NumPy maps cached); Keras then relaxes its step to unknown
    sizes, served by the maps computed when the graph runs, so no other size is cached."""
    model = _compiled_sgd(_variable_size_model())
    batches = _batches(model, [(6, 7), (9, 5), (4, 4), (6, 7)], 1, seed=0)
    for x, y in batches:
        check = _UpdatesMatchReference([(x, y)])
        model.fit(x, y, batch_size=3, epochs=1, verbose=0, shuffle=False, callbacks=[check])
        assert check.errors[0] <= tolerances.rtol("float64")
    conv = model.layers[0]
    assert conv.conv_index is None and sorted(conv._indices) == [(6, 7)]


def test_variable_image_size_fits_a_dataset_of_three_sizes():
    """One ``fit`` over a dataset whose batches have three sizes (traced once, size unknown):
    each step's update is the reference route's gradient of its batch."""
    model = _compiled_sgd(_variable_size_model())
    batches = _batches(model, [(5, 8), (7, 4), (10, 6)], 1, seed=1)
    check = _UpdatesMatchReference(batches)
    model.fit(_dataset(batches), steps_per_epoch=3, verbose=0, shuffle=False, callbacks=[check])
    assert len(check.errors) == 3 and max(check.errors) <= tolerances.rtol("float64")
    assert model.layers[0]._indices == {}


def _gradients_function(model, jit_compile=False):
    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(model(x)))
        return tape.gradient(loss, [x, *model.trainable_variables])

    signature = [tf.TensorSpec((None, None, None, model.input_shape[-1]), "float64")]
    return gradients, tf.function(gradients, input_signature=signature, jit_compile=jit_compile)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_unknown_size_signature_gives_the_reference_gradients(jit_compile):
    """A ``tf.function`` traced once for unknown sizes (with XLA too: it compiles per concrete
    shape) gives the reference route's input and parameter gradients at each size."""
    model = _variable_size_model()
    gradients, compiled = _gradients_function(model, jit_compile)
    rng = np.random.default_rng(1)
    for size in [(5, 5), (8, 6), (7, 9)]:
        x = tf.constant(rng.normal(size=(2, *size, 1)))
        with tf_jacbp.reference_mode():
            expected = gradients(x)
        for got, want in zip(compiled(x), expected, strict=True):
            assert tolerances.relative_error(got, want) <= tolerances.rtol("float64")
    assert compiled.experimental_get_tracing_count() == 1
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
    layer = Conv2D(2, 3, padding="same", dtype="float64", toeplitz_budget_bytes=10**6)
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
    layer = Conv2D(2, 5, dtype="float64")
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
    layer = Conv2D(toeplitz_budget_bytes=budget, **kwargs)
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


def test_lenet5_trains_to_90_percent_on_the_offline_digits():
    from tf_jacbp import datasets, losses, models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the offline fallback says it is one
        (x_train, y_train), (x_test, y_test) = datasets.load_mnist()
    # The offline fallback's 4,000 / 1,000 digits (the first ones of full MNIST when cached).
    x_train = (x_train[:4000] / 255.0).astype("float32")[..., None]
    x_test = (x_test[:1000] / 255.0).astype("float32")[..., None]
    y_train, y_test = y_train[:4000], y_test[:1000]
    model = models.lenet5()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=64, epochs=8, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    assert accuracy >= 0.9, f"test accuracy {accuracy:.3f} < 0.90"


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
    params = layer.read_parameters()
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(3, 7, 6, 2)))
    dz = tf.constant(rng.normal(size=(3, 4, 3, 3)))
    signature = [tf.TensorSpec((None, None, None, c), "float64") for c in (3, 2)]

    @tf.function(input_signature=signature)
    def dynamic(dz, x):
        dx, grads = layer.per_example_backward(dz, x, None, *params)
        return dx, grads, layer.per_example_squared_norms(dz, x, None, *params)

    dx, grads, norms = dynamic(dz, x)
    want_dx, want_grads = layer.per_example_backward(dz, x, None, *params)
    want_norms = layer.per_example_squared_norms(dz, x, None, *params)
    for got, want in zip([dx, *grads, *norms], [want_dx, *want_grads, *want_norms], strict=True):
        assert tolerances.relative_error(got, want) <= tolerances.rtol("float64")
