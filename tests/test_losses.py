"""Dice + cross-entropy, deep supervision and the batch Dice metric."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import losses
from train.metrics import dice_per_class


def _labels(shape=(2, 8, 8, 8), k=3, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, k, shape), jnp.int32)


def test_perfect_logits_give_zero_loss():
    labels = _labels()
    logits = 50.0 * jax.nn.one_hot(labels, 3)
    loss, parts = losses.dice_ce_loss(logits, labels, 3)
    chex.assert_trees_all_close(loss, 0.0, atol=1e-4)
    chex.assert_trees_all_close(parts["ce"], 0.0, atol=1e-4)


def test_soft_dice_matches_hand_computation():
    # One voxel of class 1, predicted with probability p on two voxels.
    labels = jnp.array([[1, 0]])
    probs = jnp.array([[[0.2, 0.8], [0.4, 0.6]]])
    loss = losses.soft_dice_loss(jnp.log(probs), labels, 2, smooth=0.0)
    expected = 1 - 2 * 0.8 / (0.8 + 0.6 + 1)
    chex.assert_trees_all_close(loss, expected, rtol=1e-6)


def test_cross_entropy_is_mean_negative_log_likelihood():
    logits = jnp.log(jnp.array([[[0.25, 0.75], [0.5, 0.5]]]))
    got = losses.cross_entropy(logits, jnp.array([[1, 0]]))
    chex.assert_trees_all_close(got, -(np.log(0.75) + np.log(0.5)) / 2, rtol=1e-6)


def test_weighted_cross_entropy_weights_each_voxel_by_its_class():
    logits = jnp.log(jnp.array([[[0.25, 0.75], [0.5, 0.5]]]))
    labels = jnp.array([[1, 0]])
    got = losses.cross_entropy(logits, labels, class_weights=(2.0, 0.5))
    # The mean is over voxels, not over the weights.
    chex.assert_trees_all_close(got, -(0.5 * np.log(0.75) + 2.0 * np.log(0.5)) / 2, rtol=1e-6)
    chex.assert_trees_all_close(losses.cross_entropy(logits, labels, (1.0, 1.0)), losses.cross_entropy(logits, labels))


def test_balanced_weights_make_the_expected_weight_one_and_the_prior_uniform():
    counts = np.array([600, 300, 100, 0])
    weights = np.array(losses.balanced_class_weights(counts))
    present = counts > 0
    freq = counts / counts.sum()
    # Each present class carries the same total weight, 1/K of the whole.
    np.testing.assert_allclose(freq[present] * weights[present], 1 / 3)
    np.testing.assert_allclose(np.sum(freq * weights), 1.0)
    assert weights[3] == 1.0  # absent class: neutral
    with pytest.raises(ValueError, match="not all zero"):
        losses.balanced_class_weights([0, 0])


def test_balanced_weights_move_the_optimum_to_the_uniform_prior_posterior():
    # One ambiguous input seen as class 0 three times and class 1 once: the
    # unweighted optimum predicts p1 = 1/4; balanced weights (the training
    # proportions 3:1) move it to 1/2, the posterior under a uniform prior.
    labels = jnp.array([[0, 0, 0, 1]])
    weights = losses.balanced_class_weights([3, 1])

    def optimum(class_weights):
        grid = jnp.linspace(0.01, 0.99, 99)
        loss = jax.vmap(lambda p: losses.cross_entropy(jnp.log(jnp.array([1 - p, p]))[None, None].repeat(4, 1), labels, class_weights))(grid)
        return float(grid[jnp.argmin(loss)])

    assert optimum(None) == pytest.approx(0.25, abs=0.006)
    assert optimum(weights) == pytest.approx(0.5, abs=0.006)


def test_segmentation_loss_passes_class_weights_to_every_head():
    labels = _labels((1, 8, 8, 8))
    logits = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 3))
    aux = jax.random.normal(jax.random.key(1), (1, 4, 4, 4, 3))
    weights = (0.5, 1.0, 3.0)
    got, _ = losses.segmentation_loss((logits, aux), labels, 3, weights)
    w = losses.deep_supervision_weights(2)
    main, _ = losses.dice_ce_loss(logits, labels, 3, weights)
    coarse, _ = losses.dice_ce_loss(aux, losses.downsample_labels(labels, (4, 4, 4)), 3, weights)
    chex.assert_trees_all_close(got, w[0] * main + w[1] * coarse, rtol=1e-6)
    unweighted, _ = losses.segmentation_loss((logits, aux), labels, 3)
    assert abs(float(got) - float(unweighted)) > 1e-3


def test_downsample_labels_takes_every_fth_voxel():
    labels = _labels((1, 8, 8, 8))
    small = losses.downsample_labels(labels, (4, 2, 8))
    np.testing.assert_array_equal(small, labels[:, ::2, ::4, :])
    with pytest.raises(ValueError, match="does not divide"):
        losses.downsample_labels(labels, (3, 4, 4))


def test_deep_supervision_weights_the_heads():
    labels = _labels((2, 8, 8, 8))
    rng = np.random.default_rng(1)
    main = jnp.asarray(rng.normal(size=(2, 8, 8, 8, 3)), jnp.float32)
    aux = jnp.asarray(rng.normal(size=(2, 4, 4, 4, 3)), jnp.float32)
    total, parts = losses.segmentation_loss((main, aux), labels, 3)
    l_main, _ = losses.dice_ce_loss(main, labels, 3)
    l_aux, _ = losses.dice_ce_loss(aux, labels[:, ::2, ::2, ::2], 3)
    chex.assert_trees_all_close(total, (2 * l_main + l_aux) / 3, rtol=1e-6)
    # the parts describe the main head only
    chex.assert_trees_all_close(parts["ce"], losses.cross_entropy(main, labels), rtol=1e-6)
    single, _ = losses.segmentation_loss(main, labels, 3)
    chex.assert_trees_all_close(single, l_main)


def test_gradient_is_finite_when_a_class_is_absent():
    labels = jnp.zeros((1, 4, 4, 4), jnp.int32)  # only background in the batch
    logits = jnp.zeros((1, 4, 4, 4, 3))
    grad = jax.grad(lambda x: losses.dice_ce_loss(x, labels, 3)[0])(logits)
    assert np.all(np.isfinite(grad))


def test_hard_dice_matches_metrics_module():
    labels = _labels((1, 6, 6, 6), k=3, seed=2)
    pred = _labels((1, 6, 6, 6), k=3, seed=3)
    logits = jax.nn.one_hot(pred, 3)
    want = np.mean(dice_per_class(np.asarray(pred[0]), np.asarray(labels[0]), 3)[1:])
    chex.assert_trees_all_close(losses.hard_dice(logits, labels, 3), want, rtol=1e-6)
