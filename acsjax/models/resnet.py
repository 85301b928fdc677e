"""ResNet-18/34/50 with torchvision's topology, for dims 2, 3, 'acs', 'soft_acs' and '2.5d'.

The parameter tree mirrors torchvision's (and timm's) state-dict names one to
one, with '/' for '.' and Flax leaf names::

  conv1.weight                  conv1/kernel
  bn1.{weight,bias}             bn1/{scale,bias}
  bn1.running_{mean,var}        bn1/{mean,var}
  layer2.0.conv1.weight         layer2/0/conv1/kernel
  layer2.0.downsample.0.weight  layer2/0/downsample/0/kernel
  layer2.0.downsample.1.weight  layer2/0/downsample/1/scale
  fc.{weight,bias}              fc/{kernel,bias}

Options for medical volumes: ``stem_stride=1`` keeps full resolution in the
7x7 stem, ``stem_pool=False`` drops the stem max-pool, and ``pool_depth=False``
makes every depth stride 1 (for thick-slice volumes with few slices); one bool
per downsampling pools depth only where it says (anisotropic volumes).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from acsjax.layers import check_dims, max_pool
from acsjax.models.blocks import (
    Conv,
    check_input,
    global_avg_pool,
    make_norm,
    per_level,
    resolve_remat,
    run_block,
    spatial_strides,
)

WIDTHS = (64, 128, 256, 512)


def _conv(cin, cout, k, *, dims, strides=1, padding=None, depth_padding, dtype, param_dtype, rngs):
    return Conv(
        cin,
        cout,
        k,
        dims=dims,
        strides=strides,
        padding=padding,
        depth_padding=depth_padding,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, cin, width, *, stride, dims, pool_depth, norm, depth_padding, dtype, param_dtype, rngs):
        s = spatial_strides(dims, stride, pool_depth)
        kw = dict(dims=dims, depth_padding=depth_padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        nkw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = _conv(cin, width, 3, strides=s, **kw)
        self.bn1 = make_norm(norm, width, **nkw)
        self.conv2 = _conv(width, width, 3, **kw)
        self.bn2 = make_norm(norm, width, **nkw)
        self.downsample = _downsample(cin, width, stride, s, norm, kw, nkw)

    def __call__(self, x):
        shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (strided, as in torchvision's v1.5) -> 1x1 with 4x expansion."""

    expansion = 4

    def __init__(self, cin, width, *, stride, dims, pool_depth, norm, depth_padding, dtype, param_dtype, rngs):
        s = spatial_strides(dims, stride, pool_depth)
        kw = dict(dims=dims, depth_padding=depth_padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        nkw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        cout = width * self.expansion
        self.conv1 = _conv(cin, width, 1, **kw)
        self.bn1 = make_norm(norm, width, **nkw)
        self.conv2 = _conv(width, width, 3, strides=s, **kw)
        self.bn2 = make_norm(norm, width, **nkw)
        self.conv3 = _conv(width, cout, 1, **kw)
        self.bn3 = make_norm(norm, cout, **nkw)
        self.downsample = _downsample(cin, cout, stride, s, norm, kw, nkw)

    def __call__(self, x):
        shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return jax.nn.relu(y + shortcut)


def _downsample(cin, cout, stride, strides, norm, kw, nkw):
    if stride == 1 and cin == cout:
        return None
    # A list, not a submodule with names, so the paths read downsample/0 and downsample/1.
    return nnx.List([_conv(cin, cout, 1, strides=strides, padding=0, **kw), make_norm(norm, cout, **nkw)])


ARCHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


class ResNet(nnx.Module):
    """torchvision-compatible ResNet for images (dims=2) or volumes (3, 'acs', 'soft_acs', '2.5d').

    Args:
      num_layers: 18, 34 or 50.
      dims: 2, 3, 'acs', 'soft_acs' or '2.5d' (see :mod:`acsjax.layers`).
      in_channels: input channels (3 for ImageNet weights).
      num_classes: size of the ``fc`` head; ignored when ``include_top=False``.
      include_top: add global average pooling and ``fc``; without it the model
        returns the last stage's feature map (an encoder).
      stem_stride: stride of the 7x7 ``conv1`` (2 as in torchvision, or 1).
      stem_pool: keep the 3x3 stride-2 max-pool after the stem.
      pool_depth: stride/pool the depth axis of volumes too (off: depth strides are 1);
        a bool, or one bool per downsampling, shallow to deep: the stem conv (when
        ``stem_stride=2``), the stem pool (when ``stem_pool``), layer2, layer3, layer4.
      norm: 'batch' (torchvision), 'group' or 'instance'.
      depth_padding: 'zeros' or 'edge' for the depth axis of volumes (see
        :class:`acsjax.models.blocks.Conv`; 'edge' makes inflated nets exact on
        volumes that repeat one image).
      remat: None, or a ``jax.checkpoint_policies`` name applied per residual block.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
    """

    def __init__(
        self,
        num_layers: int = 18,
        *,
        dims=2,
        in_channels: int = 3,
        num_classes: int = 1000,
        include_top: bool = True,
        stem_stride: int = 2,
        stem_pool: bool = True,
        pool_depth: bool | Sequence[bool] = True,
        norm: str = "batch",
        depth_padding: str = "zeros",
        remat=None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_dims(dims)
        if num_layers not in ARCHS:
            raise ValueError(f"ResNet: num_layers must be one of {tuple(ARCHS)}, got {num_layers!r}")
        if stem_stride not in (1, 2):
            raise ValueError(f"ResNet: stem_stride must be 1 or 2, got {stem_stride!r}")
        block_cls, counts = ARCHS[num_layers]
        n_down = int(stem_stride == 2) + int(stem_pool) + 3
        flags = list(per_level(pool_depth, n_down, "ResNet: pool_depth"))
        stem_flag = flags.pop(0) if stem_stride == 2 else True
        self.pool_flag = flags.pop(0) if stem_pool else True
        layer_flags = (True, *flags)  # layer1 keeps the resolution
        self.name = f"resnet{num_layers}"
        self.dims, self.in_channels, self.pool_depth, self.stem_pool = dims, in_channels, pool_depth, stem_pool
        self.policy = resolve_remat(remat)
        self.dtype = dtype
        kw = dict(dims=dims, depth_padding=depth_padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        stem = spatial_strides(dims, stem_stride, stem_flag)
        self.conv1 = _conv(in_channels, 64, 7, strides=stem, **kw)
        self.bn1 = make_norm(norm, 64, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        cin = 64
        stride = stem
        if stem_pool:
            stride = tuple(a * b for a, b in zip(stride, spatial_strides(dims, 2, self.pool_flag)))
        strides, channels = [stride], [64]
        for i, (width, count, flag) in enumerate(zip(WIDTHS, counts, layer_flags)):
            first = 1 if i == 0 else 2
            blocks = []
            for j in range(count):
                blocks.append(
                    block_cls(cin, width, stride=first if j == 0 else 1, pool_depth=flag, norm=norm, **kw)
                )
                cin = width * block_cls.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
            if i:
                stride = tuple(a * b for a, b in zip(stride, spatial_strides(dims, 2, flag)))
            strides.append(stride)
            channels.append(cin)
        # Feature maps of forward_features: stem (after ReLU, before the pool) then layer1..4.
        self.feature_strides = (stem, *strides[1:])
        self.feature_channels = (64, *channels[1:])
        self.num_features = cin
        self.fc = (
            nnx.Linear(cin, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if include_top else None
        )

    def forward_features(self, x: jax.Array) -> list[jax.Array]:
        """The five feature maps an encoder needs: stem, layer1, layer2, layer3, layer4.

        Their strides and channels are ``self.feature_strides`` and ``self.feature_channels``.
        """
        check_input(self.name, x, self.dims, self.in_channels)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        features = [x]
        if self.stem_pool:
            x = max_pool(x, self.dims, 3, strides=2, padding=1, pool_depth=self.pool_flag)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = run_block(block, self.policy, x)
            features.append(x)
        return features

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (N, num_classes) in float32, or the last feature map without a top."""
        x = self.forward_features(x)[-1]
        if self.fc is None:
            return x
        return self.fc(global_avg_pool(x)).astype(jnp.float32)
