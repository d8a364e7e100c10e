"""MaxPooling3D and AveragePooling3D (issue 21 item 6): the selection and averaging matrices of
``tf_jacbp.layers.pooling`` over volumes ``(D, H, W, C)``.

TensorFlow has no float64 3-D pooling kernel (and its eager float32 ``MaxPool3DGrad`` misroutes
near-ties), so the float64 witness here is an explicit NumPy loop over the windows, independent
of the index maps, of ``tf_jacbp.geometry`` and of the layers' strided-slice reference route;
stock ``keras.layers.MaxPooling3D``/``AveragePooling3D`` are compared in float32 where their
kernels run.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_jacbp import layers, tolerances
from tf_jacbp.layers.pooling_nd import AveragePooling3D, MaxPooling3D
from tf_jacbp.testing import check_layer

CONFIGS = [
    ((4, 5, 6, 2), {}),  # tiled, one row and column left over
    ((5, 4, 6, 2), {"pool_size": (2, 3, 2), "strides": (1, 2, 2), "padding": "same"}),
    ((5, 4, 6, 1), {"pool_size": 3, "strides": 2, "padding": "same"}),
    ((4, 5, 5, 3), {"pool_size": (2, 2, 3), "strides": 1}),
]
RTOL64 = tolerances.rtol("float64")


def _axis_windows(size: int, pool: int, stride: int, padding: str) -> list[list[int]]:
    """The input positions of each window along one axis (those inside the input), by
    TensorFlow's documented padding rule, written out here independently."""
    if padding == "same":
        out = -(-size // stride)
        before = max((out - 1) * stride + pool - size, 0) // 2
    else:
        out, before = (size - pool) // stride + 1, 0
    return [
        [i for i in range(o * stride - before, o * stride - before + pool) if 0 <= i < size]
        for o in range(out)
    ]


def numpy_pool(x: np.ndarray, m: np.ndarray, kind: str, pool, strides, padding):
    """``y`` and ``J^T m`` by a loop over the windows: max picks each window's first maximum in
    row-major order (``MaxPoolGrad``'s rule), average divides by the inputs inside the window.
    ``x`` ``(batch, D, H, W, C)``, ``m`` ``(V, *y.shape)``."""
    axes = [
        _axis_windows(n, p, s, padding) for n, p, s in zip(x.shape[1:4], pool, strides, strict=True)
    ]
    y = np.zeros((x.shape[0], *(len(a) for a in axes), x.shape[-1]))
    dx = np.zeros((m.shape[0], *x.shape))
    for o in itertools.product(*(range(len(a)) for a in axes)):
        positions = list(itertools.product(*(a[i] for a, i in zip(axes, o, strict=True))))
        window = np.stack([x[:, d, h, w] for d, h, w in positions], axis=1)  # (batch, S, C)
        if kind == "max":
            first = np.argmax(window, axis=1)  # (batch, C): the first maximum
            y[(slice(None), *o)] = np.max(window, axis=1)
            for s, (d, h, w) in enumerate(positions):
                dx[:, :, d, h, w] += np.where(first == s, m[(slice(None), slice(None), *o)], 0)
        else:
            y[(slice(None), *o)] = window.mean(axis=1)
            for d, h, w in positions:
                dx[:, :, d, h, w] += m[(slice(None), slice(None), *o)] / len(positions)
    return y, dx


def _kind(cls) -> str:
    return "max" if cls is MaxPooling3D else "average"


@pytest.mark.parametrize("cls", [MaxPooling3D, AveragePooling3D])
@pytest.mark.parametrize("input_shape, kwargs", CONFIGS)
@pytest.mark.parametrize("ties", [False, True])
def test_float64_values_and_products_equal_an_independent_loop(cls, input_shape, kwargs, ties):
    """``y``, ``vjp_input`` for ``V = 2`` stacked vectors (eagerly, traced, and traced for
    unknown sizes), the training backward and autodiff of the reference route, all against the
    NumPy loop in float64 (``ties``: values in {0, 1, 2}, so windows tie often)."""
    rng = np.random.default_rng(sum(input_shape))
    shape = (3, *input_shape)
    x = rng.integers(0, 3, size=shape).astype(float) if ties else rng.normal(size=shape)
    layer = cls(dtype="float64", **kwargs)
    y = layer(tf.constant(x))
    m = rng.normal(size=(2, *y.shape))
    y_np, dx_np = numpy_pool(x, m, _kind(cls), layer.pool_size, layer.strides, layer.padding)
    np.testing.assert_allclose(y, y_np, rtol=RTOL64, atol=1e-15)
    np.testing.assert_allclose(layer.reference(tf.constant(x)), y_np, rtol=RTOL64, atol=1e-15)

    x, y, m = tf.constant(x), tf.constant(y_np), tf.constant(m)
    unknown = tf.TensorSpec((None, None, None, None, input_shape[-1]), tf.float64)
    traced_unknown = tf.function(
        layer.vjp_input,
        input_signature=[tf.TensorSpec((None, *unknown.shape), tf.float64), unknown, unknown],
    )
    for route in (layer.vjp_input, tf.function(layer.vjp_input), traced_unknown):
        np.testing.assert_allclose(route(m, x, y), dx_np, rtol=RTOL64, atol=1e-15)
    np.testing.assert_allclose(layer.backward(m[0], x, y)[0], dx_np[0], rtol=RTOL64, atol=1e-15)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y_ref = layer.reference(x)
    autodiff = tape.gradient(y_ref, x, output_gradients=m[1])
    np.testing.assert_allclose(autodiff, dx_np[1], rtol=RTOL64, atol=1e-15)


@pytest.mark.parametrize("name", ["MaxPooling3D", "AveragePooling3D"])
@pytest.mark.parametrize("input_shape, kwargs", CONFIGS)
def test_float32_values_equal_the_stock_layer(name, input_shape, kwargs):
    """Values against stock Keras (TensorFlow's float32 3-D kernels), and for average pooling
    the gradient too (the stock max-pooling gradient is no witness: TensorFlow's eager float32
    ``MaxPool3DGrad`` misroutes near-ties)."""
    x = tf.constant(np.random.default_rng(5).normal(size=(2, *input_shape)), tf.float32)
    kwargs = {"pool_size": (2, 2, 2), **kwargs}  # stock AveragePooling3D has no default
    ours, stock = getattr(layers, name)(**kwargs), getattr(keras.layers, name)(**kwargs)
    rtol = tolerances.rtol("float32")
    delta = tf.constant(np.random.default_rng(6).normal(size=stock(x).shape), tf.float32)
    results = []
    for layer in (ours, stock):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        results.append((y, tape.gradient(y, x, output_gradients=delta)))
    (y, dx), (y_stock, dx_stock) = results
    np.testing.assert_allclose(y, y_stock, rtol=rtol, atol=1e-6)
    if name == "AveragePooling3D":
        np.testing.assert_allclose(dx, dx_stock, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize(
    "cls, input_shape, kwargs, modes",
    [
        (MaxPooling3D, (4, 4, 5, 2), {"pool_size": (2, 3, 2), "strides": (1, 2, 2)}, True),
        (MaxPooling3D, (3, 4, 4, 1), {"pool_size": 2, "strides": 1, "padding": "same"}, False),
        (AveragePooling3D, (4, 5, 4, 2), {"pool_size": 3, "strides": 2, "padding": "same"}, True),
        (AveragePooling3D, (4, 4, 4, 1), {}, False),
    ],
)
def test_the_layer_test_kit(cls, input_shape, kwargs, modes, tmp_path):
    check_layer(
        lambda dtype: cls(dtype=dtype, **kwargs), input_shape, tmp_dir=tmp_path, modes=modes
    )


@pytest.mark.parametrize("cls", [MaxPooling3D, AveragePooling3D])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pool_size": 0}, "pool_size=0"),
        ({"pool_size": (2, 2)}, r"pool_size=\(2, 2\)"),
        ({"pool_size": (2, 2, -1)}, r"pool_size=\(2, 2, -1\)"),
        ({"strides": 0}, "strides=0"),
        ({"strides": (1, 2)}, r"strides=\(1, 2\)"),
        ({"padding": "causal"}, "padding='causal'"),
        (
            {"data_format": "channels_first"},
            r"data_format='channels_first'.*Permute\(\(2, 3, 4, 1\)\)",
        ),
    ],
)
def test_bad_arguments_name_the_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [MaxPooling3D, AveragePooling3D])
def test_pool_larger_than_a_valid_input_and_bad_ranks(cls):
    with pytest.raises(ValueError, match=r"pool_size \(3, 3, 3\).*depth.*padding='same'"):
        keras.Sequential([keras.Input((2, 5, 5, 1)), cls(3)])
    with pytest.raises(
        ValueError, match=r"\(batch, depth, height, width, channels\).*x\[\.\.\., None\]"
    ):
        keras.Sequential([keras.Input((8, 8, 8)), cls(2)])
    with pytest.raises(ValueError, match=r"channel count.*keras\.Input\(\(16, 16, 16, 1\)\)"):
        keras.Sequential([keras.Input((4, 4, 4, None)), cls(2)])


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("MaxPooling3D", {}),
        ("MaxPooling3D", {"pool_size": (1, 2, 3), "strides": 1, "padding": "same"}),
        ("AveragePooling3D", {"pool_size": 3, "strides": (2, 1, 1)}),
    ],
)
def test_configuration_as_the_stock_layer(name, kwargs):
    """Built at construction, the same ``get_config`` keys and values (so the same readable
    attributes) and masking support as stock, and a config round trip."""
    ours, stock = getattr(layers, name)(**kwargs), getattr(keras.layers, name)(**kwargs)
    assert ours.built and stock.built
    assert ours.supports_masking == stock.supports_masking
    config = ours.get_config()
    for key, value in stock.get_config().items():
        if key not in ("name", "dtype"):
            assert config[key] == value, key
            assert getattr(ours, key) == getattr(stock, key), key
    assert type(ours).from_config(config).get_config() == config


def test_a_model_saves_and_fits_on_volumes_of_several_sizes(tmp_path):
    """``Input((None, None, None, 1))``: the maps of each size met; fit agrees with the
    reference route, and the ``.keras`` file loads the 3-D layers."""
    import tf_jacbp

    def model():
        return keras.Sequential(
            [
                keras.Input((None, None, None, 1)),
                layers.Dense(2, activation="tanh"),
                MaxPooling3D(2, strides=1, padding="same"),
                AveragePooling3D(2),
                keras.layers.GlobalMaxPooling3D(),
                layers.Dense(1),
            ]
        )

    ours, reference = model(), model()
    for m in (ours, reference):
        m.compile(keras.optimizers.SGD(0.5), "mse")
    rng = np.random.default_rng(3)
    for size in (4, 5):
        reference.set_weights(ours.get_weights())
        before = ours.get_weights()
        x, t = rng.normal(size=(3, size, size + 1, size, 1)), rng.normal(size=(3, 1))
        ours.fit(x, t, batch_size=3, verbose=0)
        with tf_jacbp.reference_mode():
            reference.fit(x, t, batch_size=3, verbose=0)
        for w0, w, w_ref in zip(before, ours.get_weights(), reference.get_weights(), strict=True):
            assert tolerances.relative_error(w0 - w, w0 - w_ref) <= tolerances.rtol("float32")
    path = tmp_path / "volumes.keras"
    ours.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), ours.predict(x, verbose=0))
