"""A user's own thick-slice data set, end to end: plan -> anisotropic network -> train -> predict.

The data are real anatomy (the MNI152 template averaged into 7 mm slices at
2 mm in-plane, see train.data.thinstack), the run goes through
``train.run.train_and_evaluate`` as ``python -m train.main --dataset=msd:...``
does, and the prediction is written back on thin stacks that are shorter than
the patch, a single slice, or not a multiple of the network's depth stride.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from train import config as config_lib
from train import predict
from train import run as run_lib
from train.data import nifti, thinstack


@pytest.fixture(scope="module")
def thick_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("thick")
    return thinstack.write_dataset(str(root / "task"), num_cases=4, size=32)


@pytest.fixture(scope="module")
def planned_run(thick_dataset, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = config_lib.preset(
        "cpu-tiny", dataset=f"msd:{thick_dataset}", workdir=str(workdir), init="scale", steps=2,
        slices_steps=2, eval_every=0, cache_dir=str(workdir / "cache"),
    )
    summary = run_lib.train_and_evaluate(config)
    return workdir, summary


def test_the_plan_of_thick_slices_drives_the_network(planned_run):
    workdir, summary = planned_run
    plan = json.loads((workdir / "plan.json").read_text())
    assert plan["source"] == "planned from the data" and plan["anisotropic"]
    assert plan["target_spacing"][0] >= 3 * plan["target_spacing"][1]
    # The network the run built has the plan's stages: in-plane-only first pooling, (1, 3, 3) first kernels.
    assert plan["kernels"][0] == [1, 3, 3] and plan["strides"][1] == [1, 2, 2], plan
    config = json.loads((workdir / "config.json").read_text())
    options = config["model_options"]
    assert [list(s) for s in options["strides"]] == plan["strides"]
    assert [list(k) for k in options["kernels"]] == plan["kernels"]
    assert config["patch"] == plan["patch"] and summary["patch"] == plan["patch"]
    assert (workdir / "fingerprint.json").exists()
    assert 0.0 <= summary["val_dice_mean"] <= 1.0


def test_an_explicit_flag_wins_over_the_plan(thick_dataset, tmp_path):
    config = config_lib.preset("cpu-tiny", dataset=f"msd:{thick_dataset}", workdir=str(tmp_path), batch=4,
                               cache_dir=str(tmp_path / "cache"))
    used, plan = run_lib.resolve_plan(config, tmp_path)
    assert plan is not None and used.batch == 4 and "batch" in used.explicit
    assert used.patch == tuple(plan["patch"]) and used.spacing == tuple(plan["target_spacing"])
    off = config_lib.preset("cpu-tiny", dataset=f"msd:{thick_dataset}", workdir=str(tmp_path), plan="off")
    assert run_lib.resolve_plan(off, tmp_path) == (off, None)


@pytest.mark.parametrize("slices", [1, 3, 5])
def test_predict_returns_the_input_grid_of_thin_stacks(planned_run, thick_dataset, tmp_path, slices):
    workdir, _ = planned_run
    source = nifti.read_volume(f"{thick_dataset}/imagesTr/thin_000.nii.gz")
    # A real thin stack: the first `slices` slices of a case, with its own affine.
    path = nifti.write_volume(source.array[:slices], source.affine, str(tmp_path / f"stack{slices}.nii.gz"))
    out = tmp_path / f"pred{slices}.nii.gz"
    predict.predict_file(str(workdir), path, str(out))
    written = nifti.read_label(str(out))
    assert written.array.shape == source.array[:slices].shape
    np.testing.assert_allclose(written.affine, nifti.read_volume(path).affine, atol=1e-5)
