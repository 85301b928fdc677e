"""Distillation in the app: --dims=2, --teacher, --kd_weight/--kd_temperature, --labelled_fraction.

One chain of tiny runs shares the compilations: a 3D teacher at 2 mm, a 2D
student at 1 mm taught by it with half the labels, then a 3D student taught
by that 2D run (the reverse direction).
"""

import csv
import hashlib
import shutil

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import optax
import pytest

from train import config as config_lib
from train import distill, losses, predict, tasks, trainer
from train import run as run_lib
from train.data.pipeline import Augment, Augmenter, PatchSampler
from train.data.synthetic import SyntheticSource


def _tiny(workdir, **overrides):
    return config_lib.preset("cpu-tiny", workdir=str(workdir), eval_every=0, max_eval_cases=1, **overrides)


def _tree_digest(root):
    digest = hashlib.sha1()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    workdir = root / "teacher3d"
    run_lib.train_and_evaluate(_tiny(workdir, init="scratch", steps=2, spacing=(2.0, 2.0, 2.0)))
    return workdir


@pytest.fixture(scope="module")
def student_2d(teacher_run):
    before = _tree_digest(teacher_run / "checkpoints")
    workdir = teacher_run.parent / "student2d"
    summary = run_lib.train_and_evaluate(_tiny(
        workdir, init="scratch", dims="2", steps=3, spacing=(1.0, 1.0, 1.0), teacher=str(teacher_run),
        kd_weight=0.25, kd_temperature=2.0, labelled_fraction=0.5,
    ))
    return workdir, summary, before


def test_a_2d_student_learns_from_a_3d_teacher_on_another_grid(teacher_run, student_2d):
    workdir, summary, teacher_before = student_2d
    assert summary["dims"] == 2 and summary["kd_weight"] == 0.25 and summary["kd_temperature"] == 2.0
    assert summary["teacher"]["dims"] == 3 and summary["teacher"]["spacing"] == [2.0, 2.0, 2.0]
    assert summary["labelled_fraction"] == 0.5 and summary["labelled_cases"] == 4 and summary["training_cases"] == 8
    assert 0 <= summary["val_dice_mean"] <= 1
    # The teacher is frozen: its checkpoints are byte for byte what they were.
    assert _tree_digest(teacher_run / "checkpoints") == teacher_before
    # metrics.csv logs the two terms of the loss apart.
    rows = list(csv.DictReader(open(workdir / "metrics.csv")))
    steps = [r for r in rows if r["loss"]]
    assert len(steps) == 3 and all(float(r["distill"]) > 0 for r in steps)
    assert all(np.isfinite(float(r["supervised"])) for r in steps)
    # The cached logits are the teacher's on each case, and cover the case's field of view.
    cached = sorted((workdir / distill.TEACHER_DIR).glob("*.npy"))
    assert len(cached) == 8
    source = SyntheticSource("train", spacing=(1.0, 1.0, 1.0))  # the cpu-tiny data set
    teacher = distill.load_teacher(str(teacher_run), num_classes=4, num_channels=1)
    fresh = teacher.logits(source[0])
    saved = np.load(workdir / distill.TEACHER_DIR / f"{source[0]['name']}.npy")
    assert saved.shape == source[0]["image"].shape[:3] + (4,) and np.isfinite(saved).all()
    np.testing.assert_allclose(saved.astype(np.float32), fresh, atol=2e-2)
    # The 2D run predicts whole volumes slice by slice onto the input's grid.
    case = source[1]
    affine = np.diag([1.0, 1.0, 1.0, 1.0])[[2, 1, 0, 3]]  # (d, h, w) stored as (x, y, z) = (w, h, d)
    image = np.transpose(case["image"][..., 0], (2, 1, 0))
    path = workdir / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(path))
    out = workdir / "case_seg.nii.gz"
    info = predict.predict_file(str(workdir), str(path), str(out))
    written = nib.load(str(out))
    assert written.shape == image.shape and np.allclose(written.affine, affine) and info["step"] == 3


@pytest.mark.slow  # a whole run (or several compiles); `pytest -m slow` runs it
def test_the_reverse_direction_a_3d_student_from_a_2d_teacher(student_2d):
    workdir, _, _ = student_2d
    reverse = workdir.parent / "student3d"
    summary = run_lib.train_and_evaluate(_tiny(reverse, init="scratch", steps=2, spacing=(2.0, 2.0, 2.0),
                                               teacher=str(workdir)))
    assert summary["dims"] == 3 and summary["teacher"]["dims"] == 2 and summary["labelled_cases"] == 8
    header = (reverse / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "supervised" in header and "distill" in header


def test_a_teacher_that_does_not_fit_is_one_line_naming_the_flag(teacher_run, tmp_path):
    def refused(workdir, **kw):
        with pytest.raises(config_lib.ConfigError) as err:
            distill.load_teacher(str(workdir), num_classes=kw.get("classes", 4), num_channels=kw.get("channels", 1))
        assert err.value.flag == "teacher" and "\n" not in err.value.line()
        return str(err.value)

    unfinished = tmp_path / "unfinished"
    shutil.copytree(teacher_run, unfinished)
    (unfinished / "summary.json").unlink()
    assert "not a finished run" in refused(unfinished)
    assert "3 (" in refused(teacher_run, classes=3) or "the data set has 3" in refused(teacher_run, classes=3)
    assert "input channel" in refused(teacher_run, channels=2)
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.preset("cpu-tiny", teacher=str(tmp_path / "nothing"))
    assert err.value.flag == "teacher"


def test_the_step_weighs_supervision_and_distillation_and_ignores_hidden_labels():
    """loss = (1 - a) x (Dice + CE over labelled examples) + a x T^2 KL over valid voxels."""
    from acsjax.models import build_model
    from flax import nnx

    mesh = trainer.make_mesh("")
    build = lambda rngs: build_model("unet", dims=2, in_channels=1, num_classes=3, rngs=rngs, widths=(4, 8))  # noqa: E731
    tx = optax.sgd(0.0)
    kd = trainer.Distill(weight=0.3, temperature=2.0)
    task = trainer.make_task(build, tx, optax.constant_schedule(0.0), 3, mesh, 0, None, tasks.SEGMENTATION, kd)
    state = task.init()
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    teacher[1, :2] = np.nan  # no teacher data on two rows of the second example
    batch = {"image": rng.normal(size=(2, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 3, (2, 8, 8)).astype(np.int32),
             "teacher": teacher, "labelled": np.array([1.0, 0.0], np.float32)}
    step = trainer.make_step(task)
    _, metrics = step(jax.tree.map(jnp.copy, state), trainer.shard_batch(batch, mesh, distill=True))
    model = nnx.merge(task.graphdef, state["params"], state["model_state"])
    logits = model(jnp.asarray(batch["image"]))
    supervised, _ = losses.segmentation_loss(logits[:1], jnp.asarray(batch["label"][:1]), 3)
    valid = np.isfinite(teacher).all(-1)
    kl = losses.distillation_loss(logits, jnp.asarray(np.nan_to_num(teacher)), temperature=2.0, mask=jnp.asarray(valid))
    np.testing.assert_allclose(metrics["supervised"], supervised, rtol=1e-5)
    np.testing.assert_allclose(metrics["distill"], kl, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], 0.7 * supervised + 0.3 * kl, rtol=1e-5)
    # The unlabelled example's labels do not enter the loss.
    other = dict(batch, label=batch["label"].copy())
    other["label"][1] = (other["label"][1] + 1) % 3
    _, again = step(jax.tree.map(jnp.copy, state), trainer.shard_batch(other, mesh, distill=True))
    np.testing.assert_allclose(again["loss"], metrics["loss"], rtol=1e-6)


def test_teacher_logits_move_with_the_patch_and_its_augmentation():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(6, 10, 10, 1)).astype(np.float32)
    case = {"image": image, "label": (image[..., 0] > 0).astype(np.int32),
            "teacher": np.concatenate([image, -image], -1).astype(np.float16), "labelled": 0.0}
    sampler, augment = PatchSampler((4, 8, 8), 0.0), Augmenter(Augment(flip=True, rotate=True, scale=None,
                                                                       shift=None, gamma=None))
    for seed in range(6):
        sample = augment.random_map(sampler.random_map(case, np.random.default_rng(seed)), np.random.default_rng(seed))
        teacher, img = sample["teacher"], sample["image"]
        inside = np.isfinite(teacher[..., 0])
        np.testing.assert_allclose(teacher[..., 0][inside], img[..., 0][inside], atol=1e-2)
        assert sample["labelled"] == 0.0
    padded = PatchSampler((8, 12, 12), 0.0).random_map(case, np.random.default_rng(0))
    assert np.isnan(padded["teacher"]).any()  # padding has no teacher data


def test_teacher_grid_tiles_the_case_extent():
    affine = np.array([[0.0, 0, 1.5, 10], [0, 2.0, 0, -4], [3.0, 0, 0, 7], [0, 0, 0, 1]])
    shape, grid = distill.teacher_grid((10, 12, 9), affine, (3.0, 2.0, 1.5), (6.0, 4.0, 4.5))
    assert shape == (5, 6, 3)
    # First coarse centre: the mean of the first f fine centres; spacing = target.
    first = (affine @ np.array([0.5, 0.5, 1.0, 1.0]))[:3]
    np.testing.assert_allclose(grid[:3, 3], first)
    np.testing.assert_allclose(np.linalg.norm(grid[:3, :3], axis=0), [6.0, 4.0, 4.5])
