"""Executes every notebook in colab/ top to bottom; any cell error fails the test."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "colab").glob("*.ipynb"))
# Notebook 03 builds the ImageNet EfficientNet-Lite0 in 2D, 3D and ACS at full resolution (over two minutes on a
# 2-core CPU); what it shows is tested in test_pretrained.py and test_statedict.py, so it runs with -m slow.
SLOW = {"03_bring_your_own_weights.ipynb"}
CASES = [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p for p in NOTEBOOKS]


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:1] == ["01_inflate_quickstart.ipynb"]


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, private_cache_home):
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    # The kernel caches (MNI152 renderings, compiled programs) in the session's temporary cache, not the user's.
    client.execute(env=dict(os.environ, XDG_CACHE_HOME=str(private_cache_home)))
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
