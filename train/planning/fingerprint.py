"""Dataset fingerprint: what the training cases are, before any preprocessing.

The experiment plan (:mod:`train.planning.experiment`) is derived from this
record alone, so it is computed once, written as JSON and read back:

- per case: voxel spacing in mm and shape at native resolution, both in the
  in-memory axis order ``(d, h, w)`` (see :mod:`train.data.nifti`);
- channels: their number and modality names;
- classes: names and voxel counts over all cases (frequencies follow);
- per channel: intensity statistics of the foreground (label > 0) voxels:
  mean, std, median, min, max, 0.5 and 99.5 percentiles, over a bounded,
  seeded random sample of at most ``SAMPLES_PER_CASE`` voxels per case (the
  statistics of a few hundred thousand voxels are as good as all of them,
  and a CT data set has billions).

NIfTI sources are read from the raw files (native spacing, unnormalised
intensities); other sources (``mni152``, ``synthetic``) are fingerprinted from
the cases they serve, whose intensities are already normalised
(``raw_intensities`` is False then).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np

from train.data import sources as sources_lib
from train.data.nifti import DataError

SAMPLES_PER_CASE = 10_000
PERCENTILES = (0.5, 99.5)


@dataclasses.dataclass(frozen=True)
class IntensityStats:
    """Statistics of one channel's foreground intensities."""

    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float
    samples: int

    @classmethod
    def of(cls, values: np.ndarray) -> "IntensityStats":
        """Statistics of a 1D sample (all zeros for an empty one)."""
        values = np.asarray(values, np.float64).ravel()
        if not values.size:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0)
        lo, hi = np.percentile(values, PERCENTILES)
        return cls(float(values.mean()), float(values.std()), float(np.median(values)), float(values.min()),
                   float(values.max()), float(lo), float(hi), int(values.size))


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """The training cases as the planner sees them (see the module docstring).

    Attributes:
      spacings: one ``(d, h, w)`` voxel size in mm per case.
      shapes: one ``(D, H, W)`` native shape per case.
      num_channels: image channels.
      modalities: one name per channel.
      class_names: background first.
      class_voxels: labelled voxels per class, summed over the cases.
      intensity: one :class:`IntensityStats` per channel (foreground voxels).
      case_names: the cases, in the order of ``spacings`` and ``shapes``.
      raw_intensities: False when the source served normalised images.
      dataset: the data spec or source it came from (for the record).
    """

    spacings: tuple[tuple[float, float, float], ...]
    shapes: tuple[tuple[int, int, int], ...]
    num_channels: int
    modalities: tuple[str, ...]
    class_names: tuple[str, ...]
    class_voxels: tuple[int, ...]
    intensity: tuple[IntensityStats, ...]
    case_names: tuple[str, ...] = ()
    raw_intensities: bool = True
    dataset: str = ""

    @property
    def num_cases(self) -> int:
        return len(self.spacings)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_frequencies(self) -> tuple[float, ...]:
        """Share of the labelled voxels per class (zeros when nothing is labelled)."""
        total = float(sum(self.class_voxels))
        return tuple(c / total if total else 0.0 for c in self.class_voxels)

    def median_spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.median(np.asarray(self.spacings, np.float64), axis=0))

    def median_shape(self) -> tuple[float, float, float]:
        """Median native shape per axis (may be fractional, as a median of an even count)."""
        return tuple(float(v) for v in np.median(np.asarray(self.shapes, np.float64), axis=0))

    def to_json(self) -> dict:
        """A JSON-ready dict of plain lists, numbers and strings."""
        out = dataclasses.asdict(self)
        out["spacings"] = [list(s) for s in self.spacings]
        out["shapes"] = [list(s) for s in self.shapes]
        for key in ("modalities", "class_names", "class_voxels", "case_names"):
            out[key] = list(out[key])
        out["intensity"] = [dataclasses.asdict(s) for s in self.intensity]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> "Fingerprint":
        """Inverse of :meth:`to_json` (accepts the dict or its JSON text)."""
        if isinstance(data, str):
            data = json.loads(data)
        return cls(
            spacings=tuple(tuple(float(v) for v in s) for s in data["spacings"]),
            shapes=tuple(tuple(int(v) for v in s) for s in data["shapes"]),
            num_channels=int(data["num_channels"]),
            modalities=tuple(data["modalities"]),
            class_names=tuple(data["class_names"]),
            class_voxels=tuple(int(v) for v in data["class_voxels"]),
            intensity=tuple(IntensityStats(**s) for s in data["intensity"]),
            case_names=tuple(data.get("case_names", ())),
            raw_intensities=bool(data.get("raw_intensities", True)),
            dataset=str(data.get("dataset", "")),
        )


def _picks(n: int, max_cases: int | None) -> list[int]:
    """Evenly spaced case indices, so a capped fingerprint still spans the data set."""
    if max_cases is None or max_cases >= n:
        return list(range(n))
    if max_cases < 1:
        raise ValueError(f"max_cases must be >= 1, got {max_cases}")
    return sorted({int(i) for i in np.linspace(0, n - 1, max_cases).round()})


def _raw_case(source: sources_lib.NiftiSource, index: int) -> dict:
    """One case of a NIfTI source at native spacing with unnormalised intensities."""
    files = source.cases[index]
    prep = dataclasses.replace(source.preprocessing, modalities=("none",) * source.num_channels, spacing=None)
    if source.cache is None:
        return sources_lib.load_case(files, prep)
    paths = list(files.images) + ([files.label] if files.label else [])
    return source.cache.get_or_build(paths, dataclasses.asdict(prep), lambda: sources_lib.load_case(files, prep))


def fingerprint_source(source, *, max_cases: int | None = None, seed: int = 0, dataset: str = "") -> Fingerprint:
    """Fingerprints the cases of ``source`` (all of them, or ``max_cases`` evenly spaced ones).

    Args:
      source: a :class:`train.data.sources.NiftiSource` (read raw from its
        files) or any source serving cases with ``image``, ``label`` and
        ``spacing`` (read as served).
      max_cases: fingerprint at most this many cases.
      seed: seeds the intensity sample (each case draws from its own stream).
      dataset: recorded as ``Fingerprint.dataset``.

    Raises:
      DataError: a file is unreadable, truncated, has NaN/Inf voxels, the wrong
        rank, or labels outside the declared classes (the message names it).
    """
    raw = isinstance(source, sources_lib.NiftiSource)
    num_classes = int(source.num_classes)
    num_channels = int(source.num_channels)
    if raw:
        modalities = tuple(source.preprocessing.modalities)
    else:  # the built-in sources serve z-scored MR-like images
        modalities = tuple(getattr(source, "modalities", ("MR",) * num_channels))
    picks = _picks(len(source), max_cases)
    if not picks:
        raise DataError(f"{source!r}: no cases to fingerprint")
    spacings, shapes, names, samples = [], [], [], [[] for _ in range(num_channels)]
    counts = np.zeros(num_classes, np.int64)
    for index in picks:
        case = _raw_case(source, index) if raw else source[index]
        image = np.asarray(case["image"])
        if image.ndim == 3:
            image = image[..., None]
        spacings.append(tuple(float(s) for s in np.asarray(case["spacing"], np.float64)))
        shapes.append(tuple(int(s) for s in image.shape[:3]))
        names.append(str(case.get("name", index)))
        label = case.get("label")
        if label is not None:
            label = np.asarray(label)
            counts += np.bincount(label.ravel(), minlength=num_classes)[:num_classes]
            where = np.flatnonzero(label.ravel() > 0)
        else:
            where = np.arange(image[..., 0].size)
        if not where.size:  # an empty label map: fall back to every voxel
            where = np.arange(image[..., 0].size)
        rng = np.random.default_rng([seed, index])
        chosen = rng.choice(where, size=min(SAMPLES_PER_CASE, where.size), replace=False)
        for c in range(num_channels):
            samples[c].append(image[..., c].reshape(-1)[chosen].astype(np.float64))
    return Fingerprint(
        spacings=tuple(spacings),
        shapes=tuple(shapes),
        num_channels=num_channels,
        modalities=modalities,
        class_names=tuple(source.class_names),
        class_voxels=tuple(int(c) for c in counts),
        intensity=tuple(IntensityStats.of(np.concatenate(s)) for s in samples),
        case_names=tuple(names),
        raw_intensities=raw,
        dataset=dataset or repr(source),
    )


def fingerprint_dataset(spec: str, *, cache_dir: str | None = None, max_cases: int | None = None,
                        seed: int = 0) -> Fingerprint:
    """Fingerprints the labelled training cases of a data spec ('msd:PATH', 'folder:PATH', 'mni152', 'synthetic').

    For ``msd:`` and ``folder:`` every labelled case counts (the planner
    plans for the data set, not for one split of it); for the built-in
    sources the 'train' split does.

    Raises:
      DataError: as :func:`fingerprint_source`, or a bad ``dataset.json``.
      ValueError: an unknown spec.
    """
    kind = spec.partition(":")[0] if isinstance(spec, str) else ""
    options = {"val_fraction": 0.0} if kind in ("msd", "folder") else {}
    source = sources_lib.make_source(spec, "train", cache_dir=cache_dir, seed=seed, **options)
    return fingerprint_source(source, max_cases=max_cases, seed=seed, dataset=spec)
