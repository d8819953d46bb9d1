"""Instances: one label per object (nuclei, cells), from a model that predicts what separates them.

An *instance model* (``ModelInfo.instances``) is a binary model with one output channel more:
channel 0 is the object (foreground) probability as in any binary model, channel 1 says what
separates touching objects, in one of two kinds:

* ``"border"``: the probability of a *touching border*, the thin strip where two objects meet,
  the design of the 2018 Data Science Bowl winners (selimsef/dsb2018_topcoders; torch-em's
  ``watershed_from_components``): seeds are the object pixels away from any touching border,
  and a seeded watershed on the object probability grows each seed to its object.
* ``"distance"``: each object pixel's distance to the nearest pixel outside its object (the
  background or another object), divided by the object's largest, so 1 at every object's
  centre and 0 at its edge, as micro-sam's distance decoder and StarDist's object probability
  predict: seeds are where it exceeds one half, grown by a watershed on the distance.  A dense
  target, learnt in far fewer steps than the thin border (bench/RESULTS.md, "Instances").

Training targets come from instance masks (uint16 labels, one id per object) automatically:
:func:`encode_targets` packs the foreground, the touching border and the distance (in 63
steps) into one small integer map, so that scaling, cropping, flips and rotations of training
patches treat them as any label map.  numpy, SciPy and scikit-image only.
"""
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from scipy import ndimage

#: The kinds of instance model: "" is a plain (foreground or class) model.
INSTANCE_KINDS = {"": "foreground or classes, no instances",
                  "border": "foreground + the border between touching objects, then a seeded watershed",
                  "distance": "foreground + each object's distance to its edge, then a seeded watershed"}

#: Bits of an encoded target (:func:`encode_targets`): foreground, touching border; the
#: normalised distance, in DISTANCE_STEPS steps, above them.
FOREGROUND_BIT, BORDER_BIT, DISTANCE_SHIFT, DISTANCE_STEPS = 1, 2, 2, 63

#: Half-width in pixels of the touching-border strip: pixels whose (2w+1)² window holds two objects.
BORDER_WIDTH = 2

#: Seeds smaller than this (pixels, at the network's scale) are dropped: specks between two
#: borders, not objects (the topcoders dropped components under ~12 px at 256² crops).
MIN_SEED = 8

#: A "distance" model's seeds: where the predicted distance exceeds this.  Chosen on the DSB2018
#: val images (0.3-0.8 tried, with the fg threshold 0.4-0.6 and MIN_SEED 4-16: DSB score
#: 0.578-0.584 from 0.6 up; bench/RESULTS.md, "Instances").
DISTANCE_SEED = 0.6

_FOUR = ndimage.generate_binary_structure(2, 1)
_EIGHT = np.ones((3, 3), dtype=bool)


def check_kind(kind) -> str:
    """``kind`` as a known instance kind ("", "border" or "distance"), else a ValueError naming it."""
    kind = "" if kind is None else kind
    if kind not in INSTANCE_KINDS:
        raise ValueError(f"instances={kind!r}: use one of " + "; ".join(f"{k!r} ({v})" for k, v in INSTANCE_KINDS.items()))
    return kind


def extra_channels(kind: str) -> int:
    """Output channels an instance kind adds to the model's class channels."""
    return 1 if kind else 0


def label_dtype(count: int) -> np.dtype:
    """uint16 for up to 65535 objects, uint32 beyond (napari and TIFF take both)."""
    return np.dtype(np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32)


# --------------------------------------------------------------------------- ground truth

def instance_mask(array, name: str) -> np.ndarray:
    """A 2-D instance label image (0 background, one id per object) from a mask array, checked.

    A mask holding a single foreground value (0/255, 0/1: a binary mask, or one object) has
    its objects found as 8-connected components: without ids there is nothing better to go
    by.  Negative or fractional ids, stacks and colour masks are a DataError naming ``name``."""
    from .imageio import DataError, channels_equal
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        if array.shape[-1] > 1 and not channels_equal(array):
            raise DataError(f"{name} is a colour image; save instance labels as one channel (0 = background, "
                            "1..N = objects)")
        array = array[..., 0]
    if array.ndim != 2:
        raise DataError(f"{name} has shape {array.shape}; expected one 2-D label image")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise DataError(f"{name} has fractional or non-finite values; instance ids are whole numbers")
    if array.size and array.min() < 0:
        raise DataError(f"{name} has negative id {array.min():g}; instance ids are 0 (background) and 1..N")
    values = np.unique(array)
    values = values[values != 0]
    if values.size == 1:
        return ndimage.label(array != 0, structure=_EIGHT)[0]
    return array.astype(np.int64)


def read_instances(path) -> np.ndarray:
    """The instance labels of a mask file (see :func:`instance_mask`)."""
    from .imageio import _read_array
    path = Path(path)
    return instance_mask(_read_array(path, "mask", palette_index=True), f"mask {path}")


def instance_pair(pair) -> Tuple[np.ndarray, np.ndarray]:
    """(image, instance labels) of a training pair: a datasets.Pair of files or an (image, labels) tuple;
    the sizes are checked as :func:`.datasets.check_pair` checks them."""
    from .datasets import check_pair
    if isinstance(pair, tuple):
        image, _ = check_pair(pair, 1)
        return image, instance_mask(pair[1], "the in-memory mask")
    image, _ = check_pair(pair, 1)
    return image, read_instances(pair.mask)


# --------------------------------------------------------------------------- training targets

def touching_border(labels: np.ndarray, width: int = BORDER_WIDTH) -> np.ndarray:
    """Pixels whose (2*width+1)² window holds two different objects: the strip where objects touch
    or nearly touch (background gaps of up to ~2*width pixels between them included)."""
    labels = np.asarray(labels)
    size = 2 * int(width) + 1
    labels = labels.astype(np.int64)
    top = ndimage.maximum_filter(labels, size=size)
    empty = int(top.max()) + 1          # not int64's maximum: SciPy's filters lose it
    bottom = ndimage.minimum_filter(np.where(labels > 0, labels, empty), size=size)
    return (bottom != empty) & (top != bottom)


def object_distance(labels: np.ndarray) -> np.ndarray:
    """Each object pixel's distance to the nearest pixel outside its object (background or another
    object), divided by that object's largest: 1 at the centre of every object, 0 outside (float32)."""
    labels = np.asarray(labels).astype(np.int64)
    inside = labels > 0
    # A pixel with a 4-neighbour of another object counts as outside, so touching objects part.
    padded = np.pad(labels, 1)
    centre = padded[1:-1, 1:-1]
    other = np.zeros(labels.shape, bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        near = padded[1 + dy:1 + dy + labels.shape[0], 1 + dx:1 + dx + labels.shape[1]]
        other |= (near > 0) & (near != centre)
    distance = ndimage.distance_transform_edt(inside & ~other).astype(np.float32)
    distance[inside & other] = 0.5          # the meeting line: inside its object, at its edge
    if not inside.any():
        return distance
    top = np.zeros(int(labels.max()) + 1, np.float32)
    np.maximum.at(top, labels.ravel(), distance.ravel())
    return np.where(inside, distance / np.maximum(top[labels], 1e-6), 0).astype(np.float32)


def encode_targets(labels: np.ndarray, width: int = BORDER_WIDTH) -> np.ndarray:
    """The training target of an instance model as one int16 map: bit 0 foreground, bit 1 touching
    border, and above them the normalised :func:`object_distance` in :data:`DISTANCE_STEPS` steps."""
    labels = np.asarray(labels)
    code = (labels > 0).astype(np.int16) * FOREGROUND_BIT
    code[touching_border(labels, width)] |= BORDER_BIT
    steps = np.rint(object_distance(labels) * DISTANCE_STEPS).astype(np.int16)
    return code | (steps << DISTANCE_SHIFT)


def decode_targets(code):
    """(foreground, border, valid) of an encoded target (numpy or torch); padding (-1) is not valid."""
    valid = code >= 0
    return (code & FOREGROUND_BIT) > 0, (code & BORDER_BIT) > 0, valid


def decode_distance(code):
    """The normalised distance (0..1) of an encoded target (numpy or torch; padding gives garbage,
    masked by ``valid``)."""
    return ((code >> DISTANCE_SHIFT) & DISTANCE_STEPS) / DISTANCE_STEPS


# --------------------------------------------------------------------------- post-processing

def instances_from_probabilities(foreground: np.ndarray, border: np.ndarray, threshold: float = 0.5,
                                 seed_threshold: float = 0.5, min_seed: int = MIN_SEED) -> np.ndarray:
    """Instance labels 1..N (uint16, uint32 beyond 65535 objects) of a "border" model's plane.

    Objects are the pixels with ``foreground > threshold``; seeds the 4-connected components of
    ``foreground * (1 - border) > seed_threshold`` of at least ``min_seed`` pixels; a seeded
    watershed on ``-foreground`` inside the objects grows each seed to its object.  An object
    with no seed (too small, or all border) keeps its own label."""
    foreground = np.asarray(foreground, dtype=np.float32)
    seeds = foreground * (1 - np.asarray(border, dtype=np.float32)) > seed_threshold
    return seeded_watershed(foreground > threshold, seeds, foreground, min_seed)


def instances_from_distance(foreground: np.ndarray, distance: np.ndarray, threshold: float = 0.5,
                            seed_threshold: float = DISTANCE_SEED, min_seed: int = MIN_SEED) -> np.ndarray:
    """Instance labels 1..N of a "distance" model's plane: objects where ``foreground > threshold``,
    seeds where the predicted distance exceeds ``seed_threshold``, grown by a watershed on it.
    Foreground that no seed reaches is dropped: where the model sees no object centre it mostly
    saw no object (on the DSB2018 val images, keeping those parts cost 0.03 of the DSB score)."""
    distance = np.asarray(distance, dtype=np.float32)
    return seeded_watershed(np.asarray(foreground) > threshold, distance > seed_threshold, distance, min_seed,
                            keep_unseeded=False)


def seeded_watershed(mask: np.ndarray, seed_mask: np.ndarray, height: np.ndarray, min_seed: int = MIN_SEED,
                     keep_unseeded: bool = True):
    """Labels 1..N of ``mask``: the 4-connected components of ``seed_mask & mask`` of at least
    ``min_seed`` pixels grown over ``mask`` by a watershed flooding from the highest ``height``
    down; each part of ``mask`` no seed reaches keeps a label of its own (``keep_unseeded``) or
    becomes background."""
    from skimage.segmentation import watershed
    if not mask.any():
        return np.zeros(mask.shape, np.uint16)
    seeds, count = ndimage.label(seed_mask & mask, structure=_FOUR)
    if count:
        sizes = np.bincount(seeds.ravel())
        small = sizes < min_seed
        small[0] = False
        if small.any():
            keep = (np.cumsum(~small) - 1) * ~small          # the kept seeds renumbered 1..n
            seeds = keep[seeds]
            count = int(keep.max())
    labels = watershed(-height, seeds, mask=mask) if count else np.zeros(mask.shape, np.int32)
    # What the watershed could not reach: objects without a seed of their own.
    orphans, extra = ndimage.label(mask & (labels == 0), structure=_EIGHT) if keep_unseeded else (None, 0)
    if extra:
        labels = np.where(orphans > 0, orphans + count, labels)
    return labels.astype(label_dtype(count + extra))


def connected_objects(mask: np.ndarray) -> np.ndarray:
    """The 8-connected components of a foreground mask as instance labels: what a foreground
    model's output means as instances (touching objects become one)."""
    labels, count = ndimage.label(np.asarray(mask) > 0, structure=_EIGHT)
    return labels.astype(label_dtype(count))


def keep_largest_instance(labels: np.ndarray) -> np.ndarray:
    """Only the largest object of an instance label image, as id 1."""
    sizes = np.bincount(labels.ravel())
    if sizes.size <= 1 or sizes[1:].max() == 0:
        return labels
    return (labels == 1 + int(np.argmax(sizes[1:]))).astype(labels.dtype)


def plane_instances(probs: np.ndarray, threshold: float = 0.5, largest_component: bool = False,
                    kind: str = "border") -> np.ndarray:
    """Instance labels of one plane's stitched probabilities (channels first: foreground, then the
    border or distance of ``kind``), as ``segment`` makes them for an instance model."""
    separate = instances_from_distance if kind == "distance" else instances_from_probabilities
    labels = separate(probs[0], probs[1], threshold)
    return keep_largest_instance(labels) if largest_component else labels
