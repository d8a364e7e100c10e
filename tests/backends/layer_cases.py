"""One configuration of every public tf_jacbp layer class for the tests of both backends
(``test_layers_on_backends.py``, ``test_planted_on_backends.py``), with the product a planted
bug puts 1% off (``planted_layers.one_percent_off``) and the stock Keras layer of the same map.

``Embedding`` is not here: its tests on both backends are its own (``tf_jacbp.layers.embedding``
has another owner, and its integer ids need other data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras

from tf_jacbp import layers
from tf_jacbp.layers import global_pooling, pooling_nd, reshaping


def batchnorm_initializers(seed: int = 0) -> dict[str, Any]:
    """Non-trivial gamma, beta and moving statistics, so that no term of a formula vanishes."""
    normal, uniform = keras.initializers.RandomNormal, keras.initializers.RandomUniform
    return {
        "gamma_initializer": normal(1.0, 0.3, seed=seed),
        "beta_initializer": normal(0.0, 0.3, seed=seed + 1),
        "moving_mean_initializer": normal(0.0, 0.5, seed=seed + 2),
        "moving_variance_initializer": uniform(0.5, 2.0, seed=seed + 3),
    }


@dataclass
class Case:
    """``cls(**kwargs, dtype=...)`` on inputs of ``input_shape`` (a list for several inputs).

    ``options``: further ``check_layer`` arguments (``training``, ``batch_size``); ``modes``:
    run check_layer's checks 3-5 too; ``planted``: ``(method, into)`` of ``one_percent_off``;
    ``stock``: the stock Keras class computing the same map with the same weights, or None.
    """

    cls: type
    kwargs: dict[str, Any]
    input_shape: Any
    planted: tuple[str, str]
    stock: type | None = None
    options: dict[str, Any] = field(default_factory=dict)
    modes: bool = False

    def make(self, cls: type | None = None) -> Any:
        """``dtype -> layer`` of ``cls`` (default the case's class) with the case's arguments."""
        cls = cls or self.cls
        return lambda dtype: cls(**self.kwargs, dtype=dtype)


PARAM, INPUT = ("vjp", "param"), ("vjp", "dx")
K = keras.layers
CASES = {
    "Dense": Case(layers.Dense, {"units": 3, "activation": "tanh"}, (4,), PARAM, K.Dense, {}, True),
    "Conv1D": Case(
        layers.Conv1D, {"filters": 2, "kernel_size": 3, "padding": "same"}, (5, 2), PARAM, K.Conv1D
    ),
    "Conv2D": Case(
        layers.Conv2D,
        {"filters": 2, "kernel_size": 2, "strides": (2, 1), "dilation_rate": 1},
        (5, 4, 2),
        PARAM,
        K.Conv2D,
        {},
        True,
    ),
    "Conv2DTranspose": Case(
        layers.Conv2DTranspose,
        {"filters": 2, "kernel_size": 3, "strides": 2, "padding": "same"},
        (3, 3, 2),
        PARAM,
        K.Conv2DTranspose,
    ),
    "Conv3D": Case(
        layers.Conv3D,
        {"filters": 2, "kernel_size": 2, "padding": "same"},
        (3, 3, 2, 2),
        PARAM,
        K.Conv3D,
    ),
    "MaxPooling1D": Case(
        pooling_nd.MaxPooling1D,
        {"pool_size": 3, "strides": 2, "padding": "same"},
        (7, 2),
        INPUT,
        K.MaxPooling1D,
    ),
    "MaxPooling2D": Case(layers.MaxPooling2D, {"pool_size": 2}, (5, 4, 2), INPUT, K.MaxPooling2D),
    "MaxPooling3D": Case(
        pooling_nd.MaxPooling3D,
        {"pool_size": 2, "strides": (1, 2, 1), "padding": "same"},
        (3, 4, 2, 1),
        INPUT,
        K.MaxPooling3D,
    ),
    "AveragePooling1D": Case(
        pooling_nd.AveragePooling1D,
        {"pool_size": 3, "strides": 2},
        (8, 2),
        INPUT,
        K.AveragePooling1D,
    ),
    "AveragePooling2D": Case(
        layers.AveragePooling2D,
        {"pool_size": 3, "strides": 2, "padding": "same"},
        (5, 4, 2),
        INPUT,
        K.AveragePooling2D,
    ),
    "AveragePooling3D": Case(
        pooling_nd.AveragePooling3D,
        {"pool_size": (2, 3, 2), "strides": 1, "padding": "same"},
        (3, 3, 2, 1),
        INPUT,
        K.AveragePooling3D,
    ),
    "GlobalMaxPooling1D": Case(
        global_pooling.GlobalMaxPooling1D, {"keepdims": True}, (5, 2), INPUT, K.GlobalMaxPooling1D
    ),
    "GlobalMaxPooling2D": Case(
        global_pooling.GlobalMaxPooling2D, {}, (3, 4, 2), INPUT, K.GlobalMaxPooling2D
    ),
    "GlobalAveragePooling1D": Case(
        global_pooling.GlobalAveragePooling1D, {}, (5, 2), INPUT, K.GlobalAveragePooling1D
    ),
    "GlobalAveragePooling2D": Case(
        global_pooling.GlobalAveragePooling2D,
        {"keepdims": True},
        (3, 4, 2),
        INPUT,
        K.GlobalAveragePooling2D,
    ),
    "Flatten": Case(layers.Flatten, {}, (3, 2, 2), INPUT, K.Flatten),
    "Reshape": Case(reshaping.Reshape, {"target_shape": (-1, 2)}, (3, 4), INPUT, K.Reshape),
    "UpSampling2D": Case(
        reshaping.UpSampling2D, {"size": (2, 1)}, (2, 3, 2), INPUT, K.UpSampling2D
    ),
    # No stock class: TensorFlow's bilinear resize computes float64 in float32. Its comparisons
    # with stock Keras and NumPy are in test_upsampling_bilinear_backends.py.
    "UpSampling2D (bilinear)": Case(
        reshaping.UpSampling2D, {"size": (3, 2), "interpolation": "bilinear"}, (2, 3, 2), INPUT
    ),
    "ZeroPadding2D": Case(
        reshaping.ZeroPadding2D, {"padding": ((1, 0), (2, 1))}, (2, 3, 2), INPUT, K.ZeroPadding2D
    ),
    "Add": Case(layers.Add, {}, [(3, 4), (1, 4)], INPUT, K.Add, {"batch_size": 3}, True),
    "Multiply": Case(layers.Multiply, {}, [(3, 4), (3, 1)], INPUT, K.Multiply, {"batch_size": 3}),
    "Concatenate": Case(
        layers.Concatenate, {"axis": 1}, [(2, 4), (1, 4)], INPUT, K.Concatenate, {"batch_size": 3}
    ),
    "BatchNormalization (training)": Case(
        layers.BatchNormalization,
        {"momentum": 0.8, **batchnorm_initializers()},
        (3, 2, 2),
        ("training_map", "param"),
        K.BatchNormalization,
        {"training": True, "batch_size": 4},
        True,
    ),
    "BatchNormalization (inference)": Case(
        layers.BatchNormalization,
        {"momentum": 0.8, **batchnorm_initializers()},
        (5,),
        PARAM,
        K.BatchNormalization,
        {"training": False, "batch_size": 4},
    ),
    "LayerNormalization": Case(layers.LayerNormalization, {}, (3, 4), PARAM, K.LayerNormalization),
    "LayerNormalization (rms_scaling)": Case(
        layers.LayerNormalization,
        {"rms_scaling": True, "axis": (1, 2)},
        (3, 4),
        PARAM,
        K.LayerNormalization,
    ),
    "Dropout (training)": Case(
        layers.Dropout,
        {"rate": 0.4, "seed": 7},
        (6,),
        INPUT,
        None,
        {"training": True, "batch_size": 4},
        True,
    ),
    "Dropout (inference)": Case(
        layers.Dropout, {"rate": 0.4}, (6,), INPUT, K.Dropout, {"training": False}
    ),
    "Activation": Case(layers.Activation, {"activation": "tanh"}, (6,), INPUT, K.Activation),
    "ReLU": Case(layers.ReLU, {}, (6,), INPUT, K.ReLU),
    "Sigmoid": Case(layers.Sigmoid, {}, (6,), INPUT),
    "Tanh": Case(layers.Tanh, {}, (6,), INPUT),
    "LeakyReLU": Case(layers.LeakyReLU, {}, (6,), INPUT, K.LeakyReLU),
    "ELU": Case(layers.ELU, {}, (6,), INPUT, K.ELU),
    "Softplus": Case(layers.Softplus, {}, (6,), INPUT),
    "GELU": Case(layers.GELU, {}, (6,), INPUT),
    "Swish": Case(layers.Swish, {}, (6,), INPUT),
    "Softmax": Case(layers.Softmax, {}, (6,), INPUT, K.Softmax),
}
