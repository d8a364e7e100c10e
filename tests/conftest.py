"""Shared pytest setup: quiet TensorFlow, a fixed seed per test, the hypothesis profiles."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# On JAX (tests/backends under KERAS_BACKEND=jax) float64 is float64 only with x64 on; set before
# JAX is imported. TensorFlow ignores it.
os.environ.setdefault("JAX_ENABLE_X64", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# "ci" keeps the suite inside CI's budget; "long" is for local runs:
# pytest --hypothesis-profile=long
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_and_policy():
    """Every test starts from the same seed and the float32 policy, whatever ran before.

    Keras (and TensorFlow) are imported here, in the test process, not at the top: pytest-xdist's
    controller loads this file too and needs neither (their import is ~10 s of start-up).
    """
    import keras

    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run first (each keeps its place among the slow ones).

    ``.ci/run`` spreads the suite over two pytest-xdist workers, which take tests in this order:
    a long test started last would keep one worker busy while the other has nothing left to do.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
