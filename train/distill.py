"""A finished run as a teacher: its logits on a student run's training cases.

``--teacher=WORKDIR`` names a finished segmentation run of any dims and any
spacing. For every training case of the student the teacher sees that case
(the same anatomy the student's labels describe) resampled onto the
teacher's own grid: the case's field of view at the teacher's spacing, with
its orientation (:func:`teacher_grid`; a Gaussian of the box's variance
before a coarser grid, as :mod:`train.data.mni152` makes its lower
resolutions). The teacher predicts there with its own window (a 2D teacher
slice by slice), and its logits are resampled in world coordinates back onto
the case's grid (:func:`train.data.resample.resample_to_grid`, trilinear;
the "logits" are the log of the sliding-window probabilities, equal to the
network's logits up to a per-voxel constant that the softmax ignores). Voxels
outside the teacher grid's extent are NaN: the distillation term leaves
them out.

A student's patches are crops of its cases, so cropping the case-grid
logits is the same as resampling the teacher onto the patch (resampling
commutes with cropping; tested). The logits are computed once per case
before training and kept in ``WORKDIR/teacher/`` as float16 ``.npy`` files
(``teacher.json`` records which teacher and checkpoint made them; another
teacher empties the folder), so a step only reads them, and unlabelled cases
cost no teacher inference during training.

When the teacher's spacing is finer than the student's it sees an
upsampled, blurrier image than it was trained on: a slice teacher at 1 mm
teaching a 4 mm student gets 4 mm data. That is the honest reading of
"the teacher sees the student's case"; the README's distillation table shows
what it costs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from train import predict
from train.config import ConfigError
from train.data.nifti import DataError
from train.data.resample import crop_affine, resample_to_grid

TEACHER_DIR = "teacher"
_RECORD = "teacher.json"
_MIN_PROBABILITY = 1e-6  # log(1e-6) = -13.8: floor of the logits, fits float16


class Teacher:
    """A finished run's model, restored, with what inference on it needs.

    Attributes: ``workdir``, ``config`` (its config.json), ``model`` (an NNX
    model in eval mode), ``step`` (the checkpoint restored: the best by
    validation), ``spacing`` ((3,) mm, or None when it trained on the
    native grids), ``window`` (its sliding window: 3 entries, or 2 for a 2D
    teacher).
    """

    def __init__(self, workdir: str, config: dict, model, step: int):
        from train.evaluate import eval_view, sliding_window

        self.workdir, self.config, self.model, self.step = str(workdir), config, model, int(step)
        spacing = config.get("spacing")
        self.spacing = None if spacing is None else np.broadcast_to(np.asarray(spacing, np.float64), (3,)).copy()
        self.window = sliding_window(config["patch"], config["dims"])
        self.overlap = float(config.get("eval_overlap", 0.5))
        self._view = eval_view(model)

    def describe(self) -> dict:
        """What summary.json and teacher.json record about the teacher."""
        return {"workdir": os.path.abspath(self.workdir), "step": self.step, "dims": self.config["dims"],
                "spacing": None if self.spacing is None else self.spacing.tolist(), "model": self.config["model"]}

    def logits(self, case: dict) -> np.ndarray:
        """``(D, H, W, K)`` float32 logits on ``case``'s grid; NaN where the teacher has no data."""
        from train.evaluate import predict_probabilities

        image = np.asarray(case["image"], np.float32)
        shape, affine = image.shape[:3], np.asarray(case["affine"], np.float64)
        spacing = np.broadcast_to(np.asarray(case.get("spacing", 1.0), np.float64), (3,))
        target = spacing if self.spacing is None else self.spacing
        grid_shape, grid = teacher_grid(shape, affine, spacing, target)
        seen = resample_image(image, affine, grid_shape, grid, factor=target / spacing)
        probs = predict_probabilities(self._view, seen, patch=self.window, overlap=self.overlap)
        logits = np.log(np.maximum(probs, _MIN_PROBABILITY))
        # Half a teacher voxel beyond the outermost centres: the teacher's voxels cover the case's extent.
        out, valid = resample_to_grid(logits, grid, shape, affine, order=1, channel_axis=-1, margin=0.5)
        out[~valid] = np.nan
        return out


def teacher_grid(shape, affine: np.ndarray, spacing, target_spacing) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` of the grid covering a case's field of view at ``target_spacing`` (mm).

    Each axis is cut into ``round(n * spacing / target)`` voxels (at least
    one) of ``f = target / spacing`` case voxels; coarse voxel ``i``'s centre
    lies at case index ``f * i + (f - 1) / 2``, so the coarse voxels tile the
    case's extent as the case's own voxels do.
    """
    shape = np.asarray(shape, np.int64)
    factor = np.asarray(target_spacing, np.float64) / np.asarray(spacing, np.float64)
    coarse = np.maximum(1, np.round(shape / factor)).astype(np.int64)
    return tuple(int(n) for n in coarse), crop_affine(affine, (factor - 1) / 2, factor)


def resample_image(image: np.ndarray, affine, shape, target_affine, *, factor) -> np.ndarray:
    """``(D, H, W, C)`` image resampled onto another grid; smoothed first along axes that get coarser.

    The Gaussian has the variance of a ``factor``-wide box (as
    :func:`train.data.mni152.downsample`), so a coarse voxel holds the
    average of the fine ones it covers rather than an aliased sample.
    """
    factor = np.broadcast_to(np.asarray(factor, np.float64), (3,))
    sigma = np.sqrt(np.maximum(factor**2 - 1, 0) / 12)
    if np.any(sigma > 0):
        image = ndimage.gaussian_filter(image, tuple(sigma) + (0,), mode="nearest")
    out, _ = resample_to_grid(image, affine, shape, target_affine, order=1, channel_axis=-1)
    return out


def load_teacher(workdir: str, *, num_classes: int, num_channels: int, class_names=None) -> Teacher:
    """The finished run in ``workdir``, checked against the student's data; ConfigError('teacher') otherwise."""
    root = Path(workdir)
    if not (root / "summary.json").is_file():
        raise ConfigError("teacher", f"{workdir}: not a finished run (no summary.json); let it finish or pick another")
    try:
        config = predict.load_run_config(workdir)
    except predict.PredictError as err:
        raise ConfigError("teacher", str(err)) from None
    if (config.get("task") or "segmentation") != "segmentation":
        raise ConfigError("teacher", f"{workdir}: a {config.get('task')} run; a teacher must segment")
    theirs = config.get("class_names") or []
    if int(config["num_classes"]) != num_classes:
        raise ConfigError("teacher", f"{workdir}: predicts {config['num_classes']} classes ({', '.join(theirs)}), "
                          f"the data set has {num_classes} ({', '.join(class_names or ())})")
    if int(config["in_channels"]) != num_channels:
        raise ConfigError("teacher", f"{workdir}: takes {config['in_channels']} input channel(s), "
                          f"the data set has {num_channels}")
    try:
        model = predict.build_run_model(config)
        step = predict.restore_model(workdir, model, which="best")
    except predict.PredictError as err:
        raise ConfigError("teacher", f"{workdir}: {err}") from None
    return Teacher(workdir, config, model, step)


def case_key(case: dict, index: int) -> str:
    """The cache file stem of a case: its name (made file-safe), else its index."""
    name = str(case.get("name") or f"case{index:05d}")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def cache_logits(teacher: Teacher, source, directory: Path, log=print) -> list[Path]:
    """Computes (or reuses) the teacher's logits for every case of ``source``; returns one .npy path per case."""
    directory.mkdir(parents=True, exist_ok=True)
    record = directory / _RECORD
    wanted = teacher.describe()
    if record.exists() and json.loads(record.read_text()) != wanted:
        for old in directory.glob("*.npy"):  # another teacher's logits
            old.unlink()
    record.write_text(json.dumps(wanted, indent=2) + "\n")
    paths, made = [], 0
    for i in range(len(source)):
        case = source[i]
        path = directory / f"{case_key(case, i)}.npy"
        if not path.exists():
            logits = teacher.logits(case).astype(np.float16)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, logits)
            os.replace(tmp, path)  # readers never see a partial file
            made += 1
        paths.append(path)
    log(f"teacher {teacher.workdir} (step {teacher.step}): logits of {len(paths)} cases in {directory} "
        f"({made} computed, {len(paths) - made} reused)")
    return paths


class DistillSource:
    """``source``'s cases with the teacher's cached logits; only ``labelled`` cases keep their labels.

    A case adds ``teacher`` ((D, H, W, K) float16, NaN where the teacher has
    no data) and ``labelled`` (1.0 or 0.0). An unlabelled case's label map is
    all background, so no patch position or loss depends on the hidden
    labels (its supervised term has weight 0 in the step).
    """

    def __init__(self, source, logits: list[Path], labelled):
        if len(logits) != len(source):
            raise ValueError(f"{len(logits)} teacher logit files for {len(source)} cases")
        self.source, self.logits = source, list(logits)
        self.labelled = np.zeros(len(source), bool)
        self.labelled[np.asarray(labelled, np.int64)] = True

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        case = dict(self.source[index])
        teacher = np.load(self.logits[index], mmap_mode="r")
        if teacher.shape[:3] != np.shape(case["image"])[:3]:
            raise DataError(f"{self.logits[index]}: teacher logits {teacher.shape[:3]} for a case of shape "
                            f"{np.shape(case['image'])[:3]}; delete the folder to recompute them")
        case["teacher"] = teacher
        case["labelled"] = float(self.labelled[index])
        if not self.labelled[index]:
            case["label"] = np.zeros(np.shape(case["label"]), np.int32)
        return case

    def __getattr__(self, name):
        if name in ("source", "logits", "labelled"):
            raise AttributeError(name)
        return getattr(self.source, name)
