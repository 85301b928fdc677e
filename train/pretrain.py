"""VDT supervised 3D pre-training: a run's 3D model learns from 2D labelled images read as volumes.

::

  python -m train.pretrain --source=digits --model=resnet18 --workdir=runs/vdt [--steps=300]

VDT (Zhang et al., 2022) trains a 3D network on 2D labelled images by reading
each image as a volume of depth 3 (:mod:`train.data.images2d`). The network is
the run's own 3D model with its depth strides off (``pool_depth=False``): three
slices could not survive a depth stride of 2 per stage, and kernel shapes do
not depend on strides, so the very same parameters then serve the isotropic
model with its real strides. For a U-Net the classifier that is pre-trained
is its encoder's twin (``resnet18`` for ``resnet18_unet``, ``efficientnet_lite0``
for ``efficientnet_lite0_unet``); the plain ``unet`` has none.

The workdir then holds ``checkpoints/`` (Orbax, resumable like a 3D run: a
rerun continues from the newest good step), ``metrics.csv``, ``vdt.json``
(what was pre-trained, and its validation accuracy on the source's held-out
images) and ``vdt3d/`` (the final model state), which
``python -m train.main --pretrained=WORKDIR`` loads; ``--pretrained=vdt:SOURCE``
does both steps in one run (in ``WORKDIR/vdt``). :func:`transfer` maps the
pre-trained tree onto the run's model and says which paths were loaded and
which start fresh.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

META = "vdt.json"
STATE_DIR = "vdt3d"
# Classification heads: the pre-training classes are not the run's, so a head never transfers.
HEADS = ("fc/",)


class PretrainError(ValueError):
    """Bad pre-training input; the message is one line naming the flag or file."""


def classifier_twin(model: str, options: dict | None = None) -> tuple[str, dict, str]:
    """``(classifier name, its options, path prefix in the run's model)`` for a run's ``model``.

    A classifier is its own twin (prefix ''); a ``*_unet`` on a pretrained
    encoder has its encoder's classifier (prefix 'encoder/'), with the
    options the encoder shares with it.
    """
    from acsjax.models import model_options

    options = dict(options or {})
    try:
        model_options(model)
    except ValueError as err:
        raise PretrainError(f"--model: {err}") from None
    if model.endswith("_unet"):
        twin, prefix = model.removesuffix("_unet"), "encoder/"
    elif model == "unet":
        raise PretrainError("--model: the plain unet has no classifier twin to pre-train; use a classifier "
                            "(resnet18, efficientnet_lite0, ...) or a U-Net on one (resnet18_unet, ...)")
    else:
        twin, prefix = model, ""
    allowed = set(model_options(twin))
    return twin, {k: v for k, v in options.items() if k in allowed and k != "pool_depth"}, prefix


def state_dir(path) -> Path | None:
    """The ``vdt3d`` directory of a pre-training workdir (or that directory itself), else None."""
    path = Path(path)
    for root in (path, path.parent):
        if (root / META).is_file() and (root / STATE_DIR).is_dir():
            return root / STATE_DIR
    return None


def read_meta(directory) -> dict:
    """``vdt.json`` of a pre-training workdir (given it, or its ``vdt3d``)."""
    directory = Path(directory)
    root = directory if (directory / META).is_file() else directory.parent
    return json.loads((root / META).read_text())


def evaluate(model, source, size, *, max_images: int = 1000) -> dict[str, Any]:
    """Accuracy and balanced accuracy on a 2D source's held-out images, each a VDT volume (fixed slice order)."""
    from train import classify, metrics
    from train.data import images2d

    n = min(len(source), max_images)
    rng = np.random.default_rng(0)
    volumes, labels = [], []
    for i in range(n):
        item = source[i]
        volume = images2d.resize_slices(np.asarray(item["image"], np.float32), size)
        volumes.append(images2d.vdt_volume(np.moveaxis(volume, 0, -1), rng))
        labels.append(int(item["label"]))
    probs = classify.predict_probabilities(model, volumes, (3, *size), batch_size=32)
    pred, labels = probs.argmax(-1), np.asarray(labels)
    return {
        "val_accuracy": metrics.accuracy(pred, labels),
        "val_balanced_accuracy": metrics.balanced_accuracy(pred, labels, source.num_classes),
        "num_images": n,
    }


def pretrain(source: str, model: str, workdir, *, options: dict | None = None, steps: int = 300, batch: int = 32,
             lr: float = 3e-3, size=32, seed: int = 0, workers: int = 0, log_every: int = 50,
             checkpoint_every: int = 100, warmup_steps: int = 50, weight_decay: float = 1e-4,
             grad_clip: float = 1.0) -> dict:
    """Pre-trains ``model``'s classifier twin on the 2D source by VDT; returns its state (nested dicts).

    A workdir that already holds ``vdt3d`` is reused as it is; one with
    checkpoints resumes. ``size`` is the in-plane size the images are resized
    to (an int or (H, W)); the run's patch is a good choice.
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from acsjax.models import build_model
    from train import tasks, trainer
    from train.checkpoint import Checkpoints
    from train.data import images2d, pipeline

    workdir = Path(workdir).absolute()
    target = workdir / STATE_DIR
    if target.is_dir() and (workdir / META).is_file():
        return ocp.StandardCheckpointer().restore(target)
    twin, twin_options, _ = classifier_twin(model, options)
    size = (size, size) if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    try:
        train_src = images2d.make_image_source(source, "train", size=size)
        val_src = images2d.make_image_source(source, "val", size=size)
    except ValueError as err:
        raise PretrainError(f"--source: {str(err).splitlines()[0]}") from None
    workdir.mkdir(parents=True, exist_ok=True)
    num_classes = train_src.num_classes

    def build(rngs):
        # Depth strides off: a depth-3 volume keeps its three slices through every stage.
        return build_model(twin, dims=3, in_channels=1, num_classes=num_classes, rngs=rngs, pool_depth=False,
                           **twin_options)

    mesh = trainer.make_mesh("")
    trainer.check_batch_fits(mesh, batch, 3, flag="batch")
    schedule = trainer.make_schedule(lr, steps, warmup_steps)
    tx = trainer.make_optimizer(schedule, weight_decay=weight_decay, grad_clip=grad_clip)
    kind = tasks.CLASSIFICATION
    task = trainer.make_task(build, tx, schedule, num_classes, mesh, seed, None, kind)
    ds = images2d.vdt_dataset(train_src, size=size, batch=batch // jax.process_count(), seed=seed,
                              shard_index=jax.process_index(), shard_count=jax.process_count())
    iterator = pipeline.make_iterator(ds, workers)
    checkpoints = Checkpoints(workdir / "checkpoints", keep=2)
    restored = checkpoints.restore_latest(task.abstract_state, iterator)
    start, state = restored if restored is not None else (0, task.init())
    progress = trainer.Progress(name="vdt", total=steps, voxels_per_step=batch * 3 * math.prod(size),
                                csv_path=workdir / "metrics.csv", start=start, tensorboard=workdir / "tensorboard",
                                step_metric=kind.step_metric, score=kind.score)
    started = time.time()

    def validate(state, final):
        return evaluate(trainer.eval_model(task, state), val_src, size)

    state, result = trainer.fit(task, state, iterator, progress, start=start, stop=steps, log_every=log_every,
                                checkpoints=checkpoints, checkpoint_every=checkpoint_every, validate=validate,
                                eval_every=0)
    checkpoints.close()
    progress.close()
    if result is None:
        result = validate(state, True)
    pure = nnx.state(trainer.eval_model(task, state)).to_pure_dict()
    if jax.process_index() == 0:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(target, pure, force=True)
        checkpointer.wait_until_finished()
        meta = {"method": "vdt", "source": source, "model": twin, "options": twin_options, "pool_depth": False,
                "in_channels": 1, "num_classes": num_classes, "class_names": list(train_src.class_names),
                "size": list(size), "steps": steps, "batch": batch, "lr": lr, "seed": seed,
                **{k: result[k] for k in ("val_accuracy", "val_balanced_accuracy", "num_images")},
                "wall_s": round(time.time() - started, 1)}
        (workdir / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        print(f"vdt: {twin} on {source}: val_accuracy {result['val_accuracy']:.3f} on {result['num_images']} "
              f"held-out images; {target}", flush=True)
    return pure


def transfer(tree: Any, target: dict, *, prefix: str = "") -> tuple[dict, dict]:
    """Maps a pre-trained 3D classifier's tree onto a model's entries.

    Args:
      tree: the pre-trained state (nested dicts; NNX ``{'value': x}`` leaves are fine).
      target: ``{path: array or ShapeDtypeStruct}`` of the run's parameters and statistics.
      prefix: where the classifier sits in the run's model ('encoder/' for U-Nets).

    Returns:
      ``(values, report)``: ``values`` maps every target path that loads to
      its array (a first-layer kernel with other input channels is adapted
      with :func:`acsjax.adapt_input_channels`, 'sum'); ``report`` lists the
      paths ``loaded``, ``adapted``, ``fresh`` (not in the source, a head, or
      mis-shaped), ``mismatched`` (path -> [source shape, model shape]) and
      ``unused`` (source paths nothing took). Nothing is dropped silently.
    """
    import acsjax
    from acsjax.trees import flatten

    source = {k.removesuffix("/value"): v for k, v in flatten(tree).items()}
    values, adapted, fresh, mismatched, used = {}, [], [], {}, set()
    for path, want in target.items():
        key = path[len(prefix):] if path.startswith(prefix) else None
        if key is None or key not in source or any(key.startswith(h) for h in HEADS):
            fresh.append(path)
            continue
        value = np.asarray(source[key])
        want_shape = tuple(np.shape(want))
        if (value.shape != want_shape and value.ndim == len(want_shape) >= 2
                and value.shape[:-2] + value.shape[-1:] == want_shape[:-2] + want_shape[-1:]):
            value = np.asarray(acsjax.adapt_input_channels(value, want_shape[-2], "sum"))
            adapted.append(path)
        if value.shape != want_shape:
            mismatched[path] = [list(np.shape(source[key])), list(want_shape)]
            fresh.append(path)
            continue
        values[path] = value
        used.add(key)
    unused = sorted(k for k in source if k not in used)
    report = {"loaded": sorted(values), "adapted": adapted, "fresh": sorted(fresh), "mismatched": mismatched,
              "unused": unused}
    return values, report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="digits", help="2D labelled images: digits, lfw or folder:PATH")
    parser.add_argument("--model", default="resnet18", help="the 3D model (or U-Net) to pre-train")
    parser.add_argument("--model_option", action="append", default=[], help="model option key=value (repeatable)")
    parser.add_argument("--workdir", required=True, help="where checkpoints/, vdt.json and vdt3d/ go")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--size", type=int, default=32, help="in-plane size the images are resized to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--checkpoint_every", type=int, default=100)
    parser.add_argument("--conv_impl", default="", help="convolution lowering: auto, xla or gemm "
                        "(empty: ACSJAX_CONV_IMPL, else auto); see python -m train.main --help")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    from train.config import ConfigError, parse_model_options

    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.WARNING)
    import contextlib

    import acsjax.ops

    try:
        for name in ("steps", "batch", "size", "log_every", "checkpoint_every"):
            if getattr(args, name) < 1:
                raise PretrainError(f"--{name}: must be at least 1, got {getattr(args, name)}")
        if args.conv_impl and args.conv_impl not in acsjax.ops.CONV_IMPLS:
            raise PretrainError(f"--conv_impl: unknown {args.conv_impl!r}; choose one of {', '.join(acsjax.ops.CONV_IMPLS)}")
        lowering = acsjax.ops.use_conv_impl(args.conv_impl) if args.conv_impl else contextlib.nullcontext()
        with lowering:
            pretrain(args.source, args.model, args.workdir, options=parse_model_options(args.model_option),
                     steps=args.steps, batch=args.batch, lr=args.lr, size=args.size, seed=args.seed,
                     log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                     warmup_steps=min(50, args.steps // 5))
    except (PretrainError, ConfigError) as err:
        print(err.line() if isinstance(err, ConfigError) else f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
