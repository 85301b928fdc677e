"""Tests for acsjax.models: registry, inflation between dims, modes, remat, dtype, errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import acsjax
from acsjax.models import MODELS, SEGMENTATION, UNet, build_model, param_count
from acsjax.models import __main__ as models_main

METHOD_FOR_DIMS = {3: "average", "acs": "acs", "2.5d": "2.5d"}


def numpy_init(abstract, seed=0):
    """Fills an ``nnx.eval_shape`` model with numpy random values.

    Eager JAX random initialisation compiles a sampler per kernel shape (about a
    second each on a small CPU); numpy needs no compilation.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = acsjax.trees.leaf_name(path), leaf.shape
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        base = 1.0 if name == "scale" else 0.0
        return (base + 0.1 * rng.normal(size=shape)).astype(np.float32)

    nnx.update(abstract, jax.tree_util.tree_map_with_path(fill, nnx.state(abstract)))
    return abstract


@functools.lru_cache(maxsize=None)
def abstract_model(name, dims, in_channels=1, num_classes=2):
    """The model built with nnx.eval_shape: shapes only, no initialisation."""
    return nnx.eval_shape(
        lambda: build_model(name, dims=dims, in_channels=in_channels, num_classes=num_classes, rngs=nnx.Rngs(0))
    )


def small_unet(dims, seed=0, **options):
    options = {"widths": (4, 8, 16), "norm": "batch", **options}
    model = nnx.eval_shape(lambda: UNet(dims=dims, in_channels=1, num_classes=3, rngs=nnx.Rngs(0), **options))
    return numpy_init(model, seed)


@pytest.mark.parametrize("name", list(MODELS))
def test_inflated_2d_state_fits_every_dims(name):
    """inflate_params(nnx.state(model2d)) has exactly the 3D / ACS / 2.5D model's paths and shapes."""
    state2d = nnx.state(abstract_model(name, 2))
    for dims, method in METHOD_FOR_DIMS.items():
        inflated = jax.eval_shape(lambda s: acsjax.inflate_params(s, method), state2d)
        acsjax.assert_fits(inflated, nnx.state(abstract_model(name, dims)), what=f"{name} {method}")
    # The depthwise kernels of EfficientNet inflate like any other kernel.
    if name.startswith("efficientnet"):
        flat = acsjax.trees.flatten(nnx.state(abstract_model(name, 3)))
        key = next(k for k in flat if k.endswith("blocks/1/depthwise_conv/kernel"))
        assert flat[key].shape == (3, 3, 3, 1, 96)


def test_parameter_counts():
    """ACS and 2.5D keep the 2D count; torchvision's published ResNet counts are reproduced."""
    for name in MODELS:
        n2 = param_count(abstract_model(name, 2))
        assert param_count(abstract_model(name, "acs")) == n2, name
        assert param_count(abstract_model(name, "2.5d")) == n2, name
        assert param_count(abstract_model(name, 3)) > n2, name
    # torchvision.models.resnet{18,34,50}(): 11,689,512 / 21,797,672 / 25,557,032 parameters.
    for name, expected in (("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)):
        assert param_count(abstract_model(name, 2, 3, 1000)) == expected


def test_main_prints_count_table(capsys):
    models_main.main(["--in-channels", "1", "--num-classes", "2", "--models", "unet,resnet18"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| resnet18 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == cells[3] == f"{param_count(abstract_model('resnet18', 2)):,}"  # 2D == ACS
    assert cells[2] == f"{param_count(abstract_model('resnet18', 3)):,}"
    assert len([line for line in out.splitlines() if line.startswith("| ")]) == 3  # header and two models


@pytest.mark.slow  # a whole run (or several compiles); `pytest -m slow` runs it
def test_boring_volume_resnet_unet():
    """resnet18_unet 2D -> 3D ('average', edge depth padding): every slice of the 3D output equals the 2D output."""
    kw = dict(in_channels=1, num_classes=2, pool_depth=False, depth_padding="edge")
    model2d = numpy_init(nnx.eval_shape(lambda: build_model("resnet18_unet", dims=2, rngs=nnx.Rngs(0), **kw)))
    model3d = nnx.eval_shape(lambda: build_model("resnet18_unet", dims=3, rngs=nnx.Rngs(0), **kw))
    nnx.update(model3d, jax.jit(lambda s: acsjax.inflate_params(s, "average"))(nnx.state(model2d)))
    model2d.eval()
    model3d.eval()
    image = jax.random.normal(jax.random.key(3), (1, 32, 32, 1))
    volume = jnp.repeat(image[:, None], 3, axis=1)
    out2d = nnx.jit(lambda m, x: m(x))(model2d, image)
    out3d = nnx.jit(lambda m, x: m(x))(model3d, volume)
    assert out3d.shape == (1, 3, 32, 32, 2)
    assert float(jnp.std(out2d)) > 1e-3  # not a degenerate (constant) output
    for d in range(3):
        chex.assert_trees_all_close(out3d[:, d], out2d, atol=1e-4, rtol=1e-4)


def test_deep_supervision_and_modes():
    model = small_unet("acs", deep_supervision=True)
    x = jax.random.normal(jax.random.key(0), (2, 8, 16, 16, 1))
    forward = nnx.jit(lambda m, x: m(x))
    mean_before = np.asarray(model.encoder[0].conv1.norm.mean[...])
    main, aux = forward(model, x)  # train mode after construction: (main, aux) and BatchNorm statistics move
    chex.assert_shape(main, (2, 8, 16, 16, 3))
    chex.assert_shape(aux, (2, 4, 8, 8, 3))
    assert main.dtype == jnp.float32
    assert not np.allclose(model.encoder[0].conv1.norm.mean[...], mean_before)
    model.eval()
    mean_eval = np.asarray(model.encoder[0].conv1.norm.mean[...])
    out = forward(model, x)
    assert isinstance(out, jax.Array) and out.shape == (2, 8, 16, 16, 3)
    np.testing.assert_array_equal(model.encoder[0].conv1.norm.mean[...], mean_eval)
    chex.assert_trees_all_close(forward(model, x), out)


def test_remat_same_outputs_and_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
    grads, outs = [], []
    for remat in (None, "nothing_saveable"):
        model = small_unet(2, remat=remat)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, rest, x):
            # copy=True: BatchNorm (train mode) writes its statistics into fresh variables.
            return jnp.mean(nnx.merge(graphdef, params, rest, copy=True)(x) ** 2)

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, rest, x))
        assert ("remat" in jaxpr) == (remat is not None)
        value, g = jax.jit(jax.value_and_grad(loss))(params, rest, x)
        outs.append(value)
        grads.append(g)
    chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-6)
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_float32_params():
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 1))
    ref = small_unet(2)
    ref.eval()
    model = small_unet(2, dtype=jnp.bfloat16)
    model.eval()
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    forward = nnx.jit(lambda m, x: m(x))
    y = forward(model, x)
    assert y.dtype == jnp.float32
    y32 = forward(ref, x)
    chex.assert_trees_all_close(y, y32, atol=0.1, rtol=0.05)
    # The compute really is bfloat16: every convolution and matmul of the
    # traced program takes bf16 operands (a model ignoring dtype= would pass
    # the checks above), and the output differs from float32 by more than
    # float32 rounding (bf16 keeps 8 mantissa bits).
    ops = _heavy_ops(jax.make_jaxpr(lambda x: model(x))(x).jaxpr)
    assert ops and all(dtypes == {"bfloat16"} for _, dtypes in ops), ops
    assert all(dtypes == {"float32"} for _, dtypes in _heavy_ops(jax.make_jaxpr(lambda x: ref(x))(x).jaxpr))
    assert float(jnp.max(jnp.abs(y - y32))) > 1e-3


def _heavy_ops(jaxpr) -> list[tuple[str, set[str]]]:
    """(primitive, input dtypes) of every convolution and dot in ``jaxpr``, nested calls included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            found.append((eqn.primitive.name, {str(v.aval.dtype) for v in eqn.invars}))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _heavy_ops(inner)
    return found


def test_efficientnet_encoder_features():
    """Skips at strides 2..32 with lukemelas channel counts; segmentation output at full size."""
    model = abstract_model("efficientnet_lite0", 2, 3, 1000)
    assert model.feature_channels == (16, 24, 40, 112, 320)
    assert model.feature_strides == ((2, 2), (4, 4), (8, 8), (16, 16), (32, 32))
    unet = abstract_model("efficientnet_lite0_unet", "acs")
    assert unet.size_divisor == (32, 32, 32)
    assert SEGMENTATION == ("unet", "resnet18_unet", "resnet34_unet", "resnet50_unet", "efficientnet_lite0_unet")


def test_medical_stem_options_change_strides():
    net = nnx.eval_shape(
        lambda: build_model(
            "resnet18_unet", dims=3, in_channels=1, num_classes=2, rngs=nnx.Rngs(0),
            stem_stride=1, stem_pool=False, pool_depth=False,
        )
    )
    assert net.encoder.feature_strides == ((1, 1, 1), (1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8))
    assert net.size_divisor == (1, 8, 8)
    assert len(net.decoder.blocks) == 4  # no extra upsampling block at full resolution


def test_bad_input_errors():
    rngs = nnx.Rngs(0)
    model = small_unet(3)
    cases = [
        (ValueError, "unknown model 'resnet19'.*resnet18",
         lambda: build_model("resnet19", dims=2, in_channels=1, num_classes=2, rngs=rngs)),
        (ValueError, r"unet: dims must be one of .*got '3d'",
         lambda: build_model("unet", dims="3d", in_channels=1, num_classes=2, rngs=rngs)),
        (TypeError, "unknown option.*'widht'.*widths",
         lambda: build_model("unet", dims=2, in_channels=1, num_classes=2, rngs=rngs, widht=(4, 8))),
        (ValueError, "norm must be one of",
         lambda: build_model("unet", dims=2, in_channels=1, num_classes=2, rngs=rngs, norm="layer")),
        (ValueError, "remat must be",
         lambda: build_model("resnet18", dims=2, in_channels=1, num_classes=2, rngs=rngs, remat="save_all")),
        (ValueError, "depth_padding must be one of",
         lambda: build_model("unet", dims=3, in_channels=1, num_classes=2, rngs=rngs, depth_padding="wrap")),
        (ValueError, "num_layers must be one of", lambda: acsjax.models.ResNet(101, rngs=rngs)),
        (ValueError, r"unet: input spatial shape \(10, 16, 16\) must be divisible by \(4, 4, 4\).*to \(12, 16, 16\)",
         lambda: model(jnp.zeros((1, 10, 16, 16, 1)))),
        (ValueError, r"expects NDHWC input with 1 channels, got shape \(1, 16, 16, 1\)",
         lambda: model(jnp.zeros((1, 16, 16, 1)))),
    ]
    for exc, pattern, fn in cases:
        with pytest.raises(exc, match=pattern) as info:
            fn()
        assert "\n" not in str(info.value), str(info.value)


# The larger members of each family compile for 5-13 s each on two CPU cores: they run with -m slow.
_HEAVY = ("resnet34", "resnet50", "resnet34_unet", "resnet50_unet", "efficientnet_lite0", "efficientnet_lite0_unet")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n for n in MODELS])
def test_output_shapes_every_dims(name):
    """Traced forward passes (no compilation): logits of the documented shapes for every dims."""
    for dims in (2, 3, "acs", "2.5d"):
        model = abstract_model(name, dims)
        spatial = (32, 32) if dims == 2 else (32, 32, 32)
        x = jax.ShapeDtypeStruct((1, *spatial, 1), jnp.float32)
        out = nnx.eval_shape(lambda m, x: m(x), model, x)
        expected = (1, *spatial, 2) if name in SEGMENTATION else (1, 2)
        assert out.shape == expected and out.dtype == jnp.float32, (name, dims, out)
