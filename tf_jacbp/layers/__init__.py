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
from tf_jacbp.layers.conv1d import Conv1D
from tf_jacbp.layers.conv3d import Conv3D
from tf_jacbp.layers.conv_transpose import Conv2DTranspose
from tf_jacbp.layers.dense import Dense
from tf_jacbp.layers.dropout import Dropout
from tf_jacbp.layers.embedding import Embedding
from tf_jacbp.layers.flatten import Flatten
from tf_jacbp.layers.global_pooling import (
    GlobalAveragePooling1D,
    GlobalAveragePooling2D,
    GlobalMaxPooling1D,
    GlobalMaxPooling2D,
)
from tf_jacbp.layers.layer_norm import LayerNormalization
from tf_jacbp.layers.merge import Add, Concatenate, Multiply
from tf_jacbp.layers.normalization import BatchNormalization
from tf_jacbp.layers.pooling import AveragePooling2D, MaxPooling2D
from tf_jacbp.layers.pooling_nd import (
    AveragePooling1D,
    AveragePooling3D,
    MaxPooling1D,
    MaxPooling3D,
)
from tf_jacbp.layers.reshaping import Reshape, UpSampling2D, ZeroPadding2D

__all__ = [
    "Activation",
    "Add",
    "AveragePooling1D",
    "AveragePooling2D",
    "AveragePooling3D",
    "BatchNormalization",
    "Concatenate",
    "Conv1D",
    "Conv2D",
    "Conv2DTranspose",
    "Conv3D",
    "Dense",
    "Dropout",
    "ELU",
    "Embedding",
    "Flatten",
    "GELU",
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "JacobianLayer",
    "LayerNormalization",
    "LeakyReLU",
    "MaxPooling1D",
    "MaxPooling2D",
    "MaxPooling3D",
    "Multiply",
    "ReLU",
    "Reshape",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "Swish",
    "Tanh",
    "UpSampling2D",
    "ZeroPadding2D",
    "route",
]
