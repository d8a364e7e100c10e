"""Checks shared by the convolution tests (Conv2D, Conv1D, Conv3D, Conv2DTranspose).

``built`` draws a layer's weights; ``values_and_gradients`` runs it under a tape;
``assert_sparse_path_equals_dense``: the memory guard's sparse ``T`` changes nothing.

The Jacobian accessors against autodiff of the reference route (stock TensorFlow ops,
``tf_jacbp.reference_mode``):

* ``assert_parameter_jacobian_is_autodiff``: ``parameter_jacobian`` in theta order, and its
  transpose times ``delta`` is ``backward``'s parameter gradient;
* ``assert_input_jacobian_is_autodiff``: ``input_jacobian`` (``D T(K)``, ``D T(K)^T``), and
  ``toeplitz_matrix()`` itself without an activation;
* ``assert_per_example_rows_sum_to_the_backward``: ``per_example_backward`` against ``backward``,
  and ``per_example_squared_norms`` against the rows it returns;
* ``assert_unknown_size_per_example_equals_static``: the same rows and norms traced for an
  unknown size.

Inputs of varying size: a model built on ``keras.Input`` with unknown spatial sizes gets, at
every size, the reference route's gradients:

* ``assert_fit_applies_the_reference_gradients``: ``fit`` with ``SGD(1.0)`` one batch at a
  time, the sizes differing, so that each step's update is the gradient of the mean squared
  error at the weights before it (Keras traces the first size static, then relaxes its step to
  unknown sizes);
* ``UpdatesMatchReference``: the same comparison at every step of one ``fit`` (a dataset whose
  batches have several sizes);
* ``assert_one_trace_gives_the_reference_gradients``: a ``tf.function`` traced once for unknown
  sizes.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_jacbp
from tf_jacbp import activations, tolerances
from tf_jacbp.layout import vec_parameter, vec_parameter_batch

RTOL64 = tolerances.rtol("float64")


def built(
    cls: type[keras.layers.Layer], input_shape: tuple[int, ...], seed: int = 0, **kwargs: object
) -> keras.layers.Layer:
    """``cls(dtype="float64", **kwargs)`` built for samples of ``input_shape``, with weights
    drawn from a standard normal (``seed``)."""
    layer = cls(dtype="float64", **kwargs)
    layer.build((None, *input_shape))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(size=w.shape) for w in layer.weights])
    return layer


def values_and_gradients(
    layer: keras.layers.Layer | tf.types.experimental.GenericFunction,
    x: tf.Tensor,
    upstream: tf.Tensor,
    variables: list[tf.Variable] | None = None,
) -> list[tf.Tensor]:
    """``[y, dL/dx, *dL/dvariables]`` for ``y = layer(x)`` and ``L = sum(upstream * y)``;
    ``variables`` default to the layer's trainable ones."""
    variables = layer.trainable_variables if variables is None else variables
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(upstream * y)
    return [y, *tape.gradient(loss, [x, *variables])]


def assert_sparse_path_equals_dense(
    cls: type[keras.layers.Layer], input_shape: tuple[int, ...], kwargs: dict, compiled: bool
) -> None:
    """A budget below the dense training step of ``cls(**kwargs)`` on a batch of samples of
    ``input_shape`` switches ``T`` to a ``tf.SparseTensor`` with a warning (and the layer stops
    claiming XLA support); the outputs and gradients are the dense layer's, eagerly or in a
    ``tf.function`` (``compiled``)."""
    dense = built(cls, input_shape, **kwargs)
    index = dense.conv_index
    budget = index.step_bytes("float64", sparse=True)
    assert index.step_bytes("float64", sparse=False) > budget
    with pytest.warns(UserWarning, match="sparse T"):
        sparse = built(
            cls, input_shape, toeplitz="materialize", toeplitz_budget_bytes=budget, **kwargs
        )
    assert not dense.sparse_toeplitz and sparse.sparse_toeplitz and not sparse.supports_jit
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(3, *input_shape)))
    upstream = tf.constant(rng.normal(size=dense.compute_output_shape(x.shape)))

    def step(layer):
        def run(x):
            return values_and_gradients(layer, x, upstream)

        return (tf.function(run) if compiled else run)(x)

    for got, want in zip(step(sparse), step(dense), strict=True):
        assert tolerances.relative_error(got, want) <= RTOL64


def assert_parameter_jacobian_is_autodiff(
    layer: keras.layers.Layer, input_shape: tuple[int, ...], seed: int = 2
) -> tuple[tf.Tensor, tf.Tensor]:
    """At a batch ``x`` of 2 samples of ``input_shape``: ``layer.parameter_jacobian(x)``
    ``(2, R, |theta|)`` is ``tape.jacobian`` of the reference route, columns in theta order
    (``Vec`` of each parameter); one sample's is the batch's row; and ``J^T delta`` at the first
    sample is ``backward``'s parameter gradients. Returns ``(x, J)``."""
    params = layer.read_parameters()
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(2, *input_shape)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(params)
        z = tf.reshape(layer.reference(x, *params), [2, -1])
    rows = z.shape[1]
    expected = tf.concat(
        [
            tf.reshape(
                vec_parameter_batch(tf.reshape(tape.jacobian(z, p), [-1, *p.shape])), [2, rows, -1]
            )
            for p in params
        ],
        axis=-1,
    )
    jacobian = layer.parameter_jacobian(x)
    assert jacobian.shape == (2, rows, sum(p.shape.num_elements() for p in params))
    assert tolerances.relative_error(jacobian, expected) <= RTOL64
    assert tolerances.relative_error(layer.parameter_jacobian(x[0]), jacobian[0]) <= RTOL64
    delta = tf.constant(rng.normal(size=layer.compute_output_shape((1, *input_shape))))
    _, grads = layer.backward(delta, x[:1], None, *params)
    fast = tf.concat([vec_parameter(g) for g in grads], axis=0)
    materialized = tf.linalg.matvec(jacobian[0], tf.reshape(delta, [-1]), transpose_a=True)
    assert tolerances.relative_error(materialized, fast) <= RTOL64
    return x, jacobian


def assert_input_jacobian_is_autodiff(
    layer: keras.layers.Layer, input_shape: tuple[int, ...], seed: int = 3
) -> tf.Tensor:
    """At one sample ``x`` of ``input_shape``: ``layer.input_jacobian(x)`` ``(R, N)`` is
    ``tape.jacobian`` of the reference route's activations, and without an activation
    (``D = I``) exactly ``layer.toeplitz_matrix()``. Returns ``x`` as a batch of one."""
    x = tf.constant(np.random.default_rng(seed).normal(size=(1, *input_shape)))
    with tf.GradientTape() as tape:
        tape.watch(x)
        with tf_jacbp.reference_mode():
            a = tf.reshape(layer(x), [-1])
    expected = tf.reshape(tape.jacobian(a, x), [a.shape[0], -1])
    jacobian = layer.input_jacobian(x[0])
    assert tolerances.relative_error(jacobian, expected) <= RTOL64
    if isinstance(layer.activation, activations.Linear):
        np.testing.assert_array_equal(jacobian, layer.toeplitz_matrix())
    return x


def assert_per_example_rows_sum_to_the_backward(
    layer: keras.layers.Layer, input_shape: tuple[int, ...], seed: int = 5
) -> None:
    """At a batch of 4 samples of ``input_shape`` and a random upstream gradient: the
    per-sample gradients (``per_example_backward``, a leading batch axis on each parameter's
    shape) sum to ``backward``'s, the first equals a batch of one's, ``dX`` is ``backward``'s,
    and ``per_example_squared_norms`` ``(4,)`` are the rows' squared norms."""
    params = layer.read_parameters()
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(4, *input_shape)))
    dz = tf.constant(rng.normal(size=layer.compute_output_shape((4, *input_shape))))
    dx, per_sample = layer.per_example_backward(dz, x, None, *params)
    dx_sum, summed = layer.backward(dz, x, None, *params)
    assert tolerances.relative_error(dx, dx_sum) <= RTOL64
    _, first = layer.backward(dz[:1], x[:1], None, *params)
    norms = layer.per_example_squared_norms(dz, x, None, *params)
    for g, total, one, norm in zip(per_sample, summed, first, norms, strict=True):
        assert g.shape == (4, *total.shape)
        assert tolerances.relative_error(tf.reduce_sum(g, axis=0), total) <= RTOL64
        assert tolerances.relative_error(g[0], one) <= RTOL64
        expected = tf.reduce_sum(tf.reshape(tf.square(g), [4, -1]), axis=1)
        assert norm.shape == (4,) and tolerances.relative_error(norm, expected) <= RTOL64


def assert_unknown_size_per_example_equals_static(
    layer: keras.layers.Layer, input_shape: tuple[int, ...], seed: int
) -> None:
    """``per_example_backward`` and ``per_example_squared_norms`` in a ``tf.function`` traced for
    an unknown spatial size equal the static route's, at a batch of 3 samples of
    ``input_shape``."""
    params = layer.read_parameters()
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(3, *input_shape)))
    dz = tf.constant(rng.normal(size=layer.compute_output_shape(x.shape)))
    unknown = (None,) * (len(input_shape) - 1)
    signature = [tf.TensorSpec((None, *unknown, t.shape[-1]), "float64") for t in (dz, x)]

    @tf.function(input_signature=signature)
    def dynamic(dz, x):
        dx, grads = layer.per_example_backward(dz, x, None, *params)
        return dx, grads, layer.per_example_squared_norms(dz, x, None, *params)

    dx, grads, norms = dynamic(dz, x)
    want_dx, want_grads = layer.per_example_backward(dz, x, None, *params)
    want_norms = layer.per_example_squared_norms(dz, x, None, *params)
    for got, want in zip([dx, *grads, *norms], [want_dx, *want_grads, *want_norms], strict=True):
        assert tolerances.relative_error(got, want) <= RTOL64


def compiled_sgd(model: keras.Model) -> keras.Model:
    """``model`` compiled with ``SGD(1.0)``, whose update is the gradient, and a float64 MSE."""
    model.compile(
        optimizer=keras.optimizers.SGD(1.0), loss=keras.losses.MeanSquaredError(dtype="float64")
    )
    return model


def reference_gradients(model: keras.Model, x: np.ndarray, y: np.ndarray) -> list[tf.Tensor]:
    """The reference route's gradient of the mean squared error with respect to the weights."""
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            loss = tf.reduce_mean(tf.square(model(x) - y))
    return tape.gradient(loss, model.trainable_variables)


def batches(
    model: keras.Model, shapes: list[tuple[int, ...]], seed: int, autoencoder: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One batch ``(x, y)`` of 3 per sample shape in ``shapes``, float32 values (fit may hand
    float64 over as float32) in float64; ``y`` is ``x`` for an ``autoencoder``."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        x = rng.normal(size=(3, *shape)).astype("float32").astype("float64")
        if autoencoder:
            out.append((x, x))
            continue
        y = rng.normal(size=model.compute_output_shape(x.shape)).astype("float32")
        out.append((x, y.astype("float64")))
    return out


def dataset(batches: list[tuple[np.ndarray, np.ndarray]]) -> tf.data.Dataset:
    """The batches as a dataset whose spatial sizes are unknown: fit traces its step once."""
    shapes = [(None,) * len(part.shape[:-1]) + part.shape[-1:] for part in batches[0]]
    return tf.data.Dataset.from_generator(
        lambda: iter(batches),
        output_signature=tuple(tf.TensorSpec(s, "float64") for s in shapes),
    )


def assert_fit_applies_the_reference_gradients(
    model: keras.Model, batches: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    """``fit`` the ``compiled_sgd`` model on each batch in turn (no ``make_train_function``)
    and assert that each step's update is the reference route's gradient."""
    for x, y in batches:
        expected = reference_gradients(model, x, y)
        before = [v.numpy() for v in model.trainable_variables]
        model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
        for b, v, g in zip(before, model.trainable_variables, expected, strict=True):
            assert tolerances.relative_error(b - v.numpy(), g) <= RTOL64


class UpdatesMatchReference(keras.callbacks.Callback):
    """With ``SGD(1.0)`` a step's update is the gradient at the weights before it: at each batch
    of ``batches`` compare it with the reference route's gradient (mean squared error)."""

    def __init__(self, batches: list[tuple[np.ndarray, np.ndarray]]):
        super().__init__()
        self.batches, self.errors = batches, []

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        x, y = self.batches[batch]
        self.expected = reference_gradients(self.model, x, y)
        self.before = [v.numpy() for v in self.model.trainable_variables]

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        after = self.model.trainable_variables
        self.errors.append(
            max(
                tolerances.relative_error(b - v.numpy(), g)
                for b, v, g in zip(self.before, after, self.expected, strict=True)
            )
        )


def assert_one_trace_gives_the_reference_gradients(
    model: keras.Model, shapes: list[tuple[int, ...]], seed: int, jit_compile: bool = False
) -> None:
    """Assert that a ``tf.function`` of the input and weight gradients of ``sum(model(x)^2)``,
    traced once for unknown sizes (its tracing count stays 1), gives the reference route's at a
    batch of 2 of each sample shape in ``shapes``."""

    def gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(model(x)))
        return tape.gradient(loss, [x, *model.trainable_variables])

    rank = len(model.input_shape) - 2
    signature = [tf.TensorSpec((None,) * (rank + 1) + model.input_shape[-1:], "float64")]
    compiled = tf.function(gradients, input_signature=signature, jit_compile=jit_compile)
    rng = np.random.default_rng(seed)
    for shape in shapes:
        x = tf.constant(rng.normal(size=(2, *shape)))
        with tf_jacbp.reference_mode():
            expected = gradients(x)
        for got, want in zip(compiled(x), expected, strict=True):
            assert tolerances.relative_error(got, want) <= RTOL64
    assert compiled.experimental_get_tracing_count() == 1


def _reference_products(layer, m, x, params, per_sample):
    """``[(J_x F)^T m[v], (J_p F)^T m[v] ...]`` by autodiff of the reference route, for each
    vector ``v`` (and each sample ``i`` with ``per_sample``; the input products are per sample
    either way)."""

    def one(m_v, x_v):
        with tf.GradientTape() as tape:
            tape.watch([x_v, *params])
            loss = tf.reduce_sum(m_v * layer.reference(x_v, *params))
        return tape.gradient(loss, [x_v, *params])

    stacks = []
    for m_v in m:
        if per_sample:
            rows = [one(m_v[i : i + 1], x[i : i + 1]) for i in range(x.shape[0])]
            stacks.append(
                [tf.concat([r[0] for r in rows], 0)]
                + [tf.stack([r[k] for r in rows]) for k in range(1, len(params) + 1)]
            )
        else:
            stacks.append(one(m_v, x))
    return [tf.stack([s[k] for s in stacks]) for k in range(len(params) + 1)]


def assert_contract_is_autodiff(
    layer: keras.layers.Layer,
    input_shape: tuple[int, ...],
    stacks: int = 3,
    seed: int = 7,
    unknown_size: bool = False,
) -> None:
    """The contract (``tf_jacbp.contract``) at a batch of 2 samples of ``input_shape`` and
    ``stacks`` random vectors per sample: ``vjp_input`` ``(V, 2, *input_shape)`` and
    ``vjp_params`` with ``sum_batch`` both ways (``(V, *p.shape)``, ``(V, 2, *p.shape)``) are
    autodiff's products of the reference route for each vector, and ``squared_norms`` (``V = 1``)
    the squared norms of ``vjp_params(sum_batch=False)``. With ``unknown_size`` the products run
    in a ``tf.function`` traced for unknown spatial sizes (the index maps of
    ``tf_jacbp.toeplitz_dynamic``)."""
    params = layer.read_parameters()
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(2, *input_shape)))
    out_shape = layer.compute_output_shape(x.shape)
    m = tf.constant(rng.normal(size=(stacks, *out_shape)))

    def products(m, x):
        return (
            layer.vjp_input(m, x, None, *params),
            layer.vjp_params(m, x, None, *params, sum_batch=True),
            layer.vjp_params(m, x, None, *params, sum_batch=False),
            layer.squared_norms(m[:1], x, None, *params),
        )

    if unknown_size:
        spatial = (None,) * (len(input_shape) - 1)
        signature = [
            tf.TensorSpec((stacks, None, *spatial, out_shape[-1]), "float64"),
            tf.TensorSpec((None, *spatial, input_shape[-1]), "float64"),
        ]
        products = tf.function(products, input_signature=signature)
    dx, summed, per_sample, norms = products(m, x)
    want_dx, *want_summed = _reference_products(layer, m, x, params, per_sample=False)
    _, *want_per_sample = _reference_products(layer, m, x, params, per_sample=True)
    assert dx.shape == (stacks, *x.shape)
    assert tolerances.relative_error(dx, want_dx) <= RTOL64
    for p, got, want in zip(params, summed, want_summed, strict=True):
        assert got.shape == (stacks, *p.shape)
        assert tolerances.relative_error(got, want) <= RTOL64
    for p, got, want in zip(params, per_sample, want_per_sample, strict=True):
        assert got.shape == (stacks, 2, *p.shape)
        assert tolerances.relative_error(got, want) <= RTOL64
    for got, rows in zip(norms, per_sample, strict=True):
        expected = tf.reduce_sum(tf.reshape(tf.square(rows[0]), [2, -1]), axis=1)
        assert got.shape == (2,) and tolerances.relative_error(got, expected) <= RTOL64


def assert_another_size_after_an_eager_call(
    cls: type[keras.layers.Layer],
    stock_cls: type[keras.layers.Layer],
    first: tuple[int, ...],
    second: tuple[int, ...],
    **kwargs: object,
) -> None:
    """A layer built by an eager call at samples of shape ``first`` takes samples of shape
    ``second`` next, as the stock Keras layer does (its ``input_spec`` fixes only the channels),
    with the stock layer's values and gradients at the same weights."""
    rng = np.random.default_rng(11)
    ours = cls(dtype="float64", **kwargs)
    stock = stock_cls(dtype="float64", **kwargs)
    x = tf.constant(rng.normal(size=(2, *first)))
    ours(x), stock(x)
    stock.set_weights(ours.get_weights())
    y = tf.constant(rng.normal(size=(3, *second)))
    upstream = tf.constant(rng.normal(size=stock.compute_output_shape(y.shape)))
    got = values_and_gradients(ours, y, upstream)
    for g, want in zip(got, values_and_gradients(stock, y, upstream), strict=True):
        assert tolerances.relative_error(g, want) <= RTOL64
