"""Train-step memory from XLA's buffer assignment: remat, and spatial sharding.

  python -m train.bench memory [--remat_volume 96] [--shard_volume 256] [--widths 16,32,64,128]

1. Remat: peak temporary memory of a 3D U-Net train step on one device with
   and without per-block ``jax.checkpoint`` (policy ``nothing_saveable``), with
   the XLA:CPU flag that lets remat take effect (see train.planning.memory).
2. Spatial sharding: per-device temporary memory of the same step on a
   ``--shard_volume``^3 volume whose depth is split over 1, 2, 4 and 8 fake CPU
   devices (mesh axis 'space'), against one device.
Nothing runs: each step is only compiled, for abstract inputs.
"""

from __future__ import annotations

import json

from train import cli
from train.planning import memory as memory_plan

MIB = 1024**2


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m train.bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=cli.int_list, default=(16, 32, 64, 128), help="U-Net widths")
    parser.add_argument("--remat_volume", type=int, default=96)
    parser.add_argument("--shard_volume", type=int, default=256)
    parser.add_argument("--devices", type=cli.int_list, default=(1, 2, 4, 8))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    counts = list(args.devices)
    memory_plan.configure_cpu_devices(max(counts))

    from train import config as config_lib

    widths = args.widths

    def config(remat: str):
        return config_lib.preset("gpu", model="unet", model_options={"widths": widths}, remat=remat,
                                 dtype=args.dtype, deep_supervision=False)

    results = {"widths": widths, "dtype": args.dtype}
    volume = (args.remat_volume,) * 3
    plain = memory_plan.step_memory(config(""), volume, 1)
    remat = memory_plan.step_memory(config("nothing_saveable"), volume, 1)
    ratio = plain.temp_bytes / remat.temp_bytes
    print(f"## remat: U-Net {widths} train step, {volume} volume, batch 1, {args.dtype}, 1 device")
    print("| remat | temporaries MiB | total MiB |\n|---|---|---|")
    for m in (plain, remat):
        print(f"| {m.remat} | {m.temp_bytes / MIB:.0f} | {m.total_bytes / MIB:.0f} |")
    print(f"temp memory without / with remat: {ratio:.2f}x (target >= 1.5x)\n")
    results["remat"] = {"volume": volume, "none_temp": plain.temp_bytes, "remat_temp": remat.temp_bytes, "ratio": ratio}

    volume = (args.shard_volume,) * 3
    print(f"## spatial sharding: same step, {volume} volume, depth split over the 'space' axis, remat off")
    print("| devices | temporaries MiB/dev | total MiB/dev | temp vs 1 device | ideal 1/n |\n|---|---|---|---|---|")
    rows, base = [], None
    for n in counts:
        m = memory_plan.step_memory(config(""), volume, n)
        base = base or m.temp_bytes
        print(f"| {n} | {m.temp_bytes / MIB:.0f} | {m.total_bytes / MIB:.0f} | {m.temp_bytes / base:.3f} | {1 / n:.3f} |", flush=True)
        rows.append({"devices": n, "temp": m.temp_bytes, "total": m.total_bytes, "ratio": m.temp_bytes / base})
    results["sharding"] = {"volume": volume, "rows": rows}
    print(f"per-device temp at {counts[-1]} devices vs 1: {rows[-1]['ratio']:.3f}x (target <= 0.2x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
