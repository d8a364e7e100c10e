"""Reload exported SavedModels in a fresh process and differentiate their ``serve`` function.

Run by ``tests/system/test_saving.py``. A fresh process matters: in the process that traced a
``tf.custom_gradient``, TensorFlow's gradient registry still holds the Python backward function,
and a reloaded graph would find it there even if the SavedModel had not stored it. Here the only
source of a gradient is the SavedModel itself (without stored custom gradients, asking for one is a
``LookupError``).

Usage: ``saved_model_gradients.py OUT.npz EXPORT_DIR INPUTS.npz [EXPORT_DIR INPUTS.npz ...]``.
``INPUTS.npz`` holds ``x`` and ``upstream`` (shaped like the output). For the ``k``-th export,
``OUT.npz`` gets ``k/y = serve(x)``, ``k/dx`` and ``k/d/<variable name>``: the gradients of
``sum(serve(x) * upstream)`` with respect to ``x`` and to every trainable variable.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def gradients(export_dir: str, inputs: str) -> dict:
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(export_dir)
    with np.load(inputs) as f:
        x = tf.constant(f["x"])
        upstream = tf.constant(f["upstream"])
    variables = list(loaded.trainable_variables)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = loaded.serve(x)
        loss = tf.reduce_sum(y * upstream)
    dx, *dvariables = tape.gradient(loss, [x, *variables])
    result = {"y": y.numpy(), "dx": dx.numpy()}
    for v, g in zip(variables, dvariables, strict=True):
        result[f"d/{v.name.split(':')[0]}"] = tf.convert_to_tensor(g).numpy()
    return result


def main(argv: list[str]) -> int:
    import numpy as np

    out, pairs = argv[0], argv[1:]
    if not pairs or len(pairs) % 2:
        raise SystemExit(__doc__)
    result = {}
    for k in range(len(pairs) // 2):
        for name, value in gradients(pairs[2 * k], pairs[2 * k + 1]).items():
            result[f"{k}/{name}"] = value
    np.savez(out, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
