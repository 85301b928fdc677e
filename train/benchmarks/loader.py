"""Input pipeline throughput: training patches per second from the synthetic source.

    python -m train.benchmarks.loader [--patch 64] [--batch 2] [--workers 0,2]
    python -m train.benchmarks.loader --shuffle-cost 4,30,300

Times ``--batches`` batches after a warm-up of ``--warmup`` batches (which
absorbs worker start-up and the first generation of each phantom), for each
worker count, and prints one line per count. ``--shuffle-cost`` instead times
one element lookup through grain's ``shuffle().repeat()`` and through the
pipeline's :class:`~train.data.pipeline.EpochShuffle` for data sets of the
given sizes.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import grain

from train import cli
from train.data.pipeline import EpochShuffle, make_iterator, patch_dataset
from train.data.synthetic import SyntheticSource


def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m train.bench loader", description=__doc__.splitlines()[0])
    p.add_argument("--patch", type=int, default=64, help="cubic patch side")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=96, help="cubic synthetic volume side")
    p.add_argument("--cases", type=int, default=8, help="synthetic training cases")
    p.add_argument("--workers", type=cli.int_list, default=(0, 2), help="comma-separated worker counts")
    p.add_argument("--threads", type=int, default=2, help="read threads per process")
    p.add_argument("--warmup", type=int, default=48, help="untimed batches first")
    p.add_argument("--batches", type=int, default=100, help="timed batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle-cost", type=cli.int_list, default=(), metavar="SIZES",
                   help="comma-separated data set sizes: time shuffled index lookups instead")
    return p


def shuffle_cost(n: int, lookups: int = 300) -> tuple[float, float]:
    """Milliseconds per element: grain's shuffle().repeat() and EpochShuffle over n elements."""
    base = grain.MapDataset.range(n)
    rates = []
    for ds in (base.shuffle(seed=0).repeat(None), EpochShuffle(base, seed=0)):
        ds[0]
        start = time.perf_counter()
        for i in range(lookups):
            ds[i]
        rates.append((time.perf_counter() - start) / lookups * 1e3)
    return rates[0], rates[1]


def measure(workers: int, args: argparse.Namespace) -> float:
    """Patches per second with ``workers`` loader processes."""
    source = SyntheticSource("train", seed=args.seed, size=args.size, num_cases=args.cases)
    ds = patch_dataset(source, patch=args.patch, batch=args.batch, seed=args.seed, threads=args.threads)
    it = make_iterator(ds, workers)
    try:
        for _ in range(args.warmup):
            next(it)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        elapsed = time.perf_counter() - start
    finally:
        if hasattr(it, "close"):
            it.close()
    return args.batches * args.batch / elapsed


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; ``argv`` excludes the program name."""
    args = _parser().parse_args(argv)
    if args.shuffle_cost:
        for n in args.shuffle_cost:
            grain_ms, epoch_ms = shuffle_cost(n)
            print(f"{n} cases: grain shuffle().repeat() {grain_ms:.3f} ms/element, "
                  f"EpochShuffle {epoch_ms:.3f} ms/element")
        return 0
    counts = list(args.workers)
    print(f"loader: synthetic {args.size}^3 x {args.cases} cases, patch {args.patch}^3, batch {args.batch}, "
          f"{args.threads} read threads, {args.batches} timed batches after {args.warmup}")
    for workers in counts:
        rate = measure(workers, args)
        print(f"workers={workers}: {rate:.1f} patches/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
