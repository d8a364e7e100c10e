"""Train LeNet-100-300-10 (tf_jacbp layers) under a tf.distribute strategy; save the final weights.

Run by ``tests/system/test_distribute.py`` in a fresh process, because the strategy has to be set up
before TensorFlow initializes its devices:

* ``--strategy mirrored``: ``MirroredStrategy`` over two logical CPU devices of this process;
* ``--strategy multi_worker``: ``MultiWorkerMirroredStrategy``, one replica per process, the
  cluster described by ``TF_CONFIG`` (set by the test: two workers on 127.0.0.1).

Every run starts from the weights in ``--data`` (an ``.npz`` written by the test with ``x``,
``y``, ``w0``, ``w1``, ... and the hyperparameters) and trains with SGD on the data in its fixed
order, so a single-device run of ``train`` (the test runs it in its own process) sees the same
global batches and must end with the same weights, up to rounding.

``--runs`` lists ``LOOP:PIPELINE`` pairs, each trained from the same initial weights. ``LOOP`` is
``fit`` (``model.fit``, with ``GradientCheck`` when ``--gradient-check`` is given) or
``custom`` (``train_custom_loop``). The result ``--out`` holds, per run, the
final weights (``<run>/w0``, ...), the devices holding the replicas of the first kernel
(``<run>/devices``), for custom loops the loss of every step (``<run>/losses``), the replica
count, and the GradientCheck records as JSON.

Input pipelines:

* ``arrays``: NumPy arrays to ``fit(batch_size=B, shuffle=False)``; Keras splits each global
  batch of ``B`` between the replicas.
* ``autoshard_data``: a ``tf.data`` dataset batched by the global batch ``B`` with
  ``AutoShardPolicy.DATA``: TensorFlow rebatches it to ``B / replicas`` per replica, then worker
  ``i`` keeps the ``i``-th sub-batch of every global batch.
* ``explicit_shard``: ``strategy.distribute_datasets_from_function``, auto-sharding ``OFF``: each
  input pipeline batches by ``B / replicas`` and keeps every ``pipelines``-th batch starting at
  its id (``shard`` after ``batch``), so global batch ``k`` is samples ``kB .. (k+1)B - 1``, as
  in the single-device run.
* ``unsharded``: the ``autoshard_data`` dataset with auto-sharding ``OFF`` and no ``shard``: a
  mistake kept as a control. Every worker reads every sample, so the workers' replicas see the
  same sub-batches and a step's global batch is not the single-device one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

PIPELINES = ("arrays", "autoshard_data", "explicit_shard", "unsharded")


def load_data(path: str) -> dict:
    """The test's ``.npz`` as a dict, with the initial weights ``w0, w1, ...`` as ``"weights"``."""
    import numpy as np

    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    n_weights = sum(k.startswith("w") for k in data)
    data["weights"] = [data[f"w{i}"] for i in range(n_weights)]
    return data


def build_model(weights: list):
    """LeNet-100-300-10 (tf_jacbp layers) holding ``weights``; call inside the strategy's scope."""
    import tf_jacbp

    model = tf_jacbp.models.lenet_100_300_10()
    model.set_weights(weights)
    return model


def make_input(pipeline: str, x, y, batch_size: int, strategy):
    """``(fit_x, fit_y, fit_kwargs)`` for one of ``PIPELINES``, in the data's fixed order."""
    import tensorflow as tf

    if pipeline == "arrays":
        return x, y, {"batch_size": batch_size, "shuffle": False}
    if pipeline == "autoshard_data":
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        return dataset.with_options(options), None, {}
    if pipeline == "explicit_shard":

        def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = (
                tf.data.experimental.AutoShardPolicy.OFF
            )
            per_replica = context.get_per_replica_batch_size(batch_size)
            dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(per_replica)
            dataset = dataset.shard(context.num_input_pipelines, context.input_pipeline_id)
            return dataset.with_options(options)

        return strategy.distribute_datasets_from_function(dataset_fn), None, {}
    if pipeline == "unsharded":
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        return dataset.with_options(options), None, {}
    raise ValueError(f"unknown pipeline {pipeline!r}; expected one of {PIPELINES}")


def train(data: dict, strategy=None, pipeline: str = "arrays", gradient_check: bool = False):
    """``model.fit`` from ``data["weights"]``; return ``(model, GradientCheck or None)``.

    ``strategy=None`` trains on one device (the default strategy): the reference run.
    """
    import keras
    import tensorflow as tf

    import tf_jacbp

    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = build_model(data["weights"])
        model.compile(
            optimizer=keras.optimizers.SGD(float(data["learning_rate"])),
            loss=tf_jacbp.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    batch_size = int(data["batch_size"])
    callbacks = []
    check = None
    if gradient_check:
        from tf_jacbp.callbacks import GradientCheck

        n = int(data["probe_size"])
        check = GradientCheck(
            probe=(data["x"][:n], data["y"][:n]),
            every_n_batches=int(data["check_every"]),
            on_mismatch="raise",
            verbose=0,
        )
        callbacks.append(check)
    fit_x, fit_y, kwargs = make_input(pipeline, data["x"], data["y"], batch_size, strategy)
    model.fit(fit_x, fit_y, epochs=int(data["epochs"]), verbose=0, callbacks=callbacks, **kwargs)
    return model, check


def train_custom_loop(data: dict, strategy, pipeline: str):
    """The same training as ``train`` in a custom loop; return ``(model, loss of every step)``.

    Keras 3.15's ``fit`` fails under ``MultiWorkerMirroredStrategy`` before the first step, even
    for stock layers (keras-team/keras#20585), so multi-worker runs use this loop: per step,
    ``strategy.run`` of one SGD step.

    Each replica computes the loss of its part of the global batch, scaled by
    ``tf.nn.compute_average_loss`` to a share of the global mean; the Keras optimizer sums the
    replicas' gradients (an all-reduce, across processes under ``MultiWorkerMirroredStrategy``)
    before the update, so every replica applies the gradient of the global batch's mean loss.
    """
    import keras
    import tensorflow as tf

    import tf_jacbp

    batch_size = int(data["batch_size"])
    with strategy.scope():
        model = build_model(data["weights"])
        optimizer = keras.optimizers.SGD(float(data["learning_rate"]))
        optimizer.build(model.trainable_variables)
    loss_fn = tf_jacbp.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    dataset, _, _ = make_input(pipeline, data["x"], data["y"], batch_size, strategy)
    if isinstance(dataset, tf.data.Dataset):
        dataset = strategy.experimental_distribute_dataset(dataset)

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            per_sample = loss_fn(y, model(x, training=True))
            loss = tf.nn.compute_average_loss(per_sample, global_batch_size=batch_size)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def step(x, y):
        return strategy.reduce("SUM", strategy.run(replica_step, args=(x, y)), axis=None)

    losses = []
    for _ in range(int(data["epochs"])):
        for x, y in dataset:
            losses.append(float(step(x, y)))
    return model, losses


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=("mirrored", "multi_worker"), required=True)
    parser.add_argument("--data", required=True, help="the .npz written by the test")
    parser.add_argument("--out", required=True, help="where to write the results (.npz)")
    parser.add_argument(
        "--runs",
        default="fit:arrays",
        help="comma-separated LOOP:PIPELINE, LOOP one of fit, custom; PIPELINE one of "
        + ", ".join(PIPELINES),
    )
    parser.add_argument("--gradient-check", action="store_true", help="GradientCheck in fit runs")
    args = parser.parse_args(argv)

    import tensorflow as tf

    # Two cores for the whole test run: keep each process's thread pools small.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    if args.strategy == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()

    import numpy as np

    data = load_data(args.data)
    use_check = args.gradient_check
    result = {
        "num_replicas_in_sync": np.int64(strategy.num_replicas_in_sync),
        "strategy": np.array(type(strategy).__name__),
    }
    checks = {}
    for run in args.runs.split(","):
        loop, pipeline = run.split(":")
        if loop == "fit":
            model, check = train(data, strategy, pipeline, gradient_check=use_check)
            if check is not None:
                checks[run] = [
                    {
                        "step": r.step,
                        "variable": r.variable,
                        "rel_err": r.rel_err,
                        "passed": r.passed,
                    }
                    for r in check.records
                ]
        elif loop == "custom":
            model, losses = train_custom_loop(data, strategy, pipeline)
            result[f"{run}/losses"] = np.array(losses)
        else:
            raise ValueError(f"unknown loop {loop!r} in --runs {args.runs!r}")
        for i, v in enumerate(model.weights):
            result[f"{run}/w{i}"] = v.numpy()
        # Where the copies of the first kernel live: one per replica of this process.
        result[f"{run}/devices"] = np.array(
            [t.device for t in strategy.experimental_local_results(model.weights[0].value)]
        )
    result["gradient_checks"] = np.array(json.dumps(checks))
    tmp = args.out + ".partial.npz"
    np.savez(tmp, **result)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
