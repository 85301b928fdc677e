"""Tests for train.metrics: Dice with known answers and the threshold baseline."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import metrics


def test_dice_known_answer():
    pred = np.array([0, 1, 1, 2])
    label = np.array([0, 1, 2, 2])
    # class 0: 2*1/(1+1); class 1: 2*1/(2+1); class 2: 2*1/(1+2)
    np.testing.assert_allclose(metrics.dice_per_class(pred, label, 3), [1.0, 2 / 3, 2 / 3])
    np.testing.assert_array_equal(metrics.confusion_matrix(pred, label, 3), [[1, 0, 0], [0, 1, 0], [0, 1, 1]])


def test_dice_empty_classes():
    label = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 2])
    dice = metrics.dice_per_class(pred, label, 5)
    # class 2: predicted only -> 0; classes 3, 4: absent from both -> 1.
    np.testing.assert_allclose(dice, [1.0, 2 / 3, 0.0, 1.0, 1.0])
    # class 1 in truth only -> 0
    np.testing.assert_allclose(metrics.dice_per_class(np.zeros(4, int), label, 2), [2 * 2 / 6, 0.0])
    # nothing at all but background: every class scores 1
    np.testing.assert_allclose(metrics.dice_per_class(np.zeros((2, 3)), np.zeros((2, 3)), 3), 1.0)


def test_mean_foreground_dice():
    assert metrics.mean_foreground_dice(np.array([0.1, 0.5, 0.9])) == pytest.approx(0.7)
    batched = metrics.mean_foreground_dice(np.array([[1.0, 0.2, 0.4], [0, 1, 1]]))
    np.testing.assert_allclose(batched, [0.3, 1.0])
    with pytest.raises(ValueError, match="2 classes"):
        metrics.mean_foreground_dice(np.array([0.5]))


def test_jax_dice_matches_numpy_under_jit():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (3, 5, 6, 7))
    pred = np.where(rng.uniform(size=label.shape) < 0.7, label, rng.integers(0, 4, label.shape))
    pred[0, 0, 0, :] = 3  # make sure no class is trivially perfect
    fn = jax.jit(metrics.dice_per_class_jax, static_argnums=2)
    got = fn(jnp.asarray(pred), jnp.asarray(label), 4)
    np.testing.assert_allclose(got, metrics.dice_per_class(pred, label, 4), rtol=1e-6)
    # empty classes score 1 in the jax version too
    np.testing.assert_allclose(fn(jnp.zeros(5, jnp.int32), jnp.zeros(5, jnp.int32), 3), [1, 1, 1])


def test_confusion_out_of_range():
    with pytest.raises(ValueError, match="label"):
        metrics.confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="voxels"):
        metrics.confusion_matrix(np.array([0, 1]), np.array([0]), 3)
    # the jit-able version ignores such voxels instead
    cm = metrics.confusion_matrix_jax(jnp.array([0, 1, 5, -1]), jnp.array([0, 1, 1, 1]), 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 0], [0, 0, 0]])


def test_pooled_dice_from_summed_confusions():
    a = metrics.confusion_matrix([1, 1, 0], [1, 0, 0], 2)
    b = metrics.confusion_matrix([0, 0, 0], [1, 1, 0], 2)
    np.testing.assert_allclose(
        metrics.dice_from_confusion(a + b), metrics.dice_per_class([1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 1, 0], 2)
    )


def _bands(order, n=600, seed=0):
    """Labels and intensities whose bands of intensity follow `order`.

    Classes are equally frequent, so the quantiles at 1/K, 2/K, ... fall in the
    gaps between the bands.
    """
    rng = np.random.default_rng(seed)
    label = rng.permutation(np.repeat(np.arange(len(order)), n // len(order)))
    band = np.argsort(order)[label]
    return band + rng.uniform(0, 0.5, label.size), label


def test_threshold_baseline_separable():
    image, label = _bands((0, 1, 2))
    b = metrics.threshold_baseline_dice([image], [label], 3, num_thresholds=2)
    assert b.dice == 1.0
    assert b.band_classes == (0, 1, 2)
    assert 0.5 <= b.thresholds[0] < 1.0 and 1.5 <= b.thresholds[1] < 2.0
    # the default, finer grid gets within a voxel or two
    assert metrics.threshold_baseline_dice([image], [label], 3).dice > 0.99
    # white matter darker than grey matter is found as well
    image, label = _bands((0, 2, 1))
    b = metrics.threshold_baseline_dice([image[:, None]], [label], 3, num_thresholds=2)
    assert b.dice == 1.0 and b.band_classes == (0, 2, 1)
    for k, order in ((2, (1, 0)), (4, (0, 3, 1, 2))):
        image, label = _bands(order)
        b = metrics.threshold_baseline_dice([image], [label], k, num_thresholds=k - 1)
        assert b.dice == 1.0 and b.band_classes == order


def test_threshold_baseline_one_setting_for_all_cases():
    # Two cases with opposite tissue orderings: each alone is perfectly
    # separable, but one global setting cannot serve both.
    a = _bands((0, 1, 2), seed=1)
    b = _bands((0, 2, 1), seed=2)
    both = metrics.threshold_baseline_dice([a[0], b[0]], [a[1], b[1]], 3)
    assert both.dice < 0.8
    alone = metrics.threshold_baseline_dice([a[0]], [a[1]], 3, num_thresholds=2)
    assert alone.dice == 1.0


def _segment(image, thresholds, band_classes):
    return np.asarray(band_classes)[np.searchsorted(thresholds, image, side="right")]


@pytest.mark.parametrize("reduction", ["case_mean", "pooled"])
def test_threshold_baseline_matches_brute_force(reduction):
    rng = np.random.default_rng(3)
    cases = []
    for n in (300, 500):
        label = rng.integers(0, 3, n)
        cases.append((label * rng.uniform(0.5, 1.5) + rng.normal(0, 0.6, n), label))
    images, labels = zip(*cases)
    q = 10
    got = metrics.threshold_baseline_dice(images, labels, 3, num_thresholds=q, reduction=reduction)
    # the reported setting reproduces the reported Dice when applied directly
    preds = [_segment(x, got.thresholds, got.band_classes) for x in images]
    dices = [metrics.dice_per_class(p, y, 3) for p, y in zip(preds, labels)]
    if reduction == "pooled":
        direct = metrics.dice_per_class(np.concatenate(preds), np.concatenate(labels), 3)
    else:
        direct = np.mean(dices, axis=0)
    np.testing.assert_allclose(got.per_class, direct)
    assert got.dice == pytest.approx(direct[1:].mean())
    # and no setting on the same grid does better
    pooled = np.concatenate(images)
    grid = np.unique(np.quantile(pooled, np.linspace(0, 1, q + 2)[1:-1]))
    best = 0.0
    for t in itertools.combinations(grid.astype(np.float32), 2):
        for order in itertools.permutations(range(3)):
            preds = [_segment(x.astype(np.float32), t, order) for x in images]
            if reduction == "pooled":
                d = metrics.dice_per_class(np.concatenate(preds), np.concatenate(labels), 3)
            else:
                d = np.mean([metrics.dice_per_class(p, y, 3) for p, y in zip(preds, labels)], axis=0)
            best = max(best, d[1:].mean())
    assert got.dice == pytest.approx(best)


def test_threshold_baseline_bad_input():
    image, label = _bands((0, 1, 2))
    with pytest.raises(ValueError, match="num_classes"):
        metrics.threshold_baseline_dice([image], [label], 5)
    with pytest.raises(ValueError, match="shape"):
        metrics.threshold_baseline_dice([image[:-1]], [label], 3)
    with pytest.raises(ValueError, match="reduction"):
        metrics.threshold_baseline_dice([image], [label], 3, reduction="max")
    with pytest.raises(ValueError, match="equally many"):
        metrics.threshold_baseline_dice([image], [], 3)
