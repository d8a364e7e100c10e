"""The stock-Keras twin of a tf_jacbp model: same architecture, same weights, Keras' layers."""

from __future__ import annotations

import keras

from tf_jacbp import activations, layers


def _stock_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    config = layer.get_config()
    config.pop("bias", None)  # tf_jacbp's Conv2D bias mode; the twin is "tied" only
    config.pop("toeplitz_budget_bytes", None)
    config.pop("toeplitz", None)  # how T(K) is applied; stock has one route
    if "activation" in config:
        config["activation"] = activations.deserialize(config["activation"]).name
    if isinstance(layer, layers.JacobianLayer):
        stock = getattr(keras.layers, type(layer).__name__, None)
        if stock is None:
            name = activations.deserialize(config.pop("activation", None)).name
            return keras.layers.Activation(name, name=config["name"])
        return stock.from_config(config)
    return layer.__class__.from_config(config)


def stock_twin(model: keras.Model) -> keras.Model:
    """``model`` rebuilt from ``keras.layers`` (tf_jacbp layers swapped), weights copied."""
    twin = keras.models.clone_model(model, clone_function=_stock_layer)
    twin.set_weights(model.get_weights())
    return twin
