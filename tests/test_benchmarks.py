"""The benchmarks' peak-memory measure works on any machine (issue 13, item 11).

TensorFlow's CPU memory statistics exist only with its BFC allocator; without it,
``python -m benchmarks --quick`` stopped with ``ValueError: Cannot reset memory stats for device
'CPU:0'``. ``benchmarks.timing.peak_bytes`` reads the process' resident memory instead: the
kernel's reset high-water mark, or samples where that cannot be reset.
"""

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import timing  # noqa: E402

MIB = 2**20


def _hold(size: int, seconds: float = 0.05):
    """Allocate and touch ``size`` bytes, keep them ``seconds``, free them."""

    def fn():
        block = np.ones(size // 8)
        time.sleep(seconds)
        del block

    return fn


@pytest.mark.parametrize("reset", [True, False], ids=["high-water mark", "sampled"])
def test_peak_bytes_sees_memory_allocated_and_freed_inside_the_call(reset, monkeypatch):
    if not reset:
        monkeypatch.setattr(timing, "reset_high_water_mark", lambda: False)
    elif not timing.reset_high_water_mark():
        pytest.skip("this kernel does not let a process reset its VmHWM")
    peak = timing.peak_bytes(_hold(96 * MIB))
    assert 90 * MIB <= peak <= 110 * MIB
    assert timing.peak_bytes(lambda: None) < 8 * MIB  # a later call starts from its own level


def test_peak_bytes_counts_memory_the_call_takes_from_freed_heap_pages():
    """Freed memory the C allocator keeps (here 40 MiB of 1 MiB blocks below a live one) would
    be reused without raising the resident memory: it is returned to the system first."""
    big = np.ones(4 * MIB // 8)  # once freed, glibc serves blocks below 4 MiB from its heap
    del big
    blocks = [np.ones(MIB // 8) for _ in range(41)]
    pinned = blocks.pop()
    del blocks

    def fn():
        return len([np.ones(MIB // 8) for _ in range(40)])

    assert timing.peak_bytes(fn) >= 36 * MIB
    del pinned


def test_peak_mib_of_a_tensorflow_step_without_the_bfc_allocator():
    """The measure reads the process, not TensorFlow's allocator: TensorFlow's default CPU
    allocator keeps no resettable statistics on some machines (the old allocator-based measure
    raised "Cannot reset memory stats" there) and does on others (seen on this project's
    machines on 2026-12-04, same TensorFlow 2.21.0); the peak is right on both."""

    def step():
        x = tf.random.normal([1024, 4096])  # 16 MiB, then its 64 MiB product
        return float(tf.reduce_sum(tf.matmul(x, x, transpose_a=True)))

    step()
    assert 40 <= timing.peak_mib(step) <= 160
