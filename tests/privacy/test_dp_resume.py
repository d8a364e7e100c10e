"""Issue 24, items 1-3: a resumed run continues the noise sequence (never replays it), every run
draws fresh noise unless a test fixes the seed, and epsilon is for the whole training after a
resume (the privacy ledger travels with every checkpoint)."""

import os

import keras
import numpy as np
import pytest
from dp_helpers import LOSS, data, flat, mlp, step_noise
from scipy import stats

from tf_jacbp import privacy

CLIP, SIGMA, LR = 0.5, 1.3, 0.1


def _model(seed=11, **kwargs):
    keras.utils.set_random_seed(3)  # the same initial weights for every model of a test
    model = privacy.make_private(mlp(), CLIP, SIGMA, seed=seed, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=LOSS)
    return model


def _resume(route, model, tmp_path):
    """A model restored from ``model``'s checkpoint by ``route``."""
    if route == "save":
        path = os.path.join(tmp_path, "dp.keras")
        model.save(path)
        return keras.models.load_model(path)
    path = os.path.join(tmp_path, "dp.weights.h5")
    model.save_weights(path)
    restored = _model()
    restored.load_weights(path)
    return restored


@pytest.mark.parametrize("route", ["save", "save_weights"])
def test_a_resumed_run_continues_the_noise_sequence(route, tmp_path):
    """Noise of steps 3-4 after a resume from a step-2 checkpoint equals the uninterrupted
    run's steps 3-4 and differs from steps 1-2 (before the fix it replayed steps 1-2 exactly:
    the generator restarted from its seed)."""
    model = _model()
    x, y = data(model, 8)
    first = [step_noise(model, x, y, LR) for _ in range(2)]
    restored = _resume(route, model, tmp_path)
    restored.compile(optimizer=keras.optimizers.SGD(LR), loss=LOSS)
    uninterrupted = [step_noise(model, x, y, LR) for _ in range(2)]
    resumed = [step_noise(restored, x, y, LR) for _ in range(2)]
    for got, want in zip(resumed, uninterrupted, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    scale = float(np.max(np.abs(first[0])))
    for got, old in zip(resumed, first, strict=True):
        assert np.max(np.abs(got - old)) > 0.1 * scale  # not the first steps' noise again


def test_backup_and_restore_resumes_the_noise_and_the_ledger(tmp_path):
    """An interrupted fit resumed by BackupAndRestore ends at the uninterrupted run's weights
    (the same noise at every step) and its ledger counts every step."""
    x, y = data(mlp(), 8)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("interrupted")

    uninterrupted = _model()
    uninterrupted.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)
    backup = keras.callbacks.BackupAndRestore(os.path.join(tmp_path, "backup"))
    interrupted = _model()
    with pytest.raises(RuntimeError, match="interrupted"):
        interrupted.fit(
            x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=[backup, Interrupt()]
        )
    resumed = _model()
    resumed.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=[backup])
    np.testing.assert_allclose(
        flat(resumed.get_weights()), flat(uninterrupted.get_weights()), rtol=1e-9, atol=1e-12
    )
    assert resumed.privacy_steps == uninterrupted.privacy_steps == 4
    replayed = _model()  # what the resumed run would have drawn without the generator state
    replayed.set_weights(interrupted.get_weights())
    replayed.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert not np.allclose(flat(replayed.get_weights()), flat(resumed.get_weights()))


def test_epsilon_after_load_model_is_for_the_whole_training(tmp_path):
    """2 epochs of 4 steps, save, load_model, 1 more epoch: EpsilonLogger reports epsilon of
    12 steps (before the fix: of the 4 resumed steps alone)."""
    model = _model()
    x, y = data(model, 40)
    logger = privacy.EpsilonLogger(10 / 40, 1e-5)
    model.fit(x, y, batch_size=10, epochs=2, callbacks=[logger], verbose=0)
    path = os.path.join(tmp_path, "dp.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    loaded.compile(optimizer=keras.optimizers.SGD(LR), loss=LOSS)
    again = privacy.EpsilonLogger(10 / 40, 1e-5)
    history = loaded.fit(x, y, batch_size=10, epochs=1, callbacks=[again], verbose=0)
    expected = privacy.compute_epsilon(SIGMA, 0.25, 12, 1e-5)
    assert history.history["epsilon"][0] == pytest.approx(expected, rel=1e-12)
    assert loaded.privacy_ledger == [(0.25, SIGMA, 12)]
    assert loaded.privacy_spent(1e-5) == pytest.approx(expected, rel=1e-12)


def test_a_new_sigma_or_rate_composes_with_the_steps_before():
    """The ledger keeps steps per (q, sigma); epsilon is their composition, more than each."""
    model = _model(sampling_rate=0.25)
    x, y = data(model, 40)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)
    model.noise_multiplier = 2.0
    model.sampling_rate = 0.5
    model.fit(x, y, batch_size=20, epochs=1, verbose=0)
    assert model.privacy_ledger == [(0.25, SIGMA, 4), (0.5, 2.0, 2)]
    both = model.privacy_spent(1e-5)
    alone = [
        privacy.compute_epsilon(SIGMA, 0.25, 4, 1e-5),
        privacy.compute_epsilon(2.0, 0.5, 2, 1e-5),
    ]
    assert max(alone) < both < sum(alone)
    with pytest.raises(ValueError, match="unknown sampling rate"):
        unknown = _model()
        unknown.fit(x, y, batch_size=10, epochs=1, verbose=0)
        unknown.privacy_spent(1e-5)


def test_every_run_draws_fresh_noise_unless_a_test_fixes_the_seed():
    """seed=None seeds the noise from the operating system, not from Python's generator that
    keras.utils.set_random_seed fixes (before the fix two such models drew the same noise)."""
    states = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        states.append(privacy.make_private(mlp(), CLIP, SIGMA).noise_seed.state.numpy())
    assert not np.array_equal(states[0], states[1])
    fixed = [_model(seed=5).noise_seed.state.numpy() for _ in range(2)]
    np.testing.assert_array_equal(fixed[0], fixed[1])


def test_secure_mode_draws_standard_normals_from_the_operating_system():
    """secure_standard_normal is N(0, 1): chi-square and mean tests at false-failure rates 1e-6
    (not seeded: nothing can seed it); a secure-mode model with a fixed seed still draws anew."""
    z = privacy.secure_standard_normal(20000)
    n = z.size
    low, high = stats.chi2.ppf([0.5e-6, 1 - 0.5e-6], n)
    assert low <= float(np.sum(z**2)) <= high
    assert abs(z.mean()) <= 5 / np.sqrt(n)
    noises = []
    for _ in range(2):
        model = _model(seed=5, secure_mode=True)
        x, y = data(model, 8)
        noises.append(step_noise(model, x, y, LR))
    assert not np.allclose(noises[0], noises[1])
    assert np.std(noises[0]) == pytest.approx(SIGMA * CLIP, rel=0.5)


def test_checkpoints_move_between_plain_and_private_models(tmp_path):
    """The DP state has its own entry in the file: a DP checkpoint loads into the plain model of
    the same layers (deployment), and a plain checkpoint into a DPModel (private fine-tuning),
    whose noise state and ledger stay its own."""
    model = _model(sampling_rate=0.25)
    x, y = data(model, 8)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    path = os.path.join(tmp_path, "dp.weights.h5")
    model.save_weights(path)
    plain = mlp()
    plain.load_weights(path)
    np.testing.assert_array_equal(flat(plain.get_weights()), flat(model.get_weights()))
    plain_path = os.path.join(tmp_path, "plain.weights.h5")
    plain.save_weights(plain_path)
    private = _model(seed=12)
    state = private.noise_seed.state.numpy()
    private.load_weights(plain_path)
    np.testing.assert_array_equal(flat(private.get_weights()), flat(model.get_weights()))
    np.testing.assert_array_equal(private.noise_seed.state.numpy(), state)
    assert private.privacy_steps == 0 and model.privacy_steps == 2
