"""Fast CPU lowerings of 3D, ACS and depthwise convolutions.

XLA's CPU convolutions run far below the machine's matrix-multiply speed, and
their kernel gradients (and depthwise 3D convolutions) are slower still. Here
a stride-1 convolution is computed from matrix products in one of three forms,
picked per convolution (:func:`_choose_form`) as the one whose intermediate
buffers per position are narrowest:

* 'scatter' (input-stationary): a ``lax.scan`` walks over the depth slices of
  the input. Each slice (zero-padded in plane) is multiplied by a
  ``(Cin, taps * Cout)`` weight matrix, giving every output channel's
  response to every tap; the tap blocks are then shifted in plane and summed.
  A slice's depth tap ``a`` belongs to output slice ``p - a``, so the
  ``kd - 1`` output slices still open travel in the scan carry. Best where
  the output channels are split among parts (an ACS forward): one GEMM serves all.
* 'gather' (im2col, output-stationary): a scan over output depth slices; the
  input windows of every tap are concatenated along channels and one GEMM per
  output channel slice maps them to the output. Best for few input channels.
* 'hybrid' (output-stationary): as 'gather' over depth and row taps, while the
  GEMM's columns hold the column taps' responses, shifted and summed. It keeps
  both buffers narrow for a full 3D convolution and for ACS input gradients.

The output-stationary forms work on chunks of output rows (``ROW_BYTES``), so
their buffers stay in cache.

* Input gradient (``jax.custom_vjp``): the forward of the transposed
  convolution (flipped taps, transposed weights), in its own best form.
* Kernel gradient: a scan over output slices of (the ``kd`` input slices that
  the depth taps read, gathered along channels)^T @ (the output gradient
  shifted by every plane tap), summed over chunks of rows (``WGRAD_BYTES``).

A convolution is a list of :class:`TapPart` s, dense blocks of taps between a
slice of input channels and a slice of output channels. A full 3D convolution
is one part; an ACS convolution is three (axial: the centre depth tap with all
plane taps; coronal and sagittal: all depth taps with a row or a column of
plane taps), so it keeps one third of the 3D convolution's FLOPs. Small
problems skip the scan and run over the whole padded volume.

Depthwise convolutions (:func:`depthwise`) are sums of shifted inputs times
per-channel weights, which XLA fuses into single loops.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Pads = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

# Above this many bytes of float32 GEMM output for the whole volume, walk over
# depth slices so that each slice's product stays in cache for the shift-and-add.
# Below it, one product over the padded volume avoids the scan's per-step cost.
CHUNK_BYTES = 6 * 2**20
# Row chunks of the output-stationary forms keep their gathered input and GEMM
# output (float32, per depth step) near this many bytes, so that they stay in cache.
ROW_BYTES = 4 * 2**20
# The same for the operands of the kernel gradient's products.
WGRAD_BYTES = 4 * 2**20
# Forces one form ('scatter', 'gather' or 'hybrid'; tests, benchmarks); None chooses.
FORM: str | None = None
# Depth slices per iteration of the scans over depth. XLA:CPU runs a while loop's
# body as many small kernels with a fixed cost per iteration; two slices per
# iteration took the demo-width U-Net's train step to 0.87x its time on 2 cores
# (`python -m train.bench step --scan_unroll 1,2`; README, *Speed on this CPU*)
# for about 9 s more compilation in the demo. Values do not change.
SCAN_UNROLL = 2


class TapPart(NamedTuple):
    """A dense block of taps between an input and an output channel slice.

    The part's weight has shape ``(len(depth_taps), len(plane_taps), cin, cout)``
    where ``cin = in_slice[1] - in_slice[0]``. Output channel slices of the
    parts of one convolution are either identical (their results add) or
    disjoint (their results are concatenated).
    """

    in_slice: tuple[int, int]
    out_slice: tuple[int, int]
    depth_taps: tuple[int, ...]
    plane_taps: tuple[tuple[int, int], ...]


class ConvSpec(NamedTuple):
    """Static description of a stride-1 tap convolution (hashable)."""

    parts: tuple[TapPart, ...]
    extent: tuple[int, int, int]  # (kd, kh, kw): the window every part lives in
    pads: Pads
    out_channels: int
    precision: object = None


def dense_parts(kd: int, kh: int, kw: int, cin: int, cout: int) -> tuple[TapPart, ...]:
    """The single part of a full ``(kd, kh, kw)`` convolution."""
    plane = tuple(itertools.product(range(kh), range(kw)))
    return (TapPart((0, cin), (0, cout), tuple(range(kd)), plane),)


def dense_weights(kernel: jax.Array) -> tuple[jax.Array]:
    """DHWIO kernel -> the weight of :func:`dense_parts`."""
    kd, kh, kw, cin, cout = kernel.shape
    return (kernel.reshape(kd, kh * kw, cin, cout),)


def _acs_taps(k: int):
    """(depth taps, plane taps) of the axial, coronal and sagittal groups of a size-k ACS kernel.

    Axial: the centre depth slice, all ``(b, c)`` taps. Coronal: all depth
    taps times ``(k // 2, c)``. Sagittal: all depth taps times ``(b, k // 2)``.
    In each group the 2D kernel's ``(kh, kw)`` order follows (depth, plane) order.
    """
    centre = k // 2
    return (
        ((centre,), tuple(itertools.product(range(k), range(k)))),
        (tuple(range(k)), tuple((centre, c) for c in range(k))),
        (tuple(range(k)), tuple((b, centre) for b in range(k))),
    )


def acs_parts(k: int, cin: int, split: Sequence[int]) -> tuple[TapPart, ...]:
    """Parts of an ACS convolution with a ``(k, k)`` kernel and output ``split``."""
    parts, start = [], 0
    for (depth, plane), size in zip(_acs_taps(k), split):
        if size:
            parts.append(TapPart((0, cin), (start, start + size), depth, plane))
        start += size
    return tuple(parts)


def acs_weights(kernel: jax.Array, split: Sequence[int]) -> tuple[jax.Array, ...]:
    """2D kernel ``(k, k, cin, cout)`` -> weights of :func:`acs_parts`.

    The kernel's ``(kh, kw)`` become (h, w) for axial, (d, w) for coronal and
    (d, h) for sagittal, as in :func:`acsjax.ops.acs_conv`.
    """
    k, _, cin, _ = kernel.shape
    weights, start = [], 0
    for group, size in enumerate(split):
        if size:
            block = kernel[..., start : start + size]
            shape = (1, k * k, cin, size) if group == 0 else (k, k, cin, size)
            weights.append(block.reshape(shape))
        start += size
    return tuple(weights)


def _blocks(spec: ConvSpec):
    """Groups parts by input slice; lists each group's GEMM column blocks.

    Returns ``[(in_slice, [(part_index, depth_tap_index, a, (b, c), width)])]``; a
    group's columns are its blocks in order, ``width`` output channels each.
    """
    groups: dict = {}
    for i, p in enumerate(spec.parts):
        width = p.out_slice[1] - p.out_slice[0]
        blocks = groups.setdefault(p.in_slice, [])
        for ai, a in enumerate(p.depth_taps):
            blocks += [(i, ai, a, t, width) for t in p.plane_taps]
    return list(groups.items())


def _weight_matrix(spec: ConvSpec, weights, blocks) -> jax.Array:
    """(cin, columns) matrix of one input group, columns in :func:`_blocks` order."""
    mats = []
    for i in dict.fromkeys(b[0] for b in blocks):  # parts of the group, in order
        na, nt, ci, co = weights[i].shape
        mats.append(jnp.transpose(weights[i], (2, 0, 1, 3)).reshape(ci, na * nt * co))
    return jnp.concatenate(mats, axis=1) if len(mats) > 1 else mats[0]


def _fetch(a: jax.Array, start, n: int = 1) -> jax.Array:
    """Slices ``[start, start + n)`` of axis 1, zeros where the index falls outside the array."""
    size = a.shape[1]
    if isinstance(start, int):
        lo, hi = max(start, 0), min(start + n, size)
        if hi <= lo:
            return jnp.zeros(a.shape[:1] + (n,) + a.shape[2:], a.dtype)
        config = [(0, 0, 0), (lo - start, start + n - hi, 0)] + [(0, 0, 0)] * (a.ndim - 2)
        return lax.pad(a[:, lo:hi], jnp.zeros((), a.dtype), config)
    pieces = []
    for k in range(n):
        idx = start + k
        piece = lax.dynamic_slice_in_dim(a, jnp.clip(idx, 0, size - 1), 1, axis=1)
        pieces.append(jnp.where((idx >= 0) & (idx < size), piece, jnp.zeros((), a.dtype)))
    return pieces[0] if n == 1 else jnp.concatenate(pieces, axis=1)


def _pad(a: jax.Array, pads) -> jax.Array:
    """Zero-pads (negative: crops) axes 1.. of ``a`` by ``pads`` pairs, channels untouched."""
    config = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads]
    config += [(0, 0, 0)] * (a.ndim - len(config))
    return lax.pad(a, jnp.zeros((), a.dtype), config)


def _products(spec: ConvSpec, xs: jax.Array, mats, acc_dtype) -> list[jax.Array]:
    """One GEMM per input group: (positions, cin) @ (cin, columns)."""
    return [
        jnp.dot(xs[..., lo:hi], m.astype(xs.dtype), precision=spec.precision, preferred_element_type=acc_dtype)
        for ((lo, hi), _), m in zip(_blocks(spec), mats)
    ]


def _collect(spec: ConvSpec, zs, depth_of, size) -> jax.Array:
    """Sums the shifted column blocks of the GEMM outputs ``zs`` into output channels.

    A block with depth tap ``a`` and plane tap ``(b, c)`` is read at
    ``[depth_of(a), b, c]`` with window ``size``; ``depth_of`` returns None
    for blocks that do not contribute. Slices (not pads) keep this one fused loop.
    """
    n, h, w = size
    sums: dict = {}
    for z, (_, blocks) in zip(zs, _blocks(spec)):
        col = 0
        for i, _, a, (b, c), width in blocks:
            d0 = depth_of(a)
            if d0 is not None:
                piece = z[:, d0 : d0 + n, b : b + h, c : c + w, col : col + width]
                key = spec.parts[i].out_slice
                sums[key] = piece if key not in sums else sums[key] + piece
            col += width
    return _assemble(spec, sums, zs[0].shape[:1] + (n, h, w), zs[0].dtype)


def _out_shape(spec: ConvSpec, x_shape) -> tuple[int, int, int]:
    out = tuple(n + lo + hi - k + 1 for n, (lo, hi), k in zip(x_shape[1:4], spec.pads, spec.extent))
    if min(out) < 1:
        raise ValueError(f"convolution output would be empty: input {x_shape}, extent {spec.extent}, pads {spec.pads}")
    return out


def _streams(spec: ConvSpec, x_shape) -> bool:
    """Whether to walk over depth slices (True) or compute the whole volume in one GEMM."""
    cols = sum(w for _, blocks in _blocks(spec) for *_, w in blocks)
    padded = [n + lo + hi for n, (lo, hi) in zip(x_shape[1:4], spec.pads)]
    return x_shape[0] * math.prod(padded) * cols * 4 > CHUNK_BYTES and padded[0] > 1


def _forward(spec: ConvSpec, x: jax.Array, weights: Sequence[jax.Array]) -> jax.Array:
    form = _choose_form(spec)
    if form != "scatter":
        return _forward_gather(spec, x, weights, form)
    kd = spec.extent[0]
    out_d, out_h, out_w = _out_shape(spec, x.shape)
    mats = [_weight_matrix(spec, weights, blocks) for _, blocks in _blocks(spec)]
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if not _streams(spec, x.shape):
        zs = _products(spec, _pad(x, spec.pads), mats, acc_dtype)
        return _collect(spec, zs, lambda a: a, (out_d, out_h, out_w)).astype(x.dtype)

    # Walk over padded depth positions p. Slice p's depth tap a lands in output
    # slice p - a, so output p - (kd - 1) is complete after slice p; the kd - 1
    # outputs still open travel in the scan carry.
    dl = spec.pads[0][0]
    plane = ((0, 0),) + tuple(spec.pads[1:])

    def taps(p):
        zs = _products(spec, _pad(_fetch(x, p - dl), plane), mats, acc_dtype)
        return [_collect(spec, zs, lambda a2, a=a: 0 if a2 == a else None, (1, out_h, out_w)) for a in range(kd)]

    def advance(open_, p):
        s = taps(p)
        done = s[kd - 1] if kd == 1 else open_[0] + s[kd - 1]
        return done, [open_[k + 1] + s[kd - 2 - k] for k in range(kd - 2)] + [s[0]] if kd > 1 else []

    open_ = [jnp.zeros((x.shape[0], 1, out_h, out_w, spec.out_channels), acc_dtype)] * (kd - 1)
    for p in range(kd - 1):  # the first kd - 1 positions complete no output
        open_ = advance(open_, p)[1]

    def step(state, o):
        y, open_ = state
        done, open_ = advance(open_, o + kd - 1)
        return (lax.dynamic_update_slice_in_dim(y, done.astype(y.dtype), o, axis=1), open_), None

    y0 = jnp.zeros((x.shape[0], out_d, out_h, out_w, spec.out_channels), x.dtype)
    (y, _), _ = lax.scan(step, (y0, open_), jnp.arange(out_d), unroll=SCAN_UNROLL)
    return y


def _plane_grid(p: TapPart):
    """``(rows, cols)`` when the part's plane taps are the product rows x cols in row-major order, else None."""
    rows = tuple(dict.fromkeys(b for b, _ in p.plane_taps))
    cols = tuple(dict.fromkeys(c for _, c in p.plane_taps))
    return (rows, cols) if tuple(itertools.product(rows, cols)) == p.plane_taps else None


def _out_groups(spec: ConvSpec, form: str):
    """GEMMs of the output-stationary forms, grouped by output slice.

    Returns ``[(out_slice, [(cols, [(part_index, rows_per_tap)])])]``: each
    GEMM gathers, for its parts in order, the input windows at every depth tap
    and every row tap ``rows_per_tap`` (per depth tap a list of ``(b, c)``
    taps, ``c`` None where the GEMM's columns scatter over ``cols``). With
    ``cols`` None the GEMM's columns are the output channels ('gather');
    otherwise they are ``(c, cout)`` blocks that are shifted by ``c`` and summed.
    """
    groups: dict = {}
    for i, p in enumerate(spec.parts):
        grid = _plane_grid(p) if form == "hybrid" else None
        if grid is None or len(grid[1]) == 1:
            key, taps = None, list(p.plane_taps)
        else:
            key, taps = grid[1], [(b, None) for b in grid[0]]
        gemms = groups.setdefault(p.out_slice, {})
        gemms.setdefault(key, []).append((i, taps))
    return [(out, list(gemms.items())) for out, gemms in groups.items()]


def _gather_matrix(spec: ConvSpec, weights, cols, members) -> jax.Array:
    """(K, N) weight of one output-stationary GEMM, rows in gather order (part, a, tap, cin)."""
    mats = []
    for i, taps in members:
        w = weights[i]
        na, nt, ci, co = w.shape
        if cols is None:
            mats.append(w.reshape(na * nt * ci, co))
        else:
            p = spec.parts[i]
            idx = [[p.plane_taps.index((b, c)) for c in cols] for b, _ in taps]
            g = w[:, jnp.array(idx)]  # (na, rows, cols, ci, co)
            mats.append(jnp.transpose(g, (0, 1, 3, 2, 4)).reshape(na * len(taps) * ci, len(cols) * co))
    return jnp.concatenate(mats, axis=0) if len(mats) > 1 else mats[0]


def _gather_width(spec: ConvSpec, form: str) -> tuple[int, int]:
    """(gathered input width, GEMM output width) per output position of an output-stationary form."""
    k = n = 0
    for (olo, ohi), gemms in _out_groups(spec, form):
        for cols, members in gemms:
            for i, taps in members:
                p = spec.parts[i]
                k += len(p.depth_taps) * len(taps) * (p.in_slice[1] - p.in_slice[0])
            n += (ohi - olo) * (1 if cols is None else len(cols))
    return k, n


def _choose_form(spec: ConvSpec) -> str:
    """The form whose intermediate buffers per position are smallest."""
    if FORM is not None:
        return FORM
    scatter = sum(w for _, blocks in _blocks(spec) for *_, w in blocks)
    cost = {"scatter": scatter}
    for form in ("gather", "hybrid"):
        cost[form] = sum(_gather_width(spec, form))
    return min(cost, key=cost.get)


def _gather_block(spec: ConvSpec, form, slabs, mats, acc_dtype, rows, out_w) -> jax.Array:
    """Output rows ``[r0, r1)`` of every output channel from the padded input ``slabs[a]`` (depth tap a)."""
    r0, r1 = rows
    outs, mi = {}, 0
    for (olo, ohi), gemms in _out_groups(spec, form):
        acc = None
        for cols, members in gemms:
            pieces = []
            for i, taps in members:
                p = spec.parts[i]
                lo, hi = p.in_slice
                for a in p.depth_taps:
                    s = slabs[a]
                    for b, c in taps:
                        if c is None:
                            pieces.append(s[:, :, r0 + b : r1 + b, :, lo:hi])
                        else:
                            pieces.append(s[:, :, r0 + b : r1 + b, c : c + out_w, lo:hi])
            g = jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]
            z = jnp.dot(g, mats[mi].astype(g.dtype), precision=spec.precision, preferred_element_type=acc_dtype)
            mi += 1
            if cols is None:
                terms = [z]
            else:
                co = ohi - olo
                terms = [z[:, :, :, c : c + out_w, j * co : (j + 1) * co] for j, c in enumerate(cols)]
            for t in terms:
                acc = t if acc is None else acc + t
        outs[(olo, ohi)] = acc
    return _assemble(spec, outs, acc.shape[:-1], acc_dtype)


def _assemble(spec: ConvSpec, sums: dict, lead_shape, dtype) -> jax.Array:
    """Concatenates per-output-slice sums ``{out_slice: array}`` along channels.

    Channels no part writes stay zero (in an input gradient, a stride phase
    that no tap reads); ``lead_shape`` is the shape before the channel axis.
    """
    pieces, start = [], 0
    for (lo, hi), v in sorted(sums.items()):
        if lo > start:
            pieces.append(jnp.zeros(tuple(lead_shape) + (lo - start,), dtype))
        pieces.append(v)
        start = hi
    if start < spec.out_channels:
        pieces.append(jnp.zeros(tuple(lead_shape) + (spec.out_channels - start,), dtype))
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


def _chunk_ranges(size: int, total_bytes: int, limit: int) -> list[tuple[int, int]]:
    """Static ``(r0, r1)`` ranges splitting ``size`` rows so that each chunk holds about ``limit`` bytes (<= 16 chunks)."""
    n = min(size, 16, max(1, math.ceil(total_bytes / limit)))
    step = -(-size // n)
    return [(r, min(r + step, size)) for r in range(0, size, step)]


def _row_chunks(spec: ConvSpec, form, x_shape, depth: int, out_h: int, out_w: int):
    """Row ranges of the output-stationary forms whose intermediates stay near ROW_BYTES."""
    width = sum(_gather_width(spec, form))
    return _chunk_ranges(out_h, x_shape[0] * depth * out_h * out_w * width * 4, ROW_BYTES)


def _forward_gather(spec: ConvSpec, x: jax.Array, weights, form: str) -> jax.Array:
    """Output-stationary forward ('gather' or 'hybrid'): per output depth slice, GEMMs of gathered input windows."""
    out_d, out_h, out_w = _out_shape(spec, x.shape)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    mats = [
        _gather_matrix(spec, weights, cols, members)
        for _, gemms in _out_groups(spec, form)
        for cols, members in gemms
    ]
    used = sorted({a for p in spec.parts for a in p.depth_taps})

    def block(slabs, depth):
        chunks = _row_chunks(spec, form, x.shape, depth, out_h, out_w)
        ys = [_gather_block(spec, form, slabs, mats, acc_dtype, r, out_w) for r in chunks]
        return (ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=2)).astype(x.dtype)

    if not _streams(spec, x.shape):
        xp = _pad(x, spec.pads)
        return block({a: xp[:, a : a + out_d] for a in used}, out_d)

    dl = spec.pads[0][0]
    plane = ((0, 0),) + tuple(spec.pads[1:])

    def step(y, o):
        slabs = {a: _pad(_fetch(x, o + a - dl), plane) for a in used}
        return lax.dynamic_update_slice_in_dim(y, block(slabs, 1), o, axis=1), None

    y0 = jnp.zeros((x.shape[0], out_d, out_h, out_w, spec.out_channels), x.dtype)
    y, _ = lax.scan(step, y0, jnp.arange(out_d), unroll=SCAN_UNROLL)
    return y


def _gather_groups(spec: ConvSpec):
    """Parts grouped by (input slice, depth taps): one gathered input and one GEMM per group."""
    groups: dict = {}
    for i, p in enumerate(spec.parts):
        groups.setdefault((p.in_slice, p.depth_taps), []).append(i)
    return list(groups.items())


def _weight_products(spec: ConvSpec, xs_at, dys: jax.Array, acc_dtype) -> list[jax.Array]:
    """Per (input slice, depth taps) group: (gathered input)^T @ (plane-shifted output gradient).

    ``xs_at(a)`` is the padded input window that depth tap ``a`` reads for the
    output window ``dys``. Rows of a result are (depth tap, cin), columns
    (part, plane tap, cout). The gathered input is built transposed, which
    the GEMM takes without a copy. The products run over chunks of padded
    rows (summed) so that each chunk's operands stay in cache.
    """
    kh, kw = spec.extent[1:]
    # Shifting by (b, c) with zero fill = slicing one array padded by (kh - 1, kw - 1).
    dyp = _pad(dys, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1)))
    n, h, w = dys.shape[1], dys.shape[2] + kh - 1, dys.shape[3] + kw - 1
    res = []
    for ((lo, hi), depth_taps), idx in _gather_groups(spec):
        width = len(depth_taps) * (hi - lo) + sum(
            len(spec.parts[i].plane_taps) * (spec.parts[i].out_slice[1] - spec.parts[i].out_slice[0]) for i in idx
        )
        acc = None
        for r0, r1 in _chunk_ranges(h, dys.shape[0] * n * h * w * width * 4, WGRAD_BYTES):
            gt = jnp.concatenate(
                [jnp.moveaxis(xs_at(a)[:, :, r0:r1, :, lo:hi], -1, 0) for a in depth_taps], axis=0
            )
            pieces = []
            for i in idx:
                olo, ohi = spec.parts[i].out_slice
                pieces += [
                    dyp[:, :n, kh - 1 - b + r0 : kh - 1 - b + r1, kw - 1 - c : kw - 1 - c + w, olo:ohi]
                    for b, c in spec.parts[i].plane_taps
                ]
            dz = jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]
            contract = tuple(range(dz.ndim - 1))
            m = lax.dot_general(
                gt, dz.astype(gt.dtype), ((tuple(c + 1 for c in contract), contract), ((), ())),
                precision=spec.precision, preferred_element_type=acc_dtype,
            )
            acc = m if acc is None else acc + m
        res.append(acc)
    return res


def _weight_grads(spec: ConvSpec, x: jax.Array, dy: jax.Array, dtypes) -> tuple[jax.Array, ...]:
    """Kernel gradients: (gathered input)^T @ (shifted output gradient), over output depth slices."""
    dl = spec.pads[0][0]
    out_d = dy.shape[1]
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    if not _streams(spec, x.shape):
        xp = _pad(x, spec.pads)
        mats = _weight_products(spec, lambda a: xp[:, a : a + out_d], dy, acc_dtype)
    else:
        plane = ((0, 0),) + tuple(spec.pads[1:])

        def step(accs, o):
            # Output slice o reads input slice o - dl + a through depth tap a.
            xs_at = lambda a: _pad(_fetch(x, o - dl + a), plane)  # noqa: E731
            dys = lax.dynamic_slice_in_dim(dy, o, 1, axis=1)
            new = _weight_products(spec, xs_at, dys, acc_dtype)
            return (new if accs is None else [acc + m for acc, m in zip(accs, new)]), None

        init = [jnp.zeros(m.shape, m.dtype) for m in jax.eval_shape(step, None, 0)[0]]
        mats, _ = lax.scan(step, init, jnp.arange(out_d), unroll=SCAN_UNROLL)
    return _split_weight_grads(spec, mats, dtypes)


def _split_weight_grads(spec: ConvSpec, mats, dtypes) -> tuple[jax.Array, ...]:
    """Per-group matrices -> per-part gradients of shape (depth taps, plane taps, cin, cout)."""
    grads: list = [None] * len(spec.parts)
    for mat, (((lo, hi), depth_taps), idx) in zip(mats, _gather_groups(spec)):
        col = 0
        for i in idx:
            part = spec.parts[i]
            nt, co = len(part.plane_taps), part.out_slice[1] - part.out_slice[0]
            block = mat[:, col : col + nt * co].reshape(len(depth_taps), hi - lo, nt, co)
            grads[i] = jnp.transpose(block, (0, 2, 1, 3)).astype(dtypes[i])
            col += nt * co
    return tuple(grads)


def _transposed(spec: ConvSpec, in_channels: int, weights):
    """Spec and weights of the input gradient: flipped taps, swapped channels, ``k-1-pad`` padding."""
    kd, kh, kw = spec.extent
    parts = tuple(
        TapPart(
            p.out_slice,
            p.in_slice,
            tuple(kd - 1 - a for a in p.depth_taps),
            tuple((kh - 1 - b, kw - 1 - c) for b, c in p.plane_taps),
        )
        for p in spec.parts
    )
    pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(spec.extent, spec.pads))
    tspec = ConvSpec(parts, spec.extent, pads, in_channels, spec.precision)
    return tspec, tuple(jnp.swapaxes(w, 2, 3) for w in weights)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def tap_conv(spec: ConvSpec, x: jax.Array, weights: tuple[jax.Array, ...]) -> jax.Array:
    """Stride-1 convolution of ``x`` (N, D, H, W, C) described by ``spec`` (see module docstring)."""
    return _forward(spec, x, weights)


def _tap_conv_fwd(spec, x, weights):
    return _forward(spec, x, weights), (x, weights)


def _tap_conv_bwd(spec, res, dy):
    x, weights = res
    tspec, tweights = _transposed(spec, x.shape[-1], weights)
    dx = _forward(tspec, dy.astype(x.dtype), tweights)
    dws = _weight_grads(spec, x, dy, [w.dtype for w in weights])
    return dx, dws


tap_conv.defvjp(_tap_conv_fwd, _tap_conv_bwd)


def _phase_spec(spec: ConvSpec, strides) -> tuple[ConvSpec, list]:
    """A strided convolution as a stride-1 one over the input's stride phases.

    With the input split into its ``sd * sh * sw`` phases (space-to-depth), tap
    ``a = a' * s + r`` of phase ``r`` becomes tap ``a'`` of a stride-1 window of
    size ``ceil(k / s)``. Each part splits into one part per phase, keeping only
    the taps that exist, so no FLOPs are spent on zeros. Returns the new spec
    and, per new part, ``(old part, depth tap indices, plane tap indices)``.
    """
    cin = max(p.in_slice[1] for p in spec.parts)
    parts, picks = [], []
    for r, phase in enumerate(itertools.product(*(range(s) for s in strides))):
        rd, rh, rw = phase
        for i, p in enumerate(spec.parts):
            depth = [(a // strides[0], ai) for ai, a in enumerate(p.depth_taps) if a % strides[0] == rd]
            plane = [
                ((b // strides[1], c // strides[2]), ti)
                for ti, (b, c) in enumerate(p.plane_taps)
                if b % strides[1] == rh and c % strides[2] == rw
            ]
            if depth and plane:
                in_slice = (r * cin + p.in_slice[0], r * cin + p.in_slice[1])
                parts.append(TapPart(in_slice, p.out_slice, tuple(d for d, _ in depth), tuple(t for t, _ in plane)))
                picks.append((i, [ai for _, ai in depth], [ti for _, ti in plane]))
    extent = tuple(-(-k // s) for k, s in zip(spec.extent, strides))
    return ConvSpec(tuple(parts), extent, ((0, 0),) * 3, spec.out_channels, spec.precision), picks


def _strided(spec: ConvSpec, x: jax.Array, weights, strides) -> jax.Array:
    """Runs ``spec`` with ``strides`` through :func:`_phase_spec` (autodiff handles the reshuffle)."""
    out = [(n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(x.shape[1:4], spec.pads, spec.extent, strides)]
    # Pad so that every phase has out + ceil(k / s) - 1 positions.
    size = [(o + -(-k // s) - 1) * s for o, k, s in zip(out, spec.extent, strides)]
    xp = _pad(x, [(lo, n - lo - m) for (lo, _), n, m in zip(spec.pads, size, x.shape[1:4])])
    b, c = x.shape[0], x.shape[-1]
    (d, sd), (h, sh), (w, sw) = [(n // s, s) for n, s in zip(size, strides)]
    phases = xp.reshape(b, d, sd, h, sh, w, sw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, d, h, w, -1)
    pspec, picks = _phase_spec(spec, strides)
    pweights = tuple(weights[i][jnp.array(ai)][:, jnp.array(ti)] for i, ai, ti in picks)
    return tap_conv(pspec, phases, pweights)


def _run(spec: ConvSpec, x: jax.Array, weights, strides) -> jax.Array:
    strides = tuple(strides)
    if all(s == 1 for s in strides):
        return tap_conv(spec, x, weights)
    return _strided(spec, x, weights, strides)


def conv3d(x: jax.Array, kernel: jax.Array, pads: Pads, strides=(1, 1, 1), precision=None) -> jax.Array:
    """3D convolution NDHWC x DHWIO with explicit ``(low, high)`` zero pads."""
    spec = ConvSpec(dense_parts(*kernel.shape), kernel.shape[:3], tuple(map(tuple, pads)), kernel.shape[-1], precision)
    return _run(spec, x, dense_weights(kernel.astype(x.dtype)), strides)


def acs_conv(x: jax.Array, kernel: jax.Array, pads: Pads, split: Sequence[int], strides=(1, 1, 1), precision=None):
    """ACS convolution (groups=1) with a ``(k, k, cin, cout)`` kernel; see :func:`acs_parts`."""
    k, _, cin, cout = kernel.shape
    spec = ConvSpec(acs_parts(k, cin, split), (k, k, k), tuple(map(tuple, pads)), cout, precision)
    return _run(spec, x, acs_weights(kernel.astype(x.dtype), split), strides)


def conv(x: jax.Array, kernel: jax.Array, strides, pads, groups: int = 1, precision=None) -> jax.Array | None:
    """Fast lowering of a 2D or 3D convolution, or None where none applies.

    Handles groups == 1 (:func:`tap_conv`; strided ones over stride phases),
    1x1 kernels at stride 1 without padding (one matrix product), and depthwise
    convolutions (``groups`` equal to the input and output channels). A 2D
    problem runs as a volume whose depth axis is the batch.
    """
    if kernel.ndim == 4:
        y = conv(x[None], kernel[None], (1,) + tuple(strides), ((0, 0),) + tuple(pads), groups, precision)
        return None if y is None else y[0]
    cin, cout = x.shape[-1], kernel.shape[-1]
    pads = tuple(tuple(p) for p in pads)
    if groups > 1:
        if not (groups == cin == cout and kernel.shape[3] == 1):
            return None
        spec = DepthwiseSpec((((0, cin), tuple(all_offsets(kernel.shape[:3]))),), tuple(strides), pads)
        return depthwise(spec, x, (kernel.reshape(-1, cin).astype(x.dtype),))
    if kernel.shape[:3] == (1, 1, 1) and all(p == (0, 0) for p in pads) and all(s == 1 for s in strides):
        return jnp.dot(x, kernel.reshape(cin, cout).astype(x.dtype), precision=precision)
    return conv3d(x, kernel, pads, strides, precision)


def acs(x: jax.Array, kernel: jax.Array, strides, pads, split, groups: int = 1, precision=None) -> jax.Array:
    """Fast lowering of an ACS convolution (groups 1, or depthwise), any stride."""
    k = kernel.shape[0]
    pads = tuple(tuple(p) for p in pads)
    if groups > 1:
        spec = DepthwiseSpec(acs_depthwise_groups(k, split), tuple(strides), pads)
        return depthwise(spec, x, acs_depthwise_weights(kernel.astype(x.dtype), split))
    return acs_conv(x, kernel, pads, split, strides, precision)


def acs_depthwise_groups(k: int, split: Sequence[int]):
    """Channel slices and kernel offsets of a depthwise ACS convolution (see :func:`acs_parts`)."""
    groups, start = [], 0
    for (depth, plane), size in zip(_acs_taps(k), split):
        if size:
            groups.append(((start, start + size), tuple((a, b, c) for a in depth for b, c in plane)))
        start += size
    return tuple(groups)


def acs_depthwise_weights(kernel: jax.Array, split: Sequence[int]) -> tuple[jax.Array, ...]:
    """Depthwise ACS kernel ``(k, k, 1, C)`` -> per-group ``(k * k, size)`` weights, offsets in order."""
    k = kernel.shape[0]
    flat = kernel.reshape(k * k, -1)
    weights, start = [], 0
    for size in split:
        if size:
            weights.append(flat[:, start : start + size])
        start += size
    return tuple(weights)


class DepthwiseSpec(NamedTuple):
    """Static description of a depthwise convolution of a volume (hashable).

    ``groups`` lists, per channel slice ``(lo, hi)`` in order, the kernel
    offsets ``(a, b, c)`` it uses; the matching weight is ``(len(offsets), hi - lo)``.
    """

    groups: tuple[tuple[tuple[int, int], tuple[tuple[int, int, int], ...]], ...]
    strides: tuple[int, int, int]
    pads: Pads


def _depthwise_forward(spec: DepthwiseSpec, x: jax.Array, weights) -> jax.Array:
    xp = _pad(x, spec.pads)
    out = [
        (n - 1 - max(o[i] for _, offs in spec.groups for o in offs)) // s + 1
        for i, (n, s) in enumerate(zip(xp.shape[1:4], spec.strides))
    ]
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    outs = []
    for ((lo, hi), offsets), w in zip(spec.groups, weights):
        acc = None
        for t, off in enumerate(offsets):
            term = _window(xp, off, out, spec.strides)[..., lo:hi].astype(acc_dtype) * w[t].astype(acc_dtype)
            acc = term if acc is None else acc + term
        outs.append(acc)
    return (outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)).astype(x.dtype)


def _window(xp: jax.Array, off, out, strides) -> jax.Array:
    """The strided input window that kernel offset ``off`` reads for every output position."""
    start = (0,) + tuple(off) + (0,)
    limit = (xp.shape[0],) + tuple(o + (n - 1) * s + 1 for o, n, s in zip(off, out, strides)) + (xp.shape[-1],)
    return lax.slice(xp, start, limit, (1,) + tuple(strides) + (1,))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def depthwise(spec: DepthwiseSpec, x: jax.Array, weights: tuple[jax.Array, ...]) -> jax.Array:
    """Depthwise convolution as a sum of shifted inputs times per-channel weights.

    XLA fuses the sum into one loop (XLA CPU's own depthwise 3D convolution
    is two orders of magnitude slower). The kernel gradient walks over output
    depth slices so that its per-tap reductions read cache-resident data.
    """
    return _depthwise_forward(spec, x, weights)


def _depthwise_fwd(spec, x, weights):
    return _depthwise_forward(spec, x, weights), (x, weights)


def _depthwise_bwd(spec, res, dy):
    x, weights = res
    # The input gradient of a sum of shifted slices is a sum of padded slices: XLA fuses it.
    dx = jax.vjp(lambda v: _depthwise_forward(spec, v, weights), x)[1](dy)[0]
    xp = _pad(x, spec.pads)
    sd = spec.strides[0]
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    plane_out = dy.shape[2:4]

    def step(accs, o):
        dys = lax.dynamic_slice_in_dim(dy, o, 1, axis=1).astype(acc_dtype)
        new = []
        for acc, ((lo, hi), offsets) in zip(accs, spec.groups):
            terms = []
            for a, b, c in offsets:
                xs = lax.dynamic_slice_in_dim(xp, o * sd + a, 1, axis=1)[..., lo:hi]
                xs = _window(xs, (0, b, c), (1,) + plane_out, (1,) + spec.strides[1:])
                terms.append(jnp.sum(xs.astype(acc_dtype) * dys[..., lo:hi], axis=(0, 1, 2, 3)))
            new.append(acc + jnp.stack(terms))
        return new, None

    init = [jnp.zeros(w.shape, acc_dtype) for w in weights]
    grads, _ = lax.scan(step, init, jnp.arange(dy.shape[1]), unroll=SCAN_UNROLL)
    return dx, tuple(g.astype(w.dtype) for g, w in zip(grads, weights))


depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def all_offsets(extent: Sequence[int]) -> list[tuple[int, ...]]:
    """Every tap offset of a dense window, in kernel (row-major) order."""
    return list(itertools.product(*(range(k) for k in extent)))


__all__ = [
    "CHUNK_BYTES",
    "FORM",
    "ROW_BYTES",
    "WGRAD_BYTES",
    "ConvSpec",
    "TapPart",
    "acs",
    "acs_conv",
    "acs_parts",
    "acs_weights",
    "all_offsets",
    "conv",
    "conv3d",
    "dense_parts",
    "dense_weights",
    "DepthwiseSpec",
    "depthwise",
    "tap_conv",
]
