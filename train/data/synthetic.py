"""Procedural phantoms with known labels, for tests and benchmarks.

Each case is a volume holding a large rotated ellipsoid ("organ", class 1),
a few tubes ("vessels", class 2) and small blobs inside the organ ("lesions",
classes 3 and up), painted with per-case class intensities, a smooth
multiplicative bias field and Gaussian noise, then z-scored like MR. Every case
is a pure function of ``(seed, split, index)``, so any process regenerates the
same data; nothing is read from disk.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from train.data.nifti import normalize

SPLITS = ("train", "val", "test")
_DEFAULT_CASES = {"train": 8, "val": 2, "test": 2}
_MEMO_LIMIT = 64


def _as_shape(size) -> tuple[int, int, int]:
    shape = (int(size),) * 3 if np.isscalar(size) else tuple(int(s) for s in size)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"synthetic: size must be an int or 3 ints, each >= 4, got {size!r}")
    return shape


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((points - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    return np.linalg.norm(points - a - t[..., None] * ab, axis=-1)


def phantom(
    rng: np.random.Generator,
    shape: Sequence[int],
    num_classes: int,
    num_channels: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One random phantom: ``(image (D, H, W, C) float32, label (D, H, W) int32)``."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (D, H, W, 3)
    label = np.zeros(shape, np.int32)

    # Organ: a rotated ellipsoid, slightly off centre.
    centre = rng.uniform(-0.15, 0.15, 3).astype(np.float32)
    radii = rng.uniform(0.55, 0.85, 3).astype(np.float32)
    local = (grid - centre) @ _random_rotation(rng).astype(np.float32)
    organ = ((local / radii) ** 2).sum(-1) <= 1.0
    label[organ] = 1

    if num_classes > 2:  # tubes crossing the volume
        for _ in range(int(rng.integers(2, 4))):
            a, b = rng.uniform(-0.9, 0.9, (2, 3)).astype(np.float32)
            tube = _segment_distance(grid, a, b) <= rng.uniform(0.06, 0.12)
            label[tube] = 2

    for cls in range(3, num_classes):  # blobs inside the organ
        for _ in range(int(rng.integers(1, 3))):
            inside = local[organ]
            at = inside[rng.integers(len(inside))] if len(inside) else np.zeros(3, np.float32)
            r = rng.uniform(0.12, 0.25, 3).astype(np.float32)
            blob = (((local - at) @ _random_rotation(rng).astype(np.float32)) / r) ** 2
            label[(blob.sum(-1) <= 1.0) & organ] = cls

    # Class intensities ordered by class (so the task is learnable), jittered
    # per case and per channel; a smooth bias field; noise.
    image = np.empty(tuple(shape) + (num_channels,), np.float32)
    coeff = rng.normal(0.0, 0.25, 3).astype(np.float32)
    bias = np.exp(grid @ coeff + 0.1 * (grid**2).sum(-1) * rng.normal())
    for c in range(num_channels):
        means = 0.2 + 0.8 * np.arange(num_classes) / max(num_classes - 1, 1)
        if c % 2:
            means = means[::-1]
        means = (means + rng.uniform(-0.06, 0.06, num_classes)).astype(np.float32)
        x = means[label] * bias + rng.normal(0.0, 0.06, shape).astype(np.float32)
        image[..., c] = normalize(x, "mr")
    return image, label


class SyntheticSource:
    """A grain random-access source of procedural phantoms.

    Args:
      split: 'train', 'val' or 'test' (test cases carry no label).
      seed: data seed; each (seed, split, index) gives one fixed case, and the
        splits never share a case.
      size: volume shape, an int or ``(D, H, W)``.
      num_cases: cases in this split (default 8 train, 2 val, 2 test).
      num_classes: including background, 2 to 8.
      num_channels: image channels (odd channels have inverted contrast).
      spacing: voxel size in mm, ``(d, h, w)``.
      cache_dir: accepted for a uniform signature and ignored (nothing to decode).
    """

    def __init__(
        self,
        split: str = "train",
        *,
        seed: int = 0,
        size=32,
        num_cases: int | None = None,
        num_classes: int = 4,
        num_channels: int = 1,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        cache_dir: str | None = None,
    ):
        del cache_dir
        if split not in SPLITS:
            raise ValueError(f"synthetic: split must be one of {SPLITS}, got {split!r}")
        if not 2 <= int(num_classes) <= 8:
            raise ValueError(f"synthetic: num_classes must be 2..8, got {num_classes!r}")
        if int(num_channels) < 1:
            raise ValueError(f"synthetic: num_channels must be >= 1, got {num_channels!r}")
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"synthetic: spacing must be 3 positive numbers, got {spacing!r}")
        self.split = split
        self.seed = int(seed)
        self.shape = _as_shape(size)
        self._len = _DEFAULT_CASES[split] if num_cases is None else int(num_cases)
        if self._len < 1:
            raise ValueError(f"synthetic: num_cases must be >= 1, got {num_cases!r}")
        self.num_classes = int(num_classes)
        self.num_channels = int(num_channels)
        self.spacing = np.asarray(spacing, np.float64)
        names = ["background", "organ", "vessel"] + [f"lesion{i}" for i in range(1, 7)]
        self.class_names = tuple(names[: self.num_classes])
        self._memo: dict[int, dict] = {}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"synthetic {self.split}: index {index} out of range 0..{self._len - 1}")
        case = self._memo.get(index)
        if case is None:
            case = self._make(index)
            if len(self._memo) < _MEMO_LIMIT:
                self._memo[index] = case
        return dict(case)

    def _make(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        image, label = phantom(rng, self.shape, self.num_classes, self.num_channels)
        # In-memory axes are (d, h, w) = (z, y, x): column i of the affine maps array axis i,
        # so axis 0 goes to RAS z (superior), axis 2 to x (right), centred on the origin.
        affine = np.zeros((4, 4))
        affine[3, 3] = 1.0
        for axis, world in enumerate((2, 1, 0)):
            affine[world, axis] = self.spacing[axis]
        affine[:3, 3] = -(affine[:3, :3] @ ((np.asarray(self.shape) - 1) / 2.0))
        case = {
            "image": image,
            "affine": affine,
            "spacing": self.spacing.copy(),
            "name": f"synthetic_{self.split}_{index:03d}",
        }
        if self.split != "test":
            case["label"] = label
        return case

    def __getstate__(self):
        # Worker processes regenerate cases rather than receive them pickled.
        state = dict(self.__dict__)
        state["_memo"] = {}
        return state
