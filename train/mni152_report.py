"""Report on the MNI152 demo data: split sizes, render time, threshold baselines, a montage.

::

  python -m train.mni152_report --out montage.png

Prints each split's size and tissue proportions, the time to render a
training case, the best global intensity-band Dice (the threshold baseline)
on the raw template and on the validation cases, and a per-case oracle (bands
fitted to each case's own labels); ``--out`` draws training renderings and the
real T1 with their label outlines. The data itself is :mod:`train.data.mni152`.
"""

from __future__ import annotations

import time

import numpy as np

from train import cli, metrics
from train.data.mni152 import CLASS_NAMES, MNI152Source, load_template


def save_montage(cases, path: str, outline_colors=("yellow", "cyan")) -> None:
    """Write a PNG with an axial and a coronal slice of each case, labels outlined."""
    import matplotlib  # heavy, and only the command draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(cases), figsize=(2.6 * len(cases), 5.6), squeeze=False)
    for col, case in enumerate(cases):
        image, label = case["image"][..., 0], case["label"]
        # Axial (H, W) two thirds up (above the cerebellum in training slabs);
        # coronal (D, W) through the middle.
        d, h = int(image.shape[0] * 2 / 3), image.shape[1] // 2
        views = (image[d], label[d]), (image[:, h], label[:, h])
        for row, (img, lab) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", origin="lower", interpolation="nearest")
            for cls, color in enumerate(outline_colors, start=1):
                ax.contour(lab == cls, levels=[0.5], colors=color, linewidths=0.5)
            ax.set_axis_off()
        axes[0, col].set_title(case["name"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@cli.entry_point
def main(argv=None) -> None:
    """Print split sizes, render time and threshold baselines; write a montage."""
    parser = cli.ArgumentParser(prog="python -m train.mni152_report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="PNG montage to write")
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--montage-cases", type=int, default=6)
    args = parser.parse_args(argv)

    train = MNI152Source("train", seed=args.seed, spacing=args.spacing, num_cases=args.num_train)
    val = MNI152Source("validation", spacing=args.spacing, num_cases=args.num_val)
    tpl = load_template(args.spacing)
    print(f"template at {args.spacing:g} mm: {tpl.t1.shape} (D, H, W)")
    for src in (train, val):
        counts = np.bincount(tpl.label[tpl.region(src.split)].ravel(), minlength=3)
        shares = ", ".join(f"{n} {c / counts.sum():.3f}" for n, c in zip(CLASS_NAMES, counts))
        print(f"{src.split}: {len(src)} cases, shape {src[len(src) - 1]['image'].shape}; "
              f"label shares of its slab {shares} (grey/white {counts[1] / counts[2]:.2f})")

    start = time.perf_counter()
    n_timed = min(3, len(train))
    for i in range(n_timed):
        train.render(i)
    per_case = (time.perf_counter() - start) / n_timed
    print(f"render time: {per_case:.2f} s per training case (mean of {n_timed})")

    def baseline(title, cases):
        b = metrics.threshold_baseline_dice([c["image"] for c in cases], [c["label"] for c in cases], 3)
        dice = ", ".join(f"{n} {d:.3f}" for n, d in zip(CLASS_NAMES, b.per_class))
        print(
            f"threshold baseline, {title}: mean foreground Dice {b.dice:.3f} "
            f"({dice}; thresholds {[round(t, 2) for t in b.thresholds]}, "
            f"bands {[CLASS_NAMES[c] for c in b.band_classes]})"
        )

    raw = {"image": tpl.t1, "label": tpl.label}
    baseline(f"raw template at {args.spacing:g} mm", [raw])
    val_cases = [val[i] for i in range(len(val))]
    baseline("validation renderings", val_cases[:-1])
    baseline("real T1 validation case", val_cases[-1:])
    baseline("all validation cases", val_cases)
    # An oracle, not a baseline: bands fitted to each case's own labels. It
    # bounds what intensity alone can do once a case's contrast is known.
    per_case = [metrics.threshold_baseline_dice([c["image"]], [c["label"]], 3).dice for c in val_cases]
    print(f"per-case best bands (fitted to each case's labels), validation cases: mean foreground Dice "
          f"{np.mean(per_case):.3f} ({', '.join(f'{d:.3f}' for d in per_case)})")

    if args.out:
        shown = [train[i] for i in range(min(args.montage_cases, len(train)))]
        save_montage(shown + val_cases[-1:], args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
