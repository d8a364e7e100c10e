"""The project's tests use the public layer-test kit, ``tf_jacbp.testing``, under the names
they have always used (``run_layer_test`` is ``check_layer``)."""

from tf_jacbp.testing import (  # noqa: F401
    InputScale,
    assert_gradients_close,
    build_model,
    half_squared_error,
    model_gradients,
    model_state,
    set_model_state,
)
from tf_jacbp.testing import check_layer as run_layer_test  # noqa: F401
