"""Train a sequence classifier (Embedding, Conv1D, GlobalMaxPooling1D, Dense) with GradientCheck.

    python examples/train_sequence.py                       # MNIST as sequences of tokens
    python examples/train_sequence.py --data fashion-mnist --epochs 5

No text corpus is available offline, so the sequences come from images: each image is
average-pooled to 14 x 14 and read row by row as 196 tokens, its pixel intensities quantized to
16 levels (the vocabulary). The model sees only the token ids, through an ``Embedding``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tf_jacbp import callbacks, datasets, losses, models  # noqa: E402

LEVELS = 16


def tokens(images: np.ndarray) -> np.ndarray:
    """``(n, 28, 28)`` uint8 images -> ``(n, 196)`` int32 tokens in ``[0, LEVELS)``: 2 x 2
    average pooling, row-major reading, intensities quantized to ``LEVELS`` levels."""
    n, h, w = images.shape
    pooled = images.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    return np.minimum(pooled * LEVELS / 256, LEVELS - 1).astype("int32").reshape(n, -1)


def main(argv: list[str] | None = None) -> float:
    """Train; return the test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["mnist", "fashion-mnist"], default="mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--check-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    load = datasets.load_mnist if args.data == "mnist" else datasets.load_fashion_mnist
    (x_train, y_train), (x_test, y_test) = load()
    x_train, x_test = tokens(x_train), tokens(x_test)

    model = models.sequence_classifier(x_train.shape[1], LEVELS)
    model.compile(
        keras.optimizers.Adam(3e-3),
        losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    check = callbacks.GradientCheck((x_test[:64], y_test[:64]), every_n_batches=args.check_every)
    model.fit(
        x_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        callbacks=[check],
        verbose=args.verbose,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy


if __name__ == "__main__":
    main()
