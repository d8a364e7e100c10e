"""Merge layers: Add (the residual sum, J = I), Multiply (J = diag of the other inputs) and
Concatenate (J selects), each against the stock Keras layer, autodiff and the harness."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import tf_jacbp
from tf_jacbp import jacobian, layers, tolerances
from tf_jacbp.layers.merge import Concatenate, Multiply
from tf_jacbp.testing import check_layer as run_layer_test


def residual_block(dtype: str, n: int = 4) -> keras.Model:
    """``x -> Add([Dense(tanh)(x), x, Dense(1)(x)])``: a skip, and a third input broadcast."""
    x = keras.Input((n,), dtype="float64" if dtype == "float64" else "float32")
    h = layers.Dense(n, activation="tanh", dtype=dtype)(x)
    p = layers.Dense(1, dtype=dtype)(x)
    return keras.Model(x, layers.Add(dtype=dtype)([h, x, p]))


def test_residual_block_passes_the_harness(tmp_path):
    run_layer_test(residual_block, (4,), tmp_dir=str(tmp_path))


def test_conv_residual_block_passes_the_harness(tmp_path):
    def block(dtype):
        x = keras.Input((5, 4, 2), dtype="float64" if dtype == "float64" else "float32")
        h = layers.Conv2D(2, 3, padding="same", activation="relu", dtype=dtype)(x)
        return keras.Model(x, layers.Add(dtype=dtype)([h, x]))

    run_layer_test(block, (5, 4, 2), tmp_dir=str(tmp_path))


def test_matches_keras_add_including_broadcasting():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=s).astype("float32") for s in [(2, 3, 4), (2, 1, 4), (2, 3, 1)]]
    np.testing.assert_allclose(layers.Add()(xs), keras.layers.Add()(xs), rtol=1e-6)


def test_jacobians_are_identities_and_broadcast_matrices():
    """``J_{x_k} y`` equals ``tape.jacobian`` of the reference route, exactly (0/1 entries)."""
    xs = [tf.constant(np.random.default_rng(1).normal(size=s)) for s in [(2, 3), (1, 3), (2, 1)]]
    add = layers.Add(dtype="float64")
    add.build([(None, *x.shape) for x in xs])  # inputs of rank 3: xs is one sample
    ours = add.input_jacobian(xs)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xs)
        with tf_jacbp.reference_mode():
            y = add(xs)
    for k, x in enumerate(xs):
        expected = tf.reshape(tape.jacobian(y, x), [6, -1])
        np.testing.assert_array_equal(ours[k], expected)
    np.testing.assert_array_equal(ours[0], np.eye(6))
    assert list(add.jacobian_factors(xs)) == ["J_x1 = I", "J_x2 = I", "J_x3 = I"]


def test_backward_sums_delta_over_broadcast_axes():
    add = layers.Add(dtype="float64")
    xs = [tf.zeros((2, 3, 4), "float64"), tf.zeros((2, 1, 4), "float64")]
    dy = tf.constant(np.arange(24.0).reshape(2, 3, 4))
    dxs, grads = add.backward(dy, xs, add.forward(xs))
    np.testing.assert_array_equal(dxs[0], dy)
    np.testing.assert_array_equal(dxs[1], tf.reduce_sum(dy, axis=1, keepdims=True))
    assert grads == []


@pytest.mark.parametrize(
    "inputs, match",
    [
        (lambda: keras.Input((3,)), "list of tensors"),
        (lambda: [keras.Input((3,))], "at least 2 inputs"),
        (lambda: [keras.Input((3,)), keras.Input((1, 3))], "different ranks"),
        (lambda: [keras.Input((3,)), keras.Input((2,))], "cannot be added"),
    ],
    ids=["single tensor", "one input", "ranks", "shapes"],
)
def test_bad_inputs_are_clear_errors(inputs, match):
    with pytest.raises(ValueError, match=match):
        layers.Add()(inputs())


# --- Multiply and Concatenate ------------------------------------------------------------------

RTOL64 = tolerances.rtol("float64")


def gated_block(dtype: str, n: int = 4) -> keras.Model:
    """``x -> Multiply([Dense(sigmoid)(x), x, Dense(1)(x)])``: a gate, and a broadcast input."""
    x = keras.Input((n,), dtype="float64" if dtype == "float64" else "float32")
    gate = layers.Dense(n, activation="sigmoid", dtype=dtype)(x)
    scale = layers.Dense(1, dtype=dtype)(x)
    return keras.Model(x, Multiply(dtype=dtype)([gate, x, scale]))


def concat_block(dtype: str, axis: int = -1) -> keras.Model:
    """``x (3, 2) -> Dense(Concatenate(axis)([Dense(tanh)(x), x]))``."""
    x = keras.Input((3, 2), dtype="float64" if dtype == "float64" else "float32")
    h = layers.Dense(2, activation="tanh", dtype=dtype)(x)
    y = Concatenate(axis=axis, dtype=dtype)([h, x])
    return keras.Model(x, layers.Dense(2, dtype=dtype)(y))


def test_gated_block_passes_the_harness(tmp_path):
    run_layer_test(gated_block, (4,), tmp_dir=str(tmp_path))


def test_concat_block_passes_the_harness(tmp_path):
    """Along the positions (axis 1); the last axis is checked by the tests below."""
    run_layer_test(lambda dtype: concat_block(dtype, 1), (3, 2), tmp_dir=str(tmp_path))


def _stock_twin_results(ours, stock, xs, seed):
    """Outputs and input gradients of a random projection, for our layer and the stock one."""
    probe = None
    results = []
    for layer in (ours, stock):
        xs_t = [tf.constant(x) for x in xs]
        with tf.GradientTape() as tape:
            tape.watch(xs_t)
            y = layer(xs_t)
            if probe is None:
                probe = tf.constant(np.random.default_rng(seed).normal(size=y.shape))
            loss = tf.reduce_sum(y * probe)
        results.append([y, *tape.gradient(loss, xs_t)])
    return results


@settings(max_examples=10, deadline=None)
@given(data=st.data(), shape=st.lists(st.integers(1, 3), min_size=1, max_size=3))
def test_multiply_matches_keras_in_float64_including_broadcasting(data, shape):
    n = data.draw(st.integers(1, 3), label="inputs")
    shapes = [
        [1 if data.draw(st.booleans(), label="broadcast") and k else d for d in shape]
        for k in range(n)
    ]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    xs = [rng.normal(size=(2, *s)) for s in shapes]
    ours, stock = _stock_twin_results(
        Multiply(dtype="float64"), keras.layers.Multiply(dtype="float64"), xs, 0
    )
    for got, expected in zip(ours, stock, strict=True):
        assert tolerances.relative_error(got, expected) <= RTOL64


@settings(max_examples=10, deadline=None)
@given(data=st.data(), shape=st.lists(st.integers(1, 3), min_size=1, max_size=3))
def test_concatenate_matches_keras_in_float64(data, shape):
    rank = len(shape) + 1
    axis = data.draw(st.sampled_from([a for a in range(-rank, rank) if a % rank]), label="axis")
    n = data.draw(st.integers(1, 3), label="inputs")
    shapes = []
    for _ in range(n):
        s = list(shape)
        s[axis % rank - 1] = data.draw(st.integers(1, 3), label="size along axis")
        shapes.append(s)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    xs = [rng.normal(size=(2, *s)) for s in shapes]
    ours, stock = _stock_twin_results(
        Concatenate(axis, dtype="float64"), keras.layers.Concatenate(axis, dtype="float64"), xs, 0
    )
    for got, expected in zip(ours, stock, strict=True):
        np.testing.assert_array_equal(got, expected)  # a selection: exact


@pytest.mark.parametrize(
    "layer, shapes",
    [
        (lambda: Multiply(dtype="float64"), [(2, 3), (1, 3), (2, 1)]),
        (lambda: Concatenate(dtype="float64"), [(2, 3), (2, 1)]),
        (lambda: Concatenate(axis=1, dtype="float64"), [(2, 3), (1, 3), (3, 3)]),
    ],
    ids=["multiply", "concatenate last axis", "concatenate axis 1"],
)
def test_jacobians_equal_autodiff_and_their_transposes_are_the_backward(layer, shapes):
    layer = layer()
    rng = np.random.default_rng(4)
    xs = [tf.constant(rng.normal(size=s)) for s in shapes]
    layer.build([(None, *s) for s in shapes])  # xs is one sample
    jacobians = layer.input_jacobian(xs)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xs)
        with tf_jacbp.reference_mode():
            y = layer([x[None] for x in xs])[0]
    n = int(np.prod(y.shape))
    delta = tf.constant(rng.normal(size=(1, *y.shape)))
    dxs, params = layer.backward(delta, [x[None] for x in xs], y[None])
    assert params == []
    for k, x in enumerate(xs):
        expected = tf.reshape(tape.jacobian(y, x), [n, -1])
        assert tolerances.relative_error(jacobians[k], expected) <= RTOL64
        materialized = tf.linalg.matvec(jacobians[k], tf.reshape(delta, [-1]), transpose_a=True)
        assert tolerances.relative_error(tf.reshape(dxs[k], [-1]), materialized) <= RTOL64
    assert len(layer.jacobian_factors(xs)) == len(xs)


def test_concatenate_jacobian_of_flat_inputs_is_a_block_of_the_identity():
    xs = [np.ones(2), np.ones(3)]
    layer = Concatenate(dtype="float64")
    layer.build([(None, 2), (None, 3)])
    j1, j2 = layer.input_jacobian(xs)
    np.testing.assert_array_equal(np.concatenate([j1, j2], axis=1), np.eye(5))
    np.testing.assert_array_equal(j2, np.eye(5)[:, 2:])


def test_multiply_gradient_with_zero_inputs_is_the_product_of_the_others():
    """No division by ``x_k``: a zero input still gets ``delta * prod_{j != k} x_j``."""
    xs = [tf.constant([[0.0, 2.0]], "float64"), tf.constant([[3.0, 0.0]], "float64")]
    with tf.GradientTape() as tape:
        tape.watch(xs)
        y = tf.reduce_sum(Multiply(dtype="float64")(xs))
    g1, g2 = tape.gradient(y, xs)
    np.testing.assert_array_equal(g1, [[3.0, 0.0]])
    np.testing.assert_array_equal(g2, [[0.0, 2.0]])


def _masked(values):
    return keras.layers.Masking()(tf.constant(values))


X1 = [[[0.0, 0], [1, 2], [0, 0], [3, 4]]]
X2 = [[[0.0, 0], [0, 0], [1, 2], [3, 4]]]


@pytest.mark.parametrize("both", [False, True], ids=["one mask", "two masks"])
def test_multiply_with_masks_matches_keras_and_its_gradient_the_reference(both):
    inputs = [_masked(X1), _masked(X2) if both else tf.constant(X2)]
    ours, stock = Multiply()(inputs), keras.layers.Multiply()(inputs)
    np.testing.assert_array_equal(ours, stock)
    if both:
        np.testing.assert_array_equal(ours._keras_mask, stock._keras_mask)
    else:
        assert getattr(ours, "_keras_mask", None) is None
    masks = [inputs[0]._keras_mask, inputs[1]._keras_mask if both else None]
    layer = Multiply()
    grads = []
    for reference in (False, True):
        xs = [tf.constant(x) + 0.5 for x in (X1, X2)]  # nonzero everywhere
        with tf.GradientTape() as tape:
            tape.watch(xs)
            if reference:
                with tf_jacbp.reference_mode():
                    y = layer(xs, mask=masks)
            else:
                y = layer(xs, mask=masks)
            loss = tf.reduce_sum(y * tf.constant([[[1.0, 2], [3, 4], [5, 6], [7, 8]]]))
        grads.append(tape.gradient(loss, xs))
    for g, r in zip(*grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-6)
    assert np.all(np.asarray(grads[0][0])[0, 0] == 0)  # x1's masked entry gets no gradient


def test_concatenate_masks_match_keras():
    x1, x2 = _masked(X1), tf.constant(X2)
    for axis in (1, 2):
        ours, stock = (
            Concatenate(axis=axis)([x1, x2]),
            keras.layers.Concatenate(axis=axis)([x1, x2]),
        )
        np.testing.assert_array_equal(ours, stock)
        np.testing.assert_array_equal(ours._keras_mask, stock._keras_mask)
    assert Concatenate().compute_mask([x1, x2], [None, None]) is None


@pytest.mark.parametrize(
    "make, inputs, match",
    [
        (Multiply, lambda: keras.Input((3,)), "list of tensors"),
        (Multiply, lambda: [keras.Input((3,)), keras.Input((1, 3))], "different ranks"),
        (Multiply, lambda: [keras.Input((3,)), keras.Input((2,))], "cannot be multiplied"),
        (Concatenate, lambda: keras.Input((3,)), "list of tensors"),
        (Concatenate, lambda: [keras.Input((3, 2)), keras.Input((2, 3))], "matching shapes"),
        (Concatenate, lambda: [keras.Input((3,)), keras.Input((1, 3))], "matching shapes"),
        (lambda: Concatenate(axis=0), lambda: [keras.Input((3,))] * 2, "axis=0 is the batch"),
        (lambda: Concatenate(axis=2), lambda: [keras.Input((3,))] * 2, "out of range"),
        (lambda: Concatenate(axis=-3), lambda: [keras.Input((3,))] * 2, "out of range"),
        (lambda: Concatenate(axis=1.0), lambda: [keras.Input((3,))] * 2, "axis=1.0"),
    ],
    ids=[
        "multiply single tensor",
        "multiply ranks",
        "multiply shapes",
        "concatenate single tensor",
        "concatenate shapes",
        "concatenate ranks",
        "batch axis",
        "axis too large",
        "axis too small",
        "axis not an integer",
    ],
)
def test_bad_multiply_and_concatenate_inputs_are_clear_errors(make, inputs, match):
    with pytest.raises(ValueError, match=match):
        make()(inputs())


@pytest.mark.parametrize("make", [Multiply, Concatenate])
def test_bad_masks_get_keras_messages(make):
    x = [keras.Input((4, 5)), keras.Input((4, 5))]
    with pytest.raises(ValueError, match="`mask` should be a list."):
        make().compute_mask(x, np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="`inputs` should be a list."):
        make().compute_mask(x[0], [None, None])
    with pytest.raises(ValueError, match=" should have the same length."):
        make().compute_mask(x, [None])


@pytest.mark.parametrize(
    "make, shape",
    [(gated_block, (4,)), (concat_block, (3, 2)), (lambda d: concat_block(d, 1), (3, 2))],
    ids=["multiply", "concatenate last axis", "concatenate axis 1"],
)
def test_parameter_jacobian_through_the_merge_equals_autodiff(make, shape):
    """Algorithm 1's rows pass the merge by its ``jacobian_rows`` (``M diag(...)``, ``M``'s
    columns split): the chain equals ``tape.jacobian`` of the reference route."""
    model = make("float64")
    rng = np.random.default_rng(6)
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    x = tf.constant(rng.normal(size=(2, *shape)))
    variables = jacobian.parameter_variables(model)
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            out = tf.reshape(model(x), [2, -1])
    blocks = []
    for b in tape.jacobian(out, variables):
        b = np.asarray(b)
        trailing = list(range(b.ndim - 1, 1, -1))  # Vec: the first index runs fastest
        blocks.append(np.transpose(b, [0, 1, *trailing]).reshape(*b.shape[:2], -1))
    got = jacobian.parameter_jacobian(model, x)
    assert tolerances.relative_error(got, np.concatenate(blocks, axis=-1)) <= RTOL64


def test_add_passes_the_masks_on_as_keras_add():
    x = np.arange(12, dtype="float32").reshape(2, 3, 2)
    masks = [np.array([[1, 1, 0], [1, 0, 0]], bool), np.array([[1, 0, 1], [1, 1, 0]], bool)]
    ours, stock = layers.Add(), keras.layers.Add()
    assert ours.supports_masking and stock.supports_masking
    for mask in (masks, [masks[0], None], None):
        expected = stock.compute_mask([x, x], mask)
        got = ours.compute_mask([x, x], mask)
        if expected is None:
            assert got is None
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    # The sum ignores masks (stock Add takes none as an argument).
    np.testing.assert_array_equal(ours([x, x], mask=masks), stock([x, x]))


@pytest.mark.parametrize(
    "make, shapes, modes",
    [
        (lambda dtype: layers.Add(dtype=dtype), [(3, 4), (1, 4)], True),
        (lambda dtype: Multiply(dtype=dtype), [(3, 4), (3, 1)], True),
        (lambda dtype: Concatenate(axis=1, dtype=dtype), [(2, 4), (1, 4)], True),
        (lambda dtype: layers.Add(dtype=dtype), [(2, 3), (2, 3), (2, 1), (1, 3)], False),
    ],
    ids=["add", "multiply", "concatenate", "add of four inputs"],
)
def test_merge_layers_pass_the_kit_at_a_batch_size_other_than_their_inputs(make, shapes, modes):
    """``check_layer`` on the layer itself, ``input_shape`` a list of shapes, batch 3 for 2 or 4
    inputs: every route, the contract for ``V = 1`` and ``V = 3``, the derived rows."""
    run_layer_test(make, shapes, batch_size=3, modes=modes)


# --- The contract: vjp_input for V stacked vectors, at batch sizes other than the inputs' count --


@pytest.mark.parametrize(
    "make, shapes, masked",
    [
        (lambda: layers.Add(dtype="float64"), [(5, 3, 4), (5, 1, 4), (1, 3, 4)], False),
        (lambda: Multiply(dtype="float64"), [(5, 3, 4), (1, 3, 1)], False),
        (lambda: Multiply(dtype="float64"), [(5, 3, 4), (5, 3, 4), (5, 3, 1)], True),
        (lambda: Concatenate(axis=1, dtype="float64"), [(5, 1, 4), (5, 3, 4)], False),
        (lambda: Concatenate(dtype="float64"), [(5, 3, 2), (5, 3, 1), (5, 3, 4)], False),
    ],
    ids=["add", "multiply", "multiply masked", "concatenate axis 1", "concatenate last axis"],
)
def test_vjp_input_of_v_vectors_equals_autodiff(make, shapes, masked):
    """``vjp_input(m, xs, y)`` with ``V = 3`` stacked vectors, batch 5 for 2 or 3 inputs (a
    batch-1 input broadcast over the batch included): each ``v`` equals autodiff's vector-Jacobian
    product of the reference route."""
    layer = make()
    rng = np.random.default_rng(7)
    xs = [tf.constant(rng.normal(size=s)) for s in shapes]
    masks = [tf.constant(rng.random(s[:-1]) > 0.3) for s in shapes] if masked else None
    kwargs = {"mask": masks} if masked else {}
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xs)
        with tf_jacbp.reference_mode():
            y = layer(xs, **kwargs)
    m = tf.constant(rng.normal(size=(3, *y.shape)))
    got = layer.vjp_input(m, xs, y, *([masks] if masked else []))
    assert len(got) == len(xs)
    for v in range(3):
        expected = tape.gradient(y, xs, output_gradients=m[v])
        for k, x in enumerate(xs):
            assert got[k].shape == (3, *x.shape)
            assert tolerances.relative_error(got[k][v], expected[k]) <= RTOL64, (v, k)
    rows, params = layer.jacobian_rows(tf.transpose(m, [1, 0, 2, 3]), xs, y, *kwargs.values())
    assert params == []
    for k in range(len(xs)):
        np.testing.assert_allclose(rows[k], np.moveaxis(got[k], 0, 1))


def test_concatenate_of_sizes_unknown_when_traced_equals_autodiff():
    """The slices along an axis of unknown size at trace time (``tf.function`` with ``None``)."""
    layer = Concatenate(axis=1, dtype="float64")
    spec = tf.TensorSpec((None, None, 2), tf.float64)

    weights = np.arange(8.0).reshape(1, 4, 2) / 10  # d loss / d y, the same for each sample

    @tf.function(input_signature=[spec, spec], autograph=False)
    def grads(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = tf.reduce_sum(layer([a, b]) * weights)
        return tape.gradient(loss, [a, b])

    rng = np.random.default_rng(8)
    ga, gb = grads(tf.constant(rng.normal(size=(2, 3, 2))), tf.constant(rng.normal(size=(2, 1, 2))))
    np.testing.assert_array_equal(ga, np.broadcast_to(weights[:, :3], (2, 3, 2)))
    np.testing.assert_array_equal(gb, np.broadcast_to(weights[:, 3:], (2, 1, 2)))


# --- Issue 21: bugs found against stock Keras --------------------------------------------------


class Positions(keras.layers.Layer):
    """A learned positional embedding: a ``(1, T, D)`` weight, the same for every sample."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=(1, *input_shape[1:]), initializer="random_normal")

    def call(self, x):
        return keras.ops.convert_to_tensor(self.table)

    def compute_output_shape(self, input_shape):
        return (1, *input_shape[1:])


def positional_model(merge, seed=0):
    """``x (T, D) -> merge([x, positions]) -> Dense(2)`` with seeded weights."""
    x = keras.Input((3, 4))
    h = merge([x, Positions()(x)])
    model = keras.Model(x, keras.layers.Dense(2)(h))
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    return model


@pytest.mark.parametrize("merge", ["Add", "Multiply"])
def test_learned_weight_broadcast_over_the_batch_trains_as_stock(merge):
    """A ``(1, T, D)`` weight broadcast over the batch gets the gradient summed over the batch,
    ``(1, T, D)`` (was ``(B, T, D)``: ``fit`` crashed); equal to stock Keras' gradient."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3, 4)).astype("float32")
    y = rng.normal(size=(6, 3, 2)).astype("float32")
    grads = []
    for merge_layer in (getattr(layers, merge)(), getattr(keras.layers, merge)()):
        model = positional_model(merge_layer)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        grads.append(tape.gradient(loss, model.trainable_variables))
    for ours, stock in zip(*grads, strict=True):
        assert ours.shape == stock.shape
        np.testing.assert_allclose(ours, stock, rtol=1e-5, atol=1e-6)
    model = positional_model(getattr(layers, merge)())
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, batch_size=3, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # Eagerly, a tf.Variable fed to the merge gets a gradient of its own shape (stock refuses
    # the batch sizes 6 and 1 eagerly; the witness is TensorFlow's broadcasting op).
    table = tf.Variable(rng.normal(size=(1, 3, 4)))
    x64 = tf.constant(x, tf.float64)
    op = tf.add if merge == "Add" else tf.multiply
    with tf.GradientTape(persistent=True) as tape:
        loss = tf.reduce_sum(getattr(layers, merge)(dtype="float64")([x64, table]) ** 2)
        expected = tf.reduce_sum(op(x64, table) ** 2)
    got = tape.gradient(loss, table)
    assert got.shape == table.shape
    assert tolerances.relative_error(got, tape.gradient(expected, table)) <= RTOL64


@pytest.mark.parametrize("merge", ["Add", "Multiply"])
def test_compute_mask_accepts_non_boolean_masks_as_stock(merge):
    """Float and integer masks (nonzero: kept) are ORed as stock's ``ops.logical_or`` reads
    them (``tf.logical_or`` raised on them)."""
    x = np.zeros((2, 3, 2), "float32")
    masks = [tf.constant([[1.0, 0, 0], [1, 1, 0]]), tf.constant([[0, 0, 1], [1, 0, 0]])]
    got = getattr(layers, merge)().compute_mask([x, x], masks)
    expected = getattr(keras.layers, merge)().compute_mask([x, x], masks)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("merge", ["Add", "Multiply"])
def test_functional_merge_of_two_masked_inputs_builds_as_stock(merge):
    """A functional model merging two masked tensors builds (the masks' OR is taken on
    ``KerasTensor``s) and gives stock's values and mask."""
    x1 = np.array([[[0.0, 0], [1, 2], [0, 0], [3, 4]]], "float32")
    x2 = np.array([[[0.0, 0], [0, 0], [1, 2], [3, 4]]], "float32")
    outputs = []
    for module in (layers, keras.layers):
        a, b = keras.Input((4, 2)), keras.Input((4, 2))
        merged = getattr(module, merge)()([keras.layers.Masking()(a), keras.layers.Masking()(b)])
        model = keras.Model([a, b], merged)
        outputs.append(model([x1, x2]))
    ours, stock = outputs
    np.testing.assert_array_equal(ours, stock)
    np.testing.assert_array_equal(ours._keras_mask, stock._keras_mask)
    np.testing.assert_array_equal(ours._keras_mask, [[False, True, True, True]])
