"""Segment 2D images and 3D stacks, tiling large planes with smooth blending.

A plane runs whole when its pass fits the memory budget (engine/tiling.py); a larger one is
cut into the largest tiles that fit, each run alone through the network, and their
probabilities are blended into per-plane accumulators with a raised-cosine window, so seams
vanish and a 4000x4000 image needs only a few full-size float32 planes.
"""
import os
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from .preprocess import PERCENTILES, image_to_channels, plane_layout, resize_channels, scaled_size, window_range
from .model import SegmentationModel, load_model
from .instances import plane_instances
from .postprocess import binary_labels, inference_settings
from .tiling import batch_size, plan_tiles, tile_starts  # noqa: F401 -- tile_starts: part of this module's API

Progress = Optional[Callable[[int, int], None]]
Cancel = Optional[Callable[[], bool]]


class Cancelled(RuntimeError):
    """Raised when the caller's ``cancel()`` returned True."""


def blend_window(tile_h: int, tile_w: int) -> np.ndarray:
    """Raised cosine, never zero, so every pixel of every tile counts a little."""
    def ramp(n):
        return np.clip(np.sin(np.pi * (np.arange(n) + 0.5) / n), 1e-3, None)
    return np.outer(ramp(tile_h), ramp(tile_w)).astype(np.float32)


def segment(image, model=None, tile: Optional[int] = None, progress: Progress = None, cancel: Cancel = None,
            return_probabilities: bool = False, rgb: Optional[bool] = None, device="auto",
            flips: Optional[bool] = None, threshold: Optional[float] = None,
            largest_component: Optional[bool] = None, out=None, block: Optional[int] = None, client=None,
            window=None):
    """Integer labels with the spatial shape of ``image`` (0/1 for a binary model, class ids otherwise).

    ``image``: (Y, X), (Y, X, 3|4), or a stack (Z, Y, X[, 3|4]) segmented slice by slice; any dtype.
    Or the name of a scan file (NIfTI, NRRD, MetaImage) or DICOM folder, segmented in the planes the
    scanner acquired, its labels in the orientation ``scans.read_scan`` gives.
    ``model``: a :class:`SegmentationModel`, a shipped name or a checkpoint path.
    ``tile``: largest plane side run in one piece, in the network's pixels (after resizing by
    the model's ``input_scale``); larger planes are tiled with 1/4 overlap.  Left out, the
    plane runs whole when its pass fits the memory budget, else in the largest tiles that fit,
    placed to run the fewest pixels (:func:`.tiling.plan_tiles`; ``$MEDRWKV_TILE_MEMORY_MB``
    sets the budget).  ``progress(done, total)`` counts tiles; ``cancel()`` returning True
    raises :class:`Cancelled` before the next tile.  With ``return_probabilities`` returns
    ``(labels, probabilities)``: foreground probability for a binary model (spatial shape), else
    per-class probabilities (classes first, then the spatial shape).  ``flips``: test-time
    augmentation, the mean probabilities of the tile as it is and flipped left-right, up-down
    and both (4x the time; a prediction that no longer depends on the image's orientation).
    ``threshold`` (binary models): foreground where its probability is above this.
    ``largest_component`` (binary models): keep only the largest 8-connected object of each
    plane (one lesion per image).  Each of these three left as None takes the model's own
    setting (``model.info.inference``; off, 0.5, off unless ``medrwkv calibrate`` chose others).
    ``window``: an intensity window instead of each plane's percentiles (a CT preset of
    ``preprocess.CT_WINDOWS`` such as "soft tissue", or a (level, width) pair in the image's units).
    Left as None it is the model's own: the window it was trained with (``model.info.window``),
    else the percentiles; "percentiles" asks for the percentiles whatever the model's.

    Images larger than memory: ``image`` may also be a zarr or Dask array, a memory map, or the
    path of an OME-Zarr store or TIFF file; those are read block by block (only the tiles that
    run), with the same results.  ``out`` (a path for a new zarr array, or an open zarr array;
    with ``return_probabilities`` a pair of them, probabilities stored as uint8) receives the
    results chunk by chunk and is returned; ``block`` is its chunk side (default 2048);
    ``client`` (a ``dask.distributed.Client``) runs the blocks on a Dask cluster.  See
    :mod:`.blocks`.
    """
    if isinstance(image, (str, os.PathLike)) and _is_scan(image):     # engine/scans.py
        from .scans import read_scan, segment_scan      # in the planes the scanner acquired
        return segment_scan(read_scan(image), model=model, device=device, tile=tile, progress=progress,
                            cancel=cancel, return_probabilities=return_probabilities, flips=flips,
                            threshold=threshold, largest_component=largest_component, window=window)
    own = window is None
    window = _model_window(model) if own else None if window == PERCENTILES else window
    intensity_window = window                      # ("window" names each tile below)
    if window is not None:
        window_range(window)                       # a bad window fails before any work
        if out is not None or block is not None or client is not None or _is_lazy(image):
            whose = f" (here the model's own, {window!r}, which it was trained with)" if own else ""
            raise ValueError(f"segment: window={whose} works on images in memory; read the image into memory "
                             "(np.asarray) to segment it with a window" + (", or pass window='percentiles'"
                                                                           if own else ""))
    if out is not None or block is not None or client is not None or _is_lazy(image):
        from .blocks import segment_blocks
        return segment_blocks(image, model, out, tile=tile, block=block, return_probabilities=return_probabilities,
                              rgb=rgb, device=device, flips=flips, threshold=threshold,
                              largest_component=largest_component, progress=progress, cancel=cancel, client=client)
    if model is None:
        raise ValueError("segment: pass model= (a shipped name, a checkpoint path, or a loaded model)")
    model = model if isinstance(model, SegmentationModel) else load_model(model, device=device)
    settings = inference_settings(model.info, flips, threshold, largest_component)
    flips = settings["flips"]
    image = np.asarray(image)
    if image.dtype.kind not in "biuf":
        raise ValueError(f"segment: the image has pixel type {image.dtype}; give real numbers (integers or floats), "
                         "e.g. the magnitude of a complex image (np.abs)")
    stack_axes, colour = plane_layout(image.shape, rgb)
    planes = image if stack_axes else image[None]
    if tile is not None and int(tile) < 32:
        raise ValueError(f"segment: tile={tile} is too small; use 32 or more, or leave it out (the tiles are then "
                         "as large as memory allows)")
    scale = model.info.input_scale
    net_shape = scaled_size(planes.shape[1:3], scale)       # the plane as the network sees it
    plan = plan_tiles(net_shape, model.info.architecture, tile=tile, device=model.device)
    ys, xs, (tile_h, tile_w) = plan.ys, plan.xs, plan.tile
    total, done = len(planes) * len(ys) * len(xs), 0
    labels = probabilities = None
    # On a GPU several tiles (or whole planes of a stack) run as one batch; a CPU runs one at a time.
    batch = batch_size(plan, model.info.architecture, model.device)
    planes_per_run = batch if plan.count == 1 else 1
    for first in range(0, len(planes), planes_per_run):
        run = range(first, min(first + planes_per_run, len(planes)))
        inputs = {z: _network_input(model, planes[z], net_shape, intensity_window) for z in run}
        probs = {z: np.zeros((_channels(model),) + net_shape, dtype=np.float32) for z in run}
        weight = {z: np.zeros(net_shape, dtype=np.float32) for z in run}
        jobs = [(z, y0, x0) for z in run for y0 in ys for x0 in xs]
        for group in range(0, len(jobs), batch):
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled")
            chosen = jobs[group:group + batch]
            windows = np.stack([inputs[z][:, y0:y0 + tile_h, x0:x0 + tile_w] for z, y0, x0 in chosen])
            for (z, y0, x0), tile_probs in zip(chosen, _predict_batch(model, windows, flips)):
                w = blend_window(*windows.shape[2:]) if total > len(planes) else 1.0
                probs[z][:, y0:y0 + tile_h, x0:x0 + tile_w] += tile_probs * w
                weight[z][y0:y0 + tile_h, x0:x0 + tile_w] += w
                done += 1
                if progress is not None:
                    progress(done, total)
        for z in run:
            plane_labels, plane_probs = _plane_result(model, probs.pop(z) / weight.pop(z), planes[z].shape[:2],
                                                      settings)
            if labels is None:
                labels = np.empty((len(planes),) + plane_labels.shape, plane_labels.dtype)
                if return_probabilities:
                    probabilities = np.empty((len(planes),) + plane_probs.shape, np.float32)      # (Z, K, Y, X)
            if plane_labels.dtype.itemsize > labels.dtype.itemsize:     # a plane of more than 65535 objects
                labels = labels.astype(plane_labels.dtype)
            labels[z] = plane_labels
            if return_probabilities:
                probabilities[z] = plane_probs
    if not stack_axes:
        labels = labels[0]
    if not return_probabilities:
        return labels
    probs = probabilities if stack_axes else probabilities[0]
    if model.binary:
        return labels, probs[..., 0, :, :]
    return labels, np.moveaxis(probs, 1, 0) if stack_axes else probs


def _model_window(model):
    """The window ``model`` (loaded, a shipped name or a checkpoint path) was trained with, or None."""
    if model is None:
        return None
    if isinstance(model, SegmentationModel):
        return model.info.window
    from .model import read_model_info
    info = read_model_info(model)
    return info.window if info is not None else None


def _network_input(model: SegmentationModel, plane: np.ndarray, net_shape, intensity_window) -> np.ndarray:
    """A plane as the network takes it: channels normalised, resized by the input scale, and for
    a prompt-aware model asked without prompts, its empty prompt maps."""
    x = resize_channels(image_to_channels(plane, model.info.in_chans, intensity_window), net_shape)
    if model.info.prompt_channels:
        x = np.concatenate([x, np.zeros((model.info.prompt_channels,) + tuple(net_shape), np.float32)])
    return x


def _plane_result(model: SegmentationModel, probs: np.ndarray, shape, settings) -> Tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of one stitched plane at the image's size.  Probabilities, not
    labels, go back to that size: smooth edges, no blocky labels.  An instance model's objects
    are found on the whole stitched plane, so tile seams neither cut nor merge them."""
    probs = resize_channels(probs, shape)
    if model.info.instances:
        return plane_instances(probs, settings["threshold"], settings["largest_component"],
                               model.info.instances), probs
    if model.binary:
        return binary_labels(probs[0], settings["threshold"], settings["largest_component"]), probs
    return _class_ids(probs), probs


def _is_lazy(image) -> bool:
    """A zarr store or TIFF path, a memory map, or a chunked array (zarr, Dask): read by blocks."""
    import os
    if isinstance(image, (str, os.PathLike)):
        from .blocks import is_block_source
        return is_block_source(image)
    return isinstance(image, np.memmap) or hasattr(image, "chunks")


def _is_scan(path) -> bool:
    from .scans import is_scan
    return is_scan(path)


def _channels(model: SegmentationModel) -> int:
    return model.info.out_channels


#: Test-time flips: the spatial axes of a (1, C, H, W) batch flipped by each view.
FLIP_VIEWS = ((), (3,), (2,), (2, 3))


def _predict(model: SegmentationModel, x: np.ndarray, flips: bool) -> np.ndarray:
    """Probabilities ``(K, H, W)`` of one input ``(C, H, W)``."""
    return _predict_batch(model, x[None], flips)[0]


def _predict_batch(model: SegmentationModel, x: np.ndarray, flips: bool) -> np.ndarray:
    """Probabilities ``(B, K, H, W)`` of a batch of inputs ``(B, C, H, W)`` of one size."""
    with torch.inference_mode():
        batch = torch.from_numpy(np.ascontiguousarray(x)).to(model.device, memory_format=torch.channels_last)
        views = FLIP_VIEWS if flips else FLIP_VIEWS[:1]
        probs = sum(_unflipped_probabilities(model, batch, dims) for dims in views) / len(views)
    return probs.cpu().numpy()


def _unflipped_probabilities(model: SegmentationModel, batch: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
    if dims:
        batch = batch.flip(dims).contiguous(memory_format=torch.channels_last)
    logits = model.inference_net()(batch).float()
    probs = torch.sigmoid(logits) if model.binary else torch.softmax(logits, 1)
    return probs.flip(dims) if dims else probs


def _class_ids(probs: np.ndarray) -> np.ndarray:
    """Class ids of per-class probabilities (K, Y, X)."""
    return probs.argmax(0).astype(np.uint8 if len(probs) <= 256 else np.int32)
