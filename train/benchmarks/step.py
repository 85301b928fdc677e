"""3D U-Net train-step throughput: acsjax (each conv lowering) against the same network in PyTorch.

  python -m train.bench step [--patch 64] [--batch 2] [--widths 16,32,64,128] [--init scale,acs] [--repeats 5] [--runs 3]
                             [--scan_unroll 1,2] [--profile DIR [--profile_by kind|shape]]

One step = forward, Dice + cross-entropy loss, backward and an AdamW update,
on random (batch, patch^3, 1) inputs with 3 classes. Reports the median step
time, voxels/s and achieved GFLOP/s (FLOPs from XLA's cost analysis of the
step with XLA's own convolutions, the same count used for the PyTorch column), and on an
accelerator the model FLOP utilisation against ``--peak_tflops``.

``--init`` may list several initialisations (``scale,acs``: the 3D and the
ACS U-Net). All steps are compiled first, then timed in interleaved rounds;
each of ``--runs`` runs gives every later init's step time over the first
init's (same lowering), reported as min / median / max over the runs.
``--scan_unroll`` may list several counts of depth slices per iteration of
the GEMM lowering's scans (:data:`acsjax.lowering.SCAN_UNROLL`); each later
count's step time is then reported over the first's, in the same way.

``--profile DIR`` then traces ``--repeats`` more calls of the first acsjax
step with the JAX profiler and prints the time per kind of XLA operation
(:mod:`train.benchmarks._optime`): what to attack to make the step faster.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import numpy as np

from train import cli
from train import config as config_lib
from train import init, trainer
from train.benchmarks import _optime as optime


def _rounds(fns: dict, repeats: int) -> dict:
    """name -> ``repeats`` seconds per call, the calls interleaved round by round."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def jax_step(config, batch_size: int, patch, impl: str | None, scan_unroll: int | None = None):
    """(run_once, HLO text) for the trainer's jitted step with the conv lowering ``impl``.

    ``scan_unroll`` (the GEMM lowering's depth slices per scan iteration) holds while the step is traced.
    """
    from acsjax import lowering, ops

    if impl is not None:
        ops.set_conv_impl(impl)
    if scan_unroll is not None:
        previous, lowering.SCAN_UNROLL = lowering.SCAN_UNROLL, scan_unroll
        try:
            return jax_step(config, batch_size, patch, impl)
        finally:
            lowering.SCAN_UNROLL = previous
    mesh, task, batch = _step_inputs(config, batch_size, patch)
    with jax.set_mesh(mesh):
        compiled = trainer.make_step(task).lower(task.abstract_state, batch).compile()
        state = {"s": task.init()}

    def run():
        with jax.set_mesh(mesh):
            state["s"], metrics = compiled(state["s"], batch)
            jax.block_until_ready(metrics["loss"])

    return run, compiled.as_text()


def _step_inputs(config, batch_size: int, patch):
    """(mesh, task, batch) of the trainer's step on one device, 3 classes, random data."""
    mesh = trainer.make_mesh("data=1,space=1", devices=jax.devices()[:1])
    build = init.model_fn(config, in_channels=1, num_classes=3, dims=config.model_dims)
    schedule = trainer.make_schedule(config.lr, 1000, 10)
    tx = trainer.make_optimizer(schedule, weight_decay=config.weight_decay, grad_clip=config.grad_clip)
    task = trainer.make_task(build, tx, schedule, 3, mesh)
    rng = np.random.default_rng(0)
    batch = trainer.shard_batch(
        {
            "image": rng.normal(size=(batch_size, *patch, 1)).astype(np.float32),
            "label": rng.integers(0, 3, size=(batch_size, *patch)).astype(np.int32),
        },
        mesh,
    )
    return mesh, task, batch


def step_flops(config, batch_size: int, patch) -> float:
    """FLOPs of one train step, from XLA's cost analysis of the step traced with XLA's own convolutions.

    The analysis counts a loop body once, whatever its trip count, so the GEMM lowering's scans over depth
    would be undercounted; the step is only traced and lowered here, not compiled.
    """
    from acsjax import ops

    mesh, task, batch = _step_inputs(config, batch_size, patch)
    with jax.set_mesh(mesh), ops.use_conv_impl("xla"):
        cost = trainer.make_step(task).lower(task.abstract_state, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def torch_step(widths, batch_size: int, patch, threads: int):
    """run_once for the same U-Net (instance norm, leaky ReLU, strided convs, nearest upsampling) in PyTorch."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(threads)

    def unit(cin, cout, stride=1):
        return [nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01)]

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, cin = nn.ModuleList(), 1
            for i, w in enumerate(widths):
                self.enc.append(nn.Sequential(*unit(cin, w, 1 if i == 0 else 2), *unit(w, w)))
                cin = w
            self.dec = nn.ModuleList()
            for w_skip in reversed(widths[:-1]):
                self.dec.append(nn.Sequential(*unit(cin + w_skip, w_skip), *unit(w_skip, w_skip)))
                cin = w_skip
            self.head = nn.Conv3d(cin, 3, 1)

        def forward(self, x):
            skips = []
            for level in self.enc:
                x = level(x)
                skips.append(x)
            skips.pop()
            for block in self.dec:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
                x = block(torch.cat([x, skips.pop()], 1))
            return self.head(x)

    model = UNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 1, *patch)
    y = torch.randint(0, 3, (batch_size, *patch))

    def run():
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        probs = logits.softmax(1)
        onehot = F.one_hot(y, 3).permute(0, 4, 1, 2, 3).float()
        inter = (probs * onehot).sum((0, 2, 3, 4))
        dice = (2 * inter + 1e-5) / (probs.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4)) + 1e-5)
        loss = F.cross_entropy(logits, y) + 1 - dice[1:].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return run


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m train.bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", default="64")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--widths", type=cli.int_list, default=(16, 32, 64, 128))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--init", default="scale",
                        help="comma-separated: scale/center/average/scratch: 3D; acs: ACS model; ratios vs the first")
    parser.add_argument("--impls", default="xla,auto", help="acsjax conv lowerings to time")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per step and run")
    parser.add_argument("--runs", type=int, default=1, help="runs; the ratios' min/median/max are over runs")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (e.g. 989 for H100 bf16 dense)")
    parser.add_argument("--scan_unroll", type=cli.int_list, default=None,
                        help="comma-separated depth slices per scan iteration of the GEMM lowering to compare "
                             "(default: the library's)")
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--json", default="")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="also trace the first acsjax step with the JAX profiler into DIR and print where its time "
                             "goes, per kind of XLA operation")
    parser.add_argument("--profile_by", default="kind", choices=("kind", "shape"),
                        help="group the profile's operations by kind (fusion, copy, ...) or by output shape")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.runs < 1:
        parser.error("--repeats and --runs must be >= 1")
    unrolls = tuple(args.scan_unroll) if args.scan_unroll else (None,)
    if any(u is not None and u < 1 for u in unrolls):
        parser.error("--scan_unroll: every count must be >= 1")
    patch = config_lib.parse_patch(args.patch)
    widths = tuple(args.widths)
    inits = args.init.split(",")
    try:
        configs = {
            name: config_lib.preset("gpu", model="unet", model_options={"widths": widths, "norm": "instance"},
                                    dtype=args.dtype, remat="", deep_supervision=False, init=name)
            for name in inits
        }
        for config in configs.values():
            config.model_dims  # noqa: B018 (an unknown init fails here)
    except (KeyError, ValueError, config_lib.ConfigError) as err:
        parser.error(f"--init: {err}")
    voxels = args.batch * int(np.prod(patch))
    threads = os.cpu_count() or 1
    device = jax.devices()[0]
    dims = ", ".join(f"{name}: {c.model_dims}" for name, c in configs.items())
    print(f"U-Net {widths} ({dims}) train step, batch {args.batch} x {patch}, {args.dtype}, "
          f"device {device.device_kind} ({jax.default_backend()}), {threads} threads")
    # The FLOPs depend on the network, not on how its convolutions are lowered: counted once per init.
    config_flops = {name: step_flops(config, args.batch, patch) for name, config in configs.items()}
    fns, flops, hlo = {}, {}, {}
    for impl in args.impls.split(","):
        for name, config in configs.items():
            for unroll in unrolls:
                key = _row_name(impl, name, config.model_dims, unroll, len(inits) > 1, len(unrolls) > 1)
                fns[key], hlo[key] = jax_step(config, args.batch, patch, impl, unroll)
                flops[key] = config_flops[name]
    want_torch = not args.no_torch and args.dtype == "float32" and any(c.model_dims == 3 for c in configs.values())
    if want_torch:
        try:
            fns["PyTorch"] = torch_step(widths, args.batch, patch, threads)
        except ImportError:
            print("(PyTorch not installed: no PyTorch column)")
    for fn in fns.values():
        fn()  # warm-up (compilation is done)
    times = {name: [] for name in fns}
    per_run = []
    for _ in range(args.runs):
        run_times = _rounds(fns, args.repeats)
        for name, t in run_times.items():
            times[name] += t
        per_run.append(_ratios({n: statistics.median(t) for n, t in run_times.items()}, args.impls, configs, unrolls))
    rows = {name: statistics.median(t) for name, t in times.items()}
    torch_s = rows.get("PyTorch")
    print(f"{args.runs} run(s) x {args.repeats} interleaved steps per row")
    print("| implementation | step ms | min-max ms | Mvoxels/s | GFLOP/s | vs PyTorch |\n|---|---|---|---|---|---|")
    ref_flops = next(iter(flops.values()))
    for name, seconds in rows.items():
        ratio = f"{torch_s / seconds:.2f}x" if torch_s else "-"
        t = times[name]
        print(f"| {name} | {seconds * 1e3:.0f} | {min(t) * 1e3:.0f}-{max(t) * 1e3:.0f} | {voxels / seconds / 1e6:.2f} | "
              f"{flops.get(name, ref_flops) / seconds / 1e9:.1f} | {ratio} |")
    spread = {}
    if per_run and per_run[0]:
        print("| step time ratio | min | median | max |\n|---|---|---|---|")
        for name in per_run[0]:
            values = [r[name] for r in per_run]
            spread[name] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
            print(f"| {name} | {min(values):.2f}x | {statistics.median(values):.2f}x | {max(values):.2f}x |")
    if args.peak_tflops:
        best = min(v for k, v in rows.items() if k.startswith("acsjax"))
        print(f"MFU: {ref_flops / best / 1e12 / args.peak_tflops:.1%} of {args.peak_tflops:g} TFLOP/s")
    if args.profile:
        name = next(iter(hlo))
        try:
            ops = optime.profile(fns[name], hlo[name], args.repeats, args.profile, by=args.profile_by)
        except (ValueError, FileNotFoundError) as err:  # a backend whose trace names other events
            print(f"error: --profile: {err}", file=sys.stderr)
            return 2
        print(f"Where {name}'s step time goes ({args.repeats} traced steps; times summed over threads, "
              f"trace in {args.profile}):")
        print(optime.markdown(ops))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "times": times, "flops": flops, "voxels": voxels, "device": device.device_kind,
                       "runs": args.runs, "ratios": spread, "ratios_per_run": per_run}, f, indent=2)
    return 0


def _row_name(impl: str, init_name: str, dims, unroll, several_inits: bool, several_unrolls: bool) -> str:
    name = f"acsjax ({impl})"
    if several_inits:
        name += f" {init_name} ({dims})"
    if several_unrolls:
        name += f" unroll {unroll}"
    return name


def _ratios(median: dict, impls: str, configs: dict, unrolls: tuple) -> dict:
    """Per lowering: every later init's step time over the first init's, and every later unroll's over the first's."""
    names = list(configs)
    key = lambda impl, n, u: _row_name(impl, n, configs[n].model_dims, u, len(names) > 1, len(unrolls) > 1)  # noqa: E731
    out = {}
    for impl in impls.split(","):
        for name in names[1:]:
            out[f"{impl}: {name} / {names[0]}"] = median[key(impl, name, unrolls[0])] / median[key(impl, names[0], unrolls[0])]
        for unroll in unrolls[1:]:
            for name in names:
                label = f"{impl}: unroll {unroll} / {unrolls[0]}" + (f" ({name})" if len(names) > 1 else "")
                out[label] = median[key(impl, name, unroll)] / median[key(impl, name, unrolls[0])]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
