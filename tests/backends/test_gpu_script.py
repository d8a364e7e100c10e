"""The prepared GPU run (issue 22 item 6): ``benchmarks/gpu.py`` end to end on JAX's CPU, as CI
runs it (``--allow-cpu --quick``), with TensorFlow blocked as on the GPU machine, which has none.

The script's own rows are what is asserted: every agreement row passed (the trained models'
layers through ``check_layer``, Embedding's contract, a planted bug caught), each model reached
its (low, quick-mode) accuracy bar with ``GradientCheck`` on and no mismatch, and the ratio table
of our train step against stock Keras' is there with finite ratios. Without ``--allow-cpu`` the
same script on a machine without a GPU must stop at once, saying that JAX fell back to the CPU.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
WRAPPER = ROOT / "benchmarks" / "gpu.sh"


def _require_jax(backend: str) -> None:
    if backend != "jax":
        pytest.skip("benchmarks/gpu.py runs Keras on JAX: this is the KERAS_BACKEND=jax run's test")


def _environment(tmp_path: Path) -> dict:
    """The test process' environment, Keras on JAX, with ``import tensorflow`` failing (the GPU
    machine has no TensorFlow: the script must never need it)."""
    blocker = tmp_path / "no_tensorflow"
    blocker.mkdir(exist_ok=True)
    (blocker / "tensorflow.py").write_text(
        "raise ImportError('TensorFlow is blocked: the GPU machine has none')\n"
    )
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker), env.get("PYTHONPATH")]))
    env.pop("OUT", None)
    return env


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One ``--allow-cpu --quick`` run for the module: its exit code, output and report."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    tmp = tmp_path_factory.mktemp("gpu_run")
    out = tmp / "out"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--allow-cpu", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=_environment(tmp),
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads((out / "gpu.json").read_text()) if (out / "gpu.json").exists() else {}
    markdown = (out / "gpu.md").read_text() if (out / "gpu.md").exists() else ""
    return result, report, markdown


@pytest.mark.slow
def test_quick_cpu_run_passes_and_reports_every_section(quick_run, backend):
    _require_jax(backend)
    result, report, markdown = quick_run
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "0 failures" in result.stdout
    assert report["mode"] == "quick" and report["failures"] == []
    device = {row["item"]: row["value"] for row in report["device"]}
    assert device["GPU"] == "no: CPU allowed by --allow-cpu"
    assert device["float64 (JAX_ENABLE_X64)"] == "True" and device["Keras backend"] == "jax"
    for section in ("agreement", "training", "timing"):
        assert f"## {section}" in result.stdout and f"**{section}**" in markdown


@pytest.mark.slow
def test_quick_run_agreement_rows_pass_and_the_planted_bug_is_caught(quick_run, backend):
    _require_jax(backend)
    _, report, _ = quick_run
    rows = {row["layer"]: row for row in report["agreement"]}
    for layer in ("Dense", "Conv2D", "MaxPooling2D", "Flatten", "Embedding"):
        assert rows[layer]["result"] == "ok", rows[layer]
        assert "float64 rtol 1e-12" in rows[layer]["check"]
    planted = [row for name, row in rows.items() if name.startswith("planted")]
    assert len(planted) == 1 and planted[0]["result"] == "ok", planted
    assert "coverage" not in rows, rows.get("coverage")  # a configuration of every layer class


@pytest.mark.slow
def test_quick_run_trains_both_models_on_both_datasets_with_gradient_check(quick_run, backend):
    _require_jax(backend)
    _, report, _ = quick_run
    trained = {(row["data"], row["model"]): row for row in report["training"]}
    assert set(trained) == {
        (data, model)
        for data in ("mnist-digits", "fashion-mnist")
        for model in ("lenet_300_100", "lenet5")
    }
    for row in trained.values():
        assert row["result"] == "ok", row
        assert row["accuracy"] >= row["bar"] >= 0.3, row  # 10 classes: chance is 0.1
        assert row["checks"] >= 2 and row["mismatches"] == 0, row
        assert row["float64_max_rel_err"] <= 1e-12, row


@pytest.mark.slow
def test_quick_run_prints_the_ratio_table_against_stock_keras(quick_run, backend):
    _require_jax(backend)
    result, report, _ = quick_run
    assert "| model | variant | ratio | spread | ours_ms | stock_ms | result |" in result.stdout
    variants = {
        (row["model"], row["variant"].split(", ")[1].split(" (")[0]) for row in report["timing"]
    }
    assert variants == {
        (model, variant)
        for model in ("lenet_300_100", "lenet5")
        for variant in ("step in fit", "train_function alone", "jit(train_step) alone")
    }, variants
    for row in report["timing"]:
        assert row["result"] == "ok", row
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["ours_ms"] > 0 and row["stock_ms"] > 0, row


def test_without_allow_cpu_a_cpu_fallback_stops_the_run(tmp_path, backend):
    """JAX without a GPU: the run stops before any phase, naming the fallback and the flag."""
    _require_jax(backend)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "JAX fell back to the CPU" in result.stderr and "--allow-cpu" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_wrapper_without_carried_wheels_says_to_prepare(tmp_path):
    """``gpu.sh`` in a checkout without ``benchmarks/gpu_carry/`` stops before installing
    anything, naming ``prepare`` and the device call's ``carry``."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(WRAPPER, tmp_path / "benchmarks" / "gpu.sh")
    result = subprocess.run(
        ["bash", str(tmp_path / "benchmarks" / "gpu.sh"), "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "bash benchmarks/gpu.sh prepare" in result.stderr and "carry" in result.stderr
