"""napari writers: labels as PNG (napari's own writer has TIFF but not PNG), and an
image + labels pair as a training folder (``images/`` + ``masks/``, what ``medrwkv train``
reads).  Files are written atomically and never overwritten."""
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np

from ..engine.imageio import write_labels
from .review import safe_name, write_training_pairs


def write_labels_png(path: str, data: Any, meta: dict) -> List[str]:
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError(f"{path}: PNG holds one 2-D label image; this layer is {data.ndim}-D {data.shape}. "
                         "Save stacks as .tif.")
    if Path(path).exists():
        raise FileExistsError(f"{path} already exists; choose another name (labels are never overwritten)")
    return [str(write_labels(path, data))]


def write_training_folder(path: str, layer_data: List[Tuple[Any, dict, str]]) -> List[str]:
    images = [(d, m) for d, m, kind in layer_data if kind == "image"]
    labels = [(d, m) for d, m, kind in layer_data if kind == "labels"]
    if len(images) != 1 or len(labels) != 1:
        raise ValueError("Select exactly one image layer and one labels layer to save a training folder.")
    (image, image_meta), (mask, _) = images[0], labels[0]
    image, mask = np.asarray(image), np.asarray(mask)
    spatial = image.shape[:-1] if image_meta.get("rgb") else image.shape
    if spatial != mask.shape:
        raise ValueError(f"The image is {spatial} but the labels are {mask.shape}; they must match.")
    stem = safe_name(image_meta.get("name", "image"))
    if mask.ndim == 2:
        return write_training_pairs(path, [(stem, image, mask)])
    return write_training_pairs(path, [(f"{stem}_z{z:04d}", image[z], mask[z]) for z in range(len(mask))])
