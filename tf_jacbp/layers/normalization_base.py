"""What ``BatchNormalization`` and ``LayerNormalization`` share: ``_Normalization``.

Both layers are ``y = gamma * xhat + beta`` with ``xhat`` a normalized ``x``: ``theta = [gamma,
beta]`` (those that exist), their weight options stored and serialized as Keras stores them, the
weights kept float32 under mixed precision (not autocast) and read in ``statistics_dtype``.
"""

from __future__ import annotations

from typing import Any

from keras import ops

from tf_jacbp import numerics
from tf_jacbp._backend import keras
from tf_jacbp.layers.base import _WEIGHT_OPTIONS, JacobianLayer

__all__ = ["_Normalization"]


class _Normalization(JacobianLayer):
    """The shared base of the normalization layers: the weight options of ``gamma``, ``beta``
    (and BN's moving statistics), stored and serialized as Keras stores them, the weights made
    float32 under mixed precision (not autocast), ``theta = [gamma, beta]`` read in
    ``statistics_dtype``, and ``get_config``.

    A subclass lists the arguments its config holds as they are stored in ``config_arguments``,
    passes its options (``<weight>_<initializer|regularizer|constraint>``) to
    ``set_weight_options``, and sets ``self.gamma``, ``self.beta`` (None for those that do not
    exist).
    """

    config_arguments: tuple[str, ...] = ()

    def set_weight_options(self, **options: Any) -> None:
        """Store each ``<weight>_<initializer|regularizer|constraint>`` via Keras' ``get``, and
        their names in ``weight_options`` (the order ``get_config`` gives them in)."""
        self.weight_options = tuple(options)
        for name, value in options.items():
            setattr(self, name, _WEIGHT_OPTIONS[name.rsplit("_", 1)[1]].get(value))

    def get_config(self) -> dict[str, Any]:
        """Keras' config, then the ``config_arguments`` as stored, then the ``weight_options``
        serialized."""
        config = super().get_config()
        config.update({name: getattr(self, name) for name in self.config_arguments})
        for name in self.weight_options:
            config[name] = _WEIGHT_OPTIONS[name.rsplit("_", 1)[1]].serialize(getattr(self, name))
        return config

    def _weight(self, name: str, shape: tuple, trainable: bool = True) -> keras.Variable:
        """The weight ``name`` of ``shape``, with those of its options that the layer has."""
        options = {
            k: getattr(self, f"{name}_{k}") for k in _WEIGHT_OPTIONS if hasattr(self, f"{name}_{k}")
        }
        return self.add_weight(
            name=name, shape=shape, trainable=trainable, autocast=False, **options
        )

    @property
    def statistics_dtype(self) -> str:
        """The dtype the layer computes in: float32 at least, so float32 for float16/bfloat16
        compute dtypes (as Keras)."""
        return numerics.result_type(self.compute_dtype, "float32")

    def jacobian_parameters(self) -> list[keras.Variable]:
        """``[gamma, beta]`` (theta order), without those that do not exist."""
        return [v for v in (self.gamma, self.beta) if v is not None]

    def read_parameters(self) -> list[Any]:
        """``gamma``, ``beta`` as tensors of ``statistics_dtype`` (float32 under mixed
        precision)."""
        return [
            ops.cast(ops.convert_to_tensor(v), self.statistics_dtype)
            for v in self.jacobian_parameters()
        ]
