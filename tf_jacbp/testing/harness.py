"""The harness of ``tf_jacbp.testing.check_layer``: the model around the layer, its data, and
checks 1-6 (the module docstring of ``tf_jacbp.testing`` lists them).

It runs on Keras' TensorFlow and JAX backends: gradients are the backend's autodiff
(``tf_jacbp.backend.value_and_gradients``: ``tf.GradientTape`` or ``jax.value_and_grad``) through
the model's ``stateless_call``, finite differences are central differences of the same loss
(compiled with ``jax.jit`` on JAX), and data are ``keras.ops`` tensors.

The reference route of a convolution on the implicit route (``layer.route_for``) is the witness
of ``tf_jacbp.check.conv_witness`` (autodiff of the materialized ``T(K)``; where that is over
the budget, stock autodiff, and then check 2's finite differences are the independent
witness): stock autodiff would run the same convolution kernels. ``witness_log`` collects what
was chosen, per dtype policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp import backend, jacobian, numerics, tolerances
from tf_jacbp._backend import BACKEND, keras
from tf_jacbp.check.conv_witness import ConvWitnesses
from tf_jacbp.check.routes import layers_of
from tf_jacbp.route import reference_mode

Tensor = Any


@keras.saving.register_keras_serializable(package="tf_jacbp.testing")
class InputScale(keras.layers.Layer):
    """``y = x * s`` with a trainable ``s`` of the input's shape (stock ops, autodiff)."""

    def build(self, input_shape):
        self.s = self.add_weight(name="s", shape=tuple(input_shape[1:]), initializer="ones")

    def call(self, x):
        return x * keras.ops.cast(self.s, x.dtype)


def half_squared_error(t: Tensor, y: Tensor) -> Tensor:
    """``0.5 * ||y - t||^2`` per sample (stock ops): ``(batch, ...)`` -> ``(batch,)``."""
    axes = list(range(1, len(y.shape)))
    return 0.5 * ops.sum(ops.square(ops.cast(y, t.dtype) - t), axis=axes)


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


def compiled(function: Callable) -> Callable:
    """``function`` compiled by ``jax.jit`` on JAX, where eager code compiles every op on its
    own (the checks would spend their time compiling); itself on TensorFlow (eager)."""
    return backend.xla_function(function) if BACKEND == "jax" else function


_WITNESS_LOGS: list[dict[str, str]] = []


@contextlib.contextmanager
def witness_log() -> Iterator[dict[str, str]]:
    """Collect, while open, ``dtype policy name -> witness`` of the convolutions whose reference
    route is traced (``tf_jacbp.check.conv_witness.ConvWitnesses.by_policy``)."""
    log: dict[str, str] = {}
    _WITNESS_LOGS.append(log)
    try:
        yield log
    finally:
        _WITNESS_LOGS.remove(log)


def conv_witnesses(layers: Sequence[keras.layers.Layer]) -> ConvWitnesses:
    """The witnesses of the Toeplitz layers among ``layers``, recording into the innermost open
    ``witness_log``."""
    return ConvWitnesses(layers, _WITNESS_LOGS[-1] if _WITNESS_LOGS else None)


@contextlib.contextmanager
def _route(reference: bool, model: keras.Model | None = None) -> Iterator[None]:
    """``reference_mode()`` for the reference route, with the convolutions' witnesses of
    ``model``'s layers; nothing for the Jacobian route."""
    if not reference:
        yield
        return
    layers = [] if model is None else list(layers_of(model))
    with reference_mode(), conv_witnesses(layers):
        yield


def gradient_function(
    model: keras.Model, reference: bool, training: bool | None = None, regularization: bool = True
) -> Callable:
    """``(values, state, x, t) -> (grads, new_state)``: the gradients of the mean loss (plus
    regularization, as ``fit`` adds it, unless ``regularization=False``) with respect to the
    trainable ``values``, by the backend's autodiff through ``model.stateless_call`` at the
    non-trainable ``state``, and the state the call leaves (moving statistics, seed generator
    states). Compiled on JAX (``compiled``): build it once, call it for each batch."""

    def loss(values, state, x, t):
        with _route(reference, model):
            y, _, losses = model.stateless_call(
                values, state, x, training=training, return_losses=True
            )
        total = numerics.mean(half_squared_error(t, y))
        return total + sum(losses) if regularization else total

    def gradients(values, state, x, t):
        _, grads = backend.value_and_gradients(lambda *v: loss(list(v), state, x, t), list(values))
        with _route(reference, model):
            _, new_state = model.stateless_call(list(values), list(state), x, training=training)
        return grads, new_state

    return compiled(gradients)


def loss_gradients(
    model: keras.Model,
    x,
    t,
    reference: bool,
    training: bool | None = None,
    *,
    regularization: bool = True,
) -> list[Tensor]:
    """Gradients of the mean loss (plus regularization, as ``fit`` adds it, unless
    ``regularization=False``) with respect to ``model.trainable_variables``, by the backend's
    autodiff through ``model.stateless_call`` (``gradient_function``).

    A training call updates the model's non-trainable state (moving statistics, seed generator
    states) as ``model(x, training=True)`` does: the gradients are taken at the state before it.
    """
    values = [ops.convert_to_tensor(v) for v in model.trainable_variables]
    state = [ops.convert_to_tensor(v) for v in model.non_trainable_variables]
    function = gradient_function(model, reference, training, regularization)
    grads, new_state = function(values, state, x, t)
    if training:
        set_model_state(model, new_state)
    return grads


def model_gradients(
    model: keras.Model,
    x,
    t,
    reference: bool,
    training: bool | None = None,
    *,
    regularization: bool = True,
) -> list[np.ndarray]:
    """``loss_gradients``, eagerly, as NumPy arrays."""
    grads = loss_gradients(model, x, t, reference, training, regularization=regularization)
    return [ops.convert_to_numpy(g) for g in grads]


def model_state(model: keras.Model) -> list[np.ndarray]:
    """The values of the non-trainable variables (moving statistics, seed generator states)."""
    return [ops.convert_to_numpy(v) for v in model.non_trainable_variables]


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
    values = input_fn(rng, shape) if input_fn else rng.normal(size=shape)
    return ops.convert_to_tensor(np.asarray(values), dtype)


def _data(model: keras.Model, input_shape, batch_size: int, dtype: str, seed: int, input_fn):
    rng = np.random.default_rng(seed)
    x = draw_inputs(input_shape, batch_size, dtype, rng, input_fn)
    shape = (batch_size, *model.outputs[0].shape[1:])
    if None in shape:  # sizes the symbolic output leaves open: run the model
        shape = model(x).shape
    return x, ops.convert_to_tensor(rng.normal(size=shape), dtype)


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
    """Check 2: every entry of every parameter's gradient (Jacobian route) against the central
    difference ``(L(w + delta e_j) - L(w - delta e_j)) / (2 delta)`` of the loss, in float64."""
    model = build_model(make_layer, input_shape, "float64")
    x, t = _data(model, input_shape, batch_size, "float64", seed, input_fn)
    values = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    fixed = [ops.convert_to_tensor(v) for v in model.non_trainable_variables]

    def loss(*trainable):
        y, _ = model.stateless_call(list(trainable), fixed, x, training=training)
        return numerics.mean(half_squared_error(t, y))

    _, theoretical = compiled(lambda *values: backend.value_and_gradients(loss, list(values)))(
        *values
    )
    evaluate = compiled(loss)
    delta = tolerances.FINITE_DIFFERENCE_DELTA
    for i, v in enumerate(model.trainable_variables):
        numerical = np.zeros(values[i].size)
        for j in range(values[i].size):
            ends = []
            for step in (delta, -delta):
                moved = values[i].copy().reshape(-1)
                moved[j] += step
                trainable = [*values[:i], moved.reshape(values[i].shape), *values[i + 1 :]]
                ends.append(float(ops.convert_to_numpy(evaluate(*trainable))))
            numerical[j] = (ends[0] - ends[1]) / (2 * delta)
        err = tolerances.relative_error(ops.convert_to_numpy(theoretical[i]).reshape(-1), numerical)
        assert err <= tolerances.FINITE_DIFFERENCE_RTOL, (
            f"finite differences: gradient of {v.path} relative error {err:.3g} "
            f"> {tolerances.FINITE_DIFFERENCE_RTOL}"
        )


def _fit_update(model: keras.Model, x, t, optimizer, **compile_args) -> list[np.ndarray]:
    """The update ``w_before - w_after`` of one ``train_on_batch`` step."""
    model.compile(optimizer=optimizer, loss=half_squared_error, **compile_args)
    before = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    model.train_on_batch(x, t)
    after = [ops.convert_to_numpy(v) for v in model.trainable_variables]
    return [b - a for b, a in zip(before, after, strict=True)]


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
        if training and mode != "eager" and BACKEND == "tensorflow":
            # Under XLA TensorFlow's stateless random ops draw other numbers than eagerly (for
            # keras.layers.Dropout too): compare with the reference route compiled the same way.
            # JAX's random numbers are the same compiled or not.
            set_model_state(template, state)
            compiled = backend.compile_function(
                lambda x, t: loss_gradients(template, x, t, reference=True, training=True),
                jit_compile=compile_args["jit_compile"],
            )
            refs = [ops.convert_to_numpy(g) for g in compiled(x, t)]
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
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)), ops.convert_to_numpy(model(x)))
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
    rows = compiled(
        lambda x, t: jacobian.per_example_gradients(
            model, x, t, loss=half_squared_error, flatten=False
        )
    )(x, t)
    for i in range(batch_size):
        refs = model_gradients(model, x[i : i + 1], t[i : i + 1], True, False, regularization=False)
        assert_gradients_close(
            [g[i] for g in rows],
            refs,
            model.trainable_variables,
            "float64",
            f"per-example row of sample {i}",
        )
