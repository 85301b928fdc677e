"""Grain pipelines for classification: whole cases cropped or padded to the patch, one class each.

Training, in grain terms::

    MapDataset.source(source)          cases with 'image' and 'class'
      EpochShuffle(seed, epochs)       a new case order every epoch
      .random_map(CropSampler)         a random patch-sized crop (centred padding where smaller)
      .random_map(ClassFlips)          flips that keep the class, or map it (``flip_classes``)
      [shard_index::shard_count]
      .batch(batch)                    {'image': (B, *patch, C), 'label': (B,) int32}
      .to_iter_dataset()

As in :mod:`train.data.pipeline`, element ``i`` is a pure function of
``(seed, i)``, so the iterator state is a position (resumable exactly).

Augmentation is flips only, and only those the data allow: ``flip_classes``
maps a (D, H, W) axis to the class permutation a flip along it causes
(``{0: identity}`` by default: mirroring depth keeps the class of any
volume whose class does not say "up" or "down"; in-plane flips and rotations
can turn left into right). Sources may carry their own map as
``source.flip_classes`` (see :data:`train.data.regions.FLIP_CLASSES`).
Intensity augmentation is left out: classes can live in contrast.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import grain
import numpy as np

from train.data.nifti import DataError
from train.data.pipeline import EpochShuffle, _crop, to_iter


def identity_flips(num_classes: int) -> dict[int, tuple[int, ...]]:
    """The default flip map: depth flips only, keeping every class."""
    return {0: tuple(range(num_classes))}


def flips_of(source) -> dict[int, tuple[int, ...]]:
    """``source.flip_classes`` when it has one, else :func:`identity_flips`."""
    flips = getattr(source, "flip_classes", None)
    return dict(flips) if flips is not None else identity_flips(source.num_classes)


def case_class(case: dict) -> int:
    """The class of a classification case; DataError naming the case when it has none."""
    if "class" not in case:
        raise DataError(f"case {case.get('name', '?')}: has no class; classification needs one class per case")
    return int(case["class"])


def fit_to_patch(image: np.ndarray, patch: Sequence[int], start: Sequence[int] | None = None) -> np.ndarray:
    """``image`` (D, H, W, C) cropped or zero-padded to ``patch``: centred, or from ``start``."""
    shape = np.asarray(image.shape[: len(patch)], np.int64)
    patch_arr = np.asarray(patch, np.int64)
    corner = (shape - patch_arr) // 2 if start is None else np.asarray(start, np.int64)
    return _crop(image, corner, patch_arr, 0.0).astype(np.float32, copy=False)


class CropSampler(grain.transforms.RandomMap):
    """Case -> ``{'image': patch-sized crop, 'label': its class}``.

    Along an axis longer than the patch the crop's position is uniform; along
    a shorter one the volume is centred and zero-padded. ``squeeze_axis``
    takes a random slice along that axis first (2D training on slices).
    """

    def __init__(self, patch: Sequence[int], squeeze_axis: int | None = None):
        self.patch = tuple(int(p) for p in patch)
        self.squeeze_axis = squeeze_axis

    def random_map(self, case: dict, rng: np.random.Generator) -> dict:
        cls = case_class(case)
        image = np.asarray(case["image"])
        patch = list(self.patch)
        if self.squeeze_axis is not None:
            patch.insert(self.squeeze_axis, 1)
        shape = image.shape[:3]
        start = [int(rng.integers(s - p + 1)) if s >= p else -((p - s) // 2) for s, p in zip(shape, patch)]
        out = fit_to_patch(image, patch, start)
        if self.squeeze_axis is not None:
            out = np.squeeze(out, self.squeeze_axis)
        return {"image": out, "label": np.int32(cls)}


class ClassFlips(grain.transforms.RandomMap):
    """Flips each listed axis with probability 1/2 and maps the class by ``flip_classes[axis]``.

    ``axes`` renames the (D, H, W) axes of ``flip_classes`` to the sample's
    own axes (for 2D slices: {1: 0, 2: 1}); axes it leaves out are not flipped.
    """

    def __init__(self, flip_classes: Mapping[int, Sequence[int]], axes: Mapping[int, int] | None = None):
        axes = {a: a for a in flip_classes} if axes is None else axes
        self.flips = [(axes[a], tuple(int(c) for c in perm)) for a, perm in sorted(flip_classes.items()) if a in axes]

    def random_map(self, sample: dict, rng: np.random.Generator) -> dict:
        image, cls = sample["image"], int(sample["label"])
        for axis, perm in self.flips:
            if rng.random() < 0.5:
                image, cls = np.flip(image, axis), perm[cls]
        return {"image": np.ascontiguousarray(image, np.float32), "label": np.int32(cls)}


def _check_flips(flip_classes, num_classes: int) -> dict[int, tuple[int, ...]]:
    out = {}
    for axis, perm in dict(flip_classes).items():
        perm = tuple(int(c) for c in perm)
        if int(axis) not in (0, 1, 2) or sorted(perm) != list(range(num_classes)):
            raise ValueError(f"flip_classes[{axis!r}] must be a permutation of 0..{num_classes - 1} for axis 0, 1 or 2")
        out[int(axis)] = perm
    return out


def _build(source, sampler, flips: ClassFlips | None, *, batch, seed, shard_index, shard_count, num_epochs,
           threads, prefetch) -> grain.IterDataset:
    if len(source) < 1:
        raise ValueError(f"source {source!r} has no cases")
    if not (isinstance(batch, (int, np.integer)) and batch >= 1):
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not (isinstance(shard_count, int) and shard_count >= 1 and 0 <= shard_index < shard_count):
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index!r}, {shard_count!r}")
    shuffle_seed, sample_seed, flip_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))
    ds = EpochShuffle(grain.MapDataset.source(source), seed=shuffle_seed, num_epochs=num_epochs)
    ds = ds.random_map(sampler, seed=sample_seed)
    if flips is not None and flips.flips:
        ds = ds.random_map(flips, seed=flip_seed)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    ds = ds.batch(int(batch), drop_remainder=True)
    return to_iter(ds, threads=threads, prefetch=prefetch)


def class_dataset(source, *, patch, batch: int, seed: int, augment: bool = True, flip_classes=None,
                  shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None, threads: int = 2,
                  prefetch: int = 4) -> grain.IterDataset:
    """Batches ``{'image': (B, D, H, W, C), 'label': (B,) int32}`` of training cases.

    Args:
      source: a classification source (cases with ``class``).
      patch: (D, H, W) every case is cropped / padded to.
      augment: flips by ``flip_classes`` (default: the source's, else depth only).
      Others as for :func:`train.data.pipeline.patch_dataset`.
    """
    flips = _check_flips(flips_of(source) if flip_classes is None else flip_classes, source.num_classes)
    return _build(source, CropSampler(patch), ClassFlips(flips) if augment else None, batch=batch, seed=seed,
                  shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs, threads=threads,
                  prefetch=prefetch)


def class_slice_dataset(source, *, patch, batch: int, seed: int, augment: bool = True, flip_classes=None,
                        shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
                        threads: int = 2, prefetch: int = 4) -> grain.IterDataset:
    """Batches ``{'image': (B, H, W, C), 'label': (B,)}``: random axial slices carrying their case's class.

    ``patch`` is the in-plane (H, W) size. Flips follow ``flip_classes`` for
    the in-plane axes (height, width); depth flips mean nothing for one slice.
    """
    flips = _check_flips(flips_of(source) if flip_classes is None else flip_classes, source.num_classes)
    sampler = CropSampler(tuple(patch), squeeze_axis=0)
    flip = ClassFlips(flips, axes={1: 0, 2: 1}) if augment else None
    return _build(source, sampler, flip, batch=batch, seed=seed, shard_index=shard_index, shard_count=shard_count,
                  num_epochs=num_epochs, threads=threads, prefetch=prefetch)
