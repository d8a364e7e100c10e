"""tf_jacbp.toeplitz: T(K) against tf.nn.conv2d, its columns, Lemma 2's 4 x 9 example, the guard."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from tf_jacbp import geometry, toeplitz, tolerances
from tf_jacbp.layout import vec_parameter
from tf_jacbp.toeplitz_dynamic import DynamicConvIndex


@st.composite
def conv_configs(draw, max_size=9):
    """A convolution: kernel 1-5 (even too), strides 1-3, dilation 1-2, both paddings, sizes
    that fit (odd and non-square), 1-4 channels in and out."""
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.sampled_from(geometry.PADDINGS))
    lows = (
        [1, 1]
        if padding == "same"
        else [(k - 1) * d + 1 for k, d in zip((kh, kw), dilation, strict=True)]
    )
    height = draw(st.integers(lows[0], max(lows[0], max_size)))
    width = draw(st.integers(lows[1], max(lows[1], max_size)))
    c_in, c_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    return (kh, kw, c_in, c_out), (height, width, c_in), strides, padding, dilation, seed


def _kernel(kernel_shape, seed):
    return tf.constant(np.random.default_rng(seed).normal(size=kernel_shape))


@settings(derandomize=True, max_examples=60, deadline=None)
@given(conv_configs())
def test_conv_matrix_equals_conv2d(config):
    """``T(K) vec(x) == vec(conv2d(x, K))`` for a batch of two inputs, float64; sparse T too."""
    kernel_shape, input_shape, strides, padding, dilation, seed = config
    kernel = _kernel(kernel_shape, seed)
    x = np.random.default_rng(seed + 1).normal(size=(2, *input_shape))
    expected = tf.nn.conv2d(x, kernel, strides, padding.upper(), dilations=dilation)
    t = toeplitz.conv_matrix(kernel, input_shape, strides, padding, dilation)
    assert t.shape == (np.prod(expected.shape[1:]), np.prod(input_shape))
    y = tf.matmul(x.reshape(2, -1), t, transpose_b=True)
    err = tolerances.relative_error(y, tf.reshape(expected, [2, -1]))
    assert err <= tolerances.rtol("float64")
    index = toeplitz.conv_index(kernel_shape, input_shape, strides, padding, dilation)
    np.testing.assert_array_equal(tf.sparse.to_dense(index.sparse_matrix(kernel)), t)
    assert index.nnz == np.count_nonzero(t)  # a Gaussian kernel has no zero entries


@settings(derandomize=True, max_examples=30, deadline=None)
@given(conv_configs(max_size=7))
def test_two_gather_build_equals_the_entry_index_definition(config):
    """``T^T`` from two row gathers equals ``[Vec(K); 0]`` gathered entry by entry."""
    kernel_shape, input_shape, strides, padding, dilation, seed = config
    kernel = _kernel(kernel_shape, seed)
    index = toeplitz.conv_index(kernel_shape, input_shape, strides, padding, dilation)
    source = np.concatenate([vec_parameter(kernel).numpy(), [0.0]])
    np.testing.assert_array_equal(index.transpose_matrix(kernel), source[index.entry_index].T)


@settings(derandomize=True, max_examples=10, deadline=None)
@given(conv_configs(max_size=6))
def test_each_column_is_the_convolution_of_a_basis_image(config):
    """Column ``n`` of ``T(K)`` is ``vec(conv2d(e_n, K))`` for the basis image ``e_n``."""
    kernel_shape, input_shape, strides, padding, dilation, seed = config
    kernel = _kernel(kernel_shape, seed)
    n = int(np.prod(input_shape))
    basis = np.eye(n).reshape(n, *input_shape)  # basis[n] = e_n, row-major numbering
    images = tf.nn.conv2d(basis, kernel, strides, padding.upper(), dilations=dilation)
    t = toeplitz.conv_matrix(kernel, input_shape, strides, padding, dilation)
    np.testing.assert_array_equal(t, tf.transpose(tf.reshape(images, [n, -1])))


@settings(derandomize=True, max_examples=20, deadline=None)
@given(conv_configs(max_size=7))
def test_kernel_gradient_is_the_patch_matrix_product(config):
    """``ConvIndex.kernel_gradient`` equals autodiff of ``sum(delta * (X T(K)^T))`` in ``K``."""
    kernel_shape, input_shape, strides, padding, dilation, seed = config
    kernel = _kernel(kernel_shape, seed)
    index = toeplitz.conv_index(kernel_shape, input_shape, strides, padding, dilation)
    rng = np.random.default_rng(seed + 2)
    x = tf.constant(rng.normal(size=(3, *input_shape)))
    delta = tf.constant(rng.normal(size=(3, *index.output_shape)))
    with tf.GradientTape() as tape:
        tape.watch(kernel)
        y = tf.matmul(tf.reshape(x, [3, -1]), index.transpose_matrix(kernel))
        loss = tf.reduce_sum(tf.reshape(delta, [3, -1]) * y)
    expected = tape.gradient(loss, kernel)
    err = tolerances.relative_error(index.kernel_gradient(x, delta), expected)
    assert err <= tolerances.rtol("float64")


@settings(derandomize=True, max_examples=20, deadline=None)
@given(conv_configs(max_size=7))
def test_tied_bias_gradient_is_the_ones_row_of_the_same_patch_product(config):
    """``kernel_gradient(tied_bias=True)`` is ``(dK, sum of delta over samples and positions)``,
    its patch matrix ``patches`` with the rows in ``K``'s storage order and a row of ones."""
    kernel_shape, input_shape, strides, padding, dilation, seed = config
    index = toeplitz.conv_index(kernel_shape, input_shape, strides, padding, dilation)
    rng = np.random.default_rng(seed + 3)
    x = tf.constant(rng.normal(size=(3, *input_shape)))
    delta = tf.constant(rng.normal(size=(3, *index.output_shape)))
    dk, db = index.kernel_gradient(x, delta, tied_bias=True)
    np.testing.assert_allclose(dk, index.kernel_gradient(x, delta), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, tf.reduce_sum(delta, [0, 1, 2]), rtol=1e-12, atol=1e-12)
    # The stored-order index is patch_index permuted (padding moved to N + 1), then the ones row.
    n = index.shape[1]
    stored = index.stored_patch_index
    vec = np.arange(np.prod(kernel_shape[:3])).reshape(kernel_shape[:3], order="F").reshape(-1)
    expected = np.where(index.patch_index[vec] == n, n + 1, index.patch_index[vec])
    np.testing.assert_array_equal(stored[:-1], expected)
    np.testing.assert_array_equal(stored[-1], n)


def test_lemma_2_the_papers_4_by_9_matrix():
    """docs/math.md, Lemma 2: a 3 x 3 input, ``K = [[k1, k2], [k3, k4]]``, valid, stride 1."""
    k1, k2, k3, k4 = 2.0, 3.0, 5.0, 7.0
    kernel = np.array([[k1, k2], [k3, k4]]).reshape(2, 2, 1, 1)
    expected = np.array(
        [
            [k1, k2, 0, k3, k4, 0, 0, 0, 0],
            [0, k1, k2, 0, k3, k4, 0, 0, 0],
            [0, 0, 0, k1, k2, 0, k3, k4, 0],
            [0, 0, 0, 0, k1, k2, 0, k3, k4],
        ]
    )
    np.testing.assert_array_equal(toeplitz.conv_matrix(kernel, (3, 3, 1)), expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strides": 0}, "strides=0"),
        ({"strides": (1, -2)}, r"strides=\(1, -2\)"),
        ({"dilation_rate": 0}, "dilation_rate=0"),
        ({"dilation_rate": (2, -1)}, r"dilation_rate=\(2, -1\)"),
        ({"padding": "full"}, "padding='full'"),
        ({"input_shape": (2, 2, 1)}, "kernel_size"),
        ({"input_shape": (6, 6, 2)}, "input channels"),
        ({"input_shape": (6, 6)}, "input_shape"),
        ({"kernel": np.ones((3, 3, 1))}, "kernel"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = {"kernel": np.ones((3, 3, 1, 2)), "input_shape": (6, 6, 1), **kwargs}
    with pytest.raises(ValueError, match=match):
        toeplitz.conv_matrix(**args)


def test_valid_kernel_larger_than_input_suggests_same_padding():
    with pytest.raises(ValueError, match="padding='same'"):
        toeplitz.conv_matrix(np.ones((3, 3, 1, 1)), (6, 2, 1))
    assert toeplitz.conv_matrix(np.ones((3, 3, 1, 1)), (6, 2, 1), padding="same").shape == (
        12,
        12,
    )


def test_budget_refuses_a_dense_matrix_and_names_size_and_setting():
    kernel = np.ones((3, 3, 2, 4), np.float32)  # T is (6 6 4) x (8 8 2): 144 x 128 float32
    assert toeplitz.conv_matrix(kernel, (8, 8, 2), budget_bytes=144 * 128 * 4).shape == (144, 128)
    with pytest.raises(ValueError, match=r"73728 bytes.*budget_bytes=.*set_budget_bytes"):
        toeplitz.conv_matrix(kernel, (8, 8, 2), budget_bytes=144 * 128 * 4 - 1)


def test_process_wide_budget_setter():
    kernel = np.ones((3, 3, 2, 4), np.float32)
    try:
        toeplitz.set_budget_bytes(1000)
        assert toeplitz.get_budget_bytes() == 1000
        with pytest.raises(ValueError, match="set_budget_bytes"):
            toeplitz.conv_matrix(kernel, (8, 8, 2))
    finally:
        toeplitz.set_budget_bytes(None)
    assert toeplitz.get_budget_bytes() == toeplitz.DEFAULT_BUDGET_BYTES
    for bad in (0, -5, 1.5, "1GB"):
        with pytest.raises(ValueError, match="positive integer number of bytes"):
            toeplitz.set_budget_bytes(bad)


@settings(derandomize=True, max_examples=15, deadline=None)
@given(conv_configs(max_size=7), st.booleans())
@pytest.mark.slow
def test_dynamic_index_maps_equal_the_static_ones_exactly(config, causal):
    """``DynamicConvIndex`` (maps from TF ops, the size unknown when traced) gives the same
    ``kernel_rows``, ``block_rows``, patch maps, ``T(K)^T``, patches and kernel gradient as
    ``ConvIndex``, entry for entry; "causal" padding too (drawn in place of the other)."""
    kernel_shape, input_shape, strides, padding, dilation, seed = config
    if causal:
        padding = "causal"
    index = toeplitz.conv_index(kernel_shape, input_shape, strides, padding, dilation)
    kernel = _kernel(kernel_shape, seed)
    rng = np.random.default_rng(seed + 4)
    x = tf.constant(rng.normal(size=(2, *input_shape)))
    delta = tf.constant(rng.normal(size=(2, *index.output_shape)))

    def maps_of(x):
        height, width = tf.shape(x)[1], tf.shape(x)[2]
        return DynamicConvIndex(height, width, kernel_shape, strides, padding, dilation, 10**9)

    _assert_dynamic_equals_static(index, kernel, x, delta, maps_of)


def test_dynamic_index_guard_and_window_check_run_when_the_graph_runs():
    """Over the budget, ``transpose_matrix`` is an error naming the budget and ``T``'s shape; a
    "valid" window longer than the input is an error naming the padding."""
    unknown = tf.TensorSpec((None, None, None, 1), "float64")
    kernel = tf.ones((3, 3, 1, 2), "float64")

    @tf.function(input_signature=[unknown])
    def t(x):
        maps = DynamicConvIndex(
            tf.shape(x)[1], tf.shape(x)[2], (3, 3, 1, 2), (1, 1), "valid", (1, 1), 5000
        )
        return maps.transpose_matrix(kernel)

    assert t(tf.zeros((1, 4, 4, 1), "float64")).shape == (16, 8)  # 1024 bytes
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"(?s)budget of 5000 bytes.*\[50\] \[49\]"
    ):
        t(tf.zeros((1, 7, 7, 1), "float64"))  # 50 x 49 x 8 = 19600 bytes
    with pytest.raises(tf.errors.InvalidArgumentError, match="padding valid has no output"):
        t(tf.zeros((1, 2, 5, 1), "float64"))


# --- n spatial axes: 1-D and 3-D indices against independent computations ------------------


@st.composite
def conv3d_configs(draw, max_size=5):
    """A 3-D convolution: kernel 1-3 per axis, strides 1-2, dilation 1-2, both paddings, sizes
    that fit, 1-3 channels in and out."""
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(3))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(3))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(3))
    padding = draw(st.sampled_from(geometry.PADDINGS))
    sizes = tuple(
        draw(st.integers(1 if padding == "same" else (k - 1) * d + 1, max_size + (k - 1) * d))
        for k, d in zip(kernel, dilation, strict=True)
    )
    c_in, c_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return (*kernel, c_in, c_out), (*sizes, c_in), strides, padding, dilation, seed


def _dilated(kernel, dilation):
    """The kernel with ``d - 1`` zeros between taps (differentiable): a dilated convolution is
    the plain one of this kernel (TensorFlow's CPU Conv3D has no dilation)."""
    spread = []
    for k, d in zip(kernel.shape[:3], dilation, strict=True):
        spread.append(np.eye((k - 1) * d + 1)[::d][:k])  # (k, (k - 1) d + 1): row p at p d
    return tf.einsum("pqrcf,pi,qj,rk->ijkcf", kernel, *spread)


def _conv3d(x, kernel, strides, padding, dilation):
    return tf.nn.conv3d(x, _dilated(kernel, dilation), (1, *strides, 1), padding.upper())


@settings(derandomize=True, max_examples=25, deadline=None)
@given(conv3d_configs())
def test_3d_index_products_equal_conv3d_and_its_autodiff_gradients(config):
    """For a volume ``(D, H, W, C)``: ``X T(K)^T`` equals ``tf.nn.conv3d``; ``Delta T(K)``
    equals its input gradient and ``kernel_gradient`` its kernel gradient (autodiff), with the
    tied bias' ``sum delta``; per sample (``kernel_products(sum_batch=False)``) for ``V = 2``
    each vector's own gradient; the sparse ``T`` and the entry definition agree. float64."""
    kernel_shape, input_shape, strides, padding, dilation, seed = config
    rng = np.random.default_rng(seed)
    kernel = tf.constant(rng.normal(size=kernel_shape))
    x = tf.constant(rng.normal(size=(2, *input_shape)))
    index = toeplitz.conv_index(kernel_shape, input_shape, strides, padding, dilation)
    delta = tf.constant(rng.normal(size=(2, *index.output_shape)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, kernel])
        expected = _conv3d(x, kernel, strides, padding, dilation)
        loss = tf.reduce_sum(delta * expected)
    assert index.output_shape == tuple(expected.shape[1:])
    t_transpose = index.transpose_matrix(kernel)
    rtol = tolerances.rtol("float64")
    z = toeplitz.toeplitz_product(tf.reshape(x, [2, -1]), t_transpose)
    assert tolerances.relative_error(z, tf.reshape(expected, [2, -1])) <= rtol
    dx = toeplitz.toeplitz_product(tf.reshape(delta, [2, -1]), t_transpose, transpose=True)
    assert tolerances.relative_error(dx, tf.reshape(tape.gradient(loss, x), [2, -1])) <= rtol
    dk, db = index.kernel_gradient(x, delta, tied_bias=True)
    assert tolerances.relative_error(dk, tape.gradient(loss, kernel)) <= rtol
    np.testing.assert_allclose(db, tf.reduce_sum(delta, [0, 1, 2, 3]), rtol=1e-12, atol=1e-12)
    m = tf.stack([delta, 2.0 * delta])  # V = 2
    per_sample = index.kernel_products(x, m, sum_batch=False)  # (V, batch, M + 1, F)
    for b in range(2):
        with tf.GradientTape() as one:
            one.watch(kernel)
            y = tf.reduce_sum(delta[b] * _conv3d(x[b : b + 1], kernel, strides, padding, dilation))
        g = one.gradient(y, kernel)
        got = tf.reshape(per_sample[1, b, :-1], kernel_shape)
        assert tolerances.relative_error(got, 2.0 * g) <= rtol
    sparse = tf.sparse.to_dense(index.sparse_matrix(kernel))
    np.testing.assert_array_equal(sparse, tf.transpose(t_transpose))
    source = np.concatenate([vec_parameter(kernel).numpy(), [0.0]])
    np.testing.assert_array_equal(t_transpose, source[index.entry_index].T)
    assert index.nnz == np.count_nonzero(t_transpose)


@settings(derandomize=True, max_examples=30, deadline=None)
@given(conv_configs(max_size=9), st.booleans())
def test_1d_index_is_the_2d_index_of_height_1_and_equals_conv1d(config, causal):
    """A sequence's index (kernel ``(k, C, F)``, input ``(T, C)``) builds the same ``T(K)``, maps
    and patches as the image ``(1, T, C)`` with kernel ``(1, k, C, F)`` (Conv1D's view), and
    ``X T(K)^T`` equals ``tf.nn.conv1d`` (causal: the sequence padded before)."""
    (_, kw, c_in, c_out), (_, width, _), strides, padding, dilation, seed = config
    padding = "causal" if causal else padding
    rng = np.random.default_rng(seed)
    kernel = tf.constant(rng.normal(size=(kw, c_in, c_out)))
    one = toeplitz.conv_index((kw, c_in, c_out), (width, c_in), strides[1], padding, dilation[1])
    two = toeplitz.conv_index(
        (1, kw, c_in, c_out), (1, width, c_in), (1, strides[1]), padding, (1, dilation[1])
    )
    assert one.shape == two.shape and one.output_shape == two.output_shape[1:]
    np.testing.assert_array_equal(one.entry_index, two.entry_index)
    np.testing.assert_array_equal(one.patch_index, two.patch_index)
    np.testing.assert_array_equal(one.stored_patch_index, two.stored_patch_index)
    t = one.transpose_matrix(kernel)
    np.testing.assert_array_equal(t, two.transpose_matrix(kernel[None]))
    x = rng.normal(size=(2, width, c_in))
    conv_padding = padding.upper()
    if causal:
        x_padded = np.pad(x, ((0, 0), ((kw - 1) * dilation[1], 0), (0, 0)))
        conv_padding = "VALID"
    else:
        x_padded = x
    expected = tf.nn.conv1d(x_padded, kernel, strides[1], conv_padding, dilations=dilation[1])
    z = toeplitz.toeplitz_product(tf.reshape(x, [2, -1]), t)
    err = tolerances.relative_error(z, tf.reshape(expected, [2, -1]))
    assert err <= tolerances.rtol("float64")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_shape": (6, 6, 1)}, r"input_shape.*3 known positive spatial sizes"),
        ({"strides": (1, 2)}, r"depth, height, width.*strides=\(1, 2\)"),
        ({"dilation_rate": (1, 1, 0)}, r"dilation_rate=\(1, 1, 0\)"),
        ({"padding": "causal"}, "padding='causal'"),
        ({"input_shape": (6, 2, 6, 1)}, "along the height"),
        ({"kernel": np.ones((3, 1))}, "kernel must have shape"),
    ],
)
def test_3d_bad_arguments_name_the_argument(kwargs, match):
    args = {"kernel": np.ones((3, 3, 3, 1, 2)), "input_shape": (6, 6, 6, 1), **kwargs}
    with pytest.raises(ValueError, match=match):
        toeplitz.conv_matrix(**args)


@settings(derandomize=True, max_examples=10, deadline=None)
@given(conv3d_configs(max_size=4), st.integers(1, 3))
def test_dynamic_index_of_any_rank_equals_the_static_one(config, rank):
    """``DynamicConvIndex(sizes, ...)`` for 1, 2 or 3 spatial axes (the first ``rank`` of a
    drawn 3-D configuration) gives the static maps, ``T(K)^T``, patches and kernel gradient,
    entry for entry, the sizes unknown when traced."""
    kernel_shape, input_shape, strides, padding, dilation, seed = config
    kernel_shape = (*kernel_shape[:rank], *kernel_shape[3:])
    input_shape = (*input_shape[:rank], input_shape[3])
    strides, dilation = strides[:rank], dilation[:rank]
    index = toeplitz.conv_index(kernel_shape, input_shape, strides, padding, dilation)
    rng = np.random.default_rng(seed)
    kernel = tf.constant(rng.normal(size=kernel_shape))
    x = tf.constant(rng.normal(size=(2, *input_shape)))
    delta = tf.constant(rng.normal(size=(2, *index.output_shape)))

    def maps_of(x):
        sizes = [tf.shape(x)[1 + a] for a in range(rank)]
        return DynamicConvIndex(sizes, kernel_shape, strides, padding, dilation, 10**9)

    _assert_dynamic_equals_static(index, kernel, x, delta, maps_of)


@pytest.mark.parametrize(
    "kernel_shape, input_shape, padding",
    [
        ((3, 2, 4), (10, 2), "causal"),
        ((3, 3, 2, 4), (9, 7, 2), "same"),
        ((2, 3, 3, 2, 4), (5, 6, 7, 2), "valid"),
    ],
)
def test_step_bytes_counts_the_maps_the_route_builds(kernel_shape, input_shape, padding):
    """The memory guard's estimate (``step_bytes``) counts, for 1-D, 2-D and 3-D, exactly the
    int32 entries of the maps each route builds: ``kernel_rows``, ``block_rows`` (dense only),
    the two patch maps; and the dense and sparse ``T`` as ``R N`` and ``nnz`` values."""
    index = toeplitz.conv_index(kernel_shape, input_shape, padding=padding)
    size, copies = 8, toeplitz.GRAPH_CONSTANT_COPIES + 1
    patch_maps = index.patch_index.size + index.stored_patch_index.size
    dense_maps = sum(m.size for m in index.block_index)
    rows, columns = index.shape
    positions, entries = rows // kernel_shape[-1], int(np.prod(kernel_shape[:-1]))
    rest = (2 * (rows + columns) + (entries + 1) * positions) * size
    rest += toeplitz.STEP_OVERHEAD_BYTES
    dense = rows * columns * size + copies * 4 * (patch_maps + dense_maps) + rest
    sparse = index.nnz * (size + toeplitz.SPARSE_STEP_BYTES_PER_NONZERO)
    assert index.step_bytes("float64", False) == dense
    assert index.step_bytes("float64", True) == sparse + copies * 4 * patch_maps + rest
    assert (
        index.nnz
        == len(index.nonzeros[0])
        == np.count_nonzero(index.entry_index < np.prod(kernel_shape))
    )


def _assert_dynamic_equals_static(index, kernel, x, delta, maps_of):
    """The index maps ``maps_of(x)`` builds in a graph traced with the sizes unknown (a
    ``DynamicConvIndex``) equal ``index``'s static ones, and so do ``T(K)^T``, the patches and
    the kernel gradient, entry for entry."""
    unknown = (None,) * (len(x.shape) - 1)
    signature = [
        tf.TensorSpec((*unknown, x.shape[-1]), x.dtype),
        tf.TensorSpec((*unknown, None), delta.dtype),
    ]

    @tf.function(input_signature=signature)
    def dynamic(x, delta):
        maps = maps_of(x)
        names = ("kernel_rows", "block_rows", "patch_index", "stored_patch_index")
        products = [
            maps.transpose_matrix(kernel),
            maps.patches(x),
            *maps.kernel_gradient(x, delta, tied_bias=True),
        ]
        return [maps.index_map(name) for name in names], products

    maps, products = dynamic(x, delta)
    static_maps = [*(m.reshape(-1) for m in index.block_index), index.patch_index]
    for got, want in zip(maps, [*static_maps, index.stored_patch_index], strict=True):
        np.testing.assert_array_equal(got, want)
    static = [
        index.transpose_matrix(kernel),
        index.patches(x),
        *index.kernel_gradient(x, delta, tied_bias=True),
    ]
    for got, want in zip(products, static, strict=True):
        np.testing.assert_array_equal(got, want)
