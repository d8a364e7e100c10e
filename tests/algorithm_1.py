"""Algorithm 1 (``tf_jacbp.jacobian``) through a model, against autodiff of the model's reference
route: the check the layer test modules share for a layer inside a model."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import tf_jacbp
from tf_jacbp import jacobian, tolerances

RTOL64 = tolerances.rtol("float64")


def assert_algorithm_1_equals_autodiff(model: keras.Model, x: tf.Tensor, y: tf.Tensor) -> list:
    """``parameter_jacobian(model, x)`` and the mean squared error's ``per_example_gradients``
    equal ``tape.jacobian`` in ``reference_mode()``, to float64 tolerance, and so do the norms of
    DP-SGD's first pass, ``per_example_gradient_norms(per_variable=True)`` (each layer's
    ``squared_norms`` formula, or the squares of its per-sample products).

    ``model``: float64, outputs ``(batch, outputs)``; ``x``: ``(batch, ...)``; ``y``: the targets,
    ``(batch, outputs)``. Autodiff's block of each variable, ``(batch, outputs, *shape)``, is
    flattened in ``Vec`` order (its axes reversed) and the blocks are concatenated in theta order,
    as ``parameter_jacobian`` lays them out. Returns ``jacobian.parameter_variables(model)``.
    """
    variables = jacobian.parameter_variables(model)
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            out = model(x)
    batch, outputs = out.shape
    blocks = tape.jacobian(out, variables)
    expected = np.concatenate(
        [
            np.asarray(b)
            .transpose(0, 1, *range(b.shape.rank - 1, 1, -1))
            .reshape(batch, outputs, -1)
            for b in blocks
        ],
        axis=-1,
    )
    assert tolerances.relative_error(jacobian.parameter_jacobian(model, x), expected) <= RTOL64

    per_example = jacobian.per_example_gradients(model, x, y, loss="mse", flatten=False)
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            losses = keras.losses.mean_squared_error(y, model(x))
    autodiff = tape.jacobian(losses, variables)
    for got, want in zip(per_example, autodiff, strict=True):
        assert tolerances.relative_error(got, want) <= RTOL64

    norms = jacobian.per_example_gradient_norms(model, x, y, loss="mse", per_variable=True)
    batch = int(x.shape[0])
    expected = np.stack(
        [np.linalg.norm(np.reshape(g, (batch, -1)), axis=1) for g in autodiff], axis=1
    )
    assert tolerances.relative_error(norms, expected) <= RTOL64
    return variables
