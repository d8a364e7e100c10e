"""DP-SGD's training: the clipped, noisy gradient, a model that trains on it, Poisson batches.

``clipped_gradients`` computes DP-SGD's gradient in two passes over one forward pass (see
``tf_jacbp.privacy``'s docstring); ``DPModel`` (or ``make_private``) trains on it with ``fit``;
``poisson_batches`` samples the batches the accountant assumes.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np

from tf_jacbp._backend import keras, tf
from tf_jacbp.jacobian import output_delta, parameter_variables, squared_gradient_norms
from tf_jacbp.privacy.arguments import check_positive, check_sampling_rate


def _check_model(model: keras.Model) -> list[keras.Variable]:
    """The model's trainable variables, after checking the per-sample formulas cover all of them
    and no layer adds a data-dependent regularization term."""
    covered = {id(v) for v in parameter_variables(model)}  # raises for stock layers
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
    l2_norm_clip = check_positive("l2_norm_clip", l2_norm_clip)
    noise_multiplier = check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    loss = _check_loss(loss if loss is not None else getattr(model, "loss", None))
    trainable = _check_model(model)
    records, output_key, out, values, delta = output_delta(
        model, x, y, loss, training, "clipped_gradients"
    )
    # Pass 1: ||g_i||^2 over the trainable variables, from the layers' norm formulas; the walk
    # keeps the delta rows that reach each map.
    trainable_ids = {id(v) for v in trainable}
    deltas: list = []
    squared = [
        s
        for v, s in squared_gradient_norms(model, records, output_key, delta, deltas)
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
        divisor = tf.constant(check_positive("expected_batch_size", expected_batch_size))
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
    Stock Keras losses work as well as tf_jacbp's; after a Softmax or Sigmoid output a stock cross
    entropy is computed on the probabilities (clipped to ``[eps, 1 - eps]``, as Keras does
    eagerly), not on logits read off the graph as Keras' own graph-mode ``fit`` does.
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
        self.l2_norm_clip = check_positive("l2_norm_clip", l2_norm_clip)
        self.noise_multiplier = check_positive("noise_multiplier", noise_multiplier, True)
        self.expected_batch_size = (
            None
            if expected_batch_size is None
            else check_positive("expected_batch_size", expected_batch_size)
        )
        self.seed = seed
        # Fresh entropy from the operating system unless a seed is given (tests only): never
        # Python's global generator, which keras.utils.set_random_seed fixes.
        initial = seed if seed is not None else secrets.randbits(62)
        self.noise_seed = keras.random.SeedGenerator(initial, name="dp_noise_seed")

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
    parameter_variables(model)  # tf_jacbp layers only, one input and one output
    return DPModel(
        model.inputs[0],
        model.outputs[0],
        name=f"{model.name}_dp",
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        seed=seed,
    )


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
    q = check_sampling_rate(sampling_rate)
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
