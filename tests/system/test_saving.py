"""Saving tf_jacbp models: ``.keras`` files, ``model.export`` SavedModels, and Keras' checkpoints.

* A ``.keras`` round trip of a model with every tf_jacbp layer type gives identical predictions
  and gradients, and a compiled, trained model resumes training exactly where it stopped.
* ``model.export`` keeps the custom gradients: reloaded in a fresh process (which does not import
  tf_jacbp), the serving function's gradient equals the original model's Jacobian route, and for a
  layer whose backward pass is deliberately scaled by 3 it is 3 times autodiff's: the stored
  backward pass is the one differentiated, not the forward ops.
* ``keras.callbacks.ModelCheckpoint`` (best ``.keras`` model, per-epoch ``.weights.h5``) and
  ``keras.callbacks.BackupAndRestore`` save and restore tf_jacbp models; training resumes.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from planted import BACKWARD_SCALE, ScaledBackwardDense

import tf_jacbp
from tf_jacbp import layers, losses, tolerances
from tf_jacbp.layers.base import JacobianLayer
from tf_jacbp.testing import model_gradients

REPO = Path(__file__).resolve().parents[2]
GRADIENT_WORKER = Path(__file__).parent / "workers" / "saved_model_gradients.py"
WORKER_TIMEOUT_S = 180


def available_layer_classes() -> set[type]:
    """Every public tf_jacbp layer class importable now, from every ``tf_jacbp.layers`` module."""
    names = ["tf_jacbp.layers"] + [
        f"tf_jacbp.layers.{m.name}" for m in pkgutil.iter_modules(tf_jacbp.layers.__path__)
    ]
    classes = set()
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, JacobianLayer)
                and obj is not JacobianLayer
                and not attr.startswith("_")
                and obj.__module__.startswith("tf_jacbp.")
            ):
                classes.add(obj)
    return classes


def _layer(module: str, name: str):
    """``module.name`` if importable, else None (conv and pooling are optional here)."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


IMAGE_LAYERS = (
    ("tf_jacbp.layers.conv", "Conv2D"),
    ("tf_jacbp.layers.pooling", "MaxPooling2D"),
    ("tf_jacbp.layers.pooling", "AveragePooling2D"),
)


def mixed_model(image_layers: bool = True) -> keras.Model:
    """Every available tf_jacbp layer type in one functional model; image input ``(8, 8, 2)``.

    Skips (``Add``, ``Concatenate``, a ``Multiply`` gate), batch and layer normalization, dropout,
    an image path read as a sequence. ``image_layers=False`` leaves out the convolutions, pooling,
    the image skip and the reshaping layers. ``Embedding`` takes integer ids, not this model's
    images: its ``.keras`` round trip is tests/layers/test_embedding.py's.
    """
    conv2d, max_pool, avg_pool = (
        _layer(*where) if image_layers else None for where in IMAGE_LAYERS
    )
    x = keras.Input((8, 8, 2))
    h = x
    if conv2d is not None:
        h = conv2d(3, 3, padding="same", activation="relu", name="conv_tied")(h)
        h = layers.BatchNormalization(name="bn_image")(h)
        skip = conv2d(3, 3, padding="same", use_bias=False, name="conv_skip")(h)
        h = layers.Add(name="add_image")([skip, h])
    if max_pool is not None:
        h = max_pool(2, name="max_pool")(h)
    if conv2d is not None:
        h = conv2d(4, 2, bias="untied", activation="tanh", name="conv_untied")(h)
    if avg_pool is not None:
        h = avg_pool(2, strides=1, padding="same", name="avg_pool")(h)
    pooled = []
    if image_layers:  # (3, 3, 4) -> transposed conv, padded, upsampled, read as a sequence
        h = layers.Conv2DTranspose(4, 3, padding="same", activation="relu", name="deconv")(h)
        h = layers.ZeroPadding2D(((1, 0), (0, 1)), name="zero_pad")(h)
        h = layers.UpSampling2D(2, name="up")(h)
        pooled += [layers.GlobalMaxPooling2D()(h), layers.GlobalAveragePooling2D()(h)]
        h = layers.Reshape((-1, 4), name="to_sequence")(h)
        h = layers.MaxPooling1D(2, name="max_pool_1d")(h)
        h = layers.AveragePooling1D(3, strides=2, padding="same", name="avg_pool_1d")(h)
        h = layers.Conv1D(4, 3, padding="causal", activation="relu", name="conv_1d")(h)
        h = layers.LayerNormalization(name="ln_sequence")(h)
        h = layers.Dense(4, name="dense_per_position")(h)  # Dense on (batch, T, d)
        pooled += [layers.GlobalMaxPooling1D()(h), layers.GlobalAveragePooling1D()(h)]
        # the image read as a volume (8, 8, 2, 1): the 3-D convolution and pooling
        v = layers.Reshape((8, 8, 2, 1), name="to_volume")(x)
        v = layers.Conv3D(2, (2, 2, 1), activation="relu", name="conv_3d")(v)
        v = layers.MaxPooling3D((2, 2, 1), name="max_pool_3d")(v)
        v = layers.AveragePooling3D((2, 2, 1), strides=1, name="avg_pool_3d")(v)
        pooled.append(layers.Flatten(name="flat_volume")(v))
    h = layers.Flatten()(h)
    h = layers.Dense(16, activation="swish")(h)
    if pooled:
        h = layers.Concatenate(name="concat_pooled")([h, *pooled])
        h = layers.Dense(16)(h)
    h = layers.Add(name="add_features")([layers.Dense(16, name="dense_skip")(h), h])
    h = layers.Multiply(name="gate")([h, layers.Dense(16, activation="sigmoid")(h)])
    h = layers.BatchNormalization(momentum=0.9, epsilon=1e-2, name="bn_features")(h)
    h = layers.Dropout(0.25, seed=3)(h)
    for layer in [
        layers.LeakyReLU(0.2),
        layers.Dense(12, activation="elu"),
        layers.Sigmoid(),
        layers.Dense(12, activation="gelu", use_bias=False),
        layers.Tanh(),
        layers.ELU(alpha=0.5),
        layers.Softplus(),
        layers.GELU(approximate=True),
        layers.Swish(),
        layers.Activation("tanh"),
        layers.ReLU(negative_slope=0.1, max_value=6.0),
        layers.Dense(5),
        layers.Softmax(),
    ]:
        h = layer(h)
    return keras.Model(x, h, name="mixed")


def _data(rng: np.random.Generator, model: keras.Model, n: int = 4):
    x = rng.normal(size=(n, *model.input_shape[1:])).astype("float32")
    t = rng.normal(size=(n, *model.output_shape[1:])).astype("float32")
    return tf.constant(x), tf.constant(t)


def _gradients(model: keras.Model, x: tf.Tensor, upstream, reference: bool = False) -> dict:
    """Gradients of ``sum(model(x) * upstream)``, keyed as the reload worker keys them.

    ``"dx"`` (w.r.t. ``x``) and ``"d/<variable path>"``, through the Jacobian route or, with
    ``reference=True``, the reference route (autodiff).
    """
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        tape.watch(x)
        if reference:
            with tf_jacbp.reference_mode():
                y = model(x)
        else:
            y = model(x)
        loss = tf.reduce_sum(y * upstream)
    dx, *dvariables = tape.gradient(loss, [x, *variables])
    result = {"dx": dx.numpy()}
    result.update({f"d/{v.path}": g.numpy() for v, g in zip(variables, dvariables, strict=True)})
    return result


def _assert_close(actual, expected, what: str) -> None:
    err = tolerances.relative_error(actual, expected, "float32")
    assert err <= tolerances.rtol("float32"), (
        f"{what}: relative error {err:.3g} > rtol {tolerances.rtol('float32')} (float32)"
    )


# --- .keras -----------------------------------------------------------------------------------


def test_mixed_model_holds_every_available_layer_type():
    model = mixed_model()
    classes = available_layer_classes()
    # Base classes of other layers (Conv2D's and Conv1D's ToeplitzConv) are not layers to place,
    # and Embedding's integer ids do not fit this image model (see mixed_model).
    bases = {c for c in classes if any(o is not c and issubclass(o, c) for o in classes)}
    missing = classes - bases - {layers.Embedding} - {type(layer) for layer in model.layers}
    assert not missing, f"add {sorted(c.__name__ for c in missing)} to mixed_model()"


def test_keras_round_trip_gives_identical_predictions_and_gradients(tmp_path):
    rng = np.random.default_rng(0)
    model = mixed_model()
    x, t = _data(rng, model)
    upstream = rng.normal(size=model.output_shape[1:]).astype("float32")
    path = tmp_path / "mixed.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    assert [layer.get_config() for layer in loaded.layers] == [
        layer.get_config() for layer in model.layers
    ]
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    for g, r in zip(
        model_gradients(loaded, x, t, reference=False),
        model_gradients(model, x, t, reference=False),
        strict=True,
    ):
        np.testing.assert_array_equal(g, r)
    np.testing.assert_array_equal(
        _gradients(loaded, x, upstream)["dx"], _gradients(model, x, upstream)["dx"]
    )
    # The gradients are the Jacobian route's, which agrees with autodiff (not a vacuous zero).
    ref = model_gradients(loaded, x, t, reference=True)
    for g, r in zip(model_gradients(loaded, x, t, reference=False), ref, strict=True):
        _assert_close(g, r, "reloaded model, Jacobian route vs reference route")
    assert all(np.any(r) for r in ref)


def _models_to_round_trip() -> list[str]:
    names = ["lenet_100_300_10"]
    if hasattr(tf_jacbp.models, "lenet5"):
        names.append("lenet5")
    return names


@pytest.mark.parametrize("name", _models_to_round_trip())
def test_compiled_model_resumes_training_exactly_after_keras_round_trip(name, tmp_path):
    """Optimizer state (SGD momentum) and the tf_jacbp loss are saved: the next steps are equal."""
    rng = np.random.default_rng(1)
    model = getattr(tf_jacbp.models, name)()
    n = 64
    x = rng.normal(size=(n, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, 10, size=n)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.loss, losses.SparseCategoricalCrossentropy)
    assert loaded.loss.from_logits
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == n // 16
    for a, b in zip(loaded.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    loaded_history = loaded.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert loaded_history.history["loss"] == history.history["loss"]
    for a, b, w0 in zip(loaded.get_weights(), model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, w0)


# --- model.export -----------------------------------------------------------------------------


def scaled_model() -> keras.Sequential:
    """``Dense(tanh) -> ScaledBackwardDense -> Softmax``: every gradient is 3x autodiff's."""
    return keras.Sequential(
        [
            keras.Input((6,)),
            layers.Dense(5, activation="tanh"),
            ScaledBackwardDense(4, name="scaled_backward"),
            layers.Softmax(),
        ],
        name="scaled",
    )


def _reload_and_differentiate(tmp_path: Path, exports: list[tuple[Path, dict]]) -> list[dict]:
    """Run the gradient worker on ``(export_dir, {"x", "upstream"})`` pairs in a fresh process."""
    args = []
    for k, (export_dir, inputs) in enumerate(exports):
        path = tmp_path / f"inputs{k}.npz"
        np.savez(path, **inputs)
        args += [str(export_dir), str(path)]
    out = tmp_path / "gradients.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(GRADIENT_WORKER), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"the reload worker failed:\n{proc.stderr[-4000:]}"
    with np.load(out) as f:
        result = {k: f[k] for k in f.files}
    return [
        {key.split("/", 1)[1]: v for key, v in result.items() if key.startswith(f"{k}/")}
        for k in range(len(exports))
    ]


def _export_and_compare(tmp_path: Path, models: dict[str, keras.Model], seed: int):
    """Export each model, reload in a fresh process, compare with the Jacobian route.

    Returns ``(inputs, reloaded)``: per model ``(x, upstream)`` and the worker's arrays.
    """
    rng = np.random.default_rng(seed)
    exports, inputs = [], {}
    for name, model in models.items():
        x, _ = _data(rng, model, n=3)
        upstream = rng.normal(size=(3, *model.output_shape[1:])).astype("float32")
        inputs[name] = (x, upstream)
        model.export(tmp_path / name, verbose=False)
        exports.append((tmp_path / name, {"x": x.numpy(), "upstream": upstream}))
    reloaded = dict(zip(models, _reload_and_differentiate(tmp_path, exports), strict=True))

    for name, model in models.items():
        x, upstream = inputs[name]
        result = reloaded[name]
        _assert_close(result["y"], model(x).numpy(), f"{name}: serve(x) vs model(x)")
        jacobian = _gradients(model, x, upstream)
        assert set(jacobian) == {k for k in result if k != "y"}
        for key, g in jacobian.items():
            _assert_close(result[key], g, f"{name}: reloaded {key} vs the Jacobian route")
    return inputs, reloaded


@pytest.mark.slow
def test_exported_saved_model_keeps_the_custom_gradients(tmp_path):
    models = {"dense_activations": mixed_model(image_layers=False), "scaled": scaled_model()}
    inputs, reloaded = _export_and_compare(tmp_path, models, seed=2)

    # The scaled backward pass was saved and is what the reloaded graph differentiates: every
    # gradient is BACKWARD_SCALE times autodiff's (the reference route), not autodiff's.
    model = models["scaled"]
    x, upstream = inputs["scaled"]
    result = reloaded["scaled"]
    for key, g in _gradients(model, x, upstream, reference=True).items():
        _assert_close(result[key], BACKWARD_SCALE * g, f"scaled: reloaded {key} vs 3 x autodiff")
        err = tolerances.relative_error(result[key], g, "float32")
        assert err > 0.5, f"scaled: reloaded {key} equals autodiff's (relative error {err:.3g})"


@pytest.mark.slow
def test_export_keeps_the_custom_gradients_of_image_layers(tmp_path):
    """Conv2D, MaxPooling2D and AveragePooling2D, each in a model of its own, exported and
    reloaded together (one fresh process: its TensorFlow start-up is most of this test's time)."""
    models = {}
    for module, name in IMAGE_LAYERS:
        layer_class = _layer(module, name)
        args = (2, 3) if name == "Conv2D" else (2,)
        models[name] = keras.Sequential(
            [
                keras.Input((6, 6, 2)),
                layer_class(*args),
                keras.layers.Flatten(),
                layers.Dense(3, activation="tanh"),
            ]
        )
    _export_and_compare(tmp_path, models, seed=4)


# --- Keras checkpoint callbacks ---------------------------------------------------------------


class WeightSnapshots(keras.callbacks.Callback):
    """The model's weights at the end of every epoch (``snapshots[epoch]``)."""

    def __init__(self):
        super().__init__()
        self.snapshots: dict[int, list[np.ndarray]] = {}

    def on_epoch_end(self, epoch, logs=None):
        self.snapshots[epoch] = [w.copy() for w in self.model.get_weights()]


class Interrupted(Exception):
    """Stands for a crash in the middle of ``fit``."""


class InterruptAfterEpoch(keras.callbacks.Callback):
    """Raise ``Interrupted`` at the end of ``epoch`` (after the callbacks listed before it)."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupted(f"interrupted after epoch {epoch}")


class EpochsSeen(keras.callbacks.Callback):
    """The indices of the epochs ``fit`` runs."""

    def __init__(self):
        super().__init__()
        self.epochs: list[int] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def _compiled_lenet(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = tf_jacbp.models.lenet_100_300_10()
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


@pytest.fixture(scope="module")
def digits_like():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(96, 28, 28)).astype("float32")
    y = np.argmax(x.reshape(96, -1) @ rng.normal(size=(784, 10)), axis=1)
    return x, y


def test_model_checkpoint_best_keras_file_and_per_epoch_weights(tmp_path, digits_like):
    x, y = digits_like
    model = _compiled_lenet(seed=0)
    snapshots = WeightSnapshots()
    # mode="max" on a decreasing loss makes epoch 0 the best: the file must keep epoch 0's
    # weights while training goes on, so it shows that save_best_only selects, not overwrites.
    best = keras.callbacks.ModelCheckpoint(
        tmp_path / "best.keras", monitor="loss", mode="max", save_best_only=True
    )
    per_epoch = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "epoch{epoch:02d}.weights.h5"), save_weights_only=True
    )
    epochs = 3
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[snapshots, best, per_epoch],
    )
    loss = history.history["loss"]
    assert all(a > b for a, b in zip(loss, loss[1:], strict=False)), loss

    reloaded = keras.models.load_model(tmp_path / "best.keras")
    assert isinstance(reloaded.layers[-1], layers.Dense)
    for a, b in zip(reloaded.get_weights(), snapshots.snapshots[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(reloaded.get_weights(), model.get_weights(), strict=True)
    )

    for epoch in range(epochs):
        keras.utils.set_random_seed(1)
        fresh = tf_jacbp.models.lenet_100_300_10()
        fresh.load_weights(tmp_path / f"epoch{epoch + 1:02d}.weights.h5")
        for a, b in zip(fresh.get_weights(), snapshots.snapshots[epoch], strict=True):
            np.testing.assert_array_equal(a, b)

    # Training resumes from the best file (with its optimizer state) and lowers the loss again.
    resumed = reloaded.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert resumed.history["loss"][-1] < loss[0]


def test_backup_and_restore_resumes_an_interrupted_fit(tmp_path, digits_like):
    x, y = digits_like
    epochs, interrupt_after = 4, 1
    fit = {"batch_size": 32, "epochs": epochs, "shuffle": False, "verbose": 0}

    uninterrupted = _compiled_lenet(seed=0)
    uninterrupted.fit(x, y, **fit)

    backup_dir = tmp_path / "backup"
    first = _compiled_lenet(seed=0)
    with pytest.raises(Interrupted):
        first.fit(
            x,
            y,
            callbacks=[
                keras.callbacks.BackupAndRestore(backup_dir),
                InterruptAfterEpoch(interrupt_after),
            ],
            **fit,
        )
    assert backup_dir.exists() and any(backup_dir.iterdir())

    # A new process would build the model afresh: other initial weights, no optimizer state.
    second = _compiled_lenet(seed=7)
    seen = EpochsSeen()
    second.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore(backup_dir), seen], **fit)
    assert seen.epochs == list(range(interrupt_after + 1, epochs))
    assert int(second.optimizer.iterations) == int(uninterrupted.optimizer.iterations)
    for a, b in zip(second.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=0)
    assert not backup_dir.exists() or not any(backup_dir.iterdir())
