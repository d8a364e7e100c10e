"""A public layer-test kit: ``check_layer`` gives a layer every mode and every comparison.

A user's own ``tf_jacbp.layers.JacobianLayer`` (docs/custom_layers.md) gets every check the
project's layers get, by one call::

    tf_jacbp.testing.check_layer(lambda dtype: Scale(dtype=dtype), input_shape=(4,))

For a layer made by ``make_layer(dtype)`` it checks, in this order (each failure is an
``AssertionError`` naming the check, the variable and the numbers):

1. the Jacobian route's gradients (with respect to the layer's input and every parameter) equal
   the backend's autodiff (``tf.GradientTape`` or ``jax.value_and_grad``) through the reference
   route, in float64 and float32, to ``tf_jacbp.tolerances.rtol(dtype)`` (float64: ``1e-12``);
2. in float64, the same gradients equal central finite differences of the loss, for every entry
   of every parameter;
3. the update ``model.fit`` applies (one SGD step with learning rate 1, so the update *is* the
   gradient) equals the reference gradient when the model runs eagerly, as a graph, and with
   ``jit_compile=True``;
4. under ``mixed_float16``, float32 gradients reach the optimizer, agree with the reference route
   run under the same policy, and a loss-scaled ``fit`` step applies them;
5. a ``.keras`` round trip gives identical predictions and gradients;
6. per-example rows: ``tf_jacbp.jacobian.per_example_gradients`` (the layer's
   ``per_example_backward``) equals, sample by sample, the reference route's gradient on a batch
   of one, in float64 to ``1e-12`` (layers with parameters whose map has a per-sample Jacobian);
7. the contract itself (``tf_jacbp.testing.contract``): each map's ``vjp_input`` and
   ``vjp_params`` against autodiff of its reference route for ``V = 1`` and ``V = 3`` stacked
   vectors, ``sum_batch`` both ways, its ``squared_norms`` against the squared norms of the
   per-sample reference gradients, and the derived ``jacobian_rows``, in float64.

A convolution whose ``T(K)`` is applied implicitly (``toeplitz="implicit"``, or ``"auto"`` above
the crossover) calls the transposed-convolution and filter-gradient kernels that stock autodiff
of its ``reference`` runs too. For it, every reference route above is the witness of
``tf_jacbp.check.conv_witness``: autodiff of the product with the materialized ``T(K)`` where a
training step with the dense float64 ``T(K)`` fits the Toeplitz budget; above it the reference
stays stock autodiff and check 2's float64 finite differences are the independent witness (run
even with ``finite_differences=False``). ``check_layer`` returns a ``LayerCheckResult`` saying
which witness each dtype policy's checks used.

A layer of several inputs (``Add``) takes ``input_shape`` as a list of shapes; check it at a
``batch_size`` other than its number of inputs, so that a formula confusing the two fails.

Checks 3-5 exercise what a layer class shares across its arguments (the route switch inside
``fit``, XLA, the dtype policy, the config): ``check_layer(..., modes=False)`` runs only checks 1,
2, 6 and 7, the layer's formulas, for further configurations of a class already run with every
mode (about a third of the time).

Layers whose map depends on the ``training`` flag (``BatchNormalization``, ``Dropout``) are run
with ``training=True`` or ``training=False``: checks 1, 2, 4 and 5 then take every gradient
through ``model(x, training=...)``, while the ``fit`` steps of checks 3 and 4 are compared with the
reference route in training mode, the mode ``fit`` runs in. A training call changes the model's
non-trainable state (moving statistics, seed generator states), so the kit restores that
state before each route, each ``fit`` model starts from the state the reference route saw, and
after the ``fit`` step its state must equal the reference route's (the moving statistics update
as the reference's do). With ``training=True`` the ``.keras`` check first runs one training call,
so that the saved moving statistics are not their initial values; check 6 runs in inference
mode (a train-mode batch normalization couples the samples, so it has no per-sample gradient).

It runs on Keras' TensorFlow and JAX backends. On JAX, float64 is float64 only with x64 enabled
(``JAX_ENABLE_X64=1``): ``check_layer`` refuses to run without it
(``tf_jacbp.backend.require_float64``), since checks 1, 2, 6 and 7 promise float64 agreement.
Where Keras computes an op in float32 on JAX (``tanh``, ``mean``, ``var``: ``tf_jacbp.numerics``),
the layers' reference routes use a float64 computation of their own there.

The layer sits behind a stock ``InputScale`` layer (``x -> x * s``, ``s`` trainable, initialized
to one) so that its input gradient reaches a variable, and the loss is
``0.5 * ||y - t||^2`` per sample, averaged over the batch.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

from tf_jacbp import backend
from tf_jacbp._backend import keras
from tf_jacbp.check.conv_witness import FLOAT64_FINITE_DIFFERENCES, ORDER, STOCK_AUTODIFF
from tf_jacbp.testing.contract import check_contract
from tf_jacbp.testing.harness import (
    InputScale,
    _check_finite_differences,
    _check_fit_modes,
    _check_mixed_precision,
    _check_per_example_rows,
    _check_routes_agree,
    _check_saving,
    assert_gradients_close,
    build_model,
    draw_inputs,
    half_squared_error,
    loss_gradients,
    model_gradients,
    model_state,
    set_model_state,
    witness_log,
)

__all__ = [
    "InputScale",
    "LayerCheckResult",
    "assert_gradients_close",
    "build_model",
    "check_contract",
    "check_layer",
    "half_squared_error",
    "loss_gradients",
    "model_gradients",
    "model_state",
    "set_model_state",
]


@dataclasses.dataclass(frozen=True)
class LayerCheckResult:
    """What ``check_layer`` compared the layer's Jacobian route with.

    Attributes:
        witnesses: dtype policy name (``"float64"``, ``"float32"``, ``"mixed_float16"``) ->
            ``"stock autodiff"`` (the layer's ``reference``), ``"materialized T(K)"`` (an
            implicit convolution: autodiff of the product with ``T(K)`` formed from ``K``) or
            ``"finite differences"`` (an implicit convolution over the budget: check 2), for
            each policy a reference route was traced in; empty for a layer that is no Toeplitz
            layer (``tf_jacbp.check.conv_witness``).
        finite_differences: check 2 ran.
    """

    witnesses: dict[str, str]
    finite_differences: bool

    @property
    def witness(self) -> str:
        """The witness of the float64 checks (the formulas), else the latest of
        ``conv_witness.ORDER`` over the policies; ``"stock autodiff"`` if none was recorded."""
        if "float64" in self.witnesses:
            return self.witnesses["float64"]
        return max(self.witnesses.values(), key=ORDER.index, default=STOCK_AUTODIFF)


def _check_contract(make_layer, input_shape, batch_size, seed, input_fn, training) -> None:
    """Check 7 (``tf_jacbp.testing.contract``) on a float64 layer built for the input."""
    layer = make_layer("float64")
    x = draw_inputs(input_shape, batch_size, "float64", np.random.default_rng(seed), input_fn)
    layer(x)  # builds it for this input, as a model would
    if isinstance(layer, keras.Model):
        return  # a block of layers (a residual block): check 7 is each map's, not the model's
    check_contract(layer, x, seed)


def check_layer(
    make_layer: Callable[[str], keras.layers.Layer],
    input_shape: Sequence,
    *,
    tmp_dir: str | None = None,
    batch_size: int = 3,
    seed: int = 0,
    input_fn: Callable[[np.random.Generator, tuple], np.ndarray] | None = None,
    finite_differences: bool = True,
    training: bool | None = None,
    modes: bool = True,
) -> LayerCheckResult:
    """Run every comparison and mode of the module docstring on ``make_layer``.

    Args:
        make_layer: ``dtype -> layer``, a fresh layer with that dtype policy each call.
        input_shape: the input shape without the batch axis.
        tmp_dir: a directory for the ``.keras`` file (pytest's ``tmp_path``); default a
            temporary directory of its own.
        input_fn: ``(rng, shape) -> array`` to draw inputs (default standard normal), e.g. to
            keep inputs away from a kink.
        finite_differences: off only for maps that are not differentiable almost everywhere at
            the step size (none in tf_jacbp; kept for user layers).
        training: ``None`` for layers whose map does not depend on the flag (gradients through
            ``model(x)``); ``True`` or ``False`` to take the gradients through
            ``model(x, training=...)``, restoring the non-trainable state between the routes (see
            the module docstring).
        modes: run checks 3-5 (``fit`` eagerly, as a graph and under XLA; mixed precision; the
            ``.keras`` round trip). ``False`` keeps checks 1, 2, 6 and 7 only: for another
            configuration of a layer class whose every mode was checked with other arguments.

    Returns a ``LayerCheckResult``: the witness of each dtype policy's checks (module docstring).
    """
    backend.require_float64("tf_jacbp.testing.check_layer")
    args = (make_layer, input_shape, batch_size, seed, input_fn, training)
    with witness_log() as log:
        _check_routes_agree(*args)
        # an implicit convolution over the budget has no other independent witness
        differenced = finite_differences or FLOAT64_FINITE_DIFFERENCES in log.values()
        if differenced:
            _check_finite_differences(*args)
        if modes:
            _check_fit_modes(*args)
            _check_mixed_precision(*args)
            if tmp_dir is None:
                with tempfile.TemporaryDirectory() as tmp:
                    _check_saving(*args, tmp)
            else:
                _check_saving(*args, tmp_dir)
        _check_per_example_rows(*args)
        _check_contract(*args)
    return LayerCheckResult(dict(log), differenced)
