"""tf_jacbp.plot: figures without pyplot, axes of your own, integer ticks, labels apart, signs."""

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from tf_jacbp import models, plot


def _labels(fig: Figure) -> list:
    return [t for ax in fig.axes for t in ax.texts if t.get_color() == "tab:red"]


def test_returns_a_figure_and_leaves_the_backend_alone(tmp_path):
    backend = matplotlib.get_backend()
    fig = plot.plot_matrix(np.eye(3), tmp_path / "m.png", "eye")
    assert isinstance(fig, Figure)
    assert matplotlib.get_backend() == backend
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draws_into_axes_of_your_own():
    fig = Figure()
    sparsity, values = fig.subplots(1, 2)
    assert plot.plot_matrix(np.eye(3), ax=(sparsity, values)) is fig
    assert sparsity.images and values.images
    single = Figure().subplots()
    plot.plot_matrix(np.eye(3), ax=single, signed=False)
    assert len(single.images) == 1


def test_ticks_are_integer_rows_and_columns():
    fig = plot.plot_matrix(np.ones((3, 7)), signed=False)
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    for ticks in (ax.get_xticks(), ax.get_yticks()):
        assert np.all(ticks == np.round(ticks)), ticks


def test_signed_values_use_a_diverging_map_symmetric_about_zero():
    fig = plot.plot_matrix(np.array([[1.0, -3.0], [0.0, 2.0]]))
    image = fig.axes[1].images[0]
    assert image.get_cmap().name == "RdBu_r"
    assert image.get_clim() == (-3.0, 3.0)


def test_band_labels_do_not_overlap():
    """LeNet-100-300-10's bias bands are a few columns of 111,810; their labels still part."""
    fig = plot.plot_parameter_jacobian(
        models.lenet_100_300_10(), np.ones((1, 28, 28)), signed=False
    )
    renderer = FigureCanvasAgg(fig).get_renderer()
    FigureCanvasAgg(fig).draw()
    # The text's own box (an Annotation's extent also covers its leader line).
    boxes = [Text.get_window_extent(t, renderer) for t in _labels(fig)]
    assert len(boxes) == 6
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a, b)


@pytest.mark.parametrize("n", [1, 3, 50])
def test_label_positions_keep_their_gap_and_order(n):
    centers = np.sort(np.random.default_rng(n).uniform(0, 10, n))
    positions = plot.label_positions(centers, 0.15, 0, 10)
    assert np.all(np.diff(positions) >= 0.15 - 1e-12)
    assert positions.min() >= 0 and positions.max() <= 10
