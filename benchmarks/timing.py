"""Interleaved A/B timing and peak memory, shared by the benchmarks.

Each repetition times every candidate once, in turn, so that a slow phase of the machine falls
on all of them; a ratio is the median over repetitions of ``ours / theirs`` in the same
repetition, with the smallest and largest ratio as its spread. ``input_pipeline`` feeds ``fit``
without tf.data's autotuner, whose background work on this 2-core machine halved whole epochs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf


def interleaved(
    candidates: dict[str, Callable[[], object]], repetitions: int, calls: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one list entry per repetition (after one warm-up)."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repetitions):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def ratio_row(
    benchmark: str, variant: str, ours: list[float], theirs: list[float], target: str = ""
) -> dict:
    """One table row: medians in milliseconds, the median ratio and its spread."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {
        "benchmark": benchmark,
        "variant": variant,
        "ours_ms": 1000 * statistics.median(ours),
        "theirs_ms": 1000 * statistics.median(theirs),
        "ratio": statistics.median(ratios),
        "spread": (min(ratios), max(ratios)),
        "target": target,
    }


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak bytes TensorFlow's CPU allocator held while ``fn`` ran, beyond what it held before
    (tensors that other rows keep alive, such as datasets, do not count), in MiB."""
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    fn()
    return (tf.config.experimental.get_memory_info("CPU:0")["peak"] - before) / 2**20


def input_pipeline(
    x: np.ndarray, y: np.ndarray, batch: int, shuffle: str = "samples", seed: int = 0
) -> tf.data.Dataset:
    """``(x, y)`` in batches of ``batch`` for ``fit``, with tf.data's autotuner off.

    ``shuffle="samples"``: the samples are reshuffled every epoch (a permutation of the indices,
    then a gather per batch; two pipelines with the same ``seed`` give the same orders).
    ``shuffle="batches"``: batched once and cached, only the batch order reshuffled: no work
    per step besides handing over a batch, for throughput rows at large batches (the gather of
    4096 random rows per step ran beside the compute and cost about a third of the epoch).

    On this 2-core machine the autotuner's background work took one of the two cores for
    seconds at a time and halved whole epochs (measured, stock Keras alike; ``fit`` on NumPy
    arrays builds an autotuned pipeline); with it off and a one-thread private pool the epochs
    run at the compiled step's speed.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 1
    if shuffle == "batches":
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).cache()
        data = data.shuffle(-(-len(x) // batch), seed=seed)
    elif shuffle == "samples":
        images, labels = tf.constant(x), tf.constant(y)
        order = tf.data.Dataset.range(len(x)).shuffle(len(x), seed=seed)
        data = order.batch(batch).map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))
    else:
        raise ValueError(f'input_pipeline: shuffle must be "samples" or "batches", got {shuffle!r}')
    return data.prefetch(1).with_options(options)
