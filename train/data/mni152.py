"""The built-in demo data: randomised renderings of the MNI152 2009a template.

nilearn's wheel ships the ICBM152 2009a nonlinear symmetric T1 template (a
skull-stripped brain) and its grey- and white-matter probability maps
(197 x 233 x 189 at 1 mm). On the raw template a single global intensity band
segments grey and white matter with Dice ~0.96, because the maps were derived
from the same intensities; a demo on it cannot tell models apart. This source
therefore serves renderings (see `train.data.render`) that keep the real
anatomy and labels but randomise deformation, tissue contrast, bias field,
resolution, blur and noise, so no global threshold works.

Labels: grey matter where p_gm > 0.5, white matter where p_wm > 0.5 (the
larger probability wins if both are; an exact tie goes to grey matter), else
background. At a coarser working resolution the probability maps are first
averaged onto the working grid and the rule is applied there.

Working grid: `spacing` mm isotropic (default 2 mm), cropped to the brain's
bounding box plus a 6 mm margin: (D, H, W) = (81, 98, 80) voxels at 2 mm
for the whole brain.

Split, leak-free by axial slabs: the template is exactly left-right symmetric
(the 'sym' in its name; the array equals its own mirror image), so a split by
hemisphere would validate on the mirror image of the training anatomy.
Instead training cases are rendered only from voxels with MNI z < 12 mm
(cerebellum, brain stem, temporal lobes, basal ganglia, lower cortex) and
validation cases only from voxels with z >= 20 mm (upper cortex and white
matter); the 8 mm slab between them is used by neither. Each rendering is
made from its own slab alone (deformations read nothing outside it), so no
validation voxel can reach a training image. At 2 mm the training volumes are
(42, 98, 80) voxels and the validation volumes (35, 98, 80).

Cases:
- 'train': `num_cases` (default 24) renderings; index i is a deterministic
  function of (seed, i).
- 'validation' (alias 'val'): `num_cases` (default 6) renderings that do not
  depend on `seed`, then the real, unaltered T1 of the validation slab
  (only resampled and z-scored), named 'mni152_t1_real', as the last case.

Renderings are cached as .npy under `cache_dir` when given, keyed by a hash of
the rendering settings, so re-runs do not re-render.

`python -m train.mni152_report --out montage.png` prints split sizes, render
time and threshold baselines and draws a montage of training renderings.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import pathlib

import numpy as np
from scipy import ndimage

from train.data import cache, nifti, render

CLASS_NAMES = ("background", "grey_matter", "white_matter")
TRAIN_Z_MAX_MM = 12.0
VAL_Z_MIN_MM = 20.0
MARGIN_MM = 6.0
DEFAULT_NUM_CASES = {"train": 24, "validation": 6}
REAL_T1_NAME = "mni152_t1_real"
_SPLITS = {"train": "train", "validation": "validation", "val": "validation"}
# Part of the cache key: bump it whenever the rendering code changes output.
_CACHE_VERSION = 2
# Distinct random streams, so validation renderings never coincide with
# training renderings whatever the training seed.
_TRAIN_STREAM, _VAL_STREAM = 1, 2


def template_paths() -> dict[str, str]:
    """Paths of the T1, GM and WM files inside nilearn's installed package."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the mni152 source needs the nilearn package installed")
    root = pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    paths = {k: str(root / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz") for k in ("t1", "gm", "wm")}
    for path in paths.values():
        if not os.path.exists(path):
            raise ValueError(f"MNI152 template file not found: {path}")
    return paths


def labels_from_probabilities(p_gm: np.ndarray, p_wm: np.ndarray) -> np.ndarray:
    """Labels 1 (GM) where p_gm > 0.5, 2 (WM) where p_wm > 0.5, else 0.

    If both exceed 0.5 the larger wins; an exact tie goes to grey matter.
    """
    label = np.zeros(p_gm.shape, np.int32)
    label[(p_wm > 0.5) & (p_wm > p_gm)] = 2
    label[(p_gm > 0.5) & (p_gm >= p_wm)] = 1
    return label


def downsample(volume: np.ndarray, factor: float) -> np.ndarray:
    """Average `volume` onto a grid `factor` times coarser (voxel centred).

    A Gaussian with the variance of a `factor`-wide box stands in for the box
    average, so partial volumes are kept for any real factor >= 1.
    """
    if factor == 1:
        return volume.astype(np.float32)
    sigma = np.sqrt((factor**2 - 1) / 12)
    smooth = ndimage.gaussian_filter(volume.astype(np.float32), sigma, mode="constant")
    shape = [int(np.floor((n - (factor + 1) / 2) / factor)) + 1 for n in volume.shape]
    centres = [np.arange(n) * factor + (factor - 1) / 2 for n in shape]
    grid = np.meshgrid(*centres, indexing="ij")
    return ndimage.map_coordinates(smooth, grid, order=1, mode="nearest")


@dataclasses.dataclass(frozen=True)
class Template:
    """The template on the working grid, cropped to the brain plus margin."""

    t1: np.ndarray  # (D, H, W) float32, raw T1 scale 0..255
    p_gm: np.ndarray  # (D, H, W) float32 probabilities
    p_wm: np.ndarray
    head: np.ndarray  # (D, H, W) float32 fraction inside the brain mask
    label: np.ndarray  # (D, H, W) int32
    affine: np.ndarray  # (4, 4) (d, h, w) -> RAS mm
    spacing: float
    class_t1: np.ndarray  # mean T1 of (outside, other, GM, WM)

    def z_mm(self) -> np.ndarray:
        """MNI z (inferior -> superior) of each depth index."""
        return self.affine[2, 0] * np.arange(self.t1.shape[0]) + self.affine[2, 3]

    def region(self, split: str) -> slice:
        """Depth slice of the training or validation slab."""
        z = self.z_mm()
        keep = z < TRAIN_Z_MAX_MM if split == "train" else z >= VAL_Z_MIN_MM
        index = np.flatnonzero(keep)
        return slice(int(index[0]), int(index[-1]) + 1)


@functools.lru_cache(maxsize=2)
def load_template(spacing: float = 2.0) -> Template:
    """Load the template at `spacing` mm (cached per process)."""
    paths = template_paths()
    t1_volume = nifti.read_volume(paths["t1"])
    t1, affine = t1_volume.array, t1_volume.affine
    # The probability maps are stored as uint8 0..255.
    p_gm = nifti.read_volume(paths["gm"]).array / 255
    p_wm = nifti.read_volume(paths["wm"]).array / 255
    head = (t1 > 0).astype(np.float32)  # skull-stripped: zero outside the brain

    vols = [downsample(v, spacing) for v in (t1, p_gm, p_wm, head)]
    index_to_index = np.diag([spacing, spacing, spacing, 1.0])
    index_to_index[:3, 3] = (spacing - 1) / 2
    affine = affine @ index_to_index

    # Crop to the brain's bounding box plus a margin for the deformations.
    margin = int(np.ceil(MARGIN_MM / spacing))
    inside = np.argwhere(vols[3] > 0.01)
    lo = np.maximum(inside.min(0) - margin, 0)
    hi = np.minimum(inside.max(0) + 1 + margin, vols[3].shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    t1, p_gm, p_wm, head = (np.ascontiguousarray(v[box]) for v in vols)
    affine = affine.copy()
    affine[:3, 3] = (affine @ np.append(lo, 1.0))[:3]

    label = labels_from_probabilities(p_gm, p_wm)
    inner = head > 0.5
    class_t1 = np.array(
        [t1[~inner].mean(), t1[inner & (label == 0)].mean(), t1[label == 1].mean(), t1[label == 2].mean()]
    )
    if np.any(np.diff(class_t1) <= 0):
        raise ValueError(f"unexpected template class intensities {class_t1}")
    return Template(t1, p_gm, p_wm, head, label, affine, float(spacing), class_t1)


class MNI152Source:
    """Random-access source of MNI152 renderings (see the module docstring).

    Args:
      split: 'train' or 'validation' ('val').
      cache_dir: where rendered cases are cached as .npy; None renders each time.
      seed: training renderings are a function of (seed, index); validation
        renderings ignore it.
      spacing: working voxel size in mm, isotropic, in [1, 4] (a number, or
        three equal numbers).
      num_cases: number of renderings (the validation split adds the real T1);
        default 24 for training, 6 for validation.
      config: ranges of the random rendering.
    """

    num_classes = 3
    class_names = CLASS_NAMES
    num_channels = 1

    def __init__(
        self,
        split: str,
        *,
        cache_dir=None,
        seed: int = 0,
        spacing: float = 2.0,
        num_cases: int | None = None,
        config: render.RenderConfig | None = None,
    ):
        if split not in _SPLITS:
            raise ValueError(f"split={split!r}: expected one of {sorted(_SPLITS)}")
        self.split = _SPLITS[split]
        values = np.unique(np.asarray(spacing, np.float64).ravel())
        if values.size != 1 or not 1.0 <= values[0] <= 4.0:
            raise ValueError(f"spacing={spacing!r}: expected one isotropic voxel size in mm, in [1, 4]")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r}: expected a non-negative integer")
        if num_cases is None:
            num_cases = DEFAULT_NUM_CASES[self.split]
        minimum = 1 if self.split == "train" else 0
        if not isinstance(num_cases, (int, np.integer)) or num_cases < minimum:
            raise ValueError(f"num_cases={num_cases!r}: expected an integer >= {minimum} for split {self.split!r}")
        self.seed = int(seed)
        self.spacing = float(values[0])
        self.num_cases = int(num_cases)
        self.config = config = config if config is not None else render.RenderConfig()
        self.cache_dir = None
        if cache_dir is not None:
            key = repr(
                (_CACHE_VERSION, self.spacing, TRAIN_Z_MAX_MM, VAL_Z_MIN_MM, MARGIN_MM, config, render.MR_CONTRASTS)
            )
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            self.cache_dir = pathlib.Path(cache_dir) / f"mni152_{digest}"

    def __len__(self) -> int:
        return self.num_cases + (self.split == "validation")

    def __repr__(self) -> str:
        return (
            f"MNI152Source(split={self.split!r}, seed={self.seed}, spacing={self.spacing}, num_cases={self.num_cases})"
        )

    def case_name(self, index: int) -> str:
        """The `name` of case `index`."""
        if self.split == "train":
            return f"mni152_train_s{self.seed}_{index:03d}"
        if index == self.num_cases:
            return REAL_T1_NAME
        return f"mni152_val_{index:03d}"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"case {index} out of range for {self!r}")
        tpl = load_template(self.spacing)
        region = tpl.region(self.split)
        name = self.case_name(index)
        if name == REAL_T1_NAME:
            image = render.zscore(tpl.t1[region], tpl.head[region] > 0.5)
            label = tpl.label[region]
        else:
            image, label = self._cached(name, lambda: self.render(index))
        affine = tpl.affine.copy()
        affine[:3, 3] = (tpl.affine @ np.array([region.start, 0, 0, 1.0]))[:3]
        return {
            "image": image[..., None],
            "label": label,
            "affine": affine,
            "spacing": np.full(3, self.spacing),
            "name": name,
        }

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Render case `index` from scratch: (image (D, H, W), label)."""
        tpl = load_template(self.spacing)
        region = tpl.region(self.split)
        stream = [_TRAIN_STREAM, self.seed, index] if self.split == "train" else [_VAL_STREAM, index]
        rng = np.random.default_rng(stream)
        return render.render(
            rng, tpl.t1[region], tpl.label[region], tpl.head[region], tpl.class_t1, self.spacing, self.config
        )

    def _cached(self, name, make):
        if self.cache_dir is None:
            return make()
        paths = [self.cache_dir / f"{name}_{part}.npy" for part in ("image", "label")]
        if all(p.exists() for p in paths):
            return tuple(cache.load_npy(p) for p in paths)
        arrays = make()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for path, array in zip(paths, arrays):
            # Write then rename, so concurrent readers never see a partial file.
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, array)
            os.replace(tmp, path)
        return arrays
