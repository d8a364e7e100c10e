"""Dense: every mode and comparison of the harness, the paper's 3 x 15 example, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from harness import run_layer_test

from tf_jacbp import layers, tolerances


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"activation": "relu"},
        {"activation": "tanh", "use_bias": False},
        {"activation": "softmax"},
        {"activation": "sigmoid", "kernel_regularizer": "l2"},
    ],
)
def test_dense_every_mode(kwargs, tmp_path):
    run_layer_test(lambda dtype: layers.Dense(4, dtype=dtype, **kwargs), (5,), tmp_dir=tmp_path)
