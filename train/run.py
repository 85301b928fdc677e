"""One training run, start to finish: plan, data, starting point, loop, validation, report.

``train_and_evaluate(config)`` is what ``python -m train.main`` calls and what
notebooks call. The pieces it puts together each live in their own module:
the plan of the dataset (:mod:`train.planning`), the sources
(:mod:`train.data`), the starting parameters (:mod:`train.init`), the sharded
step and loop (:mod:`train.trainer`), checkpoints, validation and the report.

Planned runs (``config.planned``: every dataset but the built-in ones, unless
``--plan=off``) fingerprint the training cases, plan the experiment from them
and write ``WORKDIR/plan.json``; the config the run uses is that plan plus the
flags the user gave (:func:`train.config.apply_plan`). A rerun in the same
workdir reads ``plan.json`` back instead of planning again, so a resumed run
trains the network it started with. Runs that are not planned write
``plan.json`` too, describing the spacing, patch, stages and batch they use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import numpy as np

import acsjax.ops

from train import distill
from train import init as init_lib
from train import losses, tasks, trainer
from train.checkpoint import Checkpoints
from train.data import subsets
from train.config import Config, ConfigError, apply_plan, parse_class_weights, parse_mesh, validate, write_run_config

PLAN = "plan.json"
FINGERPRINT = "fingerprint.json"
MAX_CASES_FOR_CLASS_WEIGHTS = 64


def open_source(config: Config, split: str, *, spacing=None):
    """The dataset's ``split`` at ``spacing`` (default ``config.spacing``); a bad --dataset is a ConfigError."""
    from train.data.sources import make_source

    spacing = config.spacing if spacing is None else spacing
    options = {"spacing": tuple(spacing)} if spacing is not None else {}
    try:
        return make_source(config.dataset, split, cache_dir=config.cache_path, seed=config.seed, **options)
    except ValueError as err:
        if "spacing" in str(err) and options:
            raise ConfigError("spacing", f"{config.dataset}: {str(err).strip().splitlines()[0]}") from None
        raise ConfigError("dataset", str(err).strip().splitlines()[0]) from None
    except (OSError, KeyError) as err:
        raise ConfigError("dataset", str(err).strip().splitlines()[0]) from None


def class_weights_of(config: Config, source, kind=tasks.SEGMENTATION) -> tuple[float, ...] | None:
    """The cross-entropy weights ``--class_weights`` asks for, for ``source``'s classes.

    'balanced' counts examples per class with the task's ``class_counts``:
    label voxels in the training cases (at most ``MAX_CASES_FOR_CLASS_WEIGHTS``,
    evenly spaced, so a large dataset does not delay the start by a full pass)
    for segmentation, cases for classification; and returns
    :func:`train.losses.balanced_class_weights`.
    """
    weights = parse_class_weights(config.class_weights)
    if weights is None:
        return None
    if weights != "balanced":
        if len(weights) != source.num_classes:
            raise ConfigError("class_weights", f"got {len(weights)} weights for {source.num_classes} classes")
        return weights
    picks = np.unique(np.linspace(0, len(source) - 1, min(len(source), MAX_CASES_FOR_CLASS_WEIGHTS)).round().astype(int))
    counts = kind.class_counts(source, picks)
    try:
        return losses.balanced_class_weights(counts)
    except ValueError as err:
        raise ConfigError("class_weights", str(err)) from None


# --------------------------------------------------------------------------
# The plan


def _read_plan(path: Path, flag: str) -> dict:
    try:
        with open(path) as f:
            plan = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(flag, f"{path}: not a readable plan ({' '.join(str(err).split())})") from None
    missing = [k for k in ("target_spacing", "patch", "strides", "kernels", "batch") if k not in plan]
    if not isinstance(plan, dict) or missing:
        raise ConfigError(flag, f"{path}: not a plan (missing {missing})")
    return plan


def make_plan(config: Config, workdir: Path) -> dict:
    """Fingerprints the training cases at their native spacing and plans the experiment.

    Writes WORKDIR/fingerprint.json. The preset's ``patch x batch`` is the
    voxel budget; its U-Net widths give the first and the widest stage.
    """
    from train.planning.experiment import plan_experiment
    from train.planning.fingerprint import fingerprint_source

    native = open_source(dataclasses.replace(config, spacing=None), "train")
    fingerprint = fingerprint_source(native, seed=config.seed, dataset=config.dataset)
    if jax.process_index() == 0:
        (workdir / FINGERPRINT).write_text(json.dumps(fingerprint.to_json(), indent=2) + "\n")
    widths = tuple(config.model_options.get("widths") or (32, 64, 128, 256, 320))
    plan = plan_experiment(
        fingerprint,
        budget_voxels=int(config.batch * math.prod(config.patch)),
        base_width=int(widths[0]),
        max_width=int(max(widths)),
    )
    return {**plan.to_json(), "dataset": config.dataset}


def resolve_plan(config: Config, workdir: Path, kind=tasks.SEGMENTATION) -> tuple[Config, dict | None]:
    """``(the config this run uses, its plan or None)`` for a planned config; unplanned configs pass through.

    Order: WORKDIR/plan.json of an earlier run in this workdir, else --plan=PATH,
    else a new plan from the data. A classification run takes the plan's
    spacing, patch and batch; its class weights are counted from the cases'
    classes (the plan's come from voxel labels), so they are not taken.
    """
    if not config.planned:
        return config, None
    saved = workdir / PLAN
    if saved.exists():
        plan = _read_plan(saved, "workdir")
    elif config.plan != "auto":
        plan = _read_plan(Path(config.plan), "plan")
    else:
        plan = make_plan(config, workdir)
    plan = {k: v for k, v in plan.items() if k not in kind.plan_ignores}
    return apply_plan(config, plan), plan


def select_task(config: Config):
    """The run's task (:func:`train.tasks.select`): --task, else what the training data holds."""
    native = open_source(dataclasses.replace(config, spacing=None), "train")
    try:
        return tasks.select(config.task, native)
    except ValueError as err:
        raise ConfigError("task", str(err)) from None


def network_stages(model) -> dict:
    """``{'strides': [...], 'kernels': [...]}`` per resolution stage of a built (or abstract) model.

    U-Nets report their own stages; other models report what they expose.
    """
    strides = getattr(model, "stage_strides", None)
    kernels = getattr(model, "stage_kernels", None)
    as_lists = lambda rows: [list(map(int, r)) for r in rows] if rows is not None else None  # noqa: E731
    return {"strides": as_lists(strides), "kernels": as_lists(kernels)}


def write_plan(path: Path, config: Config, source, model, plan: dict | None) -> dict:
    """Writes WORKDIR/plan.json: what this run uses (after explicit flags), and where it came from."""
    spacing = config.spacing if config.spacing is not None else getattr(source, "spacing", None)
    if spacing is None and len(source):
        spacing = source[0].get("spacing")
    used = {
        "target_spacing": [float(s) for s in np.broadcast_to(np.asarray(spacing, np.float64), (3,))] if spacing is not None else None,
        "patch": list(config.patch),
        **network_stages(model),
        "batch": config.batch,
        "class_weights": config.class_weights,
        "widths": list(config.model_options.get("widths", ())) or None,
    }
    out = dict(plan) if plan is not None else {}
    out.update(used)
    out["source"] = ("plan " + config.plan if config.plan not in ("auto", "off") else "planned from the data") if plan else "preset"
    if plan is not None:
        out["overridden_by_flags"] = {
            k: {"plan": plan.get(k), "used": used[k]} for k in used if k in plan and plan.get(k) != used[k]
        }
    if jax.process_index() == 0:
        path.write_text(json.dumps(out, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)) + "\n")
    return out


# --------------------------------------------------------------------------
# The run


def train_and_evaluate(config: Config) -> dict:
    """Trains and validates the run ``config`` describes and returns its summary.

    Writes WORKDIR/plan.json, config.json, metrics.csv, tensorboard/, checkpoints/,
    summary.json and validation.png. A WORKDIR with checkpoints resumes from
    the newest good one. Raises ConfigError for bad settings, DataError for bad
    data files and NonFiniteLoss when training diverges (the checkpoints
    written before stay intact).
    """
    config = validate(config)
    impl = config.conv_impl
    if parse_mesh(config.mesh).get("space", 1) > 1 and impl in ("", "auto"):
        # The GEMM lowering walks over depth slices; with depth split over the
        # 'space' axis, XLA's own convolution lets the SPMD partitioner
        # exchange halos instead of gathering the volume.
        impl = "xla"
    if not impl:
        return _run(config)
    # The lowering is read when a step is traced: set it before anything compiles.
    with acsjax.ops.use_conv_impl(impl):
        return _run(config)


def _run(config: Config) -> dict:
    from train import report
    from train.data import pipeline

    started = time.time()
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    kind = select_task(config)
    if kind is not tasks.SEGMENTATION and (config.teacher or config.model_dims == 2):
        flag = "teacher" if config.teacher else "dims"
        raise ConfigError(flag, f"{'distillation' if config.teacher else 'a 2D run'} is built for segmentation; "
                          f"this data set is a {kind.name} task")
    try:
        config = tasks.fit_model(kind, dataclasses.replace(config, task=kind.name))
    except ValueError as err:
        raise ConfigError("model", str(err)) from None
    config, plan = resolve_plan(config, workdir, kind)
    mesh = trainer.make_mesh(config.mesh)
    trainer.check_batch_fits(mesh, config.batch, config.patch[0])
    train_src, val_src = open_source(config, "train"), open_source(config, "val")
    all_cases = len(train_src)
    # The labelled cases: the only ones the 2D slice stage, class weights and (without a teacher) the run see.
    labelled_src = subsets.labelled_subset(train_src, config.labelled_fraction, config.seed)
    teacher = None
    if config.teacher:
        teacher = distill.load_teacher(config.teacher, num_classes=train_src.num_classes,
                                       num_channels=train_src.num_channels, class_names=train_src.class_names)
        logits = distill.cache_logits(teacher, train_src, workdir / distill.TEACHER_DIR, log=_log)
        picks = getattr(labelled_src, "indices", np.arange(len(train_src)))
        train_src = distill.DistillSource(train_src, logits, picks)
    else:
        train_src = labelled_src
    init_lib.check_patch_fits(config, train_src)
    num_classes = train_src.num_classes
    build = init_lib.model_fn(config, in_channels=train_src.num_channels, num_classes=num_classes, dims=config.model_dims)
    abstract_model = init_lib.check_model(build, config.patch)
    schedule = trainer.make_schedule(config.lr, config.steps, config.warmup_steps)
    tx = trainer.make_optimizer(schedule, weight_decay=config.weight_decay, grad_clip=config.grad_clip)
    class_weights = class_weights_of(config, labelled_src, kind)
    kd = trainer.Distill(config.kd_weight, config.kd_temperature) if teacher is not None else None
    task = trainer.make_task(build, tx, schedule, num_classes, mesh, config.seed, class_weights, kind, kd)
    if jax.process_index() == 0:
        write_plan(workdir / PLAN, config, train_src, abstract_model, plan)
        write_run_config(workdir / "config.json", config, train_src)

    if config.model_dims == 2:
        # The 2D network itself: trained on axial slices, as the 2D twin of --pretrained=slices is.
        trainer.check_batch_fits(mesh, config.slices_batch, config.patch[1], flag="slices_batch")
        batch, voxels = config.slices_batch, config.slices_batch * math.prod(config.patch[1:])
        make_data = kind.slice_data
    else:
        batch, voxels, make_data = config.batch, config.batch * math.prod(config.patch), kind.train_data
    ds = make_data(train_src, config, batch=batch // jax.process_count(),
                   shard_index=jax.process_index(), shard_count=jax.process_count())
    iterator = pipeline.make_iterator(ds, config.workers)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
    restored = checkpoints.restore_latest(task.abstract_state, iterator)
    if restored is not None:
        start, state = restored
        _log(f"resuming from step {start} ({checkpoints.directory})")
    else:
        start, state = 0, init_lib.initialize(config, task, task.init(), labelled_src, workdir)

    def validate_state(state, final):
        return kind.validate(trainer.eval_model(task, state), val_src, config, final=final)

    progress = trainer.Progress(name="train", total=config.steps, voxels_per_step=voxels,
                                csv_path=workdir / "metrics.csv", start=start, tensorboard=workdir / "tensorboard",
                                step_metric=kind.step_metric, score=kind.score,
                                extra_fields=("supervised", "distill") if kd is not None else ())
    try:
        state, result = trainer.fit(
            task, state, iterator, progress, start=start, stop=config.steps, log_every=config.log_every,
            checkpoints=checkpoints, checkpoint_every=config.checkpoint_every,
            validate=validate_state, eval_every=config.eval_every,
        )
    except trainer.NonFiniteLoss as err:
        checkpoints.close()
        progress.close()
        last = checkpoints.latest_step()
        kept = f"step {last} in {checkpoints.directory}" if last is not None else "none yet"
        raise trainer.NonFiniteLoss(f"{err}; training stopped. Last good checkpoint: {kept}. Try a lower --lr.") from None
    checkpoints.close()
    if result is None:  # nothing left to train (a finished run rerun): validate once more
        result = validate_state(state, True)
    summary = dict(
        kind.summary_fields(result),
        **kind.baselines(train_src, val_src),
        task=kind.name,
        init=config.init, pretrained=config.pretrained_source or None, steps=config.steps,
        wall_s=round(time.time() - started, 1), model=config.model, dims=config.model_dims, dataset=config.dataset,
        patch=list(config.patch), batch=config.batch, devices=jax.device_count(), processes=jax.process_count(),
        mesh=dict(mesh.shape), resumed_from=start or None, best_step=checkpoints.best_step(),
        class_weights=list(class_weights) if class_weights is not None else None,
        labelled_fraction=config.labelled_fraction, labelled_cases=len(labelled_src), training_cases=all_cases,
        teacher=teacher.describe() if teacher is not None else None,
        kd_weight=config.kd_weight if teacher is not None else None,
        kd_temperature=config.kd_temperature if teacher is not None else None,
    )
    if jax.process_index() == 0:
        report.write_summary(str(workdir), summary, required=report.COMMON + kind.required)
        figure = kind.report(str(workdir), result, val_src, title=f"{config.model} init={config.init}")
        if figure is not None:
            progress.image("val/overlay", figure, config.steps)
        _log(f"{kind.headline(summary)} in {summary['wall_s']:.0f}s; {workdir / report.SUMMARY}")
    progress.close()
    return summary


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
