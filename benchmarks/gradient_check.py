"""Overhead of ``tf_jacbp.callbacks.GradientCheck`` on ``model.fit``: epoch time with / without.

LeNet-100-300-10 (``tf_jacbp.models.lenet_100_300_10()``) trains on the full 60,000 Fashion-MNIST
training images with ``tf_jacbp.losses.SparseCategoricalCrossentropy(from_logits=True)`` and
Adam, batch size 32, a probe of 256 training images. Each run is a fresh model fitted for one
epoch, timed from the end of its first batch (after the tracing of ``fit``'s train function and
of the callback's functions) to the last callback's ``on_epoch_end`` (so the callback's epoch-end
check is inside). Runs with and without the callback are interleaved in every repetition, and
the overhead is the median over repetitions of ``epoch time with callback / epoch time without -
1``, in wall time and in the process's CPU time (which other processes sharing the cores disturb
far less), next to the time spent inside the callback's own hooks as a share of the epoch.

    python -m benchmarks.gradient_check [--quick]      # from the repository root

``--quick`` (under 2 minutes) times the default ``every_n_batches`` only, with fewer repetitions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import input_pipeline, ratio_row  # noqa: E402
from tf_jacbp import losses, models  # noqa: E402
from tf_jacbp.callbacks import DEFAULT_EVERY_N_BATCHES, GradientCheck  # noqa: E402
from tf_jacbp.datasets import load_fashion_mnist  # noqa: E402

PROBE_SIZE = 256
BATCH_SIZE = 32


def load_training_set() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's 60,000 training images as float32 in [0, 1] ``(N, 28, 28)``, labels."""
    (x, y), _ = load_fashion_mnist()
    return (x / 255.0).astype(np.float32), y.astype(np.int64)


class _Clock(keras.callbacks.Callback):
    """Appends ``(wall, cpu)`` times after the first batch (``start``) or at the epoch end.

    Starting after the first batch leaves out the tracing of ``fit``'s train function (and the
    callback's start-of-training check, which traces its own functions). ``cpu`` is this
    process's CPU time over all threads (``time.process_time``): unlike wall time, it hardly
    moves when other processes compete for the cores.
    """

    def __init__(self, times: list[tuple[float, float]], start: bool):
        super().__init__()
        self.times = times
        self.start = start

    def _tick(self) -> None:
        self.times.append((time.perf_counter(), time.process_time()))

    def on_train_batch_end(self, batch, logs=None):
        if self.start and batch == 0:
            self._tick()

    def on_epoch_end(self, epoch, logs=None):
        if not self.start:
            self._tick()


class _TimedGradientCheck(GradientCheck):
    """``GradientCheck`` that adds up the wall time spent in its batch-end and epoch-end hooks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook_seconds = 0.0

    def _timed(self, hook, *args) -> None:
        start = time.perf_counter()
        hook(*args)
        self.hook_seconds += time.perf_counter() - start

    def on_train_batch_end(self, batch, logs=None):
        self._timed(super().on_train_batch_end, batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._timed(super().on_epoch_end, epoch, logs)


def timed_epoch(x, y, every_n_batches: int | None) -> dict[str, float]:
    """Wall and CPU seconds of one epoch after its first batch; with the callback, its checks
    in that window and the seconds spent in its hooks. ``every_n_batches=None``: no callback."""
    keras.utils.set_random_seed(0)
    model = models.lenet_100_300_10()
    model.compile(keras.optimizers.Adam(), losses.SparseCategoricalCrossentropy(from_logits=True))
    starts: list[tuple[float, float]] = []
    ends: list[tuple[float, float]] = []
    middle = []
    if every_n_batches is not None:
        check = _TimedGradientCheck(
            (x[:PROBE_SIZE], y[:PROBE_SIZE]), every_n_batches=every_n_batches, verbose=0
        )
        middle = [check]
    callbacks = [_Clock(starts, True), *middle, _Clock(ends, False)]
    data = input_pipeline(x, y, BATCH_SIZE)  # the autotuner off: see input_pipeline
    model.fit(data, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    out = {"wall": ends[0][0] - starts[0][0], "cpu": ends[0][1] - starts[0][1]}
    if middle:
        if any(not r.passed for r in check.records):
            raise RuntimeError(f"GradientCheck reported a mismatch:\n{check.summary()}")
        out["checks"] = len({r.step for r in check.records if r.step > 0})
        out["hooks"] = check.hook_seconds
    return out


def run(quick: bool) -> list[dict]:
    """One row per ``every_n_batches``, in the suite's columns (``benchmarks.run``) and more.

    ``ratio`` (``ours_ms``: epoch with the callback, ``theirs_ms``: without) and ``overhead_cpu``
    are medians over repetitions of the per-repetition ratio, ``overhead_wall = ratio - 1``;
    ``hook_share`` is the median time spent in the callback's hooks over the median epoch time
    without it.
    """
    x, y = load_training_set()
    if quick:  # half an epoch of Fashion-MNIST: the same step and check costs, half the time
        x, y = x[:30000], y[:30000]
    candidates = [DEFAULT_EVERY_N_BATCHES] if quick else [25, 50, 100, DEFAULT_EVERY_N_BATCHES, 500]
    repetitions = 3 if quick else 7
    baseline: list[dict[str, float]] = []
    timed: dict[int, list[dict[str, float]]] = {n: [] for n in candidates}
    for _ in range(repetitions):
        baseline.append(timed_epoch(x, y, None))
        for n in candidates:
            timed[n].append(timed_epoch(x, y, n))
    base_wall = statistics.median(b["wall"] for b in baseline)
    rows = []
    for n in candidates:
        runs = timed[n]
        default = " (default)" if n == DEFAULT_EVERY_N_BATCHES else ""
        row = ratio_row(
            "gradient_check",
            f"every_n_batches={n}{default}",
            [r["wall"] for r in runs],
            [b["wall"] for b in baseline],
            target="<= 1.05",
        )
        row.update(
            {
                "every_n_batches": n,
                "default": bool(default),
                "checks_per_epoch": runs[0]["checks"],
                "overhead_wall": row["ratio"] - 1,
                "overhead_cpu": statistics.median(
                    r["cpu"] / b["cpu"] - 1 for r, b in zip(runs, baseline, strict=True)
                ),
                "hook_share": statistics.median(r["hooks"] for r in runs) / base_wall,
                "ms_per_check": 1000 * statistics.median(r["hooks"] / r["checks"] for r in runs),
                "repetitions": repetitions,
                "batch_size": BATCH_SIZE,
                "probe_size": PROBE_SIZE,
                "steps_per_epoch": -(-len(x) // BATCH_SIZE),
            }
        )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="default every_n_batches only")
    args = parser.parse_args()
    rows = run(args.quick)
    first = rows[0]
    print(
        f"LeNet-100-300-10 on Fashion-MNIST train: {first['steps_per_epoch']} steps of "
        f"{first['batch_size']}, probe of {first['probe_size']}, {first['repetitions']} "
        "interleaved repetitions, medians"
    )
    header = (
        "every_n_batches",
        "checks/epoch",
        "ms/check",
        "epoch s without",
        "epoch s with",
        "overhead wall",
        "overhead cpu",
        "in callback",
    )
    print("  ".join(f"{h:>15}" for h in header))
    for r in rows:
        cells = (
            f"{r['every_n_batches']}{' (default)' if r['default'] else ''}",
            str(r["checks_per_epoch"]),
            f"{r['ms_per_check']:.1f}",
            f"{r['theirs_ms'] / 1000:.2f}",
            f"{r['ours_ms'] / 1000:.2f}",
            f"{100 * r['overhead_wall']:+.1f}%",
            f"{100 * r['overhead_cpu']:+.1f}%",
            f"{100 * r['hook_share']:.1f}%",
        )
        print("  ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
