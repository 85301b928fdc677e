"""Compare initialisations on the same data, seeds and step budget, at one or several labelled fractions.

  python -m train.compare --inits=scratch,center,average,scale,acs,soft_acs,2.5d --pretrained=slices --seeds=0,1 --out=runs/compare

Each variant (init x 2D source x seed) is a full ``train.trainer`` run in
OUT/<init>-<source>/seed<k> (rerunning resumes or reuses finished runs). The
command then writes OUT/comparison.md (the task's validation score at each
evaluation step, steps to reach ``--threshold``, wall time, parameter count;
mean ± spread over seeds) and OUT/learning_curves.png.

``--label_fractions=0.1,0.25,0.5,1`` repeats every variant and seed with the
labels of only that fraction of the training cases (``--labelled_fraction``),
in OUT/<variant>/frac<f>/seed<k>, and writes OUT/label_fractions.md and
OUT/label_fractions.png (validation metrics against the fraction, see
:mod:`train.label_fractions`); comparison.md then describes the largest
fraction. ``--equal_compute`` adds, per fraction and seed, a scratch run
given as many 3D steps as fit the total wall time of the most expensive
pretrained variant (its 2D stage included).
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
from train import label_fractions
from train import tasks
from train.label_fractions import fmt as _fmt

# The ImageNet weights shipped with the project are EfficientNet-Lite0's, so
# '--pretrained=imagenet' variants train that network: the U-Net on its
# encoder for segmentation, the classifier itself for classification.
IMAGENET_MODEL = "efficientnet_lite0_unet"
IMAGENET_MODELS = {"segmentation": IMAGENET_MODEL, "classification": "efficientnet_lite0"}
# Written into a run's workdir when its 2D stage was copied from an earlier run: {"stage", "stage_s", "from"}.
STAGE_REUSED = "stage_reused.json"


def _source_model(source: str, model: str, task: str) -> str:
    """The network a variant with 2D ``source`` trains: ImageNet's for 'imagenet', and for VDT too when
    ``model`` (the plain U-Net) has no classifier twin to pre-train; else ``model``."""
    imagenet = IMAGENET_MODELS[task]
    if source == "imagenet" or (source.startswith(config_lib.VDT_PREFIX) and model == "unet"):
        return imagenet
    return model


def variants(inits, sources, model: str = "unet", task: str = "segmentation") -> list[tuple[str, str, str]]:
    """(init, source, model) triples; scratch has no 2D source.

    'imagenet' variants use the task's ImageNet network (:data:`IMAGENET_MODELS`),
    as do 'vdt:' variants of the plain U-Net (it has no classifier twin; the
    ImageNet network's encoder does, so VDT and ImageNet then start the same
    network). When that differs from ``model``, a scratch run of it is added
    so that every pretrained variant has a from-scratch baseline of the same network.
    """
    out = []
    for init in inits:
        if init == "scratch":
            out.append((init, "", model))
            continue
        for source in sources:
            out.append((init, source, _source_model(source, model, task)))
    other = IMAGENET_MODELS[task]
    if "scratch" in inits and other != model and any(m == other for _, _, m in out):
        out.insert(1, ("scratch", "", other))
    return out


def variant_name(init: str, source: str, model: str, base_model: str) -> str:
    """'scale-slices', 'acs-imagenet' or 'scratch'; other models than the base one are named."""
    name = f"{init}-{source}" if source else init
    return name if model == base_model or source == "imagenet" else f"{name} ({model})"


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _curve(workdir: Path, score: str = "val_dice_mean") -> list[tuple[int, float]]:
    """(step, validation score) rows of a run's metrics.csv (``score`` is the task's, e.g. 'val_dice_mean')."""
    return [(int(r["step"]), float(r[score])) for r in _rows(workdir / "metrics.csv") if r.get(score)]


def _last_wall(path: Path) -> float:
    """The wall_s of a metrics CSV's last row (its stage's seconds), 0 if it has none."""
    walls = [float(r["wall_s"]) for r in _rows(path) if r.get("wall_s")]
    return walls[-1] if walls else 0.0


def _stage(workdir: Path) -> tuple[float, bool]:
    """``(seconds of the run's 2D stage, whether it was reused from another run)``; (0, False) without one."""
    marker = workdir / STAGE_REUSED
    if marker.exists():
        return float(json.loads(marker.read_text()).get("stage_s") or 0.0), True
    if (workdir / "slices_metrics.csv").exists():
        return _last_wall(workdir / "slices_metrics.csv"), False
    meta = workdir / "vdt" / "vdt.json"  # train.init.VDT_DIR / train.pretrain.META
    if meta.exists():
        return float(json.loads(meta.read_text()).get("wall_s") or 0.0), False
    return 0.0, False


_PARAMS: dict[tuple, int] = {}


def _param_count(config) -> int:
    from flax import nnx

    from acsjax.models import param_count
    from train import init, run

    key = (config.dataset, config.model, config.init, json.dumps(config.model_options, sort_keys=True, default=str))
    if key not in _PARAMS:
        source = run.open_source(config, "train")
        build = init.model_fn(config, in_channels=source.num_channels, num_classes=source.num_classes,
                              dims=config.model_dims)
        _PARAMS[key] = param_count(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    return _PARAMS[key]


def run_dir(out: Path, name: str, seed: int, fraction: float = 1.0, nested: bool = False) -> Path:
    """OUT/<name>/seed<k>, or OUT/<name>/frac<f>/seed<k> in a comparison over labelled fractions (``nested``)."""
    folder = out / name.replace(" ", "_").replace("(", "").replace(")", "")
    return (folder / f"frac{fraction:g}" if nested else folder) / f"seed{seed}"


def _share(own: Path, shared: Path, workdir: Path, stage: str, stage_s: float) -> None:
    """Copies the 2D stage ``shared`` into ``own`` and marks the run as having reused it (for compute accounting)."""
    shutil.copytree(shared, own)
    (workdir / STAGE_REUSED).write_text(json.dumps({"stage": stage, "stage_s": stage_s, "from": shared.name}) + "\n")


def run_variant(base, init: str, source: str, seed: int, out: Path, model: str | None = None, *,
                fraction: float = 1.0, nested: bool = False, steps: int = 0, name: str = "") -> dict:
    """Trains (or reuses) one run; returns its summary, curve, parameter count and compute.

    ``fraction`` is the run's labelled fraction, ``nested`` puts it under
    frac<f>; ``steps`` (default the base config's) and ``name`` (default the
    variant's) serve the compute-matched scratch runs. The result holds
    ``total_s`` (wall time plus a reused 2D stage), ``stage_s`` and the
    run's cost per 3D step (``per_step_s``, ``fixed_s``, see
    :func:`train.label_fractions.step_cost`).
    """
    from train import run
    from train.init import SLICES_DIR, VDT_DIR

    model = model or base.model
    name = name or variant_name(init, source, model, base.model)
    workdir = run_dir(out, name, seed, fraction, nested)
    options = base.model_options if model == base.model else {}
    config = config_lib.validate(
        dataclasses.replace(base, init=init, pretrained=source, seed=seed, workdir=str(workdir), model=model,
                            model_options=options, labelled_fraction=fraction, steps=steps or base.steps)
    )
    summary_path = workdir / "summary.json"
    workdir.mkdir(parents=True, exist_ok=True)
    # Variants of one seed, model and labelled fraction start from the same 2D
    # parent: the first 'slices' run trains it, the others copy it (train.init
    # reuses WORKDIR/slices2d), so they differ only in how the 2D weights are
    # used. VDT pre-training sees no 3D labels, so it is shared across fractions.
    if source == "slices":
        tag = "" if fraction == 1 else f"-frac{fraction:g}"
        shared, own = out / f"{SLICES_DIR}-{model}{tag}-seed{seed}", workdir / SLICES_DIR
    elif source.startswith(config_lib.VDT_PREFIX):
        safe = source.removeprefix(config_lib.VDT_PREFIX).replace("/", "_").replace(":", "_")
        shared, own = out / f"{VDT_DIR}-{safe}-{model}-seed{seed}", workdir / VDT_DIR
    else:
        shared = own = None
    seconds = shared.with_name(shared.name + ".json") if shared else None
    if shared and shared.exists() and not own.exists():
        _share(own, shared, workdir, source, json.loads(seconds.read_text())["stage_s"] if seconds.exists() else 0.0)
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
    else:
        summary = run.train_and_evaluate(config)
    if shared and own.exists() and not shared.exists():
        shutil.copytree(own, shared)
        seconds.write_text(json.dumps({"stage_s": _stage(workdir)[0]}) + "\n")
    kind = tasks.get(summary.get("task", "segmentation"))
    stage_s, reused = _stage(workdir)
    timing = [(int(r["step"]), float(r["wall_s"])) for r in _rows(workdir / "metrics.csv")
              if r.get("wall_s") and not r.get(kind.score)]  # training rows; validation rows repeat a step
    per_step, fixed = label_fractions.step_cost(timing, summary["steps"], summary["wall_s"])
    return {"name": name, "seed": seed, "fraction": fraction, "summary": summary,
            "curve": _curve(workdir, kind.score), "params": _param_count(config),
            "total_s": summary["wall_s"] + (stage_s if reused else 0.0), "stage_s": stage_s,
            "per_step_s": per_step, "fixed_s": fixed}


def table(results: list[dict], threshold: float, metric: str = "Dice") -> str:
    """Markdown table, one row per variant, mean ± standard deviation over seeds (``metric`` names the columns)."""
    names = list(dict.fromkeys(r["name"] for r in results))
    steps = sorted({s for r in results for s, _ in r["curve"]})
    head = ["variant", "seeds", *(f"{metric} @{s}" for s in steps), f"steps to {threshold:g}", "wall s", "parameters"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    baseline, blind = [], []
    for name in names:
        runs = [r for r in results if r["name"] == name]
        cells = [name, str(len(runs))]
        for s in steps:
            cells.append(_fmt([d for r in runs for st, d in r["curve"] if st == s]))
        reach = [next((s for s, d in r["curve"] if d >= threshold), None) for r in runs]
        reached = [s for s in reach if s is not None]
        cells.append(f"{statistics.mean(reached):.0f} ({len(reached)}/{len(runs)})" if reached else f"not reached (0/{len(runs)})")
        # A run that reused another's 2D stage is charged for it (total_s), as in label_fractions.md.
        cells.append(f"{statistics.mean(r.get('total_s', r['summary']['wall_s']) for r in runs):.0f}")
        cells.append(f"{runs[0]['params']:,}")
        lines.append("| " + " | ".join(cells) + " |")
        baseline += [r["summary"].get("baseline_threshold_dice") for r in runs]
        blind += [r["summary"].get("baseline_accuracy") for r in runs]
    baseline = [b for b in baseline if b is not None]
    blind = [b for b in blind if b is not None]
    if baseline:
        lines.append(f"\nBest global intensity-threshold Dice on the same validation cases: {max(baseline):.3f}.")
    if blind:
        lines.append(f"\nSpatially blind baseline accuracy on the same validation cases: {max(blind):.3f}.")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, metric: str = "validation Dice (mean over classes)") -> None:
    """Learning curves (validation ``metric`` against step), one colour per variant, one line per seed."""
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
    label_fractions.save_figure(fig, ax, path, xlabel="3D training step", ylabel=metric)


def base_config(preset: str, *, steps: int = 0, model: str = "", class_weights: str = "", eval_every: int = 0,
                slices_steps: int = 0):
    """The config every variant starts from: ``preset`` with the command's overrides (0 / '' keep the preset's).

    Validation runs every ``eval_every`` steps (default a quarter of the run),
    a checkpoint with it, and never with mirror test-time augmentation, so
    every point of a learning curve is measured the same way.
    """
    overrides = {"steps": steps, "model": model, "class_weights": class_weights, "slices_steps": slices_steps}
    base = config_lib.preset(preset, **{k: v for k, v in overrides.items() if v})
    every = eval_every or max(base.steps // 4, 1)
    return dataclasses.replace(base, eval_every=every, checkpoint_every=every, eval_mirror=False)


def _runnable(base, combos) -> list[tuple[str, str, str]]:
    """The (init, source, model) combinations a run accepts; the others are named on the console and skipped
    (VDT pre-trains full 3D kernels, so 'acs' or '2.5d' with 'vdt:' cannot run)."""
    keep = []
    for init, source, model in combos:
        try:
            config_lib.validate(dataclasses.replace(base, init=init, pretrained=source, model=model))
        except config_lib.ConfigError as err:
            why = cli.one_line(err).removeprefix("error: ")
            print(f"skipping {variant_name(init, source, model, base.model)}: {why}", flush=True)
            continue
        keep.append((init, source, model))
    return keep


def equal_compute_runs(base, results: list[dict], seeds, out: Path, *, nested: bool) -> list[dict]:
    """Per labelled fraction and seed, a scratch run of the base model given the total wall time of the
    most expensive pretrained variant at that fraction (:func:`train.label_fractions.compute_target`)."""
    extra = []
    for fraction in sorted({r["fraction"] for r in results}):
        target = label_fractions.compute_target(results, fraction)
        if target is None:
            continue
        print(f"equal compute at fraction {fraction:g}: {target[0]} takes {target[1]:.0f} s", flush=True)
        for seed in seeds:
            scratch = next((r for r in results if r["fraction"] == fraction and r["seed"] == seed
                            and r["name"] == "scratch"), None)
            if scratch is None:  # not among --inits: its equal-steps run measures the cost per step, and is shown
                scratch = run_variant(base, "scratch", "", seed, out, fraction=fraction, nested=nested)
                extra.append(scratch)
            steps = label_fractions.equal_compute_steps(scratch["per_step_s"], scratch["fixed_s"], target[1],
                                                        base.steps)
            run = run_variant(base, "scratch", "", seed, out, fraction=fraction, nested=nested, steps=steps,
                              name=label_fractions.EQUAL_COMPUTE)
            extra.append({**run, "target_s": target[1]})
    return extra


@cli.entry_point
def main(argv=None) -> int:
    from train import run

    parser = cli.ArgumentParser(prog="python -m train.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inits", default="scratch,center,average,scale,acs,soft_acs,2.5d")
    parser.add_argument("--pretrained", default="slices", help="2D sources for the inflating inits, comma-separated")
    parser.add_argument("--seeds", type=cli.int_list, default=(0,), help="comma-separated seeds")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=0, help="3D steps per run (default: the preset's)")
    parser.add_argument("--slices_steps", type=int, default=0,
                        help="2D slice / VDT pre-training steps (default: the preset's)")
    parser.add_argument("--eval_every", type=int, default=0, help="validation interval (default: steps / 4)")
    parser.add_argument("--model", default="", help="model name (default: the preset's)")
    parser.add_argument("--class_weights", default="", help="cross-entropy class weights (default: the preset's)")
    parser.add_argument("--label_fractions", type=label_fractions.fraction_list, default=(1.0,),
                        help="comma-separated labelled fractions of the training cases, e.g. 0.1,0.25,0.5,1 "
                             "(default 1: every label)")
    parser.add_argument("--equal_compute", action="store_true",
                        help="add a scratch run per fraction and seed given the total wall time of the most "
                             "expensive pretrained variant")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--out", default="runs/compare")
    args = parser.parse_args(argv)
    inits = [s for s in args.inits.split(",") if s]
    sources = [s for s in args.pretrained.split(",") if s]
    seeds = args.seeds
    fractions = args.label_fractions
    nested = fractions != (1.0,)
    base = base_config(args.preset, steps=args.steps, model=args.model, class_weights=args.class_weights,
                       eval_every=args.eval_every, slices_steps=args.slices_steps)
    for init in inits:
        config_lib.validate(dataclasses.replace(base, init=init))
    for source in sources:  # an inflating init: a preset's own may be scratch (classify's is)
        config_lib.validate(dataclasses.replace(base, init="scale", pretrained=source))
    task = run.select_task(base).name
    combos = _runnable(base, variants(inits, sources, base.model, task))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for fraction in fractions:
        for init, source, model in combos:
            for seed in seeds:
                results.append(run_variant(base, init, source, seed, out, model, fraction=fraction, nested=nested))
    if args.equal_compute:
        results += equal_compute_runs(base, results, seeds, out, nested=nested)
    command = "python -m train.compare " + " ".join(argv if argv is not None else sys.argv[1:])
    score = tasks.get(task).score
    largest = [r for r in results if r["fraction"] == fractions[-1]]
    text = table(largest, args.threshold, metric=score.removeprefix("val_"))
    (out / "comparison.md").write_text(f"`{command}`\n\n{text}")
    plot(largest, out / "learning_curves.png", metric=score)
    print(text)
    written = [out / "comparison.md", out / "learning_curves.png"]
    if nested or args.equal_compute:
        report = label_fractions.report(results, task, command)
        (out / "label_fractions.md").write_text(report)
        label_fractions.plot(results, score, out / "label_fractions.png")
        print(report)
        written += [out / "label_fractions.md", out / "label_fractions.png"]
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
