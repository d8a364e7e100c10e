"""``import tf_jacbp`` patches nothing of Keras; ``tf_jacbp.hooks.attach`` hooks one model only."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np

import tf_jacbp
from tf_jacbp import layers, privacy


def test_importing_tf_jacbp_leaves_keras_untouched():
    """In a fresh process: the methods of keras.Model and keras.optimizers.Optimizer are the
    same objects before and after importing every module of tf_jacbp, and a stock model trains
    with them."""
    code = """
import keras
names = ["make_train_function", "make_test_function", "make_predict_function"]
before = {n: getattr(keras.Model, n) for n in names}
apply = keras.optimizers.Optimizer.apply
import tf_jacbp, tf_jacbp.losses, tf_jacbp.privacy, tf_jacbp.callbacks, tf_jacbp.models
assert all(getattr(keras.Model, n) is before[n] for n in names), "keras.Model patched"
assert keras.optimizers.Optimizer.apply is apply, "Optimizer.apply patched"
import numpy as np
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
model.compile("sgd", "mse", jit_compile=True)
model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
assert "make_train_function" not in vars(model) and "apply" not in vars(model.optimizer)
print("untouched")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "untouched" in out.stdout


def test_attach_hooks_only_the_model_it_is_given():
    def model():
        m = keras.Sequential([keras.Input((3,)), layers.Dense(2)])
        m.compile(keras.optimizers.SGD(0.1), "mse")
        return m

    hooked, plain = tf_jacbp.hooks.attach(model()), model()
    x, y = np.ones((4, 3), "float32"), np.ones((4, 2), "float32")
    for m in (hooked, plain):
        m.fit(x, y, verbose=0)
    assert tf_jacbp.hooks.attached(hooked) and not tf_jacbp.hooks.attached(plain)
    assert "make_train_function" in vars(hooked) and "make_train_function" not in vars(plain)
    assert "apply" in vars(hooked.optimizer) and "apply" not in vars(plain.optimizer)
    assert tf_jacbp.hooks.attach(hooked) is hooked  # idempotent
    assert keras.Model.make_train_function is type(plain).make_train_function


def test_the_paper_models_and_dp_models_come_attached():
    assert tf_jacbp.hooks.attached(tf_jacbp.models.lenet_300_100())
    assert tf_jacbp.hooks.attached(tf_jacbp.models.resnet_mnist())
    plain = keras.Sequential([keras.Input((3,)), layers.Dense(2)])
    private = privacy.make_private(plain, l2_norm_clip=1.0, noise_multiplier=1.0, seed=0)
    assert tf_jacbp.hooks.attached(private) and not tf_jacbp.hooks.attached(plain)


def test_gradient_check_attaches_the_model_it_checks():
    """A model in a fit with GradientCheck is attached before Keras makes its train function:
    a reference-mode fit after a normal one retraces (the planted layer's doubled kernel
    gradient is on the Jacobian route only)."""
    from planted import WrongKernelGradient

    x, y = np.ones((8, 3), "float32"), np.zeros((8, 2), "float32")

    def update(model):
        model.set_weights(start)
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[check])
        return start[0] - model.get_weights()[0]

    model = keras.Sequential([keras.Input((3,)), WrongKernelGradient(2)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    start = model.get_weights()
    check = tf_jacbp.callbacks.GradientCheck((x, y), on_mismatch="log")
    update(model)
    assert tf_jacbp.hooks.attached(model)
    jacobian_step = update(model)
    with tf_jacbp.reference_mode():
        reference_step = update(model)
    np.testing.assert_allclose(jacobian_step, 2 * reference_step, rtol=1e-2)
