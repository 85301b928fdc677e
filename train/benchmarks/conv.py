"""Convolution benchmark: XLA's 3D conv, acsjax's 3D and ACS convs, and PyTorch's, forward and forward+backward.

  python -m train.bench conv [--shape 2,64,64,64,32] [--out-channels 32] [--small] [--repeats 5] [--runs 3] [--json OUT]

Times, on the same input (N, D, H, W, C) float32 and a cubic kernel of size
``--kernel`` with 'same' zero padding and stride ``--stride``:

* XLA conv3d: ``lax.conv_general_dilated`` (acsjax's ``impl='xla'``);
* acsjax conv3d and ACS conv with ``--impl`` (default 'auto': the GEMM
  lowerings of ``acsjax.lowering`` on CPU, XLA's convolution on GPU/TPU);
* with PyTorch installed: ``torch.nn.functional.conv3d`` and ACSConv's
  algorithm (three conv3d calls with (1,k,k), (k,1,k), (k,k,1) kernels and a
  concatenation), on ``torch.set_num_threads(--threads)`` threads.

Forward+backward computes the output and the gradients with respect to the
input and the kernel for a fixed random output cotangent. A run times every
row ``--repeats`` times in interleaved rounds (so that a noisy machine slows
them alike) after one warm-up call each; ``--runs`` repeats that, and the
target ratios are computed per run from that run's medians and reported as
min / median / max over the runs. Table rows give the median (and the range)
of all timed calls. ``--no-xla`` skips XLA's own 3D convolution, which is
several times slower than the others and is no part of the targets.
``--clock cpu`` times with this process's CPU time (all its threads, JAX's
and PyTorch's alike) instead of wall time: on a machine shared with other
jobs it is far less noisy, and ratios of CPU times equal ratios of wall times
when both sides keep the same threads busy. GFLOP/s use each op's own
count (2 * output voxels * Cin * Cout * taps; taps = k^3 for 3D, k^2 for ACS,
so ACS has one third of the 3D FLOPs; forward+backward counts three times the
forward). The ratios at the end are those the performance targets name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from acsjax import ops
from train import cli

SMALL_SHAPE = (2, 32, 32, 32, 32)
TARGETS = {  # ratio name -> (comparison, bound)
    "acsjax 3D fwd+bwd throughput / torch Conv3d": (">=", 0.8),
    "ACS fwd+bwd time / acsjax 3D": ("<=", 0.5),
    "ACS fwd+bwd time / torch ACSConv algorithm": ("<=", 0.7),
}


def _parse_shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in text.split(","))
    if len(shape) != 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape needs 5 positive ints N,D,H,W,C, got {text!r}")
    return shape


def flops(shape, out_channels: int, kernel: int, stride: int, acs: bool) -> float:
    """Forward FLOPs (2 per multiply-add) of a 'same'-padded convolution."""
    n, d, h, w, c = shape
    voxels = n * (-(-d // stride)) * (-(-h // stride)) * (-(-w // stride))
    return 2.0 * voxels * c * out_channels * kernel ** (2 if acs else 3)


def jax_cases(shape, out_channels: int, kernel: int, stride: int, impl: str, xla: bool = True) -> dict:
    """name -> (callable running once and blocking, forward FLOPs) for the JAX rows (XLA's own conv if ``xla``)."""
    rng = np.random.default_rng(0)
    c = shape[-1]
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    k3 = jnp.asarray(rng.normal(size=(kernel,) * 3 + (c, out_channels)) / np.sqrt(c * kernel**3), jnp.float32)
    k2 = jnp.asarray(rng.normal(size=(kernel,) * 2 + (c, out_channels)) / np.sqrt(c * kernel**2), jnp.float32)
    same = dict(padding="SAME", strides=stride)
    ops_ = {
        "XLA conv3d": (lambda x, k: ops.conv(x, k, impl="xla", **same), k3, False),
        f"acsjax conv3d ({impl})": (lambda x, k: ops.conv(x, k, impl=impl, **same), k3, False),
        f"acsjax ACS ({impl})": (lambda x, k: ops.acs_conv(x, k, impl=impl, **same), k2, True),
    }
    if not xla:
        del ops_["XLA conv3d"]
    cases = {}
    for name, (fn, k, acs) in ops_.items():
        fwd = jax.jit(fn)
        ct = jnp.asarray(rng.normal(size=jax.eval_shape(fn, x, k).shape), jnp.float32)
        # Output, input gradient and kernel gradient for a fixed cotangent.
        both = jax.jit(lambda x, k, ct, fn=fn: jax.value_and_grad(lambda x, k: jnp.vdot(fn(x, k), ct), (0, 1))(x, k))
        f = flops(shape, out_channels, kernel, stride, acs)
        cases[f"{name} fwd"] = (lambda fwd=fwd, k=k: jax.block_until_ready(fwd(x, k)), f)
        cases[f"{name} fwd+bwd"] = (lambda both=both, k=k, ct=ct: jax.block_until_ready(both(x, k, ct)), 3 * f)
    return cases


def torch_cases(shape, out_channels: int, kernel: int, stride: int, threads: int) -> dict:
    """The PyTorch rows: F.conv3d, and ACSConv's algorithm reimplemented (three conv3d + cat)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n, d, h, w, c = shape
    x = torch.randn(n, c, d, h, w, requires_grad=True)
    k3 = torch.randn(out_channels, c, kernel, kernel, kernel, requires_grad=True)
    split = ops.acs_kernel_split(out_channels)
    p = kernel // 2
    # ACSConv: a 2D kernel's output groups unsqueezed to (1,k,k), (k,1,k), (k,k,1).
    acs_kernels = [
        torch.randn(size, c, *shape_, requires_grad=True)
        for size, shape_ in zip(split, [(1, kernel, kernel), (kernel, 1, kernel), (kernel, kernel, 1)])
        if size
    ]
    acs_pads = [pad for size, pad in zip(split, [(0, p, p), (p, 0, p), (p, p, 0)]) if size]

    def conv3d():
        return F.conv3d(x, k3, stride=stride, padding=p)

    def acs():
        return torch.cat([F.conv3d(x, k, stride=stride, padding=pad) for k, pad in zip(acs_kernels, acs_pads)], 1)

    def run_fwd(fn):
        with torch.no_grad():
            fn()

    def run_both(fn, ct):
        x.grad = None
        fn().backward(ct)

    cases = {}
    for name, fn, acs_ in [("torch conv3d", conv3d, False), ("torch ACSConv algorithm", acs, True)]:
        with torch.no_grad():
            ct = torch.randn_like(fn())
        f = flops(shape, out_channels, kernel, stride, acs_)
        cases[f"{name} fwd"] = (lambda fn=fn: run_fwd(fn), f)
        cases[f"{name} fwd+bwd"] = (lambda fn=fn, ct=ct: run_both(fn, ct), 3 * f)
    return cases


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(cases: dict, repeats: int, warm_up: bool = True, clock: str = "wall") -> dict:
    """name -> list of seconds: one warm-up call each (if ``warm_up``), then ``repeats`` interleaved rounds."""
    for run, _ in cases.values() if warm_up else ():
        run()
    now = CLOCKS[clock]
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (run, _) in cases.items():
            start = now()
            run()
            times[name].append(now() - start)
    return times


def ratios(median: dict, impl: str) -> dict:
    """The target ratios from the medians (those whose rows exist)."""
    ours, acs = median.get(f"acsjax conv3d ({impl}) fwd+bwd"), median.get(f"acsjax ACS ({impl}) fwd+bwd")
    torch3d, torch_acs = median.get("torch conv3d fwd+bwd"), median.get("torch ACSConv algorithm fwd+bwd")
    out = {}
    if ours and torch3d:
        out["acsjax 3D fwd+bwd throughput / torch Conv3d"] = torch3d / ours
    if ours and acs:
        out["ACS fwd+bwd time / acsjax 3D"] = acs / ours
    if acs and torch_acs:
        out["ACS fwd+bwd time / torch ACSConv algorithm"] = acs / torch_acs
    return out


def spread(values) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m train.bench conv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=_parse_shape, default=(2, 64, 64, 64, 32), help="N,D,H,W,C")
    parser.add_argument("--small", action="store_true", help=f"use the shape {','.join(map(str, SMALL_SHAPE))}")
    parser.add_argument("--out-channels", type=int, default=0, help="default: C")
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--impl", default="auto", choices=ops.CONV_IMPLS, help="acsjax lowering for its rows")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row and run")
    parser.add_argument("--runs", type=int, default=1, help="runs; the ratios' min/median/max are over runs")
    parser.add_argument("--no-xla", action="store_true", help="skip XLA's own (slow) 3D convolution rows")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS), help="wall time or process CPU time")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch threads")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.runs < 1:
        parser.error("--repeats and --runs must be >= 1")
    shape = SMALL_SHAPE if args.small else args.shape
    cout = args.out_channels or shape[-1]
    device = jax.devices()[0]
    print(
        f"conv {shape} {shape[-1]}->{cout} k={args.kernel} stride={args.stride} float32, jax {jax.__version__} "
        f"on {device.device_kind} ({jax.default_backend()}), {os.cpu_count()} cores, "
        f"acsjax impl={args.impl} -> {ops.resolve_impl(args.impl, 3)}"
    )
    cases = jax_cases(shape, cout, args.kernel, args.stride, args.impl, xla=not args.no_xla)
    if not args.no_torch:
        try:
            cases.update(torch_cases(shape, cout, args.kernel, args.stride, args.threads))
            import torch

            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        except ImportError:
            print("(PyTorch not installed: no PyTorch rows)")
    times = {name: [] for name in cases}
    per_run = []  # the target ratios of each run
    for run in range(args.runs):
        run_times = measure(cases, args.repeats, warm_up=run == 0, clock=args.clock)
        for name, t in run_times.items():
            times[name] += t
        per_run.append(ratios({name: statistics.median(t) for name, t in run_times.items()}, args.impl))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.runs} run(s) x {args.repeats} interleaved calls per row, {args.clock} clock")
    print(f"| op | pass | median {args.clock} ms | min-max ms | GFLOP/s |\n|---|---|---|---|---|")
    for name, (_, fl) in cases.items():
        op, kind = name.rsplit(" ", 1)
        t = times[name]
        print(f"| {op} | {kind} | {median[name] * 1e3:.1f} | {min(t) * 1e3:.0f}-{max(t) * 1e3:.0f} | {fl / median[name] / 1e9:.1f} |")
    found = {name: spread([r[name] for r in per_run]) for name in per_run[0]}
    print("| ratio | min | median | max | target |\n|---|---|---|---|---|")
    for name, (lo, mid, hi) in found.items():
        cmp, bound = TARGETS[name]
        # A target holds when it holds in every run: the worst run decides.
        met = lo >= bound if cmp == ">=" else hi <= bound
        print(f"| {name} | {lo:.2f}x | {mid:.2f}x | {hi:.2f}x | {cmp} {bound}x: {'met' if met else 'missed'} |")
    if args.json:
        result = {
            "shape": shape, "out_channels": cout, "kernel": args.kernel, "stride": args.stride, "impl": args.impl,
            "device": device.device_kind, "backend": jax.default_backend(), "cores": os.cpu_count(),
            "machine": platform.machine(), "jax": jax.__version__,
            "rows": {name: {"median_s": median[name], "times_s": times[name], "gflops": cases[name][1] / median[name] / 1e9}
                     for name in cases},
            "runs": args.runs, "repeats": args.repeats, "clock": args.clock,
            "ratios": {name: dict(zip(("min", "median", "max"), v)) for name, v in found.items()},
            "ratios_per_run": per_run,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
