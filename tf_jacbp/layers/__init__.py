"""tf_jacbp layers: Keras layers whose backward passes are the paper's Jacobian formulas."""

from tf_jacbp.layers.activation import (
    ELU,
    GELU,
    Activation,
    LeakyReLU,
    ReLU,
    Sigmoid,
    Softmax,
    Softplus,
    Swish,
    Tanh,
)
from tf_jacbp.layers.base import JacobianLayer, route
from tf_jacbp.layers.dense import Dense

__all__ = [
    "ELU",
    "GELU",
    "Activation",
    "Dense",
    "JacobianLayer",
    "LeakyReLU",
    "ReLU",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "Swish",
    "Tanh",
    "route",
]
