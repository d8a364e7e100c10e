"""Networks of the paper built from tf_jacbp layers, ready for ``compile`` and ``fit``.

Each returns a ``keras.Sequential`` (``resnet_mnist``, ``resnet20``: a functional ``keras.Model``)
that outputs logits ``z[L]`` (the paper fuses the last activation with the loss, Table 1):
compile it with ``tf_jacbp.losses.SparseCategoricalCrossentropy(from_logits=True)``. Pass
``output_activation="softmax"`` for probabilities instead (then ``from_logits=False``). Each
model comes attached (``tf_jacbp.hooks.attach``): its Keras step functions follow
``reference_mode()``, and under XLA a bad label stops ``fit``.
"""

from __future__ import annotations

from typing import Any

from tf_jacbp import layers
from tf_jacbp._backend import keras
from tf_jacbp.hooks import attach


def mlp(
    hidden_units: tuple[int, ...],
    input_shape: tuple[int, ...] = (28, 28),
    num_classes: int = 10,
    activation: str = "relu",
    output_activation: str | None = None,
    name: str = "mlp",
) -> keras.Sequential:
    """A fully connected network ``input -> Flatten -> Dense(h_1) -> ... -> Dense(num_classes)``.

    Input ``(batch, *input_shape)``, output ``(batch, num_classes)``. Inputs of rank above one are
    flattened row-major (``Vec(X^T)``) by ``tf_jacbp.layers.Flatten`` (``J = I``).
    """
    stack = [keras.Input(shape=input_shape)]
    if len(input_shape) > 1:
        stack.append(layers.Flatten())
    stack += [layers.Dense(units, activation=activation) for units in hidden_units]
    stack.append(layers.Dense(num_classes, activation=output_activation))
    return attach(keras.Sequential(stack, name=name))


def lenet_100_300_10(**kwargs) -> keras.Sequential:
    """The paper's LeNet-100-300-10: 784 -> 100 -> 300 -> 10 (ReLU hidden layers, Section 3.3).

    The paper's order of hidden sizes; LeCun et al. (1998) describe 300-100 (``lenet_300_100``).
    Keyword arguments go to ``mlp``.
    """
    return mlp((100, 300), name="lenet_100_300_10", **kwargs)


def lenet_300_100(**kwargs) -> keras.Sequential:
    """LeCun et al. (1998)'s LeNet-300-100: 784 -> 300 -> 100 -> 10 (ReLU hidden layers)."""
    return mlp((300, 100), name="lenet_300_100", **kwargs)


def lenet5(
    input_shape: tuple[int, int, int] = (28, 28, 1), num_classes: int = 10
) -> keras.Sequential:
    """LeNet-5 of tf_jacbp layers, every backward pass an explicit Jacobian (LeCun et al., 1998).

    ``Conv2D(6, 5x5, same, relu) -> MaxPooling2D(2) -> Conv2D(16, 5x5, valid, relu) ->
    MaxPooling2D(2) -> Flatten -> Dense(120, relu) -> Dense(84, relu) -> Dense(num_classes)``.
    Each convolution multiplies by its Toeplitz matrix ``T(K)`` (Lemmas 2-3,
    ``tf_jacbp.toeplitz``). Input ``(batch, 28, 28, 1)`` (MNIST images with a channel axis),
    output the logits ``(batch, num_classes)``: compile with
    ``tf_jacbp.losses.SparseCategoricalCrossentropy(from_logits=True)``.
    """
    return attach(
        keras.Sequential(
            [
                keras.Input(shape=input_shape),
                layers.Conv2D(6, 5, padding="same", activation="relu"),
                layers.MaxPooling2D(2),
                layers.Conv2D(16, 5, activation="relu"),
                layers.MaxPooling2D(2),
                layers.Flatten(),
                layers.Dense(120, activation="relu"),
                layers.Dense(84, activation="relu"),
                layers.Dense(num_classes),
            ],
            name="lenet5",
        )
    )


def resnet_mnist(
    input_shape: tuple[int, int, int] = (28, 28, 1),
    num_classes: int = 10,
    filters: int = 8,
    dropout: float = 0.2,
    momentum: float = 0.9,
) -> keras.Model:
    """A small residual CNN of tf_jacbp layers (Toeplitz convolutions, BatchNormalization, Add).

    ``Conv2D(filters, 3x3, same) -> BN -> ReLU -> MaxPooling2D(2)``, then one residual block
    ``h + BN(Conv(ReLU(BN(Conv(h)))))`` with ``ReLU`` after the sum, then a head as in ResNets:
    ``Dropout(dropout) -> Conv2D(4 filters, 3x3, stride 2) -> BN -> ReLU ->
    GlobalAveragePooling2D -> Dense(num_classes)`` (the pooling's Jacobian averages: each of the
    ``H W`` positions of a channel gets ``delta / (H W)``). The convolutions before a batch
    normalization have no bias (its ``beta`` takes that role). ``momentum`` is the batch
    normalizations' (0.9 rather than Keras' 0.99: a few hundred steps on small data should be
    enough for the moving statistics to follow the batches'). The skip's Jacobian is ``I``, so
    ``delta`` reaching the block's input is the sum of the two paths' (``tf_jacbp.layers.Add``).

    Input ``(batch, 28, 28, 1)``, output the logits ``(batch, num_classes)`` (a functional
    model): compile with ``tf_jacbp.losses.SparseCategoricalCrossentropy(from_logits=True)``.
    """
    x = keras.Input(shape=input_shape)
    h = layers.Conv2D(filters, 3, padding="same", use_bias=False, name="stem_conv")(x)
    h = layers.ReLU(name="stem_relu")(
        layers.BatchNormalization(momentum=momentum, name="stem_bn")(h)
    )
    h = layers.MaxPooling2D(2, name="stem_pool")(h)
    r = layers.Conv2D(filters, 3, padding="same", use_bias=False, name="block_conv1")(h)
    r = layers.ReLU(name="block_relu1")(
        layers.BatchNormalization(momentum=momentum, name="block_bn1")(r)
    )
    r = layers.Conv2D(filters, 3, padding="same", use_bias=False, name="block_conv2")(r)
    r = layers.BatchNormalization(momentum=momentum, name="block_bn2")(r)
    h = layers.ReLU(name="block_relu2")(layers.Add(name="block_add")([r, h]))
    h = layers.Dropout(dropout, name="dropout")(h)
    h = layers.Conv2D(4 * filters, 3, strides=2, padding="same", use_bias=False, name="head_conv")(
        h
    )
    h = layers.ReLU(name="head_relu")(
        layers.BatchNormalization(momentum=momentum, name="head_bn")(h)
    )
    h = layers.GlobalAveragePooling2D(name="global_pool")(h)
    return attach(keras.Model(x, layers.Dense(num_classes, name="logits")(h), name="resnet_mnist"))


def conv_autoencoder(
    input_shape: tuple[int, int, int] = (28, 28, 1), filters: tuple[int, int] = (8, 16)
) -> keras.Sequential:
    """A convolutional autoencoder: Toeplitz convolutions down, their transposes up.

    ``Conv2D(f_1, 3x3, stride 2, same, relu) -> Conv2D(f_2, 3x3, stride 2, same, relu) ->
    Conv2DTranspose(f_1, 3x3, stride 2, same, relu) -> Conv2DTranspose(C, 3x3, stride 2, same,
    sigmoid)``. A convolution multiplies by ``T(K)``, a transposed convolution by ``T(K)^T``
    (docs/conv_transpose.md), so the decoder's backward pass multiplies by ``T(K)``. Input and
    output ``(batch, H, W, C)`` with ``H`` and ``W`` divisible by 4 and pixels in ``[0, 1]``:
    compile with ``tf_jacbp.losses.MeanSquaredError()``.
    """
    if input_shape[0] % 4 or input_shape[1] % 4:
        raise ValueError(
            f"conv_autoencoder: input_shape={tuple(input_shape)} needs a height and width "
            "divisible by 4 (two stride-2 convolutions down and two up); pad or crop the images."
        )
    down, bottleneck = filters
    return attach(
        keras.Sequential(
            [
                keras.Input(shape=input_shape),
                layers.Conv2D(down, 3, strides=2, padding="same", activation="relu"),
                layers.Conv2D(bottleneck, 3, strides=2, padding="same", activation="relu"),
                layers.Conv2DTranspose(down, 3, strides=2, padding="same", activation="relu"),
                layers.Conv2DTranspose(
                    input_shape[-1], 3, strides=2, padding="same", activation="sigmoid"
                ),
            ],
            name="conv_autoencoder",
        )
    )


def sequence_classifier(
    sequence_length: int,
    vocabulary_size: int,
    num_classes: int = 10,
    embedding_dim: int = 8,
    filters: int = 32,
    kernel_size: int = 15,
    dilation_rate: int = 7,
) -> keras.Sequential:
    """A sequence classifier: ``Embedding -> Conv1D -> Conv1D -> GlobalMaxPooling1D -> Dense``.

    ``Embedding(vocabulary_size, embedding_dim) -> Conv1D(filters, kernel_size, stride 2, same,
    relu) -> Conv1D(filters, 5, dilation_rate, same, relu) -> GlobalMaxPooling1D ->
    Dense(num_classes)``. Input ``(batch, sequence_length)`` of integer tokens in
    ``[0, vocabulary_size)``; the embedding selects one row of ``E`` per token (``y = S E``,
    ``S`` a selection matrix), each convolution multiplies by its 1-D Toeplitz matrix (Lemma 2),
    the pooling selects each channel's maximum over the positions. The defaults suit images read
    row by row as 14-token rows (``examples/train_sequence.py``): after the stride 2 a row is 7
    positions, so the dilation 7 reaches the rows above and below. Output the logits
    ``(batch, num_classes)``: compile with
    ``tf_jacbp.losses.SparseCategoricalCrossentropy(from_logits=True)``.
    """
    return attach(
        keras.Sequential(
            [
                keras.Input(shape=(sequence_length,), dtype="int32"),
                layers.Embedding(vocabulary_size, embedding_dim),
                layers.Conv1D(filters, kernel_size, strides=2, padding="same", activation="relu"),
                layers.Conv1D(
                    filters, 5, dilation_rate=dilation_rate, padding="same", activation="relu"
                ),
                layers.GlobalMaxPooling1D(),
                layers.Dense(num_classes),
            ],
            name="sequence_classifier",
        )
    )


def resnet20(
    input_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    output_activation: str | None = None,
    momentum: float = 0.9,
    **layer_kwargs: Any,
) -> keras.Model:
    """He et al. (2016)'s CIFAR ResNet-20 of tf_jacbp layers (``6 n + 2`` layers, ``n = 3``).

    ``Conv2D(16, 3x3, same) -> BN -> ReLU``, then three stages of three basic blocks with 16, 32
    and 64 filters; a block is ``h <- ReLU(s(h) + BN(Conv3x3(ReLU(BN(Conv3x3(h))))))``. The first
    block of stages 2 and 3 halves the height and width (its first 3x3 convolution has stride 2)
    and its shortcut ``s`` is a projection ``BN(Conv2D(filters, 1x1, stride 2)(h))`` (He et al.'s
    option B); every other shortcut is the identity. Then ``GlobalAveragePooling2D ->
    Dense(num_classes, output_activation)``. The convolutions have no bias (the batch
    normalizations' ``beta`` takes that role) and He-normal kernels, as in the paper. Each
    convolution applies its Toeplitz matrix ``T(K)`` (Lemmas 2-3; ``toeplitz="auto"`` forms it
    only while it is small, else applies it by convolution); a skip's Jacobian is ``I``, so
    ``delta`` reaching a block's input is the sum of the two paths' (``tf_jacbp.layers.Add``).

    Shapes for the default input ``(batch, 32, 32, 3)``: ``(batch, 32, 32, 16)`` after the stem
    and stage 1, ``(batch, 16, 16, 32)`` after stage 2, ``(batch, 8, 8, 64)`` after stage 3,
    ``(batch, 64)`` after the pooling, and the output ``(batch, num_classes)``: logits (compile
    with ``tf_jacbp.losses.SparseCategoricalCrossentropy(from_logits=True)``), or probabilities
    with ``output_activation="softmax"`` (then ``from_logits=False``). Parameters for 3 channels
    and 10 classes: 274,042 in all, 272,474 trainable and 1,568 moving statistics of the 784
    normalized channels (the paper's 0.27M; the same counts as a stock ``keras.layers`` build).
    ``momentum`` is the batch normalizations' (0.9, as in ``resnet_mnist``). ``layer_kwargs`` go
    to every layer, e.g. ``dtype="float64"``.
    """
    if len(input_shape) != 3:
        raise ValueError(
            f"resnet20: input_shape={tuple(input_shape)} must be (height, width, channels); "
            "add a channel axis to grayscale images, e.g. (32, 32, 1)."
        )

    def conv(h, filters: int, kernel_size: int, strides: int, name: str):
        return layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            name=name,
            **layer_kwargs,
        )(h)

    def bn(h, name: str):
        return layers.BatchNormalization(momentum=momentum, name=name, **layer_kwargs)(h)

    def relu(h, name: str):
        return layers.ReLU(name=name, **layer_kwargs)(h)

    x = keras.Input(shape=input_shape)
    h = relu(bn(conv(x, 16, 3, 1, "stem_conv"), "stem_bn"), "stem_relu")
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, 4):
            name = f"stage{stage}_block{block}"
            strides = 2 if stage > 1 and block == 1 else 1
            r = relu(
                bn(conv(h, filters, 3, strides, f"{name}_conv1"), f"{name}_bn1"), f"{name}_relu1"
            )
            r = bn(conv(r, filters, 3, 1, f"{name}_conv2"), f"{name}_bn2")
            if strides != 1:
                h = bn(conv(h, filters, 1, strides, f"{name}_shortcut_conv"), f"{name}_shortcut_bn")
            h = relu(layers.Add(name=f"{name}_add", **layer_kwargs)([r, h]), f"{name}_relu2")
    h = layers.GlobalAveragePooling2D(name="global_pool", **layer_kwargs)(h)
    y = layers.Dense(num_classes, activation=output_activation, name="logits", **layer_kwargs)(h)
    return attach(keras.Model(x, y, name="resnet20"))
