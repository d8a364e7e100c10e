"""``tf_jacbp.jacobian`` and ``tf_jacbp.geometry`` on every backend.

``parameter_jacobian``, ``per_example_gradients`` and ``per_example_gradient_norms`` of a small
image model against the backend's autodiff through stock ops (``tf.GradientTape`` on TensorFlow,
``jax.jacrev`` on JAX, both through ``tf_jacbp.backend.jacobians``), eagerly and compiled, in
float64 (<= 1e-12) and float32; the window geometry against the backend's stock ``Conv1D``.

The model, ``Dense(sigmoid) -> Conv2D(relu) -> MaxPooling2D -> Flatten -> Dense``, with a softmax
cross entropy on its logits, uses only ops Keras computes in float64 on JAX (not ``tanh`` or
``mean``, which it computes in float32 there). The reference loss is our own float64
``logsumexp(z) - z_y`` in ``keras.ops`` (max, exp, log, sum: float64 on both backends), not a
stock Keras loss; its per-sample gradients are the rows of the Jacobian of the per-sample losses
through the reference route (``reference_mode``, stock ops only) and ``model.stateless_call``.
"""

import keras
import numpy as np
import pytest
from keras import ops

from tf_jacbp import backend, geometry, jacobian, layers, losses, tolerances
from tf_jacbp.layout import vec_parameter_batch
from tf_jacbp.mode import reference_mode

BATCH, CLASSES = 3, 5
LABELS = np.array([0, 3, 4])


def image_model(dtype: str) -> keras.Sequential:
    """Dense (on the channels) + Conv2D + max pooling + Flatten + Dense, logits ``(batch, 5)``."""
    return keras.Sequential(
        [
            keras.Input((6, 6, 2), dtype=dtype),
            layers.Dense(3, activation="sigmoid", dtype=dtype),
            layers.Conv2D(4, 3, padding="same", activation="relu", dtype=dtype),
            layers.MaxPooling2D(2, dtype=dtype),
            layers.Flatten(dtype=dtype),
            layers.Dense(CLASSES, dtype=dtype),
        ]
    )


def images(dtype: str, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(BATCH, 6, 6, 2)).astype(dtype)


def softmax_cross_entropy(z, labels):
    """``l_i = logsumexp(z_i) - z_i[y_i]`` ``(batch,)`` in ``keras.ops`` (max, exp, log, sum:
    float64 in float64 on both backends)."""
    top = ops.max(z, axis=-1, keepdims=True)
    lse = ops.log(ops.sum(ops.exp(z - top), axis=-1)) + top[:, 0]
    return lse - ops.sum(z * ops.one_hot(labels, CLASSES, dtype=z.dtype), axis=-1)


def stock_call(model, x):
    """``f(*trainable values) = model(x)`` by the reference route (stock ops only)."""
    fixed = [v.value for v in model.non_trainable_variables]

    def call(*values):
        with reference_mode():
            return model.stateless_call(list(values), fixed, x)[0]

    return call


def reference_jacobian(model, x) -> np.ndarray:
    """``J_theta z[L]`` ``(batch, n_out, n_params)`` by the backend's autodiff (``jacrev`` on
    JAX, ``GradientTape.jacobian`` on TensorFlow), columns in theta order (``Vec``)."""
    values = [v.value for v in model.trainable_variables]
    blocks = backend.jacobians(stock_call(model, x), values)
    return np.concatenate(
        [
            ops.convert_to_numpy(vec_parameter_batch(ops.reshape(j, (-1, *v.shape)))).reshape(
                BATCH, CLASSES, -1
            )
            for j, v in zip(blocks, model.trainable_variables, strict=True)
        ],
        axis=-1,
    )


def reference_gradients(model, x, labels) -> np.ndarray:
    """``(batch, n_params)``: sample ``i``'s gradient of its cross entropy, in theta order, by
    the backend's autodiff: row ``i`` of the Jacobian of the per-sample losses ``(batch,)``
    (sample ``i``'s loss depends on ``x_i`` alone: the model couples no samples)."""
    values = [v.value for v in model.trainable_variables]
    call = stock_call(model, x)
    blocks = backend.jacobians(lambda *t: softmax_cross_entropy(call(*t), labels), values)
    return np.concatenate([ops.convert_to_numpy(vec_parameter_batch(j)) for j in blocks], axis=1)


def cross_entropy(dtype: str) -> losses.SparseCategoricalCrossentropy:
    return losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype)


def assert_close(got, expected, dtype: str) -> None:
    got = ops.convert_to_numpy(got)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert keras.backend.standardize_dtype(got.dtype) == dtype
    err = tolerances.relative_error(got, expected, dtype)
    assert err <= tolerances.rtol(dtype), f"relative error {err:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parameter_jacobian_is_autodiffs(dtype):
    if dtype == "float64":
        backend.require_float64("this float64 comparison")
    model, x = image_model(dtype), images(dtype)
    expected = reference_jacobian(model, x)
    assert_close(jacobian.parameter_jacobian(model, x), expected, dtype)
    blocks = jacobian.parameter_jacobian(model, x, blocks=True)
    assert list(blocks) == [v.path for v in model.trainable_variables]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_per_example_gradients_and_norms_are_autodiffs(dtype):
    if dtype == "float64":
        backend.require_float64("this float64 comparison")
    model, x = image_model(dtype), images(dtype)
    expected = reference_gradients(model, x, LABELS)
    loss = cross_entropy(dtype)
    assert_close(jacobian.per_example_gradients(model, x, LABELS, loss=loss), expected, dtype)
    per_variable = jacobian.per_example_gradients(model, x, LABELS, loss=loss, flatten=False)
    flat = np.concatenate(
        [ops.convert_to_numpy(vec_parameter_batch(g)) for g in per_variable], axis=1
    )
    assert_close(flat, expected, dtype)
    norms = jacobian.per_example_gradient_norms(model, x, LABELS, loss=loss)
    assert_close(norms, np.linalg.norm(expected, axis=1), dtype)
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    pieces = np.split(expected, np.cumsum(sizes)[:-1], axis=1)
    assert_close(
        jacobian.per_example_gradient_norms(model, x, LABELS, loss=loss, per_variable=True),
        np.stack([np.linalg.norm(p, axis=1) for p in pieces], axis=1),
        dtype,
    )


def test_per_example_gradient_agrees_with_finite_differences():
    """Sample 1's gradient, read through ``unflatten_parameters`` (theta's layout), against
    central differences of its loss along a random direction, in float64."""
    backend.require_float64("the finite differences")
    model, x = image_model("float64"), images("float64")
    g = ops.convert_to_numpy(
        jacobian.per_example_gradients(model, x, LABELS, loss=cross_entropy("float64"))
    )[1]
    theta = ops.convert_to_numpy(jacobian.flatten_parameters(model))
    direction = np.random.default_rng(3).normal(size=theta.shape)

    def loss_at(t):
        jacobian.unflatten_parameters(model, t, assign=True)
        z = model(x[1:2])
        return float(ops.convert_to_numpy(softmax_cross_entropy(z, LABELS[1:2]))[0])

    eps = 1e-6
    slope = (loss_at(theta + eps * direction) - loss_at(theta - eps * direction)) / (2 * eps)
    loss_at(theta)
    assert abs(slope - g @ direction) <= 1e-7 * max(1.0, abs(slope)), (slope, g @ direction)


def test_the_public_functions_run_inside_a_compiled_step():
    """``parameter_jacobian``, ``per_example_gradients`` and ``per_example_gradient_norms``
    traced into one compiled function (``tf.function`` on TensorFlow; ``jax.jit`` over the
    variables' values in a ``StatelessScope`` on JAX, as Keras' compiled steps call a model)
    give the eager results; after new weights are assigned, the same compiled function gives the
    new model's (the weights are read at each call, not frozen at the trace)."""
    backend.require_float64("this float64 comparison")
    model, x = image_model("float64"), images("float64")
    loss = cross_entropy("float64")

    def step(x, labels):
        return (
            jacobian.parameter_jacobian(model, x),
            jacobian.per_example_gradients(model, x, labels, loss=loss),
            jacobian.per_example_gradient_norms(model, x, labels, loss=loss),
        )

    compiled = backend.compiled_model_function(step, lambda: model.variables)
    for _ in range(2):
        expected = reference_gradients(model, x, LABELS)
        jac, grads, norms = compiled(x, LABELS)
        assert_close(jac, reference_jacobian(model, x), "float64")
        assert_close(grads, expected, "float64")
        assert_close(norms, np.linalg.norm(expected, axis=1), "float64")
        for v in model.trainable_variables:
            v.assign(ops.convert_to_numpy(v.value) * 1.5 + 0.1)


def test_the_cached_compiled_norms_follow_the_weights():
    """Called eagerly, ``per_example_gradient_norms`` runs a compiled function cached per model;
    assigning new weights (as an optimizer step does) must change what it returns."""
    backend.require_float64("this float64 comparison")
    model, x = image_model("float64"), images("float64")
    loss = cross_entropy("float64")
    first = ops.convert_to_numpy(jacobian.per_example_gradient_norms(model, x, LABELS, loss=loss))
    for v in model.trainable_variables:
        v.assign(ops.convert_to_numpy(v.value) * 0.5 - 0.2)
    second = jacobian.per_example_gradient_norms(model, x, LABELS, loss=loss)
    expected = np.linalg.norm(reference_gradients(model, x, LABELS), axis=1)
    assert_close(second, expected, "float64")
    assert np.abs(first - expected).max() > 1e-3 * expected.max()


def test_a_sparse_input_is_refused_naming_the_conversion(backend):
    """The backend's sparse array (a ``tf.SparseTensor`` or a JAX ``BCOO``) is refused with the
    conversion that makes it dense: the Jacobian formulas are dense."""
    model = keras.Sequential([keras.Input((3,)), layers.Dense(2)])
    x = np.array([[1.0, 0.0, 2.0]], dtype="float32")
    if backend == "jax":
        from jax.experimental import sparse

        sparse_x, fix = sparse.BCOO.fromdense(x), r"x\.todense\(\)"
    else:
        import tensorflow as tf

        sparse_x, fix = tf.sparse.from_dense(x), r"tf\.sparse\.to_dense\(x\)"
    for call in (
        lambda: jacobian.parameter_jacobian(model, sparse_x),
        lambda: jacobian.per_example_gradient_norms(model, sparse_x, np.zeros((1, 2)), "mse"),
        lambda: jacobian.layer_jacobians(model, sparse_x),
    ):
        with pytest.raises(TypeError, match=f"dense array or tensor.*{fix}"):
            call()


@pytest.mark.filterwarnings("ignore:.*does not support masking")
def test_a_masked_model_is_refused_naming_autodiff():
    """A model with a Keras mask has no per-layer walk: the error names the backend's autodiff
    as the way to its Jacobians."""
    x_in = keras.Input((4,), dtype="int32")
    h = layers.Embedding(10, 3, mask_zero=True)(x_in)
    model = keras.Model(x_in, layers.Dense(2)(layers.Flatten()(h)))
    with pytest.raises(ValueError, match="mask_zero=True.*jax.jacrev"):
        jacobian.parameter_jacobian(model, np.ones((2, 4), dtype="int32"))


def test_layer_jacobians_chain_to_autodiffs_jacobians():
    """Step 2's factors of one sample multiply out to the Jacobians: ``D2 W2^T D1 W1^T`` is
    ``J_x z`` (the backend's autodiff through stock ops) and ``D2 W2^T D1 [I (x) a^T | I]``
    the first layer's block of ``parameter_jacobian``, in float64."""
    backend.require_float64("this float64 comparison")
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            layers.Dense(5, activation="sigmoid", dtype="float64", name="first"),
            layers.Dense(3, dtype="float64", name="second"),
        ]
    )
    x = np.random.default_rng(2).normal(size=(1, 4))
    f = {k: ops.convert_to_numpy(v) for k, v in jacobian.layer_jacobians(model, x[0]).items()}
    head = f["second: D"] @ f["second: W^T"] @ f["first: D"]

    def z(x):
        with reference_mode():
            return model(x)

    (j_x,) = backend.jacobians(z, [x])
    assert_close(head @ f["first: W^T"], ops.convert_to_numpy(j_x)[0, :, 0], "float64")
    block = ops.convert_to_numpy(jacobian.parameter_jacobian(model, x))[0, :, :25]
    assert_close(head @ f["first: [I (x) a^T | I]"], block, "float64")


def test_a_float64_model_without_x64_is_refused_naming_the_switch(backend, monkeypatch):
    """On JAX a float64 model computes in float32 unless x64 is enabled: the functions refuse it
    and say how to enable x64, instead of returning float32 numbers for a float64 model."""
    if backend != "jax":
        pytest.skip("TensorFlow always computes float64 in float64: there is no switch to name")
    from tf_jacbp.backend import jax as jax_backend

    monkeypatch.setattr(jax_backend, "float64_enabled", lambda: False)
    model, x = image_model("float64"), images("float64")
    for call in (
        lambda: jacobian.parameter_jacobian(model, x),
        lambda: jacobian.per_example_gradients(model, x, LABELS, loss=cross_entropy("float64")),
        lambda: jacobian.per_example_gradient_norms(model, x, LABELS, cross_entropy("float64")),
    ):
        with pytest.raises(RuntimeError, match="jax_enable_x64"):
            call()


@pytest.mark.parametrize("padding", ["valid", "same", "causal"])
@pytest.mark.parametrize(
    "size, kernel, stride, dilation",
    [(7, 3, 1, 1), (8, 2, 2, 1), (9, 3, 1, 2), (6, 4, 3, 1), (5, 4, 3, 1)],
)
def test_axis_taps_read_what_the_backends_conv1d_reads(padding, size, kernel, stride, dilation):
    """Each output of stock ``keras.layers.Conv1D`` with a one-hot kernel tap reads the input at
    ``geometry.axis_taps`` (0 where the tap falls in the padding), on this backend: JAX's
    ``"SAME"`` padding splits the zeros as TensorFlow's does (the extra one after)."""
    x = np.arange(1, size + 1, dtype="float64").reshape(1, size, 1)
    taps = geometry.axis_taps(size, kernel, stride, padding, dilation)
    for t in range(kernel):
        conv = keras.layers.Conv1D(
            1, kernel, stride, padding, dilation_rate=dilation, use_bias=False, dtype="float64"
        )
        conv.build((None, size, 1))
        one_hot = np.zeros((kernel, 1, 1))
        one_hot[t] = 1.0
        conv.set_weights([one_hot])
        y = ops.convert_to_numpy(conv(x))[0, :, 0]
        np.testing.assert_array_equal(y, np.where(taps[:, t] >= 0, taps[:, t] + 1, 0))
        assert len(y) == geometry.output_size(size, kernel, stride, padding, dilation)


def mlp(dtype: str | None = "float64", out_dtype: str | None = None) -> keras.Sequential:
    return keras.Sequential(
        [
            keras.Input((4,)),
            layers.Dense(5, activation="elu", dtype=dtype),
            layers.Dense(3, dtype=out_dtype or dtype),
        ]
    )


def test_cached_norms_follow_a_new_compiled_loss_and_a_new_activation():
    """The compiled norms cached per model are traced again when what they froze changes: the
    compiled loss, and an activation set after the first call (else stale numbers)."""
    backend.require_float64("this float64 comparison")
    model = mlp()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))

    def fresh(loss):  # from the per-example gradients: no cache
        rows = ops.convert_to_numpy(jacobian.per_example_gradients(model, x, y, loss=loss))
        return np.linalg.norm(rows, axis=1)

    model.compile(loss=losses.MeanSquaredError(dtype="float64"))
    first = ops.convert_to_numpy(jacobian.per_example_gradient_norms(model, x, y))
    model.compile(loss=keras.losses.MeanAbsoluteError(dtype="float64"))
    after = jacobian.per_example_gradient_norms(model, x, y)
    assert_close(after, fresh(keras.losses.MeanAbsoluteError(dtype="float64")), "float64")
    assert not np.allclose(ops.convert_to_numpy(after), first)
    model.layers[0].activation = "sigmoid"
    again = jacobian.per_example_gradient_norms(model, x, y)
    assert_close(again, fresh(keras.losses.MeanAbsoluteError(dtype="float64")), "float64")
    assert not np.allclose(ops.convert_to_numpy(again), ops.convert_to_numpy(after))


def test_mixed_precision_products_match_the_float32_twin():
    """Keras' mixed-precision layout (float16 compute, a float32 output layer): the products
    come back in float32 and agree with a float32 twin to the float16 tolerance."""
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = mlp(dtype=None, out_dtype="float32")
    finally:
        keras.config.set_dtype_policy("float32")
    twin = mlp(dtype="float32")
    twin.set_weights(model.get_weights())
    x = np.random.default_rng(1).normal(size=(6, 4)).astype("float32")
    y = np.array([0, 1, 2, 0, 1, 2])
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    for f in (
        lambda m: jacobian.per_example_gradients(m, x, y, loss=loss),
        lambda m: jacobian.per_example_gradient_norms(m, x, y, loss=loss),
        lambda m: jacobian.parameter_jacobian(m, x[:2]),
    ):
        got, want = f(model), ops.convert_to_numpy(f(twin))
        assert keras.backend.standardize_dtype(got.dtype) == "float32"
        err = tolerances.relative_error(ops.convert_to_numpy(got), want, "float16")
        assert err <= tolerances.rtol("float16"), err


def test_a_label_out_of_range_stops_the_norms_called_eagerly():
    """Called eagerly, the norms run compiled; a label out of range must still stop them (on
    TensorFlow the compiled assertion raises; on JAX, where the compiled loss is NaN at the bad
    label and its gradient zero, the loss is checked again eagerly), never zero norms."""
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3)])
    x, loss = np.ones((2, 4), "float32"), cross_entropy("float32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(jacobian.per_example_gradient_norms(model, x, [0, 2], loss)) > 0,
        True,
    )
    for call in (
        lambda: jacobian.per_example_gradient_norms(model, x, [0, 7], loss),
        lambda: jacobian.per_example_gradients(model, x, [0, 7], loss),
    ):
        with pytest.raises(Exception, match=r"y_true must hold integer class indices.*7"):
            call()
