"""The base class: its custom-layer example passes the harness; the route and its mode.

The tests that plant a bug in a layer (the harness and ``fit`` see it) are in
``tests/layers/test_planted_bugs.py``.
"""

import contextlib
import re
from pathlib import Path

import numpy as np
import tensorflow as tf

import tf_jacbp
from tf_jacbp import layers
from tf_jacbp.testing import check_layer as run_layer_test

README = Path(__file__).resolve().parents[2] / "docs" / "custom_layers.md"


def readme_example() -> str:
    """The custom-layer example of the README (the python block after its marker)."""
    text = README.read_text()
    match = re.search(r"<!-- custom-layer-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/custom_layers.md lost its custom-layer example"
    return match.group(1)


def test_readme_custom_layer_example_passes_the_harness(tmp_path):
    namespace: dict = {}
    exec(readme_example(), namespace)
    scale = namespace["Scale"]
    run_layer_test(lambda dtype: scale(dtype=dtype), (4,), tmp_dir=tmp_path)
    # and the example's assertion held: its gradient equals the reference route's
    assert namespace["max_error"] < 1e-6


def test_reference_mode_is_reentrant_and_restores():
    assert not tf_jacbp.in_reference_mode()
    with tf_jacbp.reference_mode():
        with tf_jacbp.reference_mode():
            assert tf_jacbp.in_reference_mode()
        assert tf_jacbp.in_reference_mode()
    assert not tf_jacbp.in_reference_mode()


def test_route_is_one_function_under_its_old_import_paths():
    from tf_jacbp import mode, route
    from tf_jacbp.layers import base

    assert layers.route is base.route is route.route
    assert mode.reference_mode is route.reference_mode is tf_jacbp.reference_mode


def test_route_passes_constants_without_differentiating_them():
    """``route(op, x, params, constants)``: the constants reach all three methods after the
    parameters, and only ``x`` and the parameters get gradients (``op.backward``'s)."""
    seen = []

    class Shift:
        def forward(self, x, w, c):
            seen.append(c)
            return x * w + c

        def reference(self, x, w, c):
            return tf.add(tf.multiply(x, w), c)

        def backward(self, dy, x, y, w, c):
            return 3 * dy * w, [tf.reduce_sum(dy * x, axis=0)]  # dx deliberately 3x

    x, w, c = tf.constant([[1.0, 2.0]]), tf.constant([0.5, -1.0]), tf.constant([10.0, 20.0])
    grads = {}
    for mode in ("jacobian", "reference"):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, w, c])
            with tf_jacbp.reference_mode() if mode == "reference" else contextlib.nullcontext():
                y = layers.route(Shift(), x, [w], constants=[c])
        np.testing.assert_array_equal(y, [[10.5, 18.0]])
        grads[mode] = tape.gradient(y, [x, w, c])
    assert seen and seen[0] is c
    np.testing.assert_array_equal(grads["jacobian"][0], 3 * grads["reference"][0])
    np.testing.assert_array_equal(grads["jacobian"][1], grads["reference"][1])
    assert grads["jacobian"][2] is None  # a constant: no gradient on the Jacobian route
