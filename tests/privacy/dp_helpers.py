"""Models, data and measurements the DP-SGD tests share."""

import keras
import numpy as np
import tensorflow as tf

from tf_jacbp import layers, losses, privacy

F64 = "float64"
LOSS = losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)


def mlp(dtype=F64, name=None):
    return keras.Sequential(
        [
            keras.Input((5,), dtype=dtype),
            layers.Dense(
                7, activation="tanh", dtype=dtype, name=f"{name}_hidden" if name else None
            ),
            layers.Dense(4, dtype=dtype, name=f"{name}_out" if name else None),
        ]
    )


def data(model, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *model.inputs[0].shape[1:]))
    return tf.constant(x), tf.constant(rng.integers(0, 4, size=batch))


def flat(arrays):
    return np.concatenate([np.ravel(a) for a in arrays])


def step_noise(model, x, y, lr, batch=None):
    """The noise a DPModel's train step adds to the clipped sum, read off one SGD(lr) step:
    ``w1 = w0 - lr (sum + z) / B'``, with the clipped sum from a noise-free ``clipped_gradients``
    at ``w0`` (the weights are set back; the noise generator's state is not a weight)."""
    w0 = model.get_weights()
    model.train_on_batch(x, y)
    w1 = model.get_weights()
    model.set_weights(w0)
    clean, _ = privacy.clipped_gradients(
        model, x, y, model.l2_norm_clip, 0.0, loss=LOSS, expected_batch_size=batch
    )
    model.set_weights(w1)
    divisor = batch if batch is not None else len(x)
    return (flat(w0) - flat(w1)) / lr * divisor - flat(clean) * divisor
