"""Properties of the 2D -> 3D / ACS transforms (acsjax.inflate) and the layers that consume them."""

import chex
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import acsjax
from acsjax import layers

ATOL = 2e-5


class TinyNet(nnx.Module):
    """conv -> BatchNorm -> ReLU -> in-plane max-pool -> conv: the same class in 2D, 3D and ACS."""

    def __init__(self, dims, *, padding_mode="zeros", cout=6, rngs):
        self.dims = dims
        self.conv1 = acsjax.Conv(2, cout, 3, dims=dims, padding_mode=padding_mode, rngs=rngs)
        self.norm = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = acsjax.Conv(cout, 5, 3, dims=dims, padding_mode=padding_mode, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.norm(self.conv1(x)))
        x = layers.max_pool(x, self.dims, 2, pool_depth=False)
        return self.conv2(x)


def _twin(method, dims=3, padding_mode="zeros", **options):
    net2d = TinyNet(2, padding_mode=padding_mode, rngs=nnx.Rngs(0))
    net3d = TinyNet(dims, padding_mode=padding_mode, rngs=nnx.Rngs(1))
    nnx.update(net3d, acsjax.inflate_params(nnx.state(net2d), method, **options))
    return net2d, net3d


def _image(seed=0, shape=(2, 12, 10, 2)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _boring_volume(image, depth):
    return jnp.repeat(image[:, None], depth, axis=1)


@pytest.mark.parametrize(
    "method,options",
    [
        ("average", {}),
        ("scale", {}),
        ("scale", {"alphas": "gaussian"}),
        ("scale", {"alphas": (0.2, 0.5, 0.3)}),
    ],
)
def test_boring_volume_reproduces_2d_output(method, options):
    """I3D's property: an image repeated along depth gives the 2D output (centre slice; every slice with edge padding)."""
    depth = 9
    image = _image()
    net2d, net3d = _twin(method, **options)
    # Evaluation mode: with zero depth padding the border slices differ, and batch statistics would mix them in.
    net2d.eval()
    net3d.eval()
    want = net2d(image)
    got = net3d(_boring_volume(image, depth))
    chex.assert_shape(got, (2, depth) + want.shape[1:])
    # Zero padding along depth: slices farther than the receptive field (2 convs of 3 taps) from a border match.
    chex.assert_trees_all_close(got[:, depth // 2], want, atol=ATOL)
    chex.assert_trees_all_close(got[:, 2:-2], jnp.broadcast_to(want[:, None], got[:, 2:-2].shape), atol=ATOL)
    assert float(jnp.abs(got[:, 0] - want).max()) > 1e-3, "zero depth padding should change the border slices"

    # Edge padding makes every slice identical, so even batch statistics (train mode) agree.
    net2d, net3d = _twin(method, padding_mode="edge", **options)
    got = net3d(_boring_volume(image, depth))
    chex.assert_trees_all_close(got, jnp.broadcast_to(net2d(image)[:, None], got.shape), atol=ATOL)


@pytest.mark.parametrize("position", ["center", "first", 2])
def test_center_inflation_is_slice_by_slice(position):
    volume = _image(1, (2, 5, 12, 10, 2))
    net2d, net3d = _twin("center", position=position)
    got = net3d(volume)
    n, d = volume.shape[:2]
    slices = net2d(volume.reshape((n * d,) + volume.shape[2:]))
    want = slices.reshape((n, d) + slices.shape[1:])
    if position == "center":
        chex.assert_trees_all_close(got, want, atol=ATOL)
    else:
        # An off-centre tap shifts which input slice each output slice sees.
        assert float(jnp.abs(got - want).max()) > 1e-3


def test_zero_is_an_alias_of_center():
    kernel = jnp.arange(2 * 2 * 1 * 1, dtype=jnp.float32).reshape(2, 2, 1, 1)
    chex.assert_trees_all_equal(acsjax.inflate_kernel(kernel, "zero"), acsjax.inflate_kernel(kernel, "center"))


def test_tap_weights_per_method():
    kernel = jnp.ones((3, 3, 1, 1))
    taps = lambda method, **kw: np.asarray(acsjax.inflate_kernel(kernel, method, **kw)[:, 1, 1, 0, 0])
    np.testing.assert_allclose(taps("center"), [0, 1, 0])
    np.testing.assert_allclose(taps("center", position="first"), [1, 0, 0])
    np.testing.assert_allclose(taps("average"), [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(taps("scale"), [0.25, 0.5, 0.25], rtol=1e-6)
    np.testing.assert_allclose(taps("scale", alphas=(0.6, 0.3, 0.1)), [0.6, 0.3, 0.1], rtol=1e-6)
    np.testing.assert_allclose(taps("average", depth=5), [0.2] * 5, rtol=1e-6)
    assert acsjax.inflate_kernel(kernel, "2.5d").shape == (1, 3, 3, 1, 1)
    assert acsjax.inflate_kernel(jnp.ones((1, 1, 4, 8)), "scale").shape == (1, 1, 1, 4, 8)
    assert acsjax.inflate_kernel(kernel, "acs") is kernel
    for name in acsjax.ALPHA_PROFILES:
        for depth in (1, 2, 3, 7):
            a = acsjax.alpha_profile(name, depth)
            assert np.all(a > 0) and abs(a.sum() - 1) < 1e-12


def _conv_in_plane(volume, kernel2d, plane):
    """A 2D conv applied to every slice of ``volume`` orthogonal to ``plane``'s missing axis."""
    axis = 1 + acsjax.PLANES[plane]
    moved = jnp.moveaxis(volume, axis, 1)
    n, m = moved.shape[:2]
    out = acsjax.conv(moved.reshape((n * m,) + moved.shape[2:]), kernel2d, padding=1)
    return jnp.moveaxis(out.reshape((n, m) + out.shape[1:]), 1, axis)


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_plane_puts_the_kernel_in_that_plane(plane):
    rng = np.random.default_rng(3)
    kernel2d = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
    volume = jnp.asarray(rng.normal(size=(1, 6, 7, 8, 2)), jnp.float32)
    kernel3d = acsjax.inflate_kernel(kernel2d, "center", plane=plane)
    got = acsjax.conv(volume, kernel3d, padding=1)
    chex.assert_trees_all_close(got, _conv_in_plane(volume, kernel2d, plane), atol=1e-5)
    for other in set(acsjax.PLANES) - {plane}:
        assert float(jnp.abs(got - _conv_in_plane(volume, kernel2d, other)).max()) > 1e-2


@pytest.mark.parametrize("cout", [7, 8, 9])
@pytest.mark.parametrize("shape", [(1, 7, 9, 8), (2, 8, 8, 6)])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("k,padding", [(3, 1), (3, "SAME"), (2, 0), (3, "VALID")])
def test_acs_conv_equals_3d_conv_with_acs_to_3d_kernel(cout, shape, strides, k, padding):
    rng = np.random.default_rng(cout)
    x = jnp.asarray(rng.normal(size=shape + (3,)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, 3, cout)), jnp.float32)
    got = acsjax.acs_conv(x, kernel, strides=strides, padding=padding)
    want = acsjax.conv(x, acsjax.acs_to_3d({"kernel": kernel})["kernel"], strides=strides, padding=padding)
    chex.assert_equal_shape([got, want])
    chex.assert_trees_all_close(got, want, atol=1e-4)


def test_acs_kernel_split_follows_acsconv():
    assert acsjax.acs_kernel_split(9) == (3, 3, 3)
    assert acsjax.acs_kernel_split(7) == (3, 2, 2)
    assert acsjax.acs_kernel_split(8) == (3, 3, 2)
    assert acsjax.acs_kernel_split(1) == (1, 0, 0)


def test_acs_groups_are_axial_coronal_sagittal():
    """Output channel 0 sees an axial (1,k,k) window, 1 a coronal (k,1,k), 2 a sagittal (k,k,1)."""
    kernel = jnp.zeros((3, 3, 1, 3)).at[0, 0].set(1.0)  # one tap: offset (-1, -1) in the group's plane
    x = jnp.zeros((1, 5, 5, 5, 1)).at[0, 1, 1, 1, 0].set(1.0)
    y = acsjax.acs_conv(x, kernel, padding=1)
    assert float(y[0, 1, 2, 2, 0]) == 1.0  # axial: shifts H and W
    assert float(y[0, 2, 1, 2, 1]) == 1.0  # coronal: shifts D and W
    assert float(y[0, 2, 2, 1, 2]) == 1.0  # sagittal: shifts D and H


@pytest.mark.parametrize("cout", [7, 8, 9])
@pytest.mark.parametrize("size", [8, 9])
def test_acs_net_equals_its_acs_to_3d_twin(cout, size):
    acs = TinyNet("acs", cout=cout, rngs=nnx.Rngs(4))
    full = TinyNet(3, cout=cout, rngs=nnx.Rngs(5))
    nnx.update(full, acsjax.acs_to_3d(nnx.state(acs)))
    x = _image(2, (2, size, size, size - 1, 2))
    chex.assert_trees_all_close(acs(x), full(x), atol=1e-4)


def test_strided_acs_conv_layer_matches_twin():
    acs = acsjax.Conv(2, 8, 3, dims="acs", strides=2, rngs=nnx.Rngs(0))
    full = acsjax.Conv(2, 8, 3, dims=3, strides=2, rngs=nnx.Rngs(1))
    nnx.update(full, acsjax.acs_to_3d(nnx.state(acs)))
    x = _image(5, (1, 9, 8, 7, 2))
    chex.assert_trees_all_close(acs(x), full(x), atol=1e-4)


def test_project_params_inverts_inflation():
    net2d = TinyNet(2, rngs=nnx.Rngs(0))
    state2d = nnx.state(net2d)
    for method in ("center", "average", "scale", "2.5d"):
        back = acsjax.project_params(acsjax.inflate_params(state2d, method))
        chex.assert_trees_all_close(back, state2d, atol=1e-6)
    coronal = acsjax.inflate_params(state2d, "average", plane="coronal")
    chex.assert_trees_all_close(acsjax.project_params(coronal, plane="coronal"), state2d, atol=1e-6)


def test_adapt_input_channels_sum_gives_grey_response():
    rng = np.random.default_rng(7)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
    grey = jnp.asarray(rng.normal(size=(1, 8, 8, 1)), jnp.float32)
    want = acsjax.conv(jnp.repeat(grey, 3, axis=-1), kernel, padding=1)
    got = acsjax.conv(grey, acsjax.adapt_input_channels(kernel, 1, "sum"), padding=1)
    chex.assert_trees_all_close(got, want, atol=1e-5)
    # n identical modalities also give the grey response with 'sum'.
    got4 = acsjax.conv(jnp.repeat(grey, 4, axis=-1), acsjax.adapt_input_channels(kernel, 4, "sum"), padding=1)
    chex.assert_trees_all_close(got4, want, atol=1e-5)


def test_adapt_input_channels_repeat_keeps_magnitude():
    rng = np.random.default_rng(8)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 64)), jnp.float32)
    rgb = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)
    ref = float(jnp.std(acsjax.conv(rgb, kernel, padding=1)))
    for n in (1, 2, 5, 6):
        adapted = acsjax.adapt_input_channels(kernel, n, "repeat")
        chex.assert_shape(adapted, (3, 3, n, 64))
        x = jnp.asarray(rng.normal(size=(4, 16, 16, n)), jnp.float32)
        ratio = float(jnp.std(acsjax.conv(x, adapted, padding=1))) / ref
        # Independent unit-variance inputs: sum of n scaled copies has std ratio sqrt(3/n)*... within a factor ~2.
        assert 0.4 < ratio < 2.5, (n, ratio)
    # Repeat with n == 3 is the identity.
    chex.assert_trees_all_close(acsjax.adapt_input_channels(kernel, 3, "repeat"), kernel)
    # n == 6 with identical halves reproduces the RGB response exactly.
    twice = acsjax.conv(jnp.concatenate([rgb, rgb], -1), acsjax.adapt_input_channels(kernel, 6, "repeat"), padding=1)
    chex.assert_trees_all_close(twice, acsjax.conv(rgb, kernel, padding=1), atol=1e-4)


def _linen_variables():
    class LinenNet(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = linen.Conv(4, (3, 3), name="conv")(x)
            x = linen.BatchNorm(use_running_average=False, name="bn")(x)
            return linen.Dense(2, name="head")(x)

    return LinenNet().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def test_works_on_nnx_state_dicts_and_linen_variables():
    net = TinyNet(2, rngs=nnx.Rngs(0))
    state = nnx.state(net)
    out = acsjax.inflate_params(state, "average")
    assert type(out) is type(state)
    assert out["conv1"]["kernel"][...].shape == (3, 3, 3, 2, 6)
    chex.assert_trees_all_equal(out["norm"]["mean"][...], state["norm"]["mean"][...])

    plain = nnx.to_pure_dict(state)
    out = acsjax.inflate_params(plain, "scale")
    assert isinstance(out, dict) and out["conv2"]["kernel"].shape == (3, 3, 3, 6, 5)

    variables = _linen_variables()
    out = acsjax.inflate_params(variables, "center")
    assert out["params"]["conv"]["kernel"].shape == (3, 3, 3, 1, 4)
    assert out["params"]["head"]["kernel"].shape == (4, 2)  # dense kernels pass through
    chex.assert_trees_all_equal(out["batch_stats"], variables["batch_stats"])


def test_is_jittable_and_pure():
    variables = _linen_variables()
    inflate = jax.jit(lambda p: acsjax.inflate_params(p, "scale", alphas="gaussian"))
    chex.assert_trees_all_close(inflate(variables), acsjax.inflate_params(variables, "scale", alphas="gaussian"))
    materialised = jax.jit(acsjax.acs_to_3d)(variables)
    assert materialised["params"]["conv"]["kernel"].shape == (3, 3, 3, 1, 4)
    chex.assert_trees_all_close(materialised, acsjax.acs_to_3d(variables))
    abstract = jax.eval_shape(lambda p: acsjax.inflate_params(p, "average"), variables)
    assert abstract["params"]["conv"]["kernel"].shape == (3, 3, 3, 1, 4)
    before = jax.tree.map(np.asarray, variables)
    acsjax.inflate_params(variables, "average")
    chex.assert_trees_all_equal(variables, before)


def test_rules_override_per_path():
    state = nnx.state(TinyNet(2, rngs=nnx.Rngs(0)))
    out = acsjax.inflate_params(state, "average", rules={r"conv1/": {"method": "2.5d"}, "conv2": {"depth": 5}})
    assert out["conv1"]["kernel"][...].shape == (1, 3, 3, 2, 6)
    assert out["conv2"]["kernel"][...].shape == (5, 3, 3, 6, 5)


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda s: acsjax.inflate_params(s, "bogus"), r"unknown inflation method 'bogus'.*center.*average.*scale"),
        (lambda s: acsjax.inflate_params(s, "scale", alphas=(0.5, -0.1, 0.6)), r"conv1/kernel: alphas must all be positive"),
        (lambda s: acsjax.inflate_params(s, "scale", alphas=(0.5, 0.2, 0.2)), r"conv1/kernel: alphas must sum to 1"),
        (lambda s: acsjax.inflate_params(s, "scale", alphas=(0.5, 0.5)), r"conv1/kernel: alphas has shape \(2,\).*\(3,\)"),
        (lambda s: acsjax.inflate_params(s, "scale", alphas="steep"), r"unknown alpha profile 'steep'"),
        (lambda s: acsjax.inflate_params(s, "center", position=7), r"conv1/kernel: position"),
        (lambda s: acsjax.inflate_params(s, "average", plane="oblique"), r"unknown plane 'oblique'"),
        (lambda s: acsjax.inflate_params(s, rules={"decoder": {"depth": 1}}), r"rules \['decoder'\] matched no"),
        (lambda s: acsjax.inflate_params(s, rules={"conv1": {"dpeth": 1}}), r"unknown options \['dpeth'\]"),
        (lambda s: acsjax.inflate_params(acsjax.inflate_params(s), "average"), r"conv1/kernel: expected a 2-D .*\(3, 3, 3, 2, 6\)"),
        (lambda s: acsjax.inflate_kernel(jnp.ones((3, 3, 3)), path="enc/kernel"), r"enc/kernel: expected a 2-D .*\(3, 3, 3\)"),
        (lambda s: acsjax.acs_to_3d({"c": {"kernel": jnp.ones((3, 2, 1, 1))}}), r"c/kernel: ACS needs a square kernel"),
        (lambda s: acsjax.adapt_input_channels(jnp.ones((3, 3, 3, 4)), 2, "max"), r"unknown mode 'max'"),
    ],
)
def test_bad_input_names_path_and_shapes(call, pattern):
    state = nnx.state(TinyNet(2, rngs=nnx.Rngs(0)))
    with pytest.raises((ValueError, TypeError), match=pattern):
        call(state)


def test_tree_that_does_not_fit_the_target_model():
    state2d = nnx.state(TinyNet(2, rngs=nnx.Rngs(0)))
    target = nnx.state(TinyNet(3, cout=7, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"at 'conv1/bias': shape \(6,\), model expects \(7,\)"):
        acsjax.assert_fits(acsjax.inflate_params(state2d), target)
    with pytest.raises(ValueError, match=r"missing 1 \(first: extra/kernel\)"):
        acsjax.assert_fits({"a": {"kernel": jnp.ones(2)}}, {"a": {"kernel": jnp.ones(2)}, "extra": {"kernel": 1.0}})
    acsjax.assert_fits(acsjax.inflate_params(state2d), nnx.state(TinyNet(3, rngs=nnx.Rngs(1))))


def test_conv_layer_rejects_unknown_dims():
    with pytest.raises(ValueError, match=r"dims must be one of \(2, 3, 'acs', 'soft_acs', '2.5d'\), got 4"):
        acsjax.Conv(1, 1, 3, dims=4, rngs=nnx.Rngs(0))


def test_25d_layer_matches_inflated_2d():
    conv2d = acsjax.Conv(2, 4, 3, dims=2, rngs=nnx.Rngs(0))
    conv25 = acsjax.Conv(2, 4, 3, dims="2.5d", rngs=nnx.Rngs(1))
    nnx.update(conv25, acsjax.inflate_params(nnx.state(conv2d), "2.5d"))
    volume = _image(9, (1, 4, 6, 6, 2))
    want = conv2d(volume.reshape(4, 6, 6, 2)).reshape(1, 4, 6, 6, 4)
    chex.assert_trees_all_close(conv25(volume), want, atol=1e-5)
