"""Distillation across resolutions on the MNI152 template: a 3D teacher at 4 mm, 2D students at 1 mm, and back.

  python -m train.distill_report --out runs/distill

Two directions, each one teacher and its students, the same two networks on
the same two grids (the demo preset's U-Net, widths 8-16-32-64):

- forward: the teacher is the 3D U-Net at 4 mm whose patch covers a whole
  4 mm training volume (21 x 51 x 41 voxels, padded to 24 x 56 x 48), so it
  sees the whole slab's 3D context at coarse resolution. The students are the
  U-Net's 2D twin (``--dims=2``) at 1 mm, trained on axial slices: fine
  detail, but one slice at a time.
- reverse: the teacher is that 2D U-Net at 1 mm, trained with all labels; the
  students are the 3D U-Net at 4 mm on whole volumes. It swaps what each side
  brings: fine in-plane detail, resampled onto the 4 mm grid, taught to a
  network that has the whole 3D context but coarse voxels. A 2D teacher at
  the student's own 4 mm was not chosen: it would see the same voxels as its
  student with less context, so it could teach nothing the student cannot
  learn from the same labels; and this choice keeps both directions on the
  same pair of runs, so they can be read side by side. The teacher sees the
  student's 4 mm case resampled to 1 mm (:mod:`train.distill`), blurrier
  than the cases it trained on; the reverse rows pay for that.

Every student is trained at every labelled fraction (``--fractions``) and
seed (``--seeds``), alone and with its teacher. Alone, a run trains on its
labelled cases only; with the teacher, the unlabelled cases train on the
distillation term alone and the labelled ones on (1 - a) x supervised +
a x T^2 x KL (``--kd_weight`` a, ``--kd_temperature`` T). The labelled cases
of one fraction and seed are the same in both (:mod:`train.data.subsets`), so
the teacher is the only difference. Each teacher is trained once (seed 0, all
labels, ``--teacher_steps`` steps); students of other seeds train on other
renderings of the training slab, which their teacher labels without having
seen them.

Every run is its own ``python -m train.main`` process in OUT/<direction>/...,
and its row in the table reports:

- Dice: ``val_dice_mean`` of its summary.json, the mean foreground Dice over
  the validation cases, at the run's own spacing (the student's resolution);
  mean ± standard deviation over seeds. "Δ alone" is the paired difference,
  seed by seed, from the same fraction's students without a teacher.
- wall s: the process's wall time from start to exit (start-up, compilation,
  the teacher's logits, training and the final validation); median over
  seeds. The teacher's logits depend on the case, not on which cases keep
  labels, so a seed's taught runs share them: the first fraction's run
  computes them and its wall time includes that; the later fractions' runs
  start with them (hard links in WORKDIR/teacher).
- peak MB: the process's peak resident memory, the kernel's high-water mark
  (VmHWM) read from /proc while it runs (its own, not the command's or other
  runs'; see :func:`run_process`); median over seeds. It is host memory: on
  an accelerator the device's memory is not in it.

Every run on one grid uses the same cross-entropy weights (balanced for the
template's training slab; see :func:`template_class_weights`) rather than the
demo's weights counted from each run's own labelled cases. The weights are
constants of the compiled training step, so the runs of one kind (one grid,
alone or taught) compile it once and the others read it from JAX's persistent
compilation cache. That first run of a kind pays the compilation, in time
and memory (measured here: a 3D student at 4 mm, 115 s and 1.4 GB compiling,
38 s and 0.8 GB reading the cache), which is why the times and memories are
medians over seeds; a teacher's, one run, includes it.

Before the first run the command renders every case the runs read (the
training cases of every seed at both spacings, the validation cases) into the
rendering cache, so that no run's wall time includes rendering; the time it
took is in the report.

Cost, measured on two CPU cores shared with other work (load about 9, when
the demo's 3D train step took 3.6 times as long as on idle cores): a run
costs about 35 s besides its steps (start-up, data, the final validation);
a step 1.4 s (2D, 8 whole slices at 1 mm) or 1.1 s (3D, 2 whole volumes at
4 mm); each kind of run compiles once (35-80 s); a teacher's logits on one
seed's 24 cases 50 s (forward) or 150 s (reverse: the 2D teacher runs over
the ~84 upsampled slices of every case). The 38 runs of the default
experiment cost about 38 minutes at that load before any step, about 10 on
idle cores, and the defaults (``--steps=40 --teacher_steps=200``) add about
40 and 12: about 22 minutes in all on two idle cores, 80 at that load. The
first invocation also renders the 78 cases at 1 mm (about 6 s each).

What that buys: 40 steps is the very start of training (the demo preset
trains 1500 steps; after 20 steps the 2D student here stood at Dice 0.25
and the 3D one at 0.21, under the intensity-threshold baseline of about
0.5). The default table therefore says whether a teacher speeds up the
start, not whether it helps a trained student; ``--steps=600
--teacher_steps=1500`` asks the second question, in about 3 hours on two
idle cores.

Rerunning reuses finished runs (a run directory with summary.json) and
resumes interrupted ones (their times then cover the resumed part only); a
finished run with other settings (steps, kd weight or temperature) is an
error naming it. Writes OUT/distillation.md and prints it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from train import cli
from train import config as config_lib
from train.data import subsets
from train.label_fractions import fmt as mean_spread


@dataclasses.dataclass(frozen=True)
class Network:
    """One side of a direction: a network on a grid, as train.main flags."""

    name: str
    spacing: float
    flags: tuple[str, ...]


# The 4 mm training volumes are 21 x 51 x 41 voxels; the U-Net downsamples
# three times, so the smallest patch that covers one is 24 x 56 x 48 (padded).
NET_3D = Network("3D U-Net, 4 mm, whole volumes", 4.0, ("--spacing=4", "--patch=24,56,48", "--batch=2"))
# Axial slices of the 1 mm volumes are 193 x 157; the 2D twin trains on whole
# slices (padded to 208 x 160), 8 at a time, and validates with one window per slice.
NET_2D = Network("2D U-Net, 1 mm, axial slices", 1.0, ("--dims=2", "--spacing=1", "--patch=1,208,160",
                                                        "--slices_batch=8"))
# direction -> (teacher, student)
DIRECTIONS: dict[str, tuple[Network, Network]] = {"forward": (NET_3D, NET_2D), "reverse": (NET_2D, NET_3D)}
TEACHER_SEED = 0
SUMMARY = "summary.json"
RESOURCES = "resources.json"  # wall time and peak memory of the run's process, written by this command
LOG = "log.txt"
TEACHER_DIR, TEACHER_RECORD = "teacher", "teacher.json"  # a student's cached teacher logits (train.distill)


@dataclasses.dataclass(frozen=True)
class Run:
    """One ``python -m train.main`` process of the experiment."""

    direction: str
    role: str  # 'teacher' or 'student'
    network: Network
    fraction: float
    seed: int
    teacher: str  # the teacher's workdir; '' for a student alone and for teachers
    workdir: str
    argv: tuple[str, ...]  # train.main's flags
    expect: tuple[tuple[str, object], ...]  # summary.json fields a reused run must match
    logits_from: tuple[str, ...] = ()  # earlier taught runs of the same seed, whose teacher logits are this run's

    def command(self) -> list[str]:
        """The command line that trains it."""
        return [sys.executable, "-m", "train.main", *self.argv]


def template_class_weights(spacing: float) -> tuple[float, ...]:
    """Balanced cross-entropy weights of the template's training slab at ``spacing`` (rounded)."""
    import numpy as np

    from train.data.mni152 import load_template
    from train.losses import balanced_class_weights

    tpl = load_template(spacing)
    counts = np.bincount(tpl.label[tpl.region("train")].ravel(), minlength=3)
    return tuple(round(w, 4) for w in balanced_class_weights(counts))


def _train_flags(network: Network, workdir: Path, steps: int, seed: int, cache_dir: str,
                 class_weights: Mapping[float, Sequence[float]] | None) -> list[str]:
    # Scratch starts, so that a teacher is the only thing a student gets from
    # elsewhere. Validation once, at the end, without mirroring (8 passes in
    # 3D against 4 in 2D would make the two directions' times incomparable).
    flags = ["--dataset=mni152", "--preset=demo", "--init=scratch", *network.flags, f"--workdir={workdir}",
             f"--steps={steps}", f"--seed={seed}", f"--warmup_steps={max(1, steps // 10)}", "--eval_every=0",
             "--noeval_mirror", f"--checkpoint_every={steps}", f"--log_every={max(1, steps // 10)}"]
    if class_weights is not None:
        flags.append("--class_weights=" + ",".join(f"{w:g}" for w in class_weights[network.spacing]))
    return flags + ([f"--cache_dir={cache_dir}"] if cache_dir else [])


def plan_runs(out, *, steps: int, teacher_steps: int, seeds: Sequence[int], fractions: Sequence[float],
              kd_weight: float, kd_temperature: float, cache_dir: str = "",
              class_weights: Mapping[float, Sequence[float]] | None = None,
              directions: Sequence[str] = tuple(DIRECTIONS)) -> list[Run]:
    """Every run of the experiment, each teacher before its students.

    OUT/<direction>/teacher, then OUT/<direction>/f<fraction>-<alone|taught>/seed<k>
    for every fraction and seed. ``class_weights`` maps a spacing to the
    cross-entropy weights of every run at it (None: the demo's 'balanced',
    counted by each run on its own labelled cases).
    """
    out = Path(out)
    runs = []
    for direction in directions:
        teacher_net, student_net = DIRECTIONS[direction]
        teacher_dir = out / direction / "teacher"
        argv = _train_flags(teacher_net, teacher_dir, teacher_steps, TEACHER_SEED, cache_dir, class_weights)
        runs.append(Run(direction, "teacher", teacher_net, 1.0, TEACHER_SEED, "", str(teacher_dir), tuple(argv),
                        (("steps", teacher_steps),)))
        taught_dirs: dict[int, list[str]] = {seed: [] for seed in seeds}
        for fraction in fractions:
            for taught in (False, True):
                for seed in seeds:
                    workdir = out / direction / f"f{fraction:g}-{'taught' if taught else 'alone'}" / f"seed{seed}"
                    argv = _train_flags(student_net, workdir, steps, seed, cache_dir, class_weights)
                    argv.append(f"--labelled_fraction={fraction:g}")
                    expect = [("steps", steps), ("labelled_fraction", fraction)]
                    if taught:
                        argv += [f"--teacher={teacher_dir}", f"--kd_weight={kd_weight:g}",
                                 f"--kd_temperature={kd_temperature:g}"]
                        expect += [("kd_weight", kd_weight), ("kd_temperature", kd_temperature)]
                    runs.append(Run(direction, "student", student_net, fraction, seed,
                                    str(teacher_dir) if taught else "", str(workdir), tuple(argv), tuple(expect),
                                    tuple(taught_dirs[seed]) if taught else ()))
                    if taught:
                        taught_dirs[seed].append(str(workdir))
    return runs


def _high_water_kib(pid: int) -> int | None:
    """VmHWM (peak resident set, KiB) of a live process, from /proc; None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def run_process(command: Sequence[str], log_path: Path, poll_s: float = 0.1) -> dict:
    """Runs ``command`` with its output in ``log_path``; its exit status, wall time and peak memory.

    The peak is the kernel's high-water mark of the process's resident set
    (VmHWM in /proc/PID/status), read every ``poll_s`` seconds until it
    exits: it only grows, so the last reading misses at most the last
    ``poll_s``. (``ru_maxrss`` of the reaped child would be simpler but is
    wrong here: Linux carries the parent's resident set at the fork into it.)
    """
    start = time.perf_counter()
    peak = 0
    with open(log_path, "w") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT)
        try:
            while process.poll() is None:
                peak = max(peak, _high_water_kib(process.pid) or 0)
                time.sleep(poll_s)
        except BaseException:
            process.kill()
            process.wait()
            raise
    return {"returncode": process.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(peak / 1024, 1)}


def _check_reusable(run: Run, summary: dict) -> None:
    for key, value in run.expect:
        if key in summary and summary[key] != value:
            raise config_lib.ConfigError("out", f"{run.workdir} is a finished run with {key}={summary[key]}, not "
                                         f"{value}; choose another --out or remove it")


def share_teacher_logits(workdir: Path, siblings: Sequence[str]) -> str | None:
    """Links the teacher logits of the first finished run in ``siblings`` into WORKDIR/teacher; its workdir, or None.

    A teacher's logits depend on the teacher and the case, not on which
    cases keep their labels, so the taught runs of one seed share them. The
    .npy files are hard links (train.distill replaces them, never rewrites
    them in place); the record of which teacher made them is copied.
    """
    own = workdir / TEACHER_DIR
    if own.exists():
        return None
    for sibling in siblings:
        theirs = Path(sibling) / TEACHER_DIR
        if (Path(sibling) / SUMMARY).exists() and (theirs / TEACHER_RECORD).exists():
            own.mkdir(parents=True)
            for path in theirs.glob("*.npy"):
                os.link(path, own / path.name)
            shutil.copyfile(theirs / TEACHER_RECORD, own / TEACHER_RECORD)
            return sibling
    return None


def execute(run: Run, runner: Callable[[Sequence[str], Path], dict] = run_process, log=print) -> dict:
    """Trains ``run`` unless its workdir holds a finished run; the result row for :func:`table`.

    A failed run stops the experiment: RuntimeError naming its log.
    """
    workdir = Path(run.workdir)
    summary_path, resources_path = workdir / SUMMARY, workdir / RESOURCES
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        _check_reusable(run, summary)
        log(f"reusing {workdir}")
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        shared = share_teacher_logits(workdir, run.logits_from) if run.teacher else None
        log(f"training {workdir}" + (f" (the teacher's logits from {shared})" if shared else "") + " ...")
        resources = runner(run.command(), workdir / LOG)
        if run.teacher:
            resources["teacher_logits_from"] = shared
        if resources["returncode"] != 0 or not summary_path.exists():
            raise RuntimeError(f"{workdir}: train.main exited with status {resources['returncode']}; "
                               f"see {workdir / LOG}")
        resources_path.write_text(json.dumps(resources, indent=2) + "\n")
        summary = json.loads(summary_path.read_text())
    resources = json.loads(resources_path.read_text()) if resources_path.exists() else None
    return {"direction": run.direction, "role": run.role, "network": run.network.name, "fraction": run.fraction,
            "seed": run.seed, "taught": bool(run.teacher), "summary": summary, "resources": resources}


def labelled_cases(fraction: float, training_cases: int) -> int:
    """How many training cases keep their labels at ``fraction`` (the same for every seed)."""
    return len(subsets.labelled_indices(training_cases, fraction, 0))


def _median(values) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.median(values):.0f}" if values else "-"


def _resource(rows, key) -> list:
    return [r["resources"][key] for r in rows if r.get("resources")]


def table(results: list[dict]) -> str:
    """Markdown table: the teachers, then every student (fraction x alone/taught), means over seeds."""
    head = ["direction", "run", "labelled", "teacher", "seeds", "val Dice", "Δ alone", "wall s", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["direction"], r["role"], r["fraction"], r["taught"]) for r in results))
    for direction, role, fraction, taught in keys:
        rows = [r for r in results if (r["direction"], r["role"], r["fraction"], r["taught"]) ==
                (direction, role, fraction, taught)]
        dice = {r["seed"]: r["summary"]["val_dice_mean"] for r in rows}
        delta = ""
        if taught:
            alone = {r["seed"]: r["summary"]["val_dice_mean"] for r in results
                     if (r["direction"], r["role"], r["fraction"], r["taught"]) == (direction, role, fraction, False)}
            paired = [dice[s] - alone[s] for s in dice if s in alone]
            delta = mean_spread(paired)
            if paired and not delta.startswith("-"):
                delta = "+" + delta
        n = rows[0]["summary"].get("training_cases", 24)
        labelled = rows[0]["summary"].get("labelled_cases") or labelled_cases(fraction, n)
        name = f"teacher: {rows[0]['network']}" if role == "teacher" else rows[0]["network"]
        cells = [direction, name, f"{fraction:g} ({labelled}/{n})",
                 "-" if role == "teacher" else ("yes" if taught else "no"), str(len(rows)),
                 mean_spread(list(dice.values())), delta, _median(_resource(rows, "wall_s")),
                 _median(_resource(rows, "peak_rss_mb"))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["val Dice: mean foreground Dice on the validation cases at the run's own spacing, mean ± standard "
             "deviation over seeds; Δ alone: taught minus alone, paired by seed; wall s and peak MB: medians over "
             "seeds of the run's process."]
    baselines = {}
    for r in results:
        if r["role"] == "student" and r["summary"].get("baseline_threshold_dice") is not None:
            baselines.setdefault(r["network"], r["summary"]["baseline_threshold_dice"])
    for network, base in baselines.items():
        notes.append(f"Best global intensity-threshold Dice on the same validation cases ({network}): {base:.3f}.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def cases_read(directions: Sequence[str], seeds: Sequence[int]) -> dict[float, list[int]]:
    """spacing -> the seeds whose training cases the runs read at that spacing (validation cases at every one).

    A teacher trains on its own spacing's cases of its seed and computes its
    logits on the student's cases (resampled, not rendered again); a student
    reads its own spacing's cases of its seed.
    """
    needs: dict[float, set[int]] = {}
    for direction in directions:
        teacher, student = DIRECTIONS[direction]
        needs.setdefault(teacher.spacing, set()).add(TEACHER_SEED)
        needs.setdefault(student.spacing, set()).update(seeds)
    return {spacing: sorted(s) for spacing, s in sorted(needs.items())}


def warm_cache(needs: Mapping[float, Sequence[int]], cache_dir: str) -> float:
    """Renders the training cases of each spacing's seeds and the validation cases into the cache; seconds."""
    from train.data.mni152 import MNI152Source

    start = time.perf_counter()
    for spacing, seeds in needs.items():
        sources = [MNI152Source("validation", cache_dir=cache_dir, spacing=spacing)]
        sources += [MNI152Source("train", cache_dir=cache_dir, seed=seed, spacing=spacing) for seed in seeds]
        for source in sources:
            for i in range(len(source)):
                source[i]
    return time.perf_counter() - start


def _fraction_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise config_lib.ConfigError("fractions", f"expected comma-separated numbers, got {text!r}") from None
    if not all(0 < v <= 1 for v in values):
        raise config_lib.ConfigError("fractions", f"every fraction must be in (0, 1], got {text!r}")
    return values


@cli.entry_point
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m train.distill_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps of every student")
    parser.add_argument("--teacher_steps", type=int, default=200, help="training steps of each teacher")
    parser.add_argument("--seeds", type=cli.int_list, default=(0, 1, 2), help="comma-separated student seeds")
    parser.add_argument("--fractions", default="1,0.25,0.1", help="comma-separated labelled fractions")
    parser.add_argument("--kd_weight", type=float, default=0.5, help="weight a of the distillation term")
    parser.add_argument("--kd_temperature", type=float, default=2.0, help="distillation temperature T")
    parser.add_argument("--directions", default=",".join(DIRECTIONS), help="forward, reverse or both")
    parser.add_argument("--cache_dir", default="", help="train.main's --cache_dir (default: its own default)")
    parser.add_argument("--out", default="runs/distill")
    args = parser.parse_args(argv)
    fractions = _fraction_list(args.fractions)
    directions = [d for d in args.directions.split(",") if d]
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown or not directions:
        raise config_lib.ConfigError("directions", f"expected forward and/or reverse, got {args.directions!r}")
    for name in ("steps", "teacher_steps"):
        if getattr(args, name) < 1:
            raise config_lib.ConfigError(name, f"must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.kd_weight <= 1:
        raise config_lib.ConfigError("kd_weight", f"must be in [0, 1], got {args.kd_weight}")
    if not args.kd_temperature > 0:
        raise config_lib.ConfigError("kd_temperature", f"must be positive, got {args.kd_temperature}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spacings = sorted({n.spacing for d in directions for n in DIRECTIONS[d]})
    weights = {s: template_class_weights(s) for s in spacings}
    runs = plan_runs(out, steps=args.steps, teacher_steps=args.teacher_steps, seeds=args.seeds, fractions=fractions,
                     kd_weight=args.kd_weight, kd_temperature=args.kd_temperature, cache_dir=args.cache_dir,
                     class_weights=weights, directions=directions)
    cache_dir = args.cache_dir or config_lib.PRESETS["demo"].cache_path
    print(f"rendering the cases the runs read into {cache_dir} ...", flush=True)
    render_s = warm_cache(cases_read(directions, args.seeds), cache_dir)
    started = time.perf_counter()
    try:
        results = [execute(run, run_process, log=lambda m: print(m, flush=True)) for run in runs]
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return cli.ERROR_STATUS
    text = table(results)
    command = "python -m train.distill_report " + " ".join(argv if argv is not None else sys.argv[1:])
    weights_text = ", ".join(f"{s:g} mm {'/'.join(f'{w:g}' for w in ws)}" for s, ws in weights.items())
    header = (f"`{command}`\n\n{len(runs)} runs: students {args.steps} steps, teachers {args.teacher_steps}; "
              f"kd weight {args.kd_weight:g}, temperature {args.kd_temperature:g}; cross-entropy weights "
              f"(background/grey/white) {weights_text}. Rendering the cases beforehand took {render_s:.0f} s, "
              f"the runs this invocation trained {time.perf_counter() - started:.0f} s.\n\n")
    (out / "distillation.md").write_text(header + text)
    print(text)
    print(f"wrote {out / 'distillation.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
