"""The harness of ``tf_jacbp.testing.check_layer``: the model around the layer, its data, and
checks 1-6 (the module docstring of ``tf_jacbp.testing`` lists them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tf_jacbp import jacobian, tolerances
from tf_jacbp._backend import keras, tf
from tf_jacbp.route import reference_mode


@keras.saving.register_keras_serializable(package="tf_jacbp.testing")
class InputScale(keras.layers.Layer):
    """``y = x * s`` with a trainable ``s`` of the input's shape (stock ops, autodiff)."""

    def build(self, input_shape):
        self.s = self.add_weight(name="s", shape=tuple(input_shape[1:]), initializer="ones")

    def call(self, x):
        return x * keras.ops.cast(self.s, x.dtype)


def half_squared_error(t: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """``0.5 * ||y - t||^2`` per sample (stock ops)."""
    axes = list(range(1, len(y.shape)))
    return 0.5 * tf.reduce_sum(tf.square(tf.cast(y, t.dtype) - t), axis=axes)


def several_inputs(input_shape: Sequence) -> bool:
    """Whether ``input_shape`` is a list of shapes (a layer of several inputs)."""
    return len(input_shape) > 0 and isinstance(input_shape[0], (list, tuple))


def build_model(
    make_layer: Callable[[str], keras.layers.Layer], input_shape: Sequence, dtype: str
) -> keras.Model:
    """``Input -> InputScale -> layer``, every layer with the dtype policy ``dtype``; for a list
    of input shapes, one ``Input -> InputScale`` per input, all fed to the layer."""
    input_dtype = "float64" if dtype == "float64" else "float32"
    if not several_inputs(input_shape):
        return keras.Sequential(
            [
                keras.Input(tuple(input_shape), dtype=input_dtype),
                InputScale(dtype=dtype),
                make_layer(dtype),
            ]
        )
    inputs = [keras.Input(tuple(shape), dtype=input_dtype) for shape in input_shape]
    scaled = [InputScale(dtype=dtype)(x) for x in inputs]
    return keras.Model(inputs, make_layer(dtype)(scaled))


def loss_gradients(
    model: keras.Model, x, t, reference: bool, training: bool | None = None
) -> list[tf.Tensor]:
    """Gradients of the mean loss (plus regularization, as ``fit`` adds it)."""
    with tf.GradientTape() as tape:
        if reference:
            with reference_mode():
                y = model(x, training=training)
        else:
            y = model(x, training=training)
        loss = tf.reduce_mean(half_squared_error(t, y)) + sum(model.losses)
    return tape.gradient(loss, model.trainable_variables)


def model_gradients(
    model: keras.Model, x, t, reference: bool, training: bool | None = None
) -> list[np.ndarray]:
    """``loss_gradients``, eagerly, as NumPy arrays; each must exist."""
    grads = loss_gradients(model, x, t, reference, training)
    for g, v in zip(grads, model.trainable_variables, strict=True):
        assert g is not None, f"no gradient reaches {v.path}"
    return [np.asarray(g) for g in grads]


def model_state(model: keras.Model) -> list[np.ndarray]:
    """The values of the non-trainable variables (moving statistics, seed generator states)."""
    return [np.asarray(v) for v in model.non_trainable_variables]


def set_model_state(model: keras.Model, state: Sequence[np.ndarray]) -> None:
    """Assign ``model_state`` values back."""
    for v, value in zip(model.non_trainable_variables, state, strict=True):
        v.assign(value)


def assert_gradients_close(
    grads: Sequence, refs: Sequence, variables: Sequence, dtype: str, what: str, rtol=None
) -> None:
    """Each gradient within ``rtol`` (default: the dtype's) of its reference, all finite."""
    rtol = tolerances.rtol(dtype) if rtol is None else rtol
    for g, r, v in zip(grads, refs, variables, strict=True):
        err = tolerances.relative_error(g, r, dtype)
        assert err <= rtol, (
            f"{what}: gradient of {v.path} differs from the reference: relative error {err:.3g} "
            f"> rtol {rtol:.3g} ({dtype})"
        )


def draw_inputs(input_shape: Sequence, batch_size: int, dtype: str, rng, input_fn) -> Any:
    """A batch of inputs of ``input_shape`` (a list of them for a list of shapes), drawn by
    ``input_fn(rng, shape)`` or standard normal."""
    if several_inputs(input_shape):
        return [draw_inputs(shape, batch_size, dtype, rng, input_fn) for shape in input_shape]
    shape = (batch_size, *input_shape)
    return tf.constant(input_fn(rng, shape) if input_fn else rng.normal(size=shape), dtype)


def _data(model: keras.Model, input_shape, batch_size: int, dtype: str, seed: int, input_fn):
    rng = np.random.default_rng(seed)
    x = draw_inputs(input_shape, batch_size, dtype, rng, input_fn)
    t = rng.normal(size=model(x).shape)
    return x, tf.constant(t, dtype)


def _check_routes_agree(make_layer, input_shape, batch_size, seed, input_fn, training) -> None:
    for dtype in ("float64", "float32"):
        model = build_model(make_layer, input_shape, dtype)
        x, t = _data(model, input_shape, batch_size, dtype, seed, input_fn)
        state = model_state(model)
        grads = model_gradients(model, x, t, reference=False, training=training)
        set_model_state(model, state)
        refs = model_gradients(model, x, t, reference=True, training=training)
        assert_gradients_close(grads, refs, model.trainable_variables, dtype, f"{dtype} route")


def _check_finite_differences(
    make_layer, input_shape, batch_size, seed, input_fn, training
) -> None:
    model = build_model(make_layer, input_shape, "float64")
    x, t = _data(model, input_shape, batch_size, "float64", seed, input_fn)
    values = [tf.identity(v) for v in model.trainable_variables]
    fixed = [tf.identity(v) for v in model.non_trainable_variables]
    for i, v in enumerate(model.trainable_variables):

        def loss_at(value, i=i):
            trainable = values[:i] + [value] + values[i + 1 :]
            y, _ = model.stateless_call(trainable, fixed, x, training=training)
            return tf.reduce_mean(half_squared_error(t, y))

        theoretical, numerical = tf.test.compute_gradient(
            loss_at, [values[i]], delta=tolerances.FINITE_DIFFERENCE_DELTA
        )
        err = tolerances.relative_error(theoretical[0], numerical[0])
        assert err <= tolerances.FINITE_DIFFERENCE_RTOL, (
            f"finite differences: gradient of {v.path} relative error {err:.3g} "
            f"> {tolerances.FINITE_DIFFERENCE_RTOL}"
        )


def _fit_update(model: keras.Model, x, t, optimizer, **compile_args) -> list[np.ndarray]:
    """The update ``w_before - w_after`` of one ``train_on_batch`` step."""
    model.compile(optimizer=optimizer, loss=half_squared_error, **compile_args)
    before = [np.asarray(v) for v in model.trainable_variables]
    model.train_on_batch(x, t)
    return [b - np.asarray(v) for b, v in zip(before, model.trainable_variables, strict=True)]


def _check_fit_modes(make_layer, input_shape, batch_size, seed, input_fn, training) -> None:
    training = None if training is None else True  # fit trains
    template = build_model(make_layer, input_shape, "float32")
    x, t = _data(template, input_shape, batch_size, "float32", seed, input_fn)
    state = model_state(template)
    refs = model_gradients(template, x, t, reference=True, training=training)
    state_after = model_state(template)
    modes = {
        "eager": {"run_eagerly": True},
        "graph": {"jit_compile": False},
        "jit_compile": {"jit_compile": True},
    }
    for mode, compile_args in modes.items():
        if training and mode != "eager":
            # Under XLA the stateless random ops draw other numbers than eagerly (for
            # keras.layers.Dropout too): compare with the reference route compiled the same way.
            set_model_state(template, state)
            compiled = tf.function(
                lambda x, t: loss_gradients(template, x, t, reference=True, training=True),
                jit_compile=compile_args["jit_compile"],
                autograph=False,
            )
            refs = [np.asarray(g) for g in compiled(x, t)]
            state_after = model_state(template)
        model = build_model(make_layer, input_shape, "float32")
        model.set_weights(template.get_weights())
        set_model_state(model, state)
        update = _fit_update(model, x, t, keras.optimizers.SGD(1.0), **compile_args)
        assert_gradients_close(
            update, refs, model.trainable_variables, "float32", f"model.fit ({mode})"
        )
        if training:
            assert_gradients_close(
                model_state(model),
                state_after,
                model.non_trainable_variables,
                "float32",
                f"state after model.fit ({mode})",
            )


def _check_mixed_precision(make_layer, input_shape, batch_size, seed, input_fn, training) -> None:
    model = build_model(make_layer, input_shape, "mixed_float16")
    x, t = _data(model, input_shape, batch_size, "float32", seed, input_fn)
    state = model_state(model)
    grads = model_gradients(model, x, t, reference=False, training=training)
    set_model_state(model, state)
    refs = model_gradients(model, x, t, reference=True, training=training)
    set_model_state(model, state)
    fit_refs = refs
    if training is False:  # fit trains
        fit_refs = model_gradients(model, x, t, reference=True, training=True)
        set_model_state(model, state)
    for g, v in zip(grads, model.trainable_variables, strict=True):
        assert v.dtype == "float32", f"{v.path} is {v.dtype} under mixed_float16"
        assert g.dtype == np.float32, f"the gradient of {v.path} is {g.dtype}, not float32"
    assert_gradients_close(grads, refs, model.trainable_variables, "float16", "mixed_float16 route")
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1.0), initial_scale=2.0**7)
    update = _fit_update(model, x, t, optimizer)
    assert_gradients_close(
        update, fit_refs, model.trainable_variables, "float16", "mixed_float16 loss-scaled fit"
    )


def _check_saving(make_layer, input_shape, batch_size, seed, input_fn, training, tmp_dir) -> None:
    model = build_model(make_layer, input_shape, "float32")
    x, t = _data(model, input_shape, batch_size, "float32", seed, input_fn)
    if training:
        model(x, training=True)
    path = f"{tmp_dir}/model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.layers[-1]) is type(model.layers[-1])
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    if training:  # .keras files do not keep seed generator states (Keras' choice): copy them
        set_model_state(loaded, model_state(model))
    for g, r in zip(
        model_gradients(loaded, x, t, False, training),
        model_gradients(model, x, t, False, training),
        strict=True,
    ):
        np.testing.assert_array_equal(g, r)


def _check_per_example_rows(make_layer, input_shape, batch_size, seed, input_fn, training):
    """Check 6: ``per_example_gradients`` against the reference route on batches of one (models
    of one input: ``tf_jacbp.jacobian`` walks those; a layer of several inputs has its
    per-sample products checked by check 7)."""
    if several_inputs(input_shape):
        return
    model = keras.Sequential(
        [keras.Input(tuple(input_shape), dtype="float64"), make_layer("float64")]
    )
    if not model.trainable_variables:
        return
    x, t = _data(model, input_shape, batch_size, "float64", seed, input_fn)
    rows = jacobian.per_example_gradients(model, x, t, loss=half_squared_error, flatten=False)
    for i in range(batch_size):
        with tf.GradientTape() as tape:
            with reference_mode():
                y = model(x[i : i + 1], training=False)
            loss = tf.reduce_sum(half_squared_error(t[i : i + 1], y))
        refs = tape.gradient(loss, model.trainable_variables)
        assert_gradients_close(
            [g[i] for g in rows],
            refs,
            model.trainable_variables,
            "float64",
            f"per-example row of sample {i}",
        )
