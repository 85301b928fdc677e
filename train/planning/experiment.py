"""Experiment plan: target spacing, patch, network topology and batch from a fingerprint.

The rules are nnU-Net's (its default 3D full-resolution planner), re-derived
and adapted where this app differs; each function's docstring gives the rule
and the reason. The plan is data: :meth:`ExperimentPlan.to_json` is what
``python -m train.plan --dataset=... --out plan.json`` writes, and a trainer
takes it as given instead of deriving it again.

Axes are ``(d, h, w)``, the in-memory order of :mod:`train.data.nifti`;
stage 0 is the full-resolution stem, whose stride is ``(1, 1, 1)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from train.data.nifti import resampled_shape
from train.planning.fingerprint import Fingerprint
from train.planning.topology import MIN_FEATURE_MAP, fit_topology, shrink_topology

AXES = ("depth", "height", "width")
# An axis is anisotropic when its spacing is more than this times the others'
# (nnU-Net's ANISO_THRESHOLD).
ANISOTROPY_THRESHOLD = 3.0
# Largest share of the data set's voxels one batch may cover (nnU-Net's 5%).
MAX_DATASET_COVERED = 0.05
# The initial patch holds this many voxels before it is clipped and shrunk:
# large enough that the budget, not the start, decides (nnU-Net's 256^3).
INITIAL_PATCH_VOXELS = 256**3
# class_weights 'balanced' needs foreground classes whose frequencies differ by
# more than this factor, and every class at least MIN_CLASS_FREQUENCY.
IMBALANCE_FACTOR = 2.0
MIN_CLASS_FREQUENCY = 0.01

DEFAULT_BUDGET_VOXELS = 2 * 64**3
DEFAULT_BASE_WIDTH = 16
DEFAULT_MAX_WIDTH = 256
DEFAULT_MAX_STAGES = 5  # stages including the stem

Triple = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
    """What to train: see :func:`plan_experiment` for how each field is chosen.

    Attributes:
      target_spacing: ``(d, h, w)`` mm every case is resampled to.
      median_shape: median case shape after resampling.
      patch: ``(d, h, w)`` training patch, a multiple of ``size_divisor``.
      strides: one ``(sd, sh, sw)`` per stage, the stride from the previous
        stage; ``strides[0]`` is the stem's ``(1, 1, 1)``.
      kernels: one ``(kd, kh, kw)`` convolution kernel per stage.
      widths: channels per stage.
      batch: patches per step.
      anisotropic: the target spacing's coarsest axis is more than 3x its finest.
      dummy_2d_augmentation: augment in-plane only (rotations and scaling in
        (h, w)), as for a stack of 2D slices.
      class_weights: 'none' or 'balanced' (the trainer's ``--class_weights``).
      notes: why, in short sentences.
      budget_voxels: the budget the plan was made for (patch voxels x batch).
      num_channels, class_names: of the data set, for wiring the model.
    """

    target_spacing: tuple[float, float, float]
    median_shape: Triple
    patch: Triple
    strides: tuple[Triple, ...]
    kernels: tuple[Triple, ...]
    widths: tuple[int, ...]
    batch: int
    anisotropic: bool
    dummy_2d_augmentation: bool
    class_weights: str
    notes: tuple[str, ...]
    budget_voxels: int
    num_channels: int = 1
    class_names: tuple[str, ...] = ()

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def size_divisor(self) -> Triple:
        """The total stride per axis: a patch must be a multiple of it."""
        return tuple(int(np.prod([s[a] for s in self.strides])) for a in range(3))

    def pool_depth(self) -> tuple[bool, ...]:
        """Per pooling step (stage 1 on), whether it pools the depth axis."""
        return tuple(s[0] > 1 for s in self.strides[1:])

    def to_json(self) -> dict:
        """A JSON-ready dict: tuples as plain lists."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> "ExperimentPlan":
        """Inverse of :meth:`to_json`; keys that are not fields (e.g. 'fingerprint') are ignored."""
        if isinstance(data, str):
            data = json.loads(data)
        triple = lambda v: tuple(int(x) for x in v)  # noqa: E731
        return cls(
            target_spacing=tuple(float(v) for v in data["target_spacing"]),
            median_shape=triple(data["median_shape"]),
            patch=triple(data["patch"]),
            strides=tuple(triple(s) for s in data["strides"]),
            kernels=tuple(triple(k) for k in data["kernels"]),
            widths=tuple(int(w) for w in data["widths"]),
            batch=int(data["batch"]),
            anisotropic=bool(data["anisotropic"]),
            dummy_2d_augmentation=bool(data["dummy_2d_augmentation"]),
            class_weights=str(data["class_weights"]),
            notes=tuple(str(n) for n in data["notes"]),
            budget_voxels=int(data["budget_voxels"]),
            num_channels=int(data.get("num_channels", 1)),
            class_names=tuple(data.get("class_names", ())),
        )


# --------------------------------------------------------------------------
# Target spacing


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]],
                   threshold: float = ANISOTROPY_THRESHOLD) -> tuple[tuple[float, float, float], str]:
    """The spacing to resample every case to, and why.

    Rule: the median spacing per axis. Exception (nnU-Net): when the coarsest
    axis's median spacing is more than ``threshold`` times the largest of the
    other two AND its median size in voxels times ``threshold`` is below the
    smaller of the other two sizes, that axis takes the 10th percentile of its
    spacings instead, but never finer than the other axes' largest target.

    Reason: resampling a thin-slice stack to its median slice thickness
    throws away the slices of the finer cases; such data has few slices, so
    taking a finer (10th percentile) spacing costs little memory, and it
    still keeps that axis at least as coarse as the others, so no case is
    interpolated to a resolution it never had in-plane.
    """
    spacings = np.asarray(spacings, np.float64)
    target = np.median(spacings, axis=0)
    sizes = np.median(np.asarray(shapes, np.float64), axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    coarse = target[worst] > threshold * max(target[a] for a in others)
    few = sizes[worst] * threshold < min(sizes[a] for a in others)
    if coarse and few:
        floor = max(target[a] for a in others)
        target[worst] = max(float(np.percentile(spacings[:, worst], 10)), floor)
        note = (f"{AXES[worst]} spacing {np.median(spacings[:, worst]):.3g} mm is over {threshold:g}x the others' and "
                f"its median size {sizes[worst]:g} under 1/{threshold:g} of theirs: target is its 10th percentile, "
                f"{target[worst]:.3g} mm")
    else:
        note = "target spacing is the median spacing per axis"
    return tuple(float(v) for v in target), note


# --------------------------------------------------------------------------
# Class weights


def choose_class_weights(fp: Fingerprint) -> tuple[str, str]:
    """'balanced' or 'none' for the cross-entropy, and why.

    'balanced' (weights ``1 / (K f_c)``, :func:`train.losses.balanced_class_weights`)
    when there are at least two foreground classes whose frequencies differ
    by more than ``IMBALANCE_FACTOR`` (2x) AND no class is rarer than
    ``MIN_CLASS_FREQUENCY`` (1% of the labelled voxels); else 'none'.

    Reasons: the Dice term already balances foreground against background,
    so a single foreground class gains nothing. Between foreground classes,
    weighting corrects the label prior; under 2x the shift in the decision
    boundary (log 2 in logit) is small next to what the Dice term does, and
    at 2.6x (grey vs white matter on the MNI152 demo's training slab)
    balancing measurably helped. A class under 1% would get a weight over
    ``1 / (K * 0.01)`` (33 with three classes), and a few of its voxels would
    dominate the cross-entropy's gradient: rare classes are left to Dice.
    """
    freq = fp.class_frequencies
    names = fp.class_names
    if not any(freq):
        return "none", "class weights: none (no labelled voxels)"
    fg = [c for c in range(1, len(freq)) if freq[c] > 0]
    if len(fg) < 2:
        return "none", "class weights: none (one foreground class; Dice balances it against background)"
    rarest = min((c for c in range(len(freq)) if freq[c] > 0), key=lambda c: freq[c])
    if freq[rarest] < MIN_CLASS_FREQUENCY:
        weight = 1.0 / (sum(f > 0 for f in freq) * freq[rarest])
        return "none", (f"class weights: none ({names[rarest]} is {100 * freq[rarest]:.2g}% of the voxels; "
                        f"a balanced weight of {weight:.0f} would dominate the loss)")
    hi, lo = max(fg, key=lambda c: freq[c]), min(fg, key=lambda c: freq[c])
    ratio = freq[hi] / freq[lo]
    if ratio > IMBALANCE_FACTOR:
        return "balanced", (f"class weights: balanced ({names[hi]} is {ratio:.1f}x as frequent as {names[lo]}, "
                            f"over {IMBALANCE_FACTOR:g}x)")
    return "none", (f"class weights: none (foreground classes within {ratio:.1f}x of each other, "
                    f"under {IMBALANCE_FACTOR:g}x)")


# --------------------------------------------------------------------------
# The plan


def plan_experiment(
    fp: Fingerprint,
    *,
    budget_voxels: int = DEFAULT_BUDGET_VOXELS,
    base_width: int = DEFAULT_BASE_WIDTH,
    max_width: int = DEFAULT_MAX_WIDTH,
    min_batch: int = 2,
    max_stages: int = DEFAULT_MAX_STAGES,
    spacing: Sequence[float] | None = None,
) -> ExperimentPlan:
    """The experiment plan for a fingerprint.

    Args:
      fp: the data set's :class:`~train.planning.fingerprint.Fingerprint`.
      budget_voxels: patch voxels x batch one step may hold; the default
        (2 x 64^3) suits a CPU; pass more for an accelerator (memory grows
        about linearly with it for a fixed network).
      base_width, max_width: channels of the stem, doubled per stage up to
        ``max_width``.
      min_batch: the smallest batch (instance norm and the foreground
        oversampling of one patch in three want at least 2).
      max_stages: stages including the stem.
      spacing: a target spacing ``(d, h, w)`` mm the user chose (``--spacing``);
        None derives it from the data. The rest of the plan (shape, patch,
        strides, kernels) is made for the spacing the run trains at.

    Rules, in order:

    1. Target spacing: :func:`target_spacing`, unless ``spacing`` is given.
    2. Median shape: the median over cases of each case's shape resampled to
       the target spacing.
    3. Patch: isotropic in mm (proportional to ``1 / spacing``) and large
       (``INITIAL_PATCH_VOXELS``), clipped to the median shape, then the
       topology's padding (see :func:`train.planning.topology.topology`, kept within the median
       shape). While ``patch voxels x min_batch > budget_voxels`` the axis
       largest relative to the median shape is reduced by its total stride
       (nnU-Net: the patch keeps the data's aspect rather than a cube's).
    4. Strides and kernels: :func:`train.planning.topology.topology` of the final patch.
    5. Batch: as many patches as the budget holds, but covering at most 5%
       of the data set's voxels (nnU-Net: larger batches on small data sets
       overfit), and never below ``min_batch``.
    6. Widths: ``base_width * 2**stage``, capped at ``max_width``.
    7. ``anisotropic``: coarsest target spacing over 3x the finest.
       ``dummy_2d_augmentation``: ``max(patch) / patch[0] > 3``; 3D rotations
       of such a flat patch would turn coarse slices into the plane.
    8. Class weights: :func:`choose_class_weights`.
    """
    if fp.num_cases < 1:
        raise ValueError("plan_experiment: the fingerprint holds no cases")
    for name, value in (("budget_voxels", budget_voxels), ("base_width", base_width), ("max_width", max_width),
                        ("min_batch", min_batch), ("max_stages", max_stages)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    notes = []
    if spacing is None:
        spacing, note = target_spacing(fp.spacings, fp.shapes)
    else:
        spacing = tuple(float(v) for v in np.broadcast_to(np.asarray(spacing, np.float64), (3,)))
        note = f"target spacing {', '.join(f'{v:.3g}' for v in spacing)} mm given (--spacing)"
    notes.append(note)
    shapes = [resampled_shape(s, sp, spacing) for s, sp in zip(fp.shapes, fp.spacings)]
    median = tuple(int(round(v)) for v in np.median(np.asarray(shapes, np.float64), axis=0))

    inverse = 1.0 / np.asarray(spacing)
    start = max(INITIAL_PATCH_VOXELS, budget_voxels / min_batch)
    patch = [min(int(round(v)), m) for v, m in zip(inverse * (start / np.prod(inverse)) ** (1 / 3), median)]
    topo = fit_topology(spacing, patch, median, max_stages)
    shrunk = False
    while np.prod(topo.patch, dtype=np.float64) * min_batch > budget_voxels:
        smaller = shrink_topology(spacing, topo, median, max_stages)
        if smaller is None:
            break
        topo, shrunk = smaller, True
    patch = topo.patch
    voxels = int(np.prod(patch, dtype=np.int64))
    if shrunk:
        notes.append(f"patch shrunk to {list(patch)} to fit {budget_voxels} voxels at batch {min_batch}")
    elif any(p < m for p, m in zip(patch, median)):
        notes.append(f"patch {list(patch)} is the largest with a topology that fits the median shape")
    else:
        notes.append(f"patch covers the median shape {list(median)}")
    if voxels * min_batch > budget_voxels:
        notes.append(f"patch {list(patch)} at batch {min_batch} exceeds the budget of {budget_voxels} voxels; "
                     "it cannot shrink further")

    by_budget = budget_voxels // voxels
    dataset_voxels = float(np.prod(median, dtype=np.float64)) * fp.num_cases
    by_dataset = int(round(dataset_voxels * MAX_DATASET_COVERED / voxels))
    batch = max(min(by_budget, by_dataset), min_batch)
    if by_dataset < by_budget:
        notes.append(f"batch {batch}: the budget holds {by_budget}, but a batch covers at most "
                     f"{100 * MAX_DATASET_COVERED:g}% of the data set's voxels ({by_dataset} patches); "
                     f"at least {min_batch}")
    else:
        notes.append(f"batch {batch}: as many patches as the budget holds, at least {min_batch}")

    strides, kernels = topo.strides, topo.kernels
    for a in range(3):
        pooled = [i for i, s in enumerate(strides) if s[a] > 1]
        flat = [i for i, k in enumerate(kernels) if k[a] == 1]
        if flat or len(pooled) < len(strides) - 1:
            when = f"first pooled at stage {pooled[0]}" if pooled else "never pooled"
            why = f"{AXES[a]} ({spacing[a]:.3g} mm): {when}"
            if flat:
                why += f", kernel 1 along it at stage{'s' if len(flat) > 1 else ''} {', '.join(map(str, flat))}"
            notes.append(why + f" (spacing over 2x the finest, {min(spacing):.3g} mm, or size under "
                         f"{2 * MIN_FEATURE_MAP} there)")
    anisotropic = max(spacing) / min(spacing) > ANISOTROPY_THRESHOLD
    dummy_2d = max(patch) / patch[0] > ANISOTROPY_THRESHOLD
    if dummy_2d:
        notes.append(f"dummy 2D augmentation: patch depth {patch[0]} is under 1/{ANISOTROPY_THRESHOLD:g} of its "
                     "largest side; rotate and scale in-plane only")
    class_weights, note = choose_class_weights(fp)
    notes.append(note)
    widths = tuple(min(base_width * 2**i, max_width) for i in range(len(strides)))
    return ExperimentPlan(
        target_spacing=tuple(round(s, 6) for s in spacing),
        median_shape=median,
        patch=tuple(int(p) for p in patch),
        strides=strides,
        kernels=kernels,
        widths=widths,
        batch=int(batch),
        anisotropic=bool(anisotropic),
        dummy_2d_augmentation=bool(dummy_2d),
        class_weights=class_weights,
        notes=tuple(notes),
        budget_voxels=int(budget_voxels),
        num_channels=fp.num_channels,
        class_names=tuple(fp.class_names),
    )


def format_plan(plan: ExperimentPlan) -> str:
    """A human-readable table of the plan, one row per stage, and its notes."""
    lines = [
        f"target spacing (d, h, w) mm: {', '.join(f'{s:.3g}' for s in plan.target_spacing)}"
        f"{'  (anisotropic)' if plan.anisotropic else ''}",
        f"median shape after resampling: {list(plan.median_shape)}",
        f"patch: {list(plan.patch)}  batch: {plan.batch}  ({plan.batch * int(np.prod(plan.patch))} of "
        f"{plan.budget_voxels} budget voxels)",
        f"dummy 2D augmentation: {'yes' if plan.dummy_2d_augmentation else 'no'}  class weights: {plan.class_weights}",
        "",
        "| stage | stride | kernel | width | feature map |",
        "|---|---|---|---|---|",
    ]
    size = list(plan.patch)
    for i, (s, k, w) in enumerate(zip(plan.strides, plan.kernels, plan.widths)):
        size = [math.ceil(n / t) for n, t in zip(size, s)]
        lines.append(f"| {i} | {'x'.join(map(str, s))} | {'x'.join(map(str, k))} | {w} | {'x'.join(map(str, size))} |")
    lines += ["", "notes:"] + [f"- {n}" for n in plan.notes]
    return "\n".join(lines)
