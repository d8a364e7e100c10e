"""Every module of tf_jacbp but the backend's own (``tf_jacbp/backend/``, and ``_backend.py``,
which imports it) is written in ``keras.ops`` and NumPy: TensorFlow only through
``tf_jacbp.backend`` (issues 21 and 22), so that the package runs on Keras' JAX backend where
TensorFlow is not installed (the GPU machine).

The check reads the source: no ``import tensorflow`` (nor ``from tensorflow ...``), no import of
the name ``tf`` from anywhere, and no use of a name ``tf`` in code. Docstrings may name a
TensorFlow function a user passes (``tf.nn.relu``).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import tf_jacbp

PACKAGE = pathlib.Path(tf_jacbp.__file__).parent
MODULES = sorted(
    path.relative_to(PACKAGE).as_posix()
    for path in PACKAGE.rglob("*.py")
    if path.relative_to(PACKAGE).parts[0] not in ("backend", "_backend.py")
)


def tensorflow_uses(source: str) -> list[str]:
    """Each import of TensorFlow or of a name ``tf``, and each use of a name ``tf``, with its
    line."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}"
                for a in node.names
                if a.name.split(".")[0] == "tensorflow" or (a.asname or a.name) == "tf"
            ]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] == "tensorflow":
                found.append(f"line {node.lineno}: from {node.module} import ...")
            found += [
                f"line {node.lineno}: from {node.module} import {a.name}"
                for a in node.names
                if (a.asname or a.name) == "tf"
            ]
        elif isinstance(node, ast.Name) and node.id == "tf":
            found.append(f"line {node.lineno}: tf")
    return found


def test_the_scan_finds_what_it_looks_for():
    code = "import tensorflow as tf\nfrom tf_jacbp._backend import tf\nx = tf.ones(3)\n"
    assert len(tensorflow_uses(code)) == 3
    assert tensorflow_uses('"""tf.nn.relu is accepted."""\nfrom keras import ops\n') == []


def test_the_scan_covers_the_whole_package_but_the_backend():
    """The Toeplitz index's modules (the run-time index included), the layers, the walk, the
    check, DP-SGD and the kit are read; the backend's modules are not."""
    index = {"toeplitz.py", "toeplitz_budget.py", "toeplitz_dynamic.py", "toeplitz_products.py"}
    others = {"geometry.py", "layers/conv.py", "jacobian/walk.py", "check/routes.py"}
    others |= {"privacy/dpsgd.py", "testing/harness.py", "hooks.py", "layout.py"}
    assert index | others <= set(MODULES), MODULES
    assert not [m for m in MODULES if m.startswith("backend/") or m == "_backend.py"]


@pytest.mark.parametrize("module", MODULES)
def test_no_tensorflow_outside_the_backend(module):
    uses = tensorflow_uses((PACKAGE / module).read_text())
    assert not uses, f"tf_jacbp/{module} uses TensorFlow outside tf_jacbp.backend: {uses}"
