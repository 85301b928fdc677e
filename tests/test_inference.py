"""Tests for acsjax.inference: window grid, Gaussian map, blending, mirror TTA."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from acsjax.inference import gaussian_importance_map, sliding_window_inference, window_starts


def _pointwise(w):
    """A translation-equivariant, local (1x1) network: logits = x @ w."""
    return lambda x: jnp.einsum("...c,ck->...k", x, w)


def test_window_starts_cover_odd_sizes():
    for size, patch, overlap in itertools.product((5, 7, 13, 31, 64, 97), (1, 4, 5, 8, 16), (0.0, 0.25, 0.5, 0.8)):
        if patch > size:
            continue
        starts = window_starts(size, patch, overlap)
        assert starts[0] == 0 and starts[-1] == size - patch, (size, patch, overlap, starts)
        assert list(starts) == sorted(set(starts))
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s : s + patch] = True
        assert covered.all(), (size, patch, overlap, starts)
        # No step is longer than the target step (rounding can add one voxel).
        assert max(np.diff(starts), default=0) <= int(np.ceil(patch * (1 - overlap))) + 1
    assert window_starts(10, 10) == (0,)
    assert window_starts(12, 8, 0.5) == (0, 4)
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, 1.0)
    with pytest.raises(ValueError, match="patch"):
        window_starts(3, 4)


def test_gaussian_map_properties():
    g = np.asarray(gaussian_importance_map((9, 8, 5), 1 / 8))
    assert g.shape == (9, 8, 5)
    np.testing.assert_allclose(g.max(), 1.0)
    assert g.min() > 0
    for axis in range(3):
        np.testing.assert_allclose(g, np.flip(g, axis), rtol=1e-6)
    # Separable (before clipping): the map is the outer product of its central lines.
    g = np.asarray(gaussian_importance_map((9, 8, 5), 1 / 8, floor=0.0))
    line = [g[:, 3, 2], g[4, :, 2], g[4, 3, :]]
    outer = np.einsum("i,j,k->ijk", *(v / v.max() for v in line))
    np.testing.assert_allclose(g, outer, rtol=1e-5, atol=1e-7)
    # sigma = patch * sigma_scale: one sigma from the centre the weight is exp(-1/2).
    g1 = np.asarray(gaussian_importance_map((9,), 1 / 3))
    assert g1.argmax() == 4
    np.testing.assert_allclose(g1[7], np.exp(-0.5), rtol=1e-6)
    # Tails are clipped away from zero.
    g2 = np.asarray(gaussian_importance_map((64, 64), 1 / 64, floor=1e-4))
    np.testing.assert_allclose(g2.min(), 1e-4)
    with pytest.raises(ValueError, match="sigma_scale"):
        gaussian_importance_map((4,), 0.0)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_pointwise_net_reproduces_full_volume(mode):
    """Odd sizes, a patch smaller on some axes and larger on another, padded last batch."""
    kx, kw = jax.random.split(jax.random.key(0))
    vol = jax.random.normal(kx, (2, 11, 13, 4, 2))
    w = jax.random.normal(kw, (2, 3))
    fn = _pointwise(w)
    probs = sliding_window_inference(fn, vol, patch=(6, 8, 7), overlap=0.5, batch_size=3, mode=mode)
    chex.assert_shape(probs, (2, 11, 13, 4, 3))
    chex.assert_trees_all_close(probs, jax.nn.softmax(fn(vol), -1), atol=1e-5)


def test_one_hot_label_map_and_2d():
    """A network that outputs a (confident) one-hot of a label map computed from the input."""
    img = jax.random.uniform(jax.random.key(1), (3, 17, 10, 1))
    labels = jnp.digitize(img[..., 0], jnp.array([0.3, 0.7]))

    def fn(x):
        return 50.0 * jax.nn.one_hot(jnp.digitize(x[..., 0], jnp.array([0.3, 0.7])), 3)

    probs = sliding_window_inference(fn, img, patch=(8, 8), overlap=0.25, batch_size=4)
    chex.assert_shape(probs, (3, 17, 10, 3))
    np.testing.assert_array_equal(np.asarray(probs.argmax(-1)), np.asarray(labels))
    chex.assert_trees_all_close(probs, jax.nn.one_hot(labels, 3), atol=1e-5)


def test_small_volume_is_padded_and_cropped():
    vol = jax.random.normal(jax.random.key(2), (1, 3, 5, 4, 1))
    w = jnp.array([[1.0, -2.0]])
    probs = sliding_window_inference(_pointwise(w), vol, patch=(8, 8, 8))
    chex.assert_shape(probs, (1, 3, 5, 4, 2))
    chex.assert_trees_all_close(probs, jax.nn.softmax(_pointwise(w)(vol), -1), atol=1e-6)


def test_every_voxel_gets_weight():
    """With raw outputs of ones, the blend is 1 exactly where windows cover the volume."""
    vol = jnp.zeros((1, 23, 9, 19, 1))
    ones = lambda x: jnp.ones(x.shape[:-1] + (1,))  # noqa: E731
    out = sliding_window_inference(ones, vol, patch=(8, 4, 6), overlap=0.3, softmax=False)
    np.testing.assert_allclose(np.asarray(out), 1.0, rtol=1e-6)


def _reference_blend(fn, vol, patch, overlap, weight):
    """A plain numpy loop over windows, one at a time."""
    n, *spatial, _ = vol.shape
    starts = [window_starts(s, p, overlap) for s, p in zip(spatial, patch)]
    acc, wsum = None, np.zeros((n, *spatial, 1))
    for b in range(n):
        for s in itertools.product(*starts):
            sl = (b,) + tuple(slice(a, a + p) for a, p in zip(s, patch))
            y = np.asarray(fn(vol[sl][None]))[0]
            if acc is None:
                acc = np.zeros((n, *spatial, y.shape[-1]))
            acc[sl] += y * weight[..., None]
            wsum[sl] += weight[..., None]
    return acc / wsum


def test_blending_matches_reference_loop_for_non_local_net():
    """A network whose output depends on the whole window exposes the exact weighting."""
    vol = jax.random.normal(jax.random.key(3), (2, 14, 11, 1))

    def fn(x):  # window mean plus a position-dependent ramp: not translation-equivariant
        ramp = jnp.arange(x.shape[1], dtype=jnp.float32)[None, :, None, None]
        return jnp.tanh(x + x.mean(axis=(1, 2), keepdims=True) + 0.1 * ramp)

    patch = (6, 5)
    g = np.asarray(gaussian_importance_map(patch))
    want = _reference_blend(fn, np.asarray(vol), patch, 0.5, g)
    got = sliding_window_inference(fn, vol, patch=patch, overlap=0.5, batch_size=3, softmax=False)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    flat = sliding_window_inference(fn, vol, patch=patch, overlap=0.5, mode="constant", softmax=False)
    np.testing.assert_allclose(np.asarray(flat), _reference_blend(fn, np.asarray(vol), patch, 0.5, np.ones(patch)),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(flat), atol=1e-3)


def _box_conv(kernel):
    """A 3D convolution with zero padding; flip-equivariant iff the kernel is symmetric."""
    k = kernel[..., None, None]

    def fn(x):
        y = jax.lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return jnp.concatenate([y, -y], axis=-1)

    return fn


def test_mirror_tta_with_flip_equivariant_net_equals_no_tta():
    vol = jax.random.normal(jax.random.key(4), (1, 9, 10, 7, 1))
    run = functools.partial(sliding_window_inference, patch=(6, 6, 6), overlap=0.5, batch_size=4)
    sym = _box_conv(jnp.ones((3, 3, 3)) / 27.0)
    plain = run(sym, vol)
    chex.assert_trees_all_close(run(sym, vol, mirror_axes=(1, 2, 3)), plain, atol=1e-5)
    # The same test fails for a net that is not flip-equivariant, so TTA really flips.
    asym = _box_conv(jnp.arange(27.0).reshape(3, 3, 3) / 100.0)
    assert not np.allclose(run(asym, vol, mirror_axes=(1,)), run(asym, vol), atol=1e-3)


def test_jit_and_errors():
    w = jnp.array([[0.5, -1.0, 2.0]])
    vol = jax.random.normal(jax.random.key(5), (1, 7, 9, 5, 1))
    jitted = jax.jit(functools.partial(sliding_window_inference, _pointwise(w), patch=(4, 4, 4), mirror_axes=(2,)))
    chex.assert_trees_all_close(jitted(vol), jax.nn.softmax(_pointwise(w)(vol), -1), atol=1e-5)

    fn = _pointwise(w)
    with pytest.raises(ValueError, match="spatial axes"):
        sliding_window_inference(fn, vol[0], patch=(4, 4, 4))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(fn, vol, patch=(4, 4, 4), overlap=-0.1)
    with pytest.raises(ValueError, match="mirror_axes"):
        sliding_window_inference(fn, vol, patch=(4, 4, 4), mirror_axes=(0,))
    with pytest.raises(ValueError, match="mode"):
        sliding_window_inference(fn, vol, patch=(4, 4, 4), mode="box")
    with pytest.raises(ValueError, match="predict_fn"):
        sliding_window_inference(lambda x: x[:, ::2], vol, patch=(4, 4, 4))


def test_memory_stays_at_one_accumulator():
    """Compile-only: temporaries stay below the output size; stacking every window's output would not."""
    w = jnp.ones((1, 3))
    fn = jax.jit(functools.partial(sliding_window_inference, _pointwise(w), patch=(32, 32, 32), batch_size=2))
    compiled = fn.lower(jax.ShapeDtypeStruct((1, 128, 128, 128, 1), jnp.float32)).compile()
    out_bytes = 128**3 * 3 * 4
    stacked_bytes = 7**3 * 32**3 * 3 * 4  # 343 windows of (32^3, 3) float32
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < out_bytes < stacked_bytes, (temp, out_bytes, stacked_bytes)
