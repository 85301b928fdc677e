"""Planning from the data: fingerprint, experiment plan rules, and the command."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from train import plan as plan_cli
from train.data import nifti, thinstack
from train.data.nifti import DataError
from train.planning.experiment import ExperimentPlan, plan_experiment, target_spacing
from train.planning.topology import topology
from train.planning.fingerprint import Fingerprint, IntensityStats, fingerprint_dataset, fingerprint_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def thin_stack(tmp_path_factory):
    """Real anatomy as a clinical thick-slice stack: 4 cases of 6-8 mm slices (median 7), 2 mm in-plane."""
    return thinstack.write_dataset(str(tmp_path_factory.mktemp("thin")), num_cases=4, slice_mm=7, size=48)


@pytest.fixture(scope="module")
def iso_stack(tmp_path_factory):
    """The same anatomy at 2 mm isotropic, about 32^3 per case."""
    return thinstack.write_dataset(str(tmp_path_factory.mktemp("iso")), num_cases=3, slice_mm=2, jitter_mm=0,
                                   size=32, max_slices=32)


def _fingerprint(spacing, shape, n=4, counts=(1000, 300, 100)):
    stats = IntensityStats.of(np.arange(10.0))
    return Fingerprint(spacings=(tuple(spacing),) * n, shapes=(tuple(shape),) * n, num_channels=1,
                       modalities=("MR",), class_names=tuple(f"c{i}" for i in range(len(counts))),
                       class_voxels=tuple(counts), intensity=(stats,))


def _check_consistent(plan: ExperimentPlan):
    """Invariants every plan keeps."""
    assert len(plan.strides) == len(plan.kernels) == len(plan.widths) == plan.num_stages
    assert plan.strides[0] == (1, 1, 1)
    for axis in range(3):
        assert plan.patch[axis] % plan.size_divisor[axis] == 0
        assert plan.patch[axis] <= plan.median_shape[axis]
    assert plan.batch * int(np.prod(plan.patch)) <= plan.budget_voxels or plan.batch == 2
    assert plan.dummy_2d_augmentation == (max(plan.patch) / plan.patch[0] > 3)


# --------------------------------------------------------------------------
# (a) a thick-slice stack of real anatomy


def test_thin_stack_plan_keeps_depth_flat(thin_stack):
    fp = fingerprint_dataset(f"msd:{thin_stack}")
    assert fp.num_cases == 4 and fp.raw_intensities
    np.testing.assert_allclose(fp.median_spacing(), (7.0, 2.0, 2.0))
    assert sorted(s[0] for s in fp.spacings) == [6.0, 7.0, 7.0, 8.0]
    assert len({s for s in fp.shapes}) > 1  # the crops differ

    plan = plan_experiment(fp)
    _check_consistent(plan)
    assert plan.anisotropic
    assert plan.target_spacing[0] >= 3 * max(plan.target_spacing[1:])
    assert plan.kernels[0] == (1, 3, 3)  # a 2D convolution per slice at full resolution
    assert plan.strides[1] == (1, 2, 2)  # in-plane pooling first
    depth_pooled = [i for i, s in enumerate(plan.strides) if s[0] > 1]
    assert not depth_pooled or depth_pooled[0] >= 2
    assert plan.patch[0] <= plan.median_shape[0]
    assert plan.pool_depth() == tuple(s[0] > 1 for s in plan.strides[1:])
    assert any(n.startswith("depth (7 mm)") for n in plan.notes), plan.notes


def test_fingerprint_counts_and_intensities_match_the_files(thin_stack):
    fp = fingerprint_dataset(f"msd:{thin_stack}", seed=3)
    counts = np.zeros(3, np.int64)
    foreground = []
    for name in fp.case_names:
        label = nifti.read_label(os.path.join(thin_stack, "labelsTr", f"{name}.nii.gz")).array
        image = nifti.read_volume(os.path.join(thin_stack, "imagesTr", f"{name}.nii.gz")).array
        counts += np.bincount(label.ravel(), minlength=3)
        foreground.append(image[label > 0])
    assert fp.class_voxels == tuple(counts)
    every = np.concatenate(foreground)
    stats = fp.intensity[0]
    # A 10k sample per case estimates the full foreground's statistics.
    assert stats.samples == sum(min(10_000, f.size) for f in foreground)
    assert abs(stats.mean - every.mean()) < 0.03 * every.std()
    assert abs(stats.std - every.std()) < 0.05 * every.std()
    assert abs(stats.median - np.median(every)) < 0.05 * every.std()
    assert every.min() <= stats.percentile_00_5 < stats.median < stats.percentile_99_5 <= every.max()
    assert stats.percentile_99_5 > 100  # raw T1 values (0..255), not z-scores
    # Seeded: the same seed gives the same record; JSON round-trips exactly.
    assert fingerprint_dataset(f"msd:{thin_stack}", seed=3) == fp
    assert Fingerprint.from_json(json.dumps(fp.to_json())) == fp


def test_max_cases_takes_evenly_spaced_cases(thin_stack):
    fp = fingerprint_dataset(f"msd:{thin_stack}", max_cases=2)
    assert fp.case_names == ("thin_000", "thin_003")


# --------------------------------------------------------------------------
# (b) near-isotropic real anatomy


def test_isotropic_stack_gets_cubic_kernels_and_pooling(iso_stack):
    fp = fingerprint_dataset(f"msd:{iso_stack}")
    np.testing.assert_allclose(fp.median_spacing(), (2.0, 2.0, 2.0))
    plan = plan_experiment(fp)
    _check_consistent(plan)
    assert not plan.anisotropic and not plan.dummy_2d_augmentation
    assert plan.median_shape == (32, 32, 32)
    # 32 -> 16 -> 8 -> 4: three poolings of every axis, then 4 < 8 stops it.
    assert plan.patch == (32, 32, 32)
    assert plan.strides == ((1, 1, 1),) + ((2, 2, 2),) * 3
    assert plan.kernels == ((3, 3, 3),) * 4
    assert plan.widths == (16, 32, 64, 128)


def test_other_sources_are_fingerprinted_as_served():
    from train.data.synthetic import SyntheticSource

    source = SyntheticSource("train", size=(8, 16, 16), num_cases=3, spacing=(3.0, 1.0, 1.0))
    fp = fingerprint_source(source)
    assert fp.spacings == ((3.0, 1.0, 1.0),) * 3 and fp.shapes == ((8, 16, 16),) * 3
    assert not fp.raw_intensities and fp.modalities == ("MR",)
    assert sum(fp.class_voxels) == 3 * 8 * 16 * 16


# --------------------------------------------------------------------------
# (c) the rules on hand-made fingerprints; expected values derived by hand


def test_topology_of_a_5mm_stack():
    # spacing (5, .8, .8), patch (20, 80, 80):
    # stage 0: depth 5/.8 = 6.25x the finest -> kernel (1,3,3), pool h, w -> (5, 1.6, 1.6), size (20, 40, 40)
    # stage 1: 5/1.6 = 3.1x -> kernel (1,3,3), pool h, w -> (5, 3.2, 3.2), size (20, 20, 20)
    # stage 2: 5/3.2 = 1.56x < 2 -> kernel (3,3,3), pool all -> (10, 6.4, 6.4), size (10, 10, 10)
    # stage 3: pool all again -> size (5, 5, 5); stage 4 is the fifth stage (max_stages) -> stop.
    topo = topology((5.0, 0.8, 0.8), (20, 80, 80), max_stages=5)
    assert topo.strides == ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    assert topo.kernels == ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    assert topo.divisor == (4, 16, 16) and topo.patch == (20, 80, 80)


def test_topology_of_a_2_5mm_stack():
    # spacing (2.5, .8, .8), patch (32, 64, 64):
    # stage 0: 2.5/.8 = 3.1x -> kernel (1,3,3), pool h, w -> (2.5, 1.6, 1.6), size (32, 32, 32)
    # stage 1: 2.5/1.6 = 1.56x -> kernel (3,3,3), pool all -> size 16, then 8, then 4 (stages 2, 3, 4).
    topo = topology((2.5, 0.8, 0.8), (32, 64, 64), max_stages=5)
    assert topo.strides == ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert topo.kernels == ((1, 3, 3),) + ((3, 3, 3),) * 4
    assert topo.divisor == (8, 16, 16)


def test_topology_of_isotropic_data_and_padding():
    # 40 -> 20 -> 10 -> 5: three poolings (5 < 8 stops), so 4 stages, divisor 8.
    topo = topology((1.0, 1.0, 1.0), (40, 40, 40), max_stages=6)
    assert topo.strides == ((1, 1, 1),) + ((2, 2, 2),) * 3 and topo.kernels == ((3, 3, 3),) * 4
    # 36 -> 18 -> 9 -> 5 pools three times too: padded up to 40, the next multiple of 8.
    assert topology((1.0, 1.0, 1.0), (36, 36, 36)).patch == (40, 40, 40)


def test_topology_size_rules():
    # Only depth is >= 8; a lone axis must be >= 12 to be pooled: 10 is not, 12 is (once: 6 < 12 then).
    assert topology((1.0, 1.0, 1.0), (10, 4, 4)).strides == ((1, 1, 1),)
    assert topology((1.0, 1.0, 1.0), (12, 4, 4)).strides == ((1, 1, 1), (2, 1, 1))
    # A coarse axis is pooled when the finer ones are too small to pool (the spacing test looks only at
    # the axes still large enough), but its kernel stays 1 while its spacing is over 2x the finest:
    # (3, 1, 1), size (32, 6, 6): pool depth 32 -> 16 -> 8, kernels (1, 3, 3) at spacings 3, 6 and 12 mm.
    topo = topology((3.0, 1.0, 1.0), (32, 6, 6))
    assert topo.strides == ((1, 1, 1), (2, 1, 1), (2, 1, 1))
    assert topo.kernels == ((1, 3, 3),) * 3


def test_target_spacing_rules():
    depths = [5.0, 4.0, 6.0, 3.0, 5.0]
    spacings = [(d, 0.8, 0.8) for d in depths]
    # Median 5 > 3 x 0.8 but 200 slices are not under 512 / 3: the median stays.
    spacing, _ = target_spacing(spacings, [(200, 512, 512)] * 5)
    assert spacing == (5.0, 0.8, 0.8)
    # 30 slices x 3 < 512: the 10th percentile of (3, 4, 5, 5, 6) is 3 + 0.4 x (4 - 3) = 3.4.
    spacing, note = target_spacing(spacings, [(30, 512, 512)] * 5)
    np.testing.assert_allclose(spacing, (3.4, 0.8, 0.8))
    assert "10th percentile" in note
    # Never finer than the other axes: 10th percentile of (0.5, 0.6, 5, 5, 5) is 0.54 -> 0.8.
    spacing, _ = target_spacing([(d, 0.8, 0.8) for d in (0.5, 0.6, 5, 5, 5)], [(30, 512, 512)] * 5)
    np.testing.assert_allclose(spacing, (0.8, 0.8, 0.8))


def test_patch_shrinks_to_the_budget():
    # 128^3 at 1 mm: the patch starts as the median shape (128^3) and loses 16 (its total stride) from the
    # axis largest relative to the median shape until 2 patches fit 2 x 64^3 voxels: 64^3.
    plan = plan_experiment(_fingerprint((1, 1, 1), (128, 128, 128)), budget_voxels=2 * 64**3)
    _check_consistent(plan)
    assert plan.patch == (64, 64, 64) and plan.batch == 2
    assert plan.widths == (16, 32, 64, 128, 256)
    # A thin stack: the patch keeps the data's aspect, so its depth stays small next to in-plane.
    plan = plan_experiment(_fingerprint((5, 0.8, 0.8), (40, 320, 320)))
    _check_consistent(plan)
    assert plan.kernels[0] == (1, 3, 3) and plan.strides[1] == (1, 2, 2)
    assert plan.dummy_2d_augmentation


def test_batch_grows_within_budget_and_5_percent_of_the_data():
    big = 10 * 128**3  # patch 128^3 (the median shape), the budget holds 10 of them
    # 100 cases: 5% of the data is 5 patches.
    assert plan_experiment(_fingerprint((1, 1, 1), (128,) * 3, n=100), budget_voxels=big).batch == 5
    # 400 cases: 20 by the data, 10 by the budget.
    assert plan_experiment(_fingerprint((1, 1, 1), (128,) * 3, n=400), budget_voxels=big).batch == 10
    # 10 cases: 0.5 -> never below min_batch.
    assert plan_experiment(_fingerprint((1, 1, 1), (128,) * 3, n=10), budget_voxels=big).batch == 2


@pytest.mark.parametrize(
    "counts, expected, why",
    [
        ((1000, 300, 100), "balanced", "3.0x"),  # foreground classes 3x apart, rarest 7%
        ((1000, 300, 200), "none", "1.5x"),  # within 2x
        ((100000, 300, 10), "none", "dominate"),  # the rarest class is 0.01%: weight ~3300
        ((1000, 300), "none", "one foreground class"),
    ],
)
def test_class_weights_rule(counts, expected, why):
    plan = plan_experiment(_fingerprint((1, 1, 1), (32, 32, 32), counts=counts))
    assert plan.class_weights == expected
    assert any(n.startswith("class weights") and why in n for n in plan.notes), plan.notes


def test_plan_json_round_trip_and_keys():
    plan = plan_experiment(_fingerprint((5, 0.8, 0.8), (40, 320, 320)))
    data = json.loads(json.dumps(plan.to_json()))
    for key in ("target_spacing", "patch", "strides", "kernels", "batch", "widths", "median_shape", "anisotropic",
                "dummy_2d_augmentation", "class_weights", "notes"):
        assert key in data
    assert isinstance(data["strides"][0], list)
    assert ExperimentPlan.from_json({**data, "fingerprint": {}}) == plan


# --------------------------------------------------------------------------
# (d) the command


def _run(*args):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "train.plan", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env)


def test_command_prints_and_writes_the_plan(thin_stack, tmp_path):
    out = tmp_path / "plan.json"
    result = _run(f"--dataset=msd:{thin_stack}", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| 0 | 1x1x1 | 1x3x3 |" in result.stdout  # the stem's row: stride, kernel
    assert "spacing (d, h, w) mm" in result.stdout and "class frequencies" in result.stdout
    data = json.loads(out.read_text())
    plan = ExperimentPlan.from_json(data)
    assert plan.kernels[0] == (1, 3, 3)
    assert data["fingerprint"]["spacings"] and data["dataset"] == f"msd:{thin_stack}"


def test_command_reports_a_truncated_file_in_one_line(thin_stack, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(thin_stack, broken)
    victim = broken / "imagesTr" / "thin_002.nii.gz"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    result = _run(f"--dataset=msd:{broken}")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(victim) in lines[0], result.stderr


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dataset=msd:/nonexistent/task"], "dataset.json"),
        (["--dataset=nosuch:thing"], "--dataset"),
        (["--dataset=synthetic", "--budget_voxels", "0"], "--budget_voxels"),
        (["--no_such_flag"], "--no_such_flag"),
        (["--volume", "1,2"], "--volume"),
        (["--pair", "--teacher_factor", "0"], "--teacher_factor"),
        (["--pair", "--volume", "64", "--teacher_factor", "3"], "--teacher_factor"),
        (["--pair", "--max_slice_batch", "0"], "--max_slice_batch"),
    ],
)
def test_command_user_errors_are_one_line(argv, needle, capsys):
    try:
        code = plan_cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def _nan_image(path):
    image = nifti.read_volume(path)
    array = image.array.copy()
    array[0, 0, 0] = np.nan
    nifti.write_volume(array, image.affine, path)


def _4d_image(path):
    image = nifti.read_volume(path)
    nifti.write_volume(np.stack([image.array] * 2, axis=-1), image.affine, path)


@pytest.mark.parametrize(
    "victim, damage",
    [
        ("dataset.json", lambda path: open(path, "w").write('{"labels": ')),
        ("imagesTr/thin_001.nii.gz", _nan_image),
        ("imagesTr/thin_001.nii.gz", _4d_image),
    ],
)
def test_command_names_the_bad_file(thin_stack, tmp_path, capsys, victim, damage):
    broken = tmp_path / "broken"
    shutil.copytree(thin_stack, broken)
    damage(str(broken / victim))
    with pytest.raises(DataError, match=str(broken / victim)):
        fingerprint_dataset(f"msd:{broken}")
    assert plan_cli.main([f"--dataset=msd:{broken}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {broken / victim}"), err
