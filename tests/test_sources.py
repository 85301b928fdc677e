"""Sources: MSD and folder layouts, splits, the cache, synthetic phantoms, bad data."""

import json
import os

import numpy as np
import pytest

from train.data import nifti, sources
from train.data.nifti import DataError
from train.data.sources import FolderSource, MSDSource, make_source
from train.data.synthetic import SyntheticSource

SHAPE = (10, 9, 8)  # file axes (x, y, z)
AFFINE = np.diag([1.5, 1.0, 2.0, 1.0])


def _image(rng, channels=0):
    shape = SHAPE + ((channels,) if channels else ())
    data = rng.normal(100.0, 10.0, shape).astype(np.float32)
    data[:2] = 0.0  # an MR-like background floor
    return data


def _label(rng):
    return rng.integers(0, 3, SHAPE).astype(np.uint8)


def make_msd(root, n=5, channels=1, test=2, seed=0):
    """An MSD task folder with ``n`` training cases, classes 0..2."""
    rng = np.random.default_rng(seed)
    training = []
    extra = channels if channels > 1 else 0  # one modality: 3D files
    for i in range(n):
        nifti.write_file(_image(rng, extra), AFFINE, f"{root}/imagesTr/case_{i:02d}.nii.gz")
        nifti.write_file(_label(rng), AFFINE, f"{root}/labelsTr/case_{i:02d}.nii.gz")
        training.append({"image": f"./imagesTr/case_{i:02d}.nii.gz", "label": f"./labelsTr/case_{i:02d}.nii.gz"})
    tests = []
    for i in range(test):
        nifti.write_file(_image(rng, extra), AFFINE, f"{root}/imagesTs/t_{i}.nii.gz")
        tests.append(f"./imagesTs/t_{i}.nii.gz")
    meta = {
        "name": "Toy",
        "modality": {str(c): ("CT" if c == 0 else "T2") for c in range(channels)},
        "labels": {"0": "background", "1": "organ", "2": "tumour"},
        "training": training,
        "test": tests,
    }
    with open(f"{root}/dataset.json", "w") as f:
        json.dump(meta, f)
    return str(root)


def make_folder(root, n=4, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        nifti.write_file(_image(rng), AFFINE, f"{root}/images/c{i}.nii.gz")
        nifti.write_file(_label(rng), AFFINE, f"{root}/labels/c{i}.nii.gz")
    return str(root)


def _one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_msd_source_case_and_splits(tmp_path):
    root = make_msd(tmp_path, n=5)
    train = make_source(f"msd:{root}", "train")
    val = make_source(f"msd:{root}", "val", seed=123)
    test = make_source(f"msd:{root}", "test")
    assert (len(train), len(val), len(test)) == (4, 1, 2)
    names = lambda s: {c.name for c in s.cases}  # noqa: E731
    assert not names(train) & names(val)
    assert names(train) | names(val) == {f"case_{i:02d}" for i in range(5)}
    # The split depends on the names only, not on the seed.
    assert names(MSDSource(root, "val", seed=7)) == names(val)
    assert (train.num_classes, train.class_names, train.num_channels) == (3, ("background", "organ", "tumour"), 1)

    case = train[0]
    assert case["image"].shape == (8, 9, 10, 1) and case["image"].dtype == np.float32
    assert case["label"].shape == (8, 9, 10) and case["label"].dtype == np.int32
    np.testing.assert_allclose(case["spacing"], [2.0, 1.0, 1.5])
    assert case["affine"].shape == (4, 4) and case["name"] == train.cases[0].name
    # CT channel: percentile-clipped to [0, 1].
    assert case["image"].min() == 0.0 and case["image"].max() == 1.0
    assert "label" not in test[0]


def test_msd_multimodal_4d_becomes_channels_and_mr_zscore(tmp_path):
    root = make_msd(tmp_path, n=3, channels=2, test=0)
    src = MSDSource(root, "train", val_fraction=0.0)
    case = src[1]
    assert src.num_channels == 2 and case["image"].shape == (8, 9, 10, 2)
    t2 = case["image"][..., 1]
    fg = t2 > t2.min()
    assert abs(t2[fg].mean()) < 1e-3 and abs(t2[fg].std() - 1) < 1e-3


def test_spacing_option_resamples(tmp_path):
    root = make_msd(tmp_path, n=2, test=0)
    case = MSDSource(root, "train", val_fraction=0.0, spacing=(1.0, 1.0, 1.0))[0]
    assert case["image"].shape == (16, 9, 15, 1) and case["label"].shape == (16, 9, 15)
    np.testing.assert_allclose(case["spacing"], [1.0, 1.0, 1.0])
    assert set(np.unique(case["label"])) <= {0, 1, 2}


def test_cache_avoids_decoding_and_tracks_options(tmp_path, monkeypatch):
    root = make_msd(tmp_path / "msd", n=2, test=0)
    cache = str(tmp_path / "cache")
    first = MSDSource(root, "train", val_fraction=0.0, cache_dir=cache)[0]
    fresh = MSDSource(root, "train", val_fraction=0.0)[0]
    np.testing.assert_array_equal(first["image"], fresh["image"])
    np.testing.assert_array_equal(first["label"], fresh["label"])

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a NIfTI file despite the cache")

    monkeypatch.setattr(nifti, "read_volume", no_decoding)
    monkeypatch.setattr(nifti, "read_label", no_decoding)
    again = MSDSource(root, "train", val_fraction=0.0, cache_dir=cache)[0]
    assert isinstance(again["image"], np.memmap)
    np.testing.assert_array_equal(again["image"], fresh["image"])
    np.testing.assert_array_equal(again["affine"], fresh["affine"])
    # Other preprocessing options are another entry, so they decode again.
    with pytest.raises(AssertionError, match="despite the cache"):
        MSDSource(root, "train", val_fraction=0.0, cache_dir=cache, spacing=(1, 1, 1))[0]


def test_folder_source(tmp_path):
    root = make_folder(tmp_path, n=4)
    train, val = FolderSource(root, "train"), FolderSource(root, "val")
    assert len(train) + len(val) == 4 and len(val) == 1
    assert train.num_classes == 3  # scanned from the label maps
    assert train[0]["image"].shape == (8, 9, 10, 1)
    src = make_source(f"folder:{root}", "train", class_names=("bg", "a", "b", "c"), modality="CT")
    assert src.class_names == ("bg", "a", "b", "c") and src.preprocessing.modalities == ("CT",)
    with pytest.raises(DataError, match="no cases in split 'test'"):
        FolderSource(root, "test")
    nifti.write_file(_image(np.random.default_rng(1)), AFFINE, f"{root}/test/new.nii.gz")
    assert "label" not in FolderSource(root, "test")[0]


def test_synthetic_source():
    a = SyntheticSource("train", seed=1, size=24, num_cases=3)
    b = make_source("synthetic", "train", seed=1, size=24, num_cases=3)
    np.testing.assert_array_equal(a[2]["image"], b[2]["image"])
    np.testing.assert_array_equal(a[2]["label"], b[2]["label"])
    assert not np.array_equal(a[0]["image"], SyntheticSource("val", seed=1, size=24)[0]["image"])
    assert not np.array_equal(a[0]["label"], SyntheticSource("train", seed=2, size=24)[0]["label"])
    case = a[0]
    assert case["image"].shape == (24, 24, 24, 1) and case["image"].dtype == np.float32
    assert set(np.unique(case["label"])) == {0, 1, 2, 3} and case["label"].dtype == np.int32
    assert (a.num_classes, a.num_channels, len(a.class_names)) == (4, 1, 4)
    assert "label" not in SyntheticSource("test", size=24)[0]


def test_make_source_rejects_bad_specs_and_options(tmp_path):
    with pytest.raises(ValueError, match="unknown data spec 'nifti:x'"):
        make_source("nifti:x")
    with pytest.raises(ValueError, match="unknown data spec 'msd'"):
        make_source("msd")
    with pytest.raises(ValueError, match="split must be one of"):
        make_source("synthetic", "training")
    with pytest.raises(ValueError, match="'voxels' is not accepted by 'synthetic'"):
        make_source("synthetic", voxels=3)


# --------------------------------------------------------------------------
# Bad data: each is a one-line DataError naming the file and the problem.


def _edit_training(root, index, **entry):
    path = f"{root}/dataset.json"
    meta = json.load(open(path))
    meta["training"][index].update(entry)
    json.dump(meta, open(path, "w"))


def test_missing_listed_file(tmp_path):
    root = make_msd(tmp_path, n=3)
    _edit_training(root, 1, label="./labelsTr/gone.nii.gz")
    with pytest.raises(DataError) as excinfo:
        MSDSource(root, "train")
    _one_line(excinfo, "dataset.json", "training[1].label", "file not found", "gone.nii.gz")


def test_truncated_file(tmp_path):
    root = make_msd(tmp_path, n=2, test=0)
    path = f"{root}/imagesTr/case_00.nii.gz"
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) - 200])
    src = MSDSource(root, "train", val_fraction=0.0)
    with pytest.raises(DataError) as excinfo:
        src[0]
    _one_line(excinfo, path, "truncated")


@pytest.mark.parametrize("problem", ["shape", "affine"])
def test_image_label_geometry_mismatch(tmp_path, problem):
    root = make_folder(tmp_path, n=2)
    label = np.zeros(SHAPE, np.uint8)
    if problem == "shape":
        nifti.write_file(label[:, :, :-1], AFFINE, f"{root}/labels/c0.nii.gz")
    else:
        shifted = AFFINE.copy()
        shifted[0, 3] = 5.0
        nifti.write_file(label, shifted, f"{root}/labels/c0.nii.gz")
    src = FolderSource(root, "train", val_fraction=0.0, class_names=("bg", "fg", "x"))
    index = [c.name for c in src.cases].index("c0")
    with pytest.raises(DataError) as excinfo:
        src[index]
    _one_line(excinfo, f"{root}/labels/c0.nii.gz", f"label {problem}", f"{root}/images/c0.nii.gz")


def test_label_values_outside_declared(tmp_path):
    root = make_msd(tmp_path, n=2, test=0)
    bad = np.zeros(SHAPE, np.uint8)
    bad[3, 3, 3] = 7
    path = nifti.write_file(bad, AFFINE, f"{root}/labelsTr/case_01.nii.gz")
    src = MSDSource(root, "train", val_fraction=0.0)
    with pytest.raises(DataError) as excinfo:
        src[[c.label for c in src.cases].index(path)]
    _one_line(excinfo, path, "[7]", "outside the declared labels 0..2")


def test_nan_voxels(tmp_path):
    root = make_folder(tmp_path, n=2)
    data = _image(np.random.default_rng(3))
    data[4, 4, 4] = np.nan
    path = nifti.write_file(data, AFFINE, f"{root}/images/c1.nii.gz")
    src = FolderSource(root, "train", val_fraction=0.0, class_names=("bg", "fg", "x"))
    with pytest.raises(DataError) as excinfo:
        src[[c.name for c in src.cases].index("c1")]
    _one_line(excinfo, path, "1 NaN or Inf")


def test_4d_image_where_3d_required(tmp_path):
    root = make_msd(tmp_path, n=2, test=0)  # one modality declared
    path = nifti.write_file(_image(np.random.default_rng(0), 2), AFFINE, f"{root}/imagesTr/case_00.nii.gz")
    src = MSDSource(root, "train", val_fraction=0.0)
    with pytest.raises(DataError) as excinfo:
        src[[c.images[0] for c in src.cases].index(path)]
    _one_line(excinfo, path, "expected a 3D image", "4D")


def test_empty_and_unpaired_folder(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError) as excinfo:
        make_source(f"folder:{tmp_path}")
    _one_line(excinfo, str(tmp_path / "images"), "no .nii or .nii.gz files")
    with pytest.raises(DataError) as excinfo:
        make_source(f"folder:{tmp_path / 'nothing'}")
    _one_line(excinfo, "nothing", "no images/ folder")
    root = make_folder(tmp_path / "unpaired", n=2)
    os.remove(f"{root}/labels/c1.nii.gz")
    with pytest.raises(DataError) as excinfo:
        FolderSource(root)
    _one_line(excinfo, f"{root}/images/c1.nii.gz", "no label file")


def test_bad_dataset_json(tmp_path):
    root = make_msd(tmp_path, n=2, test=0)
    meta = json.load(open(f"{root}/dataset.json"))
    meta["labels"] = {"0": "background", "2": "organ"}
    json.dump(meta, open(f"{root}/dataset.json", "w"))
    with pytest.raises(DataError) as excinfo:
        MSDSource(root)
    _one_line(excinfo, "dataset.json", "consecutive")
    open(f"{root}/dataset.json", "w").write("{not json")
    with pytest.raises(DataError) as excinfo:
        MSDSource(root)
    _one_line(excinfo, "dataset.json", "not valid JSON")


def test_split_ignores_case_order():
    cases = [sources.CaseFiles(f"c{i}", (f"c{i}.nii.gz",), "l.nii.gz") for i in range(20)]
    val = {c.name for c in sources.split_cases(cases, "val", 0.2)}
    assert len(val) == 4 and val == {c.name for c in sources.split_cases(cases[::-1], "val", 0.2)}
    train = {c.name for c in sources.split_cases(cases, "train", 0.2)}
    assert not train & val and len(train) == 16
    assert len(sources.split_cases(cases[:2], "val", 0.2)) == 1  # at least one when n >= 2


def test_synthetic_case_affine_follows_the_zyx_convention(tmp_path):
    """Axis 0 (depth) maps to RAS z: a synthetic case written as NIfTI reads back unchanged and RAS-oriented."""
    case = SyntheticSource("val", size=(12, 10, 8), spacing=(3.0, 2.0, 1.0), num_cases=1)[0]
    path = nifti.write_volume(case["label"].astype(np.int16), case["affine"], str(tmp_path / "label.nii.gz"))
    _, file_affine, axcodes = nifti.file_geometry(path)
    assert "".join(axcodes) == "RAS"
    np.testing.assert_allclose(np.diag(file_affine)[:3], (1.0, 2.0, 3.0))  # x, y, z spacings of the file
    back = nifti.read_label(path)
    np.testing.assert_array_equal(back.array, case["label"])
    np.testing.assert_allclose(back.affine, case["affine"])


def test_train_data_imports_nothing_above_it():
    """``train.data`` is the bottom layer of the app: no module in it imports another part of ``train``."""
    import ast
    import pathlib

    import train.data

    for path in sorted(pathlib.Path(train.data.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name == "train" or name.startswith("train."):
                    assert name.startswith("train.data"), f"{path.name}:{node.lineno} imports {name}"
