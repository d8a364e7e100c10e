"""DP-SGD's Gaussian noise: fresh seeds, the seeded generator, and the secure mode.

Default: ``keras.random.normal`` from a seed generator (``tf_jacbp.backend.noise_seed_generator``:
on TensorFlow Keras' ``SeedGenerator``, Philox; on JAX a ``SeedGenerator`` keeping the 62-bit
seed in two words, Threefry; both counter-based pseudo-random generators) whose seed comes from
the operating system's entropy (``secrets``) and whose state (seed, counter) is saved with the
model, so a resumed run continues the sequence.
``secure_mode``: every draw reads fresh bytes from ``os.urandom`` (the operating system's
cryptographically secure generator), turns them into normals by the Box-Muller transform in
float64, and sums four draws of standard deviation ``std / 2`` (as Opacus' ``secure_mode``,
against Mironov's floating-point attack on a single draw). It has no state: nothing to save and
nothing that a resume could replay.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import numpy as np
from keras import ops

from tf_jacbp import backend
from tf_jacbp._backend import keras


def fresh_seed() -> int:
    """A 62-bit seed from the operating system's entropy, never from Python's or NumPy's global
    generators (``keras.utils.set_random_seed`` fixes those: runs would share their noise)."""
    return secrets.randbits(62)


def _urandom_uniform(size: int) -> np.ndarray:
    """``size`` uniforms in ``(0, 1]`` with 53 random bits each, from ``os.urandom``."""
    bits = np.frombuffer(os.urandom(8 * size), dtype=np.uint64) >> np.uint64(11)
    return (bits.astype(np.float64) + 1.0) / 2.0**53


def secure_standard_normal(size: int) -> np.ndarray:
    """``size`` draws of ``N(0, 1)`` in float64 from ``os.urandom``: the mean of four
    Box-Muller normals times two (a sum of four ``N(0, 1/4)``), as Opacus' secure mode."""
    size = int(size)
    total = np.zeros(size, np.float64)
    for _ in range(4):
        u1, u2 = _urandom_uniform(size), _urandom_uniform(size)
        total += np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return total / 2.0


def gaussian_noise(
    size: int,
    std: float,
    dtype: Any,
    seed: keras.random.SeedGenerator | int | None,
    secure: bool,
) -> Any:
    """``size`` draws of ``N(0, std^2)`` in ``dtype``, shape ``(size,)``.

    ``secure``: from ``os.urandom`` (``secure_standard_normal``, run on the host at every step:
    ``tf.numpy_function`` on TensorFlow, ``io_callback`` on JAX). Otherwise from ``seed``: a
    ``SeedGenerator`` (a new draw each call; its state moves on), an int (the same draw for the
    same int) or None (the backend's global generator; on JAX only outside a traced step).
    """
    if secure:
        z = backend.host_normal(secure_standard_normal, size)
        return ops.cast(z * std, dtype)
    if seed is None:
        return backend.unseeded_normal(size, std, dtype)
    return keras.random.normal([size], stddev=std, dtype=dtype, seed=seed)
