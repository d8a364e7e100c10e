"""Losses on outputs of any rank: values and gradients equal stock Keras' in float64.

Every tf_jacbp loss is compared with the stock Keras loss of the same name (``SquaredError``, the
paper's sum, with a stock ``LossFunctionWrapper`` summing the squares over the last axis) on
predictions of rank 2, 3 and 4, drawn by hypothesis with their label shapes (including Keras'
trailing-1 forms), sample weights (per batch, per position, per position with a trailing 1, or
none), every reduction, ``from_logits`` and label smoothing. The gradient is taken with a random
upstream of the loss' shape, so that a wrong broadcast of the per-position upstream over the
last axis (or over the wrong axis when two axes have equal sizes) cannot pass. Both routes are
checked: the Jacobian route and ``tf_jacbp.reference_mode()``.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from keras.src.losses.losses import LossFunctionWrapper  # stock's wrapper: its rank matching

import tf_jacbp
from tf_jacbp import layers, losses, tolerances

RTOL = tolerances.rtol("float64")  # 1e-12
REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None]


def _stock_squared_error(y_true, y_pred):
    return keras.ops.sum(keras.ops.square(y_true - y_pred), axis=-1)


def _pair(kind, reduction, from_logits, smoothing):
    """(ours, stock) losses of ``kind`` in float64."""
    common = {"reduction": reduction, "dtype": "float64"}
    if kind == "categorical":
        args = {"from_logits": from_logits, "label_smoothing": smoothing, **common}
        return losses.CategoricalCrossentropy(**args), keras.losses.CategoricalCrossentropy(**args)
    if kind == "sparse":
        args = {"from_logits": from_logits, **common}
        return (
            losses.SparseCategoricalCrossentropy(**args),
            keras.losses.SparseCategoricalCrossentropy(**args),
        )
    if kind == "binary":
        args = {"from_logits": from_logits, "label_smoothing": smoothing, **common}
        return losses.BinaryCrossentropy(**args), keras.losses.BinaryCrossentropy(**args)
    if kind == "mse":
        return losses.MeanSquaredError(**common), keras.losses.MeanSquaredError(**common)
    stock = LossFunctionWrapper(_stock_squared_error, **common)
    return losses.SquaredError(**common), stock


@st.composite
def cases(draw):
    """A loss kind with predictions, labels and sample weights of matching shapes."""
    kind = draw(st.sampled_from(["categorical", "sparse", "binary", "mse", "squared"]))
    rank = draw(st.integers(2, 4))
    if draw(st.booleans()):  # every axis of one size: a broadcast over a wrong axis still fits
        size = draw(st.integers(1, 3))
        lead = [size] * (rank - 1)
    else:
        lead = draw(st.lists(st.integers(1, 4), min_size=rank - 1, max_size=rank - 1))
    low = 2 if kind == "categorical" else 1  # Keras warns on one-class categorical outputs
    d = draw(st.integers(low, 4))
    if kind != "categorical" and draw(st.integers(0, 4)) == 0:
        d = 1
    from_logits = draw(st.booleans())
    smoothing = draw(st.sampled_from([0.0, 0.1, 0.35, 1.0]))
    reduction = draw(st.sampled_from(REDUCTIONS))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shape = (*lead, d)
    if from_logits or kind in ("mse", "squared"):
        y_pred = rng.normal(size=shape) * 2
    elif kind == "binary":
        y_pred = rng.uniform(size=shape)
    else:  # positive, rows not summing to one, now and then below the clip at eps
        y_pred = rng.uniform(0.05, 1, size=shape)
        y_pred[rng.uniform(size=shape) < 0.1] = 1e-9
    if kind == "sparse":
        y_true = rng.integers(0, d, size=lead).astype("float64")
        label_shapes = [tuple(lead), (*lead, 1)]
    elif kind == "categorical":
        if draw(st.booleans()):
            y_true = np.eye(d)[rng.integers(0, d, size=lead)]
        else:
            y_true = rng.dirichlet(np.ones(d), size=lead)
        label_shapes = [shape]
    elif kind == "binary":
        y_true = rng.integers(0, 2, size=shape) if draw(st.booleans()) else rng.uniform(size=shape)
        y_true = y_true.astype("float64")
        label_shapes = [shape]
    else:
        y_true = rng.normal(size=shape)
        label_shapes = [shape]
    if d == 1 and kind != "sparse":
        label_shapes.append(tuple(lead))  # Keras squeezes y_pred (or, for rank 2, expands y_true)
    y_true = y_true.reshape(draw(st.sampled_from(label_shapes)))
    weights = draw(st.sampled_from(["none", "batch", "positions", "positions+1"]))
    sample_weight = {
        "none": None,
        "batch": rng.uniform(size=lead[:1]),
        "positions": rng.uniform(size=lead),
        "positions+1": rng.uniform(size=(*lead, 1)),
    }[weights]
    loss_pair = _pair(kind, reduction, from_logits, smoothing)
    return loss_pair, y_true, y_pred, sample_weight, rng


def _value_and_grad(loss, y_true, y_pred, sample_weight, upstream_rng, reference=False):
    """The loss and its gradient w.r.t. ``y_pred`` for a random upstream of the loss' shape."""
    y_pred = tf.constant(y_pred)
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        if reference:
            with tf_jacbp.reference_mode():
                value = loss(y_true, y_pred, sample_weight=sample_weight)
        else:
            value = loss(y_true, y_pred, sample_weight=sample_weight)
    upstream = tf.constant(upstream_rng.normal(size=value.shape))
    return value, tape.gradient(value, y_pred, output_gradients=upstream)


def _outcome(loss, y_true, y_pred, sample_weight, seed, reference=False):
    """``(value, gradient)``, or the exception type when the loss rejects the input."""
    try:
        return _value_and_grad(
            loss, y_true, y_pred, sample_weight, np.random.default_rng(seed), reference
        )
    except (ValueError, tf.errors.InvalidArgumentError) as err:
        return type(err)


@settings(max_examples=40, deadline=None)
@given(cases(), st.booleans())
def test_values_and_gradients_equal_stock_keras(case, reference):
    (ours, stock), y_true, y_pred, sample_weight, rng = case
    seed = int(rng.integers(2**31))
    theirs = _outcome(stock, y_true, y_pred, sample_weight, seed)
    mine = _outcome(ours, y_true, y_pred, sample_weight, seed, reference)
    if isinstance(theirs, type):  # stock rejects this input (a (batch,) weight on (batch, T))
        assert isinstance(mine, type), f"stock raised {theirs.__name__}, ours gave {mine}"
        return
    assert not isinstance(mine, type), f"ours raised {mine.__name__} where stock did not"
    (value, grad), (stock_value, stock_grad) = mine, theirs
    assert value.shape == stock_value.shape
    assert grad.shape == stock_grad.shape == y_pred.shape
    assert tolerances.relative_error(value, stock_value) <= RTOL
    assert tolerances.relative_error(grad, stock_grad) <= RTOL


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_sparse_loss_keeps_every_position(rank, reference):
    """Each position's loss is its own (the old loss kept the first row's for all)."""
    rng = np.random.default_rng(rank)
    shape = (3, 3, 3, 3)[: rank - 1]
    z = rng.normal(size=(*shape, 3))
    labels = rng.integers(0, 3, size=shape).astype("float64")
    ours = losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    if reference:
        with tf_jacbp.reference_mode():
            value = ours(labels, z)
    else:
        value = ours(labels, z)
    expected = -np.take_along_axis(tf.nn.log_softmax(z).numpy(), labels[..., None].astype(int), -1)
    np.testing.assert_allclose(value, expected[..., 0], rtol=1e-13)


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_probability_rows_are_renormalized_as_keras_does(sparse, reference):
    """Rows of y_pred that do not sum to one: stock's value and gradient (Keras divides each row
    by its sum; the sparse loss after clipping), not ``-log p_y`` of the raw row."""
    rng = np.random.default_rng(3)
    p = rng.uniform(0.1, 1, size=(4, 3, 5)) * np.array([0.5, 1, 3])[:, None]  # sums 0.7 to 9
    labels = rng.integers(0, 5, size=(4, 3))
    y = labels.astype("float64") if sparse else np.eye(5)[labels]
    kind = "sparse" if sparse else "categorical"
    ours, stock = _pair(kind, "sum_over_batch_size", False, 0.0)
    value, grad = _value_and_grad(ours, y, p, None, np.random.default_rng(0), reference)
    stock_value, stock_grad = _value_and_grad(stock, y, p, None, np.random.default_rng(0))
    assert tolerances.relative_error(value, stock_value) <= RTOL
    assert tolerances.relative_error(grad, stock_grad) <= RTOL
    raw = -np.log(np.take_along_axis(p, labels[..., None], -1)).mean()
    assert abs(float(value) - raw) > 0.1  # the raw rows would give another loss


@pytest.mark.parametrize(
    "make",
    [
        lambda: losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2),
        lambda: losses.SparseCategoricalCrossentropy(reduction="sum"),
        lambda: losses.BinaryCrossentropy(label_smoothing=0.1, reduction=None),
        lambda: losses.MeanSquaredError(reduction="mean_with_sample_weight"),
        lambda: losses.SquaredError(reduction="none", name="se"),
    ],
)
def test_get_config_round_trips(make):
    loss = make()
    again = type(loss).from_config(loss.get_config())
    assert again.get_config() == loss.get_config()
    revived = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(revived) is type(loss) and revived.get_config() == loss.get_config()


def _autoencoder(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            layers.Conv2D(4, 3, padding="same", activation="relu"),
            layers.Conv2D(2, 3, padding="same"),
        ]
    )


def test_conv_autoencoder_trains_with_mean_squared_error():
    """A conv autoencoder (outputs (batch, H, W, C)) fits with MSE; its loss equals stock's on
    the same weights, and its first update equals the update stock's loss gives."""
    x = np.random.default_rng(0).normal(size=(16, 6, 6, 2)).astype("float32")
    ours, theirs = _autoencoder(1), _autoencoder(1)
    ours.compile(keras.optimizers.SGD(0.05), losses.MeanSquaredError())
    theirs.compile(keras.optimizers.SGD(0.05), "mean_squared_error")
    before = ours.evaluate(x, x, verbose=0)
    np.testing.assert_allclose(before, theirs.evaluate(x, x, verbose=0), rtol=1e-6)
    ours.fit(x, x, batch_size=16, epochs=1, verbose=0, shuffle=False)
    theirs.fit(x, x, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for w, w_stock in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        assert tolerances.relative_error(w, w_stock, "float32") <= tolerances.rtol("float32")
    history = ours.fit(x, x, batch_size=8, epochs=2, verbose=0, shuffle=False)
    after = ours.evaluate(x, x, verbose=0)
    assert np.isfinite(history.history["loss"]).all() and after < before
    stock_value = keras.losses.MeanSquaredError()(x, ours.predict(x, verbose=0))
    np.testing.assert_allclose(after, stock_value, rtol=1e-5)


def test_segmentation_model_fits_with_per_position_weights():
    """Rank-4 outputs (batch, H, W, C), labels (batch, H, W) and per-pixel sample weights: fit
    trains, and the loss equals stock's weighted loss on the same weights."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4, 4, 2)).astype("float32")
    y = rng.integers(0, 3, size=(8, 4, 4))
    w = rng.uniform(size=(8, 4, 4)).astype("float32")
    model = keras.Sequential([keras.Input((4, 4, 2)), layers.Conv2D(3, 3, padding="same")])
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.SGD(0.1), loss)
    history = model.fit(x, y, sample_weight=w, batch_size=8, epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    stock = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ours_value = loss(y, model(x), sample_weight=w)
    np.testing.assert_allclose(ours_value, stock(y, model(x), sample_weight=w), rtol=1e-6)
