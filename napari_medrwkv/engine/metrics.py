"""Segmentation metrics: Dice, IoU and HD95 (numpy + scipy only).

Conventions
-----------
* ``dice`` / ``iou`` of two empty masks are 1.0 (nothing to find, nothing found).
* ``hd95`` of two empty masks is 0.0; if exactly one is empty it is undefined and
  returned as NaN.  ``evaluate()`` averages HD95 over the finite values only and
  reports how many images were NaN (see :func:`mean_finite`).
* HD95 follows MedPy's ``hd95`` (the definition used by TransUNet / RWKV-UNet
  evaluations): boundaries are the foreground pixels removed by one erosion with
  the 4-connected (face) structure, pixels on the image edge included; the
  distances from each boundary pixel to the other mask's boundary, in both
  directions, are pooled and their 95th percentile (linear interpolation) taken.
"""
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

Spacing = Optional[Union[float, Sequence[float]]]


def _binary_pair(pred, target) -> Tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    return pred > 0, target > 0


def dice(pred, target) -> float:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` of two binary masks (non-zero = foreground); both empty -> 1.0."""
    a, b = _binary_pair(pred, target)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def iou(pred, target) -> float:
    """Intersection over union ``|A∩B| / |A∪B|`` of two binary masks; both empty -> 1.0."""
    a, b = _binary_pair(pred, target)
    union = int(np.logical_or(a, b).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(a, b).sum()) / union


def boundary(mask) -> np.ndarray:
    """Boundary pixels of a binary mask: foreground pixels with a 4-neighbour (or the image edge) outside it."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        return mask
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def surface_distances(pred, target, spacing: Spacing = None) -> np.ndarray:
    """Distance from every boundary pixel of ``pred`` to the nearest boundary pixel of ``target``.

    Both masks must be non-empty.  ``spacing``: pixel size per axis (scalar or sequence); pixels by default.
    """
    a, b = _binary_pair(pred, target)
    if not a.any() or not b.any():
        raise ValueError("surface_distances needs two non-empty masks")
    distance_to_b = ndimage.distance_transform_edt(~boundary(b), sampling=spacing)
    return distance_to_b[boundary(a)]


def hd95(pred, target, spacing: Spacing = None) -> float:
    """95th percentile symmetric Hausdorff distance between the mask boundaries (in pixels, or ``spacing`` units).

    Both empty -> 0.0; exactly one empty -> NaN (undefined; averaged over finite values by ``evaluate()``).
    The directed distances pred->target and target->pred are pooled before the percentile (as MedPy does).
    """
    a, b = _binary_pair(pred, target)
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return 0.0
    if has_a != has_b:
        return float("nan")
    distances = np.concatenate([surface_distances(a, b, spacing), surface_distances(b, a, spacing)])
    return float(np.percentile(distances, 95))


def _scores(pred: np.ndarray, target: np.ndarray, spacing: Spacing) -> Dict[str, float]:
    return {"dice": dice(pred, target), "iou": iou(pred, target), "hd95": hd95(pred, target, spacing)}


def mean_finite(values: Iterable[float]) -> Tuple[float, int]:
    """``(mean of the finite values, number of NaN/inf values)``; the mean is NaN when none is finite."""
    values = np.asarray(list(values), dtype=np.float64)
    finite = np.isfinite(values)
    mean = float(values[finite].mean()) if finite.any() else float("nan")
    return mean, int((~finite).sum())


def _foreground_classes(pred: np.ndarray, target: np.ndarray, num_classes: int) -> list:
    """The classes 1..n-1 that occur in the target or the prediction (checks shapes and label ranges)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    for name, labels in (("prediction", pred), ("target", target)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} has labels {labels.min()}..{labels.max()} outside the {num_classes} "
                             f"classes 0..{num_classes - 1} (drop ignored/padded pixels first)")
    return sorted(int(c) for c in np.union1d(np.unique(pred), np.unique(target)) if 0 < c < num_classes)


def _check_num_classes(num_classes) -> int:
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (1 = binary), got {num_classes}")
    return num_classes


def mean_dice(pred, target, num_classes: int) -> float:
    """The ``dice`` of :func:`per_class_scores` alone, without the distance transforms HD95 needs.

    Training validates with it every epoch, so it must rank weights exactly as ``evaluate`` scores them.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if _check_num_classes(num_classes) == 1:
        return dice(pred, target)
    present = _foreground_classes(pred, target, num_classes)
    return float(np.mean([dice(pred == c, target == c) for c in present])) if present else 1.0


def per_class_scores(pred, target, num_classes: int, spacing: Spacing = None) -> Dict[str, object]:
    """Dice, IoU and HD95 of one predicted label image against its target.

    ``num_classes == 1`` (binary model): the foreground scores (non-zero = foreground).
    ``num_classes >= 2``: the mean over the classes 1..n-1 that occur in the target
    or the prediction (background 0 is not scored); HD95 is averaged over the finite
    per-class values (NaN when none is finite).  If no foreground class occurs in
    either, the image scores dice = iou = 1, hd95 = 0 (as two empty binary masks).

    Returns ``{"dice", "iou", "hd95", "per_class": {class_id: {"dice", "iou", "hd95"}}}``.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if _check_num_classes(num_classes) == 1:
        scores = _scores(pred, target, spacing)       # dice, iou, hd95 check the shapes and binarise
        return {**scores, "per_class": {1: dict(scores)}}
    present = _foreground_classes(pred, target, num_classes)
    per_class = {c: _scores(pred == c, target == c, spacing) for c in present}
    if not per_class:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "per_class": {}}
    return {
        "dice": float(np.mean([s["dice"] for s in per_class.values()])),
        "iou": float(np.mean([s["iou"] for s in per_class.values()])),
        "hd95": mean_finite(s["hd95"] for s in per_class.values())[0],
        "per_class": per_class,
    }


# --------------------------------------------------------------------------- instances
#
# Object-level scores of instance labels (0 background, one id per object), as the field
# reports them (Caicedo et al. 2019; StarDist's ``matching``).  A predicted object matches a
# true one when their IoU exceeds the threshold t; for t >= 0.5 a match is unique (two objects
# cannot both overlap one by more than half of their union), so no assignment is needed.
# An image with no true and no predicted object scores 1 (nothing to find, nothing found).

#: The 2018 Data Science Bowl's IoU thresholds: 0.5, 0.55, ..., 0.95.
DSB_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def object_ious(pred, target) -> Tuple[np.ndarray, int, int]:
    """``(ious, n_pred, n_true)``: the IoU of every overlapping (true, predicted) pair of objects,
    one row per pair; objects that overlap nothing have no row."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    p_ids, p = np.unique(pred, return_inverse=True)
    t_ids, t = np.unique(target, return_inverse=True)
    p, t = p.ravel(), t.ravel()
    p_area, t_area = np.bincount(p, minlength=p_ids.size), np.bincount(t, minlength=t_ids.size)
    pair, overlap = np.unique(t.astype(np.int64) * p_ids.size + p, return_counts=True)
    ti, pi = pair // p_ids.size, pair % p_ids.size
    real = (t_ids[ti] != 0) & (p_ids[pi] != 0)
    ti, pi, overlap = ti[real], pi[real], overlap[real]
    ious = overlap / (t_area[ti] + p_area[pi] - overlap)
    return ious, int(np.count_nonzero(p_ids)), int(np.count_nonzero(t_ids))


def object_matches(pred, target, thresholds: Sequence[float] = DSB_THRESHOLDS) -> Dict[float, Dict[str, float]]:
    """Per IoU threshold t (each >= 0.5): ``{"tp", "fp", "fn", "accuracy", "sum_iou"}``, where
    accuracy = TP / (TP + FP + FN) and ``sum_iou`` adds the IoUs of the matched pairs (for
    panoptic quality)."""
    ious, n_pred, n_true = object_ious(pred, target)
    out = {}
    for t in thresholds:
        if t < 0.5:
            raise ValueError(f"IoU threshold {t}: matches are unique only from 0.5 up")
        hit = ious > t
        tp = int(hit.sum())
        fp, fn = n_pred - tp, n_true - tp
        total = tp + fp + fn
        out[float(t)] = {"tp": tp, "fp": fp, "fn": fn, "accuracy": tp / total if total else 1.0,
                         "sum_iou": float(ious[hit].sum())}
    return out


def panoptic_quality(tp: int, fp: int, fn: int, sum_iou: float) -> float:
    """PQ = (sum of matched IoUs) / (TP + FP/2 + FN/2) (Kirillov et al. 2019), at IoU 0.5; 1 when nothing to find nor found."""
    denominator = tp + 0.5 * fp + 0.5 * fn
    return sum_iou / denominator if denominator else 1.0


def instance_scores(pred, target) -> Dict[str, float]:
    """One image's object scores: accuracy at IoU 0.5 and 0.75, the DSB2018 score (mean accuracy
    over IoU 0.5:0.05:0.95), panoptic quality, and the counts at 0.5 and 0.75 (for pooling over
    images): ``tp50``, ``fp50``, ``fn50``, ``sum_iou50``, ``tp75``, ``fp75``, ``fn75``."""
    m = object_matches(pred, target, DSB_THRESHOLDS)
    half, three_quarters = m[0.5], m[0.75]
    return {"accuracy50": half["accuracy"], "accuracy75": three_quarters["accuracy"],
            "dsb": float(np.mean([m[t]["accuracy"] for t in DSB_THRESHOLDS])),
            "pq": panoptic_quality(half["tp"], half["fp"], half["fn"], half["sum_iou"]),
            **{f"{key}50": half[key] for key in ("tp", "fp", "fn", "sum_iou")},
            **{f"{key}75": three_quarters[key] for key in ("tp", "fp", "fn")}}
