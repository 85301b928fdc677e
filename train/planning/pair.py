"""Memory plan of a distillation pair across dimensions and resolutions.

The pair: a 3D teacher trained on the WHOLE volume downsampled by ``factor``
(a 2048^3 volume at 1 mm -> 512^3 at 4 mm), and a 2D student trained at full
resolution on whole slices (2048 x 2048 at 1 mm) from labels plus the
teacher's logits resampled onto its slice (``K`` x 2048 x 2048 float32 per
slice, an input of the student's step; :class:`train.trainer.Distill`, the app's distillation step).
Against it stands the full-resolution 3D network on the whole volume.

Every number is a real compiled train step (:func:`train.planning.memory.step_memory`,
abstract inputs, fake CPU devices): the teacher and the 3D network at the
fewest devices that fit the budget (:func:`~train.planning.memory.fewest_devices`,
the volume's depth split over 'space'); the student at the fewest devices for
one slice (its height split over 'space'), and when that is one device, at
the largest slice batch that fits (:func:`~train.planning.memory.largest_batch`).
The student's model is the config's model built with ``dims=2``, the same
``train.init.model_fn`` path a run takes for the 2D twin.

The command is ``python -m train.plan --pair --volume 2048,2048,2048 --teacher_factor 4``.
"""

from __future__ import annotations

import dataclasses

from train.planning import memory


def teacher_grid(volume, factor: int) -> tuple[int, int, int]:
    """The volume's grid at ``factor`` x coarser spacing; ValueError when ``factor`` < 1 or does not divide it."""
    if factor < 1:
        raise ValueError(f"must be >= 1, got {factor}")
    if any(s % factor for s in volume):
        raise ValueError(f"{factor} does not divide the volume {'x'.join(map(str, volume))}")
    return tuple(s // factor for s in volume)


@dataclasses.dataclass(frozen=True)
class PairRow:
    """One model of the plan: what it is, its grid, and its chosen step (None when nothing fits)."""

    model: str
    grid: str
    step: memory.StepMemory | None
    tried: tuple[memory.StepMemory, ...]


@dataclasses.dataclass(frozen=True)
class PairPlan:
    """The teacher, the student, and the full-resolution 3D network."""

    teacher: PairRow
    student: PairRow
    full: PairRow
    budget_gb: float
    factor: int

    @property
    def pair_devices(self) -> int | None:
        """Teacher's plus student's devices (both trained at once); None when either does not fit."""
        if self.teacher.step is None or self.student.step is None:
            return None
        return self.teacher.step.devices + self.student.step.devices


def _grid(shape) -> str:
    return "x".join(map(str, shape))


def plan_pair(configs, volume, factor: int, budget_gb: float, *, max_devices: int, max_slice_batch: int,
              num_classes: int = 3, report=None) -> PairPlan:
    """Plans the teacher, the student and the full-resolution 3D network for ``volume``.

    ``configs``: the run configs to try in order (e.g. remat off, then on),
    their model and dims (from ``init``) those of the 3D networks; the student
    is the same model with ``dims=2``. ``report(label, m)`` sees each compiled
    step. Needs ``max_devices`` JAX devices (:func:`memory.configure_cpu_devices`).
    """
    configs = list(configs)
    grid = teacher_grid(volume, factor)

    def search(label, shape, **options):
        tell = None if report is None else (lambda m: report(label, m))
        return memory.fewest_devices(configs, shape, memory.device_counts(shape[0], max_devices), budget_gb,
                                     report=tell, num_classes=num_classes, **options)

    best, tried = search("teacher", grid)
    teacher = PairRow(f"3D teacher, {factor}x spacing", f"{_grid(grid)} (whole volume / {factor})", best, tuple(tried))

    slice_shape = tuple(volume[1:])
    best, tried = search("student", slice_shape, dims=2, teacher_logits=True)
    if best is not None and best.devices == 1:
        config = next(c for c in configs if (c.remat or "none") == best.remat)
        tell = None if report is None else (lambda m: report("student", m))
        best, more = memory.largest_batch(config, slice_shape, 1, budget_gb, cap=max_slice_batch, report=tell,
                                          known=[best], num_classes=num_classes, dims=2, teacher_logits=True)
        tried += more
    student = PairRow("2D student, full resolution", f"{_grid(slice_shape)} slices + teacher logits",
                      best, tuple(tried))

    best, tried = search("full 3D", tuple(volume))
    full = PairRow("3D network, full resolution", f"{_grid(volume)} (whole volume)", best, tuple(tried))
    return PairPlan(teacher, student, full, budget_gb, factor)


HEADER = (
    "| model | grid | remat | devices | batch | teacher logits GiB/dev | total GiB/dev | fits |\n"
    "|---|---|---|---|---|---|---|---|"
)


def format_step(label: str, m: memory.StepMemory, budget_gb: float) -> str:
    """One line per compiled step while the search runs."""
    return (f"  {label}: {_grid(m.volume)} x{m.batch}, {m.devices} device(s), remat {m.remat}: "
            f"{m.total_bytes / memory.GIB:.3g} GiB/dev, fits {'yes' if memory.fits(m, budget_gb) else 'no'} "
            f"({m.compile_s:.0f} s compile)")


def _row(row: PairRow, budget_gb: float) -> str:
    m = row.step
    if m is None:
        largest = max(t.devices for t in row.tried) if row.tried else 0
        return f"| {row.model} | {row.grid} | - | none up to {largest} | - | - | - | no |"
    return (f"| {row.model} | {row.grid} | {m.remat} | {m.devices} | {m.batch} | {m.teacher_bytes / memory.GIB:.3g} "
            f"| {m.total_bytes / memory.GIB:.3g} | {'yes' if memory.fits(m, budget_gb) else 'no'} |")


def format_plan(plan: PairPlan) -> str:
    """The table: teacher, student, the pair's total, the full-resolution 3D network; and the verdict."""
    lines = [HEADER, _row(plan.teacher, plan.budget_gb), _row(plan.student, plan.budget_gb)]
    pair = plan.pair_devices
    lines.append(f"| pair (teacher + student) | | | {'-' if pair is None else pair} | | | | |")
    lines.append(_row(plan.full, plan.budget_gb))
    full = plan.full.step
    if pair is None:
        lines.append(f"the pair does not fit {plan.budget_gb:g} GiB per device within the device counts tried")
    elif full is None:
        lines.append(f"pair: {pair} devices; the full-resolution 3D network fits on none of the counts tried")
    else:
        lines.append(f"pair: {pair} devices ({plan.teacher.step.devices} teacher + {plan.student.step.devices} "
                     f"student) vs {full.devices} for the full-resolution 3D network"
                     + (f" ({full.devices / pair:.3g}x fewer)" if pair < full.devices else ""))
    return "\n".join(lines)
