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

# Notebook 02 as a user runs it takes 40 + 40 steps and validates two MNI152 cases three times. The default
# suite runs every one of its cells with the step counts cut to the fewest that still go
# through each path the notebook shows (two validations and checkpoints, logged steps, the resume): same
# calls, same preset, same figures. `-m slow` runs it exactly as written.
SHORT = {
    "02_train_3d_from_2d.ipynb": {
        "steps=40, slices_steps=40, eval_every=20, checkpoint_every=20, log_every=10, max_eval_cases=2,":
        "steps=4, slices_steps=4, eval_every=2, checkpoint_every=2, log_every=1, max_eval_cases=1,",
    },
}


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:1] == ["01_inflate_quickstart.ipynb"]


def _shortened(notebook, name):
    """The notebook with SHORT's replacements made; each must occur exactly once, so an edit cannot slip by."""
    for old, new in SHORT.get(name, {}).items():
        cells = [c for c in notebook.cells if c.cell_type == "code" and old in c.source]
        assert len(cells) == 1 and cells[0].source.count(old) == 1, f"{name}: {old!r} is not in one code cell"
        cells[0].source = cells[0].source.replace(old, new)
    return notebook


def _execute(notebook, tmp_path, private_cache_home):
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    # The kernel caches (MNI152 renderings, compiled programs) in the session's temporary cache, not the user's.
    client.execute(env=dict(os.environ, XDG_CACHE_HOME=str(private_cache_home)))
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, private_cache_home):
    _execute(_shortened(nbformat.read(path, as_version=4), path.name), tmp_path, private_cache_home)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name in SHORT], ids=lambda p: p.name)
def test_notebook_runs_as_written(path, tmp_path, private_cache_home):
    _execute(nbformat.read(path, as_version=4), tmp_path, private_cache_home)
