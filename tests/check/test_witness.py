"""GradientCheck's criterion: no false alarm in any dtype, and a planted error is still caught.

For each of float32, mixed_float16 and mixed_bfloat16, LeNet-5 (``tf_jacbp.models.lenet5``) and
the residual batch-normalized CNN (``tf_jacbp.models.resnet_mnist``, 4 filters instead of 8 to
keep the file fast: the same layers, residual block and batch normalizations) are built once,
then checked at 50 seeds, each with new weights and a new Fashion-MNIST probe batch: no seed
may report a mismatch. In the same models, each Conv2D and Dense parameter gradient in turn is
scaled by 1.01 (float32) or 1.05 (16-bit policies) in the Jacobian route only, and the check
must name exactly that variable.

The planted layers read their factors from one shared variable (1.0 when nothing is planted,
an exact multiplication), so the model traced once serves every seed and every plant.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from planted import FACTORS, PlantedConv2D, PlantedDense, plantable

from tf_jacbp import datasets, losses, models, tolerances
from tf_jacbp.callbacks import GradientCheck

SEEDS = 50
PROBE = 16
POLICIES = ["float32", "mixed_float16", "mixed_bfloat16"]
PLANTED = {"float32": 1.01, "mixed_float16": 1.05, "mixed_bfloat16": 1.05}

BUILDERS = {"lenet5": models.lenet5, "resnet": lambda: models.resnet_mnist(filters=4)}


@pytest.fixture(scope="module")
def images():
    (x, y), _ = datasets.load_fashion_mnist()
    return (x[:4096, ..., None] / 255.0).astype("float32"), y[:4096].astype("int64")


def reinitialize(model, initial, rng):
    """New weights around the initial ones: each variable plus noise of its own spread (0.2
    where it is constant, e.g. batch-norm gamma = 1)."""
    for v, w in zip(model.trainable_variables, initial, strict=True):
        spread = w.std() if w.std() > 0 else 0.2
        v.assign(w + spread * rng.normal(size=w.shape).astype(w.dtype))


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.slow
def test_no_false_alarm_over_50_seeds_and_planted_errors_are_caught(policy, name, images):
    x, y = images
    keras.config.set_dtype_policy(policy)
    model = plantable(BUILDERS[name]())
    model.compile(
        keras.optimizers.SGD(0.01), losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    initial = [v.numpy() for v in model.trainable_variables]
    check = GradientCheck((x[:PROBE], y[:PROBE]), on_mismatch="log", verbose=0)
    rng = np.random.default_rng(len(name) + POLICIES.index(policy))
    FACTORS.assign(tf.ones_like(FACTORS))
    rechecked = 0
    for _ in range(SEEDS):
        reinitialize(model, initial, rng)
        idx = rng.choice(len(x), PROBE, replace=False)
        records = check.check_now(model, (x[idx], y[idx]))
        failed = [r.variable for r in records if not r.passed]
        assert not failed, check.summary()
        assert {r.criterion for r in records} == {"rounding_floor"}
        rechecked += sum(r.recheck_passed is not None for r in records)
    assert len({r.step for r in check.records}) == 1  # check_now outside fit: step 0
    assert len(check.records) == SEEDS * len(model.trainable_variables)
    # Re-checks on a perturbed probe (rounding flips) are rare.
    assert rechecked <= SEEDS // 10, rechecked

    planted = [
        (layer.slot, i, v.path)
        for layer in model.layers
        if isinstance(layer, (PlantedDense, PlantedConv2D))
        for i, v in enumerate(layer.trainable_variables)
    ]
    assert len(planted) == (10 if name == "lenet5" else 6)
    factor = PLANTED[policy]
    try:
        for slot, i, path in planted:
            FACTORS.assign(tf.ones_like(FACTORS))
            FACTORS[slot, i].assign(factor)
            records = check.check_now(model)
            failed = [r for r in records if not r.passed]
            assert [r.variable for r in failed] == [path], check.summary()
            (r,) = failed
            # Caught by the float64 formula comparison at its full size ...
            assert r.float64_rel_err == pytest.approx(factor - 1, rel=0.1)
            assert r.float64_rtol == tolerances.rtol("float64")
            assert r.recheck_passed is False
    finally:
        FACTORS.assign(tf.ones_like(FACTORS))
