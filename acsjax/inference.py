"""Sliding-window inference with Gaussian blending (nnU-Net style), pure JAX.

A segmentation network trained on patches is applied to a whole volume by
tiling it with overlapping windows, predicting each window and blending the
overlaps with an importance map that trusts window centres more than their
borders (a network sees less context near a window's edge).

Everything here is shape-static and jit-able: the window grid is computed in
Python from the (static) input shape, the loop over windows is a
``jax.lax.fori_loop`` that carries the blended sum, and no file I/O happens.

Why a loop with a carried accumulator rather than ``jax.lax.map`` or a Python
loop: ``lax.map`` returns every window's output stacked, so a big CT volume
(hundreds of 128^3 windows times the class count) would hold all window
outputs at once before blending. A Python loop over one jitted call keeps
memory small but makes the whole inference impossible to ``jit``. Carrying the
running sum through ``fori_loop`` keeps peak memory at one output-sized
accumulator plus one batch of windows, and XLA updates the carried buffers in
place.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("gaussian", "constant")


def window_starts(size: int, patch: int, overlap: float = 0.5) -> tuple[int, ...]:
    """Start offsets of windows of length ``patch`` covering ``[0, size)``.

    The target step is ``patch * (1 - overlap)``; the number of windows is the
    fewest that reach the end with at most that step, and the windows are then
    spread evenly so that the first starts at 0 and the last ends at ``size``
    (nnU-Net's rule). ``size`` must be at least ``patch`` (pad first).
    """
    if patch < 1 or size < patch:
        raise ValueError(f"window_starts: need 1 <= patch <= size, got patch={patch}, size={size}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    target_step = max(patch * (1.0 - overlap), 1.0)  # tiny patches: never repeat a window
    n = math.ceil((size - patch) / target_step) + 1
    if n == 1:
        return (0,)
    step = (size - patch) / (n - 1)
    return tuple(int(round(step * i)) for i in range(n))


def gaussian_importance_map(
    patch: Sequence[int], sigma_scale: float = 1.0 / 8, *, floor: float = 1e-6, dtype=jnp.float32
) -> jax.Array:
    """Separable Gaussian weights of shape ``patch``, maximum 1, minimum ``floor``.

    ``sigma = patch * sigma_scale`` per axis, as nnU-Net. The centre is the
    geometric centre ``(p - 1) / 2`` (nnU-Net uses ``p // 2``): a map that is
    symmetric under flips keeps mirror test-time augmentation exact. Values are
    clipped below at ``floor`` so that no voxel gets zero total weight when
    only window borders cover it (the tails underflow for small sigmas).
    """
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale}")
    weights = jnp.ones((), jnp.float32)
    for axis, p in enumerate(patch):
        coords = jnp.arange(p, dtype=jnp.float32) - (p - 1) / 2.0
        sigma = p * sigma_scale
        g = jnp.exp(-0.5 * (coords / sigma) ** 2)
        shape = [1] * len(patch)
        shape[axis] = p
        weights = weights * g.reshape(shape)
    weights = weights / jnp.max(weights)
    return jnp.maximum(weights, floor).astype(dtype)


def _mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All subsets of ``mirror_axes``, the identity first (nnU-Net's TTA set)."""
    axes = tuple(mirror_axes)
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def _check_args(volume, patch, overlap, batch_size, mode, mirror_axes):
    rank = len(patch)
    if rank not in (2, 3):
        raise ValueError(f"patch must have 2 or 3 entries, got {tuple(patch)}")
    if volume.ndim != rank + 2:
        raise ValueError(
            f"volume must be (N, *spatial, C) with {rank} spatial axes to match patch {tuple(patch)}, "
            f"got shape {volume.shape}"
        )
    if any(int(p) < 1 for p in patch):
        raise ValueError(f"patch entries must be positive, got {tuple(patch)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    bad = [a for a in mirror_axes if a not in range(1, rank + 1)]
    if bad or len(set(mirror_axes)) != len(tuple(mirror_axes)):
        raise ValueError(f"mirror_axes must be distinct spatial axes in 1..{rank}, got {tuple(mirror_axes)}")


def sliding_window_inference(
    predict_fn: Callable[[jax.Array], jax.Array],
    volume: jax.Array,
    *,
    patch: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 2,
    sigma_scale: float = 1.0 / 8,
    mode: str = "gaussian",
    mirror_axes: Sequence[int] = (),
    softmax: bool = True,
    pad_mode: str = "constant",
    pad_value: float = 0.0,
) -> jax.Array:
    """Applies a patch-wise network to whole volumes; returns blended probabilities.

    Args:
      predict_fn: maps a batch of windows ``(batch_size, *patch, C)`` to logits
        ``(batch_size, *patch, K)``. It is traced once per mirror combination.
      volume: ``(N, D, H, W, C)`` volumes for a 3D network, or ``(N, H, W, C)``
        images for a 2D network (``len(patch)`` spatial axes).
      patch: window size per spatial axis. Spatial axes smaller than the patch
        are padded (centred, ``pad_mode``/``pad_value`` as ``jnp.pad``) and the
        padding is cropped from the result.
      overlap: fraction of a window shared with its neighbour, in [0, 1).
      batch_size: windows per ``predict_fn`` call. Windows of all N volumes
        are batched together; the last batch is filled with repeats whose
        weight is zero.
      sigma_scale: Gaussian sigma as a fraction of the patch (mode 'gaussian').
      mode: 'gaussian' (see :func:`gaussian_importance_map`) or 'constant'
        (plain averaging of overlaps).
      mirror_axes: spatial axes (1..rank) for mirror test-time augmentation.
        Every subset of them is flipped, predicted, flipped back, and the
        softmax probabilities are averaged (2**len(mirror_axes) passes).
      softmax: apply a softmax over the last axis of ``predict_fn``'s output
        before blending. With False the raw outputs are blended (for a
        ``predict_fn`` that already returns probabilities, or regression).

    Returns:
      float32 array ``(N, *spatial, K)`` of the input's spatial shape: for
      ``softmax=True``, class probabilities that sum to 1 over the last axis
      (take ``argmax(-1)`` for labels). Peak memory is this array, a weight
      sum of the padded volume's size and one batch of windows.
    """
    patch = tuple(int(p) for p in patch)
    mirror_axes = tuple(int(a) for a in mirror_axes)
    _check_args(volume, patch, overlap, batch_size, mode, mirror_axes)
    n, *spatial, channels = volume.shape

    # Centre-pad axes shorter than the patch so every window fits.
    extra = [max(p - s, 0) for s, p in zip(spatial, patch)]
    pad_width = [(0, 0)] + [(e // 2, e - e // 2) for e in extra] + [(0, 0)]
    kwargs = {"constant_values": pad_value} if pad_mode == "constant" else {}
    x = jnp.pad(volume, pad_width, mode=pad_mode, **kwargs) if any(extra) else volume
    padded = x.shape[1:-1]

    # The window grid over (volume index, start per axis) is static.
    starts = [window_starts(s, p, overlap) for s, p in zip(padded, patch)]
    grid = np.array(list(itertools.product(range(n), *starts)), dtype=np.int32)
    num_windows = len(grid)
    num_batches = -(-num_windows // batch_size)
    fill = num_batches * batch_size - num_windows
    valid = np.concatenate([np.ones(num_windows, np.float32), np.zeros(fill, np.float32)])
    grid = np.concatenate([grid, np.repeat(grid[:1], fill, axis=0)])

    out = jax.eval_shape(predict_fn, jax.ShapeDtypeStruct((batch_size, *patch, channels), x.dtype))
    if out.shape[:-1] != (batch_size, *patch):
        raise ValueError(
            f"predict_fn must map windows {(batch_size, *patch, channels)} to (batch, *patch, classes), "
            f"got {out.shape}"
        )
    classes = out.shape[-1]

    if mode == "gaussian":
        weight = gaussian_importance_map(patch, sigma_scale)[..., None]
    else:
        weight = jnp.ones((*patch, 1), jnp.float32)
    combos = _mirror_combinations(mirror_axes)

    def predict_windows(windows):
        total = jnp.zeros((batch_size, *patch, classes), jnp.float32)
        for axes in combos:
            flipped = jnp.flip(windows, axes) if axes else windows
            y = predict_fn(flipped).astype(jnp.float32)
            if softmax:
                y = jax.nn.softmax(y, axis=-1)
            total = total + (jnp.flip(y, axes) if axes else y)
        return total / len(combos)

    grid_j = jnp.asarray(grid)
    valid_j = jnp.asarray(valid)

    def cut(s):
        return jax.lax.dynamic_slice(x, (s[0], *s[1:], 0), (1, *patch, channels))[0]

    def batch_step(b, carry):
        idx = jax.lax.dynamic_slice_in_dim(grid_j, b * batch_size, batch_size)
        ok = jax.lax.dynamic_slice_in_dim(valid_j, b * batch_size, batch_size)
        probs = predict_windows(jax.vmap(cut)(idx)) * weight

        # Windows in one batch may overlap, so they are added one at a time.
        def add(j, carry):
            acc, wsum = carry
            start = (idx[j, 0], *idx[j, 1:], 0)
            cur = jax.lax.dynamic_slice(acc, start, (1, *patch, classes))
            acc = jax.lax.dynamic_update_slice(acc, cur + ok[j] * probs[j][None], start)
            cur_w = jax.lax.dynamic_slice(wsum, start, (1, *patch, 1))
            wsum = jax.lax.dynamic_update_slice(wsum, cur_w + ok[j] * weight[None], start)
            return acc, wsum

        return jax.lax.fori_loop(0, batch_size, add, carry)

    acc = jnp.zeros((n, *padded, classes), jnp.float32)
    wsum = jnp.zeros((n, *padded, 1), jnp.float32)
    acc, wsum = jax.lax.fori_loop(0, num_batches, batch_step, (acc, wsum))
    result = acc / wsum
    crop = (slice(None),) + tuple(slice(lo, lo + s) for (lo, _), s in zip(pad_width[1:-1], spatial))
    return result[crop]
