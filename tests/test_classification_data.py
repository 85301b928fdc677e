"""Classification pieces: metrics, the brain-sides data set, 2D image sources, VDT volumes."""

import csv
import dataclasses
import json
import os
import warnings

import numpy as np
import pytest

from train import metrics, report
from train.data import images2d, mni152, nifti, regions

# --------------------------------------------------------------------------
# Metrics


def test_accuracy_and_balanced_accuracy_by_hand():
    label = np.array([0, 0, 0, 0, 1, 1, 3])  # class 2 absent from the truth
    pred = np.array([0, 0, 0, 1, 1, 2, 3])
    assert metrics.accuracy(pred, label) == pytest.approx(5 / 7)
    # Recalls over the classes present: 0 -> 3/4, 1 -> 1/2, 3 -> 1; class 2 is left out.
    assert metrics.balanced_accuracy(pred, label, 4) == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    confusion = metrics.classification_confusion(pred, label, 4)
    np.testing.assert_array_equal(confusion, [[3, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="label values"):
        metrics.balanced_accuracy(pred, np.array([0, 0, 0, 0, 1, 1, 4]), 4)
    assert np.isnan(metrics.accuracy([], []))


def test_auc_ties_by_hand():
    # Positive 0.4 beats 0.1 and ties 0.4 (1/2); positive 0.8 beats both: (1 + 0.5 + 1 + 1) / 4.
    assert metrics.binary_auc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert metrics.binary_auc([0.5, 0.5, 0.5], [0, 1, 1]) == pytest.approx(0.5)  # all tied
    assert np.isnan(metrics.binary_auc([0.1, 0.2], [1, 1]))  # no negatives


def test_macro_auc_skips_absent_classes_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    label = np.array([0, 1, 1, 0])  # class 2 absent: its AUC is undefined and skipped
    per_class = metrics.per_class_auc(probs, label, 3)
    # Class 0: positives score 0.7, 0.3; negatives 0.2, 0.6 -> (1 + 1 + 1 + 0) / 4.
    np.testing.assert_allclose(per_class[:2], [0.75, 0.75])
    assert np.isnan(per_class[2])
    assert metrics.macro_auc(probs, label, 3) == pytest.approx(0.75)
    assert np.isnan(metrics.macro_auc(probs, np.zeros(4, int), 3))  # one class only: nothing defined
    with pytest.raises(ValueError, match="shape"):
        metrics.macro_auc(probs[:, :2], label, 3)


def test_classification_metrics_match_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    k, n = 5, 300
    label = rng.integers(0, k - 1, n)  # the last class never occurs in the truth
    # Scores rounded to one decimal: many ties.
    probs = np.round(rng.dirichlet(np.ones(k), n) + 0.3 * np.eye(k)[label], 1)
    pred = probs.argmax(1)
    assert metrics.accuracy(pred, label) == pytest.approx(sk.accuracy_score(label, pred))
    assert np.any(pred == k - 1), "the test needs a prediction of the class absent from the truth"
    with warnings.catch_warnings():  # scikit-learn warns about that absent class
        warnings.simplefilter("ignore")
        expected = sk.balanced_accuracy_score(label, pred)
    assert metrics.balanced_accuracy(pred, label, k) == pytest.approx(expected)
    np.testing.assert_array_equal(metrics.classification_confusion(pred, label, k),
                                  sk.confusion_matrix(label, pred, labels=range(k)))
    present = range(k - 1)
    expected = np.mean([sk.roc_auc_score(label == c, probs[:, c]) for c in present])
    assert metrics.macro_auc(probs, label, k) == pytest.approx(expected)


def test_baseline_accuracy_finds_a_histogram_cue_and_misses_a_spatial_one():
    rng = np.random.default_rng(0)

    def cases(n, cue):
        labels = np.arange(n) % 2
        images = []
        for c in labels:
            image = rng.normal(0, 1, (8, 8, 8)).astype(np.float32)
            if cue == "brightness":
                image += 2.0 * c  # class lives in the histogram
            else:
                image = np.sort(image, axis=2) if c else np.sort(image, axis=2)[..., ::-1]  # only in position
            images.append(image)
        return images, labels

    for cue, low, high in (("brightness", 0.95, 1.0), ("position", 0.0, 0.75)):
        train_x, train_y = cases(20, cue)
        val_x, val_y = cases(40, cue)
        b = metrics.baseline_accuracy(train_x, train_y, val_x, val_y)
        assert b.majority == pytest.approx(0.5) and b.chance == pytest.approx(0.5)
        assert low <= b.histogram <= high, (cue, b)


def test_plot_confusion_writes_png(tmp_path):
    import matplotlib.image

    path = report.plot_confusion(str(tmp_path / "c" / "confusion.png"), np.array([[5, 1], [2, 7]]),
                                 ["left", "right"], title="val")
    assert matplotlib.image.imread(path).ndim == 3
    with pytest.raises(ValueError, match="class names"):
        report.plot_confusion(str(tmp_path / "x.png"), np.ones((2, 2)), ["a", "b", "c"])


# --------------------------------------------------------------------------
# The brain-sides data set


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("sides")
    out = {}
    for layout, per_class in (("msd", 2), ("folder", 1)):
        out[layout] = regions.write_dataset(str(root / layout), layout=layout, cases_per_class=per_class,
                                            val_cases_per_class=1, size=16, seed=3)
    return out


def test_msd_layout_readable_with_class_labels(written):
    info = written["msd"]
    root = info["root"]
    with open(os.path.join(root, "dataset.json")) as f:
        meta = json.load(f)
    assert meta["labels"] == {"0": "left", "1": "right", "2": "anterior", "3": "posterior"}
    assert meta["numTraining"] == len(meta["training"]) == 8 + 4
    for entry in meta["training"]:
        assert entry["image"].startswith("./imagesTr/") and isinstance(entry["label"], int)
        assert str(entry["label"]) in meta["labels"]
        volume = nifti.read_volume(os.path.join(root, entry["image"]))
        assert volume.array.shape == (16, 16, 16)
        np.testing.assert_allclose(volume.spacing, regions.SPACING)
        assert np.isfinite(volume.array).all()
    with open(os.path.join(root, regions.SPLITS_FILE)) as f:
        (split,) = json.load(f)
    assert not set(split["train"]) & set(split["val"])
    listed = {os.path.basename(e["image"])[: -len(".nii.gz")] for e in meta["training"]}
    assert set(split["train"]) | set(split["val"]) == listed
    # Balanced classes in both splits.
    by_name = {os.path.basename(e["image"])[: -len(".nii.gz")]: e["label"] for e in meta["training"]}
    assert sorted(by_name[n] for n in split["train"]) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(by_name[n] for n in split["val"]) == [0, 1, 2, 3]


def test_folder_layout_has_labels_csv(written):
    root = written["folder"]["root"]
    with open(os.path.join(root, regions.LABELS_CSV)) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["case", "label"]
    names = {r[0] for r in rows[1:]}
    assert names == {n[: -len(".nii.gz")] for n in os.listdir(os.path.join(root, "images"))}
    assert {int(r[1]) for r in rows[1:]} == {0, 1, 2, 3}
    with open(os.path.join(root, "dataset.json")) as f:
        assert "training" not in json.load(f)
    # The same seed and sizes give the same cases in both layouts.
    a = nifti.read_volume(os.path.join(root, "images", "tr_0003.nii.gz")).array
    b = nifti.read_volume(os.path.join(written["msd"]["root"], "imagesTr", "tr_0003.nii.gz")).array
    np.testing.assert_array_equal(a, b)


def test_histograms_carry_no_class_information(written):
    info = written["msd"]
    root = info["root"]
    images = [nifti.read_volume(os.path.join(root, "imagesTr", f"{n}.nii.gz")).array for n in info["train"]]
    # Every case holds the same multiset of intensities (equalised to one reference)...
    reference = np.sort(images[0].ravel())
    for image in images[1:]:
        np.testing.assert_allclose(np.sort(image.ravel()), reference, atol=1e-6)
    # ...so any classifier of the global histogram predicts one class: on a balanced
    # validation set it scores exactly 1/K, which is the bound.
    b = metrics.baseline_accuracy(info["train_images"], info["train_labels"], info["val_images"], info["val_labels"])
    assert b.chance == pytest.approx(0.25)
    assert b.majority <= 0.25 + 1e-9 and b.histogram <= 0.25 + 1e-9


def test_training_cases_read_nothing_from_the_validation_slab(monkeypatch):
    original = mni152.load_template(regions.SPACING)
    rng = np.random.default_rng(0)
    cube = regions.render_case("train", 2, np.random.default_rng([7]), size=16)
    # Scramble everything at and above the training slab's end (the gap and the validation slab).
    end = original.region("train").stop
    t1 = original.t1.copy()
    t1[end:] = rng.uniform(0, 255, t1[end:].shape)
    scrambled = dataclasses.replace(original, t1=t1)
    monkeypatch.setattr(regions.mni152, "load_template", lambda spacing: scrambled)
    np.testing.assert_array_equal(regions.render_case("train", 2, np.random.default_rng([7]), size=16), cube)
    # The check can fail: validation cubes do change.
    before = regions.render_case("validation", 2, np.random.default_rng([7]), size=16)
    monkeypatch.setattr(regions.mni152, "load_template", lambda spacing: original)
    assert not np.array_equal(regions.render_case("validation", 2, np.random.default_rng([7]), size=16), before)


def test_flip_classes_are_involutions_that_swap_mirrored_sides():
    names = regions.CLASS_NAMES
    for axis, perm in regions.FLIP_CLASSES.items():
        assert sorted(perm) == list(range(len(names)))
        assert all(perm[perm[c]] == c for c in range(len(names)))
    assert names[regions.FLIP_CLASSES[2][names.index("left")]] == "right"
    assert names[regions.FLIP_CLASSES[1][names.index("anterior")]] == "posterior"
    assert regions.FLIP_CLASSES[0] == tuple(range(len(names)))


def test_write_dataset_rejects_bad_arguments(tmp_path, written):
    with pytest.raises(ValueError, match="layout"):
        regions.write_dataset(str(tmp_path), layout="nnunet")
    with pytest.raises(ValueError, match="already exists"):
        regions.write_dataset(written["msd"]["root"], cases_per_class=1)
    with pytest.raises(ValueError, match="slab"):
        regions.render_case("validation", 0, np.random.default_rng(0), size=40)


# --------------------------------------------------------------------------
# 2D sources


def test_digits_source():
    train, val = images2d.make_image_source("digits"), images2d.make_image_source("digits", "val")
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert train.num_classes == 10
    item = train[0]
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == np.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    np.testing.assert_array_equal(item["image"][0], item["image"][2])  # grey: identical slices
    assert {train[i]["label"] for i in range(60)} == set(range(10))
    assert images2d.make_image_source("digits", size=16)[0]["image"].shape == (3, 16, 16)


def test_lfw_source():
    pytest.importorskip("skimage")
    train, val = images2d.make_image_source("lfw"), images2d.make_image_source("lfw", "val")
    assert len(train) + len(val) == 200
    assert train[0]["image"].shape == (3, 25, 25)
    labels = [train[i]["label"] for i in range(len(train))]
    assert sorted(set(labels)) == [0, 1] and abs(np.mean(labels) - 0.5) < 0.05


def _png(path, array):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_source_split_folders(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    for split in ("train", "val"):
        _png(str(tmp_path / split / "cat" / "a.png"), rgb)
        _png(str(tmp_path / split / "dog" / "b.PNG"), grey)
    source = images2d.make_image_source(f"folder:{tmp_path}", "val")
    assert source.class_names == ("cat", "dog") and len(source) == 2
    cat, dog = source[0], source[1]
    assert (cat["label"], dog["label"]) == (0, 1)
    np.testing.assert_allclose(cat["image"], np.moveaxis(rgb, -1, 0) / 255.0, atol=1e-6)  # R, G, B slices
    np.testing.assert_allclose(dog["image"], np.repeat(grey[None] / 255.0, 3, 0), atol=1e-6)
    resized = images2d.FolderImageSource(str(tmp_path), "train", size=(4, 10))[0]["image"]
    assert resized.shape == (3, 4, 10)


def test_folder_source_hash_split(tmp_path):
    for cls in ("a", "b"):
        for i in range(10):
            _png(str(tmp_path / cls / f"{i}.png"), np.full((3, 3), 10 * i, np.uint8))
    train = images2d.FolderImageSource(str(tmp_path), "train")
    val = images2d.FolderImageSource(str(tmp_path), "val")
    assert len(train) + len(val) == 20 and len(val) == 4
    assert not set(train.files) & set(val.files)


def test_folder_source_errors_name_the_path(tmp_path):
    def one_line_error(root, match, named=None):
        with pytest.raises(ValueError) as info:
            images2d.FolderImageSource(str(root))[0]
        message = str(info.value)
        assert "\n" not in message and str(named or root) in message and match in message, message

    one_line_error(tmp_path / "missing", "not a directory")
    (tmp_path / "flat").mkdir()
    one_line_error(tmp_path / "flat", "no class subfolders")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    one_line_error(tmp_path / "empty", "no .png", tmp_path / "empty" / "cls")
    (tmp_path / "broken" / "cls").mkdir(parents=True)
    (tmp_path / "broken" / "cls" / "x.png").write_bytes(b"not a png")
    one_line_error(tmp_path / "broken", "cannot read", tmp_path / "broken" / "cls" / "x.png")
    with pytest.raises(ValueError, match="unknown 2D image source"):
        images2d.make_image_source("imagenet")


# --------------------------------------------------------------------------
# VDT


def test_vdt_volume_channels_become_permuted_normalised_slices():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (5, 7, 3)).astype(np.float32) + np.array([0.0, 2.0, 5.0], np.float32)
    seen = set()
    for seed in range(60):
        volume = images2d.vdt_volume(image, np.random.default_rng(seed))
        assert volume.shape == (3, 5, 7, 1) and volume.dtype == np.float32
        assert abs(volume.mean()) < 1e-5 and volume.std() == pytest.approx(1.0, abs=1e-5)
        # One shared normalisation: each slice is a whole channel, shifted and scaled alike.
        normalised = (image - image.mean()) / image.std()
        order = tuple(int(np.argmin([np.abs(volume[d, ..., 0] - normalised[..., c]).max() for c in range(3)]))
                      for d in range(3))
        assert sorted(order) == [0, 1, 2]
        np.testing.assert_allclose(volume[..., 0], np.moveaxis(normalised[..., list(order)], -1, 0), atol=1e-5)
        seen.add(order)
    assert len(seen) == 6  # every order occurs
    a = images2d.vdt_volume(image, np.random.default_rng(42))
    np.testing.assert_array_equal(a, images2d.vdt_volume(image, np.random.default_rng(42)))


def test_vdt_volume_grey_and_constant():
    grey = np.arange(12, dtype=np.float32).reshape(3, 4)
    volume = images2d.vdt_volume(grey, np.random.default_rng(0))
    assert volume.shape == (3, 3, 4, 1)
    np.testing.assert_array_equal(volume[0], volume[1])
    np.testing.assert_array_equal(volume[0], volume[2])
    assert volume.std() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(images2d.vdt_volume(np.ones((2, 2, 1)), np.random.default_rng(0)), 0.0)
    with pytest.raises(ValueError, match="shape"):
        images2d.vdt_volume(np.zeros((2, 2, 4)), np.random.default_rng(0))


def test_vdt_dataset_batches_are_deterministic():
    source = images2d.make_image_source("digits", "val")

    def first_batches(seed):
        it = iter(images2d.vdt_dataset(source, size=12, batch=4, seed=seed, augment=True, prefetch=0))
        return [next(it) for _ in range(2)]

    a, b = first_batches(1), first_batches(1)
    assert a[0]["image"].shape == (4, 3, 12, 12, 1) and a[0]["image"].dtype == np.float32
    assert a[0]["label"].shape == (4,) and a[0]["label"].dtype == np.int32
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_allclose(a[0]["image"].mean(axis=(1, 2, 3, 4)), 0.0, atol=1e-5)
    c = first_batches(2)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    with pytest.raises(ValueError, match="size"):
        images2d.vdt_dataset(source, size=None, batch=2, seed=0)
