"""2D -> 3D / ACS / 2.5D parameter transforms over pytrees.

Every transform here is a pure function of a parameter pytree: NNX ``State``,
plain nested dicts and Linen ``{'params': ...}`` variables alike, eager or
under ``jax.jit`` (pass the string options as static arguments).

A leaf is a 2D convolution kernel when its path ends in ``kernel`` and it has 4
dimensions (HWIO). Everything else (biases, norm scales and statistics, dense
kernels) passes through unchanged.

All depth-inflating methods share one rule: the 3D kernel is the 2D kernel
repeated along the new axis, tap ``t`` scaled by a weight ``w_t``. The methods
differ only in their weights (the table ``_TAP_WEIGHTS``):

=========  =====================================  ==========================
method     w_t                                    property
=========  =====================================  ==========================
center     1 at ``position``, 0 elsewhere          slice-by-slice 2D net
average    1 / T                                   I3D, boring-volume exact
scale      alpha_t > 0, sum alpha = 1              boring-volume exact
2.5d       T = 1, w = (1,)                         (1, kh, kw) kernels
acs        kernel kept 2D (ACS layers use it)      see :func:`acs_to_3d`
soft_acs   kernel kept 2D (SoftACS layers use it)  see :func:`acs_to_3d`
=========  =====================================  ==========================

A SoftACS layer also has ``view_logits`` (cout, 3), its per-channel mixing of
the three planes. A 2D model has no counterpart, so 'soft_acs' inflation does
not produce them: the model keeps its own (zero, equal-mixing) initial logits.

``like=`` (the target model's shapes) lets each kernel's target decide its
depth, so anisotropic models with (1, k, k) and (k, k, k) levels inflate
without per-path rules.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from acsjax.ops import ACS_GROUPS, acs_kernel_split, plane_kernel_3d, soft_acs_kernel_3d
from acsjax.trees import leaf_name, path_str

PLANES = {"axial": 0, "coronal": 1, "sagittal": 2}
ALPHA_PROFILES = ("triangular", "gaussian", "uniform")
_RULE_KEYS = frozenset({"method", "depth", "alphas", "position", "plane"})


def alpha_profile(name: str, depth: int) -> np.ndarray:
    """Named positive weight profiles that sum to one, centred on the middle tap.

    'triangular': w_t proportional to (T + 1) / 2 - |t - (T - 1) / 2| (T=3: 1/4, 1/2, 1/4);
    'gaussian': a Gaussian with sigma = T / 4 (T=3: 0.23, 0.55, 0.23);
    'uniform': 1 / T, the same as ``method='average'``.
    """
    t = np.arange(depth, dtype=np.float64) - (depth - 1) / 2
    if name == "triangular":
        w = (depth + 1) / 2 - np.abs(t)
    elif name == "gaussian":
        w = np.exp(-0.5 * (t / (depth / 4)) ** 2)
    elif name == "uniform":
        w = np.ones(depth)
    else:
        raise ValueError(f"unknown alpha profile {name!r}; choose one of {', '.join(ALPHA_PROFILES)}")
    return w / w.sum()


def _scale_weights(depth: int, alphas, position, path: str) -> np.ndarray:
    if alphas is None:
        alphas = "triangular"
    if isinstance(alphas, str):
        return alpha_profile(alphas, depth)
    try:
        a = np.asarray(alphas, dtype=np.float64)
    except Exception as err:  # a traced array cannot be validated
        raise TypeError(f"{path}: alphas must be concrete numbers or a profile name, got {type(alphas)}") from err
    if a.ndim != 1 or a.shape[0] != depth:
        raise ValueError(f"{path}: alphas has shape {a.shape}, the kernel's depth needs ({depth},)")
    if not np.all(a > 0):
        raise ValueError(f"{path}: alphas must all be positive, got {a.tolist()}")
    if not math.isclose(a.sum(), 1.0, rel_tol=0, abs_tol=1e-6):
        raise ValueError(f"{path}: alphas must sum to 1, got sum {a.sum():.6g}")
    return a


def _center_weights(depth: int, alphas, position, path: str) -> np.ndarray:
    if position == "center":
        index = depth // 2
    elif position == "first":
        index = 0
    elif isinstance(position, (int, np.integer)) and -depth <= position < depth:
        index = int(position) % depth
    else:
        raise ValueError(f"{path}: position must be 'center', 'first' or an index in [0, {depth}), got {position!r}")
    w = np.zeros(depth)
    w[index] = 1.0
    return w


_TAP_WEIGHTS: dict[str, Callable[[int, Any, Any, str], np.ndarray]] = {
    "center": _center_weights,
    "average": lambda depth, alphas, position, path: np.full(depth, 1.0 / depth),
    "scale": _scale_weights,
    "2.5d": lambda depth, alphas, position, path: np.ones(1),
}
_ALIASES = {"zero": "center", "i3d": "average"}
# Methods that keep kernels 2D: ACS-type models apply them on the three planes.
_KEEP_2D = ("acs", "soft_acs")
METHODS = ("center", "zero", "average", "scale", "2.5d", *_KEEP_2D)


def _canonical_method(method: str) -> str:
    name = _ALIASES.get(method, method)
    if name not in _TAP_WEIGHTS and name not in _KEEP_2D:
        raise ValueError(f"unknown inflation method {method!r}; choose one of {', '.join(METHODS)}")
    return name


def _check_2d_kernel(kernel, path: str) -> None:
    if jnp.ndim(kernel) != 4:
        raise ValueError(f"{path}: expected a 2-D convolution kernel (kh, kw, in, out), got shape {jnp.shape(kernel)}")


def inflate_kernel(
    kernel: jax.Array,
    method: str = "scale",
    *,
    depth: int | None = None,
    alphas: Sequence[float] | str | None = None,
    position: str | int = "center",
    plane: str = "axial",
    path: str = "kernel",
) -> jax.Array:
    """Inflates one HWIO kernel to DHWIO (or keeps it 2D for 'acs' and 'soft_acs').

    ``depth`` defaults to the kernel's own height, so 3x3 becomes 3x3x3 and 1x1
    stays 1x1x1. ``plane`` names where the 2D kernel lies: 'axial' puts its
    (kh, kw) on (H, W) and inflates along D; 'coronal' on (D, W), inflating H;
    'sagittal' on (D, H), inflating W.
    """
    _check_2d_kernel(kernel, path)
    method = _canonical_method(method)
    if method in _KEEP_2D:
        return kernel
    if plane not in PLANES:
        raise ValueError(f"{path}: unknown plane {plane!r}; choose one of {', '.join(PLANES)}")
    if method == "2.5d":
        depth = 1
    elif depth is None:
        depth = kernel.shape[0]
    if not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"{path}: depth must be a positive int, got {depth!r}")
    weights = _TAP_WEIGHTS[method](int(depth), alphas, position, path)
    axis = PLANES[plane]
    shape = [1] * 5
    shape[axis] = int(depth)
    taps = jnp.asarray(weights, dtype=kernel.dtype).reshape(shape)
    return jnp.expand_dims(kernel, axis) * taps


def _is_conv_kernel(path, leaf, ndim: int = 4) -> bool:
    return leaf_name(path) == "kernel" and jnp.ndim(leaf) == ndim


def _compile_rules(rules: Mapping[str, Mapping[str, Any]] | None):
    compiled = []
    for pattern, options in (rules or {}).items():
        unknown = set(options) - _RULE_KEYS
        if unknown:
            raise ValueError(f"rules[{pattern!r}]: unknown options {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
        compiled.append((pattern, re.compile(pattern), dict(options)))
    return compiled


def _target_shapes(like: Any) -> dict[str, tuple[int, ...]]:
    """{path: shape} of a target tree: an NNX state (abstract or not), nested or flat dicts of shaped leaves."""
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, (int, np.integer)) for i in x)  # noqa: E731
    leaves, _ = jax.tree_util.tree_flatten_with_path(like, is_leaf=lambda x: is_shape(x) or hasattr(x, "shape"))
    shapes = {}
    for path, leaf in leaves:
        name = path_str(path)
        if name.endswith("/value"):  # restored {'value': x} leaves
            name = name[: -len("/value")]
        shapes[name] = tuple(int(i) for i in (leaf if is_shape(leaf) else leaf.shape))
    return shapes


def _fit_to_target(options: dict, kernel, name: str, target) -> dict | None:
    """The options that inflate ``kernel`` into the ``target`` shape, or None to keep it 2D."""
    shape = tuple(jnp.shape(kernel))
    if target is None:
        raise ValueError(f"{name}: 2-D kernel {shape} has no counterpart in `like` (the target tree)")
    if len(target) == 4:
        if target != shape:
            raise ValueError(f"{name}: 2-D kernel {shape} does not fit the target's 2-D kernel {target}")
        return None
    plane = options["plane"]
    axis = PLANES.get(plane)
    if len(target) != 5 or axis is None or target[:axis] + target[axis + 1 :] != shape:
        raise ValueError(f"{name}: 2-D kernel {shape} does not fit the target kernel {target} (plane {plane!r})")
    depth, method = target[axis], _canonical_method(options["method"])
    if options["depth"] is not None and options["depth"] != depth:
        raise ValueError(f"{name}: depth={options['depth']} but the target kernel {target} has depth {depth}")
    if depth > 1 and method in ("2.5d", *_KEEP_2D):
        raise ValueError(
            f"{name}: method {method!r} cannot fill the target kernel {target} of depth {depth}; "
            "use 'center', 'average' or 'scale' for it (e.g. with rules)"
        )
    # Depth 1 is the (1, kh, kw) slice-by-slice form, the same for every method.
    return {**options, "method": "2.5d" if depth == 1 else method, "depth": None if depth == 1 else depth}


def inflate_params(
    params: Any,
    method: str = "scale",
    *,
    depth: int | None = None,
    alphas: Sequence[float] | str | None = None,
    position: str | int = "center",
    plane: str = "axial",
    rules: Mapping[str, Mapping[str, Any]] | None = None,
    like: Any = None,
) -> Any:
    """Maps a 2D parameter pytree to its 3D (or ACS / 2.5D) counterpart.

    Args:
      params: any pytree of arrays: ``nnx.state(model)``, a nested dict, or
        Linen variables ``{'params': ...}``. Its structure is preserved.
      method: 'center' (alias 'zero'), 'average', 'scale', '2.5d', 'acs' or
        'soft_acs' (both keep kernels 2D; a SoftACS model supplies its own
        ``view_logits``, which stay at their initialisation under ``nnx.update``).
      depth: taps along the new axis; default the kernel's own height.
      alphas: for 'scale', a vector of positive weights summing to 1, or a
        profile name from ``ALPHA_PROFILES`` (default 'triangular').
      position: for 'center', the non-zero tap: 'center', 'first' or an index.
      plane: 'axial', 'coronal' or 'sagittal' (where the 2D kernel lies).
      rules: ``{regex: {option: value}}`` overriding the options above for
        kernels whose path (e.g. 'encoder/conv1/kernel') matches; the first
        matching rule wins and every rule must match at least one kernel.
      like: the target model's shapes (``nnx.state(model3d)``, the state of an
        ``nnx.eval_shape`` model, a nested dict of ``jax.ShapeDtypeStruct``, or
        a flat ``{'a/b/kernel': shaped}`` dict). Each 2D kernel then takes the
        depth of its target: a 5-D target of depth kd is filled by ``method``
        (kd == 1 gives the (1, kh, kw) slice-by-slice form), a 4-D target keeps
        the kernel 2D (ACS). Mixed (1, 3, 3) / (3, 3, 3) models need no rules.
        A kernel that is missing from ``like`` or whose plane, input or output
        size differs raises a ValueError naming the path and both shapes.
        Only shapes are read, so the function stays jit-able.

    Returns:
      A pytree of the same structure with every 2D convolution kernel inflated.

    Example::

      model3d = UNet(dims=3, ...)
      nnx.update(model3d, inflate_params(nnx.state(model2d), 'scale', like=nnx.state(model3d)))
    """
    _canonical_method(method)
    defaults = dict(method=method, depth=depth, alphas=alphas, position=position, plane=plane)
    compiled = _compile_rules(rules)
    targets = None if like is None else _target_shapes(like)
    matched: set[str] = set()

    def visit(path, leaf):
        if leaf_name(path) != "kernel" or jnp.ndim(leaf) < 4:
            return leaf
        name = path_str(path)
        options = defaults
        for pattern, regex, overrides in compiled:
            if regex.search(name):
                matched.add(pattern)
                options = {**defaults, **overrides}
                break
        if jnp.ndim(leaf) != 4:
            raise ValueError(
                f"{name}: expected a 2-D convolution kernel (kh, kw, in, out), got shape {jnp.shape(leaf)}; "
                "is this tree already 3-D?"
            )
        if targets is not None:
            options = _fit_to_target(options, leaf, name, targets.get(name))
            if options is None:
                return leaf
        return inflate_kernel(leaf, path=name, **options)

    out = jax.tree_util.tree_map_with_path(visit, params)
    unmatched = [p for p, _, _ in compiled if p not in matched]
    if unmatched:
        raise ValueError(f"rules {unmatched} matched no convolution kernel in the parameter tree")
    return out


def acs_kernel_to_3d(kernel: jax.Array, path: str = "kernel") -> jax.Array:
    """The exact cubic DHWIO kernel that an ACS convolution with ``kernel`` computes."""
    _check_2d_kernel(kernel, path)
    k = kernel.shape[0]
    if kernel.shape[1] != k:
        raise ValueError(f"{path}: ACS needs a square kernel, got shape {kernel.shape}")
    groups, start = [], 0
    for (_, missing), size in zip(ACS_GROUPS, acs_kernel_split(kernel.shape[-1])):
        groups.append(plane_kernel_3d(kernel[..., start : start + size], missing, k, k // 2))
        start += size
    return jnp.concatenate(groups, axis=-1)


VIEW_LOGITS = "view_logits"


def acs_to_3d(params: Any, *, like: Any = None) -> Any:
    """Materialises an ACS or SoftACS parameter tree as the equivalent full 3D tree.

    ACS: each 2D kernel becomes a cubic kernel that is zero off its output
    group's plane. SoftACS (a ``kernel`` leaf with a sibling ``view_logits``
    leaf): the kernel becomes the exact cubic kernel of
    :func:`acsjax.ops.soft_acs_kernel_3d` (each output channel's three plane
    placements mixed by ``softmax(view_logits)``) and the ``view_logits`` leaf
    is removed. Either way a ``dims=3`` model with the result computes exactly
    what the ACS / SoftACS model did and can continue training with full 3D
    kernels. Works on NNX ``State``, nested dicts and Linen variables.

    An anisotropic ACS model applies the 2D kernels of its ``kd == 1`` levels
    axially only; a tree does not say which levels those are, so pass
    ``like`` (the 3D model's state or shapes, as for :func:`inflate_params`):
    a kernel whose target has depth 1 becomes ``(1, kh, kw, cin, cout)``.
    """
    targets = None if like is None else _target_shapes(like)
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    # Parent path ('' at the top level) -> the view logits of the kernel beside them.
    logits = {path_str(p).rpartition("/")[0]: leaf for p, leaf in leaves if leaf_name(p) == VIEW_LOGITS}
    used: set[str] = set()

    def visit(path, leaf):
        if not _is_conv_kernel(path, leaf):
            return leaf
        name = path_str(path)
        parent = name.rpartition("/")[0]
        target = None if targets is None else targets.get(name)
        if target is not None and len(target) == 5 and target[0] == 1 and parent not in logits:
            return jnp.expand_dims(leaf, 0)  # an axial-only level: its (1, kh, kw) kernel
        if parent in logits:
            used.add(parent)
            try:
                return soft_acs_kernel_3d(leaf, logits[parent])
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        return acs_kernel_to_3d(leaf, name)

    out = jax.tree_util.tree_map_with_path(visit, params)
    orphans = sorted(set(logits) - used)
    if orphans:
        first = f"{orphans[0]}/{VIEW_LOGITS}" if orphans[0] else VIEW_LOGITS
        raise ValueError(f"{first}: view_logits without a sibling 2-D kernel; is this tree already 3-D?")
    return _drop_entries(out, VIEW_LOGITS) if logits else out


def _drop_entries(tree: Any, name: str) -> Any:
    """``tree`` without the entries called ``name`` in its mappings (NNX State, dicts, FrozenDicts)."""
    if isinstance(tree, Mapping):
        return type(tree)({k: _drop_entries(v, name) for k, v in tree.items() if str(k) != name})
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):  # not a NamedTuple
        return type(tree)(_drop_entries(v, name) for v in tree)
    return tree


def project_params(params: Any, plane: str = "axial") -> Any:
    """3D -> 2D: sums every DHWIO kernel over the axis orthogonal to ``plane``.

    This inverts 'center', 'average', 'scale' and '2.5d' inflation exactly
    (their tap weights sum to one), and for any 3D kernel gives the 2D kernel
    whose response to an image equals the 3D kernel's response to a volume
    made of that image repeated (away from the borders).
    """
    if plane not in PLANES:
        raise ValueError(f"unknown plane {plane!r}; choose one of {', '.join(PLANES)}")
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.sum(leaf, axis=PLANES[plane]) if _is_conv_kernel(path, leaf, 5) else leaf,
        params,
    )


ADAPT_MODES = ("sum", "mean", "repeat")


def adapt_input_channels(kernel: jax.Array, n: int, mode: str = "sum") -> jax.Array:
    """Adapts a first-layer kernel (..., c_in, out), e.g. RGB, to ``n`` input channels.

    - 'sum': every new channel gets sum_c W_c / n, so ``n`` identical channels
      (e.g. a grey image) give exactly the response of the grey image
      replicated to the original ``c_in`` channels.
    - 'mean': every new channel gets mean_c W_c.
    - 'repeat': channels cycle through the originals, scaled by c_in / n so
      activations keep their magnitude (timm's rule for n != 1).
    """
    if jnp.ndim(kernel) not in (4, 5):
        raise ValueError(f"adapt_input_channels: kernel must be HWIO or DHWIO, got shape {jnp.shape(kernel)}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"adapt_input_channels: n must be a positive int, got {n!r}")
    c_in = kernel.shape[-2]
    if mode == "sum":
        return jnp.repeat(jnp.sum(kernel, axis=-2, keepdims=True) / n, n, axis=-2)
    if mode == "mean":
        return jnp.repeat(jnp.mean(kernel, axis=-2, keepdims=True), n, axis=-2)
    if mode == "repeat":
        index = np.arange(n) % c_in
        return jnp.take(kernel, index, axis=-2) * (c_in / n)
    raise ValueError(f"adapt_input_channels: unknown mode {mode!r}; choose one of {', '.join(ADAPT_MODES)}")
