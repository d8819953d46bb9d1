"""From probabilities to labels: a model's inference settings and the largest-object filter.

A checkpoint's ``inference`` settings (see :data:`.checkpoint.INFERENCE_DEFAULTS`) are the
defaults; a caller's explicit argument wins.  numpy and scipy only.
"""
from typing import Any, Dict, Optional

import numpy as np
from scipy import ndimage

from .checkpoint import check_inference

_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def inference_settings(info, flips: Optional[bool] = None, threshold: Optional[float] = None,
                       largest_component: Optional[bool] = None) -> Dict[str, Any]:
    """The model's settings (``info.inference``) with every argument that is not None put over
    them, checked: a threshold outside (0, 1), or a threshold or largest-object filter for a
    multi-class model, is a ValueError."""
    asked = {"flips": flips, "threshold": threshold, "largest_component": largest_component}
    merged = {**info.inference, **{k: v for k, v in asked.items() if v is not None}}
    try:
        return check_inference(merged, info.num_classes)
    except ValueError as err:
        raise ValueError(f"segment: {err}") from None


def binary_labels(foreground: np.ndarray, threshold: float, largest_component: bool) -> np.ndarray:
    """0/1 labels (uint8) of foreground probabilities, (Y, X) or (Z, Y, X); with
    ``largest_component`` only the largest 8-connected object of each plane stays."""
    labels = (foreground > threshold).astype(np.uint8)
    if largest_component:
        planes = labels.reshape((-1,) + labels.shape[-2:])
        for plane in planes:
            plane[...] = keep_largest_object(plane)
    return labels


def keep_largest_object(mask: np.ndarray) -> np.ndarray:
    """``mask`` (2D, 0/1) with only its largest 8-connected object (the first, on a tie); an
    empty mask stays empty."""
    objects, count = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
    if count <= 1:
        return mask
    sizes = np.bincount(objects.ravel())[1:]
    return (objects == 1 + int(np.argmax(sizes))).astype(mask.dtype)
