"""U-Nets: a configurable plain U-Net and U-Nets on pretrained encoders.

All variants return logits ``(N, *spatial, num_classes)`` in float32 at the
input resolution. With ``deep_supervision=True`` a model in train mode
(``model.train()``, the state after construction) returns a tuple
``(main, aux_1, aux_2, ...)``: ``aux_i`` comes from the i-th decoder stage
above the final one, at successively lower resolution (the caller downsamples
the labels to match); ``model.eval()`` returns ``main`` alone.

Input sizes: every spatial size must be a multiple of the model's total
downsampling on that axis, ``model.size_divisor`` (e.g. (16, 16, 16) for a
5-level plain U-Net, (32, 32, 32) for the ResNet and EfficientNet encoders, 1 on
depth with ``pool_depth=False``). Other sizes raise a ValueError that says
which size to pad or crop to.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from acsjax.layers import Conv, check_dims, kernel_size_3d, spatial_rank
from acsjax.models.blocks import (
    NORMS,
    ConvNormAct,
    check_divisible,
    check_input,
    per_level,
    resolve_remat,
    run_block,
    upsample,
)
from acsjax.models.efficientnet import EfficientNetLite
from acsjax.models.resnet import ResNet

DECODER_WIDTHS = (256, 128, 64, 32, 16)


class DoubleConv(nnx.Module):
    """Two ConvNormAct units; the first may be strided (a U-Net encoder level)."""

    def __init__(self, cin, cout, *, dims, kernel=3, strides=1, norm, act, depth_padding, dtype, param_dtype, rngs):
        kw = dict(dims=dims, norm=norm, act=act, depth_padding=depth_padding)
        kw.update(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = ConvNormAct(cin, cout, kernel, strides=strides, **kw)
        self.conv2 = ConvNormAct(cout, cout, kernel, **kw)

    def __call__(self, x):
        return self.conv2(self.conv1(x))


class DecoderBlock(nnx.Module):
    """Nearest upsampling by ``factors`` -> concatenate the skip (if any) -> DoubleConv."""

    def __init__(
        self, cin, skip, cout, *, factors, kernel=3, dims, norm, act, depth_padding, dtype, param_dtype, rngs
    ):
        self.factors = tuple(factors)
        kw = dict(dims=dims, norm=norm, act=act, depth_padding=depth_padding)
        kw.update(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = ConvNormAct(cin + skip, cout, kernel, **kw)
        self.conv2 = ConvNormAct(cout, cout, kernel, **kw)

    def __call__(self, x, skip=None):
        x = upsample(x, self.factors)
        if skip is not None:
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nnx.Module):
    """Decoder over encoder features given shallow to deep, with their strides.

    One block per skip (upsampling from the next deeper feature), plus a last
    block without a skip when the shallowest feature is below full resolution.
    ``kernels`` (optional, one per feature) gives the block that decodes into
    feature ``i`` the kernel of that encoder level (the last block uses ``kernels[0]``).
    """

    def __init__(
        self, channels, strides, widths, *, kernels=None, dims, norm, act, depth_padding, dtype, param_dtype, rngs
    ):
        kw = dict(dims=dims, norm=norm, act=act, depth_padding=depth_padding)
        kw.update(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kernels = kernels or (3,) * len(channels)
        n_blocks = len(channels) - 1 + int(any(s > 1 for s in strides[0]))
        if len(widths) < n_blocks:
            raise ValueError(f"decoder_widths needs {n_blocks} entries for this encoder, got {tuple(widths)}")
        blocks, cin = [], channels[-1]
        for i, w in zip(range(len(channels) - 2, -1, -1), widths):
            factors = [a // b for a, b in zip(strides[i + 1], strides[i])]
            blocks.append(DecoderBlock(cin, channels[i], w, factors=factors, kernel=kernels[i], **kw))
            cin = w
        if n_blocks == len(channels):
            blocks.append(DecoderBlock(cin, 0, widths[n_blocks - 1], factors=strides[0], kernel=kernels[0], **kw))
        self.blocks = nnx.List(blocks)
        self.widths = tuple(widths[:n_blocks])

    def __call__(self, features, policy=None) -> list[jax.Array]:
        """Outputs of every block, deepest first; the last is at full resolution."""
        skips = list(features[:-1])
        x, outputs = features[-1], []
        for block in self.blocks:
            x = run_block(block, policy, x, skips.pop() if skips else None)
            outputs.append(x)
        return outputs


class _SegmentationHeads(nnx.Module):
    """Shared tail of the U-Nets: 1x1 heads, deep supervision and mode handling."""

    def _init_heads(self, widths, num_classes, deep_supervision, dims, dtype, param_dtype, rngs):
        kw = dict(dims=dims, padding=0, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.head = Conv(widths[-1], num_classes, 1, **kw)
        self.deep_supervision = bool(deep_supervision)
        aux = [Conv(w, num_classes, 1, **kw) for w in reversed(widths[:-1])] if deep_supervision else []
        self.aux_heads = nnx.List(aux)
        # model.train() / model.eval() flip this like nnx.Dropout's flag.
        self.deterministic = False

    def _outputs(self, decoded: list[jax.Array]):
        main = self.head(decoded[-1]).astype(jnp.float32)
        if not self.deep_supervision or self.deterministic:
            return main
        lower = list(reversed(decoded[:-1]))
        return (main, *(h(x).astype(jnp.float32) for h, x in zip(self.aux_heads, lower)))


def _per_stage(value, n: int, name: str, dims, *, odd: bool) -> tuple[tuple[int, ...], ...]:
    """``value``: one int or [d, h, w] per stage (dims=2 also takes [h, w]); validated, (d, h, w) each."""
    if isinstance(value, (int, str, np.integer)):
        raise ValueError(f"UNet: {name} needs one entry per level ({n}, as widths), got {value!r}")
    value = list(value)
    if len(value) != n:
        raise ValueError(f"UNet: {name} needs one entry per level ({n}, as widths), got {len(value)}")
    stages = []
    for i, v in enumerate(value):
        v = (int(v),) * 3 if isinstance(v, (int, np.integer)) else tuple(v)
        if dims == 2 and len(v) == 2:
            v = (1, *v)
        if len(v) != 3 or not all(isinstance(a, (int, np.integer)) and a >= 1 for a in v):
            raise ValueError(f"UNet: {name}[{i}] must be a positive int or [d, h, w] positive ints, got {value[i]!r}")
        if odd and any(a % 2 == 0 for a in v):
            raise ValueError(f"UNet: {name}[{i}] must be odd (the output keeps the input's size), got {value[i]!r}")
        stages.append(tuple(int(a) for a in v))
    return tuple(stages)


def _schedule(dims, n: int, strides, kernels, pool_depth):
    """Per-level strides (in the layer's rank) and (kd, kh, kw) kernels of a plain U-Net."""
    if strides is None:
        flags = per_level(pool_depth, n - 1, "UNet: pool_depth")
        strides = [(1, 1, 1)] + [(2 if f else 1, 2, 2) for f in flags]
    else:
        if pool_depth is not True:
            raise ValueError("UNet: give the depth strides in strides, not pool_depth (leave it True)")
        strides = _per_stage(strides, n, "strides", dims, odd=False)
    kernels = ((3, 3, 3),) * n if kernels is None else _per_stage(kernels, n, "kernels", dims, odd=True)
    for i, k in enumerate(kernels):
        kernel_size_3d(dims, k, f"UNet: kernels[{i}]")
    rank = spatial_rank(dims)
    return tuple(tuple(s[-rank:]) for s in strides), kernels


class UNet(_SegmentationHeads):
    """A plain U-Net (nnU-Net style: strided-conv downsampling, two convs per level).

    Args:
      dims: 2, 3, 'acs', 'soft_acs' or '2.5d'.
      in_channels, num_classes: input channels and output classes.
      widths: channels per level, shallow to deep; ``len(widths)`` is the number of levels.
      norm: 'batch', 'group' or 'instance'.
      act: 'relu', 'leaky_relu', ... (see ``blocks.ACTIVATIONS``).
      pool_depth: downsample depth too; a bool or one bool per downsampling.
      strides: one [sd, sh, sw] per level (the first is the stem's, normally
        [1, 1, 1]); None: stride 2 per level below the first (depth as ``pool_depth``).
      kernels: one odd [kd, kh, kw] per level (decoder blocks take the kernel of
        the level they decode into); None: 3 everywhere. 2D models use the
        in-plane parts, '2.5d' depth 1 and 'acs' an axial-only stage where kd == 1,
        so one option set builds every variant (nnU-Net's anisotropic plans).
      depth_padding: 'zeros' or 'edge' for the depth axis of volumes
        (see :class:`acsjax.models.blocks.Conv`).
      deep_supervision: add 1x1 heads on the lower decoder levels (train mode only).
      remat: None, or a ``jax.checkpoint_policies`` name applied per level.
      dtype: compute dtype; parameters stay ``param_dtype``.

    Parameter paths: ``encoder/{i}/conv{1,2}/{conv,norm}/...``,
    ``decoder/blocks/{j}/conv{1,2}/...``, ``head/...``, ``aux_heads/{k}/...``.
    """

    def __init__(
        self,
        *,
        dims=2,
        in_channels: int = 1,
        num_classes: int = 2,
        widths: Sequence[int] = (32, 64, 128, 256, 320),
        norm: str = "instance",
        act: str = "leaky_relu",
        pool_depth: bool | Sequence[bool] = True,
        strides: Sequence[Sequence[int] | int] | None = None,
        kernels: Sequence[Sequence[int] | int] | None = None,
        depth_padding: str = "zeros",
        deep_supervision: bool = False,
        remat=None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_dims(dims)
        if norm not in NORMS:
            raise ValueError(f"UNet: norm must be one of {NORMS}, got {norm!r}")
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError(f"UNet: widths needs at least 2 levels, got {widths}")
        self.name, self.dims, self.in_channels = "unet", dims, in_channels
        self.policy = resolve_remat(remat)
        self.dtype = dtype
        level_strides, kernels = _schedule(dims, len(widths), strides, kernels, pool_depth)
        kw = dict(dims=dims, norm=norm, act=act, depth_padding=depth_padding)
        kw.update(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        levels, total, cin = [], [], in_channels
        for w, s, k in zip(widths, level_strides, kernels):
            levels.append(DoubleConv(cin, w, kernel=k, strides=s, **kw))
            total.append(tuple(a * b for a, b in zip(total[-1] if total else (1,) * len(s), s)))
            cin = w
        self.encoder = nnx.List(levels)
        self.size_divisor = total[-1]
        # What each level does, for plans and reports: strides in the layer's rank, kernels (kd, kh, kw).
        self.stage_strides, self.stage_kernels = level_strides, tuple(tuple(k) for k in kernels)
        # A strided stem needs one more decoder block (back to full resolution), as wide as the first level.
        decoder_widths = widths[-2::-1] + widths[:1]
        self.decoder = UNetDecoder(widths, total, decoder_widths, kernels=kernels, **kw)
        self._init_heads(self.decoder.widths, num_classes, deep_supervision, dims, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array):
        check_input(self.name, x, self.dims, self.in_channels)
        check_divisible(self.name, x, self.size_divisor)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        features = []
        for level in self.encoder:
            x = run_block(level, self.policy, x)
            features.append(x)
        return self._outputs(self.decoder(features, self.policy))


class _EncoderUNet(_SegmentationHeads):
    """A U-Net decoder (segmentation_models_pytorch's Unet) on a classification encoder."""

    def _init_unet(self, name, encoder, num_classes, decoder_widths, deep_supervision, *, dtype, param_dtype, **kw):
        """``kw``: the decoder's norm, depth_padding and rngs."""
        rngs = kw["rngs"]
        self.name, self.dims, self.in_channels = name, encoder.dims, encoder.in_channels
        self.dtype = dtype
        self.encoder = encoder
        strides = encoder.feature_strides
        self.size_divisor = strides[-1]
        self.decoder = UNetDecoder(
            encoder.feature_channels,
            strides,
            tuple(decoder_widths),
            dims=self.dims,
            act="relu",
            dtype=dtype,
            param_dtype=param_dtype,
            **kw,
        )
        self._init_heads(self.decoder.widths, num_classes, deep_supervision, self.dims, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array):
        check_input(self.name, x, self.dims, self.in_channels)
        check_divisible(self.name, x, self.size_divisor)
        features = self.encoder.forward_features(x)
        return self._outputs(self.decoder(features, self.encoder.policy))


class ResNetUNet(_EncoderUNet):
    """U-Net on a torchvision-compatible ResNet encoder (``encoder/conv1``, ``encoder/layer1``, ...).

    The encoder takes :class:`ResNet`'s options (``stem_stride``, ``stem_pool``,
    ``pool_depth``); skips come from the stem and every stage, and a last
    decoder block restores full resolution. ``norm`` applies to the decoder.
    """

    def __init__(
        self,
        num_layers: int = 34,
        *,
        dims=2,
        in_channels: int = 3,
        num_classes: int = 2,
        decoder_widths: Sequence[int] = DECODER_WIDTHS,
        norm: str = "batch",
        stem_stride: int = 2,
        stem_pool: bool = True,
        pool_depth: bool | Sequence[bool] = True,
        depth_padding: str = "zeros",
        deep_supervision: bool = False,
        remat=None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        encoder = ResNet(
            num_layers,
            dims=dims,
            in_channels=in_channels,
            include_top=False,
            stem_stride=stem_stride,
            stem_pool=stem_pool,
            pool_depth=pool_depth,
            depth_padding=depth_padding,
            remat=remat,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self._init_unet(
            f"resnet{num_layers}_unet", encoder, num_classes, decoder_widths, deep_supervision,
            norm=norm, depth_padding=depth_padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )


class EfficientNetUNet(_EncoderUNet):
    """U-Net on an EfficientNet-Lite0 encoder (``encoder/conv_stem``, ``encoder/blocks``, ...).

    Skips come from the last block at strides 2, 4, 8 and 16; the deepest
    feature is the 320-channel output of the last block (the ImageNet head is
    not part of the encoder).
    """

    def __init__(
        self,
        *,
        dims=2,
        in_channels: int = 3,
        num_classes: int = 2,
        decoder_widths: Sequence[int] = DECODER_WIDTHS,
        norm: str = "batch",
        pool_depth: bool | Sequence[bool] = True,
        padding: str = "same",
        depth_padding: str = "zeros",
        deep_supervision: bool = False,
        remat=None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        encoder = EfficientNetLite(
            dims=dims,
            in_channels=in_channels,
            include_top=False,
            pool_depth=pool_depth,
            padding=padding,
            depth_padding=depth_padding,
            remat=remat,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self._init_unet(
            "efficientnet_lite0_unet", encoder, num_classes, decoder_widths, deep_supervision,
            norm=norm, depth_padding=depth_padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
