"""``tf_jacbp.models.resnet20`` (He et al., 2016's CIFAR ResNet-20) on the backend this run uses.

The witnesses, each independent of the model's code:

* a stock ``keras.layers`` twin of the architecture, written out again here (``stock_resnet20``):
  the same parameter counts, output shape and layer sequence;
* float64 autodiff through the reference route (``reference_mode``: stock convolutions, batch
  normalization and pooling) and float64 central finite differences of the loss along a random
  direction per variable; the differences share no kernel with either route (issue 23, item 2:
  autodiff of a stock convolution runs the kernels the implicit ``T(K)`` route calls);
* ``model.fit`` on Fashion-MNIST padded to 32x32 with ``GradientCheck`` on: the accuracy
  reached, and no mismatch against the implicit convolutions' witness (their unfolded patches).
"""

from __future__ import annotations

import time

import keras
import numpy as np
import pytest
from keras import ops

from tf_jacbp import datasets, losses, models, numerics, tolerances
from tf_jacbp.callbacks import REFERENCE, GradientCheck
from tf_jacbp.check import FINITE_DIFFERENCES
from tf_jacbp.check.conv_witness import UNFOLDED_PATCHES
from tf_jacbp.testing import harness

RTOL64 = tolerances.rtol("float64")


def stock_resnet20(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The same architecture of stock ``keras.layers`` (the witness for counts and shapes)."""
    stock = keras.layers

    def conv_bn(h, filters: int, kernel_size: int, strides: int, relu: bool):
        h = stock.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False)(h)
        h = stock.BatchNormalization()(h)
        return stock.ReLU()(h) if relu else h

    x = keras.Input(shape=input_shape)
    h = conv_bn(x, 16, 3, 1, relu=True)
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            r = conv_bn(conv_bn(h, filters, 3, strides, relu=True), filters, 3, 1, relu=False)
            if strides != 1:
                h = conv_bn(h, filters, 1, strides, relu=False)
            h = stock.ReLU()(stock.Add()([r, h]))
    h = stock.GlobalAveragePooling2D()(h)
    return keras.Model(x, stock.Dense(num_classes)(h))


def counts(model: keras.Model) -> tuple[int, int, int]:
    """``(all, trainable, non-trainable)`` parameter counts."""
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    frozen = sum(int(np.prod(v.shape)) for v in model.non_trainable_variables)
    return model.count_params(), trainable, frozen


@pytest.mark.parametrize(
    "input_shape, num_classes", [((32, 32, 3), 10), ((32, 32, 1), 10), ((24, 40, 2), 7)]
)
def test_parameter_counts_and_output_shape_equal_a_stock_twins(input_shape, num_classes):
    ours = models.resnet20(input_shape, num_classes)
    stock = stock_resnet20(input_shape, num_classes)
    assert counts(ours) == counts(stock)
    assert ours.output_shape == stock.output_shape == (None, num_classes)
    # The layer sequence, type by type (stock's class of the same name), and the stage shapes.
    assert [type(layer).__name__ for layer in ours.layers] == [
        type(layer).__name__ for layer in stock.layers
    ]
    assert all(
        isinstance(layer, keras.layers.InputLayer) or type(layer).__module__.startswith("tf_jacbp")
        for layer in ours.layers
    )
    shapes = {layer.name: layer.output.shape for layer in ours.layers}
    h, w, _ = input_shape
    assert shapes["stage1_block3_relu2"] == (None, h, w, 16)
    assert shapes["stage2_block3_relu2"] == (None, -(-h // 2), -(-w // 2), 32)
    assert shapes["stage3_block3_relu2"] == (None, -(-h // 4), -(-w // 4), 64)


def test_the_papers_count_and_the_docstrings():
    """274,042 parameters for CIFAR-10 (the paper's "0.27M"), as the docstring says."""
    assert counts(models.resnet20()) == (274_042, 272_474, 1_568)
    assert "274,042" in models.resnet20.__doc__
    probabilities = models.resnet20(output_activation="softmax")
    x = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    p = ops.convert_to_numpy(probabilities(x))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=tolerances.rtol("float32"))
    with pytest.raises(ValueError, match="input_shape.*channel axis"):
        models.resnet20((32, 32))


def test_float64_gradients_equal_autodiff_and_finite_differences():
    """In float64, batch statistics on (training), the Jacobian route's gradient of every
    variable equals autodiff through the reference route, and its directional derivative along a
    random unit direction equals the central difference of the loss.

    Small (two 16x16 images; every ``T(K)`` is still 8 MiB or more in float64, over
    ``toeplitz_implicit.MATERIALIZE_MAX_BYTES``, so ``"auto"`` applies each by convolution) and
    seeded: a central difference is wrong where a ReLU input crosses zero
    within ``delta``, and the more ReLU inputs, the likelier one does."""
    keras.utils.set_random_seed(0)
    model = models.resnet20((16, 16, 1), num_classes=5, dtype="float64")
    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.standard_normal((2, 16, 16, 1)))
    t = ops.convert_to_tensor(rng.standard_normal((2, 5)))
    state = harness.model_state(model)
    grads = harness.model_gradients(model, x, t, reference=False, training=True)
    harness.set_model_state(model, state)
    refs = harness.model_gradients(model, x, t, reference=True, training=True)
    harness.set_model_state(model, state)
    variables = model.trainable_variables
    assert len(variables) == 65  # 21 kernels, 21 (gamma, beta), the Dense kernel and bias
    harness.assert_gradients_close(grads, refs, variables, "float64", "resnet20")

    values = [ops.convert_to_numpy(v) for v in variables]
    fixed = [ops.convert_to_tensor(v) for v in model.non_trainable_variables]

    def loss(*trainable):
        y, _ = model.stateless_call(list(trainable), fixed, x, training=True)
        return numerics.mean(harness.half_squared_error(t, y))

    evaluate = harness.compiled(loss)
    delta = tolerances.FINITE_DIFFERENCE_DELTA
    for i, v in enumerate(variables):
        direction = rng.standard_normal(values[i].shape)
        direction /= np.linalg.norm(direction)
        ends = [
            float(
                ops.convert_to_numpy(
                    evaluate(*values[:i], values[i] + step * direction, *values[i + 1 :])
                )
            )
            for step in (delta, -delta)
        ]
        numerical = (ends[0] - ends[1]) / (2 * delta)
        analytic = float(np.sum(grads[i] * direction))
        err = abs(analytic - numerical) / max(abs(numerical), tolerances.FINITE_DIFFERENCE_FLOOR)
        assert err <= tolerances.FINITE_DIFFERENCE_RTOL, (v.path, analytic, numerical, err)


def padded_fashion_mnist(train: int, test: int) -> tuple:
    """The first ``train`` and ``test`` Fashion-MNIST images, padded 28 -> 32 with zeros, in
    ``[0, 1]``, shape ``(N, 32, 32, 1)``; labels ``(N,)``."""
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()

    def pad(images: np.ndarray) -> np.ndarray:
        return np.pad(images / np.float32(255), ((0, 0), (2, 2), (2, 2)))[..., None]

    return (pad(x_train[:train]), y_train[:train]), (pad(x_test[:test]), y_test[:test])


@pytest.mark.slow
def test_resnet20_learns_fashion_mnist_with_gradient_check_on(backend, capsys):
    """``model.fit`` trains ResNet-20 on 2,000 Fashion-MNIST images padded to 32x32 (3 epochs,
    batch 64, Adam 1e-3) to at least 65% on 500 test images, with ``GradientCheck`` on (a
    16-image probe) raising on any mismatch: none.

    Every convolution is on the implicit route. Where a dense float64 T(K) is over the budget
    (2 GiB for a 32 x 32 x 16 layer) it is checked against autodiff of its unfolded patches
    (``tf_jacbp.check.conv_witness.UNFOLDED_PATCHES``), which shares no kernel
    with it, so no finite differences run (they false-alarm at ReLU kinks: measured up to 6.4e-4
    on this network before the patch witness existed).
    """
    keras.utils.set_random_seed(0)
    (x, y), (x_test, y_test) = padded_fashion_mnist(2000, 500)
    model = models.resnet20((32, 32, 1))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=backend == "jax",
    )
    # Checks at the start and at each epoch's end (the default every_n_batches, 200, is more
    # than the 96 steps).
    check = GradientCheck((x_test[:16], y_test[:16]), verbose=0)  # on_mismatch="raise"
    times = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    history = model.fit(
        x, y, batch_size=64, epochs=3, verbose=0, callbacks=[EpochTimer(), check]
    ).history
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    witnesses = {r.layer_witness for r in check.records if "conv" in r.layer}
    with capsys.disabled():
        print(
            f"\nresnet20 on {backend}: epochs (with checks) {[f'{s:.1f}' for s in times]} s, "
            f"loss {[f'{v:.3f}' for v in history['loss']]}, train accuracy "
            f"{[f'{v:.3f}' for v in history['accuracy']]}, test accuracy {accuracy:.3f}, "
            f"convolution witnesses {sorted(witnesses)}"
        )
    assert history["loss"][-1] < 0.8 * history["loss"][0], history["loss"]
    assert accuracy >= 0.65, accuracy
    variables = {v.path for v in model.trainable_variables}
    reference = [r for r in check.records if r.witness == REFERENCE]
    assert {r.variable for r in reference} == variables
    assert not [r for r in check.records if r.witness == FINITE_DIFFERENCES]
    assert UNFOLDED_PATCHES in witnesses
    assert len({r.step for r in reference}) == 4  # start and three epoch ends
    for r in reference:
        assert r.passed, r
        assert r.float64_rel_err <= RTOL64, r
    assert sum(history["grad_check_mismatches"]) == 0
