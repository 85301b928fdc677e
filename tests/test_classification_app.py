"""Classification in the training app, and VDT pre-training: sources, pipeline, task, runs, predict, transfer."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import config as config_lib
from train import losses, pretrain, tasks
from train.data import class_pipeline, regions, sources
from train.data.nifti import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_regions(tmp_path_factory):
    """A 16^3 brain-sides data set: 3 training and 1 validation case per class, msd layout."""
    out = tmp_path_factory.mktemp("regions") / "msd"
    regions.write_dataset(str(out), cases_per_class=3, val_cases_per_class=1, size=16)
    return out


def _rewrite_label(root, case_index, value, dst):
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = [dict(e, image=os.path.join(str(root), e["image"])) for e in meta["training"]]
    meta["training"][case_index]["label"] = value
    dst.mkdir()
    (dst / "dataset.json").write_text(json.dumps(meta))
    return meta["training"][case_index]["image"]


# --------------------------------------------------------------------------
# Sources


def test_msd_classification_source_follows_splits_final(tiny_regions):
    train = sources.make_source(f"msd:{tiny_regions}", "train")
    val = sources.make_source(f"msd:{tiny_regions}", "val")
    split = json.loads((tiny_regions / "splits_final.json").read_text())[0]
    assert [c.name for c in train.cases] == split["train"]
    assert [c.name for c in val.cases] == split["val"]
    assert train.task == val.task == "classification"
    assert train.class_names == regions.CLASS_NAMES and train.num_classes == 4
    listed = {e["image"].split("/")[-1].removesuffix(".nii.gz"): e["label"]
              for e in json.loads((tiny_regions / "dataset.json").read_text())["training"]}
    case = val[0]
    assert case["class"] == listed[case["name"]] and "label" not in case
    np.testing.assert_array_equal(train.classes(), [listed[n] for n in split["train"]])


def test_folder_layout_with_labels_csv(tmp_path):
    out = tmp_path / "folder"
    info = regions.write_dataset(str(out), layout="folder", cases_per_class=1, val_cases_per_class=1, size=16)
    train = sources.make_source(f"folder:{out}", "train")
    assert train.task == "classification" and train.class_names == regions.CLASS_NAMES
    np.testing.assert_array_equal(train.classes(), info["train_labels"])
    # A class outside the declared ones: one line naming the case.
    rows = list(csv.reader(open(out / "labels.csv")))
    rows[2][1] = "9"
    with open(out / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match=rf"case {rows[2][0]}: label 9 is not one of the classes 0..3") as err:
        sources.make_source(f"folder:{out}", "train")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [7, -1, "left"])
def test_msd_bad_label_names_the_case(tiny_regions, tmp_path, value):
    image = _rewrite_label(tiny_regions, 2, value, tmp_path / "bad")
    name = os.path.basename(image).removesuffix(".nii.gz")
    if value == "left":  # a string that is not a file: reported as a missing label file
        with pytest.raises(DataError, match="training\\[2\\].label: file not found"):
            sources.make_source(f"msd:{tmp_path / 'bad'}", "train")
        return
    with pytest.raises(DataError, match=f"case {name}: label {value} is not one of the classes 0..3"):
        sources.make_source(f"msd:{tmp_path / 'bad'}", "train")


def test_bad_label_through_the_cli_is_one_line(tiny_regions, tmp_path):
    image = _rewrite_label(tiny_regions, 1, 12, tmp_path / "bad")
    name = os.path.basename(image).removesuffix(".nii.gz")
    proc = subprocess.run(
        [sys.executable, "-m", "train.main", f"--dataset=msd:{tmp_path / 'bad'}", f"--workdir={tmp_path / 'run'}",
         f"--cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"case {name}: label 12" in lines[0] and lines[0].startswith("error: --dataset:")


# --------------------------------------------------------------------------
# Pipeline and task


def test_class_flips_map_the_class_with_the_image():
    # A 3^3 toy whose class is the face its bright voxel sits on, arranged as the
    # brain sides are (w: left-right, h: posterior-anterior): flips must move
    # the voxel and map the class together.
    where = {0: (1, 1, 0), 1: (1, 1, 2), 2: (1, 2, 1), 3: (1, 0, 1)}
    flips = class_pipeline.ClassFlips(regions.FLIP_CLASSES)
    for cls, voxel in where.items():
        image = np.zeros((3, 3, 3, 1), np.float32)
        image[voxel] = 1.0
        seen = set()
        for seed in range(16):
            out = flips.random_map({"image": image, "label": np.int32(cls)}, np.random.default_rng(seed))
            assert tuple(np.argwhere(out["image"][..., 0] == 1)[0]) == where[int(out["label"])]
            seen.add(int(out["label"]))
        assert seen == ({0, 1} if cls < 2 else {2, 3})


def test_crop_sampler_crops_or_pads_to_the_patch():
    image = np.arange(6 * 10 * 3, dtype=np.float32).reshape(6, 10, 3, 1)
    out = class_pipeline.CropSampler((4, 4, 5)).random_map({"image": image, "class": 2}, np.random.default_rng(0))
    assert out["image"].shape == (4, 4, 5, 1) and out["label"] == 2
    # Width 3 < 5 is centred with one zero column on each side; the rest is a crop of the image.
    assert np.all(out["image"][:, :, 0] == 0) and np.all(out["image"][:, :, 4] == 0)
    inner = out["image"][:, :, 1:4, 0]
    d0, h0 = np.argwhere(image[..., 0] == inner[0, 0, 0])[0][:2]
    np.testing.assert_array_equal(inner, image[d0:d0 + 4, h0:h0 + 4, :, 0])
    centred = class_pipeline.fit_to_patch(image, (2, 2, 3))
    np.testing.assert_array_equal(centred, image[2:4, 4:6])


def test_classification_loss_is_weighted_cross_entropy():
    logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    labels = jnp.array([0, 2, 2])
    weights = (1.0, 2.0, 0.5)
    loss, parts = tasks.CLASSIFICATION.loss(logits, labels, 3, weights)
    logp = jax.nn.log_softmax(logits)
    want = -np.mean([weights[int(y)] * logp[i, int(y)] for i, y in enumerate(labels)])
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(parts["ce"], loss)
    acc = tasks.CLASSIFICATION.step_metrics(logits, labels, 3)["accuracy"]
    np.testing.assert_allclose(acc, 2 / 3, rtol=1e-6)
    assert losses.cross_entropy(logits, labels) > 0


def test_task_selection_follows_the_data(tiny_regions):
    source = sources.make_source(f"msd:{tiny_regions}", "train")
    assert tasks.select("auto", source) is tasks.CLASSIFICATION
    assert tasks.select("classification", source) is tasks.CLASSIFICATION
    with pytest.raises(ValueError, match="segmentation needs voxel label maps.*holds one class per case"):
        tasks.select("segmentation", source)
    with pytest.raises(config_lib.ConfigError, match="unknown 'detection'") as err:
        config_lib.preset("cpu-tiny", task="detection")
    assert err.value.flag == "task"


# --------------------------------------------------------------------------
# VDT transfer (no training)


def test_transfer_reports_loaded_adapted_fresh_and_unused():
    tree = {"conv1": {"kernel": {"value": np.ones((3, 3, 3, 1, 4))}}, "bn1": {"scale": np.full(4, 2.0)},
            "fc": {"kernel": np.ones((4, 10)), "bias": np.zeros(10)}, "extra": {"bias": np.zeros(2)},
            "layer1": {"kernel": np.ones((3, 3, 3, 4, 4))}}
    target = {"encoder/conv1/kernel": np.zeros((3, 3, 3, 2, 4)), "encoder/bn1/scale": np.zeros(4),
              "encoder/layer1/kernel": np.zeros((1, 3, 3, 4, 4)), "decoder/kernel": np.zeros((3, 3)),
              "encoder/fc/kernel": np.zeros((4, 10))}
    values, report = pretrain.transfer(tree, target, prefix="encoder/")
    assert report["loaded"] == ["encoder/bn1/scale", "encoder/conv1/kernel"]
    assert report["adapted"] == ["encoder/conv1/kernel"]
    # 'sum' adaptation: two identical channels respond as the one pre-trained channel did.
    np.testing.assert_allclose(values["encoder/conv1/kernel"].sum(-2), np.ones((3, 3, 3, 4)))
    assert report["fresh"] == ["decoder/kernel", "encoder/fc/kernel", "encoder/layer1/kernel"]
    assert report["mismatched"] == {"encoder/layer1/kernel": [[3, 3, 3, 4, 4], [1, 3, 3, 4, 4]]}
    assert report["unused"] == ["extra/bias", "fc/bias", "fc/kernel", "layer1/kernel"]


def test_classifier_twin():
    assert pretrain.classifier_twin("resnet18_unet", {"stem_stride": 1, "decoder_widths": (8,)})[::2] == (
        "resnet18", "encoder/")
    assert pretrain.classifier_twin("resnet18_unet", {"stem_stride": 1})[1] == {"stem_stride": 1}
    assert pretrain.classifier_twin("efficientnet_lite0", {})[0] == "efficientnet_lite0"
    with pytest.raises(pretrain.PretrainError, match="plain unet has no classifier twin"):
        pretrain.classifier_twin("unet")


# --------------------------------------------------------------------------
# Runs (a 3D ResNet-18 for two steps; XLA's convolutions compile it fastest on CPU)


def _config(dataset, workdir, cache, **overrides):
    fields = dict(dataset=dataset, workdir=str(workdir), model="resnet18", model_options={}, init="scratch",
                  conv_impl="xla", steps=2, eval_every=0, checkpoint_every=2, slices_steps=2, cache_dir=str(cache))
    return config_lib.preset("cpu-tiny", **{**fields, **overrides})


def test_classification_run_then_predict(tiny_regions, tmp_path):
    from train import metrics
    from train import predict as predict_lib
    from train import run as run_lib

    summary = run_lib.train_and_evaluate(_config(f"msd:{tiny_regions}", tmp_path / "run", tmp_path / "cache"))
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["task"] == "classification"
    for key in ("val_accuracy", "val_balanced_accuracy", "val_auc", "baseline_accuracy"):
        assert 0.0 <= written[key] <= 1.0, key
    confusion = np.array(written["confusion"])
    assert confusion.sum() == 4 and np.trace(confusion) / 4 == pytest.approx(written["val_accuracy"])
    # The baseline is metrics.baseline_accuracy on the same split, computed here from the files.
    train = sources.make_source(f"msd:{tiny_regions}", "train")
    val = sources.make_source(f"msd:{tiny_regions}", "val")
    b = metrics.baseline_accuracy([c["image"] for c in train], train.classes(), [c["image"] for c in val], val.classes())
    assert written["baseline_accuracy"] == pytest.approx(max(b.majority, b.histogram))
    assert summary["val_accuracy"] == written["val_accuracy"]
    assert (tmp_path / "run" / "confusion.png").stat().st_size > 1000
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "accuracy" in header and "val_balanced_accuracy" in header and "dice" not in header

    # predict writes the class probabilities; they are validation's for the same case.
    case = written["val_cases"][0]
    image = os.path.join(str(tiny_regions), "imagesTr", f"{case['name']}.nii.gz")
    info = predict_lib.predict_file(str(tmp_path / "run"), image, str(tmp_path / "out.json"))
    out = json.loads((tmp_path / "out.json").read_text())
    probs = np.array([out["probabilities"][n] for n in regions.CLASS_NAMES])
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert out["label"] == regions.CLASS_NAMES[int(probs.argmax())] == info["label"]
    np.testing.assert_allclose(probs, case["probabilities"], atol=1e-4)


@pytest.mark.slow
def test_classification_from_slices(tiny_regions, tmp_path):
    from train import run as run_lib

    run_lib.train_and_evaluate(_config(f"msd:{tiny_regions}", tmp_path / "run", tmp_path / "cache",
                                       init="scale", pretrained="slices"))
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["pretrained"] == "slices" and "val_auc" in written and "baseline_accuracy" in written
    assert (tmp_path / "run" / "slices2d").is_dir()
    assert "accuracy" in (tmp_path / "run" / "slices_metrics.csv").read_text().splitlines()[0].split(",")


@pytest.mark.slow
def test_vdt_pretrain_then_load_into_the_run_model(tiny_regions, tmp_path):
    import orbax.checkpoint as ocp

    from acsjax.trees import flatten
    from train import init as init_lib
    from train import trainer

    vdt = tmp_path / "vdt"
    proc = subprocess.run(
        [sys.executable, "-m", "train.pretrain", "--source=digits", "--model=resnet18", "--steps=2", "--batch=8",
         "--size=16", "--conv_impl=xla", f"--workdir={vdt}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((vdt / pretrain.META).read_text())
    assert meta["model"] == "resnet18" and meta["pool_depth"] is False and meta["num_classes"] == 10
    assert (vdt / "checkpoints").is_dir() and (vdt / pretrain.STATE_DIR).is_dir()

    # --pretrained=PATH: the run's 3D model (real depth strides, 4 classes) starts from it.
    config = _config(f"msd:{tiny_regions}", tmp_path / "run", tmp_path / "cache", init="scale", pretrained=str(vdt))
    source = sources.make_source(f"msd:{tiny_regions}", "train")
    build = init_lib.model_fn(config, in_channels=1, num_classes=4, dims=3)
    task = trainer.make_task(build, trainer.make_optimizer(lambda s: 1e-3, weight_decay=0.0, grad_clip=0.0),
                             lambda s: 1e-3, 4, trainer.make_mesh(""), 0, None, tasks.CLASSIFICATION)
    fresh_state = task.init()
    (tmp_path / "run").mkdir()
    state = init_lib.initialize(config, task, fresh_state, source, tmp_path / "run")
    report = json.loads((tmp_path / "run" / init_lib.PRETRAINED_REPORT).read_text())
    assert report["fresh"] == ["fc/bias", "fc/kernel"] and not report["mismatched"]
    assert report["unused"] == ["fc/bias", "fc/kernel"]
    saved = {k.removesuffix("/value"): v for k, v in flatten(ocp.StandardCheckpointer().restore(
        (vdt / pretrain.STATE_DIR).absolute())).items()}
    got = {**flatten(state["params"]), **flatten(state["model_state"])}
    assert sorted(report["loaded"]) == sorted(k for k in got if not k.startswith("fc/"))
    for path in report["loaded"]:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(saved[path]), err_msg=path)
    before = flatten(fresh_state["params"])
    np.testing.assert_array_equal(np.asarray(got["fc/kernel"]), np.asarray(before["fc/kernel"]))


def test_imagenet_weights_load_into_a_2d_classifier_twin():
    from flax import nnx

    from acsjax import pretrained
    from acsjax.models import build_model
    from acsjax.statedict import load_state_dict
    from train import init as init_lib

    model = nnx.eval_shape(lambda: build_model("efficientnet_lite0", dims=2, in_channels=1, num_classes=4,
                                               rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nnx.state(model)))
    init_lib._load_weights(model, "imagenet")
    sd = load_state_dict(pretrained.efficientnet_lite0_weights_path())
    stem = np.transpose(sd["_conv_stem.weight"], (2, 3, 1, 0))
    np.testing.assert_allclose(model.conv_stem.kernel[...], stem.sum(axis=2, keepdims=True), rtol=1e-6)
    assert model.fc.kernel.shape == (1280, 4) and not np.any(model.fc.kernel[...])  # the 4-class head stays fresh
    resnet = nnx.eval_shape(lambda: build_model("resnet18", dims=2, in_channels=1, num_classes=4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="no installed package ships ResNet ImageNet weights"):
        init_lib._load_weights(resnet, "imagenet")


def test_the_classification_demo_is_the_regions_preset():
    from absl import flags

    for argv in (["--dataset=regions"], ["--task=classification"]):
        fv = flags.FlagValues()
        config_lib.define_flags(fv)
        fv(["train.main", *argv])
        config = config_lib.from_flags(fv)
        assert config.dataset == "regions" and config.model == "resnet18" and config.init == "scratch"
        assert not config.planned and config.workdir == "runs/regions"


def test_a_segmentation_model_on_classification_data_names_the_flag(tiny_regions, tmp_path):
    from train import run as run_lib

    config = config_lib.preset("cpu-tiny", dataset=f"msd:{tiny_regions}", workdir=str(tmp_path / "run"),
                               model="unet", init="scratch", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(config_lib.ConfigError) as err:
        run_lib.train_and_evaluate(config)
    assert err.value.line() == "error: --model: unet does not fit a classification task; use e.g. resnet18"
    forced = config_lib.preset("cpu-tiny", dataset=f"msd:{tiny_regions}", workdir=str(tmp_path / "run"),
                               task="segmentation", init="scratch", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(config_lib.ConfigError) as err:
        run_lib.train_and_evaluate(forced)
    assert err.value.flag == "task" and "holds one class per case" in str(err.value)


def test_splits_final_decides_a_segmentation_split_too(tmp_path):
    from train.data import nifti

    rng = np.random.default_rng(0)
    training = []
    for i in range(5):
        for kind, array in (("images", rng.normal(size=(6, 5, 4)).astype(np.float32)),
                            ("labels", rng.integers(0, 2, (6, 5, 4)).astype(np.uint8))):
            nifti.write_file(array, np.eye(4), str(tmp_path / "seg" / f"{kind}Tr" / f"case_{i:02d}.nii.gz"))
        training.append({"image": f"./imagesTr/case_{i:02d}.nii.gz", "label": f"./labelsTr/case_{i:02d}.nii.gz"})
    meta = {"modality": {"0": "MR"}, "labels": {"0": "background", "1": "organ"}, "training": training}
    (tmp_path / "seg" / "dataset.json").write_text(json.dumps(meta))
    root = str(tmp_path / "seg")
    wanted = {"train": ["case_04", "case_00", "case_02"], "val": ["case_03"]}  # case_01 in neither
    (tmp_path / "seg" / "splits_final.json").write_text(json.dumps([wanted, {"train": [], "val": []}]))
    train = sources.make_source(f"msd:{root}", "train")
    val = sources.make_source(f"msd:{root}", "val")
    assert train.task == "segmentation" and "label" in val[0]
    assert [c.name for c in train.cases] == wanted["train"] and [c.name for c in val.cases] == wanted["val"]
    (tmp_path / "seg" / "splits_final.json").write_text(json.dumps([{"train": ["case_09"], "val": []}]))
    with pytest.raises(DataError, match="splits_final.json: case case_09 is not among the labelled cases"):
        sources.make_source(f"msd:{root}", "train")


@pytest.mark.slow
@pytest.mark.parametrize("init", ["acs", "2.5d"])
def test_acs_and_2_5d_classifiers_from_slices(tiny_regions, tmp_path, init):
    from train import run as run_lib

    summary = run_lib.train_and_evaluate(_config(f"msd:{tiny_regions}", tmp_path / "run", tmp_path / "cache",
                                                 init=init, pretrained="slices"))
    assert summary["dims"] == init and 0.0 <= summary["val_auc"] <= 1.0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dims"] == init


def test_vdt_classifier_fits_a_unet_encoder_with_real_strides():
    """Depth strides change no kernel shape: every encoder entry of an isotropic U-Net loads from the
    pool_depth=False classifier (the stem adapted to two channels); the rest is reported, not dropped."""
    from flax import nnx

    from acsjax.models import build_model
    from acsjax.trees import flatten

    classifier = nnx.eval_shape(lambda: build_model("resnet18", dims=3, in_channels=1, num_classes=10,
                                                    rngs=nnx.Rngs(0), pool_depth=False))
    unet = nnx.eval_shape(lambda: build_model("resnet18_unet", dims=3, in_channels=2, num_classes=3,
                                              rngs=nnx.Rngs(0)))
    tree = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), nnx.state(classifier).to_pure_dict())
    target = flatten(nnx.state(unet).to_pure_dict())
    values, report = pretrain.transfer(tree, target, prefix="encoder/")
    encoder = sorted(p for p in target if p.startswith("encoder/"))
    assert report["loaded"] == encoder and report["adapted"] == ["encoder/conv1/kernel"]
    assert report["fresh"] == sorted(p for p in target if not p.startswith("encoder/")) and report["fresh"]
    assert report["unused"] == ["fc/bias", "fc/kernel"] and not report["mismatched"]
    for path in encoder:
        assert values[path].shape == target[path].shape


def test_pretrain_cli_errors_are_one_line(tmp_path, capsys):
    assert pretrain.main(["--source=nope", f"--workdir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --source: unknown 2D image source 'nope'") and "\n" not in err
    assert pretrain.main(["--model=unet", f"--workdir={tmp_path / 'b'}"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --model: the plain unet has no classifier twin")
    assert pretrain.main(["--steps=0", f"--workdir={tmp_path / 'c'}"]) == 2
    assert capsys.readouterr().err.strip() == "error: --steps: must be at least 1, got 0"
