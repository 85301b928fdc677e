"""NIfTI reading and writing, resampling and intensity normalisation.

This is the only module that imports nibabel. Volumes are returned in the
in-memory layout used everywhere in ``train``: the file is reoriented to the
closest canonical RAS+ orientation (axes flipped and permuted, never
interpolated) and transposed to ``(z, y, x)``, so axis 0 (depth) runs
inferior -> superior, axis 1 (height) posterior -> anterior and axis 2 (width)
left -> right. The affine returned with an array maps its ``(d, h, w)`` voxel
indices to RAS millimetres, and ``spacing`` is in the same ``(d, h, w)`` order.

:func:`write_like` undoes both steps, writing an array computed on that grid
back in the reference file's own orientation and with its affine, so the
result overlays the reference in any viewer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MODALITIES = ("ct", "mr", "none")

# The permutation between canonical (x, y, z) file axes and (z, y, x) memory axes.
_TO_MEMORY = (2, 1, 0)


class DataError(ValueError):
    """A data file or data set description is unusable; the message names it."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclasses.dataclass(frozen=True)
class Volume:
    """An array in the in-memory layout with its geometry.

    Attributes:
      array: ``(D, H, W)`` or ``(D, H, W, C)``.
      affine: float64 ``(4, 4)`` mapping ``(d, h, w)`` indices to RAS mm.
      spacing: float64 ``(3,)`` voxel size in mm, ``(d, h, w)`` order.
      path: the file it came from ('' when made in memory).
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: np.ndarray
    path: str = ""


def is_nifti(path: str) -> bool:
    """Whether ``path`` has a NIfTI file name (``.nii`` or ``.nii.gz``)."""
    return str(path).endswith(NIFTI_SUFFIXES)


def strip_suffix(filename: str) -> str:
    """``'case_01.nii.gz'`` -> ``'case_01'``."""
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


def _load(path: str):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise DataError(f"{path}: not a readable NIfTI file ({_one_line(exc)})") from None


def _read_array(img, path: str, dtype) -> np.ndarray:
    try:
        if np.issubdtype(dtype, np.floating):
            return img.get_fdata(dtype=dtype)
        return np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip streams raise EOFError, zlib.error, OSError...
        raise DataError(f"{path}: cannot read voxel data, file truncated or corrupt ({_one_line(exc)})") from None


def _spatial_ornt(affine: np.ndarray) -> np.ndarray:
    return orientations.io_orientation(affine)


def _to_memory(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """File array and affine -> canonical RAS -> (z, y, x) layout."""
    ornt = _spatial_ornt(affine)
    affine = affine @ orientations.inv_ornt_aff(ornt, data.shape[:3])
    data = orientations.apply_orientation(data, ornt)
    perm = _TO_MEMORY + tuple(range(3, data.ndim))
    data = np.transpose(data, perm)
    mem_affine = affine.copy()
    mem_affine[:, :3] = affine[:, list(_TO_MEMORY)]
    return data, mem_affine


def _from_memory(data: np.ndarray, file_affine: np.ndarray) -> np.ndarray:
    """(z, y, x) layout -> canonical RAS -> the orientation of ``file_affine``."""
    perm = _TO_MEMORY + tuple(range(3, data.ndim))
    data = np.transpose(data, perm)
    ornt = _spatial_ornt(file_affine)
    back = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), ornt)
    return orientations.apply_orientation(data, back)


def memory_shape(path: str) -> tuple[int, int, int]:
    """The ``(D, H, W)`` shape :func:`read_volume` gives for ``path``, from its header."""
    img = _load(path)
    return _memory_shape(img.shape[:3], img.affine)


def _memory_shape(file_shape, affine) -> tuple[int, int, int]:
    canonical = [0, 0, 0]
    for axis, (ras_axis, _) in enumerate(_spatial_ornt(affine)):
        canonical[int(ras_axis)] = int(file_shape[axis])
    return tuple(canonical[i] for i in _TO_MEMORY)


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def read_volume(path: str, *, channels: bool = False) -> Volume:
    """Reads an image as float32 in the in-memory layout.

    Args:
      path: a ``.nii`` or ``.nii.gz`` file.
      channels: return ``(D, H, W, C)``, the fourth axis of a 4D file (or a
        single channel for a 3D file). When False the result is ``(D, H, W)``
        and a 4D file is an error unless its fourth axis has size 1.

    Raises:
      DataError: missing, unreadable or truncated file, wrong rank, NaN or
        Inf voxels.
    """
    path = os.fspath(path)
    img = _load(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 3 and channels:
        shape = shape + (1,)
    elif len(shape) == 4 and shape[3] == 1 and not channels:
        shape = shape[:3]
    if len(shape) != (4 if channels else 3):
        want = "a 3D or 4D image" if channels else "a 3D image"
        raise DataError(f"{path}: expected {want}, got {img.ndim}D shape {tuple(img.shape)}")
    data = _read_array(img, path, np.float32).reshape(shape)
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(f"{path}: {bad} NaN or Inf voxels")
    data, affine = _to_memory(data, np.asarray(img.affine, np.float64))
    return Volume(np.ascontiguousarray(data, np.float32), affine, _spacing(affine), path)


def read_label(path: str) -> Volume:
    """Reads a 3D label map as int32 in the in-memory layout.

    Raises:
      DataError: missing or unreadable file, not 3D, non-integer or non-finite
        values.
    """
    path = os.fspath(path)
    img = _load(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3D label map, got {len(shape)}D shape {shape}")
    # The stored integers when the file has no scaling; floats otherwise.
    labels = _read_array(img, path, np.int32).reshape(shape)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.isfinite(labels).all():
            raise DataError(f"{path}: label map has NaN or Inf voxels")
        if not np.array_equal(np.rint(labels), labels):
            raise DataError(f"{path}: label map has non-integer values")
    if labels.size and (labels.min() < np.iinfo(np.int32).min or labels.max() > np.iinfo(np.int32).max):
        raise DataError(f"{path}: label values do not fit in int32")
    data, affine = _to_memory(labels.astype(np.int32), np.asarray(img.affine, np.float64))
    return Volume(np.ascontiguousarray(data), affine, _spacing(affine), path)


def _output_dtype(array: np.ndarray) -> np.dtype:
    if array.dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return np.dtype(dtype)
        raise TypeError(f"write: integer values {lo}..{hi} do not fit in int32")
    return np.dtype(np.float32)


def write_like(array: np.ndarray, reference: str, out_path: str) -> str:
    """Writes an in-memory-layout array on the grid of ``reference``.

    ``array`` is ``(D, H, W)`` or ``(D, H, W, C)`` in the layout
    :func:`read_volume` returns for ``reference``. If its spatial shape differs
    (a prediction made at another spacing by :func:`resample`), it is resampled
    back to the reference grid: nearest neighbour for integer arrays, linear
    otherwise. The file gets the reference's orientation, affine, sform/qform
    and header fields, so it overlays the reference in any viewer. Integer
    arrays are stored as the smallest of uint8/int16/int32 that holds them,
    everything else as float32.

    Returns:
      ``out_path``.
    """
    reference = os.fspath(reference)
    out_path = os.fspath(out_path)
    if not is_nifti(out_path):
        raise ValueError(f"write_like: out_path must end in .nii or .nii.gz, got {out_path!r}")
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"write_like: array must be (D, H, W) or (D, H, W, C), got shape {array.shape}")
    ref = _load(reference)
    mem_shape = _memory_shape(ref.shape[:3], ref.affine)
    if array.shape[:3] != mem_shape:
        order = 0 if (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_) else 1
        array = resize(array, mem_shape, order=order)
    dtype = _output_dtype(array)
    data = _from_memory(array.astype(dtype, copy=False), np.asarray(ref.affine, np.float64))
    header = ref.header.copy()
    header.set_data_dtype(dtype)
    header.set_data_shape(data.shape)
    img = nib.Nifti1Image(data, ref.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    nib.save(img, out_path)
    return out_path


def write_volume(array: np.ndarray, affine: np.ndarray, out_path: str) -> str:
    """Writes an in-memory-layout array with its ``(d, h, w)`` affine.

    The file is stored in canonical RAS+ orientation; :func:`read_volume` gives
    back the same array and affine.
    """
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"write_volume: array must be (D, H, W) or (D, H, W, C), got shape {array.shape}")
    affine = np.asarray(affine, np.float64)
    file_affine = affine.copy()
    file_affine[:, :3] = affine[:, list(_TO_MEMORY)]
    data = np.transpose(array, _TO_MEMORY + tuple(range(3, array.ndim)))
    return write_file(data.astype(_output_dtype(data), copy=False), file_affine, out_path)


def write_file(data: np.ndarray, affine: np.ndarray, out_path: str) -> str:
    """Writes ``data`` exactly as given (file axis order) with ``affine``.

    For making files in any orientation (tests, exports); no reorientation.
    """
    out_path = os.fspath(out_path)
    if not is_nifti(out_path):
        raise ValueError(f"write_file: out_path must end in .nii or .nii.gz, got {out_path!r}")
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(np.asarray(affine, np.float64), code=1)
    img.set_sform(np.asarray(affine, np.float64), code=1)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    nib.save(img, out_path)
    return out_path


def file_geometry(path: str) -> tuple[tuple[int, ...], np.ndarray, str]:
    """``(file shape, file affine, axis codes)`` from the header alone."""
    img = _load(path)
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, np.float64), "".join(nib.aff2axcodes(img.affine))


# --------------------------------------------------------------------------
# Resampling


def resize(array: np.ndarray, shape: Sequence[int], *, order: int) -> np.ndarray:
    """Resamples the three leading axes to ``shape`` keeping the field of view.

    Voxel edges stay aligned (``grid_mode``): voxel ``j`` of the output sits at
    input coordinate ``(j + 0.5) / z - 0.5`` with ``z = shape / input shape``.
    ``order`` 0 is nearest neighbour (labels), 1 linear (images).
    """
    shape = tuple(int(s) for s in shape)
    factors = [new / old for new, old in zip(shape, array.shape[:3])] + [1.0] * (array.ndim - 3)
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True, prefilter=False)
    if out.shape[:3] != shape:  # zoom rounds the output shape; guard against float error
        raise AssertionError(f"resize produced {out.shape[:3]}, wanted {shape}")
    return out


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """The shape that covers the same field of view at ``target`` spacing."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample(volume: Volume, target_spacing: Sequence[float], *, order: int) -> Volume:
    """Resamples a volume to ``target_spacing`` (mm, ``(d, h, w)``).

    Linear (``order=1``) for images, nearest (``order=0``) for labels. The
    shape changes by the spacing ratio (rounded), the affine keeps the field of
    view, and the returned spacing is the exact one of the new grid.
    """
    target = np.asarray(target_spacing, np.float64).reshape(-1)
    if target.shape != (3,) or not np.all(target > 0):
        raise ValueError(f"spacing must be 3 positive numbers (d, h, w), got {target_spacing!r}")
    old_shape = np.array(volume.array.shape[:3])
    new_shape = resampled_shape(old_shape, volume.spacing, target)
    if tuple(new_shape) == tuple(old_shape):
        return volume
    array = resize(volume.array, new_shape, order=order)
    inv_zoom = old_shape / np.array(new_shape)
    step = np.eye(4)
    step[:3, :3] = np.diag(inv_zoom)
    step[:3, 3] = (inv_zoom - 1.0) / 2.0
    affine = volume.affine @ step
    return Volume(array, affine, _spacing(affine), volume.path)


# --------------------------------------------------------------------------
# Intensity normalisation


def modality_kind(name: str) -> str:
    """Maps a modality or channel name to ``'ct'``, ``'mr'`` or ``'none'``.

    'CT' (any case) is CT; 'none'/'noNorm' skip normalisation; every other name
    (MRI, T1w, FLAIR, ADC, ...) is normalised like MR.
    """
    key = str(name).strip().lower()
    if key == "ct":
        return "ct"
    if key in ("none", "nonorm"):
        return "none"
    return "mr"


def normalize(
    image: np.ndarray,
    modality: str,
    *,
    window: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Normalises one channel's intensities.

    - ``'ct'``: clip to ``window`` (Hounsfield units, e.g. ``(-160, 240)``), or
      when it is None to the volume's ``percentiles``, then scale the clipped
      range linearly to [0, 1].
    - ``'mr'``: z-score with the mean and standard deviation of the
      foreground, the voxels above the volume's minimum (the background of
      skull-stripped or masked MR is a constant floor); all voxels when fewer
      than 1% are above it.
    - ``'none'``: unchanged.
    """
    kind = modality_kind(modality)
    x = np.asarray(image, np.float32)
    if kind == "none":
        return x
    if kind == "ct":
        if window is None:
            lo, hi = np.percentile(x, percentiles)
        else:
            lo, hi = window
            if not hi > lo:
                raise ValueError(f"window must be (low, high) with high > low, got {window!r}")
        x = np.clip(x, lo, hi)
        return ((x - lo) / max(float(hi - lo), 1e-6)).astype(np.float32)
    mask = x > x.min()
    if mask.sum() < 0.01 * x.size:
        mask = np.ones_like(mask)
    fg = x[mask]
    std = float(fg.std())
    return ((x - float(fg.mean())) / (std if std > 1e-6 else 1.0)).astype(np.float32)
