"""Per-example gradient norms from the layers' factors (issue 16), against the norms of the
materialized ``per_example_gradients`` in float64 (<= 1e-12 relative), on hypothesis-drawn MLPs
and convnets, with the norm formulas' two conv forms and the fallback exercised on purpose."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tf_jacbp import jacobian, layers, losses, models, tolerances
from tf_jacbp.layers.base import patch_product_squared_norms

F64 = "float64"
RTOL64 = tolerances.rtol(F64)
ACTIVATIONS = [None, "relu", "tanh", "elu", "softplus"]


def reference_norms(model, x, y, loss):
    """``(whole (batch,), per variable (batch, n_vars))`` from the materialized gradients."""
    grads = jacobian.per_example_gradients(model, x, y, loss=loss, flatten=False)
    per_variable = np.stack(
        [np.linalg.norm(np.reshape(g, (len(x), -1)), axis=1) for g in grads], axis=1
    )
    return np.linalg.norm(per_variable, axis=1), per_variable


def assert_norms_match(model, x, y, loss, whole_too=True):
    """Both results of ``per_example_gradient_norms`` (the whole norm only with ``whole_too``:
    each is one more compiled function) against the materialized gradients' norms."""
    whole, per_variable = reference_norms(model, x, y, loss)
    ours_v = jacobian.per_example_gradient_norms(model, x, y, loss=loss, per_variable=True).numpy()
    if whole_too:
        ours = jacobian.per_example_gradient_norms(model, x, y, loss=loss).numpy()
    else:
        ours = np.sqrt(np.sum(ours_v**2, axis=1))
    assert ours.shape == whole.shape and ours_v.shape == per_variable.shape
    scale = float(np.max(whole))
    for i in range(len(x)):
        err = tolerances.relative_error_from_norms(abs(ours[i] - whole[i]), whole[i], F64, scale)
        assert err <= RTOL64, f"sample {i}: {ours[i]} vs {whole[i]} (relative error {err:.3g})"
        diff = np.abs(ours_v[i] - per_variable[i])
        for j, name in enumerate(v.path for v in jacobian.parameter_variables(model)):
            err = tolerances.relative_error_from_norms(diff[j], per_variable[i, j], F64, scale)
            assert err <= RTOL64, f"sample {i}, {name}: relative error {err:.3g}"


@st.composite
def conv_spec(draw, size):
    """A Conv2D's kwargs that fit an input of ``size`` (H, W, C), and its output size."""
    h, w, _ = size
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    strides = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.sampled_from(["valid", "same"]))
    if kernel[0] > h or kernel[1] > w:
        padding = "same"
    kwargs = {
        "filters": draw(st.integers(1, 8)),
        "kernel_size": kernel,
        "strides": strides,
        "padding": padding,
        "activation": draw(st.sampled_from(ACTIVATIONS)),
        "use_bias": draw(st.booleans()),
        "bias": draw(st.sampled_from(["tied", "untied"])),
    }
    if padding == "same":
        out = (-(-h // strides[0]), -(-w // strides[1]))
    else:
        out = ((h - kernel[0]) // strides[0] + 1, (w - kernel[1]) // strides[1] + 1)
    return kwargs, (*out, kwargs["filters"])


@st.composite
def networks(draw):
    """``(input shape, build(), loss, x, y)``: an MLP or a convnet of tf_jacbp layers, possibly
    with a residual Add, an inference-mode BatchNormalization, pooling and a shared Dense."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    plan = []
    if draw(st.booleans()):
        size = (draw(st.integers(3, 7)), draw(st.integers(3, 7)), draw(st.integers(1, 3)))
        input_shape = size
        for _ in range(draw(st.integers(1, 2))):
            kwargs, size = draw(conv_spec(size))
            plan.append(("conv", kwargs))
            if draw(st.booleans()):
                plan.append(("bn", {}))
            if draw(st.booleans()):  # residual: same-size conv added to its input
                plan.append(("residual", {"filters": size[2], "kernel_size": 3, "padding": "same"}))
            if draw(st.booleans()) and min(size[:2]) >= 2:
                pool = draw(st.sampled_from(["max", "average"]))
                plan.append((pool, {"pool_size": 2, "strides": 1, "padding": "valid"}))
                size = (size[0] - 1, size[1] - 1, size[2])
        plan.append(("flatten", {}))
    else:
        input_shape = (draw(st.integers(1, 6)),)
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["dense", "shared", "bn"]))
        units = draw(st.integers(1, 5))
        plan.append((kind, {"units": units, "activation": draw(st.sampled_from(ACTIVATIONS))}))
    n_out = draw(st.integers(2, 4))
    batch = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["scce", "mse", "bce"]))
    if kind == "scce":
        loss = losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
        y = rng.integers(0, n_out, size=batch)
    elif kind == "mse":
        loss = losses.MeanSquaredError(dtype=F64)
        y = rng.normal(size=(batch, n_out))
    else:
        loss = losses.BinaryCrossentropy(from_logits=True, dtype=F64)
        y = rng.uniform(size=(batch, n_out))
    x = rng.normal(size=(batch, *input_shape))
    return input_shape, plan, n_out, loss, tf.constant(x), tf.constant(y), rng


def build(input_shape, plan, n_out, rng) -> keras.Model:
    x = keras.Input(input_shape, dtype=F64)
    h = x
    for kind, kwargs in plan:
        if kind == "conv":
            h = layers.Conv2D(**kwargs, dtype=F64)(h)
        elif kind == "residual":
            h = layers.Add(dtype=F64)([layers.Conv2D(**kwargs, dtype=F64)(h), h])
        elif kind == "bn":
            bn = layers.BatchNormalization(dtype=F64)
            h = bn(h)
            # Moving statistics away from (0, 1), so the inference map is not the identity.
            channels = h.shape[-1]
            bn.moving_mean.assign(rng.normal(size=channels))
            bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=channels))
            bn.gamma.assign(rng.normal(size=channels))
        elif kind in ("max", "average"):
            pool = layers.MaxPooling2D if kind == "max" else layers.AveragePooling2D
            h = pool(**kwargs, dtype=F64)(h)
        elif kind == "flatten":
            h = layers.Flatten(dtype=F64)(h)
        elif kind == "dense":
            h = layers.Dense(**kwargs, dtype=F64)(h)
        elif kind == "shared":  # one layer called twice: its per-example rows add up
            shared = layers.Dense(h.shape[-1], activation=kwargs["activation"], dtype=F64)
            h = shared(shared(h))
    return keras.Model(x, layers.Dense(n_out, dtype=F64)(h))


@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(networks())
def test_norms_match_materialized_per_example_gradients(case):
    input_shape, plan, n_out, loss, x, y, rng = case
    model = build(input_shape, plan, n_out, rng)
    # The compiled function's tracing, not the formulas, would take most of the time on these
    # tiny models; the paper models below run it compiled.
    tf.config.run_functions_eagerly(True)
    try:
        assert_norms_match(model, x, y, loss, whole_too=False)
    finally:
        tf.config.run_functions_eagerly(False)


@pytest.mark.parametrize(
    "make, whole_too",
    [(models.lenet_100_300_10, True), (models.resnet_mnist, False)],
    ids=["lenet-100-300-10", "resnet (BN inference, Add, Dropout)"],
)
def test_paper_models_match_in_float64(make, whole_too):
    keras.config.set_dtype_policy(F64)
    model = make()
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(3, *model.inputs[0].shape[1:]))
    y = rng.integers(0, 10, size=3)
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    assert_norms_match(model, x, y, loss, whole_too=whole_too)


@pytest.mark.parametrize(
    "positions, m, f, form",
    [(4, 27, 8, "gram"), (50, 9, 4, "outer"), (1, 3, 3, "gram")],
)
def test_patch_product_norms_both_forms(positions, m, f, form):
    """The Gram form ``<A A^T, D D^T>`` and the outer form ``||A^T D||^2`` against NumPy."""
    assert (positions * (m + f) < m * f) == (form == "gram")
    rng = np.random.default_rng(0)
    a, d = rng.normal(size=(3, positions, m)), rng.normal(size=(3, positions, f))
    expected = np.sum(np.einsum("bpm,bpf->bmf", a, d) ** 2, axis=(1, 2))
    np.testing.assert_allclose(patch_product_squared_norms(a, d), expected, rtol=RTOL64)


@pytest.mark.parametrize(
    "conv",
    [
        {"filters": 8, "kernel_size": 3},  # P = 4, M = 27: the Gram form
        {"filters": 2, "kernel_size": 2, "strides": 2, "padding": "same", "bias": "untied"},
        {"filters": 3, "kernel_size": 3, "dilation_rate": 2, "padding": "same"},
    ],
    ids=["gram", "outer, strided, untied bias", "outer, dilated"],
)
def test_conv_norm_formula_against_its_per_example_rows(conv):
    layer = layers.Conv2D(**conv, dtype=F64)
    layer.build((None, 4, 4, 3))
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(3, 4, 4, 3)))
    params = layer.read_parameters()
    dz = tf.constant(rng.normal(size=(3, *layer.conv_index.output_shape)))
    _, rows = layer.per_example_backward(dz, x, None, *params)
    expected = [np.sum(np.reshape(g, (3, -1)) ** 2, axis=1) for g in rows]
    ours = layer.per_example_squared_norms(dz, x, None, *params)
    assert len(ours) == len(expected) == 2
    for a, b in zip(ours, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL64)


def test_dense_norm_formula_on_rank_3_inputs():
    """``||A_i^T Delta_i||^2`` and ``||Delta_i^T 1||^2`` when the kernel acts at T positions."""
    layer = layers.Dense(4, dtype=F64)
    layer.build((None, 5))
    rng = np.random.default_rng(3)
    a, dz = rng.normal(size=(2, 6, 5)), rng.normal(size=(2, 6, 4))
    kernel_norms, bias_norms = layer.per_example_squared_norms(
        tf.constant(dz), tf.constant(a), None, *layer.read_parameters()
    )
    np.testing.assert_allclose(
        kernel_norms, np.sum(np.einsum("btn,btm->bnm", a, dz) ** 2, axis=(1, 2)), rtol=RTOL64
    )
    np.testing.assert_allclose(bias_norms, np.sum(dz.sum(axis=1) ** 2, axis=1), rtol=RTOL64)


class Scale(layers.JacobianLayer):
    """A user's layer with no norm formula: the base class' fallback must serve it."""

    def build(self, input_shape):
        self.s = self.add_weight(shape=(input_shape[-1],), initializer="random_normal")

    def jacobian_parameters(self):
        return [self.s]

    def forward(self, x, s):
        return x * s

    def reference(self, x, s):
        return tf.multiply(x, s)

    def vjp_input(self, m, x, y, s):
        return m * s

    def vjp_params(self, m, x, y, s, sum_batch=True):
        return [tf.einsum("vbd,bd->vd" if sum_batch else "vbd,bd->vbd", m, x)]


def test_layer_without_norm_formula_falls_back_to_its_rows():
    x_in = keras.Input((3,), dtype=F64)
    model = keras.Model(x_in, layers.Dense(2, dtype=F64)(Scale(dtype=F64)(x_in)))
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    assert_norms_match(model, x, y, losses.MeanSquaredError(dtype=F64))


def test_norms_graph_never_holds_a_per_example_kernel_gradient():
    """Compiled on LeNet-100-300-10, no tensor of the graph is as large as the batch's
    per-example gradients of the first kernel (batch x 784 x 100): they are never formed."""
    model = models.lenet_100_300_10()
    batch = 16
    x = tf.zeros((batch, 28, 28))
    y = tf.zeros((batch,), tf.int64)
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    fn = tf.function(
        lambda x, y: jacobian.per_example_gradient_norms(model, x, y, loss=loss), autograph=False
    )
    graph = fn.get_concrete_function(x, y).graph
    largest = max(
        int(np.prod(t.shape))
        for op in graph.get_operations()
        for t in op.outputs
        if t.shape.is_fully_defined()
    )
    assert largest < batch * 784 * 100 // 4, largest
    # The materialized route does form them: the same check there must fail.
    mat = tf.function(
        lambda x, y: jacobian.per_example_gradients(model, x, y, loss=loss, flatten=False),
        autograph=False,
    )
    graph = mat.get_concrete_function(x, y).graph
    assert (
        max(
            int(np.prod(t.shape))
            for op in graph.get_operations()
            for t in op.outputs
            if t.shape.is_fully_defined()
        )
        >= batch * 784 * 100
    )


def test_stock_keras_layer_is_refused_with_its_name():
    x_in = keras.Input((3,))
    model = keras.Model(x_in, keras.layers.Dense(2, name="stock_dense")(x_in))
    with pytest.raises(TypeError, match="stock_dense"):
        jacobian.per_example_gradient_norms(model, np.ones((2, 3)), np.ones((2, 2)), loss="mse")


def test_loss_without_per_sample_values_is_refused():
    model = models.mlp((3,), input_shape=(4,))

    def batch_mean(y, out):
        return tf.reduce_mean(tf.square(tf.cast(y, out.dtype) - out))

    with pytest.raises(ValueError, match="one value per sample"):
        jacobian.per_example_gradient_norms(
            model, np.ones((2, 4), "float32"), np.ones((2, 10), "float32"), batch_mean
        )
