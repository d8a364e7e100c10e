"""Planted-bug layers written in ``keras.ops`` only, for the tests of both backends.

A planted bug is a user-written layer on the public base classes that overrides one product of
the contract (``vjp_input`` or ``vjp_params``, ``tf_jacbp.contract``) or BatchNormalization's
``training_map``. The ones here run on TensorFlow and JAX: ``tests/planted.py`` (the TensorFlow
suite's planted layers and their models), ``tests/test_contract.py`` and
``tests/backends/test_planted_on_backends.py`` import them from here.
"""

from __future__ import annotations

from keras import ops

from tf_jacbp import layers

OFF = 1.01


def one_percent_off(cls: type, method: str = "vjp", into: str = "dx") -> type:
    """``cls`` with one product 1% off: ``into="param"`` scales the first parameter product
    (``vjp_params``), ``"dx"`` the input product (``vjp_input``, every input's for ``Add``).
    ``method="training_map"`` (BatchNormalization): the map it returns has its ``vjp_params``
    (``vjp_input``) 1% off."""
    if method == "training_map":
        return _training_map_off(cls, into)
    if into == "param":

        def off(self, *args, **kwargs):
            grads = super(planted, self).vjp_params(*args, **kwargs)
            return [OFF * grads[0], *grads[1:]]

        body = {"vjp_params": off}
    else:

        def off(self, *args):
            dx = super(planted, self).vjp_input(*args)
            return [OFF * d for d in dx] if isinstance(dx, list) else OFF * dx

        body = {"vjp_input": off}
    planted = type(f"OnePercentOff{cls.__name__}", (cls,), body)
    return planted


def _training_map_off(cls: type, into: str) -> type:
    """``cls`` (a BatchNormalization) whose ``training_map`` has its first parameter product
    (``into="param"``) or its input product 1% off."""

    def training_map(self, masked=False):
        inner = super(planted, self).training_map(masked)
        if into == "param":

            def product(op, *args, **kwargs):
                grads = type(inner).vjp_params(op, *args, **kwargs)
                return [OFF * grads[0], *grads[1:]]

            body = {"vjp_params": product}
        else:
            body = {"vjp_input": lambda op, *args: OFF * type(inner).vjp_input(op, *args)}
        off = type(f"OnePercentOff{type(inner).__name__}", (type(inner),), body)
        return off(inner.epsilon, inner.scale, inner.center, inner.name)

    planted = type(f"OnePercentOff{cls.__name__}", (cls,), {"training_map": training_map})
    return planted


class WrongKernelGradient(layers.Dense):
    """A Dense whose backward pass doubles the kernel gradient."""

    def vjp_params(self, *args, **kwargs):
        dw, *rest = super().vjp_params(*args, **kwargs)
        return [2 * dw, *rest]


class SignFlippedRowsDense(layers.Dense):
    """Per-sample products (``sum_batch=False``) with the sign flipped; the batch sum right."""

    def vjp_params(self, m, a, z, kernel, bias=None, sum_batch=True):
        grads = super().vjp_params(m, a, z, kernel, bias, sum_batch=sum_batch)
        return grads if sum_batch else [-g for g in grads]


class QuarterNormsDense(layers.Dense):
    """A norm formula returning a quarter of the true squared norm."""

    def squared_norms(self, m, a, z, kernel, bias=None):
        return [s / 4 for s in super().squared_norms(m, a, z, kernel, bias)]


class WeightedSum(layers.JacobianLayer):
    """``y = x_0 + c x_1`` with a learned ``c`` of shape ``(d,)``: a layer of two inputs."""

    def build(self, input_shape):
        self.c = self.add_weight(name="c", shape=(input_shape[1][-1],), initializer="ones")

    def jacobian_parameters(self):
        return [self.c]

    def forward(self, xs, c):
        return xs[0] + c * xs[1]

    def reference(self, xs, c):
        return ops.add(xs[0], ops.multiply(c, xs[1]))

    def vjp_input(self, m, xs, y, c):
        return [m, m * c]

    def vjp_params(self, m, xs, y, c, sum_batch=True):
        return [ops.einsum("vbd,bd->vd" if sum_batch else "vbd,bd->vbd", m, xs[1])]

    def compute_output_shape(self, input_shape):
        return input_shape[0]


class SwappedAxesWeightedSum(WeightedSum):
    """The second input's product reads the batch axis where the input axis is meant: the
    classic slip of a formula first written and tested at batch size = number of inputs."""

    def vjp_input(self, m, xs, y, c):
        both = ops.stack([m, m * c], axis=1)  # (V, 2, batch, d)
        return [both[:, 0], ops.flip(both[:, 1], axis=1)]  # sample order reversed in input 1
