"""Random-access sources of cases read from NIfTI files.

A source has ``__len__`` and ``__getitem__(i) -> case`` (what
``grain.MapDataset.source`` needs) and the attributes ``num_classes``
(background included), ``class_names`` and ``num_channels``. A case is a dict:
``image`` float32 ``(D, H, W, C)``, ``label`` int32 ``(D, H, W)`` (absent when
unlabelled), ``affine`` float64 ``(4, 4)``, ``spacing`` ``(3,)`` and ``name``;
see :mod:`train.data.nifti` for the layout. With a ``cache_dir`` the arrays are
read-only memory maps; never modify a case in place.

A classification data set gives each case one class instead of a voxel label:
its cases carry ``"class"`` (an int in ``0 .. num_classes - 1``) and no
``label``, and the source's ``task`` is ``'classification'`` (else
``'segmentation'``). Its ``class_names`` are the classes themselves (no
background).

Layouts:

- ``msd:PATH``: a Medical Segmentation Decathlon task folder: ``dataset.json``
  with ``labels``, ``modality`` (or nnU-Net v2's ``channel_names``),
  ``training`` (image/label pairs) and ``test`` (images), files under
  ``imagesTr``, ``labelsTr``, ``imagesTs``. A 4D image gives one channel per
  modality. Without a ``training`` list (nnU-Net v2) cases are found as
  ``labelsTr/CASE.nii.gz`` with ``imagesTr/CASE_0000.nii.gz``, one file per
  channel.
- ``folder:PATH``: ``images/NAME.nii.gz`` and ``labels/NAME.nii.gz`` matched by
  name, optional ``test/`` (unlabelled images) and optional ``dataset.json``
  giving ``labels`` and ``modality`` as above.

Classification layouts: an ``msd:`` ``dataset.json`` whose ``training``
entries carry an integer ``"label"`` (a key of ``labels``) instead of a label
file; a ``folder:`` with ``images/`` and ``labels.csv`` (header ``case,label``,
the case name without ``.nii.gz``) instead of ``labels/``. A class outside
``labels`` is a one-line DataError naming the case.

Splits: a ``splits_final.json`` beside the data (nnU-Net's format,
``[{"train": [names], "val": [names]}, ...]``; fold 0 is used) decides the
split when present, for both tasks; a data set whose cases are related
(crops of one scan, slabs of one anatomy) must ship one. Otherwise ``'train'`` and ``'val'`` divide the labelled cases; ``'val'`` holds
``round(val_fraction * n)`` of them (at least one when ``n >= 2`` and
``val_fraction > 0``), namely those whose SHA-1 of the case name sorts first.
The split depends only on the case names, not on the seed or the order of
files, so it is the same on every run and machine. ``'test'`` is the layout's unlabelled test set.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import inspect
import json
import os
from typing import Any, Sequence

import numpy as np

from train.data import nifti
from train.data.cache import VolumeCache
from train.data.nifti import DataError

SPLITS = ("train", "val", "test")
SPLITS_FILE = "splits_final.json"
LABELS_CSV = "labels.csv"


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    """The files of one case: one 4D image or one 3D image per channel."""

    name: str
    images: tuple[str, ...]
    label: str | None = None
    cls: int | None = None  # the case's class, for classification data sets


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a case is turned into arrays; part of the cache key.

    Attributes:
      modalities: one name per channel ('CT' -> CT windowing, 'none' -> raw,
        anything else -> MR z-score; see :func:`train.data.nifti.normalize`).
      spacing: resample to this ``(d, h, w)`` spacing in mm; None keeps it.
      ct_window: Hounsfield window for CT channels; None clips to the
        0.5-99.5 percentiles of each volume.
      num_classes: labels must lie in ``0 .. num_classes - 1``.
    """

    modalities: tuple[str, ...]
    num_classes: int
    spacing: tuple[float, float, float] | None = None
    ct_window: tuple[float, float] | None = None


def _check_geometry(vol: nifti.Volume, ref: nifti.Volume, what: str) -> None:
    if vol.array.shape[:3] != ref.array.shape[:3]:
        raise DataError(
            f"{vol.path}: {what} shape {vol.array.shape[:3]} does not match image shape "
            f"{ref.array.shape[:3]} of {ref.path}"
        )
    if not np.allclose(vol.affine, ref.affine, rtol=1e-4, atol=1e-3):
        raise DataError(f"{vol.path}: {what} affine does not match the affine of {ref.path}")


def load_case(files: CaseFiles, prep: Preprocessing) -> dict:
    """Reads, checks, resamples and normalises one case.

    Raises:
      DataError: unreadable files, wrong rank or channel count, NaN/Inf,
        image/label geometry mismatch, label values outside the classes.
    """
    n_channels = len(prep.modalities)
    if len(files.images) == 1:
        image = nifti.read_volume(files.images[0], channels=n_channels > 1)
        if n_channels > 1 and image.array.shape[3] != n_channels:
            raise DataError(
                f"{files.images[0]}: has {image.array.shape[3]} channels, the data set declares {n_channels}"
            )
        if n_channels == 1:
            image = dataclasses.replace(image, array=image.array[..., None])
    else:
        vols = [nifti.read_volume(p) for p in files.images]
        for vol in vols[1:]:
            _check_geometry(vol, vols[0], "channel")
        image = dataclasses.replace(vols[0], array=np.stack([v.array for v in vols], axis=-1))
    label = None
    if files.label is not None:
        label = nifti.read_label(files.label)
        _check_geometry(label, image, "label")
        values = np.unique(label.array)
        bad = values[(values < 0) | (values >= prep.num_classes)]
        if bad.size:
            raise DataError(
                f"{files.label}: label values {bad.tolist()[:8]} outside the declared labels "
                f"0..{prep.num_classes - 1}"
            )
    if prep.spacing is not None:
        image = nifti.resample(image, prep.spacing, order=1)
        if label is not None:
            label = nifti.resample(label, prep.spacing, order=0)
    channels = [
        nifti.normalize(image.array[..., c], m, window=prep.ct_window) for c, m in enumerate(prep.modalities)
    ]
    case = {
        "image": np.stack(channels, axis=-1).astype(np.float32),
        "affine": image.affine,
        "spacing": image.spacing,
        "name": files.name,
    }
    if label is not None:
        case["label"] = label.array.astype(np.int32)
    return case


def split_cases(cases: Sequence[CaseFiles], split: str, val_fraction: float) -> list[CaseFiles]:
    """The 'train' or 'val' part of labelled ``cases`` (see the module docstring)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(cases)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = sorted(range(n), key=lambda i: hashlib.sha1(cases[i].name.encode()).hexdigest())
    val = set(order[:n_val])
    return [c for i, c in enumerate(cases) if (i in val) == (split == "val")]


def read_splits(root: str) -> tuple[list[str], list[str]] | None:
    """Fold 0 of ``ROOT/splits_final.json`` as (train names, val names), or None without one."""
    path = os.path.join(root, SPLITS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            folds = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from None
    fold = folds[0] if isinstance(folds, list) and folds else None
    if not (isinstance(fold, dict) and all(isinstance(fold.get(k), list) for k in ("train", "val"))):
        raise DataError(f"{path}: expected [{{\"train\": [names], \"val\": [names]}}, ...]")
    return [str(n) for n in fold["train"]], [str(n) for n in fold["val"]]


def choose_split(cases: Sequence[CaseFiles], split: str, val_fraction: float, root: str) -> list[CaseFiles]:
    """The 'train' or 'val' cases: by ``splits_final.json`` when ``root`` has one, else :func:`split_cases`."""
    listed = read_splits(root)
    if listed is None:
        return split_cases(cases, split, val_fraction)
    by_name = {c.name: c for c in cases}
    names = listed[0] if split == "train" else listed[1]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise DataError(f"{os.path.join(root, SPLITS_FILE)}: case {unknown[0]} is not among the labelled cases")
    return [by_name[n] for n in names]


def _class_of(value: Any, num_classes: int, where: str) -> int:
    """A case's class from dataset.json / labels.csv, or a one-line DataError naming the case."""
    text = str(value).strip()
    if isinstance(value, bool) or not (isinstance(value, int) or text.lstrip("-").isdigit()):
        raise DataError(f"{where}: label {value!r} is not an integer class")
    cls = int(text)
    if not 0 <= cls < num_classes:
        raise DataError(f"{where}: label {cls} is not one of the classes 0..{num_classes - 1} in 'labels'")
    return cls


class NiftiSource:
    """A source over :class:`CaseFiles`, optionally cached on disk."""

    def __init__(
        self,
        cases: Sequence[CaseFiles],
        *,
        class_names: Sequence[str],
        modalities: Sequence[str],
        spacing: Sequence[float] | None = None,
        ct_window: Sequence[float] | None = None,
        cache_dir: str | None = None,
        where: str = "",
        task: str = "segmentation",
    ):
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if len(spacing) != 3 or min(spacing) <= 0:
                raise ValueError(f"spacing must be 3 positive numbers (d, h, w) in mm, got {spacing!r}")
        if ct_window is not None:
            ct_window = tuple(float(v) for v in ct_window)
            if len(ct_window) != 2 or not ct_window[1] > ct_window[0]:
                raise ValueError(f"ct_window must be (low, high) with high > low, got {ct_window!r}")
        self.cases = list(cases)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.num_channels = len(modalities)
        self.preprocessing = Preprocessing(tuple(modalities), self.num_classes, spacing, ct_window)
        self.cache = VolumeCache(cache_dir) if cache_dir else None
        self.where = where
        self.task = task

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        files = self.cases[int(index)]
        if self.cache is None:
            case = load_case(files, self.preprocessing)
        else:
            paths = list(files.images) + ([files.label] if files.label else [])
            options = dataclasses.asdict(self.preprocessing)
            case = self.cache.get_or_build(paths, options, lambda: load_case(files, self.preprocessing))
        if files.cls is not None:
            # Not cached: the class lives in dataset.json / labels.csv, not in the image files.
            case = dict(case, **{"class": int(files.cls)})
        return case

    def classes(self) -> np.ndarray:
        """(N,) class of every case, without reading images (classification sources)."""
        return np.array([c.cls for c in self.cases], np.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where!r}, {len(self)} cases)"


# --------------------------------------------------------------------------
# dataset.json


def _class_names(labels: Any, where: str) -> tuple[str, ...]:
    """MSD ``{"0": "background", ...}`` or nnU-Net v2 ``{"background": 0, ...}``."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{where}: 'labels' must be a non-empty mapping")
    if all(str(k).strip().isdigit() for k in labels):
        by_value = {int(k): str(v) for k, v in labels.items()}
    elif all(isinstance(v, int) for v in labels.values()):
        by_value = {int(v): str(k) for k, v in labels.items()}
    else:
        raise DataError(
            f"{where}: 'labels' must map integers to names (or names to integers); regions are not supported"
        )
    if sorted(by_value) != list(range(len(by_value))):
        raise DataError(f"{where}: 'labels' must be consecutive 0..K-1, got {sorted(by_value)}")
    return tuple(by_value[i] for i in range(len(by_value)))


def _modalities(meta: dict, where: str) -> tuple[str, ...]:
    names = meta.get("modality", meta.get("channel_names"))
    if not isinstance(names, dict) or not names:
        raise DataError(f"{where}: needs 'modality' or 'channel_names', a mapping of channel index to name")
    try:
        by_index = {int(k): str(v) for k, v in names.items()}
    except ValueError:
        raise DataError(f"{where}: 'modality' keys must be channel indices") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(f"{where}: 'modality' keys must be 0..C-1, got {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index)))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def _nifti_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if nifti.is_nifti(f) and not f.startswith(".")
    )


def _listed(root: str, entry: Any, where: str) -> str:
    if not isinstance(entry, str) or not entry:
        raise DataError(f"{where}: expected a file path, got {entry!r}")
    path = os.path.normpath(os.path.join(root, entry))
    if not os.path.isfile(path):
        raise DataError(f"{where}: file not found: {path}")
    return path


class MSDSource(NiftiSource):
    """A Medical Segmentation Decathlon (or nnU-Net v2 raw) task folder.

    Args:
      root: the folder holding ``dataset.json``.
      split: 'train', 'val' or 'test'.
      cache_dir: cache preprocessed cases here (see :mod:`train.data.cache`).
      seed: accepted for a uniform signature; the split does not depend on it.
      spacing: resample every case to this ``(d, h, w)`` spacing in mm.
      val_fraction: share of the labelled cases held out as 'val'.
      ct_window: Hounsfield window for CT channels.
    """

    def __init__(self, root: str, split: str = "train", *, cache_dir=None, seed: int = 0,
                 spacing=None, val_fraction: float = 0.2, ct_window=None):
        del seed
        root = os.path.expanduser(os.fspath(root))
        meta_path = os.path.join(root, "dataset.json")
        meta = _read_json(meta_path)
        class_names = _class_names(meta.get("labels"), meta_path)
        modalities = _modalities(meta, meta_path)
        training = self._training_cases(root, meta, meta_path, len(modalities), len(class_names))
        task = "classification" if training and training[0].cls is not None else "segmentation"
        if split == "test":
            cases = self._test_cases(root, meta, meta_path, len(modalities))
        elif split in ("train", "val"):
            cases = choose_split(training, split, val_fraction, root)
        else:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not cases:
            raise DataError(f"{meta_path}: no cases in split {split!r}")
        super().__init__(cases, class_names=class_names, modalities=modalities, spacing=spacing,
                         ct_window=ct_window, cache_dir=cache_dir, where=f"msd:{root}", task=task)

    @staticmethod
    def _training_cases(root, meta, where, n_channels, num_classes) -> list[CaseFiles]:
        if "training" not in meta:
            return _v2_cases(root, "imagesTr", "labelsTr", meta, where, n_channels)
        entries = meta["training"]
        if not isinstance(entries, list) or not entries:
            raise DataError(f"{where}: 'training' must be a non-empty list")
        cases = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise DataError(f"{where}: training[{i}] must have 'image' and 'label'")
            image = _listed(root, entry["image"], f"{where}: training[{i}].image")
            name = nifti.strip_suffix(os.path.basename(image))
            if isinstance(entry["label"], str) and not entry["label"].strip().lstrip("-").isdigit():
                label = _listed(root, entry["label"], f"{where}: training[{i}].label")
                cases.append(CaseFiles(name, (image,), label))
            else:  # an integer class: a classification data set
                cases.append(CaseFiles(name, (image,), cls=_class_of(entry["label"], num_classes, f"{where}: case {name}")))
        if len({c.cls is None for c in cases}) > 1:
            raise DataError(f"{where}: 'training' mixes label files and integer classes")
        return cases

    @staticmethod
    def _test_cases(root, meta, where, n_channels) -> list[CaseFiles]:
        if "test" not in meta:
            return _v2_cases(root, "imagesTs", None, meta, where, n_channels)
        cases = []
        for i, entry in enumerate(meta["test"] or []):
            entry = entry.get("image") if isinstance(entry, dict) else entry
            image = _listed(root, entry, f"{where}: test[{i}]")
            cases.append(CaseFiles(nifti.strip_suffix(os.path.basename(image)), (image,)))
        return cases


def _v2_cases(root, images_dir, labels_dir, meta, where, n_channels) -> list[CaseFiles]:
    """nnU-Net v2 raw layout: CASE_0000.nii.gz ... per channel, CASE.nii.gz labels."""
    ending = meta.get("file_ending", ".nii.gz")
    if labels_dir is None:
        names = sorted({nifti.strip_suffix(os.path.basename(p))[:-5]
                        for p in _nifti_files(os.path.join(root, images_dir))})
    else:
        names = [nifti.strip_suffix(os.path.basename(p)) for p in _nifti_files(os.path.join(root, labels_dir))]
    cases = []
    for name in names:
        images = tuple(
            _listed(root, os.path.join(images_dir, f"{name}_{c:04d}{ending}"), f"{where}: case {name} channel {c}")
            for c in range(n_channels)
        )
        label = os.path.join(root, labels_dir, f"{name}{ending}") if labels_dir else None
        cases.append(CaseFiles(name, images, label))
    return cases


class FolderSource(NiftiSource):
    """``images/NAME.nii.gz`` with ``labels/NAME.nii.gz``, optional ``test/``.

    Class names come from ``class_names``, else from ``dataset.json`` in the
    folder, else from the largest value over all label maps (read once, at
    construction). Channel modalities come from ``modality`` (one name, or one
    per channel), else ``dataset.json``, else MR for every channel.

    Args:
      root: the folder.
      split: 'train', 'val' or 'test' (the images in ``test/``).
      cache_dir, seed, spacing, val_fraction, ct_window: as for :class:`MSDSource`.
      modality: a modality name, or one per channel.
      class_names: names of the classes, background first.
    """

    def __init__(self, root: str, split: str = "train", *, cache_dir=None, seed: int = 0,
                 spacing=None, val_fraction: float = 0.2, ct_window=None,
                 modality: str | Sequence[str] | None = None, class_names: Sequence[str] | None = None):
        del seed
        root = os.path.expanduser(os.fspath(root))
        where = f"folder:{root}"
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not os.path.isdir(os.path.join(root, "images")):
            raise DataError(f"{where}: no images/ folder")
        meta_path = os.path.join(root, "dataset.json")
        meta = _read_json(meta_path) if os.path.isfile(meta_path) else {}
        images = _nifti_files(os.path.join(root, "images"))
        if not images:
            raise DataError(f"{where}: no .nii or .nii.gz files in {os.path.join(root, 'images')}")
        csv_path = os.path.join(root, LABELS_CSV)
        classify = os.path.isfile(csv_path) and not os.path.isdir(os.path.join(root, "labels"))
        if classify:
            if class_names is None and "labels" in meta:
                class_names = _class_names(meta["labels"], meta_path)
            labelled, class_names = self._classes(csv_path, images, class_names)
        else:
            labelled = self._pair(root, images, where)
        if split == "test":
            tests = _nifti_files(os.path.join(root, "test"))
            cases = [CaseFiles(nifti.strip_suffix(os.path.basename(p)), (p,)) for p in tests]
        else:
            cases = choose_split(labelled, split, val_fraction, root)
        if not cases:
            raise DataError(f"{where}: no cases in split {split!r}")
        n_channels = self._channels(images[0])
        if modality is not None:
            modalities = (modality,) * n_channels if isinstance(modality, str) else tuple(modality)
        elif "modality" in meta or "channel_names" in meta:
            modalities = _modalities(meta, meta_path)
        else:
            modalities = ("MR",) * n_channels
        if len(modalities) != n_channels:
            raise DataError(f"{images[0]}: has {n_channels} channels but {len(modalities)} modalities are given")
        if class_names is None:
            class_names = (_class_names(meta["labels"], meta_path) if "labels" in meta
                           else self._scan_classes(labelled))
        if len(class_names) < 2:
            raise ValueError(f"class_names needs background and at least one class, got {class_names!r}")
        super().__init__(cases, class_names=class_names, modalities=modalities, spacing=spacing,
                         ct_window=ct_window, cache_dir=cache_dir, where=where,
                         task="classification" if classify else "segmentation")

    @staticmethod
    def _classes(csv_path: str, images: list[str], class_names) -> tuple[list[CaseFiles], tuple[str, ...]]:
        """Cases of ``labels.csv`` (case,label) and the class names (given, else '0'..'K-1')."""
        try:
            with open(csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{csv_path}: cannot read ({' '.join(str(exc).split())})") from None
        if not rows or not {"case", "label"} <= set(rows[0]):
            raise DataError(f"{csv_path}: expected a header 'case,label' and one row per image")
        by_name = {nifti.strip_suffix(os.path.basename(p)): p for p in images}
        values = {}
        for row in rows:
            name = str(row["case"]).strip()
            if name not in by_name:
                raise DataError(f"{csv_path}: case {name}: no image images/{name}.nii.gz")
            values[name] = row["label"]
        missing = sorted(set(by_name) - set(values))
        if missing:
            raise DataError(f"{csv_path}: case {missing[0]}: image has no row")
        if class_names is None:
            ints = [_class_of(v, 1 << 30, f"{csv_path}: case {n}") for n, v in values.items()]
            class_names = tuple(str(i) for i in range(max(max(ints) + 1, 2)))
        k = len(class_names)
        cases = [CaseFiles(n, (by_name[n],), cls=_class_of(v, k, f"{csv_path}: case {n}")) for n, v in values.items()]
        return cases, tuple(class_names)

    @staticmethod
    def _pair(root: str, images: list[str], where: str) -> list[CaseFiles]:
        labels = {nifti.strip_suffix(os.path.basename(p)): p for p in _nifti_files(os.path.join(root, "labels"))}
        cases = []
        for path in images:
            name = nifti.strip_suffix(os.path.basename(path))
            if name not in labels:
                raise DataError(f"{path}: no label file labels/{name}.nii.gz (or .nii) in {where}")
            cases.append(CaseFiles(name, (path,), labels.pop(name)))
        if labels:
            path = next(iter(labels.values()))
            raise DataError(f"{path}: label has no image of the same name in {os.path.join(root, 'images')}")
        return cases

    @staticmethod
    def _channels(path: str) -> int:
        shape, _, _ = nifti.file_geometry(path)
        return int(shape[3]) if len(shape) == 4 else 1

    @staticmethod
    def _scan_classes(cases: Sequence[CaseFiles]) -> tuple[str, ...]:
        top = max(int(nifti.read_label(c.label).array.max()) for c in cases)
        return ("background",) + tuple(f"class{i}" for i in range(1, max(top, 1) + 1))


def _accepted(cls, options: dict, kind: str) -> None:
    params = inspect.signature(cls).parameters
    for name in options:
        if name not in params or params[name].kind is not inspect.Parameter.KEYWORD_ONLY:
            accepted = sorted(n for n, p in params.items()
                              if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in ("cache_dir", "seed"))
            raise ValueError(f"data option {name!r} is not accepted by {kind!r} (accepted: {', '.join(accepted)})")


def regions_source(split: str = "train", *, cache_dir: str | None = None, seed: int = 0, cases_per_class: int = 40,
                   val_cases_per_class: int = 15, size: int = 32) -> "MSDSource":
    """The built-in classification data set (:mod:`train.data.regions`) as an ``msd:`` source.

    Rendered once into ``cache_dir``; the source honours its ``splits_final.json``
    and carries ``flip_classes`` for label-aware flips.
    """
    from train.data import regions  # pylint: disable=import-outside-toplevel

    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = regions.ensure_written(cache_dir, seed=seed, cases_per_class=cases_per_class,
                                  val_cases_per_class=val_cases_per_class, size=size)
    volumes = os.path.join(os.fspath(cache_dir), "volumes") if cache_dir is not None else None
    source = MSDSource(root, split, cache_dir=volumes, seed=seed)
    source.flip_classes = regions.FLIP_CLASSES
    return source


def make_source(spec: str, split: str = "train", *, cache_dir: str | None = None, seed: int = 0, **options):
    """Builds a source from a spec: 'mni152', 'synthetic', 'regions', 'msd:PATH' or 'folder:PATH'.

    ``options`` go to the source's constructor (e.g. ``spacing=(1, 1, 1)`` for
    msd/folder, ``size=32`` for synthetic); an option it does not take is a
    ValueError naming it.
    """
    if not isinstance(spec, str):
        raise TypeError(f"data spec must be a string, got {type(spec).__name__}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind, _, path = spec.partition(":")
    if kind == "synthetic" and not path:
        from train.data.synthetic import SyntheticSource
        cls, args = SyntheticSource, (split,)
    elif kind == "mni152" and not path:
        from train.data.mni152 import MNI152Source  # pylint: disable=import-outside-toplevel
        cls, args = MNI152Source, (split,)
    elif kind == "regions" and not path:
        cls, args = regions_source, (split,)
    elif kind in ("msd", "folder") and path:
        cls, args = (MSDSource if kind == "msd" else FolderSource), (path, split)
    else:
        raise ValueError(f"unknown data spec {spec!r}; expected 'mni152', 'synthetic', 'regions', 'msd:PATH' or 'folder:PATH'")
    _accepted(cls, options, kind)
    return cls(*args, cache_dir=cache_dir, seed=seed, **options)
