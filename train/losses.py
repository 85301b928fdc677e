"""Segmentation losses: soft Dice + cross-entropy, with deep supervision; distillation.

Logits are channels-last ``(N, *spatial, K)`` and labels integer
``(N, *spatial)``, for volumes and 2D slices alike. Everything reduces with
sums over the whole (global) batch, so a step sharded over devices computes
the same numbers as one device.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _reduce_axes(logits: jax.Array) -> tuple[int, ...]:
    # Batch and spatial axes: "batch Dice" (nnU-Net's choice) pools every
    # voxel of the batch before taking the ratio, so rare classes absent from
    # one patch do not produce 0/0 terms.
    return tuple(range(logits.ndim - 1))


def _per_example(weights: jax.Array | None, rank: int) -> jax.Array | None:
    """(N,) example weights shaped to broadcast over ``(N, *spatial, K)``."""
    if weights is None:
        return None
    return jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (rank - 1))


def soft_dice_loss(
    logits: jax.Array, labels: jax.Array, num_classes: int, *, smooth: float = 1e-5,
    sample_weights: jax.Array | None = None,
) -> jax.Array:
    """1 - mean soft Dice over the foreground classes (1..K-1) of the softmax.

    With a single class (K = 1, nothing to segment) it returns 0.
    ``sample_weights`` ((N,), 0 or 1 for unlabelled / labelled examples)
    leave weight-0 examples out of the batch Dice; all ones is the same as None.
    """
    if num_classes < 2:
        return jnp.zeros((), jnp.float32)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    w = _per_example(sample_weights, logits.ndim)
    if w is not None:
        probs, onehot = probs * w, onehot * w
    axes = _reduce_axes(logits)
    intersection = jnp.sum(probs * onehot, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - jnp.mean(dice[1:])


def cross_entropy(logits: jax.Array, labels: jax.Array, class_weights: Sequence[float] | None = None,
                  sample_weights: jax.Array | None = None) -> jax.Array:
    """Mean voxel-wise softmax cross-entropy, each voxel weighted by its true class's weight.

    The mean is over voxels (not over the weights, as PyTorch's weighted
    mean is), so the loss of a batch does not depend on which classes it
    happens to hold; :func:`balanced_class_weights` keeps its scale at 1.
    With ``sample_weights`` ((N,)) the mean is over the voxels of the
    weighted examples (0 when every weight is 0).
    """
    # A one-hot product rather than optax's integer-label gather: the gather's
    # gradient is a scatter-add over the whole volume, which XLA tries to
    # constant-fold for seconds at 256^3 (and far longer for larger volumes).
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if class_weights is not None:
        onehot = onehot * jnp.asarray(class_weights, jnp.float32)
    per_voxel = -jnp.sum(onehot * log_probs, axis=-1)
    if sample_weights is None:
        return jnp.mean(per_voxel)
    w = jnp.broadcast_to(_per_example(sample_weights, per_voxel.ndim), per_voxel.shape)
    total = jnp.sum(w)
    return jnp.sum(w * per_voxel) / jnp.where(total > 0, total, 1.0)


def balanced_class_weights(counts: Sequence[float]) -> tuple[float, ...]:
    """Cross-entropy weights ``1 / (K f_c)`` from voxel counts per class (``f_c``: frequency).

    Weighted so, a network's softmax estimates the posterior under a uniform
    class prior instead of the training labels' proportions, which matters
    when those proportions differ from the data it is applied to (the demo
    trains on the lower brain, mostly grey matter, and is validated on the
    upper brain, nearly half white matter). The expected weight of a training
    voxel is 1, so the loss keeps its scale. Classes absent from ``counts``
    (count 0) get weight 1 and are left out of ``K``.
    """
    counts = [float(c) for c in counts]
    if any(c < 0 for c in counts) or not any(counts):
        raise ValueError(f"class counts must be non-negative and not all zero, got {counts}")
    total, present = sum(counts), sum(c > 0 for c in counts)
    return tuple(total / (present * c) if c > 0 else 1.0 for c in counts)


def dice_ce_loss(
    logits: jax.Array, labels: jax.Array, num_classes: int, class_weights: Sequence[float] | None = None,
    sample_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Soft Dice + (optionally class-weighted) cross-entropy with equal weights; returns (loss, parts)."""
    dice = soft_dice_loss(logits, labels, num_classes, sample_weights=sample_weights)
    ce = cross_entropy(logits, labels, class_weights, sample_weights)
    return dice + ce, {"dice_loss": dice, "ce": ce}


def downsample_labels(labels: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Nearest-neighbour downsampling of integer labels to spatial ``shape``.

    Only integer factors are supported (the heads of a U-Net sit at 1/2, 1/4,
    ... of the input); taking every f-th voxel keeps labels crisp, as nnU-Net
    does for its deep-supervision targets.
    """
    spatial = labels.shape[1:]
    if len(shape) != len(spatial):
        raise ValueError(f"downsample_labels: labels {labels.shape} vs head spatial shape {tuple(shape)}")
    index = [slice(None)]
    for full, small in zip(spatial, shape):
        if small < 1 or full % small:
            raise ValueError(f"downsample_labels: head size {tuple(shape)} does not divide label size {spatial}")
        index.append(slice(None, None, full // small))
    return labels[tuple(index)]


def deep_supervision_weights(n: int) -> jnp.ndarray:
    """Weights 1, 1/2, 1/4, ... for the main head and n-1 coarser heads, normalised to sum 1."""
    w = 0.5 ** jnp.arange(n, dtype=jnp.float32)
    return w / jnp.sum(w)


def segmentation_loss(
    outputs, labels: jax.Array, num_classes: int, class_weights: Sequence[float] | None = None,
    sample_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Dice + CE of a model's output: one logits array or ``(main, *aux)``.

    ``class_weights`` (one per class, or None) weight the cross-entropy;
    ``sample_weights`` ((N,), or None) leave examples out (0) of both terms:
    the examples of unlabelled cases in a distillation run.

    Auxiliary heads (coarser resolutions, as the model returns with deep
    supervision in train mode) are scored against labels downsampled to their
    size, with weights from :func:`deep_supervision_weights`. The returned
    parts always describe the main head alone.
    """
    heads = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    total, parts = dice_ce_loss(heads[0], labels, num_classes, class_weights, sample_weights)
    if len(heads) == 1:
        return total, parts
    weights = deep_supervision_weights(len(heads))
    total = weights[0] * total
    for weight, head in zip(weights[1:], heads[1:]):
        loss, _ = dice_ce_loss(head, downsample_labels(labels, head.shape[1:-1]), num_classes, class_weights,
                               sample_weights)
        total = total + weight * loss
    return total, parts


def hard_dice(logits: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """Mean Dice of the argmax over foreground classes present in labels or prediction.

    A cheap batch metric for progress lines; classes absent from both count
    as neither 0 nor 1. Returns NaN when no foreground class appears at all.
    """
    pred = jnp.argmax(logits, axis=-1)
    classes = jnp.arange(1, max(num_classes, 2))
    p = pred[..., None] == classes
    t = labels[..., None] == classes
    axes = tuple(range(labels.ndim))
    intersection = jnp.sum(p & t, axis=axes)
    total = jnp.sum(p, axis=axes) + jnp.sum(t, axis=axes)
    present = total > 0
    dice = jnp.where(present, 2.0 * intersection / jnp.maximum(total, 1), 0.0)
    return jnp.sum(dice) / jnp.sum(present)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Hinton's distillation term: T^2 * KL(softmax(teacher/T) || softmax(student/T)), voxel mean.

    With ``q = softmax(teacher / T)`` and ``p = softmax(student / T)`` over the
    last (class) axis, each voxel contributes
    ``KL_v = sum_k q_k (log q_k - log p_k)``, and the loss is
    ``T^2 * sum_v m_v KL_v / sum_v m_v`` (``m`` = ``mask``, all ones when None),
    0 when the mask is empty. The teacher is a constant target
    (``stop_gradient``), so the gradient with respect to the student's logits
    is ``T * m_v * (p - q) / sum_v m_v``: the ``T^2`` factor keeps the
    gradient's scale comparable across temperatures, as Hinton et al. argue.

    Args:
      student_logits, teacher_logits: ``(N, *spatial, K)``, the same shape
        (resample the teacher onto the student's grid first, see
        :mod:`train.data.resample`).
      temperature: ``T > 0``; 1 compares the plain softmaxes.
      mask: ``(N, *spatial)`` bool or non-negative weights; False / 0 where the
        teacher has no data (the ``valid`` mask of the resampling).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation_loss: student logits {student_logits.shape} and teacher logits "
            f"{teacher_logits.shape} differ; resample the teacher onto the student's grid"
        )
    if not temperature > 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature}")
    t = float(temperature)
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / t
    log_q = jax.nn.log_softmax(teacher, axis=-1)
    log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
    if mask is None:
        return t * t * jnp.mean(kl)
    if mask.shape != kl.shape:
        raise ValueError(f"distillation_loss: mask {mask.shape} must be the logits' shape without classes {kl.shape}")
    weights = mask.astype(jnp.float32)
    total = jnp.sum(weights)
    return t * t * jnp.sum(weights * kl) / jnp.where(total > 0, total, 1.0)


def combined_loss(supervised: jax.Array, distill: jax.Array, kd_weight: float) -> jax.Array:
    """``(1 - a) * supervised + a * distill`` with ``a = kd_weight`` in [0, 1].

    ``a = 0`` is plain supervised training, ``a = 1`` pure distillation
    (voxels without labels).
    """
    if isinstance(kd_weight, (int, float)) and not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
    return (1.0 - kd_weight) * supervised + kd_weight * distill
