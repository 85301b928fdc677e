"""Models that build for dims 2, 3, 'acs', 'soft_acs' and '2.5d' from one definition.

A 2D model's ``nnx.state`` inflates into the 3D / ACS / 2.5D model of the same
name and options::

  model2d = build_model('resnet18_unet', dims=2, in_channels=1, num_classes=3, rngs=nnx.Rngs(0))
  model3d = build_model('resnet18_unet', dims=3, in_channels=1, num_classes=3, rngs=nnx.Rngs(0))
  nnx.update(model3d, acsjax.inflate_params(nnx.state(model2d), 'average'))

``python -m acsjax.models`` prints the parameter counts of every model.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from flax import nnx

from acsjax.layers import DIMS
from acsjax.models.blocks import NORMS, REMAT_POLICIES, param_count
from acsjax.models.efficientnet import EfficientNetLite
from acsjax.models.resnet import ResNet
from acsjax.models.unet import EfficientNetUNet, ResNetUNet, UNet

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "unet": UNet,
    "resnet18": functools.partial(ResNet, 18),
    "resnet34": functools.partial(ResNet, 34),
    "resnet50": functools.partial(ResNet, 50),
    "efficientnet_lite0": EfficientNetLite,
    "resnet18_unet": functools.partial(ResNetUNet, 18),
    "resnet34_unet": functools.partial(ResNetUNet, 34),
    "resnet50_unet": functools.partial(ResNetUNet, 50),
    "efficientnet_lite0_unet": EfficientNetUNet,
}
SEGMENTATION = tuple(name for name in MODELS if name == "unet" or name.endswith("_unet"))
_FIXED = {"dims", "in_channels", "num_classes", "rngs", "num_layers"}


def _cls(name: str):
    builder = MODELS[name]
    return builder.func if isinstance(builder, functools.partial) else builder


def model_options(name: str) -> tuple[str, ...]:
    """The keyword options ``build_model(name, ...)`` accepts beyond the fixed ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    params = inspect.signature(_cls(name).__init__).parameters
    return tuple(p for p in params if p != "self" and p not in _FIXED)


def build_model(name: str, *, dims, in_channels: int, num_classes: int, rngs: nnx.Rngs, **options) -> nnx.Module:
    """Builds the model called ``name`` (one of ``MODELS``) for ``dims`` 2, 3, 'acs', 'soft_acs' or '2.5d'.

    Classifiers ('resnet18', 'resnet34', 'resnet50', 'efficientnet_lite0') return
    logits (N, num_classes); segmentation models ('unet', '*_unet') return
    (N, *spatial, num_classes), or ``(main, *aux)`` in train mode with
    ``deep_supervision=True``. ``options`` are the model class's keyword
    arguments (see :func:`model_options`), e.g. ``remat='nothing_saveable'``,
    ``dtype=jnp.bfloat16``, ``pool_depth=False``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if dims not in DIMS:
        raise ValueError(f"{name}: dims must be one of {DIMS}, got {dims!r}")
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {unknown}; allowed: {', '.join(allowed)}")
    return MODELS[name](dims=dims, in_channels=in_channels, num_classes=num_classes, rngs=rngs, **options)


__all__ = [
    "MODELS",
    "NORMS",
    "REMAT_POLICIES",
    "SEGMENTATION",
    "EfficientNetLite",
    "EfficientNetUNet",
    "ResNet",
    "ResNetUNet",
    "UNet",
    "build_model",
    "model_options",
    "param_count",
]
