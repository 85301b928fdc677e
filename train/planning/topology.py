"""U-Net topology for a patch at a spacing: strides and kernels per stage (nnU-Net's rules).

Axes are ``(d, h, w)``; stage 0 is the full-resolution stem, stride
``(1, 1, 1)``. :func:`topology` is the rule; :func:`fit_topology` and
:func:`shrink_topology` are the steps :func:`train.planning.experiment.plan_experiment`
takes to fit a patch to the median shape and to the voxel budget.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# Smallest feature map edge at the bottleneck: an axis is pooled only while
# it is at least twice this (nnU-Net's 4).
MIN_FEATURE_MAP = 4

Triple = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Topology:
    """Strides and kernels per stage for one patch; ``patch`` padded to ``divisor``."""

    strides: tuple[Triple, ...]
    kernels: tuple[Triple, ...]
    divisor: Triple
    patch: Triple


def topology(spacing: Sequence[float], patch: Sequence[int], *, max_stages: int = 5,
             min_feature_map: int = MIN_FEATURE_MAP) -> Topology:
    """Per-stage strides and kernels of a U-Net for ``patch`` at ``spacing``.

    Pooling, stage by stage (each pooling step adds a stage, up to
    ``max_stages`` including the stem): an axis is pooled (stride 2) while
    its feature map is at least ``2 * min_feature_map`` voxels AND its current
    spacing is below 2x the finest current spacing among the axes still that
    large. When a single axis qualifies it must be at least
    ``3 * min_feature_map``. Pooling stops when no axis qualifies.

    Reason: pooling every axis of a thin-slice stack would halve 5 mm slices
    to 10 mm while the in-plane voxels are still 0.8 mm; pooling only the
    fine axes first makes the voxels of deeper stages closer to isotropic.
    The size floor keeps the bottleneck at least ``min_feature_map`` wide.

    Kernels: along an axis the kernel is 1 until that axis's current spacing
    is below 2x the finest current spacing, then 3 (and stays 3). Reason: a
    3-tap kernel across slices far apart mixes anatomy that does not line up;
    a (1, 3, 3) kernel is a 2D convolution per slice, which is also exactly
    what 2D weights give. nnU-Net always uses 3 at the bottleneck; here the
    rule holds there too (it differs only when ``max_stages`` stops pooling
    while the depth axis is still coarse).

    Returns:
      :class:`Topology` with ``patch`` padded up to a multiple of the total
      stride per axis (nnU-Net's ``pad_shape``).
    """
    spacing = [float(s) for s in spacing]
    size = [int(s) for s in patch]
    if max_stages < 1:
        raise ValueError(f"max_stages must be >= 1, got {max_stages}")
    strides: list[Triple] = [(1, 1, 1)]
    kernels: list[Triple] = []
    kernel = [1, 1, 1]
    divisor = [1, 1, 1]

    def update_kernel():
        finest = min(spacing)
        for a in range(3):
            if kernel[a] == 1 and spacing[a] / finest < 2:
                kernel[a] = 3
        kernels.append(tuple(kernel))

    while len(strides) < max_stages:
        big = [a for a in range(3) if size[a] >= 2 * min_feature_map]
        if not big:
            break
        finest = min(spacing[a] for a in big)
        axes = [a for a in big if spacing[a] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_feature_map:
            break
        update_kernel()
        stride = [1, 1, 1]
        for a in axes:
            stride[a] = 2
            divisor[a] *= 2
            spacing[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append(tuple(stride))
    update_kernel()  # the deepest stage's
    padded = tuple(int(math.ceil(p / d) * d) for p, d in zip(patch, divisor))
    return Topology(tuple(strides), tuple(kernels), tuple(divisor), padded)


def fit_topology(spacing, patch, limit, max_stages) -> Topology:
    """:func:`topology` whose padded patch stays within ``limit`` (the median shape).

    nnU-Net pads the patch up to a multiple of the total stride even past
    the median shape; here an axis that would pass it is rounded down to a
    multiple instead, so a patch never asks for more than a typical case
    holds (the rest would be padding). Rounding down can only remove pooling
    steps, so the divisor stays a power of two that the new size is a
    multiple of, and the loop ends.
    """
    patch = [int(p) for p in patch]
    while True:
        topo = topology(spacing, patch, max_stages=max_stages)
        over = [a for a in range(3) if topo.patch[a] > limit[a] and patch[a] >= topo.divisor[a]]
        if not over:
            return topo
        for a in over:
            patch[a] = (patch[a] // topo.divisor[a]) * topo.divisor[a]


def shrink_topology(spacing, topo: Topology, median, max_stages) -> Topology | None:
    """One step down for the patch axis largest relative to the median shape (None: none can shrink).

    The step is the total stride of the smaller size: it may pool once less
    than the current one, and then a finer step reaches a valid size in
    between (nnU-Net does the same). Should padding undo that step, the
    current total stride is taken instead, which always shrinks.
    """
    patch = list(topo.patch)
    for axis in np.argsort([p / m for p, m in zip(patch, median)])[::-1]:
        step = topo.divisor[axis]
        if patch[axis] - step < 1:
            continue
        coarse = list(patch)
        coarse[axis] -= step
        fine = list(patch)
        fine[axis] -= topology(spacing, coarse, max_stages=max_stages).divisor[axis]
        smaller = fit_topology(spacing, fine, median, max_stages)
        if smaller.patch[axis] >= patch[axis]:
            smaller = fit_topology(spacing, coarse, median, max_stages)
        return smaller
    return None
