"""Accelerator benchmark in one call: convolutions (fwd+bwd) and the U-Net train step, 3D against ACS.

  python -m train.bench gpu [--out gpu.json] [--repeats 10] [--patch 128] [--no-torch]
  python -m train.bench gpu --tiny      # the same code path on tiny shapes, a few seconds on CPU

Convolutions, forward + backward (gradients of input and kernel for a fixed
output cotangent), 'same' padding, k = 3, C -> C channels, in bfloat16 and
float32, at (2, 64, 64, 64, 32) and (2, 64, 64, 64, 128):

* acsjax 3D: ``acsjax.ops.conv`` with the default lowering (XLA's
  convolution, i.e. cuDNN, on GPU);
* acsjax ACS: ``acsjax.ops.acs_conv``;
* acsjax SoftACS: ``acsjax.ops.soft_acs_conv`` where this acsjax has it;
* PyTorch (where installed): ``F.conv3d`` and ACSConv's algorithm (three
  ``conv3d`` calls with (1,k,k), (k,1,k), (k,k,1) kernels and a concatenation),
  on cuDNN with ``cudnn.benchmark`` on an accelerator.

Train step: the U-Net at the gpu preset's widths (instance norm, no deep
supervision, no remat), batch 2, ``--patch`` cubed, bfloat16 compute with
float32 parameters: forward, Dice + cross-entropy, backward and AdamW, for
3D, ACS (and SoftACS where the models have it). This step is built here from
``acsjax.models`` and ``train.losses`` (not the trainer, whose checkpointing
needs grain), so the benchmark needs only JAX, Flax, optax and, optionally,
PyTorch.

Every case is compiled once and timed ``--repeats`` times after a warm-up;
the table gives the median and the spread. TFLOP/s count each op's own
FLOPs (2 per multiply-add; ACS one third of the 3D count; SoftACS runs as one
3D convolution and is counted as one); the train step's FLOPs come from XLA's
cost analysis of the compiled 3D step, the same count for every row, so its
TFLOP/s compare time directly. Ratios are of times in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from acsjax import ops

SHAPES = ((2, 64, 64, 64, 32), (2, 64, 64, 64, 128))
TINY_SHAPES = ((1, 8, 8, 8, 6),)
DTYPES = ("bfloat16", "float32")
TINY_WIDTHS = (6, 12)
KERNEL = 3
# Rows whose failure is logged and skipped rather than ending the run.
OPTIONAL = ("acsjax SoftACS",)


def conv_flops(shape, kind: str) -> float:
    """Forward + backward FLOPs (3x the forward) of a 'same' C -> C convolution of ``kind``."""
    n, d, h, w, c = shape
    taps = KERNEL**2 if kind == "acs" else KERNEL**3
    return 3 * 2.0 * n * d * h * w * c * c * taps


def _timed(run: Callable[[], None], repeats: int) -> list[float]:
    run()  # compilation, autotuning, warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def jax_conv_cases(shape, dtype: str) -> dict:
    """name -> (run once and block, kind for the FLOP count) for acsjax's convolutions."""
    rng = np.random.default_rng(0)
    c = shape[-1]
    dt = jnp.dtype(dtype)
    x = jnp.asarray(rng.normal(size=shape), dt)
    k3 = jnp.asarray(rng.normal(size=(KERNEL,) * 3 + (c, c)) / np.sqrt(c * KERNEL**3), dt)
    k2 = jnp.asarray(rng.normal(size=(KERNEL,) * 2 + (c, c)) / np.sqrt(c * KERNEL**2), dt)
    ct = jnp.asarray(rng.normal(size=shape), dt)
    fns = {
        "acsjax 3D": (lambda x, p: ops.conv(x, p[0], padding="SAME"), (k3,), "3d"),
        "acsjax ACS": (lambda x, p: ops.acs_conv(x, p[0], padding="SAME"), (k2,), "acs"),
    }
    soft = getattr(ops, "soft_acs_conv", None)
    if soft is not None:
        logits = jnp.asarray(rng.normal(size=(c, 3)), jnp.float32)
        fns["acsjax SoftACS"] = (lambda x, p: soft(x, p[0], p[1], padding="SAME"), (k2, logits), "3d")
    cases = {}
    for name, (fn, params, kind) in fns.items():
        both = jax.jit(
            lambda x, p, fn=fn: jax.value_and_grad(lambda x, p: jnp.vdot(fn(x, p), ct).astype(jnp.float32), (0, 1))(x, p)
        )
        cases[name] = (lambda both=both, params=params: jax.block_until_ready(both(x, params)), kind)
    return cases


def torch_conv_cases(shape, dtype: str) -> dict:
    """PyTorch's Conv3d and ACSConv's algorithm, on CUDA (cuDNN) when available, else CPU."""
    import torch
    import torch.nn.functional as F

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        # Autotuned algorithms; float32 keeps each library's default precision (TF32 where it allows it).
        torch.backends.cudnn.benchmark = True
    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, d, h, w, c = shape
    make = lambda *s: torch.randn(*s, generator=gen).to(dev, dt).requires_grad_(True)  # noqa: E731
    x = make(n, c, d, h, w)
    k3 = make(c, c, KERNEL, KERNEL, KERNEL)
    split = ops.acs_kernel_split(c)
    p = KERNEL // 2
    views = [(1, KERNEL, KERNEL), (KERNEL, 1, KERNEL), (KERNEL, KERNEL, 1)]
    pads = [(0, p, p), (p, 0, p), (p, p, 0)]
    acs_kernels = [(make(size, c, *v), pad) for size, v, pad in zip(split, views, pads) if size]
    ct = torch.randn(n, c, d, h, w, generator=gen).to(dev, dt)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    leaves = [x, k3] + [k for k, _ in acs_kernels]

    def step(fn):
        def run():
            for t in leaves:
                t.grad = None
            fn().backward(ct)
            sync()

        return run

    return {
        "PyTorch Conv3d": (step(lambda: F.conv3d(x, k3, padding=p)), "3d"),
        "PyTorch ACSConv algorithm": (
            step(lambda: torch.cat([F.conv3d(x, k, padding=pad) for k, pad in acs_kernels], 1)),
            "acs",
        ),
    }


def unet_step(dims, widths, patch, batch: int, dtype: str):
    """(run once and block, FLOPs from XLA's cost analysis) of one U-Net train step with AdamW."""
    import optax
    from flax import nnx

    from acsjax.models import build_model
    from train import losses

    model = build_model(
        "unet", dims=dims, in_channels=1, num_classes=3, rngs=nnx.Rngs(0),
        widths=tuple(widths), norm="instance", dtype=jnp.dtype(dtype),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3, weight_decay=1e-5)
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=(batch, *patch, 1)), jnp.float32)
    label = jnp.asarray(rng.integers(0, 3, size=(batch, *patch)), jnp.int32)

    def loss_fn(params, rest):
        out = nnx.merge(graphdef, params, rest)(image)
        return losses.segmentation_loss(out, label, 3)[0]

    def train_step(state):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, rest)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    state0 = (params, tx.init(params))
    compiled = jax.jit(train_step, donate_argnums=0).lower(state0).compile()
    # FLOPs of the step traced with XLA's own convolutions: on CPU the GEMM lowering scans over depth, and XLA's
    # cost analysis counts a loop body once (see train.benchmarks.step.step_flops).
    with ops.use_conv_impl("xla"):
        cost = jax.jit(train_step).lower(state0).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    holder = {"state": state0}

    def run():
        holder["state"], loss = compiled(holder["state"])
        jax.block_until_ready(loss)

    return run, float((cost or {}).get("flops", 0.0))


def _stats(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3}


def run_convs(shapes, dtypes, repeats: int, use_torch: bool, log) -> list[dict]:
    """One row per (shape, dtype, op): times and TFLOP/s; each shape and dtype compiled once."""
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            cases = jax_conv_cases(shape, dtype)
            if use_torch:
                cases.update(torch_conv_cases(shape, dtype))
            for name, (run, kind) in cases.items():
                try:
                    times = _timed(run, repeats)
                except Exception as err:  # noqa: BLE001
                    if name not in OPTIONAL:
                        raise
                    log(f"  {name} {shape} {dtype}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
                    continue
                row = {"shape": list(shape), "dtype": dtype, "op": name, **_stats(times)}
                row["tflops"] = conv_flops(shape, kind) / row["median_ms"] / 1e9
                rows.append(row)
                log(f"  {name} {shape} {dtype}: {row['median_ms']:.2f} ms")
    return rows


def conv_ratios(rows: list[dict]) -> list[dict]:
    """Per shape and dtype: ACS / 3D time, SoftACS / 3D, ACS / PyTorch ACSConv, acsjax 3D / PyTorch Conv3d."""
    pairs = [
        ("ACS / acsjax 3D", "acsjax ACS", "acsjax 3D"),
        ("SoftACS / acsjax 3D", "acsjax SoftACS", "acsjax 3D"),
        ("ACS / PyTorch ACSConv algorithm", "acsjax ACS", "PyTorch ACSConv algorithm"),
        ("acsjax 3D / PyTorch Conv3d", "acsjax 3D", "PyTorch Conv3d"),
    ]
    out = []
    keys = dict.fromkeys((tuple(r["shape"]), r["dtype"]) for r in rows)
    for shape, dtype in keys:
        t = {r["op"]: r["median_ms"] for r in rows if (tuple(r["shape"]), r["dtype"]) == (shape, dtype)}
        for name, a, b in pairs:
            if a in t and b in t:
                out.append({"shape": list(shape), "dtype": dtype, "ratio": name, "time_ratio": t[a] / t[b]})
    return out


def run_steps(all_dims, widths, patch, batch: int, dtype: str, repeats: int, log) -> list[dict]:
    rows, flops3d = [], 0.0
    for dims in all_dims:
        try:
            run, flops = unet_step(dims, widths, patch, batch, dtype)
        except Exception as err:  # noqa: BLE001
            if dims in (3, "acs"):
                raise
            # An optional model (SoftACS) that fails to build must not cost the whole run.
            log(f"  U-Net step {dims}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
            continue
        flops3d = flops3d or flops
        row = {"dims": str(dims), "widths": list(widths), "patch": list(patch), "batch": batch, "dtype": dtype}
        row.update(_stats(_timed(run, repeats)), flops=flops)
        rows.append(row)
        log(f"  U-Net step {dims}: {row['median_ms']:.2f} ms")
    for row in rows:
        row["tflops_3d_equiv"] = flops3d / row["median_ms"] / 1e9
        row["vs_3d"] = row["median_ms"] / rows[0]["median_ms"]
    return rows


def markdown(result: dict) -> str:
    lines = [f"device: {result['device']} ({result['backend']}), jax {result['jax']}, torch {result['torch'] or '-'}", ""]
    lines += ["| shape | dtype | op | fwd+bwd ms (median) | min-max ms | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in result["conv"]:
        lines.append(
            f"| {tuple(r['shape'])} | {r['dtype']} | {r['op']} | {r['median_ms']:.2f} | "
            f"{r['min_ms']:.2f}-{r['max_ms']:.2f} | {r['tflops']:.3g} |"
        )
    lines += ["", "| shape | dtype | time ratio | value |", "|---|---|---|---|"]
    for r in result["conv_ratios"]:
        lines.append(f"| {tuple(r['shape'])} | {r['dtype']} | {r['ratio']} | {r['time_ratio']:.2f}x |")
    lines += ["", "| U-Net step | widths | batch x patch | dtype | ms (median) | min-max ms | TFLOP/s (3D FLOPs) | vs 3D |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["step"]:
        lines.append(
            f"| {r['dims']} | {tuple(r['widths'])} | {r['batch']} x {tuple(r['patch'])} | {r['dtype']} | "
            f"{r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {r['tflops_3d_equiv']:.3g} | {r['vs_3d']:.2f}x |"
        )
    return "\n".join(lines)


def _torch_version(wanted: bool) -> str | None:
    if not wanted:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def step_dims() -> list:
    """3D, ACS, and SoftACS where the models support it."""
    from acsjax import layers

    return [3, "acs"] + (["soft_acs"] if "soft_acs" in getattr(layers, "DIMS", ()) else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the code path on CPU in seconds)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--patch", type=int, default=128, help="U-Net step patch edge (cubed)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--widths", default="", help="U-Net widths (default: the gpu preset's)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    parser.add_argument("--no-step", action="store_true", help="skip the U-Net train step")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.patch < 1 or args.batch < 1:
        parser.error("--repeats, --patch and --batch must be >= 1")
    if args.widths:
        try:
            widths = tuple(int(w) for w in args.widths.split(","))
        except ValueError:
            parser.error(f"--widths: comma-separated ints expected, got {args.widths!r}")
    else:
        from train import config as config_lib

        widths = tuple(config_lib.PRESETS["gpu"].model_options["widths"])
    if args.tiny:
        shapes, widths, patch, repeats = TINY_SHAPES, TINY_WIDTHS, (8,) * 3, min(args.repeats, 2)
    else:
        shapes, patch, repeats = SHAPES, (args.patch,) * 3, args.repeats
    torch_version = _torch_version(not args.no_torch)
    device = jax.devices()[0]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"benchmark on {device.device_kind} ({jax.default_backend()}); torch: {torch_version or 'not used'}")
    # --tiny takes XLA's convolutions, the lowering 'auto' picks on a GPU (and the quickest to compile on CPU).
    with ops.use_conv_impl("xla" if args.tiny else ops.get_conv_impl()):
        conv_rows = run_convs(shapes, DTYPES, repeats, torch_version is not None, log)
        step_rows = [] if args.no_step else run_steps(step_dims(), widths, patch, args.batch, "bfloat16", repeats, log)
    result = {
        "device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
        "torch": torch_version, "machine": platform.machine(), "repeats": repeats,
        "conv": conv_rows, "conv_ratios": conv_ratios(conv_rows), "step": step_rows,
    }
    print(markdown(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
