"""What the run learns: the task interface that keeps one training loop for every task.

Segmentation and classification differ in their labels, loss, metrics,
validation and what prediction writes, and in nothing else. A task object
holds those differences; the loop (:mod:`train.trainer`) and the run
(:mod:`train.run`) call it instead of branching on the task's name:

- ``loss(outputs, labels, num_classes, class_weights) -> (loss, parts)`` and
  ``step_metrics(logits, labels, num_classes) -> dict``, traced inside the
  jitted train step (pure JAX);
- ``train_data(source, config, *, batch, shard_index, shard_count)``: the
  grain dataset of training batches;
- ``validate(model, source, config, *, final) -> result``: a JSON-ready
  result with the task's ``score`` key (the metric checkpoints keep the best
  of and learning curves plot);
- ``report(workdir, result, source, title)``: figures of a finished run (returns the main one's path).

``TASKS`` names them; ``config.json`` records the task of a run, so
``train.predict`` rebuilds the same one.
"""

from __future__ import annotations

from typing import Any

from train import losses


class Segmentation:
    """Voxel labels: Dice + cross-entropy on patches, sliding-window Dice on whole volumes."""

    name = "segmentation"
    score = "val_dice_mean"
    # The per-step metric the progress line and metrics.csv show.
    step_metric = "dice"

    def loss(self, outputs, labels, num_classes: int, class_weights):
        return losses.segmentation_loss(outputs, labels, num_classes, class_weights)

    def step_metrics(self, logits, labels, num_classes: int) -> dict:
        return {"dice": losses.hard_dice(logits, labels, num_classes)}

    def train_data(self, source, config, *, batch: int, shard_index: int, shard_count: int):
        from train.data import pipeline

        return pipeline.patch_dataset(
            source, patch=config.patch, batch=batch, seed=config.seed,
            foreground_fraction=config.foreground_fraction, augment=config.augment,
            shard_index=shard_index, shard_count=shard_count,
        )

    def validate(self, model, source, config, *, final: bool) -> dict[str, Any]:
        from train.evaluate import evaluate

        return evaluate(
            model, source, patch=config.patch, num_classes=source.num_classes,
            overlap=config.eval_overlap, mirror=config.eval_mirror and final, baseline=final,
            keep_predictions=1 if final else 0, max_cases=config.max_eval_cases,
        )

    def report(self, workdir: str, result: dict, source, title: str):
        """Writes the run's figure; returns its path (or None)."""
        from train import report

        return report.plot_evaluation(workdir, result, source, title=title)


SEGMENTATION = Segmentation()
TASKS = {SEGMENTATION.name: SEGMENTATION}


def get(name: str):
    """The task called ``name`` (a key of ``TASKS``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
