"""Grain input pipelines: random training patches, 2D slices, whole volumes.

The training pipeline is, in grain terms::

    MapDataset.source(source)          cases
      EpochShuffle(seed, epochs)       a new case order every epoch
      .random_map(sample a patch)      1 in 3 centred on a foreground voxel
      .random_map(augment)             flips, in-plane rot90, intensity
      [shard_index::shard_count]       this process's share
      .batch(batch)                    {'image': (B, *patch, C), 'label': (B, *patch)}
      .to_iter_dataset()
      .mp_prefetch(workers)            in :func:`make_iterator`, when workers > 0

Every step before ``to_iter_dataset`` is a ``MapDataset``, so element ``i`` of
the stream is a pure function of ``(seed, i)``: the batches do not depend on
the number of loader workers or threads, and the iterator state is just a
position, which ``get_state``/``set_state`` (and Orbax's grain integration)
save and restore exactly, so a resumed run sees the same batches as an
uninterrupted one.

Sharding splits the stream of patches, not the cases: process ``k`` of ``n``
gets patches ``k, k + n, k + 2n, ...``, so the union of all processes' batches
at a step is the same whatever ``n`` is, and no process runs dry when there
are fewer cases than processes.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

import grain
import numpy as np

from train.data.nifti import DataError

AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
# nnU-Net's cap on stored foreground locations per class.
_MAX_LOCATIONS = 10_000


@dataclasses.dataclass(frozen=True)
class Augment:
    """Augmentation settings; every draw comes from grain's per-element RNG.

    Attributes:
      flip: mirror each spatial axis with probability 1/2.
      rotate: rotate by a random multiple of 90 degrees in the in-plane
        (height, width) plane; only by 0 or 180 degrees when it is not square.
      scale: multiply intensities by U(scale), or None.
      shift: add U(shift) (in units of the normalised intensity), or None.
      gamma: raise each channel, rescaled to [0, 1], to the power U(gamma),
        then scale back, or None.
      p_intensity: probability of each of scale, shift and gamma.
    """

    flip: bool = True
    rotate: bool = True
    scale: tuple[float, float] | None = (0.9, 1.1)
    shift: tuple[float, float] | None = (-0.1, 0.1)
    gamma: tuple[float, float] | None = (0.7, 1.5)
    p_intensity: float = 0.3


class EpochShuffle(grain.MapDataset):
    """Repeats a dataset, each pass in a new seeded order.

    Element ``i`` is case ``permutation(seed, i // n)[i % n]``. This replaces
    grain's ``shuffle().repeat()``, whose per-element index cipher costs
    milliseconds per element on data sets of a few cases with grain 0.2.18
    (``python -m train.benchmarks.loader --shuffle-cost 4,30,300`` compares
    the two).
    """

    def __init__(self, parent: grain.MapDataset, *, seed: int, num_epochs: int | None = None):
        super().__init__(parent)
        self._n = len(parent)
        self._seed = int(seed)
        self._num_epochs = num_epochs
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize if self._num_epochs is None else self._n * self._num_epochs

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self._seed, epoch]).permutation(self._n)
            if len(self._orders) > 8:  # a few epochs are in flight at once at most
                self._orders.clear()
            self._orders[epoch] = order
        return order

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(int(index), self._n)
        return self._parents[0][int(self._order(epoch)[position])]

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed}, num_epochs={self._num_epochs})"


def _crop(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill) -> np.ndarray:
    """``array[start:start + size]`` over the leading axes, ``fill`` outside it."""
    out = np.full(tuple(size) + array.shape[len(size):], fill, array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def foreground_voxel(label: np.ndarray, rng: np.random.Generator) -> tuple[int, ...] | None:
    """A random foreground voxel: a uniform class among those present, then a voxel of it.

    Choosing the class first (as nnU-Net does) keeps small structures from
    being drowned by large ones. Returns None when the label is all background.
    """
    flat = np.asarray(label).reshape(-1)
    counts = np.bincount(flat, minlength=2)
    present = np.flatnonzero(counts[1:]) + 1
    if present.size == 0:
        return None
    cls = present[rng.integers(present.size)]
    where = np.flatnonzero(flat == cls)
    return tuple(int(i) for i in np.unravel_index(where[rng.integers(where.size)], label.shape))


class PatchSampler(grain.transforms.RandomMap):
    """Case -> ``{'image', 'label'}`` patch; pads volumes smaller than the patch.

    With probability ``foreground_fraction`` the patch is centred on a
    foreground voxel (moved inward where it would cross the padded volume's
    border); otherwise its position is uniform. ``squeeze_axis`` drops a size-1
    patch axis, giving 2D slices.
    """

    def __init__(self, patch: Sequence[int], foreground_fraction: float, squeeze_axis: int | None = None):
        self.patch = np.asarray(patch, np.int64)
        self.foreground_fraction = float(foreground_fraction)
        self.squeeze_axis = squeeze_axis

    def random_map(self, case: dict, rng: np.random.Generator) -> dict:
        if "label" not in case:
            raise DataError(f"case {case.get('name', '?')}: has no label; training patches need labelled cases")
        label, image = case["label"], case["image"]
        shape = np.asarray(label.shape, np.int64)
        padded = np.maximum(shape, self.patch)
        pad_lo = (padded - shape) // 2
        room = padded - self.patch  # largest corner in padded coordinates
        corner = None
        if rng.random() < self.foreground_fraction:
            voxel = foreground_voxel(label, rng)
            if voxel is not None:
                corner = np.clip(np.asarray(voxel) + pad_lo - self.patch // 2, 0, room)
        if corner is None:
            corner = np.array([rng.integers(r + 1) for r in room], np.int64)
        start = corner - pad_lo
        out = {
            "image": _crop(image, start, self.patch, 0.0).astype(np.float32, copy=False),
            "label": _crop(label, start, self.patch, 0).astype(np.int32, copy=False),
        }
        if "teacher" in case:
            # A teacher's logits on the case's grid (NaN: no teacher data there, padding included).
            out["teacher"] = _crop(case["teacher"], start, self.patch, np.nan).astype(np.float32, copy=False)
            out["labelled"] = np.float32(case["labelled"])
        if self.squeeze_axis is not None:
            for key in ("image", "label", "teacher"):
                if key in out:
                    out[key] = np.squeeze(out[key], self.squeeze_axis)
        return out


class Augmenter(grain.transforms.RandomMap):
    """Applies :class:`Augment` to a ``{'image', 'label'}`` patch (2D or 3D)."""

    def __init__(self, settings: Augment):
        self.settings = settings

    def random_map(self, sample: dict, rng: np.random.Generator) -> dict:
        cfg = self.settings
        image, label = sample["image"], sample["label"]
        teacher = sample.get("teacher")  # moves with the image: the same flips and rotations
        nd = label.ndim
        if cfg.flip:
            for axis in range(nd):
                if rng.random() < 0.5:
                    image, label = np.flip(image, axis), np.flip(label, axis)
                    teacher = None if teacher is None else np.flip(teacher, axis)
        if cfg.rotate:
            plane = (nd - 2, nd - 1)
            square = label.shape[plane[0]] == label.shape[plane[1]]
            k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
            image, label = np.rot90(image, k, plane), np.rot90(label, k, plane)
            teacher = None if teacher is None else np.rot90(teacher, k, plane)
        image = np.array(image, np.float32)  # a writable copy; the source may be read-only
        if cfg.scale is not None and rng.random() < cfg.p_intensity:
            image *= rng.uniform(*cfg.scale)
        if cfg.shift is not None and rng.random() < cfg.p_intensity:
            image += rng.uniform(*cfg.shift)
        if cfg.gamma is not None and rng.random() < cfg.p_intensity:
            g = rng.uniform(*cfg.gamma)
            for c in range(image.shape[-1]):
                x = image[..., c]
                lo, hi = float(x.min()), float(x.max())
                span = max(hi - lo, 1e-6)
                image[..., c] = ((x - lo) / span) ** g * span + lo
        out = {"image": image, "label": np.ascontiguousarray(label, np.int32)}
        if teacher is not None:
            out.update(teacher=np.ascontiguousarray(teacher, np.float32), labelled=sample["labelled"])
        return out


def _positive_ints(value, n: int, name: str) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != n or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in values):
        raise ValueError(f"{name} must be a positive int or {n} positive ints, got {value!r}")
    return tuple(int(v) for v in values)


def _check_common(source, batch, seed, foreground_fraction, shard_index, shard_count, num_epochs):
    for attr in ("num_classes", "num_channels"):
        if not hasattr(source, attr):
            raise TypeError(f"source {type(source).__name__} has no attribute {attr!r}")
    if len(source) < 1:
        raise ValueError(f"source {source!r} has no cases")
    _positive_ints(batch, 1, "batch")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if not 0.0 <= foreground_fraction <= 1.0:
        raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction!r}")
    if not (isinstance(shard_count, int) and shard_count >= 1 and isinstance(shard_index, int)
            and 0 <= shard_index < shard_count):
        raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index!r}, "
                         f"shard_count={shard_count!r}")
    if num_epochs is not None and not (isinstance(num_epochs, int) and num_epochs >= 1):
        raise ValueError(f"num_epochs must be None (endless) or a positive int, got {num_epochs!r}")


def _build(source, sampler, *, batch, seed, augment, shard_index, shard_count, num_epochs,
           threads, prefetch) -> grain.IterDataset:
    if augment is True:
        augment = Augment()
    elif augment is not False and not isinstance(augment, Augment):
        raise TypeError(f"augment must be a bool or an Augment, got {type(augment).__name__}")
    shuffle_seed, sample_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))
    ds = EpochShuffle(grain.MapDataset.source(source), seed=shuffle_seed, num_epochs=num_epochs)
    ds = ds.random_map(sampler, seed=sample_seed)
    if augment:
        ds = ds.random_map(Augmenter(augment), seed=augment_seed)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    ds = ds.batch(batch, drop_remainder=True)
    if not (isinstance(threads, int) and threads >= 1 and isinstance(prefetch, int) and prefetch >= 0):
        raise ValueError(f"need threads >= 1 and prefetch >= 0, got threads={threads!r}, prefetch={prefetch!r}")
    return to_iter(ds, threads=threads, prefetch=prefetch)


def to_iter(ds: grain.MapDataset, *, threads: int, prefetch: int) -> grain.IterDataset:
    """``ds`` as an iterator dataset read by ``threads`` threads ahead of use; prefetch 0 reads in the calling thread."""
    if prefetch:
        read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads))
    else:
        read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return ds.to_iter_dataset(read)


def patch_dataset(
    source,
    *,
    patch,
    batch: int,
    seed: int,
    foreground_fraction: float = 1 / 3,
    augment: bool | Augment = True,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    threads: int = 2,
    prefetch: int = 4,
) -> grain.IterDataset:
    """Batches of random 3D patches for training.

    Args:
      source: a source of labelled cases (see :mod:`train.data.sources`).
      patch: ``(D, H, W)`` patch shape, or one int for a cube.
      batch: patches per batch (per process when sharded).
      seed: determines the case order, patch positions and augmentations.
      foreground_fraction: share of patches centred on a foreground voxel.
      augment: True for :class:`Augment` defaults, False for none, or settings.
      shard_index, shard_count: this process's share of the patch stream.
      num_epochs: None repeats forever; otherwise stops after that many
        passes over the cases (an incomplete last batch is dropped).
      threads, prefetch: read threads and batches buffered ahead, per process;
        ``prefetch=0`` reads each batch on demand in the calling thread.

    Returns:
      An IterDataset of ``{'image': (B, D, H, W, C) float32,
      'label': (B, D, H, W) int32}``; iterate it with :func:`make_iterator`.
    """
    _check_common(source, batch, seed, foreground_fraction, shard_index, shard_count, num_epochs)
    patch = _positive_ints(patch, 3, "patch")
    return _build(source, PatchSampler(patch, foreground_fraction), batch=batch, seed=seed, augment=augment,
                  shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
                  threads=threads, prefetch=prefetch)


def slice_dataset(
    source,
    *,
    axis: int | str,
    patch,
    batch: int,
    seed: int,
    foreground_fraction: float = 1 / 3,
    augment: bool | Augment = True,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    threads: int = 2,
    prefetch: int = 4,
) -> grain.IterDataset:
    """Batches of random 2D slices (patches of them) for training 2D models.

    Args:
      axis: the axis the slices are taken along: 0 or 'axial' gives
        (height, width) planes, 1 or 'coronal' (depth, width), 2 or
        'sagittal' (depth, height).
      patch: in-plane patch shape (two ints, or one for a square); slices
        smaller than it are padded.
      Others as for :func:`patch_dataset`.

    Returns:
      An IterDataset of ``{'image': (B, P0, P1, C) float32, 'label': (B, P0, P1) int32}``.
    """
    _check_common(source, batch, seed, foreground_fraction, shard_index, shard_count, num_epochs)
    if isinstance(axis, str):
        if axis not in AXES:
            raise ValueError(f"axis must be 0, 1, 2 or one of {tuple(AXES)}, got {axis!r}")
        axis = AXES[axis]
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1, 2 or one of {tuple(AXES)}, got {axis!r}")
    plane = list(_positive_ints(patch, 2, "patch"))
    patch3d = tuple(plane[:axis] + [1] + plane[axis:])
    sampler = PatchSampler(patch3d, foreground_fraction, squeeze_axis=axis)
    return _build(source, sampler, batch=batch, seed=seed, augment=augment, shard_index=shard_index,
                  shard_count=shard_count, num_epochs=num_epochs, threads=threads, prefetch=prefetch)


def validation_cases(source, *, shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
    """Whole cases, in source order, one at a time (the next one read ahead).

    With sharding, process ``k`` of ``n`` gets cases ``k, k + n, ...``.
    """
    if not (isinstance(shard_count, int) and shard_count >= 1 and 0 <= shard_index < shard_count):
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index!r}, {shard_count!r}")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))


def _ensure_flags_parsed() -> None:
    # grain 0.2.18 reads an absl flag when starting worker processes and fails
    # with UnparsedFlagAccessError outside absl.app.run; flags keep their
    # defaults either way.
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class PipelineIterator(grain.DatasetIterator):
    """Iterator over a pipeline whose state is a position, valid for any worker count.

    Element ``i`` of these pipelines depends only on ``(seed, i)``, so the
    number of elements consumed is a complete state: :meth:`set_state`
    restarts the pipeline at that position, with this iterator's own worker
    count, whatever count the state was saved with. Being a grain
    ``DatasetIterator`` with a JSON state, it works with Orbax's grain
    checkpoint handler.
    """

    def __init__(self, ds: grain.IterDataset, workers: int = 0, buffer: int = 2):
        super().__init__()
        self._ds, self._workers, self._buffer = ds, workers, buffer
        self._position = 0
        self._inner = None  # opened on first use, so a restore starts workers once

    def _open(self):
        ds = self._ds
        if self._position:
            parent = ds.parents[0] if len(ds.parents) == 1 else None
            if not isinstance(parent, grain.MapDataset):
                raise TypeError("PipelineIterator can only resume pipelines made by MapDataset.to_iter_dataset()")
            # Restart at the position; read options only affect speed, not content.
            read = getattr(ds, "_read_options", None) or grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
            ds = parent[self._position:].to_iter_dataset(read)
        if self._workers:
            _ensure_flags_parsed()
            options = grain.MultiprocessingOptions(num_workers=self._workers, per_worker_buffer_size=self._buffer)
            ds = ds.mp_prefetch(options)
        return iter(ds)

    def __next__(self):
        self._assert_not_closed()
        if self._inner is None:
            self._inner = self._open()
        element = next(self._inner)
        self._position += 1
        return element

    def get_state(self) -> dict[str, Any]:
        return {"position": self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        position = state.get("position") if isinstance(state, dict) else None
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"not a data pipeline state (need {{'position': int >= 0}}): {state!r}")
        self._close_inner()
        self._position = position

    def start_prefetch(self) -> None:
        if self._inner is None:
            self._inner = self._open()
        self._inner.start_prefetch()

    def _close_inner(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None

    def close(self) -> None:
        self._close_inner()
        super().close()

    def __str__(self) -> str:
        return f"PipelineIterator(workers={self._workers}, position={self._position})"


def make_iterator(ds: grain.IterDataset, workers: int = 0, *, buffer: int = 2) -> PipelineIterator:
    """An iterator over ``ds``, prefetched by ``workers`` processes when > 0.

    ``ds`` is a pipeline from this module. The iterator's ``get_state()`` /
    ``set_state(state)`` save and restore its position exactly, also across
    worker counts (see :class:`PipelineIterator`). Call ``close()`` when done,
    to stop worker processes.
    """
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if not isinstance(ds, grain.IterDataset):
        raise TypeError(f"make_iterator needs a grain IterDataset, got {type(ds).__name__}")
    return PipelineIterator(ds, workers, buffer)
