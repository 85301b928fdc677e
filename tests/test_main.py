"""The CLI: --help, one-line errors naming the flag, and whole runs from 2D sources."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags

from train import config as config_lib
from train import report, tensorboard
from train import run as run_lib


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "train.main", *args], capture_output=True, text=True, timeout=timeout)


def _config(argv):
    """The Config that ``python -m train.main ARGV`` would run (parsed in-process)."""
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["train.main", *argv])
    return config_lib.from_flags(fv)


def _error_line(argv, tmp_path) -> str:
    """Runs the config checks and the run's set-up in-process; returns the one-line error."""
    with pytest.raises(config_lib.ConfigError) as err:
        run_lib.train_and_evaluate(_config([f"--workdir={tmp_path / 'run'}", *argv]))
    line = err.value.line()
    assert "\n" not in line
    return line


def test_help_documents_every_flag():
    proc = _cli("--help", timeout=60)
    assert proc.returncode == 0
    for field in dataclasses.fields(config_lib.Config):
        if field.name not in ("model_options", "explicit"):
            assert f"--{field.name}:" in proc.stdout or f"--[no]{field.name}:" in proc.stdout, field.name
    for name in ("--preset", "--model_option"):
        assert name in proc.stdout


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--steps=abc"], "steps"),
        (["--no_such_flag=1"], "no_such_flag"),
        (["--init=bogus"], "init"),
        (["--mesh=data=3"], "mesh"),  # one CPU device here
        (["--labelled_fraction=0"], "labelled_fraction"),
        (["--eval_mirror_axes=dx"], "eval_mirror_axes"),
        # Reached in the run, after the data is opened: a directory that is not a finished run.
        (["--preset=cpu-tiny", "--init=scratch", "--teacher=tests"], "teacher"),
    ],
)
def test_cli_bad_flag_exits_with_one_line(argv, flag, tmp_path):
    proc = _cli(f"--workdir={tmp_path}", *argv, timeout=120)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: --{flag}: "), lines[0]


def test_a_bad_setting_is_refused_before_jax_is_imported(tmp_path):
    """Checking the settings needs no JAX, so a mistyped flag is answered at once, not after seconds of importing JAX."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['train.main', '--workdir={tmp_path}', '--init=bogus']\n"
        "try:\n"
        "    runpy.run_module('train.main', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('EXIT', e.code, 'jax' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["EXIT", "2", "False"], proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith("error: --init: "), proc.stderr


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--pretrained=missing.pth"], "pretrained"),
        (["--init=scratch", "--pretrained=slices"], "pretrained"),
        (["--preset=nope"], "preset"),
        (["--patch=1,2"], "patch"),
        (["--lr=-1"], "lr"),
        (["--model_option=widths"], "model_option"),
        (["--class_weights=heavy"], "class_weights"),
        (["--class_weights=1,-2,1"], "class_weights"),
        (["--dims=2", "--init=scale"], "dims"),
        (["--dims=3"], "dims"),
        (["--kd_weight=1.5"], "kd_weight"),
        (["--kd_temperature=0"], "kd_temperature"),
        (["--teacher=no/such/run"], "teacher"),
    ],
)
def test_bad_config_names_the_flag(argv, flag, tmp_path):
    with pytest.raises(config_lib.ConfigError) as err:
        _config([f"--workdir={tmp_path}", *argv])
    assert err.value.flag == flag
    assert err.value.line().startswith(f"error: --{flag}: ")


@pytest.mark.parametrize(
    "argv, flag, match",
    [
        (["--patch=64", "--nopad"], "patch", "larger than every"),
        (["--patch=15"], "patch", "multiple"),
        (["--model=nope"], "model", "unknown model"),
        (["--model_option=depth=3"], "model_option", "no option"),
        (["--dataset=msd:no/such/dir"], "dataset", ""),
        (["--remat=bogus"], "remat", ""),
        (["--class_weights=1,2"], "class_weights", "2 weights for 4 classes"),
    ],
)
def test_bad_setup_names_the_flag(argv, flag, match, tmp_path):
    line = _error_line(["--preset=cpu-tiny", "--init=scratch", *argv], tmp_path)
    assert line.startswith(f"error: --{flag}: ") and match in line, line


def _orbax_tree(path, tree):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()


def test_pretrained_that_does_not_fit_names_the_flag(tmp_path):
    _orbax_tree(tmp_path / "other2d", {"encoder": {"kernel": np.zeros((3, 3, 1, 4), np.float32)}})
    line = _error_line(["--preset=cpu-tiny", "--init=scale", f"--pretrained={tmp_path / 'other2d'}"], tmp_path)
    assert line.startswith("error: --pretrained: ") and "other2d" in line, line
    from acsjax.statedict import save_safetensors

    save_safetensors(tmp_path / "w.safetensors", {"conv1.weight": np.zeros((4, 1, 3, 3), np.float32)})
    line = _error_line(["--preset=cpu-tiny", "--init=scale", f"--pretrained={tmp_path / 'w.safetensors'}"], tmp_path)
    assert line.startswith("error: --pretrained: "), line


def test_slices_pretraining_then_reuse_as_a_2d_checkpoint(tmp_path):
    """--init=scale: 2D twin on slices -> inflate -> 3D; then --init=acs from that Orbax 2D checkpoint."""
    first = tmp_path / "scale"
    proc = _cli("--preset=cpu-tiny", "--init=scale", f"--workdir={first}", "--steps=2", "--eval_every=0",
                "--class_weights=balanced")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "slices step" in proc.stdout and "train step" in proc.stdout
    summary = report.read_summary(str(first))
    weights = summary["class_weights"]  # counted on the synthetic training labels
    assert len(weights) == 4 and min(weights) > 0 and weights[0] < min(weights[1:])
    for key in report.REQUIRED:
        assert key in summary, key
    assert summary["init"] == "scale" and summary["pretrained"] == "slices" and summary["steps"] == 2
    assert set(summary["val_dice"]) == {"organ", "vessel", "lesion1"}
    assert 0 <= summary["val_dice_mean"] <= 1 and summary["baseline_threshold_dice"] is not None
    run = json.loads((first / "config.json").read_text())
    assert run["dims"] == 3 and run["patch"] == [16, 16, 16] and run["num_classes"] == 4
    rows = (first / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,dice") and len(rows) == 1 + 2 + 1  # header, 2 steps, final validation
    # TensorBoard: the 3D run in tensorboard/, the 2D slices stage as a second run beside it.
    scalars = tensorboard.read_scalars(first / "tensorboard")
    train_tags = {f"train/{k}" for k in ("loss", "dice", "ce", "dice_loss", "grad_norm", "lr", "voxels_per_s")}
    val_tags = {"val/dice_mean", "val/baseline_threshold_dice", *(f"val/dice/{c}" for c in summary["val_dice"])}
    assert set(scalars) == train_tags | val_tags
    assert [s for s, _ in scalars["train/loss"]] == [1, 2]
    assert scalars["val/dice_mean"] == [(2, pytest.approx(summary["val_dice_mean"], rel=1e-6))]
    assert scalars["val/dice/organ"] == [(2, pytest.approx(summary["val_dice"]["organ"], rel=1e-6))]
    overlays = [(e.step, v.image.encoded_image_string) for e in tensorboard.read_events(first / "tensorboard")
                for v in e.summary.value if v.tag == "val/overlay"]
    assert overlays == [(2, (first / report.FIGURE).read_bytes())]
    slices = tensorboard.read_scalars(first / "tensorboard" / "slices")
    assert set(slices) == train_tags and [s for s, _ in slices["train/loss"]] == [1, 2, 3]

    # --init=acs from the saved 2D checkpoint: the ACS model starts from the
    # 2D kernels as they are, and AdamW's first step moves each entry by at
    # most lr (1e-2) plus decay, far less than a random initialisation differs.
    from acsjax.trees import flatten
    from train.checkpoint import load_arrays

    tree2d = flatten(ocp.StandardCheckpointer().restore((first / "slices2d").absolute()))
    second = tmp_path / "acs"
    config = _config(["--preset=cpu-tiny", "--init=acs", f"--pretrained={first / 'slices2d'}",
                      f"--workdir={second}", "--steps=1", "--eval_every=0"])
    summary = run_lib.train_and_evaluate(config)
    assert summary["init"] == "acs" and summary["pretrained"] == str(first / "slices2d")
    assert not (second / "slices2d").exists()  # the given 2D checkpoint was used, not retrained
    _, state = load_arrays(second / "checkpoints")
    params = {k.removesuffix("/value"): v for k, v in flatten(state["params"]).items()}
    assert params and set(params) <= set(tree2d)
    for name, value in params.items():
        np.testing.assert_allclose(value, tree2d[name], rtol=0, atol=1.01e-2, err_msg=name)


@pytest.mark.slow
def test_default_demo_beats_the_threshold_within_ten_minutes(tmp_path):
    """``python -m train.main --init=scale`` alone: the MNI152 demo, start to finish."""
    proc = _cli("--init=scale", f"--workdir={tmp_path}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = report.read_summary(str(tmp_path))
    assert summary["wall_s"] < 600, summary["wall_s"]
    assert summary["val_dice_mean"] >= 0.80, summary["val_dice_mean"]
    assert summary["val_dice_mean"] > summary["baseline_threshold_dice"]
