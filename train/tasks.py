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
- ``report(workdir, result, source, title)``: figures of a finished run (returns the main one's path);
- ``slice_data(source, config, *, batch, shard_index, shard_count)``: 2D
  training batches for the model's 2D twin (``--pretrained=slices``);
- ``class_counts(source, picks)``: examples per class, for balanced class weights;
- ``baselines(train_source, val_source)``: the task's no-network baselines
  for summary.json; ``summary_fields(result)``: the metrics summary.json
  takes from a validation result, ``required``: the ones it must hold;
  ``headline(summary)``: the closing log line;
- ``predict(model, image, shape, config, input_path, output_path, **options)``:
  what ``train.predict`` writes for one input file;
- attributes: ``name``, ``score``, ``step_metric`` (the metrics.csv column),
  ``label_axes`` (how a batch's labels lie on the mesh), ``default_model`` and
  ``accepts(model)`` (which models fit), ``plan_ignores`` (plan entries not taken).

``TASKS`` names them; :func:`select` is the one place that picks a run's task
(``--task``, else the training source's ``task``); ``config.json`` records it,
so ``train.predict`` rebuilds the same one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from train import losses


class Segmentation:
    """Voxel labels: Dice + cross-entropy on patches, sliding-window Dice on whole volumes."""

    name = "segmentation"
    score = "val_dice_mean"
    # The per-step metric the progress line and metrics.csv show.
    step_metric = "dice"
    # Batch label layout on the mesh: (batch, depth, ...) like the image.
    label_axes = ("data", "space")
    required = ("val_dice", "val_dice_mean", "baseline_threshold_dice")
    default_model = "unet"
    plan_ignores = ()  # plan.json entries a run of this task does not take

    def accepts(self, model: str) -> bool:
        """Whether ``model`` (an acsjax.models name) outputs what this task learns: a voxel map."""
        from acsjax.models import SEGMENTATION as SEGMENTATION_MODELS

        return model in SEGMENTATION_MODELS

    def loss(self, outputs, labels, num_classes: int, class_weights, sample_weights=None):
        return losses.segmentation_loss(outputs, labels, num_classes, class_weights, sample_weights)

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
        from train.evaluate import evaluate, mirror_axes_of, sliding_window

        mirror = mirror_axes_of(config.eval_mirror_axes, config.model_dims) if config.eval_mirror and final else ()
        return evaluate(
            model, source, patch=sliding_window(config.patch, config.model_dims), num_classes=source.num_classes,
            overlap=config.eval_overlap, mirror=mirror, baseline=final,
            keep_predictions=1 if final else 0, max_cases=config.max_eval_cases,
        )

    def report(self, workdir: str, result: dict, source, title: str):
        """Writes the run's figure; returns its path (or None)."""
        from train import report

        return report.plot_evaluation(workdir, result, source, title=title)

    def slice_data(self, source, config, *, batch: int, shard_index: int, shard_count: int):
        from train.data import pipeline

        return pipeline.slice_dataset(
            source, axis="axial", patch=config.patch[1:], batch=batch, seed=config.seed,
            foreground_fraction=config.foreground_fraction, augment=config.augment,
            shard_index=shard_index, shard_count=shard_count,
        )

    def class_counts(self, source, picks) -> np.ndarray:
        counts = np.zeros(source.num_classes, np.int64)
        for index in picks:
            label = np.asarray(source[int(index)]["label"])
            counts += np.bincount(label.ravel(), minlength=source.num_classes)[: source.num_classes]
        return counts

    def baselines(self, train_source, val_source) -> dict:
        return {}  # the threshold baseline comes with the final validation (train.evaluate)

    def summary_fields(self, result: dict) -> dict:
        from train import report

        return report.summary_from_evaluation(result)

    def headline(self, summary: dict) -> str:
        return (f"val_dice_mean {summary['val_dice_mean']:.4f} (threshold baseline "
                f"{summary['baseline_threshold_dice']})")

    def predict(self, model, image, shape, config: dict, input_path: str, output_path: str, *,
                overlap: float, mirror: bool, batch_size: int) -> dict:
        from train.data import nifti
        from train.evaluate import back_to_input_grid, eval_view, mirror_axes_of, predict_probabilities, sliding_window

        if not nifti.is_nifti(output_path):
            raise nifti.DataError(f"{output_path}: output must end in .nii or .nii.gz")
        # The run's own mirror axes (runs written before the setting existed mirrored all three).
        axes = mirror_axes_of(config.get("eval_mirror_axes", "dhw"), config["dims"]) if mirror else ()
        probs = predict_probabilities(eval_view(model), image, patch=sliding_window(config["patch"], config["dims"]),
                                      overlap=overlap, mirror=axes, batch_size=batch_size)
        labels = back_to_input_grid(probs, shape)
        try:
            nifti.write_like(labels, input_path, output_path)
        except OSError as err:
            raise nifti.DataError(f"{output_path}: cannot write ({' '.join(str(err).split())})") from None
        counts = np.bincount(labels.ravel(), minlength=int(config["num_classes"]))
        names = config.get("class_names") or [f"class{i}" for i in range(len(counts))]
        voxels = {str(n): int(c) for n, c in zip(names, counts)}
        return {"shape": list(labels.shape), "voxels": voxels,
                "described": f"shape {tuple(labels.shape)}; voxels: " + ", ".join(f"{k} {v}" for k, v in voxels.items())}


class Classification:
    """One class per case: cross-entropy on (N, K) logits, whole-case accuracy, balanced accuracy and AUC.

    The score checkpoints keep the best of is the balanced accuracy: on an
    imbalanced validation set plain accuracy rewards predicting the majority
    class, while balanced accuracy is the majority predictor's 1/K; on a
    balanced set (the built-in ``regions``) the two are equal. Validation
    fits each case to the patch (see :mod:`train.classify` for why one
    centred view, not a mean over windows).
    """

    name = "classification"
    score = "val_balanced_accuracy"
    step_metric = "accuracy"
    label_axes = ("data",)
    required = ("val_accuracy", "val_balanced_accuracy", "val_auc", "baseline_accuracy")
    default_model = "resnet18"
    # The plan's class weights count voxels; balanced weights here count cases (class_counts).
    plan_ignores = ("class_weights",)

    def accepts(self, model: str) -> bool:
        """Whether ``model`` outputs one vector of logits per case (a classifier)."""
        from acsjax.models import MODELS, SEGMENTATION as SEGMENTATION_MODELS

        return model in MODELS and model not in SEGMENTATION_MODELS

    def loss(self, outputs, labels, num_classes: int, class_weights, sample_weights=None):
        logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        ce = losses.cross_entropy(logits, labels, class_weights, sample_weights)
        return ce, {"ce": ce}

    def step_metrics(self, logits, labels, num_classes: int) -> dict:
        import jax.numpy as jnp

        return {"accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))}

    def train_data(self, source, config, *, batch: int, shard_index: int, shard_count: int):
        from train.data import class_pipeline

        return class_pipeline.class_dataset(source, patch=config.patch, batch=batch, seed=config.seed,
                                            augment=config.augment, shard_index=shard_index, shard_count=shard_count)

    def slice_data(self, source, config, *, batch: int, shard_index: int, shard_count: int):
        from train.data import class_pipeline

        return class_pipeline.class_slice_dataset(source, patch=config.patch[1:], batch=batch, seed=config.seed,
                                                  augment=config.augment, shard_index=shard_index,
                                                  shard_count=shard_count)

    def validate(self, model, source, config, *, final: bool) -> dict[str, Any]:
        from train import classify

        return classify.evaluate(model, source, patch=config.patch, max_cases=0 if final else config.max_eval_cases)

    def report(self, workdir: str, result: dict, source, title: str):
        import os

        from train import classify, report

        return report.plot_confusion(os.path.join(workdir, classify.CONFUSION_FIGURE), result["confusion"],
                                     result["class_names"], title=title)

    def class_counts(self, source, picks) -> np.ndarray:
        classes = source.classes() if hasattr(source, "classes") else np.array([source[i]["class"] for i in range(len(source))])
        return np.bincount(np.asarray(classes, np.int64), minlength=source.num_classes)[: source.num_classes]

    def baselines(self, train_source, val_source) -> dict:
        from train import classify

        return classify.baselines(train_source, val_source)

    def summary_fields(self, result: dict) -> dict:
        keys = ("val_accuracy", "val_balanced_accuracy", "val_auc", "val_auc_per_class", "confusion",
                "class_names", "num_cases")
        out = {k: result[k] for k in keys if k in result}
        out["val_cases"] = result.get("cases")
        return out

    def headline(self, summary: dict) -> str:
        return (f"val_accuracy {summary['val_accuracy']:.3f}, balanced {summary['val_balanced_accuracy']:.3f}, "
                f"AUC {summary['val_auc']:.3f} (spatially blind baseline accuracy {summary['baseline_accuracy']:.3f})")

    def predict(self, model, image, shape, config: dict, input_path: str, output_path: str, *,
                overlap: float, mirror: bool, batch_size: int) -> dict:
        import json

        from train import classify

        import contextlib

        import acsjax.ops

        del shape, overlap, mirror, batch_size  # one centred view per case, as in validation
        impl = (config.get("config") or {}).get("conv_impl") or ""
        # The run's convolution lowering (the classify preset's XLA compiles its ResNet far sooner).
        with acsjax.ops.use_conv_impl(impl) if impl else contextlib.nullcontext():
            probs = classify.predict_probabilities(model, [image], tuple(config["patch"]))[0]
        names = config.get("class_names") or [str(i) for i in range(len(probs))]
        out = classify.probabilities_json(probs, names)
        with open(output_path, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
        return {**out, "described": f"class {out['label']} (p = {out['probabilities'][out['label']]:.3f})"}


SEGMENTATION = Segmentation()
CLASSIFICATION = Classification()
TASKS = {SEGMENTATION.name: SEGMENTATION, CLASSIFICATION.name: CLASSIFICATION}
CHOICES = ("auto", *TASKS)


def get(name: str):
    """The task called ``name`` (a key of ``TASKS``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def fit_model(kind, config):
    """``config`` with a model that serves ``kind``: a preset's model of the other task becomes the
    task's ``default_model`` (without the preset's options); an explicit --model that cannot serve it
    is a ValueError."""
    import dataclasses

    from acsjax.models import MODELS

    if config.model not in MODELS or kind.accepts(config.model):
        return config  # an unknown name is reported where the model is built
    if "model" in config.explicit:
        raise ValueError(f"{config.model} does not fit a {kind.name} task; use e.g. {kind.default_model}")
    options = {k: v for k, v in config.model_options.items() if f"model_option:{k}" in config.explicit}
    return dataclasses.replace(config, model=kind.default_model, model_options=options)


def select(name: str, source):
    """The task of a run: ``name`` ('auto' takes the source's own ``task``, segmentation if it has none).

    A forced task the data cannot serve (case classes asked of voxel labels,
    or the reverse) is a ValueError saying what the data set holds.
    """
    own = getattr(source, "task", SEGMENTATION.name)
    if name in ("auto", "", None):
        return get(own)
    task = get(name)
    if task.name != own:
        what = {SEGMENTATION.name: "voxel label maps", CLASSIFICATION.name: "one class per case"}
        raise ValueError(f"{name} needs {what[task.name]}; the data set "
                         f"{getattr(source, 'where', '') or source!r} holds {what.get(own, own)}")
    return task
