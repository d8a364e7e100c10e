"""Convolutions at any size (issue 23 item 5): one layer's train step over a grid of sizes, and
three CNNs against their stock-Keras twins.

**The size table.** ``Conv2D(C, 3x3, padding="same")`` on ``(batch, side, side, C)``
(``C_in = C_out = C``), one train step of the layer alone: forward, and the gradients of
``sum(z^2) / 2`` with respect to the input, the kernel and the bias, in one ``tf.function`` with a
``GradientTape`` (graph mode). Three candidates, same weights, interleaved in every repetition:
``tf_jacbp.layers.Conv2D(toeplitz="implicit")`` (``T(K)`` applied by convolution, transposed
convolution and the filter gradient), the same layer with ``toeplitz="materialize"`` (``T(K)``
formed, dense, and multiplied) where that dense ``T(K)`` (``side^2 C`` square, float32) is at most
``MATERIALIZE_LIMIT_BYTES``, else "does not fit", and ``keras.layers.Conv2D``.

**The models** (synthetic batches: uniform images, labels in 0..9; ``MODELS``): the wide CNN of
issue 23 (``Conv2D(64, 3x3, stride 2) -> Conv2D(128, 3x3, stride 2) -> Dense``, ReLU, 32x32x3,
batch 64), ResNet-20 (``tf_jacbp.models.resnet20``, 32x32x3, batch 64) and LeNet-5
(``tf_jacbp.models.lenet5``, 28x28x1, batch 128), each against its twin of ``keras.layers``
(``benchmarks.twins.stock_twin``: same architecture, same initial weights):

* the train step, ``train_on_batch`` (Adam), graph and XLA (``jit_compile=True``);
* the peak memory of one such step, ours / stock (``benchmarks.timing.peak_bytes``: how far the
  process' resident memory rose; the median of three readings each);
* graph mode, wide CNN and ResNet-20: ``tf_jacbp.jacobian.per_example_gradient_norms`` against one
  plain batch gradient (``tape.gradient`` of the mean loss), and a DP-SGD step
  (``tf_jacbp.privacy.make_private``, clip 1.0, noise 1.1, SGD) against the same model's ordinary
  step. DP-SGD needs per-sample maps: ResNet-20's batch normalizations are frozen
  (``trainable=False``, the moving statistics) in both of those two models; a batch statistic
  couples the samples, so it has no per-example gradient to clip.

**Floors**, for the two ratios against a plain gradient or step: per-example norms need the
forward pass and the ``delta`` of every layer, as a plain gradient does, but instead of one
filter gradient per convolution they need each sample's ``||X_patch,i^T Delta_i||_F^2``. Timed
alone with stock TensorFlow ops for every convolution of the model, at its shapes:
``products`` (the patches by ``tf.image.extract_patches`` or as strided views, whichever is
faster at that layer's shapes, then the cheaper exact form: the Gram form ``<X X^T, D D^T>``
when ``P (M + F) < M F``, else the outer product ``X^T D``) and
``filter`` (the filter gradients, ``Conv2DBackpropFilter``). The norms' floor is ``(plain -
filter + products) / plain``; the DP-SGD step's is ``(step + products) / step`` (the step's
backward pass and its filter gradients, with clipped ``delta``, stay; the products come on top).

The quick run (CI, under a minute): three cells of the grid (``QUICK_GRID``), the wide CNN's
train step in graph mode, LeNet-5's under XLA, and the wide CNN's norm and DP-SGD rows, with
fewer repetitions.

    python -m benchmarks.conv_sizes [--quick]     # this section alone; --quick: under a minute
    python -m benchmarks.conv_sizes --markdown docs/benchmarks.md   # and replace it in the page
    python -m benchmarks --markdown docs/benchmarks.md              # the whole page, this included
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

if not __package__:  # run as a script: import from the repository
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.table import COLUMNS, cell, machine, print_table  # noqa: E402
from benchmarks.timing import interleaved, peak_bytes, ratio_row  # noqa: E402
from benchmarks.workloads import batch_gradient, compiled_pair  # noqa: E402
from tf_jacbp import geometry, jacobian, layers, losses, models, privacy  # noqa: E402
from tf_jacbp.hooks import attach  # noqa: E402

SIDES = (8, 16, 32, 64)
CHANNELS = (16, 32, 64, 128, 256)
SKIPPED = {(64, 256): "one step is about 460 GFLOP: about 8 s a candidate on two cores"}
"""Cells of the full grid left out, with why (the thinned large end)."""
SIZE_BATCH = 32
MATERIALIZE_LIMIT_BYTES = 2**30
"""The materialized route is timed only where its dense ``T(K)`` is at most this (1 GiB)."""
QUICK_GRID = ((8, 16), (8, 64), (32, 32))
"""The quick run's cells: two whose ``T(K)`` materializes (4 MiB, 64 MiB), one over the limit."""
SECTION = "## Convolutions at any size (issue 23 item 5)"


def wide_cnn() -> keras.Model:
    """Issue 23's wide CNN of tf_jacbp layers: ``Conv2D(64, 3x3, stride 2, same, relu) ->
    Conv2D(128, 3x3, stride 2, same, relu) -> Flatten -> Dense(10)`` on 32x32x3; its dense
    ``T(K)`` are 192 MiB and 512 MiB (``toeplitz="auto"`` applies both by convolution)."""
    return attach(
        keras.Sequential(
            [
                keras.Input((32, 32, 3)),
                layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
                layers.Conv2D(128, 3, strides=2, padding="same", activation="relu"),
                layers.Flatten(),
                layers.Dense(10),
            ],
            name="wide_cnn",
        )
    )


MODELS: dict[str, tuple[Callable[[], keras.Model], int]] = {
    "wide CNN": (wide_cnn, 64),
    "ResNet-20": (models.resnet20, 64),
    "LeNet-5": (models.lenet5, 128),
}
"""Name -> (builder, batch size)."""


def dense_toeplitz_bytes(side: int, channels: int) -> int:
    """Bytes of the size table's dense float32 ``T(K)``: ``(side^2 C) x (side^2 C)`` ("same",
    stride 1, ``C_in = C_out``)."""
    return (side * side * channels) ** 2 * 4


def size_label(nbytes: float) -> str:
    """``nbytes`` in KiB, MiB or GiB, three significant digits."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def layer_step(layer: keras.layers.Layer) -> Callable[[tf.Tensor], list]:
    """``x -> [dL/dx, dL/dK, dL/db]`` for ``L = sum(layer(x)^2) / 2``, compiled, as NumPy."""

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = 0.5 * tf.reduce_sum(tf.square(layer(x)))
        return tape.gradient(loss, [x, *layer.trainable_variables])

    return lambda x: [g.numpy() for g in step(x)]


def size_rows(
    cells: list[tuple[int, int]],
    batch: int,
    repetitions: int,
    limit_bytes: int = MATERIALIZE_LIMIT_BYTES,
) -> list[dict]:
    """Two rows per cell ``(side, channels)``: implicit / stock and materialized / stock (the
    latter with ``ratio`` None and the reason in ``variant`` where ``T(K)`` is over
    ``limit_bytes``). Rows carry ``side``, ``channels``, ``route`` and ``toeplitz_bytes`` for the
    size table."""
    rows = []
    for side, channels in cells:
        nbytes = dense_toeplitz_bytes(side, channels)
        fits = nbytes <= limit_bytes
        x = tf.constant(
            np.random.default_rng(0).normal(size=(batch, side, side, channels)), tf.float32
        )
        keras.utils.set_random_seed(0)
        candidates = {
            "implicit": layers.Conv2D(channels, 3, padding="same", toeplitz="implicit"),
            "stock": keras.layers.Conv2D(channels, 3, padding="same"),
        }
        if fits:
            candidates["materialize"] = layers.Conv2D(
                channels,
                3,
                padding="same",
                toeplitz="materialize",
                toeplitz_budget_bytes=8 * MATERIALIZE_LIMIT_BYTES,  # limit_bytes decides
            )
        for layer in candidates.values():
            layer.build(x.shape)
            layer.set_weights(candidates["implicit"].get_weights())
        steps = {name: layer_step(layer) for name, layer in candidates.items()}
        times = interleaved(
            {k: lambda f=f, x=x: f(x) for k, f in steps.items()},
            repetitions,
            calls_for(lambda f=steps["stock"], x=x: f(x)),
        )
        base = f"{side}x{side}x{channels} -> {channels}, batch {batch}, graph"
        extra = {"side": side, "channels": channels, "toeplitz_bytes": nbytes}
        for route in ("implicit", "materialize"):
            benchmark = f"Conv2D 3x3 same train step, {route} vs stock"
            if route in times:
                row = ratio_row(benchmark, base, times[route], times["stock"])
            else:
                row = {
                    "benchmark": benchmark,
                    "variant": f"{base}; does not fit: T(K) {size_label(nbytes)} > "
                    f"{size_label(limit_bytes)}",
                    "ratio": None,
                    "theirs_ms": 1000 * statistics.median(times["stock"]),
                }
            rows.append({**row, **extra, "route": route})
    return rows


def calls_for(fn: Callable[[], object], seconds: float = 0.05) -> int:
    """Calls per repetition so that one repetition of ``fn`` takes about ``seconds`` (at least
    one, at most 20): a step of a millisecond or two is timed over several calls."""
    fn()
    start = time.perf_counter()
    fn()
    return max(1, min(20, round(seconds / (time.perf_counter() - start))))


def random_batch(shape: tuple[int, ...], batch: int) -> tuple[tf.Tensor, tf.Tensor]:
    """``batch`` uniform images of ``shape`` and labels in 0..9."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(batch, *shape)), tf.float32)
    return x, tf.constant(rng.integers(0, 10, size=batch))


def median_peak_mib(fn: Callable[[], object], readings: int = 3) -> float:
    """The median of ``readings`` of ``peak_bytes(fn)``, in MiB."""
    return statistics.median(peak_bytes(fn) for _ in range(readings)) / 2**20


def train_rows(name: str, jit: bool, repetitions: int, batch: int | None = None) -> list[dict]:
    """The train step ours / stock and its peak memory ours / stock, one mode (``batch``:
    ``MODELS``' unless given)."""
    build, default_batch = MODELS[name]
    batch = batch or default_batch
    ours, stock = compiled_pair(build, jit)
    x, y = random_batch(tuple(ours.inputs[0].shape[1:]), batch)
    steps = {"ours": lambda: ours.train_on_batch(x, y), "stock": lambda: stock.train_on_batch(x, y)}
    times = interleaved(steps, repetitions)
    variant = f"batch {batch}, train_on_batch, {'XLA' if jit else 'graph'}"
    target = "<= 1.2"
    row = ratio_row(f"{name} train step", variant, times["ours"], times["stock"], target)
    peaks = tuple(median_peak_mib(f) for f in steps.values())
    memory = {
        "benchmark": f"{name} peak memory of one step",
        "variant": variant,
        "ratio": peaks[0] / peaks[1] if peaks[1] > 0 else float("nan"),
        "target": "<= 1.5",
        "peak_mib": peaks,
    }
    return [row, memory]


def freeze_batch_normalization(model: keras.Model) -> keras.Model:
    """``model`` with its batch normalizations frozen (``trainable=False``: the moving
    statistics, a per-sample map), as DP-SGD needs them."""
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
    return model


def conv_shapes(model: keras.Model, batch: int) -> list[tuple[keras.layers.Layer, tuple, tuple]]:
    """``(layer, input shape, output shape)`` of each tf_jacbp ``Conv2D`` of ``model``, with
    ``batch`` as the batch size."""
    return [
        (layer, (batch, *layer.input.shape[1:]), (batch, *layer.output.shape[1:]))
        for layer in model.layers
        if isinstance(layer, layers.Conv2D)
    ]


def stock_squared_norms(
    layer: keras.layers.Layer, x: tf.Tensor, delta: tf.Tensor, patches: str = "extract"
) -> tf.Tensor:
    """Each sample's ``||X_patch,i^T Delta_i||_F^2`` for a ``Conv2D`` ``layer`` (kernel part of
    its per-example gradient's squared norm), ``x`` ``(batch, H, W, C)``, ``delta`` the layer's
    output shape, by stock ops only, ``(batch,)``.

    The patches ``X_patch,i`` (``P x M``, ``M = kh kw C``) by ``tf.image.extract_patches``
    (``patches="extract"``) or as ``kh kw`` strided views of the padded input, stacked
    (``"views"``; which is faster depends on the shape), then the cheaper exact form:
    ``<X X^T, D D^T>`` (Gram, ``P x P``) when ``P (M + F) < M F``, else ``||X^T D||^2`` (outer).
    """
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.strides, layer.dilation_rate
    batch, positions = x.shape[0], math.prod(delta.shape[1:3])
    if patches == "extract":
        a = tf.image.extract_patches(
            x, [1, kh, kw, 1], [1, sh, sw, 1], [1, dh, dw, 1], layer.padding.upper()
        )
    elif patches == "views":
        out = delta.shape[1:3]
        pads = [
            geometry.padding_amounts(n, k, s, layer.padding, d)
            for n, k, s, d in zip(x.shape[1:3], (kh, kw), (sh, sw), (dh, dw), strict=True)
        ]
        x = tf.pad(x, [(0, 0), *pads, (0, 0)])
        views = [
            x[
                :,
                p * dh : p * dh + (out[0] - 1) * sh + 1 : sh,
                q * dw : q * dw + (out[1] - 1) * sw + 1 : sw,
            ]
            for p in range(kh)
            for q in range(kw)
        ]
        a = tf.stack(views, axis=3)  # (batch, out_h, out_w, taps, C): row-major (tap, c)
    else:
        raise ValueError(
            f'stock_squared_norms: patches must be "extract" or "views", got {patches!r}'
        )
    a = tf.reshape(a, [batch, positions, -1])
    d = tf.reshape(delta, [batch, positions, -1])
    m, f = a.shape[2], d.shape[2]
    if positions * (m + f) < m * f:
        gram = tf.matmul(a, a, transpose_b=True) * tf.matmul(d, d, transpose_b=True)
        return tf.reduce_sum(gram, axis=(1, 2))
    return tf.reduce_sum(tf.square(tf.matmul(a, d, transpose_a=True)), axis=(1, 2))


def fastest_patches(layer: keras.layers.Layer, x: tf.Tensor, delta: tf.Tensor) -> str:
    """The faster of ``stock_squared_norms``' two patch constructions at these shapes (the
    median of five calls each, compiled)."""
    seconds = {}
    for patches in ("extract", "views"):
        fn = tf.function(lambda patches=patches: stock_squared_norms(layer, x, delta, patches))
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn().numpy()
            times.append(time.perf_counter() - start)
        seconds[patches] = statistics.median(times)
    return min(seconds, key=seconds.get)


def stock_conv_work(model: keras.Model, batch: int) -> dict[str, Callable[[], object]]:
    """The floors' parts for every convolution of ``model`` at its shapes, stock TensorFlow ops
    on random operands: ``"products"``, each sample's ``||X_patch,i^T Delta_i||_F^2``
    (``stock_squared_norms``, the faster patch construction for each layer), and
    ``"filter"``, the batch filter gradients (``Conv2DBackpropFilter``)."""
    rng = np.random.default_rng(1)
    operands = []
    for layer, in_shape, out_shape in conv_shapes(model, batch):
        x = tf.constant(rng.normal(size=in_shape), tf.float32)
        delta = tf.constant(rng.normal(size=out_shape), tf.float32)
        operands.append((layer, x, delta, fastest_patches(layer, x, delta)))

    @tf.function
    def products():
        return [stock_squared_norms(*operand) for operand in operands]

    @tf.function
    def filters():
        return [
            tf.compat.v1.nn.conv2d_backprop_filter(
                x,
                [*layer.kernel_size, x.shape[-1], layer.filters],
                delta,
                [1, *layer.strides, 1],
                layer.padding.upper(),
            )
            for layer, x, delta, _ in operands
        ]

    return {
        "products": lambda: [v.numpy() for v in products()],
        "filter": lambda: [v.numpy() for v in filters()],
    }


def _plain_step(model: keras.Model, x: tf.Tensor, y: tf.Tensor) -> Callable[[], object]:
    """``model``'s Keras ``train_step`` on ``(x, y)`` (SGD), compiled as ``fit`` traces it."""
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.optimizer.build(model.trainable_variables)
    return tf.function(lambda: model.train_step((x, y)), autograph=False)


def privacy_rows(name: str, repetitions: int, calls: int, batch: int | None = None) -> list[dict]:
    """Per-example gradient norms / one batch gradient and a DP-SGD step / the ordinary step,
    graph mode, each with its floor (module docstring; ``batch``: ``MODELS``' unless given)."""
    build, default_batch = MODELS[name]
    batch = batch or default_batch
    keras.utils.set_random_seed(0)
    model = build()
    x, y = random_batch(tuple(model.inputs[0].shape[1:]), batch)
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    norms = tf.function(
        lambda x, y: jacobian.per_example_gradient_norms(model, x, y, loss=loss), autograph=False
    )
    plain = batch_gradient(model, loss)
    keras.utils.set_random_seed(0)
    plain_model = freeze_batch_normalization(build())
    dp_model = privacy.make_private(
        freeze_batch_normalization(build()), l2_norm_clip=1.0, noise_multiplier=1.1, seed=0
    )
    work = stock_conv_work(model, batch)
    candidates = {
        "norms": lambda: norms(x, y),
        "plain": lambda: plain(x, y),
        "dp": _plain_step(dp_model, x, y),
        "step": _plain_step(plain_model, x, y),
        **work,
    }
    t = interleaved(candidates, repetitions, calls)
    variant = f"{name}, batch {batch}, graph"
    norms_floor = [
        (p - f + q) / p for p, f, q in zip(t["plain"], t["filter"], t["products"], strict=True)
    ]
    dp_floor = [(s + q) / s for s, q in zip(t["step"], t["products"], strict=True)]
    frozen = "; batch normalizations frozen" if name == "ResNet-20" else ""
    return [
        ratio_row(
            "per_example_gradient_norms vs one batch gradient",
            variant,
            t["norms"],
            t["plain"],
            "<= 1.5",
        ),
        _floor_row(
            "floor: batch gradient - filter gradients + per-sample norm products (stock ops)",
            variant,
            norms_floor,
        ),
        ratio_row(
            "DP-SGD train step vs the ordinary train step",
            f"{variant}; clip 1.0, noise 1.1{frozen}",
            t["dp"],
            t["step"],
            "<= 2.0",
        ),
        _floor_row(
            "floor: ordinary step + per-sample norm products (stock ops)", variant, dp_floor
        ),
        ratio_row(
            "floor part: per-sample norm products alone vs one batch gradient",
            f"{variant}; patches, then the Gram or outer form; every conv",
            t["products"],
            t["plain"],
            "floor",
        ),
    ]


def _floor_row(benchmark: str, variant: str, ratios: list[float]) -> dict:
    return {
        "benchmark": benchmark,
        "variant": variant,
        "ratio": statistics.median(ratios),
        "spread": (min(ratios), max(ratios)),
        "target": "floor",
    }


def run(quick: bool) -> list[dict]:
    """Rows for the suite table (see ``benchmarks/run.py``): the size table's, then the models'."""
    if quick:
        rows = size_rows(list(QUICK_GRID), SIZE_BATCH, repetitions=2)
        rows += train_rows("wide CNN", jit=False, repetitions=3)
        rows += train_rows("LeNet-5", jit=True, repetitions=3)
        return rows + privacy_rows("wide CNN", repetitions=3, calls=1)
    cells = [(s, c) for s in SIDES for c in CHANNELS if (s, c) not in SKIPPED]
    rows = size_rows(cells, SIZE_BATCH, repetitions=5)
    for name in MODELS:
        for jit in (False, True):
            rows += train_rows(name, jit, repetitions=9)
    for name in ("wide CNN", "ResNet-20"):
        rows += privacy_rows(name, repetitions=9, calls=1)
    return rows


def size_table(rows: list[dict]) -> list[list[str]]:
    """The size table's cells: one line per ``(side, channels)``, header first."""
    header = [
        "side",
        "channels",
        "dense T(K)",
        "stock ms",
        "implicit ms",
        "implicit / stock",
        "materialized ms",
        "materialized / stock",
    ]
    lines = [header]
    cells: dict[tuple[int, int], dict[str, dict]] = {}
    for row in rows:
        if "route" in row:
            cells.setdefault((row["side"], row["channels"]), {})[row["route"]] = row
    for (side, channels), routes in cells.items():
        imp, mat = routes["implicit"], routes["materialize"]
        fits = mat["ratio"] is not None
        lines.append(
            [
                str(side),
                str(channels),
                size_label(imp["toeplitz_bytes"]),
                cell(imp["theirs_ms"]),
                cell(imp["ours_ms"]),
                f"{cell(imp['ratio'])} ({cell(imp['spread'])})",
                cell(mat["ours_ms"]) if fits else "does not fit",
                f"{cell(mat['ratio'])} ({cell(mat['spread'])})" if fits else "",
            ]
        )
    measured = {side for side, _ in cells}
    for side, channels in SKIPPED:
        if side in measured:
            nbytes = size_label(dense_toeplitz_bytes(side, channels))
            lines.append([str(side), str(channels), nbytes, "skipped", *[""] * (len(header) - 4)])
    return lines


def skipped_notes(rows: list[dict]) -> list[str]:
    """Why each cell the size table shows as skipped was left out."""
    shown = {row["side"] for row in rows if "route" in row}
    return [
        f"{side}x{side}x{channels} skipped: {why}."
        for (side, channels), why in SKIPPED.items()
        if side in shown
    ]


def model_rows(rows: list[dict]) -> list[dict]:
    """The rows that are not the size table's."""
    return [row for row in rows if "route" not in row]


def print_size_table(rows: list[dict]) -> None:
    """Print the size table as plain text."""
    lines = size_table(rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for k, line in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
        if not k:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))


def report(rows: list[dict]) -> None:
    """Print this module's rows: the size table, then the models' table."""
    print_size_table(rows)
    for note in skipped_notes(rows):
        print(note)
    print()
    print_table(model_rows(rows))


def _markdown_table(lines: list[list[str]]) -> list[str]:
    escape = str.maketrans({"|": "\\|"})
    out = ["| " + " | ".join(c.translate(escape) for c in line) + " |" for line in lines]
    return [out[0], "|" + "---|" * len(lines[0]), *out[1:]]


READING = """One layer's train step (forward, input, kernel and bias gradients of
`sum(z^2) / 2`, one `tf.function`, graph mode, float32, batch {batch}):
`tf_jacbp.layers.Conv2D(C, 3x3, same)` with `toeplitz="implicit"` and with
`toeplitz="materialize"` (only where the dense `T(K)` is at most {limit}) against
`keras.layers.Conv2D`, same weights; milliseconds are medians, ratios the median of
per-repetition ratios (spread in brackets). `toeplitz="auto"`, the default, materializes only a
`T(K)` of at most 256 KiB (`tf_jacbp.toeplitz_implicit`), so none of these."""

MODELS_READING = """The models against their stock-Keras twins (same weights, synthetic batches;
`benchmarks/conv_sizes.py`'s docstring says what each row times). A `floor` row bounds the
ratio above it: the same work with the per-sample norm products done by stock ops (patches by
`tf.image.extract_patches` or strided views, whichever is faster for the layer, then the Gram or
the outer form), measured in the same run."""


def markdown_section(rows: list[dict], mode: str, command: str) -> str:
    """This module's section of ``docs/benchmarks.md``: heading, command and machine, the size
    table, the models' table."""
    columns = list(COLUMNS)
    models_table = [columns] + [[cell(row.get(c, "")) for c in columns] for row in model_rows(rows)]
    reading = READING.format(batch=SIZE_BATCH, limit=size_label(MATERIALIZE_LIMIT_BYTES))
    return "\n".join(
        [
            SECTION,
            "",
            f"Generated by `{command}` ({mode} run) on: {machine()}.",
            "`python -m benchmarks.conv_sizes [--quick] [--markdown docs/benchmarks.md]` runs",
            "this section alone (and replaces it in the page).",
            "",
            reading,
            "",
            *_markdown_table(size_table(rows)),
            "",
            *[note + "\n" for note in skipped_notes(rows)],
            MODELS_READING,
            "",
            *_markdown_table(models_table),
            "",
        ]
    )


def replace_section(path: str, section: str) -> None:
    """Write ``section`` into the page ``path`` in place of its ``SECTION`` (up to the next
    ``## `` heading); where the page has none, before the GPU run's section
    (``benchmarks.run.KEPT_FROM``), else at the end."""
    from benchmarks.run import KEPT_FROM

    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    start = text.find("\n" + SECTION)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        end = len(text) if end < 0 else end + 1
        start += 1
    else:
        start = text.find("\n" + KEPT_FROM)
        start = end = len(text) if start < 0 else start + 1
    with open(path, "w") as f:
        f.write(text[:start] + section + ("\n" if end < len(text) else "") + text[end:])


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.conv_sizes [--quick] [--markdown PATH]``: print this module's two
    tables; with ``--markdown``, also put them in ``PATH`` in place of its section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI subset (under a minute)")
    parser.add_argument("--markdown", metavar="PATH", help="replace this section of PATH")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    print(f"# {machine()}")
    report(rows)
    if args.markdown:
        arguments = argv if argv is not None else sys.argv[1:]
        command = " ".join(["python -m benchmarks.conv_sizes", *arguments])
        mode = "--quick" if args.quick else "full"
        replace_section(args.markdown, markdown_section(rows, mode, command))


if __name__ == "__main__":
    main()
