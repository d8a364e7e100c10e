"""The paper's networks train with model.fit on real MNIST digits (the offline 5,000)."""

import warnings

import keras
import numpy as np
import pytest

from tf_jacbp import datasets, layers, losses, models


@pytest.fixture(scope="module")
def digits():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the offline-fallback warning, tested in test_datasets
        (x_train, y_train), (x_test, y_test) = datasets.load_mnist()
    return (x_train / 255.0, y_train), (x_test / 255.0, y_test)


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


@pytest.mark.slow
def test_lenet_100_300_10_trains_to_90_percent(digits):
    (x_train, y_train), (x_test, y_test) = digits
    keras.utils.set_random_seed(0)
    model = models.lenet_100_300_10()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=15, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert accuracy >= 0.90, f"test accuracy {accuracy:.3f} < 0.90"
    assert np.isfinite(model.layers[-1].kernel.numpy()).all()


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
