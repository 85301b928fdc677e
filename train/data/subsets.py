"""Which training cases keep their labels: ``--labelled_fraction``.

Annotation-efficiency experiments (how good is a model trained on a tenth of
the labels?) and distillation with scarce labels both need the same, seeded
choice of labelled cases, so that runs compared at one fraction and one seed
see exactly the same labelled cases whatever else differs (the initialisation,
a teacher). The choice depends only on the number of cases, the fraction, the
seed and, for classification, the cases' classes (every class keeps at least
one labelled case, in proportion otherwise, so a small fraction does not drop
a class).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_STREAM = 0x1ABE1  # separates this choice from the seed's other random streams


def labelled_indices(num_cases: int, fraction: float, seed: int, classes: Sequence[int] | None = None) -> np.ndarray:
    """Sorted indices of the cases that keep their labels.

    ``round(fraction * num_cases)`` cases, at least one (and, with ``classes``,
    at least one of each class present). Growing the fraction at a fixed seed
    only adds cases: the labelled set at 0.1 is inside the one at 0.25.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"labelled fraction must be in (0, 1], got {fraction}")
    if num_cases < 1:
        raise ValueError("no training cases to label")
    rng = np.random.default_rng([_STREAM, int(seed)])
    order = rng.permutation(num_cases)  # one order per seed: larger fractions extend smaller ones
    count = max(1, int(round(fraction * num_cases)))
    if classes is None:
        return np.sort(order[:count])
    classes = np.asarray(classes)
    if classes.shape != (num_cases,):
        raise ValueError(f"classes must hold one class per case ({num_cases}), got shape {classes.shape}")
    # Each class's cases in the seed's order; each class takes its share, at least one.
    chosen = []
    for cls in np.unique(classes):
        members = order[classes[order] == cls]
        chosen.extend(members[: max(1, int(round(fraction * len(members))))])
    return np.sort(np.asarray(chosen, np.int64))


class Subset:
    """The cases ``indices`` of ``source``, with its attributes (classes, channels, spacing, ...)."""

    def __init__(self, source, indices: Sequence[int]):
        self.source = source
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.indices[int(index)])]

    def classes(self) -> np.ndarray:
        """(N,) class of every kept case (classification sources)."""
        return np.asarray(self.source.classes())[self.indices]

    def __getattr__(self, name):
        # Everything else (num_classes, class_names, spacing, preprocessing, task, ...) is the source's.
        if name in ("source", "indices"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self)} of {len(self.source)} cases)"


def case_classes(source) -> np.ndarray | None:
    """(N,) classes of a classification source without reading images, else None."""
    if getattr(source, "task", "segmentation") != "classification" or not hasattr(source, "classes"):
        return None
    return np.asarray(source.classes())


def labelled_subset(source, fraction: float, seed: int):
    """``source`` itself for fraction 1, else the :class:`Subset` of its labelled cases."""
    if fraction >= 1:
        return source
    return Subset(source, labelled_indices(len(source), fraction, seed, case_classes(source)))
