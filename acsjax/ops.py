"""Convolution primitives: N-d convolution and the ACS convolution.

Layouts follow Flax: activations NHWC (2D) or NDHWC (3D), kernels HWIO or
DHWIO. ``padding`` follows PyTorch when it is an integer: ``p`` zeros on each
side of every spatial axis. ``'SAME'`` and ``'VALID'`` follow XLA, and a
sequence gives one integer or one ``(low, high)`` pair per spatial axis.

The ACS convolution (Yang et al., "Reinforcing 2D networks for 3D medical
image analysis") keeps a 2D kernel ``(k, k, cin, cout)`` and applies its output
channel groups (split by :func:`acs_kernel_split`) along the three planes of a
volume: axial ``(1, k, k)``, coronal ``(k, 1, k)`` and sagittal ``(k, k, 1)``.
Its output has the shape of a 3D convolution with a cubic kernel of size ``k``
and equals one exactly when the 2D kernel is placed at index ``k // 2`` of the
missing axis (see :func:`acsjax.acs_to_3d`).

The soft ACS convolution (ACSConv's ``SoftACSConv``, GaNDLF's default ACS
converter) applies the whole 2D kernel on all three planes and mixes the three
outputs per output channel with ``softmax(view_logits)``; see
:func:`soft_acs_conv`.

Lowerings. Every convolution takes ``impl``: ``'xla'`` is the plain
``lax.conv_general_dilated`` (the reference); ``'gemm'`` uses the matrix-product
lowerings of :mod:`acsjax.lowering` where they apply (groups 1 or depthwise,
any stride) and the reference elsewhere (other feature groups); ``'auto'``
(the default) picks ``'gemm'`` for 3D and ACS convolutions on CPU, where XLA's
convolutions are slow, and ``'xla'`` on GPU/TPU, where cuDNN and XLA's own
emitters are fast, and for 2D convolutions. The default comes from
:func:`set_conv_impl` (or, for a block of code, :func:`use_conv_impl`) or the
``ACSJAX_CONV_IMPL`` environment variable; it is read when a function is
traced, so set it before ``jax.jit`` compiles.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from acsjax import lowering

Padding = Union[int, str, Sequence[Union[int, tuple[int, int]]]]
CONV_IMPLS = ("auto", "xla", "gemm")


def _check_impl(impl: str) -> str:
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    return impl


_conv_impl = _check_impl(os.environ.get("ACSJAX_CONV_IMPL", "auto"))


def set_conv_impl(impl: str) -> str:
    """Sets the default lowering ('auto', 'xla' or 'gemm'); returns the previous one.

    Read at trace time: already compiled ``jax.jit`` functions keep the
    lowering they were traced with. ``ACSJAX_CONV_IMPL`` sets the initial value.
    """
    global _conv_impl
    previous, _conv_impl = _conv_impl, _check_impl(impl)
    return previous


@contextlib.contextmanager
def use_conv_impl(impl: str) -> Iterator[None]:
    """Makes ``impl`` the default lowering inside a ``with`` block, then restores the previous one."""
    previous = set_conv_impl(impl)
    try:
        yield
    finally:
        set_conv_impl(previous)


def get_conv_impl() -> str:
    """The default lowering, used where a call passes ``impl=None``."""
    return _conv_impl


def resolve_impl(impl: str | None, spatial_rank: int) -> str:
    """'xla' or 'gemm': what ``impl`` (None: the default) means for this rank on this backend."""
    impl = _check_impl(_conv_impl if impl is None else impl)
    if impl != "auto":
        return impl
    # XLA's 2D convolutions are competitive on CPU, its 3D ones are not;
    # on GPU/TPU the native convolution (cuDNN) is the fast path.
    return "gemm" if spatial_rank == 3 and jax.default_backend() == "cpu" else "xla"


PADDING_MODES = ("zeros", "edge", "reflect")

# Spatial dimension numbers per rank, Flax layout.
_DIMENSION_NUMBERS = {
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def acs_kernel_split(out_channels: int) -> tuple[int, int, int]:
    """ACSConv's split of output channels into (axial, coronal, sagittal)."""
    if out_channels < 1:
        raise ValueError(f"acs_kernel_split: out_channels must be >= 1, got {out_channels}")
    n, r = divmod(out_channels, 3)
    if r == 0:
        return (n, n, n)
    if r == 1:
        return (n + 1, n, n)
    return (n + 1, n + 1, n)


def _as_tuple(value, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} must be an int or {n} ints, got {value}")
    return value


def resolve_padding(
    padding: Padding,
    in_spatial: Sequence[int],
    kernel_spatial: Sequence[int],
    strides: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """Explicit ``(low, high)`` padding per spatial axis for any padding spec."""
    n = len(kernel_spatial)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0),) * n
        if mode != "SAME":
            raise ValueError(f"padding must be an int, pairs, 'SAME' or 'VALID', got {padding!r}")
        pads = []
        for size, k, s in zip(in_spatial, kernel_spatial, strides):
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    if isinstance(padding, int):
        return ((padding, padding),) * n
    padding = tuple(padding)
    if len(padding) != n:
        raise ValueError(f"padding needs one entry per spatial axis ({n}), got {padding}")
    return tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)


def conv_output_shape(
    in_spatial: Sequence[int],
    kernel_spatial: Sequence[int],
    strides: int | Sequence[int] = 1,
    padding: Padding = 0,
) -> tuple[int, ...]:
    """Spatial output shape of a convolution (PyTorch's formula with explicit pads)."""
    strides = _as_tuple(strides, len(kernel_spatial), "strides")
    pads = resolve_padding(padding, in_spatial, kernel_spatial, strides)
    return tuple(
        (size + lo + hi - k) // s + 1
        for size, k, s, (lo, hi) in zip(in_spatial, kernel_spatial, strides, pads)
    )


def _pad_input(x: jax.Array, pads, mode: str) -> jax.Array:
    """Pads the spatial axes of a channels-last array with a non-zero mode."""
    widths = [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)]
    return jnp.pad(x, widths, mode={"edge": "edge", "reflect": "reflect"}[mode])


def _check_padding_mode(padding_mode: str) -> None:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")


def conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = 0,
    padding_mode: str = "zeros",
    groups: int = 1,
    precision=None,
    impl: str | None = None,
) -> jax.Array:
    """2D or 3D convolution chosen by the kernel's rank (HWIO or DHWIO).

    Args:
      x: ``(N, H, W, C)`` for a 4-D kernel, ``(N, D, H, W, C)`` for a 5-D one.
      kernel: ``(kh, kw, cin // groups, cout)`` or ``(kd, kh, kw, cin // groups, cout)``.
      strides: one int or one per spatial axis.
      padding: int (PyTorch's symmetric zeros), per-axis ints or pairs, 'SAME', 'VALID'.
      padding_mode: 'zeros', or 'edge' / 'reflect' to pad with the border values.
      groups: feature groups (``groups == cin`` for a depthwise convolution).
      precision: passed to the convolution or matrix products.
      impl: 'auto', 'xla' or 'gemm' (see the module docstring); None uses the default.
    """
    nd = kernel.ndim - 2
    if nd not in _DIMENSION_NUMBERS:
        raise ValueError(f"conv: kernel must be 4-D (HWIO) or 5-D (DHWIO), got shape {kernel.shape}")
    if x.ndim != nd + 2:
        raise ValueError(
            f"conv: a {kernel.ndim}-D kernel {kernel.shape} needs a {nd + 2}-D input, got shape {x.shape}"
        )
    if x.shape[-1] != kernel.shape[-2] * groups:
        raise ValueError(
            f"conv: input has {x.shape[-1]} channels but kernel {kernel.shape} with groups={groups} "
            f"expects {kernel.shape[-2] * groups}"
        )
    _check_padding_mode(padding_mode)
    strides = _as_tuple(strides, nd, "strides")
    pads = resolve_padding(padding, x.shape[1:-1], kernel.shape[:nd], strides)
    if padding_mode != "zeros":
        x = _pad_input(x, pads, padding_mode)
        pads = ((0, 0),) * nd
    if resolve_impl(impl, nd) == "gemm":
        y = lowering.conv(x, kernel, strides, pads, groups, precision)
        if y is not None:
            return y
    return lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=strides,
        padding=pads,
        dimension_numbers=_DIMENSION_NUMBERS[nd],
        feature_group_count=groups,
        precision=precision,
    )


# The three ACS groups: which spatial axis (0=D, 1=H, 2=W) the 2D kernel lacks,
# and where the 2D kernel's (kh, kw) axes land in the 3D kernel.
ACS_GROUPS = (("axial", 0), ("coronal", 1), ("sagittal", 2))


def plane_kernel_3d(kernel2d: jax.Array, missing_axis: int, depth: int, index: int) -> jax.Array:
    """Places a 2D kernel (kh, kw, I, O) into a 3D kernel with ``depth`` taps on ``missing_axis``.

    Only the tap at ``index`` is non-zero. The 2D kernel's two spatial axes fill
    the other two spatial axes in order (so 'coronal' maps (kh, kw) to (D, W)).
    """
    expanded = jnp.expand_dims(kernel2d, missing_axis)
    widths = [(0, 0)] * expanded.ndim
    widths[missing_axis] = (index, depth - 1 - index)
    return jnp.pad(expanded, widths)


def acs_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = 0,
    padding_mode: str = "zeros",
    groups: int = 1,
    precision=None,
    impl: str | None = None,
) -> jax.Array:
    """ACS convolution of a volume ``(N, D, H, W, C)`` with a 2D kernel ``(k, k, cin // groups, cout)``.

    Output channels ``[0:a]`` convolve the axial plane with a ``(1, k, k)``
    kernel, ``[a:a+c]`` the coronal plane ``(k, 1, k)`` and the rest the
    sagittal plane ``(k, k, 1)``, with ``(a, c, s) = acs_kernel_split(cout)``.
    The output shape equals a 3D convolution with a ``(k, k, k)`` kernel and
    the same strides and padding. ``groups`` may be 1 or, for a depthwise
    convolution, equal to the number of input and output channels.
    ``impl`` selects the lowering as for :func:`conv`.
    """
    if kernel.ndim != 4:
        raise ValueError(f"acs_conv: kernel must be a 2-D HWIO kernel, got shape {kernel.shape}")
    if x.ndim != 5:
        raise ValueError(f"acs_conv: input must be NDHWC, got shape {x.shape}")
    kh, kw, cin_g, cout = kernel.shape
    if kh != kw:
        raise ValueError(f"acs_conv: ACS needs a square kernel, got {kernel.shape}")
    depthwise = groups > 1
    if depthwise and not (groups == x.shape[-1] == cout and cin_g == 1):
        raise ValueError(
            f"acs_conv: groups must be 1 or depthwise (groups == in == out channels), got groups={groups}, "
            f"input channels {x.shape[-1]}, kernel {kernel.shape}"
        )
    if not depthwise and x.shape[-1] != cin_g:
        raise ValueError(f"acs_conv: input has {x.shape[-1]} channels, kernel {kernel.shape} expects {cin_g}")
    _check_padding_mode(padding_mode)
    k = kh
    strides = _as_tuple(strides, 3, "strides")
    pads = resolve_padding(padding, x.shape[1:4], (k, k, k), strides)
    if padding_mode != "zeros":
        x = _pad_input(x, pads, padding_mode)
        pads = ((0, 0),) * 3
    if resolve_impl(impl, 3) == "gemm":
        y = lowering.acs(x, kernel, strides, pads, acs_kernel_split(cout), groups, precision)
        if y is not None:
            return y
    outputs = []
    start = 0
    for (_, missing), size in zip(ACS_GROUPS, acs_kernel_split(cout)):
        if size == 0:
            continue
        group_kernel = jnp.expand_dims(kernel[..., start : start + size], missing)
        group_pads = list(pads)
        # The single tap sits at index k // 2 of the cubic kernel's missing axis:
        # shrink that axis' padding so the window lands where the cubic one would.
        lo, hi = pads[missing]
        group_pads[missing] = (lo - k // 2, hi - (k - 1 - k // 2))
        group_x = x[..., start : start + size] if depthwise else x
        outputs.append(
            lax.conv_general_dilated(
                group_x,
                group_kernel.astype(x.dtype),
                window_strides=strides,
                padding=group_pads,
                dimension_numbers=_DIMENSION_NUMBERS[3],
                feature_group_count=size if depthwise else 1,
                precision=precision,
            )
        )
        start += size
    return jnp.concatenate(outputs, axis=-1)


def soft_acs_kernel_3d(kernel: jax.Array, view_logits: jax.Array) -> jax.Array:
    """The cubic DHWIO kernel a soft ACS convolution computes.

    ``W3 = sum_v softmax(view_logits)[:, v] * plane_kernel_3d(kernel, missing_v, k, k // 2)``
    over the views v = axial, coronal, sagittal (:data:`ACS_GROUPS`): output
    channel o mixes the three placements of its 2D kernel with the weights
    ``softmax(view_logits[o])``. ``kernel`` is ``(k, k, cin, cout)`` and
    ``view_logits`` ``(cout, 3)``; the softmax runs in float32.
    """
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"soft_acs: kernel must be a square 2-D HWIO kernel, got shape {kernel.shape}")
    cout = kernel.shape[-1]
    if tuple(view_logits.shape) != (cout, 3):
        raise ValueError(
            f"soft_acs: view_logits has shape {tuple(view_logits.shape)}, the kernel {kernel.shape} needs ({cout}, 3)"
        )
    k = kernel.shape[0]
    weights = jax.nn.softmax(view_logits.astype(jnp.float32), axis=-1)
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    return sum(
        plane_kernel_3d(kernel.astype(dtype), missing, k, k // 2) * weights[:, v]
        for v, (_, missing) in enumerate(ACS_GROUPS)
    )


def soft_acs_conv(
    x: jax.Array,
    kernel: jax.Array,
    view_logits: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = 0,
    padding_mode: str = "zeros",
    groups: int = 1,
    precision=None,
    impl: str | None = None,
) -> jax.Array:
    """Soft ACS convolution of a volume ``(N, D, H, W, C)`` with a 2D kernel ``(k, k, cin // groups, cout)``.

    Every output channel is computed on all three planes with the whole 2D
    kernel, axial ``(1, k, k)``, coronal ``(k, 1, k)`` and sagittal
    ``(k, k, 1)`` (the single tap at index ``k // 2`` of the missing axis, as in
    :func:`acs_conv`), and the three results are mixed with
    ``softmax(view_logits, -1)``, ``view_logits`` of shape ``(cout, 3)`` in that
    view order. This is ACSConv's ``SoftACSConv`` (its ``soft_w_core`` are the
    logits). The output shape equals a 3D convolution with a ``(k, k, k)``
    kernel and the same strides and padding.

    Being linear in the kernel, it is computed exactly as one 3D convolution
    with the cubic kernel :func:`soft_acs_kernel_3d` (one 3D convolution's
    cost, through :func:`conv` and its ``impl`` choice); gradients reach both
    ``kernel`` and ``view_logits``. ``groups`` works as for :func:`conv`
    (1 and depthwise included).
    """
    if x.ndim != 5:
        raise ValueError(f"soft_acs_conv: input must be NDHWC, got shape {x.shape}")
    cubic = soft_acs_kernel_3d(kernel, view_logits).astype(kernel.dtype)
    return conv(
        x, cubic, strides=strides, padding=padding, padding_mode=padding_mode, groups=groups,
        precision=precision, impl=impl,
    )
