"""The two ways to apply one ``T(K)`` agree (issue 23 item 2), on every backend.

``toeplitz="materialize"`` forms ``T(K)`` from its index maps and multiplies;
``toeplitz="implicit"`` applies the same Lemma 2-3 maps by convolution, transposed convolution
and the filter gradient (``tf_jacbp.toeplitz_implicit``). In float64 both give, to
``tolerances.rtol("float64")`` (1e-12), the forward pass, the input products for three stacked
vectors, the kernel and bias products summed over the batch (one vector: the filter gradient;
three: the patch product) and per sample, the per-example squared norms (Gram or outer form,
whichever the layer picks) and the parameter Jacobian's rows, on a list of configurations
(strides, both paddings, causal, dilation, untied bias, ``output_padding``, 1-D/2-D/3-D) and on
configurations drawn by hypothesis. Training gradients through the custom gradient agree too.

Neither side is stock autodiff here: the materialized route is the witness of the implicit
one (the issue's point: stock autodiff of a convolution runs the kernels the implicit route
calls). Each route is compared with stock autodiff in the layers' own tests.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from tf_jacbp import backend as tb
from tf_jacbp import toeplitz_implicit, tolerances
from tf_jacbp.layers import Conv1D, Conv2D, Conv2DTranspose, Conv3D

RTOL = tolerances.rtol("float64")

CASES = [
    (Conv2D, (7, 6, 3), {"filters": 2, "kernel_size": (2, 3), "strides": 2}),
    (Conv2D, (5, 6, 2), {"filters": 3, "kernel_size": 3, "padding": "same"}),
    (Conv2D, (7, 7, 2), {"filters": 2, "kernel_size": 3, "dilation_rate": 2, "padding": "same"}),
    (Conv2D, (7, 6, 3), {"filters": 2, "kernel_size": (2, 3), "strides": 2, "bias": "untied"}),
    (
        Conv2D,
        (8, 7, 2),
        {"filters": 2, "kernel_size": (3, 2), "strides": (2, 3), "padding": "same"},
    ),
    (Conv2D, (6, 4, 2), {"filters": 2, "kernel_size": (3, 1), "strides": 3, "use_bias": False}),
    (Conv2D, (3, 3, 4), {"filters": 8, "kernel_size": 3}),  # Gram form of the norms
    (Conv1D, (9, 2), {"filters": 3, "kernel_size": 3, "padding": "causal", "dilation_rate": 2}),
    (Conv1D, (9, 2), {"filters": 3, "kernel_size": 4, "padding": "same", "strides": 2}),
    (Conv1D, (8, 3), {"filters": 2, "kernel_size": 3, "strides": 3, "padding": "causal"}),
    (Conv1D, (7, 2), {"filters": 2, "kernel_size": 2, "bias": "untied"}),
    (
        Conv3D,
        (5, 4, 6, 2),
        {"filters": 2, "kernel_size": (2, 3, 2), "strides": (1, 2, 2), "padding": "same"},
    ),
    (Conv3D, (5, 6, 6, 2), {"filters": 2, "kernel_size": 2, "dilation_rate": 2}),
    (Conv2DTranspose, (3, 4, 2), {"filters": 3, "kernel_size": 3, "strides": 2, "padding": "same"}),
    (Conv2DTranspose, (3, 4, 2), {"filters": 3, "kernel_size": (2, 3), "strides": (2, 1)}),
    (
        Conv2DTranspose,
        (3, 4, 2),
        {"filters": 3, "kernel_size": 3, "strides": 2, "output_padding": 1},
    ),
    (
        Conv2DTranspose,
        (4, 4, 2),
        {"filters": 2, "kernel_size": 3, "dilation_rate": 2, "padding": "same"},
    ),
    (
        Conv2DTranspose,
        (3, 3, 2),
        {"filters": 2, "kernel_size": 4, "strides": 3, "padding": "same", "output_padding": 2},
    ),
]


def _pair(cls, input_shape, kwargs, seed=0):
    """The same layer on each route, float64, equal weights drawn from a standard normal."""
    layers = {}
    rng = np.random.default_rng(seed)
    for route in ("materialize", "implicit"):
        layer = cls(dtype="float64", toeplitz=route, **kwargs)
        layer.build((None, *input_shape))
        layers[route] = layer
    weights = [rng.normal(size=w.shape) for w in layers["materialize"].weights]
    for layer in layers.values():
        layer.set_weights(weights)
    return layers["materialize"], layers["implicit"]


def _products(layer, x, m):
    """Everything the contract derives from the layer, at ``x`` with ``V = 3`` vectors ``m``."""
    params = layer.read_parameters()
    y = layer.forward(x, *params)
    out = {"forward": y, "vjp_input": layer.vjp_input(m, x, y, *params)}
    for name, vectors, summed in (("one", m[:1], True), ("three", m, True), ("each", m, False)):
        for i, g in enumerate(layer.vjp_params(vectors, x, y, *params, sum_batch=summed)):
            out[f"vjp_params[{i}] {name}"] = g
    for i, s in enumerate(layer.per_example_squared_norms(m[0], x, y, *params)):
        out[f"squared_norms[{i}]"] = s
    rows = ops.moveaxis(m, 0, 1)  # (batch, 3, ...): three Jacobian rows per sample
    dx, dparams = layer.jacobian_rows(rows, x, y, *params)
    out["jacobian_rows x"] = dx
    for i, g in enumerate(dparams):
        out[f"jacobian_rows[{i}]"] = g
    return out


def assert_routes_agree(cls, input_shape, kwargs, seed=0):
    materialized, implicit = _pair(cls, input_shape, kwargs, seed)
    image = materialized.image(np.zeros((1, *input_shape)))
    assert materialized.route_for(image) == "materialize"
    assert implicit.route_for(image) == "implicit"
    rng = np.random.default_rng(seed + 1)
    x = ops.convert_to_tensor(rng.normal(size=(3, *input_shape)))
    out_shape = materialized.compute_output_shape((3, *input_shape))
    m = ops.convert_to_tensor(rng.normal(size=(3, *out_shape)))
    want, got = _products(materialized, x, m), _products(implicit, x, m)
    assert want.keys() == got.keys()
    for name in want:
        assert tuple(got[name].shape) == tuple(want[name].shape), name
        error = tolerances.relative_error(got[name], want[name])
        assert error <= RTOL, f"{cls.__name__} {kwargs}: {name} differs by {error:.1e}"


@pytest.mark.parametrize("cls, input_shape, kwargs", CASES)
def test_implicit_equals_materialized(cls, input_shape, kwargs):
    """Forward, input products, kernel and bias products (summed and per sample), squared norms
    and parameter Jacobian rows, to 1e-12."""
    tb.require_float64("the routes' float64 agreement")
    assert_routes_agree(cls, input_shape, kwargs)


@st.composite
def conv_configs(draw):
    """A convolution of any rank (or a transposed one) with its input shape."""
    kind = draw(st.sampled_from(["Conv1D", "Conv2D", "Conv3D", "Conv2DTranspose"]))
    rank = {"Conv1D": 1, "Conv2D": 2, "Conv3D": 3, "Conv2DTranspose": 2}[kind]
    paddings = ["valid", "same", "causal"] if kind == "Conv1D" else ["valid", "same"]
    padding = draw(st.sampled_from(paddings))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilated = draw(st.booleans())
    strides = (1,) * rank if dilated else tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank)) if dilated else (1,) * rank
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    low = 2 if rank == 3 else 3
    sizes = tuple(draw(st.integers(max(low, e), max(low, e) + 3)) for e in extent)
    channels, filters = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kwargs = {
        "filters": filters,
        "kernel_size": kernel,
        "strides": strides,
        "padding": padding,
        "dilation_rate": dilation,
        "use_bias": draw(st.booleans()),
    }
    if kind in ("Conv1D", "Conv2D") and kwargs["use_bias"] and draw(st.booleans()):
        kwargs["bias"] = "untied"
    if kind == "Conv2DTranspose" and padding == "valid" and max(strides) > 1:
        kwargs["output_padding"] = tuple(draw(st.integers(0, s - 1)) for s in strides)
    cls = {"Conv1D": Conv1D, "Conv2D": Conv2D, "Conv3D": Conv3D}.get(kind, Conv2DTranspose)
    return cls, (*sizes, channels), kwargs


@settings(max_examples=25, deadline=None)
@given(conv_configs(), st.integers(0, 2**16))
def test_implicit_equals_materialized_on_drawn_configurations(config, seed):
    tb.require_float64("the routes' float64 agreement")
    cls, input_shape, kwargs = config
    assert_routes_agree(cls, input_shape, kwargs, seed)


@pytest.mark.parametrize("cls, input_shape, kwargs", [CASES[1], CASES[7], CASES[13]])
def test_training_gradients_agree_through_the_custom_gradient(cls, input_shape, kwargs):
    """``layer(x)`` under the backend's autodiff runs each route's custom gradient: the input and
    weight gradients of ``sum(u * layer(x))`` agree."""
    tb.require_float64("the routes' float64 agreement")
    materialized, implicit = _pair(cls, input_shape, {**kwargs, "activation": "tanh"})
    rng = np.random.default_rng(5)
    x = ops.convert_to_tensor(rng.normal(size=(2, *input_shape)))
    u = ops.convert_to_tensor(rng.normal(size=materialized.compute_output_shape(x.shape)))

    def gradients(layer):
        def loss(x, *weights):
            y, _ = layer.stateless_call(list(weights), [], x)
            return ops.sum(u * y)

        weights = [ops.convert_to_tensor(w.value) for w in layer.trainable_variables]
        return tb.value_and_gradients(loss, [x, *weights])

    (value_m, grads_m), (value_i, grads_i) = gradients(materialized), gradients(implicit)
    assert tolerances.relative_error(value_i, value_m) <= RTOL
    for got, want in zip(grads_i, grads_m, strict=True):
        assert tolerances.relative_error(got, want) <= RTOL


def test_auto_materializes_a_small_t_and_applies_a_large_one_implicitly():
    """The default ``toeplitz="auto"``: ``T(K)`` of at most ``MATERIALIZE_MAX_BYTES`` is formed;
    a larger one (LeNet-5's first layer: 4704 x 784 float32, 14 MiB) is applied implicitly and
    never guarded, so a layer whose dense ``T(K)`` is 1 GiB builds under the default budget,
    where ``toeplitz="materialize"`` is refused with the guard's error."""
    small = Conv2D(2, 3)
    small.build((None, 8, 8, 1))
    assert small.toeplitz == "auto" and small.route_for(np.zeros((1, 8, 8, 1))) == "materialize"
    lenet = Conv2D(6, 5, padding="same")
    lenet.build((None, 28, 28, 1))
    assert lenet.route_for(np.zeros((1, 28, 28, 1))) == "implicit"
    assert lenet.conv_index.dense_bytes("float32") > toeplitz_implicit.MATERIALIZE_MAX_BYTES
    wide = Conv2D(16, 3, padding="same")  # ResNet-20's first stage: T(K) 16384 x 16384
    wide.build((None, 32, 32, 16))
    assert wide.route_for(np.zeros((1, 32, 32, 16))) == "implicit" and not wide.sparse_toeplitz
    with pytest.raises(ValueError, match="toeplitz_budget_bytes"):
        Conv2D(16, 3, padding="same", toeplitz="materialize").build((None, 32, 32, 16))


def test_a_bad_route_names_the_argument():
    with pytest.raises(ValueError, match=r"toeplitz must be one of .*toeplitz='dense'"):
        Conv2D(2, 3, toeplitz="dense")
    with pytest.raises(ValueError, match=r"toeplitz must be one of"):
        Conv2DTranspose(2, 3, toeplitz=None)


def test_the_route_round_trips_through_get_config():
    layer = Conv1D(2, 3, toeplitz="implicit")
    assert layer.get_config()["toeplitz"] == "implicit"
    assert Conv1D.from_config(layer.get_config()).toeplitz == "implicit"


@pytest.mark.parametrize("cls, input_shape, kwargs", [CASES[1], CASES[8], CASES[13]])
def test_unknown_sizes_take_the_implicit_route_with_the_same_products(
    backend, cls, input_shape, kwargs
):
    """A TensorFlow graph traced for unknown spatial sizes: ``"auto"`` applies ``T(K)``
    implicitly (no run-time index maps, no run-time memory guard); ``"materialize"`` computes the
    maps when the graph runs. Both give the same output and gradients."""
    if backend != "tensorflow":
        pytest.skip("JAX traces every size as static: a graph of unknown sizes is TensorFlow's")
    import tensorflow as tf

    materialized, implicit = _pair(cls, input_shape, kwargs)
    auto = cls(dtype="float64", **kwargs)
    auto.build((None, *input_shape))
    auto.set_weights(materialized.get_weights())
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(2, *input_shape)))
    spec = tf.TensorSpec((None, *(None,) * (len(input_shape) - 1), input_shape[-1]), "float64")
    upstream = tf.constant(rng.normal(size=materialized.compute_output_shape(x.shape)))

    def traced(layer):
        @tf.function(input_signature=[spec])
        def run(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(upstream * layer(x))
            return tape.gradient(loss, [x, *layer.trainable_variables])

        return run(x)

    assert auto.route_for(tf.keras.Input(spec.shape[1:], dtype="float64")) == "implicit"
    want = traced(materialized)
    for layer in (implicit, auto):
        for got, expected in zip(traced(layer), want, strict=True):
            assert tolerances.relative_error(got, expected) <= RTOL
