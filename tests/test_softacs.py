"""SoftACS convolutions (ACSConv's SoftACSConv): the op, the layer, the models, the transforms, the app."""

import dataclasses
import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import acsjax
from acsjax.models import MODELS, UNet, blocks, build_model, param_count

VIEW = nnx.PathContains("view_logits")


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(0.0, scale, shape), jnp.float32)


def _plane(kernel, view):
    """The 2D kernel (k, k, I, O) written tap by tap into plane ``view`` of a cubic kernel, at index k // 2."""
    k, c = kernel.shape[0], kernel.shape[0] // 2
    cubic = jnp.zeros((k, k, k) + kernel.shape[2:], kernel.dtype)
    index = [(c, slice(None), slice(None)), (slice(None), c, slice(None)), (slice(None), slice(None), c)][view]
    return cubic.at[index].set(kernel)  # axial: (h, w) at depth c; coronal: (d, w); sagittal: (d, h)


def _cubic(kernel, logits):
    p = jax.nn.softmax(logits, axis=-1)
    return sum(_plane(kernel, v) * p[:, v] for v in range(3))


def _conv3d(x, cubic, strides, padding, groups):
    pads = [(padding, padding)] * 3 if isinstance(padding, int) else padding
    return jax.lax.conv_general_dilated(
        x, cubic, (strides,) * 3, pads, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), feature_group_count=groups,
        precision="highest",
    )


# k, stride, in channels, out channels, padding, groups, impl (None: the default, GEMM lowering on CPU)
CASES = [
    (3, 1, 1, 1, 1, 1, None),
    (3, 2, 2, 4, "SAME", 1, None),
    (3, 1, 4, 6, 0, 1, "xla"),
    (2, 1, 2, 6, "SAME", 1, None),
    (2, 2, 4, 2, 1, 1, None),
    (5, 1, 1, 2, 2, 1, None),
    (5, 2, 6, 4, "SAME", 1, "xla"),
    (3, 2, 6, 6, 1, 6, None),  # depthwise
]


@pytest.mark.parametrize("k, stride, cin, cout, padding, groups, impl", CASES)
def test_equals_the_explicit_cubic_kernel(k, stride, cin, cout, padding, groups, impl):
    x = _normal(0, (2, 7, 6, 5, cin))
    kernel = _normal(1, (k, k, cin // groups, cout))
    logits = _normal(2, (cout, 3), 2.0)
    fn = jax.jit(functools.partial(acsjax.soft_acs_conv, strides=stride, padding=padding, groups=groups, impl=impl))
    got = fn(x, kernel, logits)
    want = _conv3d(x, _cubic(kernel, logits), stride, padding, groups)
    assert got.shape == want.shape == (2, *acsjax.ops.conv_output_shape((7, 6, 5), (k,) * 3, stride, padding), cout)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)


def test_zero_logits_give_the_mean_of_the_three_planes():
    x = _normal(3, (1, 6, 7, 5, 2))
    kernel = _normal(4, (3, 3, 2, 4))
    got = acsjax.soft_acs_conv(x, kernel, jnp.zeros((4, 3)), padding=1)
    views = [_conv3d(x, _plane(kernel, v), 1, 1, 1) for v in range(3)]
    chex.assert_trees_all_close(got, sum(views) / 3, atol=1e-5)
    # and the planes are not all alike, so the test can tell a wrong mixing
    assert float(jnp.abs(views[0] - views[1]).max()) > 0.1


def test_gradients_match_the_reference_form():
    x = _normal(5, (1, 5, 6, 4, 2))
    kernel = _normal(6, (3, 3, 2, 3))
    logits = _normal(7, (3, 3))
    r = _normal(8, (1, 3, 3, 2, 3))

    def loss(fn, kernel, logits):
        return jnp.sum(fn(kernel, logits) * r)

    ours = lambda kk, ll: acsjax.soft_acs_conv(x, kk, ll, strides=2, padding=1)  # noqa: E731
    ref = lambda kk, ll: _conv3d(x, _cubic(kk, ll), 2, 1, 1)  # noqa: E731
    got = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1)))(kernel, logits)
    want = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1)))(kernel, logits)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(got[1]).max()) > 1e-3  # the logits do receive a gradient


def test_view_logits_shape_mismatch_names_both_shapes():
    x, kernel = jnp.zeros((1, 4, 4, 4, 2)), jnp.zeros((3, 3, 2, 4))
    with pytest.raises(ValueError, match=r"view_logits has shape \(4, 2\).*\(3, 3, 2, 4\) needs \(4, 3\)"):
        acsjax.soft_acs_conv(x, kernel, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"square"):
        acsjax.soft_acs_conv(x, jnp.zeros((3, 2, 2, 4)), jnp.zeros((4, 3)))


@pytest.mark.parametrize("k, stride, padding, depthwise", [(3, 1, 1, False), (3, 2, 1, False), (3, 1, 0, False),
                                                           (5, 2, 2, False), (3, 2, 1, True)])
def test_matches_acsconv_soft_acs_conv(k, stride, padding, depthwise):
    torch = pytest.importorskip("torch")
    operators = pytest.importorskip("acsconv.operators")
    torch.manual_seed(0)
    cin = cout = 6 if depthwise else None
    cin, cout = (6, 6) if depthwise else (3, 5)
    groups = cin if depthwise else 1
    layer = operators.SoftACSConv(cin, cout, k, stride=stride, padding=padding, groups=groups, bias=True)
    with torch.no_grad():
        layer.soft_w_core.normal_(0.0, 2.0)  # far from equal mixing
        layer.bias.normal_()
    x = torch.randn(2, cin, 9, 8, 7)
    with torch.no_grad():
        want = layer(x).numpy().transpose(0, 2, 3, 4, 1)
    kernel = jnp.asarray(layer.weight.detach().numpy().transpose(2, 3, 1, 0))  # OIHW -> HWIO
    logits = jnp.asarray(layer.soft_w_core.detach().numpy())
    bias = jnp.asarray(layer.bias.detach().numpy())
    fn = jax.jit(functools.partial(acsjax.soft_acs_conv, strides=stride, padding=padding, groups=groups))
    got = fn(jnp.asarray(x.numpy().transpose(0, 2, 3, 4, 1)), kernel, logits) + bias
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


def test_layer_holds_zero_logits_and_keeps_them_under_update():
    conv2d = acsjax.Conv(2, 4, 3, dims=2, rngs=nnx.Rngs(0))
    soft = acsjax.Conv(2, 4, 3, dims="soft_acs", rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(soft.view_logits[...], np.zeros((4, 3)))
    inflated = acsjax.inflate_params(nnx.state(conv2d), "soft_acs")
    assert "view_logits" not in inflated and inflated["kernel"].shape == (3, 3, 2, 4)
    nnx.update(soft, inflated)
    np.testing.assert_array_equal(soft.kernel[...], conv2d.kernel[...])
    np.testing.assert_array_equal(soft.view_logits[...], np.zeros((4, 3)))
    assert not hasattr(acsjax.Conv(2, 4, 3, dims="acs", rngs=nnx.Rngs(1)), "view_logits")


def test_edge_depth_padding_matches_the_3d_twin():
    kw = dict(strides=(2, 1, 2), depth_padding="edge")
    soft = blocks.Conv(2, 4, 3, dims="soft_acs", rngs=nnx.Rngs(0), **kw)
    soft.view_logits[...] = _normal(9, (4, 3), 2.0)
    full = blocks.Conv(2, 4, 3, dims=3, rngs=nnx.Rngs(1), **kw)
    nnx.update(full, acsjax.acs_to_3d(nnx.state(soft)))
    x = _normal(10, (1, 5, 6, 6, 2))
    with acsjax.ops.use_conv_impl("xla"):  # the lowerings are checked above; XLA's runs eagerly without compiling much
        chex.assert_trees_all_close(soft(x), full(x), atol=1e-5)


def _kernel_outputs(state) -> int:
    # A 1x1 convolution is the same on every plane (it is applied axially only), so it has no view logits.
    return sum(leaf.shape[-1] for name, leaf in acsjax.trees.flatten(state).items() if name.endswith("kernel")
               and len(leaf.shape) == 4 and leaf.shape[0] > 1)


@pytest.mark.parametrize("name", ["unet", "efficientnet_lite0"])
def test_parameter_count_is_2d_plus_three_per_output_channel(name):
    build = lambda dims: nnx.eval_shape(  # noqa: E731
        lambda: build_model(name, dims=dims, in_channels=1, num_classes=2, rngs=nnx.Rngs(0))
    )
    model2d = build(2)
    assert param_count(build("soft_acs")) == param_count(model2d) + 3 * _kernel_outputs(nnx.state(model2d))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_traces_with_soft_acs(name):
    model = nnx.eval_shape(lambda: build_model(name, dims="soft_acs", in_channels=1, num_classes=2, rngs=nnx.Rngs(0)))
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((1, 32, 32, 32, 1), jnp.float32))
    assert out.shape == ((1, 32, 32, 32, 2) if name.endswith("unet") else (1, 2))


def _filled(dims, seed, **kw):
    """The UNet built abstractly and filled with numpy random values (no initialiser compilations)."""
    model = nnx.eval_shape(lambda: UNet(dims=dims, rngs=nnx.Rngs(0), **kw))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = acsjax.trees.leaf_name(path)
        if name == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        scale = 2.0 if name == "view_logits" else np.sqrt(2.0 / np.prod(leaf.shape[:-1])) if name == "kernel" else 0.1
        return (float(name == "scale") + rng.normal(0.0, scale, leaf.shape)).astype(np.float32)

    nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.state(model)))
    return model


def test_soft_acs_unet_from_2d_twin_and_back_to_3d():
    kw = dict(in_channels=1, num_classes=3, widths=(4, 8), norm="batch")
    model2d, soft = _filled(2, 0, **kw), _filled("soft_acs", 1, **kw)
    logits = nnx.state(soft, VIEW)
    # One (cout, 3) array per convolution wider than 1x1 (a 1x1 kernel is the same on every plane).
    wide = [k for k in acsjax.trees.flatten(nnx.state(model2d, nnx.PathContains("kernel"))).values() if k.shape[0] > 1]
    assert len(acsjax.trees.flatten(logits)) == len(wide)
    # The inflated tree is the SoftACS model's state without its view logits, which nnx.update leaves alone.
    inflated = acsjax.inflate_params(nnx.state(model2d), "soft_acs")
    acsjax.assert_fits(inflated, nnx.state(soft, nnx.Not(VIEW)))
    nnx.update(soft, inflated)
    chex.assert_trees_all_equal(nnx.state(soft, VIEW), logits)
    chex.assert_trees_all_equal(soft.encoder[0].conv1.conv.kernel[...], model2d.encoder[0].conv1.conv.kernel[...])

    soft.eval()
    forward = nnx.jit(lambda m, x: m(x))
    x = _normal(11, (1, 8, 8, 8, 1))
    state3 = jax.jit(acsjax.acs_to_3d)(nnx.state(soft))
    assert not any("view_logits" in name for name in acsjax.trees.flatten(state3))
    model3 = nnx.eval_shape(lambda: UNet(dims=3, rngs=nnx.Rngs(0), **kw))
    acsjax.assert_fits(state3, nnx.state(model3))
    nnx.update(model3, state3)
    model3.eval()
    with acsjax.ops.use_conv_impl("xla"):  # compiles faster; the GEMM lowering is checked op by op above
        want, got = forward(soft, x), forward(model3, x)
    assert float(jnp.std(want)) > 0.1
    chex.assert_trees_all_close(got, want, atol=1e-4)


def test_acs_to_3d_on_nested_dicts_linen_variables_and_frozen_dicts():
    soft = acsjax.Conv(2, 4, 3, dims="soft_acs", rngs=nnx.Rngs(0))
    soft.view_logits[...] = _normal(13, (4, 3), 2.0)
    pure = {"block": nnx.state(soft).to_pure_dict()}
    want = _cubic(soft.kernel[...], soft.view_logits[...])
    for tree in (pure, {"params": pure}, flax.core.freeze({"params": pure})):
        got = acsjax.trees.flatten(acsjax.acs_to_3d(tree))
        assert sorted(k.removeprefix("params/") for k in got) == ["block/bias", "block/kernel"]
        chex.assert_trees_all_close(got[next(k for k in got if k.endswith("kernel"))], want, atol=1e-6)


def test_acs_to_3d_refuses_logits_without_a_2d_kernel():
    tree = {"conv": {"kernel": jnp.zeros((3, 3, 3, 2, 4)), "view_logits": jnp.zeros((4, 3))}}
    with pytest.raises(ValueError, match=r"^conv/view_logits: view_logits without a sibling 2-D kernel"):
        acsjax.acs_to_3d(tree)
    # ACS trees (no logits) keep their own materialisation.
    acs = {"conv": {"kernel": _normal(12, (3, 3, 2, 3))}}
    assert acsjax.acs_to_3d(acs)["conv"]["kernel"].shape == (3, 3, 3, 2, 3)


def test_app_knows_soft_acs():
    from train import config as config_lib

    config = config_lib.validate(config_lib.preset("cpu-tiny", init="soft_acs"))
    assert config.model_dims == "soft_acs" and config.pretrained_source == "slices"
    assert "soft_acs" in config_lib.INITS and "soft_acs" in acsjax.METHODS


def test_imagenet_efficientnet_lite0_as_soft_acs():
    """The shipped 2D weights as they are, and one concrete zero (cout, 3) view-logit array per convolution
    wider than 1x1 (the pointwise ones are the same on every plane and have none)."""
    from acsjax import pretrained

    flat = acsjax.trees.flatten(nnx.state(pretrained.efficientnet_lite0(dims="soft_acs")))
    assert not [k for k, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)]
    kernels = {k.rpartition("/")[0]: v for k, v in flat.items()
               if k.endswith("/kernel") and v.ndim == 4 and v.shape[0] > 1}
    logits = {k.rpartition("/")[0]: v for k, v in flat.items() if k.endswith("/view_logits")}
    assert set(logits) == set(kernels) and len(logits) > 15
    for parent, value in logits.items():
        assert value.shape == (kernels[parent].shape[-1], 3) and not np.any(np.asarray(value)), parent


@pytest.mark.slow
def test_app_trains_soft_acs_from_a_2d_checkpoint(tmp_path):
    """--init=soft_acs from an Orbax 2D checkpoint: kernels from the checkpoint, view logits from zero."""
    import orbax.checkpoint as ocp

    from train import config as config_lib
    from train import init, run
    from train.checkpoint import load_arrays

    base = config_lib.preset("cpu-tiny", workdir=str(tmp_path / "run"), steps=1, eval_every=0)
    source = run.open_source(base, "train")
    model2d = init.model_fn(base, in_channels=source.num_channels, num_classes=source.num_classes, dims=2)(nnx.Rngs(3))
    tree2d = nnx.state(model2d).to_pure_dict()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp_path / "twin").absolute(), tree2d)
    checkpointer.wait_until_finished()
    config = config_lib.validate(dataclasses.replace(base, init="soft_acs", pretrained=str(tmp_path / "twin")))
    summary = run.train_and_evaluate(config)
    assert summary["init"] == "soft_acs" and summary["dims"] == "soft_acs"
    _, state = load_arrays(tmp_path / "run" / "checkpoints")
    params = {k.removesuffix("/value"): v for k, v in acsjax.trees.flatten(state["params"]).items()}
    flat2d = acsjax.trees.flatten(tree2d)
    logits = [k for k in params if k.endswith("view_logits")]
    assert logits and set(params) - set(logits) <= set(flat2d)
    # One AdamW step moves each entry by at most lr (1e-2) plus decay, far less than a random start differs.
    for name, value in params.items():
        start = np.zeros_like(value) if name in logits else flat2d[name]
        np.testing.assert_allclose(value, start, rtol=0, atol=1.01e-2, err_msg=name)
