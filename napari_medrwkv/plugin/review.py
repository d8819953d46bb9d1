"""Which corrected slices the user has reviewed, kept in the Labels layers themselves.

A Labels layer made by the Segment widget carries ``metadata["napari_medrwkv"]``:
``{"image": <image layer name>, "model": <source>, "digests": [sha1 of each slice as the plugin
wrote it], "reviewed": [slice indices], "axis": <the array axis the slices are planes across>}``.
A 2-D layer has the single slice 0.  A stack's slices are its planes across axis 0, except for a
scan (its geometry in the layer's metadata, :mod:`engine.scans`): there they are the planes the
scanner acquired (a sagittal scan's slices run along its last axis).  The axis is kept in the
metadata from the first mark or write, so the marks always mean the same planes.  The
Correct widget marks slices; the Fine-tune widget learns from them.  No Qt,
no torch: plain functions over napari layers and numpy arrays.
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
from psygnal import Signal

KEY = "napari_medrwkv"


class _Events:
    changed = Signal(object)         # the Labels layer whose reviewed slices changed


_events = _Events()
#: Emitted with the Labels layer after its reviewed slices change (metadata changes send no napari event).
changed = _events.changed


@dataclass
class ReviewedPair:
    image_name: str
    labels_name: str
    index: int                 # slice index (0 for a 2-D image), across the layer's slice axis
    image: np.ndarray          # (Y, X) or (Y, X, C): the plane
    mask: np.ndarray           # (Y, X) integer labels

    @property
    def stem(self) -> str:
        return f"{safe_name(self.image_name)}_z{self.index:04d}"


def link(labels_layer, image_name: str) -> None:
    """Record which image layer ``labels_layer`` annotates."""
    labels_layer.metadata.setdefault(KEY, {})["image"] = image_name


_FOLLOWED = []                  # layer lists whose image renames are followed (weakly, see follow_renames)


def follow_renames(layers) -> None:
    """Keep links to an image layer when the user renames it: the Labels layers that annotate it
    (their reviewed slices are pairs for fine-tuning) follow the new name.  Once per layer list."""
    import weakref
    if any(ref() is layers for ref in _FOLLOWED):
        return
    _FOLLOWED[:] = [ref for ref in _FOLLOWED if ref() is not None] + [weakref.ref(layers)]
    names = {}                  # id(image layer) -> its name before the rename

    def watch(layer):
        if getattr(layer, "_type_string", "") == "image" and id(layer) not in names:
            names[id(layer)] = layer.name
            # First in line: the layer list's own "renamed" (which widgets follow) comes after it.
            layer.events.name.connect(lambda event, layer=layer: renamed(layer), position="first")

    def renamed(image_layer):
        old, new = names.get(id(image_layer)), image_layer.name
        names[id(image_layer)] = new
        if old is None or old == new:
            return
        for layer in layers:
            if getattr(layer, "_type_string", "") == "labels" and linked_image(layer) == old:
                link(layer, new)

    def inserted(event):
        watch(event.value)

    def removed(event):
        names.pop(id(event.value), None)

    layers.events.inserted.connect(inserted)
    layers.events.removed.connect(removed)
    for layer in layers:
        watch(layer)


def linked_image(labels_layer):
    return labels_layer.metadata.get(KEY, {}).get("image")


def slice_axis(labels_layer) -> int:
    """The array axis a 3-D layer's slices are planes across: the one kept in its metadata, else
    its scan's acquisition axis (sagittal, coronal or axial), else 0."""
    if labels_layer.data.ndim != 3:
        return 0
    meta = labels_layer.metadata
    if meta.get(KEY, {}).get("axis") is not None:
        return int(meta[KEY]["axis"])
    from ..engine.scans import METADATA_KEY as SCAN_GEOMETRY
    geometry = meta.get(SCAN_GEOMETRY) or {}
    if tuple(geometry.get("shape", ())) == tuple(labels_layer.data.shape):
        return int(geometry.get("slice_axis", 0))
    return 0


def _keep_axis(labels_layer) -> None:
    """Pin the slice axis in the metadata: later marks mean the same planes as earlier ones."""
    if labels_layer.data.ndim == 3:
        labels_layer.metadata.setdefault(KEY, {})["axis"] = slice_axis(labels_layer)


def slice_count(labels_layer) -> int:
    return 1 if labels_layer.data.ndim == 2 else labels_layer.data.shape[slice_axis(labels_layer)]


def take_slice(data, index: int, axis: int):
    """Slice ``index`` of a stack: its plane across ``axis`` (channels, if any, stay last)."""
    return data[(slice(None),) * axis + (index,)]


def plane_shape(labels_layer) -> tuple:
    """The (Y, X) shape of one slice of ``labels_layer``."""
    shape = list(labels_layer.data.shape)
    if len(shape) == 3:
        del shape[slice_axis(labels_layer)]
    return tuple(shape)


def _slices(data, axis: int = 0) -> list:
    return [data] if data.ndim == 2 else [take_slice(data, i, axis) for i in range(data.shape[axis])]


def _digest(data: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(data).view(np.uint8)).hexdigest()


def record_written(labels_layer, model: str) -> None:
    """Remember the labels as the plugin wrote them (and which model), so that later edits show."""
    _keep_axis(labels_layer)
    labels_layer.metadata.setdefault(KEY, {}).update(model=model, digests=[
        _digest(plane) for plane in _slices(np.asarray(labels_layer.data), slice_axis(labels_layer))])


def edited_slices(labels_layer) -> List[int]:
    """The slices whose labels differ from what the plugin last wrote into them (every slice of a
    layer the plugin did not write)."""
    data = np.asarray(labels_layer.data)
    written = labels_layer.metadata.get(KEY, {}).get("digests")
    if written is None or len(written) != slice_count(labels_layer):
        return list(range(slice_count(labels_layer)))
    planes = _slices(data, slice_axis(labels_layer))
    return [i for i, (plane, digest) in enumerate(zip(planes, written)) if _digest(plane) != digest]


def user_edited(labels_layer) -> bool:
    """True when a Labels layer differs from what the plugin last wrote into it."""
    return bool(edited_slices(labels_layer))


def reviewed(labels_layer) -> List[int]:
    return sorted(labels_layer.metadata.get(KEY, {}).get("reviewed", []))


def set_reviewed(labels_layer, index: int, value: bool = True) -> None:
    if not 0 <= index < slice_count(labels_layer):
        raise ValueError(f"slice {index} is outside {labels_layer.name} (0..{slice_count(labels_layer) - 1})")
    _keep_axis(labels_layer)
    marks = set(reviewed(labels_layer))
    before = set(marks)
    marks.add(index) if value else marks.discard(index)
    labels_layer.metadata.setdefault(KEY, {})["reviewed"] = sorted(marks)
    if marks != before:
        changed.emit(labels_layer)


def write_slices(labels_layer, planes: Dict[int, np.ndarray]):
    """Write ``{slice index: labels}`` into ``labels_layer`` as ONE step of napari's undo, as the
    user's own edits are: review marks stay as they are.  A 2-D layer is slice 0; a stack's slices
    are across its :func:`slice_axis`.  Returns (the slices that changed, the number of pixels changed)."""
    data = labels_layer.data
    axis = slice_axis(labels_layer)
    indices, values, changed_slices = [], [], []
    for index, plane in sorted(planes.items()):
        before = np.asarray(data if data.ndim == 2 else take_slice(data, index, axis))
        if before.shape != plane.shape:
            raise ValueError(f"labels of shape {plane.shape} do not fit slice {index} of {labels_layer.name} "
                             f"({before.shape})")
        where = np.nonzero(before != plane)
        if where[0].size == 0:
            continue
        changed_slices.append(index)
        values.append(plane[where])
        indices.append(where if data.ndim == 2 else
                       where[:axis] + (np.full(where[0].size, index, dtype=np.intp),) + where[axis:])
    if not indices:
        return [], 0
    where = tuple(np.concatenate(axis) for axis in zip(*indices))
    with labels_layer.block_history():          # everything inside is one undo step
        labels_layer.data_setitem(where, np.concatenate(values).astype(data.dtype, copy=False))
    return changed_slices, int(where[0].size)


def replace_slices(labels_layer, planes: Dict[int, np.ndarray]) -> int:
    """:func:`write_slices` for labels the plugin computed: every slice whose labels changed is
    unmarked (nobody has reviewed the new labels).  Returns the number of pixels changed."""
    changed_slices, pixels = write_slices(labels_layer, planes)
    for index in changed_slices:
        set_reviewed(labels_layer, index, False)
    return pixels


def reviewed_pairs(layers) -> List[ReviewedPair]:
    """Every reviewed (image slice, labels slice) in a napari layer list."""
    pairs = []
    for layer in layers:
        image_name = linked_image(layer) if getattr(layer, "_type_string", "") == "labels" else None
        if image_name is None or image_name not in layers:
            continue
        image_layer = layers[image_name]
        image = np.asarray(image_layer.data)
        axis = slice_axis(layer)
        for index in reviewed(layer):
            if layer.data.ndim == 2:
                pairs.append(ReviewedPair(image_name, layer.name, 0, image, np.asarray(layer.data)))
            else:
                pairs.append(ReviewedPair(image_name, layer.name, index, take_slice(image, index, axis),
                                          np.asarray(take_slice(layer.data, index, axis))))
    return pairs


def save_training_folder(pairs: List[ReviewedPair], folder) -> Path:
    """Write reviewed pairs as a training folder (see :func:`write_training_pairs`)."""
    write_training_pairs(folder, [(p.stem, p.image, p.mask) for p in pairs])
    return Path(folder)


def write_training_pairs(folder, items) -> List[str]:
    """Write ``(stem, image, mask)`` items as ``folder/images/<stem>.tif`` + ``folder/masks/<stem>.tif``,
    the layout ``medrwkv train`` reads; every file atomically.  Existing files with the same
    names are an error, checked before anything is written, and again as each file is put in
    place (another program may write there meanwhile): nothing is ever overwritten."""
    from ..engine.imageio import write_labels  # atomic; no torch
    folder = Path(folder)
    targets = [(folder / "images" / f"{stem}.tif", folder / "masks" / f"{stem}.tif", image, mask)
               for stem, image, mask in items]
    clashes = [str(path) for target in targets for path in target[:2] if path.exists()]
    if clashes:
        raise FileExistsError(f"{clashes[0]} already exists ({len(clashes)} files); choose an empty folder")
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    written = []
    for image_path, mask_path, image, mask in targets:
        written.append(str(write_labels(image_path, np.asarray(image), overwrite=False)))
        written.append(str(write_labels(mask_path, _compact(np.asarray(mask)), overwrite=False)))
    return written


def _compact(mask: np.ndarray) -> np.ndarray:
    """The smallest unsigned integer type that holds every label id (napari's are int32/int64)."""
    top = int(mask.max(initial=0))
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max and mask.min(initial=0) >= 0:
            return mask.astype(dtype)
    return mask


def safe_name(name: str) -> str:
    """``name`` with everything but letters, digits and ``-_.`` replaced, for file names."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
