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

With ``teacher_logits=True`` the step is a distillation step: the teacher's
logits, resampled onto the student's grid, arrive with the labels as a step
input (``K`` float32 per voxel or pixel) and the loss adds Hinton's term
(:func:`train.losses.distillation_loss`). :func:`fewest_devices` is the
search over device counts; :mod:`train.planning.pair` plans a teacher-student
pair with it.

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
# The plan only compiles: LLVM's optimisation of the CPU code is wasted time
# (a third of a large step's compile). It runs after buffer assignment, so the
# numbers do not change (checked on a 2-level and a 5-level U-Net step).
CPU_FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def configure_cpu_devices(count: int) -> None:
    """Sets XLA_FLAGS for ``count`` fake CPU devices, working remat and quick compiles; must run before JAX starts.

    The devices are for compiling only: their code is built without LLVM optimisation.
    """
    if "jax" in sys.modules:
        import jax

        if jax._src.xla_bridge.backends_are_initialized():  # flags are read once, when the backend starts
            raise RuntimeError("configure_cpu_devices must run before JAX initialises its backend")
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
    for flag in (CPU_REMAT_FLAG, CPU_FAST_COMPILE_FLAG):
        if flag not in flags:
            flags += " " + flag
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def device_counts(depth: int, max_devices: int) -> list[int]:
    """1, 2, 4, ... up to ``max_devices``, the counts that split ``depth`` evenly."""
    return [2**k for k in range(max_devices.bit_length()) if 2**k <= max_devices and depth % 2**k == 0]


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one compiled train step.

    ``volume`` is the spatial shape of one example: (D, H, W) for a 3D model,
    (H, W) for a 2D one (``dims``); ``batch`` examples per step;
    ``teacher_bytes`` the teacher-logit input per device (0 without).
    """

    devices: int
    remat: str
    dtype: str
    volume: tuple[int, ...]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    compile_s: float
    batch: int = 1
    dims: int | str = 3
    teacher_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Live at the peak, at most: inputs + outputs not aliased to inputs + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def step_memory(config, volume, devices: int, *, in_channels: int = 1, num_classes: int = 3, batch: int = 1,
                dims=None, teacher_logits: bool = False) -> StepMemory:
    """Compiles the sharded train step of ``config``'s model for ``batch`` examples of shape ``volume``.

    ``dims`` (default ``config.model_dims``) builds the model through
    ``train.init.model_fn`` as a run does; ``volume`` is (D, H, W), or (H, W)
    for ``dims=2``. Its first axis (depth, or height of a slice) is split over
    ``devices`` on the mesh's 'space' axis. With ``teacher_logits`` the step
    also takes the teacher's logits, ``(batch, *volume, num_classes)``
    float32 (and the per-example ``labelled`` flags), and the step is the
    app's distillation step (:class:`train.trainer.Distill`).
    Needs ``devices`` JAX devices (see :func:`configure_cpu_devices`).
    """
    import jax
    import jax.numpy as jnp

    import acsjax.ops
    from train import init, tasks, trainer

    dims = config.model_dims if dims is None else dims
    if len(volume) != (2 if dims == 2 else 3):
        raise ValueError(f"a dims={dims} model takes a {2 if dims == 2 else 3}-axis shape, got {tuple(volume)}")
    mesh = trainer.make_mesh(f"data=1,space={devices}", devices=jax.devices()[:devices])
    trainer.check_batch_fits(mesh, batch, volume[0], flag="devices")
    build = init.model_fn(config, in_channels=in_channels, num_classes=num_classes, dims=dims)
    schedule = trainer.make_schedule(config.lr, config.steps, config.warmup_steps)
    tx = trainer.make_optimizer(schedule, weight_decay=config.weight_decay, grad_clip=config.grad_clip)
    distill = trainer.Distill(weight=0.5, temperature=2.0) if teacher_logits else None
    task = trainer.make_task(build, tx, schedule, num_classes, mesh, seed=config.seed, kind=tasks.SEGMENTATION,
                             distill=distill)
    shardings = trainer.batch_shardings(mesh, distill=teacher_logits)
    batch_spec = {
        "image": jax.ShapeDtypeStruct((batch, *volume, in_channels), jnp.float32, sharding=shardings["image"]),
        "label": jax.ShapeDtypeStruct((batch, *volume), jnp.int32, sharding=shardings["label"]),
    }
    teacher_bytes = 0
    if teacher_logits:
        teacher = jax.ShapeDtypeStruct((batch, *volume, num_classes), jnp.float32, sharding=shardings["teacher"])
        batch_spec["teacher"] = teacher
        batch_spec["labelled"] = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=shardings["labelled"])
        teacher_bytes = 4 * teacher.size // devices
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
        batch=batch,
        dims=dims,
        teacher_bytes=teacher_bytes,
    )


def fits(m: StepMemory, budget_gb: float) -> bool:
    """Whether the step's per-device peak is within ``budget_gb`` GiB."""
    return m.total_bytes <= budget_gb * GIB


def fewest_devices(configs, volume, counts, budget_gb: float, *, report=None, **step_options):
    """The fewest devices (then the least memory) at which a train step fits ``budget_gb`` per device.

    Tries each config (e.g. remat off, then on) over ``counts`` in ascending
    order, stopping a config at its first fit and skipping counts above the
    best fit so far (they cannot win). ``report(m)`` sees each compiled step
    as it comes; ``step_options`` go to :func:`step_memory`.
    Returns ``(best, tried)``: the best :class:`StepMemory` (None when nothing
    fits) and every one compiled, in order.
    """
    best, tried = None, []
    for config in configs:
        for n in counts:
            if best is not None and n > best.devices:
                break
            m = step_memory(config, volume, n, **step_options)
            tried.append(m)
            if report is not None:
                report(m)
            if fits(m, budget_gb):
                if best is None or (m.devices, m.total_bytes) < (best.devices, best.total_bytes):
                    best = m
                break
    return best, tried


def largest_batch(config, volume, devices: int, budget_gb: float, *, cap: int, report=None, known=(), **step_options):
    """The largest batch (at most ``cap``) whose train step fits ``budget_gb`` per device on ``devices``.

    Memory grows about linearly with the batch: batches 1 and 2 give the slope,
    the line gives a guess, and compiling the guess and its neighbour settles
    it when the line is right; otherwise a doubling search above, or a
    bisection below, finds the exact answer (batch ``b`` fits, ``b + 1`` does
    not or exceeds ``cap``). ``known``: steps of this config already compiled
    (reused by batch). Returns ``(best, tried)``, tried without ``known``;
    best is None when batch 1 does not fit.
    """
    tried, cache = [], {m.batch: m for m in known}

    def at(b):
        if b not in cache:
            cache[b] = step_memory(config, volume, devices, batch=b, **step_options)
            tried.append(cache[b])
            if report is not None:
                report(cache[b])
        return cache[b]

    if not fits(at(1), budget_gb):
        return None, tried
    if cap < 2 or not fits(at(2), budget_gb):
        return at(1), tried
    lo, hi = 2, None  # batch lo fits; hi does not (None: no bound yet)

    def probe(b):
        nonlocal lo, hi
        if fits(at(b), budget_gb):
            lo = max(lo, b)
        else:
            hi = b if hi is None else min(hi, b)

    slope = max(at(2).total_bytes - at(1).total_bytes, 1)
    guess = int(min(cap, max(3, 1 + (budget_gb * GIB - at(1).total_bytes) // slope)))
    probe(guess)
    if hi == guess and guess - 1 > lo:  # the line is usually right to within one example
        probe(guess - 1)
    elif hi is None and guess < cap:
        probe(guess + 1)
    step = 2
    while hi is None and lo < cap:
        probe(min(cap, lo + step))
        step *= 2
    while hi is not None and hi - lo > 1:
        probe((lo + hi) // 2)
    return at(lo), tried


def format_row(m: StepMemory, budget_gb: float | None = None) -> str:
    """One table row: devices, remat, dtype, per-device GiB, fits?"""
    verdict = "" if budget_gb is None else ("yes" if fits(m, budget_gb) else "no")
    return (
        f"| {m.devices} | {m.remat} | {m.dtype} | {m.argument_bytes / GIB:.2f} | {m.temp_bytes / GIB:.2f} "
        f"| {m.total_bytes / GIB:.2f} | {verdict} | {m.compile_s:.0f} |"
    )


HEADER = (
    "| devices | remat | dtype | arguments GiB/dev | temporaries GiB/dev | total GiB/dev | fits | compile s |\n"
    "|---|---|---|---|---|---|---|---|"
)
