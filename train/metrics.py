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


# --------------------------------------------------------------------------
# Classification: one integer class per case.


def _class_vector(values, num_classes: int, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{name} must be one class per case (1-D), got shape {values.shape}")
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"{name} values must lie in [0, {num_classes})")
    return values


def accuracy(pred, label) -> float:
    """Share of cases whose predicted class equals the true class (nan when empty)."""
    pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
    if pred.shape != label.shape:
        raise ValueError(f"pred has {pred.size} cases, label {label.size}")
    return float(np.mean(pred == label)) if label.size else float("nan")


def classification_confusion(pred, label, num_classes: int) -> np.ndarray:
    """Counts (num_classes, num_classes) of cases: rows true class, columns predicted."""
    return confusion_matrix(
        _class_vector(pred, num_classes, "pred"), _class_vector(label, num_classes, "label"), num_classes
    )


def balanced_accuracy(pred, label, num_classes: int) -> float:
    """Mean per-class recall over the classes present in `label` (nan when empty).

    Classes absent from `label` have no recall and are left out (as
    scikit-learn's `balanced_accuracy_score` does), so a class the validation
    set lacks neither helps nor hurts.
    """
    confusion = classification_confusion(pred, label, num_classes)
    support = confusion.sum(1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diagonal(confusion)[present] / support[present]))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `x`, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Start of each run of equal values, and the mean rank of the run.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def binary_auc(score, positive) -> float:
    """ROC AUC of `score` for the boolean `positive` by the rank (Mann-Whitney) statistic.

    Ties count one half. Returns nan when either class is empty.
    """
    score = np.asarray(score, np.float64).ravel()
    positive = np.asarray(positive, bool).ravel()
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(score)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_class_auc(probabilities, label, num_classes: int) -> np.ndarray:
    """One-vs-rest ROC AUC per class (num_classes,); nan for a class absent from
    `label` or the only class in it."""
    probabilities = np.asarray(probabilities, np.float64)
    label = _class_vector(label, num_classes, "label")
    if probabilities.shape != (label.size, num_classes):
        raise ValueError(f"probabilities must have shape ({label.size}, {num_classes}), got {probabilities.shape}")
    return np.array([binary_auc(probabilities[:, k], label == k) for k in range(num_classes)])


def macro_auc(probabilities, label, num_classes: int) -> float:
    """Macro one-vs-rest ROC AUC over the classes where it is defined; nan if none.

    Args:
      probabilities: (N, num_classes) scores per class (probabilities or
        logits: only their order within a column matters).
      label: (N,) true classes.
    """
    auc = per_class_auc(probabilities, label, num_classes)
    defined = ~np.isnan(auc)
    return float(auc[defined].mean()) if defined.any() else float("nan")


@dataclasses.dataclass(frozen=True)
class ClassificationBaselines:
    """Validation accuracy of two classifiers that see no spatial structure.

    Attributes:
      majority: predicting the most frequent training class for every case.
      histogram: the better (on validation, so optimistic) of a nearest-centroid
        and a 5-nearest-neighbour classifier on each image's global intensity
        histogram.
      histogram_method: 'centroid' or 'knn5', the one reported.
      chance: 1 / number of classes seen in training.
    """

    majority: float
    histogram: float
    histogram_method: str
    chance: float


def intensity_histograms(images, edges) -> np.ndarray:
    """(N, len(edges) + 1) share of each image's voxels in each intensity bin."""
    out = []
    for image in images:
        bins = np.searchsorted(edges, np.asarray(image, np.float32).ravel(), side="right")
        out.append(np.bincount(bins, minlength=len(edges) + 1) / max(bins.size, 1))
    return np.stack(out)


def baseline_accuracy(train_images, train_labels, val_images, val_labels, *, num_bins: int = 32) -> ClassificationBaselines:
    """Majority-class and global-histogram baselines for a classification task.

    The histogram bins are `num_bins` quantile bins of the pooled training
    intensities; features are standardised on the training set. A network
    whose validation accuracy does not clearly beat `histogram` has learned
    nothing that the intensity distribution alone does not give.
    """
    train_labels = np.asarray(train_labels, np.int64).ravel()
    val_labels = np.asarray(val_labels, np.int64).ravel()
    if len(train_images) != train_labels.size or len(val_images) != val_labels.size or not train_labels.size:
        raise ValueError(
            f"need one label per image and training cases: {len(train_images)} training images, "
            f"{train_labels.size} labels; {len(val_images)} validation images, {val_labels.size} labels"
        )
    classes, counts = np.unique(train_labels, return_counts=True)
    majority = accuracy(np.full(val_labels.size, classes[np.argmax(counts)]), val_labels)

    pooled = np.concatenate([np.asarray(x, np.float32).ravel() for x in train_images])
    pooled = pooled[:: max(1, pooled.size // 2_000_000)]
    edges = np.unique(np.quantile(pooled, np.linspace(0, 1, num_bins + 1)[1:-1]))
    train_x = intensity_histograms(train_images, edges)
    val_x = intensity_histograms(val_images, edges)
    mean, std = train_x.mean(0), train_x.std(0)
    std = np.where(std > 0, std, 1.0)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std

    centroids = np.stack([train_x[train_labels == c].mean(0) for c in classes])
    dist = ((val_x[:, None, :] - centroids[None]) ** 2).sum(-1)
    scores = {"centroid": accuracy(classes[np.argmin(dist, 1)], val_labels)}
    dist = ((val_x[:, None, :] - train_x[None]) ** 2).sum(-1)
    k = min(5, train_labels.size)
    nearest = train_labels[np.argsort(dist, axis=1, kind="stable")[:, :k]]
    votes = np.stack([(nearest == c).sum(1) for c in classes], 1)
    scores["knn5"] = accuracy(classes[np.argmax(votes, 1)], val_labels)
    method = max(scores, key=scores.get)
    return ClassificationBaselines(float(majority), float(scores[method]), method, 1.0 / classes.size)
