"""Every public layer's documented ``backward`` is the one training applies.

For each layer class of ``tf_jacbp.layers`` a subclass overrides the documented backward pass
(``backward``; ``batch_backward`` for BatchNormalization's training map) with its result 1% off:
the first parameter gradient for a layer with trainable parameters, the input gradient otherwise.
Then

* ``fit``'s update changes by exactly that 1%: the planted variable's update, or the update of the
  variable before the layer (its gradient is linear in the layer's input gradient), is 1.01 times
  the unmodified layer's;
* ``GradientCheck`` stops ``fit`` with ``GradientMismatchError`` on the planted model.

All planted-bug layers of the test suite live in this module.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tf_jacbp import layers
from tf_jacbp.callbacks import GradientCheck, GradientMismatchError

OFF = 1.01


def one_percent_off(cls: type, method: str = "backward", into: str = "dx") -> type:
    """``cls`` with ``method``'s result 1% off: ``into="param"`` scales the first parameter
    gradient, ``"dx"`` the input gradient (every input's, for ``Add``)."""

    def off(self, *args):
        dx, grads = getattr(super(planted, self), method)(*args)
        if into == "param":
            return dx, [OFF * grads[0], *grads[1:]]
        return ([OFF * d for d in dx] if isinstance(dx, list) else OFF * dx), grads

    planted = type(f"OnePercentOff{cls.__name__}", (cls,), {method: off})
    return planted


def vector_model(middle: keras.layers.Layer) -> keras.Model:
    """``Input(6) -> Dense(4, tanh) "first" -> middle -> Dense(3) "last"``."""
    return keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(4, activation="tanh", name="first"),
            middle,
            layers.Dense(3, name="last"),
        ]
    )


def image_model(middle: keras.layers.Layer | None, flatten: keras.layers.Layer | None = None):
    """``Input(6, 6, 1) -> Conv2D(2, 3, same, tanh) "first" -> middle -> Flatten -> Dense(3)``."""
    stack = [
        keras.Input((6, 6, 1)),
        layers.Conv2D(2, 3, padding="same", activation="tanh", name="first"),
    ]
    stack += [middle] if middle is not None else []
    stack += [flatten or layers.Flatten(), layers.Dense(3, name="last")]
    return keras.Sequential(stack)


def residual_model(add: keras.layers.Layer) -> keras.Model:
    """``first -> add([Dense(4, relu)(h), h]) -> last``."""
    x = keras.Input((6,))
    h = layers.Dense(4, activation="tanh", name="first")(x)
    r = add([layers.Dense(4, activation="relu", name="middle")(h), h])
    return keras.Model(x, layers.Dense(3, name="last")(r))


def frozen_batchnorm(cls):
    layer = cls(name="middle")
    layer.trainable = False  # training=True then runs the inference map, as in Keras
    return layer


# name: (model from the layer class, layer class, planted method, where the 1% goes, variable
# whose update shows it).
CASES = {
    "Dense": (
        lambda c: vector_model(c(4, activation="relu", name="middle")),
        layers.Dense,
        "backward",
        "param",
        "middle/kernel",
    ),
    "Conv2D": (
        lambda c: image_model(c(2, 3, activation="relu", name="middle")),
        layers.Conv2D,
        "backward",
        "param",
        "middle/kernel",
    ),
    "MaxPooling2D": (
        lambda c: image_model(c(2, name="middle")),
        layers.MaxPooling2D,
        "backward",
        "dx",
        "first/kernel",
    ),
    "AveragePooling2D": (
        lambda c: image_model(c(2, name="middle")),
        layers.AveragePooling2D,
        "backward",
        "dx",
        "first/kernel",
    ),
    "BatchNormalization (training)": (
        lambda c: vector_model(c(name="middle")),
        layers.BatchNormalization,
        "batch_backward",
        "param",
        "middle/gamma",
    ),
    "BatchNormalization (inference)": (
        lambda c: vector_model(frozen_batchnorm(c)),
        layers.BatchNormalization,
        "backward",
        "dx",
        "first/kernel",
    ),
    "Dropout": (
        lambda c: vector_model(c(0.3, seed=3, name="middle")),
        layers.Dropout,
        "backward",
        "dx",
        "first/kernel",
    ),
    "Flatten": (
        lambda c: image_model(None, c(name="middle")),
        layers.Flatten,
        "backward",
        "dx",
        "first/kernel",
    ),
    "Add": (
        lambda c: residual_model(c(name="middle_add")),
        layers.Add,
        "backward",
        "dx",
        "first/kernel",
    ),
    "Activation": (
        lambda c: vector_model(c("tanh", name="middle")),
        layers.Activation,
        "backward",
        "dx",
        "first/kernel",
    ),
}
for _name in (
    "ReLU",
    "Sigmoid",
    "Tanh",
    "LeakyReLU",
    "ELU",
    "Softplus",
    "GELU",
    "Swish",
    "Softmax",
):
    CASES[_name] = (
        lambda c: vector_model(c(name="middle")),
        getattr(layers, _name),
        "backward",
        "dx",
        "first/kernel",
    )


def test_every_public_layer_class_has_a_case():
    public = {
        name
        for name in layers.__all__
        if isinstance(getattr(layers, name), type)
        and issubclass(getattr(layers, name), layers.JacobianLayer)
        and name != "JacobianLayer"
    }
    covered = {case[1].__name__ for case in CASES.values()}
    assert public == covered, public ^ covered


def data(model, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *model.inputs[0].shape[1:])).astype("float32")
    return x, rng.normal(size=(n, 3)).astype("float32")


def update(build, cls, variable):
    """One SGD step (rate 1) of ``fit`` from seed 0: the update of ``variable``.

    Eagerly, to save the tracing: ``fit`` calls the layers' ``call`` in every mode, and
    ``tests/test_route.py`` and the harness check compiled ``fit`` steps."""
    keras.utils.set_random_seed(0)
    model = build(cls)
    model.compile(keras.optimizers.SGD(1.0), "mse", run_eagerly=True)
    v = next(v for v in model.trainable_variables if v.path.endswith(variable))
    before = np.asarray(v).copy()
    x, y = data(model, 8, seed=1)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return before - np.asarray(v)


@pytest.mark.parametrize("name", list(CASES))
def test_a_one_percent_error_in_backward_changes_fit_and_is_caught(name):
    build, cls, method, into, variable = CASES[name]
    planted = one_percent_off(cls, method, into)
    plain, off = update(build, cls, variable), update(build, planted, variable)
    assert np.abs(plain).max() > 1e-4, "the check needs a nonzero update"
    np.testing.assert_allclose(off, OFF * plain, rtol=1e-4, atol=1e-7)

    keras.utils.set_random_seed(0)
    model = build(planted)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x, y = data(model, 16, seed=2)
    check = GradientCheck(data(model, 8, seed=3), every_n_batches=1, verbose=0)
    with pytest.raises(GradientMismatchError):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[check])
