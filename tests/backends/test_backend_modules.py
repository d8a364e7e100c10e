"""The two backend modules offer the same functions (``tf_jacbp.backend``), and the backend this
run uses computes float64 in float64."""

import ast
import pathlib

import numpy as np
from keras import ops

import tf_jacbp
from tf_jacbp import backend as tb

FOLDER = pathlib.Path(tf_jacbp.__file__).parent / "backend"


def exported(module: str) -> set[str]:
    """The names a backend module adds to ``__all__`` (read from its source: the other
    backend's module need not be importable here)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse((FOLDER / f"{module}.py").read_text())):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            target = node.targets[0] if isinstance(node, ast.Assign) else node.target
            if getattr(target, "id", None) == "__all__" and node.value is not None:
                names |= {e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant)}
    return names


def test_both_backends_define_the_same_functions():
    tensorflow, jax = exported("tensorflow"), exported("jax")
    # the JAX module's own helpers for TensorFlow-only features and traced values
    assert tensorflow == jax - {"is_traced", "tensorflow_only"}, tensorflow ^ (
        jax - {"is_traced", "tensorflow_only"}
    )


def test_float64_is_float64_here():
    assert tb.float64_enabled()
    x = np.linspace(-2.0, 2.0, 9)
    y = ops.convert_to_numpy(ops.multiply(ops.convert_to_tensor(x), 1.0 + 1e-12))
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, x * (1.0 + 1e-12))


def test_value_and_gradients_is_the_backends_autodiff():
    x = np.array([0.5, -1.0, 2.0])
    value, (g, unused) = tb.value_and_gradients(
        lambda a, b: ops.sum(ops.exp(a) * 3.0), [x, np.ones(2)]
    )
    np.testing.assert_allclose(ops.convert_to_numpy(value), 3 * np.exp(x).sum(), rtol=1e-14)
    np.testing.assert_allclose(ops.convert_to_numpy(g), 3 * np.exp(x), rtol=1e-14)
    np.testing.assert_array_equal(ops.convert_to_numpy(unused), np.zeros(2))


def test_every_backend_function_says_why_it_has_no_keras_ops_form():
    """On the backend this run uses (so both modules are read across the two runs), each exported
    function has a docstring of at least 8 words: why it cannot be ``keras.ops``."""
    for name in tb.__all__:
        doc = getattr(tb, name).__doc__
        assert doc and len(doc.split()) >= 8, f"tf_jacbp.backend.{name} has no docstring"
