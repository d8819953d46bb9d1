"""Correction helpers for 2-D label images (numpy, scipy and scikit-image only).

Every function takes a 2-D integer (or boolean) label array -- ``0`` is the
background, any other value an object id; binary masks (0/1) and instance
labels (1..N) alike -- and returns a NEW array of the same shape and dtype.
The input is never modified.

Conventions
-----------
* An *object* is a connected component of pixels sharing one label value, with
  8-connectivity (diagonal neighbours touch).  Two touching objects with
  different ids stay two objects.
* A *hole* of an object is a region of background pixels that the object alone
  encloses (the background region does not reach the image edge through
  4-connected non-object pixels).  A gap enclosed only by two touching objects
  together is not a hole of either.
* No helper ever turns one object id into another: pixels become background or
  background becomes an id; an existing non-zero pixel is never given a
  different non-zero value.

:func:`changed` gives the pixels that differ between two arrays, which is what
the Correct widget hands to napari's undoable ``Labels.data_setitem``.
"""
from typing import Iterator, Sequence, Tuple

import numpy as np
from scipy import ndimage

Point = Sequence[int]

_EIGHT = np.ones((3, 3), dtype=bool)


def _check(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D label image, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise TypeError(f"expected integer labels, got dtype {labels.dtype}")
    return labels


def _ids(labels: np.ndarray) -> np.ndarray:
    """The array with integer semantics (booleans viewed as uint8, no copy)."""
    return labels.view(np.uint8) if labels.dtype == bool else labels


def _objects(labels: np.ndarray, margin: int = 0) -> Iterator[Tuple[int, Tuple[slice, slice]]]:
    """``(label id, bounding box grown by margin and clipped to the image)`` for each non-zero id."""
    for value, where in ndimage.value_indices(_ids(labels), ignore_value=0).items():
        box = tuple(slice(max(int(axis.min()) - margin, 0), min(int(axis.max()) + 1 + margin, size))
                    for axis, size in zip(where, labels.shape))
        yield value, box


def _pixel(labels: np.ndarray, point: Point) -> Tuple[int, int]:
    if len(point) != 2:
        raise ValueError(f"expected a (y, x) point, got {tuple(point)}")
    return int(round(float(point[0]))), int(round(float(point[1])))


def object_at(labels, point: Point) -> np.ndarray:
    """Boolean mask of the object under ``point = (y, x)``.

    The 8-connected component of the clicked pixel's label value.  A background
    pixel, or a point outside the image, gives an all-False mask.
    """
    labels = _check(labels)
    y, x = _pixel(labels, point)
    mask = np.zeros(labels.shape, dtype=bool)
    if not (0 <= y < labels.shape[0] and 0 <= x < labels.shape[1]) or labels[y, x] == 0:
        return mask
    same, _ = ndimage.label(labels == labels[y, x], structure=_EIGHT)
    return same == same[y, x]


def delete_object(labels, point: Point) -> np.ndarray:
    """The object under ``point`` set to background (a background click changes nothing)."""
    labels = _check(labels)
    out = labels.copy()
    out[object_at(labels, point)] = 0
    return out


def keep_object(labels, point: Point) -> np.ndarray:
    """Only the object under ``point`` kept; everything else, other pieces of the same id
    included, set to background.  A background click leaves an empty image."""
    labels = _check(labels)
    mask = object_at(labels, point)
    out = np.zeros_like(labels)
    out[mask] = labels[mask]
    return out


def fill_holes(labels) -> np.ndarray:
    """Background holes enclosed by one object id become that id.

    Holes are filled per label id (all pieces of the id together).  Only
    background pixels are filled: another object sitting inside a hole keeps its
    id.  When ids are nested (an object inside another's hole, with its own
    hole), the innermost enclosing id gets the pixels.
    """
    labels = _check(labels)
    out = labels.copy()
    candidates = []
    for value, box in _objects(labels):
        crop = labels[box]
        mask = crop == value
        filled = ndimage.binary_fill_holes(mask)
        holes = filled & (crop == 0)
        if holes.any():
            candidates.append((int(filled.sum()), value, box, holes))
    candidates.sort(key=lambda c: c[0])            # innermost (smallest) enclosure first
    for _, value, box, holes in candidates:
        target = out[box]                          # a view: writes go to ``out``
        target[holes & (target == 0)] = value
    return out


def remove_small(labels, min_size: int) -> np.ndarray:
    """Objects (8-connected pieces of one id) with fewer than ``min_size`` pixels set to
    background.  Each piece of an id is judged on its own."""
    labels = _check(labels)
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    out = labels.copy()
    if min_size <= 1 or not labels.any():
        return out
    from skimage.measure import label as connected

    pieces = connected(_ids(labels), background=0, connectivity=2)   # equal values connect
    sizes = np.bincount(pieces.ravel())
    small = sizes < min_size
    small[0] = False
    out[small[pieces]] = 0
    return out


def smooth(labels, radius: int) -> np.ndarray:
    """Smoother object outlines: per object (each 8-connected piece of one id on its own), a
    binary opening then a closing with a disk of ``radius`` pixels.

    Opening removes spurs and pieces thinner than the disk (an object smaller than
    the disk disappears); closing fills notches and gaps narrower than it.  Objects
    touching the image edge are not shaved by it (outside counts as the object for
    erosion).  Objects only shrink into background or grow into background: a pixel
    of another object is never taken, a background pixel claimed by two objects stays
    background, and neighbouring objects are never merged: binary labels (every nucleus
    1) are smoothed nucleus by nucleus, and a pixel that would make two pieces of one id
    touch stays background.  ``radius`` 0 returns an unchanged copy.
    """
    labels = _check(labels)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    out = labels.copy()
    if radius == 0 or not labels.any():
        return out
    from skimage.measure import label as connected
    from skimage.morphology import disk

    footprint = disk(int(radius)).astype(bool)
    pieces = connected(_ids(labels), background=0, connectivity=2)   # equal values connect
    value_of = np.zeros(int(pieces.max()) + 1, dtype=labels.dtype)
    claims = np.zeros(labels.shape, dtype=np.uint16)
    claimant = np.zeros(labels.shape, dtype=pieces.dtype)
    kept = pieces.copy()
    # A margin of 2r+1 keeps the crop edges out of reach of the closing, so crops
    # behave like the whole image; at the image edge the crop is clipped and the
    # border values below decide.
    for piece, box in _objects(pieces, margin=2 * int(radius) + 1):
        mask = pieces[box] == piece
        value_of[piece] = labels[box][mask][0]
        opened = ndimage.binary_dilation(ndimage.binary_erosion(mask, footprint, border_value=1), footprint)
        closed = ndimage.binary_erosion(ndimage.binary_dilation(opened, footprint), footprint, border_value=1)
        kept[box][mask & ~closed] = 0
        added = closed & (labels[box] == 0)
        if added.any():
            claims[box][added] += 1
            claimant[box][added] = piece
    won = claims == 1
    kept[won] = claimant[won]
    # Two pieces of one id that come to touch would read as one object: what they gained
    # where they touch goes back to background (removing pixels never makes pieces touch).
    padded = np.pad(kept, 1)
    values = value_of[kept]
    merging = np.zeros(labels.shape, dtype=bool)
    height, width = labels.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                other = padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
                merging |= won & (other != 0) & (other != kept) & (value_of[other] == values)
    kept[merging] = 0
    out[...] = np.where(kept != 0, value_of[kept], 0).astype(labels.dtype, copy=False)
    return out


def split_object(labels, seeds: Sequence[Point]) -> np.ndarray:
    """The object under the first of two or more ``seeds`` split into one object per seed: a
    seeded watershed on the distance to the object's edge (so the cuts run through its necks),
    confined to the object.  The first seed's part keeps the object's id, the others take new
    ids above the image's largest.  A seed on the background or on another object, two seeds
    on one pixel, or ids beyond what the dtype holds are a ValueError."""
    from skimage.segmentation import watershed
    labels = _check(labels)
    if len(seeds) < 2:
        raise ValueError(f"split needs two or more seeds inside one object, got {len(seeds)}")
    pixels = [_pixel(labels, seed) for seed in seeds]
    mask = object_at(labels, pixels[0])
    if not mask.any():
        raise ValueError(f"the first seed {pixels[0]} is not on an object")
    for pixel in pixels[1:]:
        if not (0 <= pixel[0] < labels.shape[0] and 0 <= pixel[1] < labels.shape[1]) or not mask[pixel]:
            raise ValueError(f"seed {pixel} is not inside the object of the first seed {pixels[0]}; put every "
                             "seed inside the one object to split")
    if len(set(pixels)) < len(pixels):
        raise ValueError("two seeds are on the same pixel; give each part its own seed")
    value = labels[pixels[0]]
    top = int(_ids(labels).max())
    new_ids = [int(value)] + [top + i for i in range(1, len(pixels))]
    if labels.dtype != bool and new_ids[-1] > np.iinfo(labels.dtype).max:
        raise ValueError(f"the labels are {labels.dtype} and hold no id above {np.iinfo(labels.dtype).max}; "
                         "convert the layer to a wider type to split")
    if labels.dtype == bool:
        raise ValueError("a boolean mask has one id; convert it to integer labels to split objects")
    rows, cols = np.nonzero(mask)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    inside = mask[box]
    markers = np.zeros(inside.shape, np.int32)
    for k, (y, x) in enumerate(pixels, 1):
        markers[y - box[0].start, x - box[1].start] = k
    distance = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
    parts = watershed(-distance, markers, mask=inside)
    out = labels.copy()
    region = out[box]
    region[inside] = np.asarray(new_ids, dtype=labels.dtype)[parts[inside] - 1]
    return out


def merge_objects(labels, points: Sequence[Point]) -> np.ndarray:
    """The objects under ``points`` (two or more different ids, each its whole id) given the first
    one's id.  A point on the background is a ValueError; points on one id change nothing."""
    labels = _check(labels)
    values = []
    for point in points:
        y, x = _pixel(labels, point)
        if not (0 <= y < labels.shape[0] and 0 <= x < labels.shape[1]) or labels[y, x] == 0:
            raise ValueError(f"point {(y, x)} is not on an object; pick only objects to merge")
        values.append(labels[y, x])
    if len(points) < 2:
        raise ValueError(f"merge needs two or more objects, got {len(points)} point(s)")
    out = labels.copy()
    out[np.isin(labels, values[1:])] = values[0]
    return out


def changed(before, after) -> Tuple[Tuple[np.ndarray, ...], np.ndarray]:
    """``(indices, values)``: the positions where ``after`` differs from ``before`` (a tuple of
    index arrays, as ``np.nonzero`` gives) and the new values there, so that
    ``before[indices] = values`` turns ``before`` into ``after``."""
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape:
        raise ValueError(f"shapes differ: {before.shape} and {after.shape}")
    indices = np.nonzero(before != after)
    return indices, after[indices]
