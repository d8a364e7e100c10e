"""The Toeplitz memory guard bounds a whole training step (issue 13, item 8).

``Conv2D`` compares ``ConvIndex.step_bytes`` (``T(K)``, its index maps as graph constants, one
sample) with its budget. These tests build a layer whose estimate sits just under the budget and
measure, in a fresh process (``tests/system/workers/memory_guard_step.py``), how far its first two
training steps raise the resident memory: the guard must bound it on both routes. The sparse
fallback warns, and tells Keras the layer cannot be compiled with XLA.
"""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from keras.src.trainers.trainer import model_supports_jit

from tf_jacbp import toeplitz
from tf_jacbp.layers import Conv2D

WORKER = Path(__file__).parent / "workers" / "memory_guard_step.py"


def _measure(config: dict) -> dict:
    done = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "input_shape, filters, kernel_size, padding, sparse",
    [
        ((28, 28, 1), 6, 5, "valid", False),  # LeNet-5's first layer: T is 10 MiB
        ((64, 64, 1), 2, 3, "same", True),  # a dense T would take 128 MiB
    ],
)
@pytest.mark.slow
def test_a_training_step_stays_within_the_budget(
    input_shape, filters, kernel_size, padding, sparse
):
    index = toeplitz.conv_index(
        (kernel_size, kernel_size, input_shape[-1], filters), input_shape, padding=padding
    )
    budget = index.step_bytes("float32", sparse)
    if sparse:
        assert index.step_bytes("float32", False) > budget
    config = dict(
        input_shape=input_shape,
        filters=filters,
        kernel_size=kernel_size,
        padding=padding,
        budget=budget,
        sparse=sparse,
    )
    result = _measure(config)
    assert result["sparse"] == sparse and result["step_bytes"] == budget
    assert result["peak_bytes"] <= budget, (
        f"a step grew the process by {result['peak_bytes'] / 2**20:.1f} MiB, over the budget of "
        f"{budget / 2**20:.1f} MiB that the guard accepted"
    )


def test_large_sparse_input_is_refused_when_its_step_needs_more_than_the_budget():
    """384 x 384, 1 x 1 kernel: the sparse T is 2.8 MiB, but its index maps as graph constants
    made a step grow the process by 870 MB; an 8 MiB budget must refuse it at build."""
    index = toeplitz.conv_index((1, 1, 1, 1), (384, 384, 1))
    assert index.sparse_bytes("float32") < 8 * 2**20 < index.step_bytes("float32", True)
    with pytest.raises(ValueError, match="toeplitz_budget_bytes") as info:
        Conv2D(1, 1, toeplitz="materialize", toeplitz_budget_bytes=8 * 2**20).build(
            (None, 384, 384, 1)
        )
    assert "training step" in str(info.value)


def _sparse_layer_budget() -> int:
    index = toeplitz.conv_index((3, 3, 1, 2), (64, 64, 1), padding="same")
    return index.step_bytes("float32", True)


def test_sparse_fallback_warns_and_turns_off_xla():
    with pytest.warns(UserWarning, match=r"sparse T.*XLA.*toeplitz_budget_bytes"):
        sparse = Conv2D(
            2,
            3,
            padding="same",
            toeplitz="materialize",
            toeplitz_budget_bytes=_sparse_layer_budget(),
        )
        model = keras.Sequential([keras.Input((64, 64, 1)), sparse])
    assert sparse.sparse_toeplitz and not sparse.supports_jit
    assert not model_supports_jit(model)  # what fit(jit_compile="auto") consults
    with pytest.warns(UserWarning, match="jit_compile"):
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    assert model.jit_compile is False
    model.fit(np.ones((2, 64, 64, 1)), np.ones((2, 64, 64, 2)), epochs=1, verbose=0)


def test_dense_route_neither_warns_nor_turns_off_xla():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense = Conv2D(2, 3, padding="same")
        model = keras.Sequential([keras.Input((16, 16, 1)), dense])
    assert not dense.sparse_toeplitz and dense.supports_jit and model_supports_jit(model)


_UNKNOWN_LENGTH_WORKER = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, {repo!r})
import numpy as np
import tensorflow as tf
from benchmarks.timing import peak_bytes
from tf_jacbp.layers import Conv1D, Conv2D

config = json.loads(sys.argv[1])
cls = {{"Conv1D": Conv1D, "Conv2D": Conv2D}}[config["layer"]]
layer = cls(1, 3, padding="same", toeplitz="materialize", toeplitz_budget_bytes=config["budget"])
shape = tuple(config["shape"])
layer.build((None, *(None,) * (len(shape) - 1), shape[-1]))
spec = tf.TensorSpec((None, *(None,) * (len(shape) - 1), shape[-1]), "float32")
call = tf.function(lambda x: layer(x), input_signature=[spec])
call(np.zeros((1, *(4,) * (len(shape) - 1), shape[-1]), "float32"))  # traced, small: fits
x = np.zeros((1, *shape), "float32")
result = {{"error": None}}

def run():
    try:
        call(x)
    except tf.errors.InvalidArgumentError as error:
        result["error"] = error.message

result["peak_bytes"] = peak_bytes(run)
print(json.dumps(result))
"""


@pytest.mark.parametrize("layer, shape", [("Conv1D", (8192, 1)), ("Conv2D", (64, 128, 1))])
@pytest.mark.slow
def test_unknown_size_guard_fires_before_anything_of_the_size_of_t(layer, shape):
    """A size unknown when traced: the run-time memory guard must fail before the dense ``T(K)``
    or anything of its size is allocated. ``T`` of the length-8192 sequence takes 256 MiB
    (float32): the guard's message comes, and the process grows by far less. Conv1D's guard
    used to wait only on the last gather, after the inverse taps and the first gather, each
    about as large as ``T`` for a sequence (the process grew by about 1 GiB before the error);
    Conv2D's first gather is small."""
    budget = 2**20
    script = _UNKNOWN_LENGTH_WORKER.format(repo=str(Path(__file__).parents[2]))
    config = json.dumps({"layer": layer, "shape": shape, "budget": budget})
    done = subprocess.run(
        [sys.executable, "-c", script, config], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is not None and "over the budget of 1048576 bytes" in result["error"]
    assert "toeplitz_budget_bytes" in result["error"]
    assert result["peak_bytes"] < 32 * 2**20, (
        f"the step grew the process by {result['peak_bytes'] / 2**20:.0f} MiB before the guard's "
        "error (T alone would take 256 MiB)"
    )
