"""A real 3D classification task: which side of the brain a crop comes from.

Every case is a cube of ``size``^3 voxels at 2 mm cut from a randomised
rendering (see :mod:`train.data.render`: deformation, tissue-contrast
remapping, bias field, gamma, blur, lower resolution, noise) of the MNI152
2009a T1 template that nilearn's wheel ships (see :mod:`train.data.mni152`).
The class says which outer side of the brain the cube touches:

====  =========  =========================================================
 0    left       its left face lies on the brain's left surface, centred
                 front-to-back
 1    right      the mirror image of ``left``
 2    anterior   its front face on the brain's frontal surface, centred on
                 the midline
 3    posterior  its back face on the occipital surface, on the midline
====  =========  =========================================================

The face sits between ``inset_mm`` inside and ``outset_mm`` outside the
brain's outermost voxel within the cube's slab, the other in-plane centre is
jittered by ``jitter_mm``, and the cube's depth position is uniform in its
slab. Depending on the draw the cube shows some space outside the brain,
or only the outermost cortex and its sulci.

Why this task:

- No trivial baseline solves it. The classes are balanced (majority = 1/K),
  and each image is passed through its own empirical distribution function
  onto one fixed reference distribution (a standard normal), so every case
  has *the same* intensity histogram: a classifier on the global histogram
  (:func:`train.metrics.baseline_accuracy`) is at chance by construction and
  the class lives only in where things are. (On the z-scored renderings
  before that step, left and right are mirror images of one symmetric
  template and so share their histogram distribution, but the share of
  cortex, CSF and outside-brain voxels differs somewhat between the lateral
  and the midline crops; the equalisation removes that cue.)
- A small 3D CNN learns it within minutes on a CPU: the cue is anatomical
  and spatial (where the cortex folds outward, where the interhemispheric
  fissure and the ventricles lie) and present at every axial level.
- It is 3D: a single axial slice shows it, but renderings randomise the
  contrast, so the network must recognise anatomy, not a tissue intensity.

Split, leak-free by axial slabs, as the segmentation demo's: training cubes
are cut only from renderings of the anatomy below MNI z = 12 mm, validation
cubes only from above z = 20 mm (the 8 mm between is used by neither), and
each rendering reads nothing outside its own cube plus a margin inside its
slab. No validation voxel reaches a training image. A hemisphere split would
leak: the template is exactly left-right symmetric, so the right hemisphere
is the mirror image of the left. Training cases are a function of
``(seed, index)``; validation cases do not depend on the seed.

Files (``write_dataset``), one class integer per case:

- ``layout='msd'``: ``dataset.json`` with ``labels`` ({"0": "left", ...}),
  ``modality`` ({"0": "MR"}), ``numTraining`` and ``training``:
  ``[{"image": "./imagesTr/NAME.nii.gz", "label": 2}, ...]``; images in
  ``imagesTr/``.
- ``layout='folder'``: ``images/NAME.nii.gz``, ``labels.csv`` (header
  ``case,label``, one row per image, the name without ``.nii.gz``) and the
  same ``dataset.json`` minus ``training``.
- Both: ``splits_final.json``, nnU-Net's format
  ``[{"train": [names], "val": [names]}]``, the slab split above. A reader
  must use it; a split by case name would mix slabs.

Names are ``tr_NNNN`` and ``va_NNNN``; they do not reveal the class.

Augmentation must respect the classes: a flip along depth (axis 0) keeps
the class, a flip along height (axis 1, anterior-posterior) swaps anterior
and posterior, a flip along width (axis 2, left-right) swaps left and right
(``FLIP_CLASSES[axis][c]`` is the class after the flip), and in-plane
rotations by 90 degrees turn a lateral cube into a midline one, so they are
not label-preserving here.

``python -m train.regions_report --out DIR`` writes the data set and prints the
split and the two baselines. ``--dataset=regions`` in the training app serves
it through :func:`train.data.sources.regions_source`, written once into the cache directory.
"""

from __future__ import annotations

import csv
import json
import os
import time

import numpy as np
from scipy import special

from train.data import mni152, nifti, render

CLASS_NAMES = ("left", "right", "anterior", "posterior")
SPACING = 2.0
# FLIP_CLASSES[axis][c]: the class of a class-c cube mirrored along (d, h, w) axis.
FLIP_CLASSES = {0: (0, 1, 2, 3), 1: (0, 1, 3, 2), 2: (1, 0, 2, 3)}
SPLITS_FILE = "splits_final.json"
LABELS_CSV = "labels.csv"
# Distinct random streams: validation cases never depend on the training seed.
_TRAIN_STREAM, _VAL_STREAM = 11, 12
_MARGIN = 4  # voxels rendered around the cube, so warps at its border read real anatomy
_PAD = 16  # in-plane zero padding of the template, for cubes that reach past it


def _slab(split: str):
    """The template's slab for `split`, zero-padded in-plane by `_PAD` voxels."""
    tpl = mni152.load_template(SPACING)
    region = tpl.region(split)
    pad = ((0, 0), (_PAD, _PAD), (_PAD, _PAD))
    arrays = [np.pad(a[region], pad) for a in (tpl.t1, tpl.label, tpl.head)]
    return tpl, arrays


def equalize(image: np.ndarray) -> np.ndarray:
    """Maps `image` through its own empirical CDF onto a standard normal.

    Voxel of rank r (0-based, ties broken by position) of n becomes
    Phi^-1((r + 0.5) / n): every image of a given size then holds exactly the
    same multiset of values, so no histogram statistic differs between cases.
    """
    flat = image.ravel()
    ranks = np.empty(flat.size, np.float64)
    ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size)
    return special.ndtri((ranks + 0.5) / flat.size).astype(np.float32).reshape(image.shape)


def render_case(split: str, cls: int, rng: np.random.Generator, *, size: int = 32, inset_mm: float = 8.0,
                outset_mm: float = 6.0, jitter_mm: float = 8.0) -> np.ndarray:
    """One cube (size, size, size) float32 of class `cls` from the `split` slab."""
    if not 0 <= cls < len(CLASS_NAMES):
        raise ValueError(f"class {cls} out of range [0, {len(CLASS_NAMES)})")
    tpl, (t1, label, head) = _slab(split)
    depth = t1.shape[0]
    if size > depth:
        raise ValueError(f"size={size}: the {split} slab is only {depth} voxels deep at {SPACING:g} mm")
    d0 = int(rng.integers(depth - size + 1))
    brain = head[d0:d0 + size] > 0.5
    hs = np.flatnonzero(brain.any(axis=(0, 2)))  # anterior-posterior extent (h grows anteriorly)
    ws = np.flatnonzero(brain.any(axis=(0, 1)))  # left-right extent (w grows to the right)
    face = rng.uniform(-inset_mm, outset_mm) / SPACING  # + outside the brain, - inside
    jitter = rng.uniform(-1, 1) * jitter_mm / SPACING
    if cls in (0, 1):  # lateral: centred front-to-back
        h0 = (hs[0] + hs[-1] + 1) / 2 - size / 2 + jitter
        w0 = ws[0] - face if cls == 0 else ws[-1] + 1 + face - size
    else:  # on the midline
        w0 = (ws[0] + ws[-1] + 1) / 2 - size / 2 + jitter
        h0 = hs[-1] + 1 + face - size if cls == 2 else hs[0] - face
    h0, w0 = int(round(h0)), int(round(w0))
    # Render the cube plus a margin (within the slab in depth), then cut it out.
    lo = np.array([max(d0 - _MARGIN, 0), h0 - _MARGIN, w0 - _MARGIN])
    hi = np.array([min(d0 + size + _MARGIN, depth), h0 + size + _MARGIN, w0 + size + _MARGIN])
    if lo[1] < 0 or lo[2] < 0 or hi[1] > t1.shape[1] or hi[2] > t1.shape[2]:
        raise AssertionError(f"cube box {lo}..{hi} leaves the padded slab {t1.shape}; raise _PAD")
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    image, _ = render.render(rng, t1[box], label[box], head[box], tpl.class_t1, SPACING)
    start = np.array([d0, h0, w0]) - lo
    cube = image[tuple(slice(int(s), int(s) + size) for s in start)]
    return equalize(cube)


def render_split(split: str, cases_per_class: int, *, size: int = 32, seed: int = 0):
    """Balanced cases of a split: (names, images (N, size, size, size), labels (N,)).

    Case i has class i % K, so classes interleave; training cases depend on
    (seed, i), validation cases on i alone.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r}: expected 'train' or 'validation'")
    if not isinstance(cases_per_class, (int, np.integer)) or cases_per_class < 1:
        raise ValueError(f"cases_per_class={cases_per_class!r}: expected a positive integer")
    k = len(CLASS_NAMES)
    prefix = "tr" if split == "train" else "va"
    names, images, labels = [], [], []
    for i in range(cases_per_class * k):
        stream = [_TRAIN_STREAM, seed, i] if split == "train" else [_VAL_STREAM, i]
        images.append(render_case(split, i % k, np.random.default_rng(stream), size=size))
        labels.append(i % k)
        names.append(f"{prefix}_{i:04d}")
    return names, np.stack(images), np.array(labels, np.int64)


def _memory_affine(size: int) -> np.ndarray:
    """(d, h, w) -> RAS mm: d along z, h along y, w along x, as the template.

    The cubes come from different places; one nominal grid at 2 mm, centred
    on the origin, keeps the files honest about spacing and orientation
    without telling where in the brain a cube was cut.
    """
    affine = np.zeros((4, 4))
    affine[0, 2] = affine[1, 1] = affine[2, 0] = SPACING
    affine[:3, 3] = -SPACING * (size - 1) / 2
    affine[3, 3] = 1.0
    return affine


def write_dataset(out: str, *, layout: str = "msd", cases_per_class: int = 40, val_cases_per_class: int = 15,
                  size: int = 32, seed: int = 0) -> dict:
    """Renders and writes the data set under `out` (see the module docstring).

    Args:
      out: the folder to create (it may exist, but must not hold a data set).
      layout: 'msd' (dataset.json + imagesTr/) or 'folder' (images/ + labels.csv).
      cases_per_class: training cases per class.
      val_cases_per_class: validation cases per class.
      size: cube edge in voxels at 2 mm (at most 32: the validation slab is
        35 voxels deep).
      seed: the training renderings' seed.

    Returns:
      {'root', 'layout', 'class_names', 'train': names, 'val': names,
      'train_labels', 'val_labels', 'train_images', 'val_images'} (the images as written, for
      baselines such as :func:`train.metrics.baseline_accuracy`).
    """
    if layout not in ("msd", "folder"):
        raise ValueError(f"layout={layout!r}: expected 'msd' or 'folder'")
    out = os.fspath(out)
    for existing in ("dataset.json", SPLITS_FILE):
        if os.path.exists(os.path.join(out, existing)):
            raise ValueError(f"{os.path.join(out, existing)}: already exists; choose an empty folder")
    train = render_split("train", cases_per_class, size=size, seed=seed)
    val = render_split("validation", val_cases_per_class, size=size)
    image_dir = "imagesTr" if layout == "msd" else "images"
    affine = _memory_affine(size)
    rows = []
    for names, images, labels in (train, val):
        for name, image, label in zip(names, images, labels):
            nifti.write_volume(image, affine, os.path.join(out, image_dir, f"{name}.nii.gz"))
            rows.append((name, int(label)))
    meta = {
        "name": "MNI152 brain sides",
        "description": "Which side of the brain a 64 mm cube of a randomised MNI152 rendering touches "
                       "(train.data.regions).",
        "tensorImageSize": "3D",
        "modality": {"0": "MR"},
        "labels": {str(i): n for i, n in enumerate(CLASS_NAMES)},
        "numTraining": len(rows),
    }
    if layout == "msd":
        meta["training"] = [{"image": f"./{image_dir}/{n}.nii.gz", "label": c} for n, c in rows]
    else:
        with open(os.path.join(out, LABELS_CSV), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case", "label"])
            writer.writerows(rows)
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(out, SPLITS_FILE), "w") as f:
        json.dump([{"train": list(train[0]), "val": list(val[0])}], f, indent=2)
    return {"root": out, "layout": layout, "class_names": CLASS_NAMES, "train": list(train[0]),
            "val": list(val[0]), "train_labels": train[2], "val_labels": val[2],
            "train_images": list(train[1]), "val_images": list(val[1])}


def ensure_written(cache_dir: str | None = None, *, seed: int = 0, cases_per_class: int = 40,
                   val_cases_per_class: int = 15, size: int = 32) -> str:
    """The data set's ``msd:`` folder under ``CACHE_DIR/regions/<settings>/``, written on first use.

    Written to a temporary folder, then renamed, so concurrent runs never see
    half a data set. :func:`train.data.sources.make_source` serves it as the
    built-in ``regions`` data set (with :data:`FLIP_CLASSES` for label-aware flips).
    """
    import shutil
    import tempfile

    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "acsjax")
    base = os.path.join(os.fspath(cache_dir), "regions")
    root = os.path.join(base, f"v1-size{size}-train{cases_per_class}-val{val_cases_per_class}-seed{seed}")
    if not os.path.isfile(os.path.join(root, SPLITS_FILE)):
        os.makedirs(base, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".writing-", dir=base)
        try:
            started = time.perf_counter()
            write_dataset(tmp, cases_per_class=cases_per_class, val_cases_per_class=val_cases_per_class,
                          size=size, seed=seed)
            try:
                os.rename(tmp, root)
                print(f"regions: rendered {len(CLASS_NAMES) * (cases_per_class + val_cases_per_class)} cases "
                      f"into {root} in {time.perf_counter() - started:.0f}s", flush=True)
            except OSError:  # another process finished first: use its copy
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
