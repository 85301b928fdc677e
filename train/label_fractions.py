"""The annotation-efficiency report of ``train.compare --label_fractions``: compute accounting, tables, plot.

Every run is a dict as :func:`train.compare.run_variant` returns it (``name``,
``seed``, ``fraction``, ``summary``, ``total_s``, ``stage_s``, ``per_step_s``,
``fixed_s`` and, for a compute-matched run, ``target_s``).

Total compute is wall time: a run's ``wall_s`` plus the 2D stage (slice
training or VDT pre-training) it took from an earlier run of the same
comparison instead of paying it itself, so every pretrained variant is charged
for its own starting point.

Equal compute (:func:`equal_compute_steps`) treats a scratch run as a fixed
cost (set-up, compilation, the final validation) plus a cost per 3D step
measured between its first and last metrics.csv rows (training steps and the
periodic validations between them); a scratch run given the total time of a
pretrained variant gets the steps that fill it. The achieved wall time is
reported beside the target.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from train import tasks

EQUAL_COMPUTE = "scratch (equal compute)"


def metrics_of(task: str) -> list[str]:
    """The task's validation metrics in summary.json: its headline ``score`` first, then the other scalar ones."""
    kind = tasks.get(task)
    others = [k for k in kind.required if k.startswith("val_") and k != kind.score]
    # Segmentation's per-class 'val_dice' is a list, not a number: it stays out.
    return [kind.score, *[k for k in others if k != "val_dice"]]


def baseline_of(task: str) -> str | None:
    """The summary key of the task's no-network baseline ('baseline_threshold_dice', 'baseline_accuracy')."""
    return next((k for k in tasks.get(task).required if k.startswith("baseline_")), None)


def step_cost(rows: list[tuple[int, float]], steps: int, wall_s: float) -> tuple[float, float]:
    """``(seconds per 3D step, fixed seconds)`` of a run from its metrics.csv ``(step, wall_s)`` rows.

    The rate is taken between the first and the last row (so the first
    step's compilation is not counted as training); the fixed part is what
    remains of the run's whole ``wall_s``. With fewer than two rows, the
    whole wall time is spread over the steps.
    """
    rows = sorted(rows)
    if len(rows) >= 2 and rows[-1][0] > rows[0][0] and rows[-1][1] > rows[0][1]:
        per_step = (rows[-1][1] - rows[0][1]) / (rows[-1][0] - rows[0][0])
    else:
        per_step = wall_s / max(steps, 1)
    return per_step, max(wall_s - per_step * steps, 0.0)


def equal_compute_steps(per_step_s: float, fixed_s: float, target_s: float, min_steps: int) -> int:
    """3D steps that make a run of this cost last ``target_s`` seconds; never fewer than ``min_steps``."""
    if per_step_s <= 0:
        return min_steps
    return max(min_steps, int(round((target_s - fixed_s) / per_step_s)))


def compute_target(results: list[dict], fraction: float) -> tuple[str, float] | None:
    """``(name, mean total seconds)`` of the most expensive pretrained variant at ``fraction``, or None."""
    names = {}
    for r in results:
        if r["fraction"] == fraction and r["summary"].get("init") != "scratch":
            names.setdefault(r["name"], []).append(r["total_s"])
    if not names:
        return None
    name = max(names, key=lambda n: statistics.mean(names[n]))
    return name, statistics.mean(names[name])


def fmt(values: list[float]) -> str:
    """'0.812 ± 0.031' (mean ± sample standard deviation), one value as it is, none as '-'."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _fraction_head(results: list[dict], fraction: float) -> str:
    cases = sorted({r["summary"].get("labelled_cases") for r in results if r["fraction"] == fraction} - {None})
    if not cases:
        return f"{fraction:g}"
    n = f"{cases[0]}" if len(cases) == 1 else f"{cases[0]}-{cases[-1]}"
    return f"{fraction:g} ({n} cases)"


def table(results: list[dict], metric: str, *, baseline: str | None = None) -> str:
    """Markdown: one row per variant, one column per labelled fraction (mean ± sd of ``metric`` over seeds),
    and the variant's mean total wall time; a last row holds the no-network ``baseline`` where given."""
    fractions = sorted({r["fraction"] for r in results})
    names = list(dict.fromkeys(r["name"] for r in results))
    head = ["variant", "seeds", *(_fraction_head(results, f) for f in fractions), "total wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        runs = [r for r in results if r["name"] == name]
        cells = [name, str(len({r["seed"] for r in runs}))]
        cells += [fmt([r["summary"][metric] for r in runs if r["fraction"] == f and metric in r["summary"]])
                  for f in fractions]
        cells.append(f"{statistics.mean(r['total_s'] for r in runs):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    if baseline:
        values = [[r["summary"][baseline] for r in results if r["fraction"] == f and r["summary"].get(baseline) is not None]
                  for f in fractions]
        if any(values):
            cells = [f"no network ({baseline})", "", *(f"{statistics.mean(v):.3f}" if v else "-" for v in values), ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compute_table(results: list[dict]) -> str:
    """Markdown: each variant's mean total wall time (2D stage included) and 3D steps at every fraction;
    the compute-matched scratch row shows achieved / target seconds."""
    fractions = sorted({r["fraction"] for r in results})
    names = list(dict.fromkeys(r["name"] for r in results))
    head = ["variant", *(f"{f:g}" for f in fractions)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name]
        for f in fractions:
            runs = [r for r in results if r["name"] == name and r["fraction"] == f]
            if not runs:
                cells.append("-")
                continue
            total = statistics.mean(r["total_s"] for r in runs)
            steps = sorted({r["summary"]["steps"] for r in runs})
            steps_text = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
            targets = [r["target_s"] for r in runs if r.get("target_s")]
            stage = statistics.mean(r["stage_s"] for r in runs)
            cell = f"{total:.0f} s"
            if targets:
                cell += f" (target {statistics.mean(targets):.0f} s)"
            elif stage:
                cell += f" (2D stage {stage:.0f} s)"
            cells.append(f"{cell}, {steps_text} steps")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(results: list[dict], task: str, command: str) -> str:
    """The whole OUT/label_fractions.md: the command, one table per validation metric, the compute table."""
    metrics = metrics_of(task)
    total = sorted({r["summary"].get("training_cases") for r in results} - {None})
    parts = [f"`{command}`\n",
             f"Task: {task}. Labelled fraction of the {total[0] if total else '?'} training cases (columns); "
             "mean ± standard deviation over seeds. Runs at one fraction and seed share their labelled cases.\n"]
    for i, metric in enumerate(metrics):
        what = " (the task's score)" if i == 0 else ""
        parts.append(f"### {metric}{what}\n\n{table(results, metric, baseline=baseline_of(task) if i == 0 else None)}")
    parts.append("### Compute: mean total wall time per run and its 3D steps\n\n" + compute_table(results))
    parts.append(
        "Total wall time is the run's own wall time plus the 2D stage (slice training, VDT pre-training) it "
        "reused from an earlier run of this comparison. "
        f"'{EQUAL_COMPUTE}' trains from scratch for as many 3D steps as fit the mean total wall time of the most "
        "expensive pretrained variant at that fraction (the target), at the cost per step measured on the "
        "equal-steps scratch run of the same fraction and seed (time between its first and last metrics.csv "
        "rows, periodic validation included) plus that run's fixed cost (set-up, compilation, final "
        "validation); the achieved time is shown beside the target.\n")
    return "\n".join(parts)


def plot(results: list[dict], metric: str, path: Path) -> None:
    """``metric`` against labelled fraction (log x), one line per variant, error bars = sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = sorted({r["fraction"] for r in results})
    names = list(dict.fromkeys(r["name"] for r in results))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(names):
        xs, ys, errs = [], [], []
        for f in fractions:
            values = [r["summary"][metric] for r in results if r["name"] == name and r["fraction"] == f
                      and metric in r["summary"]]
            if values:
                xs.append(f)
                ys.append(statistics.mean(values))
                errs.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        # A small sideways shift per variant (on the log axis) keeps overlapping error bars apart.
        shift = 1 + 0.012 * (i - (len(names) - 1) / 2)
        ax.errorbar([x * shift for x in xs], ys, yerr=errs, marker="o", ms=4, capsize=3, color=colours(i % 10), label=name,
                    linestyle="--" if name == EQUAL_COMPUTE else "-")
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([f"{f:g}" for f in fractions])
    ax.minorticks_off()
    save_figure(fig, ax, path, xlabel="labelled fraction of the training cases", ylabel=metric)


def save_figure(fig, ax, path, *, xlabel: str, ylabel: str) -> None:
    """Labels, grid and legend as every comparison figure has them; writes ``path`` and closes the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fraction_list(text: str) -> tuple[float, ...]:
    """argparse ``type=`` for ``--label_fractions``: comma-separated fractions in (0, 1], sorted, no repeats."""
    import argparse

    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    bad = [v for v in values if not (0 < v <= 1) or math.isnan(v)]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1], got {text!r}")
    return tuple(values)
