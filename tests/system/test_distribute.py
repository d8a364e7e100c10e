"""Data-parallel training: LeNet-100-300-10 ends where a single-device run on the same batches does.

The distributed runs happen in fresh processes (``tests/system/workers/distributed_training.py``): a
``MirroredStrategy`` over two logical CPU devices must be configured before TensorFlow initializes
its devices, and ``MultiWorkerMirroredStrategy`` needs one process per worker. The single-device
reference runs here, with the same initial weights, data order, global batch and SGD steps.

Tolerance. Both runs apply the same SGD updates ``-lr * grad`` of the global batch's mean loss; the
distributed one sums two half-batch gradients, each scaled by 1/2, in an all-reduce, instead of
reducing the whole batch at once: the same sums in another order, which is the difference
``tolerances.rtol("float32")`` bounds for one gradient. The comparison is of the total update
``w_final - w_0`` per variable (Frobenius relative error), not of ``w_final``: the update is only
2-4% of the initial weights' norm, so a check on ``w_final`` at the same tolerance would let a
0.5% error in the update through. Eight steps of this ReLU network keep the rounding differences
near 1e-6 (measured), far below the tolerance; a wrong global batch (the controls below) gives a
relative error of order one.

XLA is not combined with distribution (docs/scale.md): ``jit_compile`` stays at Keras' default,
which is off on CPU and under a strategy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import tf_jacbp
from tf_jacbp import tolerances

WORKER = Path(__file__).parent / "workers" / "distributed_training.py"
REPO = Path(__file__).resolve().parents[2]

N_SAMPLES = 256
BATCH_SIZE = 64  # the global batch: 32 per replica with two replicas
EPOCHS = 2  # 8 SGD steps
LEARNING_RATE = 0.05
PROBE_SIZE = 64
CHECK_EVERY = 2  # GradientCheck after every second batch

MIRRORED_TIMEOUT_S = 240
MULTI_WORKER_TIMEOUT_S = 300
PORT_ATTEMPTS = 2  # a port picked by binding to 0 may be taken before TensorFlow binds it
PORT_IN_USE_MESSAGES = ("address already in use", "could not start grpc server")


def _load_worker_module():
    spec = importlib.util.spec_from_file_location("distributed_training", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker_module()


@pytest.fixture(scope="module")
def run_data(tmp_path_factory) -> tuple[Path, dict]:
    """A fixed classification problem and LeNet-100-300-10's initial weights, in an ``.npz``."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_SAMPLES, 28, 28)).astype("float32")
    labels_from = rng.normal(size=(28 * 28, 10))
    y = np.argmax(x.reshape(N_SAMPLES, -1) @ labels_from, axis=1).astype("int64")
    keras.utils.set_random_seed(0)
    weights = tf_jacbp.models.lenet_100_300_10().get_weights()
    path = tmp_path_factory.mktemp("distribute") / "data.npz"
    np.savez(
        path,
        x=x,
        y=y,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        learning_rate=LEARNING_RATE,
        probe_size=PROBE_SIZE,
        check_every=CHECK_EVERY,
        **{f"w{i}": w for i, w in enumerate(weights)},
    )
    return path, worker.load_data(str(path))


@pytest.fixture(scope="module")
def single_device(run_data) -> list[np.ndarray]:
    """Final weights of ``model.fit`` on one device, same data order and global batch."""
    _, data = run_data
    model, _ = worker.train(data)
    return [v.numpy() for v in model.weights]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["KERAS_BACKEND"] = "tensorflow"
    env.update(extra)
    return env


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (bound to port 0 together, then released)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _run_workers(commands: list[list[str]], envs: list[dict], logs: list[Path], timeout: float):
    """Start the processes; wait for all, killing every one if one fails or time runs out.

    Returns the exit codes. The loop is bounded by ``timeout``.
    """
    procs = []
    try:
        for command, env, log in zip(commands, envs, logs, strict=True):
            with open(log, "w") as out:
                procs.append(
                    subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
                )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(
                f"workers did not finish within {timeout} s; last output:\n"
                + "\n".join(f"--- {log.name}\n{_tail(log)}" for log in logs)
            )
        return [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


def _command(strategy: str, data: Path, out: Path, runs: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(WORKER),
        "--strategy",
        strategy,
        "--data",
        str(data),
        "--out",
        str(out),
        "--runs",
        runs,
        *extra,
    ]


def _update_errors(result, run: str, data: dict, reference: list[np.ndarray]) -> list[float]:
    """Per variable: ``relative_error(w_final - w_0, reference_final - w_0)``."""
    return [
        tolerances.relative_error(result[f"{run}/w{i}"] - w0, ref - w0, "float32")
        for i, (w0, ref) in enumerate(zip(data["weights"], reference, strict=True))
    ]


def test_single_device_reference_trains_and_a_wrong_global_batch_is_detected(
    run_data, single_device
):
    """The reference moves the weights, and halving the global batch moves them elsewhere."""
    _, data = run_data
    for w0, w in zip(data["weights"], single_device, strict=True):
        change = np.linalg.norm(w - w0) / max(np.linalg.norm(w0), 1.0)
        assert change > 100 * tolerances.rtol("float32"), f"the weights barely moved: {change}"
    model, _ = worker.train({**data, "batch_size": np.int64(BATCH_SIZE // 2)})
    result = {f"half/w{i}": v.numpy() for i, v in enumerate(model.weights)}
    errors = _update_errors(result, "half", data, single_device)
    assert min(errors) > 100 * tolerances.rtol("float32"), errors


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus_matches_one_device(
    run_data, single_device, tmp_path
):
    data_path, data = run_data
    out, log = tmp_path / "mirrored.npz", tmp_path / "mirrored.log"
    runs = "fit:arrays,custom:explicit_shard"
    (code,) = _run_workers(
        [_command("mirrored", data_path, out, runs, "--gradient-check")],
        [_env()],
        [log],
        MIRRORED_TIMEOUT_S,
    )
    assert code == 0, f"the MirroredStrategy worker failed:\n{_tail(log)}"
    with np.load(out) as result:
        assert int(result["num_replicas_in_sync"]) == 2
        for run in runs.split(","):
            devices = [str(d) for d in result[f"{run}/devices"]]
            assert [d.rsplit(":", 2)[-2:] for d in devices] == [["CPU", "0"], ["CPU", "1"]], devices
            errors = _update_errors(result, run, data, single_device)
            assert max(errors) <= tolerances.rtol("float32"), (
                f"{run}: the MirroredStrategy updates differ from one device's: relative errors "
                f"{errors} > {tolerances.rtol('float32')}"
            )
        assert len(result["custom:explicit_shard/losses"]) == EPOCHS * N_SAMPLES // BATCH_SIZE
        checks = json.loads(str(result["gradient_checks"]))
    records = checks["fit:arrays"]
    n_variables = len(data["weights"])
    steps = sorted({r["step"] for r in records})
    # At the start, every CHECK_EVERY batches and at each epoch end: several checks, in
    # training, of every variable.
    assert steps[0] == 0 and steps[-1] == EPOCHS * N_SAMPLES // BATCH_SIZE, steps
    assert len(steps) >= EPOCHS * N_SAMPLES // BATCH_SIZE // CHECK_EVERY, steps
    assert len(records) == len(steps) * n_variables
    failed = [r for r in records if not r["passed"]]
    assert not failed, failed
    assert max(r["rel_err"] for r in records) <= tolerances.rtol("float32")


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_on_two_local_processes_matches_one_device(
    run_data, single_device, tmp_path
):
    """Two workers on 127.0.0.1 all-reduce their gradients; the chief ends where one device does.

    ``autoshard_data`` and ``explicit_shard`` give each worker half of every global batch (see the
    worker's docstring); ``unsharded`` is the mistake they avoid and must not match.
    """
    data_path, data = run_data
    runs = "custom:autoshard_data,custom:explicit_shard,custom:unsharded"
    outs = [tmp_path / f"worker{i}.npz" for i in range(2)]
    for attempt in range(PORT_ATTEMPTS):
        logs = [tmp_path / f"worker{i}.attempt{attempt}.log" for i in range(2)]
        cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
        envs = [
            _env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
            for i in range(2)
        ]
        commands = [_command("multi_worker", data_path, out, runs) for out in outs]
        codes = _run_workers(commands, envs, logs, MULTI_WORKER_TIMEOUT_S)
        output = "\n".join(f"--- {log.name}\n{_tail(log)}" for log in logs)
        lost_port = any(m in output.lower() for m in PORT_IN_USE_MESSAGES)
        if codes == [0, 0] or not lost_port:
            break
    assert codes == [0, 0], f"the workers failed (exit codes {codes}):\n{output}"

    steps = EPOCHS * N_SAMPLES // BATCH_SIZE
    results = [dict(np.load(out)) for out in outs]
    for task, result in enumerate(results):
        assert int(result["num_replicas_in_sync"]) == 2
        for run in runs.split(","):
            assert [str(d) for d in result[f"{run}/devices"]] == [
                f"/job:worker/replica:0/task:{task}/device:CPU:0"
            ]
    chief, other = results
    for run in ("custom:autoshard_data", "custom:explicit_shard"):
        assert len(chief[f"{run}/losses"]) == steps
        errors = _update_errors(chief, run, data, single_device)
        assert max(errors) <= tolerances.rtol("float32"), (
            f"{run}: the chief's updates differ from one device's: relative errors {errors} > "
            f"{tolerances.rtol('float32')}"
        )
        # The all-reduce keeps the replicas in sync: both workers hold the same weights.
        for i in range(len(data["weights"])):
            np.testing.assert_array_equal(chief[f"{run}/w{i}"], other[f"{run}/w{i}"])
        # The loss of the global batch decreases over the 2 epochs (same batches, later weights).
        losses = chief[f"{run}/losses"]
        assert losses[steps // 2 :].mean() < losses[: steps // 2].mean(), losses
    # Without sharding every worker reads every sample: twice the steps, other global batches.
    assert len(chief["custom:unsharded/losses"]) == 2 * steps
    errors = _update_errors(chief, "custom:unsharded", data, single_device)
    assert min(errors) > 100 * tolerances.rtol("float32"), errors
