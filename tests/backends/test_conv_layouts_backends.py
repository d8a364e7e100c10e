"""``data_format="channels_first"`` and ``groups > 1`` on the convolutions (issue 23 item 4), on
the backend this run uses (TensorFlow or JAX), on both routes (``toeplitz="materialize"`` and
``"implicit"``).

The witnesses, each independent of the layer's code:

* stock Keras (``keras.layers.Conv1D/2D/3D/Conv2DTranspose`` with the same weights) and its
  autodiff, in float64, to ``tolerances.rtol("float64")`` (1e-12). On JAX the stock layer runs
  channels_first itself; TensorFlow's CPU kernels refuse channels_first (``Conv2D`` "only
  supports the NHWC tensor format on the CPU"), so there the witness is the stock channels_last
  layer between two transposes (the issue's permute, stock, permute back). Stock grouped
  convolution is Keras' own (``feature_group_count`` on JAX; on TensorFlow's CPU Keras compiles
  it with XLA), float64 on both, and a second witness for ``groups`` is the stock ungrouped
  convolution of the block-diagonal kernel (zeros between groups) built here in NumPy.
* The materialized route and the implicit route against each other (forward, three stacked
  input products, kernel and bias products summed and per sample, squared norms, Jacobian
  rows).
* ``tf_jacbp.testing.check_layer`` (autodiff through the reference route, finite differences,
  the per-example rows and the contract; every mode for one configuration).
* The Jacobians of a channels_first layer are those of the same channels_last layer with rows
  and columns permuted (``vec`` of the sample as the layer sees it); with groups ``T(K)`` has
  zeros between groups.
* ``GradientCheck`` in ``model.fit`` of a small channels_first, grouped CNN.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from tf_jacbp import backend as tb
from tf_jacbp import layers, losses, tolerances
from tf_jacbp.callbacks import REFERENCE, GradientCheck
from tf_jacbp.testing import check_layer

RTOL = tolerances.rtol("float64")
ROUTES = ("materialize", "implicit")
CF = {"data_format": "channels_first"}

CASES = {  # name: (class, input shape in the layer's layout, arguments)
    "2d-first-strided": (
        layers.Conv2D,
        (4, 5, 6),
        {**CF, "filters": 3, "kernel_size": (2, 3), "strides": 2},
    ),
    "2d-first-dilated-untied": (
        layers.Conv2D,
        (3, 6, 5),
        {
            **CF,
            "filters": 2,
            "kernel_size": 3,
            "padding": "same",
            "dilation_rate": 2,
            "bias": "untied",
        },
    ),
    "2d-groups2-same": (
        layers.Conv2D,
        (7, 6, 4),
        {"filters": 6, "kernel_size": 3, "strides": (2, 1), "padding": "same", "groups": 2},
    ),
    "2d-depthwise-dilated-untied": (
        layers.Conv2D,
        (6, 6, 4),
        {"filters": 8, "kernel_size": 3, "dilation_rate": 2, "groups": 4, "bias": "untied"},
    ),
    "2d-first-groups2": (
        layers.Conv2D,
        (4, 7, 6),
        {**CF, "filters": 4, "kernel_size": 2, "strides": 2, "padding": "same", "groups": 2},
    ),
    "1d-groups2-causal-dilated": (
        layers.Conv1D,
        (9, 4),
        {"filters": 4, "kernel_size": 3, "padding": "causal", "dilation_rate": 2, "groups": 2},
    ),
    "1d-first-depthwise-causal": (
        layers.Conv1D,
        (3, 10),
        {**CF, "filters": 6, "kernel_size": 3, "strides": 2, "padding": "causal", "groups": 3},
    ),
    "1d-first-same-untied": (
        layers.Conv1D,
        (4, 9),
        {**CF, "filters": 2, "kernel_size": 4, "padding": "same", "bias": "untied"},
    ),
    "3d-first-same": (
        layers.Conv3D,
        (3, 5, 4, 3),
        {**CF, "filters": 2, "kernel_size": 2, "strides": (1, 2, 1), "padding": "same"},
    ),
    "3d-first-groups2": (
        layers.Conv3D,
        (4, 4, 3, 4),
        {**CF, "filters": 2, "kernel_size": 2, "groups": 2, "use_bias": False},
    ),
    "3d-groups2": (layers.Conv3D, (4, 5, 3, 4), {"filters": 4, "kernel_size": 2, "groups": 2}),
    "transpose-first-same": (
        layers.Conv2DTranspose,
        (2, 3, 4),
        {**CF, "filters": 3, "kernel_size": 3, "strides": 2, "padding": "same"},
    ),
    "transpose-first-output-padding": (
        layers.Conv2DTranspose,
        (3, 3, 3),
        {**CF, "filters": 2, "kernel_size": (2, 3), "strides": (2, 1), "output_padding": (1, 0)},
    ),
}


def _first(kwargs: dict) -> bool:
    return kwargs.get("data_format") == "channels_first"


def _layer(cls, input_shape, kwargs, route, seed=0):
    """``cls(**kwargs)`` on ``route``, float64, built, weights from a standard normal."""
    layer = cls(dtype="float64", toeplitz=route, **kwargs)
    layer.build((None, *input_shape))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(size=w.shape) for w in layer.weights])
    return layer


def _to_last(t: np.ndarray, first: bool) -> np.ndarray:
    return np.moveaxis(t, 1, -1) if first else t


def _block_diagonal(kernel: np.ndarray, groups: int) -> np.ndarray:
    """``(*k, C/G, F)`` -> ``(*k, C, F)``, zero where channel and filter are in other groups."""
    *k, c, f = kernel.shape
    dense = np.zeros((*k, c * groups, f))
    for g in range(groups):
        block = slice(g * (f // groups), (g + 1) * (f // groups))
        dense[..., g * c : (g + 1) * c, block] = kernel[..., block]
    return dense


def _blocks(dense: np.ndarray, groups: int) -> np.ndarray:
    """The inverse of ``_block_diagonal``: ``(*k, C, F)`` -> the ``(*k, C/G, F)`` entries in
    the groups' blocks."""
    c, f = dense.shape[-2] // groups, dense.shape[-1] // groups
    return np.concatenate(
        [dense[..., g * c : (g + 1) * c, g * f : (g + 1) * f] for g in range(groups)], axis=-1
    )


def _stock(cls, kwargs, permute, kernel, groups_dense=False):
    """The stock layer without a bias and its kernel: channels_last when ``permute`` (the
    caller transposes around it), grouped as ``kwargs`` say, or with ``groups_dense`` the
    ungrouped layer of the block-diagonal kernel."""
    stock_kwargs = {k: v for k, v in kwargs.items() if k not in ("bias", "use_bias")}
    if permute:
        stock_kwargs["data_format"] = "channels_last"
    if groups_dense:
        kernel = _block_diagonal(kernel, stock_kwargs.pop("groups"))
    stock = getattr(keras.layers, cls.__name__)(dtype="float64", use_bias=False, **stock_kwargs)
    return stock, kernel


def _maybe_last(x, permute):
    return ops.transpose(x, [0, *range(2, len(x.shape)), 1]) if permute else x


def _maybe_first(y, permute):
    return ops.transpose(y, [0, len(y.shape) - 1, *range(1, len(y.shape) - 1)]) if permute else y


def _bias_broadcast(bias, kwargs, ndim):
    """A tied bias ``(F,)`` on the channel axis of the layout; an untied one has the output's
    shape already."""
    if kwargs.get("bias") != "untied" and _first(kwargs):
        return ops.reshape(bias, (1, -1) + (1,) * (ndim - 2))
    return bias


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_equal_stock(backend, name, route):
    """Output, and the gradients of ``sum(u * y)`` for the input, the kernel and the bias,
    equal stock Keras' (and its autodiff) to 1e-12 in float64; grouped, also the stock
    ungrouped convolution of the block-diagonal kernel."""
    tb.require_float64("the float64 comparison with stock Keras")
    assert_equals_stock(*CASES[name], route, backend, name)


def assert_equals_stock(cls, input_shape, kwargs, route, backend, name, seed=0):
    """The output and the gradients of ``sum(u * y)`` (input, kernel, bias) equal stock's."""
    layer = _layer(cls, input_shape, kwargs, route, seed)
    rng = np.random.default_rng(seed + 1)
    x = ops.convert_to_tensor(rng.normal(size=(2, *input_shape)))
    u = ops.convert_to_tensor(rng.normal(size=layer.compute_output_shape(tuple(x.shape))))
    weights = [ops.convert_to_tensor(w.value) for w in layer.trainable_variables]

    def ours(x, *weights):
        y, _ = layer.stateless_call(list(weights), [], x)
        return ops.sum(u * y)

    _, grads = tb.value_and_gradients(ours, [x, *weights])
    y = layer.stateless_call(weights, [], x)[0]
    permute = _first(kwargs) and backend == "tensorflow"
    witnesses = [False] + ([True] if kwargs.get("groups", 1) > 1 else [])
    for dense in witnesses:
        kernel = ops.convert_to_numpy(weights[0])
        stock, stock_kernel = _stock(cls, kwargs, permute, kernel, dense)
        stock.build(tuple(_to_last(np.zeros((2, *input_shape)), permute).shape))
        stock.set_weights([stock_kernel])

        def stock_output(x, kernel, *bias, stock=stock):
            y, _ = stock.stateless_call([kernel], [], _maybe_last(x, permute))
            y = _maybe_first(y, permute)
            return y + _bias_broadcast(bias[0], kwargs, len(y.shape)) if bias else y

        stock_weights = [ops.convert_to_tensor(stock_kernel), *weights[1:]]
        want = tb.value_and_gradients(
            lambda *t: ops.sum(u * stock_output(*t)), [x, *stock_weights]
        )[1]
        what = f"{name} on {route} ({'block-diagonal' if dense else 'grouped'} stock)"
        error = tolerances.relative_error(y, stock_output(x, *stock_weights))
        assert error <= RTOL, f"{what}: output {error:.1e}"
        assert tolerances.relative_error(grads[0], want[0]) <= RTOL, f"{what}: dx"
        want_kernel = ops.convert_to_numpy(want[1])
        if dense:  # the block-diagonal kernel's gradient, read at the blocks (chain rule)
            want_kernel = _blocks(want_kernel, kwargs["groups"])
        assert tolerances.relative_error(grads[1], want_kernel) <= RTOL, f"{what}: dK"
        if len(grads) > 2:
            assert tolerances.relative_error(grads[2], want[2]) <= RTOL, f"{what}: db"


def _products(layer, x, m):
    """Everything the contract derives from the layer, at ``x`` with ``V = 3`` vectors ``m``."""
    params = layer.read_parameters()
    y = layer.forward(x, *params)
    out = {"forward": y, "vjp_input": layer.vjp_input(m, x, y, *params)}
    for label, vectors, summed in (("one", m[:1], True), ("three", m, True), ("each", m, False)):
        for i, g in enumerate(layer.vjp_params(vectors, x, y, *params, sum_batch=summed)):
            out[f"vjp_params[{i}] {label}"] = g
    for i, s in enumerate(layer.per_example_squared_norms(m[0], x, y, *params)):
        out[f"squared_norms[{i}]"] = s
    dx, dparams = layer.jacobian_rows(ops.moveaxis(m, 0, 1), x, y, *params)
    out["jacobian_rows x"] = dx
    for i, g in enumerate(dparams):
        out[f"jacobian_rows[{i}]"] = g
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_the_routes_agree(name):
    """Materialized and implicit: forward, input products for three vectors, kernel and bias
    products (one vector and three, summed; per sample), squared norms and Jacobian rows, to
    1e-12; and the squared norms are those of the per-sample products."""
    tb.require_float64("the routes' float64 agreement")
    assert_routes_agree(*CASES[name], name)


def assert_routes_agree(cls, input_shape, kwargs, name, seed=0):
    materialized, implicit = (_layer(cls, input_shape, kwargs, r, seed) for r in ROUTES)
    rng = np.random.default_rng(seed + 2)
    x = ops.convert_to_tensor(rng.normal(size=(3, *input_shape)))
    m = ops.convert_to_tensor(rng.normal(size=(3, *materialized.compute_output_shape(x.shape))))
    want, got = _products(materialized, x, m), _products(implicit, x, m)
    assert want.keys() == got.keys()
    for key in want:
        assert tuple(got[key].shape) == tuple(want[key].shape), key
        error = tolerances.relative_error(got[key], want[key])
        assert error <= RTOL, f"{name}: {key} differs by {error:.1e}"
    for i in range(len(materialized.weights)):
        each = ops.convert_to_numpy(want[f"vjp_params[{i}] each"][0])
        norms = (each.reshape(each.shape[0], -1) ** 2).sum(axis=1)
        assert tolerances.relative_error(want[f"squared_norms[{i}]"], norms) <= RTOL, (name, i)


@st.composite
def layout_configs(draw):
    """A convolution of any rank (or a transposed one), channels_first or grouped or both, with
    its input shape in its layout. Transposed convolutions are not dilated here (TensorFlow's
    stock ``Conv2DTranspose`` has no dilated CPU kernel)."""
    kind = draw(st.sampled_from(["Conv1D", "Conv2D", "Conv3D", "Conv2DTranspose"]))
    rank = {"Conv1D": 1, "Conv2D": 2, "Conv3D": 3, "Conv2DTranspose": 2}[kind]
    padding = draw(st.sampled_from(["valid", "same", "causal"] if rank == 1 else ["valid", "same"]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilated = kind != "Conv2DTranspose" and draw(st.booleans())
    strides = (1,) * rank if dilated else tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank)) if dilated else (1,) * rank
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    low = 2 if rank == 3 else 3
    sizes = tuple(draw(st.integers(max(low, e), max(low, e) + 2)) for e in extent)
    groups = 1 if kind == "Conv2DTranspose" else draw(st.integers(1, 3))
    first = groups == 1 or draw(st.booleans())
    channels, filters = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kwargs = {
        "filters": filters,
        "kernel_size": kernel,
        "strides": strides,
        "padding": padding,
        "dilation_rate": dilation,
        "use_bias": draw(st.booleans()),
        "data_format": "channels_first" if first else "channels_last",
    }
    if groups > 1:
        kwargs["groups"] = groups
    if kind in ("Conv1D", "Conv2D") and kwargs["use_bias"] and draw(st.booleans()):
        kwargs["bias"] = "untied"
    if kind == "Conv2DTranspose" and padding == "valid" and max(strides) > 1:
        kwargs["output_padding"] = tuple(draw(st.integers(0, s - 1)) for s in strides)
    cls = getattr(layers, kind)
    return cls, ((channels, *sizes) if first else (*sizes, channels)), kwargs


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(layout_configs(), st.integers(0, 2**16))
def test_drawn_configurations_equal_stock_and_the_routes_agree(config, seed):
    """On drawn configurations: each route equals stock Keras (output and gradients, 1e-12) and
    the two routes agree on every product of the contract."""
    tb.require_float64("the float64 comparison with stock Keras")
    cls, input_shape, kwargs = config
    backend = keras.backend.backend()
    for route in ROUTES:
        assert_equals_stock(
            cls, input_shape, kwargs, route, backend, f"{cls.__name__} {kwargs}", seed
        )
    assert_routes_agree(cls, input_shape, kwargs, f"{cls.__name__} {kwargs}", seed)


CHECKED = [  # (case, route, every mode): the formula checks on one route each, every mode on both
    ("2d-first-groups2", "materialize", True),
    ("2d-first-groups2", "implicit", True),
    ("1d-first-depthwise-causal", "materialize", False),
    ("2d-depthwise-dilated-untied", "implicit", False),
    ("3d-first-groups2", "materialize", False),
    ("transpose-first-same", "implicit", False),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, route, modes", CHECKED)
def test_check_layer(name, route, modes, tmp_path):
    """``tf_jacbp.testing.check_layer``: the Jacobian route's gradients against autodiff through
    the reference route (stock, permuted on TensorFlow) and finite differences, the per-example
    rows and the contract; with ``modes`` also fit eagerly, as a graph and under XLA, mixed
    precision and the ``.keras`` round trip."""
    cls, input_shape, kwargs = CASES[name]
    check_layer(
        lambda dtype: cls(dtype=dtype, toeplitz=route, **kwargs),
        input_shape,
        tmp_dir=str(tmp_path),
        modes=modes,
    )


def _channels_last_twin(layer, cls, input_shape, kwargs, route):
    """The same layer channels_last, with the same weights (an untied bias transposed)."""
    last = {**kwargs, "data_format": "channels_last"}
    twin = cls(dtype="float64", toeplitz=route, **last)
    twin.build((None, *input_shape[1:], input_shape[0]))
    weights = layer.get_weights()
    if kwargs.get("bias") == "untied":
        weights[1] = np.moveaxis(weights[1], 0, -1)
    twin.set_weights(weights)
    return twin


def _order(shape_last):
    """Position in the channels_last ``vec`` of each entry of the channels_first ``vec``."""
    n = len(shape_last)
    return (
        np.arange(np.prod(shape_last)).reshape(shape_last).transpose(n - 1, *range(n - 1)).ravel()
    )


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", [n for n, (_, _, kw) in CASES.items() if _first(kw)])
def test_channels_first_jacobians_are_the_permuted_channels_last_ones(name, route):
    """At one sample ``x`` (channels_first ``(C, *s)``): ``J_x z`` equals the channels_last
    twin's with rows and columns permuted from the channels_last ``vec`` to the channels_first
    one, ``J_theta z`` its rows permuted (an untied bias' columns too), and
    ``toeplitz_matrix(x.shape)`` is the input Jacobian."""
    tb.require_float64("the Jacobians in float64")
    cls, input_shape, kwargs = CASES[name]
    layer = _layer(cls, input_shape, kwargs, route)
    twin = _channels_last_twin(layer, cls, input_shape, kwargs, route)
    x = np.random.default_rng(3).normal(size=input_shape)
    ours, theirs = layer.jacobian(x), twin.jacobian(np.moveaxis(x, 0, -1))
    out_first = layer.compute_output_shape((1, *input_shape))[1:]
    rows = _order((*out_first[1:], out_first[0]))
    columns = _order((*input_shape[1:], input_shape[0]))
    want = ops.convert_to_numpy(theirs.input)[rows][:, columns]
    assert tolerances.relative_error(ours.input, want) <= RTOL, name
    t = ops.convert_to_numpy(layer.toeplitz_matrix(input_shape))
    assert tolerances.relative_error(t, want) <= RTOL, name
    want_theta = ops.convert_to_numpy(theirs.parameters)[rows]
    if kwargs.get("bias") == "untied":  # Vec (column-major) of (F, *o) against that of (*o, F)
        size = int(np.prod(layer.kernel.shape))
        bias_last = tuple(twin.bias.shape)
        position = np.arange(np.prod(bias_last)).reshape(bias_last, order="F")  # (*o, F)
        columns = np.moveaxis(position, -1, 0).ravel(order="F")  # twin's column of each of ours
        want_theta = np.concatenate([want_theta[:, :size], want_theta[:, size:][:, columns]], 1)
    assert tolerances.relative_error(ours.parameters, want_theta) <= RTOL, name


@pytest.mark.parametrize("name", ["2d-groups2-same", "1d-first-depthwise-causal", "3d-groups2"])
def test_a_grouped_t_is_zero_between_groups(name):
    """``T(K)`` of ``groups = G``, rows ``(o, f)`` and columns ``(s, c)`` (``(f, o)`` and
    ``(c, s)`` channels_first): an entry is zero unless ``c`` and ``f`` are in one group."""
    cls, input_shape, kwargs = CASES[name]
    layer = _layer(cls, input_shape, kwargs, "materialize")
    t = ops.convert_to_numpy(layer.toeplitz_matrix(input_shape))
    first, groups = _first(kwargs), kwargs["groups"]
    out = layer.compute_output_shape((1, *input_shape))[1:]
    channels, filters = (input_shape[0], out[0]) if first else (input_shape[-1], out[-1])
    group_f = np.arange(filters) // (filters // groups)
    group_c = np.arange(channels) // (channels // groups)
    same = np.equal.outer(group_f, group_c)  # (F, C)
    if first:
        t = t.reshape(filters, -1, channels, t.shape[1] // channels)
        outside = t * ~same[:, None, :, None]
    else:
        t = t.reshape(-1, filters, t.shape[1] // channels, channels)
        outside = t * ~same[None, :, None, :]
    assert not np.any(outside)
    assert np.count_nonzero(t) > 0


@pytest.mark.slow
@pytest.mark.parametrize("route", ROUTES)
def test_a_channels_first_grouped_cnn_trains_under_gradient_check(route):
    """``Conv2D(channels_first, groups=2) -> Conv2D(channels_first, groups=4, strides 2) ->
    Flatten -> Dense`` trains by ``model.fit`` with ``GradientCheck``: no mismatch, every
    variable checked against the float64 reference route to 1e-12, the loss goes down. Two
    channels, fewer than the kernel's 3 taps: a channels_first batch read as channels_last
    (``(2, 7)`` for ``(7, 7)``) would have no valid window."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((2, 7, 7)),
            layers.Conv2D(4, 3, groups=2, activation="tanh", toeplitz=route, **CF),
            layers.Conv2D(8, 3, strides=2, groups=4, activation="tanh", toeplitz=route, **CF),
            layers.Flatten(),
            layers.Dense(3, name="last"),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.05), losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(32, 2, 7, 7)).astype("float32"), rng.integers(0, 3, size=32)
    check = GradientCheck((x[:16], y[:16]), every_n_batches=2, verbose=0)
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[check])
    assert history.history["grad_check_mismatches"] == [0, 0, 0]
    assert history.history["loss"][-1] < history.history["loss"][0]
    checked = {r.variable for r in check.records if r.witness == REFERENCE}
    assert checked == {v.path for v in model.trainable_variables}
    for r in check.records:
        assert r.passed, r
        if r.witness == REFERENCE:
            assert r.float64_rel_err <= RTOL, r


@pytest.mark.parametrize(
    "make, stock, match",
    [
        (
            lambda: layers.Conv2D(4, 3, groups=3),
            lambda: keras.layers.Conv2D(4, 3, groups=3),
            "groups=3, filters=4",
        ),
        (
            lambda: layers.Conv1D(2, 3, groups=0),
            lambda: keras.layers.Conv1D(2, 3, groups=0),
            "groups=0",
        ),
    ],
)
def test_bad_groups_name_the_argument_as_keras_does(make, stock, match):
    with pytest.raises(ValueError) as keras_error:
        stock()
    with pytest.raises(ValueError, match=match) as ours:
        make()
    assert str(keras_error.value) in str(ours.value)


@pytest.mark.parametrize(
    "data_format, shape", [("channels_last", (8, 8, 3)), ("channels_first", (3, 8, 8))]
)
def test_groups_that_do_not_divide_the_channels_name_them_at_build(data_format, shape):
    """Keras' check at build, on the channel axis of the layout: its message, with the layer."""
    with pytest.raises(ValueError) as keras_error:
        keras.layers.Conv2D(4, 3, groups=2, data_format=data_format).build((None, *shape))
    with pytest.raises(ValueError, match=r"groups=2, but the input has 3 channels"):
        keras.Sequential(
            [keras.Input(shape), layers.Conv2D(4, 3, groups=2, data_format=data_format)]
        )
    with pytest.raises(ValueError) as ours:
        layers.Conv2D(4, 3, groups=2, data_format=data_format).build((None, *shape))
    assert str(keras_error.value) in str(ours.value)


@pytest.mark.parametrize(
    "name", ["2d-first-groups2", "1d-first-same-untied", "transpose-first-same"]
)
def test_shapes_and_config_are_keras(name):
    """Output shape, kernel shape, input_spec's channel axis and ``get_config``'s
    ``data_format`` and ``groups`` equal the stock layer's; the config round-trips."""
    cls, input_shape, kwargs = CASES[name]
    layer = cls(**kwargs)
    stock_kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
    stock = getattr(keras.layers, cls.__name__)(**stock_kwargs)
    shape = (None, *input_shape)
    assert tuple(layer.compute_output_shape(shape)) == tuple(stock.compute_output_shape(shape))
    layer.build(shape)
    stock.build(shape)
    assert tuple(layer.kernel.shape) == tuple(stock.kernel.shape)
    assert layer.input_spec.axes[1] == input_shape[0]
    ours, theirs = layer.get_config(), stock.get_config()
    for key in ("data_format", "groups"):
        assert ours.get(key, 1) == theirs.get(key, 1), key
    assert cls.from_config(ours).get_config() == ours
    if kwargs.get("bias") == "untied":
        assert tuple(layer.bias.shape) == layer.compute_output_shape(shape)[1:]
