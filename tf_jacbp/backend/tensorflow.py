"""The TensorFlow pieces of tf_jacbp's layers, activations and losses (``tf_jacbp.backend``).

Each section belongs to one family of maps; a function here has no ``keras.ops`` form (a
``tf.custom_gradient``, a run-time assertion, a ``SparseTensor`` product, a graph whose sizes are
known only when it runs) and says why in its docstring.
"""

from __future__ import annotations

import math

from tf_jacbp._backend import tf

__all__: list[str] = []

# --- route: the custom gradient ------------------------------------------------------------

# --- inputs: sparse and ragged tensors -----------------------------------------------------


def refuse_sparse_input(x: object, name: str) -> None:
    """A ``TypeError`` naming the conversion if ``x`` is a ``tf.SparseTensor`` or
    ``tf.RaggedTensor``: the Jacobian formulas are dense. Sparse and ragged tensors are
    TensorFlow types, with no ``keras.ops`` test."""
    if isinstance(x, tf.SparseTensor | tf.RaggedTensor):
        raise TypeError(
            f"Layer '{name}' got a {type(x).__name__} input; tf_jacbp layers take dense tensors "
            "(their Jacobians are dense formulas). Convert it first: tf.sparse.to_dense(x) for "
            "a SparseTensor, x.to_tensor() for a RaggedTensor (in the model or the input pipeline)."
        )


__all__ += ["refuse_sparse_input"]

# --- activations and losses: label checks, assertions --------------------------------------


def tensorflow_activation_functions() -> list[tuple[str, object, str, dict]]:
    """TensorFlow's own activation functions that ``tf_jacbp.activations.get`` accepts:
    ``[("tf.nn.relu", tf.nn.relu, "relu", {}), ...]`` (qualified name, function, tf_jacbp
    name, keyword arguments), for the attributes this TensorFlow has. ``tf.nn.relu`` and its kin
    are TensorFlow's functions, not Keras': only this backend can name them."""
    table: dict[tuple[str, str], tuple[str, dict]] = {}
    for name in "relu relu6 leaky_relu elu selu softplus softsign silu swish gelu softmax".split():
        table["tf.nn", name] = (name, {})
    for module in ("tf.nn", "tf.math", "tf"):
        table[module, "tanh"] = ("tanh", {})
        table[module, "sigmoid"] = ("sigmoid", {})
    table["tf.math", "softplus"] = ("softplus", {})
    table["tf.math", "log_sigmoid"] = ("log_sigmoid", {})
    table["tf.math", "exp"] = ("exponential", {})
    table["tf", "exp"] = ("exponential", {})
    table["tf", "identity"] = ("linear", {})
    modules = {"tf.nn": tf.nn, "tf.math": tf.math, "tf": tf}
    rows = []
    for (module, attribute), (name, kwargs) in table.items():
        function = getattr(modules[module], attribute, None)
        if function is not None:
            rows.append((f"{module}.{attribute}", function, name, kwargs))
    return rows


def executing_eagerly(*tensors: object) -> bool:
    """Whether ops run now (eager), not into a graph being traced (``tf.function``, Keras' step
    functions). A label check raises a Python error eagerly and builds an assertion in a
    graph; Keras has no public test for the two."""
    return tf.executing_eagerly()


def assert_before(condition: object, data: list, *tensors: object) -> tuple:
    """``tensors``, each made to depend on ``tf.debugging.Assert(condition, data)``: whatever
    is computed from them (a loss, its gradient) waits for the assertion, which raises
    ``InvalidArgumentError`` with ``data`` (strings and tensors, printed in order) when
    ``condition`` (a boolean scalar) is false as the graph runs. A run-time assertion has no
    ``keras.ops`` form. XLA compiles it away (``tf_jacbp.losses.labels`` handles that case)."""
    check = tf.debugging.Assert(condition, data)
    with tf.control_dependencies([check]):
        return tuple(tf.identity(t) for t in tensors)


def label_record() -> object:
    """A new non-trainable float64 variable of three zeros, ``[flag, value, count]``, where a
    loss records a bad label seen in a step compiled with XLA (``tf_jacbp.losses.labels``).
    Made in ``tf.init_scope``, outside any graph being traced (a variable created while a
    ``tf.function`` traces makes it trace twice), which Keras has no form of."""
    with tf.init_scope():
        return tf.Variable(tf.zeros([3], tf.float64), trainable=False, name="bad_label")


def traced_graphs(step: object = None) -> list:
    """The graph being traced now (the default graph) followed by the graphs it is nested in
    (a ``tf.cond`` branch's function graph, then the ``tf.function``'s, ...): what a label
    record written while tracing a step is keyed by, so that the optimizer's ``apply`` traced in
    the same step finds it. Graphs are TensorFlow's; Keras has no such notion. ``step`` (the
    running ``tf_jacbp.hooks.Step``) is JAX's key, unused here."""
    graphs, graph = [], tf.compat.v1.get_default_graph()
    while graph is not None:
        graphs.append(graph)
        graph = getattr(graph, "outer_graph", None)
    return graphs


def has_distribution_strategy() -> bool:
    """Whether a ``tf.distribute`` strategy is in scope (TensorFlow's distribution, which has no
    ``keras.ops`` test): there the replicas' steps cannot share one label record."""
    return tf.distribute.has_strategy()


def label_error(message: str) -> Exception:
    """The error a bad label raises after a step: TensorFlow's ``InvalidArgumentError``, the
    type a graph-mode assertion (``assert_before``) raises, so that callers catch one type
    whether the step ran as a graph or under XLA."""
    return tf.errors.InvalidArgumentError(None, None, message)


__all__ += [
    "assert_before",
    "executing_eagerly",
    "has_distribution_strategy",
    "label_error",
    "label_record",
    "tensorflow_activation_functions",
    "traced_graphs",
]

# --- dense, merges, normalization ----------------------------------------------------------

# --- convolutions: Toeplitz products (sparse fallback, unknown sizes) ----------------------


class IndexTensors:
    """Named integer index maps (NumPy, computed once) handed to TensorFlow as tensors.

    Each map is given as an array or as a function computing it, called on first use (so a
    layer holds only the maps its route reads). ``maps[name]`` is a constant of the graph being
    traced (one per graph, however often it is read), so that traced functions, custom gradients
    and exported SavedModels hold the map itself (a custom gradient that captures an eager tensor
    cannot be exported); executing eagerly, it is a tensor created once and cached. No
    ``keras.ops`` form: which graph is being traced is TensorFlow's notion.
    """

    def __init__(self, **arrays: object):
        import weakref

        self._sources = arrays
        self.arrays: dict = {}
        self._eager: dict = {}
        self._graphs = weakref.WeakKeyDictionary()

    def array(self, name: str) -> object:
        """The NumPy map ``name``, computed on first use."""
        if name not in self.arrays:
            source = self._sources[name]
            self.arrays[name] = source() if callable(source) else source
        return self.arrays[name]

    def __getitem__(self, name: str) -> object:
        if tf.executing_eagerly():
            cache = self._eager
        else:  # one constant per graph, however often the graph reads the map
            cache = self._graphs.setdefault(tf.compat.v1.get_default_graph(), {})
        if name not in cache:
            cache[name] = tf.constant(self.array(name))
        return cache[name]


def sparse_matrix(indices: object, values: object, shape: tuple) -> object:
    """A ``tf.SparseTensor`` of ``shape`` with ``values`` at the int64 ``(row, column)``
    ``indices`` (sorted row-major): the sparse ``T(K)`` of the memory guard's fallback. Keras
    has no sparse tensor type of its own."""
    return tf.SparseTensor(indices, values, shape)


def is_sparse(t: object) -> bool:
    """Whether ``t`` is a ``tf.SparseTensor`` (the sparse ``T(K)``)."""
    return isinstance(t, tf.SparseTensor)


def sparse_product(t: object, rows: object, transpose: bool = False) -> object:
    """``rows T^T`` (``transpose``: ``rows T``) for a sparse ``T`` ``(R, N)``, through the adjoint:
    ``(T rows^T)^T`` and ``(T^T rows^T)^T`` by ``tf.sparse.sparse_dense_matmul`` (no XLA kernel;
    the memory guard turns XLA off for such layers). ``rows`` ``(n, N)`` (``(n, R)``)."""
    product = tf.sparse.sparse_dense_matmul(t, rows, adjoint_a=transpose, adjoint_b=True)
    return tf.transpose(product)


__all__ += ["IndexTensors", "is_sparse", "sparse_matrix", "sparse_product"]


def bias_add(z: object, bias: object) -> object:
    """``z + bias`` for ``z`` ``(rows, R)`` and ``bias`` ``(R,)``, as TensorFlow's ``BiasAdd``:
    the convolutions' forward ``Z = X T(K)^T + b``. TensorFlow's graph optimizer (the remapper)
    fuses ``MatMul`` followed by ``BiasAdd`` into one kernel, but not ``MatMul`` followed by the
    ``AddV2`` that ``keras.ops.add`` emits (measured on LeNet-5's step), so the op is named here;
    on another backend this is ``keras.ops.add``."""
    return tf.nn.bias_add(z, bias)


__all__ += ["bias_add"]

# --- pooling, reshaping, dropout, embedding ------------------------------------------------


def xla_function(function: object) -> object:
    """``function`` compiled with XLA (``tf.function(jit_compile=True, autograph=False)``):
    the pooling layers run their gathers, comparisons and products as a few fused loops when
    traced into a graph. Keras compiles whole step functions only; it has no ``keras.ops`` form
    that compiles one function."""
    return tf.function(function, jit_compile=True, autograph=False)


def dynamic_window_index(
    x: object, pool_size: tuple, strides: tuple, padding: str
) -> tuple[object, object, object, tuple]:
    """The window index maps of pooling (``tf_jacbp.layers.pool_windows.WindowMaps``) for an
    input ``x`` ``(batch, n_1, ..., n_k, C)`` whose spatial sizes a traced graph knows only when
    it runs: ``(window_index, inside, size, output_sizes)``.

    Along axis ``a`` output ``o`` reads ``o s_a - pad_before + t`` (``t < p_a``;
    ``tf_jacbp.geometry.axis_taps``), ``-1`` where that falls in the padding.
    ``window_index`` ``(P, S)`` int32: the row-major input position of slot ``s`` (row-major
    over the taps) of window ``o`` (row-major over the outputs), or ``size = n_1 ... n_k`` for a
    slot in the padding; ``inside`` ``(P, S)`` bool; ``output_sizes`` the ``k`` output sizes
    (scalar tensors). Sizes known only at run time make a graph of ``tf.shape``, ``tf.range``
    and ``tf.where`` that has no ``keras.ops`` form (``keras.ops.arange`` needs Python ints)."""
    rank = len(pool_size)
    sizes = [tf.shape(x)[1 + a] for a in range(rank)]
    taps, outputs = [], []
    for a in range(rank):
        size, kernel, stride = sizes[a], pool_size[a], strides[a]
        if padding == "same":
            out = (size + stride - 1) // stride
            before = tf.maximum((out - 1) * stride + kernel - size, 0) // 2
        else:
            out, before = (size - kernel) // stride + 1, 0
        tap = tf.range(out)[:, None] * stride - before + tf.range(kernel)[None, :]
        shape = [1] * (2 * rank)
        shape[a], shape[rank + a] = -1, kernel
        taps.append(tf.reshape(tf.where((tap >= 0) & (tap < size), tap, -1), shape))
        outputs.append(out)
    inside, flat, step = None, 0, 1
    for a in reversed(range(rank)):
        inside = taps[a] >= 0 if inside is None else inside & (taps[a] >= 0)
        flat = flat + taps[a] * step
        step = step * sizes[a]
    slots = 1
    for kernel in pool_size:
        slots *= kernel
    window = tf.where(inside, flat, step)
    return (
        tf.reshape(window, [-1, slots]),
        tf.reshape(inside, [-1, slots]),
        step,
        tuple(outputs),
    )


def checked_ids(ids: object, input_dim: int, message: str) -> object:
    """``ids`` (an integer tensor) made to depend on assertions that every id lies in
    ``[-input_dim, input_dim)``: an ``InvalidArgumentError`` with ``message`` eagerly and when
    a graph runs (XLA compiles the assertions away). Run-time assertions have no ``keras.ops``
    form."""
    vocabulary = tf.cast(input_dim, ids.dtype)
    checks = [
        tf.debugging.assert_greater_equal(ids, -vocabulary, message=message),
        tf.debugging.assert_less(ids, vocabulary, message=message),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(ids)


def gather_rows(table: object, ids: object) -> object:
    """``table[ids]``: row ``ids[...]`` of ``table`` at each position, ``tf.gather`` exactly
    (no wrapping of negative ids; under XLA an id outside ``[0, len(table))`` is clamped).
    ``keras.ops.take`` wraps negative ids first, so an Embedding's already wrapped ids would be
    wrapped again and, under XLA, an id below ``-V`` read another row than stock Keras'."""
    return tf.gather(table, ids)


__all__ += ["checked_ids", "dynamic_window_index", "gather_rows", "xla_function"]


# --- autodiff and float64: the witnesses' tools ------------------------------------------


def value_and_gradients(function: object, tensors: list) -> tuple[object, list]:
    """``(f, [df/dt for t in tensors])`` for a scalar ``f = function(*tensors)``, by
    TensorFlow's autodiff (``tf.GradientTape``): the witnesses' gradient. A tensor ``f`` does
    not depend on gets a zero gradient."""
    tensors = [tf.convert_to_tensor(t) for t in tensors]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        value = function(*tensors)
    grads = tape.gradient(value, tensors, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return value, list(grads)


def float64_enabled() -> bool:
    """Whether float64 computes in float64: always on TensorFlow."""
    return True


def require_float64(what: str) -> None:
    """Nothing on TensorFlow, where float64 is always float64 (``float64_enabled``)."""


__all__ += ["float64_enabled", "require_float64", "value_and_gradients"]


# --- convolutions: the index of T(K) for sizes known only when the graph runs --------------
# (tf_jacbp.toeplitz_dynamic.DynamicConvIndex multiplies through these maps.)


def _starts(outputs: object, stride: int, before: object) -> object:
    """``(out,)``: the first input each output reads, ``o s - pad_before``."""
    return tf.range(outputs) * stride - before


def _dynamic_axis_taps(
    size: object, kernel_size: int, stride: int, padding: str, dilation: int
) -> tuple[object, object, object]:
    """``tf_jacbp.geometry.axis_taps`` with TensorFlow ops for a run-time ``size`` (int32
    scalar): ``(taps, pad_before, pad_after)``, ``taps`` ``(out, k)`` with ``taps[o, t] = o s -
    pad_before + t d`` or -1 outside ``[0, size)``, the padding as
    ``geometry.padding_amounts``. A "valid" axis shorter than the dilated kernel asserts when
    the graph runs."""
    extent = (kernel_size - 1) * dilation + 1
    checks = []
    if padding == "valid":
        out = (size - extent) // stride + 1
        before = after = tf.zeros([], tf.int32)
        message = (
            f"a kernel spanning {extent} (kernel_size {kernel_size}, dilation_rate {dilation}) "
            "is longer than an input axis, so padding valid has no output; use padding "
            "same, a smaller kernel_size or a larger input. Input size:"
        )
        checks.append(tf.debugging.Assert(size >= extent, [message, size]))
    else:
        out = (size + stride - 1) // stride
        if padding == "same":
            total = tf.maximum((out - 1) * stride + extent - size, 0)
            before, after = total // 2, total - total // 2
        else:  # causal
            before, after = tf.constant((kernel_size - 1) * dilation), tf.zeros([], tf.int32)
    with tf.control_dependencies(checks):
        outputs = tf.identity(out)
    taps = _starts(outputs, stride, before)[:, None] + tf.range(kernel_size)[None, :] * dilation
    return tf.where((taps >= 0) & (taps < size), taps, -1), before, after


def _dynamic_inverse_taps(
    size: object, outputs: object, kernel_size: int, stride: int, before: object, dilation: int
) -> object:
    """``(size, out)``: for input ``i'`` and output ``o`` the tap ``t = (i' - o s +
    pad_before) / d`` when that is an integer in ``[0, k)``, else -1
    (``tf_jacbp.toeplitz._inverse_taps``). ``size x out`` entries, about as many as the dense
    ``T`` has per channel pair along this axis: built only under the memory guard."""
    offset = tf.range(size)[:, None] - _starts(outputs, stride, before)[None, :]
    tap = offset // dilation
    valid = (offset >= 0) & (offset % dilation == 0) & (tap < kernel_size)
    return tf.where(valid, tap, -1)


def _dynamic_place(t: object, ndim: int, axes: tuple[int, ...]) -> object:
    """``t`` (one axis per entry of ``axes``, increasing) viewed with ``ndim`` axes, its own at
    ``axes`` and size 1 elsewhere, for broadcasting."""
    shape = [1] * ndim
    for i, axis in enumerate(axes):
        shape[axis] = tf.shape(t)[i]
    return tf.reshape(t, tf.stack(shape))


class DynamicConvMaps:
    """The index maps of ``T(K)`` (``tf_jacbp.toeplitz.ConvIndex``'s, entry for entry) for ``n``
    spatial sizes known only when a traced graph runs, computed by that graph
    (``dynamic_conv_maps``).

    ``sizes``: ``n`` int32 scalar tensors (``tf.shape(x)[1:-1]``); the kernel
    ``(k_1, ..., k_n, C, F)``, strides and dilation (``n`` ints) and padding static.
    ``input_shape`` ``(s_1, ..., s_n, C)``, ``output_shape`` ``(o_1, ..., o_n, F)`` and ``shape``
    ``(R, N)`` hold tensors where a size enters; ``taps`` and ``paddings`` per axis as
    ``_dynamic_axis_taps``. ``index_map(name)`` builds a map on first use and keeps it.
    """

    def __init__(
        self,
        sizes: tuple,
        kernel_shape: tuple[int, ...],
        strides: tuple[int, ...],
        padding: str,
        dilation_rate: tuple[int, ...],
    ):
        channels, filters = kernel_shape[-2:]
        sizes = tuple(tf.cast(n, tf.int32) for n in sizes)
        self.rank = len(sizes)
        self.input_shape = (*sizes, channels)
        self.kernel_shape = tuple(kernel_shape)
        self.strides, self.padding, self.dilation_rate = strides, padding, dilation_rate
        taps, paddings = [], []
        for size, k, stride, dilation in zip(
            sizes, kernel_shape[:-2], strides, dilation_rate, strict=True
        ):
            axis, *pad = _dynamic_axis_taps(size, k, stride, padding, dilation)
            taps.append(axis)
            paddings.append(tuple(pad))
        self.taps, self.paddings = tuple(taps), tuple(paddings)
        self.output_shape = (*(tf.shape(t)[0] for t in self.taps), filters)
        self.shape = (math.prod(self.output_shape), math.prod(self.input_shape))
        self._maps: dict[str, object] = {}

    def dense_bytes(self, dtype: object) -> object:
        """Bytes of a dense ``T``, ``R N`` entries of ``dtype``, as an int64 scalar tensor."""
        rows, columns = (tf.cast(n, tf.int64) for n in self.shape)
        return rows * columns * tf.as_dtype(dtype).size

    def after_check(self, condition: object, data: list, build: object) -> object:
        """``build()``, every op it creates running after ``tf.debugging.Assert(condition,
        data)`` (an ``InvalidArgumentError`` printing ``data`` when the graph runs): the memory
        guard of the dense ``T``, whose maps and gathers must not allocate before it passes."""
        with tf.control_dependencies([tf.debugging.Assert(condition, data, summarize=8)]):
            return build()

    def index_map(self, name: str) -> object:
        """The int32 map ``name`` (``kernel_rows``, ``block_rows``, ``patch_index``,
        ``stored_patch_index``), flattened as ``ConvIndex``'s are read; built on first use."""
        if name not in self._maps:
            self._maps[name] = getattr(self, f"_{name}")()
        return self._maps[name]

    def _inverse(self, axis: int) -> object:
        """``_dynamic_inverse_taps`` along spatial ``axis``, ``(size, out)``."""
        taps, (before, _) = self.taps[axis], self.paddings[axis]
        return _dynamic_inverse_taps(
            self.input_shape[axis],
            tf.shape(taps)[0],
            self.kernel_shape[axis],
            self.strides[axis],
            before,
            self.dilation_rate[axis],
        )

    def _lead_taps(self) -> int:
        return math.prod(self.kernel_shape[:-3])

    def _entries(self) -> int:
        return math.prod(self.kernel_shape[:-1])

    def _kernel_rows(self) -> object:
        """``(L C W + 1) o_n``: for block row ``(l, c, j')`` and output column ``j`` the row
        ``(l k_n + q) C + c`` of ``K`` as ``(M, F)``, ``q`` the tap reading ``j'``, else ``M``
        (``ConvIndex.block_index``)."""
        kw, channels = self.kernel_shape[-3], self.kernel_shape[-2]
        q = self._inverse(self.rank - 1)[None, None]  # (1, 1, W, o_n)
        r = tf.range(self._lead_taps())[:, None, None, None]
        c = tf.range(channels)[None, :, None, None]
        rows = tf.where(q >= 0, (r * kw + q) * channels + c, self._entries())  # (L, C, W, o_n)
        rows = tf.reshape(rows, [-1, self.output_shape[-2]])
        zero_block = tf.fill([1, self.output_shape[-2]], self._entries())
        return tf.reshape(tf.concat([rows, zero_block], axis=0), [-1])

    def _block_rows(self) -> object:
        """``N o_1 ... o_{n-1}``: for row ``(i', j', c)`` of ``T^T`` and leading output position
        ``i`` the block row ``(l C + c) W + j'``, ``l`` the flat leading taps reading ``i'``,
        else ``L C W`` (the zero block; ``ConvIndex.block_index``)."""
        n, (width, channels) = self.rank, self.input_shape[-2:]
        ndim = 2 * n  # axes (s_1..s_{n-1}, W, C, o_1..o_{n-1})
        flat, missing = tf.zeros([], tf.int32), None
        for a in range(n - 1):
            p = _dynamic_place(self._inverse(a), ndim, (a, n + 1 + a))
            flat = flat * self.kernel_shape[a] + tf.maximum(p, 0)
            missing = p < 0 if missing is None else missing | (p < 0)
        c = _dynamic_place(tf.range(channels), ndim, (n,))
        j_in = _dynamic_place(tf.range(width), ndim, (n - 1,))
        rows = (flat * channels + c) * width + j_in
        if missing is not None:
            rows = tf.where(missing, self._lead_taps() * channels * width, rows)
        return tf.reshape(rows, [-1])

    def _storage_patch_index(self, padding_reads: object) -> object:
        """``(k_1, ..., k_n, C, o_1, ..., o_n)``: the input position (row-major
        ``(i'_1, ..., i'_n, c)``) that entry ``(p, c)`` reads at output position ``i``, or
        ``padding_reads``."""
        n = self.rank
        ndim = 2 * n + 1
        index, missing = tf.zeros([], tf.int32), None
        for a in range(n):
            read = _dynamic_place(tf.transpose(self.taps[a]), ndim, (a, n + 1 + a))
            index = index * self.input_shape[a] + read
            missing = read < 0 if missing is None else missing | (read < 0)
        channels = _dynamic_place(tf.range(self.input_shape[-1]), ndim, (n,))
        index = index * self.input_shape[-1] + channels
        return tf.where(missing, padding_reads, index)

    def _patch_index(self) -> object:
        """``(M, P)``: ``ConvIndex.patch_index``, rows in ``Vec`` order (the storage axes
        ``(p_1, ..., p_n, c)`` reversed), padding reading ``N``."""
        n = self.rank
        perm = [*range(n, -1, -1), *range(n + 1, 2 * n + 1)]
        index = tf.transpose(self._storage_patch_index(self.shape[1]), perm)
        return tf.reshape(index, [self._entries(), -1])

    def _stored_patch_index(self) -> object:
        """``(M + 1, P)``: ``ConvIndex.stored_patch_index``, rows in storage order
        ``(p_1, ..., p_n, c)``, padding reading ``N + 1``, a last row reading ``N`` (the tied
        bias' constant 1)."""
        index = tf.reshape(self._storage_patch_index(self.shape[1] + 1), [self._entries(), -1])
        ones = tf.fill([1, tf.shape(index)[1]], self.shape[1])
        return tf.concat([index, ones], axis=0)


def dynamic_conv_maps(
    sizes: tuple,
    kernel_shape: tuple[int, ...],
    strides: tuple[int, ...],
    padding: str,
    dilation_rate: tuple[int, ...],
) -> DynamicConvMaps:
    """The index maps of ``T(K)`` for ``n`` spatial ``sizes`` known only when the traced graph
    runs (``DynamicConvMaps``; ``tf_jacbp.toeplitz_dynamic.DynamicConvIndex`` multiplies through
    them). Keras' ``fit`` traces its step with the sizes unknown after a second input size; the
    maps are then a graph of ``tf.shape``, ``tf.range`` and ``tf.where`` computed from the sizes,
    with ``tf.debugging.Assert`` checks (a "valid" window longer than the input, the memory
    guard) run as the graph runs: no ``keras.ops`` form (``keras.ops.arange`` needs Python ints,
    and Keras has no run-time assertion)."""
    return DynamicConvMaps(sizes, kernel_shape, strides, padding, dilation_rate)


__all__ += ["dynamic_conv_maps"]


# --- tf_jacbp.jacobian: sparse inputs, compiled functions, autodiff Jacobians ----------------


def dense_conversion(x: object, name: str) -> str | None:
    """How to make ``x`` dense if it is a ``tf.SparseTensor`` (``tf.sparse.to_dense(x)``) or a
    ``tf.RaggedTensor`` (``x.to_tensor()``), spelled with ``name``; None for a dense value.
    Sparse and ragged tensors are TensorFlow types, with no ``keras.ops`` test."""
    if isinstance(x, tf.SparseTensor):
        return f"tf.sparse.to_dense({name})"
    if isinstance(x, tf.RaggedTensor):
        return f"{name}.to_tensor()"
    return None


def compiled_model_function(function: object, variables: object) -> object:
    """``function(*tensors)`` compiled once per input signature, reading the current values of
    the variables it uses at each call (``tf.function(reduce_retracing=True,
    autograph=False)``: plain Python control flow over the layers, traced once). ``variables``
    (a callable giving them) is JAX's concern: a ``tf.function`` reads variables itself."""
    return tf.function(function, reduce_retracing=True, autograph=False)


def jacobians(function: object, tensors: list) -> list:
    """``[J_t f for t in tensors]`` for a tensor ``f = function(*tensors)``, each of shape
    ``f.shape + t.shape``, by TensorFlow's autodiff (``tf.GradientTape.jacobian``): the tests'
    reference for ``tf_jacbp.jacobian.parameter_jacobian`` and ``per_example_gradients``. A
    tensor ``f`` does not depend on gets a zero Jacobian."""
    tensors = [tf.convert_to_tensor(t) for t in tensors]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        value = function(*tensors)
    grads = tape.jacobian(value, tensors, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return list(grads)


__all__ += ["compiled_model_function", "dense_conversion", "jacobians"]


# --- privacy: DP-SGD's noise, step count and Poisson batches (tf_jacbp.privacy) ------------


def do_not_convert(function: object) -> object:
    """``function`` kept out of AutoGraph (``tf.autograph.experimental.do_not_convert``): its
    Python loops over the layers are traced as plain Python, as Keras' own train steps are."""
    return tf.autograph.experimental.do_not_convert(function)


def noise_seed_generator(seed: int, name: str) -> object:
    """DP-SGD's noise generator: ``keras.random.SeedGenerator(seed)``, whose state ``[seed,
    draws]`` (int64, the whole 62-bit seed) seeds TensorFlow's stateless Philox normals; each
    draw moves ``draws`` on. Keras' own class: TensorFlow's seed holds the 62 bits in one word."""
    import keras

    return keras.random.SeedGenerator(seed, name=name)


def noise_state(saved: object) -> object:
    """A saved noise state in this backend's layout ``[seed, draws]`` (int64). A JAX
    checkpoint's ``[seed_high, seed_low, draws]`` (uint32) joins its seed's halves; the
    generators differ (Philox here, Threefry on JAX), so the draws after a resume on the other
    backend are new ones, and the count keeps moving on, never back."""
    import numpy as np

    saved = np.asarray(saved).astype(np.int64).ravel()
    if saved.size == 3:
        saved = np.array([(saved[0] << 32) | saved[1], saved[2]], np.int64)
    return saved


def host_normal(draw: object, size: int) -> object:
    """``draw(size)``, a NumPy function of ``(size,)`` float64 normals run on the host at every
    step (the secure mode's ``os.urandom``): ``tf.numpy_function``, stateful, so a traced step
    calls it anew each time it runs."""
    z = tf.numpy_function(draw, [size], tf.float64, stateful=True)
    return tf.reshape(z, [size])


def unseeded_normal(size: int, std: float, dtype: object) -> object:
    """``(size,)`` draws of ``N(0, std^2)`` from TensorFlow's global generator
    (``tf.random.normal``): a new draw at every call, also inside a traced step."""
    return tf.random.normal([size], stddev=std, dtype=dtype)


def step_counter(name: str) -> object:
    """The privacy ledger's step count: a ``tf.Variable`` (int64; not a Keras weight, so it
    stays out of ``get_weights``), counted once per step under ``tf.distribute`` (only the
    first replica's increment counts)."""
    return tf.Variable(
        0,
        dtype=tf.int64,
        trainable=False,
        name=name,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


def pad_empty_batch(x: object, y: object) -> tuple[object, object, object, object]:
    """``(x, y, B, keep)``: an empty batch (``B = 0``, Poisson sampling) gets one dummy sample
    of zeros (label 0) whose weight in ``keep`` is 0, so the losses and layers see a batch and
    the step is the noise alone; ``keep`` is ``B`` ones otherwise. ``B`` is a tensor: a traced
    step's batch size is known only when it runs."""
    x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
    batch = tf.shape(x)[0]
    pad = tf.maximum(1 - batch, 0)  # 1 for an empty batch, else 0
    x = tf.concat([x, tf.zeros(tf.concat([[pad], tf.shape(x)[1:]], 0), x.dtype)], 0)
    y = tf.concat([y, tf.zeros(tf.concat([[pad], tf.shape(y)[1:]], 0), y.dtype)], 0)
    keep = tf.concat([tf.ones([batch]), tf.zeros([pad])], 0)
    return x, y, batch, keep


def poisson_dataset(
    x: object, y: object, q: float, steps: int, seed: int, pad_multiple: int | None
) -> object:
    """Poisson-sampled batches as a ``tf.data.Dataset``: step ``j`` draws ``u ~ U(0, 1)^N``
    (stateless, from ``(seed, key_j)``, new keys every epoch) and takes the samples with
    ``u < q``. ``pad_multiple``: None gives ``(x, y)`` of the drawn size (TensorFlow traces
    one step for every size); an int ``m`` pads each batch with zero rows to a multiple of
    ``m`` (at least ``m``) and gives ``(x, y, w)``, ``w`` 1 for a drawn sample, 0 for padding."""
    images, labels, n = tf.constant(x), tf.constant(y), len(x)

    def draw(key: object) -> tuple:
        u = tf.random.stateless_uniform([n], seed=tf.stack([tf.constant(seed, tf.int64), key]))
        chosen = tf.where(u < q)[:, 0]
        batch_x, batch_y = tf.gather(images, chosen), tf.gather(labels, chosen)
        if pad_multiple is None:
            return batch_x, batch_y
        size = tf.shape(chosen)[0]
        pad = tf.maximum((size + pad_multiple - 1) // pad_multiple, 1) * pad_multiple - size

        def padded(t: object) -> object:
            return tf.concat([t, tf.zeros(tf.concat([[pad], tf.shape(t)[1:]], 0), t.dtype)], 0)

        weights = tf.concat([tf.ones([size]), tf.zeros([pad])], 0)
        return padded(batch_x), padded(batch_y), weights

    keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(steps)
    return keys.map(draw).prefetch(1)


__all__ += [
    "do_not_convert",
    "host_normal",
    "noise_seed_generator",
    "noise_state",
    "pad_empty_batch",
    "poisson_dataset",
    "step_counter",
    "unseeded_normal",
]


# --- bad input in a compiled step: the record (tf_jacbp.hooks.report_bad_input) ------------


def record_bad_input(record: object, all_ok: object, seen: object) -> object:
    """Assign ``seen`` (``[1, first offending value, count]``, float64) to the record variable
    ``record`` (``label_record``) when ``all_ok`` is false, keeping it otherwise; returns the
    variable, whose flag the optimizer's guard reads when ``apply`` runs (in a loop of steps in
    one function, a later step sees an earlier one's record). A variable written inside a step
    compiled with XLA is how such a step reports; Keras has no form of it."""
    record.assign(tf.where(all_ok, record, seen))
    return record


def bad_id_check(owner: object, ids: object, input_dim: int) -> tuple | None:
    """None on TensorFlow: ``checked_ids``' assertions stop eager and graph steps, and under
    XLA (which compiles them away) the gather clamps an id out of range, as stock Keras'
    Embedding does (``tf_jacbp.layers.Embedding``'s docstring); nothing is recorded."""
    return None


def read_record(record: object) -> object:
    """The record variable's ``[flag, value, count]`` now (NumPy), read after a step."""
    return record.numpy()


__all__ += ["bad_id_check", "read_record", "record_bad_input"]


# --- GradientCheck: compiled routes, per-sample autodiff, summaries (tf_jacbp.check) -------


def _restoring(state: list, function: object) -> object:
    """``function``, with the values of the variables ``state`` read before and assigned back
    after it (a ``tf.function`` assigns its variables for real)."""

    def run(*args):
        saved = [tf.identity(v.value) for v in state]
        out = function(*args)
        for v, value in zip(state, saved, strict=True):
            v.assign(value)
        return out

    return run


def compile_gradients(
    function: object, variables: list, state: list, reads: list, jit_compile: bool
) -> object:
    """A ``tf.function`` ``(*args) -> (f, [df/dv for v in variables])`` for a scalar
    ``f = function(*args)``, by ``tf.GradientTape`` (a variable ``f`` does not depend on gets a
    zero gradient); the variables ``state`` are restored after it. ``reads`` is JAX's (a
    ``tf.function`` reads variables as they are when it runs)."""

    def gradients(*args):
        with tf.GradientTape() as tape:
            value = function(*args)
        grads = tape.gradient(
            value, list(variables), unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return value, grads

    # autograph=False: the control flow is Python's, over variables and layers (AutoGraph's
    # source transformation would only add tracing time).
    return tf.function(_restoring(state, gradients), jit_compile=jit_compile, autograph=False)


def compile_loss(function: object, state: list, reads: list, jit_compile: bool) -> object:
    """A ``tf.function`` ``(*args) -> function(*args)`` that restores the variables ``state``
    after it (``reads`` is JAX's)."""
    return tf.function(_restoring(state, function), jit_compile=jit_compile, autograph=False)


def compile_check(function: object) -> object:
    """``function`` as one ``tf.function`` (no AutoGraph: its control flow is Python's): a
    check's routes, the twin's weight copy and the statistics run as one graph."""
    return tf.function(function, autograph=False)


def tracing_count(function: object) -> int:
    """How often a ``tf.function`` was traced (``experimental_get_tracing_count``): the
    check's test that one trace serves every call."""
    return int(function.experimental_get_tracing_count())


def variable_gradients(function: object, variables: list) -> tuple[object, list]:
    """``(f, [df/dv for v in variables])`` for a scalar ``f = function()`` of Keras variables,
    by ``tf.GradientTape`` (eagerly or inside the caller's graph; zero for a variable ``f``
    does not depend on)."""
    with tf.GradientTape() as tape:
        value = function()
    grads = tape.gradient(
        value, list(variables), unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    return value, list(grads)


def is_dataset(value: object) -> bool:
    """Whether ``value`` is a ``tf.data.Dataset``, which Keras' ``fit`` accepts as data."""
    return isinstance(value, tf.data.Dataset)


def call_errors() -> tuple[type, ...]:
    """The exceptions a model or loss raises on input that does not fit it, besides
    ``ValueError`` and ``TypeError``: TensorFlow's ``InvalidArgumentError``."""
    return (tf.errors.InvalidArgumentError,)


def summary_module(what: str) -> object:
    """``tf.summary``, which writes TensorBoard event files for ``what``."""
    return tf.summary


def compile_statistics(function: object) -> object:
    """``function`` as it is: it runs inside the check's ``tf.function`` (``compile_check``)."""
    return function


__all__ += [
    "call_errors",
    "compile_check",
    "compile_gradients",
    "compile_loss",
    "compile_statistics",
    "is_dataset",
    "summary_module",
    "tracing_count",
    "variable_gradients",
]


# --- float64: the ops Keras computes in float32 on JAX (tf_jacbp.numerics) -----------------
# On TensorFlow, Keras' ops run TensorFlow's float64 kernels: these are the same kernels.


def float64_tanh(x: object) -> object:
    """``tanh(x)`` of a float64 ``x``: ``tf.math.tanh``, the kernel ``keras.ops.tanh`` runs
    on TensorFlow (the JAX module's form keeps float64 where Keras would not)."""
    return tf.math.tanh(x)


def float64_mean(x: object, axis: object = None, keepdims: bool = False) -> object:
    """``mean(x)`` over ``axis`` of a float64 ``x``: ``tf.reduce_mean``, the kernel
    ``keras.ops.mean`` runs on TensorFlow, which reduces in float64."""
    return tf.reduce_mean(x, axis=axis, keepdims=keepdims)


def float64_var(x: object, axis: object = None, keepdims: bool = False) -> object:
    """``mean((x - mean(x))^2)`` over ``axis`` of a float64 ``x``: ``tf.math.reduce_variance``,
    the kernel ``keras.ops.var`` runs on TensorFlow, in float64."""
    return tf.math.reduce_variance(x, axis=axis, keepdims=keepdims)


__all__ += ["float64_mean", "float64_tanh", "float64_var"]


# --- convolutions: the memory guard's sparse fallback --------------------------------------


def require_sparse_product(owner: str, setting: str) -> None:
    """Nothing on TensorFlow: the sparse ``T(K)`` product exists here (``sparse_product``), so
    the memory guard may fall back to it."""


__all__ += ["require_sparse_product"]


# --- testing: a function compiled as a step is -------------------------------------------


def compile_function(function: object, jit_compile: bool) -> object:
    """``function`` compiled as Keras compiles a step: ``tf.function(autograph=False)``, with
    XLA when ``jit_compile``. ``check_layer`` compiles its reference route this way, since
    TensorFlow's random ops draw other numbers under XLA than op by op."""
    return tf.function(function, jit_compile=jit_compile, autograph=False)


__all__ += ["compile_function"]


# --- convolutions: T(K) applied without forming it (tf_jacbp.toeplitz_implicit) ------------


def _spread_kernel(kernel: object, dilation: tuple[int, ...]) -> object:
    """``K`` with ``d_a - 1`` zeros between its taps along each spatial axis ``a``: the kernel
    ``(k_a - 1) d_a + 1`` wide that dilation means (``K'[p d] = K[p]``). TensorFlow's CPU kernels
    of the transposed convolution and of the kernel gradient take no dilation."""
    for axis, d in enumerate(dilation):
        if d == 1:
            continue
        k = kernel.shape[axis]
        shape = list(kernel.shape)
        spread = tf.expand_dims(kernel, axis + 1)
        pads = [[0, 0]] * (len(shape) + 1)
        pads[axis + 1] = [0, d - 1]
        spread = tf.pad(spread, pads)
        shape[axis] = k * d
        kernel = tf.reshape(spread, shape)[(slice(None),) * axis + (slice(0, (k - 1) * d + 1),)]
    return kernel


def conv_input_product(
    delta: object,
    kernel: object,
    input_sizes: tuple,
    strides: tuple[int, ...],
    padding: str,
    dilation: tuple[int, ...],
) -> object:
    """``T(K)^T delta`` for each sample without forming ``T(K)``: the transposed convolution
    (``tf.nn.conv_transpose``), ``(batch, o_1, ..., o_n, F)`` -> ``(batch, s_1, ..., s_n, C)``
    for ``K`` ``(k_1, ..., k_n, C, F)``, ``n`` = 2 or 3, ``padding`` ``"valid"`` or ``"same"``
    (TensorFlow's rule), ``input_sizes`` the ``s_a`` (ints or scalar tensors). A dilated ``K``
    is spread out with zeros first (``_spread_kernel``)."""
    kernel = _spread_kernel(kernel, dilation)
    shape = tf.stack([tf.shape(delta)[0], *input_sizes, kernel.shape[-2]])
    return tf.nn.conv_transpose(
        delta, kernel, shape, strides=list(strides), padding=padding.upper()
    )


def conv_kernel_product(
    x: object,
    delta: object,
    kernel_shape: tuple[int, ...],
    strides: tuple[int, ...],
    padding: str,
    dilation: tuple[int, ...],
) -> object:
    """``dK = sum_b X_patch,b^T Delta_b``, shaped like ``K`` ``(k_1, ..., k_n, C, F)``: the
    patch product of Lemma 3 summed over the batch, by TensorFlow's filter-gradient kernel
    (``Conv2DBackpropFilter``, ``Conv3DBackpropFilterV2``), which forms patches in blocks and
    never ``T(K)``. ``x`` ``(batch, s_1, ..., s_n, C)``, ``delta`` ``(batch, o_1, ..., o_n, F)``,
    ``n`` = 2 or 3. With dilation ``d`` (then strides are 1) the product of the spread kernel
    ``(k - 1) d + 1`` wide is taken at every ``d``-th tap: ``dK[p] = dK'[p d]``."""
    extents = [(k - 1) * d + 1 for k, d in zip(kernel_shape[:-2], dilation, strict=True)]
    shape = [*extents, *kernel_shape[-2:]]
    step = [1, *strides, 1]
    if len(extents) == 2:
        product = tf.compat.v1.nn.conv2d_backprop_filter(x, shape, delta, step, padding.upper())
    else:
        product = tf.compat.v1.nn.conv3d_backprop_filter_v2(x, shape, delta, step, padding.upper())
    return product[tuple(slice(None, None, d) for d in dilation)]


__all__ += ["conv_input_product", "conv_kernel_product"]


def image_patches(
    x: object, kernel_size: tuple[int, int], strides: tuple[int, int], dilation: tuple[int, int]
) -> object:
    """The patch matrices of an already padded image batch, ``(batch, H, W, C)`` ->
    ``(batch, o_h o_w, k_h k_w C)``: row ``i`` of sample ``b`` holds the window output ``i``
    reads (``tf.image.extract_patches``, ``"VALID"``; entries ordered ``(p_h, p_w, c)``)."""
    patches = tf.image.extract_patches(
        x,
        sizes=[1, *kernel_size, 1],
        strides=[1, *strides, 1],
        rates=[1, *dilation, 1],
        padding="VALID",
    )
    return tf.reshape(patches, (tf.shape(x)[0], -1, patches.shape[-1]))


__all__ += ["image_patches"]
