"""Activation layers: every mode of the harness, and their materialized Jacobians."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tf_jacbp
from tf_jacbp import activations, layers, tolerances
from tf_jacbp.testing import check_layer as run_layer_test

RTOL64 = tolerances.rtol("float64")

LAYERS = {
    "ReLU": layers.ReLU,
    "ReLU(max_value, slope, threshold)": lambda **kw: layers.ReLU(
        max_value=1.5, negative_slope=0.1, threshold=0.2, **kw
    ),
    "Sigmoid": layers.Sigmoid,
    "Tanh": layers.Tanh,
    "LeakyReLU": layers.LeakyReLU,
    "ELU": lambda **kw: layers.ELU(alpha=0.7, **kw),
    "Softplus": layers.Softplus,
    "GELU": layers.GELU,
    "GELU(approximate)": lambda **kw: layers.GELU(approximate=True, **kw),
    "Swish": layers.Swish,
    "Softmax": layers.Softmax,
    "Activation('elu')": lambda **kw: layers.Activation("elu", **kw),
}


# Another configuration of a class run in every mode above: the formulas only (check_layer's
# modes=False; fit modes, mixed precision and saving are the class's).
VARIANTS = {"ReLU(max_value, slope, threshold)", "GELU(approximate)", "Activation('elu')"}


@pytest.mark.parametrize("name", list(LAYERS))
def test_activation_every_mode(name, tmp_path):
    run_layer_test(
        lambda dtype: LAYERS[name](dtype=dtype),
        (6,),
        tmp_dir=tmp_path,
        modes=name not in VARIANTS,
    )


@pytest.mark.parametrize("name", list(activations._ACTIVATIONS))
def test_jacobian_matrix_equals_autodiff_of_reference(name):
    """``J_z f(z)``, materialized, equals ``tape.batch_jacobian`` of the stock-op route."""
    fn = activations.get(name)
    z = tf.constant(np.random.default_rng(1).normal(size=(4, 5)), tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(z)
        a = fn.reference(z)
    expected = tape.batch_jacobian(a, z)
    err = tolerances.relative_error(fn.jacobian(z), expected)
    assert err <= tolerances.rtol("float64")


def test_relu_jacobian_is_a_zero_one_diagonal():
    """Section 3.4: ``J_z ReLU(z) = diag(1[z > 0])``."""
    z = tf.constant([-2.0, 0.5, -0.1, 3.0])
    np.testing.assert_array_equal(layers.ReLU().input_jacobian(z), np.diag([0.0, 1.0, 0.0, 1.0]))


def test_softmax_jacobian_is_diag_minus_outer_product():
    z = tf.constant([0.3, -1.0, 2.0], tf.float64)
    s = tf.nn.softmax(z).numpy()
    np.testing.assert_allclose(layers.Softmax().input_jacobian(z), np.diag(s) - np.outer(s, s))


def test_reference_mode_switches_route():
    """Inside ``reference_mode`` the custom gradient is not used: a planted bug shows only
    outside."""

    class Doubled(activations.Tanh):
        def derivative(self, z, a):
            return 2 * super().derivative(z, a)

    layer = layers.Activation(Doubled())
    z = tf.constant([[0.1, -0.4]])

    def grad():
        with tf.GradientTape() as tape:
            tape.watch(z)
            y = tf.reduce_sum(layer(z))
        return tape.gradient(y, z).numpy()

    with tf_jacbp.reference_mode():
        ref = grad()
    np.testing.assert_allclose(grad(), 2 * ref, rtol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: layers.Activation("relux"), "activation='relux'"),
        (lambda: layers.Dense(3, activation="sigmod"), "activation='sigmod'"),
        (lambda: layers.Softmax(axis=-2), "axis=-2"),
        (lambda: layers.Softmax(axis=1)(tf.zeros((2, 3, 4))), r"axis=1 for inputs of rank 3"),
        (lambda: layers.Softmax(axis=[1, 2]), r"axis=\[1, 2\]"),
        (lambda: layers.LeakyReLU(negative_slope=-1), "negative_slope=-1"),
    ],
)
def test_bad_activation_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_plain_relu_product_reads_d_from_the_output_alone():
    """``(J_z f)^T m = [z > 0] m`` from ``a = max(z, 0)`` only (``z`` unused), equal to the
    derivative times ``m``; with arguments, ReLU's product uses ``z``."""
    z = tf.constant([[-1.5, 0.0, 0.3, 2.0], [1e-30, -1e-30, 5.0, -0.2]], tf.float64)
    m = tf.constant(np.random.default_rng(0).normal(size=(3, 2, 4)))  # V = 3
    relu = activations.ReLU()
    dz = relu.vjp_input(m, None, relu.forward(z))
    np.testing.assert_array_equal(dz, relu.derivative(z, relu.forward(z)) * m)
    leaky = activations.ReLU(negative_slope=0.1)
    dz = leaky.vjp_input(m, z, leaky.forward(z))
    np.testing.assert_allclose(dz, leaky.derivative(z, leaky.forward(z)) * m)


# --- ReLU: Keras' semantics (threshold, negative_slope, max_value) in float64, ties included ---

SLOPES = st.integers(0, 32).map(lambda k: k / 16)  # exact in float32, as Keras' leaky_relu uses
THRESHOLDS = st.one_of(st.just(0.0), st.integers(0, 32).map(lambda k: k / 8))
MAX_VALUES = st.one_of(st.none(), st.just(6.0), st.integers(0, 48).map(lambda k: k / 8))


def _ties(threshold, max_value):
    """Inputs at and next to every kink: ``0``, ``t``, ``M``, ``6``, one ulp either side."""
    points = [0.0, threshold, 6.0] + ([max_value] if max_value is not None else [])
    return [v for p in points for v in (np.nextafter(p, -np.inf), p, np.nextafter(p, np.inf))]


def _value_and_derivative(layer, x):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    return np.asarray(y), np.asarray(tape.gradient(y, x))


@given(
    max_value=MAX_VALUES,
    negative_slope=SLOPES,
    threshold=THRESHOLDS,
    others=st.lists(st.floats(-10, 10), min_size=1, max_size=8),
)
def test_relu_equals_keras_relu_in_float64_at_and_around_the_kinks(
    max_value, negative_slope, threshold, others
):
    """Values and derivatives equal ``keras.layers.ReLU``'s exactly: ``f(t) = 0`` (Keras'
    ``x > t``), and at each kink the derivative autodiff gives for Keras' ops."""
    kwargs = {"max_value": max_value, "negative_slope": negative_slope, "threshold": threshold}
    x = tf.constant(_ties(threshold, max_value) + others, tf.float64)
    stock, stock_derivative = _value_and_derivative(keras.layers.ReLU(**kwargs, dtype="float64"), x)
    ours = layers.ReLU(**kwargs, dtype="float64")
    value, derivative = _value_and_derivative(ours, x)
    np.testing.assert_array_equal(value, stock)
    np.testing.assert_array_equal(derivative, stock_derivative)
    with tf_jacbp.reference_mode():
        np.testing.assert_array_equal(_value_and_derivative(ours, x)[1], stock_derivative)
    np.testing.assert_array_equal(ours.activation.derivative(x, value), stock_derivative)


def test_relu_with_a_threshold_is_zero_at_the_threshold():
    y = layers.ReLU(threshold=1.0, dtype="float64")(tf.constant([0.5, 1.0, 1.5], tf.float64))
    np.testing.assert_array_equal(y, [0.0, 0.0, 1.5])


@pytest.mark.parametrize("name", ["max_value", "negative_slope", "threshold"])
@pytest.mark.parametrize("value", [-1.0, "1", True, float("nan"), float("inf"), None, [1.0]])
def test_bad_relu_arguments_name_the_argument(name, value):
    """Keras raises for None (except ``max_value``) and negative values; tf_jacbp also for
    non-numbers, booleans, NaN and infinity, always a ValueError naming the argument."""
    if name == "max_value" and value is None:
        assert layers.ReLU(max_value=None).activation.max_value is None
        return
    with pytest.raises(ValueError, match=f"ReLU: {name} must be a finite number >= 0.*{name}="):
        layers.ReLU(**{name: value})
    if value is None or (isinstance(value, float) and value < 0):
        with pytest.raises(ValueError, match=name):
            keras.layers.ReLU(**{name: value})


def test_leaky_relu_slope_none_is_an_error():
    with pytest.raises(ValueError, match="negative_slope=None"):
        layers.LeakyReLU(negative_slope=None)


# --- Issue 15, item 4: the activations Keras users reach for next, and Keras' own functions ---

NEW = ["relu6", "selu", "mish", "hard_sigmoid", "hard_silu", "softsign", "exponential", "silu"]
# "silu" is Swish (the same class), which the Swish layer runs in every mode above.
EVERY_MODE = [name for name in NEW if name != "silu"]


@pytest.mark.parametrize("name", EVERY_MODE)
def test_new_activation_every_mode(name, tmp_path):
    """``Activation(name)``: the harness (its ``D = diag(f'(z))`` included); every mode for two
    of them (one with a kink, one smooth), the formulas only for the others (the modes are the
    Activation class's, the same for every name)."""
    run_layer_test(
        lambda dtype: layers.Activation(name, dtype=dtype),
        (6,),
        tmp_dir=tmp_path,
        modes=name in ("relu6", "mish"),
    )


@pytest.mark.parametrize("name", EVERY_MODE)
def test_new_activation_fused_into_dense_every_mode(name, tmp_path):
    """``Dense(activation=name)``: ``D`` applied on the Dense layer's own custom gradient; every
    mode for one of them, the formulas for the others."""
    run_layer_test(
        lambda dtype: layers.Dense(3, activation=name, dtype=dtype),
        (4,),
        tmp_dir=tmp_path,
        modes=name == "mish",
    )


# Keras' other elementwise activations, also mapped (checked against Keras below, not in every
# mode: their route is the generic one the activations above run in every mode).
MORE = [
    "celu",
    "hard_tanh",
    "log_sigmoid",
    "tanh_shrink",
    "soft_shrink",
    "hard_shrink",
    "sparse_plus",
    "sparse_sigmoid",
    "squareplus",
]
KINKS = [-6.0, -3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, 6.0]


def _around(points):
    """Each point and its float64 neighbours (one ulp either side)."""
    return [v for p in points for v in (np.nextafter(p, -np.inf), p, np.nextafter(p, np.inf))]


def _stock_value_and_derivative(function, z):
    with tf.GradientTape() as tape:
        tape.watch(z)
        a = function(z)
    return np.asarray(a), np.asarray(tape.gradient(a, z))


@settings(max_examples=15, deadline=None)
@given(
    name=st.sampled_from(NEW + MORE + ["hard_swish"]),
    others=st.lists(st.floats(-12, 12), min_size=1, max_size=12),
)
def test_new_activation_equals_keras_in_float64_kinks_included(name, others):
    """Value and derivative equal ``keras.activations.<name>``'s (autodiff of Keras' ops) to
    1e-12 in float64, at and one ulp around every kink (``-6, -3, -1, -0.5, 0, ...``) and at
    drawn points.
    The derivative is checked three ways: the formula ``f'(z)``, the Jacobian route's gradient
    through a layer, and the materialized ``diag(f'(z))``."""
    z = tf.constant(_around(KINKS) + [1e-300, -1e-300] + others, tf.float64)
    value, derivative = _stock_value_and_derivative(getattr(keras.activations, name), z)
    fn = activations.get(name)
    ours = np.asarray(fn.forward(z))
    assert tolerances.relative_error(ours, value) <= RTOL64
    assert tolerances.relative_error(fn.derivative(z, fn.forward(z)), derivative) <= RTOL64
    layer = layers.Activation(name, dtype="float64")
    assert tolerances.relative_error(_value_and_derivative(layer, z)[1], derivative) <= RTOL64
    np.testing.assert_array_equal(np.diagonal(fn.jacobian(z)), fn.derivative(z, fn.forward(z)))


def test_kink_choices_are_autodiffs():
    """The stated choices: relu6' is 0 at 0 and 6; hard_sigmoid' is 0 at -3 and 3 and at the
    float64 number below 3 (``z + 3`` rounds to 6); hard_silu' is 0 at -3 and 1 at 3; selu' is
    ``scale`` at 0; celu' is 2 at 0 (both of Keras' max/min branches pass the tie)."""
    below_three = np.nextafter(3.0, 0.0)
    z = tf.constant([0.0, 6.0, -3.0, 3.0, below_three], tf.float64)
    d = {
        n: np.asarray(activations.get(n).derivative(z, activations.get(n).forward(z)))
        for n in NEW + MORE
    }
    np.testing.assert_array_equal(d["relu6"][:2], [0.0, 0.0])
    np.testing.assert_array_equal(d["hard_sigmoid"][2:], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(d["hard_silu"][2:4], [0.0, 1.0])
    assert d["selu"][0] == activations.elementwise.SELU_SCALE
    assert d["celu"][0] == 2.0


# The activations tf_jacbp had before issue 15 (tested above and in every mode).
EARLIER = ["linear", "relu", "sigmoid", "tanh", "leaky_relu", "elu", "softplus", "gelu", "swish"]


def test_every_registered_activation_is_compared_with_keras():
    """Every name of the registry is Keras' name for the same function, and the new ones are all
    in the kink comparison above: a new registry entry must join one of the lists."""
    assert set(activations._ACTIVATIONS) == {*EARLIER, "softmax", *NEW, *MORE} - {"silu"}
    for name in activations._ACTIVATIONS:
        keras_function = getattr(keras.activations, name)
        assert type(activations.get(keras_function)) is type(activations.get(name))


@pytest.mark.parametrize(
    "activation",
    [
        activations.CELU(alpha=0.5),
        activations.SoftShrink(threshold=0.25),
        activations.HardShrink(threshold=2.0),
        activations.Squareplus(b=1.5),
        activations.ReLU6(),
    ],
    ids=lambda a: a.name,
)
def test_activation_arguments_round_trip_through_keras_files(activation, tmp_path):
    """An activation with arguments, in an Activation layer, survives a ``.keras`` file."""
    model = keras.Sequential([keras.Input((4,)), layers.Activation(activation)])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.layers[0].activation.get_config() == activation.get_config()
    assert type(loaded.layers[0].activation) is type(activation)
    x = np.linspace(-3, 3, 8).reshape(2, 4)
    np.testing.assert_array_equal(loaded(x), model(x))


def _all_keras_callables():
    from tf_jacbp.activations import keras_callables

    return [(qualified, fn) for qualified, fn, *_ in keras_callables._present()]


# Stock functions whose float64 result rounds a constant through float32 (tf.nn.gelu,
# tf.nn.leaky_relu's alpha attribute): ours are exact, and the two differ by about 5e-9.
FLOAT32_CONSTANTS = {"gelu", "leaky_relu"}


@pytest.mark.parametrize("qualified, function", _all_keras_callables())
def test_keras_callables_map_to_the_same_function(qualified, function):
    """``activations.get(keras.activations.relu)`` (and ``keras.ops.*``, ``tf.nn.*``) returns
    the tf_jacbp activation with the same definition and defaults: equal values and equal
    gradients in float64."""
    z = tf.constant(np.random.default_rng(3).normal(size=(3, 5)) * 3)
    fn = activations.get(function)
    value, derivative = _stock_value_and_derivative(function, z)
    layer = layers.Activation(function, dtype="float64")
    ours, ours_derivative = _value_and_derivative(layer, z)
    rtol = 1e-7 if qualified.rsplit(".", 1)[1] in FLOAT32_CONSTANTS else RTOL64
    assert tolerances.relative_error(ours, value) <= rtol
    if isinstance(fn, activations.Softmax):  # not elementwise: compare J^T 1 with autodiff's
        return
    assert tolerances.relative_error(ours_derivative, derivative) <= rtol


def test_dense_with_a_keras_callable_serializes_by_name():
    dense = layers.Dense(3, activation=keras.activations.selu)
    assert isinstance(dense.activation, activations.SELU)
    assert dense.get_config()["activation"] == "selu"
    assert isinstance(layers.Activation(keras.ops.gelu).activation, activations.GELU)
    assert layers.Activation(keras.ops.gelu).activation.approximate  # keras.ops' default
    assert not layers.Activation(keras.activations.gelu).activation.approximate


@pytest.mark.parametrize(
    "bad", [lambda z: z, abs, keras.activations.glu, keras.activations.log_softmax, np.tanh]
)
def test_unknown_callable_names_the_supported_ones(bad):
    with pytest.raises(
        ValueError, match=r"Unknown activation=.*keras\.activations\.\{celu, elu"
    ) as e:
        layers.Activation(bad)
    assert "relu6" in str(e.value) and "tf.nn." in str(e.value)
    with pytest.raises(ValueError, match="Unknown activation="):
        layers.Dense(2, activation=bad)


# --- Issue 15, item 3: the activation layers' Keras conventions ---

STOCK_PAIRS = {
    "ReLU": (
        lambda: layers.ReLU(max_value=2.0, negative_slope=0.25, threshold=0.5),
        lambda: keras.layers.ReLU(max_value=2.0, negative_slope=0.25, threshold=0.5),
        ["max_value", "negative_slope", "threshold"],
    ),
    "LeakyReLU": (
        lambda: layers.LeakyReLU(0.125),
        lambda: keras.layers.LeakyReLU(0.125),
        ["negative_slope"],
    ),
    "ELU": (lambda: layers.ELU(0.5), lambda: keras.layers.ELU(0.5), ["alpha"]),
    "Softmax": (layers.Softmax, keras.layers.Softmax, ["axis"]),
    "Activation": (lambda: layers.Activation("tanh"), lambda: keras.layers.Activation("tanh"), []),
}


@pytest.mark.parametrize("name", list(STOCK_PAIRS))
def test_activation_layers_follow_keras_conventions(name):
    """Built at construction, ``supports_masking``, arguments readable as attributes with the
    stock values, and a mask passed through a model as stock passes it."""
    make, make_stock, attributes = STOCK_PAIRS[name]
    ours, stock = make(), make_stock()
    assert ours.built == stock.built is True
    assert ours.supports_masking == stock.supports_masking is True
    for attribute in attributes:
        assert getattr(ours, attribute) == getattr(stock, attribute), attribute
        assert ours.get_config()[attribute] == stock.get_config()[attribute], attribute
    # Masking drops the time step of zeros; the (batch, 3) mask reaches the layer (Softmax: as its
    # mask argument, broadcast from the right as Keras' Softmax broadcasts it) and passes on.
    inputs = keras.Input((3, 3))
    masked = keras.layers.Masking()(inputs)
    mask = tf.constant([[True, False, True]])
    x = tf.constant([[[1.0, 2.0, -0.5], [0.0, 0.0, 0.0], [-1.0, 0.5, 3.0]]])
    got = keras.Model(inputs, make()(masked))(x)
    want = keras.Model(inputs, make_stock()(masked))(x)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(got._keras_mask, mask)
    np.testing.assert_array_equal(want._keras_mask, mask)


@pytest.mark.parametrize("axis", [1, [1], -1, [-1]])
def test_softmax_axis_given_as_the_last_index_equals_keras(axis):
    """``Softmax(axis=1)`` on ``(batch, C)`` inputs is the last axis: accepted, equal to stock,
    and kept as given in the config."""
    z = tf.constant(np.random.default_rng(4).normal(size=(3, 5)))
    ours, stock = (
        layers.Softmax(axis=axis, dtype="float64"),
        keras.layers.Softmax(axis=axis, dtype="float64"),
    )
    assert ours.axis == stock.axis and ours.get_config()["axis"] == axis
    assert tolerances.relative_error(ours(z), stock(z)) <= RTOL64


def test_setting_an_argument_replaces_the_activation_and_is_checked():
    layer = layers.ReLU()
    layer.max_value = 1.0
    np.testing.assert_array_equal(layer(tf.constant([-1.0, 0.5, 3.0])), [0.0, 0.5, 1.0])
    assert layer.get_config()["max_value"] == 1.0
    with pytest.raises(ValueError, match="threshold=-1"):
        layer.threshold = -1
    elu = layers.ELU()
    elu.alpha = 0.5
    assert elu.activation.alpha == 0.5


def test_leaky_relu_accepts_keras_2_alpha_with_a_warning():
    with pytest.warns(UserWarning, match="alpha"):
        layer = layers.LeakyReLU(alpha=0.1)
    assert layer.negative_slope == 0.1


@settings(max_examples=10, deadline=None)
@given(
    shape=st.sampled_from([(2, 5), (2, 3, 4)]),
    mask_shape=st.sampled_from(["full", "last", "rows"]),
    seed=st.integers(0, 2**16),
)
def test_softmax_mask_equals_keras_softmax_in_float64(shape, mask_shape, seed):
    """``Softmax()(z, mask=m)``: values and input gradients equal ``keras.layers.Softmax``'s, with
    full, broadcast and whole-row masks; dropped entries are 0 and get 0 gradient."""
    rng = np.random.default_rng(seed)
    z = tf.constant(rng.normal(size=shape) * 2)
    m_shape = {"full": shape, "last": (shape[-1],), "rows": (*shape[:-1], 1)}[mask_shape]
    mask = tf.constant(rng.random(m_shape) > 0.4)
    dy = tf.constant(rng.normal(size=shape))

    def run(layer, reference=False):
        with tf.GradientTape() as tape:
            tape.watch(z)
            if reference:
                with tf_jacbp.reference_mode():
                    a = layer(z, mask=mask)
            else:
                a = layer(z, mask=mask)
        return np.asarray(a), np.asarray(tape.gradient(a, z, output_gradients=dy))

    value, grad = run(keras.layers.Softmax(dtype="float64"))
    for reference in (False, True):
        ours, ours_grad = run(layers.Softmax(dtype="float64"), reference)
        assert tolerances.relative_error(ours, value) <= RTOL64
        assert tolerances.relative_error(ours_grad, grad) <= RTOL64
    dropped = ~np.broadcast_to(np.asarray(mask), shape)
    assert np.all(ours[dropped] == 0) and np.all(ours_grad[dropped] == 0)


def test_softmax_mask_that_does_not_broadcast_names_the_shapes():
    with pytest.raises(ValueError, match=r"mask must be broadcastable.*mask.shape=\(2, 3\)"):
        layers.Softmax()(tf.zeros((2, 4)), mask=tf.ones((2, 3), tf.bool))


@pytest.mark.parametrize("base", [layers.Activation, layers.ReLU, layers.Softmax])
def test_a_subclass_overriding_build_has_it_run(base):
    """Built at construction only while ``build`` is the stateless one (Keras' rule): a subclass
    that overrides ``build`` is unbuilt until its first call, which runs its ``build``."""

    class Recording(base):
        def build(self, input_shape):
            self.seen = tuple(input_shape)

    args = ("tanh",) if base is layers.Activation else ()
    assert base(*args).built
    layer = Recording(*args)
    assert not layer.built
    layer(tf.zeros((2, 3)))
    assert layer.built and layer.seen == (2, 3)


@pytest.mark.parametrize("name", ["ReLU", "Softmax", "GELU"])
def test_vjp_input_of_v_vectors_equals_autodiff(name):
    """``vjp_input(m, z, a)`` with ``V = 3`` stacked vectors on a ``(batch, T, d)`` input: each
    ``v`` equals autodiff's vector-Jacobian product of the reference route."""
    layer = LAYERS[name](dtype="float64")
    rng = np.random.default_rng(3)
    z = tf.constant(rng.normal(size=(4, 2, 5)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        with tf_jacbp.reference_mode():
            a = layer(z)
    m = tf.constant(rng.normal(size=(3, *a.shape)))
    got = layer.vjp_input(m, z, layer.forward(z))
    for v in range(3):
        expected = tape.gradient(a, z, output_gradients=m[v])
        assert tolerances.relative_error(got[v], expected) <= RTOL64


def test_masked_softmax_is_a_contract_map():
    """The masked softmax's map (``MaskedSoftmax``): ``vjp_input`` for ``V = 3`` against autodiff
    of its reference route, and its forward equal to the reference."""
    from tf_jacbp.layers.activation import MaskedSoftmax

    rng = np.random.default_rng(5)
    z = tf.constant(rng.normal(size=(3, 4, 5)))
    mask = tf.constant(rng.random((3, 4, 5)) > 0.4)
    op = MaskedSoftmax()
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        s = op.reference(z, mask)
    assert tolerances.relative_error(op.forward(z, mask), s) <= RTOL64
    m = tf.constant(rng.normal(size=(3, *s.shape)))
    got = op.vjp_input(m, z, s, mask)
    for v in range(3):
        expected = tape.gradient(s, z, output_gradients=m[v])
        assert tolerances.relative_error(got[v], expected) <= RTOL64
