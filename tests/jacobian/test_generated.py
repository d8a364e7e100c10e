"""Generated configurations: random networks of every tf_jacbp layer (skips through Add, batch
normalization and dropout in training or inference mode) with a random Table 1 loss, each checked
against the reference route with tf.GradientTape in float64 (<= 1e-12 relative).

The "ci" hypothesis profile (tests/conftest.py) draws MODELS_PER_RUN models with a fixed seed;
``pytest --hypothesis-profile=long tests/jacobian/test_generated.py`` draws many more.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_jacbp
from tf_jacbp import geometry, layers, losses, tolerances

MODELS_PER_RUN = 220
GENERATED: list[list[str]] = []  # the layer types of each model checked, in order
ACTIVATIONS = [None, "relu", "tanh", "sigmoid", "elu", "softplus", "gelu", "swish", "leaky_relu"]
F64 = "float64"


def _output_shape(spec: tuple, size: tuple) -> tuple:
    """``(H_out, W_out, C_out)`` of a conv or pooling spec (no layer is built: initializers draw
    from Python's ``random``, which hypothesis strategies must not)."""
    cls, kw = spec
    k = kw.get("kernel_size", kw.get("pool_size"))
    k = (k, k) if isinstance(k, int) else k
    s = (kw["strides"],) * 2 if isinstance(kw["strides"], int) else kw["strides"]
    d = kw.get("dilation_rate", (1, 1))
    hw = [geometry.output_size(size[i], k[i], s[i], kw["padding"], d[i]) for i in range(2)]
    return (*hw, kw.get("filters", size[2]))


@st.composite
def normalization_or_dropout(draw):
    """Nothing, a BatchNormalization, a Dropout, or both (specs)."""
    stack = []
    if draw(st.booleans()):
        bn = {
            "center": draw(st.booleans()),
            "scale": draw(st.booleans()),
            "epsilon": draw(st.sampled_from([1e-3, 1e-1])),
            "momentum": draw(st.sampled_from([0.9, 0.99])),
            "beta_initializer": "random_normal",
            "gamma_initializer": "random_normal",
            "moving_mean_initializer": "random_normal",
            "moving_variance_initializer": "ones",
        }
        stack.append((layers.BatchNormalization, bn))
    if draw(st.booleans()):
        stack.append((layers.Dropout, {"rate": draw(st.sampled_from([0.2, 0.5]))}))
    return stack


@st.composite
def conv_block(draw, size: tuple[int, int, int]):
    """A Conv2D (and maybe a pooling layer) that fits an input of ``size``; new size after."""
    h, w, _ = size
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    strides = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (1, 1) if strides != (1, 1) else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    padding = draw(st.sampled_from(["valid", "same"])) if span[0] <= h and span[1] <= w else "same"
    conv = (
        layers.Conv2D,
        {
            "filters": draw(st.integers(1, 3)),
            "kernel_size": kernel,
            "strides": strides,
            "padding": padding,
            "dilation_rate": dilation,
            "activation": draw(st.sampled_from(ACTIVATIONS)),
            "use_bias": draw(st.booleans()),
            "bias": draw(st.sampled_from(["tied", "untied"])),
        },
    )
    out = _output_shape(conv, size)
    stack = [conv, *draw(normalization_or_dropout())]
    if draw(st.booleans()):  # a residual conv: same padding, stride 1, as many filters as channels
        same = {"kernel_size": draw(st.integers(1, 3)), "padding": "same", "filters": out[2]}
        residual = [(layers.Conv2D, {**same, "activation": draw(st.sampled_from(ACTIVATIONS))})]
        stack.append(("residual", residual + draw(normalization_or_dropout())))
    if draw(st.booleans()) and min(out[:2]) >= 2:
        pool_class = draw(st.sampled_from([layers.MaxPooling2D, layers.AveragePooling2D]))
        pool = (
            pool_class,
            {
                "pool_size": draw(st.integers(1, 2)),
                "strides": draw(st.integers(1, 2)),
                "padding": draw(st.sampled_from(["valid", "same"])),
            },
        )
        out = _output_shape(pool, out)
        stack.append(pool)
    return stack, out


@st.composite
def networks(draw):
    """``(input shape, [(layer class, kwargs)], loss, x, y)``: a random stack, a random Table 1
    loss and matching labels. Layers are built in the test, not here: their initializers draw
    from Python's ``random``, which hypothesis strategies must not."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    stack = []
    if draw(st.booleans()):
        size = (draw(st.integers(3, 7)), draw(st.integers(3, 7)), draw(st.integers(1, 3)))
        input_shape = size
        for _ in range(draw(st.integers(1, 2))):
            block, size = draw(conv_block(size))
            stack += block
        stack.append((layers.Flatten, {}))
    else:
        input_shape = (draw(st.integers(1, 6)),)
    width = int(np.prod(size)) if len(input_shape) == 3 else input_shape[0]
    for _ in range(draw(st.integers(0, 2))):
        residual = draw(st.booleans())
        dense = {
            "units": width if residual else draw(st.integers(1, 5)),
            "activation": draw(st.sampled_from(ACTIVATIONS)),
            "use_bias": draw(st.booleans()),
        }
        block = [(layers.Dense, dense), *draw(normalization_or_dropout())]
        stack += [("residual", block)] if residual else block
        width = dense["units"]
        if draw(st.booleans()):
            stack.append(
                (layers.Activation, {"activation": draw(st.sampled_from(ACTIVATIONS[1:]))})
            )
    n_out = draw(st.integers(2, 4))
    kind = draw(st.sampled_from(["scce", "cce_probs", "bce", "se", "mse"]))
    training = draw(st.booleans())
    # Batch statistics of 1 or 2 samples are degenerate (the centred, normalized batch is 0 or
    # +-1): the Jacobian is ~0 and both routes return rounding noise, so train-mode BN gets 3+.
    batch_norm = any(c is layers.BatchNormalization for c, _ in _flat(stack))
    batch = draw(st.integers(3, 4) if training and batch_norm else st.integers(1, 3))
    if kind == "scce":
        loss = losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
        y = rng.integers(0, n_out, size=batch)
    elif kind == "cce_probs":
        loss = losses.CategoricalCrossentropy(dtype=F64)
        y = np.eye(n_out)[rng.integers(0, n_out, size=batch)]
    elif kind == "bce":
        loss = losses.BinaryCrossentropy(from_logits=True, dtype=F64)
        y = rng.uniform(size=(batch, n_out))
    else:
        loss = (
            losses.SquaredError(dtype=F64) if kind == "se" else losses.MeanSquaredError(dtype=F64)
        )
        y = rng.normal(size=(batch, n_out))
    stack.append((layers.Dense, {"units": n_out}))
    if kind == "cce_probs":
        stack.append((layers.Softmax, {}))
    x = rng.normal(size=(batch, *input_shape))
    return input_shape, stack, loss, training, tf.constant(x), tf.constant(y)


def _flat(stack: list) -> list:
    """The ``(class, kwargs)`` specs of ``stack``, residual blocks opened."""
    return [s for spec in stack for s in (spec[1] if spec[0] == "residual" else [spec])]


def _build(input_shape: tuple, stack: list) -> keras.Model:
    """A functional model of the specs: ``("residual", block)`` is ``Add()([block(h), h])``."""
    x = keras.Input(input_shape, dtype=F64)
    h = x
    for cls, kwargs in stack:
        if cls == "residual":
            r = h
            for block_cls, block_kwargs in kwargs:
                r = block_cls(**block_kwargs, dtype=F64)(r)
            h = layers.Add(dtype=F64)([r, h])
        else:
            h = cls(**kwargs, dtype=F64)(h)
    return keras.Model(x, h)


def _gradients(model, loss, x, y, training: bool, reference: bool):
    """Gradients with respect to ``x`` and the weights; the model's state (moving statistics,
    dropout's seed) is put back afterwards, so both routes see the same masks."""
    state = [(v, tf.identity(v.value)) for v in model.non_trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(x)
        if reference:
            with tf_jacbp.reference_mode():
                value = loss(y, model(x, training=training))
        else:
            value = loss(y, model(x, training=training))
    grads = tape.gradient(value, [x, *model.trainable_variables])
    for v, value in state:
        v.assign(value)
    return grads


# The loaded profile can only raise the count: --hypothesis-profile=long draws 2,000.
@settings(
    max_examples=max(MODELS_PER_RUN, settings.default.max_examples),
    suppress_health_check=[HealthCheck.too_slow],
)
@given(networks())
def check_generated_model(case):
    """One drawn model: the Jacobian route's gradients (input and weights) equal the reference
    route's in float64."""
    input_shape, stack, loss, training, x, y = case
    model = _build(input_shape, stack)
    layer_list = model.layers[1:]
    GENERATED.append([type(layer).__name__ for layer in layer_list] + [f"training={training}"])
    ours = _gradients(model, loss, x, y, training, reference=False)
    refs = _gradients(model, loss, x, y, training, reference=True)
    names = ["input", *(v.path for v in model.trainable_variables)]
    # A gradient that is zero in exact arithmetic (a bias feeding a train-mode
    # BatchNormalization) is rounding noise in both routes: measured against the noise floor of
    # the largest gradient, as GradientCheck does (tolerances.NOISE_FLOOR).
    scale = max(float(tf.norm(r)) for r in refs)
    for g, r, name in zip(ours, refs, names, strict=True):
        err = tolerances.relative_error_from_norms(tf.norm(g - r), tf.norm(r), F64, scale)
        assert err <= tolerances.rtol(F64), (
            f"{name}: relative error {err:.3g} in {[layer.name for layer in model.layers]}"
        )


@pytest.mark.slow
def test_generated_models_match_the_reference_route_and_cover_every_layer_type():
    """Every drawn model agrees (``check_generated_model``, run here), and together they number
    at least 200 and cover every layer type: one test, so the count is this process's whatever
    the order of the tests or the worker that runs them."""
    GENERATED.clear()
    check_generated_model()
    assert len(GENERATED) >= 200, f"only {len(GENERATED)} generated models were checked"
    seen = {name for names in GENERATED for name in names}
    expected = {
        "Conv2D",
        "MaxPooling2D",
        "AveragePooling2D",
        "Flatten",
        "Dense",
        "Activation",
        "Softmax",
        "Add",
        "BatchNormalization",
        "Dropout",
        "training=True",
        "training=False",
    }
    assert expected <= seen, f"never generated: {expected - seen}"
