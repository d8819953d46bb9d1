"""napari writers: labels as PNG (napari's own writer has TIFF but not PNG), and an
image + labels pair as a training folder (``images/`` + ``masks/``, what ``medrwkv train``
reads).  Files are written atomically and never overwritten."""
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np

from .engine.io import write_labels


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
    slices = [(image, mask, "")] if mask.ndim == 2 else [(image[z], mask[z], f"_z{z:04d}") for z in range(len(mask))]
    folder, stem = Path(path), _safe(image_meta.get("name", "image"))
    targets = [(folder / "images" / f"{stem}{suffix}.tif", folder / "masks" / f"{stem}{suffix}.tif", img, msk)
               for img, msk, suffix in slices]
    clashes = [str(p) for t in targets for p in t[:2] if p.exists()]
    if clashes:
        raise FileExistsError(f"{clashes[0]} already exists ({len(clashes)} files); choose an empty folder")
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    written = []
    for image_path, mask_path, img, msk in targets:
        written += [str(write_labels(image_path, img)), str(write_labels(mask_path, msk))]
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
