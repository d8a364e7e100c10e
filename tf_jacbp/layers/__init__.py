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
from tf_jacbp.layers.conv import Conv2D
from tf_jacbp.layers.dense import Dense
from tf_jacbp.layers.dropout import Dropout
from tf_jacbp.layers.flatten import Flatten
from tf_jacbp.layers.merge import Add
from tf_jacbp.layers.normalization import BatchNormalization
from tf_jacbp.layers.pooling import AveragePooling2D, MaxPooling2D

__all__ = [
    "Add",
    "AveragePooling2D",
    "BatchNormalization",
    "Conv2D",
    "ELU",
    "Flatten",
    "MaxPooling2D",
    "GELU",
    "Activation",
    "Dense",
    "Dropout",
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
