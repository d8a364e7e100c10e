"""Interleaved A/B timing and peak memory, shared by the benchmarks.

Each repetition times every candidate once, in turn, so that a slow phase of the machine falls
on all of them; a ratio is the median over repetitions of ``ours / theirs`` in the same
repetition, with the smallest and largest ratio as its spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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
    """Peak bytes TensorFlow's CPU allocator held while ``fn`` ran, in MiB."""
    tf.config.experimental.reset_memory_stats("CPU:0")
    fn()
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20
