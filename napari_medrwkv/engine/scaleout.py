"""Segmenting many images, and images larger than memory, on a Dask cluster; OME-Zarr labels.

``medrwkv segment`` sends its files here when they are zarr stores or large TIFFs (segmented
block by block into OME-Zarr labels, :mod:`.blocks`) or when it runs on Dask (``--workers``,
``--scheduler``, ``--scheduler-file``).  The model goes to each worker once
(``Client.scatter``); a file is one task, a large image's block is one task.  Every output is
made in a hidden folder or temporary file beside its final name and renamed into place when
complete, so an output that exists is finished: ``--resume`` skips those.
"""
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from .blocks import is_block_source, segment_blocks

#: A TIFF with planes of this many pixels or more is segmented block by block into OME-Zarr.
LARGE_TIFF_PIXELS = 8192 * 8192
#: How long a scheduler may take to answer before ``connect`` gives up.
CONNECT_SECONDS = 5


def is_large_input(path) -> bool:
    """A zarr store, or a TIFF whose planes have at least :data:`LARGE_TIFF_PIXELS` pixels."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return is_block_source(path)
    import tifffile
    try:
        with tifffile.TiffFile(str(path)) as tif:
            shape, axes = tif.series[0].shape, tif.series[0].axes
    except Exception:          # unreadable: the in-memory reader says why, naming the file
        return False
    return int(np.prod([n for n, a in zip(shape, axes) if a in "YX"])) >= LARGE_TIFF_PIXELS


def labels_store_name(source: Path) -> str:
    """``<stem>_labels.zarr`` of an image (``slide.ome.zarr`` -> ``slide_labels.zarr``)."""
    name = source.name
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)] + "_labels.zarr"
    return source.stem + "_labels.zarr"


def segment_to_ome_zarr(source, model, target, *, name: str = "labels", tile=None, block=None, client=None,
                        progress=None, cancel=None, overwrite: bool = False, **settings) -> Path:
    """Labels of ``source`` (any input of :func:`.blocks.segment_blocks`) as a new OME-Zarr store
    ``target`` holding ``labels/<name>``: full resolution written block by block (chunks = blocks),
    then a nearest-neighbour pyramid, then ome-zarr's multiscales and image-label metadata.
    ``overwrite``: an existing ``target`` is replaced once the new store is complete."""
    import zarr
    from ome_zarr.writer import write_label_metadata, write_multiscales_metadata
    from .blocks import DEFAULT_BLOCK, LazyImage

    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"segment: {target} exists; remove it, or pass --resume to skip finished outputs")
    image = source if isinstance(source, LazyImage) else LazyImage(source)
    block = int(block or DEFAULT_BLOCK)
    stack = bool(image.stack_axes)
    shape = ((image.planes,) if stack else ()) + tuple(image.plane_shape)
    chunks = ((1,) if stack else ()) + (block, block)
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        labels_group = zarr.open_group(str(tmp), mode="w-").require_group("labels")
        group = labels_group.require_group(name)
        dtype = np.uint8 if getattr(model, "info", None) is None or model.info.num_classes <= 256 else np.int32
        if getattr(model, "info", None) is not None and model.info.instances:
            dtype = np.uint32            # one id per object: as many as a whole slide holds
        level0 = group.create_array("0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
        segment_blocks(image, model, level0, tile=tile, block=block, client=client, progress=progress,
                       cancel=cancel, **settings)
        levels = _pyramid(group, level0, stack)
        axes = (["z"] if stack else []) + ["y", "x"]
        datasets = [{"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": ([1.0] if stack else []) + [float(2 ** i)] * 2}]} for i in range(levels)]
        write_multiscales_metadata(group, datasets, axes=axes, name=name)
        write_label_metadata(labels_group, name)
        _publish(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"segment: {target} appeared while segmenting; the result is in {tmp}")
        old = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)          # the old store goes only once the new one is in place
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, target)


def _pyramid(group, level0, stack: bool, smallest: int = 256, most: int = 4) -> int:
    """Levels 1.. by taking every second pixel of the level above, chunk by chunk; the number of levels."""
    previous, count = level0, 1
    while count <= most and min(previous.shape[-2:]) >= 2 * smallest:
        shape = previous.shape[:-2] + tuple(-(-s // 2) for s in previous.shape[-2:])
        level = group.create_array(str(count), shape=shape, chunks=previous.chunks, dtype=previous.dtype,
                                   fill_value=0)
        rows, cols = level.chunks[-2:]
        for r in range(0, shape[-2], rows):
            for c in range(0, shape[-1], cols):
                source = np.asarray(previous[..., 2 * r:2 * (r + rows):2, 2 * c:2 * (c + cols):2])
                level[..., r:r + rows, c:c + cols] = source
        previous, count = level, count + 1
    return count


def read_ome_labels(store) -> np.ndarray:
    """The full-resolution labels of a store :func:`segment_to_ome_zarr` wrote (small ones: into memory)."""
    import zarr
    group = zarr.open_group(str(store), mode="r")
    name = dict(group["labels"].attrs).get("labels") or dict(group["labels"].attrs)["ome"]["labels"]
    return np.asarray(group[f"labels/{name[0]}/0"])


# ---------------------------------------------------------------- Dask

def connect(workers: Optional[int] = None, scheduler: Optional[str] = None, scheduler_file=None,
            timeout: float = CONNECT_SECONDS):
    """A ``dask.distributed.Client``: a LocalCluster of ``workers`` processes (one thread each),
    or a running scheduler by address or scheduler file.  A scheduler that does not answer is a
    ConnectionError within ``timeout`` seconds, saying which address and what to check."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ImportError("segment: --workers/--scheduler need Dask: pip install 'napari-medrwkv[scale]'") from None
    if workers is not None:
        with _environment_kept():
            cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                   dashboard_address=None)
        return Client(cluster)
    if scheduler_file is not None and not Path(scheduler_file).is_file():
        raise FileNotFoundError(f"--scheduler-file {scheduler_file} does not exist; give the file the "
                                "scheduler wrote (dask scheduler --scheduler-file F)")
    where = scheduler or f"the scheduler in {scheduler_file}"
    try:
        if scheduler is not None:
            return Client(scheduler, timeout=timeout)
        return Client(scheduler_file=str(scheduler_file), timeout=timeout)
    except (OSError, TimeoutError) as err:
        raise ConnectionError(f"no Dask scheduler answered at {where} within {timeout:g} s ({err}); "
                              "check that it runs and that this machine can reach it") from None


@contextmanager
def _environment_kept():
    """Give this process's environment back as it was.  A Dask nanny sets its workers' variables
    (``distributed.nanny.pre-spawn-environ``: MALLOC_TRIM_THRESHOLD_, OMP/MKL/OPENBLAS_NUM_THREADS
    = 1, ...) in the spawning process's own ``os.environ`` and leaves them there, so that every
    later subprocess of the caller would run on one thread; the workers, already spawned, keep
    theirs."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) | set(saved):
            if key not in saved:
                del os.environ[key]
            elif os.environ.get(key) != saved[key]:
                os.environ[key] = saved[key]


def segment_files(client, jobs, model, write, progress=None, **settings) -> int:
    """Segment whole image files on the cluster, one task each: ``jobs`` are (image file, labels
    file, probabilities file or None); ``write(path, array)`` writes one output (run on the
    worker).  Returns how many were segmented; the first failure is raised, naming its file."""
    from distributed import as_completed
    model_future = client.scatter(model, broadcast=True, hash=False)     # loaded once per worker
    futures = [client.submit(_segment_file, model_future, job, write, settings, pure=False) for job in jobs]
    done = 0
    try:
        for future in as_completed(futures):
            future.result()
            done += 1
            if progress is not None:
                progress(done, len(jobs))
    except BaseException:
        client.cancel(futures)
        raise
    return done


def _segment_file(model, job, write, settings):
    from .blocks import _worker_threads
    from .imageio import read_image
    from .infer import segment
    _worker_threads()
    source, labels_file, probs_file = job
    try:
        labels, probs = segment(read_image(source), model=model, return_probabilities=True, **settings)
    except ValueError as err:
        raise ValueError(f"{source}: {str(err).removeprefix('segment: ')}") from None
    if labels_file is not None:
        write(labels_file, labels)
    if probs_file is not None:
        write(probs_file, probs.astype(np.float32))


class DaskRun:
    """``with DaskRun(workers, scheduler, scheduler_file) as client``: None when none was asked
    for; a LocalCluster made here is closed on leaving, a running cluster is left running."""

    def __init__(self, workers=None, scheduler=None, scheduler_file=None):
        self.asked = (workers, scheduler, scheduler_file)
        self.client = None

    def __enter__(self):
        if any(a is not None for a in self.asked):
            self.client = connect(*self.asked)
        return self.client

    def __exit__(self, *exc):
        if self.client is not None:
            cluster = self.client.cluster if self.asked[0] is not None else None
            self.client.close()
            if cluster is not None:
                cluster.close()
