"""Memory plan: what one train step on a volume needs per device.

:func:`step_memory` compiles the real sharded train step
(``train.trainer.make_step``) for abstract inputs: the whole volume as one
batch element, its depth axis sharded over fake CPU devices on the mesh's
'space' axis. Nothing is allocated, so a 2048^3 plan runs on a laptop. It
reports XLA's buffer assignment per device: arguments (parameters, optimizer
state, the input shard), outputs, and temporaries (activations kept for the
backward pass, gradients, convolution workspaces).

Caveat: the numbers are XLA:CPU's buffer assignment; a GPU or TPU compiler
fuses and schedules differently (cuDNN workspaces, for one), so keep a margin.
The command is ``python -m train.plan --volume ...``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

GIB = 1024**3
# Per-block jax.checkpoint does nothing on XLA:CPU unless this pass is off
# (it merges the recomputation back); GPU and TPU need no flag.
CPU_REMAT_FLAG = "--xla_disable_hlo_passes=cse_barrier_expander"


def configure_cpu_devices(count: int) -> None:
    """Sets XLA_FLAGS for ``count`` fake CPU devices and working remat; must run before JAX starts."""
    if "jax" in sys.modules:
        import jax

        if jax._src.xla_bridge.backends_are_initialized():  # flags are read once, when the backend starts
            raise RuntimeError("configure_cpu_devices must run before JAX initialises its backend")
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
    if CPU_REMAT_FLAG not in flags:
        flags += " " + CPU_REMAT_FLAG
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one compiled train step."""

    devices: int
    remat: str
    dtype: str
    volume: tuple[int, int, int]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    compile_s: float

    @property
    def total_bytes(self) -> int:
        """Live at the peak, at most: inputs + outputs not aliased to inputs + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def step_memory(config, volume, devices: int, *, in_channels: int = 1, num_classes: int = 3, batch: int = 1) -> StepMemory:
    """Compiles the sharded train step of ``config``'s model for ``batch`` volumes of shape ``volume``.

    The volume's depth is split over ``devices`` on the mesh's 'space' axis.
    Needs ``devices`` JAX devices (see :func:`configure_cpu_devices`).
    """
    import jax
    import jax.numpy as jnp

    import acsjax.ops
    from train import init, trainer

    mesh = trainer.make_mesh(f"data=1,space={devices}", devices=jax.devices()[:devices])
    trainer.check_batch_fits(mesh, batch, volume[0], flag="devices")
    build = init.model_fn(config, in_channels=in_channels, num_classes=num_classes, dims=config.model_dims)
    schedule = trainer.make_schedule(config.lr, config.steps, config.warmup_steps)
    tx = trainer.make_optimizer(schedule, weight_decay=config.weight_decay, grad_clip=config.grad_clip)
    task = trainer.make_task(build, tx, schedule, num_classes, mesh, seed=config.seed)
    shardings = trainer.batch_shardings(mesh)
    batch_spec = {
        "image": jax.ShapeDtypeStruct((batch, *volume, in_channels), jnp.float32, sharding=shardings["image"]),
        "label": jax.ShapeDtypeStruct((batch, *volume), jnp.int32, sharding=shardings["label"]),
    }
    start = time.perf_counter()
    # Plan the program an accelerator runs: XLA's own convolutions (cuDNN on
    # GPU), not the CPU-only GEMM lowering that 'auto' picks on this backend.
    with acsjax.ops.use_conv_impl("xla"), jax.set_mesh(mesh):
        compiled = trainer.make_step(task).lower(task.abstract_state, batch_spec).compile()
    stats = compiled.memory_analysis()
    return StepMemory(
        devices=devices,
        remat=config.remat or "none",
        dtype=config.dtype,
        volume=tuple(volume),
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        compile_s=time.perf_counter() - start,
    )


def format_row(m: StepMemory, budget_gb: float | None = None) -> str:
    """One table row: devices, remat, dtype, per-device GiB, fits?"""
    fits = "" if budget_gb is None else ("yes" if m.total_bytes <= budget_gb * GIB else "no")
    return (
        f"| {m.devices} | {m.remat} | {m.dtype} | {m.argument_bytes / GIB:.2f} | {m.temp_bytes / GIB:.2f} "
        f"| {m.total_bytes / GIB:.2f} | {fits} | {m.compile_s:.0f} |"
    )


HEADER = (
    "| devices | remat | dtype | arguments GiB/dev | temporaries GiB/dev | total GiB/dev | fits | compile s |\n"
    "|---|---|---|---|---|---|---|---|"
)
