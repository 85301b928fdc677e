"""Compare initialisations on the same data, seeds and step budget.

  python -m train.compare --inits=scratch,center,average,scale,acs,soft_acs,2.5d --pretrained=slices --seeds=0,1 --out=runs/compare

Each variant (init x 2D source x seed) is a full ``train.trainer`` run in
OUT/<init>-<source>/seed<k> (rerunning resumes or reuses finished runs). The
command then writes OUT/comparison.md (validation Dice at each evaluation step,
steps to reach ``--threshold``, wall time, parameter count; mean ± spread over
seeds) and OUT/learning_curves.png.
"""

from __future__ import annotations

import dataclasses
import csv
import json
import shutil
import statistics
import sys
from pathlib import Path

from train import cli
from train import config as config_lib


# The ImageNet weights shipped with the project are EfficientNet-Lite0's, so
# '--pretrained=imagenet' variants train the U-Net on that encoder.
IMAGENET_MODEL = "efficientnet_lite0_unet"


def variants(inits, sources, model: str = "unet") -> list[tuple[str, str, str]]:
    """(init, source, model) triples; scratch has no 2D source.

    'imagenet' variants use :data:`IMAGENET_MODEL`; when that differs from
    ``model``, a scratch run of it is added so that every pretrained variant
    has a from-scratch baseline of the same network.
    """
    out = []
    for init in inits:
        if init == "scratch":
            out.append((init, "", model))
            continue
        for source in sources:
            out.append((init, source, IMAGENET_MODEL if source == "imagenet" else model))
    if "scratch" in inits and "imagenet" in sources and model != IMAGENET_MODEL:
        out.insert(1, ("scratch", "", IMAGENET_MODEL))
    return out


def variant_name(init: str, source: str, model: str, base_model: str) -> str:
    """'scale-slices', 'acs-imagenet' or 'scratch'; other models than the base one are named."""
    name = f"{init}-{source}" if source else init
    return name if model == base_model or source == "imagenet" else f"{name} ({model})"


def _curve(workdir: Path) -> list[tuple[int, float]]:
    """(step, val_dice_mean) rows of a run's metrics.csv."""
    with open(workdir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["val_dice_mean"])) for r in csv.DictReader(f) if r.get("val_dice_mean")]


def _param_count(config) -> int:
    from flax import nnx

    from acsjax.models import param_count
    from train import init, run

    source = run.open_source(config, "train")
    build = init.model_fn(config, in_channels=source.num_channels, num_classes=source.num_classes, dims=config.model_dims)
    return param_count(nnx.eval_shape(lambda: build(nnx.Rngs(0))))


def run_variant(base, init: str, source: str, seed: int, out: Path, model: str | None = None) -> dict:
    """Trains (or reuses) one run; returns its summary, curve and parameter count."""
    from train import run
    from train.init import SLICES_DIR

    model = model or base.model
    name = variant_name(init, source, model, base.model)
    workdir = out / name.replace(" ", "_").replace("(", "").replace(")", "") / f"seed{seed}"
    options = base.model_options if model == base.model else {}
    config = config_lib.validate(
        dataclasses.replace(base, init=init, pretrained=source, seed=seed, workdir=str(workdir), model=model,
                            model_options=options)
    )
    summary_path = workdir / "summary.json"
    # Variants of one seed and model start from the same 2D parent: the first
    # 'slices' run trains it, the others copy it (train.init reuses
    # WORKDIR/slices2d), so they differ only in how the 2D weights are used.
    shared = out / f"{SLICES_DIR}-{model}-seed{seed}"
    own = workdir / SLICES_DIR
    if source == "slices" and shared.exists() and not own.exists():
        shutil.copytree(shared, own)
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    else:
        summary = run.train_and_evaluate(config)
    if source == "slices" and own.exists() and not shared.exists():
        shutil.copytree(own, shared)
    return {"name": name, "seed": seed, "summary": summary, "curve": _curve(workdir), "params": _param_count(config)}


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: list[dict], threshold: float) -> str:
    """Markdown table, one row per variant, mean ± standard deviation over seeds."""
    names = list(dict.fromkeys(r["name"] for r in results))
    steps = sorted({s for r in results for s, _ in r["curve"]})
    head = ["variant", "seeds", *(f"Dice @{s}" for s in steps), f"steps to {threshold:g}", "wall s", "parameters"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    baseline = []
    for name in names:
        runs = [r for r in results if r["name"] == name]
        cells = [name, str(len(runs))]
        for s in steps:
            cells.append(_fmt([d for r in runs for st, d in r["curve"] if st == s]))
        reach = [next((s for s, d in r["curve"] if d >= threshold), None) for r in runs]
        reached = [s for s in reach if s is not None]
        cells.append(f"{statistics.mean(reached):.0f} ({len(reached)}/{len(runs)})" if reached else f"not reached (0/{len(runs)})")
        cells.append(f"{statistics.mean(r['summary']['wall_s'] for r in runs):.0f}")
        cells.append(f"{runs[0]['params']:,}")
        lines.append("| " + " | ".join(cells) + " |")
        baseline += [r["summary"].get("baseline_threshold_dice") for r in runs]
    baseline = [b for b in baseline if b is not None]
    if baseline:
        lines.append(f"\nBest global intensity-threshold Dice on the same validation cases: {max(baseline):.3f}.")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Learning curves (validation Dice against step), one colour per variant, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(r["name"] for r in results))
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        for j, r in enumerate(x for x in results if x["name"] == name):
            steps, dice = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(steps, dice, marker="o", ms=3, color=colours(i % 10), alpha=0.9, label=name if j == 0 else None)
    ax.set_xlabel("3D training step")
    ax.set_ylabel("validation Dice (mean over classes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def base_config(preset: str, *, steps: int = 0, model: str = "", class_weights: str = "", eval_every: int = 0):
    """The config every variant starts from: ``preset`` with the command's overrides (0 / '' keep the preset's).

    Validation runs every ``eval_every`` steps (default a quarter of the run),
    a checkpoint with it, and never with mirror test-time augmentation, so
    every point of a learning curve is measured the same way.
    """
    overrides = {"steps": steps, "model": model, "class_weights": class_weights}
    base = config_lib.preset(preset, **{k: v for k, v in overrides.items() if v})
    every = eval_every or max(base.steps // 4, 1)
    return dataclasses.replace(base, eval_every=every, checkpoint_every=every, eval_mirror=False)


@cli.entry_point
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m train.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inits", default="scratch,center,average,scale,acs,soft_acs,2.5d")
    parser.add_argument("--pretrained", default="slices", help="2D sources for the inflating inits, comma-separated")
    parser.add_argument("--seeds", type=cli.int_list, default=(0,), help="comma-separated seeds")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=0, help="3D steps per run (default: the preset's)")
    parser.add_argument("--eval_every", type=int, default=0, help="validation interval (default: steps / 4)")
    parser.add_argument("--model", default="", help="model name (default: the preset's)")
    parser.add_argument("--class_weights", default="", help="cross-entropy class weights (default: the preset's)")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--out", default="runs/compare")
    args = parser.parse_args(argv)
    inits = [s for s in args.inits.split(",") if s]
    sources = [s for s in args.pretrained.split(",") if s]
    seeds = args.seeds
    base = base_config(args.preset, steps=args.steps, model=args.model, class_weights=args.class_weights,
                       eval_every=args.eval_every)
    for init in inits:
        config_lib.validate(dataclasses.replace(base, init=init))
    for source in sources:
        config_lib.validate(dataclasses.replace(base, pretrained=source))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for init, source, model in variants(inits, sources, base.model):
        for seed in seeds:
            results.append(run_variant(base, init, source, seed, out, model))
    text = table(results, args.threshold)
    command = "python -m train.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "comparison.md").write_text(f"`{command}`\n\n{text}")
    plot(results, out / "learning_curves.png")
    print(text)
    print(f"wrote {out / 'comparison.md'} and {out / 'learning_curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
