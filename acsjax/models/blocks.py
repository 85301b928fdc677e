"""Building blocks shared by the models: norms, activations, remat, conv-norm-act.

Everything here is keyed on ``dims`` (2, 3, 'acs', 'soft_acs' or '2.5d', see
:mod:`acsjax.layers`), so one model definition builds all five variants with
parameter trees that :func:`acsjax.inflate_params` maps onto each other.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from acsjax import layers, ops
from acsjax.layers import spatial_rank

NORMS = ("batch", "group", "instance")
DEPTH_PADDINGS = ("zeros", "edge")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
}
# Policies of jax.checkpoint_policies that are policies themselves (not factories).
REMAT_POLICIES = (
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)


def make_norm(
    kind: str,
    features: int,
    *,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    groups: int = 8,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """A normalisation layer over the channel axis of an (N, ..., C) array.

    Args:
      kind: 'batch' (``nnx.BatchNorm``; follows ``model.train()`` / ``model.eval()``),
        'group' (``nnx.GroupNorm`` with ``min(groups, features)`` groups) or
        'instance' (``nnx.InstanceNorm``, per sample and channel).
      momentum: BatchNorm's running-average decay (0.9 is PyTorch's momentum=0.1).
      epsilon: added to the variance.
    """
    if kind == "batch":
        return nnx.BatchNorm(
            features, momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
    if kind == "group":
        g = min(groups, features)
        if features % g:
            raise ValueError(f"norm='group': {features} channels are not divisible into {g} groups")
        return nnx.GroupNorm(features, num_groups=g, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if kind == "instance":
        return nnx.InstanceNorm(features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called ``name`` (see ``ACTIVATIONS``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def resolve_remat(remat) -> Callable | None:
    """Turns the ``remat`` option of a model into a ``jax.checkpoint`` policy or None.

    ``None`` or ``False``: no rematerialisation. ``True``: 'nothing_saveable'.
    A string names an attribute of ``jax.checkpoint_policies`` (see
    ``REMAT_POLICIES``); a callable is used as the policy itself.
    """
    if remat is None or remat is False:
        return None
    if remat is True:
        remat = "nothing_saveable"
    if callable(remat):
        return remat
    if isinstance(remat, str) and remat in REMAT_POLICIES and hasattr(jax.checkpoint_policies, remat):
        return getattr(jax.checkpoint_policies, remat)
    raise ValueError(f"remat must be None, True, a policy callable or one of {REMAT_POLICIES}, got {remat!r}")


def _call_block(block, *args):
    return block(*args)


def run_block(block: nnx.Module, policy: Callable | None, *args):
    """Calls ``block(*args)``, under ``nnx.remat`` with ``policy`` when one is set.

    With a policy the block's activations are recomputed in the backward pass
    instead of stored; BatchNorm statistics updated inside still propagate.
    """
    if policy is None:
        return block(*args)
    return nnx.remat(_call_block, policy=policy)(block, *args)


def per_level(value, n: int, name: str) -> tuple[bool, ...]:
    """``value``: one bool for all ``n`` downsamplings or one bool each, shallow to deep.

    A wrong length is a one-line ValueError that starts with ``name``.
    """
    if isinstance(value, bool):
        return (value,) * n
    value = tuple(bool(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must be a bool or {n} bools (one per downsampling), got {value}")
    return value


def spatial_strides(dims, stride: int, pool_depth: bool = True) -> tuple[int, ...]:
    """Per-axis strides for a ``dims`` layer; depth keeps stride 1 when ``pool_depth`` is off."""
    if spatial_rank(dims) == 2:
        return (stride, stride)
    return (stride if pool_depth else 1, stride, stride)


def upsample(x: jax.Array, factors: Sequence[int]) -> jax.Array:
    """Nearest-neighbour upsampling with one integer factor per spatial axis."""
    for axis, f in enumerate(factors, start=1):
        if f != 1:
            x = jnp.repeat(x, f, axis=axis)
    return x


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over all spatial axes: (N, ..., C) -> (N, C)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def check_input(name: str, x: jax.Array, dims, in_channels: int) -> None:
    """One-line ValueError when ``x`` is not (N, *spatial, in_channels) for ``dims``."""
    rank = spatial_rank(dims)
    layout = "NHWC" if rank == 2 else "NDHWC"
    if x.ndim != rank + 2 or x.shape[-1] != in_channels:
        raise ValueError(
            f"{name} (dims={dims!r}) expects {layout} input with {in_channels} channels, got shape {tuple(x.shape)}"
        )


def check_divisible(name: str, x: jax.Array, divisor: Sequence[int]) -> None:
    """One-line ValueError when a spatial size is not a multiple of the model's total stride."""
    spatial = tuple(x.shape[1:-1])
    if any(s % d for s, d in zip(spatial, divisor)):
        fixed = tuple(-(-s // d) * d for s, d in zip(spatial, divisor))
        raise ValueError(
            f"{name}: input spatial shape {spatial} must be divisible by {tuple(divisor)} per axis "
            f"(its total downsampling); pad or crop it, e.g. to {fixed}"
        )


def param_count(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param``), not counting BatchNorm statistics.

    Works on abstract models from ``nnx.eval_shape`` too.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


class Conv(layers.Conv):
    """:class:`acsjax.layers.Conv` with a choice of how the depth axis of a volume is padded.

    ``depth_padding='zeros'`` is the layer's own behaviour. ``'edge'`` pads the
    depth axis (only) by replicating the first and last slices, while the
    in-plane axes keep zero padding as in the 2D network. Average- or
    scale-inflated 3D networks then reproduce their 2D source exactly on a
    volume that repeats one image along depth, at every depth: with zeros the
    slices near the ends see the padding, and when a stage has fewer slices
    than the kernel has taps (e.g. 8 slices after three stride-2 stages) most
    taps fall on it. The parameters are the same either way. A layer built with
    ``padding_mode`` other than 'zeros' pads every axis its own way instead.
    """

    def __init__(self, *args, depth_padding: str = "zeros", **kwargs):
        super().__init__(*args, **kwargs)
        if depth_padding not in DEPTH_PADDINGS:
            raise ValueError(f"depth_padding must be one of {DEPTH_PADDINGS}, got {depth_padding!r}")
        edge = depth_padding == "edge" and spatial_rank(self.dims) == 3 and self.padding_mode == "zeros"
        self.depth_padding = "edge" if edge else "zeros"

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.depth_padding == "zeros":
            return super().__call__(x)
        strides = self.strides if not isinstance(self.strides, int) else (self.strides,) * 3
        pads = ops.resolve_padding(self.padding, x.shape[1:4], self.window, strides)
        x = jnp.pad(x, ((0, 0), pads[0], (0, 0), (0, 0), (0, 0)), mode="edge")
        # The depth padding is now in x; for ACS the axial group's negative depth
        # padding then crops it back, as its kernel has a single depth tap.
        return self.convolve(x, strides=strides, padding=((0, 0), pads[1], pads[2]))


class ConvNormAct(nnx.Module):
    """Conv (no bias) -> norm -> activation, the unit of the U-Nets.

    Parameters: ``conv/kernel`` and ``norm/{scale, bias[, mean, var]}``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int] = 3,
        *,
        dims,
        strides: int | Sequence[int] = 1,
        norm: str = "batch",
        act: str = "relu",
        depth_padding: str = "zeros",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv = Conv(
            in_features,
            out_features,
            kernel_size,
            dims=dims,
            strides=strides,
            depth_padding=depth_padding,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.norm = make_norm(norm, out_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.act(self.norm(self.conv(x)))
