"""Train a convolutional autoencoder (Conv2D down, Conv2DTranspose up) with GradientCheck on.

    python examples/train_autoencoder.py                   # Fashion-MNIST (Debian's IDX files)
    python examples/train_autoencoder.py --data mnist --epochs 5

The encoder's convolutions multiply by their Toeplitz matrices ``T(K)``, the decoder's
transposed convolutions by ``T(K)^T``; the loss is the mean squared error between the image and
its reconstruction. Prints the test reconstruction error against the error of predicting the
mean image, and GradientCheck's summary.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_jacbp import callbacks, datasets, losses, models  # noqa: E402


def main(argv: list[str] | None = None) -> tuple[float, float]:
    """Train; return ``(test MSE, MSE of the mean training image)``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["fashion-mnist", "mnist"], default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=None, help="use the first N")
    parser.add_argument("--check-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    load = datasets.load_fashion_mnist if args.data == "fashion-mnist" else datasets.load_mnist
    (x_train, _), (x_test, _) = load()
    x_train = (x_train[: args.train_images, ..., None] / 255.0).astype("float32")
    x_test = (x_test[..., None] / 255.0).astype("float32")

    model = models.conv_autoencoder(input_shape=x_train.shape[1:])
    model.compile(keras.optimizers.Adam(2e-3), losses.MeanSquaredError())
    check = callbacks.GradientCheck((x_test[:64], x_test[:64]), every_n_batches=args.check_every)
    model.fit(
        x_train,
        x_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        callbacks=[check],
        verbose=args.verbose,
    )
    error = float(model.evaluate(x_test, x_test, verbose=0))
    baseline = float(np.mean((x_test - x_train.mean(axis=0)) ** 2))
    print(f"test reconstruction MSE: {error:.4f} (mean image: {baseline:.4f})")
    return error, baseline


if __name__ == "__main__":
    main()
