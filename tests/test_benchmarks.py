"""The benchmarks' peak-memory measure works on any machine (issue 13, item 11).

TensorFlow's CPU memory statistics exist only with its BFC allocator; without it,
``python -m benchmarks --quick`` stopped with ``ValueError: Cannot reset memory stats for device
'CPU:0'``. ``benchmarks.timing.peak_bytes`` reads the process' resident memory instead: the
kernel's reset high-water mark, or samples where that cannot be reset.
"""

import sys
import time
from pathlib import Path

import keras
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


# --- benchmarks/conv_sizes.py (issue 23 item 5) -----------------------------------------------


@pytest.mark.parametrize("patches", ["extract", "views"])
@pytest.mark.parametrize(
    "strides, padding, dilation",
    [(2, "same", 1), (1, "valid", 1), (1, "same", 2)],
    ids=["stride 2 same (Gram form)", "valid (outer form)", "dilated"],
)
def test_conv_sizes_floor_computes_the_per_sample_kernel_gradient_norms(
    strides, padding, dilation, patches
):
    """The floor's stock-op products are each sample's ``||dK_i||^2``: against the per-sample
    kernel gradients of stock ``keras.layers.Conv2D`` by autodiff, float64."""
    from benchmarks import conv_sizes
    from tf_jacbp import tolerances

    rng = np.random.default_rng(0)
    stock = keras.layers.Conv2D(
        8, 3, strides=strides, padding=padding, dilation_rate=dilation, dtype="float64"
    )
    x = tf.constant(rng.normal(size=(3, 9, 9, 4)))
    delta = tf.constant(rng.normal(size=stock.compute_output_shape(x.shape)))
    stock.build(x.shape)
    ours = conv_sizes.stock_squared_norms(stock, x, delta, patches).numpy()
    expected = []
    for i in range(3):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(stock(x[i : i + 1]) * delta[i : i + 1])
        expected.append(float(tf.reduce_sum(tape.gradient(value, stock.kernel) ** 2)))
    np.testing.assert_allclose(ours, expected, rtol=tolerances.RTOL["float64"])


def test_conv_sizes_quick_rows_have_every_cell_and_finite_ratios():
    """A small grid (one cell whose ``T(K)`` fits the limit, one over it) and the wide CNN's
    privacy rows at batch 4: every row present, every ratio finite and positive, the size table
    and the Markdown section name the cell that does not fit."""
    from benchmarks import conv_sizes

    limit = conv_sizes.dense_toeplitz_bytes(4, 2)
    rows = conv_sizes.size_rows([(4, 2), (8, 2)], batch=2, repetitions=1, limit_bytes=limit)
    assert [(r["side"], r["route"]) for r in rows] == [
        (4, "implicit"),
        (4, "materialize"),
        (8, "implicit"),
        (8, "materialize"),
    ]
    assert rows[3]["ratio"] is None and "does not fit: T(K) 64 KiB > 4 KiB" in rows[3]["variant"]
    for row in rows[:3]:
        assert np.isfinite(row["ratio"]) and row["ratio"] > 0
    table = conv_sizes.size_table(rows)
    assert [line[:3] for line in table[1:]] == [["4", "2", "4 KiB"], ["8", "2", "64 KiB"]]
    assert table[2][6] == "does not fit"
    rows += conv_sizes.privacy_rows("wide CNN", repetitions=1, calls=1, batch=4)
    models = conv_sizes.model_rows(rows)
    assert len(models) == 5
    for row in models:
        assert np.isfinite(row["ratio"]) and row["ratio"] > 0, row
    section = conv_sizes.markdown_section(rows, "--quick", "python -m benchmarks --quick")
    assert section.startswith(conv_sizes.SECTION)
    assert "| 8 | 2 | 64 KiB |" in section and "does not fit" in section


def test_conv_sizes_replaces_only_its_own_section_of_the_page(tmp_path):
    """``python -m benchmarks.conv_sizes --markdown PATH`` puts its section before the GPU run's
    the first time and replaces it afterwards; the table above and the GPU run stay as they were."""
    from benchmarks import conv_sizes, run

    page = tmp_path / "benchmarks.md"
    head, gpu = "# Benchmarks\n\n| main table |\n", f"{run.KEPT_FROM} (issue 22)\n\nGPU text\n"
    page.write_text(head + "\n" + gpu)
    first = f"{conv_sizes.SECTION}\n\nfirst run\n"
    conv_sizes.replace_section(str(page), first)
    assert page.read_text() == head + "\n" + first + "\n" + gpu
    second = f"{conv_sizes.SECTION}\n\nsecond run\n"
    conv_sizes.replace_section(str(page), second)
    assert page.read_text() == head + "\n" + second + "\n" + gpu
