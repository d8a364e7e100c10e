"""UpSampling2D, ZeroPadding2D and Reshape: every mode of the harness, values and gradients equal
to the stock Keras layers (hypothesis), the Kronecker-product Jacobians of the module docstring,
inputs of unknown size, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tf_jacbp
from tf_jacbp import jacobian, tolerances
from tf_jacbp.layers.dense import Dense
from tf_jacbp.layers.global_pooling import GlobalMaxPooling1D
from tf_jacbp.layers.pooling import MaxPooling2D
from tf_jacbp.layers.pooling_nd import AveragePooling1D, MaxPooling1D
from tf_jacbp.layers.reshaping import Reshape, UpSampling2D, ZeroPadding2D
from tf_jacbp.testing import check_layer as run_layer_test
from tf_jacbp.testing import half_squared_error

RTOL64 = tolerances.rtol("float64")


@pytest.mark.parametrize(
    "cls, input_shape, kwargs",
    [
        (UpSampling2D, (3, 2, 2), {"size": (2, 3)}),
        (ZeroPadding2D, (3, 2, 2), {"padding": ((1, 0), (2, 1))}),
        (Reshape, (3, 2, 2), {"target_shape": (-1, 4)}),
    ],
)
def test_reshaping_every_mode(cls, input_shape, kwargs, tmp_path):
    run_layer_test(lambda dtype: cls(dtype=dtype, **kwargs), input_shape, tmp_dir=tmp_path)


def _gradient(layer, x, delta, traced=False):
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return y, tape.gradient(y, x, output_gradients=delta)

    return tf.function(run)(x) if traced else run(x)


def _assert_equal_to_stock(ours, stock, x, traced=False):
    delta = tf.constant(np.random.default_rng(0).normal(size=stock(x).shape))
    y, dx = _gradient(ours, x, delta, traced)
    y_ref, dx_ref = _gradient(stock, x, delta)
    assert y.shape == y_ref.shape
    assert tolerances.relative_error(y, y_ref) <= RTOL64
    assert tolerances.relative_error(dx, dx_ref) <= RTOL64


def _padding():
    amount = st.integers(0, 3)
    return st.one_of(
        amount,
        st.tuples(amount, amount),
        st.tuples(st.tuples(amount, amount), st.tuples(amount, amount)),
    )


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(["UpSampling2D", "ZeroPadding2D", "Reshape"]),
    size=st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))),
    padding=_padding(),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3)),
    unknown=st.sampled_from([None, 0, 1, 2]),
    traced=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_reshaping_equals_the_stock_layer(kind, size, padding, shape, unknown, traced, seed):
    """Values and input gradients equal Keras' layer of the same name in float64, eagerly and
    traced; ``Reshape``'s ``target_shape`` is the input's shape permuted, with one axis -1."""
    if kind == "Reshape":
        target = list(np.random.default_rng(seed).permutation(shape))
        if unknown is not None:
            target[unknown] = -1
        kwargs = {"target_shape": tuple(int(n) for n in target)}
    else:
        kwargs = {"size": size} if kind == "UpSampling2D" else {"padding": padding}
    ours = globals()[kind](dtype="float64", **kwargs)
    stock = getattr(keras.layers, kind)(dtype="float64", **kwargs)
    x = tf.constant(np.random.default_rng(seed).normal(size=(2, *shape)))
    _assert_equal_to_stock(ours, stock, x, traced)


@pytest.mark.parametrize(
    "layer",
    [
        UpSampling2D((2, 3), dtype="float64"),
        ZeroPadding2D(((1, 2), (0, 1)), dtype="float64"),
        Reshape((2, -1), dtype="float64"),
    ],
)
def test_jacobian_equals_autodiff_and_its_transpose_is_the_backward(layer):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(1, 3, 2, 2)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer.reference(x)
    flat = tf.reshape(y, [-1])
    jacobian = layer.input_jacobian(x)[0]  # a batch of one (Reshape takes samples of any rank)
    assert tolerances.relative_error(jacobian, tf.reshape(tape.jacobian(y, x), [-1, 12])) == 0
    delta = tf.constant(rng.normal(size=y.shape))
    dx, params = layer.backward(delta, x, layer.forward(x))
    assert params == []
    expected = tf.linalg.matvec(jacobian, tf.reshape(delta, [-1]), transpose_a=True)
    assert tolerances.relative_error(tf.reshape(dx, [-1]), expected) <= RTOL64
    np.testing.assert_array_equal(tf.linalg.matvec(jacobian, tf.reshape(x, [-1])), flat)


def test_upsampling_and_padding_jacobians_are_the_documented_kronecker_products():
    """``J = (I_H (x) 1_{s_h}) (x) (I_W (x) 1_{s_w}) (x) I_C`` and ``J = P_h (x) P_w (x) I_C``,
    written out entry by entry here."""
    height, width, channels = 2, 3, 2
    up = UpSampling2D((3, 2), dtype="float64").input_jacobian(np.zeros((height, width, channels)))
    expected = np.zeros((height * 3 * width * 2 * channels, height * width * channels))
    for i in range(height * 3):
        for j in range(width * 2):
            for c in range(channels):
                row = (i * width * 2 + j) * channels + c
                expected[row, ((i // 3) * width + j // 2) * channels + c] = 1
    np.testing.assert_array_equal(up, expected)
    pad = ZeroPadding2D(((1, 0), (2, 1)), dtype="float64").input_jacobian(np.zeros((2, 3, 1)))
    expected = np.zeros((3 * 6, 6))
    for i in range(2):
        for j in range(3):
            expected[(i + 1) * 6 + j + 2, i * 3 + j] = 1
    np.testing.assert_array_equal(pad, expected)


@pytest.mark.parametrize(
    "layer, input_shape",
    [
        (UpSampling2D((2, 3), dtype="float64"), (None, None, 2)),
        (ZeroPadding2D(((1, 2), (3, 0)), dtype="float64"), (None, 4, 2)),
        (Reshape((-1, 2), dtype="float64"), (None, 4)),
    ],
)
def test_inputs_of_unknown_size(layer, input_shape):
    """In a graph traced for unknown sizes (and under XLA) the backward equals the stock one."""
    stock = getattr(keras.layers, type(layer).__name__).from_config(layer.get_config())
    model = keras.Sequential([keras.Input(input_shape, dtype="float64"), layer])
    assert model.output_shape[1:] == stock.compute_output_shape((None, *input_shape))[1:]

    def gradient(x, delta):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)
        return tape.gradient(y, x, output_gradients=delta)

    spec = [tf.TensorSpec((None, *input_shape), tf.float64), tf.TensorSpec(None, tf.float64)]
    rng = np.random.default_rng(2)
    for size, jit in ((3, False), (5, True)):
        x = tf.constant(rng.normal(size=[2] + [size if n is None else n for n in input_shape]))
        delta = tf.constant(rng.normal(size=stock(x).shape))
        compiled = tf.function(gradient, input_signature=spec, jit_compile=jit)
        expected = _gradient(stock, x, delta)[1]  # sums of blocks: in another order
        assert tolerances.relative_error(compiled(x, delta), expected) <= RTOL64


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: UpSampling2D(interpolation="bicubic"), "interpolation='bicubic'"),
        (lambda: UpSampling2D(size=0), "size=0"),
        (lambda: UpSampling2D(size=(2, 2, 2)), r"size=\(2, 2, 2\)"),
        (lambda: UpSampling2D(data_format="channels_first"), "data_format='channels_first'"),
        (lambda: ZeroPadding2D(padding=-1), "padding=-1"),
        (lambda: ZeroPadding2D(padding=(1, 2, 3)), r"padding=\(1, 2, 3\)"),
        (lambda: ZeroPadding2D(padding=((1, 2), (3,))), r"padding=\(\(1, 2\), \(3,\)\)"),
        (lambda: ZeroPadding2D(padding=1.5), "padding=1.5"),
        (lambda: ZeroPadding2D(data_format="channels_first"), "data_format='channels_first'"),
        (lambda: Reshape((-1, -1)), r"target_shape=\(-1, -1\)"),
        (lambda: Reshape((0, 3)), r"target_shape=\(0, 3\)"),
        (lambda: Reshape(5), "target_shape=5"),
    ],
)
def test_bad_arguments_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_reshape_to_another_number_of_entries_is_an_error():
    with pytest.raises(ValueError, match=r"target_shape=\(5, -1\).*number of entries"):
        keras.Sequential([keras.Input((3, 4)), Reshape((5, -1))])
    with pytest.raises(ValueError, match=r"target_shape=\(5, 2\).*number of entries"):
        keras.Sequential([keras.Input((3, 4)), Reshape((5, 2))])


@pytest.mark.parametrize("target", [(5, -1), (5, 2)])
def test_eager_reshape_to_another_number_of_entries_is_our_error(target):
    """Issue 21 item 8: called eagerly, the layer gave TensorFlow's reshape error; it names the
    layer, both shapes and the fix, as the symbolic call does."""
    layer = Reshape(target, name="to_five")
    pattern = (
        r"Reshape 'to_five': cannot reshape samples of shape \(3, 4\) \(12 entries\) to "
        rf"target_shape=\({target[0]}, {target[1]}\).*Give a target_shape of 12 entries"
    )
    with pytest.raises(ValueError, match=pattern):
        layer(np.zeros((2, 3, 4)))


def test_reshape_traced_for_any_batch_size_keeps_the_size_it_infers():
    """Issue 21 item 8: traced with an unknown batch size, ``Reshape((-1, 8))`` gave
    ``(None, None, 8)`` (stock: ``(None, 3, 8)``), and a ``Dense`` after ``Reshape((3, -1))``
    could not be built (its input's last axis unknown)."""
    spec = tf.TensorSpec((None, 24), tf.float64)
    for target in ((-1, 8), (3, -1)):
        ours, stock = (
            Reshape(target, dtype="float64"),
            keras.layers.Reshape(target, dtype="float64"),
        )
        for layer in (ours, stock):
            traced = tf.function(layer).get_concrete_function(spec)
            assert traced.output_shapes == tf.TensorShape([None, 3, 8]), (layer, target)
    dense = Dense(2, dtype="float64")
    head = tf.function(lambda x: dense(Reshape((3, -1), dtype="float64")(x)))
    assert head.get_concrete_function(spec).output_shapes == tf.TensorShape([None, 3, 2])


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("UpSampling2D", {"size": (2, 3)}),
        ("ZeroPadding2D", {"padding": (1, 2)}),
        ("ZeroPadding2D", {"padding": 2}),
        ("Reshape", {"target_shape": (2, -1)}),
    ],
)
def test_configuration_and_attributes_as_the_stock_layer(name, kwargs):
    """``get_config`` and the attributes it names equal the stock layer's; built at
    construction exactly when Keras builds it there (``Reshape``)."""
    ours, stock = globals()[name](**kwargs), getattr(keras.layers, name)(**kwargs)
    assert ours.built == stock.built
    config = ours.get_config()
    for key, value in stock.get_config().items():
        if key not in ("name", "dtype"):
            assert config[key] == value, key
            assert getattr(ours, key) == getattr(stock, key), key
    assert type(ours).from_config(config).get_config() == config


def test_algorithm_1_through_the_reshaping_and_pooling_layers():
    """Per-example gradients (each sample against a batch of one) and ``parameter_jacobian``
    (against ``tape.jacobian``, columns in theta order) through a model that pads, pools,
    upsamples, reshapes to a sequence, pools it and pools globally."""
    f64 = {"dtype": "float64"}
    model = keras.Sequential(
        [
            keras.Input((4, 4, 2), dtype="float64"),
            ZeroPadding2D(((1, 0), (0, 1)), **f64),
            MaxPooling2D(2, strides=1, **f64),
            UpSampling2D(2, **f64),
            Reshape((-1, 2), **f64),
            MaxPooling1D(3, strides=2, padding="same", **f64),
            AveragePooling1D(2, **f64),
            Dense(3, activation="tanh", **f64),
            GlobalMaxPooling1D(**f64),
            Dense(2, **f64),
        ]
    )
    rng = np.random.default_rng(7)
    x, t = tf.constant(rng.normal(size=(3, 4, 4, 2))), tf.constant(rng.normal(size=(3, 2)))
    rows = jacobian.per_example_gradients(model, x, t, loss=half_squared_error, flatten=False)
    for i in range(3):
        with tf.GradientTape() as tape:
            with tf_jacbp.reference_mode():
                loss = tf.reduce_sum(half_squared_error(t[i : i + 1], model(x[i : i + 1])))
        for row, g in zip(rows, tape.gradient(loss, model.trainable_variables), strict=True):
            assert tolerances.relative_error(row[i], g) <= RTOL64
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            y = model(x[:1])[0]
    columns = []
    jacobians = tape.jacobian(y, model.trainable_variables)
    for v, j in zip(model.trainable_variables, jacobians, strict=True):
        axes = [0, *range(len(v.shape), 0, -1)]  # Vec: column-major over the variable
        columns.append(np.transpose(np.asarray(j), axes).reshape(y.shape[0], -1))
    expected = np.concatenate(columns, axis=1)
    assert tolerances.relative_error(jacobian.parameter_jacobian(model, x[:1])[0], expected) <= (
        RTOL64
    )


def test_a_reshape_subclass_overriding_build_has_its_build_run():
    """Issue 21 item 7: ``Reshape`` marked itself built in ``__init__``, so a subclass's
    ``build`` never ran; it is built at construction only when ``build`` is not overridden."""

    class Recording(Reshape):
        def build(self, shape):
            self.seen = tuple(shape)
            super().build(shape)

    assert Reshape((4,)).built
    layer = Recording((4,))
    assert not layer.built
    layer(np.zeros((2, 2, 2)))
    assert layer.built and layer.seen == (2, 2, 2)
