"""The activations and Table 1 losses the tests run, written without TensorFlow, so that the
TensorFlow suite (``tests/test_activation_contract.py``, ``tests/test_losses.py``) and the tests
of both backends (``tests/backends/``) share one list."""

from __future__ import annotations

import keras
import numpy as np

from tf_jacbp import activations, layers, losses

ACTIVATION_NAMES = list(activations._ACTIVATIONS)
# Configurations with other kinks than the defaults (the plain ReLU reads D from ``a`` alone).
CONFIGURED_ACTIVATIONS = {
    "relu(max_value, slope, threshold)": lambda: activations.ReLU(1.5, 0.1, 0.2),
    "relu(negative_slope)": lambda: activations.ReLU(negative_slope=0.25),
    "elu(alpha)": lambda: activations.ELU(alpha=0.7),
    "gelu(approximate)": lambda: activations.GELU(approximate=True),
    "celu(alpha)": lambda: activations.CELU(alpha=2.0),
}
ACTIVATIONS = {
    **{name: (lambda n=name: activations.get(n)) for name in ACTIVATION_NAMES},
    **CONFIGURED_ACTIVATIONS,
}
# Every kink of the registry and one float64 ulp either side, then drawn points.
KINKS = [-6.0, -3.0, -1.0, -0.5, -0.2, 0.0, 0.2, 0.5, 1.0, 1.5, 3.0, 6.0]


def activation_points(shape: tuple, seed: int = 0) -> np.ndarray:
    """``shape`` float64 values: the kinks and their neighbours first, then normal draws."""
    near = [v for p in KINKS for v in (np.nextafter(p, -np.inf), p, np.nextafter(p, np.inf))]
    size = int(np.prod(shape))
    drawn = 3 * np.random.default_rng(seed).normal(size=size)
    values = np.concatenate([near, [1e-300, -1e-300], drawn])[:size]
    return np.random.default_rng(seed + 1).permutation(values).reshape(shape)


def labels(kind: str, rng: np.random.Generator, batch: int, classes: int) -> np.ndarray:
    """Labels of ``kind``: ``"sparse"`` ids ``(batch,)``, ``"onehot"``, ``"binary"``
    (uniform in ``[0, 1)``) or ``"real"`` (normal), ``(batch, classes)``."""
    if kind == "sparse":
        return rng.integers(0, classes, size=(batch,))
    if kind == "onehot":
        return np.eye(classes)[rng.integers(0, classes, size=batch)]
    if kind == "binary":
        return rng.uniform(size=(batch, classes))
    return rng.normal(size=(batch, classes))


# name: (dtype -> loss, label kind); a loss without from_logits takes probabilities (prediction)
LOSSES = {
    "CCE logits": (lambda dt: losses.CategoricalCrossentropy(from_logits=True, dtype=dt), "onehot"),
    "CCE probs": (lambda dt: losses.CategoricalCrossentropy(dtype=dt), "onehot"),
    "CCE smoothing": (
        lambda dt: losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, dtype=dt),
        "onehot",
    ),
    "SCCE logits": (
        lambda dt: losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dt),
        "sparse",
    ),
    "SCCE probs": (lambda dt: losses.SparseCategoricalCrossentropy(dtype=dt), "sparse"),
    "BCE logits": (lambda dt: losses.BinaryCrossentropy(from_logits=True, dtype=dt), "binary"),
    "BCE probs": (lambda dt: losses.BinaryCrossentropy(dtype=dt), "binary"),
    "SquaredError": (lambda dt: losses.SquaredError(dtype=dt), "real"),
    "MeanSquaredError": (lambda dt: losses.MeanSquaredError(dtype=dt), "real"),
}


def prediction(loss: keras.losses.Loss, z: object) -> object:
    """Logits for ``from_logits`` losses, else probabilities through our activation layers."""
    if getattr(loss, "from_logits", True):
        return z
    dtype = keras.backend.standardize_dtype(z.dtype)
    if isinstance(loss, losses.BinaryCrossentropy):
        return layers.Sigmoid(dtype=dtype)(z)
    return layers.Softmax(dtype=dtype)(z)
