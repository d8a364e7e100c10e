"""Faults lose nothing: a fit that crashes mid-epoch and is resumed by BackupAndRestore ends
where an uninterrupted one does, bit for bit (op determinism on, in a subprocess of its own).

BackupAndRestore backs up at epoch ends (its default): Keras 3 restores the epoch, not the step,
so with ``save_freq=<batches>`` the resumed run repeats part of an epoch, for stock layers too.
"""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import keras
    import numpy as np
    import tensorflow as tf
    import tf_jacbp

    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(256, 28, 28)).astype("float32")
    y = rng.integers(0, 10, size=256)


    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.optimizer.iterations.numpy() == 13:
                raise RuntimeError("simulated crash")


    def train(backup_dir=None, crash=False):
        keras.utils.set_random_seed(0)
        model = tf_jacbp.models.lenet_100_300_10()
        model.compile(
            keras.optimizers.Adam(1e-3),
            tf_jacbp.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        callbacks = []
        if backup_dir:
            callbacks.append(keras.callbacks.BackupAndRestore(backup_dir))
        if crash:
            callbacks.append(Crash())
        model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
        return model.get_weights()


    backup = sys.argv[1]
    uninterrupted = train()
    try:
        train(backup, crash=True)
        raise SystemExit("the crash did not happen")
    except RuntimeError as err:
        assert "simulated crash" in str(err)
    resumed = train(backup)
    assert len(resumed) == len(uninterrupted)
    for a, b in zip(resumed, uninterrupted):
        np.testing.assert_array_equal(a, b)
    print("bit-identical")
    """
)


@pytest.mark.slow
def test_interrupted_fit_resumes_bit_identically(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "backup")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "bit-identical" in result.stdout


DETERMINISM = textwrap.dedent(
    """
    import keras
    import numpy as np
    import tensorflow as tf
    import tf_jacbp

    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(512, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=512)


    def train():
        keras.utils.set_random_seed(0)
        model = tf_jacbp.models.lenet5()
        model.compile(
            keras.optimizers.Adam(1e-3),
            tf_jacbp.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, batch_size=64, epochs=2, verbose=0)  # shuffled, from the seed
        return model.get_weights()


    first, second = train(), train()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    print("bit-identical")
    """
)


@pytest.mark.slow
def test_lenet5_trainings_with_a_fixed_seed_are_bit_identical():
    result = subprocess.run(
        [sys.executable, "-c", DETERMINISM], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "bit-identical" in result.stdout
