"""Conv1D as a Toeplitz matrix: ``z = T(K) vec(x) + b``, ``a = f(z)`` (docs/math.md, Lemma 2).

A sequence ``X`` of shape ``(T, C)`` convolved with a kernel ``K`` of shape ``(k, C, F)`` is
Lemma 2's one-dimensional case: ``vec(X * K) = T(K) vec(X)`` with ``T(K)`` of shape
``(T_out F) x (T C)``,

    T[(t, f), (t', c)] = K[q, c, f]   if t' = t s - pad_before + q d  (0 <= q < k), else 0,

``pad_before`` being 0 ("valid"), TensorFlow's "same" rule, or ``(k - 1) d`` ("causal", so that
output ``t`` reads no input after ``t s``; ``tf_jacbp.geometry``). This is the matrix of a 2-D
convolution of the image ``X`` of height 1 with the kernel ``K`` of height 1: ``vec`` of
``(T, C)`` and of ``(1, T, C)`` are the same vector, as are ``Vec`` of ``(k, C, F)`` and of
``(1, k, C, F)``. So ``Conv1D`` is ``tf_jacbp.layers.conv``'s layer (``ToeplitzConv``) applied to
that image: the same ``T(K)`` built by the same index maps, the same patch matrix
``J_{Vec(K)} z = I_F (x) X_patch`` (``X_patch`` of shape ``T_out x k C``), the same products
``vjp_input``: ``dX = Delta T(K)``, ``vjp_params``: ``dK = Vec^{-1}(Vec(X_patch^T Delta))``,
``db = sum_t Delta[t]`` (and ``squared_norms``), with ``rank = 1`` selecting the image view.
"""

from __future__ import annotations

from tf_jacbp import geometry
from tf_jacbp._backend import keras
from tf_jacbp.layers.conv import ToeplitzConv


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Conv1D(ToeplitzConv):
    """1-D convolution that multiplies by its materialized Toeplitz matrix ``T(K)``.

    Arguments as ``keras.layers.Conv1D``: those of ``Conv2D`` (plus ``bias``,
    ``toeplitz_budget_bytes`` and ``toeplitz``) with one int, or a tuple of one, for each pair.

    Args:
        kernel_size: ``k``.
        strides: ``s``, >= 1.
        padding: ``"valid"``, ``"same"`` (TensorFlow's rule) or ``"causal"`` (``(k - 1) d`` zeros
            before the sequence: output ``t`` depends on inputs up to ``t s`` only).
        dilation_rate: ``d``, >= 1; as in Keras, not together with ``strides > 1``.
        bias: ``"tied"`` (Keras': shape ``(F,)``) or ``"untied"`` (one per output entry, shape
            ``(T_out, F)``, the paper's ``B_i``).
        data_format: ``None``, ``"channels_last"`` or ``"channels_first"`` (input
            ``(batch, C, T)``, output ``(batch, F, T_out)``, an untied bias ``(F, T_out)``; the
            Jacobians are over the ``vec`` of ``(C, T)``), as for ``Conv2D``.
        groups: a positive integer dividing ``F`` and ``C``, as for ``Conv2D``.
        filters, activation, use_bias, kernel_initializer,
        bias_initializer, kernel_regularizer, bias_regularizer, activity_regularizer,
        kernel_constraint, bias_constraint, toeplitz_budget_bytes, toeplitz: as for ``Conv2D``
        (Keras' ``lora_rank``, ``lora_alpha`` and ``quantization_config`` are refused with a
        ValueError naming them).

    Input ``(batch, T, C)`` with ``C`` known; output ``(batch, T_out, F)``; the kernel ``K`` has
    Keras' shape ``(k, C / groups, F)``. A sequence length of None (``keras.Input((None, C))``)
    builds ``T(K)`` for each length the layer is called with, as ``Conv2D`` does for image sizes (a
    length unknown when traced, as in ``fit`` after a second length: maps computed at run time).

    Example:
        >>> layer = tf_jacbp.layers.Conv1D(1, 2, use_bias=False)
        >>> layer.build((None, 4, 1))
        >>> layer.toeplitz_matrix().shape  # 3 outputs, 4 inputs
        TensorShape([3, 4])
    """

    rank = 1
    paddings = geometry.PADDINGS_1D
