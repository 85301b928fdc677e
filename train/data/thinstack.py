"""A thick-slice MNI152 data set on disk, in the Medical Segmentation Decathlon layout.

  python -m train.data.thinstack --out /tmp/thinstack          # 7 mm slices, 2 mm in-plane
  python -m train.plan --dataset=msd:/tmp/thinstack

Clinical MR and CT are often stacks of thick axial slices (5-6 mm apart,
under 1 mm in-plane). This writes such a data set from real anatomy, the
MNI152 2009 T1 template and its grey/white-matter maps that nilearn's wheel
ships (1 mm isotropic), so anisotropic planning, loading and training can be
tried without a download. Each case is the template averaged over boxes of
``inplane_mm`` x ``inplane_mm`` in-plane and ``slice_mm`` along depth (a thick
slice integrates its whole thickness, as a scanner's does), cropped in-plane
to about ``size`` x ``size`` voxels around the brain's centre. Cases differ
slightly: the slice thickness cycles through ``slice_mm + (0, -jitter_mm,
+jitter_mm)``, and the crop's size and offset shift by a few voxels.

Labels follow :func:`train.data.mni152.labels_from_probabilities` on the
box-averaged probability maps: 1 grey matter, 2 white matter.

Rendered mode (``--rendered``, :func:`write_rendered_dataset`): the cases are
the demo's randomised renderings instead (:class:`train.data.mni152.MNI152Source`:
deformations, tissue contrasts, bias fields, noise; training cases from the
lower brain slab, validation cases from the upper one plus the real T1),
rendered at ``source_mm`` (1 or 2 mm) and box-averaged in the same way
(default 6 mm slices, 2 mm in-plane). Each label is the same rule applied to
the box-averaged one-hot grey and white matter maps (a class takes a thick
voxel when it fills more than half of it). ``splits_final.json`` keeps the
demo's split, so no validation anatomy reaches training.

  python -m train.data.thinstack --rendered --out /tmp/thickdemo    # 12 + 3 renderings and the real T1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

from train.data import mni152, nifti
from train.data.sources import SPLITS_FILE

CLASS_NAMES = mni152.CLASS_NAMES


@functools.lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 1 mm T1, grey and white matter probabilities (D, H, W) and the affine."""
    paths = mni152.template_paths()
    t1 = nifti.read_volume(paths["t1"])
    # The probability maps are stored as 0..255.
    p_gm = nifti.read_volume(paths["gm"]).array / 255.0
    p_wm = nifti.read_volume(paths["wm"]).array / 255.0
    return t1.array, p_gm.astype(np.float32), p_wm.astype(np.float32), t1.affine


def _box_mean(volume: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Averages ``volume`` over non-overlapping boxes (the trailing remainder is dropped)."""
    shape = [n // f for n, f in zip(volume.shape, factors)]
    cut = volume[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]
    return cut.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2]).mean(axis=(1, 3, 5))


def make_case(slice_mm: int, inplane_mm: int, size: int, *, offset: tuple[int, int] = (0, 0),
              max_slices: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One thick-slice case: ``(image float32 (D, H, W), label int32, affine)``.

    The depth range is the brain's extent (the template's nonzero T1),
    centrally cut to ``max_slices``; in-plane the crop is ``size`` x ``size``
    around the brain's centre, moved by ``offset`` voxels.
    """
    if slice_mm < 1 or inplane_mm < 1 or size < 4:
        raise ValueError(f"need slice_mm >= 1, inplane_mm >= 1 and size >= 4, got {slice_mm}, {inplane_mm}, {size}")
    t1, p_gm, p_wm, affine = _template()
    factors = (int(slice_mm), int(inplane_mm), int(inplane_mm))
    t1, p_gm, p_wm = (_box_mean(v, factors) for v in (t1, p_gm, p_wm))
    inside = np.argwhere(t1 > 0.05 * t1.max())
    lo, hi = inside.min(0), inside.max(0) + 1
    d0, d1 = int(lo[0]), int(hi[0])
    if max_slices is not None and d1 - d0 > max_slices:
        d0 += (d1 - d0 - max_slices) // 2
        d1 = d0 + max_slices
    starts = [d0]
    for axis, shift in zip((1, 2), offset):
        centre = (int(lo[axis]) + int(hi[axis])) // 2 + int(shift)
        starts.append(int(np.clip(centre - size // 2, 0, max(t1.shape[axis] - size, 0))))
    box = (slice(d0, d1), slice(starts[1], starts[1] + size), slice(starts[2], starts[2] + size))
    # Voxel j of a box-averaged axis is centred on old index start + j * f + (f - 1) / 2.
    step = np.eye(4)
    step[:3, :3] = np.diag(factors)
    step[:3, 3] = [s * f + (f - 1) / 2 for s, f in zip(starts, factors)]
    label = mni152.labels_from_probabilities(p_gm[box], p_wm[box])
    return np.ascontiguousarray(t1[box], np.float32), label, affine @ step


def write_dataset(out: str, *, num_cases: int = 4, slice_mm: int = 7, inplane_mm: int = 2, size: int = 48,
                  jitter_mm: int = 1, max_slices: int | None = None) -> str:
    """Writes ``num_cases`` thick-slice cases as an MSD task folder; returns ``out``.

    Layout: ``dataset.json``, ``imagesTr/thin_NNN.nii.gz``,
    ``labelsTr/thin_NNN.nii.gz``; read it with the data spec ``msd:OUT``.
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    if not 0 <= jitter_mm < slice_mm:
        raise ValueError(f"jitter_mm must be in [0, slice_mm), got {jitter_mm}")
    training = []
    for i in range(num_cases):
        thickness = slice_mm + (0, -jitter_mm, jitter_mm)[i % 3]
        side = size + (0, 2, -2)[i % 3]
        image, label, affine = make_case(thickness, inplane_mm, side, offset=((i % 3) - 1, 1 - (i % 3)),
                                         max_slices=max_slices)
        training.append(_write_case(out, f"thin_{i:03d}", image, label, affine))
    _write_dataset_json(out, "MNI152 thick slices", f"MNI152 2009 T1 box-averaged to {slice_mm} mm slices "
                        f"(+-{jitter_mm} mm), {inplane_mm} mm in-plane", training)
    return out


def _write_case(out: str, name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> dict:
    """Writes one case's image and label; returns its dataset.json 'training' entry."""
    nifti.write_volume(image, affine, os.path.join(out, "imagesTr", f"{name}.nii.gz"))
    nifti.write_volume(label, affine, os.path.join(out, "labelsTr", f"{name}.nii.gz"))
    return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


def _write_dataset_json(out: str, name: str, description: str, training: list[dict]) -> None:
    meta = {
        "name": name,
        "description": description,
        "labels": {str(i): n for i, n in enumerate(CLASS_NAMES)},
        "modality": {"0": "MRI"},
        "numTraining": len(training),
        "training": training,
        "test": [],
    }
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)


def thicken(image: np.ndarray, label: np.ndarray, affine: np.ndarray,
            factors: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One rendered case box-averaged by ``factors`` ``(d, h, w)``: ``(image, label, affine)``.

    The image is averaged over each box; the label is
    :func:`train.data.mni152.labels_from_probabilities` of the box-averaged
    one-hot grey and white matter maps; the affine maps the new voxel centres.
    """
    factors = tuple(int(f) for f in factors)
    thick = _box_mean(np.asarray(image, np.float32), factors)
    p_gm, p_wm = (_box_mean((label == c).astype(np.float32), factors) for c in (1, 2))
    step = np.eye(4)
    step[:3, :3] = np.diag(factors)
    step[:3, 3] = [(f - 1) / 2 for f in factors]
    return np.ascontiguousarray(thick, np.float32), mni152.labels_from_probabilities(p_gm, p_wm), affine @ step


def write_rendered_dataset(out: str, *, num_train: int = 12, num_val: int = 3, slice_mm: int = 6,
                           inplane_mm: int = 2, source_mm: int = 2, seed: int = 0, cache_dir=None) -> str:
    """Writes thick-slice versions of the demo's renderings as an MSD task with ``splits_final.json``; returns ``out``.

    ``num_train`` training renderings (of seed ``seed``) and ``num_val``
    validation renderings plus the real T1 (``mni152_t1_real``), rendered at
    ``source_mm`` mm and box-averaged to ``slice_mm`` mm slices and
    ``inplane_mm`` mm in-plane (both multiples of ``source_mm``). Case names
    are the demo's (``mni152_train_s0_000``, ``mni152_val_000``, ...);
    fold 0 of ``splits_final.json`` lists the training ones as 'train' and the
    validation ones as 'val'.
    """
    if source_mm not in (1, 2):
        raise ValueError(f"source_mm must be 1 or 2, got {source_mm}")
    if slice_mm % source_mm or inplane_mm % source_mm or min(slice_mm, inplane_mm) < source_mm:
        raise ValueError(f"slice_mm ({slice_mm}) and inplane_mm ({inplane_mm}) must be multiples of "
                         f"source_mm ({source_mm})")
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train}, {num_val}")
    factors = (slice_mm // source_mm, inplane_mm // source_mm, inplane_mm // source_mm)
    sources = (mni152.MNI152Source("train", seed=seed, spacing=source_mm, num_cases=num_train, cache_dir=cache_dir),
               mni152.MNI152Source("validation", spacing=source_mm, num_cases=num_val, cache_dir=cache_dir))
    training, split = [], {"train": [], "val": []}
    for source, part in zip(sources, ("train", "val")):
        for index in range(len(source)):
            case = source[index]
            image, label, affine = thicken(case["image"][..., 0], case["label"], case["affine"], factors)
            training.append(_write_case(out, case["name"], image, label, affine))
            split[part].append(case["name"])
    with open(os.path.join(out, SPLITS_FILE), "w") as f:
        json.dump([split], f, indent=2)
    # dataset.json last: a folder that has it is complete.
    _write_dataset_json(out, "MNI152 renderings, thick slices",
                        f"the MNI152 demo's randomised renderings at {source_mm} mm, box-averaged to {slice_mm} mm "
                        f"slices, {inplane_mm} mm in-plane; train: lower brain slab, val: upper slab", training)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.data.thinstack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (dataset.json, imagesTr, labelsTr)")
    parser.add_argument("--num_cases", type=int, default=None, help="cases (default 4; --rendered: 12 training)")
    parser.add_argument("--slice_mm", type=int, default=None,
                        help="slice thickness and spacing in mm (default 7; --rendered: 6)")
    parser.add_argument("--inplane_mm", type=int, default=2, help="in-plane voxel size in mm")
    parser.add_argument("--size", type=int, default=48, help="in-plane crop in voxels")
    parser.add_argument("--jitter_mm", type=int, default=1, help="slice thickness varies by this much between cases")
    parser.add_argument("--max_slices", type=int, default=None, help="keep at most this many central slices")
    parser.add_argument("--rendered", action="store_true",
                        help="the demo's randomised renderings instead of the template (with splits_final.json)")
    parser.add_argument("--num_val", type=int, default=3, help="--rendered: validation renderings (plus the real T1)")
    parser.add_argument("--source_mm", type=int, default=2, help="--rendered: rendering resolution, 1 or 2 mm")
    parser.add_argument("--seed", type=int, default=0, help="--rendered: seed of the training renderings")
    args = parser.parse_args(argv)
    try:
        if args.rendered:
            slice_mm = 6 if args.slice_mm is None else args.slice_mm
            num_cases = 12 if args.num_cases is None else args.num_cases
            write_rendered_dataset(args.out, num_train=num_cases, num_val=args.num_val, slice_mm=slice_mm,
                                   inplane_mm=args.inplane_mm, source_mm=args.source_mm, seed=args.seed)
            num_cases += args.num_val + 1
        else:
            num_cases = 4 if args.num_cases is None else args.num_cases
            write_dataset(args.out, num_cases=num_cases, slice_mm=7 if args.slice_mm is None else args.slice_mm,
                          inplane_mm=args.inplane_mm, size=args.size, jitter_mm=args.jitter_mm,
                          max_slices=args.max_slices)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {num_cases} cases to {args.out}; plan with: python -m train.plan --dataset=msd:{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
