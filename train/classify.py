"""Whole-case classification: probabilities per case, validation metrics, the confusion figure.

A case is fitted to the training patch (centre crop, or centred zero padding
where it is smaller) and passed once through the model in eval mode. Why one
centred window rather than the mean over sliding windows: the classifier
ends in global average pooling and was trained on patch-sized crops of whole
cases, so one patch-sized view is the input it was trained on (for data sets
whose cases are the patch's size, as the built-in ``regions``, the view is
the whole case); averaging windows that each see only part of the object
would ask the network about views it never saw whole. Cases larger than the
patch lose their border, which the plan's patch (the median case shape
rounded to the network's stride) keeps small.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from train import metrics
from train.data.class_pipeline import case_class, fit_to_patch

CONFUSION_FIGURE = "confusion.png"


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(graphdef, state, images):
    return jax.nn.softmax(nnx.merge(graphdef, state)(images).astype(np.float32), axis=-1)


def predict_probabilities(model, images: Sequence[np.ndarray], patch: Sequence[int], *, batch_size: int = 8) -> np.ndarray:
    """(N, K) class probabilities of ``images`` (each (D, H, W, C)), each fitted to ``patch``.

    ``model`` is an NNX module (put into eval mode on a copy) or a
    ``(graphdef, state)`` pair from :func:`train.evaluate.eval_view`. Batches
    have one fixed size (the last is zero-padded), so one program serves all.
    """
    from train.evaluate import eval_view

    graphdef, state = model if isinstance(model, tuple) else eval_view(model)
    fitted = [fit_to_patch(np.asarray(image, np.float32), patch) for image in images]
    batch_size = max(1, min(int(batch_size), len(fitted)))
    out = []
    for start in range(0, len(fitted), batch_size):
        chunk = fitted[start:start + batch_size]
        pad = batch_size - len(chunk)
        x = np.stack(chunk + [np.zeros_like(chunk[0])] * pad)
        out.append(np.asarray(_probabilities(graphdef, state, x))[: len(chunk)])
    return np.concatenate(out).astype(np.float64)


def evaluate(model, source, *, patch: Sequence[int], max_cases: int = 0) -> dict[str, Any]:
    """Validation of a classifier on every case of ``source`` (at most ``max_cases`` when > 0).

    Returns a JSON-ready dict: ``val_accuracy``, ``val_balanced_accuracy``,
    ``val_auc`` (macro one-vs-rest), ``val_auc_per_class``, ``confusion``
    (rows true, columns predicted), ``class_names``, ``num_cases`` and
    ``cases`` (name, class, prediction, probabilities).
    """
    n = len(source) if not max_cases else min(len(source), max_cases)
    k = source.num_classes
    names, images, labels = [], [], []
    for i in range(n):
        case = source[i]
        names.append(str(case.get("name", i)))
        labels.append(case_class(case))
        images.append(case["image"])
    probs = predict_probabilities(model, images, patch)
    labels = np.asarray(labels, np.int64)
    pred = probs.argmax(-1)
    return {
        "val_accuracy": metrics.accuracy(pred, labels),
        "val_balanced_accuracy": metrics.balanced_accuracy(pred, labels, k),
        "val_auc": metrics.macro_auc(probs, labels, k),
        "val_auc_per_class": dict(zip(source.class_names, metrics.per_class_auc(probs, labels, k).tolist())),
        "confusion": metrics.classification_confusion(pred, labels, k).tolist(),
        "class_names": list(source.class_names),
        "num_cases": n,
        "cases": [
            {"name": name, "label": int(y), "pred": int(p), "probabilities": [round(float(v), 6) for v in row]}
            for name, y, p, row in zip(names, labels, pred, probs)
        ],
    }


def baselines(train_source, val_source) -> dict[str, Any]:
    """``baseline_accuracy`` (the better spatially blind classifier, :func:`train.metrics.baseline_accuracy`),
    ``baseline_majority`` and ``baseline_chance`` on the validation cases."""
    train_images = [train_source[i]["image"] for i in range(len(train_source))]
    val_images = [val_source[i]["image"] for i in range(len(val_source))]
    train_labels = [case_class(train_source[i]) for i in range(len(train_source))]
    val_labels = [case_class(val_source[i]) for i in range(len(val_source))]
    b = metrics.baseline_accuracy(train_images, train_labels, val_images, val_labels)
    return {
        "baseline_accuracy": max(b.majority, b.histogram),
        "baseline_majority": b.majority,
        "baseline_histogram": b.histogram,
        "baseline_histogram_method": b.histogram_method,
        "baseline_chance": b.chance,
    }


def probabilities_json(probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """``{'probabilities': {name: p, ...}, 'label': the most probable class name}``."""
    probabilities = np.asarray(probabilities, np.float64)
    return {
        "probabilities": {str(n): float(p) for n, p in zip(class_names, probabilities)},
        "label": str(class_names[int(probabilities.argmax())]),
    }
