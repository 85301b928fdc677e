"""Segment (or classify) a NIfTI file with a trained run.

::

  python -m train.predict --workdir runs/demo --input scan.nii.gz --output seg.nii.gz [--overlap 0.5] [--mirror]
  python -m train.predict --workdir runs/regions --input case.nii.gz --output case.json

A classification run (``task`` in ``config.json``) writes the class
probabilities as JSON, ``{"probabilities": {"class name": p, ...}, "label":
"the most probable class"}``; what is written is the task's
(:mod:`train.tasks`).

Restores the run's best checkpoint (by validation score; the newest if none was
validated, or ``--checkpoint=latest``) and ``WORKDIR/config.json``, reads the
input with the run's preprocessing (reorientation to RAS, resampling to the
training spacing, per-channel normalisation), runs sliding-window inference,
resamples the class probabilities back to the input's grid, and writes the
label map with the input's affine and orientation, so it overlays the input
in any viewer.

Each step is one function (:func:`load_run_config`, :func:`restore_model`,
:func:`read_input`, and each task's ``predict`` in :mod:`train.tasks`), so a
notebook can reuse any of them. Bad input gives a one-line error naming the file: ``error: PATH: ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from acsjax.models import build_model
from acsjax.trees import flatten, path_str
from train import cli, tasks
from train.checkpoint_score import pick_step

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"


class PredictError(Exception):
    """A user-facing failure; the message is one line naming the file or option."""


# --------------------------------------------------------------------------
# The run: config.json and the checkpoint


def load_run_config(workdir: str) -> dict[str, Any]:
    """Reads and checks ``WORKDIR/config.json`` (written by the trainer)."""
    root = Path(workdir)
    if not root.is_dir():
        raise PredictError(f"{root}: no such run directory")
    path = root / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise PredictError(f"{path}: not found; is {root} a training run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PredictError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise PredictError(f"{path}: expected a JSON object")
    missing = [k for k in ("model", "dims", "in_channels", "num_classes", "patch") if k not in config]
    if missing:
        raise PredictError(f"{path}: missing field(s) {', '.join(missing)}")
    return config


def build_run_model(config: dict[str, Any]) -> nnx.Module:
    """The run's model, abstract: its variables are shapes until :func:`restore_model` fills them.

    Building abstractly skips the random initialisation, which on CPU takes
    longer to compile than the whole prediction. Compute runs in float32
    whatever the training dtype (parameters are float32 either way); deep
    supervision heads are built when the run had them so the checkpoint's
    tree matches, and eval mode ignores them.
    """
    options = dict(config.get("model_options") or {})
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    if config.get("deep_supervision"):
        options["deep_supervision"] = True
    try:
        return nnx.eval_shape(lambda: build_model(
            config["model"], dims=config["dims"], in_channels=int(config["in_channels"]),
            num_classes=int(config["num_classes"]), rngs=nnx.Rngs(0), **options,
        ))
    except (TypeError, ValueError) as err:
        raise PredictError(f"{CONFIG}: cannot build model {config['model']!r}: {str(err).splitlines()[0]}") from None


def _open_manager(directory: Path):
    """A read-only Orbax manager: safe while a training run writes to the same directory."""
    import orbax.checkpoint as ocp

    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    options = ocp.CheckpointManagerOptions(read_only=True)
    return ocp, ocp.CheckpointManager(directory.absolute(), handler_registry=registry, options=options)


def restore_model(workdir: str, model: nnx.Module, *, which: str = "best") -> int:
    """Loads the run's checkpoint into ``model`` in place; returns the step.

    ``which``: 'best' (highest validation score; the newest step when none was
    validated) or 'latest'. The train state's ``params`` and ``model_state``
    (normalisation statistics) are matched to the model by parameter path.
    """
    if which not in ("best", "latest"):
        raise PredictError(f"--checkpoint: expected best or latest, got {which!r}")
    directory = Path(workdir) / CHECKPOINTS
    if not directory.is_dir():
        raise PredictError(f"{directory}: no checkpoints (has the run saved one yet?)")
    ocp, manager = _open_manager(directory)
    try:
        try:
            step = pick_step(manager, which)
        except LookupError as err:
            raise PredictError(str(err)) from None
        saved = _restore_state(ocp, manager, step, directory)
    finally:
        manager.close()
    _load_into(model, saved, directory / str(step))
    return int(step)


def _restore_state(ocp, manager, step: int, directory: Path) -> dict:
    """The saved train state as nested dicts of arrays on this process's first device."""
    try:
        meta = manager.item_metadata(step)["state"]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        # Restore onto one device whatever mesh the run was trained on.
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return restored["state"]
    except Exception as err:  # Orbax raises many types for broken directories
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        raise PredictError(f"{directory / str(step)}: cannot read checkpoint ({reason})") from None


def _load_into(model: nnx.Module, saved: dict, where: Path) -> None:
    if not isinstance(saved, dict) or "params" not in saved:
        raise PredictError(f"{where}: not a train state (no 'params')")
    # Orbax stores each NNX variable as a dict {'value': array}: drop that key.
    values = {
        name.removesuffix("/value"): value
        for part in (saved.get("model_state") or {}, saved["params"])
        for name, value in flatten(part).items()
    }
    state = nnx.state(model)
    pure = state.to_pure_dict()
    missing = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0] if path_str(p) not in values]
    if missing:
        raise PredictError(f"{where}: checkpoint lacks {len(missing)} model entries (first: {missing[0]}); "
                           f"does {CONFIG} match the run?")

    def take(path, current):
        value = values[path_str(path)]
        if np.shape(value) != np.shape(current):
            raise PredictError(f"{where}: {path_str(path)} has shape {np.shape(value)}, the model expects "
                               f"{np.shape(current)}")
        return value

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(take, pure))
    nnx.update(model, state)


# --------------------------------------------------------------------------
# File I/O (nibabel stays inside train.data.nifti)


def preprocessing_of(config: dict[str, Any]):
    """The run's :class:`train.data.sources.Preprocessing`.

    Runs on NIfTI data sets record it; for the built-in sources (mni152,
    synthetic) it is MR z-scoring of every channel at the run's ``spacing``.
    """
    from train.data.sources import Preprocessing

    prep = config.get("preprocessing")
    if isinstance(prep, dict):
        spacing = prep.get("spacing")
        window = prep.get("ct_window")
        return Preprocessing(
            modalities=tuple(prep.get("modalities") or ("MR",) * int(config["in_channels"])),
            num_classes=int(prep.get("num_classes", config["num_classes"])),
            spacing=tuple(float(s) for s in spacing) if spacing is not None else None,
            ct_window=tuple(float(w) for w in window) if window is not None else None,
        )
    spacing = config.get("spacing")
    if spacing is not None:
        spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, np.float64), (3,)))
    return Preprocessing(("MR",) * int(config["in_channels"]), int(config["num_classes"]), spacing, None)


def _memory_shape(path: str) -> tuple[int, int, int]:
    """The input's spatial shape in the (z, y, x) layout, from its header."""
    from train.data import nifti

    shape, _, codes = nifti.file_geometry(path)
    axis_of = {"L": 2, "R": 2, "P": 1, "A": 1, "I": 0, "S": 0}  # RAS axis -> memory axis
    out = [0, 0, 0]
    for size, code in zip(shape[:3], codes):
        out[axis_of[code]] = int(size)
    return tuple(out)


def read_input(path: str, config: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``(image (D, H, W, C) preprocessed, the input's own (D, H, W) shape)``."""
    from train.data.nifti import DataError, is_nifti
    from train.data.sources import CaseFiles, load_case

    if not is_nifti(path):
        raise PredictError(f"{path}: expected a .nii or .nii.gz file")
    prep = preprocessing_of(config)
    try:
        case = load_case(CaseFiles(Path(path).name, (str(path),)), prep)
        shape = _memory_shape(path)
    except DataError as err:
        raise PredictError(str(err).splitlines()[0]) from None
    except ValueError as err:  # e.g. an impossible ct_window in config.json
        raise PredictError(f"{path}: {str(err).splitlines()[0]}") from None
    return case["image"], shape


# --------------------------------------------------------------------------
# The command


def predict_file(
    workdir: str,
    input_path: str,
    output_path: str,
    *,
    overlap: float | None = None,
    mirror: bool = False,
    batch_size: int = 2,
    which: str = "best",
) -> dict[str, Any]:
    """Segments ``input_path`` into ``output_path`` with the run in ``workdir``; returns a summary dict."""
    start = time.perf_counter()
    config = load_run_config(workdir)
    overlap = float(config.get("eval_overlap", 0.5) if overlap is None else overlap)
    if not 0.0 <= overlap < 1.0:
        raise PredictError(f"--overlap: must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise PredictError(f"--batch_size: must be at least 1, got {batch_size}")
    if not Path(input_path).is_file():
        raise PredictError(f"{input_path}: file not found")
    # The input first: a bad file fails before the checkpoint is restored.
    image, shape = read_input(input_path, config)
    if image.shape[-1] != int(config["in_channels"]):
        raise PredictError(f"{input_path}: has {image.shape[-1]} channel(s), the run expects {config['in_channels']}")
    try:
        kind = tasks.get(config.get("task") or "segmentation")
    except ValueError as err:
        raise PredictError(f"{CONFIG}: {err}") from None
    model = build_run_model(config)
    step = restore_model(workdir, model, which=which)
    info = kind.predict(model, image, shape, config, input_path, output_path, overlap=overlap, mirror=mirror,
                        batch_size=batch_size)
    return {"output": str(output_path), "step": step, **info, "seconds": round(time.perf_counter() - start, 2)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m train.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the training run directory")
    parser.add_argument("--input", required=True, help="image to segment (.nii or .nii.gz; 4D for several channels)")
    parser.add_argument("--output", required=True, help="label map to write (.nii or .nii.gz); for a "
                        "classification run, the JSON file of class probabilities")
    parser.add_argument("--overlap", type=float, default=None, help="sliding-window overlap in [0, 1) "
                        "(default: the run's eval_overlap)")
    parser.add_argument("--mirror", action="store_true", help="mirror test-time augmentation over the run's "
                        "eval_mirror_axes (all three: 8x slower in 3D; the demo's left-right only: 2x)")
    parser.add_argument("--batch_size", type=int, default=2, help="windows per network call")
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                        help="best validation Dice (default) or the newest step")
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    import logging

    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only manager warns about its own options
    info = predict_file(args.workdir, args.input, args.output, overlap=args.overlap, mirror=args.mirror,
                        batch_size=args.batch_size, which=args.checkpoint)
    print(f"wrote {info['output']} (checkpoint step {info['step']}, {info['described']}) in {info['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
