"""Dice, IoU and HD95 of a model on a dataset folder (or in-memory pairs); for instance labels,
also the object scores the field reports (metrics.instance_scores)."""
import os
from typing import Callable, Optional, Sequence

import numpy as np

from .datasets import find_pairs, pairs_matching, read_pair
from .imageio import mask_classes, read_image
from .infer import Cancelled, segment
from .instances import connected_objects, instance_mask, read_instances
from .metrics import instance_scores, mean_finite, per_class_scores
from .model import SegmentationModel, load_model
from .postprocess import inference_settings


def evaluate(model, data, split: Optional[str] = None, device="auto", tile: Optional[int] = None,
             progress: Optional[Callable[[int, int], None]] = None, cancel: Optional[Callable[[], bool]] = None,
             include: Optional[Sequence[str]] = None, flips: Optional[bool] = None,
             threshold: Optional[float] = None, largest_component: Optional[bool] = None,
             instances: Optional[bool] = None) -> dict:
    """``{"dice", "iou", "hd95", "n", "hd95_undefined", "inference", "per_image": [...]}``, means
    over images; ``inference`` holds the settings the labels were made with.

    ``include``: stem patterns (``fnmatch``, e.g. ``["benign_*", "malignant_*"]``) that pick
    the pairs of a dataset folder to score; a pattern that matches nothing is an error.
    ``flips``, ``threshold``, ``largest_component``: as :func:`segment` (None: the model's own).

    HD95 is undefined for an image where exactly one of prediction and truth is
    empty; those are left out of the mean and counted in ``hd95_undefined``.

    ``instances`` (default: whether the model is an instance model) also scores objects: the
    masks are read as instance labels (one id per object; a mask of one value is split into its
    connected components), a binary model's objects are the connected components of its
    foreground, and the result gains ``accuracy50``, ``accuracy75`` (TP/(TP+FP+FN) at IoU 0.5
    and 0.75), ``dsb`` (the 2018 Data Science Bowl score) and ``pq`` (panoptic quality), each
    the mean over images, and ``accuracy50_pooled``, ``accuracy75_pooled`` and ``pq_pooled``
    from the counts of all images together (as StarDist's ``matching_dataset`` reports them).
    """
    model = model if isinstance(model, SegmentationModel) else load_model(model, device=device)
    settings = inference_settings(model.info, flips, threshold, largest_component)
    objects = bool(model.info.instances) if instances is None else bool(instances)
    if objects and not model.binary:
        raise ValueError(f"evaluate: instances=True scores objects of a binary or instance model; {model.name} has "
                         f"{model.info.num_classes} classes")
    items = scored_pairs(data, split, include)
    per_image = []
    for i, item in enumerate(items):
        if cancel is not None and cancel():
            raise Cancelled("evaluation cancelled")
        name, image, truth = load_instance_pair(item, i) if objects else load_pair(item, i, model.info.num_classes)
        pred = segment(image, model=model, tile=tile, **settings)
        scores = per_class_scores(pred > 0 if objects else pred, truth > 0 if objects else truth,
                                  model.info.num_classes)
        if objects:
            found = pred if model.info.instances else connected_objects(pred)
            scores.update(instance_scores(found, truth), objects=int(found.max()), true_objects=int(truth.max()))
        per_image.append({"name": name, **scores})
        if progress is not None:
            progress(i + 1, len(items))
    summary = summarize(per_image)
    if objects:
        summary.update(summarize_instances(per_image))
    return {**summary, "inference": settings}


def scored_pairs(data, split: Optional[str] = None, include: Optional[Sequence[str]] = None) -> list:
    """The pairs to score: a dataset folder's (its ``split``, the stems matching ``include``),
    or a list of (image, mask) arrays as given."""
    items = find_pairs(data, split) if isinstance(data, (str, os.PathLike)) else list(data)
    return pairs_matching(items, include, data) if include else items


def summarize(per_image) -> dict:
    (dice, _), (iou, _) = (mean_finite(s[key] for s in per_image) for key in ("dice", "iou"))
    hd95, undefined = mean_finite(s["hd95"] for s in per_image)
    return {"dice": dice, "iou": iou, "hd95": hd95, "n": len(per_image), "hd95_undefined": undefined,
            "per_image": per_image}


def summarize_instances(per_image) -> dict:
    """Means over images of the object scores, and the pooled accuracies and PQ."""
    out = {key: float(np.mean([s[key] for s in per_image])) if per_image else float("nan")
           for key in ("accuracy50", "accuracy75", "dsb", "pq")}
    for t in ("50", "75"):
        tp, fp, fn = (sum(s[f"{k}{t}"] for s in per_image) for k in ("tp", "fp", "fn"))
        out[f"accuracy{t}_pooled"] = tp / (tp + fp + fn) if tp + fp + fn else 1.0
    tp, fp, fn = (sum(s[f"{k}50"] for s in per_image) for k in ("tp", "fp", "fn"))
    matched = sum(s["sum_iou50"] for s in per_image)
    out["pq_pooled"] = matched / (tp + 0.5 * fp + 0.5 * fn) if tp + fp + fn else 1.0
    return out


def load_instance_pair(item, index):
    """(name, image, instance labels) of a pair, the mask read as instances (instances.instance_mask)."""
    if isinstance(item, tuple):
        image, mask = item
        return f"pair {index}", np.asarray(image), instance_mask(mask, f"the mask of pair {index}")
    return item.stem, read_image(item.image), read_instances(item.mask)


def load_pair(item, index, num_classes):
    if isinstance(item, tuple):
        image, mask = item
        return f"pair {index}", np.asarray(image), mask_classes(np.asarray(mask), num_classes, f"the mask of pair {index}")
    return (item.stem, *read_pair(item, num_classes))     # a file pair, or a slice of a pair of scans
