"""The one Jacobian contract of every tf_jacbp map (layer, activation, loss, normalization mode).

A map ``y = F(x; p_1, ..., p_k)`` writes, besides ``forward`` and ``reference``, two products
with a stack of ``V`` vectors ``m`` on the output side (BackPACK's ``jac_t_mat_prod``):

* ``vjp_input(m, x, y, *params)``: ``(J_x F)^T m``. ``m`` is ``(V, batch, *y.shape[1:])``; the
  result is ``(V, batch, *x.shape[1:])``, a list of those for a map of several inputs. Each
  sample's vectors meet that sample's Jacobian only: ``out[v, i] = (J_x F(x_i))^T m[v, i]``.
* ``vjp_params(m, x, y, *params, sum_batch=True)``: one tensor per parameter,
  ``sum_i (J_p F(x_i))^T m[v, i]`` of shape ``(V, *p.shape)``, or with ``sum_batch=False`` each
  sample's term, ``(V, batch, *p.shape)``. A map without parameters keeps the default (``[]``).
* optionally ``squared_norms(m, x, y, *params)``, for ``V = 1``: one ``(batch,)`` tensor per
  parameter, ``||(J_p F(x_i))^T m[0, i]||^2``, the squared norms of
  ``vjp_params(m, ..., sum_batch=False)`` computed without forming the per-sample gradients
  (Dense: ``||a_i||^2 ||delta_i||^2``).

A map that also depends on values it does not differentiate (Dropout's mask, a loss's labels)
takes them after the parameters, ``forward(x, *params, *constants)`` and so on in every method;
``vjp_params`` still returns one tensor per parameter.

Everything else is derived here, once, and never overridden (``JacobianMap.__init_subclass__``
refuses a subclass that defines one):

* ``backward(dy, x, y, *params)``: training's backward pass, ``((J_x F)^T dy, [(J_p F)^T dy])``
  summed over the batch (``V = 1``);
* ``per_example_backward(dy, x, y, *params)``: the same, each parameter gradient per sample
  (``(batch, *p.shape)``): Algorithm 1's per-example gradients;
* ``input_backward(dy, x, y, *params)``: ``(J_x F)^T dy`` alone, for a walk that needs no
  parameter products;
* ``per_example_squared_norms(dy, x, y, *params)``: ``squared_norms`` where the map has one,
  else the squares of ``per_example_backward``'s rows; DP-SGD's first pass;
* ``jacobian_rows(m, x, y, *params)``: rows ``M J_x`` and ``M J_p`` for ``M`` ``(batch, k,
  *y.shape[1:])``: ``(batch, k, *x.shape[1:])`` and ``(batch, k, size(p))`` in ``Vec`` order
  (``tf_jacbp.layout``), Algorithm 1's step 2.

Each derived method checks the shapes the contract promises, at trace time, and names the map
and the method when one is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops

__all__ = ["DERIVED", "JacobianMap", "check_shape", "squared_norms_of", "vec_rows"]

# The methods derived from the contract: a map that defines one of these is refused.
DERIVED = (
    "backward",
    "per_example_backward",
    "input_backward",
    "per_example_squared_norms",
    "jacobian_rows",
)


def check_shape(owner: Any, method: str, what: str, value: Any, expected: Sequence) -> None:
    """Raise ``ValueError`` naming ``owner``, ``method`` and ``what`` unless ``value``'s static
    shape matches ``expected`` (``None`` in either matches any size)."""
    got = tuple(value.shape)
    expected = tuple(expected)
    same = len(got) == len(expected) and all(
        g is None or e is None or g == e for g, e in zip(got, expected, strict=True)
    )
    if not same:
        raise ValueError(
            f"{_name(owner)}.{method} returned {what} of shape {got}; the contract "
            f"(tf_jacbp.contract) requires {expected}."
        )


def _name(owner: Any) -> str:
    name = getattr(owner, "name", None)
    kind = type(owner).__name__
    return f"{kind} '{name}'" if isinstance(name, str) and name and name != kind else kind


def _shape(t: Any) -> tuple:
    return tuple(t.shape)


def squared_norms_of(g: Any) -> Any:
    """``||g_i||^2`` for each row ``g_i`` of ``g`` ``(batch, ...)``: ``(batch,)``."""
    squared = ops.square(g)
    return ops.sum(squared, axis=tuple(range(1, len(g.shape)))) if len(g.shape) > 1 else squared


def vec_rows(g: Any) -> Any:
    """The stacked products ``(V, batch, *p.shape)`` as rows per sample, each parameter in
    ``Vec`` order: ``(batch, V, size(p))``, columns in the column-major order of
    ``tf_jacbp.layout``. One transpose moves the ``V`` axis behind the batch and reverses the
    parameter's axes (a row-major reshape of the reversed axes is the column-major ``Vec``)."""
    rank = len(g.shape)
    g = ops.transpose(g, [1, 0, *range(rank - 1, 1, -1)])
    size = 1
    for d in g.shape[2:]:
        size *= int(d)
    return ops.reshape(g, (-1, ops.shape(g)[1], size))


class JacobianMap:
    """The contract (module docstring) and what is derived from it.

    Subclasses implement ``forward``, ``reference``, ``vjp_input`` and, with parameters,
    ``vjp_params``; optionally ``squared_norms``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        defined = [name for name in DERIVED if name in cls.__dict__]
        if defined:
            raise TypeError(
                f"{cls.__name__} defines {', '.join(defined)}: these are derived from the "
                "contract (tf_jacbp.contract) and must not be overridden. Implement "
                "vjp_input(m, x, y, *params), vjp_params(m, x, y, *params, sum_batch) and "
                "optionally squared_norms(m, x, y, *params) instead."
            )

    # --- the contract --------------------------------------------------------------------------

    def forward(self, x: Any, *params: Any) -> Any:
        """``y = F(x; params)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, *params).")

    def reference(self, x: Any, *params: Any) -> Any:
        """The same map in stock ops, differentiated by autodiff (the witness)."""
        raise NotImplementedError(f"{type(self).__name__} must implement reference(x, *params).")

    def vjp_input(self, m: Any, x: Any, y: Any, *params: Any) -> Any:
        """``(J_x F)^T m``: ``(V, batch, *y.shape[1:])`` -> ``(V, batch, *x.shape[1:])``."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement vjp_input(m, x, y, *params)."
        )

    def vjp_params(self, m: Any, x: Any, y: Any, *params: Any, sum_batch: bool = True) -> list:
        """``[(J_p F)^T m]``: ``(V, *p.shape)`` each, or ``(V, batch, *p.shape)`` without
        ``sum_batch``. Default: a map without parameters."""
        return []

    squared_norms = None  # optional: (m, x, y, *params) -> [(batch,) per parameter], V = 1

    # --- derived (never overridden) ------------------------------------------------------------

    def _input_products(self, m: Any, x: Any, y: Any, args: Sequence) -> Any:
        dx = self.vjp_input(m, x, y, *args)
        v = m.shape[0]
        several = isinstance(x, (list, tuple))
        xs, dxs = (list(x), dx) if several else ([x], [dx])
        if several and not isinstance(dx, (list, tuple)):
            raise ValueError(
                f"{_name(self)}.vjp_input returned one tensor for {len(xs)} inputs; return a list, "
                "one product per input."
            )
        if len(dxs) != len(xs):
            raise ValueError(
                f"{_name(self)}.vjp_input returned {len(dxs)} products for {len(xs)} inputs."
            )
        for i, (xi, di) in enumerate(zip(xs, dxs, strict=True)):
            what = f"the product for input {i}" if several else "its product"
            check_shape(self, "vjp_input", what, di, (v, *_shape(xi)))
        return dx

    def _parameter_products(self, m: Any, x: Any, y: Any, args: Sequence, sum_batch: bool) -> list:
        grads = list(self.vjp_params(m, x, y, *args, sum_batch=sum_batch))
        if len(grads) > len(args):
            raise ValueError(
                f"{_name(self)}.vjp_params returned {len(grads)} tensors for {len(args)} "
                "parameters; return one per parameter, in order."
            )
        v = m.shape[0]
        batch = [] if sum_batch else [_batch_size(x)]
        for i, (g, p) in enumerate(zip(grads, args[: len(grads)], strict=True)):
            check_shape(
                self,
                f"vjp_params(sum_batch={sum_batch})",
                f"the product for parameter {i}",
                g,
                (v, *batch, *_shape(p)),
            )
        return grads

    def backward(self, dy: Any, x: Any, y: Any, *args: Any) -> tuple[Any, list]:
        """``((J_x F)^T dy, [sum_i (J_p F(x_i))^T dy_i])``: ``vjp_input`` and ``vjp_params`` with
        ``V = 1``. Shapes: ``dx`` like ``x``, each gradient like its parameter. An upstream
        ``dy`` of unknown rank (``output_gradients`` traced without a shape) gets ``y``'s."""
        if getattr(dy.shape, "rank", 0) is None:
            dy = ops.reshape(dy, ops.shape(y))
        return self._one_vector(dy, x, y, args, sum_batch=True)

    def per_example_backward(self, dy: Any, x: Any, y: Any, *args: Any) -> tuple[Any, list]:
        """``backward`` without the sum over the batch: gradient ``i`` is
        ``(J_p F(x_i))^T dy_i``, ``(batch, *p.shape)`` per parameter."""
        return self._one_vector(dy, x, y, args, sum_batch=False)

    def input_backward(self, dy: Any, x: Any, y: Any, *args: Any) -> Any:
        """``(J_x F)^T dy`` alone (``vjp_input`` with ``V = 1``): ``dy`` moves back without the
        parameter products (the norms' walk needs none)."""
        return _first(self._input_products(ops.expand_dims(dy, 0), x, y, args))

    def _one_vector(self, dy: Any, x: Any, y: Any, args: Sequence, sum_batch: bool) -> tuple:
        m = ops.expand_dims(dy, 0)
        dx = self._input_products(m, x, y, args)
        grads = self._parameter_products(m, x, y, args, sum_batch=sum_batch)
        return _first(dx), [g[0] for g in grads]

    def per_example_squared_norms(self, dy: Any, x: Any, y: Any, *args: Any) -> list:
        """``[||(J_p F(x_i))^T dy_i||^2 (batch,) for p in params]``: the map's ``squared_norms``
        where it has one, else the squares of ``per_example_backward``'s rows."""
        m = ops.expand_dims(dy, 0)
        if self.squared_norms is None:
            grads = self._parameter_products(m, x, y, args, sum_batch=False)
            return [squared_norms_of(g[0]) for g in grads]
        norms = list(self.squared_norms(m, x, y, *args))
        batch = _batch_size(x)
        for i, s in enumerate(norms):
            check_shape(self, "squared_norms", f"the norms of parameter {i}", s, (batch,))
        return norms

    def jacobian_rows(self, m: Any, x: Any, y: Any, *args: Any) -> tuple[Any, list]:
        """Rows ``M J_x F`` and ``[M J_p F]`` for ``k`` rows per sample, ``M`` ``(batch, k,
        *y.shape[1:])``: ``(batch, k, *x.shape[1:])`` (a list for several inputs) and
        ``(batch, k, size(p))`` per parameter, columns in ``Vec`` order."""
        stacked = ops.moveaxis(m, 1, 0)  # (k, batch, ...): the rows are the contract's V axis
        dx = self._input_products(stacked, x, y, args)
        grads = self._parameter_products(stacked, x, y, args, sum_batch=False)
        if isinstance(dx, (list, tuple)):
            dx = [ops.moveaxis(d, 0, 1) for d in dx]
        else:
            dx = ops.moveaxis(dx, 0, 1)
        return dx, [vec_rows(g) for g in grads]


def _first(dx: Any) -> Any:
    return [d[0] for d in dx] if isinstance(dx, (list, tuple)) else dx[0]


def _batch_size(x: Any) -> Any:
    first = x[0] if isinstance(x, (list, tuple)) else x
    return first.shape[0]
