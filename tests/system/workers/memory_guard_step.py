"""Measure how far one Conv2D's compiled training step raises the process' resident memory.

Run by ``tests/system/test_memory_guard.py`` in a fresh process
(``python memory_guard_step.py CONFIG``,
``CONFIG`` a JSON object: ``input_shape``, ``filters``, ``kernel_size``, ``padding``, ``budget``,
``sparse``: the route expected).
It first runs the same route (dense or sparse ``T``) on a tiny input, so that TensorFlow's kernels
and Keras' training machinery are loaded, then measures, with ``benchmarks.timing.peak_bytes``,
building a model of that one layer with ``toeplitz_budget_bytes=budget`` (the index maps, the
memory guard) and two ``train_on_batch`` steps of one sample (tracing, ``T(K)``, forward and
backward). Prints one JSON line: ``sparse`` (the route the guard chose), ``step_bytes`` (its
estimate) and ``peak_bytes`` (measured).
"""

import json
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import peak_bytes  # noqa: E402
from tf_jacbp import toeplitz  # noqa: E402
from tf_jacbp.layers import Conv2D  # noqa: E402


def model(input_shape, budget, config):
    layer = Conv2D(
        config["filters"],
        config["kernel_size"],
        padding=config["padding"],
        toeplitz="materialize",
        toeplitz_budget_bytes=budget,
    )
    m = keras.Sequential([keras.Input(input_shape), layer])
    m.compile(optimizer="sgd", loss="mse")
    return m


def train(m):
    x = np.random.default_rng(0).random((1, *m.input_shape[1:]), dtype=np.float32)
    y = np.zeros((1, *m.output_shape[1:]), np.float32)
    m.train_on_batch(x, y)
    m.train_on_batch(x, y)
    return m


def main(config):
    warnings.simplefilter("ignore")
    k, channels = config["kernel_size"], config["input_shape"][-1]
    # Warm-up: a small input on the same route (48 x 48 is the smallest size at which a sparse T
    # is cheaper than a dense one for kernels up to 3 x 3).
    small = (48, 48, channels) if config["sparse"] else (k + 2, k + 2, channels)
    index = toeplitz.conv_index((k, k, channels, config["filters"]), small, padding="valid")
    budget = index.step_bytes("float32", sparse=True) if config["sparse"] else None
    warm = train(model(small, budget, {**config, "padding": "valid"}))
    assert warm.layers[-1].sparse_toeplitz == config["sparse"]
    result = {}

    def step():
        m = train(model(tuple(config["input_shape"]), config["budget"], config))
        layer = m.layers[-1]
        result["sparse"] = bool(layer.sparse_toeplitz)
        result["step_bytes"] = layer.conv_index.step_bytes("float32", layer.sparse_toeplitz)

    result["peak_bytes"] = peak_bytes(step)
    print(json.dumps(result))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
