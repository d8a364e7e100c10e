"""Generated configurations: random stacks of every tf_jacbp layer with a random Table 1 loss,
each checked against the reference route with tf.GradientTape in float64 (<= 1e-12 relative).

The "ci" hypothesis profile (tests/conftest.py) draws MODELS_PER_RUN models with a fixed seed;
``pytest --hypothesis-profile=long tests/test_generated.py`` draws many more.
"""

import keras
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_jacbp
from tf_jacbp import layers, losses, toeplitz, tolerances

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
    hw = [toeplitz.output_size(size[i], k[i], s[i], kw["padding"], d[i]) for i in range(2)]
    return (*hw, kw.get("filters", size[2]))


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
    stack = [conv]
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
    for _ in range(draw(st.integers(0, 2))):
        dense = {
            "units": draw(st.integers(1, 5)),
            "activation": draw(st.sampled_from(ACTIVATIONS)),
            "use_bias": draw(st.booleans()),
        }
        stack.append((layers.Dense, dense))
        if draw(st.booleans()):
            stack.append(
                (layers.Activation, {"activation": draw(st.sampled_from(ACTIVATIONS[1:]))})
            )
    n_out = draw(st.integers(2, 4))
    kind = draw(st.sampled_from(["scce", "cce_probs", "bce", "se", "mse"]))
    batch = draw(st.integers(1, 3))
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
    return input_shape, stack, loss, tf.constant(x), tf.constant(y)


def _gradients(model, loss, x, y, reference: bool):
    with tf.GradientTape() as tape:
        tape.watch(x)
        if reference:
            with tf_jacbp.reference_mode():
                value = loss(y, model(x))
        else:
            value = loss(y, model(x))
    return tape.gradient(value, [x, *model.trainable_variables])


# The loaded profile can only raise the count: --hypothesis-profile=long draws 2,000.
@settings(
    max_examples=max(MODELS_PER_RUN, settings.default.max_examples),
    suppress_health_check=[HealthCheck.too_slow],
)
@given(networks())
def test_generated_model_matches_reference_route(case):
    input_shape, stack, loss, x, y = case
    layer_list = [cls(**kwargs, dtype=F64) for cls, kwargs in stack]
    model = keras.Sequential([keras.Input(input_shape, dtype=F64), *layer_list])
    GENERATED.append([type(layer).__name__ for layer in layer_list])
    ours = _gradients(model, loss, x, y, reference=False)
    refs = _gradients(model, loss, x, y, reference=True)
    names = ["input", *(v.path for v in model.trainable_variables)]
    for g, r, name in zip(ours, refs, names, strict=True):
        err = tolerances.relative_error(g, r)
        assert err <= tolerances.rtol(F64), (
            f"{name}: relative error {err:.3g} in {[layer.name for layer in model.layers]}"
        )


def test_at_least_200_models_covering_every_layer_type_were_checked():
    """Runs after the property above (file order): the count and the coverage it reached."""
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
    }
    assert expected <= seen, f"never generated: {expected - seen}"
