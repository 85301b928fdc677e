"""Two real JAX processes on loopback train one step like a single process does.

Each process joins through ``jax.distributed.initialize`` (a coordinator on
127.0.0.1, CPU collectives over gloo), loads only its half of the global
batch and runs the sharded train step; both also save and restore one
checkpoint through the shared Orbax manager.
"""

import pytest
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import grain, jax, numpy as np, optax
    from acsjax.models import build_model
    from acsjax.trees import flatten
    from train import trainer
    from train.checkpoint import Checkpoints

    out = Path(sys.argv[1])
    multi = trainer.maybe_initialize_distributed()
    pid, count = jax.process_index(), jax.process_count()

    def build(rngs):
        return build_model("unet", dims=3, in_channels=1, num_classes=3, rngs=rngs, widths=(4, 8), norm="batch")

    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(4, 16, 16, 16, 1)).astype("f4"),
             "label": rng.integers(0, 3, (4, 16, 16, 16)).astype("i4")}
    rows = 4 // count
    local = {k: v[pid * rows:(pid + 1) * rows] for k, v in batch.items()}  # this process's shard only

    mesh = trainer.make_mesh("")
    schedule = optax.constant_schedule(1.0)
    task = trainer.make_task(build, optax.sgd(1.0), schedule, 3, mesh, seed=0)
    state = task.init()
    with jax.set_mesh(mesh):
        state, metrics = trainer.make_step(task)(state, trainer.shard_batch(local, mesh))
    host = trainer.host_copy(state)

    iterator = iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())
    next(iterator)
    with Checkpoints(out / "checkpoints") as checkpoints:
        checkpoints.save(1, state, iterator)
    fresh = iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())
    step, restored = Checkpoints(out / "checkpoints").restore_latest(task.abstract_state, fresh)
    restored_ok = step == 1 and all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trainer.host_copy(restored)), jax.tree.leaves(host)))

    np.savez(out / f"params_{pid}.npz", **flatten({"params": host["params"], "stats": host["model_state"]}))
    (out / f"result_{pid}.json").write_text(json.dumps({
        "multi": multi, "processes": count, "devices": jax.device_count(), "local_rows": rows,
        "loss": float(metrics["loss"]), "restored_ok": bool(restored_ok), "next_batch": next(fresh).tolist()}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


@pytest.mark.slow  # a whole run (or several compiles); `pytest -m slow` runs it
def test_two_processes_equal_one_process(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
    multi_dir.mkdir()
    single_dir.mkdir()
    # The single-process reference runs at the same time as the two processes: the three start-ups and
    # compilations overlap instead of following each other.
    envs = [_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]
    runs = [(env, multi_dir) for env in envs] + [(_env(), single_dir)]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(out)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for env, out in runs
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]

    ref = json.loads((single_dir / "result_0.json").read_text())
    assert ref["multi"] is False and ref["processes"] == 1
    want = np.load(single_dir / "params_0.npz")
    for pid in range(2):
        got = json.loads((multi_dir / f"result_{pid}.json").read_text())
        assert got["multi"] is True and got["processes"] == 2 and got["devices"] == 2
        assert got["local_rows"] == 2  # each process fed half of the global batch
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=0, atol=1e-6)
        params = np.load(multi_dir / f"params_{pid}.npz")
        assert set(params) == set(want)
        for name in want:
            # SGD with lr 1: the update is the gradient; 1e-6 absolute covers
            # float32 sums taken in another order across the two processes.
            np.testing.assert_allclose(params[name], want[name], rtol=0, atol=1e-6, err_msg=name)
        assert got["restored_ok"]
        assert got["next_batch"] == [2, 3]  # each process restored its own data position
    assert sorted(p.name for p in (multi_dir / "checkpoints" / "1" / "data").glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
