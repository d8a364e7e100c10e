"""What the benchmarks time: seeded models, random batches, the plain batch gradient, and a
compiled tf_jacbp model beside its stock twin."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from benchmarks.twins import stock_twin
from tf_jacbp import jacobian, losses, models


def lenet(name: str) -> keras.Model:
    """``models.lenet5()`` for ``"lenet5"``, else ``models.lenet_100_300_10()``, seeded with 0."""
    keras.utils.set_random_seed(0)
    return models.lenet5() if name == "lenet5" else models.lenet_100_300_10()


def random_batch(model: keras.Model, batch: int) -> tuple[tf.Tensor, tf.Tensor]:
    """``(x, y)``: ``batch`` uniform inputs of the model's input shape and labels in 0..9."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(batch, *model.inputs[0].shape[1:])).astype("float32")
    return tf.constant(x), tf.constant(rng.integers(0, 10, size=batch))


def batch_gradient(model: keras.Model, loss: keras.losses.Loss) -> Callable:
    """The computation the per-example ones are measured against: one batch gradient,
    ``tape.gradient`` of the mean loss with respect to the model's parameters, compiled."""
    variables = jacobian.parameter_variables(model)

    @tf.function
    def plain(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x))
        return tape.gradient(value, variables)

    return plain


def compiled_pair(
    make_model: Callable[[], keras.Model], jit_compile: bool, metrics: Sequence[str] = ()
) -> tuple[keras.Model, keras.Model]:
    """A tf_jacbp model (``make_model()``, seeded with 0) and its stock twin: same initial
    weights, each compiled with Adam(1e-3) and its own sparse cross entropy from logits."""
    keras.utils.set_random_seed(0)
    ours = make_model()
    stock = stock_twin(ours)
    for model, loss in (
        (ours, losses.SparseCategoricalCrossentropy(from_logits=True)),
        (stock, keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
    ):
        model.compile(
            keras.optimizers.Adam(1e-3),
            loss,
            metrics=list(metrics) or None,
            jit_compile=jit_compile,
        )
    return ours, stock
