"""Instance models block by block: one label per object on images larger than memory.

The whole-plane post-processing (:func:`.instances.plane_instances`) labels each 8-connected
component of the foreground mask on its own: the watershed is confined to the mask, its seeds
lie inside it, and what no seed reaches belongs to that component alone.  So a component's
objects depend only on the probabilities over that component, and the block path finds them
without a whole plane in memory:

1. the blocks' probabilities (foreground and the border or distance channel) go into a
   temporary float32 zarr store (:func:`scratch_store`), written by whoever runs the block;
2. each block's foreground components are labelled, and those that meet across block faces
   (8-connected, corners too) are joined (:func:`find_components`);
3. components inside one block are post-processed with that block read once; components across
   blocks on their joint bounding box (those starting in one block together), read from the
   store (an error names one whose own box would not fit the memory budget). Object ids are
   unique in each plane, as the whole-plane path's are, numbered block by block (the partition
   of pixels is the whole-plane one; the numbers differ), uint16 up to 65535 objects and uint32
   beyond.

The largest-object filter keeps the object with the most pixels, as id 1.
"""
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
from scipy import ndimage

from .instances import instances_from_distance, instances_from_probabilities, label_dtype

#: Bytes per pixel of a component's bounding box while it is post-processed: two float32
#: probability planes, the mask and its labels, and the watershed's float64 heights,
#: padded copies and int32 markers and output.
BYTES_PER_PIXEL = 64

_EIGHT = np.ones((3, 3), bool)


def scratch_store(out, spatial, block: int):
    """(float32 zarr array (2, *spatial) for the probabilities, its folder to remove when done):
    beside ``out`` when it is a path (a Dask cluster's workers see it there), else in the
    system's temporary folder."""
    import zarr
    parent = Path(out).parent if isinstance(out, (str, Path)) else _store_parent(out)
    if parent is not None and parent.is_dir():
        folder = parent / f".medrwkv-instances-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
    else:
        folder = Path(tempfile.mkdtemp(prefix="medrwkv-instances-"))
    chunks = (1,) + (1,) * (len(spatial) - 2) + (block, block)
    array = zarr.open_array(str(folder / "probabilities.zarr"), mode="w-", shape=(2,) + tuple(spatial),
                            chunks=chunks, dtype=np.float32, fill_value=0)
    return array, folder


def _store_parent(array) -> Optional[Path]:
    """The folder holding a zarr array's local store (None for numpy, memory or remote stores)."""
    root = getattr(getattr(array, "store", None), "root", None)
    return Path(root).parent if root is not None else None


def remove_scratch(folder) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Components:
    """The joined foreground components of one plane: for each block-local component its
    joined component (``joined``), and per joined component its bounding box and first pixel."""
    blocks: list                  # (rows, cols) of each block, in order
    offsets: List[int]            # first block-local id of each block (ids start at 0)
    joined: np.ndarray            # block-local id -> joined component
    members: np.ndarray           # joined component -> how many block-local parts it has
    box: np.ndarray               # joined component -> (row0, row1, col0, col1), image pixels
    first: np.ndarray             # joined component -> (row, col) of a pixel of it


def plane_instances_by_blocks(probs, labels, z: Optional[int], blocks, kind: str, threshold: float,
                              largest_component: bool, budget: int, after: int = 0) -> int:
    """Instance ids ``after + 1``, ... of plane ``z`` of ``labels`` (zarr or numpy) from the
    probabilities in ``probs`` (2, [Z,] Y, X), written over ``blocks`` ((rows, cols) of one
    block each); the last id."""
    plane = (z,) if z is not None else ()
    comps = find_components(probs, plane, blocks, threshold)
    separate = instances_from_distance if kind == "distance" else instances_from_probabilities
    sizes = [np.zeros(1, np.int64)]
    total = start = int(after)
    check = _capacity_check(labels)
    for (rows, cols), offset in zip(comps.blocks, comps.offsets):
        pair = np.asarray(probs[(slice(None),) + plane + (rows, cols)])
        objects, _ = ndimage.label(pair[0] > threshold, structure=_EIGHT)
        alone = np.concatenate([[False], comps.members[comps.joined[offset:offset + objects.max()]] == 1])
        ids = separate(pair[0] * alone[objects], pair[1], threshold).astype(np.int64)
        count = int(ids.max())
        check(total + count)
        labels[plane + (rows, cols)] = np.where(ids > 0, ids + total, 0).astype(labels.dtype)
        sizes.append(np.bincount(ids.ravel(), minlength=count + 1)[1:])
        total += count
    for group in _crossing_groups(comps, budget):
        boxes = comps.box[group]
        r0, c0 = (int(v) for v in boxes[:, [0, 2]].min(0))
        r1, c1 = (int(v) for v in boxes[:, [1, 3]].max(0))
        _check_budget((r1 - r0, c1 - c0), (r0, c0), z, budget)
        where = plane + (slice(r0, r1), slice(c0, c1))
        pair = np.asarray(probs[(slice(None),) + where])
        objects, _ = ndimage.label(pair[0] > threshold, structure=_EIGHT)
        chosen = np.zeros(int(objects.max()) + 1, bool)
        chosen[objects[comps.first[group, 0] - r0, comps.first[group, 1] - c0]] = True
        mask = chosen[objects]
        ids = separate(pair[0] * mask, pair[1], threshold).astype(np.int64)
        count = int(ids.max())
        check(total + count)
        region = np.asarray(labels[where])
        region[mask] = np.where(ids[mask] > 0, ids[mask] + total, 0)
        labels[where] = region
        sizes.append(np.bincount(ids.ravel(), minlength=count + 1)[1:])
        total += count
    if largest_component and total > start + 1:
        sizes = np.concatenate(sizes)
        keep = start + int(np.argmax(sizes))               # the first of the largest, in this path's numbering
        for rows, cols in comps.blocks:
            where = plane + (rows, cols)
            labels[where] = (np.asarray(labels[where]) == keep).astype(labels.dtype)
        total = 1
    return total


def _crossing_groups(comps: Components, budget: int):
    """The components across blocks in groups post-processed together, one read each: those whose
    boxes start in one block, while their joint box fits the budget (else one at a time)."""
    crossing = np.flatnonzero(comps.members > 1)
    if not crossing.size:
        return
    side = max(max(rows.stop - rows.start, cols.stop - cols.start) for rows, cols in comps.blocks)
    keys = comps.box[crossing][:, [0, 2]] // side
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    crossing, keys = crossing[order], keys[order]
    starts = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]).any(1)])
    for group in np.split(crossing, starts[1:]):
        box = comps.box[group]
        pixels = (box[:, 1].max() - box[:, 0].min()) * (box[:, 3].max() - box[:, 2].min())
        if pixels * BYTES_PER_PIXEL <= budget:
            yield group
        else:
            yield from ([c] for c in group)


def find_components(probs, plane, blocks, threshold: float) -> Components:
    """Foreground components (``probs[0] > threshold``) of each block, joined across the faces
    and corners the blocks share (8-connected), with their bounding boxes."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    offsets, boxes, firsts, edges = [], [], [], {}
    total = 0
    for rows, cols in blocks:
        objects, count = ndimage.label(np.asarray(probs[(0,) + plane + (rows, cols)]) > threshold, structure=_EIGHT)
        offsets.append(total)
        found = ndimage.find_objects(objects)
        r0 = np.array([f[0].start for f in found], np.int64)
        c0 = np.array([f[1].start for f in found], np.int64)
        boxes.append(np.stack([r0, [f[0].stop for f in found], c0, [f[1].stop for f in found]], 1).reshape(-1, 4)
                     + np.array([rows.start, rows.start, cols.start, cols.start]))
        # a pixel of each: the first in its box's top row
        c_first = c0 + np.array([np.argmax(objects[r, f[1]] == k + 1) for k, (r, f) in enumerate(zip(r0, found))],
                                np.int64)
        firsts.append(np.stack([r0 + rows.start, c_first + cols.start], 1).reshape(-1, 2))
        # The block's four edge lines as new arrays (not views: the block is let go), ids 1-based.
        lines = objects[0], objects[-1], objects[:, 0], objects[:, -1]
        edges[(rows.start, cols.start)] = tuple(np.where(x > 0, x.astype(np.int64) + total, 0) for x in lines) + \
            (rows.stop, cols.stop)
        total += count
    pairs = _face_pairs(edges)
    graph = coo_matrix((np.ones(len(pairs[0])), pairs), shape=(total, total))
    _, joined = connected_components(graph, directed=False) if total else (0, np.zeros(0, np.int64))
    n = int(joined.max()) + 1 if total else 0
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.int64)
    box = np.empty((n, 4), np.int64)
    box[:, 0] = box[:, 2] = np.iinfo(np.int64).max
    box[:, 1] = box[:, 3] = np.iinfo(np.int64).min
    for k, fold in ((0, np.minimum), (1, np.maximum), (2, np.minimum), (3, np.maximum)):
        fold.at(box[:, k], joined, boxes[:, k])
    first = np.zeros((n, 2), np.int64)             # a pixel of any of its parts will do
    first[joined] = np.concatenate(firsts) if firsts else np.zeros((0, 2), np.int64)
    return Components(list(blocks), offsets, joined, np.bincount(joined, minlength=n), box, first)


def _face_pairs(edges):
    """(ids a, ids b), 0-based, of block-local components that touch across a face or corner."""
    a_all, b_all = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]

    def add(x, y):
        both = (x > 0) & (y > 0)
        a_all.append(x[both] - 1)
        b_all.append(y[both] - 1)

    for (r, c), (top, bottom, left, right, r_stop, c_stop) in edges.items():
        below, beside = edges.get((r_stop, c)), edges.get((r, c_stop))
        if below is not None:
            for x, y in _shifts(bottom, below[0]):
                add(x, y)
        if beside is not None:
            for x, y in _shifts(right, beside[2]):
                add(x, y)
        corner = edges.get((r_stop, c_stop))
        if corner is not None:
            add(bottom[-1:], corner[0][:1])
        before = [e for (rr, cc), e in edges.items() if rr == r_stop and e[5] == c]
        if before:
            add(bottom[:1], before[0][0][-1:])
    return np.concatenate(a_all), np.concatenate(b_all)


def _shifts(a: np.ndarray, b: np.ndarray):
    """The pixel pairs of two facing lines of equal length that touch: straight across and diagonally."""
    yield a, b
    yield a[1:], b[:-1]
    yield a[:-1], b[1:]


#: Where a zarr array of labels records the last object id of each plane, so that objects
#: found later in another part of the plane (the Segment widget's part in view) get new ids.
LAST_IDS = "napari_medrwkv_last_ids"


def last_id(labels, z: Optional[int]) -> int:
    attrs = getattr(labels, "attrs", None)
    return int(dict(attrs).get(LAST_IDS, {}).get(str(z or 0), 0)) if attrs is not None else 0


def record_last_id(labels, z: Optional[int], last: int) -> None:
    attrs = getattr(labels, "attrs", None)
    if attrs is not None:
        ids = dict(dict(attrs).get(LAST_IDS, {}))
        ids[str(z or 0)] = int(last)
        attrs[LAST_IDS] = ids


def _check_budget(shape, origin, z, budget: int) -> None:
    need = int(shape[0]) * int(shape[1]) * BYTES_PER_PIXEL
    if need > budget:
        where = f"plane {z}, " if z is not None else ""
        raise MemoryError(
            f"segment: one connected foreground region spans {shape[0]} x {shape[1]} pixels ({where}from row "
            f"{origin[0]}, column {origin[1]}); splitting it into objects needs {need / 2**20:.0f} MiB at once, over "
            f"the memory budget of {budget / 2**20:.0f} MiB: raise MEDRWKV_TILE_MEMORY_MB, or segment with a higher "
            "threshold")


def _capacity_check(labels):
    """A check that the object ids so far fit ``labels``' integer type (a uint16 array given as out=)."""
    top = np.iinfo(labels.dtype).max

    def check(count: int) -> None:
        if count > top:
            raise ValueError(f"segment: the labels array has type {np.dtype(labels.dtype)}, which holds {top} "
                             f"objects; this image has more: give a uint32 array as out=")
    return check


def narrowed(labels, count: int, path: Optional[Path] = None):
    """(``labels`` in the type :func:`.instances.label_dtype` gives for ``count`` objects, its
    folder): a numpy array cast; a zarr array this run made at ``path`` (uint32) copied chunk by
    chunk into a new one beside it; an array the caller gave is left as it is."""
    dtype = label_dtype(count)
    if isinstance(labels, np.ndarray):
        return labels.astype(dtype, copy=False), path
    if path is None or labels.dtype == dtype:
        return labels, path
    import zarr
    new = path.parent / f"{path.name}-{dtype.name}"
    array = zarr.open_array(str(new), mode="w-", shape=labels.shape, chunks=labels.chunks, dtype=dtype, fill_value=0)
    for start in np.ndindex(*(-(-s // c) for s, c in zip(labels.shape, labels.chunks))):
        where = tuple(slice(i * c, (i + 1) * c) for i, c in zip(start, labels.chunks))
        array[where] = np.asarray(labels[where]).astype(dtype)
    shutil.rmtree(path)
    return array, new
