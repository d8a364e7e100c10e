"""The layers, activations and losses, the Toeplitz index (``toeplitz*.py``) and the window
geometry are written in ``keras.ops`` and NumPy: TensorFlow only through ``tf_jacbp.backend``
(issue 21, item 2), so that the layer library does not depend on it.

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
    [
        *(
            path.relative_to(PACKAGE).as_posix()
            for folder in ("layers", "activations", "losses")
            for path in (PACKAGE / folder).glob("*.py")
        ),
        *(path.name for path in PACKAGE.glob("toeplitz*.py")),
        "geometry.py",
    ]
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


def test_the_scan_covers_the_toeplitz_index_and_the_geometry():
    """The Toeplitz index's modules (the run-time index included) and the geometry are read."""
    index = {"toeplitz.py", "toeplitz_budget.py", "toeplitz_dynamic.py", "toeplitz_products.py"}
    assert index | {"geometry.py", "layers/conv.py"} <= set(MODULES), MODULES


@pytest.mark.parametrize("module", MODULES)
def test_no_tensorflow_outside_the_backend(module):
    uses = tensorflow_uses((PACKAGE / module).read_text())
    assert not uses, f"tf_jacbp/{module} uses TensorFlow outside tf_jacbp.backend: {uses}"


def test_every_backend_function_says_why_it_has_no_keras_ops_form():
    from tf_jacbp import backend

    for name in backend.__all__:
        doc = getattr(backend, name).__doc__
        assert doc and len(doc.split()) >= 8, f"tf_jacbp.backend.{name} has no docstring"
