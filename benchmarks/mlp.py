"""LeNet-100-300-10 with tf_jacbp layers against its stock-Keras twin (same weights, same batches).

Rows: the train step (graph and XLA); the MLP epoch's achieved GFLOP/s as a fraction of a matmul
peak measured in the same run; and, in the full run, a whole training on the 60,000-image
Fashion-MNIST (epoch-time ratio and both final test accuracies).

    python -m benchmarks.mlp [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from benchmarks.timing import interleaved, ratio_row
from benchmarks.twins import stock_twin
from tf_jacbp import datasets, losses, models

BATCH_SIZE = 128


def fashion_mnist() -> tuple:
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
    return (x_train / np.float32(255), y_train), (x_test / np.float32(255), y_test)


def compiled_pair(jit_compile: bool) -> tuple[keras.Model, keras.Model]:
    """The tf_jacbp model and its stock twin, same initial weights, same optimizer settings."""
    keras.utils.set_random_seed(0)
    ours = models.lenet_100_300_10()
    stock = stock_twin(ours)
    ours.compile(
        keras.optimizers.Adam(1e-3),
        losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    stock.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return ours, stock


def step_rows(x: np.ndarray, y: np.ndarray, repetitions: int, steps: int) -> list[dict]:
    rows = []
    x, y = x[: steps * BATCH_SIZE], y[: steps * BATCH_SIZE]
    for jit in (False, True):
        ours, stock = compiled_pair(jit)
        times = interleaved(
            {
                name: lambda m=m: m.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0)
                for name, m in (("ours", ours), ("stock", stock))
            },
            repetitions,
        )
        per_step = {k: [t / steps for t in v] for k, v in times.items()}
        rows.append(
            ratio_row(
                "LeNet-100-300-10 train step",
                f"batch {BATCH_SIZE}, {'XLA' if jit else 'graph'}",
                per_step["ours"],
                per_step["stock"],
                "<= 0.95",
            )
        )
    return rows


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


def throughput_row(x: np.ndarray, y: np.ndarray, repetitions: int) -> dict:
    ours, _ = compiled_pair(False)
    ours.fit(x[:BATCH_SIZE], y[:BATCH_SIZE], batch_size=BATCH_SIZE, verbose=0)
    peaks, achieved = [], []
    for _ in range(repetitions):
        peaks.append(matmul_peak_gflops())
        start = time.perf_counter()
        ours.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0)
        achieved.append(len(x) * mlp_flops_per_sample() / (time.perf_counter() - start) / 1e9)
    fractions = [a / p for a, p in zip(achieved, peaks, strict=True)]
    return {
        "benchmark": "MLP epoch GFLOP/s / matmul peak",
        "variant": f"{len(x)} images, batch {BATCH_SIZE}; {statistics.median(achieved):.1f} of "
        f"{statistics.median(peaks):.1f} GFLOP/s",
        "ratio": statistics.median(fractions),
        "spread": (min(fractions), max(fractions)),
        "target": ">= 0.4",
    }


def full_training_rows(epochs: int = 5) -> list[dict]:
    (x, y), (x_test, y_test) = fashion_mnist()
    ours, stock = compiled_pair(False)
    seconds, accuracy = {}, {}
    for name, model in (("ours", ours), ("stock", stock)):
        history = model.fit(
            x, y, batch_size=BATCH_SIZE, epochs=epochs, verbose=0, callbacks=[_EpochTimer()]
        )
        seconds[name] = history.history["epoch_seconds"][1:]  # the first epoch traces
        accuracy[name] = model.evaluate(x_test, y_test, verbose=0)[1]
    row = ratio_row(
        "Fashion-MNIST epoch (60,000 images)",
        f"{epochs} epochs, batch {BATCH_SIZE}",
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
        return [*step_rows(x, y, 5, 40), throughput_row(x[:12800], y[:12800], 3)]
    return [*step_rows(x, y, 15, 100), throughput_row(x, y, 3), *full_training_rows()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    from benchmarks.run import print_table

    print_table(run(parser.parse_args().quick))
