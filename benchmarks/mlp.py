"""LeNet-100-300-10 with tf_jacbp layers against its stock-Keras twin (same weights, same batches).

Rows: the train step in ``fit`` (graph and XLA), the compiled step alone and the step's matmuls
alone (what bounds it); the MLP epoch's achieved GFLOP/s as a fraction of a matmul
peak measured in the same run, at batch 128 and at batches 1024 and 4096 (stock Keras' fraction
alongside), and the train step alone at batch 4096 (no input pipeline); and, in the full run, a
whole training on the 60,000-image Fashion-MNIST (epoch-time ratio and both final test
accuracies).

    python -m benchmarks.mlp [--quick]
"""

from __future__ import annotations

import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from benchmarks.table import run_alone
from benchmarks.timing import input_pipeline, interleaved, ratio_row
from benchmarks.workloads import compiled_pair
from tf_jacbp import datasets, models

BATCH_SIZE = 128


def fashion_mnist() -> tuple:
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
    return (x_train / np.float32(255), y_train), (x_test / np.float32(255), y_test)


def step_rows(
    x: np.ndarray, y: np.ndarray, repetitions: int, steps: int, compiled_xla: bool = True
) -> list[dict]:
    """The train step in ``fit`` (the target), and what bounds it: the compiled step alone
    (``train_step`` in a ``tf.function``, one batch in memory, no ``fit`` loop; under XLA only
    with ``compiled_xla``) and the step's matmuls alone, all against stock Keras' step in
    ``fit``, interleaved."""
    rows = []
    x, y = x[: steps * BATCH_SIZE], y[: steps * BATCH_SIZE]
    xb, yb = tf.constant(x[:BATCH_SIZE]), tf.constant(y[:BATCH_SIZE])
    for jit in (False, True):
        mode = "XLA" if jit else "graph"
        ours, stock = compiled_pair(models.lenet_100_300_10, jit, metrics=["accuracy"])
        candidates = {
            name: lambda m=m: m.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0)
            for name, m in (("ours", ours), ("stock", stock))
        }
        compiled = compiled_xla or not jit
        if compiled:
            for name, m in (("ours", ours), ("stock", stock)):
                step = tf.function(lambda a, b, m=m: m.train_step((a, b)), jit_compile=jit)
                candidates[f"{name} compiled"] = lambda f=step: [f(xb, yb) for _ in range(steps)]
        if not jit:
            candidates["matmuls"] = step_matmuls(steps)
        times = interleaved(candidates, repetitions)
        per_step = {k: [t / steps for t in v] for k, v in times.items()}
        rows.append(
            ratio_row(
                "LeNet-100-300-10 train step",
                f"batch {BATCH_SIZE}, fit, {mode}",
                per_step["ours"],
                per_step["stock"],
                "<= 0.95",
            )
        )
        if not compiled:
            continue
        rows.append(
            ratio_row(
                "LeNet-100-300-10 compiled train step alone",
                f"batch {BATCH_SIZE}, tf.function(train_step), no fit loop, {mode}",
                per_step["ours compiled"],
                per_step["stock compiled"],
            )
        )
        if not jit:
            rows.append(
                ratio_row(
                    "floor: the step's matmuls alone vs stock's step in fit",
                    f"batch {BATCH_SIZE}: 3 forward, 3 dW, 2 dx",
                    per_step["matmuls"],
                    per_step["stock"],
                    "floor",
                )
            )
    return rows


def step_matmuls(steps: int):
    """``steps`` repetitions of the MLP step's eight matmuls at ``BATCH_SIZE`` (forward
    ``a W``, backward ``a^T delta`` and ``delta W^T``; no input gradient for the first layer):
    all of the step's arithmetic that grows with the batch, the same for both models."""
    rng = np.random.default_rng(0)
    sizes = [(784, 100), (100, 300), (300, 10)]
    a = [tf.constant(rng.normal(size=(BATCH_SIZE, n)), tf.float32) for n, _ in sizes]
    w = [tf.constant(rng.normal(size=s), tf.float32) for s in sizes]
    d = [tf.constant(rng.normal(size=(BATCH_SIZE, m)), tf.float32) for _, m in sizes]

    @tf.function
    def matmuls():
        out = [tf.matmul(a_, w_) for a_, w_ in zip(a, w, strict=True)]
        out += [tf.matmul(a_, d_, transpose_a=True) for a_, d_ in zip(a, d, strict=True)]
        out += [tf.matmul(d_, w_, transpose_b=True) for d_, w_ in zip(d[1:], w[1:], strict=True)]
        return out

    return lambda: [matmuls() for _ in range(steps)]


def matmul_peak_gflops(n: int = 1024, calls: int = 20) -> float:
    """GFLOP/s of a float32 ``n x n`` matmul, best of three."""
    a = tf.random.normal((n, n))
    f = tf.function(lambda a: tf.matmul(a, a))
    f(a)
    best = min(interleaved({"mm": lambda: f(a).numpy()}, 3, calls)["mm"])
    return 2 * n**3 / best / 1e9


def mlp_flops_per_sample() -> int:
    """Multiply-adds of the train step: forward ``z = W^T a`` (2 n m FLOPs per layer), backward
    ``W delta`` and ``a delta^T`` (4 n m, the first layer's input gradient excluded)."""
    sizes = [(784, 100), (100, 300), (300, 10)]
    return sum(6 * n * m for n, m in sizes) - 2 * 784 * 100


LARGE_BATCH_SIZES = (1024, 4096)
PIPELINE_BATCH_SIZE = 4096


def throughput_rows(
    x: np.ndarray,
    y: np.ndarray,
    repetitions: int,
    batch_size: int = BATCH_SIZE,
    large_batch_sizes: tuple[int, ...] = LARGE_BATCH_SIZES,
) -> list[dict]:
    """The epoch's achieved GFLOP/s over a matmul peak measured in the same repetition; the
    epoch timed from its start to its end (``_EpochTimer``, without ``fit``'s one-off set-up).

    One row for ``batch_size`` on ``x``, then one per ``large_batch_sizes`` (none in the quick
    run) on the whole batches of the full training set, each ``fit`` on NumPy arrays; then the
    row the target is for: ``PIPELINE_BATCH_SIZE`` from a ``tf.data`` pipeline batched once and
    cached, the autotuner off (``input_pipeline(shuffle="batches")``), as one feeds a
    throughput-bound epoch. At batch 128 the step is bound by ``fit``'s per-step host overhead (a
    few ms, the same for any model), not by its ~65 MFLOP of compute; from NumPy arrays at large
    batches ``fit`` converts, shuffles and slices the arrays every epoch, in an autotuned
    pipeline.
    Each row states stock Keras' fraction, timed in the same repetitions on the same data.
    """
    ours, stock = compiled_pair(models.lenet_100_300_10, False, metrics=["accuracy"])
    (full_x, full_y), _ = fashion_mnist()
    rows = []
    batches = (batch_size, *large_batch_sizes, PIPELINE_BATCH_SIZE)
    for number, batch in enumerate(batches):
        if batch == batch_size:
            xb, yb = x, y
        else:
            n = len(full_x) - len(full_x) % batch
            xb, yb = full_x[:n], full_y[:n]
        pipeline = number == len(batches) - 1
        if pipeline:
            fit_args = {"x": input_pipeline(xb, yb, batch, shuffle="batches"), "shuffle": False}
            variant = f"{len(xb)} images, batch {batch}, cached tf.data, autotuner off"
        else:
            fit_args = {"x": xb, "y": yb, "batch_size": batch}
            variant = f"{len(xb)} images, batch {batch}, NumPy arrays"
        # Traces the step for this batch size: one batch of the arrays, or the whole pipeline
        # (a cache is only kept once an epoch has read it to the end).
        warm_up = fit_args if pipeline else {"x": xb[:batch], "y": yb[:batch], "batch_size": batch}
        for model in (ours, stock):
            model.fit(**warm_up, epochs=1, verbose=0)
        peaks, achieved = [], {"ours": [], "stock": []}
        for _ in range(repetitions):
            peaks.append(matmul_peak_gflops())
            for name, model in (("ours", ours), ("stock", stock)):
                history = model.fit(**fit_args, epochs=1, verbose=0, callbacks=[_EpochTimer()])
                seconds = history.history["epoch_seconds"][0]
                achieved[name].append(len(xb) * mlp_flops_per_sample() / seconds / 1e9)
        fractions = {k: [a / p for a, p in zip(v, peaks, strict=True)] for k, v in achieved.items()}
        gflops = {k: statistics.median(v) for k, v in achieved.items()}
        rows.append(
            {
                "benchmark": "MLP epoch GFLOP/s / matmul peak",
                "variant": f"{variant}; {gflops['ours']:.1f} of "
                f"{statistics.median(peaks):.1f} GFLOP/s; stock Keras "
                f"{statistics.median(fractions['stock']):.3g} ({gflops['stock']:.1f} GFLOP/s)",
                "ratio": statistics.median(fractions["ours"]),
                "spread": (min(fractions["ours"]), max(fractions["ours"])),
                "target": ">= 0.4" if pipeline else "",
            }
        )
    return rows


def step_throughput_row(x: np.ndarray, y: np.ndarray, repetitions: int, batch: int = 4096) -> dict:
    """The compiled train step alone at ``batch``: ``train_on_batch`` on one batch already in
    memory (no input pipeline, no ``fit`` loop), GFLOP/s over the matmul peak of the same
    repetition; stock Keras' fraction alongside. With ``throughput_rows`` it separates the
    step's compute from what an epoch of ``fit`` adds."""
    ours, stock = compiled_pair(models.lenet_100_300_10, False, metrics=["accuracy"])
    xb, yb = tf.constant(x[:batch]), tf.constant(y[:batch])
    steps = {
        name: (lambda m=m: m.train_on_batch(xb, yb))
        for name, m in (("ours", ours), ("stock", stock))
    }
    peaks, seconds = [], {"ours": [], "stock": []}
    for _ in range(repetitions):
        peaks.append(matmul_peak_gflops())
        for name, t in interleaved(steps, 1, calls=5).items():
            seconds[name] += t
    fractions = {
        k: [batch * mlp_flops_per_sample() / t / 1e9 / p for t, p in zip(v, peaks, strict=True)]
        for k, v in seconds.items()
    }
    return {
        "benchmark": "MLP train step alone GFLOP/s / matmul peak",
        "variant": f"batch {batch}, one batch in memory (train_on_batch); stock Keras "
        f"{statistics.median(fractions['stock']):.3g}",
        "ratio": statistics.median(fractions["ours"]),
        "spread": (min(fractions["ours"]), max(fractions["ours"])),
        "ours_ms": 1000 * statistics.median(seconds["ours"]),
        "theirs_ms": 1000 * statistics.median(seconds["stock"]),
    }


def full_training_rows(epochs: int = 5) -> list[dict]:
    """Both models trained on the 60,000 images, epochs interleaved (ours, stock, ours, ...),
    each from its own ``input_pipeline`` with the same seed (the same sample orders); the
    epoch-time ratio leaves out the first epoch (it traces), then both test accuracies."""
    (x, y), (x_test, y_test) = fashion_mnist()
    models_ = dict(
        zip(
            ("ours", "stock"),
            compiled_pair(models.lenet_100_300_10, False, metrics=["accuracy"]),
            strict=True,
        )
    )
    data = {name: input_pipeline(x, y, BATCH_SIZE) for name in models_}
    seconds, accuracy = {name: [] for name in models_}, {}
    for epoch in range(epochs):
        for name, model in models_.items():
            history = model.fit(
                data[name], epochs=1, verbose=0, shuffle=False, callbacks=[_EpochTimer()]
            )
            if epoch:
                seconds[name] += history.history["epoch_seconds"]
    for name, model in models_.items():
        accuracy[name] = model.evaluate(x_test, y_test, verbose=0)[1]
    row = ratio_row(
        "Fashion-MNIST epoch (60,000 images)",
        f"{epochs} epochs, batch {BATCH_SIZE}, interleaved; tf.data, autotuner off",
        seconds["ours"],
        seconds["stock"],
        "",
    )
    accuracy_row = {
        "benchmark": "Fashion-MNIST test accuracy, same initial weights",
        "variant": f"ours {accuracy['ours']:.4f}, stock {accuracy['stock']:.4f}",
        "ratio": accuracy["ours"] - accuracy["stock"],
        "target": "|difference| <= 0.005",
    }
    return [row, accuracy_row]


class _EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` to the logs (so to History)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["epoch_seconds"] = time.perf_counter() - self._start


def run(quick: bool) -> list[dict]:
    """Rows for the suite table (see ``benchmarks/run.py``)."""
    (x, y), _ = fashion_mnist()
    if quick:
        return [
            *step_rows(x, y, 5, 40, compiled_xla=False),
            *throughput_rows(x[:12800], y[:12800], 3, large_batch_sizes=()),
            step_throughput_row(x, y, 3),
        ]
    return [
        *step_rows(x, y, 15, 100),
        *throughput_rows(x, y, 3),
        step_throughput_row(x, y, 5),
        *full_training_rows(),
    ]


if __name__ == "__main__":
    run_alone(run, __doc__)
