"""Table 1 losses: the Jacobian route equals autodiff of stock ops, and Table 1 literally."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from map_cases import LOSSES as CASES
from map_cases import labels
from map_cases import prediction as _prediction

import tf_jacbp
from tf_jacbp import layers, losses, tolerances

RNG = np.random.default_rng(0)
BATCH, D = 5, 4


def _labels(kind: str) -> np.ndarray:
    return labels(kind, RNG, BATCH, D)


def _grad(loss, y, z, reference):
    with tf.GradientTape() as tape:
        tape.watch(z)
        if reference:
            with tf_jacbp.reference_mode():
                value = loss(y, _prediction(loss, z))
        else:
            value = loss(y, _prediction(loss, z))
    return value, tape.gradient(value, z)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(CASES))
def test_loss_routes_agree(name, dtype):
    make, kind = CASES[name]
    loss = make(dtype)
    y = tf.constant(_labels(kind), dtype)
    z = tf.constant(RNG.normal(size=(BATCH, D)) * 2, dtype)
    value, grad = _grad(loss, y, z, reference=False)
    ref_value, ref_grad = _grad(loss, y, z, reference=True)
    rtol = tolerances.rtol(dtype)
    assert tolerances.relative_error(value, ref_value, dtype) <= rtol
    assert tolerances.relative_error(grad, ref_grad, dtype) <= rtol


@pytest.mark.parametrize("name", list(CASES))
def test_loss_gradient_equals_finite_differences(name):
    make, kind = CASES[name]
    loss = make("float64")
    y = tf.constant(_labels(kind), "float64")
    z = tf.constant(RNG.normal(size=(BATCH, D)), "float64")
    theoretical, numerical = tf.test.compute_gradient(
        lambda z: loss(y, _prediction(loss, z)), [z], delta=tolerances.FINITE_DIFFERENCE_DELTA
    )
    err = tolerances.relative_error(theoretical[0], numerical[0])
    assert err <= tolerances.FINITE_DIFFERENCE_RTOL


@pytest.mark.parametrize(
    "loss, y, formula",
    [
        (
            losses.CategoricalCrossentropy(from_logits=True, dtype="float64"),
            np.eye(D)[[0, 2, 1, 3, 3]],
            lambda y, z: -(y - tf.nn.softmax(z)),
        ),
        (
            losses.BinaryCrossentropy(from_logits=True, dtype="float64"),
            np.array([[1.0], [0.0], [1.0], [0.0], [1.0]]),
            lambda y, z: -(y - tf.math.sigmoid(z)),
        ),
        (
            losses.SquaredError(dtype="float64"),
            RNG.normal(size=(BATCH, D)),
            lambda y, z: -2 * (y - z),
        ),
    ],
    ids=["softmax+CE", "sigmoid+BCE", "identity+SE"],
)
def test_table_1_rows_literally(loss, y, formula):
    """``grad_{z[L]} l`` is Table 1's row, divided by the batch size for the mean reduction."""
    y = tf.constant(y)
    z = tf.constant(RNG.normal(size=y.shape))
    _, grad = _grad(loss, y, z, reference=False)
    expected = formula(y, z) / BATCH
    assert tolerances.relative_error(grad, expected) <= tolerances.rtol("float64")


@pytest.mark.parametrize("name", list(CASES))
def test_softmax_layer_route_equals_fused_route(name):
    """Probabilities through Softmax/Sigmoid's Jacobian give the fused ``grad_z l`` of Table 1."""
    make, kind = CASES[name]
    loss = make("float64")
    if getattr(loss, "from_logits", True):
        return
    fused = type(loss)(from_logits=True, dtype="float64")
    y = tf.constant(_labels(kind), "float64")
    z = tf.constant(RNG.normal(size=(BATCH, D)), "float64")
    _, through_layer = _grad(loss, y, z, reference=False)
    _, direct = _grad(fused, y, z, reference=False)
    assert tolerances.relative_error(through_layer, direct) <= 1e-9  # clip at eps = 1e-7 aside


@pytest.mark.parametrize("name", [n for n in CASES if "logits" in n])
def test_large_logits_stay_finite(name):
    make, kind = CASES[name]
    loss = make("float32")
    y = tf.constant(_labels(kind), "float32")
    z = tf.constant(RNG.choice([-1e4, 1e4], size=(BATCH, D)), "float32")
    value, grad = _grad(loss, y, z, reference=False)
    assert np.isfinite(value.numpy()) and np.all(np.isfinite(grad.numpy()))
    _, ref = _grad(loss, y, z, reference=True)
    assert tolerances.relative_error(grad, ref, "float32") <= tolerances.rtol("float32")


def test_keras_compatible_values():
    """Same values as Keras' own losses (the reduction included)."""
    y, z = tf.constant(_labels("sparse")), tf.constant(RNG.normal(size=(BATCH, D)), "float32")
    ours = losses.SparseCategoricalCrossentropy(from_logits=True)(y, z)
    theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, z)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    t = tf.constant(RNG.normal(size=(BATCH, D)), "float32")
    np.testing.assert_allclose(
        losses.MeanSquaredError()(t, z), keras.losses.MeanSquaredError()(t, z), rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.SquaredError()(t, z), D * keras.losses.MeanSquaredError()(t, z), rtol=1e-6
    )


@pytest.mark.parametrize(
    "loss, y, match",
    [
        (losses.SparseCategoricalCrossentropy(from_logits=True), [0, 1, 4], r"\[0, 3\]"),
        (losses.SparseCategoricalCrossentropy(from_logits=True), [0, -1, 2], r"\[0, 3\]"),
        (losses.SparseCategoricalCrossentropy(from_logits=True), [0, 1.5, 2], "integer"),
        (
            losses.SparseCategoricalCrossentropy(from_logits=True),
            np.eye(4)[:3],
            "CategoricalCrossentropy",
        ),
        (
            losses.CategoricalCrossentropy(from_logits=True),
            [0, 1, 2],
            "SparseCategoricalCrossentropy",
        ),
        (losses.CategoricalCrossentropy(from_logits=True), 2 * np.eye(4)[:3], r"\[0, 1\]"),
        (losses.BinaryCrossentropy(from_logits=True), np.full((3, 4), 2.0), r"\[0, 1\]"),
        (losses.MeanSquaredError(), np.zeros((3, 5)), "y_true has shape"),
    ],
)
def test_bad_labels_name_the_argument_and_fix(loss, y, match):
    with pytest.raises(ValueError, match=match):
        loss(np.asarray(y, "float32"), tf.zeros((3, 4)))


def test_sparse_logits_gradient_is_softmax_minus_one_hot_literally():
    """Integer labels take their own route (``_one_hot_softmax_cross_entropy``): Table 1's
    ``-(y - softmax(z))`` for one-hot ``y``, over the batch size, and Keras' value."""
    labels = np.array([0, 3, 1, 1, 2])
    z = tf.constant(RNG.normal(size=(BATCH, D)) * 3)
    loss = losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    value, grad = _grad(loss, tf.constant(labels), z, reference=False)
    expected = -(np.eye(D)[labels] - tf.nn.softmax(z)) / BATCH
    assert tolerances.relative_error(grad, expected) <= tolerances.rtol("float64")
    log_softmax = tf.nn.log_softmax(z).numpy()
    np.testing.assert_allclose(value, -np.mean(log_softmax[np.arange(BATCH), labels]), rtol=1e-12)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: losses.CategoricalCrossentropy(axis=0), "axis=0"),
        (lambda: losses.SparseCategoricalCrossentropy(ignore_class=3), "ignore_class=3"),
        (lambda: losses.BinaryCrossentropy(label_smoothing=2), "label_smoothing=2"),
    ],
)
def test_bad_loss_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_loss_serialization_round_trip():
    loss = losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(again) is losses.CategoricalCrossentropy
    assert again.from_logits and again.label_smoothing == 0.2


@pytest.mark.parametrize("name", list(CASES))
def test_empty_batch_gives_empty_per_example_norms_and_losses_in_a_graph(name):
    """An empty batch through the losses' label check in a graph (the per-example norms run as
    a ``tf.function``) gives an empty ``(0,)`` result, as a stock loss does; it used to fail with
    "indices = 2147483647 is not in [0, 1)" (the first offending label of no labels)."""
    make, kind = CASES[name]
    loss = make("float32")
    model = keras.Sequential([keras.Input((3,)), layers.Dense(D)])
    if not getattr(loss, "from_logits", True):
        binary = isinstance(loss, losses.BinaryCrossentropy)
        model.add(layers.Sigmoid() if binary else layers.Softmax())
    x = RNG.normal(size=(BATCH, 3)).astype("float32")
    y = _labels(kind).astype("float32")
    norms = tf_jacbp.jacobian.per_example_gradient_norms(model, x[:0], y[:0], loss=loss)
    assert tuple(norms.shape) == (0,)
    assert tuple(tf.function(loss.call)(y[:0], model(x[:0])).shape) == (0,)
