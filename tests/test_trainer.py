"""The sharded train step: mesh, schedule, and equivalence with one device.

The multi-device check runs in a subprocess because XLA_FLAGS must be set
before JAX initialises, and this pytest process has one CPU device.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from train import run, trainer
from train.config import ConfigError

SHARDED_STEP = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import contextlib, json
    import jax, numpy as np, optax
    import acsjax.ops
    from acsjax.models import build_model
    from train import trainer

    def build(rngs):
        # BatchNorm: its statistics are reductions over the sharded axes too;
        # deep supervision: the aux heads see downsampled, sharded labels.
        return build_model("unet", dims=3, in_channels=1, num_classes=3, rngs=rngs,
                           widths=(4, 8), norm="batch", deep_supervision=True)

    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 16, 16, 16, 1)).astype("f4"),
             "label": rng.integers(0, 3, (8, 16, 16, 16)).astype("i4")}
    schedule = optax.constant_schedule(1.0)
    # Plain SGD with lr 1: the parameter update is the gradient itself, so this
    # compares gradients. (AdamW's first step divides each gradient entry by
    # its own magnitude, which turns float rounding in near-zero entries into
    # full-size differences; the optimizer is elementwise and unaffected by
    # sharding.)
    tx = optax.sgd(1.0)

    def one_step(spec, devices):
        mesh = trainer.make_mesh(spec, devices)
        # The program the app runs: train_and_evaluate switches to XLA's
        # convolutions whenever depth is split over 'space' (the default
        # lowering stays for the single-device reference).
        impl = acsjax.ops.use_conv_impl("xla") if mesh.shape["space"] > 1 else contextlib.nullcontext()
        with impl:
            task = trainer.make_task(build, tx, schedule, 3, mesh, seed=0)
            state = task.init()
            before = trainer.host_copy(state["params"])
            sharded = trainer.shard_batch(batch, mesh)
            with jax.set_mesh(mesh):
                new, metrics = trainer.make_step(task)(state, sharded)
            lowering = acsjax.ops.resolve_impl(None, 3)
        assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(new))
        return (trainer.host_copy(new), jax.device_get(metrics),
                sharded["image"].addressable_shards[0].data.shape, before, lowering)

    def max_diff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    ref, ref_metrics, _, before, ref_lowering = one_step("", jax.devices()[:1])
    out = {"moved": max_diff(ref["params"], before), "devices": jax.device_count(), "lowering": ref_lowering}
    for spec in ("data=8", "data=1,space=8", "data=2,space=4"):
        new, metrics, shard_shape, _, lowering = one_step(spec, jax.devices())
        out[spec] = {
            "loss": abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
            "params": max_diff(new["params"], ref["params"]),
            "stats": max_diff(new["model_state"], ref["model_state"]),
            "shard_shape": list(shard_shape),
            "lowering": lowering,
        }
    print("RESULT " + json.dumps(out))
    """
)


def test_sharded_steps_equal_single_device_step():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SHARDED_STEP], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["devices"] == 8
    assert result["moved"] > 1e-2  # the step really changed the parameters
    assert result["lowering"] == "gemm"  # the reference: one CPU device, the default lowering
    expected_shards = {"data=8": [1, 16, 16, 16, 1], "data=1,space=8": [8, 2, 16, 16, 1], "data=2,space=4": [4, 4, 16, 16, 1]}
    for spec, shape in expected_shards.items():
        got = result[spec]
        assert got["shard_shape"] == shape, spec  # batch on 'data', depth on 'space'
        assert got["lowering"] == ("xla" if "space" in spec else "gemm"), (spec, got)
        # Tolerance 1e-6 absolute: float32 reductions in a different order
        # (measured differences are at most ~1e-7).
        assert got["loss"] <= 1e-6, (spec, got)
        assert got["params"] <= 1e-6, (spec, got)
        assert got["stats"] <= 1e-6, (spec, got)


def test_make_mesh_defaults_to_all_devices_on_data():
    mesh = trainer.make_mesh("")
    assert mesh.axis_names == ("data", "space")
    assert mesh.shape["data"] == jax.device_count() and mesh.shape["space"] == 1


@pytest.mark.parametrize("spec", ["data=2", "space=3", "data=2,space=2"])
def test_mesh_that_does_not_divide_devices_names_the_flag(spec):
    with pytest.raises(ConfigError) as err:
        trainer.make_mesh(spec, jax.devices()[:1])
    assert err.value.flag == "mesh"


def test_batch_must_split_over_data_axis():
    fake = type("Mesh", (), {"shape": {"data": 4, "space": 2}})()
    with pytest.raises(ConfigError, match="divisible") as err:
        trainer.check_batch_fits(fake, 6, 32)
    assert err.value.flag == "batch"
    with pytest.raises(ConfigError) as err:
        trainer.check_batch_fits(fake, 8, 31)
    assert err.value.flag == "mesh"


def test_schedule_warms_up_then_decays_to_one_percent():
    schedule = trainer.make_schedule(1e-2, 100, 10)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-2, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 1e-4, rtol=1e-5)
    assert float(schedule(55)) < 1e-2


def test_weight_decay_skips_biases_and_norm_scales():
    # Zero gradients and lr 1: the update is the decay alone.
    tx = trainer.make_optimizer(lambda _: 1.0, weight_decay=0.5, grad_clip=0.0)
    params = {"kernel": np.ones((3, 3, 1, 2), np.float32), "bias": np.ones((2,), np.float32)}
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.5)
    np.testing.assert_allclose(updates["bias"], 0.0)


def test_maybe_initialize_distributed_ignores_a_plain_environment():
    assert trainer.maybe_initialize_distributed({}) is False


class _LabelSource:
    """A stand-in source: case i is a label volume with i + 1 voxels of class 2."""

    num_classes = 3

    def __init__(self, n):
        self.n = n
        self.read = []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read.append(i)
        label = np.zeros(10, np.int32)
        label[: i + 1] = 2
        label[-1] = 1
        return {"label": label}


def test_class_weights_of_counts_the_training_labels():
    config = run.Config(class_weights="balanced")
    counts = np.array([sum(8 - i for i in range(4)), 4, sum(i + 1 for i in range(4))])
    want = np.array([counts.sum() / (3 * c) for c in counts])
    np.testing.assert_allclose(run.class_weights_of(config, _LabelSource(4)), want)
    assert run.class_weights_of(run.Config(class_weights="none"), _LabelSource(4)) is None
    assert run.class_weights_of(run.Config(class_weights="1,2,3"), _LabelSource(4)) == (1.0, 2.0, 3.0)


def test_class_weights_of_reads_an_even_sample_of_a_large_dataset():
    source = _LabelSource(1000)
    run.class_weights_of(run.Config(class_weights="balanced"), source)
    assert len(source.read) == run.MAX_CASES_FOR_CLASS_WEIGHTS
    assert source.read[0] == 0 and source.read[-1] == 999


def test_task_class_weights_reach_the_loss():
    import optax
    from flax import nnx

    def build(rngs):  # a per-voxel linear classifier: the loss, not the network, is under test
        return nnx.Linear(1, 3, rngs=rngs)

    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(1, 8, 8, 8, 1)).astype("f4"), "label": rng.integers(0, 3, (1, 8, 8, 8)).astype("i4")}
    mesh = trainer.make_mesh("", jax.devices()[:1])
    schedule = optax.constant_schedule(0.0)
    ce = {}
    for weights in (None, (1.0, 1.0, 10.0)):
        task = trainer.make_task(build, optax.sgd(schedule), schedule, 3, mesh, seed=0, class_weights=weights)
        _, metrics = trainer.train_step(task, task.init(), batch)
        ce[weights] = float(metrics["ce"])
    assert ce[(1.0, 1.0, 10.0)] > 2 * ce[None]
    with pytest.raises(ValueError, match="2 entries for 3 classes"):
        trainer.make_task(build, optax.sgd(schedule), schedule, 3, mesh, class_weights=(1.0, 1.0))


@pytest.mark.slow  # about 25 s of CPU (slices stage, 3D steps, validation), more on a busy machine
def test_whole_run_with_depth_split_over_two_devices(tmp_path):
    """``python -m train.main --mesh=data=1,space=2`` on two fake CPU devices, start to finish (with the 2D stage)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "train.main", "--preset=cpu-tiny", "--mesh=data=1,space=2", f"--workdir={workdir}",
         "--steps=2", "--eval_every=0", "--slices_steps=2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["mesh"] == {"data": 1, "space": 2}, summary
    assert summary["steps"] == 2 and np.isfinite(summary["val_dice_mean"]) and 0 <= summary["val_dice_mean"] <= 1


def test_use_compilation_cache_defaults_under_the_cache_dir_and_yields_to_the_environment(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        chosen = str(tmp_path / "elsewhere")
        assert trainer.use_compilation_cache(str(tmp_path), {"JAX_COMPILATION_CACHE_DIR": chosen}) is None
        assert jax.config.jax_compilation_cache_dir is None  # JAX itself reads the variable at import
        assert trainer.use_compilation_cache(str(tmp_path), {}) == str(tmp_path / "jax")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")
        assert trainer.use_compilation_cache("/other", {}) == str(tmp_path / "jax")  # set once, kept
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
