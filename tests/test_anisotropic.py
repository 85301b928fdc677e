"""Anisotropic networks: per-axis kernels in the layers, per-level strides and kernels in the U-Net,
and inflation into a target tree (``inflate_params(..., like=...)``)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import acsjax
from acsjax.models import UNet
from acsjax.models.blocks import Conv as BlockConv
from test_models import numpy_init

# nnU-Net's typical plan for thick slices: in-plane first, depth pooled and convolved only deeper.
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3]]
NO_DEPTH_STRIDE = [[1, 1, 1], [1, 2, 2], [1, 2, 2]]


def unet(dims, seed=None, **options):
    options = {"in_channels": 1, "num_classes": 2, "widths": (4, 8, 8), **options}
    model = nnx.eval_shape(lambda: UNet(dims=dims, rngs=nnx.Rngs(0), **options))
    return model if seed is None else numpy_init(model, seed)


def forward(model, x):
    model.eval()
    return nnx.jit(lambda m, x: m(x))(model, x)


def one_line_errors(cases):
    for pattern, fn in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            fn()
        assert "\n" not in str(info.value), str(info.value)


# ---------------------------------------------------------------------- layers --


def test_conv_kernel_sizes_per_axis():
    rngs = nnx.Rngs(0)
    shape = lambda dims, k: acsjax.Conv(2, 4, k, dims=dims, rngs=rngs).kernel.shape  # noqa: E731
    assert shape(3, (1, 3, 5)) == (1, 3, 5, 2, 4)
    assert shape(2, (5, 3, 3)) == shape(2, (3, 3)) == (3, 3, 2, 4)  # the 2D twin takes the in-plane part
    assert shape("2.5d", (3, 3, 3)) == (1, 3, 3, 2, 4)
    assert shape("acs", (1, 3, 3)) == shape("acs", 3) == (3, 3, 2, 4)
    one_line_errors([
        (r"kernel_size: dims='acs' needs kd == 1 \(axial only\) or kd == kh == kw", lambda: shape("acs", (3, 1, 3))),
        (r"kernel_size must be an int or \(kd, kh, kw\) ints", lambda: shape(3, (3, 3))),
        (r"kernel_size must be positive", lambda: shape(3, (0, 3, 3))),
    ])


def test_axial_acs_stage_is_a_slice_by_slice_conv():
    """'acs' with kd == 1 applies the whole 2D kernel axially: the 2D conv on every slice (any depth padding)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 8, 6, 2)), jnp.float32)
    conv2d = acsjax.Conv(2, 4, 3, dims=2, rngs=nnx.Rngs(0))
    want = conv2d(x.reshape(5, 8, 6, 2)).reshape(1, 5, 8, 6, 4)
    for depth_padding in ("zeros", "edge"):
        axial = BlockConv(2, 4, (1, 3, 3), dims="acs", depth_padding=depth_padding, rngs=nnx.Rngs(1))
        nnx.update(axial, nnx.state(conv2d))
        chex.assert_trees_all_close(axial(x), want, atol=1e-5)
    # A cubic 'acs' layer with the same kernel mixes planes: not the slice-by-slice result.
    cubic = acsjax.Conv(2, 4, 3, dims="acs", rngs=nnx.Rngs(1))
    nnx.update(cubic, nnx.state(conv2d))
    assert float(jnp.abs(cubic(x) - want).max()) > 1e-2


def test_edge_depth_padding_with_anisotropic_kernels():
    """Edge depth padding pads by kd // 2 per layer: a (3, 1, 3) kernel on a depth-constant volume is 2D."""
    rng = np.random.default_rng(1)
    image = jnp.asarray(rng.normal(size=(1, 6, 7, 2)), jnp.float32)
    volume = jnp.repeat(image[:, None], 3, axis=1)
    conv3d = BlockConv(2, 4, (3, 1, 3), dims=3, depth_padding="edge", strides=(2, 1, 1), rngs=nnx.Rngs(0))
    conv2d = acsjax.Conv(2, 4, (1, 3), dims=2, rngs=nnx.Rngs(0))
    nnx.update(conv2d, acsjax.project_params(nnx.state(conv3d)))
    got = conv3d(volume)
    chex.assert_shape(got, (1, 2, 6, 7, 4))
    chex.assert_trees_all_close(got, jnp.broadcast_to(conv2d(image)[:, None], got.shape), atol=1e-5)


# ------------------------------------------------------------------------- U-Net --


@pytest.mark.parametrize("dims", [2, 3, "acs", "2.5d"])
def test_anisotropic_unet_builds_and_keeps_the_input_shape(dims):
    model = unet(dims, strides=STRIDES, kernels=KERNELS)
    spatial = (16, 16) if dims == 2 else (4, 16, 16)
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, *spatial, 1), jnp.float32))
    assert out.shape == (1, *spatial, 2)
    assert model.size_divisor == ((4, 4) if dims == 2 else (2, 4, 4))
    flat = acsjax.trees.flatten(nnx.state(model))
    depth = {2: None, 3: 3, "acs": None, "2.5d": 1}[dims]
    # Level 2 is the cubic one; level 0 and the decoder block into it are (1, 3, 3).
    deep, shallow = flat["encoder/2/conv1/conv/kernel"].shape, flat["decoder/blocks/1/conv2/conv/kernel"].shape
    if depth is None:
        assert deep == (3, 3, 8, 8) and shallow == (3, 3, 4, 4)
    else:
        assert deep == (depth, 3, 3, 8, 8) and shallow == (1, 3, 3, 4, 4)
    if dims == "acs":
        assert model.encoder[0].conv1.conv.axial and not model.encoder[2].conv1.conv.axial


def test_strided_stem_restores_full_resolution():
    model = unet(3, strides=[[1, 2, 2], [1, 2, 2], [2, 2, 2]], kernels=KERNELS, deep_supervision=True)
    assert model.size_divisor == (2, 8, 8)
    assert len(model.decoder.blocks) == 3  # one more block, without a skip, back to full resolution
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 2, 16, 8, 1), jnp.float32))
    assert [o.shape for o in out] == [(1, 2, 16, 8, 2), (1, 2, 8, 4, 2), (1, 2, 4, 2, 2)]


def test_default_schedule_is_unchanged():
    """strides=None, kernels=None: 3x3x3 kernels and stride 2 with pool_depth, as before."""
    a, b = unet(3, pool_depth=(False, True)), unet(3, strides=[1, [1, 2, 2], 2], kernels=[3, 3, 3])
    acsjax.assert_fits(nnx.state(a), nnx.state(b))
    assert a.size_divisor == b.size_divisor == (2, 4, 4)


def test_unet_option_errors():
    one_line_errors([
        (r"UNet: strides needs one entry per level \(3, as widths\), got 2", lambda: unet(3, strides=STRIDES[1:])),
        (r"UNet: kernels needs one entry per level \(3, as widths\), got 4", lambda: unet(2, kernels=KERNELS + [3])),
        (r"UNet: kernels\[1\] must be odd", lambda: unet(3, kernels=[3, [1, 2, 2], 3])),
        (r"UNet: strides\[2\] must be a positive int or \[d, h, w\]", lambda: unet(3, strides=[1, 2, [0, 2, 2]])),
        (r"UNet: kernels\[0\]: dims='acs' needs kd == 1", lambda: unet("acs", kernels=[[3, 1, 3], 3, 3])),
        (r"UNet: give the depth strides in strides, not pool_depth",
         lambda: unet(3, strides=STRIDES, pool_depth=False)),
    ])


# --------------------------------------------------------------- inflate into a target --


def test_inflate_like_fits_every_dims_without_rules():
    state2d = nnx.state(unet(2, strides=STRIDES, kernels=KERNELS))
    for dims, method in ((3, "center"), (3, "scale"), ("acs", "acs"), ("acs", "average"), ("2.5d", "average")):
        like = nnx.state(unet(dims, strides=STRIDES, kernels=KERNELS))
        inflated = jax.eval_shape(lambda s: acsjax.inflate_params(s, method, like=like), state2d)
        acsjax.assert_fits(inflated, like, what=f"{dims} {method}")
    # Without `like` the default depth (the kernel's size) does not fit the (1, 3, 3) levels.
    like = nnx.state(unet(3, strides=STRIDES, kernels=KERNELS))
    with pytest.raises(ValueError, match=r"at '.*/kernel': shape \(3, 3, 3, \d+, \d+\), model expects \(1, 3, 3,"):
        acsjax.assert_fits(jax.eval_shape(lambda s: acsjax.inflate_params(s, "center"), state2d), like)


def test_inflate_like_accepts_flat_and_shape_trees_and_is_jittable():
    model2d = unet(2, seed=0, strides=STRIDES, kernels=KERNELS)
    state2d = nnx.state(model2d)
    model3d = unet(3, strides=STRIDES, kernels=KERNELS)
    eager = acsjax.inflate_params(state2d, "scale", like=nnx.state(model3d))
    flat = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in acsjax.trees.flatten(nnx.state(model3d)).items()}
    shapes = {k: tuple(v.shape) for k, v in flat.items()}
    jitted = jax.jit(lambda s: acsjax.inflate_params(s, "scale", like=flat))(state2d)
    chex.assert_trees_all_close(jitted, eager)
    chex.assert_trees_all_equal(acsjax.inflate_params(state2d, "scale", like=shapes), eager)
    pure = nnx.to_pure_dict(nnx.state(model3d))
    chex.assert_trees_all_equal(acsjax.inflate_params(state2d, "scale", like=pure), eager)
    k2 = np.asarray(state2d["encoder"][2]["conv1"]["conv"]["kernel"][...])
    k3 = np.asarray(eager["encoder"][2]["conv1"]["conv"]["kernel"][...])
    np.testing.assert_allclose(k3, k2[None] * np.array([0.25, 0.5, 0.25])[:, None, None, None, None], rtol=1e-6)
    k2 = np.asarray(state2d["encoder"][0]["conv1"]["conv"]["kernel"][...])
    np.testing.assert_array_equal(eager["encoder"][0]["conv1"]["conv"]["kernel"][...], k2[None])


def test_inflate_like_combines_with_rules():
    state2d = nnx.state(unet(2, seed=0, strides=STRIDES, kernels=KERNELS))
    like = nnx.state(unet(3, strides=STRIDES, kernels=KERNELS))
    out = acsjax.inflate_params(state2d, "average", like=like, rules={"encoder/2/conv1/": {"method": "center"}})
    taps = lambda path: np.asarray(acsjax.trees.flatten(out)[path])[:, 1, 1, 0, 0]  # noqa: E731
    ref = lambda path: float(acsjax.trees.flatten(state2d)[path][1, 1, 0, 0])  # noqa: E731
    for path, weights in (("encoder/2/conv1/conv/kernel", [0, 1, 0]), ("encoder/2/conv2/conv/kernel", [1 / 3] * 3)):
        np.testing.assert_allclose(taps(path), np.array(weights) * ref(path), rtol=1e-6, atol=1e-7)


def test_inflate_like_errors_name_path_and_shapes():
    state2d = nnx.state(unet(2, seed=0, strides=STRIDES, kernels=KERNELS))
    wider = nnx.state(unet(3, strides=STRIDES, kernels=KERNELS, widths=(4, 8, 16)))
    flat = acsjax.trees.flatten(nnx.state(unet(3, strides=STRIDES, kernels=KERNELS)))
    partial = {k: v for k, v in flat.items() if k != "head/kernel"}
    one_line_errors([
        (r"decoder/blocks/0/conv1/conv/kernel: 2-D kernel \(3, 3, 16, 8\) "
         r"does not fit the target kernel \(1, 3, 3, 24, 8\)",
         lambda: acsjax.inflate_params(state2d, "average", like=wider)),
        (r"head/kernel: 2-D kernel \(1, 1, 4, 2\) has no counterpart in `like`",
         lambda: acsjax.inflate_params(state2d, "average", like=partial)),
        (r"encoder/2/conv1/conv/kernel: method 'acs' cannot fill the target kernel \(3, 3, 3, 8, 8\) of depth 3",
         lambda: acsjax.inflate_params(state2d, "acs", like=flat)),
        (r"encoder/2/conv1/conv/kernel: depth=5 but the target kernel \(3, 3, 3, 8, 8\) has depth 3",
         lambda: acsjax.inflate_params(state2d, "average", like=flat, rules={"encoder/2/": {"depth": 5}})),
    ])
    acs_like = nnx.state(unet("acs", strides=STRIDES, kernels=KERNELS, widths=(4, 8, 16)))
    pattern = r"/kernel: 2-D kernel \(3, 3, 16, 8\) does not fit the target's 2-D kernel \(3, 3, 24, 8\)"
    with pytest.raises(ValueError, match=pattern):
        acsjax.inflate_params(state2d, "acs", like=acs_like)


# -------------------------------------------------------------------- properties --


@pytest.mark.parametrize("kernels", [[[1, 3, 3]] * 3, KERNELS], ids=["all-axial", "mixed"])
def test_center_into_target_is_the_2d_net_slice_by_slice(kernels):
    """'center' into a model without depth strides: every output slice is the 2D net on that input slice.

    BatchNorm in eval mode is a per-voxel affine map, the same in 2D and 3D. Instance or
    group norm would normalise over the whole volume instead of each slice, so they
    break the property by design. With (1, k, k) levels every method gives the same
    kernels; the cubic level's 'center' kernel reads only its own slice.
    """
    model2d = unet(2, seed=1, strides=NO_DEPTH_STRIDE, kernels=kernels, norm="batch")
    model3d = unet(3, strides=NO_DEPTH_STRIDE, kernels=kernels, norm="batch")
    inflated = acsjax.inflate_params(nnx.state(model2d), "center", like=nnx.state(model3d))
    acsjax.assert_fits(inflated, nnx.state(model3d))
    nnx.update(model3d, inflated)
    volume = jnp.asarray(np.random.default_rng(2).normal(size=(1, 3, 8, 8, 1)), jnp.float32)
    got = forward(model3d, volume)
    want = forward(model2d, volume[0]).reshape(got.shape)
    assert float(jnp.std(want)) > 1e-2
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["average", "scale"])
def test_boring_volume_through_a_mixed_anisotropic_unet(method):
    """I3D's property with depth striding and mixed kernels: a repeated image gives the 2D output on every slice.

    depth_padding='edge' keeps a depth-constant volume constant through every
    convolution, including the stride-2 depth of the deepest level; instance
    norm then sees the same statistics as in 2D.
    """
    kw = dict(strides=STRIDES, kernels=KERNELS, depth_padding="edge", norm="instance")
    model2d, model3d = unet(2, seed=3, **kw), unet(3, **kw)
    nnx.update(model3d, acsjax.inflate_params(nnx.state(model2d), method, like=nnx.state(model3d)))
    image = jnp.asarray(np.random.default_rng(4).normal(size=(1, 8, 8, 1)), jnp.float32)
    want = forward(model2d, image)
    got = forward(model3d, jnp.repeat(image[:, None], 2, axis=1))
    assert float(jnp.std(want)) > 1e-2
    chex.assert_trees_all_close(got, jnp.broadcast_to(want[:, None], got.shape), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet18_unet", "efficientnet_lite0_unet"])
def test_encoder_unets_pool_depth_per_downsampling(name):
    """One depth flag per downsampling (stem, [stem pool,] stages): depth pooled only from the third one."""
    from acsjax.models import build_model

    flags = (False, False, True, True, True)
    model = nnx.eval_shape(
        lambda: build_model(name, dims=3, in_channels=1, num_classes=2, rngs=nnx.Rngs(0), pool_depth=flags)
    )
    assert model.encoder.feature_strides == ((1, 2, 2), (1, 4, 4), (2, 8, 8), (4, 16, 16), (8, 32, 32))
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 8, 32, 32, 1), jnp.float32))
    assert out.shape == (1, 8, 32, 32, 2)
    one_line_errors([
        (r"pool_depth must be a bool or 5 bools \(one per downsampling\), got \(True, False\)",
         lambda: build_model(name, dims=3, in_channels=1, num_classes=2, rngs=nnx.Rngs(0), pool_depth=(True, False))),
    ])


@pytest.mark.parametrize("dims", ["acs", "soft_acs"])
def test_anisotropic_acs_models_continue_as_3d_with_acs_to_3d_like(dims):
    """(1, 3, 3) levels of an ACS / SoftACS U-Net are axial-only: with ``like`` they land as (1, 3, 3) kernels."""
    options = dict(strides=STRIDES, kernels=KERNELS, norm="batch")
    model, model3 = unet(dims, seed=3, **options), unet(3, **options)
    if dims == "soft_acs":  # non-zero mixings, so the test sees them
        nnx.update(model, jax.tree_util.tree_map_with_path(
            lambda p, v: np.random.default_rng(1).normal(size=v.shape).astype(np.float32)
            if acsjax.trees.leaf_name(p) == "view_logits" else v, nnx.state(model)))
    state3 = acsjax.acs_to_3d(nnx.state(model), like=nnx.state(model3))
    acsjax.assert_fits(state3, nnx.state(model3))
    nnx.update(model3, state3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 16, 16, 1)), jnp.float32)
    want = forward(model, x)
    assert float(jnp.std(want)) > 0.1
    chex.assert_trees_all_close(forward(model3, x), want, atol=1e-4)
    # Without `like`, the axial levels would become cubic ACS kernels: the tree does not fit.
    with pytest.raises(ValueError):
        acsjax.assert_fits(acsjax.acs_to_3d(nnx.state(model)), nnx.state(model3))
