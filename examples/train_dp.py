"""Train a small CNN with differentially private SGD on Fashion-MNIST, printing epsilon per epoch.

    python examples/train_dp.py                          # 40 epochs, batch 2048, classic epsilon 3
    python examples/train_dp.py --plot dp.png            # and a plot of accuracy against epsilon
    python examples/train_dp.py --quick                  # a few hundred samples, one epoch
    python examples/train_dp.py --data mnist --epochs 15 --noise-multiplier 1.1 --batch-size 256

DP-SGD (``tf_jacbp.privacy``): each sample's gradient is clipped to ``--l2-norm-clip``, Gaussian
noise of standard deviation ``sigma`` times the clip is added to their sum, and the optimizer gets
the result divided by the expected batch size. The defaults follow Papernot et al. (2021),
"Tempered Sigmoid Activations for Deep Learning with Differential Privacy", as Tramer and Boneh
(2021) reproduced them for Fashion-MNIST: tanh activations, batch 2048, SGD with learning rate 4
and momentum 0.9, clip 0.1, 40 epochs (86.1% and 86.0% test accuracy reported), with ``sigma``
calibrated so that epsilon is at most ``--target-epsilon`` (3) at ``delta`` = ``--delta`` (1e-5)
by the classic RDP conversion TensorFlow Privacy prints (``--noise-multiplier`` overrides it).

The batches are Poisson-sampled (each example joins each step with probability ``batch / N``),
which is what the accountant assumes; ``--no-poisson`` trains on shuffled fixed-size batches, the
common practice, for which the Poisson epsilon is not a proven bound (the statement printed at
the end of training says so and gives the bound that holds). The noise is seeded from fresh
entropy on every run; ``--seed`` fixes it (and the initialization) for tests and debugging only:
two runs with the same seed share their noise. ``GradientCheck`` checks the layers' gradient
formulas against autodiff during training, on a probe of test images (not training data).
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; the defaults are the published Fashion-MNIST run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist, mnist, or a path")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2048, help="expected batch size")
    parser.add_argument("--learning-rate", type=float, default=4.0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--l2-norm-clip", type=float, default=0.1)
    parser.add_argument(
        "--noise-multiplier", type=float, default=None, help="default: calibrated to the target"
    )
    parser.add_argument("--target-epsilon", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--activation", default="tanh")
    parser.add_argument(
        "--poisson",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Poisson-sampled batches (default); --no-poisson: shuffled fixed-size batches",
    )
    parser.add_argument("--secure-mode", action="store_true", help="noise from os.urandom")
    parser.add_argument("--train-samples", type=int, default=None, help="use the first N only")
    parser.add_argument("--quick", action="store_true", help="512 samples, one epoch, batch 128")
    parser.add_argument("--plot", default=None, help="save accuracy against epsilon to this path")
    parser.add_argument(
        "--seed", type=int, default=None, help="tests only: fixes the noise (default: fresh)"
    )
    parser.add_argument(
        "--check-every", type=int, default=200, help="GradientCheck every N batches (0: off)"
    )
    parser.add_argument("--verbose", type=int, default=1, help="0 silent, 1 progress bar, 2 lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.epochs, args.batch_size, args.train_samples = 1, 128, args.train_samples or 512
        args.learning_rate = min(args.learning_rate, 1.0)

    if args.seed is not None:
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
    # Poisson batches: round(1 / q) steps an epoch; shuffled batches: ceil(N / B).
    steps_per_epoch = round(1 / rate) if args.poisson else -(-n // args.batch_size)
    steps = args.epochs * steps_per_epoch
    sigma = args.noise_multiplier
    if sigma is None:
        sigma = privacy.noise_multiplier_for_epsilon(
            args.target_epsilon, args.delta, rate, steps, rdp_conversion="classic"
        )
    model = privacy.make_private(
        small_cnn(args.activation),
        l2_norm_clip=args.l2_norm_clip,
        noise_multiplier=sigma,
        expected_batch_size=args.batch_size if args.poisson else None,
        seed=args.seed,
        **({"secure_mode": True} if args.secure_mode else {}),
    )
    model.compile(
        optimizer=keras.optimizers.SGD(args.learning_rate, momentum=args.momentum),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    epsilon = privacy.EpsilonLogger(rate, args.delta, rdp_conversion="classic")
    print(
        f"tf_jacbp {tf_jacbp.__version__}: DP-SGD on {args.data} ({n} train / {len(x_test)} test "
        f"images), batch {args.batch_size} ({'Poisson' if args.poisson else 'shuffled'}), "
        f"{steps} steps, clip {args.l2_norm_clip}, noise {sigma:.6g}, delta {args.delta}, "
        f"lr {args.learning_rate}, momentum {args.momentum}"
    )
    callbacks = [_Accuracy(x_test, y_test), epsilon]
    if args.check_every > 0:  # the probe is test data: the check releases nothing private
        probe = (x_test[:64], y_test[:64])
        callbacks.append(tf_jacbp.callbacks.GradientCheck(probe, every_n_batches=args.check_every))
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    history = model.fit(
        privacy.poisson_batches(x_train, y_train, rate, steps_per_epoch, seed=seed)
        if args.poisson
        else x_train,
        None if args.poisson else y_train,
        batch_size=None if args.poisson else args.batch_size,
        epochs=args.epochs,
        callbacks=callbacks,
        verbose=args.verbose,
    )
    points = list(zip(history.history["epsilon"], history.history["test_accuracy"], strict=True))
    for epoch, (eps, accuracy) in enumerate(points, start=1):
        print(f"epoch {epoch}: test accuracy {accuracy:.4f}, epsilon {eps:.3f}")
    print(f"test accuracy: {points[-1][1]:.4f} at epsilon {points[-1][0]:.3f} (delta {args.delta})")
    statement = privacy.privacy_statement(
        n,
        args.batch_size,
        sigma,
        model.privacy_steps,  # the ledger: every DP step, over any resume
        args.delta,
        l2_norm_clip=args.l2_norm_clip,
        poisson=args.poisson,
        secure_mode=args.secure_mode,
    )
    print(statement)
    if args.plot:
        title = f"DP-SGD, {args.data}: clip {args.l2_norm_clip}, noise {sigma:.4g}"
        print(f"plot: {plot(points, args.plot, title)}")
    return {
        "accuracy": points[-1][1],
        "epsilon": points[-1][0],
        "points": points,
        "noise_multiplier": sigma,
        "statement": statement,
    }


if __name__ == "__main__":
    main()
