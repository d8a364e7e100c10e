"""DP-SGD (``tf_jacbp.privacy``) on every backend: a DP step is the clipped, noised and divided
sum of per-sample autodiff gradients; the noise state advances, is saved and resumes (no replay)
and is seeded from fresh entropy; the ledger, Poisson batches (padded on JAX), sample weights,
the mean over positions and per-layer clipping work as on TensorFlow.

The float64 references here are written in ``keras.ops`` with ReLU hidden units, not tanh:
Keras computes ``ops.tanh`` in float32 on JAX, so a tanh reference would not be float64 there.
Per-sample gradients come from the backend's autodiff (``tf_jacbp.backend.value_and_gradients``);
the DP step itself uses none (the layers' formulas, ``tf_jacbp.jacobian``'s walk).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

from tf_jacbp import backend as tb
from tf_jacbp import layers, losses, privacy, tolerances

F64 = "float64"
LOSS = losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
CLIP, SIGMA, LR = 0.5, 1.3, 0.1
RTOL64 = 1e-12


def mlp(positions=None, regularizer=None):
    """``Input(5) -> Dense(6, relu, "hidden") -> Dense(4, "out")`` in float64; with
    ``positions`` the input is a sequence ``(positions, 5)`` and the output ``(positions, 4)``."""
    shape = (5,) if positions is None else (positions, 5)
    return keras.Sequential(
        [
            keras.Input(shape, dtype=F64),
            layers.Dense(
                6, activation="relu", dtype=F64, name="hidden", kernel_regularizer=regularizer
            ),
            layers.Dense(4, dtype=F64, name="out"),
        ]
    )


def data(n, positions=None, seed=0):
    rng = np.random.default_rng(seed)
    extra = () if positions is None else (positions,)
    return rng.normal(size=(n, *extra, 5)), rng.integers(0, 4, size=(n, *extra))


def private(model=None, lr=LR, seed=11, **kwargs):
    keras.utils.set_random_seed(3)  # the same initial weights for every model of a test
    model = privacy.make_private(
        model or mlp(), kwargs.pop("clip", CLIP), SIGMA, seed=seed, **kwargs
    )
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS)
    return model


def flat(arrays):
    return np.concatenate([np.ravel(ops.convert_to_numpy(a)) for a in arrays])


def sample_loss(x, y, kernel1, bias1, kernel2, bias2):
    """One sample's loss in float64 ``keras.ops``: cross entropy of ``relu(x W1 + b1) W2 + b2``,
    the mean over positions (a sum over a count: ``ops.mean`` is float32 on JAX)."""
    z = ops.matmul(ops.maximum(ops.matmul(x, kernel1) + bias1, 0.0), kernel2) + bias2
    picked = ops.take_along_axis(ops.log_softmax(z, axis=-1), y[..., None], axis=-1)
    return -ops.sum(picked) / float(np.prod(picked.shape))


def reference_update(model, params, x, y, weights, groups, state, divisor):
    """DP-SGD's gradient from scratch in float64: per-sample autodiff gradients of ``w_i l_i``,
    each group's part clipped to its ``C_g``, summed, plus noise drawn from the noise generator
    state ``state`` (one draw over all entries, theta order), divided by ``divisor``; at the
    values ``params`` of the model's trainable variables."""
    params = [ops.convert_to_tensor(p) for p in params]
    names = [v.path.split("/")[-2] for v in model.trainable_variables]
    total = np.zeros(sum(int(np.prod(p.shape)) for p in params))
    for i in range(len(x)):
        xi, yi = ops.convert_to_tensor(x[i]), ops.convert_to_tensor(y[i])
        _, grads = tb.value_and_gradients(
            lambda *p, xi=xi, yi=yi, wi=weights[i]: wi * sample_loss(xi, yi, *p), params
        )
        grads = [ops.convert_to_numpy(g) for g in grads]
        for members, clip in groups:
            part = [k for k, name in enumerate(names) if name in members]
            norm = np.sqrt(sum(np.sum(grads[k] ** 2) for k in part))
            for k in part:
                grads[k] = grads[k] * min(1.0, clip / norm)
        total += flat(grads)
    generator = tb.noise_seed_generator(0, "reference_noise")
    generator.state.assign(state)
    noise_std = SIGMA * np.sqrt(sum(c * c for _, c in groups))
    noise = keras.random.normal([total.size], stddev=noise_std, dtype=F64, seed=generator)
    return (total + ops.convert_to_numpy(noise)) / divisor


def l2_penalty(w):
    """``0.01 ||W||^2`` in ``w``'s dtype (Keras' ``L2(0.01)`` makes 0.01 a float32 constant on
    TensorFlow before casting it to float64: a 2e-8 relative error in float64)."""
    return 0.01 * ops.sum(ops.square(w))


CASES = {
    "sample weights": dict(clip=CLIP, weighted=True),
    "per-layer clips and a regularizer": dict(
        clip={"hidden": 0.3, "out": 0.4}, regularizer=l2_penalty
    ),
    "expected batch size": dict(clip=CLIP, expected_batch_size=10.0),
    "mean over positions": dict(clip=CLIP, positions=3, weighted=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_dp_step_is_the_noised_sum_of_clipped_autodiff_gradients(case):
    """One SGD(1) step of a DPModel moves the weights by ``(sum_i clip(w_i g_i) + z) / B'``,
    ``g_i`` by autodiff per sample, ``z`` drawn from the step's recorded noise state; the
    weight regularizer's gradient is added after the noise. float64, to 1e-12."""
    options = CASES[case]
    clip = options["clip"]
    model = private(
        mlp(options.get("positions"), options.get("regularizer")),
        lr=1.0,
        clip=clip,
        expected_batch_size=options.get("expected_batch_size"),
    )
    x, y = data(8, options.get("positions"))
    weights = np.linspace(0.5, 2.0, 8) if options.get("weighted") else np.ones(8)
    params, state = model.get_weights(), model.noise_seed.state.numpy()
    w0 = flat(params)
    # (B, 1) for outputs of several positions: Keras' compiled loss, which JAX's symbolic
    # build evaluates, broadcasts that shape (not (B,)) over the positions
    given = weights.reshape(8, 1) if options.get("positions") else weights
    model.train_on_batch(x, y, sample_weight=given if options.get("weighted") else None)
    moved = w0 - flat(model.get_weights())
    groups = [(("hidden", "out"), clip)] if not isinstance(clip, dict) else list(clip.items())
    groups = [((g,) if isinstance(g, str) else g, c) for g, c in groups]
    want = reference_update(
        model, params, x, y, weights, groups, state, options.get("expected_batch_size") or len(x)
    )
    if options.get("regularizer") is not None:  # L2(0.01) of the hidden kernel (theta's
        want[:30] += 0.02 * w0[:30]  # first 5 x 6 entries): 0.02 W, added after the noise
    assert tolerances.relative_error(moved, want, F64) <= RTOL64
    assert not np.array_equal(model.noise_seed.state.numpy(), state)  # the generator moved on
    assert model.privacy_steps == 1


def step_noise(model, x, y, lr=LR, divisor=None):
    """The noise a DPModel's train step added, read off one SGD(lr) step:
    ``w1 = w0 - lr (sum + z) / B'``, the clipped sum from a noise-free ``clipped_gradients``
    at ``w0`` (the noise generator's state is not a weight)."""
    divisor = divisor or len(x)
    w0 = model.get_weights()
    model.train_on_batch(x, y)
    w1 = model.get_weights()
    model.set_weights(w0)
    clean, _ = privacy.clipped_gradients(model, x, y, model.l2_norm_clip, 0.0, loss=LOSS)
    model.set_weights(w1)
    return (flat(w0) - flat(w1)) / lr * divisor - flat(clean) * divisor


def _resume(route, model, tmp_path):
    if route == "save":
        path = os.path.join(tmp_path, "dp.keras")
        model.save(path)
        restored = keras.models.load_model(path)
    else:
        path = os.path.join(tmp_path, "dp.weights.h5")
        model.save_weights(path)
        restored = private(seed=99)  # another seed: the checkpoint's state must replace it
        restored.load_weights(path)
    restored.compile(optimizer=keras.optimizers.SGD(LR), loss=LOSS)
    return restored


@pytest.mark.parametrize("route", ["save", "save_weights"])
def test_a_resumed_run_continues_the_noise_sequence(route, tmp_path):
    """After a resume from a step-2 checkpoint, steps 3-4 add the uninterrupted run's noise of
    steps 3-4, not steps 1-2's again; the ledger counts the steps before the checkpoint."""
    model = private()
    x, y = data(8)
    first = [step_noise(model, x, y) for _ in range(2)]
    restored = _resume(route, model, tmp_path)
    np.testing.assert_array_equal(restored.noise_seed.state.numpy(), model.noise_seed.state.numpy())
    assert restored.privacy_steps == 2
    uninterrupted = [step_noise(model, x, y) for _ in range(2)]
    resumed = [step_noise(restored, x, y) for _ in range(2)]
    for got, want in zip(resumed, uninterrupted, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    scale = float(np.max(np.abs(first[0])))
    for got, old in zip(resumed, first, strict=True):
        assert np.max(np.abs(got - old)) > 0.1 * scale  # not the first steps' noise again
    assert np.std(first[0]) == pytest.approx(SIGMA * CLIP, rel=0.5)


def test_backup_and_restore_resumes_the_noise_and_the_ledger_inside_fit(tmp_path):
    """An interrupted fit resumed by BackupAndRestore (which saves mid-fit: on JAX from the
    step's state) ends at the uninterrupted run's weights, and its ledger counts every step."""
    x, y = data(8)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("interrupted")

    uninterrupted = private()
    uninterrupted.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    backup = keras.callbacks.BackupAndRestore(os.path.join(tmp_path, "backup"))
    interrupted = private()
    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted.fit(
            x, y, batch_size=4, epochs=3, shuffle=False, verbose=0, callbacks=[backup, Interrupt()]
        )
    resumed = private(seed=12)
    resumed.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0, callbacks=[backup])
    np.testing.assert_allclose(
        flat(resumed.get_weights()), flat(uninterrupted.get_weights()), rtol=1e-9, atol=1e-12
    )
    assert resumed.privacy_steps == uninterrupted.privacy_steps == 6


def _seed_of(state):
    """The 62-bit seed of a noise state in either layout: ``[seed, draws]`` (TensorFlow) or
    ``[seed_high, seed_low, draws]`` (JAX)."""
    state = [int(s) for s in np.ravel(state)]
    return state[0] if len(state) == 2 else (state[0] << 32) | state[1]


def test_every_model_draws_fresh_62_bit_noise_seeds_unless_a_test_fixes_one():
    """seed=None seeds the noise from the operating system, not from the generators that
    keras.utils.set_random_seed fixes; the whole 62-bit seed is kept (on JAX in two words)."""
    seeds = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        seeds.append(_seed_of(privacy.make_private(mlp(), CLIP, SIGMA).noise_seed.state.numpy()))
    assert seeds[0] != seeds[1] and max(seeds) >= 2**32  # below 2^32 for both: p = 2^-60
    fixed = 2**61 + 12345
    assert _seed_of(private(seed=fixed).noise_seed.state.numpy()) == fixed


def test_a_saved_noise_state_converts_between_the_backends_layouts():
    """A checkpoint from the other backend resumes the count with the same seed."""
    seed = 2**61 + 2**40 + 7
    tf_layout, jax_layout = np.array([seed, 5]), np.array([seed >> 32, seed & 0xFFFFFFFF, 5])
    for saved in (tf_layout, jax_layout):
        state = tb.noise_state(saved)
        assert _seed_of(state) == seed and int(np.ravel(state)[-1]) == 5
        assert len(np.ravel(state)) == len(np.ravel(private().noise_seed.state.numpy()))


def test_secure_mode_draws_new_noise_at_every_compiled_step():
    """secure_mode reads os.urandom at every step of the compiled train function (on JAX an
    io_callback, never a constant of the trace): two steps differ, two models with the same
    seed differ, and the spread is sigma C."""
    x, y = data(8)
    noises = []
    for _ in range(2):
        model = private(seed=5, secure_mode=True)
        noises += [step_noise(model, x, y) for _ in range(2)]
    for a in range(len(noises)):
        for b in range(a):
            assert not np.allclose(noises[a], noises[b])
    assert np.std(np.concatenate(noises)) == pytest.approx(SIGMA * CLIP, rel=0.35)


def test_unseeded_noise_inside_a_compiled_step(backend):
    """clipped_gradients(seed=None) draws from the backend's global generator: anew at every
    call of a compiled function on TensorFlow; on JAX a traced draw without a seed would be a
    constant of the step, so it raises naming the fix."""
    model = private()
    x, y = data(8)

    def noisy(x, y):
        grads, _ = privacy.clipped_gradients(model, x, y, CLIP, SIGMA, loss=LOSS, seed=None)
        return grads[0]

    compiled = tb.xla_function(noisy)
    x, y = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
    if backend == "jax":
        with pytest.raises(ValueError, match="seed=keras.random.SeedGenerator"):
            compiled(x, y)
    else:
        first, second = compiled(x, y), compiled(x, y)
        assert not np.allclose(ops.convert_to_numpy(first), ops.convert_to_numpy(second))
    eager = [ops.convert_to_numpy(noisy(x, y)) for _ in range(2)]  # eagerly on both
    assert not np.allclose(eager[0], eager[1])


def _batches(dataset):
    """The batches of one pass over a ``poisson_batches`` result, as NumPy tuples."""
    return [tuple(ops.convert_to_numpy(t) for t in batch) for batch in dataset]


def test_poisson_batches_pad_to_a_multiple_with_zero_weights(backend):
    """Each batch holds the drawn samples, then rows of zeros of weight 0 up to a multiple of
    m (at least m); sizes vary, every pass draws anew; "auto" pads on JAX only."""
    x, y = data(400)
    x = x.astype("float32")
    passes = [_batches(privacy.poisson_batches(x, y, 0.05, seed=1, pad_multiple=4))]
    dataset = privacy.poisson_batches(x, y, 0.05, seed=1, pad_multiple=4)
    passes += [_batches(dataset), _batches(dataset)]
    drawn = [[int(w.sum()) for _, _, w in p] for p in passes]
    assert drawn[0] == drawn[1] != drawn[2]  # the same seed, then the next pass
    assert len(drawn[0]) == 20 and len(set(drawn[0])) > 3 and 12 <= np.mean(drawn[0]) <= 28
    for batch_x, batch_y, w in passes[0]:
        size = int(w.sum())
        assert len(w) % 4 == 0 and len(w) >= max(size, 4) and len(batch_x) == len(w)
        np.testing.assert_array_equal(w, (np.arange(len(w)) < size).astype(w.dtype))
        assert not np.any(batch_x[size:]) and not np.any(batch_y[size:])
        rows = [np.flatnonzero((x == r).all(axis=1)) for r in batch_x[:size]]
        assert all(len(r) == 1 for r in rows) and len({int(r[0]) for r in rows}) == size
    auto = _batches(privacy.poisson_batches(x, y, 0.05, seed=1))
    if backend == "jax":  # m = round(sqrt(q N)) = round(sqrt(20)) = 4: one compiled step per m
        assert [len(b) for b in auto] == [3] * 20 and all(len(b[0]) % 4 == 0 for b in auto)
    else:  # TensorFlow traces one step for every batch size
        assert [len(b) for b in auto] == [2] * 20
    with pytest.raises(ValueError, match="pad_multiple must be positive"):
        privacy.poisson_batches(x, y, 0.05, pad_multiple=0)


def test_a_padded_batch_steps_as_the_unpadded_one():
    """Padding rows of weight 0 change nothing in the update (nor the noise); an empty batch
    is a step of noise alone, padded or not."""
    x, y = data(6)
    padded_x = np.concatenate([x, np.zeros((2, 5))])
    padded_y = np.concatenate([y, np.zeros(2, y.dtype)])
    weights = np.array([1.0] * 6 + [0.0] * 2)
    ends = []
    for batch in ((x, y, None), (padded_x, padded_y, weights)):
        model = private(expected_batch_size=6.0)
        model.train_on_batch(*batch[:2], sample_weight=batch[2])
        ends.append(flat(model.get_weights()))
    assert tolerances.relative_error(ends[1], ends[0], F64) <= RTOL64
    for batch in ((x[:0], y[:0], None), (padded_x[6:], padded_y[6:], weights[6:])):
        model = private(lr=1.0, expected_batch_size=4.0)
        w0, state = flat(model.get_weights()), model.noise_seed.state.numpy()
        model.train_on_batch(*batch[:2], sample_weight=batch[2])
        generator = tb.noise_seed_generator(0, "reference_noise")
        generator.state.assign(state)
        noise = keras.random.normal([w0.size], stddev=SIGMA * CLIP, dtype=F64, seed=generator)
        want = ops.convert_to_numpy(noise) / 4.0
        assert tolerances.relative_error(w0 - flat(model.get_weights()), want, F64) <= RTOL64


def test_poisson_training_fills_the_ledger_and_the_epsilon_logger():
    """fit on Poisson batches counts every step in the ledger (also when sigma changes between
    fits) and EpsilonLogger logs the accountant's epsilon of the steps taken."""
    x, y = data(200)
    q, steps = 0.05, 6
    dataset = privacy.poisson_batches(x, y, q, steps_per_epoch=steps, seed=2, pad_multiple=16)
    model = private(expected_batch_size=q * 200, sampling_rate=q)
    logger = privacy.EpsilonLogger(q, 1e-5)
    history = model.fit(dataset, epochs=2, verbose=0, callbacks=[logger])
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["epsilon"][-1] == pytest.approx(
        privacy.compute_epsilon(SIGMA, q, 2 * steps, 1e-5), rel=1e-12
    )
    model.noise_multiplier = 2.0
    model.fit(dataset, epochs=1, verbose=0)
    assert model.privacy_ledger == [(q, SIGMA, 2 * steps), (q, 2.0, steps)]
    both = model.privacy_spent(1e-5)
    assert both > privacy.compute_epsilon(SIGMA, q, 2 * steps, 1e-5)


def test_a_loss_scale_optimizer_is_refused():
    """DP-SGD never scales its loss, so a LossScaleOptimizer (mixed precision) would unscale
    gradients that were never scaled: refused, naming the fix."""
    model = private()
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), loss=LOSS)
    x, y = data(4)
    with pytest.raises(ValueError, match="plain optimizer"):
        model.train_on_batch(x, y)


@pytest.mark.slow
def test_a_short_dp_fit_on_mnist_digits_learns_with_the_norm_witness_passing(backend):
    """40 DP-SGD steps (clip 1, sigma 0.5, batch 100) on 2,000 of the offline MNIST digits take
    a 784-32-10 network from chance to over 75% test accuracy, while GradientCheck compares
    every variable's per-example gradient norms (what DP-SGD clips with) and batch gradient
    with autodiff at every 10th step, all passing. Measured on 2 shared cores: 82.9% on JAX
    (32 s with the checks), 81.1% on TensorFlow (10 s)."""
    import warnings

    from tf_jacbp import datasets
    from tf_jacbp.callbacks import GradientCheck
    from tf_jacbp.check.records import PER_EXAMPLE_NORMS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the offline-fallback warning, tested in test_datasets
        (x, y), (x_test, y_test) = datasets.load_mnist()
    chosen = np.random.default_rng(0).permutation(len(x))[:2000]  # the file is in digit order
    x, y = x[chosen].reshape(-1, 784).astype("float32") / 255, y[chosen].astype("int64")
    x_test, y_test = x_test.reshape(-1, 784).astype("float32") / 255, y_test.astype("int64")
    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [keras.Input((784,)), layers.Dense(32, activation="relu"), layers.Dense(10)]
    )
    model = privacy.make_private(net, 1.0, 0.5, seed=1)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    before = model.evaluate(x_test, y_test, verbose=0)[1]
    check = GradientCheck((x[:8], y[:8]), every_n_batches=10, verbose=0)
    model.fit(x, y, batch_size=100, epochs=2, verbose=0, callbacks=[check])
    after = model.evaluate(x_test, y_test, verbose=0)[1]
    assert before < 0.2 and after > 0.75, (backend, before, after)
    assert model.privacy_steps == 40
    norms = [r for r in check.records if r.witness == PER_EXAMPLE_NORMS]
    assert {r.variable for r in norms} == {v.path for v in model.trainable_variables}
    assert len(norms) >= 4 * 4 and all(r.passed for r in check.records)  # 4 or more checks


DATA_PARALLEL = """
import numpy as np, keras
from tf_jacbp import layers, losses, privacy
devices = keras.distribution.list_devices()
assert len(devices) == 2, devices
rng = np.random.default_rng(0)
x, y = rng.normal(size=(16, 5)), rng.integers(0, 4, 16)


def train():
    keras.utils.set_random_seed(3)
    net = keras.Sequential([keras.Input((5,), dtype="float64"),
                            layers.Dense(6, activation="relu", dtype="float64"),
                            layers.Dense(4, dtype="float64")])
    model = privacy.make_private(net, 0.5, 1.3, seed=11)
    model.compile(keras.optimizers.SGD(0.1),
                  losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model


alone = train()
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
parallel = train()
for a, b in zip(alone.get_weights(), parallel.get_weights(), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-14)
assert parallel.privacy_steps == alone.privacy_steps == 2, parallel.privacy_steps
state = [int(s) for s in parallel.noise_seed.state.numpy()]
assert state == [int(s) for s in alone.noise_seed.state.numpy()] and state[-1] == 2, state
print("same update")
"""


@pytest.mark.slow  # another process
def test_a_data_parallel_jax_dp_step_is_the_single_device_step(backend):
    """``keras.distribution.DataParallel`` over two host devices (a subprocess: the device count
    is fixed when JAX starts): each device holds half the batch, yet the step is the single
    device's to 1e-12 (one noise draw, not one per device), the ledger counts each step once
    and the noise state moves on by one draw a step."""
    if backend != "jax":
        pytest.skip("keras.distribution.DataParallel is Keras' JAX distribution")
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_ENABLE_X64": "1",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    result = subprocess.run(
        [sys.executable, "-c", DATA_PARALLEL], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "same update" in result.stdout, result.stderr[-3000:]


def test_a_float16_model_clips_by_float32_norms():
    """An all-float16 model: the norms that set the clip factors, and the clipped sum, are
    float32 computations, so a clipped sample's gradient exceeds C only by the final float16
    rounding of each entry (a factor of at most 1 + 2^-11)."""
    keras.utils.set_random_seed(4)
    net = keras.Sequential(
        [
            keras.Input((20,), dtype="float16"),
            layers.Dense(16, activation="relu", dtype="float16"),
            layers.Dense(4, dtype="float16"),
        ]
    )
    model = privacy.make_private(net, 1.0, 0.0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 20)).astype("float16"), rng.integers(0, 4, 8)
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    _, info = privacy.clipped_gradients(model, x, y, 1e6, loss=loss)
    assert keras.backend.standardize_dtype(info["norms"].dtype) == "float32"
    clip = float(np.median(ops.convert_to_numpy(info["norms"]))) / 2  # every sample clipped
    worst = 0.0
    for i in range(len(x)):
        grads, _ = privacy.clipped_gradients(model, x[i : i + 1], y[i : i + 1], clip, loss=loss)
        norm = np.sqrt(sum(np.sum(np.square(ops.convert_to_numpy(g).astype(F64))) for g in grads))
        worst = max(worst, norm / clip)
    assert 1 - 1e-3 <= worst <= 1 + 2.0**-11 + 1e-5, worst


def test_the_privacy_statement_names_this_backends_noise_generator(backend):
    """The statement's accounting is the same on every backend; its noise line names the
    generator the noise came from (Philox on TensorFlow, Threefry on JAX)."""
    text = privacy.privacy_statement(60000, 256, 1.1, 1000, 1e-5, l2_norm_clip=1.0)
    generator = {"tensorflow": "Philox", "jax": "Threefry"}[backend]
    assert f"Noise: from a pseudo-random generator ({generator})" in text
    rdp = privacy.compute_epsilon(1.1, 256 / 60000, 1000, 1e-5, rdp_conversion="classic")
    line = next(t for t in text.splitlines() if "RDP, classic conversion" in t)
    assert line.endswith(f"{rdp:10.3f}")  # the first such line: Poisson sampling's


ACROSS_BACKENDS = """
import sys

import keras
import numpy as np

import tf_jacbp.privacy  # noqa: F401 - registers DPModel

path, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = keras.models.load_model(path)
state = [int(s) for s in np.ravel(model.noise_seed.state.numpy())]
assert (state[0] if len(state) == 2 else (state[0] << 32) | state[1]) == seed, state
assert state[-1] == 2 and model.privacy_steps == 2, (state, model.privacy_steps)
saved = np.load(path + ".npz")
for i, w in enumerate(model.get_weights()):
    np.testing.assert_array_equal(np.asarray(w), saved[f"w{i}"])
model.train_on_batch(saved["x"], saved["y"])
model.save(out)
print("resumed on", keras.backend.backend())
"""


@pytest.mark.slow  # another process
def test_a_dp_checkpoint_resumes_on_the_other_backend(backend, tmp_path):
    """A DP model saved after two steps loads on the other backend with its weights, its
    62-bit seed, its draw count and its ledger (the state converted to that backend's layout),
    takes a step there, and comes back with three: the count never goes back, so no draw of
    either generator repeats (their streams differ: Philox and Threefry)."""
    other = "jax" if backend == "tensorflow" else "tensorflow"
    if importlib.util.find_spec(other) is None:
        pytest.skip(f"needs {other} installed beside {backend}: runs in .ci/run's JAX part")
    seed = 2**61 + 977
    model = private(seed=seed)
    x, y = data(8)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    path, out = os.path.join(tmp_path, "dp.keras"), os.path.join(tmp_path, "back.keras")
    model.save(path)
    weights = {f"w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
    np.savez(path + ".npz", x=x, y=y, **weights)
    result = subprocess.run(
        [sys.executable, "-c", ACROSS_BACKENDS, path, out, str(seed)],
        env={**os.environ, "KERAS_BACKEND": other, "JAX_ENABLE_X64": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and f"resumed on {other}" in result.stdout, result.stderr[-3000:]
    back = keras.models.load_model(out)
    assert _seed_of(back.noise_seed.state.numpy()) == seed
    assert int(np.ravel(back.noise_seed.state.numpy())[-1]) == 3 and back.privacy_steps == 3


def test_a_bad_label_stops_a_dp_fit_and_changes_no_weight():
    """A label out of range stops a DP fit after the step, with the weights unchanged, also in
    JAX's compiled step (where no assertion can stop it: the loss records it, the DP model is
    attached, its optimizer applies nothing). The ledger may count that step (on JAX its noise
    was drawn): an over-count, never an under-count, of the steps released."""
    model = private(model=None)
    x, y = data(16)
    model.fit(x[:8], y[:8], batch_size=8, verbose=0)
    before, steps = flat(model.get_weights()), model.privacy_steps
    y[13] = 9
    with pytest.raises(Exception, match="y_true must hold integer class indices in \\[0, 3\\]"):
        model.fit(x[8:], y[8:], batch_size=8, verbose=0)
    np.testing.assert_array_equal(flat(model.get_weights()), before)
    assert model.privacy_steps in (steps, steps + 1)
