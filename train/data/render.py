"""Randomised rendering of a labelled T1 anatomy into a synthetic MR image.

The rendering keeps the real anatomy and its labels but randomises everything
a global intensity threshold could rely on, in the spirit of SynthSeg
(Billot et al., 2023):

1. geometry: a random affine (rotation, anisotropic scale) plus a smooth
   elastic displacement drawn on a coarse grid and upsampled; the image is
   resampled linearly and the labels follow by nearest neighbour;
2. contrast: a random mean intensity per tissue class (outside the head,
   other tissue inside the head such as CSF, grey matter, white matter). By
   default 48% of draws are T1-weighted-like, 16% T2-like and 16% FLAIR-like
   (grey matter brighter than white matter in both), each with jittered
   means, and 20% are arbitrary (SynthSeg-style, any ordering). The image is
   the real T1 passed through a piecewise-linear map whose knots sit at the
   template's class-mean T1 intensities, so texture and partial-volume detail
   of the real scan survive while the class means move;
3. a smooth multiplicative bias field and a random gamma;
4. acquisition: anisotropic blur, a lower (often thick-slice) resolution,
   Gaussian noise added at that resolution, and resampling back;
5. a z-score normalisation inside the head mask.

Every random draw comes from the `numpy.random.Generator` passed in, so a
rendering is a pure function of the inputs and the generator's state.
Functions work on (depth, height, width) arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """Ranges of the random draws. Lengths are in mm unless named `_vox`."""

    max_rotation_deg: float = 8.0
    max_scale: float = 0.08
    elastic_mm: float = 3.0  # upper bound of the displacement std
    elastic_grid_mm: float = 24.0  # spacing of the coarse control grid
    # A draw follows one of `contrasts` (keys of MR_CONTRASTS; repeat a key to
    # weight it) with probability `realistic_prob`, else fully random means.
    realistic_prob: float = 0.8
    contrasts: tuple[str, ...] = ("t1w", "t1w", "t1w", "t2w", "flair")
    min_contrast: float = 0.15  # between tissue classes that touch
    max_outside: float = 0.35  # outside the head stays dark, as in MRI
    bias_std: float = 0.4  # std of the log bias field (upper bound)
    bias_grid: int = 4  # control points per axis of the bias field
    max_log_gamma: float = 0.3
    max_blur_vox: float = 0.5  # extra blur on top of the low-res profile
    thick_slice_prob: float = 0.35
    thick_slice_factor: tuple[float, float] = (1.5, 2.5)
    max_lowres_factor: float = 1.3  # for the axes without thick slices
    noise_std: tuple[float, float] = (0.01, 0.05)

    def __post_init__(self):
        unknown = set(self.contrasts) - set(MR_CONTRASTS)
        if unknown or not self.contrasts:
            raise ValueError(f"contrasts={self.contrasts}: expected a non-empty subset of {sorted(MR_CONTRASTS)}")


# Ranges (low, high) of the class means of (outside the head, other tissue
# inside the head (CSF), grey matter, white matter) in common MR contrasts.
MR_CONTRASTS = {
    # The template itself sits at (0, 0.49, 0.78, 1.0) on this scale.
    "t1w": ((0.0, 0.15, 0.45, 0.75), (0.15, 0.55, 0.8, 1.0)),
    "t2w": ((0.0, 0.75, 0.4, 0.15), (0.15, 1.0, 0.65, 0.4)),
    "flair": ((0.0, 0.0, 0.55, 0.3), (0.15, 0.25, 0.9, 0.5)),
}


def resize(volume: np.ndarray, shape, order: int = 1) -> np.ndarray:
    """Resample `volume` to `shape` with voxel centres aligned (grid mode)."""
    coords = [
        (np.arange(n_new, dtype=np.float32) + 0.5) * (n_old / n_new) - 0.5 for n_old, n_new in zip(volume.shape, shape)
    ]
    grid = np.meshgrid(*coords, indexing="ij")
    return ndimage.map_coordinates(volume, grid, order=order, mode="nearest")


def random_deformation(
    rng: np.random.Generator, shape, spacing: float, config: RenderConfig = RenderConfig()
) -> np.ndarray:
    """Sample coordinates (3, D, H, W) of a random affine + elastic warp.

    Output voxel x reads the input at `coords[:, x]` (pull-back convention), so
    labels resampled with the same coordinates follow the image exactly.
    """
    shape = tuple(int(n) for n in shape)
    angles = np.deg2rad(rng.uniform(-1, 1, 3) * config.max_rotation_deg)
    rot = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    matrix = rot @ np.diag(1.0 + rng.uniform(-1, 1, 3) * config.max_scale)
    centre = (np.asarray(shape, np.float64) - 1) / 2

    # Elastic part: Gaussian control points on a coarse grid, upsampled with
    # cubic splines so the field is smooth at the scale of the grid.
    grid_shape = [max(2, round(n * spacing / config.elastic_grid_mm) + 1) for n in shape]
    std_vox = rng.uniform(0, config.elastic_mm) / spacing
    coarse = rng.normal(0, std_vox, (3, *grid_shape)).astype(np.float32)
    disp = np.stack([resize(c, shape, order=3) for c in coarse])

    index = np.indices(shape, dtype=np.float32).reshape(3, -1)
    moved = matrix.astype(np.float32) @ (index - centre[:, None].astype(np.float32))
    coords = moved.reshape(3, *shape) + centre.reshape(3, 1, 1, 1).astype(np.float32)
    return coords + disp


def warp(volume: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    """Resample `volume` at `coords` (edge values extend past the border).

    `mode='nearest'` keeps the rendering inside the volume it was given: no
    voxel outside the input array can leak in.
    """
    return ndimage.map_coordinates(volume, coords, order=order, mode="nearest")


def random_class_means(rng: np.random.Generator, low, high, touching, min_contrast: float) -> np.ndarray:
    """Draw a mean intensity in [low[k], high[k]] per class k (rejection).

    Classes listed as pairs in `touching` (they share boundaries) differ by at
    least `min_contrast`, so every boundary that defines a label stays visible.
    Any ordering is allowed, e.g. grey matter brighter than white matter.
    """
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    for _ in range(1000):
        means = rng.uniform(low, high)
        if all(abs(means[a] - means[b]) >= min_contrast for a, b in touching):
            return means
    raise ValueError(f"min_contrast={min_contrast} is too large to satisfy")


def remap_intensity(t1: np.ndarray, knots_in, knots_out) -> np.ndarray:
    """Piecewise-linear map of `t1` through (knots_in -> knots_out).

    The map is continuous, so it creates no edge the real scan does not have.
    Beyond the last knot the last segment is extended, so the bright end of the
    white matter keeps its texture instead of being clipped.
    """
    knots_in = np.asarray(knots_in, np.float64)
    knots_out = np.asarray(knots_out, np.float64)
    if np.any(np.diff(knots_in) <= 0):
        raise ValueError(f"knots_in must increase strictly, got {knots_in}")
    slope = (knots_out[-1] - knots_out[-2]) / (knots_in[-1] - knots_in[-2])
    top = max(float(t1.max()), knots_in[-1]) + 1.0
    xs = np.append(knots_in, top)
    ys = np.append(knots_out, knots_out[-1] + slope * (top - knots_in[-1]))
    return np.interp(t1, xs, ys).astype(np.float32)


def bias_field(rng: np.random.Generator, shape, std: float, grid: int) -> np.ndarray:
    """A smooth positive multiplicative field: exp of an upsampled coarse field."""
    coarse = rng.normal(0, std, (grid,) * 3).astype(np.float32)
    return np.exp(resize(coarse, shape, order=3))


def degrade(rng: np.random.Generator, image: np.ndarray, config: RenderConfig = RenderConfig()) -> np.ndarray:
    """Blur, acquire at a lower resolution with noise, resample back."""
    factors = rng.uniform(1.0, config.max_lowres_factor, 3)
    if rng.uniform() < config.thick_slice_prob:
        factors[rng.integers(3)] = rng.uniform(*config.thick_slice_factor)
    # A Gaussian with the variance of the low-res voxel's box profile (zero at
    # full resolution, so some renderings stay sharp), plus extra blur.
    sigma = np.sqrt((factors**2 - 1) / 12) + rng.uniform(0, config.max_blur_vox, 3) * (rng.uniform() < 0.5)
    blurred = ndimage.gaussian_filter(image, sigma, mode="nearest")
    low_shape = [max(2, round(float(n / f))) for n, f in zip(image.shape, factors)]
    low = resize(blurred, low_shape, order=1)
    scale = float(np.percentile(np.abs(image), 99)) or 1.0
    low = low + rng.normal(0, rng.uniform(*config.noise_std) * scale, low.shape).astype(np.float32)
    return resize(low, image.shape, order=1)


def zscore(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Normalise to zero mean and unit variance inside `mask`."""
    inside = image[mask]
    if inside.size == 0:
        raise ValueError("cannot normalise: the head mask is empty")
    std = float(inside.std()) or 1.0
    return ((image - float(inside.mean())) / std).astype(np.float32)


def render(
    rng: np.random.Generator,
    t1: np.ndarray,
    label: np.ndarray,
    head: np.ndarray,
    class_t1: np.ndarray,
    spacing: float,
    config: RenderConfig = RenderConfig(),
):
    """Render one random image of the anatomy `t1` with labels `label`.

    Args:
      rng: the source of all randomness.
      t1: (D, H, W) real T1 intensities.
      label: (D, H, W) int labels (0 background, 1 grey matter, 2 white matter).
      head: (D, H, W) float fraction of each voxel inside the head mask.
      class_t1: mean T1 intensity of (outside head, other tissue inside the
        head, grey matter, white matter), increasing; the knots of the remap.
      spacing: voxel size in mm (isotropic), to express deformations in mm.
      config: the ranges of the random draws.

    Returns:
      (image float32 (D, H, W) z-scored in the head mask, label int32 (D, H, W)).
    """
    coords = random_deformation(rng, t1.shape, spacing, config)
    t1_w = warp(t1.astype(np.float32), coords, order=1)
    label_w = warp(label.astype(np.int32), coords, order=0).astype(np.int32)
    head_w = warp(head.astype(np.float32), coords, order=1) > 0.5

    # Classes: 0 outside, 1 other inside the head, 2 grey matter, 3 white matter.
    # Most draws follow a common MR contrast, so a network can learn them from
    # few examples; the rest are arbitrary, SynthSeg-style. Pairs that share
    # label-defining boundaries must stay distinguishable.
    if rng.uniform() < config.realistic_prob:
        name = config.contrasts[rng.integers(len(config.contrasts))]
        low, high = MR_CONTRASTS[name]
    else:
        low, high = (0, 0, 0, 0), (config.max_outside, 1, 1, 1)
    touching = [(2, 3), (1, 2), (0, 2), (1, 3)]
    means = random_class_means(rng, low, high, touching, config.min_contrast)
    image = remap_intensity(t1_w, class_t1, means)
    image = image * bias_field(rng, image.shape, rng.uniform(0, config.bias_std), config.bias_grid)
    lo, hi = float(image.min()), float(image.max())
    gamma = np.exp(rng.uniform(-1, 1) * config.max_log_gamma)
    image = ((image - lo) / max(hi - lo, 1e-6)) ** gamma
    image = degrade(rng, image.astype(np.float32), config)
    return zscore(image, head_w), label_w
