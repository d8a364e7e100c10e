"""tests/backends runs on every backend tf_jacbp supports: the whole suite's run (TensorFlow) and
``.ci/run``'s JAX run (``KERAS_BACKEND=jax python -m pytest tests/backends``, Python 3.12, the
GPU machine's JAX). Tests here use ``keras.ops``, NumPy and ``tf_jacbp.backend`` only, never
``tensorflow`` or ``jax`` directly, unless a test is about one backend (then it says so with the
``backend`` fixture and ``pytest.skip`` names why, e.g. "tf.distribute is TensorFlow's")."""

import os

import pytest


@pytest.fixture
def backend() -> str:
    """The Keras backend this run tests: ``"tensorflow"`` or ``"jax"``."""
    import keras

    return keras.backend.backend()


def pytest_report_header(config) -> str:
    return f"tf_jacbp backends run: KERAS_BACKEND={os.environ.get('KERAS_BACKEND')}"
