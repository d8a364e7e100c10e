"""DP-SGD (tf_jacbp.privacy, issue 16): the two-pass clipped sum against individually clipped
per-example gradients, a noise-free DP step against a plain step, the noise's standard deviation,
the accountant against TensorFlow Privacy's published MNIST number, and Keras' habits (fit,
callbacks, GradientCheck, .keras round trip) through a DPModel."""

import math
import os
import runpy
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from tf_jacbp import callbacks, jacobian, layers, losses, models, privacy, tolerances

F64 = "float64"
RTOL64 = tolerances.rtol(F64)
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_dp.py"


def small_cnn(dtype=F64):
    """Strided and padded convs, pooling, a residual Add, a shared Dense: every walk feature."""
    kw = {"dtype": dtype}
    x = keras.Input((6, 6, 2), dtype=dtype)
    h = layers.Conv2D(3, 3, strides=2, padding="same", activation="tanh", **kw)(x)
    h = layers.Add(**kw)([layers.Conv2D(3, 2, padding="same", **kw)(h), h])
    h = layers.MaxPooling2D(2, strides=1, **kw)(h)
    h = layers.Flatten(**kw)(h)
    shared = layers.Dense(5, activation="elu", **kw)
    h = shared(layers.Dense(5, activation="relu", **kw)(h))
    h = shared(h)
    return keras.Model(x, layers.Dense(4, **kw)(h))


def mlp(dtype=F64):
    return keras.Sequential(
        [
            keras.Input((5,), dtype=dtype),
            layers.Dense(7, activation="tanh", dtype=dtype),
            layers.Dense(4, dtype=dtype),
        ]
    )


def data(model, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *model.inputs[0].shape[1:]))
    return tf.constant(x), tf.constant(rng.integers(0, 4, size=batch))


LOSS = losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)


@pytest.mark.parametrize("make", [mlp, small_cnn], ids=["mlp", "cnn (Add, shared Dense)"])
def test_clipped_sum_equals_sum_of_individually_clipped_per_example_gradients(make):
    model = make()
    x, y = data(model, 8)
    per_example = jacobian.per_example_gradients(model, x, y, loss=LOSS, flatten=False)
    norms = np.sqrt(sum(np.sum(np.reshape(g, (8, -1)) ** 2, axis=1) for g in per_example))
    clip = float(np.median(norms))  # about half the samples are clipped
    assert np.sum(norms > clip) >= 3 and np.sum(norms < clip) >= 3
    factors = np.minimum(1.0, clip / norms)
    expected = {
        v.path: np.tensordot(factors, np.asarray(g), axes=1)
        for v, g in zip(jacobian.parameter_variables(model), per_example, strict=True)
    }
    grads, info = privacy.clipped_gradients(model, x, y, clip, 0.0, loss=LOSS)
    np.testing.assert_allclose(info["norms"], norms, rtol=RTOL64)
    np.testing.assert_allclose(info["clip_factors"], factors, rtol=RTOL64)
    for v, g in zip(model.trainable_variables, grads, strict=True):
        err = tolerances.relative_error(np.asarray(g) * 8, expected[v.path], F64)
        assert err <= RTOL64, f"{v.path}: relative error {err:.3g}"


def _one_step(model, x, y, **fit):
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0, **fit)
    return [v.numpy() for v in model.trainable_variables]


def test_noise_free_dp_step_with_a_large_clip_equals_a_plain_step():
    keras.utils.set_random_seed(1)
    make = mlp
    plain = make()
    private = privacy.make_private(make(), l2_norm_clip=1e6, noise_multiplier=0.0)
    private.set_weights(plain.get_weights())
    x, y = data(plain, 16)
    for a, b in zip(_one_step(private, x, y), _one_step(plain, x, y), strict=True):
        assert tolerances.relative_error(a, b, F64) <= RTOL64
    before = private.get_weights()[0]
    assert not np.allclose(before, make().get_weights()[0])  # the step moved the weights


@pytest.mark.parametrize(
    "stock, activation",
    [
        (keras.losses.SparseCategoricalCrossentropy(dtype=F64), "softmax"),
        (keras.losses.BinaryCrossentropy(dtype=F64), "sigmoid"),
    ],
    ids=["sparse cross entropy after softmax", "binary cross entropy after sigmoid"],
)
def test_stock_keras_loss_after_softmax_or_sigmoid_trains_privately(stock, activation):
    """Stock Keras' cross entropies read the logits off a Softmax/Sigmoid op that made y_pred
    (in a graph), which cut the per-sample loss off from y_pred: the DP step failed with "None
    values not supported". A noise-free step with a large clip equals a plain Keras step."""
    keras.utils.set_random_seed(2)

    def make():
        return keras.Sequential(
            [
                keras.Input((5,), dtype=F64),
                layers.Dense(7, activation="tanh", dtype=F64),
                layers.Dense(4, activation=activation, dtype=F64),
            ]
        )

    plain = make()
    private = privacy.make_private(make(), l2_norm_clip=1e6, noise_multiplier=0.0)
    start = plain.get_weights()
    private.set_weights(start)
    x, y = data(plain, 16)
    if activation == "sigmoid":
        y = tf.constant(np.random.default_rng(3).integers(0, 2, size=(16, 4)), F64)
    for model in (private, plain):
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=stock)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(private.get_weights(), plain.get_weights(), strict=True):
        assert tolerances.relative_error(a, b, F64) <= RTOL64
    assert not np.allclose(private.get_weights()[0], start[0])  # the step moved the weights


def test_noise_has_standard_deviation_sigma_times_clip():
    """The noise reaching the weights, ``-lr * N(0, (sigma C)^2) / B`` per entry, recovered from
    ten DP steps taken from the same weights with and without noise: the sum of squares over
    its n entries, divided by the variance, is chi-square(n). The test fails when it leaves the
    central 1 - 1e-6 interval (false-failure rate 1e-6; the seed is fixed, so it is
    deterministic) or when the mean leaves 5 standard errors (rate 6e-7)."""
    clip, sigma, lr, batch = 0.5, 1.3, 0.1, 8
    model = privacy.make_private(mlp(), clip, sigma, seed=123)
    clean = privacy.make_private(mlp(), clip, 0.0)
    clean.set_weights(model.get_weights())
    start = model.get_weights()
    x, y = data(model, batch)
    for m in (model, clean):
        m.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS)
    clean.train_on_batch(x, y)
    target = clean.get_weights()
    draws = []
    for _ in range(10):
        model.set_weights(start)  # the seed generator's state moves on: a new draw each time
        model.train_on_batch(x, y)
        draws.append(
            np.concatenate(
                [(a - b).ravel() for a, b in zip(model.get_weights(), target, strict=True)]
            )
        )
    noise = np.concatenate(draws) * batch / -lr
    std = sigma * clip
    n = noise.size
    statistic = float(np.sum(noise**2) / std**2)
    low, high = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], n)
    assert low <= statistic <= high, (statistic / n, n)
    assert abs(noise.mean()) <= 5 * std / math.sqrt(n)
    assert not np.allclose(draws[0], draws[1])  # each step draws anew


def test_accountant_matches_tf_privacy_mnist_tutorial():
    """TensorFlow Privacy's MNIST tutorial: q = 256/60000, sigma = 1.12, 60 epochs (steps =
    ceil(60 * 60000 / 256), as its compute_dp_sgd_privacy counts), delta = 1e-5: epsilon 2.92
    with RDP. That number is RDP's classic conversion; dp-accounting's default (improved)
    conversion of the same RDP curve gives 2.52, and the PLD accountant less again."""
    q, steps = 256 / 60000, math.ceil(60 * 60000 / 256)
    classic = privacy.compute_epsilon(1.12, q, steps, 1e-5, rdp_conversion="classic")
    improved = privacy.compute_epsilon(1.12, q, steps, 1e-5)
    assert abs(classic - 2.92) < 0.01, classic
    assert abs(improved - 2.52) < 0.01, improved
    pld = privacy.compute_epsilon(1.12, q, steps, 1e-5, accountant="pld")
    assert pld < improved < classic
    assert privacy.compute_epsilon(0.0, q, steps, 1e-5) == math.inf
    assert privacy.compute_epsilon(1.12, q, 0, 1e-5) == 0.0
    with pytest.raises(ValueError, match="accountant"):
        privacy.compute_epsilon(1.12, q, steps, 1e-5, accountant="moments")


def test_epsilon_logger_logs_the_accountant_for_the_steps_taken():
    """Steps are counted, not callback calls: with steps_per_execution=3 Keras reports the 4
    steps of an epoch in two calls."""
    model = privacy.make_private(mlp(), 1.0, 1.1, seed=0)
    model.compile(optimizer="sgd", loss=LOSS, steps_per_execution=3)
    x, y = data(model, 40)
    logger = privacy.EpsilonLogger(10 / 40, 1e-5)
    history = model.fit(x, y, batch_size=10, epochs=2, callbacks=[logger], verbose=0)
    expected = [privacy.compute_epsilon(1.1, 0.25, steps, 1e-5) for steps in (4, 8)]
    np.testing.assert_allclose(history.history["epsilon"], expected, rtol=1e-12)
    assert [s for _, s, _ in logger.history] == [4, 8]


def test_private_model_round_trips_through_a_keras_file(tmp_path):
    model = privacy.make_private(mlp(), 0.7, 1.4, expected_batch_size=6, seed=5)
    model.compile(optimizer="sgd", loss=LOSS)
    x, y = data(model, 6)
    model.fit(x, y, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "dp.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, privacy.DPModel)
    assert (loaded.l2_norm_clip, loaded.noise_multiplier, loaded.expected_batch_size) == (
        0.7,
        1.4,
        6,
    )
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    # It still trains privately: the noise moves the weights even where the gradient is clipped.
    loaded.compile(optimizer="sgd", loss=LOSS)
    loaded.fit(x, y, epochs=1, verbose=0)
    assert not np.allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_gradient_check_runs_during_a_dp_fit(capsys):
    """GradientCheck checks the layers' batch formulas (what both DP passes are made of)."""
    model = privacy.make_private(mlp("float32"), 1.0, 1.0, seed=0)
    model.compile(optimizer="sgd", loss=losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(model, 16)
    x = tf.cast(x, "float32")
    check = callbacks.GradientCheck((x[:8], y[:8]), every_n_batches=1)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[check], verbose=0)
    assert check.records and all(r.passed for r in check.records)


def test_poisson_batches_vary_in_size_and_train_with_the_expected_batch_size():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 5)), rng.integers(0, 4, size=400)
    data_ = privacy.poisson_batches(x, y, 0.05, seed=1)
    sizes = [len(b[1]) for b in data_]
    again = [len(b[1]) for b in data_]
    assert len(sizes) == 20 and len(set(sizes)) > 3 and sizes != again
    assert 12 <= np.mean(sizes + again) <= 28  # q N = 20; sd of the mean of 40 draws ~ 0.7
    model = privacy.make_private(mlp(), 1.0, 1.0, expected_batch_size=20, seed=0)
    model.compile(optimizer="sgd", loss=LOSS)
    history = model.fit(data_, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_batch_statistics_and_stock_layers_and_reductions_are_refused():
    x_in = keras.Input((4,))
    stock = keras.Model(x_in, keras.layers.Dense(3, name="stock_dense")(x_in))
    with pytest.raises(TypeError, match="stock_dense"):
        privacy.make_private(stock, 1.0, 1.0)
    x, y = np.ones((4, 4), "float32"), np.zeros(4)
    bn = keras.Sequential([keras.Input((4,)), layers.BatchNormalization(), layers.Dense(3)])
    model = privacy.make_private(bn, 1.0, 1.0)
    model.compile(optimizer="sgd", loss=LOSS)
    with pytest.raises(ValueError, match="per-example gradients do not exist"):
        model.fit(x, y, verbose=0)
    bn.layers[0].trainable = False  # frozen: its inference map is per-sample
    model = privacy.make_private(bn, 1.0, 1.0)
    model.compile(optimizer="sgd", loss=LOSS)
    model.fit(x, y, verbose=0)
    model = privacy.make_private(models.mlp((3,), input_shape=(4,)), 1.0, 1.0)
    model.compile(optimizer="sgd", loss=losses.SparseCategoricalCrossentropy(reduction="sum"))
    with pytest.raises(ValueError, match="sum_over_batch_size"):
        model.fit(x, y, verbose=0)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        privacy.make_private(models.mlp((3,), input_shape=(4,)), 0.0, 1.0)


def test_weight_regularizer_is_added_after_the_noise():
    """A weight regularizer's gradient does not depend on the data: it joins the update.
    (L2's factor is 0.25: Keras rounds the factor through float32, 0.3 would be 4e-8 off.)"""
    model = keras.Sequential(
        [
            keras.Input((5,), dtype=F64),
            layers.Dense(4, kernel_regularizer=keras.regularizers.L2(0.25), dtype=F64),
        ]
    )
    private = privacy.make_private(model, 1e6, 0.0)
    x, y = data(private, 6)
    start = [w.copy() for w in private.get_weights()]
    grads, _ = privacy.clipped_gradients(private, x, y, 1e6, loss=LOSS)
    private.compile(optimizer=keras.optimizers.SGD(1.0), loss=LOSS)
    private.train_on_batch(x, y)
    expected = start[0] - (np.asarray(grads[0]) + 2 * 0.25 * start[0])
    assert tolerances.relative_error(private.get_weights()[0], expected, F64) <= RTOL64


@pytest.mark.slow
def test_example_quick_mode_trains_and_plots(tmp_path, capsys):
    main = runpy.run_path(str(EXAMPLE))["main"]
    plot = os.path.join(tmp_path, "dp.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = main(["--quick", "--verbose", "0", "--plot", plot])
    out = capsys.readouterr().out
    assert (
        f"epoch 1: test accuracy {result['accuracy']:.4f}, epsilon {result['epsilon']:.3f}" in out
    )
    assert result["epsilon"] == pytest.approx(
        privacy.compute_epsilon(
            result["noise_multiplier"], 128 / 512, 4, 1e-5, rdp_conversion="classic"
        ),
        rel=1e-12,
    )
    assert 2.99 <= result["epsilon"] <= 3.0  # sigma calibrated to the target, classic RDP
    assert "Epsilon assuming Poisson sampling" in out and "once per epoch" in out
    assert os.path.getsize(plot) > 1000
