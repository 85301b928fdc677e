"""The grain pipeline: shapes, determinism, resume, workers, sharding, sampling."""

import json

import chex
import numpy as np
import pytest

from train.data import pipeline
from train.data.nifti import DataError
from train.data.pipeline import Augment, make_iterator, patch_dataset, slice_dataset, validation_cases
from train.data.synthetic import SyntheticSource


class ListSource:
    """An in-memory source over given (image, label) pairs."""

    num_channels = 1

    def __init__(self, labels, num_classes=2, image_from_label=True):
        self.labels = [np.asarray(l, np.int32) for l in labels]
        self.num_classes = num_classes
        self.class_names = tuple(f"c{i}" for i in range(num_classes))
        self.image_from_label = image_from_label

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        label = self.labels[i]
        # Voxel values encode their position, so any misalignment shows.
        image = (label * 1000 + np.arange(label.size).reshape(label.shape) % 997).astype(np.float32)
        return {"image": image[..., None], "label": label, "affine": np.eye(4), "spacing": np.ones(3),
                "name": f"case{i}"}


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticSource("train", seed=0, size=24, num_cases=3)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batch_shapes_and_padding(synthetic):
    batch = next(make_iterator(patch_dataset(synthetic, patch=(16, 8, 12), batch=2, seed=0)))
    chex.assert_shape(batch["image"], (2, 16, 8, 12, 1))
    chex.assert_shape(batch["label"], (2, 16, 8, 12))
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    # A volume smaller than the patch is padded (image 0, label 0) around its centre.
    small = ListSource([np.ones((4, 6, 6))])
    batch = next(make_iterator(patch_dataset(small, patch=8, batch=1, seed=0, augment=False)))
    label = batch["label"][0]
    assert label.shape == (8, 8, 8) and label.sum() == 4 * 6 * 6
    np.testing.assert_array_equal(label[2:6, 1:7, 1:7], 1)
    assert np.all(batch["image"][0][label == 0] == 0)


def test_slice_view(synthetic):
    for axis, plane in [(0, (24, 24)), ("coronal", (24, 24)), (2, (24, 24))]:
        batch = next(make_iterator(slice_dataset(synthetic, axis=axis, patch=plane, batch=3, seed=1)))
        chex.assert_shape(batch["image"], (3, *plane, 1))
        chex.assert_shape(batch["label"], (3, *plane))
    # A whole axial slice without augmentation is exactly a plane of some case.
    batch = next(make_iterator(slice_dataset(synthetic, axis="axial", patch=24, batch=2, seed=1, augment=False)))
    volumes = [synthetic[i]["image"] for i in range(len(synthetic))]
    for image in batch["image"]:
        assert any(np.array_equal(image, vol[d]) for vol in volumes for d in range(24))


def test_deterministic_and_resumable(synthetic):
    ds = patch_dataset(synthetic, patch=12, batch=2, seed=5)
    first = _take(make_iterator(ds), 5)
    chex.assert_trees_all_equal(first, _take(make_iterator(patch_dataset(synthetic, patch=12, batch=2, seed=5)), 5))
    other = _take(make_iterator(patch_dataset(synthetic, patch=12, batch=2, seed=6)), 1)
    assert not np.array_equal(other[0]["image"], first[0]["image"])

    # Stop after 3 batches (mid-epoch: 3 cases per epoch, 2 per batch), save, resume.
    it = make_iterator(ds)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    resumed = make_iterator(patch_dataset(synthetic, patch=12, batch=2, seed=5))
    resumed.set_state(state)
    chex.assert_trees_all_equal(_take(resumed, 2), first[3:5])

    # Finite epochs: 2 passes over 3 cases make 3 batches of 2.
    assert len(list(make_iterator(patch_dataset(synthetic, patch=8, batch=2, seed=5, num_epochs=2)))) == 3


def test_two_workers_match_and_resume(synthetic):
    ds = patch_dataset(synthetic, patch=12, batch=2, seed=5)
    expected = _take(make_iterator(ds), 6)
    it = make_iterator(ds, workers=2)
    try:
        got = _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        got += _take(it, 3)
    finally:
        it.close()
    chex.assert_trees_all_equal(got, expected)
    # The state restores with 2 workers, and with none.
    for workers in (2, 0):
        it = make_iterator(patch_dataset(synthetic, patch=12, batch=2, seed=5), workers=workers)
        try:
            it.set_state(state)
            chex.assert_trees_all_equal(_take(it, 2), expected[3:5])
        finally:
            it.close()


def test_sharding_splits_the_patch_stream(synthetic):
    whole = _take(make_iterator(patch_dataset(synthetic, patch=8, batch=2, seed=2)), 3)
    shards = [
        _take(make_iterator(patch_dataset(synthetic, patch=8, batch=1, seed=2, shard_index=k, shard_count=2)), 3)
        for k in (0, 1)
    ]
    for step in range(3):
        for k in (0, 1):
            np.testing.assert_array_equal(shards[k][step]["image"][0], whole[step]["image"][k])


@pytest.mark.parametrize("fraction", [0.0, 1 / 3, 1.0])
def test_foreground_fraction(fraction):
    # One 2-voxel foreground speck in a corner of a 40^3 volume: a uniformly
    # placed 12^3 patch contains it about 1% of the time.
    label = np.zeros((40, 40, 40), np.int32)
    label[36:38, 3, 3] = 1
    source = ListSource([label, label])
    n = 300
    ds = patch_dataset(source, patch=12, batch=n, seed=11, augment=False, foreground_fraction=fraction, prefetch=0)
    it = make_iterator(ds)
    hits = (next(it)["label"].reshape(n, -1).max(axis=1) > 0).mean()
    assert abs(hits - fraction) < 0.08, hits


def test_augmentation_moves_image_and_label_together():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (10, 10, 10))
    source = ListSource([label, label[::-1]], num_classes=3)
    geometric = Augment(scale=None, shift=None, gamma=None)
    it = make_iterator(patch_dataset(source, patch=(10, 10, 10), batch=8, seed=3, augment=geometric))
    for _ in range(2):
        batch = next(it)
        np.testing.assert_array_equal(batch["image"][..., 0] // 1000, batch["label"])
    # Every patch is one of the 8 flips x 4 in-plane rotations of its case,
    # and not all patches are the identity.
    assert not all(np.array_equal(l, label) or np.array_equal(l, label[::-1]) for l in batch["label"])
    for lab in batch["label"]:
        variants = [np.rot90(f, k, (1, 2)) for base in (label, label[::-1])
                    for f in (base, base[::-1], base[:, ::-1], base[:, :, ::-1], base[::-1, ::-1],
                              base[::-1, :, ::-1], base[:, ::-1, ::-1], base[::-1, ::-1, ::-1])
                    for k in range(4)]
        assert any(np.array_equal(lab, v) for v in variants)
    # Intensity augmentation changes values but keeps them finite.
    it = make_iterator(patch_dataset(source, patch=10, batch=16, seed=3, augment=Augment(p_intensity=1.0)))
    images = next(it)["image"]
    assert np.isfinite(images).all() and not np.array_equal(images[..., 0] // 1000, next(it)["label"])


def test_validation_cases(synthetic):
    cases = list(validation_cases(synthetic))
    assert [c["name"] for c in cases] == [synthetic[i]["name"] for i in range(3)]
    np.testing.assert_array_equal(cases[1]["image"], synthetic[1]["image"])
    assert [c["name"] for c in validation_cases(synthetic, shard_index=1, shard_count=2)] == [cases[1]["name"]]


def test_bad_arguments(synthetic):
    with pytest.raises(ValueError, match="patch must be"):
        patch_dataset(synthetic, patch=(8, 8), batch=1, seed=0)
    with pytest.raises(ValueError, match="shard_index"):
        patch_dataset(synthetic, patch=8, batch=1, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="foreground_fraction"):
        patch_dataset(synthetic, patch=8, batch=1, seed=0, foreground_fraction=1.5)
    with pytest.raises(ValueError, match="axis must be"):
        slice_dataset(synthetic, axis="transverse", patch=8, batch=1, seed=0)
    with pytest.raises(ValueError, match="workers"):
        make_iterator(patch_dataset(synthetic, patch=8, batch=1, seed=0), workers=-1)
    with pytest.raises(ValueError, match="not a data pipeline state"):
        make_iterator(patch_dataset(synthetic, patch=8, batch=1, seed=0)).set_state({"next_index": 3})
    unlabelled = SyntheticSource("test", size=8, num_cases=1)
    with pytest.raises(DataError, match="has no label"):
        next(make_iterator(patch_dataset(unlabelled, patch=8, batch=1, seed=0)))


def test_foreground_voxel_picks_classes_uniformly():
    label = np.zeros((20, 20, 20), np.int32)
    label[:10] = 1  # a big class
    label[15, 15, 15] = 2  # a one-voxel class
    rng = np.random.default_rng(0)
    picks = [label[pipeline.foreground_voxel(label, rng)] for _ in range(400)]
    assert 0.4 < np.mean(np.equal(picks, 2)) < 0.6
    assert pipeline.foreground_voxel(np.zeros((3, 3, 3), np.int32), rng) is None


def test_orbax_saves_and_restores_iterator_state(synthetic, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    ds = lambda: patch_dataset(synthetic, patch=8, batch=2, seed=4)  # noqa: E731
    it = make_iterator(ds())
    _take(it, 2)
    handlers = {"data": grain.checkpoint.CheckpointHandler()}
    with ocp.CheckpointManager(tmp_path, item_names=("data",), item_handlers=handlers) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = next(it)
        resumed = make_iterator(ds())
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    chex.assert_trees_all_equal(next(resumed), expected)


def test_epoch_shuffle_visits_every_case_once_per_epoch():
    import grain

    ds = pipeline.EpochShuffle(grain.MapDataset.range(5), seed=1, num_epochs=3)
    epochs = [[ds[e * 5 + i] for i in range(5)] for e in range(3)]
    assert len(ds) == 15 and all(sorted(e) == list(range(5)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # a new order each epoch
    assert [pipeline.EpochShuffle(grain.MapDataset.range(5), seed=1)[i] for i in range(5)] == epochs[0]
