"""Algorithm 1 in full: theta order, J_theta z[L] by the explicit chain, per-example gradients."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_jacbp
from tf_jacbp import jacobian, layers, losses, tolerances

RTOL64 = tolerances.rtol("float64")


def vec_f(a: np.ndarray, lead: int) -> np.ndarray:
    """Column-major ``Vec`` over the trailing axes of ``a`` (NumPy, independent of the package)."""
    trailing = list(range(a.ndim - 1, lead - 1, -1))
    return np.transpose(a, list(range(lead)) + trailing).reshape(*a.shape[:lead], -1)


def mlp(*hidden, activation="tanh", last=None, use_bias=True, n_in=4, n_out=3):
    stack = [keras.Input((n_in,), dtype="float64")]
    stack += [layers.Dense(h, activation=activation, dtype="float64") for h in hidden]
    stack.append(layers.Dense(n_out, activation=last, use_bias=use_bias, dtype="float64"))
    return keras.Sequential(stack)


def residual_mlp():
    """Skips, a three-way sum and a layer called twice (shared weights): a functional graph."""
    f64 = {"dtype": "float64"}
    x = keras.Input((4,), dtype="float64")
    h = layers.Dense(4, activation="tanh", **f64)(x)
    shared = layers.Dense(4, activation="elu", **f64)
    r = layers.Add(**f64)([shared(h), x])
    r = layers.Add(**f64)([shared(r), h, r])
    return keras.Model(x, layers.Dense(3, **f64)(r))


MODELS = {
    "one layer (Sec. 3.1)": lambda: mlp(),
    "two layers (Sec. 3.2)": lambda: mlp(5),
    "three layers, relu": lambda: mlp(6, 5, activation="relu"),
    "mixed activations + softmax": lambda: keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            layers.Dense(5, activation="elu", dtype="float64"),
            layers.GELU(dtype="float64"),
            layers.Dense(6, activation="swish", use_bias=False, dtype="float64"),
            layers.Dense(3, dtype="float64"),
            layers.Softmax(dtype="float64"),
        ]
    ),
    "residual (skips, shared layer)": residual_mlp,
}


def reference_jacobian(model, x):
    """``tape.jacobian`` of the reference route, columns in theta order (NumPy Vec)."""
    variables = jacobian.parameter_variables(model)
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            out = model(x)
    blocks = tape.jacobian(out, variables, experimental_use_pfor=True)
    return np.concatenate([vec_f(np.asarray(b), 2) for b in blocks], axis=-1)


def reference_gradient(model, x, y) -> np.ndarray:
    """The compiled loss's gradient through the reference route, in theta order (NumPy Vec)."""
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            value = model.compute_loss(x=x, y=y, y_pred=model(x))
    grads = tape.gradient(value, jacobian.parameter_variables(model))
    return np.concatenate([vec_f(np.asarray(g)[None], 1)[0] for g in grads])


def test_flatten_parameters_is_vec_column_major_by_hand():
    model = mlp(5)
    w1, b1, w2, b2 = (v.numpy() for v in model.trainable_variables)
    by_hand = np.concatenate([w1.flatten(order="F"), b1, w2.flatten(order="F"), b2])
    np.testing.assert_array_equal(jacobian.flatten_parameters(model), by_hand)
    assert jacobian.flatten_parameters(model).shape == (4 * 5 + 5 + 5 * 3 + 3,)


def test_unflatten_inverts_flatten_and_assigns():
    model = mlp(5)
    theta = jacobian.flatten_parameters(model)
    values = jacobian.unflatten_parameters(model, theta)
    for value, v in zip(values, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(value, v.numpy())
    new = tf.range(theta.shape[0], dtype="float64")
    jacobian.unflatten_parameters(model, new, assign=True)
    np.testing.assert_array_equal(jacobian.flatten_parameters(model), new)
    with pytest.raises(ValueError, match=r"theta must have shape \(43,\)"):
        jacobian.unflatten_parameters(model, new[:-1])


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_jacobian_equals_autodiff(name):
    model = MODELS[name]()
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 4)))
    ours = jacobian.parameter_jacobian(model, x)
    assert tolerances.relative_error(ours, reference_jacobian(model, x)) <= RTOL64


def test_one_layer_jacobian_is_the_papers_3_by_15():
    model = mlp()
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    j = jacobian.parameter_jacobian(model, x)
    assert j.shape == (1, 3, 15)
    np.testing.assert_array_equal(j[0], model.layers[0].parameter_jacobian(x[0]))


def test_blocks_are_the_slices_of_the_full_jacobian():
    model = mlp(5)
    x = np.random.default_rng(1).normal(size=(2, 4))
    full = jacobian.parameter_jacobian(model, x)
    blocks = jacobian.parameter_jacobian(model, x, blocks=True)
    assert list(blocks) == [v.path for v in model.trainable_variables]
    assert [b.shape[-1] for b in blocks.values()] == [20, 5, 15, 3]
    np.testing.assert_array_equal(tf.concat(list(blocks.values()), -1), full)


def test_jacobian_transpose_times_table_1_vector_is_the_training_gradient():
    """Step 6: ``grad_theta l = (J_theta z[L])^T grad_z l``, the gradient backprop applies."""
    model = mlp(5, 6)
    loss = losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    x = np.random.default_rng(2).normal(size=(4, 4))
    y = np.array([0, 2, 1, 2])
    z = model(x)
    table_1 = (tf.nn.softmax(z) - tf.one_hot(y, 3, dtype="float64")) / 4  # -(y - yhat) / N
    step_6 = tf.einsum("bop,bo->p", jacobian.parameter_jacobian(model, x), table_1)
    with tf.GradientTape() as tape:
        value = loss(y, model(x))
    backprop = tape.gradient(value, model.trainable_variables)
    expected = np.concatenate([vec_f(np.asarray(g)[None], 1)[0] for g in backprop])
    assert tolerances.relative_error(step_6, expected) <= RTOL64


def test_layer_jacobians_multiply_to_the_block_of_step_2():
    """``J_{W1,b1} z[2] = W2^T D1 [I (x) x^T | I]``, literally, from the named factors."""
    model = mlp(5)
    x = np.random.default_rng(3).normal(size=(1, 4))
    f = jacobian.layer_jacobians(model, x[0])
    first, second = (layer.name for layer in model.layers)
    assert f[f"{first}: W^T"].shape == (5, 4)
    assert f[f"{first}: [I (x) a^T | I]"].shape == (5, 25)
    chain = f[f"{second}: W^T"] @ f[f"{first}: D"] @ f[f"{first}: [I (x) a^T | I]"]
    blocks = jacobian.parameter_jacobian(model, x, blocks=True)
    first_block = tf.concat(list(blocks.values())[:2], -1)[0]
    assert tolerances.relative_error(chain, first_block) <= RTOL64


@pytest.mark.parametrize("name", list(MODELS))
def test_per_example_gradients_sum_to_the_batch_gradient(name):
    model = MODELS[name]()
    model.compile(loss=losses.MeanSquaredError(dtype="float64"))
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    rows = jacobian.per_example_gradients(model, x, y)
    expected = reference_gradient(model, x, y)
    assert tolerances.relative_error(tf.reduce_mean(rows, 0), expected) <= RTOL64
    for i in range(2):  # each row is a batch-of-one gradient
        one = reference_gradient(model, x[i : i + 1], y[i : i + 1])
        assert tolerances.relative_error(rows[i], one) <= RTOL64


def assert_per_variable_is_flat_reshaped(grads, rows):
    """``flatten=False``'s tensors, each ``Vec``'d per sample and concatenated, are the rows."""
    flat = np.concatenate([vec_f(np.asarray(g), 1) for g in grads], axis=-1)
    assert tolerances.relative_error(flat, rows) <= RTOL64


def test_per_example_gradients_per_variable():
    model = mlp(5)
    x, y = np.ones((2, 4)), np.array([0, 1])
    grads = jacobian.per_example_gradients(
        model, x, y, loss=losses.SparseCategoricalCrossentropy(from_logits=True), flatten=False
    )
    assert [tuple(g.shape) for g in grads] == [(2, 4, 5), (2, 5), (2, 5, 3), (2, 3)]
    rows = jacobian.per_example_gradients(
        model, x, y, loss=losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    assert_per_variable_is_flat_reshaped(grads, rows)


def test_unsupported_layer_is_named():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="stock_dense")])
    with pytest.raises(TypeError, match="stock_dense"):
        jacobian.parameter_jacobian(model, np.ones((1, 4)))


def test_memory_budget_is_checked_before_allocating():
    model = mlp(50)
    with pytest.raises(ValueError, match="max_bytes=1000"):
        jacobian.parameter_jacobian(model, np.ones((8, 4)), max_bytes=1000)


def test_missing_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="pass loss="):
        jacobian.per_example_gradients(mlp(), np.ones((1, 4)), np.ones((1, 3)))


def cnn(conv: dict, pool: type, pool_kwargs: dict) -> keras.Sequential:
    f64 = {"dtype": "float64"}
    return keras.Sequential(
        [
            keras.Input((6, 5, 2), dtype="float64"),
            layers.Conv2D(2, **conv, **f64),
            pool(**pool_kwargs, **f64),
            layers.Flatten(**f64),
            layers.Dense(3, activation="relu", **f64),
            layers.Dense(2, **f64),
        ]
    )


@pytest.mark.parametrize(
    "conv, pool, pool_kwargs",
    [
        ({"kernel_size": 3, "padding": "same", "activation": "relu"}, layers.MaxPooling2D, {}),
        (
            {"kernel_size": 2, "strides": 2, "padding": "same", "bias": "untied"},
            layers.AveragePooling2D,
            {"pool_size": 2, "padding": "same"},
        ),
        (
            {"kernel_size": (2, 3), "strides": (1, 2), "activation": "tanh"},
            layers.MaxPooling2D,
            {"pool_size": (1, 2), "strides": 1, "padding": "same"},
        ),
        (
            {"kernel_size": 2, "dilation_rate": 2, "use_bias": False, "activation": "elu"},
            layers.AveragePooling2D,
            {"pool_size": 2, "strides": 1},
        ),
    ],
    ids=["same+max", "stride2+untied+avg-same", "rect-kernel+stride(1,2)+max", "dilated+avg"],
)
def test_cnn_parameter_jacobian_and_per_example_gradients(conv, pool, pool_kwargs):
    model = cnn(conv, pool, pool_kwargs)
    rng = np.random.default_rng(7)
    x = tf.constant(rng.normal(size=(3, 6, 5, 2)))
    assert (
        tolerances.relative_error(
            jacobian.parameter_jacobian(model, x), reference_jacobian(model, x)
        )
        <= RTOL64
    )
    model.compile(loss=losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"))
    y = np.array([1, 0, 1])
    rows = jacobian.per_example_gradients(model, x, y)
    expected = reference_gradient(model, x, y)
    assert tolerances.relative_error(tf.reduce_mean(rows, 0), expected) <= RTOL64
    assert_per_variable_is_flat_reshaped(
        jacobian.per_example_gradients(model, x, y, flatten=False), rows
    )


def test_residual_cnn_parameter_jacobian_and_per_example_gradients():
    f64 = {"dtype": "float64"}
    x = keras.Input((6, 5, 2), dtype="float64")
    c = layers.Conv2D(2, 3, padding="same", activation="relu", **f64)(x)
    c = layers.Add(**f64)([layers.Conv2D(2, 3, padding="same", **f64)(c), x])
    p = layers.Flatten(**f64)(layers.MaxPooling2D(**f64)(c))
    model = keras.Model(x, layers.Dense(3, **f64)(p))
    data = tf.constant(np.random.default_rng(8).normal(size=(3, 6, 5, 2)))
    ours = jacobian.parameter_jacobian(model, data)
    assert tolerances.relative_error(ours, reference_jacobian(model, data)) <= RTOL64
    model.compile(loss=losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"))
    y = np.array([1, 0, 2])
    rows = jacobian.per_example_gradients(model, data, y)
    one = reference_gradient(model, data[:1], y[:1])
    assert tolerances.relative_error(rows[0], one) <= RTOL64
    per_variable = jacobian.per_example_gradients(model, data, y, flatten=False)
    assert_per_variable_is_flat_reshaped(per_variable, rows)


def test_layer_jacobians_of_a_skip_multiply_to_the_block_of_step_2():
    """``z = W2^T (h + x)`` with ``h = f(W1^T x + b1)``: ``J_{W1,b1} z = W2^T I D1 [I (x) x^T | I]``
    (the skip adds a path to ``J_x z`` but none to the first layer's parameters)."""
    f64 = {"dtype": "float64"}
    x = keras.Input((4,), dtype="float64")
    first, add, second = layers.Dense(4, "tanh", **f64), layers.Add(**f64), layers.Dense(3, **f64)
    model = keras.Model(x, second(add([first(x), x])))
    sample = np.random.default_rng(9).normal(size=(4,))
    f = jacobian.layer_jacobians(model, sample)
    assert {f"{add.name}: J_x1 = I", f"{add.name}: J_x2 = I"} <= set(f)
    chain = (
        f[f"{second.name}: W^T"]
        @ f[f"{add.name}: J_x1 = I"]
        @ f[f"{first.name}: D"]
        @ f[f"{first.name}: [I (x) a^T | I]"]
    )
    block = tf.concat(
        list(jacobian.parameter_jacobian(model, sample[None], blocks=True).values())[:2], -1
    )
    assert tolerances.relative_error(chain, block[0]) <= RTOL64


def test_a_shared_layer_gets_one_factor_set_per_call():
    model = residual_mlp()
    f = jacobian.layer_jacobians(model, np.ones(4))
    shared = model.layers[2].name
    assert f"{shared}: W^T" in f and f"{shared} (call 2): W^T" in f


def test_models_the_walk_cannot_take_are_named():
    a, b = keras.Input((4,)), keras.Input((4,))
    two_inputs = keras.Model([a, b], layers.Add()([a, b]))
    with pytest.raises(ValueError, match="one input and one output"):
        jacobian.parameter_jacobian(two_inputs, [np.ones((1, 4))] * 2)
    x = keras.Input((4,))
    stock_add = keras.Model(x, keras.layers.Add(name="stock_add")([layers.Dense(4)(x), x]))
    with pytest.raises(TypeError, match="stock_add"):
        jacobian.parameter_jacobian(stock_add, np.ones((1, 4)))
