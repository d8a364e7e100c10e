"""The package's metadata: extras, version, type marker, licence. What importing tf_jacbp says
without a backend is tests/system/test_backend_import.py."""

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_backend_has_its_extras():
    """TensorFlow through ``cpu``/``gpu``, JAX through ``jax``/``jax-cuda`` (CUDA 13, the plugin of
    the GPU machine's JAX 0.11.2): the extras the import error names exist, with the bounds
    docs/backends.md gives."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = {
        name: [line.strip() for line in value.splitlines() if line.strip()]
        for name, value in config["options.extras_require"].items()
    }
    assert extras["cpu"] == ["tensorflow-cpu>=2.16"]
    assert extras["gpu"] == ["tensorflow[and-cuda]>=2.16"]
    assert extras["jax"] == ["jax>=0.11.2"]
    assert extras["jax-cuda"] == ["jax[cuda13]>=0.11.2"]


def test_ci_tests_the_jax_the_extra_names():
    """.ci/run's JAX part installs exactly the version the ``jax`` extra starts from (the GPU
    machine's) and runs tests/backends on it, as docs/backends.md says."""
    run = (ROOT / ".ci" / "run").read_text()
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    version = config["options.extras_require"]["jax"].strip().removeprefix("jax>=")
    assert f"jax=={version}" in run
    command = "KERAS_BACKEND=jax python -m pytest -q -p no:cacheprovider -n 2 tests/backends"
    assert command.replace("python", '"$venv/bin/python"') in run
    assert command in (ROOT / "docs" / "backends.md").read_text().replace("\n", " ")


def test_the_version_is_defined_once():
    """setup.cfg reads ``tf_jacbp.__version__``; the installed metadata carries the same."""
    import importlib.metadata

    import tf_jacbp

    setup = (ROOT / "setup.cfg").read_text()
    assert "version = attr: tf_jacbp.__version__" in setup
    assert importlib.metadata.version("tf_jacbp") == tf_jacbp.__version__


def test_the_package_is_typed_and_licensed():
    """PEP 561's marker ships in the package; LICENSE matches the metadata's Apache-2.0."""
    import tf_jacbp

    assert (Path(tf_jacbp.__file__).parent / "py.typed").exists()
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
