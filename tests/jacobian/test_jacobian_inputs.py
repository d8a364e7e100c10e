"""Algorithm 1's utilities on the inputs a Keras user passes (issue 13, items 9 and 10).

``layer_jacobians`` takes a softmax over the channels of an image per position; the utilities
check ``x`` and ``y`` against the model, walk nested models as ``GradientCheck`` does, and
explain an empty model or a ``max_bytes`` that is not a number.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_jacbp
from tf_jacbp import jacobian, layers, losses, tolerances

RTOL64 = tolerances.rtol("float64")
F64 = {"dtype": "float64"}


def _set_weights(model, seed=0):
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape) * 0.7 for w in model.get_weights()])
    return model


def _input_jacobian(model, x):
    """``J_x model(x)`` for one sample by ``tape.jacobian`` through the reference route."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        with tf_jacbp.reference_mode():
            y = model(x)
    j = tape.jacobian(y, x)
    return tf.reshape(j, [int(np.prod(y.shape)), int(np.prod(x.shape))])


def _reference_parameter_jacobian(model, x):
    """``tape.jacobian`` of the reference route in theta order (NumPy ``Vec``)."""
    variables = jacobian.parameter_variables(model)
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            out = model(x)
    blocks = tape.jacobian(out, variables, experimental_use_pfor=True)
    flat = []
    for b in blocks:
        b = np.asarray(b).reshape(out.shape[0], -1, *b.shape[out.shape.rank :])
        trailing = list(range(b.ndim - 1, 1, -1))
        flat.append(np.transpose(b, [0, 1, *trailing]).reshape(*b.shape[:2], -1))
    return np.concatenate(flat, axis=-1)


# --- softmax over the channels of an image (block-diagonal D) --------------------------------


def test_conv_softmax_d_is_block_diagonal_per_position_and_the_chain_is_the_input_jacobian():
    model = _set_weights(
        keras.Sequential(
            [keras.Input((4, 3, 2), **F64), layers.Conv2D(3, 2, activation="softmax", **F64)]
        )
    )
    x = np.random.default_rng(1).normal(size=(1, 4, 3, 2))
    factors = jacobian.layer_jacobians(model, x)
    name = model.layers[0].name
    d, t = factors[f"{name}: D"], factors[f"{name}: T(K)"]
    assert d.shape == (3 * 2 * 3, 3 * 2 * 3)
    # D against autodiff of the softmax alone, at the layer's own pre-activation z.
    z = tf.constant(
        tf.nn.bias_add(tf.nn.convolution(x, model.layers[0].kernel), model.layers[0].bias)
    )
    with tf.GradientTape() as tape:
        tape.watch(z)
        s = tf.nn.softmax(z, axis=-1)
    expected = tf.reshape(tape.jacobian(s, z), d.shape)
    assert tolerances.relative_error(d, expected) <= RTOL64
    # Channels of different positions do not mix, and D T(K) is J_x of the model.
    blocks = np.asarray(d).reshape(6, 3, 6, 3).transpose(0, 2, 1, 3)  # (position, position', ...)
    assert np.all(blocks[~np.eye(6, dtype=bool)] == 0)
    assert tolerances.relative_error(d @ t, _input_jacobian(model, x)) <= RTOL64


def test_softmax_layer_on_an_image_is_block_diagonal_per_position():
    model = _set_weights(
        keras.Sequential(
            [keras.Input((3, 3, 2), **F64), layers.Conv2D(4, 2, **F64), layers.Softmax(**F64)]
        )
    )
    x = np.random.default_rng(2).normal(size=(3, 3, 2))  # one sample, no batch axis
    factors = jacobian.layer_jacobians(model, x)
    conv, softmax = model.layers[0].name, model.layers[1].name
    chain = factors[f"{softmax}: D"] @ factors[f"{conv}: T(K)"]
    assert tolerances.relative_error(chain, _input_jacobian(model, x[None])) <= RTOL64


def test_flat_softmax_is_unchanged():
    model = _set_weights(
        keras.Sequential([keras.Input((3,), **F64), layers.Dense(4, activation="softmax", **F64)])
    )
    x = np.random.default_rng(3).normal(size=(1, 3))
    factors = jacobian.layer_jacobians(model, x)
    name = model.layers[0].name
    chain = factors[f"{name}: D"] @ factors[f"{name}: W^T"]
    assert tolerances.relative_error(chain, _input_jacobian(model, x)) <= RTOL64


# --- x and y checked against the model -------------------------------------------------------


def _image_model():
    return _set_weights(
        keras.Sequential(
            [
                keras.Input((4, 6, 1), **F64),
                layers.Conv2D(2, 3, activation="tanh", **F64),
                layers.Flatten(**F64),
                layers.Dense(3, **F64),
            ]
        )
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: jacobian.parameter_jacobian(m, x),
        lambda m, x: jacobian.per_example_gradients(m, x, np.zeros((len(x), 3)), loss="mse"),
        lambda m, x: jacobian.layer_jacobians(m, x[:1]),
    ],
    ids=["parameter_jacobian", "per_example_gradients", "layer_jacobians"],
)
def test_a_transposed_image_is_refused(call):
    """(6, 4, 1) has as many entries as the model's (4, 6, 1): it used to run, silently wrong."""
    model = _image_model()
    x = np.random.default_rng(4).normal(size=(2, 6, 4, 1))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 4, 6, 1\).*\(\d, 6, 4, 1\)"):
        call(model, x)


@pytest.mark.parametrize(
    "shape, hint", [((2, 24), "batch"), ((4, 6, 1), r"x\[None\]"), ((2, 4, 6, 2), "4, 6, 1")]
)
def test_x_of_the_wrong_rank_or_size_is_refused_with_the_expected_shape(shape, hint):
    with pytest.raises(ValueError, match=hint):
        jacobian.parameter_jacobian(_image_model(), np.ones(shape))


@pytest.mark.parametrize("y_shape", [(3, 3), (5,), ()])
def test_y_of_the_wrong_length_is_refused(y_shape):
    model = _image_model()
    x = np.ones((4, 4, 6, 1))
    with pytest.raises(ValueError, match=r"y must have one label or target per sample.*4 samples"):
        jacobian.per_example_gradients(model, x, np.zeros(y_shape), loss="mse")


@pytest.mark.parametrize(
    "call, owner",
    [
        (jacobian.per_example_gradients, "per_example_gradients"),
        (jacobian.per_example_gradient_norms, "per_example_gradient_norms"),
    ],
    ids=["gradients", "norms"],
)
def test_y_of_the_wrong_length_is_refused_by_every_per_example_function(call, owner):
    """The norms read ``delta[L]`` through the same checks as the gradients; a y with one sample
    too many used to reach the loss, which broadcast or failed deep inside."""
    x = np.ones((4, 4, 6, 1))
    with pytest.raises(ValueError, match=rf"{owner}: y must have one label .*4 samples"):
        call(_image_model(), x, np.zeros((5, 3)), loss="mse")


def test_a_loss_with_one_value_per_batch_is_refused_by_per_example_gradients():
    """A loss that reduces over the batch has no per-sample terms; per_example_gradients used to
    return rows of the batch mean's gradient, silently wrong."""
    x = np.random.default_rng(5).normal(size=(4, 4, 6, 1))

    def batch_mean(y, y_pred):
        return tf.reduce_mean(tf.square(y - y_pred))

    with pytest.raises(ValueError, match="one value for the whole batch"):
        jacobian.per_example_gradients(_image_model(), x, np.zeros((4, 3)), loss=batch_mean)


def test_sparse_x_is_refused_with_the_fix():
    model = keras.Sequential([keras.Input((3,)), layers.Dense(2)])
    x = tf.sparse.from_dense(tf.constant([[1.0, 0.0, 2.0]]))
    with pytest.raises(TypeError, match=r"SparseTensor.*tf\.sparse\.to_dense"):
        jacobian.parameter_jacobian(model, x)


# --- nested models ---------------------------------------------------------------------------


def _nested_and_flat():
    inner = keras.Sequential(
        [layers.Dense(5, activation="tanh", **F64), layers.Dense(3, **F64)], name="inner"
    )
    nested = keras.Sequential(
        [keras.Input((4,), **F64), layers.Dense(6, activation="elu", **F64), inner]
    )
    flat = keras.Sequential(
        [
            keras.Input((4,), **F64),
            layers.Dense(6, activation="elu", **F64),
            layers.Dense(5, activation="tanh", **F64),
            layers.Dense(3, **F64),
        ]
    )
    _set_weights(nested)
    flat.set_weights(nested.get_weights())
    return nested, flat


def test_nested_sequential_gives_the_flat_models_jacobian_and_gradients():
    nested, flat = _nested_and_flat()
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(3, 4)), rng.normal(size=(3, 3))
    got = jacobian.parameter_jacobian(nested, x)
    assert tolerances.relative_error(got, jacobian.parameter_jacobian(flat, x)) <= RTOL64
    assert tolerances.relative_error(got, _reference_parameter_jacobian(nested, x)) <= RTOL64
    grads = jacobian.per_example_gradients(nested, x, y, loss=losses.MeanSquaredError())
    expected = jacobian.per_example_gradients(flat, x, y, loss=losses.MeanSquaredError())
    assert tolerances.relative_error(grads, expected) <= RTOL64
    factors = jacobian.layer_jacobians(nested, x[0])
    assert len(factors) == len(jacobian.layer_jacobians(flat, x[0]))
    assert [v.path for v in jacobian.parameter_variables(nested)] == [
        v.path for v in nested.trainable_variables
    ]


def test_nested_functional_block_with_a_skip_inside_a_functional_model():
    block_in = keras.Input((4,), dtype="float64")
    h = layers.Dense(4, activation="tanh", **F64)(block_in)
    block = keras.Model(block_in, layers.Add(**F64)([h, block_in]), name="block")
    x_in = keras.Input((4,), dtype="float64")
    out = layers.Dense(2, **F64)(block(layers.Dense(4, activation="relu", **F64)(x_in)))
    model = _set_weights(keras.Model(x_in, out))
    x = np.random.default_rng(6).normal(size=(2, 4))
    got = jacobian.parameter_jacobian(model, x)
    assert tolerances.relative_error(got, _reference_parameter_jacobian(model, x)) <= RTOL64


def test_a_stock_layer_inside_a_nested_model_is_named():
    inner = keras.Sequential([keras.layers.Dense(3, name="stock_inside")])
    model = keras.Sequential([keras.Input((4,)), layers.Dense(4), inner])
    with pytest.raises(TypeError, match="stock_inside"):
        jacobian.parameter_jacobian(model, np.ones((1, 4)))


# --- empty models, max_bytes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m: jacobian.parameter_jacobian(m, np.ones((1, 4))),
        lambda m: jacobian.per_example_gradients(m, np.ones((1, 4)), np.ones((1, 4)), loss="mse"),
        lambda m: jacobian.layer_jacobians(m, np.ones(4)),
        lambda m: jacobian.flatten_parameters(m),
    ],
    ids=["parameter_jacobian", "per_example_gradients", "layer_jacobians", "flatten_parameters"],
)
@pytest.mark.parametrize("with_input", [False, True])
def test_an_empty_model_is_a_clear_error(call, with_input):
    model = keras.Sequential([keras.Input((4,))] if with_input else [], name="empty")
    with pytest.raises(ValueError, match="'empty' has no layers"):
        call(model)


@pytest.mark.parametrize("bad", ["1GB", [1000], object()])
def test_max_bytes_that_is_not_a_number_is_named(bad):
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3)])
    with pytest.raises(TypeError, match="max_bytes must be a number of bytes"):
        jacobian.parameter_jacobian(model, np.ones((1, 4)), max_bytes=bad)


@pytest.mark.parametrize("bad", [0, -5, float("nan")])
def test_max_bytes_that_is_not_positive_is_named(bad):
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3)])
    with pytest.raises(ValueError, match="max_bytes must be a positive number"):
        jacobian.parameter_jacobian(model, np.ones((1, 4)), max_bytes=bad)


def test_a_float_max_bytes_is_a_budget_like_an_int():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3)])
    assert jacobian.parameter_jacobian(model, np.ones((1, 4)), max_bytes=1e6).shape == (1, 3, 15)
    with pytest.raises(ValueError, match="max_bytes=100.0"):
        jacobian.parameter_jacobian(model, np.ones((1, 4)), max_bytes=100.0)


def test_a_model_that_makes_a_mask_is_refused_by_the_walk():
    """Algorithm 1 ignores Keras masks; a masked model would get the unmasked result."""
    from tf_jacbp import jacobian, layers, losses

    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            layers.Embedding(7, 3, mask_zero=True, name="tokens"),
            layers.GlobalAveragePooling1D(),
            layers.Dense(2),
        ]
    )
    x = np.array([[1, 2, 0, 0, 0], [3, 4, 5, 0, 0]])
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    for call in (
        lambda: jacobian.parameter_jacobian(model, x),
        lambda: jacobian.per_example_gradients(model, x, np.array([0, 1]), loss),
        lambda: jacobian.per_example_gradient_norms(model, x, np.array([0, 1]), loss),
    ):
        with pytest.raises(ValueError, match="layer 'tokens' .* makes a Keras mask"):
            call()
