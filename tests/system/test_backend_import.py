"""Which Keras backend ``import tf_jacbp`` accepts, and what it says otherwise.

Each case runs in a fresh interpreter (the backend is chosen once per process) with a meta-path
finder that makes the named packages look uninstalled: ``import tensorflow`` there raises
ModuleNotFoundError as on a machine without it, and every attempt is recorded, so a test can
also assert that tf_jacbp refused before Keras tried to import a backend it cannot run on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # each case starts an interpreter and imports Keras (~5 s)

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import json
    import sys

    BLOCKED = {blocked!r}
    attempts = []


    class Uninstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
            return None


    sys.meta_path.insert(0, Uninstalled())
    {before}
    try:
        import tf_jacbp

        error, backend = None, tf_jacbp.backend.BACKEND
    except ImportError as err:
        error, backend = str(err), None
    print(json.dumps({{
        "error": error,
        "backend": backend,
        "attempts": sorted(set(a.split(".")[0] for a in attempts)),
        "keras_imported": "keras" in sys.modules,
    }}))
    """
)


def import_tf_jacbp(
    blocked: tuple[str, ...], keras_backend: str | None, before: str = "", **env_vars: str
) -> dict:
    """Import tf_jacbp in a subprocess where ``blocked`` packages are absent (``env_vars`` added
    to its environment); returns the import error's message (None if it imported), the backend
    it runs on, the blocked packages something tried to import, and whether Keras was
    imported."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"} | env_vars
    if keras_backend is not None:
        env["KERAS_BACKEND"] = keras_backend
    code = SCRIPT.format(blocked=blocked, before=before)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_neither_backend_installed_names_every_extra():
    """No TensorFlow and no JAX: the default backend's extras and JAX's are both named."""
    out = import_tf_jacbp(("tensorflow", "jax"), keras_backend=None)
    assert out["error"] is not None
    for extra in ("tf_jacbp[cpu]", "tf_jacbp[gpu]", "tf_jacbp[jax]", "tf_jacbp[jax-cuda]"):
        assert extra in out["error"], out["error"]
    assert not out["keras_imported"], "the message must come before Keras fails on TensorFlow"


def test_jax_requested_without_jax_names_the_jax_extra():
    """KERAS_BACKEND=jax without JAX: the jax extras, and TensorFlow (installed) as the way out."""
    out = import_tf_jacbp(("jax", "jaxlib"), keras_backend="jax")
    assert out["error"] is not None
    assert "pip install 'tf_jacbp[jax]'" in out["error"], out["error"]
    assert "tf_jacbp[jax-cuda]" in out["error"]
    assert "tensorflow is installed: set KERAS_BACKEND=tensorflow" in out["error"]
    assert not out["keras_imported"]


def test_torch_is_refused_with_the_reason_before_keras_imports_it():
    """KERAS_BACKEND=torch: refused with the two reasons (float64 computed in float32 by Keras'
    torch ops; ``forward`` collides with torch.nn.Module.forward), before Keras imports torch:
    the blocked torch is never even looked up, whether or not it is installed."""
    out = import_tf_jacbp(("torch",), keras_backend="torch")
    assert out["error"] is not None
    for words in ("PyTorch is not supported", "float32", "matmul", "torch.nn.Module.forward"):
        assert words in out["error"], out["error"]
    assert out["attempts"] == [] and not out["keras_imported"], out


def test_the_backend_keras_already_runs_on_counts():
    """Keras imported first on TensorFlow, KERAS_BACKEND changed to jax afterwards (and JAX
    absent): tf_jacbp runs on the backend Keras runs on, not on the one the environment names."""
    out = import_tf_jacbp(
        ("jax", "jaxlib"),
        keras_backend="tensorflow",
        before="import keras\nimport os\nos.environ['KERAS_BACKEND'] = 'jax'",
    )
    assert out["error"] is None and out["backend"] == "tensorflow", out


def test_tensorflow_is_the_default_backend():
    """KERAS_BACKEND unset: tf_jacbp imports on TensorFlow (nothing blocked, nothing refused)."""
    out = import_tf_jacbp((), keras_backend=None)
    assert out["error"] is None and out["backend"] == "tensorflow", out


def test_tensorflow_stays_the_default_whatever_keras_json_says(tmp_path):
    """A ``keras.json`` naming JAX (in ``KERAS_HOME``) and JAX absent: with ``KERAS_BACKEND``
    unset tf_jacbp still imports on TensorFlow, as docs/backends.md says."""
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    out = import_tf_jacbp(("jax", "jaxlib"), keras_backend=None, KERAS_HOME=str(tmp_path))
    assert out["error"] is None and out["backend"] == "tensorflow", out
