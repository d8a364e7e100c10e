"""GPU readiness, checked on a CPU: the training steps of LeNet-5 and of the residual CNN
(between them every tf_jacbp layer type, and a Table 1 loss) compile whole under XLA, whose
kernels exist for GPUs too, and contain no op that can only run on a CPU (Python callbacks,
host-side string or sparse ops)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_jacbp import losses, models

# Not listed: ``Assert``, the losses' bad-label check (a label out of range must stop a step
# before the weights change). XLA compiles it to nothing (tf2xla's Assert is a no-op); in graph
# mode on a GPU it runs on the host on one boolean per step, as stock Keras' own assertions do.
HOST_ONLY = {"PyFunc", "EagerPyFunc", "PyFuncStateless", "StringFormat", "PrintV2"}


def _train_step_graph(model, x, y, learning_rate):
    loss = losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(learning_rate)
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return value

    return step, step.get_concrete_function(x, y).graph


def _op_types(graph):
    types = set()
    for op in graph.get_operations():
        types.add(op.type)
        for name in ("f", "then_branch", "else_branch", "body", "cond"):
            if name in op.node_def.attr and op.node_def.attr[name].func.name:
                function = graph._get_function(op.node_def.attr[name].func.name)
                if function is not None:
                    types |= _op_types(function.graph)
    return types


@pytest.mark.parametrize(
    "build, learning_rate",
    # The residual model without dropout: two steps' losses compare only with the same map.
    [(models.lenet5, 0.1), (lambda: models.resnet_mnist(dropout=0.0), 0.01)],
    ids=["lenet5", "resnet"],
)
def test_train_step_compiles_under_xla_with_no_host_only_op(build, learning_rate):
    keras.utils.set_random_seed(0)
    model = build()
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(16, 28, 28, 1)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=16))
    step, graph = _train_step_graph(model, x, y, learning_rate)
    types = _op_types(graph)
    assert not types & HOST_ONLY, f"host-only ops on the training path: {types & HOST_ONLY}"
    assert "MatMul" in types or "BatchMatMulV2" in types  # the Toeplitz products are there
    first_kernel = model.trainable_variables[0]
    before = first_kernel.numpy()
    first, second = float(step(x, y)), float(step(x, y))
    assert np.isfinite(first) and second < first  # it ran, compiled, and trained
    assert not np.array_equal(before, first_kernel.numpy())
