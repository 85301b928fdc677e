"""The validation score a checkpoint records, how to read it back, and the step it picks.

Kept apart from :mod:`train.checkpoint` (which needs grain for the data
iterator's position) so that :mod:`train.predict` can pick a run's best step
with orbax alone, on a machine that only predicts.
"""

from __future__ import annotations

import math

METRIC = "val_score"  # the task's score: val_dice_mean for segmentation, the classification score for classification
LEGACY_METRIC = "val_dice_mean"  # the same score, as checkpoints of earlier versions recorded it


def score_of(metrics) -> float:
    """A step's validation score from its recorded metrics; -inf for a step saved between validations."""
    metrics = metrics or {}
    value = metrics.get(METRIC, metrics.get(LEGACY_METRIC))
    return -math.inf if value is None else float(value)


def pick_step(manager, which: int | str) -> int:
    """The step of an Orbax ``manager`` that ``which`` names.

    ``which``: 'latest', 'best' (highest validation score; the newest step
    when no step was validated) or a step number. Raises ``LookupError``
    naming the directory when there is no checkpoint or no such step.
    """
    steps = sorted(manager.all_steps())
    if not steps:
        raise LookupError(f"{manager.directory}: no checkpoint found")
    if which == "latest":
        return steps[-1]
    if which == "best":
        # Orbax's best_step() is None when no step recorded metrics, and
        # otherwise some step even when none was validated (score -inf).
        scored = [(score_of(_metrics(manager, step)), step) for step in steps]
        best_score, best = max(scored)
        return best if best_score != -math.inf else steps[-1]
    if int(which) not in steps:
        raise LookupError(f"{manager.directory}: no step {which}; saved steps: {steps}")
    return int(which)


def _metrics(manager, step: int):
    try:
        return manager.metadata(step).metrics
    except Exception:  # an unreadable metadata file: treat the step as not validated
        return None
