"""Dice, IoU and HD95 of a model on a dataset folder (or in-memory pairs)."""
import os
from typing import Callable, Optional, Sequence

import numpy as np

from .datasets import find_pairs, pairs_matching
from .imageio import mask_classes, read_image, read_mask
from .infer import Cancelled, segment
from .metrics import mean_finite, per_class_scores
from .model import SegmentationModel, load_model
from .postprocess import inference_settings


def evaluate(model, data, split: Optional[str] = None, device="auto", tile: Optional[int] = None,
             progress: Optional[Callable[[int, int], None]] = None, cancel: Optional[Callable[[], bool]] = None,
             include: Optional[Sequence[str]] = None, flips: Optional[bool] = None,
             threshold: Optional[float] = None, largest_component: Optional[bool] = None) -> dict:
    """``{"dice", "iou", "hd95", "n", "hd95_undefined", "inference", "per_image": [...]}``, means
    over images; ``inference`` holds the settings the labels were made with.

    ``include``: stem patterns (``fnmatch``, e.g. ``["benign_*", "malignant_*"]``) that pick
    the pairs of a dataset folder to score; a pattern that matches nothing is an error.
    ``flips``, ``threshold``, ``largest_component``: as :func:`segment` (None: the model's own).

    HD95 is undefined for an image where exactly one of prediction and truth is
    empty; those are left out of the mean and counted in ``hd95_undefined``.
    """
    model = model if isinstance(model, SegmentationModel) else load_model(model, device=device)
    settings = inference_settings(model.info, flips, threshold, largest_component)
    items = scored_pairs(data, split, include)
    per_image = []
    for i, item in enumerate(items):
        if cancel is not None and cancel():
            raise Cancelled("evaluation cancelled")
        name, image, truth = load_pair(item, i, model.info.num_classes)
        pred = segment(image, model=model, tile=tile, **settings)
        scores = per_class_scores(pred, truth, model.info.num_classes)
        per_image.append({"name": name, **scores})
        if progress is not None:
            progress(i + 1, len(items))
    return {**summarize(per_image), "inference": settings}


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


def load_pair(item, index, num_classes):
    if isinstance(item, tuple):
        image, mask = item
        return f"pair {index}", np.asarray(image), mask_classes(np.asarray(mask), num_classes, f"the mask of pair {index}")
    return item.stem, read_image(item.image), read_mask(item.mask, num_classes)
