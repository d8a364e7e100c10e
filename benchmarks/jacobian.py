"""Algorithm 1's objects against autodiff: ``parameter_jacobian`` vs ``tape.jacobian`` (pfor),
``per_example_gradients`` vs ``tf.vectorized_map`` over ``GradientTape`` and vs one batch gradient.

    python -m benchmarks.jacobian [--quick]
"""

from __future__ import annotations

import tensorflow as tf

from benchmarks.table import run_alone
from benchmarks.timing import interleaved, peak_mib, ratio_row
from benchmarks.workloads import batch_gradient, lenet, random_batch
from tf_jacbp import jacobian, losses


def jacobian_rows(name: str, batch: int, repetitions: int) -> list[dict]:
    model = lenet(name)
    x, _ = random_batch(model, batch)
    variables = jacobian.parameter_variables(model)
    ours = tf.function(lambda x: jacobian.parameter_jacobian(model, x))
    blocks = tf.function(lambda x: jacobian.parameter_jacobian(model, x, blocks=True))
    parts = list(blocks(x).values())
    concat = tf.function(lambda: tf.concat(parts, axis=-1))

    @tf.function
    def pfor(x):
        with tf.GradientTape() as tape:
            out = model(x)
        return tape.jacobian(out, variables)

    times = interleaved(
        {
            "ours": lambda: ours(x),
            "blocks": lambda: blocks(x),
            "pfor": lambda: pfor(x),
            "concat": concat,
        },
        repetitions,
    )
    variant = f"{name}, batch {batch}"
    row = ratio_row(
        "parameter_jacobian vs tape.jacobian (pfor)",
        variant,
        times["ours"],
        times["pfor"],
        "<= 0.5",
    )
    row["peak_mib"] = (peak_mib(lambda: ours(x)), peak_mib(lambda: pfor(x)))
    return [
        row,
        ratio_row(
            "parameter_jacobian(blocks=True) vs tape.jacobian (pfor)",
            f"{variant}; per variable, as tape.jacobian returns them",
            times["blocks"],
            times["pfor"],
            "<= 0.5",
        ),
        ratio_row(
            "floor: concatenating the blocks into theta order alone, vs pfor",
            variant,
            times["concat"],
            times["pfor"],
            "",
        ),
    ]


def per_example_rows(name: str, batch: int, repetitions: int) -> list[dict]:
    model = lenet(name)
    x, y = random_batch(model, batch)
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = jacobian.parameter_variables(model)
    # Per variable, as vectorized_map returns them; "theta" also lays them out in theta order.
    ours = tf.function(
        lambda x, y: jacobian.per_example_gradients(model, x, y, loss=loss, flatten=False)
    )
    theta = tf.function(lambda x, y: jacobian.per_example_gradients(model, x, y, loss=loss))

    @tf.function
    def vmap(x, y):
        def one(sample):
            xi, yi = sample
            with tf.GradientTape() as tape:
                value = loss(yi[None], model(xi[None]))
            return tape.gradient(value, variables)

        return tf.vectorized_map(one, (x, y))

    plain = batch_gradient(model, loss)

    @tf.function
    def floor(x, y):
        # Only writing the result, one (batch, *shape) tensor per variable, each filled with a
        # value read from x so that the graph optimizer cannot fold it into a constant.
        value = tf.reduce_mean(x)
        return [tf.fill([batch, *v.shape], value) for v in variables]

    times = interleaved(
        {
            "ours": lambda: ours(x, y),
            "theta": lambda: theta(x, y),
            "vmap": lambda: vmap(x, y),
            "plain": lambda: plain(x, y),
            "floor": lambda: floor(x, y),
        },
        repetitions,
        calls=5,
    )
    variant = f"{name}, batch {batch}"
    return [
        ratio_row(
            "per_example_gradients vs vectorized_map",
            variant,
            times["ours"],
            times["vmap"],
            "<= 0.8",
        ),
        ratio_row(
            "per_example_gradients vs one batch gradient",
            variant,
            times["ours"],
            times["plain"],
            "<= 2.0",
        ),
        ratio_row(
            "per_example_gradients, theta order (flatten=True), vs vectorized_map",
            variant,
            times["theta"],
            times["vmap"],
            "",
        ),
        ratio_row(
            "floor: writing the per-example result alone vs one batch gradient",
            variant,
            times["floor"],
            times["plain"],
            "",
        ),
    ]


def run(quick: bool) -> list[dict]:
    """Rows for the suite table (see ``benchmarks/run.py``)."""
    repetitions = 5 if quick else 15
    return [
        *jacobian_rows("lenet-100-300-10", 32, repetitions),
        *jacobian_rows("lenet5", 8, repetitions),
        *per_example_rows("lenet-100-300-10", 128, repetitions),
        *per_example_rows("lenet5", 128, repetitions),
    ]


if __name__ == "__main__":
    run_alone(run, __doc__)
