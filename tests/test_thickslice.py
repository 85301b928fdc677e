"""The thick-slice rendering of the demo and the report comparing isotropic, native, 2D and 2D-initialised runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train import thickslice_report as report
from train.data import mni152, nifti, thinstack
from train.data.sources import read_splits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Two training renderings, one validation rendering and the real T1, at 6 mm x 2 mm x 2 mm."""
    root = tmp_path_factory.mktemp("thick")
    cache = str(root / "cache")
    data = thinstack.write_rendered_dataset(str(root / "data"), num_train=2, num_val=1, cache_dir=cache)
    return Path(data), cache


def test_thicken_box_means_image_majority_label_and_centred_affine():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 4, 4)).astype(np.float32)
    label = rng.integers(0, 3, size=(6, 4, 4)).astype(np.int32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (10, -4, 7)
    thick, thick_label, thick_affine = thinstack.thicken(image, label, affine, (3, 1, 1))
    assert thick.shape == thick_label.shape == (2, 4, 4)
    np.testing.assert_allclose(thick, image.reshape(2, 3, 4, 4).mean(1), rtol=1e-6)
    # A class takes a thick voxel exactly when it fills more than half of it (2 of 3 thin voxels).
    share = np.stack([(label == c).reshape(2, 3, 4, 4).mean(1) for c in (1, 2)])
    expect = np.where(share[0] > 0.5, 1, np.where(share[1] > 0.5, 2, 0))
    np.testing.assert_array_equal(thick_label, expect)
    # The thick voxel's centre is the mean of its thin voxels' centres.
    centre = thick_affine @ np.array([1, 2, 3, 1.0])
    thin = np.mean([affine @ np.array([d, 2, 3, 1.0]) for d in (3, 4, 5)], axis=0)
    np.testing.assert_allclose(centre, thin)
    np.testing.assert_allclose(np.linalg.norm(thick_affine[:3, :3], axis=0), (6, 2, 2))


def test_rendered_dataset_shapes_spacing_labels_and_splits(rendered):
    data, cache = rendered
    train_names, val_names = read_splits(str(data))
    assert train_names == ["mni152_train_s0_000", "mni152_train_s0_001"]
    assert val_names == ["mni152_val_000", mni152.REAL_T1_NAME]
    meta = json.loads((data / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and meta["labels"] == {"0": "background", "1": "grey_matter", "2": "white_matter"}
    for name in train_names + val_names:
        image = nifti.read_volume(str(data / "imagesTr" / f"{name}.nii.gz"))
        label = nifti.read_label(str(data / "labelsTr" / f"{name}.nii.gz"))
        np.testing.assert_allclose(image.spacing, (6, 2, 2))  # from the file's header
        assert image.array.shape == label.array.shape
        assert image.array.shape[1:] == (98, 80)
        assert set(np.unique(label.array)) == {0, 1, 2}
    # Training comes from the lower slab (42 slices at 2 mm), validation from the upper (35): 14 and 11 thick slices.
    assert nifti.read_volume(str(data / "imagesTr" / f"{train_names[0]}.nii.gz")).array.shape[0] == 14
    assert nifti.read_volume(str(data / "imagesTr" / f"{val_names[0]}.nii.gz")).array.shape[0] == 11
    # Each case is its rendering box-averaged: same case, same world positions.
    source = mni152.MNI152Source("train", spacing=2, num_cases=2, cache_dir=cache)[1]
    image, label, affine = thinstack.thicken(source["image"][..., 0], source["label"], source["affine"], (3, 1, 1))
    written = nifti.read_label(str(data / "labelsTr" / f"{train_names[1]}.nii.gz"))
    np.testing.assert_array_equal(written.array, label)
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    # Validation anatomy lies above every training slice (the demo's leak-free split).
    top_train = affine @ np.array([image.shape[0] - 1, 0, 0, 1.0])
    val = nifti.read_volume(str(data / "imagesTr" / f"{val_names[0]}.nii.gz"))
    assert (val.affine @ np.array([0, 0, 0, 1.0]))[2] > top_train[2] + 6


def test_rendered_dataset_rejects_spacings_that_are_not_multiples(tmp_path):
    with pytest.raises(ValueError, match="multiples of source_mm"):
        thinstack.write_rendered_dataset(str(tmp_path), slice_mm=5, source_mm=2)
    with pytest.raises(ValueError, match="source_mm must be 1 or 2"):
        thinstack.write_rendered_dataset(str(tmp_path), source_mm=3)


def test_explicit_spacing_plans_the_network_for_that_grid(rendered):
    from train.planning.experiment import plan_experiment
    from train.planning.fingerprint import fingerprint_dataset

    fp = fingerprint_dataset(f"msd:{rendered[0]}")
    native = plan_experiment(fp, budget_voxels=2 * 32**3, base_width=8, max_width=64)
    iso = plan_experiment(fp, budget_voxels=2 * 32**3, base_width=8, max_width=64, spacing=(2, 2, 2))
    assert native.target_spacing == (6, 2, 2) and iso.target_spacing == (2, 2, 2)
    assert native.kernels[0] == (1, 3, 3)  # thick slices: the stem convolves in-plane only
    assert all(k == (3, 3, 3) for k in iso.kernels)
    assert iso.strides[1] == (2, 2, 2) and native.strides[1] == (1, 2, 2)  # depth pooled at once when isotropic
    assert iso.median_shape[0] == 3 * native.median_shape[0]
    assert any("given (--spacing)" in n for n in iso.notes)


@pytest.mark.parametrize("variant, present, absent", [
    ("isotropic", ["--init=scratch", "--spacing=2", "--steps=40"], ["--dims=2", "--pretrained=slices"]),
    ("native", ["--init=scratch", "--steps=40"], ["--spacing=2", "--dims=2", "--pretrained=slices"]),
    ("2d", ["--init=scratch", "--dims=2", "--steps=7", "--lr=0.003"], ["--spacing=2", "--pretrained=slices"]),
    ("2d-init", ["--init=scale", "--pretrained=slices", "--slices_steps=7", "--steps=40"], ["--spacing=2", "--dims=2"]),
])
def test_command_per_variant(variant, present, absent):
    cmd = report.command(variant, data="/d", workdir="/w/x", seed=3, steps=40, slices_steps=7)
    assert cmd[:3] == [sys.executable, "-m", "train.main"]
    common = ["--dataset=msd:/d", "--preset=demo", "--workdir=/w/x", "--seed=3", "--eval_every=0", "--noeval_mirror"]
    for flag in common + present:
        assert flag in cmd, (variant, flag)
    for flag in absent:
        assert flag not in cmd, (variant, flag)
    assert len({a.split("=")[0] for a in cmd[3:]}) == len(cmd) - 3  # no flag given twice
    # Every command line parses as train.main's flags.
    from absl import flags

    from train import config as config_lib

    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["train.main", *cmd[3:]])
    assert fv["seed"].value == 3


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        report.command("3d", data="/d", workdir="/w", seed=0, steps=1, slices_steps=1)


def _fake_run(dice, wall=10.0, peak=900.0, spacing=(6, 2, 2)):
    """A runner that writes what a finished train.main run leaves: summary.json and plan.json."""
    calls = []

    def runner(cmd, workdir):
        calls.append(cmd)
        (workdir / "summary.json").write_text(json.dumps({
            "val_dice_mean": dice, "val_dice": {"grey_matter": dice - 0.1, "white_matter": dice + 0.1},
            "baseline_threshold_dice": 0.49, "wall_s": wall - 1}))
        (workdir / "plan.json").write_text(json.dumps({
            "target_spacing": list(spacing), "patch": [8, 64, 56], "strides": [[1, 1, 1], [1, 2, 2]],
            "kernels": [[1, 3, 3], [3, 3, 3]]}))
        return {"wall_s": wall, "peak_rss_mb": peak, "returncode": 0, "command": cmd}

    return runner, calls


def test_run_variant_reuses_finished_runs(tmp_path):
    runner, calls = _fake_run(0.7)
    first = report.run_variant("native", 0, tmp_path, tmp_path / "data", steps=5, slices_steps=5, runner=runner)
    again = report.run_variant("native", 0, tmp_path, tmp_path / "data", steps=5, slices_steps=5, runner=runner)
    assert len(calls) == 1
    assert first["summary"] == again["summary"] and again["run"]["peak_rss_mb"] == 900.0
    assert again["workdir"] == tmp_path / "native" / "seed0"
    assert f"--workdir={tmp_path / 'native' / 'seed0'}" in calls[0]


def test_run_variant_names_the_log_of_a_failed_run(tmp_path):
    def runner(cmd, workdir):
        return {"wall_s": 1.0, "peak_rss_mb": 1.0, "returncode": 1, "command": cmd}

    with pytest.raises(report.RunFailed, match=r"seed1/train.log: the 2d run \(seed 1\) failed with status 1"):
        report.run_variant("2d", 1, tmp_path, tmp_path / "data", steps=5, slices_steps=5, runner=runner)


def test_launch_measures_each_child_on_its_own(tmp_path):
    big = [sys.executable, "-c", "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])"]
    small = [sys.executable, "-c", "print('hi')"]
    first = report.launch(big, tmp_path / "big")
    second = report.launch(small, tmp_path / "small")
    assert first["returncode"] == second["returncode"] == 0
    assert first["peak_rss_mb"] > 300 > second["peak_rss_mb"] > 1  # not the maximum over every child so far
    assert (tmp_path / "small" / report.LOG).read_text() == "hi\n"
    assert report.launch([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad")["returncode"] == 3


def test_table_from_fake_summaries(tmp_path):
    results = []
    for variant, dices, peak in (("native", (0.6, 0.8), 900.0), ("isotropic", (0.5, 0.7), 1500.0)):
        for seed, dice in enumerate(dices):
            runner, _ = _fake_run(dice, wall=100 + seed * 20, peak=peak + seed)
            r = report.run_variant(variant, seed, tmp_path, tmp_path / "data", steps=5, slices_steps=5, runner=runner)
            r.update(native=dice - 0.05, native_per_class=[dice - 0.1, dice])
            results.append(r)
    text = report.table(results)
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(rows) == 2
    native = rows[0].split(" | ")
    assert native[0] == "| (b) native, anisotropic plan" and native[1] == "2"
    assert native[2] == "0.650 ± 0.141"  # native-grid Dice: mean ± sample standard deviation of 0.55, 0.75
    assert native[5] == "0.700 ± 0.141"  # the run's own val_dice_mean
    assert native[6] == "110" and native[7] == "901"  # mean wall s, largest peak MB
    assert native[8:12] == ["6x2x2", "8x64x56", "1x1x1 1x2x2", "1x3x3 3x3x3 |"]
    assert rows[1].startswith("| (a) isotropic 3D | 2 | 0.550 ± 0.141")
    assert "threshold Dice on the validation cases, native grid: 0.490" in text
    results[-1]["summary"]["baseline_threshold_dice"] = 0.9
    assert "native grid: 0.900" in report.table(results)
    results[-1]["native_grid"] = False  # a baseline on a resampled grid is not the native one
    assert "native grid: 0.490" in report.table(results)


def test_on_native_grid():
    assert report.on_native_grid({"plan": {"target_spacing": [6.0, 2.0, 2.0]}}, (6, 2, 2))
    assert not report.on_native_grid({"plan": {"target_spacing": [2.0, 2.0, 2.0]}}, (6, 2, 2))


def test_main_writes_data_runs_every_variant_and_reuses(tmp_path, monkeypatch):
    calls = []

    def fake_launch(cmd, workdir):
        calls.append(cmd)
        iso = any(a.startswith("--spacing=") for a in cmd)
        runner, _ = _fake_run(0.6, spacing=(2, 2, 2) if iso else (6, 2, 2))
        return runner(cmd, workdir)

    monkeypatch.setattr(report, "launch", fake_launch)
    monkeypatch.setattr(report, "native_dice", lambda workdir, data: {"dice_mean": 0.42, "dice": [0.4, 0.44]})
    out = tmp_path / "out"
    argv = [f"--out={out}", "--seeds=0,1", "--cases=1", "--val_cases=0", "--steps=3", "--slices_steps=2"]
    assert report.main(argv) == 0
    assert len(calls) == 8
    assert read_splits(str(out / "data"))[0] == ["mni152_train_s0_000"]
    text = (out / report.REPORT).read_text()
    assert "| (a) isotropic 3D | 2 | 0.420 ± 0.000 | 0.400 ± 0.000 | 0.440 ± 0.000 | 0.600 ± 0.000" in text
    assert "| (c) 2D on slices | 2 | 0.600 ± 0.000 | 0.500 ± 0.000 | 0.700 ± 0.000 |" in text
    assert "Data: 1 training and 0 + 1 validation cases at 6x2x2 mm" in text
    assert report.main(argv) == 0
    assert len(calls) == 8  # every run reused
    # Another --cases cannot reuse this data set.
    assert report.main([*argv[:2], "--cases=2"]) == 1


def test_bad_flags_are_one_line():
    result = subprocess.run([sys.executable, "-m", "train.thickslice_report", "--variants=3d", "--out=/nonexistent"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --variants: unknown '3d'; choose from isotropic, native, 2d, 2d-init"


def test_run_plans_for_an_explicit_spacing(rendered, tmp_path):
    from train import config as config_lib
    from train import run

    data = f"msd:{rendered[0]}"
    iso = run.make_plan(config_lib.preset("demo", dataset=data, spacing="2", workdir=str(tmp_path)), tmp_path)
    native = run.make_plan(config_lib.preset("demo", dataset=data, workdir=str(tmp_path)), tmp_path)
    assert iso["target_spacing"] == [2.0, 2.0, 2.0] and native["target_spacing"] == [6.0, 2.0, 2.0]
    assert all(k == [3, 3, 3] for k in iso["kernels"]) and native["kernels"][0] == [1, 3, 3]


@pytest.mark.slow
def test_real_runs_end_to_end(tmp_path):
    """Two real tiny runs: (a) scored on the native grid by prediction, (c) by its own validation."""
    out = tmp_path / "out"
    assert report.main([f"--out={out}", "--seeds=0", "--cases=1", "--val_cases=0", "--steps=2",
                        "--slices_steps=2", "--variants=isotropic,2d"]) == 0
    scored = json.loads((out / "isotropic" / "seed0" / report.NATIVE_DICE).read_text())
    assert [c["name"] for c in scored["cases"]] == [mni152.REAL_T1_NAME]
    assert 0 <= scored["dice_mean"] <= 1 and scored["step"] == 2
    plan = json.loads((out / "isotropic" / "seed0" / "plan.json").read_text())
    assert plan["target_spacing"] == [2.0, 2.0, 2.0]
    for variant in ("isotropic", "2d"):
        info = json.loads((out / variant / "seed0" / report.RUN_INFO).read_text())
        assert info["returncode"] == 0 and 200 < info["peak_rss_mb"] < 20000
    assert not (out / "2d" / "seed0" / report.NATIVE_DICE).exists()
    assert "| (c) 2D on slices | 1 |" in (out / report.REPORT).read_text()


def test_table_lists_a_2d_network_in_plane():
    plan = {"target_spacing": [6, 2, 2], "patch": [8, 64, 56], "strides": [[1, 1], [2, 2]],
            "kernels": [[1, 3, 3], [3, 3, 3]]}
    row = {"variant": "2d", "seed": 0, "summary": {"val_dice_mean": 0.5}, "plan": plan, "run": {"wall_s": 5.0},
           "native": 0.5, "native_per_class": [0.4, 0.6]}
    line = next(x for x in report.table([row]).splitlines() if x.startswith("| (c)"))
    assert line.endswith("| 6x2x2 | 8x64x56 | 1x1 2x2 | 3x3 3x3 |")
    assert "| 5 | - |" in line  # no peak memory recorded
