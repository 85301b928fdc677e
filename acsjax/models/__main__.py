"""Prints the parameter count of every model for dims 2, 3, 'acs', 'soft_acs' and '2.5d' (a Markdown table).

Usage: ``python -m acsjax.models [--in-channels N] [--num-classes N] [--models a,b]``. Models are
built abstractly (``nnx.eval_shape``), so nothing is initialised or allocated.
"""

from __future__ import annotations

import argparse

from flax import nnx

from acsjax.layers import DIMS
from acsjax.models import MODELS, build_model, param_count


def count_table(in_channels: int = 1, num_classes: int = 2, names=None) -> list[tuple[str, dict]]:
    """[(model name, {dims: parameter count})] for ``names`` (default: every registered model)."""
    rows = []
    for name in names or MODELS:
        counts = {}
        for dims in DIMS:
            model = nnx.eval_shape(
                lambda: build_model(name, dims=dims, in_channels=in_channels, num_classes=num_classes, rngs=nnx.Rngs(0))
            )
            counts[dims] = param_count(model)
        rows.append((name, counts))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m acsjax.models", description=__doc__.splitlines()[0])
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--models", default="", help="comma-separated model names (default: all)")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    rows = count_table(args.in_channels, args.num_classes, names)
    print(f"Parameters (in_channels={args.in_channels}, num_classes={args.num_classes}):\n")
    print("| model | 2D | 3D | ACS | SoftACS | 2.5D | 3D / 2D |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, c in rows:
        print(
            f"| {name} | {c[2]:,} | {c[3]:,} | {c['acs']:,} | {c['soft_acs']:,} | {c['2.5d']:,} | {c[3] / c[2]:.2f} |"
        )


if __name__ == "__main__":
    main()
