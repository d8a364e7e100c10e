"""Interleaved A/B timing and peak memory (resident, any allocator), shared by the benchmarks.

Each repetition times every candidate once, in turn, so that a slow phase of the machine falls
on all of them; a ratio is the median over repetitions of ``ours / theirs`` in the same
repetition, with the smallest and largest ratio as its spread. ``input_pipeline`` feeds ``fit``
without tf.data's autotuner, whose background work on this 2-core machine halved whole epochs.
"""

from __future__ import annotations

import ctypes
import statistics
import threading
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


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None without it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter ``VmHWM`` to the current RSS (Linux >= 4.0: write "5"
    to ``/proc/self/clear_refs``); False where that is not possible or did not take effect."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 2**20


def _sampled_peak(fn: Callable[[], object], interval: float = 0.001) -> int:
    """The largest ``VmRSS`` read every ``interval`` seconds by a thread while ``fn`` runs
    (TensorFlow's kernels release the GIL, so the thread keeps sampling during them)."""
    peak, done = [_status_bytes("VmRSS") or 0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status_bytes("VmRSS") or 0)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _status_bytes("VmRSS") or 0)


def _release_free_memory() -> None:
    """Return the memory the C allocator holds free to the system (glibc's ``malloc_trim``), so
    that what ``fn`` allocates next shows in the resident memory instead of reusing pages that
    already count; nothing where the C library has no ``malloc_trim``."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def peak_bytes(fn: Callable[[], object]) -> float:
    """How far the process' resident memory rose above its level before ``fn`` while ``fn``
    ran, in bytes; NaN where the resident memory cannot be read (no ``/proc``).

    Works with any allocator (TensorFlow's CPU memory statistics exist only with its BFC
    allocator): the kernel's high-water mark ``VmHWM``, reset before ``fn``; where it cannot be
    reset, the resident memory sampled every millisecond (a peak shorter than that may be
    missed). Memory the C allocator holds free is returned to the system first
    (``malloc_trim``), so that what ``fn`` allocates counts even where it would have reused freed
    pages; whatever other rows keep alive (data sets) counts in neither reading, so it is left
    out.
    """
    _release_free_memory()
    before = _status_bytes("VmRSS")
    pooled = _allocator_current()  # None unless TensorFlow's allocator keeps statistics
    if before is None:
        fn()
        return float("nan")
    if reset_high_water_mark():
        fn()
        peak = _status_bytes("VmHWM") or 0
    else:
        peak = _sampled_peak(fn)
    rise = float(max(peak - before, 0))
    if pooled is not None:  # a pooling allocator reuses what it holds: its own peak counts
        rise = max(rise, float(tf.config.experimental.get_memory_info("CPU:0")["peak"] - pooled))
    return rise


def _allocator_current() -> float | None:
    """TensorFlow's CPU allocator's bytes in use, its peak statistic reset to that, or None
    where the allocator keeps no statistics (TensorFlow's default allocator on some machines;
    its BFC allocator, which pools memory the resident size then does not show, on others)."""
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
        return float(tf.config.experimental.get_memory_info("CPU:0")["current"])
    except (ValueError, RuntimeError):
        return None


def peak_mib(fn: Callable[[], object]) -> float:
    """``peak_bytes(fn)`` in MiB: the peak resident memory ``fn`` added to the process."""
    return peak_bytes(fn) / 2**20


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
