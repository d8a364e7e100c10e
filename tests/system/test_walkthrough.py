"""The paper walkthrough runs, and what it prints is the paper's worked examples."""

import runpy
import sys
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from tf_jacbp import plot, tolerances

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "paper_walkthrough.py"
NOTEBOOK = EXAMPLE.with_suffix(".ipynb")


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """Run the walkthrough as a script; its ``out`` dict holds every section's results."""
    argv = sys.argv
    sys.argv = [str(EXAMPLE), "--out", str(tmp_path_factory.mktemp("walkthrough"))]
    try:
        return runpy.run_path(str(EXAMPLE), run_name="__main__")["out"]
    finally:
        sys.argv = argv


def test_the_notebook_is_the_script():
    """examples/paper_walkthrough.ipynb is paired with the .py (jupytext): the same cells."""
    script = jupytext.read(EXAMPLE)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert [(c.cell_type, c.source) for c in notebook.cells] == [
        (c.cell_type, c.source) for c in script.cells
    ], "the notebook is out of date: run `jupytext --sync examples/paper_walkthrough.py`"


@pytest.mark.slow
def test_the_notebook_runs_and_shows_the_pictures_inline(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    printed = "".join(o.get("text", "") for o in outputs)
    assert "Lemma 3" in printed and "Table 1" in printed


def test_section_3_1_one_layer(walkthrough, capsys):
    j = walkthrough["3.1"]["J"]
    assert j.shape == (3, 15)
    np.testing.assert_array_equal(j[:, 12:], np.eye(3))
    np.testing.assert_array_equal(j[1, 4:8], [1.0, 2.0, 3.0, 4.0])
    assert walkthrough["3.1"]["error"] <= 1e-12


def test_section_3_2_two_layers(walkthrough):
    shapes = list(walkthrough["3.2"]["blocks"].values())
    assert shapes == [(3, 20), (3, 5), (3, 15), (3, 3)]
    assert walkthrough["3.2"]["chain_error"] <= 1e-12


def test_section_3_3_lenet_blocks(walkthrough):
    assert walkthrough["3.3"]["blocks"] == [784 * 100 + 100, 100 * 300 + 300, 300 * 10 + 10]


def test_section_3_4_relu_diagonal(walkthrough):
    np.testing.assert_array_equal(walkthrough["3.4"]["D"], np.diag([0.0, 1.0, 0.0, 1.0, 1.0]))


def test_section_3_5_toeplitz_and_lemmas(walkthrough):
    k1, k2, k3, k4 = 1.0, 2.0, 3.0, 4.0
    expected = np.array(
        [
            [k1, k2, 0, k3, k4, 0, 0, 0, 0],
            [0, k1, k2, 0, k3, k4, 0, 0, 0],
            [0, 0, 0, k1, k2, 0, k3, k4, 0],
            [0, 0, 0, 0, k1, k2, 0, k3, k4],
        ]
    )
    np.testing.assert_array_equal(walkthrough["3.5"]["T"], expected)
    ours, direct = walkthrough["3.5"]["lemma2"]
    np.testing.assert_allclose(ours, direct, rtol=1e-12)
    assert walkthrough["3.5"]["lemma3_error"] <= 1e-12


def test_table_1_rows_match_autodiff(walkthrough):
    assert len(walkthrough["table1"]) == 3
    assert max(walkthrough["table1"].values()) <= tolerances.rtol("float64")


def test_pictures_are_pngs(walkthrough):
    assert len(walkthrough["pictures"]) == 3
    for path in walkthrough["pictures"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_matrix_rejects_a_vector(tmp_path):
    with pytest.raises(ValueError, match="2-D matrix"):
        plot.plot_matrix(np.ones(3), str(tmp_path / "v.png"))
