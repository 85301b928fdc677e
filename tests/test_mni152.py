"""Tests for the MNI152 demo source and its randomised rendering."""

import dataclasses

import nibabel as nib
import numpy as np
import pytest

from train import metrics, mni152_report
from train.data import mni152, render


@pytest.fixture(scope="module")
def tpl():
    return mni152.load_template(2.0)


@pytest.fixture(scope="module")
def val_cases():
    src = mni152.MNI152Source("validation")
    return [src[i] for i in range(len(src))]


def test_labels_from_probabilities_rule():
    p_gm = np.array([0.6, 0.2, 0.55, 0.5, 0.3, 0.51, 0.7])
    p_wm = np.array([0.3, 0.7, 0.6, 0.5, 0.3, 0.51, 0.71])
    np.testing.assert_array_equal(mni152.labels_from_probabilities(p_gm, p_wm), [1, 2, 2, 0, 0, 1, 2])


def test_template_at_1mm_matches_the_files():
    """Independent read: RAS (x, y, z) arrays against our (z, y, x) template."""
    tpl = mni152.load_template(1.0)
    paths = mni152.template_paths()
    t1_img = nib.load(paths["t1"])
    t1 = np.asarray(t1_img.dataobj)
    gm = np.asarray(nib.load(paths["gm"]).dataobj) / 255
    wm = np.asarray(nib.load(paths["wm"]).dataobj) / 255
    assert nib.aff2axcodes(t1_img.affine) == ("R", "A", "S")
    # The crop holds the whole brain: label counts equal the rule on the files.
    for cls, count in ((1, ((gm > 0.5) & (gm >= wm)).sum()), (2, ((wm > 0.5) & (wm > gm)).sum())):
        assert (tpl.label == cls).sum() == count
    # Voxel (d, h, w) of the template and voxel (x, y, z) of the file that the
    # two affines map to the same point hold the same T1 value.
    rng = np.random.default_rng(0)
    dhw = rng.integers(0, tpl.t1.shape, (200, 3))
    ras = tpl.affine @ np.c_[dhw, np.ones(len(dhw))].T
    xyz = np.rint(np.linalg.inv(t1_img.affine) @ ras)[:3].astype(int)
    np.testing.assert_array_equal(tpl.t1[tuple(dhw.T)], t1[tuple(xyz)])
    # The template is its own mirror image, which is why the split is by
    # axial slabs and not by hemispheres.
    np.testing.assert_array_equal(tpl.t1, tpl.t1[:, :, ::-1])
    # depth runs inferior -> superior, height posterior -> anterior
    assert tpl.affine[2, 0] > 0 and tpl.affine[1, 1] > 0 and tpl.affine[0, 2] > 0


def test_template_2mm_labels_follow_probabilities(tpl):
    assert tpl.spacing == 2.0
    np.testing.assert_allclose(np.linalg.norm(tpl.affine[:3, :3], axis=0), 2.0)
    np.testing.assert_array_equal(tpl.label, mni152.labels_from_probabilities(tpl.p_gm, tpl.p_wm))
    fractions = np.bincount(tpl.label.ravel(), minlength=3) / tpl.label.size
    assert fractions[1] > 0.1 and fractions[2] > 0.05


def test_case_contract(tpl):
    train = mni152.MNI152Source("train", num_cases=3)
    assert len(train) == 3
    assert train.num_classes == 3 and train.num_channels == 1
    assert train.class_names == ("background", "grey_matter", "white_matter")
    case = train[2]
    d, h, w = case["label"].shape
    assert case["image"].shape == (d, h, w, 1)
    assert case["image"].dtype == np.float32 and case["label"].dtype == np.int32
    assert case["affine"].shape == (4, 4) and case["affine"].dtype == np.float64
    np.testing.assert_allclose(case["spacing"], [2.0, 2.0, 2.0])
    assert case["name"] == "mni152_train_s0_002"
    assert set(np.unique(case["label"])) == {0, 1, 2}
    assert (d, h, w) == (tpl.region("train").stop, *tpl.t1.shape[1:])
    with pytest.raises(IndexError):
        train[3]
    assert len(mni152.MNI152Source("train")) == 24
    assert len(mni152.MNI152Source("val")) == 7


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "test"}, "split"),
        ({"split": "train", "spacing": 0.5}, "spacing"),
        ({"split": "train", "spacing": (2, 2, 3)}, "spacing"),
        ({"split": "train", "seed": -1}, "seed"),
        ({"split": "train", "num_cases": 0}, "num_cases"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mni152.MNI152Source(**kwargs)


def test_rendering_deterministic_and_varied():
    a = mni152.MNI152Source("train", seed=0)
    b = mni152.MNI152Source("train", seed=0)
    first = a[1]
    np.testing.assert_array_equal(first["image"], b[1]["image"])
    np.testing.assert_array_equal(first["label"], b[1]["label"])
    assert not np.allclose(first["image"], a[2]["image"])
    assert not np.array_equal(first["label"], a[2]["label"])
    other_seed = mni152.MNI152Source("train", seed=1)[1]
    assert not np.allclose(first["image"], other_seed["image"])
    # validation renderings do not depend on the training seed
    v0 = mni152.MNI152Source("validation", seed=0)[0]
    v7 = mni152.MNI152Source("validation", seed=7)[0]
    np.testing.assert_array_equal(v0["image"], v7["image"])


def test_cache_round_trip(tmp_path):
    cached = mni152.MNI152Source("train", cache_dir=tmp_path, num_cases=2)
    first = cached[1]
    files = sorted(p.name for p in tmp_path.rglob("*.npy"))
    assert files == ["mni152_train_s0_001_image.npy", "mni152_train_s0_001_label.npy"]
    again = mni152.MNI152Source("train", cache_dir=tmp_path, num_cases=2)[1]
    fresh = mni152.MNI152Source("train", num_cases=2)[1]
    for case in (again, fresh):
        np.testing.assert_array_equal(case["image"], first["image"])
        np.testing.assert_array_equal(case["label"], first["label"])
    # other rendering settings use another cache entry
    config = render.RenderConfig(max_rotation_deg=1.0)
    mni152.MNI152Source("train", cache_dir=tmp_path, num_cases=2, config=config)[1]
    assert len(list(tmp_path.iterdir())) == 2


def test_split_regions_disjoint(tpl):
    train, val = tpl.region("train"), tpl.region("validation")
    assert train.stop <= val.start
    z = tpl.z_mm()
    assert z[train.stop - 1] < mni152.TRAIN_Z_MAX_MM
    assert z[val.start] >= mni152.VAL_Z_MIN_MM
    assert z[val.start] - z[train.stop - 1] >= 8.0
    # the case affines place training voxels below, validation voxels above
    for split, check in (("train", lambda z: z < 12), ("validation", lambda z: z >= 20)):
        case = mni152.MNI152Source(split, num_cases=1)[0]
        depth = case["label"].shape[0]
        corners = case["affine"] @ np.array([[0, 0, 0, 1], [depth - 1, 0, 0, 1]]).T
        assert check(corners[2]).all()


def test_renderings_read_only_their_own_slab(tpl, monkeypatch):
    """Scrambling everything above the training slab changes no training case."""
    train_before = mni152.MNI152Source("train", num_cases=1)[0]
    val_before = mni152.MNI152Source("validation", num_cases=1)[0]
    above = slice(tpl.region("train").stop, None)
    rng = np.random.default_rng(0)
    fields = {}
    for name in ("t1", "head", "label", "p_gm", "p_wm"):
        arr = getattr(tpl, name).copy()
        arr[above] = rng.permutation(arr[above].ravel()).reshape(arr[above].shape)
        fields[name] = arr
    scrambled = dataclasses.replace(tpl, **fields)
    monkeypatch.setattr(mni152, "load_template", lambda spacing: scrambled)
    train_after = mni152.MNI152Source("train", num_cases=1)[0]
    np.testing.assert_array_equal(train_before["image"], train_after["image"])
    np.testing.assert_array_equal(train_before["label"], train_after["label"])
    # the scrambled template is in use: validation cases do change
    val_after = mni152.MNI152Source("validation", num_cases=1)[0]
    assert not np.array_equal(val_before["label"], val_after["label"])


def test_real_t1_validation_case(tpl, val_cases):
    real = val_cases[-1]
    assert real["name"] == mni152.REAL_T1_NAME
    region = tpl.region("validation")
    raw = tpl.t1[region]
    np.testing.assert_array_equal(real["label"], tpl.label[region])
    # unaltered apart from normalisation: an exact affine map of the template
    inside = tpl.head[region] > 0.5
    expected = (raw - raw[inside].mean()) / raw[inside].std()
    np.testing.assert_allclose(real["image"][..., 0], expected, atol=1e-4)
    # and the 2 mm template is the 1 mm file averaged over 2x2x2 blocks (the
    # Gaussian stand-in for the box is close, not exact)
    fine = mni152.load_template(1.0)
    rng = np.random.default_rng(1)
    dhw = rng.integers(1, np.array(tpl.t1.shape) - 1, (2000, 3))
    centres = np.linalg.solve(fine.affine, tpl.affine @ np.c_[dhw, np.ones(2000)].T)
    corner = np.floor(centres[:3]).astype(int)  # centres sit at block middles
    np.testing.assert_allclose(centres[:3] - corner, 0.5)
    blocks = np.mean([fine.t1[tuple(corner + np.array(o)[:, None])] for o in np.ndindex(2, 2, 2)], axis=0)
    ours = tpl.t1[tuple(dhw.T)]
    assert np.corrcoef(ours, blocks)[0, 1] > 0.98
    assert np.abs(ours - blocks).mean() < 5  # of a 0..255 range


def test_labels_follow_the_deformation(tpl):
    """With acquisition effects off and a T1 contrast, a threshold still works.

    The image is deformed; if the labels did not follow it exactly, even the
    best band fitted to this single case would score far lower.
    """
    config = render.RenderConfig(
        realistic_prob=1.0,
        contrasts=("t1w",),
        bias_std=0.0,
        max_log_gamma=0.0,
        max_blur_vox=0.0,
        thick_slice_prob=0.0,
        max_lowres_factor=1.0,
        noise_std=(0.0, 0.0),
    )
    src = mni152.MNI152Source("train", num_cases=1, config=config)
    case = src[0]
    region = tpl.region("train")
    moved = (case["label"] != tpl.label[region]).mean()
    assert moved > 0.05  # the anatomy was deformed
    baseline = metrics.threshold_baseline_dice([case["image"]], [case["label"]], 3)
    assert baseline.dice > 0.85


def test_threshold_baseline_raw_vs_rendered(tpl, val_cases):
    raw = metrics.threshold_baseline_dice([tpl.t1], [tpl.label], 3)
    assert raw.dice > 0.95  # measured 0.963 at 2 mm
    assert raw.band_classes == (0, 1, 2)
    renders = val_cases[:-1]
    rendered = metrics.threshold_baseline_dice([c["image"] for c in renders], [c["label"] for c in renders], 3)
    assert rendered.dice < 0.6


def test_render_is_a_pure_function_of_the_generator(tpl):
    region = tpl.region("validation")
    args = (tpl.t1[region], tpl.label[region], tpl.head[region], tpl.class_t1, 2.0)
    one = render.render(np.random.default_rng(5), *args)
    two = render.render(np.random.default_rng(5), *args)
    three = render.render(np.random.default_rng(6), *args)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    assert not np.allclose(one[0], three[0])
    assert one[0].dtype == np.float32 and one[1].dtype == np.int32
    assert one[0].shape == one[1].shape == tpl.t1[region].shape


def test_warp_identity_and_deformation_size(tpl):
    vol = tpl.t1[:20]
    identity = np.indices(vol.shape, dtype=np.float32)
    np.testing.assert_array_equal(render.warp(vol, identity, order=1), vol)
    coords = render.random_deformation(np.random.default_rng(0), vol.shape, 2.0)
    shift = np.abs(coords - identity).max()
    assert 0.1 < shift < 15  # voxels; rotation about the centre dominates


def test_command_prints_baselines_and_writes_montage(tmp_path, capsys):
    out = tmp_path / "montage.png"
    mni152_report.main(["--out", str(out), "--num-train", "2", "--num-val", "1", "--montage-cases", "2"])
    text = capsys.readouterr().out
    assert "train: 2 cases" in text and "validation: 2 cases" in text
    assert "threshold baseline, raw template at 2 mm: mean foreground Dice 0.96" in text
    # The slabs' tissue proportions differ (why the demo balances its class weights).
    assert "(grey/white 2.64)" in text and "(grey/white 1.20)" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_small_network_beats_the_threshold_baseline():
    """The demo measures something: a tiny 2D U-Net trained for 300 steps on
    axial slices of the training renderings beats the best global threshold on
    the validation renderings. Run with `pytest -m slow -s` to see the numbers.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    train = mni152.MNI152Source("train")
    val = mni152.MNI152Source("validation")
    cases = [train[i] for i in range(len(train))]
    pad = [(0, 0), (3, 3), (0, 0)]  # height 98 -> 104, divisible by 4
    x_all = np.pad(np.concatenate([c["image"] for c in cases]), pad + [(0, 0)])
    y_all = np.pad(np.concatenate([c["label"] for c in cases]), pad)

    class Block(nnx.Module):
        def __init__(self, cin, cout, rngs):
            self.c1, self.c2 = nnx.Conv(cin, cout, (3, 3), rngs=rngs), nnx.Conv(cout, cout, (3, 3), rngs=rngs)
            self.n1, self.n2 = (nnx.GroupNorm(cout, num_groups=8, rngs=rngs) for _ in range(2))

        def __call__(self, x):
            return jax.nn.relu(self.n2(self.c2(jax.nn.relu(self.n1(self.c1(x))))))

    class UNet(nnx.Module):
        def __init__(self, rngs, w=16):
            self.e1, self.e2, self.e3 = Block(1, w, rngs), Block(w, 2 * w, rngs), Block(2 * w, 4 * w, rngs)
            self.d2, self.d1 = Block(6 * w, 2 * w, rngs), Block(3 * w, w, rngs)
            self.out = nnx.Conv(w, 3, (1, 1), rngs=rngs)

        def __call__(self, x):
            def pool(z):
                return nnx.avg_pool(z, (2, 2), (2, 2))

            def up(z):
                return jnp.repeat(jnp.repeat(z, 2, 1), 2, 2)

            a = self.e1(x)
            b = self.e2(pool(a))
            c = self.e3(pool(b))
            d = self.d2(jnp.concatenate([up(c), b], -1))
            return self.out(self.d1(jnp.concatenate([up(d), a], -1)))

    model = UNet(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(2e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            logits = m(x)
            prob, onehot = jax.nn.softmax(logits), jax.nn.one_hot(y, 3)
            soft_dice = (2 * (prob * onehot).sum((0, 1, 2)) + 1) / ((prob + onehot).sum((0, 1, 2)) + 1)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + 1 - soft_dice.mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    for _ in range(300):
        idx = rng.integers(0, len(x_all), 16)
        step(model, opt, jnp.asarray(x_all[idx]), jnp.asarray(y_all[idx]))

    predict = nnx.jit(lambda m, x: m(x).argmax(-1))
    renders = [val[i] for i in range(val.num_cases)]
    dice = []
    for case in renders:
        x = np.pad(case["image"], pad + [(0, 0)])
        pred = np.concatenate([np.asarray(predict(model, x[j : j + 16])) for j in range(0, len(x), 16)])[:, 3:-3]
        dice.append(float(metrics.mean_foreground_dice(metrics.dice_per_class(pred, case["label"], 3))))
    baseline = metrics.threshold_baseline_dice([c["image"] for c in renders], [c["label"] for c in renders], 3)
    print(f"validation renderings: network {np.mean(dice):.3f} {np.round(dice, 3)}, threshold {baseline.dice:.3f}")
    assert np.mean(dice) > baseline.dice + 0.05
