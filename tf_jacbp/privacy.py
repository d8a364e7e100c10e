"""Differentially private SGD (DP-SGD, Abadi et al. 2016) for models of tf_jacbp layers.

Each training step of a ``DPModel`` computes, for a batch of ``B`` samples,

    g_tilde = (1 / B') [ sum_i c_i g_i + N(0, (sigma C)^2 I) ],   c_i = min(1, C / ||g_i||),

where ``g_i = grad_theta l(y_i, yhat_i)`` is sample ``i``'s gradient of its own loss term (the
loss's per-sample value, before the batch reduction), ``C`` is ``l2_norm_clip``, ``sigma`` is
``noise_multiplier`` and ``B'`` is the batch size: the actual one by default, or
``expected_batch_size`` when batches are Poisson-sampled (``poisson_batches``; dividing by the
actual size would leak it). The optimizer then applies ``g_tilde`` as it would any gradient.

The clipped sum takes two passes over one forward pass, and never forms a per-sample gradient:

1. the norms ``||g_i||`` from the layers' factors (``tf_jacbp.jacobian.per_example_gradient_norms``:
   ``||a_i||^2 ||delta_i||^2`` for a Dense kernel, Gram or patch products for a convolution);
2. one batch backward pass from ``delta[L]`` rows scaled by ``c_i``: the gradient of
   ``sum_i c_i l_i`` with the ``c_i`` held constant, which is ``sum_i c_i g_i``. Each map acts on
   each sample alone and its backward is linear in ``delta``, so the rows reaching every map are
   pass 1's rows scaled by ``c_i``: the second pass is each layer's parameter product
   (``A^T (c * Delta)`` for a Dense kernel) on the rows pass 1 already computed.

What the privacy guarantee assumes. ``compute_epsilon`` and ``EpsilonLogger`` account for the
Poisson-subsampled Gaussian mechanism: every step includes each of the ``N`` training samples
independently with probability ``q`` (the sampling rate), and the noise is Gaussian with standard
deviation ``sigma C`` on a sum of gradients each clipped to norm ``C``, under add/remove-one
adjacency. ``poisson_batches`` implements that sampling. Training on shuffled fixed-size batches
(``model.fit(x, y, batch_size=B)``) is the common practice, also of TensorFlow Privacy's
tutorials, and its epsilon computed with ``q = B / N`` is then what Poisson sampling would give,
not a proven guarantee for shuffling. The noise comes from TensorFlow's pseudo-random generator,
not a cryptographically secure one; floating point effects on the Gaussian mechanism are not
accounted for (as in TensorFlow Privacy and Opacus' default mode).

Only what the per-sample gradient covers is private: weight regularizers (their gradient does not
depend on the data) are added after the noise; activity regularizers, ``sample_weight`` and
losses without per-sample values raise an error, as does a model with trainable variables that
no tf_jacbp layer accounts for. Nothing falls back to non-private training.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from tf_jacbp import jacobian
from tf_jacbp._backend import keras, tf

ACCOUNTANTS = ("rdp", "pld")
RDP_CONVERSIONS = ("improved", "classic")


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {name}={value!r}.")
    return value


# Gradients: the two-pass clipped sum.


def _check_model(model: keras.Model) -> list[keras.Variable]:
    """The model's trainable variables, after checking the per-sample formulas cover all of them
    and no layer adds a data-dependent regularization term."""
    covered = {id(v) for v in jacobian.parameter_variables(model)}  # raises for stock layers
    missing = [v.path for v in model.trainable_variables if id(v) not in covered]
    if missing:
        raise ValueError(
            f"DP-SGD cannot compute per-example gradient norms for the trainable variables "
            f"{missing}: no tf_jacbp layer lists them in jacobian_parameters(). Build the model "
            "from tf_jacbp.layers, or freeze those variables (trainable=False)."
        )
    for layer in model.layers:
        if getattr(layer, "activity_regularizer", None) is not None:
            raise ValueError(
                f"Layer '{layer.name}' has an activity_regularizer: a loss term that depends on "
                "the data but is not a per-sample loss, so DP-SGD cannot clip it. Remove it "
                "(weight regularizers are fine: they do not depend on the data)."
            )
    return model.trainable_variables


def _check_loss(loss: Any) -> Any:
    """The loss object, after checking its reduction is the batch mean DP-SGD replaces."""
    if loss is None:
        raise ValueError("DP-SGD needs a loss: compile the model with loss=... first.")
    if isinstance(loss, (list, tuple, dict)):
        raise ValueError(
            "DP-SGD supports one loss for a model with one output, got several losses."
        )
    loss = keras.losses.get(loss)
    reduction = getattr(loss, "reduction", "sum_over_batch_size")
    if reduction != "sum_over_batch_size":
        raise ValueError(
            f"DP-SGD averages clipped per-sample gradients over the batch itself, so the loss "
            f"must have reduction='sum_over_batch_size' (Keras' default), got "
            f"reduction={reduction!r}. Per-sample values l_i come from the loss's call; pass the "
            "loss with its default reduction."
        )
    return loss


@tf.autograph.experimental.do_not_convert  # traced as plain Python: loops over the layers
def clipped_gradients(
    model: keras.Model,
    x: Any,
    y: Any,
    l2_norm_clip: float,
    noise_multiplier: float = 0.0,
    loss: Any = None,
    expected_batch_size: int | float | None = None,
    seed: Any = None,
    training: bool = True,
) -> tuple[list[tf.Tensor], dict[str, tf.Tensor]]:
    """DP-SGD's gradient ``(1/B') [sum_i min(1, C/||g_i||) g_i + N(0, (sigma C)^2 I)]``.

    Args:
        model: a Sequential or functional model of tf_jacbp layers.
        x, y: a batch ``(B, ...)``.
        l2_norm_clip: ``C > 0``, the bound on each sample's gradient norm.
        noise_multiplier: ``sigma >= 0``; the noise's standard deviation is ``sigma C`` per entry
            of the summed gradient (0: clipping only, no privacy).
        loss: the per-sample loss (default: the compiled one); reduction "sum_over_batch_size".
        expected_batch_size: ``B'``; None divides by the actual batch size ``B``.
        seed: for the noise: a ``keras.random.SeedGenerator`` (a new draw each call, DPModel's),
            an int (the same draw for the same int) or None (TensorFlow's global generator).
        training: the layers' training-mode maps (Dropout draws masks; a BatchNormalization that
            is not frozen raises: its batch statistics couple the samples).

    Returns:
        ``(gradients, info)``: one tensor per ``model.trainable_variables`` (same order and
        shapes; regularizers not included), and ``info`` with ``"loss"`` (per sample, ``(B,)``),
        ``"norms"`` (``||g_i||``, ``(B,)``), ``"clip_factors"`` (``c_i``), ``"y_pred"``.
    """
    l2_norm_clip = _check_positive("l2_norm_clip", l2_norm_clip)
    noise_multiplier = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    loss = _check_loss(loss if loss is not None else getattr(model, "loss", None))
    trainable = _check_model(model)
    records, output_key, out, values, delta = jacobian._output_delta(model, x, y, loss, training)
    # Pass 1: ||g_i||^2 over the trainable variables, from the layers' norm formulas; the walk
    # keeps the delta rows that reach each map.
    trainable_ids = {id(v) for v in trainable}
    deltas: list = []
    squared = [
        s
        for v, s in jacobian._squared_gradient_norms(model, records, output_key, delta, deltas)
        if id(v) in trainable_ids
    ]
    norms = tf.sqrt(tf.add_n(squared))
    factors = tf.minimum(tf.ones_like(norms), l2_norm_clip / tf.maximum(norms, 1e-300))
    factors = tf.stop_gradient(factors)
    # Pass 2: the batch backward pass of sum_i c_i l_i. Every map acts on each sample alone and
    # backward is linear in delta, so scaling delta[L]'s row i by c_i scales row i of the delta
    # reaching every map by c_i: each map's parameter gradient is its batch backward applied to
    # the rows pass 1 saw, scaled (the input-gradient chain need not run again).
    sums: dict[int, tf.Tensor] = {}
    for layer, op, rows, a, out_rows, params in deltas:
        scaled = rows * tf.reshape(factors, [-1] + [1] * (rows.shape.rank - 1))
        _, grads = op.backward(scaled, a, out_rows, *params)
        for v, g in zip(layer.jacobian_parameters(), grads, strict=True):
            sums[id(v)] = sums[id(v)] + g if id(v) in sums else g
    if expected_batch_size is None:
        divisor = tf.cast(tf.shape(delta)[0], delta.dtype)
    else:
        divisor = tf.constant(_check_positive("expected_batch_size", expected_batch_size))
    sums = [sums[id(v)] for v in trainable]
    if noise_multiplier > 0:  # one draw for all entries: one state update of the generator
        sizes = [int(np.prod(v.shape)) for v in trainable]
        std = noise_multiplier * l2_norm_clip
        wide = any(g.dtype == tf.float64 for g in sums)
        dtype = tf.float64 if wide else tf.float32  # at least float32, cast to each gradient's
        if seed is None:
            noise = tf.random.normal([sum(sizes)], stddev=std, dtype=dtype)
        else:
            noise = keras.random.normal([sum(sizes)], stddev=std, dtype=dtype, seed=seed)
        pieces = tf.split(noise, sizes)
        sums = [
            g + tf.cast(tf.reshape(n, v.shape), g.dtype)
            for g, n, v in zip(sums, pieces, trainable, strict=True)
        ]
    gradients = [
        tf.cast(g / tf.cast(divisor, g.dtype), v.dtype)
        for g, v in zip(sums, trainable, strict=True)
    ]
    info = {"loss": values, "norms": norms, "clip_factors": factors, "y_pred": out}
    return gradients, info


# Keras: a model whose train_step is DP-SGD's.


@keras.saving.register_keras_serializable(package="tf_jacbp")
class DPModel(keras.Model):
    """A functional Keras model trained by DP-SGD: ``fit``, callbacks and saving work as usual.

    ``train_step`` replaces the batch gradient by ``clipped_gradients`` (per-sample clipping to
    ``l2_norm_clip``, Gaussian noise of standard deviation ``noise_multiplier * l2_norm_clip``,
    divided by the batch size or ``expected_batch_size``) and hands it to the optimizer.
    Evaluation and prediction are unchanged. Build one with ``make_private(model, ...)`` or as a
    functional model, ``DPModel(inputs, outputs, l2_norm_clip=1.0, noise_multiplier=1.1)``.

    Args:
        l2_norm_clip: ``C > 0``.
        noise_multiplier: ``sigma >= 0`` (0 trains with clipping only: no privacy; epsilon is
            infinite).
        expected_batch_size: divide the noisy sum by this (Poisson sampling: ``q N``) instead of
            the actual batch size (shuffled fixed-size batches: None, the default).
        seed: seeds the noise (an int; None draws a random seed).

    The loss must be per-sample with Keras' default reduction ("sum_over_batch_size");
    ``sample_weight`` is refused. The logged loss is the batch's ordinary (non-private) mean loss.
    ``tf_jacbp.callbacks.GradientCheck`` still works during a DP fit: it checks the layers' batch
    gradient formulas (the ones both passes are made of) against autodiff, not the noisy update.
    """

    def __init__(
        self,
        *args: Any,
        l2_norm_clip: float = 1.0,
        noise_multiplier: float = 1.0,
        expected_batch_size: float | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.l2_norm_clip = _check_positive("l2_norm_clip", l2_norm_clip)
        self.noise_multiplier = _check_positive("noise_multiplier", noise_multiplier, True)
        self.expected_batch_size = (
            None
            if expected_batch_size is None
            else _check_positive("expected_batch_size", expected_batch_size)
        )
        self.seed = seed
        self.noise_seed = keras.random.SeedGenerator(seed, name="dp_noise_seed")

    @tf.autograph.experimental.do_not_convert  # Python loops over the layers, as Keras' own
    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "DPModel: a LossScaleOptimizer (mixed precision) would unscale gradients that "
                "DP-SGD never scaled. Train a DPModel with a plain optimizer."
            )
        if sample_weight is not None:
            raise ValueError(
                "DPModel: sample_weight is not supported: a weighted per-sample loss changes what "
                "clipping bounds. Drop sample_weight (or class_weight) from fit."
            )
        gradients, info = clipped_gradients(
            self,
            x,
            y,
            self.l2_norm_clip,
            self.noise_multiplier,
            loss=self.loss,
            expected_batch_size=self.expected_batch_size,
            seed=self.noise_seed,
        )
        variables = self.trainable_variables
        batch = tf.shape(info["loss"])[0]  # 0 happens under Poisson sampling
        loss = tf.math.divide_no_nan(
            tf.reduce_sum(info["loss"]), tf.cast(batch, info["loss"].dtype)
        )
        penalties = [(v, v.regularizer) for v in variables if v.regularizer is not None]
        if penalties:  # data-independent: added after the noise, at no privacy cost
            with tf.GradientTape() as tape:
                terms = [r(v) for v, r in penalties]  # each in its variable's dtype
            extra = tape.gradient(terms, [v for v, _ in penalties])
            penalty = tf.add_n([tf.cast(t, loss.dtype) for t in terms])
            by_id = {id(v): g for (v, _), g in zip(penalties, extra, strict=True)}
            gradients = [
                g + tf.cast(by_id.get(id(v), 0), g.dtype)
                for g, v in zip(gradients, variables, strict=True)
            ]
            loss = loss + penalty
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        tracker = getattr(self, "_loss_tracker", None)
        if tracker is not None:  # what Keras' own train_step reports as "loss"
            tracker.update_state(loss, sample_weight=batch)
        return self.compute_metrics(x, y, info["y_pred"], sample_weight=None)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "l2_norm_clip": self.l2_norm_clip,
                "noise_multiplier": self.noise_multiplier,
                "expected_batch_size": self.expected_batch_size,
                "seed": self.seed,
            }
        )
        return config


def make_private(
    model: keras.Model,
    l2_norm_clip: float,
    noise_multiplier: float,
    expected_batch_size: float | None = None,
    seed: int | None = None,
) -> DPModel:
    """A ``DPModel`` over ``model``'s layers (the same layers and variables, not copies).

    ``model``: a built Sequential or functional model of tf_jacbp layers. Compile the result
    and ``fit`` it as usual; see ``DPModel`` for the arguments and the module docstring for what
    the guarantee assumes.
    """
    if not isinstance(model, keras.Model) or not getattr(model, "built", False):
        raise ValueError(
            "make_private needs a built keras.Model (give a Sequential model a keras.Input, or "
            f"build it); got {type(model).__name__}."
        )
    jacobian.parameter_variables(model)  # tf_jacbp layers only, one input and one output
    return DPModel(
        model.inputs[0],
        model.outputs[0],
        name=f"{model.name}_dp",
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        seed=seed,
    )


# Data: Poisson sampling, what the accountant assumes.


def poisson_batches(
    x: np.ndarray,
    y: np.ndarray,
    sampling_rate: float,
    steps_per_epoch: int | None = None,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches that include each sample independently with probability ``q`` (Poisson sampling).

    Each step draws ``u_j ~ U(0, 1)`` for each of the ``N`` samples and takes those with
    ``u_j < q``: batch sizes vary, ``q N`` on average (possibly 0). ``steps_per_epoch`` (default
    ``round(1 / q)``, one pass in expectation) steps make an epoch; every epoch draws anew. Train a
    ``DPModel(expected_batch_size=q * N)`` on it: that is the sampling ``compute_epsilon``
    accounts for. An empty batch (probability ``(1 - q)^N``, about ``exp(-q N)``) is a step of
    noise alone; tf_jacbp's losses do not accept empty batches yet, so keep ``q N`` large
    (``exp(-50)`` at ``q N = 50``).
    """
    q = _check_positive("sampling_rate", sampling_rate)
    if q > 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got sampling_rate={q}.")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}.")
    steps = int(round(1 / q)) if steps_per_epoch is None else int(steps_per_epoch)
    if steps <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
    images, labels, n = tf.constant(x), tf.constant(y), len(x)

    def draw(key: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        u = tf.random.stateless_uniform([n], seed=tf.stack([tf.constant(seed, tf.int64), key]))
        chosen = tf.where(u < q)[:, 0]
        return tf.gather(images, chosen), tf.gather(labels, chosen)

    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(steps)
    return keys.map(draw).prefetch(1)


# Accounting.


def compute_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    rdp_conversion: str = "improved",
) -> float:
    """epsilon of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    Each step samples each record with probability ``q = sampling_rate`` and adds Gaussian noise
    of standard deviation ``noise_multiplier`` times the sensitivity (``l2_norm_clip``); the
    guarantee is ``(epsilon, delta)``-DP under add/remove-one adjacency. Uses the
    ``dp-accounting`` package (``pip install 'tf_jacbp[privacy]'``).

    Args:
        accountant: ``"rdp"`` (Renyi DP over dp-accounting's default orders) or ``"pld"``
            (privacy loss distributions: tighter, slower).
        rdp_conversion: from RDP to ``(epsilon, delta)``: ``"improved"`` (dp-accounting's,
            Balle et al. 2020 Prop. 12: smaller epsilon, still valid) or ``"classic"``
            (``min_alpha rdp(alpha) + log(1/delta) / (alpha - 1)``, Mironov 2017 Prop. 3: the
            conversion TensorFlow Privacy's tutorials print; MNIST's ``q = 256/60000``,
            ``sigma = 1.12``, 60 epochs, ``delta = 1e-5``: 2.92 classic, 2.52 improved).

    Returns:
        epsilon (``inf`` when ``noise_multiplier`` is 0, 0 for no steps).
    """
    sigma = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    q = _check_positive("sampling_rate", sampling_rate)
    if q > 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got sampling_rate={q}.")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got steps={steps!r}.")
    delta = _check_positive("delta", delta)
    if delta >= 1:
        raise ValueError(f"delta must be in (0, 1), got delta={delta}.")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
    if rdp_conversion not in RDP_CONVERSIONS:
        raise ValueError(
            f"rdp_conversion must be one of {RDP_CONVERSIONS}, got {rdp_conversion!r}."
        )
    if steps == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    try:
        import dp_accounting
    except ImportError as error:
        raise ImportError(
            "compute_epsilon needs the dp-accounting package: pip install 'tf_jacbp[privacy]' "
            "(or pip install dp-accounting)."
        ) from error
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    # dp-accounting warns (absl) for each low RDP order whose series does not converge at large
    # q and excludes that order, which only loosens the bound; keep those warnings out of fit.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(max(level, logging.ERROR))
    try:
        return _epsilon(dp_accounting, event, int(steps), delta, accountant, rdp_conversion)
    finally:
        absl_logger.setLevel(level)


def _epsilon(dp_accounting, event, steps, delta, accountant, rdp_conversion) -> float:
    if accountant == "pld":
        pld = dp_accounting.pld.PLDAccountant()
        pld.compose(event, steps)
        return float(pld.get_epsilon(delta))
    rdp = dp_accounting.rdp.RdpAccountant()
    rdp.compose(event, steps)
    if rdp_conversion == "improved":
        return float(rdp.get_epsilon(delta))
    # The classic conversion needs the RDP curve itself; dp-accounting keeps it in _orders/_rdp.
    orders, curve = np.asarray(rdp._orders, dtype=float), np.asarray(rdp._rdp, dtype=float)
    return float(np.min(curve + math.log(1 / delta) / (orders - 1)))


class EpsilonLogger(keras.callbacks.Callback):
    """Adds ``epsilon`` (spent so far) to the logs at the end of each epoch of a DP fit.

    Args:
        sampling_rate: ``q``, the probability that a step includes a sample: ``B / N`` for
            batches of ``B`` out of ``N`` training samples (see the module docstring for what
            the number then means), or the rate given to ``poisson_batches``.
        delta: the ``delta`` of ``(epsilon, delta)``, e.g. ``1e-5`` or below ``1 / N``.
        noise_multiplier: default the ``DPModel``'s.
        accountant, rdp_conversion: as for ``compute_epsilon``.

    Steps are the updates the optimizer applied while this callback was attached (counted across
    ``fit`` calls). ``epsilon`` reaches ``History`` and the progress bar; list this callback
    before a TensorBoard callback for it to log the value too. ``history`` keeps ``(epoch,
    steps, epsilon)``.
    """

    def __init__(
        self,
        sampling_rate: float,
        delta: float,
        noise_multiplier: float | None = None,
        accountant: str = "rdp",
        rdp_conversion: str = "improved",
    ):
        super().__init__()
        self.sampling_rate = _check_positive("sampling_rate", sampling_rate)
        self.delta = _check_positive("delta", delta)
        self.noise_multiplier = noise_multiplier
        self.accountant = accountant
        self.rdp_conversion = rdp_conversion
        self.steps = 0
        self.history: list[tuple[int, int, float]] = []
        if accountant not in ACCOUNTANTS or rdp_conversion not in RDP_CONVERSIONS:
            raise ValueError(
                f"EpsilonLogger: accountant must be one of {ACCOUNTANTS} and rdp_conversion one "
                f"of {RDP_CONVERSIONS}, got {accountant!r} and {rdp_conversion!r}."
            )

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._fit_start = int(self.model.optimizer.iterations)
        self._steps_before = self.steps

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        # The optimizer's own count of updates: batch callbacks come once per several steps
        # under steps_per_execution, and their indices may run past the last step.
        self.steps = self._steps_before + int(self.model.optimizer.iterations) - self._fit_start
        sigma = self.noise_multiplier
        if sigma is None:
            sigma = getattr(self.model, "noise_multiplier", None)
        if sigma is None:
            raise ValueError(
                "EpsilonLogger: the model is not a DPModel; pass noise_multiplier=... (and train "
                "with DP-SGD: a model trained without it has no privacy guarantee)."
            )
        epsilon = compute_epsilon(
            sigma, self.sampling_rate, self.steps, self.delta, self.accountant, self.rdp_conversion
        )
        self.history.append((epoch, self.steps, epsilon))
        if logs is not None:
            logs["epsilon"] = epsilon
