"""The rest of Keras' stack with tf_jacbp layers, on each backend (issue 22 item 3).

* ``.keras`` files cross backends: a model trained on one backend, saved, loads on the other
  with the same weights (bit for bit), predicts the same and takes the same next training step,
  in float32 and float64. The other backend runs in a subprocess (a process has one Keras
  backend), this file being its script (``python test_stack_backends.py save|load ...``).
* Mixed precision (``mixed_float16``, ``mixed_bfloat16``) trains, with float32 variables and
  gradients, the Jacobian route within the compute dtype's tolerance of the reference route.
* ``keras.distribution.DataParallel`` on two host devices (JAX; a subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=2``): a step on a batch split over the two
  devices gives the single-device step's weights.
* Importing tf_jacbp on JAX imports no TensorFlow; ``model.export`` on JAX keeps the Jacobian
  route; sizes unknown when a model is built train on both (JAX traces each size). The sparse
  Toeplitz fallback (TensorFlow's, refused on JAX naming the budget) is
  test_layers_on_backends.py's.

The cross-backend cases need both TensorFlow and JAX in one environment, as ``.ci/run``'s JAX
part has (``tensorflow-cpu`` beside JAX there for this); the whole suite's TensorFlow-only
environment skips them with that reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tf_jacbp import backend as jb
from tf_jacbp import layers, losses, reference_mode, tolerances
from tf_jacbp.testing import assert_gradients_close, model_gradients

HERE = Path(__file__).resolve()
SUBPROCESS_TIMEOUT_S = 300
BACKENDS = ("tensorflow", "jax")
# A saved model's predictions on another backend: the same weights through other kernels, so
# rounding only: a few units in the last place of the dtype, summed over a dozen layers.
PREDICTION_RTOL = {"float32": 1e-6, "float64": tolerances.RTOL["float64"]}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported in this environment."""
    return importlib.util.find_spec(module) is not None


def other_backend() -> str:
    """The supported backend this process is not running on."""
    return next(b for b in BACKENDS if b != keras.backend.backend())


def needs_other_backend():
    """Skip (naming where the case runs) when the other backend is not installed here."""
    other = other_backend()
    if not installed(other):
        pytest.skip(
            f"needs {other} installed beside {keras.backend.backend()}: runs in .ci/run's JAX "
            "part, whose environment has both"
        )


def run_here_as_script(args: list[str], keras_backend: str, **env: str) -> None:
    """Run this file as a script (``__main__`` below) on ``keras_backend`` in a fresh process."""
    environment = {**os.environ, "KERAS_BACKEND": keras_backend, **env}
    result = subprocess.run(
        [sys.executable, str(HERE), *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env=environment,
        cwd=HERE.parents[2],
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius), as tf_jacbp.tolerances measures."""
    actual, expected = np.asarray(actual, "float64"), np.asarray(expected, "float64")
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300))


# --- no TensorFlow on JAX -------------------------------------------------------------------

IMPORT_EVERY_MODULE = """
import importlib, importlib.abc, json, pkgutil, sys

attempts = []


class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU machine has none)")
        return None


sys.meta_path.insert(0, NoTensorFlow())
import tf_jacbp

names = ["tf_jacbp"] + sorted(
    m.name for m in pkgutil.walk_packages(tf_jacbp.__path__, "tf_jacbp.")
    if m.name != "tf_jacbp.backend.tensorflow"
)
failures = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - reported by name
        failures[name] = f"{type(err).__name__}: {err}"
    if attempts and "tensorflow" not in failures.get(name, ""):
        failures[name] = f"tried to import {attempts[0]}" + (
            f" ({failures[name]})" if name in failures else ""
        )
        attempts.clear()
print(json.dumps({"modules": len(names), "failures": failures}))
"""


def test_every_module_imports_on_jax_without_tensorflow():
    """With ``KERAS_BACKEND=jax`` and TensorFlow made uninstalled (the GPU machine has none),
    every module of tf_jacbp imports and none tries to import TensorFlow; only
    ``tf_jacbp.backend.tensorflow`` is TensorFlow's by design."""
    if not installed("jax"):
        pytest.skip("needs jax: runs in .ci/run's JAX part")
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_MODULE],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env={**os.environ, "KERAS_BACKEND": "jax"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["modules"] > 50, report
    assert report["failures"] == {}, json.dumps(report["failures"], indent=1)


# --- .keras files across backends ------------------------------------------------------------


def stack_model(dtype: str) -> keras.Model:
    """A functional model of tf_jacbp layers on ``(8, 8, 2)`` images, ``dtype`` throughout:
    convolutions (tied and untied bias, transposed), batch and layer normalization, a skip,
    max and average pooling, Dense layers, a softmax."""
    x = keras.Input((8, 8, 2), dtype=dtype)
    h = layers.Conv2D(3, 3, padding="same", activation="relu", dtype=dtype)(x)
    h = layers.BatchNormalization(dtype=dtype)(h)
    skip = layers.Conv2D(3, 3, padding="same", use_bias=False, dtype=dtype)(h)
    h = layers.Add(dtype=dtype)([skip, h])
    h = layers.MaxPooling2D(2, dtype=dtype)(h)
    h = layers.Conv2D(4, 2, bias="untied", activation="relu", dtype=dtype)(h)
    h = layers.AveragePooling2D(2, strides=1, padding="same", dtype=dtype)(h)
    h = layers.Conv2DTranspose(4, 3, padding="same", activation="relu", dtype=dtype)(h)
    h = layers.Flatten(dtype=dtype)(h)
    h = layers.Dense(16, activation="relu", dtype=dtype)(h)
    h = layers.LayerNormalization(dtype=dtype)(h)
    h = layers.Dense(5, dtype=dtype)(h)
    h = layers.Softmax(dtype=dtype)(h)
    return keras.Model(x, h, name=f"stack_{dtype}")


def stack_data(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """32 fixed images and labels of 5 classes."""
    rng = np.random.default_rng(22)
    return rng.normal(size=(32, 8, 8, 2)).astype(dtype), rng.integers(0, 5, size=32)


@contextlib.contextmanager
def floatx(dtype: str):
    """Keras' default float dtype set to ``dtype`` for the block: ``fit`` and ``predict`` cast
    float arrays to ``floatx()`` on every backend (float64 data would reach a float64 model
    rounded to float32)."""
    if dtype == "float64":
        jb.require_float64("The float64 saving test")
    before = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(before)


def save_trained(path: Path, dtype: str) -> None:
    """Build, train two epochs and save ``path/model.keras``; then record the predictions and
    the weights after one more step (``path/saved.npz``)."""
    with floatx(dtype):
        keras.utils.set_random_seed(0)
        model = stack_model(dtype)
        model.compile(
            # binary fractions: Keras keeps the learning rate in a float32 variable and the
            # momentum as a Python float, and the backends round 0.05 or 0.9 differently
            # (1e-8 apart in float64); 2^-4 and 7/8 are exact in both.
            optimizer=keras.optimizers.SGD(2**-4, momentum=0.875),
            loss=losses.SparseCategoricalCrossentropy(),
        )
        x, y = stack_data(dtype)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        model.save(path / "model.keras")
        record(model, path / "saved.npz")


def load_saved(path: Path, dtype: str) -> None:
    """Load ``path/model.keras``; record its predictions and its weights after one more step
    (``path/loaded.npz``)."""
    with floatx(dtype):
        model = keras.saving.load_model(path / "model.keras")
        record(model, path / "loaded.npz")


def record(model: keras.Model, file: Path) -> None:
    """Save the model's predictions on the fixed data, its weights, and its weights after one
    ``train_on_batch`` step, to ``file``."""
    x, y = stack_data(model.inputs[0].dtype)
    arrays = {"prediction": model.predict(x, verbose=0)}
    arrays.update(
        {f"weight_{i}": keras.ops.convert_to_numpy(w) for i, w in enumerate(model.weights)}
    )
    model.train_on_batch(x[:8], y[:8])
    arrays.update(
        {f"stepped_{i}": keras.ops.convert_to_numpy(w) for i, w in enumerate(model.weights)}
    )
    np.savez(file, **arrays)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("direction", ["saved_here", "saved_there"])
def test_keras_file_moves_between_backends(direction, dtype, tmp_path):
    """Trained and saved on one backend, loaded on the other: identical weights, predictions
    within ``PREDICTION_RTOL`` (1e-6 float32, 1e-12 float64), and the next SGD-with-momentum
    step (optimizer state restored: the update is ``-lr * (momentum * v + g)``) within the
    dtype's gradient tolerance, variable by variable."""
    needs_other_backend()
    if direction == "saved_here":
        save_trained(tmp_path, dtype)
        run_here_as_script(["load", str(tmp_path), dtype], other_backend())
    else:
        run_here_as_script(["save", str(tmp_path), dtype], other_backend())
        load_saved(tmp_path, dtype)
    saved, loaded = np.load(tmp_path / "saved.npz"), np.load(tmp_path / "loaded.npz")
    assert sorted(saved.files) == sorted(loaded.files)
    for name in saved.files:
        assert saved[name].dtype == loaded[name].dtype, name
        if name.startswith("weight_"):
            np.testing.assert_array_equal(loaded[name], saved[name], err_msg=name)
    assert saved["prediction"].dtype == dtype
    error = relative_error(loaded["prediction"], saved["prediction"])
    assert error <= PREDICTION_RTOL[dtype], f"predictions differ by {error:.2e}"
    for name in (n for n in saved.files if n.startswith("weight_")):
        after = name.replace("weight_", "stepped_")
        step, step_there = saved[after] - saved[name], loaded[after] - loaded[name]
        error = relative_error(step_there, step)
        assert error <= tolerances.RTOL[dtype], f"the step of {name}: {error:.2e}"


# --- mixed precision -----------------------------------------------------------------------

COMPUTE_DTYPE = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


def mixed_precision_cnn(policy: str) -> keras.Model:
    """A small LeNet under ``policy`` (Conv2D, max pooling, Dense), its output layer float32 as
    Keras advises for the logits of a mixed-precision model."""
    keras.config.set_dtype_policy(policy)
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            layers.Conv2D(4, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(16, activation="relu"),
            layers.Dense(5, dtype="float32"),
        ]
    )


@pytest.mark.slow
@pytest.mark.parametrize("policy", list(COMPUTE_DTYPE))
def test_mixed_precision_trains(policy):
    """Under ``policy`` the variables stay float32 and the hidden layers compute in float16 or
    bfloat16; the Jacobian route's gradients (float32) are within the compute dtype's tolerance
    of the reference route's under the same policy; ``fit`` (with Keras' loss scaling under
    ``mixed_float16``) lowers the loss by half on images of five noisy templates."""
    compute = COMPUTE_DTYPE[policy]
    model = mixed_precision_cnn(policy)
    assert {v.dtype for v in model.weights} == {"float32"}
    assert [layer.compute_dtype for layer in model.layers] == [compute] * 4 + ["float32"]

    rng = np.random.default_rng(3)
    y = rng.integers(0, 5, size=128)
    x = (rng.normal(size=(5, 8, 8, 2))[y] + rng.normal(size=(128, 8, 8, 2))).astype("float32")
    t = np.eye(5, dtype="float32")[y[:32]]
    grads = model_gradients(model, x[:32], t, reference=False)
    refs = model_gradients(model, x[:32], t, reference=True)
    assert {g.dtype.name for g in grads} == {"float32"}
    assert_gradients_close(grads, refs, model.trainable_variables, compute, policy)

    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (
        policy == "mixed_float16"
    )
    history = model.fit(x, y, batch_size=32, epochs=6, shuffle=False, verbose=0).history["loss"]
    assert np.isfinite(history).all() and history[-1] < 0.5 * history[0], history


# --- model.export ----------------------------------------------------------------------------

SAVED_MODEL_GRADIENTS = HERE.parents[1] / "system" / "workers" / "saved_model_gradients.py"


@pytest.mark.slow
def test_export_from_jax_keeps_the_custom_gradients(backend, tmp_path):
    """``model.export`` on JAX (Keras converts with jax2tf, so TensorFlow must be installed):
    the SavedModel, reloaded by TensorFlow in a fresh process, serves the model's outputs and
    differentiates through the Jacobian route: with a Dense whose input product is planted 1%
    off, its input gradient is the planted route's, not autodiff's. The batch size is fixed in
    ``input_signature`` (docs/backends.md: with a symbolic one, TensorFlow 2.21 cannot load the
    shape assertions of JAX 0.11.2's StableHLO). On TensorFlow, tests/system/test_saving.py
    exports with any batch size."""
    if backend != "jax":
        pytest.skip("TensorFlow's model.export is tests/system/test_saving.py's")
    needs_other_backend()
    from planted_layers import one_percent_off  # tests/ is on pytest's path, not the script's

    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            layers.Conv2D(3, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            one_percent_off(layers.Dense)(4),
        ]
    )
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 8, 8, 2)).astype("float32")
    upstream = rng.normal(size=(3, 4)).astype("float32")

    def input_gradient(reference: bool) -> np.ndarray:
        def loss(inputs):
            return keras.ops.sum(model(inputs) * upstream)

        with reference_mode() if reference else contextlib.nullcontext():
            _, (dx,) = jb.value_and_gradients(loss, [x])
        return keras.ops.convert_to_numpy(dx)

    signature = [keras.InputSpec(shape=(3, 8, 8, 2), dtype="float32")]
    model.export(tmp_path / "exported", verbose=False, input_signature=signature)
    np.savez(tmp_path / "inputs.npz", x=x, upstream=upstream)
    out = tmp_path / "served.npz"
    result = subprocess.run(
        [sys.executable, str(SAVED_MODEL_GRADIENTS), str(out), str(tmp_path / "exported")]
        + [str(tmp_path / "inputs.npz")],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    served = np.load(out)
    rtol = tolerances.RTOL["float32"]
    assert relative_error(served["0/y"], keras.ops.convert_to_numpy(model(x))) <= rtol
    jacobian_route, autodiff = input_gradient(False), input_gradient(True)
    assert relative_error(served["0/dx"], jacobian_route) <= rtol
    assert relative_error(served["0/dx"], autodiff) > 1e-3, "the export differentiated autodiff"


# --- what stays TensorFlow's ------------------------------------------------------------------


@pytest.mark.slow
def test_sizes_unknown_when_the_model_is_built(backend):
    """``keras.Input((None, None, 2))``: on JAX every step is traced with its sizes known
    (one trace per size, so TensorFlow's run-time index maps are not needed); on both backends
    the Jacobian route's gradients at two image sizes agree with the reference route's."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((None, None, 2)),
            layers.Conv2D(3, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.GlobalAveragePooling2D(),
            layers.Dense(2),
        ]
    )
    rng = np.random.default_rng(7)
    for size in (8, 11):
        x = rng.normal(size=(4, size, size, 2)).astype("float32")
        t = rng.normal(size=(4, 2)).astype("float32")
        grads = model_gradients(model, x, t, reference=False)
        refs = model_gradients(model, x, t, reference=True)
        assert_gradients_close(grads, refs, model.trainable_variables, "float32", f"size {size}")


# --- data parallelism: keras.distribution on two host devices -------------------------------


def small_cnn(dtype: str) -> keras.Model:
    """Conv2D, batch normalization (its batch moments must span the whole batch, not one
    device's half), max pooling, Dense: the layers a data-parallel LeNet uses."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 2), dtype=dtype),
            layers.Conv2D(4, 3, activation="relu", dtype=dtype),
            layers.BatchNormalization(dtype=dtype),
            layers.MaxPooling2D(2, dtype=dtype),
            layers.Flatten(dtype=dtype),
            layers.Dense(5, dtype=dtype),
        ]
    )


def data_parallel_step(out: Path) -> None:
    """One SGD(1) step on 8 examples without a distribution, then the same step from the same
    weights under ``DataParallel`` over the two host devices (4 examples each); write the
    variables' relative differences and the devices each variable lives on to ``out``."""
    import jax

    dtype = "float64"
    with floatx(dtype):
        x, y = stack_data(dtype)
        x, y = x[:8], y[:8]
        devices = jax.devices("cpu")

        def step(model: keras.Model) -> list[np.ndarray]:
            model.compile(
                optimizer=keras.optimizers.SGD(1.0),
                loss=losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            model.train_on_batch(x, y)
            return [keras.ops.convert_to_numpy(w) for w in model.weights]

        keras.utils.set_random_seed(0)
        single = small_cnn(dtype)
        start = single.get_weights()
        expected = step(single)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        parallel = small_cnn(dtype)
        parallel.set_weights(start)
        actual = step(parallel)
        spans = [len(w.value.sharding.device_set) for w in parallel.weights]
    result = {
        "devices": len(devices),
        "spans": spans,
        "errors": [
            relative_error(a - w0, e - w0) for a, e, w0 in zip(actual, expected, start, strict=True)
        ],
        "moved": [float(np.abs(e - w0).max()) for e, w0 in zip(expected, start, strict=True)],
    }
    out.write_text(json.dumps(result))


@pytest.mark.slow
def test_data_parallel_step_equals_the_single_device_step(backend, tmp_path):
    """``keras.distribution.DataParallel`` over two host devices: every variable (kernels,
    biases, batch normalization's scale, offset and moving moments) moves as in a step on one
    device, to float64's tolerance, and lives on both devices. JAX's: TensorFlow's Keras has no
    ``keras.distribution``; its data parallelism, ``tf.distribute``, is
    tests/system/test_distribute.py's."""
    if backend != "jax":
        pytest.skip("keras.distribution is Keras' JAX API; TensorFlow: test_distribute.py")
    out = tmp_path / "data_parallel.json"
    run_here_as_script(
        ["data-parallel", str(out)],
        "jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    result = json.loads(out.read_text())
    assert result["devices"] == 2 and set(result["spans"]) == {2}, result
    assert min(result["moved"]) > 0, "every variable must change in the step"
    for i, error in enumerate(result["errors"]):
        assert error <= tolerances.RTOL["float64"], f"variable {i}: {error:.2e}"


if __name__ == "__main__":
    command, where, *rest = sys.argv[1:]
    if command == "save":
        save_trained(Path(where), *rest)
    elif command == "load":
        load_saved(Path(where), *rest)
    elif command == "data-parallel":
        data_parallel_step(Path(where))
    else:
        raise SystemExit(f"unknown command {command!r}: save, load, data-parallel")
