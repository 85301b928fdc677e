"""Planning commands: an experiment plan from the data, or a train step's memory.

  python -m train.plan --dataset=msd:PATH [--budget_voxels N] [--max_cases N] [--out plan.json]
  python -m train.plan --volume 2048,2048,2048 --devices 64 --remat nothing_saveable --dtype bfloat16
  python -m train.plan --volume 2048,2048,2048 --budget_gb 80 --search
  python -m train.plan --pair --volume 2048,2048,2048 --teacher_factor 4 --budget_gb 80

With ``--dataset`` it fingerprints the data set's labelled cases
(:mod:`train.planning.fingerprint`) and derives an nnU-Net-style experiment
plan (:mod:`train.planning.experiment`): target spacing, patch, strides and
kernels per stage, batch, class weights. It prints both, and ``--out`` writes
the plan as JSON (with the fingerprint under the key ``fingerprint``).

Without it, the memory planner (:mod:`train.planning.memory`) compiles the
real sharded train step for abstract inputs, the whole ``--volume`` as one
batch element with its depth sharded over ``--devices`` fake CPU devices, and
reports XLA's buffer assignment per device. Nothing is allocated, so a 2048^3
plan runs on a laptop. The numbers are XLA:CPU's; a GPU or TPU compiler fuses
and schedules differently, so keep a margin.

With ``--pair`` it plans a distillation pair (:mod:`train.planning.pair`): a
3D teacher on the whole volume at ``--teacher_factor`` x coarser spacing and a
2D student on whole full-resolution slices with the teacher's logits, each at
the fewest devices that fit ``--budget_gb`` (the student also at its largest
slice batch), against the full-resolution 3D network's own search.

Every user error prints one line, ``error: ...``, naming the file or flag.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from train import cli
from train.planning import experiment, memory, pair


def _parse_ints(text: str, n: int | None = None) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.replace("x", ",").split(","))
    if n and len(values) == 1:
        values *= n
    return values


def _range(values) -> str:
    values = np.asarray(values, np.float64)
    return ", ".join(f"{np.median(v):.3g} [{v.min():.3g}..{v.max():.3g}]" for v in values.T)


def format_fingerprint(fp) -> str:
    """A short human summary of a fingerprint."""
    lines = [
        f"fingerprint of {fp.dataset}: {fp.num_cases} cases, {fp.num_channels} channel(s) "
        f"({', '.join(fp.modalities)}), classes {', '.join(fp.class_names)}",
        f"spacing (d, h, w) mm, median [min..max]: {_range(fp.spacings)}",
        f"shape (D, H, W), median [min..max]: {_range(fp.shapes)}",
        "class frequencies: " + ", ".join(f"{n} {f:.3f}" for n, f in zip(fp.class_names, fp.class_frequencies)),
    ]
    kind = "raw" if fp.raw_intensities else "normalised"
    for c, s in enumerate(fp.intensity):
        lines.append(
            f"channel {c} foreground intensity ({kind}, {s.samples} samples): mean {s.mean:.4g}, std {s.std:.4g}, "
            f"median {s.median:.4g}, 0.5-99.5% [{s.percentile_00_5:.4g}, {s.percentile_99_5:.4g}]"
        )
    return "\n".join(lines)


def _dataset_mode(args) -> int:
    from train.data.nifti import DataError
    from train.planning import fingerprint

    try:
        fp = fingerprint.fingerprint_dataset(args.dataset, cache_dir=args.cache_dir or None,
                                             max_cases=args.max_cases, seed=args.seed)
    except DataError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except ValueError as err:  # an unknown spec or a bad source option
        print(f"error: --dataset: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    try:
        plan = experiment.plan_experiment(
            fp, budget_voxels=args.budget_voxels, base_width=args.base_width, max_width=args.max_width,
            min_batch=args.min_batch, max_stages=args.max_stages,
        )
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    record = {**plan.to_json(), "dataset": args.dataset, "fingerprint": fp.to_json()}
    print(format_fingerprint(fp))
    print()
    print(experiment.format_plan(plan))
    print()
    print(json.dumps(plan.to_json()))
    if args.out:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(record, f, indent=2)
        except OSError as err:
            print(f"error: --out: {args.out}: {err.strerror or err}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    return 0


@cli.entry_point
def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m train.plan", description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("experiment plan from the data")
    data.add_argument("--dataset", default="", help="data spec: msd:PATH, folder:PATH, mni152 or synthetic")
    data.add_argument("--budget_voxels", type=int, default=experiment.DEFAULT_BUDGET_VOXELS,
                      help="patch voxels x batch one step may hold (default 2 x 64^3, a CPU's)")
    data.add_argument("--max_cases", type=int, default=None, help="fingerprint at most this many cases")
    data.add_argument("--cache_dir", default="", help="cache decoded cases here")
    data.add_argument("--seed", type=int, default=0, help="seeds the intensity sample")
    data.add_argument("--base_width", type=int, default=experiment.DEFAULT_BASE_WIDTH)
    data.add_argument("--max_width", type=int, default=experiment.DEFAULT_MAX_WIDTH)
    data.add_argument("--max_stages", type=int, default=experiment.DEFAULT_MAX_STAGES)
    data.add_argument("--min_batch", type=int, default=2)
    data.add_argument("--out", default="", help="write the plan (and fingerprint) as JSON here")
    mem = parser.add_argument_group("train step memory (without --dataset)")
    mem.add_argument("--volume", default="2048,2048,2048", help="D,H,W of the whole volume (one int for a cube)")
    mem.add_argument("--model", default="unet", help="acsjax.models name")
    mem.add_argument("--widths", default="32,64,128,256,320", help="U-Net widths (the 'gpu' preset's)")
    mem.add_argument("--init", default="scale", help="decides dims: acs -> ACS, 2.5d -> 2.5D, else 3D")
    mem.add_argument("--devices", default="8", help="device count(s) to plan for, e.g. 8 or 16,32,64")
    mem.add_argument("--remat", default=None, help="jax.checkpoint_policies name, or 'none' (default nothing_saveable; "
                     "--search and --pair try none, then nothing_saveable)")
    mem.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    mem.add_argument("--batch", type=int, default=1)
    mem.add_argument("--budget_gb", type=float, default=80.0, help="per-device memory budget in GiB")
    mem.add_argument("--search", action="store_true",
                     help="try remat none/nothing_saveable and doubling device counts until one fits")
    mem.add_argument("--max_devices", type=int, default=512)
    duo = parser.add_argument_group("distillation pair (--pair)")
    duo.add_argument("--pair", action="store_true",
                     help="plan a 3D teacher at --teacher_factor x coarser spacing plus a 2D student on full-resolution "
                          "slices, against the full-resolution 3D network")
    duo.add_argument("--teacher_factor", type=int, default=4, help="teacher spacing / student spacing (4: 1 mm -> 4 mm)")
    duo.add_argument("--max_slice_batch", type=int, default=None,
                     help="largest student batch of slices to try (default: the volume's depth)")
    args = parser.parse_args(argv)
    for name in ("budget_voxels", "max_cases", "base_width", "max_width", "max_stages", "min_batch", "max_slice_batch",
                 "max_devices"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}: must be >= 1, got {value}")
    if args.dataset:
        return _dataset_mode(args)
    if args.pair:
        return _pair_mode(args, parser)
    return _memory_mode(args, parser)


def _configs(args, remats):
    """The run configs to plan, one per remat ('none' -> off); ConfigError on bad settings."""
    from train import config as config_lib

    widths = _parse_ints(args.widths)
    return [
        config_lib.preset("gpu", model=args.model, model_options={"widths": widths}, init=args.init,
                          remat="" if remat == "none" else remat, dtype=args.dtype, deep_supervision=False)
        for remat in remats
    ]


def _pair_mode(args, parser) -> int:
    try:
        volume = _parse_ints(args.volume, 3)
        _parse_ints(args.widths)
    except ValueError:
        parser.error("--volume and --widths take comma-separated integers")
    if len(volume) != 3:
        parser.error(f"--volume: expected D,H,W, got {args.volume!r}")
    try:
        grid = pair.teacher_grid(volume, args.teacher_factor)
    except ValueError as err:
        parser.error(f"--teacher_factor: {err}")
    remats = [args.remat] if args.remat else ["none", "nothing_saveable"]
    memory.configure_cpu_devices(args.max_devices)

    from train import config as config_lib
    from train import init

    try:
        configs = _configs(args, remats)
        init.check_model(init.model_fn(configs[0], in_channels=1, num_classes=3, dims=configs[0].model_dims), grid)
    except config_lib.ConfigError as err:
        flag = "teacher_factor" if err.flag == "patch" else err.flag
        print(f"error: --{flag}: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    cap = args.max_slice_batch or volume[0]
    print(f"distillation pair for a {'x'.join(map(str, volume))} volume: 3D teacher on {'x'.join(map(str, grid))} "
          f"({args.teacher_factor}x spacing), 2D student on full-resolution slices with the teacher's logits; "
          f"{args.model} widths={_parse_ints(args.widths)}, {args.dtype}, budget {args.budget_gb:g} GiB per device "
          f"(XLA:CPU buffer assignment)", flush=True)
    plan = pair.plan_pair(configs, volume, args.teacher_factor, args.budget_gb, max_devices=args.max_devices,
                          max_slice_batch=cap,
                          report=lambda label, m: print(pair.format_step(label, m, args.budget_gb), flush=True))
    print(pair.format_plan(plan))
    return 0 if plan.pair_devices is not None else 1


def _memory_mode(args, parser) -> int:
    try:
        volume = _parse_ints(args.volume, 3)
        widths = _parse_ints(args.widths)
        counts = sorted(_parse_ints(args.devices))
    except ValueError:
        parser.error("--volume, --widths and --devices take comma-separated integers")
    if len(volume) != 3:
        parser.error(f"--volume: expected D,H,W, got {args.volume!r}")
    if args.search:
        counts = memory.device_counts(volume[0], args.max_devices)
    memory.configure_cpu_devices(max(counts))

    from train import config as config_lib

    remats = [args.remat] if args.remat else (["none", "nothing_saveable"] if args.search else ["nothing_saveable"])
    print(f"train step of {args.model} widths={widths} on a {volume} volume, batch {args.batch}, {args.dtype}, "
          f"budget {args.budget_gb:g} GiB per device (XLA:CPU buffer assignment)")
    print(memory.HEADER)
    try:
        configs = _configs(args, remats)
        report = lambda m: print(memory.format_row(m, args.budget_gb), flush=True)  # noqa: E731
        if args.search:
            best, _ = memory.fewest_devices(configs, volume, counts, args.budget_gb, report=report, batch=args.batch)
        else:
            best = None
            for config in configs:
                for n in counts:
                    m = memory.step_memory(config, volume, n, batch=args.batch)
                    report(m)
                    if memory.fits(m, args.budget_gb) and (
                        best is None or (m.devices, m.total_bytes) < (best.devices, best.total_bytes)
                    ):
                        best = m
    except config_lib.ConfigError as err:
        print(err.line(), file=sys.stderr)
        return 2
    if best is None:
        print(f"nothing tried fits {args.budget_gb:g} GiB per device")
        return 1
    print(f"smallest fit: {best.devices} devices, remat {best.remat}, {best.dtype}: "
          f"{best.total_bytes / memory.GIB:.1f} GiB per device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
