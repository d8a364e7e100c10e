"""The gradient checker: ``GradientCheck`` and its parts, one concept a module.

Training applies the Jacobian route: every tf_jacbp layer's ``backward`` (the paper's
``(J_x F)^T delta`` and ``(J_theta F)^T delta``, docs/math.md "Algorithm 1") and every Table 1
loss's ``grad_{z[L]} l``, chained by ``keras.ops.custom_gradient``; stock Keras layers in the
same model are differentiated by autodiff as usual. The witness is the reference route: the same
model and loss in stock ops inside ``tf_jacbp.reference_mode()``, differentiated by autodiff
(``tf.GradientTape`` on TensorFlow; on JAX ``jax.value_and_grad`` over the values of the
model's variables, mapped in statelessly as Keras' JAX ``train_step`` does). Both are gradients
of the model's compiled training loss ``L(theta) = model.compute_loss(x, y, model(x,
training=True), sample_weight)`` (the compiled loss plus regularization losses) on one fixed
probe batch. The two routes are compared twice:

* in float64, on a float64 twin of the model (same layers, weights, batch statistics and dropout
  masks), where rounding is negligible: this checks the formulas;
* in the training dtype, where the Jacobian route must stay within a small multiple of the
  rounding error the reference route itself makes there (measured against the float64 twin):
  this checks what training applies, without a guessed per-dtype tolerance.

Optional or conditional witnesses: a directional central finite difference in float64, and, for a
model trained with DP-SGD, the per-example gradient norms its first pass clips with. The bounds
are stated once, in ``criterion`` (with ``tf_jacbp.tolerances``' numbers).

* ``callback``: ``GradientCheck``, the Keras callback; its hooks only decide *when* to check.
* ``witnesses``: *what* a check computes: the model's two routes, its float64 twin's, the
  criterion turning their statistics into records, and finite differences.
* ``criterion``: the criterion in words, ``STATEMENT``, stated once.
* ``norms``: the per-example norm witness of a model that clips per example (DP-SGD).
* ``routes``: the compiled gradient functions and the statistics they are reduced to.
* ``twin``: the float64 twin of a model (same weights, batch statistics and dropout masks).
* ``probe``: the probe batch (validation, finiteness, the re-check's perturbation), ``log_dir``.
* ``report``: summary, mismatch message, coverage warnings, epoch logs, plot.
* ``records``: ``GradientCheckRecord``, the error, the warnings and the names they use.

``tf_jacbp.callbacks`` re-exports the public names.
"""

from tf_jacbp.check.callback import DEFAULT_EVERY_N_BATCHES, GradientCheck
from tf_jacbp.check.records import (
    FINITE_DIFFERENCES,
    FIXED_RTOL,
    LOG_KEYS,
    ON_MISMATCH,
    PER_EXAMPLE_NORMS,
    REFERENCE,
    ROUNDING_FLOOR,
    GradientCheckCoverageWarning,
    GradientCheckRecord,
    GradientMismatchError,
    GradientMismatchWarning,
)

__all__ = [
    "DEFAULT_EVERY_N_BATCHES",
    "FINITE_DIFFERENCES",
    "FIXED_RTOL",
    "LOG_KEYS",
    "ON_MISMATCH",
    "PER_EXAMPLE_NORMS",
    "REFERENCE",
    "ROUNDING_FLOOR",
    "GradientCheck",
    "GradientCheckCoverageWarning",
    "GradientCheckRecord",
    "GradientMismatchError",
    "GradientMismatchWarning",
]
