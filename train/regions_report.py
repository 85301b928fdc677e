"""Write the built-in classification data set and report its split and baselines.

  python -m train.regions_report --out /tmp/regions

Which outer side of the brain (left, right, anterior, posterior) a cube cut
from a randomised MNI152 rendering touches; see :mod:`train.data.regions` for
the task, the leak-free split and why a global intensity histogram cannot
solve it. Prints the split and the majority-class and global-histogram
baselines (:func:`train.metrics.baseline_accuracy`) on the validation cases.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from train import cli, metrics
from train.data import mni152
from train.data.regions import CLASS_NAMES, SPACING, write_dataset


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m train.regions_report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--layout", choices=("msd", "folder"), default="msd")
    parser.add_argument("--cases-per-class", type=int, default=40)
    parser.add_argument("--val-cases-per-class", type=int, default=15)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    info = write_dataset(args.out, layout=args.layout, cases_per_class=args.cases_per_class,
                         val_cases_per_class=args.val_cases_per_class, size=args.size, seed=args.seed)
    wall = time.perf_counter() - start
    k = len(CLASS_NAMES)
    print(f"wrote {args.layout}:{info['root']} in {wall:.1f} s: {k} classes {', '.join(CLASS_NAMES)}; "
          f"{args.size}^3 voxels at {SPACING:g} mm")
    print(f"train: {len(info['train'])} cases (MNI z < {mni152.TRAIN_Z_MAX_MM:g} mm), "
          f"counts {np.bincount(info['train_labels'], minlength=k).tolist()}")
    print(f"val:   {len(info['val'])} cases (MNI z >= {mni152.VAL_Z_MIN_MM:g} mm), "
          f"counts {np.bincount(info['val_labels'], minlength=k).tolist()}")
    b = metrics.baseline_accuracy(info["train_images"], info["train_labels"], info["val_images"], info["val_labels"])
    print(f"baselines (validation accuracy; chance {b.chance:.3f}): majority class {b.majority:.3f}, "
          f"global intensity histogram ({b.histogram_method}) {b.histogram:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
