"""The losses of Table 1, with the last activation fused in (Eq. 1 and Table 1).

Shapes. ``y_pred`` has any rank ``r >= 1`` with the classes/outputs on the last axis: ``(batch,
d)``, ``(batch, T, d)`` for sequences, ``(batch, H, W, d)`` for images. Each loss reduces the last
axis only and returns one value per *position*, shape ``y_pred.shape[:-1]``; Keras' ``Loss``
then applies ``sample_weight`` (broadcast against that shape: ``(batch,)``, ``(batch, T)`` or
``(batch, H, W)``) and the ``reduction`` (``"sum_over_batch_size"`` divides by the number of
positions, which divides each row of the gradient by it). Labels have the shapes Keras accepts,
after Keras' own rank matching (``_match_ranks``).

With ``from_logits=True`` the backward pass is Table 1's ``grad_{z[L]} l`` at every position:

| loss                            | ``l(y, z)`` per position              | ``grad_z l``          |
|---------------------------------|---------------------------------------|-----------------------|
| (Sparse)CategoricalCrossentropy | ``-sum_i y_i log softmax(z)_i``       | ``-(y - softmax(z))`` |
| BinaryCrossentropy              | ``mean_i [-y log s - (1-y) log(1-s)]`` | ``-(y - s) / d``     |
| SquaredError (paper's sum)      | ``sum_i (y_i - yhat_i)^2``            | ``-2 (y - yhat)``     |
| MeanSquaredError                | ``mean_i (y_i - yhat_i)^2``           | ``-2 (y - yhat) / d`` |

(``s = sigmoid(z)``, ``d`` the size of the last axis, ``i`` runs over it; the cross-entropy row
is exact for labels that sum to one, and ``-(y - sum(y) softmax(z))`` in general.) The upstream
gradient of the reduction, ``u`` of shape ``y_pred.shape[:-1]``, scales each position's row:
``grad_{y_pred} L = u[..., None] * grad_z l``.

With ``from_logits=False`` the loss sees probabilities ``p`` and its backward pass is
``grad_p l``; the model's Softmax/Sigmoid layer then applies its own Jacobian, so the chain still
gives Table 1's ``grad_z l``. The cross entropies clip (and renormalize) as Keras does: see
``tf_jacbp.losses.categorical`` and ``tf_jacbp.losses.binary``.

Bad labels. Class labels (``SparseCategoricalCrossentropy``: integers in ``[0, C - 1]``; the other
cross entropies: values in ``[0, 1]``) are checked on every call:

* eagerly: ``ValueError`` naming the first offending value;
* in a ``tf.function`` (``model.fit`` in graph mode): a ``tf.debugging.Assert`` that is a control
  dependency of the loss's gradient, so the step stops with ``InvalidArgumentError`` naming the
  first offending label and ``C`` before the optimizer can apply anything (the trainable weights
  are left bit-identical);
* under XLA (``jit_compile=True``), which compiles assertions away (measured: TensorFlow 2.21
  runs a compiled ``tf.debugging.Assert`` and ``check_numerics`` as no-ops), the step cannot stop
  itself. It gets an exactly zero gradient with respect to ``y_pred`` (every position, not just
  the bad one) and a NaN value at the offending positions, and the label is recorded in a
  variable of the loss (``tf_jacbp.losses.labels``). In the step of a model given to
  ``tf_jacbp.hooks.attach`` (the builders of ``tf_jacbp.models``, ``GradientCheck`` and the DP
  models attach theirs), the optimizer's ``apply`` is conditional on the record (``hooks`` wraps
  that model's optimizer's ``apply``, no other): the step applies nothing, so weights, optimizer
  slots (momentum, Adam's moments) and step counter stay bit-identical. Right after the step,
  ``fit``, ``evaluate`` and the ``*_on_batch`` methods raise ``InvalidArgumentError`` naming the
  label and ``C`` (the last batch included). A model that is not attached, or a compiled
  function of one's own, gets the NaN loss and the zero gradient for that step and goes on;
* on JAX every step is compiled by ``jax.jit`` and behaves as under XLA: the record leaves the
  step through ``jax.debug.callback``, an attached model's optimizer update of that step is
  skipped (``stateless_apply`` gives back the values it was given) and the loop raises
  ``ValueError`` right after the step (``tf_jacbp.hooks``; docs/backends.md).

In graph mode the optimizer's step counter (``optimizer.iterations``) may count the stopped step:
its increment does not wait for the gradient, in stock Keras either.

Inside ``tf_jacbp.reference_mode()`` each loss computes the same value with stock ``keras.ops``
(TensorFlow's kernels on that backend) and autodiff differentiates it (the label checks are the
same on both routes). The losses are written in ``keras.ops``; the assertion and the other
TensorFlow pieces of the label checks are in ``tf_jacbp.backend``.
"""

from tf_jacbp.losses import labels  # noqa: F401, I001  (installs the XLA bad-label stop)
from tf_jacbp.losses.binary import BinaryCrossentropy
from tf_jacbp.losses.categorical import CategoricalCrossentropy, SparseCategoricalCrossentropy
from tf_jacbp.losses.squared import MeanSquaredError, SquaredError

__all__ = [
    "BinaryCrossentropy",
    "CategoricalCrossentropy",
    "MeanSquaredError",
    "SparseCategoricalCrossentropy",
    "SquaredError",
]
