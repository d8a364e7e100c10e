"""Conv3D as a Toeplitz matrix: ``z = T(K) vec(x) + b``, ``a = f(z)`` (docs/math.md, Lemmas 2-3).

A volume ``X`` of shape ``(D, H, W, C)`` convolved with a kernel ``K`` of shape
``(k_1, k_2, k_3, C, F)`` is Lemma 2 with three spatial axes: ``vec(X * K) = T(K) vec(X)`` with
``T(K)`` of shape ``(D_out H_out W_out F) x (D H W C)``,

    T[(u, f), (u', c)] = K[q, c, f]   if u'_a = u_a s_a - pad_a + q_a d_a on each axis a, else 0,

``u``, ``u'`` and ``q`` multi-indices over the three axes, ``pad_a`` 0 ("valid") or TensorFlow's
"same" rule (``tf_jacbp.geometry``). Nothing in ``tf_jacbp.layers.conv``'s formulas depends on
the number of spatial axes: ``T(K)`` and the patch matrix ``X_patch`` (``P x k_1 k_2 k_3 C``,
``P = D_out H_out W_out`` positions) come from the index of any rank (``tf_jacbp.toeplitz``), so
``Conv3D`` is ``ToeplitzConv`` with ``rank = 3``:

* ``vjp_input``: ``dX = Delta T(K)``;
* ``vjp_params``: ``dK = Vec^{-1}(Vec(X_patch^T Delta))``, ``db = sum over positions of Delta``;
* ``squared_norms``: ``||X_patch,i^T Delta_i||^2`` in its Gram or outer form (one strided view of
  the padded volume per kernel tap), ``||1^T Delta_i||^2`` for the bias.
"""

from __future__ import annotations

from tf_jacbp import geometry
from tf_jacbp._backend import keras
from tf_jacbp.layers.conv import ToeplitzConv


@keras.saving.register_keras_serializable(package="tf_jacbp")
class Conv3D(ToeplitzConv):
    """3-D convolution that multiplies by its materialized Toeplitz matrix ``T(K)``.

    Arguments as ``keras.layers.Conv3D``, plus ``bias``, ``toeplitz_budget_bytes`` and
    ``toeplitz`` as for ``Conv2D``.

    Args:
        filters: ``F``, the number of output channels (a positive integer).
        kernel_size: ``(k_1, k_2, k_3)`` or one int for all three.
        strides: ``(s_1, s_2, s_3)`` or one int, >= 1.
        padding: ``"valid"`` or ``"same"`` (TensorFlow's rule, ``tf_jacbp.geometry.same_padding``).
        data_format: ``None``, ``"channels_last"`` or ``"channels_first"`` (input
            ``(batch, C, D, H, W)``; the Jacobians are over the ``vec`` of ``(C, D, H, W)``), as
            for ``Conv2D``.
        dilation_rate: ``(d_1, d_2, d_3)`` or one int, >= 1; as in Keras, not together with
            ``strides > 1``.
        groups: a positive integer dividing ``F`` and ``C``, as for ``Conv2D`` (``T(K)`` block
            diagonal over the groups).
        activation: a name from ``tf_jacbp.activations``, Keras' own function for it, or
            ``None``; its Jacobian ``D`` follows.
        use_bias: whether ``z`` has a bias.
        bias: ``"tied"`` (Keras': shape ``(F,)``) or ``"untied"`` (one per output entry, shape
            ``(D_out, H_out, W_out, F)``, the paper's ``B_i``).
        kernel_initializer, bias_initializer, kernel_regularizer, bias_regularizer,
        activity_regularizer, kernel_constraint, bias_constraint: as in Keras.
        toeplitz_budget_bytes: the memory budget for ``T(K)``, as for ``Conv2D``.

    Keras' ``lora_rank``, ``lora_alpha`` and ``quantization_config`` are refused with a
    ValueError naming them.

    Input ``(batch, D, H, W, C)`` with ``C`` known; output ``(batch, D_out, H_out, W_out, F)``;
    the kernel ``K`` has Keras' shape ``(k_1, k_2, k_3, C / groups, F)``, so weights copy to and
    from ``keras.layers.Conv3D``. ``T(K)`` has ``D_out H_out W_out F`` rows and ``D H W C`` columns:
    it grows fast with the volume, and the memory guard (``toeplitz_budget_bytes``) applies.
    Volumes of varying size (``keras.Input((None, None, None, C))``) work as images do for
    ``Conv2D``: one ``T(K)`` per static size, the index maps computed when the graph runs for sizes
    unknown when traced (dense ``T``, its memory guard a run-time assertion).

    Example:
        >>> layer = tf_jacbp.layers.Conv3D(1, 2, use_bias=False)
        >>> layer.build((None, 3, 3, 3, 1))
        >>> tuple(layer.toeplitz_matrix().shape)  # 2 x 2 x 2 outputs, 27 inputs
        (8, 27)
    """

    rank = 3
    paddings = geometry.PADDINGS
