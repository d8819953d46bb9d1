"""Which corrected slices the user has reviewed, kept in the Labels layers themselves.

A Labels layer made by the Segment widget carries ``metadata["napari_medrwkv"]``:
``{"image": <image layer name>, "model": <source>, "digest": <sha1 of data>,
"reviewed": [slice indices]}``.  A 2-D layer has the single slice 0.  The
Correct widget marks slices; the Fine-tune widget learns from them.  No Qt,
no torch: plain functions over napari layers and numpy arrays.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np

KEY = "napari_medrwkv"


@dataclass
class ReviewedPair:
    image_name: str
    labels_name: str
    index: int                 # slice index (0 for a 2-D image)
    image: np.ndarray          # (Y, X) or (Y, X, C)
    mask: np.ndarray           # (Y, X) integer labels

    @property
    def stem(self) -> str:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.image_name)
        return f"{safe}_z{self.index:04d}"


def link(labels_layer, image_name: str) -> None:
    """Record which image layer ``labels_layer`` annotates."""
    labels_layer.metadata.setdefault(KEY, {})["image"] = image_name


def linked_image(labels_layer):
    return labels_layer.metadata.get(KEY, {}).get("image")


def slice_count(labels_layer) -> int:
    return 1 if labels_layer.data.ndim == 2 else labels_layer.data.shape[0]


def reviewed(labels_layer) -> List[int]:
    return sorted(labels_layer.metadata.get(KEY, {}).get("reviewed", []))


def set_reviewed(labels_layer, index: int, value: bool = True) -> None:
    if not 0 <= index < slice_count(labels_layer):
        raise ValueError(f"slice {index} is outside {labels_layer.name} (0..{slice_count(labels_layer) - 1})")
    marks = set(reviewed(labels_layer))
    marks.add(index) if value else marks.discard(index)
    labels_layer.metadata.setdefault(KEY, {})["reviewed"] = sorted(marks)


def reviewed_pairs(layers) -> List[ReviewedPair]:
    """Every reviewed (image slice, labels slice) in a napari layer list."""
    pairs = []
    for layer in layers:
        image_name = linked_image(layer) if getattr(layer, "_type_string", "") == "labels" else None
        if image_name is None or image_name not in layers:
            continue
        image_layer = layers[image_name]
        image = np.asarray(image_layer.data)
        for index in reviewed(layer):
            if layer.data.ndim == 2:
                pairs.append(ReviewedPair(image_name, layer.name, 0, image, np.asarray(layer.data)))
            else:
                pairs.append(ReviewedPair(image_name, layer.name, index, image[index], np.asarray(layer.data[index])))
    return pairs


def save_training_folder(pairs: List[ReviewedPair], folder) -> Path:
    """Write pairs as ``folder/images/<stem>.tif`` + ``folder/masks/<stem>.tif`` (the layout
    ``medrwkv train`` reads).  Existing files with the same names are an error, never overwritten."""
    from .engine.io import write_labels   # atomic; no torch
    folder = Path(folder)
    targets = [(folder / "images" / f"{p.stem}.tif", folder / "masks" / f"{p.stem}.tif", p) for p in pairs]
    clashes = [str(t) for pair in targets for t in pair[:2] if t.exists()]
    if clashes:
        raise FileExistsError(f"{clashes[0]} already exists ({len(clashes)} files); choose an empty folder")
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for image_path, mask_path, pair in targets:
        write_labels(image_path, pair.image)
        write_labels(mask_path, pair.mask.astype(np.uint16 if pair.mask.max(initial=0) > 255 else np.uint8))
    return folder
