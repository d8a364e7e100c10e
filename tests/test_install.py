"""Importing tf_jacbp without TensorFlow says which extra to install."""

import subprocess
import sys
import textwrap

BLOCK_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ImportError(f"No module named {name!r} (blocked by the test)")


    sys.meta_path.insert(0, NoTensorFlow())
    try:
        import tf_jacbp  # noqa: F401
    except ImportError as err:
        print(err)
    """
)


def test_import_without_tensorflow_names_the_extras():
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TENSORFLOW], capture_output=True, text=True, timeout=120
    )
    assert "pip install 'tf_jacbp[cpu]'" in result.stdout, result.stdout + result.stderr
    assert "tf_jacbp[gpu]" in result.stdout
