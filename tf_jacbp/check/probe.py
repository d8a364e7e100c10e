"""The probe batch of ``GradientCheck``: validated once, checked against the model at the start of
``fit``, tested for finiteness, and perturbed for the re-check; and the ``log_dir`` checks.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp import backend, tolerances
from tf_jacbp._backend import keras
from tf_jacbp.check.records import ON_MISMATCH

PERTURBATION_SEED = 0


def validate_arguments(
    every_n_batches: Any,
    rtol: Any,
    atol: Any,
    on_mismatch: Any,
    finite_differences: Any,
    verbose: Any,
) -> None:
    """``GradientCheck``'s arguments, each with a message naming it and what it accepts."""
    if isinstance(every_n_batches, bool) or not isinstance(every_n_batches, int):
        raise ValueError(
            f"GradientCheck: every_n_batches must be a positive int, got "
            f"every_n_batches={every_n_batches!r}."
        )
    if every_n_batches <= 0:
        raise ValueError(
            f"GradientCheck: every_n_batches must be a positive int, got "
            f"every_n_batches={every_n_batches}."
        )
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        ):
            raise ValueError(
                f"GradientCheck: {name} must be a positive number or None, got {name}={value!r}."
            )
    if on_mismatch not in ON_MISMATCH:
        raise ValueError(
            f"GradientCheck: on_mismatch must be one of {', '.join(map(repr, ON_MISMATCH))}, "
            f"got on_mismatch={on_mismatch!r}."
        )
    if not isinstance(finite_differences, bool):
        raise ValueError(
            f"GradientCheck: finite_differences must be True or False, got "
            f"finite_differences={finite_differences!r}."
        )
    if isinstance(verbose, bool) or not isinstance(verbose, int) or verbose < 0:
        raise ValueError(
            f"GradientCheck: verbose must be 0 (silent) or 1 (print the summary at the end of "
            f"training), got verbose={verbose!r}."
        )


def require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "GradientCheck(log_dir=...) writes tf.summary scalars, which need TensorBoard: "
            "pip install tensorboard (or pass log_dir=None; the metrics still reach logs and "
            "History)."
        ) from err


def require_writable(log_dir: str) -> None:
    """``log_dir`` is, or can be made, a writable local directory (remote URLs are not tried)."""
    if "://" in log_dir:
        return
    try:
        os.makedirs(log_dir, exist_ok=True)
        probe = os.path.join(log_dir, ".grad_check_write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ValueError(
            f"GradientCheck: log_dir={log_dir!r} is not a writable directory "
            f"({type(err).__name__}: {err.strerror or err}). Pass a directory you can write "
            "to, or log_dir=None (the metrics still reach logs and History)."
        ) from err


def probe_tensors(probe: Any) -> tuple:
    """``(x, y, sample_weight)`` as tensors (``sample_weight`` may be ``None``); validated."""
    dataset = backend.is_dataset(probe)
    if dataset:
        ranks = [spec.shape.rank for spec in keras.tree.flatten(probe.element_spec)]
        if 0 in ranks:
            raise ValueError(
                "GradientCheck: probe is an unbatched tf.data.Dataset (its elements are single "
                f"samples, shapes {shapes(probe.element_spec)}); call .batch(n) on it, e.g. "
                "probe=dataset.batch(64)."
            )
        try:
            probe = next(iter(probe.take(1)))
        except StopIteration:
            raise ValueError(
                "GradientCheck: probe is an empty tf.data.Dataset; give a dataset with at least "
                "one batch (x, y), or probe=(x, y) arrays."
            ) from None
    if not isinstance(probe, (tuple, list)) or len(probe) not in (2, 3):
        raise ValueError(
            f"GradientCheck: probe must be (x, y), (x, y, sample_weight) or a tf.data.Dataset "
            f"of such batches, got probe of type {type(probe).__name__}."
        )
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(probe))
    x, y, sample_weight = (
        None if t is None else keras.tree.map_structure(_tensor, t) for t in (x, y, sample_weight)
    )
    sizes = {
        name: [t.shape[0] if len(t.shape) else None for t in keras.tree.flatten(part)]
        for name, part in (("x", x), ("y", y), ("sample_weight", sample_weight))
        if part is not None
    }
    counts = {n for part in sizes.values() for n in part}
    if None in counts or len(counts) != 1:
        hint = (
            " If the dataset is unbatched (one sample per element), call .batch(n) on it."
            if dataset
            else ""
        )
        raise ValueError(
            f"GradientCheck: probe parts must all hold the same number of samples on their first "
            f"axis, got {sizes}. Pass probe=(x[:n], y[:n]) from the training data.{hint}"
        )
    if counts == {0}:
        raise ValueError(
            f"GradientCheck: probe has zero samples (shapes {shapes((x, y))}). Pass a few dozen "
            "training samples, e.g. probe=(x_train[:64], y_train[:64])."
        )
    return x, y, sample_weight


def _tensor(value: Any) -> Any:
    """``value`` as a tensor of Keras' backend, its dtype kept (a ``tf.data`` element on JAX
    goes through NumPy)."""
    if keras.backend.backend() != "tensorflow" and not keras.ops.is_tensor(value):
        value = np.asarray(value)
    return ops.convert_to_tensor(value)


def shapes(structure: Any) -> Any:
    return keras.tree.map_structure(lambda t: tuple(t.shape), structure)


def validate_probe_fits(model: keras.Model, probe: tuple, from_dataset: bool = False) -> None:
    """Run the model, then its loss, once on the probe (inference mode, no side effects)."""
    x, y, sample_weight = probe
    try:
        y_pred = model(x, training=False)
    except (ValueError, TypeError, *backend.call_errors()) as err:
        try:
            expected = f", but model '{model.name}' expects inputs of shape {model.input_shape}"
        except (AttributeError, ValueError):
            expected = f", which model '{model.name}' does not accept"
        hint = ""
        if from_dataset and _one_axis_short(model, x):
            hint = (
                " The probe dataset looks unbatched (x lacks the batch axis): call .batch(n) on it."
            )
        raise ValueError(
            f"GradientCheck: probe does not fit the model: x has shape {shapes(x)}{expected}."
            f"{hint} Pass a probe shaped like one batch of the data given to fit, e.g. "
            f"probe=(x_train[:64], y_train[:64]). ({type(err).__name__}: {err})"
        ) from err
    try:
        model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)
    except (ValueError, TypeError, *backend.call_errors()) as err:
        weights = "" if sample_weight is None else f", sample_weight {shapes(sample_weight)}"
        raise ValueError(
            f"GradientCheck: the compiled loss of model '{model.name}' failed on probe (y has "
            f"shape {shapes(y)}{weights}, the model's output {shapes(y_pred)}). If y is not "
            "shaped like the training targets, pass probe=(x_train[:64], y_train[:64]). "
            f"({type(err).__name__}: {err})"
        ) from err


def _one_axis_short(model: keras.Model, x: Any) -> bool:
    """``x`` has one axis fewer than the model's (first) input."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        return False
    shape = shape[0] if isinstance(shape, list) else shape
    first = keras.tree.flatten(x)[0]
    return isinstance(shape, tuple) and len(first.shape) == len(shape) - 1


def is_finite(probe: tuple) -> bool:
    """Every floating value of the probe is finite."""
    for t in keras.tree.flatten(probe):
        if t is not None and _floating(t) and not np.all(np.isfinite(ops.convert_to_numpy(t))):
            return False
    return True


def _floating(t: Any) -> bool:
    return keras.backend.is_float_dtype(keras.backend.standardize_dtype(t.dtype))


def perturbed(probe: tuple) -> tuple:
    """``probe`` with every floating tensor of ``x`` times ``1 + RECHECK_PERTURBATION * N(0, 1)``
    (a fixed seed; zeros stay zero, labels and sample weights are kept)."""
    x, y, sample_weight = probe
    rng = np.random.default_rng(PERTURBATION_SEED)

    def perturb(t):
        if not _floating(t):
            return t
        noise = 1 + tolerances.RECHECK_PERTURBATION * rng.normal(size=tuple(t.shape))
        # the product in float64 (NumPy's, on every backend), then rounded to t's dtype
        return ops.cast(ops.convert_to_numpy(t).astype(np.float64) * noise, t.dtype)

    return keras.tree.map_structure(perturb, x), y, sample_weight
