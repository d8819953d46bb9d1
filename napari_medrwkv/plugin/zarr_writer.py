"""napari writer: labels as a zarr store, copied chunk by chunk.

What keeps a large image's labels, such as the temporary store the Segment widget fills block by
block: a store-backed layer is never read whole.  A multiscale layer becomes a zarr group of its
levels "0", "1", ...  Written in a hidden folder beside the target and renamed into place when
complete; an existing store is never written over.  No Qt.
"""
import itertools
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, List

import numpy as np

#: The side of a chunk of the store written, where the source has no chunks of its own.
CHUNK = 512


def write_labels_zarr(path: str, data: Any, meta: dict) -> List[str]:
    target = Path(path)
    if target.exists():
        raise FileExistsError(f"{target} already exists; choose another name (stores are never written over)")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"the folder of {target} does not exist; create it first")
    levels = list(data) if meta.get("multiscale") else [data]
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, levels, meta)
        if target.exists():
            raise FileExistsError(f"{target} appeared while saving; the labels are in {tmp}")
        os.rename(tmp, target)
    except FileExistsError:
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [str(target)]


def _write(tmp: Path, levels, meta: dict) -> None:
    import zarr
    about = {"name": meta.get("name"), "scale": [float(s) for s in meta.get("scale", ())],
             "translate": [float(t) for t in meta.get("translate", ())]}
    if len(levels) == 1:
        _copy(levels[0], tmp).attrs["napari_medrwkv"] = about
        return
    group = zarr.open_group(str(tmp), mode="w-")
    group.attrs["napari_medrwkv"] = {**about, "levels": len(levels)}
    for k, level in enumerate(levels):
        _copy(level, tmp / str(k))


def _copy(source, where: Path):
    """A new zarr array at ``where`` holding ``source``, read one chunk at a time."""
    import zarr
    shape = tuple(int(s) for s in source.shape)
    chunks = _chunks(source, shape)
    out = zarr.open_array(str(where), mode="w-", shape=shape, chunks=chunks, dtype=source.dtype, fill_value=0)
    if isinstance(source, np.ndarray):
        out[...] = source
        return out
    for start in itertools.product(*(range(0, s, c) for s, c in zip(shape, chunks))):
        key = tuple(slice(a, min(a + c, s)) for a, c, s in zip(start, chunks, shape))
        block = np.asarray(source[key])
        if block.any():                       # an empty chunk stays unwritten: zarr reads it as 0
            out[key] = block
    return out


def _chunks(source, shape):
    own = getattr(source, "chunks", None)
    if own is not None and all(isinstance(c, (int, np.integer)) for c in own):
        return tuple(int(c) for c in own)                               # a zarr array's
    chunksize = getattr(source, "chunksize", None)                      # a Dask array's
    if chunksize is not None:
        return tuple(int(c) for c in chunksize)
    return (1,) * (len(shape) - 2) + tuple(min(CHUNK, s) or 1 for s in shape[-2:])
