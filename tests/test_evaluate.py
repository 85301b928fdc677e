"""Tests for train.evaluate, train.report and train.predict."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import acsjax.models
from acsjax.models import build_model
from train import evaluate as ev
from train import predict, report
from train.data import nifti

CLASSES = ("background", "inner", "outer")


class BandNet(nnx.Module):
    """A pointwise 'network' whose logits pick intensity bands: class c where x is near level c.

    ``shift`` is a batch statistic, so a checkpoint must restore model_state too.
    """

    def __init__(self, *, dims=3, in_channels=1, num_classes=3, levels=(0.0, 1.0, 2.0), rngs: nnx.Rngs):
        del dims, rngs
        self.levels = nnx.Param(jnp.asarray(levels[:num_classes], jnp.float32))
        self.shift = nnx.BatchStat(jnp.zeros((), jnp.float32))
        self.in_channels = in_channels

    def __call__(self, x):
        return -20.0 * (x[..., :1] - self.shift[...] - self.levels[...]) ** 2


class NoisyNet(nnx.Module):
    """Pointwise, with dropout and BatchNorm: only deterministic in eval mode."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(1, 3, rngs=rngs)
        self.norm = nnx.BatchNorm(3, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.norm(self.linear(x)))


class FakeSource:
    """Cases whose intensity is the label plus a little noise: a band rule segments them."""

    class_names = CLASSES
    num_classes = 3
    num_channels = 1

    def __init__(self, shapes=((9, 12, 10), (7, 11, 13))):
        self.cases = []
        rng = np.random.default_rng(0)
        for i, shape in enumerate(shapes):
            grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
            r = np.linalg.norm(grid, axis=-1)
            label = np.where(r < 0.4, 1, np.where(r < 0.8, 2, 0)).astype(np.int32)
            image = (label + rng.normal(0, 0.05, shape)).astype(np.float32)[..., None]
            self.cases.append({"image": image, "label": label, "name": f"case{i}", "spacing": np.ones(3),
                               "affine": np.eye(4)})

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, i):
        return dict(self.cases[i])


# --------------------------------------------------------------------------
# evaluate


def test_evaluate_perfect_model_and_baseline():
    src = FakeSource()
    result = ev.evaluate(BandNet(rngs=nnx.Rngs(0)), src, patch=(8, 8, 8), num_classes=3, keep_predictions=1)
    assert result["class_names"] == list(CLASSES)
    assert set(result["val_dice"]) == {"inner", "outer"}
    np.testing.assert_allclose(list(result["val_dice"].values()), 1.0)
    assert result["val_dice_mean"] == pytest.approx(1.0)
    assert [c["name"] for c in result["cases"]] == ["case0", "case1"]
    # A global band rule nearly separates these cases too (its thresholds lie on a quantile grid).
    assert 0.9 < result["baseline_threshold_dice"] <= 1.0
    assert len(result["baseline_threshold"]["thresholds"]) == 2
    assert len(result["predictions"]) == 1
    np.testing.assert_array_equal(result["predictions"][0], src[0]["label"])
    json.dumps({k: v for k, v in result.items() if k != "predictions"})  # JSON-ready
    assert "threshold baseline" in ev.dice_table(result)


def test_evaluate_wrong_model_scores_per_class():
    """A model that never predicts 'inner' and calls all foreground 'outer'."""
    src = FakeSource()
    model = BandNet(levels=(0.0, 10.0, 1.5), rngs=nnx.Rngs(0))  # x~1 and x~2 are both nearest to 1.5
    result = ev.evaluate(model, src, patch=(8, 8, 8), num_classes=3, baseline=False, max_cases=1)
    assert result["num_cases"] == 1 and result["baseline_threshold_dice"] is None
    dice = result["cases"][0]["dice"]
    assert dice["inner"] == pytest.approx(0.0)
    label = src[0]["label"]
    pred = np.where(label > 0, 2, 0)
    want = 2 * np.sum((pred == 2) & (label == 2)) / (np.sum(pred == 2) + np.sum(label == 2))
    assert dice["outer"] == pytest.approx(want)
    assert result["val_dice_mean"] == pytest.approx(want / 2)


def test_eval_mode_copy_leaves_model_alone():
    model = NoisyNet(nnx.Rngs(0))
    model.norm.mean[...] = jnp.array([0.5, -0.5, 0.0])
    model.norm.var[...] = jnp.array([2.0, 1.0, 0.5])
    image = np.random.default_rng(1).normal(size=(5, 6, 7, 1)).astype(np.float32)
    p1 = ev.predict_probabilities(model, image, patch=(4, 4, 4))
    p2 = ev.predict_probabilities(model, image, patch=(4, 4, 4))
    np.testing.assert_array_equal(p1, p2)
    assert model.drop.deterministic is False and model.norm.use_running_average is False
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    np.testing.assert_allclose(p1, np.asarray(jax.nn.softmax(copy(jnp.asarray(image[None]))[0])), atol=1e-5)


def _unet(dims):
    """A small U-Net with random weights, built abstractly: eager random init compiles slowly on CPU."""
    abstract = nnx.eval_shape(
        lambda: build_model("unet", dims=dims, in_channels=1, num_classes=3, rngs=nnx.Rngs(0), widths=(4, 8))
    )
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.3, a.shape).astype(a.dtype)), state)
    return nnx.merge(graphdef, state)


def test_real_unet_compiles_once_and_2d_slicewise():
    src = FakeSource(shapes=((9, 12, 10), (9, 12, 10)))
    model = _unet(3)
    before = ev._infer._cache_size()
    first = ev.evaluate(model, src, patch=(8, 8, 8), num_classes=3, baseline=False, keep_predictions=None)
    # A training loop validates a fresh module object each time (merged from its state).
    second = ev.evaluate(nnx.merge(*nnx.split(model)), src, patch=(8, 8, 8), num_classes=3, baseline=False)
    assert ev._infer._cache_size() == before + 1  # two validations, two cases each, one program
    assert first["val_dice"] == second["val_dice"]
    assert [p.shape for p in first["predictions"]] == [(9, 12, 10)] * 2

    model2d = _unet(2)
    labels = ev.predict_labels(model2d, src[0]["image"], patch=(8, 8), mirror=True)
    assert labels.shape == (9, 12, 10) and labels.dtype == np.int32


def test_evaluate_errors():
    src = FakeSource()
    with pytest.raises(ValueError, match="class_names"):
        ev.evaluate(BandNet(rngs=nnx.Rngs(0)), src, patch=(8, 8, 8), num_classes=4)
    with pytest.raises(ValueError, match="patch"):
        ev.predict_probabilities(BandNet(rngs=nnx.Rngs(0)), src[0]["image"], patch=(8,))
    assert ev.threshold_baseline([src[0]["image"]], [src[0]["label"]], 5) is None


# --------------------------------------------------------------------------
# report


def test_summary_json_is_stable_and_checked(tmp_path):
    evaluation = {"val_dice": {"inner": np.float32(0.5), "outer": 0.75}, "val_dice_mean": 0.625,
                  "baseline_threshold_dice": 0.5, "cases": [{"name": "a"}], "class_names": list(CLASSES),
                  "num_cases": 1, "predictions": [np.zeros(3)]}
    summary = report.summary_from_evaluation(evaluation, init="scale", pretrained="slices", steps=np.int64(10),
                                             wall_s=1.5, extra=float("nan"), shape=jnp.array([2, 3]))
    assert "predictions" not in summary and summary["val_cases"] == [{"name": "a"}]
    assert summary["val_dice_minus_baseline"] == pytest.approx(0.125)
    path = report.write_summary(str(tmp_path), summary)
    text = open(path).read()
    keys = list(json.loads(text))
    assert keys == sorted(keys)
    assert report.read_summary(str(tmp_path))["extra"] is None  # NaN is not JSON
    assert report.read_summary(str(tmp_path))["steps"] == 10
    assert report.read_summary(str(tmp_path))["shape"] == [2, 3]
    report.write_summary(str(tmp_path), dict(reversed(list(summary.items()))))
    assert open(path).read() == text  # same content, same bytes
    with pytest.raises(ValueError, match="summary.json.*wall_s"):
        report.write_summary(str(tmp_path), {k: v for k, v in summary.items() if k != "wall_s"})
    with pytest.raises(FileNotFoundError, match="summary.json"):
        report.read_summary(str(tmp_path / "nope"))


def test_plot_case_and_focus_point(tmp_path):
    src = FakeSource()
    case = src[1]
    label = case["label"]
    assert report.focus_point(label) == tuple(int(np.argmax((label > 0).sum(axis=tuple(j for j in range(3) if j != a))))
                                              for a in range(3))
    assert report.focus_point(np.zeros((4, 6, 8), int)) == (2, 3, 4)
    pred = np.roll(label, 1, axis=2)
    path = report.plot_case(str(tmp_path / "fig.png"), case["image"], label, pred, class_names=CLASSES,
                            dice={"inner": 0.8, "outer": 0.9}, name="case1", spacing=(2.0, 1.0, 1.0))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="differ"):
        report.plot_case(str(tmp_path / "bad.png"), case["image"], label[1:], pred, class_names=CLASSES)
    evaluation = ev.evaluate(BandNet(rngs=nnx.Rngs(0)), src, patch=(8, 8, 8), num_classes=3, baseline=False,
                             keep_predictions=1)
    out = report.plot_evaluation(str(tmp_path), evaluation, src, title="test")
    assert out.endswith(report.FIGURE)
    with pytest.raises(ValueError, match="keep_predictions=2"):
        report.plot_evaluation(str(tmp_path), evaluation, src, index=1)


# --------------------------------------------------------------------------
# predict


def _make_run(tmp_path, monkeypatch, *, spacing=None, shift=0.6, steps=((7, 0.9),)):
    """A run directory with config.json and checkpoints of a BandNet (shift restored from model_state).

    ``steps``: (step, validation Dice or None); the checkpoint of step s has shift ``shift + s - 7``.
    """
    from train.checkpoint import Checkpoints

    monkeypatch.setitem(acsjax.models.MODELS, "bandnet", BandNet)
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = {"model": "bandnet", "dims": 3, "model_options": {"levels": [0.0, 2.0, 1.0]}, "in_channels": 1,
              "num_classes": 3, "class_names": list(CLASSES), "patch": [8, 8, 8], "eval_overlap": 0.5,
              "preprocessing": {"modalities": ["none"], "num_classes": 3, "spacing": spacing, "ct_window": None}}
    (workdir / "config.json").write_text(json.dumps(config))
    with Checkpoints(workdir / "checkpoints", async_save=False, keep=len(steps)) as ck:
        for step, val_dice in steps:
            model = BandNet(levels=(0.0, 2.0, 1.0), rngs=nnx.Rngs(0))
            model.shift[...] = jnp.asarray(shift + step - 7, jnp.float32)
            _, params, rest = nnx.split(model, nnx.Param, ...)
            state = {"step": jnp.asarray(step), "params": params, "opt_state": {"mu": params}, "model_state": rest,
                     "rng": jax.random.key_data(jax.random.key(0))}
            ck.save(step, state, score=val_dice)
    return workdir


def _input_file(tmp_path, shift=0.6, shape=(14, 12, 9)):
    """An LPS-oriented, anisotropic file (file axes: x, y, z) of a sphere in a shell.

    Intensities: background 0, shell ('outer') 1, core ('inner') 2, plus ``shift``;
    linear resampling between neighbours never creates the third class.
    """
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"), -1)
    r = np.linalg.norm(grid, axis=-1)
    label = np.where(r < 0.45, 1, np.where(r < 0.85, 2, 0))
    affine = np.diag([-1.0, -1.2, 2.0, 1.0])  # L->R flipped, P->A flipped: LPS
    affine[:3, 3] = [10.0, 20.0, -5.0]
    intensity = np.array([0.0, 2.0, 1.0])[label] + shift
    path = nifti.write_file(intensity.astype(np.float32), affine, str(tmp_path / "in.nii.gz"))
    return path, label, affine


def test_predict_end_to_end_in_input_orientation(tmp_path, monkeypatch, capsys):
    workdir = _make_run(tmp_path, monkeypatch)
    path, label, affine = _input_file(tmp_path)
    out = str(tmp_path / "out" / "seg.nii.gz")
    assert predict.main(["--workdir", str(workdir), "--input", path, "--output", out]) == 0
    assert "checkpoint step 7" in capsys.readouterr().out
    import nibabel as nib  # the test reads the file independently of train.data.nifti

    img = nib.load(out)
    np.testing.assert_allclose(img.affine, affine)
    # Without the restored shift (0.6) the band rule would call the background (0.6) outer;
    # with it every voxel is right, in the file's own axis order.
    np.testing.assert_array_equal(np.asarray(img.dataobj), label)


def test_predict_resamples_back_to_input_grid(tmp_path, monkeypatch):
    workdir = _make_run(tmp_path, monkeypatch, spacing=[3.0, 2.0, 2.0])
    path, label, affine = _input_file(tmp_path, shape=(30, 25, 20))
    out = str(tmp_path / "seg.nii")
    info = predict.predict_file(str(workdir), path, out, overlap=0.25, mirror=True, which="latest")
    assert info["step"] == 7
    img = nifti.read_label(out)
    ref = nifti.read_volume(path)
    assert img.array.shape == ref.array.shape
    np.testing.assert_allclose(img.affine, ref.affine)
    got = np.asarray(__import__("nibabel").load(out).dataobj)
    for c in (1, 2):  # coarser processing grid: borders may move by a voxel
        dice = 2 * np.sum((got == c) & (label == c)) / (np.sum(got == c) + np.sum(label == c))
        assert dice > 0.9, (c, dice)


@pytest.mark.parametrize("steps,best", [(((7, 0.9), (9, 0.5)), 7), (((7, None), (9, None)), 9)])
def test_restore_best_or_latest(tmp_path, monkeypatch, steps, best):
    workdir = _make_run(tmp_path, monkeypatch, steps=steps)
    config = predict.load_run_config(str(workdir))
    for which, step in (("best", best), ("latest", 9)):
        model = predict.build_run_model(config)
        assert predict.restore_model(str(workdir), model, which=which) == step
        assert float(model.shift[...]) == pytest.approx(0.6 + step - 7)
    with pytest.raises(predict.PredictError, match="--checkpoint"):
        predict.restore_model(str(workdir), model, which="first")


def test_predict_errors_name_the_file(tmp_path, monkeypatch, capsys):
    def run(workdir, input_path):
        return predict.main(["--workdir", workdir, "--input", input_path, "--output", str(tmp_path / "o.nii.gz")])

    missing = str(tmp_path / "missing")
    assert run(missing, "x.nii.gz") == 1
    assert capsys.readouterr().err.strip() == f"error: {missing}: no such run directory"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(str(empty), "x.nii.gz") == 1
    assert "config.json: not found" in capsys.readouterr().err

    workdir = _make_run(tmp_path, monkeypatch)
    assert run(str(workdir), str(tmp_path / "nope.nii.gz")) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.nii.gz'}: file not found"

    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a nifti file at all")
    assert run(str(workdir), str(garbage)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {garbage}") and len(err.strip().splitlines()) == 1

    path, _, _ = _input_file(tmp_path)
    good = (workdir / "config.json").read_text()
    (workdir / "config.json").write_text(good.replace('"num_classes": 3', '"num_classes": 2', 1))
    assert run(str(workdir), path) == 1
    assert "levels has shape (3,), the model expects (2,)" in capsys.readouterr().err
    (workdir / "config.json").write_text(good[:-5])
    assert run(str(workdir), path) == 1
    assert f"{workdir / 'config.json'}: not valid JSON" in capsys.readouterr().err
    (workdir / "config.json").write_text(good)

    (workdir / "checkpoints").rename(tmp_path / "moved")
    assert run(str(workdir), path) == 1
    assert "checkpoints: no checkpoints" in capsys.readouterr().err
    (workdir / "checkpoints").mkdir()
    assert run(str(workdir), path) == 1
    assert "no checkpoint found" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_reproduces_the_runs_validation(tmp_path):
    """Train the cpu-tiny preset, then segment its validation case from a NIfTI file: same Dice as summary.json."""
    from train import config, metrics, run

    cfg = config.preset("cpu-tiny", workdir=str(tmp_path / "run"), init="scratch")
    summary = run.train_and_evaluate(cfg)
    assert (tmp_path / "run" / report.FIGURE).exists()
    case = run.open_source(cfg, "val")[0]
    # An in-memory (d, h, w) = (z, y, x) affine of the case's spacing.
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2] = case["spacing"]
    affine[3, 3] = 1.0
    path = nifti.write_volume(case["image"][..., 0], affine, str(tmp_path / "case.nii.gz"))
    out = str(tmp_path / "seg.nii.gz")
    # summary.json holds the last step's validation, so restore the last step.
    assert predict.main(["--workdir", cfg.workdir, "--input", path, "--output", out, "--checkpoint", "latest"]) == 0
    labels = nifti.read_label(out).array
    names = summary["class_names"]
    dice = metrics.dice_per_class(labels, case["label"], len(names))
    want = summary["val_cases"][0]["dice"]
    np.testing.assert_allclose([dice[names.index(n)] for n in want], list(want.values()), atol=1e-9)


@pytest.mark.slow  # a whole run (or several compiles); `pytest -m slow` runs it
def test_eval_mirror_applies_to_the_final_validation_only(tmp_path, monkeypatch):
    """--eval_mirror: intermediate validations stay single-pass, the final one averages 8 mirrored passes."""
    import train.evaluate
    from train import config, run

    calls = []
    original = train.evaluate.evaluate

    def recording(*args, **kwargs):
        calls.append((kwargs["baseline"], kwargs["mirror"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(train.evaluate, "evaluate", recording)
    cfg = config.preset("cpu-tiny", workdir=str(tmp_path), init="scratch", steps=4, eval_every=2, eval_mirror=True)
    summary = run.train_and_evaluate(cfg)
    assert calls == [(False, ()), (True, (1, 2, 3))]  # step 2, then the final step 4 (cpu-tiny mirrors d, h, w)
    assert 0 <= summary["val_dice_mean"] <= 1


def test_mirror_axes_letters_map_to_window_axes():
    assert ev.mirror_axes_of("dhw", 3) == (1, 2, 3)
    assert ev.mirror_axes_of("w", 3) == (3,) and ev.mirror_axes_of("wd", 3) == (1, 3)
    assert ev.mirror_axes_of("dhw", 2) == (1, 2) and ev.mirror_axes_of("w", 2) == (2,)
    assert ev.mirror_axes_of("d", 2) == ()  # slice by slice, a depth flip changes nothing


@pytest.mark.parametrize("letters", ["", "x", "ww", "dhwd"])
def test_bad_mirror_axes_name_the_flag(letters):
    from train import config

    with pytest.raises(config.ConfigError) as info:
        config.validate(config.preset("cpu-tiny", workdir="w", eval_mirror_axes=letters))
    assert info.value.line().startswith("error: --eval_mirror_axes: expected distinct letters of d, h, w")


@pytest.mark.parametrize("preset,dims,final,want", [
    ("demo", "auto", True, (3,)),        # the demo: left-right only
    ("demo", "2", True, (2,)),           # a 2D model's width axis
    ("default", "auto", True, (1, 2, 3)),
    ("demo", "auto", False, ()),         # intermediate validations never mirror
])
def test_validation_mirrors_the_configured_axes(monkeypatch, preset, dims, final, want):
    from train import config, tasks

    seen = {}
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: seen.update(k))
    cfg = config.preset(preset, workdir="w", dims=dims, init="scratch" if dims == "2" else "scale")
    source = type("S", (), {"num_classes": 3})()
    tasks.SEGMENTATION.validate(None, source, cfg, final=final)
    assert seen["mirror"] == want and seen["baseline"] == final


@pytest.mark.parametrize("recorded,want", [(None, (1, 2, 3)), ("w", (3,))])
def test_predict_mirror_follows_the_runs_axes(tmp_path, monkeypatch, recorded, want):
    """--mirror flips the axes the run recorded; a run from before the setting mirrors all three."""
    workdir = _make_run(tmp_path, monkeypatch)
    if recorded is not None:
        config = json.loads((workdir / "config.json").read_text())
        (workdir / "config.json").write_text(json.dumps({**config, "eval_mirror_axes": recorded}))
    seen = []
    original = ev.predict_probabilities
    monkeypatch.setattr(ev, "predict_probabilities", lambda *a, **k: seen.append(k["mirror"]) or original(*a, **k))
    path, _, _ = _input_file(tmp_path)
    assert predict.main(["--workdir", str(workdir), "--input", path, "--output", str(tmp_path / "s.nii"), "--mirror"]) == 0
    assert seen == [want]
