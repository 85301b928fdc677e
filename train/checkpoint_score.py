"""The validation score a checkpoint records, and how to read it back.

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
