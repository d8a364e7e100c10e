"""The models' shapes and layers. Their training to an accuracy with GradientCheck on is
tests/system/test_examples.py (through examples/train_mnist.py, as users run it)."""

import pytest

from tf_jacbp import layers, models


def test_lenet_100_300_10_has_the_paper_shapes():
    model = models.lenet_100_300_10()
    kernels = [layer.kernel.shape for layer in model.layers if isinstance(layer, layers.Dense)]
    assert kernels == [(784, 100), (100, 300), (300, 10)]
    assert [
        tuple(k)
        for k in (
            layer.kernel.shape
            for layer in models.lenet_300_100().layers
            if isinstance(layer, layers.Dense)
        )
    ] == [(784, 300), (300, 100), (100, 10)]


def test_the_models_end_as_their_docstrings_say():
    resnet = [type(layer) for layer in models.resnet_mnist().layers]
    assert resnet[-2:] == [layers.GlobalAveragePooling2D, layers.Dense]
    autoencoder = models.conv_autoencoder()
    assert [type(layer) for layer in autoencoder.layers] == [layers.Conv2D] * 2 + [
        layers.Conv2DTranspose
    ] * 2
    assert autoencoder.output_shape == (None, 28, 28, 1)
    sequence = models.sequence_classifier(196, 16)
    assert [type(layer) for layer in sequence.layers] == [
        layers.Embedding,
        layers.Conv1D,
        layers.Conv1D,
        layers.GlobalMaxPooling1D,
        layers.Dense,
    ]
    with pytest.raises(ValueError, match="divisible by 4"):
        models.conv_autoencoder(input_shape=(30, 30, 1))
