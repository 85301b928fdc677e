"""Thick slices: resample to isotropic, train at native spacing, train in 2D, or start 3D from 2D?

  python -m train.thickslice_report --out runs/thickslice

On a thick-slice rendering of the demo (:func:`train.data.thinstack.write_rendered_dataset`:
the demo's randomised MNI152 renderings box-averaged to 6 mm slices, 2 mm
in-plane; written to OUT/data when missing) this trains, per seed:

- (a) ``isotropic``: resampled to ``--iso_mm`` mm isotropic (``--spacing``),
  a 3D U-Net planned for that grid, from scratch;
- (b) ``native``: the native grid with the anisotropic plan (in-plane
  kernels where the slices are thick, depth pooled later than the plane),
  from scratch;
- (c) ``2d``: the 2D U-Net itself on axial slices (``--dims=2``), with the
  batch, steps and learning rate of (d)'s 2D stage, so (d) is (c) plus
  inflation and 3D training;
- (d) ``2d-init``: (b)'s network started from (c)'s 2D network
  (``--init=scale --pretrained=slices``; its 2D stage counts in its time).

Each run is its own process ``python -m train.main ...`` in
OUT/<variant>/seed<k> (log in train.log there); a rerun reuses every run that
has a summary.json. The command then writes OUT/thickslice.md: per variant,
Dice mean ± standard deviation over seeds on the native thick-slice grid,
wall time, peak memory and the network's stages (from plan.json).

Dice on the native grid: a run validates on the grid it trains on. For (b),
(c) and (d) that is the native grid, and the table takes the run's own
``val_dice_mean``. (a) validates on its resampled grid, against labels
resampled by nearest neighbour; the table instead predicts each validation
case with the run's best checkpoint (:mod:`train.predict`'s steps: read and
resample the native file, sliding window, probabilities resampled back to the
native grid, argmax) and scores it against the native labels
(OUT/<variant>/seed<k>/native_dice.json); its own-grid Dice is shown beside.

Peak memory is the training process's peak resident set (``ru_maxrss``,
reported by a small launcher process that starts it and waits for it: the
whole ``train.main`` process, JAX runtime, data and compiled programs
included, on the host; an accelerator's memory is not in it). Wall time is
the training process's, start to exit.

Cost: a run's fixed part (start-up, planning, compilation, final
validation) weighs as much as its steps at these sizes. Measured on two CPU
cores shared with other work: fixed about 110 s for (a), 65-115 s for (b),
45 s for (c) and 60 s for (d); a 3D step about 0.55-0.65 s, a 2D step (32
slices) about 0.3 s; one (b) run of 200 steps took 229 s. The defaults (200
3D and 200 2D steps, 12 + 3 renderings, seeds 0, 1, 2: twelve runs) add up
to about 40 minutes under that load, about 20 on an idle machine. That buys
early learning, not convergence (the demo trains 1500 steps): (b) reached a
validation Dice of 0.32 at 60 steps, 0.40 at 120 and 0.57 at 200 (one seed each), against
a threshold baseline of 0.49 on the same cases; the table ranks how fast
each variant learns. Give ``--steps`` and ``--slices_steps`` in the
thousands to compare final quality.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from train import cli
from train import config as config_lib
from train.label_fractions import fmt

VARIANTS = ("isotropic", "native", "2d", "2d-init")
TITLES = {
    "isotropic": "(a) isotropic 3D",
    "native": "(b) native, anisotropic plan",
    "2d": "(c) 2D on slices",
    "2d-init": "(d) (b) from (c)'s 2D net",
}
PRESET = "demo"  # the demo's CPU-sized U-Net (widths 8..64) and voxel budget; the plan sets the rest
DATA_DIR = "data"
REPORT = "thickslice.md"
RUN_INFO = "thickslice_run.json"  # per run: process wall time, peak memory, status
NATIVE_DICE = "native_dice.json"
LOG = "train.log"
# Sized for about 15-20 minutes on two CPU cores (see "Cost" in the module docstring).
DEFAULT_STEPS = 200
DEFAULT_SLICES_STEPS = 200
DEFAULT_CASES = 12
DEFAULT_VAL_CASES = 3


class RunFailed(Exception):
    """A training run exited with an error; the message names its log."""


def command(variant: str, *, data: str, workdir: str, seed: int, steps: int, slices_steps: int,
            iso_mm: float = 2.0, preset: str = PRESET) -> list[str]:
    """The ``python -m train.main`` command line of one run of ``variant``.

    Every run validates once, at its end, without mirroring, and saves one
    checkpoint then (a rerun reuses finished runs, it never resumes one).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    slices_lr = config_lib.PRESETS[preset].slices_lr
    steps_of = slices_steps if variant == "2d" else steps
    args = [sys.executable, "-m", "train.main", f"--dataset=msd:{data}", f"--preset={preset}",
            f"--workdir={workdir}", f"--seed={seed}", f"--steps={steps_of}", "--eval_every=0",
            f"--checkpoint_every={steps_of}", "--noeval_mirror"]
    if variant == "isotropic":
        return args + ["--init=scratch", f"--spacing={iso_mm:g}"]
    if variant == "native":
        return args + ["--init=scratch"]
    if variant == "2d":
        return args + ["--init=scratch", "--dims=2", f"--lr={slices_lr:g}"]
    return args + ["--init=scale", "--pretrained=slices", f"--slices_steps={slices_steps}"]


def run_dir(out: Path, variant: str, seed: int) -> Path:
    """OUT/<variant>/seed<k>."""
    return out / variant / f"seed{seed}"


# Runs argv[2:] and writes its peak resident set (ru_maxrss of its children: that one process) to argv[1].
# A fork keeps the memory of the process it was forked from in the child's peak, so the
# training process is started from this small launcher rather than from the report's
# process, whose own memory (JAX, once the native-grid scoring ran) would count in it.
_LAUNCHER = ("import resource, subprocess, sys; status = subprocess.call(sys.argv[2:]); "
             "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
             "sys.exit(status if status >= 0 else 128 - status)")


def launch(cmd: list[str], workdir: Path) -> dict:
    """Runs ``cmd`` as a child process (output to WORKDIR/train.log); returns wall time, peak RSS and status.

    ``cmd`` runs under a fresh launcher process that reports
    ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, the peak of ``cmd``'s process
    alone, whatever ran before it.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    peak_file = workdir / ".peak_rss"
    start = time.perf_counter()
    with open(workdir / LOG, "w") as log:
        status = subprocess.call([sys.executable, "-c", _LAUNCHER, str(peak_file), *cmd], stdout=log,
                                 stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    peak = None
    if peak_file.exists():
        # ru_maxrss is in kilobytes on Linux, bytes on macOS.
        peak = round(int(peak_file.read_text()) / (1024**2 if sys.platform == "darwin" else 1024), 1)
        peak_file.unlink()
    return {"wall_s": round(wall, 1), "peak_rss_mb": peak, "returncode": status, "command": cmd}


def run_variant(variant: str, seed: int, out: Path, data: Path, *, steps: int, slices_steps: int,
                iso_mm: float = 2.0, runner=None) -> dict:
    """Trains (or reuses) one run; returns ``{'variant', 'seed', 'summary', 'plan', 'run', 'workdir'}``.

    A workdir with summary.json is reused as it is; ``runner(cmd, workdir)``
    (default :func:`launch`) starts a new one.
    """
    workdir = run_dir(out, variant, seed)
    summary_path, info_path = workdir / "summary.json", workdir / RUN_INFO
    if summary_path.exists():
        print(f"{variant} seed {seed}: reusing {workdir}", flush=True)
    else:
        cmd = command(variant, data=str(data), workdir=str(workdir), seed=seed, steps=steps,
                      slices_steps=slices_steps, iso_mm=iso_mm)
        print(f"{variant} seed {seed}: {' '.join(cmd[1:])}", flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        info = (runner or launch)(cmd, workdir)
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        if info["returncode"] != 0 or not summary_path.exists():
            raise RunFailed(f"{workdir / LOG}: the {variant} run (seed {seed}) failed with status {info['returncode']}")
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    plan_path = workdir / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    return {"variant": variant, "seed": seed, "summary": json.loads(summary_path.read_text()), "plan": plan,
            "run": info, "workdir": workdir}


def native_spacing(data: Path) -> tuple[float, ...]:
    """The (d, h, w) spacing of the data set's first case, from its file."""
    from train.data import nifti

    meta = json.loads((data / "dataset.json").read_text())
    return tuple(float(s) for s in nifti.read_label(str(data / meta["training"][0]["label"])).spacing)


def on_native_grid(result: dict, spacing) -> bool:
    """Whether the run trained (and so validated) at the data set's native ``spacing``."""
    used = result["plan"].get("target_spacing")
    return used is None or all(abs(a - b) < 1e-3 for a, b in zip(used, spacing))


def native_dice(workdir: Path, data: Path) -> dict:
    """Mean foreground Dice of the run's best checkpoint on the validation cases, on their native grid.

    The steps of ``train.predict`` (the run's preprocessing, sliding window,
    probabilities resampled back to the file's grid) without writing files.
    Cached in WORKDIR/native_dice.json.
    """
    cached = workdir / NATIVE_DICE
    if cached.exists():
        return json.loads(cached.read_text())
    import logging

    import numpy as np

    from train import metrics, predict
    from train.data.sources import CaseFiles, Preprocessing, load_case, read_splits
    from train.evaluate import back_to_input_grid, eval_view, predict_probabilities, sliding_window

    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's read-only manager warns about its own options
    config = predict.load_run_config(str(workdir))
    model = predict.build_run_model(config)
    step = predict.restore_model(str(workdir), model)
    view = eval_view(model)
    classes = int(config["num_classes"])
    window = sliding_window(config["patch"], config["dims"])
    cases = []
    for name in read_splits(str(data))[1]:
        image_path = str(data / "imagesTr" / f"{name}.nii.gz")
        image, shape = predict.read_input(image_path, config)
        probs = predict_probabilities(view, image, patch=window, overlap=float(config.get("eval_overlap", 0.5)))
        pred = back_to_input_grid(probs, shape)
        label = load_case(CaseFiles(name, (image_path,), str(data / "labelsTr" / f"{name}.nii.gz")),
                          Preprocessing(("MR",), classes))["label"]
        dice = metrics.dice_per_class(pred, label, classes)
        cases.append({"name": name, "dice": [float(d) for d in dice[1:]],
                      "dice_mean": float(metrics.mean_foreground_dice(dice))})
    result = {"step": step, "dice_mean": float(np.mean([c["dice_mean"] for c in cases])),
              "dice": [float(v) for v in np.mean([c["dice"] for c in cases], axis=0)], "cases": cases}
    cached.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _stages(rows) -> str:
    """[[1, 1, 1], [1, 2, 2]] -> '1x1x1 1x2x2'; None -> '-'."""
    return " ".join("x".join(str(v) for v in row) for row in rows) if rows else "-"


def table(results: list[dict]) -> str:
    """Markdown table, one row per variant: Dice (native grid, and the run's own), wall time, memory, network.

    Each result is :func:`run_variant`'s dict plus ``native`` (the mean
    foreground Dice on the native grid), ``native_per_class`` (grey, white
    matter) and ``native_grid`` (whether the run validated there; default True).
    """
    head = ["variant", "seeds", "Dice, native grid", "grey matter", "white matter", "Dice, run's grid",
            "wall s", "peak MB", "spacing mm", "patch", "strides", "kernels"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        plan = runs[0]["plan"]
        walls = [r["run"].get("wall_s", r["summary"].get("wall_s")) for r in runs]
        peaks = [r["run"]["peak_rss_mb"] for r in runs if r["run"].get("peak_rss_mb") is not None]
        spacing = plan.get("target_spacing")
        strides, kernels = plan.get("strides"), plan.get("kernels")
        if strides and kernels and len(strides[0]) == 2:  # a 2D network: its kernels' in-plane part
            kernels = [k[-2:] for k in kernels]
        cells = [
            TITLES.get(variant, variant), str(len(runs)),
            fmt([r["native"] for r in runs]),
            fmt([r["native_per_class"][0] for r in runs]), fmt([r["native_per_class"][1] for r in runs]),
            fmt([r["summary"]["val_dice_mean"] for r in runs]),
            f"{statistics.mean(w for w in walls if w is not None):.0f}" if any(w is not None for w in walls) else "-",
            f"{max(peaks):.0f}" if peaks else "-",
            "x".join(f"{s:g}" for s in spacing) if spacing else "-",
            "x".join(str(p) for p in plan.get("patch") or runs[0]["summary"].get("patch") or []) or "-",
            _stages(strides), _stages(kernels),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    # The runs validated on the native grid computed it there; a resampled run's is on its own grid.
    baseline = [r["summary"].get("baseline_threshold_dice") for r in results if r.get("native_grid", True)]
    baseline = [b for b in baseline if b is not None]
    if baseline:
        lines.append(f"\nBest global intensity-threshold Dice on the validation cases, native grid: "
                     f"{max(baseline):.3f}.")
    return "\n".join(lines) + "\n"


NOTE = """Dice: mean foreground Dice (grey and white matter) over the validation cases (the upper brain slab's \
renderings and the real T1), mean ± standard deviation over seeds. "Native grid" scores the prediction on the \
thick-slice grid of the files; a run trained on a resampled grid (a) is predicted with its best checkpoint and its \
class probabilities resampled back to that grid, the others are validated there already. "Run's grid" is the run's \
own validation (for (a) the isotropic grid, against nearest-neighbour resampled labels). Wall time: the training \
process from start to exit (compilation, the 2D stage of (d) and the final validation included). Peak MB: the \
largest peak resident memory of the training process over seeds (host memory, JAX runtime included). Spacing, \
patch, strides and kernels: the run's plan.json (d, h, w); a 2D network lists (h, w)."""


def write_data(data: Path, cases: int, val_cases: int) -> None:
    """Writes the thick-slice data set to ``data`` unless it is there; one that differs is an error."""
    from train.data import thinstack
    from train.data.sources import read_splits

    if (data / "dataset.json").exists():
        train_names, val_names = read_splits(str(data))
        if (len(train_names), len(val_names)) != (cases, val_cases + 1):
            raise RunFailed(f"{data}: holds {len(train_names)} training and {len(val_names)} validation cases, "
                            f"--cases={cases} asks {cases} and {val_cases + 1}; choose another --out")
        return
    start = time.perf_counter()
    thinstack.write_rendered_dataset(str(data), num_train=cases, num_val=val_cases)
    print(f"wrote the thick-slice data set to {data} in {time.perf_counter() - start:.0f} s", flush=True)


@cli.entry_point
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m train.thickslice_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/thickslice", help="runs, data set and thickslice.md go here")
    parser.add_argument("--seeds", type=cli.int_list, default=(0, 1, 2), help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="3D training steps of (a), (b), (d)")
    parser.add_argument("--slices_steps", type=int, default=DEFAULT_SLICES_STEPS,
                        help="2D steps: all of (c), (d)'s 2D stage")
    parser.add_argument("--cases", type=int, default=DEFAULT_CASES, help="training renderings")
    parser.add_argument("--val_cases", type=int, default=DEFAULT_VAL_CASES,
                        help="validation renderings (the real T1 is added)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--iso_mm", type=float, default=2.0, help="(a)'s isotropic spacing in mm")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    for name in ("steps", "slices_steps", "cases"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: must be at least 1, got {getattr(args, name)}")
    if args.val_cases < 0:
        parser.error(f"--val_cases: must be non-negative, got {args.val_cases}")
    out = Path(args.out).absolute()
    data = out / DATA_DIR
    try:
        write_data(data, args.cases, args.val_cases)
        spacing = native_spacing(data)
        results = []
        for variant in variants:
            for seed in args.seeds:
                result = run_variant(variant, seed, out, data, steps=args.steps, slices_steps=args.slices_steps,
                                     iso_mm=args.iso_mm)
                result["native_grid"] = on_native_grid(result, spacing)
                if result["native_grid"]:
                    dice = result["summary"]["val_dice"]
                    result.update(native=result["summary"]["val_dice_mean"],
                                  native_per_class=[dice[k] for k in list(dice)[:2]])
                else:
                    scored = native_dice(result["workdir"], data)
                    result.update(native=scored["dice_mean"], native_per_class=scored["dice"][:2])
                results.append(result)
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    command_line = "python -m train.thickslice_report " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(results)
    native = "x".join(f"{s:g}" for s in spacing)
    header = (f"`{command_line}`\n\nData: {args.cases} training and {args.val_cases} + 1 validation cases at "
              f"{native} mm (d, h, w); {args.steps} 3D steps, {args.slices_steps} 2D steps, seeds "
              f"{', '.join(map(str, args.seeds))}.\n\n")
    (out / REPORT).write_text(header + text + "\n" + NOTE + "\n")
    print(text)
    print(f"wrote {out / REPORT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
