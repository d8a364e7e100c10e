"""Per-example gradient norms and DP-SGD against the computations they replace.

Rows, LeNet-100-300-10 and LeNet-5 at batch 128, every candidate a compiled ``tf.function``:

* ``per_example_gradient_norms`` vs one plain batch gradient (``tape.gradient`` of the mean loss);
* ``per_example_gradient_norms`` vs the norms of the materialized ``per_example_gradients``;
* a ``DPModel`` train step (norms, clip factors, one scaled batch backward pass, noise, update)
  vs the same model's ordinary train step (Keras' ``train_step``, same optimizer).

    python -m benchmarks.privacy [--quick]
"""

from __future__ import annotations

import keras
import tensorflow as tf

from benchmarks.table import run_alone
from benchmarks.timing import interleaved, ratio_row
from benchmarks.workloads import batch_gradient, lenet, random_batch
from tf_jacbp import jacobian, losses, privacy

BATCH = 128


def norm_rows(name: str, repetitions: int, calls: int = 5) -> list[dict]:
    model = lenet(name)
    x, y = random_batch(model, BATCH)
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    norms = tf.function(
        lambda x, y: jacobian.per_example_gradient_norms(model, x, y, loss=loss), autograph=False
    )

    @tf.function(autograph=False)
    def materialized(x, y):
        grads = jacobian.per_example_gradients(model, x, y, loss=loss, flatten=False)
        squares = [tf.reduce_sum(tf.reshape(tf.square(g), [BATCH, -1]), 1) for g in grads]
        return tf.sqrt(tf.add_n(squares))

    plain = batch_gradient(model, loss)

    times = interleaved(
        {
            "norms": lambda: norms(x, y),
            "materialized": lambda: materialized(x, y),
            "plain": lambda: plain(x, y),
        },
        repetitions,
        calls=calls,
    )
    variant = f"{name}, batch {BATCH}"
    return [
        ratio_row(
            "per_example_gradient_norms vs one batch gradient",
            variant,
            times["norms"],
            times["plain"],
            "<= 1.5",
        ),
        ratio_row(
            "per_example_gradient_norms vs norms of per_example_gradients",
            variant,
            times["norms"],
            times["materialized"],
            "<= 0.35",
        ),
    ]


def _compiled_step(model: keras.Model, x: tf.Tensor, y: tf.Tensor):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.optimizer.build(model.trainable_variables)
    return tf.function(lambda: model.train_step((x, y)), autograph=False)  # as fit traces it


def train_step_rows(name: str, repetitions: int, calls: int = 5) -> list[dict]:
    plain_model = lenet(name)
    x, y = random_batch(plain_model, BATCH)
    dp_model = privacy.make_private(lenet(name), l2_norm_clip=1.0, noise_multiplier=1.1, seed=0)
    plain = _compiled_step(plain_model, x, y)
    private = _compiled_step(dp_model, x, y)
    times = interleaved({"dp": private, "plain": plain}, repetitions, calls=calls)
    return [
        ratio_row(
            "DP-SGD train step vs the ordinary train step",
            f"{name}, batch {BATCH}; clip 1.0, noise 1.1",
            times["dp"],
            times["plain"],
            "<= 2.0",
        )
    ]


def run(quick: bool) -> list[dict]:
    """Rows for the suite table (see ``benchmarks/run.py``)."""
    repetitions, calls = (3, 3) if quick else (15, 5)
    rows = []
    for name in ("lenet-100-300-10", "lenet5"):
        rows += norm_rows(name, repetitions, calls)
        rows += train_step_rows(name, repetitions, calls)
    return rows


if __name__ == "__main__":
    run_alone(run, __doc__)
