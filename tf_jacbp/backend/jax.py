"""The JAX pieces of tf_jacbp's layers, activations and losses (``tf_jacbp.backend`` when
``KERAS_BACKEND=jax``): the same functions as ``tensorflow.py``, in the same sections.

JAX traces every step with ``jax.jit`` and has no run-time assertion: a check whose values are
concrete (eager) raises at once; a traced one cannot stop the step, and the callers say what
happens instead (``tf_jacbp.losses.labels``, ``tf_jacbp.layers.embedding``). What has no JAX form
(the sparse Toeplitz fallback, graphs whose sizes are known only when they run) raises a
``NotImplementedError`` naming the alternative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
from keras import ops

__all__: list[str] = []

TENSORFLOW_ONLY = (
    "{what} is TensorFlow-only (KERAS_BACKEND=tensorflow); on JAX {alternative} (docs/backends.md)."
)


def tensorflow_only(what: str, alternative: str) -> NotImplementedError:
    """The error a TensorFlow-only feature raises on JAX: names the feature and the alternative."""
    return NotImplementedError(TENSORFLOW_ONLY.format(what=what, alternative=alternative))


def is_traced(*tensors: object) -> bool:
    """Whether any of ``tensors`` is a JAX tracer (a value inside ``jax.jit``/``jax.grad``
    being traced), whose value is not known now."""
    return any(isinstance(t, jax.core.Tracer) for t in tensors)


__all__ += ["is_traced", "tensorflow_only"]

# --- inputs: sparse and ragged tensors -----------------------------------------------------


def refuse_sparse_input(x: object, name: str) -> None:
    """A ``TypeError`` naming the conversion if ``x`` is a JAX sparse array
    (``jax.experimental.sparse``): the Jacobian formulas are dense."""
    if type(x).__name__ in ("BCOO", "BCSR", "COO", "CSR", "CSC"):
        raise TypeError(
            f"Layer '{name}' got a sparse {type(x).__name__} input; tf_jacbp layers take dense "
            "arrays (their Jacobians are dense formulas). Convert it first: x.todense()."
        )


__all__ += ["refuse_sparse_input"]

# --- activations and losses: label checks, assertions --------------------------------------


def tensorflow_activation_functions() -> list[tuple[str, object, str, dict]]:
    """TensorFlow's own activation functions (``tf.nn.relu``, ...): none on JAX."""
    return []


def executing_eagerly(*tensors: object) -> bool:
    """Whether ``tensors`` have values now (none is a tracer of ``jax.jit`` or ``jax.grad``):
    a check on them can raise a Python error at once."""
    return not is_traced(*tensors)


def assert_before(condition: object, data: list, *tensors: object) -> tuple:
    """``tensors`` unchanged. JAX has no run-time assertion inside a traced step: a concrete
    ``condition`` that is false raises ``ValueError`` with ``data`` now; a traced one is the
    caller's to report (``tf_jacbp.losses.labels`` records it on the host)."""
    if not is_traced(condition) and not bool(np.asarray(condition)):
        raise ValueError(" ".join(d if isinstance(d, str) else str(np.asarray(d)) for d in data))
    return tensors


class HostRecord:
    """A bad-input record ``[flag, value, count]`` kept on the host (``label_record``). A step
    compiled with ``jax.jit`` writes it through ``jax.debug.callback`` when it runs
    (``record_bad_input``): a Keras variable assigned inside Keras' stateless JAX step would be
    dropped unless the model owned it. The first record with its flag set stays until reset."""

    def __init__(self):
        self.value = np.zeros(3)

    def store(self, value: object) -> None:
        """Keep ``value`` (``[flag, value, count]``, from a step that ran) if its flag is set and
        none is yet: the first bad input is the one reported."""
        value = np.asarray(value, dtype=np.float64)
        if value[0] and not self.value[0]:
            self.value = value

    def assign(self, value: object) -> None:
        """Set the record now to ``value`` (three numbers; zeros reset it)."""
        self.value = np.asarray(value, dtype=np.float64)


def label_record() -> object:
    """A new bad-input record of three zeros, ``[flag, value, count]`` (``HostRecord``)."""
    return HostRecord()


def traced_graphs(step: object = None) -> list:
    """The key of the step being traced now: JAX has no graph objects, and a step's loss and its
    optimizer's ``stateless_apply`` are traced in the same call of the same step function, so
    the key is that call's ``step`` (the running ``tf_jacbp.hooks.Step``, compared by
    identity); none outside a step."""
    return [step] if step is not None else []


def has_distribution_strategy() -> bool:
    """``tf.distribute`` strategies are TensorFlow's: never in scope on JAX."""
    return False


def label_error(message: str) -> Exception:
    """The error a bad label raises after a step on JAX: ``ValueError``."""
    return ValueError(message)


__all__ += [
    "assert_before",
    "executing_eagerly",
    "has_distribution_strategy",
    "label_error",
    "label_record",
    "tensorflow_activation_functions",
    "traced_graphs",
]

# --- convolutions: Toeplitz products (sparse fallback, unknown sizes) ----------------------


class IndexTensors:
    """Named integer index maps (NumPy, computed once) handed to JAX as arrays, each computed on
    first use and cached (a JAX array made from NumPy is a constant inside ``jax.jit``)."""

    def __init__(self, **arrays: object):
        self._sources = arrays
        self.arrays: dict = {}
        self._tensors: dict = {}

    def array(self, name: str) -> object:
        """The NumPy map ``name``, computed on first use."""
        if name not in self.arrays:
            source = self._sources[name]
            self.arrays[name] = source() if callable(source) else source
        return self.arrays[name]

    def __getitem__(self, name: str) -> object:
        if name not in self._tensors:
            with jax.ensure_compile_time_eval():
                self._tensors[name] = jnp.asarray(self.array(name))
        return self._tensors[name]


def sparse_matrix(indices: object, values: object, shape: tuple) -> object:
    """The sparse ``T(K)`` of the memory guard's fallback: TensorFlow-only."""
    raise tensorflow_only(
        "The sparse Toeplitz fallback (a T(K) over the memory budget)",
        "raise the layer's toeplitz_budget_bytes, or use a smaller image or fewer channels",
    )


def is_sparse(t: object) -> bool:
    """Never: the sparse ``T(K)`` exists on TensorFlow only."""
    return False


def sparse_product(t: object, rows: object, transpose: bool = False) -> object:
    """The sparse ``T(K)`` product: TensorFlow-only, as the sparse matrix it multiplies by
    (``sparse_matrix``)."""
    raise tensorflow_only("The sparse Toeplitz product", "keep T(K) within the memory budget")


__all__ += ["IndexTensors", "is_sparse", "sparse_matrix", "sparse_product"]


def bias_add(z: object, bias: object) -> object:
    """``z + bias`` for ``z`` ``(rows, R)`` and ``bias`` ``(R,)``: ``keras.ops.add`` (XLA fuses
    it with the product on JAX)."""
    return ops.add(z, bias)


__all__ += ["bias_add"]

# --- pooling, reshaping, dropout, embedding ------------------------------------------------


def xla_function(function: object) -> object:
    """``function`` compiled with XLA: ``jax.jit``, which the pooling layers' input gradient
    runs under when called op by op."""
    return jax.jit(function)


def dynamic_window_index(
    x: object, pool_size: tuple, strides: tuple, padding: str
) -> tuple[object, object, object, tuple]:
    """Pooling windows for sizes known only when a graph runs: TensorFlow-only (``jax.jit``
    always knows every size when it traces)."""
    raise tensorflow_only(
        "Pooling over spatial sizes unknown at trace time",
        "every size is known when jax.jit traces; give the Input its spatial sizes",
    )


def checked_ids(ids: object, input_dim: int, message: str) -> object:
    """``ids``, checked to lie in ``[-input_dim, input_dim)``: with values (eager), a
    ``ValueError`` with ``message`` and the first offending id at once. Traced (``jax.jit``,
    Keras' default step) nothing can stop the step: an id out of range reads a row of NaN
    (``gather_rows``), and ``bad_id_check`` gives what an attached model's step records."""
    if not is_traced(ids):
        values = np.asarray(ids)
        if values.size and (values.min() < -input_dim or values.max() >= input_dim):
            bad = values[(values < -input_dim) | (values >= input_dim)]
            raise ValueError(f"{message} Found id = {bad.flat[0]} ({bad.size} offending id(s)).")
    return ids


def bad_id_check(owner: object, ids: object, input_dim: int) -> tuple | None:
    """In a step traced by ``jax.jit`` (``ids`` a tracer), the check of the ids of ``owner``
    (the layer) for ``tf_jacbp.hooks.report_bad_input``: ``(record, all_ok, first_bad,
    count)``, with ``owner``'s record, whether every id lies in ``[-input_dim, input_dim)``, the
    first that does not, and how many do not; None for ids with values (``checked_ids`` raises
    at once) or no ids. Computed outside the layer's custom gradient, whose values are tracers
    of its own."""
    if not is_traced(ids):
        return None
    flat = jnp.ravel(ids)
    if flat.size == 0:
        return None
    ok = (flat >= -input_dim) & (flat < input_dim)
    return _record_of(owner), jnp.all(ok), flat[jnp.argmin(ok)], jnp.sum(~ok)


def _record_of(owner: object) -> HostRecord:
    """``owner``'s bad-id record, made on first use (a plain attribute: Keras tracks none)."""
    record = getattr(owner, "_bad_id_record", None)
    if record is None:
        record = HostRecord()
        object.__setattr__(owner, "_bad_id_record", record)
    return record


def gather_rows(table: object, ids: object) -> object:
    """``table[ids]``: row ``ids[...]`` of ``table`` at each position, no wrapping of negative
    ids: an id outside ``[0, len(table))`` reads a row of NaN (``jnp.take``'s ``fill`` mode,
    which would wrap ``-len(table) <= id < 0`` itself, so negative ids are moved past the end
    first)."""
    ids = jnp.where(ids < 0, table.shape[0], ids)
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)


__all__ += ["checked_ids", "dynamic_window_index", "gather_rows", "xla_function"]


# --- autodiff and float64: the witnesses' tools ------------------------------------------


def value_and_gradients(function: object, tensors: list) -> tuple[object, list]:
    """``(f, [df/dt for t in tensors])`` for a scalar ``f = function(*tensors)``, by JAX's
    autodiff (``jax.value_and_grad``): the witnesses' gradient. A tensor ``f`` does not depend
    on gets a zero gradient."""
    tensors = [jnp.asarray(t) for t in tensors]
    value, grads = jax.value_and_grad(lambda ts: function(*ts))(tensors)
    return value, list(grads)


def float64_enabled() -> bool:
    """Whether JAX computes float64 in float64: only with x64 enabled
    (``jax.config.update("jax_enable_x64", True)`` or ``JAX_ENABLE_X64=1``); otherwise a
    float64 array is silently float32."""
    return bool(jax.config.jax_enable_x64)


def require_float64(what: str) -> None:
    """A ``RuntimeError`` naming ``what`` and how to enable x64 when JAX would compute float64
    in float32 (``float64_enabled``): nothing compares in float32 while claiming float64."""
    if not float64_enabled():
        raise RuntimeError(
            f"{what} computes in float64, but JAX has x64 disabled and would compute float32 "
            "instead. Enable it before creating any array: "
            'jax.config.update("jax_enable_x64", True), or set JAX_ENABLE_X64=1.'
        )


__all__ += ["float64_enabled", "require_float64", "value_and_gradients"]


# --- convolutions: the index of T(K) for sizes known only when the graph runs --------------


def dynamic_conv_maps(
    sizes: tuple,
    kernel_shape: tuple[int, ...],
    strides: tuple[int, ...],
    padding: str,
    dilation_rate: tuple[int, ...],
) -> object:
    """The index maps of ``T(K)`` for spatial sizes known only when a graph runs: TensorFlow-only
    (``jax.jit`` knows every size when it traces, so the static ``tf_jacbp.toeplitz.ConvIndex``
    serves every call)."""
    raise tensorflow_only(
        "A convolution's Toeplitz index over spatial sizes unknown at trace time "
        "(tf_jacbp.toeplitz_dynamic.DynamicConvIndex)",
        "every size is known when jax.jit traces; give the Input its spatial sizes",
    )


__all__ += ["dynamic_conv_maps"]


# --- tf_jacbp.jacobian: sparse inputs, compiled functions, autodiff Jacobians ----------------


def dense_conversion(x: object, name: str) -> str | None:
    """How to make ``x`` dense if it is a JAX sparse array (``jax.experimental.sparse``:
    ``x.todense()``), spelled with ``name``; None for a dense value."""
    if type(x).__name__ in ("BCOO", "BCSR", "COO", "CSR", "CSC"):
        return f"{name}.todense()"
    return None


def compiled_model_function(function: object, variables: object) -> object:
    """``function(*tensors)`` compiled with ``jax.jit``, reading the current values of
    ``variables()`` (a callable giving the Keras variables it uses) at each call: they enter the
    compiled function as arguments, through a ``keras.StatelessScope`` (as Keras' own compiled
    steps pass them), never as constants frozen at the first trace; a variable the function
    assigns (a dropout seed) is written back after the call."""
    from keras import StatelessScope

    def stateless(values: list, *tensors: object) -> tuple:
        held = variables()
        with StatelessScope(state_mapping=list(zip(held, values, strict=True))) as scope:
            result = function(*tensors)
            updated = [scope.get_current_value(v) for v in held]
        return result, [v if u is None else u for v, u in zip(values, updated, strict=True)]

    compiled = jax.jit(stateless)

    def call(*tensors: object) -> object:
        held = variables()
        result, values = compiled([v.value for v in held], *tensors)
        for v, value in zip(held, values, strict=True):
            if value is not v.value:
                v.assign(value)
        return result

    return call


def jacobians(function: object, tensors: list) -> list:
    """``[J_t f for t in tensors]`` for a tensor ``f = function(*tensors)``, each of shape
    ``f.shape + t.shape``, by JAX's reverse-mode autodiff (``jax.jacrev``, compiled with
    ``jax.jit``: one program instead of one per op): the tests' reference for
    ``tf_jacbp.jacobian.parameter_jacobian`` and ``per_example_gradients``."""
    tensors = [jnp.asarray(t) for t in tensors]
    return list(jax.jit(jax.jacrev(lambda ts: function(*ts)))(tensors))


__all__ += ["compiled_model_function", "dense_conversion", "jacobians"]


# --- privacy: DP-SGD's noise, step count and Poisson batches (tf_jacbp.privacy) ------------


def do_not_convert(function: object) -> object:
    """``function`` unchanged: JAX traces Python as Python (AutoGraph, which this keeps out on
    TensorFlow, is TensorFlow's)."""
    return function


class NoiseSeed(keras.random.SeedGenerator):
    """DP-SGD's noise generator on JAX: state ``[seed_high, seed_low, draws]`` (uint32), the
    62-bit seed in two words and a draw count; draw ``k`` takes the Threefry key
    ``fold_in([seed_high, seed_low], k)``, so no two seeds or draws share a key. Keras' own
    ``SeedGenerator`` keeps one 32-bit word of seed on JAX (its state is the key itself).

    A ``SeedGenerator``: a model holding one tracks its state with its ``variables`` (not its
    ``weights``), and Keras' stateless JAX train step carries the state in and out."""

    def __init__(self, seed: int, name: str | None = None):
        self.name = name or "noise_seed"
        self._initial_seed = seed
        words = np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF, 0], np.uint32)
        self.state = keras.Variable(
            words, dtype="uint32", trainable=False, aggregation="none", name=f"{self.name}_state"
        )

    def next(self, ordered: bool = True) -> object:
        """The key of the next draw, ``fold_in([seed_high, seed_low], draws)``; ``draws`` + 1."""
        state = self.state.value
        self.state.assign(state + jnp.array([0, 0, 1], jnp.uint32))
        return jax.random.fold_in(state[:2], state[2])


def noise_seed_generator(seed: int, name: str) -> object:
    """DP-SGD's noise generator: a ``NoiseSeed`` (state ``[seed_high, seed_low, draws]``,
    uint32), which keeps all 62 bits of ``seed`` where Keras' JAX ``SeedGenerator`` keeps 32."""
    return NoiseSeed(seed, name=name)


def noise_state(saved: object) -> object:
    """A saved noise state in this backend's layout ``[seed_high, seed_low, draws]`` (uint32). A
    TensorFlow checkpoint's ``[seed, draws]`` (int64) splits its seed in two words; the
    generators differ (Threefry here, Philox on TensorFlow), so the draws after a resume on the
    other backend are new ones, and the count keeps moving on, never back."""
    saved = np.asarray(saved).astype(np.int64).ravel()
    if saved.size == 2:
        saved = np.array([saved[0] >> 32, saved[0] & 0xFFFFFFFF, saved[1]], np.int64)
    return saved.astype(np.uint32)


def host_normal(draw: object, size: int) -> object:
    """``draw(size)``, a NumPy function of ``(size,)`` float64 normals run on the host at every
    step (the secure mode's ``os.urandom``): ``jax.experimental.io_callback``, which a compiled
    step calls anew each time it runs. float32 when x64 is disabled (``float64_enabled``)."""
    from jax.experimental import io_callback

    dtype = np.float64 if float64_enabled() else np.float32
    shape = jax.ShapeDtypeStruct((int(size),), dtype)
    return io_callback(lambda: np.asarray(draw(int(size)), dtype), shape, ordered=False)


def unseeded_normal(size: int, std: float, dtype: object) -> object:
    """``(size,)`` draws of ``N(0, std^2)`` from Keras' global seed generator, outside a traced
    step only: a traced draw without a seed would be a constant of the compiled step, so it
    raises a ``ValueError`` naming the fix."""
    if not is_traced(jnp.ones(())):  # an array made now is a tracer inside a trace
        return keras.random.normal([size], stddev=std, dtype=dtype)
    raise ValueError(
        "clipped_gradients(seed=None) inside a traced JAX step would add the same noise at "
        "every step. Pass seed=keras.random.SeedGenerator(...) (DPModel passes its own)."
    )


class StepCounter(keras.random.SeedGenerator):
    """The privacy ledger's step count on JAX: an int32 Keras variable behind ``numpy``,
    ``assign`` and ``assign_add``. A ``SeedGenerator`` only to be tracked as one: a model that
    holds it keeps the count among its ``variables`` (not its ``weights``), and Keras' stateless
    JAX train step carries it in and out (once per step, also under ``DataParallel``)."""

    def __init__(self, name: str):
        self.name = name
        self._initial_seed = None
        self.state = keras.Variable(
            np.zeros((), np.int32), dtype="int32", trainable=False, aggregation="none", name=name
        )

    def next(self, ordered: bool = True) -> object:
        """Never: a step count is no seed."""
        raise TypeError(f"{self.name} counts steps; it is not a random seed.")

    def numpy(self) -> np.ndarray:
        """The count now (the variable's value)."""
        return np.asarray(self.state.numpy())

    def assign(self, value: object) -> None:
        """Set the count (a resumed ledger's total)."""
        self.state.assign(np.asarray(value, np.int32))

    def assign_add(self, value: object) -> None:
        """Add ``value`` steps; inside a stateless step, to the step's state."""
        self.state.assign(self.state.value + value)


def step_counter(name: str) -> object:
    """The privacy ledger's step count: a ``StepCounter`` that the DP model holds, so Keras'
    stateless JAX train step carries its variable (a Keras weight it is not)."""
    return StepCounter(name)


def pad_empty_batch(x: object, y: object) -> tuple[object, object, object, object]:
    """``(x, y, B, keep)``: an empty batch (``B = 0``, Poisson sampling) gets one dummy sample
    of zeros (label 0) whose weight in ``keep`` is 0, so the losses and layers see a batch and
    the step is the noise alone; ``keep`` is ``B`` ones otherwise. ``B`` is an int: JAX knows
    every size when it traces."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    batch = int(x.shape[0])
    if batch:
        return x, y, batch, jnp.ones([batch])
    zeros = [jnp.zeros((1, *t.shape[1:]), t.dtype) for t in (x, y)]
    return zeros[0], zeros[1], 0, jnp.zeros([1])


class PoissonBatches(keras.utils.PyDataset):
    """Poisson-sampled batches as a ``keras.utils.PyDataset`` (``poisson_dataset``): step ``j`` of
    epoch ``e`` draws ``u ~ U(0, 1)^N`` from NumPy's generator seeded by ``(seed, e, j)`` and
    takes the samples with ``u < q``; each epoch (``fit``'s, or a pass of ``for``) draws anew."""

    def __init__(self, x: object, y: object, q: float, steps: int, seed: int, multiple: object):
        super().__init__()
        self.x, self.y, self.q, self.steps = np.asarray(x), np.asarray(y), q, steps
        self.seed, self.multiple, self.epoch = seed, multiple, 0

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        chosen = np.flatnonzero(rng.random(len(self.x)) < self.q)
        x, y = self.x[chosen], self.y[chosen]
        if self.multiple is None:
            return x, y
        size, m = len(chosen), self.multiple
        padded = max(-(-size // m), 1) * m

        def pad(t: np.ndarray) -> np.ndarray:
            return np.concatenate([t, np.zeros((padded - size, *t.shape[1:]), t.dtype)])

        weights = np.concatenate([np.ones(size), np.zeros(padded - size)]).astype(np.float32)
        return pad(x), pad(y), weights

    def on_epoch_end(self) -> None:
        """The next epoch draws anew."""
        self.epoch += 1

    def __iter__(self) -> object:
        """One epoch's batches, then the next epoch (as a ``tf.data`` pass draws anew)."""
        for index in range(self.steps):
            yield self[index]
        self.on_epoch_end()


def poisson_dataset(
    x: object, y: object, q: float, steps: int, seed: int, pad_multiple: int | None
) -> object:
    """Poisson-sampled batches as a ``keras.utils.PyDataset`` (``PoissonBatches``).
    ``pad_multiple``: an int ``m`` pads each batch with zero rows to a multiple of ``m`` (at
    least ``m``) and gives ``(x, y, w)``, ``w`` 1 for a drawn sample and 0 for padding, so
    ``jax.jit`` compiles one step per multiple, not one per batch size; None gives ``(x, y)``
    of the drawn size."""
    return PoissonBatches(x, y, q, steps, seed, pad_multiple)


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


def record_bad_input(record: HostRecord, all_ok: object, seen: object) -> object:
    """Write ``seen`` (``[1, first offending value, count]``, float64) into ``record`` when the
    step runs, if ``all_ok`` is false: ``jax.debug.callback`` hands the step's value to the host
    (``HostRecord.store``), the only way out of a compiled step besides its outputs. Returns the
    traced ``[flag, value, count]`` of this step (zeros when ``all_ok``), whose flag the
    optimizer's guard reads in the same step."""
    written = jnp.where(all_ok, jnp.zeros_like(seen), seen)
    jax.debug.callback(record.store, written)
    return written


def read_record(record: HostRecord) -> object:
    """``record``'s ``[flag, value, count]`` (NumPy) once every step dispatched so far has run
    its callbacks (``jax.effects_barrier``: JAX runs steps asynchronously)."""
    jax.effects_barrier()
    return record.value.copy()


__all__ += ["bad_id_check", "read_record", "record_bad_input"]


# --- GradientCheck: compiled routes, per-sample autodiff, summaries (tf_jacbp.check) -------


class CompiledRoute:
    """A route of ``GradientCheck`` compiled with ``jax.jit``: the body is a
    pure function of the values of ``variables`` and ``reads``, which are read from the
    variables at each call and mapped in by a ``keras.StatelessScope``. Whatever the body
    assigns (batch-norm statistics, seed states, metrics) stays in the scope, so the variables
    are unchanged after a call and every call sees the same dropout masks."""

    def __init__(self, body: object, variables: list, reads: list, jit_compile: bool):
        self.variables, self.reads = list(variables), list(reads)
        self.traces = 0

        def counted(values, read_values, *args):
            self.traces += 1
            return body(values, read_values, *args)

        # Always jax.jit: JAX has no graph without XLA (``jit_compile`` is TensorFlow's choice
        # between its graph and XLA; unjitted JAX would run op by op).
        self.function = jax.jit(counted)

    def __call__(self, *args: object) -> object:
        values = [v.value for v in self.variables]
        read_values = [v.value for v in self.reads]
        return self.function(values, read_values, *args)

    def experimental_get_tracing_count(self) -> int:
        """How often the body was traced, as TensorFlow's ``tf.function`` names it."""
        return self.traces


def _stateless(variables: list, values: list, reads: list, read_values: list) -> object:
    from keras import StatelessScope

    mapping = [*zip(variables, values, strict=True), *zip(reads, read_values, strict=True)]
    return StatelessScope(state_mapping=mapping, collect_losses=True)


def compile_gradients(
    function: object, variables: list, state: list, reads: list, jit_compile: bool
) -> object:
    """``(*args) -> (f, [df/dv for v in variables])`` for a scalar ``f = function(*args)`` that
    reads the Keras variables ``variables`` and ``reads``, by ``jax.value_and_grad`` over their
    values (``CompiledRoute``: ``jax.jit`` whatever ``jit_compile``). ``state`` (the variables
    ``function`` may change) needs nothing on JAX: the call is stateless; ``reads`` must list
    every other variable ``function`` reads, or ``jax.jit`` freezes its value when it traces."""

    def body(values, read_values, *args):
        def value_of(values):
            with _stateless(variables, values, reads, read_values):
                return function(*args)

        value, grads = jax.value_and_grad(value_of)(values)
        return value, list(grads)

    return CompiledRoute(body, variables, reads, jit_compile)


def compile_loss(function: object, state: list, reads: list, jit_compile: bool) -> object:
    """``(*args) -> function(*args)`` at the current values of the variables ``reads`` (every
    variable ``function`` reads), statelessly (``CompiledRoute``; ``jax.jit`` whatever
    ``jit_compile``): what ``function`` assigns is dropped, so ``state`` needs nothing."""

    def body(values, read_values, *args):
        with _stateless([], [], reads, read_values):
            return function(*args)

    return CompiledRoute(body, [], reads, jit_compile)


def compile_check(function: object) -> object:
    """``function`` as it is: on JAX a check is Python calling its compiled routes
    (``compile_gradients``), with the float64 twin's weights copied in between, eagerly."""
    return function


def tracing_count(function: object) -> int:
    """How often a compiled route was traced (``CompiledRoute``); a plain Python function
    (``compile_check``'s) is not traced: 1."""
    count = getattr(function, "experimental_get_tracing_count", None)
    return 1 if count is None else int(count())


def variable_gradients(function: object, variables: list) -> tuple[object, list]:
    """``(f, [df/dv for v in variables])`` for a scalar ``f = function()`` of Keras variables,
    by ``jax.value_and_grad`` over their values mapped in by a ``keras.StatelessScope`` (what
    ``function`` assigns is dropped); eager, for the per-example norm witness's samples."""
    values = [v.value for v in variables]

    def value_of(values):
        with _stateless(variables, values, [], []):
            return function()

    value, grads = jax.value_and_grad(value_of)(values)
    return value, list(grads)


def is_dataset(value: object) -> bool:
    """Whether ``value`` is a ``tf.data.Dataset`` (Keras on JAX trains on them too, when
    TensorFlow is installed); never imports TensorFlow."""
    import sys

    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(value, tf.data.Dataset)


def call_errors() -> tuple[type, ...]:
    """The exceptions a model or loss raises on input that does not fit it, besides
    ``ValueError`` and ``TypeError``: none more on JAX (shapes are checked when tracing)."""
    return ()


def summary_module(what: str) -> object:
    """``tf.summary`` for ``what`` (TensorBoard event files), imported when asked: on JAX it
    needs TensorFlow installed (``pip install tensorflow-cpu``), as Keras' own ``TensorBoard``
    callback does."""
    try:
        import tensorflow as tf
    except ImportError as err:
        raise ImportError(
            f"{what} writes TensorBoard event files with tf.summary, which on JAX needs "
            "TensorFlow installed: pip install tensorflow-cpu (or pass log_dir=None)."
        ) from err
    return tf.summary


def compile_statistics(function: object) -> object:
    """``function`` (pure, of tensors) compiled with ``jax.jit``: the check's statistics run
    as one program instead of a few eager ops per variable, each compiled for its shape."""
    return jax.jit(function)


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
# Keras 3.15.1's JAX ops cast float64 to float32 in tanh (result_type(x.dtype, float)), and
# mean and var reduce in float32 (result_type(x.dtype, "float32")). jax.numpy keeps float64.


def float64_tanh(x: object) -> object:
    """``tanh(x)`` of a float64 ``x`` in float64 (``jnp.tanh``): Keras' ``ops.tanh`` returns
    float32 on JAX even with x64 enabled."""
    return jnp.tanh(x)


def float64_mean(x: object, axis: object = None, keepdims: bool = False) -> object:
    """``mean(x)`` over ``axis`` of a float64 ``x``, summed in float64 (``jnp.mean``): Keras'
    ``ops.mean`` accumulates in float32 on JAX (about 1e-7 relative)."""
    return jnp.mean(x, axis=axis, keepdims=keepdims)


def float64_var(x: object, axis: object = None, keepdims: bool = False) -> object:
    """``mean((x - mean(x))^2)`` over ``axis`` of a float64 ``x`` in float64 (``jnp.var``):
    Keras' ``ops.var`` computes and returns float32 on JAX."""
    return jnp.var(x, axis=axis, keepdims=keepdims)


__all__ += ["float64_mean", "float64_tanh", "float64_var"]


# --- convolutions: the memory guard's sparse fallback --------------------------------------


def require_sparse_product(owner: str, setting: str) -> None:
    """The memory guard found that only a sparse ``T(K)`` fits the budget: on JAX, which has no
    sparse product, a ``NotImplementedError`` naming ``owner`` and the ``setting`` to raise, at
    build time (before any warning about a sparse route that will not run)."""
    raise tensorflow_only(
        f"{owner}: the sparse Toeplitz fallback (a dense T(K) over the memory budget)",
        f"raise the budget with {setting}, or use a smaller image or fewer channels",
    )


__all__ += ["require_sparse_product"]


# --- testing: a function compiled as a step is -------------------------------------------


def compile_function(function: object, jit_compile: bool) -> object:
    """``function`` compiled as Keras compiles a step on JAX: ``jax.jit`` (``jit_compile`` is
    TensorFlow's choice between a graph and XLA; JAX's random numbers are the same either way)."""
    return jax.jit(function)


__all__ += ["compile_function"]


# --- convolutions: T(K) applied without forming it (tf_jacbp.toeplitz_implicit) ------------


def _spatial_letters(rank: int) -> str:
    """The spatial letters of ``jax.lax`` dimension numbers for ``rank`` axes (``"DHW"``)."""
    return "DHW"[3 - rank :]


def _pads(sizes: tuple, kernel: tuple, strides: tuple, padding: str, dilation: tuple) -> list:
    """``(before, after)`` zeros per axis of the forward convolution (``tf_jacbp.geometry``)."""
    from tf_jacbp import geometry

    return [
        geometry.padding_amounts(int(n), k, s, padding, d)
        for n, k, s, d in zip(sizes, kernel, strides, dilation, strict=True)
    ]


def conv_input_product(
    delta: object,
    kernel: object,
    input_sizes: tuple,
    strides: tuple[int, ...],
    padding: str,
    dilation: tuple[int, ...],
) -> object:
    """``T(K)^T delta`` for each sample without forming ``T(K)``: the transposed convolution,
    ``(batch, o_1, ..., o_n, F)`` -> ``(batch, s_1, ..., s_n, C)`` for ``K``
    ``(k_1, ..., k_n, C, F)``: ``delta`` dilated by the strides (``lhs_dilation``), convolved
    with ``K`` flipped and read ``(k, F, C)``, padded ``(k' - 1 - before, k' - 1 - after + e)``
    (``k' = (k - 1) d + 1``; ``e`` the inputs no window reads), as ``jax.lax`` differentiates
    a convolution."""
    rank = len(strides)
    spatial = _spatial_letters(rank)
    extents = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:rank], dilation, strict=True)]
    pads = _pads(input_sizes, kernel.shape[:rank], strides, padding, dilation)
    padding_pairs = [
        (e - 1 - before, e - 1 - after + (int(n) + before + after - e) % s)
        for (before, after), e, n, s in zip(pads, extents, input_sizes, strides, strict=True)
    ]
    flipped = jnp.flip(kernel, axis=tuple(range(rank)))
    return jax.lax.conv_general_dilated(
        delta,
        flipped,
        window_strides=(1,) * rank,
        padding=padding_pairs,
        lhs_dilation=tuple(strides),
        rhs_dilation=tuple(dilation),
        dimension_numbers=(f"N{spatial}C", f"{spatial}OI", f"N{spatial}C"),
    )


def conv_kernel_product(
    x: object,
    delta: object,
    kernel_shape: tuple[int, ...],
    strides: tuple[int, ...],
    padding: str,
    dilation: tuple[int, ...],
) -> object:
    """``dK = sum_b X_patch,b^T Delta_b``, shaped like ``K`` ``(k_1, ..., k_n, C, F)``, never
    forming ``T(K)`` nor the patches: ``dK[p, c, f] = sum_{b, o} x_pad[b, o s + p d, c]
    delta[b, o, f]`` is a convolution of ``x`` (channels as its batch, the batch as its
    channels) with ``delta`` as the kernel, window stride ``d`` and kernel dilation ``s``."""
    rank = len(strides)
    spatial = _spatial_letters(rank)
    pads = _pads(x.shape[1:-1], kernel_shape[:rank], strides, padding, dilation)
    product = jax.lax.conv_general_dilated(
        x,
        delta,
        window_strides=tuple(dilation),
        padding=[tuple(p) for p in pads],
        rhs_dilation=tuple(strides),
        dimension_numbers=(f"C{spatial}N", f"I{spatial}O", f"N{spatial}C"),
    )  # (C, k'_1, ..., k'_n, F), k'_a >= k_a
    product = product[(slice(None), *(slice(0, k) for k in kernel_shape[:rank]))]
    return jnp.moveaxis(product, 0, -2)


__all__ += ["conv_input_product", "conv_kernel_product"]


def image_patches(
    x: object, kernel_size: tuple[int, int], strides: tuple[int, int], dilation: tuple[int, int]
) -> object:
    """The patch matrices of an already padded image batch, ``(batch, H, W, C)`` ->
    ``(batch, o_h o_w, C k_h k_w)``: row ``i`` of sample ``b`` holds the window output ``i``
    reads (``jax.lax.conv_general_dilated_patches``, no padding; entries ordered
    ``(c, p_h, p_w)``)."""
    patches = jax.lax.conv_general_dilated_patches(
        x,
        filter_shape=tuple(kernel_size),
        window_strides=tuple(strides),
        padding="VALID",
        rhs_dilation=tuple(dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return jnp.reshape(patches, (x.shape[0], -1, patches.shape[-1]))


__all__ += ["image_patches"]
