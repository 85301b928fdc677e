"""Run outputs a person reads: ``summary.json`` and a slice figure of a validation case.

``summary.json`` is written with sorted keys and a fixed layout so that two
runs can be compared with ``diff``. The figure shows axial, coronal and
sagittal slices through one validation case with ground truth (solid) and
prediction (dashed) contours per class, and the per-class Dice in its title.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

SUMMARY = "summary.json"
FIGURE = "validation.png"
REQUIRED = ("init", "pretrained", "steps", "val_dice", "val_dice_mean", "baseline_threshold_dice", "wall_s")
# What every run's summary holds, whatever its task (train.tasks adds its own metrics).
COMMON = ("init", "pretrained", "steps", "wall_s")
# Distinct on grey images and for common colour-vision deficiencies (Okabe-Ito).
COLORS = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#FFFFFF")


def _jsonable(value):
    """Arrays, numpy scalars, tuples and NaN/Inf made JSON-safe (non-finite -> None)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__array__"):  # numpy and jax arrays and scalars
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary_from_evaluation(evaluation: Mapping[str, Any], **fields) -> dict[str, Any]:
    """A summary dict: the evaluation's metrics plus ``fields`` (init, steps, wall_s, ...).

    Takes ``val_dice``, ``val_dice_mean``, ``baseline_threshold_dice``,
    ``baseline_threshold``, ``cases`` (renamed ``val_cases``), ``class_names``
    and ``num_cases`` from an :func:`train.evaluate.evaluate` result;
    ``fields`` are added as they are and win on a clash.
    """
    keys = ("val_dice", "val_dice_mean", "baseline_threshold_dice", "baseline_threshold", "class_names", "num_cases")
    out = {k: evaluation[k] for k in keys if k in evaluation}
    if "cases" in evaluation:
        out["val_cases"] = evaluation["cases"]
    base = evaluation.get("baseline_threshold_dice")
    if base is not None and evaluation.get("val_dice_mean") is not None:
        # The headline: how much the network beats a global threshold.
        out["val_dice_minus_baseline"] = float(evaluation["val_dice_mean"]) - float(base)
    out.update(fields)
    return out


def write_summary(workdir: str, summary: Mapping[str, Any], *, filename: str = SUMMARY,
                  required: Sequence[str] = REQUIRED) -> str:
    """Writes ``WORKDIR/summary.json`` (sorted keys, indented) atomically; returns its path.

    ``summary`` must hold at least the ``required`` fields, by default a
    segmentation run's ``REQUIRED``: init, pretrained, steps, val_dice (per
    class), val_dice_mean, baseline_threshold_dice (None when not computed)
    and wall_s. Non-finite floats become null.
    """
    missing = [k for k in required if k not in summary]
    if missing:
        raise ValueError(f"{filename}: summary lacks required fields {missing}")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, filename)
    text = json.dumps(_jsonable(dict(summary)), sort_keys=True, indent=2, allow_nan=False) + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # readers never see half a file
    return path


def read_summary(workdir: str, *, filename: str = SUMMARY) -> dict[str, Any]:
    """Reads ``WORKDIR/summary.json``; a one-line error names the file if missing or broken."""
    path = os.path.join(workdir, filename)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None


def focus_point(label: np.ndarray, prediction: np.ndarray | None = None) -> tuple[int, int, int]:
    """The (z, y, x) slice indices to show: on each axis, the slice with the most foreground.

    The foreground's centre of mass would put the sagittal slice of a brain on
    the midline, where there is little tissue to see. Falls back to the
    prediction's foreground, then to the volume centre.
    """
    for volume in (label, prediction):
        if volume is None:
            continue
        fg = np.asarray(volume) > 0
        if fg.any():
            return tuple(int(np.argmax(fg.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3))
    return tuple(int(s) // 2 for s in np.shape(label)[:3])


def _views(point, spacing):
    """(title, index into the (z, y, x) volume, aspect, axis letters) of each panel.

    With origin='lower', a slice's first axis runs upwards: superior at the
    top of coronal and sagittal views, anterior at the top of the axial view,
    the patient's right on the right of axial and coronal views (RAS layout).
    """
    dz, dy, dx = (float(s) for s in spacing)
    z, y, x = point
    return (
        (f"axial z={z}", (z, slice(None), slice(None)), dy / dx, ("L", "R", "P", "A")),
        (f"coronal y={y}", (slice(None), y, slice(None)), dz / dx, ("L", "R", "I", "S")),
        (f"sagittal x={x}", (slice(None), slice(None), x), dz / dy, ("P", "A", "I", "S")),
    )


def plot_case(
    path: str,
    image: np.ndarray,
    label: np.ndarray,
    prediction: np.ndarray,
    *,
    class_names: Sequence[str],
    dice: Mapping[str, float] | None = None,
    name: str = "",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    point: Sequence[int] | None = None,
    title: str = "",
) -> str:
    """Saves a PNG of three orthogonal slices with label and prediction contours.

    Args:
      path: the PNG to write.
      image: (D, H, W) or (D, H, W, C) in the (z, y, x) RAS layout; the first
        channel is shown, windowed to its 1st-99th percentile.
      label, prediction: (D, H, W) integer maps.
      class_names: all names, background first (background is not drawn).
      dice: {class name: Dice} for the title (e.g. one case of an evaluation).
      spacing: voxel size (d, h, w) in mm, for the panels' aspect ratios.
      point: (z, y, x) the slices pass through; default :func:`focus_point`.
      title: an extra first title line (e.g. the run's init and step).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    image = np.asarray(image, np.float32)
    image = image[..., 0] if image.ndim == 4 else image
    label, prediction = np.asarray(label), np.asarray(prediction)
    if not image.shape == label.shape == prediction.shape:
        raise ValueError(f"plot_case: image {image.shape}, label {label.shape}, prediction {prediction.shape} differ")
    point = focus_point(label, prediction) if point is None else tuple(int(p) for p in point)
    lo, hi = np.percentile(image, (1, 99))
    classes = [c for c in range(1, len(class_names))]

    from matplotlib.colors import to_rgba

    rows = (("ground truth", label), ("prediction", prediction))
    # Each panel's width follows its physical aspect, so all panels share one height.
    dz, dy, dx = (float(v) for v in spacing)
    d, h, w = image.shape
    ratios = [w * dx / (h * dy), w * dx / (d * dz), h * dy / (d * dz)]
    row_height = 3.0
    width = float(np.clip(sum(ratios) * row_height * 1.15 + 1.0, 8.0, 18.0))
    # Explicit spacing leaves room for the orientation letters between panels.
    fig, axes = plt.subplots(2, 3, figsize=(width, 2 * row_height + 1.9), facecolor="black", squeeze=False,
                             gridspec_kw={"width_ratios": ratios, "wspace": 0.12, "hspace": 0.16,
                                          "left": 0.04, "right": 0.98, "bottom": 0.09, "top": 0.86})
    for row, (row_name, volume) in enumerate(rows):
        for col, (panel, index, aspect, letters) in enumerate(_views(point, spacing)):
            ax = axes[row, col]
            ax.imshow(image[index], cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                      interpolation="nearest")
            labels2d = volume[index]
            # A light fill shows the regions, a contour their exact border.
            fill = np.zeros(labels2d.shape + (4,), np.float32)
            for c in classes:
                color = COLORS[(c - 1) % len(COLORS)]
                mask = labels2d == c
                fill[mask] = to_rgba(color, 0.28)
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.1,
                               origin="lower")
            ax.imshow(fill, origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if row == 0:
                ax.set_title(panel, color="white", fontsize=10, pad=14)
            if col == 0:
                ax.set_ylabel(row_name, color="white", fontsize=12, labelpad=16)
            # Orientation letters just outside the image's edges.
            left, right, bottom, top = letters
            kw = dict(color="#FFD700", fontsize=9, transform=ax.transAxes, fontweight="bold")
            ax.text(-0.01, 0.5, left, ha="right", va="center", **kw)
            ax.text(1.01, 0.5, right, ha="left", va="center", **kw)
            ax.text(0.5, -0.01, bottom, ha="center", va="top", **kw)
            ax.text(0.5, 1.01, top, ha="center", va="bottom", **kw)

    handles = [Line2D([], [], color=COLORS[(c - 1) % len(COLORS)], lw=3, label=class_names[c]) for c in classes]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white",
               fontsize=10)
    lines = [title] if title else []
    head = f"{name}: " if name else ""
    if dice:
        values = [float(v) for v in dice.values()]
        parts = ", ".join(f"{k} {float(v):.3f}" for k, v in dice.items())
        lines.append(f"{head}Dice {parts} (mean {np.mean(values):.3f})")
    elif head:
        lines.append(head.rstrip(": "))
    if lines:
        fig.suptitle("\n".join(lines), color="white", fontsize=12)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, facecolor=fig.get_facecolor())
    plt.close(fig)
    return path


def plot_evaluation(workdir: str, evaluation: Mapping[str, Any], cases, *, index: int = 0, title: str = "",
                    filename: str = FIGURE) -> str:
    """Plots validation case ``index`` of an evaluation to ``WORKDIR/validation.png``.

    ``evaluation`` must hold that case's prediction (``evaluate(...,
    keep_predictions=index + 1)``); ``cases`` is the source it was run on.
    """
    predictions = evaluation.get("predictions") or []
    if index >= len(predictions):
        raise ValueError(f"plot_evaluation: no prediction kept for case {index}; pass keep_predictions={index + 1}")
    case = cases[index]
    info = evaluation["cases"][index]
    return plot_case(
        os.path.join(workdir, filename),
        case["image"],
        case["label"],
        predictions[index],
        class_names=evaluation["class_names"],
        dice=info["dice"],
        name=info["name"],
        spacing=case.get("spacing", (1.0, 1.0, 1.0)),
        title=title,
    )


def plot_confusion(path: str, confusion, class_names: Sequence[str], title: str = "") -> str:
    """Writes a PNG of a classification confusion matrix; returns ``path``.

    Rows are true classes, columns predicted ones (as
    :func:`train.metrics.classification_confusion` counts them). Each cell shows
    its count and its share of the row (the class's recall on the diagonal);
    the colour is that share, so rare classes are as readable as common ones.
    """
    confusion = np.asarray(confusion)
    k = len(class_names)
    if confusion.shape != (k, k):
        raise ValueError(f"plot_confusion: confusion has shape {confusion.shape}, expected ({k}, {k}) "
                         f"for {k} class names")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = confusion.sum(1, keepdims=True)
    share = confusion / np.maximum(rows, 1)
    size = float(np.clip(1.0 + 0.7 * k, 3.5, 12.0))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(k), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:  # beyond that the numbers are unreadable anyway
        for i in range(k):
            for j in range(k):
                dark = share[i, j] > 0.6
                ax.text(j, i, f"{int(confusion[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                        fontsize=8, color="white" if dark else "black")
    total = int(confusion.sum())
    correct = int(np.trace(confusion))
    lines = [title] if title else []
    lines.append(f"accuracy {correct / max(total, 1):.3f} ({correct}/{total})")
    ax.set_title("\n".join(lines), fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
