"""Parameter-path helpers shared by the transforms and the importers.

A path is shown as ``'encoder/conv1/kernel'``: the pytree keys joined by '/',
without the ``value`` attribute that NNX variables add.
"""

from __future__ import annotations

from typing import Any

import jax


def key_name(key) -> str | None:
    """The name of one pytree key, or None for NNX's trailing ``.value``."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return None if key.name == "value" else key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(path) -> str:
    """'a/b/kernel' for a key path from ``jax.tree_util.tree_flatten_with_path``."""
    return "/".join(n for n in (key_name(k) for k in path) if n is not None)


def leaf_name(path) -> str:
    """The last meaningful key of a path ('kernel', 'bias', 'scale', ...)."""
    names = [n for n in (key_name(k) for k in path) if n is not None]
    return names[-1] if names else ""


def flatten(tree: Any) -> dict[str, Any]:
    """{path string: leaf} for every leaf of a pytree."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): leaf for p, leaf in leaves}


def assert_fits(params: Any, target: Any, *, what: str = "parameter tree") -> None:
    """Raises ValueError naming the first path whose presence or shape differs.

    ``target`` may hold arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``
    or ``nnx.state`` of an abstract model).
    """
    got, want = flatten(params), flatten(target)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (first: {', '.join(missing[:3])})")
        if extra:
            parts.append(f"unexpected {len(extra)} (first: {', '.join(extra[:3])})")
        raise ValueError(f"{what} does not fit the target model: " + "; ".join(parts))
    for name, leaf in got.items():
        got_shape, want_shape = tuple(jax.numpy.shape(leaf)), tuple(jax.numpy.shape(want[name]))
        if got_shape != want_shape:
            raise ValueError(
                f"{what} does not fit the target model at '{name}': shape {got_shape}, model expects {want_shape}"
            )
