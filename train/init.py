"""The model a run trains, and its starting parameters from --init / --pretrained.

``--init=scratch`` keeps the random 3D initialisation. Every other ``--init``
starts from the 2D twin of the model (same name and options, ``dims=2``):

- ``--pretrained=slices``: the 2D twin is first trained on 2D slices of the
  training volumes (axial planes, so the kernels lie in the plane that
  ``inflate_params(plane='axial')`` assumes); the result is saved as an Orbax
  checkpoint in ``WORKDIR/slices2d`` and reused by a rerun;
- ``--pretrained=imagenet``: the shipped EfficientNet-Lite0 ImageNet encoder;
- ``--pretrained=PATH``: a .safetensors/.pth state dict (encoder weights) or an
  Orbax 2D checkpoint directory such as another run's ``slices2d``.

The 2D state is then mapped onto the 3D model: ``acsjax.inflate_params`` with
the ``--init`` method (center, average, scale), kept 2D for ACS, or (1, k, k)
for 2.5d. Parameters the 2D source does not have keep their random values.
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
from train import trainer
from train.config import Config, ConfigError

SLICES_DIR = "slices2d"


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


def load_2d(config: Config, build2d, source, mesh, workdir: Path, class_weights=None) -> dict:
    """The 2D twin's whole state (params and statistics) as nested dicts of arrays.

    ``class_weights`` weight the cross-entropy when the twin is trained on slices.
    """
    src = config.pretrained_source
    if src == "slices":
        return train_slices(config, build2d, source, mesh, workdir, class_weights)
    model = build2d(nnx.Rngs(config.seed))
    from acsjax import pretrained  # only these sources need the importers

    try:
        if src == "imagenet":
            pretrained.load_encoder(model, "imagenet")
        elif Path(src).is_dir():
            pretrained.load_tree(model, _restore_2d(Path(src)))
        else:
            pretrained.load_encoder(model, src)
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise ConfigError("pretrained", f"{src}: {str(err).strip().splitlines()[0]}") from None
    return nnx.state(model).to_pure_dict()


def train_slices(config: Config, build2d, source, mesh, workdir: Path, class_weights=None) -> dict:
    """Trains the 2D twin on axial slices for ``config.slices_steps`` steps, or reuses WORKDIR/slices2d.

    Slices are ``patch[1:]`` in-plane patches of the training volumes, so the
    2D model sees the planes and scale the 3D model will. ``class_weights``
    (one per class, or None) weight the cross-entropy.
    """
    from train.data import pipeline

    target = (workdir / SLICES_DIR).absolute()
    if target.exists():
        return _restore_2d(target)
    schedule = trainer.make_schedule(config.slices_lr, config.slices_steps, config.warmup_steps)
    tx = trainer.make_optimizer(schedule, weight_decay=config.weight_decay, grad_clip=config.grad_clip)
    task = trainer.make_task(build2d, tx, schedule, source.num_classes, mesh, config.seed, class_weights)
    trainer.check_batch_fits(mesh, config.slices_batch, config.patch[1], flag="slices_batch")
    state = task.init()
    ds = pipeline.slice_dataset(
        source,
        axis="axial",
        patch=config.patch[1:],
        batch=config.slices_batch // jax.process_count(),
        seed=config.seed,
        foreground_fraction=config.foreground_fraction,
        augment=config.augment,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    progress = trainer.Progress(
        name="slices",
        total=config.slices_steps,
        voxels_per_step=config.slices_batch * config.patch[1] * config.patch[2],
        csv_path=workdir / "slices_metrics.csv",
        start=0,
        tensorboard=workdir / "tensorboard" / "slices",  # a second run beside the 3D one
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
    build2d = model_fn(config, in_channels=source.num_channels, num_classes=source.num_classes, dims=2)
    # The 2D twin trains with the 3D task's class weights (same classes, same training labels).
    tree2d = load_2d(config, build2d, source, task.mesh, workdir, task.class_weights)
    target = {"params": task.abstract_state["params"], "model_state": task.abstract_state["model_state"]}
    wanted = {**flatten(target["params"]), **flatten(target["model_state"])}
    flat = inflate_2d(config, tree2d, like=wanted)
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
