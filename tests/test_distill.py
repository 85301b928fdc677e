"""Distillation building blocks: the KD loss, resampling between grids, 2D teachers on volumes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.spatial.transform import Rotation

import acsjax
from acsjax.models import build_model
from acsjax.trees import leaf_name
from train import losses
from train.data import nifti
from train.data.resample import (
    crop_affine,
    grid_affine,
    resample_to_grid,
    slice_affine,
    voxel_coordinates,
    world_coordinates,
)

# Oblique orientations: no axis of either grid is parallel to a world axis.
R_SRC = Rotation.from_euler("xyz", [20.0, -35.0, 50.0], degrees=True).as_matrix()
R_DST = Rotation.from_euler("zyx", [-40.0, 25.0, 65.0], degrees=True).as_matrix()


def _centred_grid(shape, spacing, centre, rotation):
    """Affine of a grid whose middle lies at world ``centre``."""
    half = (np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    return grid_affine(spacing, np.asarray(centre) - rotation @ half, rotation)


# --------------------------------------------------------------------------
# (a) the distillation term


# One compilation per temperature and mask presence rather than one per operation.
_kd = jax.jit(losses.distillation_loss, static_argnames="temperature")


def _logits(seed, shape=(2, 3, 4, 5, 4), scale=3.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _mask(seed, p, shape=(2, 3, 4, 5)):
    return jnp.asarray(np.random.default_rng(seed).random(shape) < p)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_distillation_is_zero_for_identical_logits_and_positive_otherwise(temperature):
    s, t = _logits(0), _logits(1)
    assert float(_kd(s, s, temperature=temperature)) == pytest.approx(0.0, abs=1e-7)
    assert float(_kd(s, t, temperature=temperature)) > 1e-3
    # Adding a constant per voxel changes no softmax.
    shifted = s + _logits(2, s.shape[:-1] + (1,), 7.0)
    assert float(_kd(shifted, s, temperature=temperature)) == pytest.approx(0.0, abs=1e-5)


def test_distillation_value_is_tempered_kl_times_t_squared():
    s, t = np.array([[1.0, -2.0, 0.5]]), np.array([[0.2, 1.5, -1.0]])
    temperature = 2.0
    softmax = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)  # noqa: E731
    q, p = softmax(t / temperature), softmax(s / temperature)
    want = temperature**2 * np.sum(q * np.log(q / p))
    got = losses.distillation_loss(jnp.asarray(s), jnp.asarray(t), temperature=temperature)
    chex.assert_trees_all_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_distillation_gradient_is_t_times_probability_difference_over_valid_voxels(temperature):
    s, t = _logits(3), _logits(4)
    mask = _mask(5, 0.6)
    n_valid = float(mask.sum())
    assert 0 < n_valid < mask.size

    def loss(student, teacher):
        return losses.distillation_loss(student, teacher, temperature=temperature, mask=mask)

    grad_s, grad_t = jax.jit(jax.grad(loss, argnums=(0, 1)))(s, t)
    p = jax.nn.softmax(s / temperature, axis=-1)
    q = jax.nn.softmax(t / temperature, axis=-1)
    want = temperature * (p - q) * mask[..., None] / n_valid
    chex.assert_trees_all_close(grad_s, want, atol=1e-7, rtol=1e-5)
    # Masked voxels get exactly zero gradient; the teacher is a constant target.
    assert float(jnp.abs(jnp.where(mask[..., None], 0.0, grad_s)).max()) == 0.0
    assert float(jnp.abs(grad_s).max()) > 0.0
    assert float(jnp.abs(grad_t).max()) == 0.0
    # Without a mask every voxel counts.
    grad_all = jax.jit(jax.grad(lambda x: losses.distillation_loss(x, t, temperature=temperature)))(s)
    chex.assert_trees_all_close(grad_all, temperature * (p - q) / mask.size, atol=1e-7, rtol=1e-5)


def test_masked_distillation_is_the_mean_over_valid_voxels_only():
    s, t = _logits(6), _logits(7)
    mask = _mask(8, 0.5)
    got = _kd(s, t, temperature=2.0, mask=mask)
    want = _kd(s[mask], t[mask], temperature=2.0)
    chex.assert_trees_all_close(got, want, rtol=1e-5)
    # Changing the teacher where it has no data changes nothing; an empty mask gives 0.
    t_junk = jnp.where(mask[..., None], t, 100.0)
    chex.assert_trees_all_close(_kd(s, t_junk, temperature=2.0, mask=mask), got, rtol=1e-6)
    assert float(_kd(s, t, temperature=2.0, mask=jnp.zeros_like(mask))) == 0.0


def test_distillation_and_combined_loss_errors():
    s = _logits(0)
    with pytest.raises(ValueError, match="resample the teacher"):
        losses.distillation_loss(s, s[:, :2], temperature=1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.distillation_loss(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="mask"):
        losses.distillation_loss(s, s, temperature=1.0, mask=jnp.ones(s.shape, bool))
    assert losses.combined_loss(2.0, 6.0, 0.25) == pytest.approx(3.0)
    assert losses.combined_loss(2.0, 6.0, 0.0) == 2.0 and losses.combined_loss(2.0, 6.0, 1.0) == 6.0
    with pytest.raises(ValueError, match="kd_weight"):
        losses.combined_loss(2.0, 6.0, 1.5)


# --------------------------------------------------------------------------
# (b) a linear field is reproduced exactly, on oblique grids


def _linear_field(world, a, b):
    return a + world @ b


def test_resampling_reproduces_a_linear_world_field_on_oblique_grids():
    src_shape, dst_shape = (12, 14, 10), (7, 6, 8)
    src_affine = _centred_grid(src_shape, (1.2, 0.9, 1.5), (4.0, -3.0, 10.0), R_SRC)
    dst_affine = _centred_grid(dst_shape, (2.1, 1.7, 2.6), (5.0, -2.0, 9.0), R_DST)
    b = np.array([0.7, -1.3, 0.4])
    src = _linear_field(world_coordinates(src_shape, src_affine), 2.5, b)
    want = _linear_field(world_coordinates(dst_shape, dst_affine), 2.5, b)

    got, valid = resample_to_grid(src, src_affine, dst_shape, dst_affine)
    assert got.dtype == np.float64 and got.shape == dst_shape and valid.dtype == bool
    # The grids overlap partly, so both sides of the mask are exercised.
    assert 0.2 < valid.mean() < 0.9, valid.mean()
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-9)
    # Outside the source's voxel centres the values are made up (edge values) and must be masked.
    assert np.abs(got - want)[~valid].max() > 0.1
    # The mask is the box of the source's voxel centres.
    coords = voxel_coordinates(world_coordinates(dst_shape, dst_affine), src_affine)
    inside = np.all((coords > -1e-9) & (coords < np.array(src_shape) - 1 + 1e-9), axis=-1)
    np.testing.assert_array_equal(valid, inside)

    # Channels (e.g. logits) ride along on any axis; float32 stays float32.
    fields = np.stack([src, -3.0 * src + 1.0], axis=-1).astype(np.float32)
    got2, valid2 = resample_to_grid(fields, src_affine, dst_shape, dst_affine, channel_axis=-1)
    assert got2.shape == dst_shape + (2,) and got2.dtype == np.float32
    np.testing.assert_array_equal(valid2, valid)
    np.testing.assert_allclose(got2[valid, 0], want[valid], atol=1e-4)
    np.testing.assert_allclose(got2[valid, 1], -3.0 * want[valid] + 1.0, atol=1e-4)
    got3, _ = resample_to_grid(np.moveaxis(fields, -1, 0), src_affine, dst_shape, dst_affine, channel_axis=0)
    np.testing.assert_array_equal(got3, got2)


def test_a_case_read_from_an_oblique_file_carries_the_affine_of_its_array(tmp_path):
    """``read_volume`` flips and permutes a file towards RAS; its affine still maps memory indices to world mm."""
    file_shape = (9, 11, 8)
    # A PSL-like file (axes roughly posterior, superior, left), tilted by 10-20 degrees.
    psl = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    tilt = Rotation.from_euler("xyz", [12.0, -18.0, 10.0], degrees=True).as_matrix()
    file_affine = grid_affine((1.5, 1.2, 2.0), (30.0, -20.0, 15.0), tilt @ psl)
    b = np.array([0.5, -0.8, 1.1])
    data = _linear_field(world_coordinates(file_shape, file_affine), 1.0, b).astype(np.float32)
    volume = nifti.read_volume(nifti.write_file(data, file_affine, str(tmp_path / "oblique.nii.gz")))
    assert volume.array.shape != file_shape  # reoriented
    dst_shape = (6, 7, 5)
    middle = file_affine[:3, :3] @ [4.0, 5.0, 3.5] + file_affine[:3, 3]
    dst_affine = _centred_grid(dst_shape, (1.7, 1.7, 1.7), middle, R_DST)
    got, valid = resample_to_grid(volume.array, volume.affine, dst_shape, dst_affine)
    assert valid.mean() > 0.2
    want = _linear_field(world_coordinates(dst_shape, dst_affine), 1.0, b)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4)
    # The file's own affine does not describe the reoriented array.
    wrong, valid = resample_to_grid(volume.array, file_affine, dst_shape, dst_affine)
    assert np.abs(wrong - want)[valid].max() > 1.0


def test_resampling_onto_its_own_grid_is_the_identity_and_margin_widens_the_mask():
    values = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    affine = _centred_grid(values.shape, (1.0, 2.0, 3.0), (1.0, 2.0, 3.0), R_SRC)
    got, valid = resample_to_grid(values, affine, values.shape, affine)
    assert valid.all()
    np.testing.assert_allclose(got, values, atol=1e-6)
    # A grid shifted by a third of a voxel along d: its last slab is past the last centre.
    shifted = crop_affine(affine, (1 / 3, 0, 0))
    _, valid = resample_to_grid(values, affine, values.shape, shifted)
    assert valid[:-1].all() and not valid[-1].any()
    _, valid = resample_to_grid(values, affine, values.shape, shifted, margin=0.5)
    assert valid.all()


def test_resample_errors_name_the_argument():
    v = np.zeros((4, 4, 4))
    with pytest.raises(ValueError, match=r"values must be \(D, H, W\)"):
        resample_to_grid(np.zeros((4, 4, 4, 2)), np.eye(4), (2, 2, 2), np.eye(4))
    with pytest.raises(ValueError, match="channels on axis -1"):
        resample_to_grid(v, np.eye(4), (2, 2, 2), np.eye(4), channel_axis=-1)
    with pytest.raises(ValueError, match="src_affine must be finite and invertible"):
        resample_to_grid(v, np.zeros((4, 4)), (2, 2, 2), np.eye(4))
    with pytest.raises(ValueError, match="dst_shape"):
        resample_to_grid(v, np.eye(4), (2, 2), np.eye(4))
    with pytest.raises(ValueError, match="order"):
        resample_to_grid(v, np.eye(4), (2, 2, 2), np.eye(4), order=3)


# --------------------------------------------------------------------------
# (c) cropping commutes with resampling


def test_resampling_commutes_with_cropping():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(14, 12, 13, 3)).astype(np.float32)
    src_affine = _centred_grid(src.shape[:3], (1.0, 1.3, 0.8), (0.0, 0.0, 0.0), R_SRC)
    dst_shape = (10, 9, 11)
    dst_affine = _centred_grid(dst_shape, (1.6, 1.4, 1.1), (1.0, -1.0, 0.5), R_DST)
    full, full_valid = resample_to_grid(src, src_affine, dst_shape, dst_affine, channel_axis=-1)
    assert 0.1 < full_valid.mean() < 1.0

    # A patch of the destination: crop its affine, then resample == resample, then crop.
    start, size = (2, 3, 1), (5, 4, 7)
    box = tuple(slice(a, a + n) for a, n in zip(start, size))
    patch, patch_valid = resample_to_grid(src, src_affine, size, crop_affine(dst_affine, start), channel_axis=-1)
    np.testing.assert_allclose(patch, full[box], atol=1e-5)
    np.testing.assert_array_equal(patch_valid, full_valid[box])

    # A patch of the source with its cropped affine gives the same values wherever it has data.
    s_start, s_size = (3, 2, 4), (8, 9, 7)
    s_box = tuple(slice(a, a + n) for a, n in zip(s_start, s_size))
    part, part_valid = resample_to_grid(
        src[s_box], crop_affine(src_affine, s_start), dst_shape, dst_affine, channel_axis=-1
    )
    assert 0 < part_valid.sum() < full_valid.sum()
    assert not (part_valid & ~full_valid).any()
    np.testing.assert_allclose(part[part_valid], full[part_valid], atol=1e-5)


def test_strided_crop_affine_and_nearest_labels():
    labels = np.random.default_rng(2).integers(0, 5, size=(9, 8, 7)).astype(np.int32)
    affine = _centred_grid(labels.shape, (0.7, 0.9, 1.1), (3.0, 2.0, 1.0), R_SRC)
    # Every other voxel from (1, 0, 2): the grid of labels[1::2, ::2, 2::2] (a coarse head's targets).
    sub = labels[1::2, ::2, 2::2]
    got, valid = resample_to_grid(labels, affine, sub.shape, crop_affine(affine, (1, 0, 2), 2), order=0)
    assert got.dtype == np.int32 and valid.all()
    np.testing.assert_array_equal(got, sub)
    # Nearest interpolation never invents a label, even between grids.
    other = _centred_grid((6, 6, 6), (1.3, 1.3, 1.3), (3.0, 2.0, 1.0), R_DST)
    got, valid = resample_to_grid(labels, affine, (6, 6, 6), other, order=0)
    assert valid.any() and set(np.unique(got)) <= set(np.unique(labels))


def test_resample_to_grid_agrees_with_nifti_resample():
    """``nifti.resample``'s affine describes its array: resampling to that grid gives the same values inside."""
    rng = np.random.default_rng(3)
    array = rng.normal(size=(12, 10, 9)).astype(np.float32)
    affine = _centred_grid(array.shape, (1.0, 1.0, 1.5), (0.0, 5.0, -5.0), R_SRC)
    volume = nifti.Volume(array, affine, np.array([1.0, 1.0, 1.5]))
    coarse = nifti.resample(volume, (2.0, 2.5, 3.0), order=1)
    got, valid = resample_to_grid(array, affine, coarse.array.shape, coarse.affine)
    assert valid.sum() > 10
    np.testing.assert_allclose(got[valid], coarse.array[valid], atol=1e-5)


# --------------------------------------------------------------------------
# (d) a known shape lands where it should


def _cube_volume(centre, half=6.0):
    """A bright cube of side 2*half mm centred at world ``centre`` in a 1 mm volume around the world origin."""
    shape = (48, 48, 48)
    affine = grid_affine((1.0, 1.0, 1.0), (-24.0, -22.0, -25.0))
    world = world_coordinates(shape, affine)
    cube = np.all(np.abs(world - centre) <= half, axis=-1).astype(np.float32)
    return cube, affine


def _centre_of_mass(weights, world):
    return (weights[..., None] * world).sum(axis=(0, 1, 2)) / weights.sum()


def test_cube_lands_at_its_world_position_on_an_oblique_4mm_grid():
    centre = np.array([3.0, -6.0, 5.0])
    cube, src_affine = _cube_volume(centre)
    np.testing.assert_allclose(_centre_of_mass(cube, world_coordinates(cube.shape, src_affine)), centre)
    dst_shape = (9, 9, 9)
    dst_affine = _centred_grid(dst_shape, (4.0, 4.0, 4.0), (0.5, -1.0, 1.5), R_DST)
    got, valid = resample_to_grid(cube, src_affine, dst_shape, dst_affine)
    weights = np.where(valid, got, 0.0)
    assert weights.sum() > 5  # (12 mm)^3 / (4 mm)^3 = 27 voxels' worth
    com = _centre_of_mass(weights, world_coordinates(dst_shape, dst_affine))
    assert np.linalg.norm(com - centre) < 2.0, (com, centre)  # half a 4 mm voxel
    # Reading the source's axes in the wrong order moves the cube: the test can fail.
    swapped, valid = resample_to_grid(cube.transpose(2, 1, 0), src_affine, dst_shape, dst_affine)
    wrong = _centre_of_mass(np.where(valid, swapped, 0.0), world_coordinates(dst_shape, dst_affine))
    assert np.linalg.norm(wrong - centre) > 4.0


def test_cube_lands_at_its_world_position_on_an_oblique_slice():
    centre = np.array([3.0, -6.0, 5.0])
    cube, src_affine = _cube_volume(centre)
    # A 1.5 mm oblique plane through the cube's centre, the centre off the plane's middle.
    plane_shape = (1, 16, 16)
    plane_affine = _centred_grid(plane_shape, (1.0, 1.5, 1.5), centre + R_DST @ [0.0, 2.5, -2.0], R_DST)
    got, valid = resample_to_grid(cube, src_affine, plane_shape, plane_affine)
    assert valid.all()
    # The cube is symmetric about its centre, so the section through it has its centroid there.
    com = _centre_of_mass(got, world_coordinates(plane_shape, plane_affine))
    assert np.linalg.norm(com - centre) < 0.75, (com, centre)  # half a 1.5 mm pixel
    # A parallel plane 13 mm away misses it (the cube widened by one voxel of interpolation
    # support has half diagonal 7 * sqrt(3) = 12.1 mm).
    away = _centred_grid(plane_shape, (1.0, 1.5, 1.5), centre + R_DST @ [13.0, 2.5, -2.0], R_DST)
    assert resample_to_grid(cube, src_affine, plane_shape, away)[0].max() == 0.0
    assert resample_to_grid(cube, src_affine, plane_shape, plane_affine)[0].max() == 1.0

    # slice_affine: an axial slice of the volume is the volume's own slab.
    index = 23
    got, valid = resample_to_grid(cube, src_affine, (1,) + cube.shape[1:], slice_affine(src_affine, index))
    assert valid.all()
    np.testing.assert_array_equal(got, cube[index : index + 1])
    got, _ = resample_to_grid(cube, src_affine, cube.shape[:2] + (1,), slice_affine(src_affine, index, axis=2))
    np.testing.assert_array_equal(got, cube[:, :, index : index + 1])


# --------------------------------------------------------------------------
# (e) a 2D teacher slice by slice is a '2.5d' 3D network


def test_2d_network_slice_by_slice_equals_its_2_5d_inflation():
    kw = dict(in_channels=2, num_classes=3, widths=(4, 8), norm="batch")
    net2d = build_model("unet", dims=2, rngs=nnx.Rngs(0), **kw)
    net25 = build_model("unet", dims="2.5d", pool_depth=False, rngs=nnx.Rngs(1), **kw)
    state = nnx.state(net2d)
    # Non-trivial running statistics and norm parameters, so eval-mode BatchNorm is not the identity.
    rng = np.random.default_rng(9)
    state = jax.tree.map(lambda x: x + 0.3 * rng.random(x.shape, np.float32) if x.ndim == 1 else x, state)
    state25 = acsjax.inflate_params(state, "2.5d")
    kernels = [v for p, v in jax.tree_util.tree_leaves_with_path(state25) if leaf_name(p) == "kernel"]
    assert kernels and all(k.ndim == 5 and k.shape[0] == 1 for k in kernels)
    nnx.update(net2d, state)
    nnx.update(net25, state25)

    def apply(model, x):
        model.eval()
        graphdef, params = nnx.split(model)
        return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)

    volume = jnp.asarray(np.random.default_rng(10).normal(size=(2, 3, 8, 8, 2)), jnp.float32)
    got = apply(net25, volume)
    n, d = volume.shape[:2]
    # The 2D teacher on every slice: depth folded into the batch (as evaluation does).
    slices = apply(net2d, volume.reshape((n * d,) + volume.shape[2:])).reshape(got.shape)
    for i in range(d):
        chex.assert_trees_all_close(got[:, i], slices[:, i], atol=1e-5)
    # The slices differ, so a network mixing slices would fail the comparison.
    assert float(jnp.abs(got[:, 0] - got[:, 1]).max()) > 1e-2
