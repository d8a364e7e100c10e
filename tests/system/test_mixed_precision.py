"""LeNet-100-300-10 under ``mixed_float16`` and ``mixed_bfloat16``.

Under a mixed policy the variables stay float32 and the layers compute in the half-precision
dtype; tf_jacbp's backward passes then compute in that dtype too, and casting the float32 variable
to it inside ``call`` is differentiated by TensorFlow, so float32 gradients reach the optimizer.
Checked here: the dtypes, Keras' loss scaling (auto-applied by ``compile`` for ``mixed_float16``),
that training lowers the loss, and that the Jacobian route agrees with the reference route run
under the same policy, to ``tolerances.rtol`` of the compute dtype (float16 or bfloat16).
``tests/conftest.py`` resets the global policy after each test.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_jacbp
from tf_jacbp import losses, tolerances
from tf_jacbp.callbacks import GradientCheck

COMPUTE_DTYPE = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
POLICIES = list(COMPUTE_DTYPE)

N_SAMPLES, BATCH_SIZE = 256, 32
# float16 matmuls are slow on CPU (about 10x bfloat16's here): the training test uses fewer samples.
N_TRAIN, EPOCHS = 128, 4


@pytest.fixture(scope="module")
def data():
    """A fixed problem a linear map of the pixels decides, so that the loss can go down."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_SAMPLES, 28, 28)).astype("float32")
    y = np.argmax(x.reshape(N_SAMPLES, -1) @ rng.normal(size=(28 * 28, 10)), axis=1)
    return x, y.astype("int64")


def build(policy: str) -> keras.Model:
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    return tf_jacbp.models.lenet_100_300_10()


def loss_fn():
    return losses.SparseCategoricalCrossentropy(from_logits=True)


class RecordingSGD(keras.optimizers.SGD):
    """SGD that records the dtypes of the gradients and variables handed to ``apply``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, str]] = []

    def apply(self, grads, trainable_variables=None):
        variables = trainable_variables or self._trainable_variables
        self.seen += [(g.dtype.name, v.dtype) for g, v in zip(grads, variables, strict=True)]
        return super().apply(grads, trainable_variables)


def gradients(model: keras.Model, x, y, reference: bool) -> list[np.ndarray]:
    """Gradients of the mean loss w.r.t. the variables, Jacobian or reference route."""

    def loss():
        return loss_fn()(y, model(x, training=True))

    with tf.GradientTape() as tape:
        if reference:
            with tf_jacbp.reference_mode():
                value = loss()
        else:
            value = loss()
    grads = tape.gradient(value, model.trainable_variables)
    for g, v in zip(grads, model.trainable_variables, strict=True):
        assert g is not None, f"no gradient reaches {v.path}"
    return grads


@pytest.mark.parametrize("policy", POLICIES)
def test_layers_compute_in_half_precision_with_float32_variables(policy, data):
    x, _ = data
    model = build(policy)
    compute = COMPUTE_DTYPE[policy]
    for layer in model.layers:
        assert layer.dtype_policy.name == policy
        assert layer.compute_dtype == compute
    assert {v.dtype for v in model.weights} == {"float32"}
    assert model(x[:4]).dtype == compute


@pytest.mark.parametrize("policy", POLICIES)
def test_float32_gradients_reach_the_optimizer(policy, data):
    x, y = data
    model = build(policy)
    grads = gradients(model, x[:BATCH_SIZE], y[:BATCH_SIZE], reference=False)
    assert {g.dtype.name for g in grads} == {"float32"}

    inner = RecordingSGD(0.1)
    model.compile(optimizer=inner, loss=loss_fn())
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert model.optimizer.inner_optimizer is inner
    else:
        # bfloat16 has float32's exponent range: Keras does not scale the loss.
        assert model.optimizer is inner
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0)
    assert int(inner.iterations) == N_SAMPLES // BATCH_SIZE
    assert inner.seen, "RecordingSGD.apply was never called"
    assert set(inner.seen) == {("float32", "float32")}, inner.seen


def test_loss_scaling_skips_an_overflowing_step_and_halves_the_scale(data):
    x, y = data
    x, y = x[:BATCH_SIZE], y[:BATCH_SIZE]
    model = build("mixed_float16")
    # The gradient at the logits is scale * (softmax - onehot) / batch; float16 overflows above
    # 65504, so a scale of 2^40 (2^35 after the 1/32) makes it inf, while the scaled loss
    # (about 2.3 * 2^40) is still finite in float32.
    overflowing_scale = 2.0**40
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=overflowing_scale
    )
    model.compile(optimizer=optimizer, loss=loss_fn())
    before = model.get_weights()
    model.train_on_batch(x, y)
    assert float(optimizer.dynamic_scale) == overflowing_scale / 2
    assert int(optimizer.iterations) == 0
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)

    # A normal step: compile's own LossScaleOptimizer (initial scale 2^15) applies the
    # unscaled gradient, and the scale stays.
    model = build("mixed_float16")
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=loss_fn())
    optimizer = model.optimizer
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    scale = float(optimizer.initial_scale)
    expected = gradients(model, tf.constant(x), tf.constant(y), reference=False)
    before = model.get_weights()
    model.train_on_batch(x, y)
    assert float(optimizer.dynamic_scale) == scale
    assert int(optimizer.iterations) == 1
    for w0, w, g, v in zip(before, model.get_weights(), expected, model.weights, strict=True):
        # SGD with learning rate 1: the update is the unscaled gradient.
        err = tolerances.relative_error(w0 - w, g, "float16")
        assert err <= tolerances.rtol("float16"), f"{v.path}: update vs gradient {err:.3g}"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.slow
def test_loss_decreases_and_gradient_check_passes(policy, data):
    x, y = data
    model = build(policy)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_fn())
    check = GradientCheck(probe=(x[:64], y[:64]), every_n_batches=4, on_mismatch="raise", verbose=0)
    callbacks = [check]
    history = model.fit(
        x[:N_TRAIN],
        y[:N_TRAIN],
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    loss = history.history["loss"]
    assert np.all(np.isfinite(loss)), loss
    assert all(a > b for a, b in zip(loss, loss[1:], strict=False)), loss
    assert loss[-1] < 0.8 * loss[0], loss
    records = check.records
    # At the start, every 4 batches (once an epoch here) and at each epoch end.
    assert len({r.step for r in records}) >= EPOCHS + 1
    assert {r.tolerance_dtype for r in records} == {COMPUTE_DTYPE[policy]}
    assert {r.gradient_dtype for r in records} == {"float32"}
    assert all(r.passed for r in records), [r for r in records if not r.passed]


@pytest.mark.parametrize("policy", POLICIES)
def test_jacobian_route_agrees_with_reference_route_under_the_policy(policy, data):
    x, y = data
    model = build(policy)
    compute = COMPUTE_DTYPE[policy]
    xb, yb = tf.constant(x[:64]), tf.constant(y[:64])
    grads = gradients(model, xb, yb, reference=False)
    refs = gradients(model, xb, yb, reference=True)
    errors = {
        v.path: tolerances.relative_error(g, r, compute)
        for g, r, v in zip(grads, refs, model.trainable_variables, strict=True)
    }
    assert max(errors.values()) <= tolerances.rtol(compute), (
        f"{policy}: Jacobian route vs reference route, relative errors {errors} > "
        f"rtol({compute}) = {tolerances.rtol(compute)}"
    )
    assert all(np.any(np.asarray(r)) for r in refs)
