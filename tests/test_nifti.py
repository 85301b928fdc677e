"""NIfTI I/O: orientation, geometry, resampling, normalisation, bad files."""

import gzip

import chex
import numpy as np
import pytest

from train.data import nifti
from train.data.nifti import DataError

# A file stored P-S-L: axis 0 runs anterior -> posterior (2 mm), axis 1
# inferior -> superior (3 mm), axis 2 right -> left (0.7 mm).
PSL_AFFINE = np.array(
    [[0.0, 0.0, -0.7, 50.0], [-2.0, 0.0, 0.0, 30.0], [0.0, 3.0, 0.0, -20.0], [0.0, 0.0, 0.0, 1.0]]
)
PSL_SHAPE = (10, 12, 7)


def _world(affine, index):
    return affine[:3, :3] @ np.asarray(index, np.float64) + affine[:3, 3]


@pytest.fixture
def psl_file(tmp_path):
    data = np.arange(np.prod(PSL_SHAPE), dtype=np.float32).reshape(PSL_SHAPE)
    return nifti.write_file(data, PSL_AFFINE, str(tmp_path / "psl.nii.gz")), data


def test_mni_t1_round_trip(mni_t1_path, tmp_path):
    vol = nifti.read_volume(mni_t1_path)
    assert vol.array.shape == (189, 233, 197)  # (z, y, x) of a 197x233x189 RAS file
    chex.assert_trees_all_close(vol.spacing, np.ones(3))
    out = nifti.write_like(vol.array, mni_t1_path, str(tmp_path / "t1.nii.gz"))
    ref_shape, ref_affine, ref_codes = nifti.file_geometry(mni_t1_path)
    shape, affine, codes = nifti.file_geometry(out)
    assert (shape, codes) == (ref_shape, ref_codes) == ((197, 233, 189), "RAS")
    np.testing.assert_array_equal(affine, ref_affine)
    back = nifti.read_volume(out)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_array_equal(back.affine, vol.affine)


def test_non_ras_file_reads_canonical_and_writes_back(psl_file, tmp_path):
    path, data = psl_file
    vol = nifti.read_volume(path)
    # depth = superior axis (file axis 1), height = anterior (file axis 0), width = right (file axis 2).
    assert vol.array.shape == (12, 10, 7)
    np.testing.assert_allclose(vol.spacing, [3.0, 2.0, 0.7], rtol=1e-6)
    assert np.all(np.diag(vol.affine[:3, [2, 1, 0]]) > 0)  # width->R, height->A, depth->S
    # Every voxel keeps its world position.
    _, file_affine, _ = nifti.file_geometry(path)
    for file_index in [(0, 0, 0), (9, 11, 6), (3, 5, 2), (7, 1, 4)]:
        value = data[file_index]
        mem_index = np.argwhere(vol.array == value)[0]
        np.testing.assert_allclose(_world(vol.affine, mem_index), _world(file_affine, file_index), atol=1e-4)

    assert nifti.memory_shape(path) == vol.array.shape
    out = nifti.write_like(vol.array, path, str(tmp_path / "out.nii"))
    assert nifti.file_geometry(out)[0] == PSL_SHAPE
    assert nifti.file_geometry(out)[2] == "PSL"
    np.testing.assert_array_equal(nifti.file_geometry(out)[1], file_affine)
    np.testing.assert_array_equal(nifti.read_volume(out).array, vol.array)


def test_write_like_labels_and_channels(psl_file, tmp_path):
    path, _ = psl_file
    vol = nifti.read_volume(path)
    label = (vol.array % 3).astype(np.int64)
    out = nifti.write_like(label, path, str(tmp_path / "seg.nii.gz"))
    back = nifti.read_label(out)
    assert back.array.dtype == np.int32
    np.testing.assert_array_equal(back.array, label)
    probs = np.stack([vol.array, -vol.array], axis=-1)
    out = nifti.write_like(probs, path, str(tmp_path / "probs.nii.gz"))
    assert nifti.file_geometry(out)[0] == PSL_SHAPE + (2,)
    np.testing.assert_array_equal(nifti.read_volume(out, channels=True).array, probs)


def test_write_volume_round_trip(psl_file, tmp_path):
    vol = nifti.read_volume(psl_file[0])
    out = nifti.write_volume(vol.array, vol.affine, str(tmp_path / "ras.nii.gz"))
    assert nifti.file_geometry(out)[2] == "RAS"
    back = nifti.read_volume(out)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)


def test_resample_changes_shape_by_spacing_ratio(psl_file, tmp_path):
    path, _ = psl_file
    vol = nifti.read_volume(path)
    out = nifti.resample(vol, (1.0, 1.0, 1.0), order=1)
    assert out.array.shape == (36, 20, 5)  # (12*3, 10*2, round(7*0.7))
    np.testing.assert_allclose(out.spacing, [1.0, 1.0, 0.98], rtol=1e-6)
    # The field of view keeps its centre and extent.
    centre = lambda v: _world(v.affine, (np.array(v.array.shape) - 1) / 2)  # noqa: E731
    np.testing.assert_allclose(centre(out), centre(vol), atol=1e-4)
    np.testing.assert_allclose(np.array(out.array.shape) * out.spacing, np.array(vol.array.shape) * vol.spacing,
                               rtol=1e-6)
    assert out.array.min() >= vol.array.min() and out.array.max() <= vol.array.max()

    label = nifti.Volume((vol.array % 4).astype(np.int32), vol.affine, vol.spacing)
    coarse = nifti.resample(label, (6.0, 4.0, 2.1), order=0)
    assert coarse.array.shape == (6, 5, 2)
    assert set(np.unique(coarse.array)) <= set(np.unique(label.array))
    # A prediction made on the resampled grid is written back onto the reference grid.
    written = nifti.write_like(coarse.array, path, str(tmp_path / "coarse.nii.gz"))
    assert nifti.file_geometry(written)[0] == PSL_SHAPE


def test_normalize():
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 2000, (8, 8, 8)).astype(np.float32)
    windowed = nifti.normalize(ct, "CT", window=(-100.0, 300.0))
    assert windowed.min() == 0.0 and windowed.max() == 1.0
    np.testing.assert_allclose(windowed, np.clip((ct + 100) / 400, 0, 1), atol=1e-6)
    pct = nifti.normalize(ct, "ct")
    assert pct.min() == 0.0 and pct.max() == 1.0

    mr = np.zeros((8, 8, 8), np.float32)
    mr[2:6, 2:6, 2:6] = rng.normal(500, 50, (4, 4, 4))
    z = nifti.normalize(mr, "T1w")
    fg = mr > 0
    assert abs(z[fg].mean()) < 1e-4 and abs(z[fg].std() - 1) < 1e-4
    assert np.all(z[~fg] < z[fg].min())
    np.testing.assert_array_equal(nifti.normalize(mr, "noNorm"), mr)


def _assert_one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_truncated_file(psl_file, tmp_path):
    path, _ = psl_file
    blob = open(path, "rb").read()
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as excinfo:
        nifti.read_volume(str(bad))
    _assert_one_line(excinfo, str(bad), "truncated")


def test_not_nifti_and_missing(tmp_path):
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"not a nifti header"))
    with pytest.raises(DataError) as excinfo:
        nifti.read_volume(str(junk))
    _assert_one_line(excinfo, str(junk))
    with pytest.raises(DataError) as excinfo:
        nifti.read_label(str(tmp_path / "absent.nii.gz"))
    _assert_one_line(excinfo, "absent.nii.gz", "not found")


def test_nan_and_4d_and_non_integer_labels(tmp_path):
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    nan_path = nifti.write_file(data, np.eye(4), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(DataError) as excinfo:
        nifti.read_volume(nan_path)
    _assert_one_line(excinfo, nan_path, "2 NaN or Inf")

    four_d = nifti.write_file(np.ones((4, 4, 4, 2), np.float32), np.eye(4), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(DataError) as excinfo:
        nifti.read_volume(four_d)
    _assert_one_line(excinfo, four_d, "expected a 3D image", "4D")
    with pytest.raises(DataError) as excinfo:
        nifti.read_label(four_d)
    _assert_one_line(excinfo, four_d, "3D label")
    assert nifti.read_volume(four_d, channels=True).array.shape == (4, 4, 4, 2)

    frac = nifti.write_file(np.full((4, 4, 4), 0.5, np.float32), np.eye(4), str(tmp_path / "frac.nii.gz"))
    with pytest.raises(DataError) as excinfo:
        nifti.read_label(frac)
    _assert_one_line(excinfo, frac, "non-integer")
