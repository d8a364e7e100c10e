"""The float64 twin of a model: the formula witness and the rounding floor's reference.

Every layer is rebuilt in float64 by ``get_config``/``from_config``; dropout layers become
``ReplayedDropout``, which draws the model's own mask (in the model's dtype, from the same seed
state) and applies it in float64; the compiled loss is computed in float64. ``synchronize()``
copies the model's weights (trainable ones, batch-norm statistics, seed states) into the twin.
On JAX the twin needs x64 enabled (``tf_jacbp.backend.require_float64``): else its float64 would
silently be float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from keras import ops

from tf_jacbp import backend
from tf_jacbp._backend import keras
from tf_jacbp.check.routes import gradient_function, layers_of, state_variables
from tf_jacbp.layers.dropout import Dropout as JacobianDropout


class _Float64Loss(keras.losses.Loss):
    """``fn(y_true, y_pred)`` per sample, reduced as the original loss, computed in float64."""

    def __init__(self, fn: Callable, reduction: str, name: str):
        super().__init__(name=name, reduction=reduction, dtype="float64")
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def _float64_loss(loss: Any) -> Any:
    """The compiled loss ``loss`` (one leaf of ``model.loss``) computing in float64."""
    if loss is None:
        return None
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return _Float64Loss(loss.call, loss.reduction, loss.name)
    if callable(loss):
        return _Float64Loss(loss, "sum_over_batch_size", getattr(loss, "__name__", "loss"))
    raise ValueError(
        f"the loss {loss!r} cannot be computed in float64; compile with a keras.losses.Loss "
        "(e.g. from tf_jacbp.losses), a loss name or a function"
    )


@contextlib.contextmanager
def _floatx(dtype: str) -> Iterator[None]:
    """Temporarily set Keras' ``floatx`` (read by ``compile`` for the loss's own dtype)."""
    previous = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        yield
    finally:
        keras.config.set_floatx(previous)


_DROPOUTS = (keras.layers.Dropout, JacobianDropout)


class _ReplayedDropout(keras.layers.Layer):
    """A dropout layer of the float64 twin: ``y = x * k / (1 - r)`` in float64, with the keep
    mask ``k`` that the model's own layer draws. ``source`` is a copy of that layer in the
    model's dtype policy, whose seed state is copied from the model's at every check: it is run
    on ones of its compute dtype, and its nonzero outputs are the kept entries."""

    def __init__(self, source: keras.layers.Layer, rate: float, **kwargs: Any):
        super().__init__(dtype="float64", **kwargs)
        self.source = source
        self.rate = float(rate)

    def build(self, input_shape: tuple) -> None:
        if not self.source.built:
            self.source.build(input_shape)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        if not training or self.rate == 0:
            return inputs
        if self.rate >= 1:
            return inputs * ops.zeros([], inputs.dtype)
        ones = ops.ones(ops.shape(inputs), self.source.compute_dtype)
        kept = ops.cast(ops.not_equal(self.source(ones, training=True), 0), inputs.dtype)
        return inputs * kept * ops.convert_to_tensor(1 / (1 - self.rate), inputs.dtype)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)


class Float64Twin:
    """The float64 twin of a model: every layer rebuilt in float64 (dropout replayed, see
    ``_ReplayedDropout``), the compiled loss in float64, and its two gradient routes.

    ``synchronize()`` copies every weight of the model (trainable ones, batch-norm statistics,
    seed states) into the twin; call it inside the compiled check (on JAX: eagerly, between the
    compiled routes), before the twin's routes.
    ``unreplayed_noise`` lists layers with random state other than dropout (their noise differs
    in the twin, so only the twin's own two routes are comparable).

    ``replay_dropout=False`` keeps the dropout layers as they are, in float64 (identity outside
    training): a twin that Algorithm 1's walk accepts, for the per-example norm witness.
    """

    def __init__(
        self,
        model: keras.Model,
        variables: Sequence,
        jit_compile: bool,
        replay_dropout: bool = True,
    ):
        backend.require_float64("GradientCheck's float64 twin")
        layers = list(layers_of(model))
        self.unreplayed_noise = [
            layer.name
            for layer in layers
            if getattr(layer, "seed_generator", None) is not None
            and not isinstance(layer, _DROPOUTS)
        ]

        def clone_layer(layer):
            config = layer.get_config()
            if replay_dropout and isinstance(layer, _DROPOUTS) and layer.rate > 0:
                source = type(layer).from_config(config)
                return _ReplayedDropout(source, layer.rate, name=layer.name)
            return type(layer).from_config({**config, "dtype": "float64"})

        try:
            clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
        except Exception as err:
            raise ValueError(
                f"could not clone model '{model.name}' in float64 ({type(err).__name__}: "
                f"{err}); the float64 twin needs a Sequential or Functional model whose layers "
                "round-trip through get_config/from_config"
            ) from err
        ours = [*model.trainable_variables, *model.non_trainable_variables]
        theirs = [*clone.trainable_variables, *clone.non_trainable_variables]
        if [(tuple(v.shape), v.path.rsplit("/", 1)[-1]) for v in ours] != [
            (tuple(v.shape), v.path.rsplit("/", 1)[-1]) for v in theirs
        ]:
            raise ValueError(
                f"the float64 clone of model '{model.name}' has other variables than the model; "
                "its layers must round-trip through get_config/from_config"
            )
        loss_weights = model.get_compile_config().get("loss_weights")
        with _floatx("float64"):
            clone.compile(
                loss=keras.tree.map_structure(_float64_loss, model.loss),
                loss_weights=loss_weights,
            )
        by_id = {id(v): i for i, v in enumerate(ours)}
        self.model = clone
        self.replays_dropout = replay_dropout and any(
            isinstance(layer, _ReplayedDropout) for layer in layers_of(clone)
        )
        self.pairs = list(zip(ours, theirs, strict=True))
        dtypes = [target.dtype for target in theirs]
        # one compiled cast of every weight on JAX (in the check's graph on TensorFlow)
        self._cast = backend.compile_statistics(
            lambda values: [ops.cast(v, d) for v, d in zip(values, dtypes, strict=True)]
        )
        self.variables = [theirs[by_id[id(v)]] for v in variables]
        self.state = state_variables(clone)
        self.jacobian_fn = gradient_function(clone, self.variables, self.state, jit_compile)
        self.reference_fn = gradient_function(clone, self.variables, self.state, jit_compile)

    def synchronize(self) -> None:
        """Copy the model's weights into the twin (cast to the twin's dtypes)."""
        values = self._cast([source.value for source, _ in self.pairs])
        for (_, target), value in zip(self.pairs, values, strict=True):
            target.assign(value)
