"""Flax NNX layers that know their dimensionality: 2, 3, 'acs', 'soft_acs' or '2.5d'.

The parameter names and shapes are exactly what :func:`acsjax.inflate_params`
produces from the 2D layer, so a 2D model's state inflates into a 3D model of
the same class with ``nnx.update``:

===========  ======================  ===============================
dims         input                   kernel
===========  ======================  ===============================
2            (N, H, W, C)            (k, k, cin, cout)
3            (N, D, H, W, C)         (k, k, k, cin, cout)
'2.5d'       (N, D, H, W, C)         (1, k, k, cin, cout)
'acs'        (N, D, H, W, C)         (k, k, cin, cout), see acs_conv
'soft_acs'   (N, D, H, W, C)         (k, k, cin, cout) and view_logits
                                     (cout, 3), see soft_acs_conv
===========  ======================  ===============================

A ``'soft_acs'`` layer also holds ``view_logits``, which a 2D model does not
have: ``nnx.update`` with an inflated 2D state leaves them at their
initialisation.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from acsjax import ops

DIMS = (2, 3, "acs", "soft_acs", "2.5d")
# dims whose layers keep 2D kernels and apply them on the three planes of a volume.
ACS_DIMS = ("acs", "soft_acs")
_default_kernel_init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
_TRUNCATED_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


@functools.partial(jax.jit, static_argnums=1)
def _truncated_normal(key, size: int):
    return jax.random.truncated_normal(key, -2.0, 2.0, (size,), jnp.float32)


def _init_kernel(init, key, shape, dtype):
    """``init(key, shape, dtype)``, fast for the default He initialiser when called eagerly.

    Run op by op, an initialiser compiles each of its ops once per new shape
    (about a second per conv on a small CPU). The default initialiser instead
    draws from one jitted sampler whose size is rounded up to a power of two,
    so a model compiles it a handful of times. Same distribution as
    ``variance_scaling(2.0, 'fan_in', 'truncated_normal')``.
    """
    if init is not _default_kernel_init:
        return init(key, shape, dtype)
    size = math.prod(shape)
    fan_in = size // shape[-1]
    std = math.sqrt(2.0 / fan_in) / _TRUNCATED_STD
    flat = _truncated_normal(key, 1 << max(size - 1, 0).bit_length())
    return (flat[:size].reshape(shape) * std).astype(dtype)


def check_dims(dims) -> None:
    """Raises a ValueError listing the allowed values when ``dims`` is not one of them."""
    if dims not in DIMS:
        raise ValueError(f"dims must be one of {DIMS}, got {dims!r}")


def spatial_rank(dims) -> int:
    """Number of spatial axes of the activations a ``dims`` layer consumes."""
    check_dims(dims)
    return 2 if dims == 2 else 3


def kernel_shape(dims, kernel_size: int, in_features: int, out_features: int) -> tuple[int, ...]:
    """The kernel shape a ``dims`` convolution stores (see the module table)."""
    check_dims(dims)
    k = kernel_size
    if dims == 2 or dims in ACS_DIMS:
        return (k, k, in_features, out_features)
    if dims == "2.5d":
        return (1, k, k, in_features, out_features)
    return (k, k, k, in_features, out_features)


class Conv(nnx.Module):
    """Convolution with square/cubic kernels for any ``dims`` (see module docstring).

    ``padding`` defaults to ``kernel_size // 2`` zeros on each side (PyTorch's
    usual choice); ``padding_mode='edge'`` replicates borders instead. For
    ``dims='2.5d'`` the depth axis is never padded. Parameters are stored in
    ``param_dtype``; the convolution runs in ``dtype`` (e.g. bfloat16).

    ``dims='soft_acs'`` adds the parameter ``view_logits`` (out_features, 3),
    the per-channel mixing logits of the axial, coronal and sagittal views
    (:func:`acsjax.ops.soft_acs_conv`), initialised to zeros. ACSConv's
    ``SoftACSConv`` draws them with ``torch.rand`` (uniform in [0, 1)) from
    PyTorch's global random state, outside any seed the model is given, so two
    runs start from different mixings and cannot be reproduced, and each
    channel starts with a random preference for some plane that the 2D weights
    give no reason for. Zeros mean equal mixing: an inflated network starts as
    the mean of its three planes, deterministically; training moves the
    logits where the data asks.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int = 3,
        *,
        dims=2,
        strides: int | Sequence[int] = 1,
        padding: ops.Padding | None = None,
        padding_mode: str = "zeros",
        groups: int = 1,
        use_bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        kernel_init=_default_kernel_init,
        rngs: nnx.Rngs,
    ):
        check_dims(dims)
        if in_features % groups or out_features % groups:
            raise ValueError(f"Conv: groups={groups} must divide in ({in_features}) and out ({out_features}) features")
        self.dims = dims
        self.strides = strides
        self.padding = kernel_size // 2 if padding is None else padding
        if dims == "2.5d" and isinstance(self.padding, int):
            self.padding = ((0, 0), (self.padding,) * 2, (self.padding,) * 2)
        self.padding_mode = padding_mode
        self.groups = groups
        self.dtype = dtype
        shape = kernel_shape(dims, kernel_size, in_features // groups, out_features)
        self.kernel = nnx.Param(_init_kernel(kernel_init, rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        if dims == "soft_acs":
            self.view_logits = nnx.Param(jnp.zeros((out_features, 3), param_dtype))

    def convolve(self, x: jax.Array, kernel: jax.Array, **options) -> jax.Array:
        """The ``dims`` convolution of ``x`` with ``kernel`` (no bias); ``options`` go to the ops function."""
        if self.dims == "acs":
            return ops.acs_conv(x, kernel, **options)
        if self.dims == "soft_acs":
            return ops.soft_acs_conv(x, kernel, self.view_logits[...], **options)
        return ops.conv(x, kernel, **options)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        kernel = self.kernel[...].astype(dtype)
        y = self.convolve(
            x, kernel, strides=self.strides, padding=self.padding, padding_mode=self.padding_mode, groups=self.groups
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


def _window(dims, size: int, pool_depth: bool = True) -> tuple[int, ...]:
    rank = spatial_rank(dims)
    if rank == 3 and not pool_depth:
        return (1,) + (size,) * 2
    return (size,) * rank


def max_pool(x: jax.Array, dims, size: int = 2, *, strides: int | None = None, padding=0, pool_depth: bool = True):
    """Max pooling over the spatial axes; ``pool_depth=False`` leaves depth alone."""
    window = _window(dims, size, pool_depth)
    stride = _window(dims, strides or size, pool_depth)
    pads = ops.resolve_padding(padding, x.shape[1:-1], window, stride)
    if not pool_depth and len(window) == 3:
        pads = ((0, 0),) + tuple(pads[1:])
    return nnx.max_pool(x, window, stride, padding=pads)


def avg_pool(x: jax.Array, dims, size: int = 2, *, pool_depth: bool = True) -> jax.Array:
    """Average pooling with stride equal to the window."""
    window = _window(dims, size, pool_depth)
    return nnx.avg_pool(x, window, window)


def upsample(x: jax.Array, dims, factor: int = 2, *, depth: bool = True) -> jax.Array:
    """Nearest-neighbour upsampling of the spatial axes by ``factor``."""
    for axis in range(1, spatial_rank(dims) + 1):
        if axis == 1 and spatial_rank(dims) == 3 and not depth:
            continue
        x = jnp.repeat(x, factor, axis=axis)
    return x
