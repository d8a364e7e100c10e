"""Train a small CNN with differentially private SGD on Fashion-MNIST, printing epsilon per epoch.

    python examples/train_dp.py                          # 40 epochs, batch 2048, epsilon ~2.6
    python examples/train_dp.py --plot dp.png            # and a plot of accuracy against epsilon
    python examples/train_dp.py --quick                  # a few hundred samples, one epoch
    python examples/train_dp.py --data mnist --epochs 15 --noise-multiplier 1.1 --batch-size 256

DP-SGD (``tf_jacbp.privacy``): each sample's gradient is clipped to ``--l2-norm-clip``, Gaussian
noise of standard deviation ``--noise-multiplier`` times the clip is added to their sum, and the
optimizer gets the result divided by the batch size. The defaults follow Papernot et al. (2021),
"Tempered Sigmoid Activations for Deep Learning with Differential Privacy", for Fashion-MNIST:
tanh activations, batch 2048, SGD with learning rate 4, clip 0.12, noise 2.15, 40 epochs
(86.1% test accuracy reported there).

Epsilon (``delta`` = ``--delta``) is the RDP accountant's for the Poisson-subsampled Gaussian
mechanism with sampling rate ``batch / N``. With ``--poisson`` the batches are Poisson-sampled,
which is what that accounting assumes; by default they are shuffled fixed-size batches, the common
practice, for which the printed epsilon is the Poisson number, not a proven bound.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_jacbp  # noqa: E402
from tf_jacbp import datasets, layers, losses, privacy  # noqa: E402


def load(data: str) -> tuple:
    """``(x_train, y_train), (x_test, y_test)``: images ``(N, 28, 28, 1)`` in ``[0, 1]``."""
    if data == "fashion-mnist":
        (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
    elif data == "mnist":
        (x_train, y_train), (x_test, y_test) = datasets.load_mnist()
    else:
        (x_train, y_train), (x_test, y_test) = datasets.load_mnist(path=data)
    scale = np.float32(255)
    return (
        (x_train[..., None] / scale, y_train.astype("int32")),
        (x_test[..., None] / scale, y_test.astype("int32")),
    )


def small_cnn(activation: str = "tanh") -> keras.Sequential:
    """Papernot et al.'s Fashion-MNIST network, of tf_jacbp layers (Toeplitz convolutions).

    ``Conv2D(16, 8x8, stride 2, same) -> MaxPooling2D(2, stride 1) -> Conv2D(32, 4x4, stride 2)
    -> MaxPooling2D(2, stride 1) -> Flatten -> Dense(32) -> Dense(10)`` (logits), with
    ``activation`` after each hidden layer. No batch normalization: in training mode it couples
    the samples, and DP-SGD needs each sample's own gradient.
    """
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(16, 8, strides=2, padding="same", activation=activation),
            layers.MaxPooling2D(2, strides=1),
            layers.Conv2D(32, 4, strides=2, activation=activation),
            layers.MaxPooling2D(2, strides=1),
            layers.Flatten(),
            layers.Dense(32, activation=activation),
            layers.Dense(10),
        ],
        name="dp_cnn",
    )


class _Accuracy(keras.callbacks.Callback):
    """Test accuracy after each epoch (added to the logs, so it sits beside epsilon)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        super().__init__()
        self.x, self.y = x, y

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        _, accuracy = self.model.evaluate(self.x, self.y, batch_size=1000, verbose=0)
        if logs is not None:
            logs["test_accuracy"] = accuracy


def plot(points: list[tuple[float, float]], path: str, title: str) -> str:
    """Save test accuracy against epsilon (one point per epoch) to ``path``."""
    try:
        from matplotlib.figure import Figure  # no pyplot: the global backend stays as it is
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install 'tf_jacbp[plot]'") from error
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    eps, acc = zip(*points, strict=True)
    ax.plot(eps, acc, marker="o")
    ax.set_xlabel("epsilon (delta fixed)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist, mnist, or a path")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--learning-rate", type=float, default=4.0)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--l2-norm-clip", type=float, default=0.12)
    parser.add_argument("--noise-multiplier", type=float, default=2.15)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--activation", default="tanh")
    parser.add_argument("--poisson", action="store_true", help="Poisson-sampled batches")
    parser.add_argument("--train-samples", type=int, default=None, help="use the first N only")
    parser.add_argument("--quick", action="store_true", help="512 samples, one epoch, batch 128")
    parser.add_argument("--plot", default=None, help="save accuracy against epsilon to this path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1, help="0 silent, 1 progress bar, 2 lines")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.batch_size, args.train_samples = 1, 128, args.train_samples or 512
        args.learning_rate = min(args.learning_rate, 1.0)

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load(args.data)
    if args.train_samples is not None:
        x_train, y_train = x_train[: args.train_samples], y_train[: args.train_samples]
        x_test, y_test = (
            x_test[: max(args.train_samples, 1000)],
            y_test[: max(args.train_samples, 1000)],
        )
    n = len(x_train)
    rate = args.batch_size / n
    model = privacy.make_private(
        small_cnn(args.activation),
        l2_norm_clip=args.l2_norm_clip,
        noise_multiplier=args.noise_multiplier,
        expected_batch_size=args.batch_size if args.poisson else None,
        seed=args.seed,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(args.learning_rate, momentum=args.momentum),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    epsilon = privacy.EpsilonLogger(rate, args.delta)
    print(
        f"tf_jacbp {tf_jacbp.__version__}: DP-SGD on {args.data} ({n} train / {len(x_test)} test "
        f"images), batch {args.batch_size} ({'Poisson' if args.poisson else 'shuffled'}), "
        f"clip {args.l2_norm_clip}, noise {args.noise_multiplier}, delta {args.delta}"
    )
    history = model.fit(
        privacy.poisson_batches(x_train, y_train, rate, seed=args.seed)
        if args.poisson
        else x_train,
        None if args.poisson else y_train,
        batch_size=None if args.poisson else args.batch_size,
        epochs=args.epochs,
        callbacks=[_Accuracy(x_test, y_test), epsilon],
        verbose=args.verbose,
    )
    points = list(zip(history.history["epsilon"], history.history["test_accuracy"], strict=True))
    for epoch, (eps, accuracy) in enumerate(points, start=1):
        print(f"epoch {epoch}: test accuracy {accuracy:.4f}, epsilon {eps:.3f}")
    print(f"test accuracy: {points[-1][1]:.4f} at epsilon {points[-1][0]:.3f} (delta {args.delta})")
    if args.plot:
        title = f"DP-SGD, {args.data}: clip {args.l2_norm_clip}, noise {args.noise_multiplier}"
        print(f"plot: {plot(points, args.plot, title)}")
    return {"accuracy": points[-1][1], "epsilon": points[-1][0], "points": points}


if __name__ == "__main__":
    main()
