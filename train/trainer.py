"""The training loop: mesh, sharded train state, the jitted step and ``fit``.

Sharding: one ``jax.make_mesh`` over every device with axes ('data', 'space'),
both ``AxisType.Auto`` (the compiler partitions the model's global-view code;
Explicit mode would ask every op such as ``jnp.repeat`` for an out_sharding).
Batches are sharded ``P('data', 'space')``: the batch over 'data', the depth
axis of each volume over 'space' (XLA inserts the convolution halos). The
train state is replicated. Each process feeds its own rows of the global batch
(``jax.make_array_from_process_local_data``).

The state is a plain dict pytree ``{step, params, opt_state, model_state,
rng}``; the model's structure lives in an ``nnx`` graphdef, so the jitted step
``(state, batch) -> (state, metrics)`` is a pure function, donated in place.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding


from train import losses, tasks
from train import tensorboard as board_lib
from train.checkpoint import Checkpoints
from train.config import ConfigError, parse_mesh

AXES = ("data", "space")


class NonFiniteLoss(RuntimeError):
    """Training produced a non-finite loss or gradient; the run stops."""


def maybe_initialize_distributed(environ=os.environ) -> bool:
    """Calls ``jax.distributed.initialize`` when the environment describes several processes.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` +
    ``JAX_PROCESS_ID`` (any launcher), or a Slurm / Open MPI job with more than
    one task (JAX detects its parameters). Must run before any other JAX call.
    Returns True when running multi-process.
    """
    if jax.distributed.is_initialized():
        return True
    address, count, index = (environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))
    if address and count and index:
        jax.distributed.initialize(address, num_processes=int(count), process_id=int(index))
        return True
    if int(environ.get("SLURM_NTASKS", "1")) > 1 or "OMPI_MCA_orte_hnp_uri" in environ:
        jax.distributed.initialize()
        return True
    return False


COMPILATION_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def use_compilation_cache(cache_root: str, environ=os.environ) -> str | None:
    """Keeps compiled programs on disk under ``CACHE_ROOT/jax``, so a rerun or resume skips recompiling.

    ``cache_root`` is the run's cache directory (``Config.cache_path``).
    ``JAX_COMPILATION_CACHE_DIR`` in the environment overrides the place
    (empty: no cache); JAX reads it itself. Must run before the first
    compilation. Returns the directory in use, or None.
    """
    if COMPILATION_CACHE_ENV in environ or jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir or None
    directory = os.path.join(cache_root, "jax")
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory


def make_mesh(spec: str = "", devices=None) -> jax.sharding.Mesh:
    """A ('data', 'space') mesh over ``devices`` (default: all), e.g. spec 'data=4,space=2'.

    An axis left out takes what the other leaves; the product must equal the
    device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = parse_mesh(spec)
    space = sizes.get("space", 1 if "data" not in sizes else max(1, n // sizes["data"]))
    data = sizes.get("data", n // space)
    if data * space != n or n % space:
        raise ConfigError("mesh", f"data={data} x space={space} does not match the {n} available devices")
    return jax.make_mesh((data, space), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def replicated(mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, jax.P())


def batch_shardings(mesh, label_axes=("data", "space"), distill: bool = False) -> dict[str, NamedSharding]:
    """Shardings of a batch dict: batch axis on 'data', axis 1 (depth, or height in 2D) on 'space'.

    ``label_axes`` lays out the labels: voxel labels like the image, one class
    per example (``('data',)``) along the batch only. ``distill`` adds the
    teacher's logits (laid out like the image) and the per-example
    ``labelled`` flags of a distillation run.
    """
    spec = jax.P("data", "space")
    out = {"image": NamedSharding(mesh, spec), "label": NamedSharding(mesh, jax.P(*label_axes))}
    if distill:
        out.update(teacher=NamedSharding(mesh, spec), labelled=NamedSharding(mesh, jax.P("data")))
    return out


def check_batch_fits(mesh, batch: int, depth: int, *, flag: str = "batch") -> None:
    """ConfigError naming the flag when the batch or patch cannot be split over the mesh."""
    data, space = mesh.shape["data"], mesh.shape["space"]
    if batch % data:
        raise ConfigError(flag, f"{batch} is not divisible by the mesh's data axis ({data})")
    if depth % space:
        raise ConfigError("mesh", f"space={space} does not divide the patch depth {depth}")
    if data % jax.process_count():
        raise ConfigError("mesh", f"the data axis ({data}) must be a multiple of the {jax.process_count()} processes")


def shard_batch(batch: dict, mesh, label_axes=("data", "space"), distill: bool = False) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays sharded over the mesh."""
    out = {}
    for key, sharding in batch_shardings(mesh, label_axes, distill).items():
        local = np.asarray(batch[key])
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def make_schedule(lr: float, steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``lr``, then cosine decay to ``lr / 100`` at ``steps``."""
    warmup = min(warmup_steps, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr / 100)


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float, grad_clip: float) -> optax.GradientTransformation:
    """AdamW (decay on kernels only), after global-norm clipping when ``grad_clip > 0``."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
    adamw = optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(grad_clip), adamw) if grad_clip > 0 else adamw


@dataclasses.dataclass
class Task:
    """Everything the step needs that is not an array: model structure, optimizer, shardings."""

    graphdef: Any
    eval_graphdef: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    num_classes: int
    mesh: Any
    abstract_state: Any  # ShapeDtypeStructs carrying their shardings
    init: Callable[[], dict]  # builds the initial state, sharded
    class_weights: tuple[float, ...] | None = None  # cross-entropy weight per class
    kind: Any = tasks.SEGMENTATION  # what is learnt: loss, step metrics, validation (train.tasks)
    distill: Distill | None = None  # a teacher's logits in every batch: how much they weigh


@dataclasses.dataclass(frozen=True)
class Distill:
    """Knowledge distillation settings: loss = (1 - weight) x supervised + weight x T^2 x KL(teacher || student)."""

    weight: float
    temperature: float


def _split(model):
    return nnx.split(model, nnx.Param, ...)


def make_task(
    model_fn: Callable[[nnx.Rngs], nnx.Module], tx, schedule, num_classes: int, mesh, seed: int = 0,
    class_weights: Sequence[float] | None = None, kind=tasks.SEGMENTATION, distill: Distill | None = None,
) -> Task:
    """The Task of a model: its abstract state from ``jax.eval_shape`` (no memory used).

    ``class_weights`` (one float per class, or None) weight the loss's cross-entropy;
    ``kind`` is what is learnt (a :mod:`train.tasks` task: loss and step metrics);
    ``distill`` makes every batch carry a teacher's logits (see :func:`train_step`).

    ``task.init()`` then builds the initial state with
    ``jax.jit(init, out_shardings=...)``, directly in its sharded layout.
    """
    graphdefs = {}

    def init(key):
        model = model_fn(nnx.Rngs(key))
        graphdefs["train"], params, model_state = _split(model)
        model.eval()
        graphdefs["eval"] = nnx.graphdef(model)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "model_state": model_state,
            "rng": jax.random.key_data(jax.random.fold_in(key, 1)),
        }

    key = jax.random.key(seed)
    abstract = jax.eval_shape(init, key)
    shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    def create() -> dict:
        with jax.set_mesh(mesh):
            return jax.jit(init, out_shardings=shardings)(key)

    weights = None if class_weights is None else tuple(float(w) for w in class_weights)
    if weights is not None and len(weights) != num_classes:
        raise ValueError(f"class_weights has {len(weights)} entries for {num_classes} classes")
    return Task(graphdefs["train"], graphdefs["eval"], tx, schedule, num_classes, mesh, abstract, create, weights, kind,
                distill)


def train_step(task: Task, state: dict, batch: dict) -> tuple[dict, dict]:
    """One optimizer step on ``batch`` (pure; ``make_step`` jits it).

    With ``task.distill`` the batch also holds ``teacher`` (the teacher's
    logits on the batch's voxels, NaN where the teacher has no data) and
    ``labelled`` ((N,) 1 for examples of labelled cases, 0 for the others):
    the loss is ``(1 - a) x supervised + a x T^2 x KL`` (:func:`train.losses.combined_loss`),
    the supervised term over the labelled examples only, and both terms are
    logged (``supervised``, ``distill``). The teacher's logits are data: no
    gradient reaches the teacher.
    """

    def loss_fn(params, model_state):
        # Fresh variables made inside this trace: BatchNorm may update them here.
        model = nnx.merge(task.graphdef, params, jax.tree.map(lambda x: x, model_state))
        outputs = model(batch["image"])
        main = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        if task.distill is None:
            loss, parts = task.kind.loss(outputs, batch["label"], task.num_classes, task.class_weights)
        else:
            loss, parts = _distillation_objective(task, outputs, main, batch)
        return loss, (parts, _split(model)[2], main)

    (loss, (parts, model_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["model_state"]
    )
    updates, opt_state = task.tx.update(grads, state["opt_state"], state["params"])
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(state["params"], updates),
        "opt_state": opt_state,
        "model_state": model_state,
        "rng": jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0]),
    }
    metrics = {
        "loss": loss,
        **task.kind.step_metrics(logits, batch["label"], task.num_classes),
        "grad_norm": optax.tree.norm(grads),
        "lr": task.schedule(state["step"]),
        **parts,
    }
    return new_state, metrics


def _distillation_objective(task: Task, outputs, main, batch) -> tuple[jax.Array, dict]:
    labelled = batch["labelled"].astype(jnp.float32)
    supervised, parts = task.kind.loss(outputs, batch["label"], task.num_classes, task.class_weights, labelled)
    teacher = batch["teacher"]
    valid = jnp.all(jnp.isfinite(teacher), axis=-1)
    teacher = jnp.where(valid[..., None], teacher, 0.0)
    distill = losses.distillation_loss(main, teacher, temperature=task.distill.temperature, mask=valid)
    # A batch without labelled examples has a supervised term of exactly 0 (see segmentation_loss's sample_weights).
    loss = losses.combined_loss(supervised, distill, task.distill.weight)
    return loss, {**parts, "supervised": supervised, "distill": distill}


def make_step(task: Task):
    """``train_step`` jitted with the state replicated, the batch sharded and the state donated."""
    state_shardings = jax.tree.map(lambda a: a.sharding, task.abstract_state)
    return jax.jit(
        functools.partial(train_step, task),
        in_shardings=(state_shardings, batch_shardings(task.mesh, task.kind.label_axes, task.distill is not None)),
        out_shardings=(state_shardings, replicated(task.mesh)),
        donate_argnums=(0,),
    )


def host_copy(tree):
    """Numpy copy of a replicated pytree (works in every process of a multi-host run)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else a, tree)


def eval_model(task: Task, state: dict) -> nnx.Module:
    """The model in eval mode with the state's parameters, on this process's default device."""
    return nnx.merge(task.eval_graphdef, host_copy(state["params"]), host_copy(state["model_state"]))


class Progress:
    """Collects step metrics, checks them, prints progress lines, writes metrics.csv and TensorBoard files.

    With ``tensorboard`` (a run directory, see :mod:`train.tensorboard`) every
    row also goes there as scalars ``train/<field>`` and ``val/<score>``
    (``val/dice_mean`` for segmentation), validations add
    ``val/dice/<class name>``, and :meth:`image` adds figures.
    Call :meth:`close` when the run is done.

    ``step_metric`` and ``score`` are the task's (:mod:`train.tasks`): the
    per-step metric ('dice', 'accuracy') and the validation score; the
    columns of metrics.csv follow them (segmentation's are unchanged); ``extra_fields``
    adds step metrics as columns and TensorBoard scalars.
    """

    FIELDS = ("step", "loss", "dice", "ce", "dice_loss", "grad_norm", "lr", "voxels_per_s", "val_dice_mean", "wall_s")
    TRAIN_SCALARS = ("loss", "dice", "ce", "dice_loss", "grad_norm", "lr", "voxels_per_s")

    def __init__(self, *, name: str, total: int, voxels_per_step: int, csv_path: Path | None, start: int,
                 tensorboard: Path | None = None, step_metric: str = "dice", score: str = "val_dice_mean",
                 extra_fields: Sequence[str] = ()):
        self.name, self.total, self.voxels = name, total, voxels_per_step
        self.step_metric, self.score = step_metric, score
        swap = {"dice": step_metric, "val_dice_mean": score}
        fields = tuple(swap.get(f, f) for f in type(self).FIELDS)
        # Extra step metrics (a distillation run's 'supervised' and 'distill' terms) go before the validation score.
        at = fields.index("voxels_per_s") + 1
        self.FIELDS = fields[:at] + tuple(extra_fields) + fields[at:]
        self.TRAIN_SCALARS = tuple(swap.get(f, f) for f in type(self).TRAIN_SCALARS) + tuple(extra_fields)
        self.csv_path = csv_path if jax.process_index() == 0 else None
        self.pending: list[tuple[int, dict]] = []
        self.t0 = self.tick = time.perf_counter()
        self.tick_step = self.start = start
        if self.csv_path is not None:
            _truncate_csv(self.csv_path, start, self.FIELDS)
        self.board = board_lib.Board(tensorboard, start=start) if tensorboard is not None else None

    def restart_clock(self, step: int) -> None:
        self.tick, self.tick_step = time.perf_counter(), step

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 2)

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self, step: int, *, print_line: bool = True) -> dict:
        """Syncs pending metrics; raises NonFiniteLoss; logs the newest. Returns its values."""
        if not self.pending:
            return {}
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in self.pending]
        self.pending = []
        for s, m in fetched:
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                raise NonFiniteLoss(f"loss {m['loss']} / gradient norm {m['grad_norm']} at step {s}")
        now = time.perf_counter()
        row = dict(fetched[-1][1], step=step, wall_s=round(now - self.t0, 2))
        row["voxels_per_s"] = self.voxels * (step - self.tick_step) / max(now - self.tick, 1e-9)
        self.tick, self.tick_step = now, step
        if print_line and jax.process_index() == 0:
            eta = (now - self.t0) / max(step - self.start, 1) * (self.total - step)
            print(
                f"{self.name} step {step:>6}/{self.total}  loss {row['loss']:.4f}  "
                f"{self.step_metric} {row[self.step_metric]:.3f}  "
                f"lr {row['lr']:.2e}  vox/s {row['voxels_per_s']:.3g}  eta {eta:.0f}s",
                flush=True,
            )
        self.write(row)
        return row

    def write(self, row: dict) -> None:
        """Appends ``row`` (a dict with ``step`` and some of ``FIELDS``) to metrics.csv and TensorBoard."""
        if self.board is not None:
            scalars = {f"train/{k}": row[k] for k in self.TRAIN_SCALARS if k in row}
            scalars[f"val/{self.score.removeprefix('val_')}"] = row.get(self.score)
            self.board.scalars(row["step"], scalars)
            self.board.flush()  # as current on disk as metrics.csv
        if self.csv_path is None:
            return
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def validation(self, step: int, result: dict) -> None:
        """Logs a validation result: its score (and for segmentation per-class Dice and threshold baseline)."""
        if self.board is not None:
            scalars = {f"val/dice/{name}": dice for name, dice in result.get("val_dice", {}).items()}
            if "val_dice" in result:
                scalars["val/baseline_threshold_dice"] = result.get("baseline_threshold_dice")  # None: not computed
            for key in ("val_accuracy", "val_auc"):  # classification's other metrics
                if key in result and key != self.score:
                    scalars[f"val/{key.removeprefix('val_')}"] = result[key]
            self.board.scalars(step, scalars)
        self.write({"step": step, self.score: result[self.score], "wall_s": self.elapsed()})

    def image(self, tag: str, image, step: int) -> None:
        """Adds a PNG file or an image array to TensorBoard (nothing without a TensorBoard directory)."""
        if self.board is not None:
            self.board.image(tag, image, step)
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _truncate_csv(path: Path, start: int, fields) -> None:
    # A resumed run replays the steps after its checkpoint: drop their old rows.
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= start]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def fit(task: Task, state, iterator, progress: Progress, *, start: int, stop: int, log_every: int,
        checkpoints: Checkpoints | None = None, checkpoint_every: int = 0,
        validate: Callable[[dict, bool], dict] | None = None, eval_every: int = 0):
    """Runs steps ``start + 1 .. stop``; returns ``(state, last validation result or None)``.

    Metrics are synced (and checked for NaN/Inf) at every log, validation and
    checkpoint step, so a state is saved only after its losses proved finite.
    ``validate(state, final)`` gets ``final=True`` at ``stop``.
    """
    step_fn = make_step(task)
    result = None
    try:
        for step in range(start + 1, stop + 1):
            batch = shard_batch(next(iterator), task.mesh, task.kind.label_axes, task.distill is not None)
            with jax.set_mesh(task.mesh):
                state, metrics = step_fn(state, batch)
            progress.add(step, metrics)
            last = step == stop
            evaluate_now = validate is not None and (last or (eval_every > 0 and step % eval_every == 0))
            save_now = checkpoints is not None and (last or step % checkpoint_every == 0)
            if evaluate_now or save_now or last or step % log_every == 0:
                progress.flush(step)
            if evaluate_now:
                result = validate(state, last)
                progress.restart_clock(step)  # keep validation time out of voxels/s
                score = task.kind.score
                progress.validation(step, result)
                if jax.process_index() == 0:
                    print(f"{progress.name} step {step:>6}/{stop}  {score} {result[score]:.4f}", flush=True)
            if save_now:
                checkpoints.save(step, state, iterator, score=result[task.kind.score] if evaluate_now else None)
    except BaseException:
        if checkpoints is not None:
            checkpoints.wait()  # whatever stopped the loop, a save under way completes
        raise
    return state, result
