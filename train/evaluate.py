"""Whole-volume validation: sliding-window inference, per-class Dice, threshold baseline.

The model is applied to whole validation volumes with
:func:`acsjax.inference.sliding_window_inference` in eval mode (BatchNorm
running averages, no dropout, main head only). The NNX model is split into a
static graph definition and a state pytree, so the jitted function is pure and
is compiled once per (model structure, window settings, volume shape): the
repeated validations of a training run reuse the compiled program.

A 3D model (``len(patch) == 3``) sees a case as one ``(1, D, H, W, C)``
volume. A 2D model (``len(patch) == 2``) segments it slice by slice: the
depth axis becomes the batch, each axial slice ``(H, W)`` is tiled on its own.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from acsjax.inference import sliding_window_inference
from train import metrics


def eval_view(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of an eval-mode copy of ``model``; ``model`` itself is untouched.

    The copy shares the parameter arrays, so this costs no memory.
    """
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    return nnx.split(copy)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("patch", "overlap", "batch_size", "mirror_axes", "mode"))
def _infer(graphdef, state, volume, *, patch, overlap, batch_size, mirror_axes, mode):
    def predict_fn(x):
        return nnx.merge(graphdef, state)(x)

    return sliding_window_inference(
        predict_fn, volume, patch=patch, overlap=overlap, batch_size=batch_size, mirror_axes=mirror_axes, mode=mode
    )


def _mirror_axes(mirror, rank: int) -> tuple[int, ...]:
    if mirror is True:
        return tuple(range(1, rank + 1))
    if mirror is False or mirror is None:
        return ()
    return tuple(int(a) for a in mirror)


def sliding_window(patch: Sequence[int], dims) -> tuple[int, ...]:
    """The window a run's model is applied with: its 3D patch, or the patch's plane for a 2D model (dims 2)."""
    patch = tuple(int(p) for p in patch)
    return patch[1:] if dims == 2 else patch


def mirror_axes_of(letters: str, dims) -> tuple[int, ...]:
    """The ``mirror`` axes of :func:`predict_probabilities` for data-layout axis letters ('dhw', 'w', ...).

    A 3D window counts d, h, w as 1, 2, 3; a 2D model (``dims`` 2) sees h, w as
    1, 2 and has no depth to flip (slice by slice, a depth flip changes nothing).
    """
    index = {"h": 1, "w": 2} if dims == 2 else {"d": 1, "h": 2, "w": 3}
    return tuple(index[a] for a in "dhw" if a in letters and a in index)


def predict_probabilities(
    model: nnx.Module | tuple[nnx.GraphDef, nnx.State],
    image: np.ndarray,
    *,
    patch: Sequence[int],
    overlap: float = 0.5,
    mirror: bool | Sequence[int] = False,
    batch_size: int = 2,
    mode: str = "gaussian",
) -> np.ndarray:
    """Class probabilities ``(D, H, W, K)`` float32 for one ``(D, H, W, C)`` image.

    Args:
      model: an NNX model (an eval-mode copy is used), or ``eval_view(model)``
        to skip the copy when predicting many cases.
      patch: window size: 3 entries for a 3D model, 2 for a 2D model applied
        slice by slice (see the module docstring).
      mirror: True for mirror test-time augmentation over every spatial axis
        (8 passes in 3D, 4 in 2D), or the spatial axes to mirror (1..rank of
        the window: for a 2D model 1 is height, 2 width).
    """
    graphdef, state = model if isinstance(model, tuple) else eval_view(model)
    image = np.asarray(image, np.float32)
    if image.ndim != 4:
        raise ValueError(f"image must be (D, H, W, C), got shape {image.shape}")
    patch = tuple(int(p) for p in patch)
    if len(patch) not in (2, 3):
        raise ValueError(f"patch must have 3 entries (3D model) or 2 (2D model), got {patch}")
    volume = image[None] if len(patch) == 3 else image
    probs = _infer(
        graphdef,
        state,
        jnp.asarray(volume),
        patch=patch,
        overlap=float(overlap),
        batch_size=int(batch_size),
        mirror_axes=_mirror_axes(mirror, len(patch)),
        mode=mode,
    )
    probs = np.asarray(probs)
    return probs[0] if len(patch) == 3 else probs


def back_to_input_grid(probs: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Labels ``(D, H, W)`` int32 on the input grid: probabilities resampled linearly, then argmax.

    Resampling probabilities rather than labels gives smooth borders when the
    training spacing was coarser than the input's.
    """
    if tuple(probs.shape[:3]) != tuple(shape):
        from train.data.nifti import resize

        probs = resize(probs, shape, order=1)
    return probs.argmax(-1).astype(np.int32)


def predict_labels(model, image: np.ndarray, **kwargs) -> np.ndarray:
    """Label map ``(D, H, W)`` int32: argmax of :func:`predict_probabilities`."""
    return predict_probabilities(model, image, **kwargs).argmax(-1).astype(np.int32)


def class_names_of(source_or_cases, num_classes: int, class_names: Sequence[str] | None = None) -> list[str]:
    """All class names, background first: given, else the source's, else class0, class1, ..."""
    names = class_names if class_names is not None else getattr(source_or_cases, "class_names", None)
    names = list(names) if names is not None else [f"class{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for num_classes={num_classes}: {names}")
    return [str(n) for n in names]


def threshold_baseline(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int) -> dict | None:
    """The best global intensity-band segmentation of the cases, as a JSON-ready dict.

    Uses the first channel of multi-channel images. None when the search does
    not support ``num_classes`` (it handles 2 to 4).
    """
    if not 2 <= num_classes <= 4:
        return None
    first = [np.asarray(x)[..., 0] if np.ndim(x) == 4 else np.asarray(x) for x in images]
    best = metrics.threshold_baseline_dice(first, labels, num_classes)
    return {
        "dice": float(best.dice),
        "per_class": [float(d) for d in best.per_class],
        "thresholds": [float(t) for t in best.thresholds],
        "band_classes": [int(c) for c in best.band_classes],
        "reduction": best.reduction,
    }


def evaluate(
    model: nnx.Module,
    cases,
    *,
    patch: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    mirror: bool | Sequence[int] = False,
    batch_size: int = 2,
    class_names: Sequence[str] | None = None,
    baseline: bool = True,
    keep_predictions: int | None = 0,
    max_cases: int = 0,
) -> dict[str, Any]:
    """Per-case and mean per-class Dice of ``model`` on whole validation volumes.

    Args:
      model: an NNX segmentation model; evaluated in eval mode on a copy, so
        its own train/eval mode is unchanged.
      cases: a source (``len`` and ``[i]`` giving case dicts with ``image``
        (D, H, W, C), ``label`` (D, H, W) and ``name``) or a list of such dicts.
      patch, overlap, mirror, batch_size: as :func:`predict_probabilities`.
      num_classes: classes including background.
      class_names: all class names, background first; default the source's
        ``class_names``.
      baseline: also compute the threshold baseline on the same cases (it
        holds every validation image in memory once; a training loop can skip
        it for intermediate validations).
      keep_predictions: keep the label maps of the first N cases (None: all)
        in ``result['predictions']``, for plots.
      max_cases: evaluate only the first N cases (0: all).

    Returns:
      A JSON-ready dict (apart from ``predictions``):

      - ``class_names``: all names, background first;
      - ``val_dice``: {foreground class name: Dice averaged over cases};
      - ``val_dice_mean``: mean over cases of each case's mean foreground Dice;
      - ``cases``: per case ``{'name', 'dice': {name: Dice}, 'dice_mean'}``;
      - ``baseline_threshold_dice``: the threshold baseline's mean foreground
        Dice (same averaging as ``val_dice_mean``) and ``baseline_threshold``
        its details (both None when skipped or unsupported);
      - ``num_cases``, ``eval_s`` (wall time);
      - ``predictions``: a list of int32 (D, H, W) label maps, the first
        ``keep_predictions`` cases.
    """
    start = time.perf_counter()
    names = class_names_of(cases, num_classes, class_names)
    count = len(cases) if not max_cases else min(len(cases), int(max_cases))
    if count == 0:
        raise ValueError("evaluate: no validation cases")
    view = eval_view(model)
    per_case, predictions, images, labels = [], [], [], []
    dice_sum = np.zeros(num_classes)
    for i in range(count):
        case = cases[i]
        label = np.asarray(case["label"])
        pred = predict_labels(
            view, case["image"], patch=patch, overlap=overlap, mirror=mirror, batch_size=batch_size
        )
        if pred.shape != label.shape:
            raise ValueError(f"case {case.get('name', i)}: prediction {pred.shape} vs label {label.shape}")
        dice = metrics.dice_per_class(pred, label, num_classes)
        dice_sum += dice
        per_case.append(
            {
                "name": str(case.get("name", f"case{i}")),
                "dice": {names[c]: float(dice[c]) for c in range(1, num_classes)},
                "dice_mean": float(metrics.mean_foreground_dice(dice)),
            }
        )
        if keep_predictions is None or i < keep_predictions:
            predictions.append(pred)
        if baseline:
            images.append(np.asarray(case["image"]))
            labels.append(label)
    mean = dice_sum / count
    base = threshold_baseline(images, labels, num_classes) if baseline else None
    return {
        "class_names": names,
        "val_dice": {names[c]: float(mean[c]) for c in range(1, num_classes)},
        "val_dice_mean": float(np.mean([c["dice_mean"] for c in per_case])),
        "cases": per_case,
        "baseline_threshold_dice": None if base is None else base["dice"],
        "baseline_threshold": base,
        "num_cases": count,
        "eval_s": time.perf_counter() - start,
        "predictions": predictions,
    }


def dice_table(result: Mapping[str, Any]) -> str:
    """A short text table of an :func:`evaluate` result, for logs."""
    classes = list(result["val_dice"])
    width = max([len("case"), *(len(c["name"]) for c in result["cases"])])
    lines = ["  ".join([f"{'case':<{width}}", *(f"{n:>10}" for n in classes), f"{'mean':>8}"])]
    for c in result["cases"]:
        cells = [f"{c['dice'][n]:>10.4f}" for n in classes]
        lines.append("  ".join([f"{c['name']:<{width}}", *cells, f"{c['dice_mean']:>8.4f}"]))
    lines.append(
        "  ".join([f"{'mean':<{width}}", *(f"{result['val_dice'][n]:>10.4f}" for n in classes),
                   f"{result['val_dice_mean']:>8.4f}"])
    )
    if result.get("baseline_threshold_dice") is not None:
        lines.append(f"threshold baseline (best global intensity bands): {result['baseline_threshold_dice']:.4f}")
    return "\n".join(lines)
