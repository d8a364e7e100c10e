"""``UpSampling2D(interpolation="bilinear")`` on the backend this run uses (TensorFlow or JAX).

The witnesses, each independent of the layer's code:

* NumPy's float64 interpolation matrices ``A`` (``numpy_matrix``: TensorFlow's resize kernel
  rule written out with ``floor``, ``ceil`` and clamped indices, one loop per output pixel), so
  ``y = A_h x A_w^T`` per channel and ``J = A_h (x) A_w (x) I_C``;
* stock Keras, ``keras.layers.UpSampling2D(interpolation="bilinear")`` (``ops.image.resize``)
  and its autodiff. Stock is float64 on JAX (to 1e-15, measured). On TensorFlow it is not:
  ``tf.image.resize`` computes in float32 whatever the input's dtype (3.7e-7 off NumPy in
  float64, measured, and so is its gradient), so there the float64 comparisons with stock use
  float32's tolerance and the float64 witness is NumPy and finite differences;
* float64 central finite differences of the forward pass;
* autodiff through the layer's reference route (``reference_mode``), which in float64 gathers the
  two source rows and columns with stock ``ops.take`` (not the matrices of the Jacobian route);
* ``tf_jacbp.testing.check_layer`` (every mode) and ``GradientCheck`` in ``model.fit``.
"""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

import tf_jacbp
from tf_jacbp import backend as tb
from tf_jacbp import layers, losses, tolerances
from tf_jacbp.callbacks import REFERENCE, GradientCheck
from tf_jacbp.layers.reshaping import UpSampling2D, _bilinear_matrix
from tf_jacbp.testing import check_layer

RTOL64, RTOL32 = tolerances.rtol("float64"), tolerances.rtol("float32")
STOCK_IS_FLOAT64 = keras.backend.backend() == "jax"
"""Whether stock bilinear resize computes float64 inputs in float64 on this backend (module
docstring); the float64 tolerance against stock is float32's where it does not."""
RTOL_STOCK64 = RTOL64 if STOCK_IS_FLOAT64 else RTOL32


def numpy_matrix(n: int, s: int) -> np.ndarray:
    """``A`` ``(n s, n)`` in float64, TensorFlow's ``ResizeBilinear`` rule with half-pixel
    centers: output ``i`` reads ``u = (i + 1/2) / s - 1/2``, ``lo = max(floor(u), 0)``,
    ``hi = min(ceil(u), n - 1)``, weights ``1 - l`` and ``l``, ``l = u - floor(u)``."""
    a = np.zeros((n * s, n))
    for i in range(n * s):
        u = (i + 0.5) / s - 0.5
        lo, hi, lerp = max(int(np.floor(u)), 0), min(int(np.ceil(u)), n - 1), u - np.floor(u)
        a[i, lo] += 1 - lerp
        a[i, hi] += lerp
    return a


def numpy_upsampling(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``y[b, :, :, c] = A_h x[b, :, :, c] A_w^T`` in float64: ``(batch, H, W, C)`` ->
    ``(batch, H s_h, W s_w, C)``."""
    a_h, a_w = numpy_matrix(x.shape[1], size[0]), numpy_matrix(x.shape[2], size[1])
    return np.einsum("ih,bhwc,jw->bijc", a_h, x, a_w)


def bilinear(size, dtype="float64"):
    return UpSampling2D(size, interpolation="bilinear", dtype=dtype)


def stock_bilinear(size, dtype="float64"):
    return keras.layers.UpSampling2D(size, interpolation="bilinear", dtype=dtype)


def input_gradient(layer, x, m, reference=False):
    """``(y, d sum(m * y) / dx)`` by the backend's autodiff through ``layer`` (the Jacobian
    route's custom gradient, or the reference route under ``reference_mode``)."""

    def total(x):
        if reference:
            with tf_jacbp.reference_mode():
                return ops.sum(m * layer(x))
        return ops.sum(m * layer(x))

    _, (dx,) = tb.value_and_gradients(total, [ops.convert_to_tensor(x)])
    return ops.convert_to_numpy(layer(ops.convert_to_tensor(x))), ops.convert_to_numpy(dx)


def test_the_numpy_rule_is_what_stock_keras_computes():
    """The NumPy witness itself against stock Keras' layer (float64 to 1e-12 on JAX, float32's
    tolerance on TensorFlow), and stock on TensorFlow is really not float64 (if it became
    float64, RTOL_STOCK64 should tighten)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5, 2))
    for size in [(2, 3), (3, 1), (4, 4)]:
        stock = ops.convert_to_numpy(stock_bilinear(size)(x))
        err = tolerances.relative_error(stock, numpy_upsampling(x, size))
        assert err <= RTOL_STOCK64, size
        assert (err <= RTOL64) == STOCK_IS_FLOAT64, (size, err)


def test_the_matrices_are_the_documented_hat_kernel():
    """``_bilinear_matrix`` equals NumPy's rule entry for entry in float64 (to a few ulps: the
    witness rounds ``u - floor(u)``), each row sums to 1, and ``input_jacobian`` is
    ``A_h (x) A_w (x) I_C``, row-major (``tf_jacbp.layout``)."""
    for n, s in [(1, 3), (2, 2), (3, 3), (5, 2), (4, 7)]:
        a = ops.convert_to_numpy(_bilinear_matrix(n, s, "float64"))
        np.testing.assert_allclose(a, numpy_matrix(n, s), rtol=0, atol=1e-15)
        np.testing.assert_allclose(a.sum(axis=1), 1, rtol=0, atol=1e-15)
    height, width, channels, size = 3, 2, 2, (2, 3)
    jacobian = bilinear(size).input_jacobian(np.zeros((height, width, channels)))
    expected = np.kron(
        np.kron(numpy_matrix(height, size[0]), numpy_matrix(width, size[1])), np.eye(channels)
    )
    assert tolerances.relative_error(jacobian, expected) <= RTOL64


@settings(max_examples=10, deadline=None)
@given(
    size=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 3)),
    seed=st.integers(0, 2**16),
)
def test_values_and_input_gradients_equal_numpy_stock_and_the_reference_route(size, shape, seed):
    """Float64: ``y`` and ``J^T m`` equal NumPy's ``A_h x A_w^T`` and ``A_h^T m A_w`` and the
    reference route's autodiff to 1e-12, stock Keras' layer and its autodiff to
    ``RTOL_STOCK64`` (float32's tolerance on TensorFlow, module docstring). Float32: stock to
    float32's tolerance."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, *shape))
    m = rng.normal(size=numpy_upsampling(x, size).shape)
    a_h, a_w = numpy_matrix(shape[0], size[0]), numpy_matrix(shape[1], size[1])
    ours, stock = bilinear(size), stock_bilinear(size)
    y, dx = input_gradient(ours, x, m)
    assert y.dtype == dx.dtype == np.float64
    assert tolerances.relative_error(y, numpy_upsampling(x, size)) <= RTOL64
    assert tolerances.relative_error(dx, np.einsum("ih,bijc,jw->bhwc", a_h, m, a_w)) <= RTOL64
    y_ref, dx_ref = input_gradient(ours, x, m, reference=True)
    assert tolerances.relative_error(y, y_ref) <= RTOL64
    assert tolerances.relative_error(dx, dx_ref) <= RTOL64
    y_stock, dx_stock = input_gradient(stock, x, m)
    assert tolerances.relative_error(y, y_stock) <= RTOL_STOCK64
    assert tolerances.relative_error(dx, dx_stock) <= RTOL_STOCK64
    x32, m32 = x.astype("float32"), m.astype("float32")
    y32, dx32 = input_gradient(bilinear(size, "float32"), x32, m32)
    y32_stock, dx32_stock = input_gradient(stock_bilinear(size, "float32"), x32, m32)
    assert y32.dtype == dx32.dtype == np.float32
    assert tolerances.relative_error(y32, y32_stock, "float32") <= RTOL32
    assert tolerances.relative_error(dx32, dx32_stock, "float32") <= RTOL32


def test_vjp_input_equals_finite_differences_for_each_stacked_vector():
    """``vjp_input`` on ``V = 3`` stacked vectors, ``(V, batch, H s_h, W s_w, C)`` ->
    ``(V, batch, H, W, C)``: each equals the float64 central differences of ``sum(m_v * y)``
    (the layer's forward pass) entry by entry."""
    rng = np.random.default_rng(3)
    size, x = (3, 2), rng.normal(size=(2, 3, 4, 2))
    layer = bilinear(size)
    y = layer.forward(ops.convert_to_tensor(x))
    m = rng.normal(size=(3, *ops.shape(y)))
    dx = ops.convert_to_numpy(layer.vjp_input(ops.convert_to_tensor(m), x, y))
    assert dx.shape == (3, *x.shape)
    delta = tolerances.FINITE_DIFFERENCE_DELTA
    numerical = np.zeros((3, x.size))
    for j in range(x.size):
        step = np.zeros(x.size)
        step[j] = delta
        step = step.reshape(x.shape)
        up, down = (
            ops.convert_to_numpy(layer.forward(ops.convert_to_tensor(x + s))) for s in (step, -step)
        )
        numerical[:, j] = np.sum(m * (up - down), axis=(1, 2, 3, 4)) / (2 * delta)
    for v in range(3):
        err = tolerances.relative_error(dx[v].reshape(-1), numerical[v])
        assert err <= tolerances.FINITE_DIFFERENCE_RTOL, v


def test_check_layer_in_every_mode(tmp_path):
    """Float64 routes, finite differences, fit (eager, graph, XLA), mixed precision, the
    ``.keras`` round trip and the per-example rows."""
    check_layer(
        lambda dtype: UpSampling2D((2, 3), interpolation="bilinear", dtype=dtype),
        (3, 2, 2),
        tmp_dir=str(tmp_path),
    )


def test_an_input_of_unknown_size_gets_matrices_of_its_runtime_size():
    """A model built for ``(None, None, C)`` images runs on two sizes; each equals NumPy's."""
    model = keras.Sequential([keras.Input((None, None, 2), dtype="float64"), bilinear((2, 3))])
    assert model.output_shape == (None, None, None, 2)
    rng = np.random.default_rng(4)
    for shape in [(3, 2), (5, 4)]:
        x = rng.normal(size=(2, *shape, 2))
        m = rng.normal(size=numpy_upsampling(x, (2, 3)).shape)
        y, dx = input_gradient(model, x, m)
        a_h, a_w = numpy_matrix(shape[0], 2), numpy_matrix(shape[1], 3)
        assert tolerances.relative_error(y, numpy_upsampling(x, (2, 3))) <= RTOL64
        expected = np.einsum("ih,bijc,jw->bhwc", a_h, m, a_w)
        assert tolerances.relative_error(dx, expected) <= RTOL64


def test_traced_for_unknown_sizes_and_under_xla_on_tensorflow(backend):
    """One ``tf.function`` traced for images of unknown height and width (and one compiled by
    XLA) builds the matrices from the runtime size: values and gradients equal NumPy's."""
    if backend != "tensorflow":
        pytest.skip("JAX traces every call at its concrete shape: no size is unknown there")
    import tensorflow as tf

    layer = bilinear((3, 2))

    def run(x, m):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return y, tape.gradient(y, x, output_gradients=m)

    spec = [tf.TensorSpec((None, None, None, 2), tf.float64)] * 2
    rng = np.random.default_rng(5)
    for shape, jit in [((2, 3), False), ((4, 1), True)]:
        x = rng.normal(size=(2, *shape, 2))
        m = rng.normal(size=numpy_upsampling(x, (3, 2)).shape)
        y, dx = tf.function(run, input_signature=spec, jit_compile=jit)(x, m)
        a_h, a_w = numpy_matrix(shape[0], 3), numpy_matrix(shape[1], 2)
        assert tolerances.relative_error(y, numpy_upsampling(x, (3, 2))) <= RTOL64
        assert tolerances.relative_error(dx, np.einsum("ih,bijc,jw->bhwc", a_h, m, a_w)) <= (RTOL64)


def test_a_model_with_it_trains_under_gradient_check():
    """``Conv2D -> UpSampling2D(bilinear) -> Flatten -> Dense`` trains by ``model.fit`` with
    ``GradientCheck`` on: no mismatch, every variable checked against the float64 reference
    route to 1e-12, and the loss goes down."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            layers.Conv2D(3, 3, padding="same", activation="tanh", name="conv"),
            UpSampling2D(2, interpolation="bilinear", name="up"),
            layers.Flatten(),
            layers.Dense(3, name="last"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.05), losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(32, 4, 4, 2)).astype("float32"), rng.integers(0, 3, size=32)
    check = GradientCheck((x[:16], y[:16]), every_n_batches=2, verbose=0)
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[check])
    assert history.history["grad_check_mismatches"] == [0, 0, 0]
    assert history.history["loss"][-1] < history.history["loss"][0]
    checked = {r.variable for r in check.records if r.witness == REFERENCE}
    assert checked == {v.path for v in model.trainable_variables}
    for r in check.records:
        assert r.passed, r
        if r.witness == REFERENCE:
            assert r.float64_rel_err <= RTOL64, r


@pytest.mark.parametrize("mode", ["Bilinear", "BILINEAR", "bilinear"])
def test_configuration_round_trips_and_matches_stock(mode):
    """``interpolation`` is read case-insensitively, as Keras does, and ``get_config`` equals the
    stock layer's and round-trips."""
    ours = UpSampling2D((2, 3), interpolation=mode)
    stock = keras.layers.UpSampling2D((2, 3), interpolation=mode)
    config = ours.get_config()
    assert ours.interpolation == "bilinear"
    for key, value in stock.get_config().items():
        if key not in ("name", "dtype"):
            assert config[key] == value, key
    again = UpSampling2D.from_config(config)
    assert again.get_config() == config and again.interpolation == "bilinear"


@pytest.mark.parametrize("mode", ["bicubic", "lanczos3", "area", "linear", 3])
def test_other_interpolations_name_the_argument_and_the_supported_modes(mode):
    pattern = rf"'nearest' or 'bilinear', got interpolation={re.escape(repr(mode))}\."
    with pytest.raises(ValueError, match=pattern):
        UpSampling2D(interpolation=mode)
