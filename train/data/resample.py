"""Resampling between grids in world coordinates: arrays with 4x4 affines.

A grid is a shape ``(D, H, W)`` and an affine ``A`` (float64, 4x4) mapping the
voxel indices ``(d, h, w, 1)`` of the array as it lies in memory to world
millimetres (RAS+), the convention of :mod:`train.data.nifti`: after
``read_volume``, ``A @ (d, h, w, 1)`` is the world position of the centre of
``array[d, h, w]``. The affine may be oblique (a rotation that is not a
permutation): ``read_volume`` only flips and permutes axes towards RAS, so an
oblique scan keeps its rotation.

Why world coordinates and not voxel indices are the contract: a teacher and a
student see the same anatomy on different grids. A 3D teacher runs on a
low-resolution resampling of the case (another spacing, and a field of view
whose first voxel centre lies elsewhere), a 2D student sees a high-resolution
slice or a patch cropped at some offset, and a second scan of the case may be
acquired at another orientation. Indices of one grid mean nothing on
another; the world position of a voxel centre is the one quantity both agree
on. So every grid carries its affine (:func:`crop_affine` for a patch,
:func:`slice_affine` for a slice), and :func:`resample_to_grid` maps each
destination voxel centre to world millimetres and then into the source's
continuous voxel coordinates, ``inv(A_src) @ A_dst @ (d, h, w, 1)``.

Values are interpolated on the host with ``scipy.ndimage.map_coordinates``
(the teacher's logits and the student's patches are numpy arrays in the data
pipeline): order 1 (trilinear) for images and logits, order 0 (nearest) for
label maps. Interpolating logits linearly is the usual choice for
distillation; the temperature is applied to the resampled logits.

Valid-voxel convention: a destination voxel is valid when its centre lies in
the box spanned by the source's voxel centres, ``0 <= c_i <= n_i - 1`` on
every axis (to 1e-6 voxel), widened by ``margin`` voxels when given
(``margin=0.5`` is the source's full voxel extent). Inside that box trilinear
interpolation uses real data only; outside it the returned values are the
nearest edge values (finite, but made up) and a loss must mask them out with
the returned ``valid`` array. A source axis of size 1 (a single slice) is valid
only on its plane, within ``margin``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

# Slack for the valid box in voxels: coordinates computed through two affines
# carry rounding error, and a grid resampled onto itself must be valid everywhere.
_EPS = 1e-6
# Destination voxels per block: bounds the float64 coordinate arrays (24 bytes a voxel).
_BLOCK = 1 << 20


def _check_affine(affine, name: str) -> np.ndarray:
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{name} must be a 4x4 matrix, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{name} must be finite and invertible, got {affine.tolist()}")
    return affine


def _check_shape(shape, name: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{name} must be 3 positive sizes (D, H, W), got {shape}")
    return shape


def grid_affine(
    spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0), rotation: np.ndarray | None = None
) -> np.ndarray:
    """The affine of a grid with ``spacing`` (mm, per ``(d, h, w)`` axis).

    Column ``i`` of the result is ``spacing[i]`` times column ``i`` of
    ``rotation`` (a 3x3 orthonormal matrix, default identity: axis d along
    world x), and voxel ``(0, 0, 0)`` sits at ``origin`` (world mm).
    """
    spacing = np.asarray(spacing, np.float64).reshape(-1)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing must be 3 positive numbers (d, h, w), got {spacing.tolist()}")
    rotation = np.eye(3) if rotation is None else np.asarray(rotation, np.float64)
    if rotation.shape != (3, 3) or not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-6):
        raise ValueError(f"rotation must be an orthonormal 3x3 matrix, got {rotation.tolist()}")
    affine = np.eye(4)
    affine[:3, :3] = rotation * spacing
    affine[:3, 3] = np.asarray(origin, np.float64).reshape(3)
    return affine


def crop_affine(affine: np.ndarray, start: Sequence[int], step: Sequence[int] | int = 1) -> np.ndarray:
    """The affine of ``array[d0::s0, h0::s1, w0::s2]`` given the affine of ``array``.

    ``start`` is the crop's first voxel ``(d0, h0, w0)`` in the parent grid
    (a patch sampled at that offset); ``step`` the stride (1 for a patch, f
    for labels subsampled every f voxels). Voxel ``j`` of the crop is voxel
    ``start + step * j`` of the parent, so the crop's affine is
    ``affine @ [[diag(step), start], [0, 1]]``.
    """
    affine = _check_affine(affine, "affine")
    start = np.asarray(start, np.float64).reshape(-1)
    step = np.broadcast_to(np.asarray(step, np.float64), (3,))
    if start.shape != (3,):
        raise ValueError(f"start must be 3 indices (d, h, w), got {start.tolist()}")
    local = np.eye(4)
    local[:3, :3] = np.diag(step)
    local[:3, 3] = start
    return affine @ local


def slice_affine(affine: np.ndarray, index: int, axis: int = 0) -> np.ndarray:
    """The affine of slice ``index`` along ``axis`` of a volume, as a 3D grid.

    The slice is the grid of the volume's shape with ``shape[axis] = 1``
    (``volume[index:index + 1]`` for ``axis=0``, an axial slice); a 2D image
    ``(H, W)`` of it is that grid without its singleton axis. Resampling onto
    this grid gives the slice's values at its own voxel centres.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (d, h, w), got {axis}")
    start = [0, 0, 0]
    start[axis] = int(index)
    return crop_affine(affine, start)


def world_coordinates(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World positions (mm) of every voxel centre of a grid, shape ``(*shape, 3)``."""
    shape = _check_shape(shape, "shape")
    affine = _check_affine(affine, "affine")
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    world = affine[:3, :3] @ index + affine[:3, 3:]
    return world.T.reshape(shape + (3,))


def voxel_coordinates(world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Continuous voxel coordinates ``(..., 3)`` of world positions ``(..., 3)`` in a grid."""
    inverse = np.linalg.inv(_check_affine(affine, "affine"))
    world = np.asarray(world, np.float64)
    return world @ inverse[:3, :3].T + inverse[:3, 3]


def resample_to_grid(
    values: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: Sequence[int],
    dst_affine: np.ndarray,
    *,
    order: int = 1,
    channel_axis: int | None = None,
    margin: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``values`` (on the grid of ``src_affine``) at the voxel centres of another grid.

    Args:
      values: ``(D, H, W)``, or with a channel axis (e.g. ``(D, H, W, K)``
        logits with ``channel_axis=-1``).
      src_affine: 4x4, the ``(d, h, w)`` voxel -> world mm map of ``values``.
      dst_shape: ``(D', H', W')`` of the destination grid (a slice: one size 1).
      dst_affine: 4x4, the destination's voxel -> world mm map.
      order: 1 trilinear (images, logits), 0 nearest (labels).
      channel_axis: None when ``values`` is 3D, else the axis holding
        channels; it is the last axis of the result.
      margin: widen the valid box by this many source voxels (see the module
        docstring); values there are edge values.

    Returns:
      ``(resampled, valid)``: ``resampled`` of shape ``dst_shape`` (plus
      trailing channels), the dtype of ``values`` for ``order=0`` and
      floating (float32 unless ``values`` is float64) for ``order=1``;
      ``valid`` a bool ``dst_shape`` array, True where the destination voxel
      centre lies within the source's voxel centres (module docstring).
    """
    values = np.asarray(values)
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest, labels) or 1 (trilinear), got {order}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0 voxels, got {margin}")
    rank = 3 if channel_axis is None else 4
    if values.ndim != rank:
        want = "(D, H, W)" if channel_axis is None else f"4D with channels on axis {channel_axis}"
        raise ValueError(f"values must be {want}, got shape {values.shape}")
    if channel_axis is not None:
        values = np.moveaxis(values, channel_axis, -1)
    else:
        values = values[..., None]
    src_affine = _check_affine(src_affine, "src_affine")
    dst_affine = _check_affine(dst_affine, "dst_affine")
    dst_shape = _check_shape(dst_shape, "dst_shape")
    if order == 1 and values.dtype != np.float64:
        values = values.astype(np.float32)

    # Destination index -> world -> source index, one affine map.
    to_src = np.linalg.solve(src_affine, dst_affine)
    src_size = np.asarray(values.shape[:3], np.float64)[:, None]
    n = int(np.prod(dst_shape))
    out = np.empty((n, values.shape[-1]), values.dtype)
    valid = np.empty(n, bool)
    for begin in range(0, n, _BLOCK):
        flat = np.arange(begin, min(begin + _BLOCK, n))
        index = np.stack(np.unravel_index(flat, dst_shape)).astype(np.float64)
        coords = to_src[:3, :3] @ index + to_src[:3, 3:]
        low, high = -margin - _EPS, src_size - 1 + margin + _EPS
        valid[flat] = np.all((coords >= low) & (coords <= high), axis=0)
        for c in range(values.shape[-1]):
            # 'nearest' extends the edge values, so voxels just outside the box are finite.
            out[flat, c] = ndimage.map_coordinates(values[..., c], coords, order=order, mode="nearest", prefilter=False)
    out = out.reshape(dst_shape + (values.shape[-1],))
    if channel_axis is None:
        out = out[..., 0]
    return out, valid.reshape(dst_shape)
