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


def test_the_version_is_defined_once():
    """setup.cfg reads ``tf_jacbp.__version__``; the installed metadata carries the same."""
    import importlib.metadata
    from pathlib import Path

    import tf_jacbp

    setup = (Path(__file__).resolve().parents[2] / "setup.cfg").read_text()
    assert "version = attr: tf_jacbp.__version__" in setup
    assert importlib.metadata.version("tf_jacbp") == tf_jacbp.__version__


def test_the_package_is_typed_and_licensed():
    """PEP 561's marker ships in the package; LICENSE matches the metadata's Apache-2.0."""
    from pathlib import Path

    import tf_jacbp

    assert (Path(tf_jacbp.__file__).parent / "py.typed").exists()
    license_text = (Path(__file__).resolve().parents[2] / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
