"""The model a run trains, and its starting parameters from --init / --pretrained.

``--init=scratch`` keeps the random 3D initialisation. Every other ``--init``
starts from the 2D twin of the model (same name and options, ``dims=2``):

- ``--pretrained=slices``: the 2D twin is first trained on 2D slices of the
  training volumes (axial planes, so the kernels lie in the plane that
  ``inflate_params(plane='axial')`` assumes) with the run's task (voxel labels,
  or for classification each slice labelled with its case's class); the
  result is saved as an Orbax checkpoint in ``WORKDIR/slices2d`` and reused by
  a rerun;
- ``--pretrained=imagenet``: the shipped EfficientNet-Lite0 ImageNet weights
  (``efficientnet_lite0`` or the encoder of ``efficientnet_lite0_unet``);
- ``--pretrained=PATH``: a torchvision/timm .safetensors/.pth state dict (a
  ResNet's or EfficientNet-Lite0's weights, for the classifier or the U-Net's
  encoder) or an Orbax 2D checkpoint directory such as another run's ``slices2d``.

The 2D state is then mapped onto the 3D model: ``acsjax.inflate_params`` with
the ``--init`` method (center, average, scale), kept 2D for ACS, or (1, k, k)
for 2.5d. Parameters the 2D source does not have keep their random values.

3D sources skip the inflation (:func:`start_from_3d`):

- ``--pretrained=vdt:SOURCE``: VDT pre-training of the run's own 3D model (its
  encoder for U-Nets) on the 2D labelled images ``SOURCE`` (:mod:`train.pretrain`),
  in ``WORKDIR/vdt`` (reused by a rerun);
- ``--pretrained=PATH`` where PATH is a ``python -m train.pretrain`` workdir.

Both write ``WORKDIR/pretrained.json``: the paths loaded and those that start fresh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import acsjax
from acsjax.models import build_model, model_options
from acsjax.trees import flatten, path_str
from train import tasks, trainer
from train.config import VDT_PREFIX, Config, ConfigError

SLICES_DIR = "slices2d"
VDT_DIR = "vdt"
PRETRAINED_REPORT = "pretrained.json"


def model_fn(config: Config, *, in_channels: int, num_classes: int, dims) -> Callable[[nnx.Rngs], nnx.Module]:
    """``rngs -> model`` for the config's model at ``dims``; checks the name and options now."""
    try:
        allowed = model_options(config.model)
    except ValueError as err:
        raise ConfigError("model", str(err)) from None
    options = dict(config.model_options)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError("model_option", f"{config.model} has no option(s) {unknown}; allowed: {', '.join(allowed)}")
    if config.remat:
        options["remat"] = config.remat
    if config.dtype != "float32":
        options["dtype"] = jnp.dtype(config.dtype)
    if config.deep_supervision:
        options["deep_supervision"] = True

    def build(rngs: nnx.Rngs) -> nnx.Module:
        return build_model(config.model, dims=dims, in_channels=in_channels, num_classes=num_classes, rngs=rngs, **options)

    return build


def check_model(build: Callable[[nnx.Rngs], nnx.Module], patch) -> nnx.Module:
    """Builds the model abstractly (no memory) to turn option and patch errors into ConfigErrors.

    Returns the abstract model (its structure, strides and shapes; no arrays).
    """
    try:
        model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    except (TypeError, ValueError) as err:
        flag = "remat" if "remat" in str(err) else "model_option"
        raise ConfigError(flag, str(err).splitlines()[0]) from None
    divisor = tuple(getattr(model, "size_divisor", ()) or ())
    if divisor and any(p % d for p, d in zip(patch[-len(divisor):], divisor)):
        raise ConfigError("patch", f"{tuple(patch)} must be a multiple of the model's downsampling {divisor}")
    return model


def check_patch_fits(config: Config, source) -> None:
    """With padding off, a patch larger than every volume cannot be sampled."""
    if config.pad:
        return
    shapes = [np.shape(source[i]["image"])[:3] for i in range(len(source))]
    if not any(all(p <= s for p, s in zip(config.patch, shape)) for shape in shapes):
        raise ConfigError("patch", f"{config.patch} is larger than every training volume (largest {max(shapes)}) and --nopad is set")


def _restore_2d(path: Path) -> dict:
    try:
        return ocp.StandardCheckpointer().restore(path.absolute())
    except Exception as err:  # any unreadable directory is a bad --pretrained
        raise ConfigError("pretrained", f"{path}: not a readable Orbax checkpoint ({type(err).__name__})") from None


def _load_weights(model, src: str) -> None:
    """A torchvision/timm file or 'imagenet' into a 2D classifier, or a 2D U-Net's encoder."""
    from acsjax import pretrained
    from acsjax.models import EfficientNetLite, ResNet

    if isinstance(model, EfficientNetLite):
        pretrained.load_efficientnet_lite0(model, src)
    elif isinstance(model, ResNet):
        if src == "imagenet":
            raise ValueError(f"{model.name}: no installed package ships ResNet ImageNet weights; pass a torchvision "
                             "or timm .safetensors/.pth path instead of 'imagenet'")
        pretrained.load_resnet(model, src)
    else:
        pretrained.load_encoder(model, src)


def load_2d(config: Config, build2d, source, mesh, workdir: Path, class_weights=None, kind=tasks.SEGMENTATION) -> dict:
    """The 2D twin's whole state (params and statistics) as nested dicts of arrays.

    ``class_weights`` weight the cross-entropy when the twin is trained on
    slices, for the run's task ``kind``.
    """
    src = config.pretrained_source
    if src == "slices":
        return train_slices(config, build2d, source, mesh, workdir, class_weights, kind)
    model = build2d(nnx.Rngs(config.seed))
    from acsjax import pretrained  # only these sources need the importers

    try:
        if Path(src).is_dir():
            pretrained.load_tree(model, _restore_2d(Path(src)))
        else:
            _load_weights(model, src)
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise ConfigError("pretrained", f"{src}: {str(err).strip().splitlines()[0]}") from None
    return nnx.state(model).to_pure_dict()


def train_slices(config: Config, build2d, source, mesh, workdir: Path, class_weights=None,
                 kind=tasks.SEGMENTATION) -> dict:
    """Trains the 2D twin on axial slices for ``config.slices_steps`` steps, or reuses WORKDIR/slices2d.

    Slices are ``patch[1:]`` in-plane patches of the training volumes, so the
    2D model sees the planes and scale the 3D model will; ``kind`` (the run's
    task) labels them (voxel labels, or the case's class). ``class_weights``
    (one per class, or None) weight the cross-entropy.
    """
    from train.data import pipeline

    target = (workdir / SLICES_DIR).absolute()
    if target.exists():
        return _restore_2d(target)
    schedule = trainer.make_schedule(config.slices_lr, config.slices_steps, config.warmup_steps)
    tx = trainer.make_optimizer(schedule, weight_decay=config.weight_decay, grad_clip=config.grad_clip)
    task = trainer.make_task(build2d, tx, schedule, source.num_classes, mesh, config.seed, class_weights, kind)
    trainer.check_batch_fits(mesh, config.slices_batch, config.patch[1], flag="slices_batch")
    state = task.init()
    ds = kind.slice_data(source, config, batch=config.slices_batch // jax.process_count(),
                         shard_index=jax.process_index(), shard_count=jax.process_count())
    progress = trainer.Progress(
        name="slices",
        total=config.slices_steps,
        voxels_per_step=config.slices_batch * config.patch[1] * config.patch[2],
        csv_path=workdir / "slices_metrics.csv",
        start=0,
        tensorboard=workdir / "tensorboard" / "slices",  # a second run beside the 3D one
        step_metric=kind.step_metric,
        score=kind.score,
    )
    iterator = pipeline.make_iterator(ds, config.workers)
    state, _ = trainer.fit(task, state, iterator, progress, start=0, stop=config.slices_steps, log_every=config.log_every)
    progress.close()
    pure = nnx.state(trainer.eval_model(task, state)).to_pure_dict()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, pure)
    checkpointer.wait_until_finished()
    return pure


def inflate_2d(config: Config, tree2d: dict, like=None) -> dict[str, np.ndarray]:
    """{path: array} of the 2D tree mapped to the run's dims by the ``--init`` method.

    ``like`` ({path: shape-having leaf} of the 3D model) lets each kernel's
    target decide its depth, so a planned network whose levels mix (1, 3, 3)
    and (3, 3, 3) kernels inflates without rules: (1, k, k) levels take the 2D
    kernel as it is (the 2D network slice by slice), the others the method.
    """
    try:
        return flatten(acsjax.inflate_params(tree2d, config.init, like=like))
    except ValueError as err:
        raise ConfigError("pretrained", str(err).splitlines()[0]) from None


def initialize(config: Config, task, state: dict, source, workdir: Path) -> dict:
    """The initial train state: ``state`` itself for scratch, else with the inflated 2D parameters.

    Every parameter and statistic of the 3D model must come from the 2D
    source with the same path and the inflated shape; otherwise the 2D source
    does not fit the model and a ConfigError names --pretrained.
    """
    if config.init == "scratch":
        return state
    src = config.pretrained_source
    if src.startswith(VDT_PREFIX) or _vdt_state(src) is not None:
        return start_from_3d(config, task, state, workdir)
    build2d = model_fn(config, in_channels=source.num_channels, num_classes=source.num_classes, dims=2)
    # The 2D twin trains with the 3D task's class weights (same classes, same training labels).
    tree2d = load_2d(config, build2d, source, task.mesh, workdir, task.class_weights, task.kind)
    target = {"params": task.abstract_state["params"], "model_state": task.abstract_state["model_state"]}
    wanted = {**flatten(target["params"]), **flatten(target["model_state"])}
    # A 2D run (--dims=2) is the 2D network: its source's weights go in as they are.
    flat = flatten(tree2d) if config.model_dims == 2 else inflate_2d(config, tree2d, like=wanted)
    # SoftACS view logits have no 2D counterpart: they start as the layer initialises them (zeros, equal mixing).
    flat.update({p: np.zeros(s.shape, s.dtype) for p, s in wanted.items() if p.endswith("view_logits") and p not in flat})
    try:
        acsjax.assert_fits(flat, wanted, what=f"the 2D source {config.pretrained_source!r}")
    except ValueError as err:
        raise ConfigError("pretrained", str(err)) from None

    def take(path, leaf):
        return jax.device_put(np.asarray(flat[path_str(path)], leaf.dtype), leaf.sharding)

    new = dict(state)
    for key in ("params", "model_state"):
        new[key] = jax.tree_util.tree_map_with_path(take, task.abstract_state[key])
    return new


def _vdt_state(src: str) -> Path | None:
    from train.pretrain import state_dir

    return state_dir(src) if src and not src.startswith(VDT_PREFIX) and Path(src).is_dir() else None


def pretrain_vdt(config: Config, workdir: Path) -> tuple[dict, str]:
    """VDT pre-training for ``--pretrained=vdt:SOURCE`` in WORKDIR/vdt (reused by a rerun).

    Returns ``(the pre-trained tree, the path prefix of its classifier in the run's model)``.
    """
    from train import pretrain

    try:
        _, _, prefix = pretrain.classifier_twin(config.model, config.model_options)
        tree = pretrain.pretrain(
            config.pretrained_source.removeprefix(VDT_PREFIX), config.model, workdir / VDT_DIR,
            options=config.model_options, steps=max(config.slices_steps, 1), batch=config.slices_batch,
            lr=config.slices_lr, size=tuple(config.patch[1:]), seed=config.seed, workers=config.workers,
            log_every=config.log_every, checkpoint_every=config.checkpoint_every,
            warmup_steps=config.warmup_steps, weight_decay=config.weight_decay, grad_clip=config.grad_clip,
        )
    except pretrain.PretrainError as err:
        raise ConfigError("pretrained", f"{config.pretrained_source}: {str(err).removeprefix('--model: ')}") from None
    return tree, prefix


def start_from_3d(config: Config, task, state: dict, workdir: Path) -> dict:
    """The initial state from a pre-trained 3D classifier (VDT), transferred by path into the run's model.

    The pre-trained parameters were learnt with depth strides off; kernel
    shapes do not depend on strides, so they load into the run's model with
    its real strides. What loads, what is adapted (input channels), what
    starts fresh (the head, a U-Net's decoder) and what the source had that
    nothing took are written to WORKDIR/pretrained.json and summarised on
    the console.
    """
    import json

    from train import pretrain

    src = config.pretrained_source
    if src.startswith(VDT_PREFIX):
        tree, prefix = pretrain_vdt(config, workdir)
        where = str(workdir / VDT_DIR)
    else:
        directory = _vdt_state(src)
        meta = pretrain.read_meta(directory)
        try:
            twin, _, prefix = pretrain.classifier_twin(config.model, config.model_options)
        except pretrain.PretrainError as err:
            raise ConfigError("pretrained", f"{src}: {str(err).removeprefix('--model: ')}") from None
        if meta.get("model") != twin:
            raise ConfigError("pretrained", f"{src}: pre-trained a {meta.get('model')}, the run's --model={config.model} "
                              f"needs a {twin}")
        tree, where = _restore_2d(directory), str(directory)
    target = {**flatten(task.abstract_state["params"]), **flatten(task.abstract_state["model_state"])}
    values, report = pretrain.transfer(tree, target, prefix=prefix)
    if not values:
        raise ConfigError("pretrained", f"{src}: no parameter path of the pre-trained model fits --model={config.model}")
    if jax.process_index() == 0:
        (workdir / PRETRAINED_REPORT).write_text(json.dumps({"source": src, "checkpoint": where, "prefix": prefix, **report},
                                                            indent=2) + "\n")
        print(f"pretrained {src}: loaded {len(report['loaded'])} of {len(target)} entries "
              f"({len(report['adapted'])} adapted to the input channels); {len(report['fresh'])} start fresh "
              f"({', '.join(report['fresh'][:3])}{', ...' if len(report['fresh']) > 3 else ''}); "
              f"{len(report['unused'])} pre-trained entries unused; see {workdir / PRETRAINED_REPORT}", flush=True)

    new = dict(state)
    for key in ("params", "model_state"):
        def take(path, leaf, current):
            name = path_str(path)
            if name not in values:
                return current
            return jax.device_put(np.asarray(values[name], leaf.dtype), leaf.sharding)

        new[key] = jax.tree_util.tree_map_with_path(take, task.abstract_state[key], state[key])
    return new
