"""Checkpoints: keep policy, fallback from a damaged newest step, kill-and-resume, NaN stop."""

import glob
import os
import random
import signal
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import run, tensorboard, trainer
from train.checkpoint import CheckpointError, CheckpointFallbackWarning, Checkpoints, load_arrays
from train.checkpoint_score import pick_step, score_of
from train.config import preset


def _iterator():
    return iter(grain.MapDataset.range(1000).batch(2).to_iter_dataset())


def _abstract(state):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def _save_steps(directory, steps, *, keep=5, dice=None):
    """Saves a small state after each of ``steps`` (one batch drawn per step)."""
    dice = dice or {}
    iterator = _iterator()
    state = {"w": jnp.arange(500.0), "step": jnp.array(0)}
    with Checkpoints(directory, keep=keep) as checkpoints:
        for step in steps:
            next(iterator)
            state = {"w": jnp.arange(500.0) + step, "step": jnp.array(step)}
            checkpoints.save(step, state, iterator, score=dice.get(step))
    return state


def _damage(path, how):
    files = sorted(glob.glob(os.path.join(path, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
    if how == "truncate":
        os.truncate(files[-1], os.path.getsize(files[-1]) // 2)
    else:  # same size, different bytes: only the checksum notices
        with open(files[-1], "r+b") as f:
            f.seek(os.path.getsize(files[-1]) // 3)
            f.write(bytes(random.Random(0).randrange(256) for _ in range(64)))


@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, how):
    directory = tmp_path / "checkpoints"
    state = _save_steps(directory, [1, 2, 3])
    _damage(directory / "3", how)
    iterator = _iterator()
    checkpoints = Checkpoints(directory, keep=5)
    with pytest.warns(CheckpointFallbackWarning, match="step 3 .* unreadable"):
        step, restored = checkpoints.restore_latest(_abstract(state), iterator)
    assert step == 2
    np.testing.assert_array_equal(restored["w"], np.arange(500.0) + 2)
    np.testing.assert_array_equal(next(iterator), [4, 5])  # the data position of step 2
    assert (tmp_path / "checkpoints_corrupt" / "3").is_dir()
    # the step number is free again for the resumed run
    assert checkpoints.save(3, restored, iterator)
    checkpoints.close()
    assert Checkpoints(directory).steps == [1, 2, 3]


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    directory = tmp_path / "checkpoints"
    state = _save_steps(directory, [1])
    _damage(directory / "1", "truncate")
    with pytest.warns(CheckpointFallbackWarning), pytest.raises(CheckpointError, match="no readable checkpoint"):
        Checkpoints(directory).restore_latest(_abstract(state))


def test_keeps_the_last_n_and_the_best(tmp_path):
    directory = tmp_path / "checkpoints"
    _save_steps(directory, [1, 2, 3, 4, 5], keep=2, dice={2: 0.9, 4: 0.5})
    checkpoints = Checkpoints(directory, keep=2)
    assert checkpoints.steps == [2, 4, 5]
    assert checkpoints.best_step() == 2
    step, tree = load_arrays(directory, "best")
    assert step == 2
    np.testing.assert_array_equal(tree["w"], np.arange(500.0) + 2)


def test_score_of_reads_the_task_score_and_the_older_dice_key():
    assert score_of({"val_score": 0.7}) == 0.7  # a classification run's score, not a Dice
    assert score_of({"val_dice_mean": 0.6}) == 0.6  # checkpoints written before the key was val_score
    assert score_of({"val_score": None}) == -np.inf  # saved between validations
    assert score_of(None) == -np.inf


class _Manager:
    """The part of an Orbax CheckpointManager that pick_step reads: steps and their recorded metrics."""

    directory = "run/checkpoints"

    def __init__(self, metrics):
        self._metrics = metrics

    def all_steps(self):
        return list(self._metrics)

    def metadata(self, step):
        if self._metrics[step] == "unreadable":
            raise OSError("damaged metadata")
        return type("Metadata", (), {"metrics": self._metrics[step]})


def test_pick_step_best_else_newest():
    validated = _Manager({1: {"val_score": None}, 2: {"val_score": 0.9}, 3: {"val_score": 0.5}, 4: {"val_score": None}})
    assert pick_step(validated, "best") == 2
    assert pick_step(validated, "latest") == 4
    assert pick_step(validated, 3) == 3
    # nothing validated, metrics never recorded, or unreadable: 'best' is the newest step (Orbax would say None)
    assert pick_step(_Manager({1: {"val_score": None}, 5: {"val_score": None}}), "best") == 5
    assert pick_step(_Manager({1: None, 5: None}), "best") == 5
    assert pick_step(_Manager({1: {"val_dice_mean": 0.4}, 5: "unreadable"}), "best") == 1
    assert pick_step(_Manager({2: {"val_score": 0.7}, 7: {"val_score": 0.7}}), "best") == 7  # a tie: the newer
    with pytest.raises(LookupError, match=r"run/checkpoints: no step 9; saved steps: \[1, 5\]"):
        pick_step(_Manager({1: None, 5: None}), 9)
    with pytest.raises(LookupError, match="run/checkpoints: no checkpoint found"):
        pick_step(_Manager({}), "best")


def test_predict_picks_the_best_step_without_grain():
    # train.predict reads the recorded score through train.checkpoint_score, not train.checkpoint (which needs grain).
    code = "import sys; sys.modules['grain'] = None; import train.predict"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


TINY = ["--preset=cpu-tiny", "--init=scratch", "--steps=12", "--checkpoint_every=1", "--eval_every=0",
        "--log_every=1", "--keep_checkpoints=3"]


def _cli(workdir, *extra):
    return [sys.executable, "-m", "train.main", f"--workdir={workdir}", *TINY, *extra]


def _committed_steps(directory):
    # Orbax writes a step under a temporary name and renames it to the bare step number when it is complete.
    return [p for p in directory.glob("*") if p.name.isdigit()] if directory.is_dir() else []


@pytest.mark.slow  # a whole run (or several compiles); `pytest -m slow` runs it
def test_sigkill_at_a_drawn_step_then_resume_is_bit_identical(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cli(whole), check=True, capture_output=True, timeout=300)

    # Seeded so that a failure can be replayed: KILL_SEED=N pytest ... draws the same step.
    seed = int(os.environ.get("KILL_SEED", "0"))
    kill_at = random.Random(seed).randint(2, 8)
    killed_at = None
    proc = subprocess.Popen(_cli(killed), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        # Kill at kill_at or, when the asynchronous save of the first steps is
        # still in flight then (a slow machine), at the first step after one has
        # been committed: with nothing committed there is nothing to resume.
        step = line.split()[2].split("/")[0] if line.startswith("train step") else ""
        if step.isdigit() and int(step) >= kill_at and _committed_steps(killed / "checkpoints"):
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = int(step)
            break
    proc.wait(timeout=60)
    where = f"KILL_SEED={seed}: drew step {kill_at}, killed after step {killed_at}"
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill ({where})"
    assert not (killed / "summary.json").exists(), where

    rerun = subprocess.run(_cli(killed), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, f"{where}\n{rerun.stderr[-2000:]}"
    assert "resuming from step" in rerun.stdout, f"{where}\n{rerun.stdout}"
    step_a, a = load_arrays(whole / "checkpoints")
    step_b, b = load_arrays(killed / "checkpoints")
    assert step_a == step_b == 12, where
    # Bit-identical on CPU: the same programs on the same inputs, the data
    # position restored exactly, and no float32 state lost in the checkpoint.
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y, err_msg=where), a, b)
    # TensorBoard shows each step once: the replayed steps replace the killed run's.
    whole_loss = tensorboard.read_scalars(whole / "tensorboard")["train/loss"]
    killed_loss = tensorboard.read_scalars(killed / "tensorboard")["train/loss"]
    assert [s for s, _ in killed_loss] == list(range(1, 13))
    assert killed_loss == whole_loss


@pytest.mark.slow  # a whole run (or several compiles); `pytest -m slow` runs it
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = trainer.train_step

    def poisoned(task, state, batch):
        new, metrics = original(task, state, batch)
        bad = state["step"] >= 3  # from the 4th step on
        metrics = dict(metrics, loss=jnp.where(bad, jnp.nan, metrics["loss"]))
        new = dict(new, params=jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new["params"]))
        return new, metrics

    monkeypatch.setattr(trainer, "train_step", poisoned)
    config = preset("cpu-tiny", init="scratch", workdir=str(tmp_path), steps=6, checkpoint_every=2, eval_every=0)
    with pytest.raises(trainer.NonFiniteLoss, match=r"at step 4.*Last good checkpoint: step 2"):
        run.train_and_evaluate(config)
    step, tree = load_arrays(tmp_path / "checkpoints")
    assert step == 2
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree["params"]))
    assert not (tmp_path / "summary.json").exists()
    assert Checkpoints(tmp_path / "checkpoints").steps == [2]
