"""tf_jacbp.geometry: the window arithmetic of convolution and pooling against TensorFlow's."""

import numpy as np
import pytest
import tensorflow as tf

from tf_jacbp import geometry


@pytest.mark.parametrize(
    "size, kernel, stride, dilation, expected",
    [
        (5, 3, 1, 1, (1, 1)),
        (4, 2, 1, 1, (0, 1)),  # even kernel: the extra zero goes after
        (6, 4, 2, 1, (1, 1)),
        (5, 4, 2, 1, (1, 2)),
        (7, 3, 3, 1, (1, 1)),
        (5, 3, 1, 2, (2, 2)),
        (8, 1, 3, 1, (0, 0)),
    ],
)
def test_same_padding_is_tensorflows_rule(size, kernel, stride, dilation, expected):
    assert geometry.same_padding(size, kernel, stride, dilation) == expected
    k = tf.ones((kernel, 1, 1, 1), tf.float64)
    x = tf.reshape(tf.range(1, size + 1, dtype=tf.float64), [1, size, 1, 1])
    y = tf.nn.conv2d(x, k, (stride, 1), "SAME", dilations=(dilation, 1))
    before, _ = expected
    first_window = [i for i in range(-before, -before + (kernel - 1) * dilation + 1, dilation)]
    assert y[0, 0, 0, 0] == sum(i + 1 for i in first_window if 0 <= i < size)
    assert geometry.output_size(size, kernel, stride, "same", dilation) == y.shape[1]


def test_window_longer_than_a_valid_axis_names_the_axis_and_the_fix():
    with pytest.raises(ValueError, match=r"along the width.*padding='same'"):
        geometry.check_window_fits((6, 2, 1), (3, 3), "valid", "Conv2D", "kernel_size", (1, 1))
    with pytest.raises(ValueError, match=r"pool_size \(4,\) spans 4 along the length"):
        geometry.check_window_fits((3, 1), (4,), "valid", "MaxPooling1D", "pool_size")
    geometry.check_window_fits((3, 1), (4,), "same", "MaxPooling1D", "pool_size")


@pytest.mark.parametrize(
    "value, n, match",
    [
        (0, 2, "strides=0"),
        ((1, -1), 2, r"strides=\(1, -1\)"),
        ((2, 2), 1, r"tuple of one positive integer.*strides=\(2, 2\)"),
        (True, 1, "strides=True"),
        ("2", 1, "strides='2'"),
        (1.5, 2, "strides=1.5"),
    ],
)
def test_as_tuple_names_the_argument(value, n, match):
    with pytest.raises(ValueError, match=match):
        geometry.as_tuple(value, n, "strides", "Layer")


def test_as_tuple_accepts_an_int_or_n_ints():
    assert geometry.as_tuple(3, 1, "kernel_size", "Conv1D") == (3,)
    assert geometry.as_tuple([3], 1, "kernel_size", "Conv1D") == (3,)
    assert geometry.as_pair(np.int64(2), "strides", "Conv2D") == (2, 2)
    assert geometry.as_pair((2, 3), "strides", "Conv2D") == (2, 3)


def test_padding_choices_depend_on_the_layer():
    assert geometry.check_padding("SAME", "Conv2D") == "same"
    assert geometry.check_padding("causal", "Conv1D", geometry.PADDINGS_1D) == "causal"
    with pytest.raises(ValueError, match=r"'valid' or 'same', got padding='causal'"):
        geometry.check_padding("causal", "Conv2D")


def test_spatial_shapes():
    assert geometry.spatial_shape((None, 5, 4, 2), 2, "Conv2D") == (5, 4, 2)
    assert geometry.spatial_shape((None, 9, 3), 1, "Conv1D") == (9, 3)
    assert geometry.spatial_shape((None, None, 3), 1, "Conv1D", allow_unknown=True) == (None, 3)
    with pytest.raises(ValueError, match=r"\(batch, length, channels\).*\(None, 5, 4, 2\)"):
        geometry.spatial_shape((None, 5, 4, 2), 1, "Conv1D")
    with pytest.raises(ValueError, match="known height, width and channel count"):
        geometry.spatial_shape((None, None, 4, 2), 2, "Conv2D")
    with pytest.raises(ValueError, match="known channel count"):
        geometry.spatial_shape((None, None, None), 1, "Conv1D", allow_unknown=True)


def test_channels_first_is_an_error_naming_data_format():
    with pytest.raises(ValueError, match="data_format='channels_first'"):
        geometry.check_channels_last("channels_first", "Conv1D")
    assert geometry.check_channels_last(None, "Conv1D") == "channels_last"
