"""Flax NNX layers that know their dimensionality: 2, 3, 'acs', 'soft_acs' or '2.5d'.

The parameter names and shapes are exactly what :func:`acsjax.inflate_params`
produces from the 2D layer, so a 2D model's state inflates into a 3D model of
the same class with ``nnx.update``:

===========  ======================  ===============================
dims         input                   kernel
===========  ======================  ===============================
2            (N, H, W, C)            (kh, kw, cin, cout)
3            (N, D, H, W, C)         (kd, kh, kw, cin, cout)
'2.5d'       (N, D, H, W, C)         (1, kh, kw, cin, cout)
'acs'        (N, D, H, W, C)         (k, k, cin, cout), see acs_conv
'soft_acs'   (N, D, H, W, C)         (k, k, cin, cout) and view_logits
                                     (cout, 3), see soft_acs_conv
===========  ======================  ===============================

``kernel_size`` is an int (a square or cubic kernel) or per axis
``(kd, kh, kw)``, so one option set builds every variant: dims=2 uses the
in-plane ``(kh, kw)`` (a pair is accepted too), '2.5d' always has depth 1, and
'acs' and 'soft_acs' take either a cubic kernel (the ACS convolution) or
``kd == 1``, which applies the 2D kernel ``(kh, kw, cin, cout)`` axially only, as a ``(1, kh, kw)``
convolution (an anisotropic stage of an ACS model).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
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


def kernel_size_3d(dims, kernel_size, name: str = "kernel_size") -> tuple[int, int, int]:
    """``kernel_size`` (an int or per axis) as the (kd, kh, kw) window a ``dims`` layer applies.

    dims=2 ignores kd (1 is returned) and accepts a pair (kh, kw); '2.5d' forces
    kd = 1; 'acs' needs kd == 1 (axial only) or kd == kh == kw (ACS). Raises a
    one-line ValueError that starts with ``name``.
    """
    check_dims(dims)
    if isinstance(kernel_size, (int, np.integer)):
        size = (int(kernel_size),) * 3
    else:
        size = tuple(kernel_size)
        if dims == 2 and len(size) == 2:
            size = (1, *size)
        if len(size) != 3 or not all(isinstance(k, (int, np.integer)) for k in size):
            raise ValueError(f"{name} must be an int or (kd, kh, kw) ints, got {kernel_size!r}")
        size = tuple(int(k) for k in size)
    if min(size) < 1:
        raise ValueError(f"{name} must be positive, got {kernel_size!r}")
    kd, kh, kw = size
    if dims == 2 or dims == "2.5d":
        return (1, kh, kw)
    if dims in ACS_DIMS and kd != 1 and not kd == kh == kw:
        raise ValueError(
            f"{name}: dims={dims!r} needs kd == 1 (axial only) or kd == kh == kw (ACS), got {size}"
        )
    return size


def kernel_shape(dims, kernel_size, in_features: int, out_features: int) -> tuple[int, ...]:
    """The kernel shape a ``dims`` convolution stores (see the module table)."""
    kd, kh, kw = kernel_size_3d(dims, kernel_size)
    if dims == 2 or dims in ACS_DIMS:
        return (kh, kw, in_features, out_features)
    return (kd, kh, kw, in_features, out_features)


class Conv(nnx.Module):
    """Convolution for any ``dims`` with an int or per-axis ``(kd, kh, kw)`` kernel (see module docstring).

    ``padding`` defaults to ``k // 2`` zeros on each side of each axis
    (PyTorch's usual choice); ``padding_mode='edge'`` replicates borders
    instead. An int ``padding`` never pads the depth of a layer that applies
    its kernel slice by slice ('2.5d', or 'acs' with kd == 1). Parameters are
    stored in ``param_dtype``; the convolution runs in ``dtype`` (e.g. bfloat16).

    ``dims='soft_acs'`` adds the parameter ``view_logits`` (out_features, 3),
    the per-channel mixing logits of the axial, coronal and sagittal views
    (:func:`acsjax.ops.soft_acs_conv`), initialised to zeros (an axial-only
    stage, kd == 1, has one view and no logits). ACSConv's ``SoftACSConv``
    draws them with ``torch.rand`` (uniform in [0, 1)) from PyTorch's global
    random state, outside any seed the model is given, so two runs start from
    different mixings and cannot be reproduced, and each channel starts with a
    random preference for some plane that the 2D weights give no reason for.
    Zeros mean equal mixing: an inflated network starts as the mean of its
    three planes, deterministically; training moves the logits where the data
    asks. ``nnx.update`` with an inflated 2D state leaves them as they are.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int] = 3,
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
        self.kernel_size = kernel_size_3d(dims, kernel_size)
        # ACS with kd == 1 applies its 2D kernel axially only, like '2.5d'.
        self.axial = dims == "2.5d" or (dims in ACS_DIMS and self.kernel_size[0] == 1)
        self.strides = strides
        if padding is None:
            padding = tuple(k // 2 for k in self.window)
        elif self.axial and isinstance(padding, int):
            padding = (0, padding, padding)
        self.padding = padding
        self.padding_mode = padding_mode
        self.groups = groups
        self.dtype = dtype
        shape = kernel_shape(dims, kernel_size, in_features // groups, out_features)
        self.kernel = nnx.Param(_init_kernel(kernel_init, rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        if dims == "soft_acs" and not self.axial:
            self.view_logits = nnx.Param(jnp.zeros((out_features, 3), param_dtype))

    @property
    def window(self) -> tuple[int, ...]:
        """The spatial window the layer applies: (kh, kw) for dims=2, else (kd, kh, kw)."""
        return self.kernel_size[1:] if self.dims == 2 else self.kernel_size

    def convolve(self, x: jax.Array, *, strides, padding, padding_mode: str = "zeros") -> jax.Array:
        """The convolution (with bias) in ``dtype``, for explicit strides and padding."""
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        kernel = self.kernel[...].astype(dtype)
        if self.dims == "soft_acs" and not self.axial:
            fn = functools.partial(ops.soft_acs_conv, view_logits=self.view_logits[...])
        elif self.dims == "acs" and not self.axial:
            fn = ops.acs_conv
        else:
            fn = ops.conv
            if kernel.ndim == 4 and x.ndim == 5:  # axial-only ACS stage: a (1, kh, kw) kernel
                kernel = kernel[None]
        y = fn(x, kernel, strides=strides, padding=padding, padding_mode=padding_mode, groups=self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.convolve(x, strides=self.strides, padding=self.padding, padding_mode=self.padding_mode)


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
