"""Segmentation metrics: per-class Dice and the global-threshold baseline.

Dice of class c is 2|P_c & T_c| / (|P_c| + |T_c|) for predicted and true
voxel sets P_c and T_c. A class absent from both prediction and truth scores
1 (nothing to find, nothing wrongly found); absent from one only, it scores 0.

`threshold_baseline_dice` answers: how well does the best single global
intensity-band rule segment these cases? It is fitted on the very cases it is
scored on, an optimistic baseline; a model that does not beat it has learned
nothing a threshold could not.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(pred, label, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes): rows true class, columns predicted."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    label = np.asarray(label).ravel().astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"pred has {pred.size} voxels, label {label.size}")
    for name, x in (("pred", pred), ("label", label)):
        if x.size and (x.min() < 0 or x.max() >= num_classes):
            raise ValueError(f"{name} values must lie in [0, {num_classes})")
    counts = np.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def confusion_matrix_jax(pred, label, num_classes: int) -> jax.Array:
    """jit-able `confusion_matrix` (num_classes static); int32 counts.

    Voxels whose prediction or label lies outside [0, num_classes) are ignored
    (a jit-ed function cannot raise on values).
    """
    pred = jnp.ravel(pred).astype(jnp.int32)
    label = jnp.ravel(label).astype(jnp.int32)
    k = num_classes
    valid = (pred >= 0) & (pred < k) & (label >= 0) & (label < k)
    # bincount drops indices >= length, which is how invalid voxels vanish.
    index = jnp.where(valid, label * k + pred, k * k)
    return jnp.bincount(index, length=k * k).reshape(k, k)


def dice_from_confusion(confusion):
    """Per-class Dice from a confusion matrix (numpy or jax, batched on the left).

    Confusion matrices of several cases or patches can be summed first to get a
    pooled Dice.
    """
    xp = jnp if isinstance(confusion, jax.Array) else np
    inter = xp.diagonal(confusion, axis1=-2, axis2=-1)
    total = confusion.sum(-1) + confusion.sum(-2)
    safe = xp.where(total > 0, total, 1)
    return xp.where(total > 0, 2.0 * inter / safe, 1.0)


def dice_per_class(pred, label, num_classes: int) -> np.ndarray:
    """Per-class Dice (num_classes,) float64, numpy. Empty in both -> 1."""
    return dice_from_confusion(confusion_matrix(pred, label, num_classes))


def dice_per_class_jax(pred, label, num_classes: int) -> jax.Array:
    """Per-class Dice (num_classes,) float32, jit-able with num_classes static."""
    return dice_from_confusion(confusion_matrix_jax(pred, label, num_classes))


def mean_foreground_dice(dice):
    """Mean of per-class Dice over classes 1.. (class 0 is background)."""
    if dice.shape[-1] < 2:
        raise ValueError("mean_foreground_dice needs at least 2 classes")
    return dice[..., 1:].mean(-1)


@dataclasses.dataclass(frozen=True)
class ThresholdBaseline:
    """The best global intensity-band segmentation found.

    Attributes:
      dice: mean foreground Dice of the best setting (see `reduction`).
      per_class: its per-class Dice, background first.
      thresholds: increasing intensities t_1 < ... < t_{K-1}; band b is
        [t_b, t_{b+1}) with t_0 = -inf and t_K = +inf.
      band_classes: the class assigned to each band, darkest band first.
      reduction: 'case_mean' or 'pooled'.
    """

    dice: float
    per_class: tuple[float, ...]
    thresholds: tuple[float, ...]
    band_classes: tuple[int, ...]
    reduction: str


def _cumulative_counts(image, label, thresholds, num_classes):
    """cum[j, c]: voxels of class c below threshold j-1 (j = 0: none)."""
    q = len(thresholds)
    bins = np.searchsorted(thresholds, image, side="right")  # #thresholds <= x
    hist = np.bincount(bins * num_classes + label, minlength=(q + 1) * num_classes)
    hist = hist.reshape(q + 1, num_classes)
    return np.concatenate([np.zeros((1, num_classes), np.int64), np.cumsum(hist, axis=0)])


def threshold_baseline_dice(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    num_classes: int,
    *,
    num_thresholds: int | None = None,
    reduction: str = "case_mean",
) -> ThresholdBaseline:
    """Best single global intensity-band segmentation of the given cases.

    K = num_classes intensity bands split by K-1 thresholds are searched over a
    grid of quantiles of the pooled intensities, and every assignment of the
    classes to the bands is tried (for K = 3 this includes background darkest
    with grey matter below white matter and the reverse, and also settings
    where background is not the darkest band). One setting is shared by all
    cases and chosen to maximise the mean foreground Dice, computed from
    cumulative histograms, never by a loop over voxels.

    Args:
      images: per-case intensity arrays (a trailing channel axis of size 1 is
        allowed).
      labels: per-case integer labels in [0, num_classes), same voxel count.
      num_classes: K, 2 to 4 (the search grows as K! * grid^(K-1)).
      num_thresholds: size of the quantile grid; default 128 (K <= 3) or 40.
      reduction: 'case_mean' scores a setting by the mean over cases of each
        case's mean foreground Dice (as a per-case validation Dice is averaged);
        'pooled' counts all voxels of all cases together.

    Returns:
      A `ThresholdBaseline`.
    """
    if not 2 <= num_classes <= 4:
        raise ValueError(f"num_classes={num_classes}: the threshold baseline supports 2 to 4 classes")
    if reduction not in ("case_mean", "pooled"):
        raise ValueError(f"reduction={reduction!r}: expected 'case_mean' or 'pooled'")
    if len(images) != len(labels) or not images:
        raise ValueError(f"need equally many images and labels, got {len(images)} and {len(labels)}")
    if num_thresholds is None:
        num_thresholds = 128 if num_classes <= 3 else 40
    if num_thresholds < num_classes - 1:
        raise ValueError(f"num_thresholds={num_thresholds} is below num_classes - 1")
    flat = []
    for i, (image, label) in enumerate(zip(images, labels)):
        image = np.asarray(image, np.float32)
        label = np.asarray(label)
        if image.ndim == label.ndim + 1 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.shape != label.shape:
            raise ValueError(f"case {i}: image shape {image.shape} does not match label shape {label.shape}")
        if label.size and (label.min() < 0 or label.max() >= num_classes):
            raise ValueError(f"case {i}: labels must lie in [0, {num_classes})")
        flat.append((image.ravel(), label.ravel().astype(np.int64)))

    # Threshold grid: interior quantiles of the pooled intensities (a strided
    # subsample of at most ~2M voxels is plenty to place them).
    pooled = np.concatenate([x for x, _ in flat])
    pooled = pooled[:: max(1, pooled.size // 2_000_000)]
    levels = np.linspace(0, 1, num_thresholds + 2)[1:-1]
    thresholds = np.unique(np.quantile(pooled, levels)).astype(np.float32)
    q = len(thresholds)
    k = num_classes
    if q < k - 1:
        raise ValueError(f"the images have too few distinct intensities for {k - 1} thresholds")

    cum = np.stack([_cumulative_counts(x, y, thresholds, k) for x, y in flat])
    # Band edges as indices into cum: 0 = -inf, q + 1 = +inf, threshold i -> i+1.
    inner = np.array(list(itertools.combinations(range(1, q + 1), k - 1)), np.int64).reshape(-1, k - 1)
    edges = np.concatenate(
        [np.zeros((len(inner), 1), np.int64), inner, np.full((len(inner), 1), q + 1, np.int64)], axis=1
    )
    # counts[n, m, b, c]: voxels of class c in band b under setting m, case n.
    counts = cum[:, edges[:, 1:]] - cum[:, edges[:, :-1]]
    band_total = counts.sum(-1)  # (N, M, B)
    class_total = cum[:, -1]  # (N, C)

    best = (-1.0, None, None, None)
    for order in itertools.permutations(range(k)):  # order[b] = class of band b
        band_of = np.argsort(order)  # band of each class
        inter = counts[:, :, band_of, np.arange(k)]  # (N, M, C)
        pred = band_total[:, :, band_of]  # (N, M, C)
        truth = class_total[:, None, :]  # (N, 1, C)
        if reduction == "pooled":
            inter, pred, truth = inter.sum(0), pred.sum(0), truth.sum(0)
        total = pred + truth
        dice = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)
        if reduction == "case_mean":
            dice = dice.mean(0)  # (M, C)
        score = dice[:, 1:].mean(-1)
        m = int(np.argmax(score))
        if score[m] > best[0]:
            best = (float(score[m]), dice[m], m, order)
    score, per_class, m, order = best
    chosen = tuple(float(thresholds[i - 1]) for i in inner[m])
    return ThresholdBaseline(score, tuple(float(d) for d in per_class), chosen, tuple(int(c) for c in order), reduction)
