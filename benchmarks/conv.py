"""LeNet-5 and its conv layers with tf_jacbp's Toeplitz Conv2D against stock-Keras twins.

Rows, each in graph mode and with XLA (``jit_compile=True``; the quick run times the layers
alone in graph mode only):

* the LeNet-5 train step (``tf_jacbp.models.lenet5()`` against ``benchmarks.twins.stock_twin``:
  same initial weights, same MNIST batches of 128, ``train_on_batch`` over the same batches);
* each of LeNet-5's two conv layers alone, forward and every gradient (input, kernel, bias), in a
  ``tf.function``: ``tf_jacbp.layers.Conv2D`` against ``keras.layers.Conv2D`` with the same kernel;
* the floor: the Toeplitz products alone (``X T^T`` for both convs, ``Delta T`` for the second;
  the first conv's input gradient is never needed), timed against the stock train step; and all
  the explicit conv work of the step (``T(K)`` built twice, those products, the patch-product
  kernel and bias gradients), the part of our step that stock Keras does with its conv kernels.

Candidates are interleaved in every repetition; a ratio is the median of per-repetition ratios
(``benchmarks.timing``), ``peak_mib`` is how far the process' resident memory rose during one
step (``benchmarks.timing.peak_bytes``), ours then stock's.

    python benchmarks/conv.py [--quick]       # or python -m benchmarks.conv; --quick: < 2 minutes
"""

from __future__ import annotations

import os
import sys
import warnings

if not __package__:  # run as a script, ``python benchmarks/conv.py``: import from the repository
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.table import run_alone  # noqa: E402
from benchmarks.timing import interleaved, peak_mib, ratio_row  # noqa: E402
from benchmarks.workloads import compiled_pair  # noqa: E402
from tf_jacbp import datasets, models, toeplitz  # noqa: E402
from tf_jacbp.layers.conv import Conv2D  # noqa: E402

BATCH_SIZE = 128
TARGET = "<= 2.0"
# LeNet-5's convolutions: (input shape, filters, padding).
CONVS = {
    "conv1 28x28x1 -> 6@5x5 same": ((28, 28, 1), 6, "same"),
    "conv2 14x14x6 -> 16@5x5 valid": ((14, 14, 6), 16, "valid"),
}


def mnist_batches(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``steps * BATCH_SIZE`` MNIST training digits, ``(N, 28, 28, 1)`` float32 in [0, 1]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the offline fallback announces itself
        (x, y), _ = datasets.load_mnist()
    n = steps * BATCH_SIZE
    if len(x) < n:
        raise ValueError(f"{steps} steps of {BATCH_SIZE} need {n} digits, only {len(x)} loaded.")
    return (x[:n, :, :, None] / np.float32(255)), y[:n].astype(np.int64)


def lenet_rows(repetitions: int, steps: int) -> list[dict]:
    """The train step, and the Toeplitz products alone and all the explicit conv work against
    the stock step (graph mode)."""
    x, y = mnist_batches(steps)
    batches = [(x[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE]) for i in range(0, len(x), BATCH_SIZE)]
    rows = []
    for jit in (False, True):
        ours, stock = compiled_pair(models.lenet5, jit)
        candidates = {
            name: lambda m=m: [m.train_on_batch(*batch) for batch in batches]
            for name, m in (("ours", ours), ("stock", stock))
        }
        if not jit:
            candidates["products"] = toeplitz_products(steps)
            candidates["explicit"] = explicit_work(steps)
        times = {k: [t / steps for t in v] for k, v in interleaved(candidates, repetitions).items()}
        variant = f"batch {BATCH_SIZE}, train_on_batch, {'XLA' if jit else 'graph'}"
        row = ratio_row("LeNet-5 train step", variant, times["ours"], times["stock"], TARGET)
        row["peak_mib"] = tuple(
            peak_mib(lambda m=m: m.train_on_batch(*batches[0])) for m in (ours, stock)
        )
        rows.append(row)
        if not jit:
            rows.append(
                ratio_row(
                    "LeNet-5 Toeplitz products only",
                    "X T^T twice, Delta T once; vs stock step",
                    times["products"],
                    times["stock"],
                    "floor",
                )
            )
            rows.append(
                ratio_row(
                    "LeNet-5 explicit conv work only",
                    "build T twice, products, patch-product dK, db; vs stock step",
                    times["explicit"],
                    times["stock"],
                    "floor",
                )
            )
    return rows


def toeplitz_products(steps: int):
    """``steps`` repetitions of the train step's Toeplitz matmuls, with LeNet-5's shapes."""
    rng = np.random.default_rng(0)
    operands = []
    for input_shape, filters, padding in CONVS.values():
        index = toeplitz.conv_index((5, 5, input_shape[2], filters), input_shape, padding=padding)
        t = tf.constant(rng.normal(size=(index.shape[1], index.shape[0])), tf.float32)
        x = tf.constant(rng.normal(size=(BATCH_SIZE, index.shape[1])), tf.float32)
        delta = tf.constant(rng.normal(size=(BATCH_SIZE, index.shape[0])), tf.float32)
        operands.append((x, t, delta))

    @tf.function
    def products():
        (x1, t1, _), (x2, t2, d2) = operands
        return [tf.matmul(x1, t1), tf.matmul(x2, t2), tf.matmul(d2, t2, transpose_b=True)]

    return lambda: [[v.numpy() for v in products()] for _ in range(steps)]


def explicit_work(steps: int):
    """``steps`` repetitions of all that the train step computes for its two convs by the
    formulas: ``T(K)`` built from the kernel, the Toeplitz products, and the kernel and bias
    gradients by the patch-matrix product (``ConvIndex.kernel_gradient``), LeNet-5's shapes.
    The rest of the step (pooling, dense layers, loss, optimizer, Keras' loop) comes on top, as
    it does for stock Keras."""
    rng = np.random.default_rng(0)
    operands = []
    for input_shape, filters, padding in CONVS.values():
        index = toeplitz.conv_index((5, 5, input_shape[2], filters), input_shape, padding=padding)
        kernel = tf.constant(rng.normal(size=index.kernel_shape), tf.float32)
        x = tf.constant(rng.normal(size=(BATCH_SIZE, *input_shape)), tf.float32)
        delta = tf.constant(rng.normal(size=(BATCH_SIZE, *index.output_shape)), tf.float32)
        operands.append((index, kernel, x, delta))

    @tf.function
    def work():
        out = []
        for i, (index, kernel, x, delta) in enumerate(operands):
            t = index.transpose_matrix(kernel)
            out.append(tf.matmul(tf.reshape(x, [BATCH_SIZE, -1]), t))
            if i:  # the first conv's input gradient is never needed
                out.append(tf.matmul(tf.reshape(delta, [BATCH_SIZE, -1]), t, transpose_b=True))
            out.extend(index.kernel_gradient(x, delta, tied_bias=True))
        return out

    return lambda: [[v.numpy() for v in work()] for _ in range(steps)]


def conv_rows(repetitions: int, calls: int, modes: tuple[bool, ...] = (False, True)) -> list[dict]:
    """One conv layer, forward and gradients with respect to input, kernel and bias."""
    rows = []
    for name, (input_shape, filters, padding) in CONVS.items():
        x = tf.constant(np.random.default_rng(1).random((BATCH_SIZE, *input_shape)), tf.float32)
        for jit in modes:
            ours = Conv2D(filters, 5, padding=padding, activation="relu")
            stock = keras.layers.Conv2D(filters, 5, padding=padding, activation="relu")
            ours.build(x.shape)
            stock.build(x.shape)
            stock.set_weights(ours.get_weights())
            steps = {"ours": _gradient_step(ours, jit), "stock": _gradient_step(stock, jit)}
            times = interleaved(
                {k: lambda f=f, x=x: f(x) for k, f in steps.items()}, repetitions, calls
            )
            row = ratio_row(
                f"Conv2D layer alone, {name}",
                f"batch {BATCH_SIZE}, {'XLA' if jit else 'graph'}",
                times["ours"],
                times["stock"],
            )
            row["peak_mib"] = tuple(peak_mib(lambda f=f, x=x: f(x)) for f in steps.values())
            rows.append(row)
    return rows


def _gradient_step(layer: keras.layers.Layer, jit_compile: bool):
    """``x -> [dL/dx, dL/dK, dL/db]`` for ``L = sum(layer(x)^2) / 2``, as NumPy arrays."""

    @tf.function(jit_compile=jit_compile)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = 0.5 * tf.reduce_sum(tf.square(layer(x)))
        return tape.gradient(loss, [x, *layer.trainable_variables])

    return lambda x: [g.numpy() for g in step(x)]


def run(quick: bool) -> list[dict]:
    """Rows for the suite table (see ``benchmarks/run.py``)."""
    if quick:
        return [*lenet_rows(5, 12), *conv_rows(5, 5, modes=(False,))]
    return [*lenet_rows(15, 31), *conv_rows(15, 20)]


if __name__ == "__main__":
    run_alone(run, __doc__)
