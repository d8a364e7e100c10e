"""Differentially private SGD (DP-SGD, Abadi et al. 2016) for models of tf_jacbp layers.

Each training step of a ``DPModel`` computes, for a batch of ``B`` samples,

    g_tilde = (1 / B') [ sum_i c_i g_i + N(0, (sigma C)^2 I) ],   c_i = min(1, C / ||g_i||),

where ``g_i = grad_theta l(y_i, yhat_i)`` is sample ``i``'s gradient of its own loss term (the
loss's per-sample value, before the batch reduction), ``C`` is ``l2_norm_clip``, ``sigma`` is
``noise_multiplier`` and ``B'`` is the batch size: the actual one by default (at least 1), or
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

What the privacy guarantee assumes. ``compute_epsilon``, ``EpsilonLogger`` and
``DPModel.privacy_spent`` account for the Poisson-subsampled Gaussian mechanism: every step
includes each of the ``N`` training samples independently with probability ``q`` (the sampling
rate), and the noise is Gaussian with standard deviation ``sigma C`` on a sum of gradients each
clipped to norm ``C``, under add/remove-one adjacency. ``poisson_batches`` implements that
sampling (an empty batch is a step of noise alone). Training on shuffled fixed-size batches
(``model.fit(x, y, batch_size=B)``) is the common practice, also of TensorFlow Privacy's
tutorials, and its epsilon computed with ``q = B / N`` is then what Poisson sampling would give,
not a proven guarantee for shuffling; ``privacy_statement`` prints both that number and the bound
that holds without the assumption. The noise comes from a pseudo-random generator seeded from
the operating system's entropy (a fixed ``seed`` is for tests only), or with ``secure_mode``
from ``os.urandom``; floating-point effects on the Gaussian mechanism are not accounted for (as in
TensorFlow Privacy and Opacus). The generator's state and the privacy ledger (steps at each
``q`` and ``sigma``) are saved with the model: a resumed run continues the noise sequence and
its epsilon is for the whole training. ``docs/privacy.md`` has the details and a reproduced run.

Only what the per-sample gradient covers is private: weight regularizers (their gradient does not
depend on the data) are added after the noise; ``sample_weight`` weights each sample's loss
before it is clipped; activity regularizers and losses without per-sample values raise an
error, as does a model with trainable variables that no tf_jacbp layer accounts for. Nothing
falls back to non-private training.

Backends. Everything here runs on Keras' TensorFlow and JAX backends. On JAX, ``DPModel``'s
train step is Keras' stateless ``train_step(state, data)``: the layers' formulas read the
variables' values from the step's state, and what the step advances (the noise generator's draw
count, the ledger's step count) returns with the new state, so it is saved, resumed and carried
under ``keras.distribution.DataParallel`` as on TensorFlow. The noise generator keeps all 62
bits of its seed on both (Philox on TensorFlow, Threefry on JAX); a checkpoint resumes on the
other backend with new draws, never a replay. ``poisson_batches`` pads batches to a multiple on
JAX (rows of weight 0), where ``jax.jit`` compiles one step for every batch shape.
``clipped_gradients(seed=None)`` inside a compiled JAX step raises (an unseeded draw would be a
constant of the step); give it a ``SeedGenerator``.

The package's modules: ``dpsgd`` (``clipped_gradients``, ``clip_groups``, ``poisson_batches``),
``model`` (``DPModel``, ``make_private``), ``noise`` (``fresh_seed``, the secure mode),
``accounting`` (``compute_epsilon``, ``epsilon_of_ledger``, ``noise_multiplier_for_epsilon``,
``EpsilonLogger``) and ``statement`` (``privacy_statement``, ``epsilon_once_per_epoch``); every
public name is importable from ``tf_jacbp.privacy``.
"""

from tf_jacbp.privacy.accounting import (
    ACCOUNTANTS,
    RDP_CONVERSIONS,
    EpsilonLogger,
    compute_epsilon,
    epsilon_of_ledger,
    noise_multiplier_for_epsilon,
)
from tf_jacbp.privacy.dpsgd import clip_groups, clipped_gradients, poisson_batches
from tf_jacbp.privacy.model import DPModel, make_private
from tf_jacbp.privacy.noise import fresh_seed, secure_standard_normal
from tf_jacbp.privacy.statement import epsilon_once_per_epoch, privacy_statement

__all__ = [
    "ACCOUNTANTS",
    "DPModel",
    "EpsilonLogger",
    "RDP_CONVERSIONS",
    "clip_groups",
    "clipped_gradients",
    "compute_epsilon",
    "epsilon_of_ledger",
    "epsilon_once_per_epoch",
    "fresh_seed",
    "make_private",
    "noise_multiplier_for_epsilon",
    "poisson_batches",
    "privacy_statement",
    "secure_standard_normal",
]
