"""``DPModel``: a functional Keras model trained by DP-SGD, whose noise state and privacy ledger
travel with every checkpoint; ``make_private`` builds one (optionally calibrating ``sigma``)."""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
from keras import ops

# Keras' saving walks a model's KerasSaveable attributes; the class is not exported publicly.
from keras.src.saving.keras_saveable import KerasSaveable

from tf_jacbp import backend, hooks
from tf_jacbp._backend import BACKEND, keras
from tf_jacbp.jacobian import parameter_variables
from tf_jacbp.privacy.accounting import epsilon_of_ledger, noise_multiplier_for_epsilon
from tf_jacbp.privacy.arguments import check_positive, check_sampling_rate
from tf_jacbp.privacy.dpsgd import clip_groups, clipped_gradients
from tf_jacbp.privacy.noise import fresh_seed

_UNSET = object()
_DEFAULTS = {
    "l2_norm_clip": 1.0,
    "noise_multiplier": 1.0,
    "expected_batch_size": None,
    "seed": None,
    "sampling_rate": None,
    "secure_mode": False,
}
_NOISE_STATE, _LEDGER = "dp_noise_seed_state", "dp_privacy_ledger"


def _cloned_from() -> Any:
    """The DPModel that ``keras.models.clone_model`` is cloning, when it is the caller: it builds
    the clone as ``model.__class__(inputs, outputs, name=...)``, without the DP settings."""
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return None
        if frame.f_code.co_name == "_clone_functional_model":
            source = frame.f_locals.get("model")
            return source if isinstance(source, DPModel) else None
        frame = frame.f_back
    return None


class _Ledger:
    """Steps taken at each (sampling rate, noise multiplier): closed rows and an open segment
    whose steps a counter counts inside ``train_step`` (``tf_jacbp.backend.step_counter``: a
    ``tf.Variable`` on TensorFlow, a variable the model carries through JAX's stateless step).
    Not a Keras weight: it stays out of ``weights`` (``set_weights`` between plain and private
    models keeps working), and ``_PrivacyState`` writes it into every checkpoint. ``sync``
    brings a JAX fit's step state back to the model's variables before the count is read."""

    def __init__(self, sync: Any) -> None:
        self.steps = backend.step_counter("dp_steps")
        self.sync = sync
        self.rows: list[list[Any]] = []  # [q or None, sigma, steps]
        self.start = 0

    def count(self) -> int:
        """The steps counted so far (restored with the model)."""
        self.sync()
        return int(self.steps.numpy())

    def close(self, rate: float | None, sigma: float) -> None:
        count = self.count()
        if count > self.start:
            self.rows.append([rate, sigma, count - self.start])
        self.start = count

    def all(self, rate: float | None, sigma: float) -> list[tuple[float | None, float, int]]:
        open_steps = self.count() - self.start
        merged: list[list[Any]] = []
        for q, s, n in self.rows + ([[rate, sigma, open_steps]] if open_steps else []):
            if merged and merged[-1][:2] == [q, s]:  # e.g. before and after a resume
                merged[-1][2] += n
            else:
                merged.append([q, s, n])
        return [(q, s, int(n)) for q, s, n in merged]


class _PrivacyState(KerasSaveable):
    """The noise generator's state and the privacy ledger, as Keras' saving walks them: an
    attribute of the DPModel that ``save``, ``save_weights`` (and so ``BackupAndRestore``) write
    under its own path. A plain model has no such attribute and skips the entry, so a DP
    checkpoint loads into the plain model of the same layers; a checkpoint without the entry (a
    plain model's) loads into a DPModel, whose noise state and ledger then stay as they are."""

    def __init__(self, model: DPModel):
        self._owner = weakref.ref(model)  # not an attribute Keras' saving would walk into

    def _obj_type(self) -> str:
        return "Operation"  # one of the kinds Keras' saving accepts; only names attributes to skip

    def save_own_variables(self, store: Any) -> None:
        model = self._owner()
        model._sync_jax_state()
        store[_NOISE_STATE] = np.asarray(model.noise_seed.state.numpy())
        rows = model.privacy_ledger
        store[_LEDGER] = np.array(
            [[np.nan if q is None else q, s, n] for q, s, n in rows], np.float64
        ).reshape(-1, 3)

    def load_own_variables(self, store: Any) -> None:
        model, keys = self._owner(), list(store.keys())
        if _NOISE_STATE in keys:
            model._sync_jax_state()
            model.noise_seed.state.assign(backend.noise_state(store[_NOISE_STATE]))
        if _LEDGER in keys:
            ledger = model._ledger
            rows = np.asarray(store[_LEDGER], np.float64).reshape(-1, 3)
            ledger.rows = [
                [None if np.isnan(q) else float(q), float(s), int(n)] for q, s, n in rows
            ]
            total = int(sum(r[2] for r in ledger.rows))
            ledger.steps.assign(total)
            ledger.start = total
            if model.sampling_rate is None and ledger.rows:
                model._sampling_rate = ledger.rows[-1][0]


@keras.saving.register_keras_serializable(package="tf_jacbp")
class DPModel(keras.Model):
    """A functional Keras model trained by DP-SGD: ``fit``, callbacks and saving work as usual.

    ``train_step`` replaces the batch gradient by ``clipped_gradients`` (per-sample clipping to
    ``l2_norm_clip``, Gaussian noise of standard deviation ``noise_multiplier * l2_norm_clip``,
    divided by the batch size or ``expected_batch_size``) and hands it to the optimizer.
    Evaluation and prediction are unchanged. Build one with ``make_private(model, ...)`` or as a
    functional model, ``DPModel(inputs, outputs, l2_norm_clip=1.0, noise_multiplier=1.1)``.

    Args:
        l2_norm_clip: ``C > 0``; or ``{layer name or tuple of names: C_g}`` for per-layer
            clipping (``clip_groups``).
        noise_multiplier: ``sigma >= 0`` (0 trains with clipping only: no privacy).
        expected_batch_size: divide the noisy sum by this (Poisson sampling: ``q N``) instead of
            the actual batch size (shuffled fixed-size batches: None).
        seed: None (default): the noise generator is seeded from the operating system's entropy,
            a new sequence on every run. An int fixes the noise: for tests only, since two runs
            with the same seed (on a data set and on it less one record) share their noise.
        sampling_rate: ``q`` for the privacy ledger (else ``EpsilonLogger``'s).
        secure_mode: draw the noise from ``os.urandom`` (``tf_jacbp.privacy.noise``).

    What is saved: ``save``, ``save_weights`` and ``BackupAndRestore`` keep, besides the weights,
    the noise generator's state (a resumed run continues the noise sequence; it never draws the
    same noise again) and the privacy ledger (``_PrivacyState``), the steps taken at each
    (``q``, ``sigma``): ``privacy_spent`` and ``EpsilonLogger`` then account for the whole training.
    ``keras.models.clone_model`` keeps the DP settings (not the ledger: the clone is untrained).

    The loss must be per-sample with Keras' default reduction; ``sample_weight`` weights each
    sample's loss before clipping; ``compile(loss_weights=w)`` scales the update (and the logged
    loss) by ``w``, as it scales stock Keras' gradient. The logged loss is the batch's ordinary
    (non-private) mean loss. ``tf_jacbp.callbacks.GradientCheck`` still works during a DP fit.

    Backends: ``train_step`` is TensorFlow's ``train_step(data)`` or, on JAX, Keras' stateless
    ``train_step(state, data)`` (``_jax_train_step``); both compute the same update.
    """

    def __init__(
        self,
        *args: Any,
        l2_norm_clip: Any = _UNSET,
        noise_multiplier: Any = _UNSET,
        expected_batch_size: Any = _UNSET,
        seed: Any = _UNSET,
        sampling_rate: Any = _UNSET,
        secure_mode: Any = _UNSET,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        given = {
            "l2_norm_clip": l2_norm_clip,
            "noise_multiplier": noise_multiplier,
            "expected_batch_size": expected_batch_size,
            "seed": seed,
            "sampling_rate": sampling_rate,
            "secure_mode": secure_mode,
        }
        source = _cloned_from() if any(v is _UNSET for v in given.values()) else None
        base = _DEFAULTS if source is None else source.get_config()
        settings = {k: base[k] if v is _UNSET else v for k, v in given.items()}
        self._ledger = _Ledger(self._sync_jax_state)
        if BACKEND == "jax":  # a model attribute: Keras carries its state through the step
            self._dp_steps = self._ledger.steps
        self._clip_groups, self._total_clip = clip_groups(self, settings["l2_norm_clip"])
        self._l2_norm_clip = settings["l2_norm_clip"]
        self._noise_multiplier = check_positive(
            "noise_multiplier", settings["noise_multiplier"], True
        )
        ebs = settings["expected_batch_size"]
        self.expected_batch_size = (
            None if ebs is None else check_positive("expected_batch_size", ebs)
        )
        rate = settings["sampling_rate"]
        self._sampling_rate = None if rate is None else check_sampling_rate(rate)
        self.secure_mode = bool(settings["secure_mode"])
        self.seed = settings["seed"]
        initial = fresh_seed() if self.seed is None else int(self.seed)
        self.noise_seed = backend.noise_seed_generator(initial, "dp_noise_seed")
        self.privacy_state = _PrivacyState(self)  # saved with the model (Keras walks it)
        hooks.attach(self)  # reference_mode retracing and the XLA bad-label stop, this model only

    @property
    def l2_norm_clip(self) -> Any:
        """``C`` (or the per-layer mapping as given)."""
        return self._l2_norm_clip

    @property
    def noise_multiplier(self) -> float:
        """``sigma``; setting it starts a new ledger segment and retraces the train step."""
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        value = check_positive("noise_multiplier", value, True)
        self._ledger.close(self._sampling_rate, self._noise_multiplier)
        self._noise_multiplier = value
        self.train_function = None  # the traced step holds sigma as a constant

    @property
    def sampling_rate(self) -> float | None:
        """``q`` recorded in the ledger (None until given here or by ``EpsilonLogger``)."""
        return self._sampling_rate

    @sampling_rate.setter
    def sampling_rate(self, value: float) -> None:
        value = check_sampling_rate(value)
        if value != self._sampling_rate:
            self._ledger.close(self._sampling_rate, self._noise_multiplier)
        for row in self._ledger.rows:  # steps taken before any rate was given
            row[0] = value if row[0] is None else row[0]
        self._sampling_rate = value

    @property
    def privacy_ledger(self) -> list[tuple[float | None, float, int]]:
        """``[(q, sigma, steps)]``: every DP-SGD step this model took, over every resume."""
        return self._ledger.all(self._sampling_rate, self._noise_multiplier)

    @property
    def privacy_steps(self) -> int:
        """The DP-SGD steps of the whole training (restored with the model)."""
        return self._ledger.count()

    def _sync_jax_state(self) -> None:
        """On JAX, inside ``fit``, the step's state back in the model's variables (Keras'
        ``jax_state_sync``, as its callbacks do before reading the model); nothing on
        TensorFlow, whose step updates the variables themselves."""
        sync = getattr(self, "jax_state_sync", None)
        if sync is not None:
            sync()

    def privacy_spent(
        self, delta: float, accountant: str = "rdp", rdp_conversion: str = "improved"
    ) -> float:
        """epsilon of the whole training so far at ``delta`` (``epsilon_of_ledger``)."""
        return epsilon_of_ledger(self.privacy_ledger, delta, accountant, rdp_conversion)

    def make_train_function(self, force: bool = False) -> Any:
        """Reads ``compile(loss_weights=...)`` (eagerly: the compile config serializes the
        optimizer) before Keras traces ``train_step``."""
        self._dp_loss_weight = _one_loss_weight(
            (self.get_compile_config() or {}).get("loss_weights")
        )
        return super().make_train_function(force)

    def _dp_update(self, x: Any, y: Any, sample_weight: Any) -> tuple[list, Any, dict]:
        """``(gradients, loss, info)`` of one DP-SGD step on the variables' current values:
        ``clipped_gradients``' noisy gradient (times ``compile(loss_weights=w)``'s ``w``) plus
        the weight regularizers' gradients, added after the noise at no privacy cost (they do
        not depend on the data); ``loss`` is ``w mean_i w_i l_i`` plus the penalties."""
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "DPModel: a LossScaleOptimizer (mixed precision) would unscale gradients that "
                "DP-SGD never scaled. Train a DPModel with a plain optimizer."
            )
        gradients, info = clipped_gradients(
            self,
            x,
            y,
            self._l2_norm_clip,
            self._noise_multiplier,
            loss=self.loss,
            expected_batch_size=self.expected_batch_size,
            seed=self.noise_seed,
            sample_weight=sample_weight,
            secure_mode=self.secure_mode,
        )
        variables = self.trainable_variables
        batch = ops.shape(info["loss"])[0]  # 0 happens under Poisson sampling
        loss = ops.sum(info["loss"]) / ops.cast(ops.maximum(batch, 1), info["loss"].dtype)
        weight = getattr(self, "_dp_loss_weight", 1.0)
        if weight != 1.0:  # compile(loss_weights=w): the loss is w L, the update w g, noise too
            loss = loss * weight
            gradients = [g * ops.cast(weight, g.dtype) for g in gradients]
        penalties = [(v, v.regularizer) for v in variables if v.regularizer is not None]
        if penalties:  # data-independent: added after the noise, at no privacy cost

            def total(*values: Any) -> Any:  # each term in its variable's dtype, summed
                terms = [r(t) for (_, r), t in zip(penalties, values, strict=True)]
                return functools.reduce(ops.add, [ops.cast(t, loss.dtype) for t in terms])

            penalty, extra = backend.value_and_gradients(total, [v.value for v, _ in penalties])
            by_id = {id(v): g for (v, _), g in zip(penalties, extra, strict=True)}
            gradients = [
                g + ops.cast(by_id[id(v)], g.dtype) if id(v) in by_id else g
                for g, v in zip(gradients, variables, strict=True)
            ]
            loss = loss + penalty
        return gradients, loss, info

    def _dp_logs(self, loss: Any, x: Any, y: Any, info: dict, sample_weight: Any) -> dict:
        """The step's logs: the loss tracker (what Keras' own train step reports as "loss",
        weighted by the batch size) and the compiled metrics."""
        tracker = getattr(self, "_loss_tracker", None)
        if tracker is not None:
            tracker.update_state(loss, sample_weight=ops.shape(info["loss"])[0])
        return self.compute_metrics(x, y, info["y_pred"], sample_weight=sample_weight)

    @backend.do_not_convert  # Python loops over the layers, as Keras' own
    def _tensorflow_train_step(self, data: Any) -> dict[str, Any]:
        """TensorFlow's train step: the DP-SGD update applied to the variables themselves."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        gradients, loss, info = self._dp_update(x, y, sample_weight)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables, strict=True))
        self._ledger.steps.assign_add(1)
        return self._dp_logs(loss, x, y, info, sample_weight)

    def _jax_train_step(self, state: tuple, data: Any) -> tuple[dict[str, Any], tuple]:
        """JAX's stateless train step (Keras' ``JAXTrainer.train_step(state, data)``): ``state``
        is ``(trainable, non_trainable, optimizer, metrics)`` variable values, and the step
        returns ``(logs, new state)``. The DP-SGD update runs in a ``StatelessScope`` mapping the
        model's variables to ``state``; the layers' formulas read the values from it (no
        autodiff), and what the step assigns (the noise generator's draw count, the ledger's
        step count, a Dropout's seed) comes back as the new non-trainable values. The optimizer
        applies the gradients statelessly, and the metrics update in a scope of their own."""
        trainable, non_trainable, optimizer_variables, metrics_variables = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        mapping = list(
            zip(
                self.trainable_variables + self.non_trainable_variables,
                list(trainable) + list(non_trainable),
                strict=True,
            )
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            gradients, loss, info = self._dp_update(x, y, sample_weight)
            self._ledger.steps.assign_add(1)
        non_trainable = [scope.get_current_value(v) for v in self.non_trainable_variables]
        trainable, optimizer_variables = self.optimizer.stateless_apply(
            optimizer_variables, gradients, trainable
        )
        mapping = list(zip(self.metrics_variables, metrics_variables, strict=True))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            logs = self._dp_logs(loss, x, y, info, sample_weight)
        metrics_variables = [scope.get_current_value(v) for v in self.metrics_variables]
        return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)

    train_step = _jax_train_step if BACKEND == "jax" else _tensorflow_train_step

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        clip = self._l2_norm_clip
        if self._clip_groups is not None:  # JSON: [[names], C_g] pairs
            clip = [[list(names), c] for names, c in self._clip_groups]
        config.update(
            {
                "l2_norm_clip": clip,
                "noise_multiplier": self._noise_multiplier,
                "expected_batch_size": self.expected_batch_size,
                "seed": self.seed,
                "sampling_rate": self._sampling_rate,
                "secure_mode": self.secure_mode,
            }
        )
        return config


def _one_loss_weight(loss_weights: Any) -> float:
    """The one output's loss weight (1 if None); a ValueError for several."""
    if loss_weights is None:
        return 1.0
    values = loss_weights
    if isinstance(loss_weights, Mapping):
        values = list(loss_weights.values())
    if isinstance(values, (list, tuple)):
        if len(values) != 1:
            raise ValueError(
                f"DPModel has one output and one loss: loss_weights must be one number, got "
                f"{loss_weights!r}."
            )
        values = values[0]
    return check_positive("loss_weights", values, allow_zero=True)


def make_private(
    model: keras.Model,
    l2_norm_clip: float | Mapping[Any, float],
    noise_multiplier: float | None = None,
    expected_batch_size: float | None = None,
    seed: int | None = None,
    *,
    target_epsilon: float | None = None,
    delta: float | None = None,
    sampling_rate: float | None = None,
    steps: int | None = None,
    accountant: str = "rdp",
    rdp_conversion: str = "improved",
    secure_mode: bool = False,
) -> DPModel:
    """A ``DPModel`` over ``model``'s layers (the same layers and variables, not copies).

    ``model``: a built Sequential or functional model of tf_jacbp layers. Give
    ``noise_multiplier``, or ``target_epsilon`` with ``delta``, ``sampling_rate`` and ``steps``:
    then ``sigma = noise_multiplier_for_epsilon(target_epsilon, delta, sampling_rate, steps,
    accountant, rdp_conversion)``, the smallest sigma whose epsilon is at most the target.
    ``seed``: None for fresh entropy (always, outside tests). Compile the result and ``fit`` it
    as usual; see ``DPModel`` for the other arguments and the module docstring for what the
    guarantee assumes.
    """
    if not isinstance(model, keras.Model) or not getattr(model, "built", False):
        raise ValueError(
            "make_private needs a built keras.Model (give a Sequential model a keras.Input, or "
            f"build it); got {type(model).__name__}."
        )
    parameter_variables(model)  # tf_jacbp layers only, one input and one output
    if target_epsilon is not None:
        if noise_multiplier is not None:
            raise ValueError(
                "make_private: give noise_multiplier or target_epsilon, not both (target_epsilon "
                "calibrates noise_multiplier)."
            )
        missing = [
            name
            for name, value in (
                ("delta", delta),
                ("sampling_rate", sampling_rate),
                ("steps", steps),
            )
            if value is None
        ]
        if missing:
            raise ValueError(
                f"make_private(target_epsilon=...) also needs {missing}: epsilon depends on "
                "delta, the sampling rate q = B / N and the number of steps."
            )
        noise_multiplier = noise_multiplier_for_epsilon(
            target_epsilon, delta, sampling_rate, steps, accountant, rdp_conversion
        )
    if noise_multiplier is None:
        raise ValueError(
            "make_private needs noise_multiplier=... or target_epsilon=... (with delta, "
            "sampling_rate and steps)."
        )
    return DPModel(
        model.inputs[0],
        model.outputs[0],
        name=f"{model.name}_dp",
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        seed=seed,
        sampling_rate=sampling_rate,
        secure_mode=secure_mode,
    )
