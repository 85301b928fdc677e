"""Every command ends a user error with ONE line ``error: ...`` naming the file or flag, never a traceback.

The commands run as subprocesses with their default flags (only the paths
point into tmp_path), so the error has to get through whatever stage meets
it first: opening the data set, counting the class weights, reading the input.
Each bad file sits in a training case: the default preset's balanced class
weights read those before anything is compiled.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from train import cli
from train.data import nifti
from train.data.sources import MSDSource

SHAPE = (12, 10, 8)  # file axes (x, y, z)
AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(module, *args, tmp_path, timeout=120):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=tmp_path)


def _assert_one_line(proc, *needles):
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert str(needle) in lines[-1], (needle, lines[-1])
    return lines[-1]


def _msd(root, n=3):
    """A valid MSD task folder: ``n`` one-channel training cases, classes 0..2."""
    rng = np.random.default_rng(0)
    training = []
    for i in range(n):
        image = rng.normal(100.0, 10.0, SHAPE).astype(np.float32)
        nifti.write_file(image, AFFINE, f"{root}/imagesTr/c{i}.nii.gz")
        nifti.write_file(rng.integers(0, 3, SHAPE).astype(np.uint8), AFFINE, f"{root}/labelsTr/c{i}.nii.gz")
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    meta = {"name": "Toy", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
            "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _spoil(root, problem) -> str:
    """Breaks one training case (or dataset.json) of the MSD folder; returns the path an error must name."""
    case = MSDSource(str(root), "train").cases[0]
    if problem == "truncated":
        blob = open(case.images[0], "rb").read()
        open(case.images[0], "wb").write(blob[: len(blob) // 2])
        return case.images[0]
    if problem == "4d":
        nifti.write_file(np.ones(SHAPE + (2,), np.float32), AFFINE, case.images[0])
        return case.images[0]
    if problem == "label_shape":
        nifti.write_file(np.zeros(SHAPE[:2] + (SHAPE[2] - 1,), np.uint8), AFFINE, case.label)
        return case.label
    if problem == "label_values":
        label = np.zeros(SHAPE, np.uint8)
        label[2, 2, 2] = 5
        nifti.write_file(label, AFFINE, case.label)
        return case.label
    assert problem == "not_json"
    (root / "dataset.json").write_text("{not json")
    return root / "dataset.json"


@pytest.mark.parametrize("problem", ["truncated", "4d", "label_shape", "label_values", "not_json"])
def test_train_main_bad_dataset_is_one_line(tmp_path, problem):
    root = _msd(tmp_path / "task")
    path = _spoil(root, problem)
    proc = _command("train.main", f"--dataset=msd:{root}", f"--workdir={tmp_path / 'run'}",
                    f"--cache_dir={tmp_path / 'cache'}", tmp_path=tmp_path)
    _assert_one_line(proc, path)
    assert proc.returncode == (cli.USAGE_STATUS if problem == "not_json" else cli.ERROR_STATUS)


def _run_dir(tmp_path):
    """A run directory holding only the config.json a run of the cpu-tiny preset writes (no checkpoint yet)."""
    from train import config as config_lib
    from train.data.synthetic import SyntheticSource

    workdir = tmp_path / "run"
    workdir.mkdir()
    config = config_lib.preset("cpu-tiny", workdir=str(workdir))
    config_lib.write_run_config(workdir / "config.json", config, SyntheticSource("train"))
    return workdir


def test_predict_bad_input_and_empty_workdir(tmp_path):
    workdir = _run_dir(tmp_path)
    bad = tmp_path / "scan.nii.gz"
    nifti.write_file(np.ones(SHAPE, np.float32), AFFINE, bad)
    bad.write_bytes(bad.read_bytes()[:40])
    out = tmp_path / "seg.nii.gz"
    proc = _command("train.predict", f"--workdir={workdir}", f"--input={bad}", f"--output={out}", tmp_path=tmp_path)
    _assert_one_line(proc, bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _command("train.predict", f"--workdir={empty}", f"--input={bad}", f"--output={out}", tmp_path=tmp_path)
    _assert_one_line(proc, empty / "config.json", "not found")
    assert not out.exists()


@pytest.mark.parametrize(
    "module, args, needle",
    [
        ("train.predict", ["--workdir=w", "--input=i.nii.gz", "--output=o.nii.gz", "--overlap=half"], "--overlap"),
        ("train.compare", ["--seeds=0,one"], "--seeds"),
        ("train.compare", ["--preset=nope"], "--preset"),
        ("train.bench", ["conv", "--repeats=many"], "--repeats"),
        ("train.bench", ["memory", "--devices=1,two"], "--devices"),
        ("train.plan", ["--batch=x"], "--batch"),
    ],
)
def test_bad_flag_value_is_one_line(tmp_path, module, args, needle):
    proc = _command(module, *args, tmp_path=tmp_path)
    _assert_one_line(proc, needle)
    assert proc.returncode == cli.USAGE_STATUS
    assert not list((tmp_path).glob("runs"))  # nothing was started


def test_entry_point_keeps_tracebacks_for_bugs(capsys):
    from train.data.nifti import DataError

    @cli.entry_point
    def main(kind):
        if kind == "data":
            raise DataError("scan.nii.gz: not a readable NIfTI file (junk)\nsecond line")
        if kind == "file":
            open("/nonexistent-dir/x")
        if kind == "bug":
            raise KeyError("a bug")
        return None

    assert main("ok") == 0
    assert main("data") == cli.ERROR_STATUS
    assert capsys.readouterr().err == "error: scan.nii.gz: not a readable NIfTI file (junk)\n"
    assert main("file") == cli.ERROR_STATUS
    assert capsys.readouterr().err == "error: /nonexistent-dir/x: No such file or directory\n"
    with pytest.raises(KeyError):
        main("bug")


def test_workdir_of_another_model_is_refused_before_anything_is_overwritten(tmp_path):
    from train import config as config_lib
    from train.data.synthetic import SyntheticSource

    workdir = _run_dir(tmp_path)
    path = workdir / "config.json"
    before = path.read_text()
    other = config_lib.preset("cpu-tiny", workdir=str(workdir), model_options={"widths": (4, 8, 16)})
    config_lib.write_run_config(path, other, SyntheticSource("train"))  # no checkpoints yet: a fresh start
    path.write_text(before)
    (workdir / "checkpoints" / "2").mkdir(parents=True)
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.write_run_config(path, other, SyntheticSource("train"))
    line = cli.one_line(err.value)
    assert line.startswith(f"error: --workdir: {workdir} holds checkpoints of another model (model_options"), line
    assert path.read_text() == before
    same = config_lib.preset("cpu-tiny", workdir=str(workdir), steps=12)  # resuming with other settings is fine
    config_lib.write_run_config(path, same, SyntheticSource("train"))
