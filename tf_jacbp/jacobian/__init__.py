"""Algorithm 1 in full: theta, ``J_theta z[L]``, per-example gradients, the factors of step 2.

For a network of tf_jacbp layers (docs/math.md, "Algorithm 1, restated"):

* ``theta = [Vec(W[1]); b[1]; ...; Vec(W[L]); b[L]]`` (``flatten_parameters``; the layout is
  ``tf_jacbp.layout``'s).
* Step 2: the block of ``J_theta z[L]`` that belongs to layer ``l``'s parameters is
  ``W[L]^T D[L-1] W[L-1]^T ... W[l+1]^T D[l] [I (x) a[l-1]^T | I]``. ``parameter_jacobian``
  evaluates this chain from the left: ``M = I`` (``n_out x n_out``) at the output, then for each
  layer, last to first, the block is ``M [I (x) a^T | I]`` (the layer's ``vjp_params`` with the
  ``n_out`` rows of ``M`` as the contract's ``V`` vectors: outer products, patch products) and
  ``M`` becomes ``M W^T`` and ``M D`` (its ``vjp_input``). No autodiff is involved.
* Step 4: ``grad_theta l = (J_theta z[L])^T delta[L]``. ``per_example_gradients`` computes it
  for each sample without forming ``J``: the same walk with ``delta[L]`` (``n_out`` values per
  sample) in place of ``M``.

Models: ``keras.Sequential`` or functional models with one input and one output whose layers are
all ``tf_jacbp.layers.JacobianLayer``; anything else raises an error that names the layer. A
functional model may branch and merge (skips through ``tf_jacbp.layers.Add``) and call a layer
several times: the walk visits its layer calls in reverse topological order and adds the rows
that reach a tensor from each of its consumers (the chain rule for a sum of paths). Each layer
contributes its inference map unless ``training=True`` (``jacobian_ops(training)``).

The package's modules: ``graph`` (layer calls, theta), ``inputs`` (argument checks), ``walk``
(the forward records and the backward walk), ``gradients`` (steps 2 and 6), ``factors``
(``layer_jacobians``) and ``norms`` (per-example gradient norms, also used by
``tf_jacbp.privacy``). Every public name is importable from ``tf_jacbp.jacobian``.
"""

from tf_jacbp.jacobian.factors import layer_jacobians
from tf_jacbp.jacobian.gradients import (
    DEFAULT_MAX_BYTES,
    parameter_jacobian,
    per_example_gradients,
)
from tf_jacbp.jacobian.graph import flatten_parameters, parameter_variables, unflatten_parameters
from tf_jacbp.jacobian.norms import per_example_gradient_norms, squared_gradient_norms
from tf_jacbp.jacobian.walk import output_delta

__all__ = [
    "DEFAULT_MAX_BYTES",
    "flatten_parameters",
    "layer_jacobians",
    "output_delta",
    "parameter_jacobian",
    "parameter_variables",
    "per_example_gradient_norms",
    "per_example_gradients",
    "squared_gradient_norms",
    "unflatten_parameters",
]
