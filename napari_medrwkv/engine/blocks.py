"""Segmenting images larger than memory: block by block, from any array-like into zarr.

The in-memory :func:`.infer.segment` normalises a whole plane, runs the network on tiles
placed over it, blends their probabilities with a raised-cosine window and thresholds.  Here
the same tiles are placed over the same plane, but each output block (one zarr chunk) is made
alone: it reads only the source region under the tiles that touch it, runs those tiles,
blends them exactly as the whole-plane pass does, and writes its own chunk.  A tile that
straddles a block edge runs for both blocks (the halo), so every pixel sees the same tiles in
the same order as in one pass: labels are identical, and probabilities equal to float
rounding.  Intensity normalisation comes from the whole plane (a strided sample of at most
:data:`SAMPLE_PIXELS` pixels; all of it when it has fewer), never from one tile.  Resizing for
a model's ``input_scale`` is done with the rows of the whole-plane resize that a block needs
(:func:`resize_weights`), so scaled models agree across blocks too.  The largest-object filter
joins objects across block faces before it chooses (:func:`keep_largest_objects`).  An
instance model's blocks keep both probability channels in a temporary store, from which its
objects are found per foreground component once every block ran (:mod:`.block_instances`).

Each block writes whole chunks of its own, so blocks run in any order, on any Dask worker,
with no locks.  zarr and Dask are imported only here (the ``scale`` extra).
"""
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .imageio import DataError, channels_equal
from .preprocess import LUMA_WEIGHTS, NORMALIZATION, _order_statistic_percentile, _scale, plane_layout, scaled_size

#: Pixels of a plane read to find its intensity range; a larger plane is read with a stride.
SAMPLE_PIXELS = 1 << 22
#: Side of an output block (one zarr chunk) in the image's pixels.
DEFAULT_BLOCK = 2048


# ---------------------------------------------------------------- the source image

class LazyImage:
    """An array-like read region by region: numpy, a memory map, a zarr or Dask array, an
    OME-Zarr store or a TIFF file (its tiles), as (Z?, Y, X, C?) with channels last."""

    def __init__(self, source, rgb: Optional[bool] = None):
        self.path = None
        if isinstance(source, (str, os.PathLike)):
            self.path = Path(source)
            array, self._axes_order = _open_path(self.path)
        else:
            array, self._axes_order = source, None
        self._array = array
        shape = tuple(int(s) for s in array.shape)
        if self._axes_order is not None:
            shape = tuple(shape[i] for i in self._axes_order)
        self.shape = shape
        self.dtype = np.dtype(array.dtype)
        self.rgb = rgb
        if self.dtype.kind not in "biuf":
            raise ValueError(f"segment: the image has pixel type {self.dtype}; give real numbers (integers or floats)")
        self.stack_axes, self.colour = plane_layout(shape, rgb)

    @property
    def plane_shape(self) -> Tuple[int, int]:
        return self.shape[self.stack_axes:self.stack_axes + 2]

    @property
    def planes(self) -> int:
        return self.shape[0] if self.stack_axes else 1

    def read(self, z: int, rows: slice, cols: slice) -> np.ndarray:
        """Plane ``z``'s pixels in ``rows`` x ``cols``, (h, w) or (h, w, C), as stored."""
        key = ((z,) if self.stack_axes else ()) + (rows, cols)
        if self._axes_order is None:
            return np.asarray(self._array[key])
        full = key + (slice(None),) * (len(self.shape) - len(key))
        stored = [None] * len(self._axes_order)
        for position, axis in enumerate(self._axes_order):
            stored[axis] = full[position]
        region = np.asarray(self._array[tuple(stored)])
        kept = [axis for axis, k in zip(self._axes_order, full) if not isinstance(k, int)]
        return np.transpose(region, np.argsort(np.argsort(kept)))

    def __getstate__(self):
        # A TIFF's zarr view holds an open file: a worker reopens the path instead.
        state = dict(self.__dict__)
        if self.path is not None:
            state["_array"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._array is None:
            self._array, _ = _open_path(self.path)


def is_block_source(path) -> bool:
    """Whether a path names what this module reads: a zarr store (OME-Zarr or an array) or a TIFF."""
    path = Path(path)
    return path.suffix.lower() in (".zarr", ".tif", ".tiff") or \
        any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))


def _open_path(path: Path):
    """(array, order of its axes as (Z?, Y, X, C?) or None) of an OME-Zarr/zarr store or a TIFF."""
    if not path.exists():
        raise DataError(f"image {path} does not exist; check the path")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile
        import zarr
        return zarr.open(tifffile.imread(str(path), aszarr=True, level=0), mode="r"), None
    import zarr
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:
        raise DataError(f"image {path} is not a zarr store ({type(err).__name__}: {err}); give an OME-Zarr or zarr "
                        "array folder, or a TIFF file") from None
    if isinstance(node, zarr.Array):
        return node, None
    return _ome_level0(node, path)


def _ome_level0(group, path: Path):
    """The full-resolution array of an OME-Zarr image and how its axes read as (Z?, Y, X, C?)."""
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        raise DataError(f"image {path} is a zarr group without OME-Zarr multiscales metadata; give the zarr array "
                        "inside it, or an OME-Zarr image")
    meta = multiscales[0]
    array = group[meta["datasets"][0]["path"]]
    names = [a["name"] if isinstance(a, dict) else a for a in meta.get("axes", [])] or \
        list("tczyx"[-array.ndim:])
    sizes = dict(zip(names, array.shape))
    extra = [n for n in names if n not in ("z", "y", "x", "c")]
    if any(sizes[n] != 1 for n in extra) or sizes.get("c", 1) not in (1, 3, 4):
        raise DataError(f"image {path} has axes {''.join(names)} of sizes {tuple(array.shape)}; segment takes grey or "
                        "RGB planes or a z stack: select one time point and a grey or RGB channel set first")
    order = [names.index(n) for n in ("z", "y", "x") if n in names]
    if sizes.get("c", 1) != 1:
        order.append(names.index("c"))
    return _Squeezed(array, [names.index(n) for n in names if n in extra or (n == "c" and sizes[n] == 1)]), \
        _order_without(order, [names.index(n) for n in names if n in extra or (n == "c" and sizes[n] == 1)])


def _order_without(order, dropped):
    return [i - sum(d < i for d in dropped) for i in order]


class _Squeezed:
    """An array with some length-1 axes taken out, read lazily."""

    def __init__(self, array, dropped: List[int]):
        self.array, self.dropped = array, sorted(dropped)
        self.shape = tuple(s for i, s in enumerate(array.shape) if i not in self.dropped)
        self.dtype = array.dtype

    def __getitem__(self, key):
        key, full = list(key), []
        for axis in range(len(self.array.shape)):
            full.append(0 if axis in self.dropped else key.pop(0))
        return self.array[tuple(full)]


# ---------------------------------------------------------------- intensity

@dataclass(frozen=True)
class Intensity:
    """How one plane's pixels become the network's channels, fixed for the whole plane:
    grey, RGB or luminance, and the range (low, high) that :func:`.preprocess.normalize`
    would find over the plane (None: a constant plane, all zeros)."""
    mode: str
    low: Optional[float]
    high: Optional[float]
    fill: float = 0.0          # what NaN/inf pixels become (the smallest finite value)


def plane_intensity(sample: np.ndarray, in_chans: int) -> Intensity:
    """The :class:`Intensity` of a plane from a sample of it (all of it for the exact answer)."""
    mode = _channel_mode(sample, in_chans)
    values = _mode_values(sample, mode)
    if values.dtype in (np.uint8, np.uint16) and values.size:
        counts = _counts(values.ravel())
        cumulative = np.cumsum(counts)
        low, high = (_order_statistic_percentile(cumulative, q) for q in (NORMALIZATION["low"], NORMALIZATION["high"]))
        if not high > low:
            present = np.flatnonzero(counts)
            low, high = float(present[0]), float(present[-1])
        return Intensity(mode, low, high) if high > low else Intensity(mode, None, None)
    values = values.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    if not finite.any():
        return Intensity(mode, None, None)
    fill = float(values[finite].min())
    values = np.where(finite, values, fill) if not finite.all() else values
    low, high = np.percentile(values, [NORMALIZATION["low"], NORMALIZATION["high"]])
    if not high > low:
        low, high = values.min(), values.max()
    return Intensity(mode, float(low), float(high), fill) if high > low else Intensity(mode, None, None, fill)


def _counts(values: np.ndarray, step: int = 1 << 20) -> np.ndarray:
    """np.bincount by parts: it makes an int64 copy of what it counts."""
    counts = np.zeros(int(values.max()) + 1, np.int64)
    for start in range(0, values.size, step):
        part = np.bincount(values[start:start + step])
        counts[:len(part)] += part
    return counts


def _channel_mode(image: np.ndarray, in_chans: int) -> str:
    # The choices of preprocess.image_to_channels, made once for the plane.
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):
        return "grey"
    channels = image.shape[-1]
    if channels in (2, 4):
        channels -= 1
    if channels == 1 or (channels == 3 and channels_equal(image)):
        return "grey"
    if channels == in_chans:
        return "rgb"
    if in_chans == 1 and channels == 3:
        return "luma"
    raise ValueError(f"cannot turn an image with {image.shape[-1]} channels into the {in_chans} channels "
                     "the model expects; use a grey or RGB image")


def _mode_values(image: np.ndarray, mode: str) -> np.ndarray:
    if image.ndim == 2:
        return image
    if mode == "grey":
        return image[..., 0]
    if mode == "rgb":
        return image[..., :3]
    return image[..., :3].astype(np.float64) @ np.asarray(LUMA_WEIGHTS, dtype=np.float64)


def region_channels(region: np.ndarray, intensity: Intensity, in_chans: int) -> np.ndarray:
    """float32 (in_chans, h, w) of a region, normalised with the plane's range."""
    values = _mode_values(region, intensity.mode)
    if intensity.low is None:
        scaled = np.zeros(values.shape, np.float32)
    elif values.dtype in (np.uint8, np.uint16):
        # A lookup table, as normalize's: the same numbers, and no float64 copy of the region.
        table = _scale(np.arange(int(values.max()) + 1, dtype=np.float64), intensity.low, intensity.high)
        scaled = np.take(table, values)
    else:
        values = values.astype(np.float64, copy=False)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            values = np.where(np.isfinite(values), values, intensity.fill)
        scaled = _scale(values, intensity.low, intensity.high)
    if intensity.mode == "rgb":
        return np.ascontiguousarray(np.moveaxis(scaled, -1, 0))
    return np.repeat(scaled[None], in_chans, axis=0) if in_chans > 1 else scaled[None]


def sample_plane(image: LazyImage, z: int, pixels: int = SAMPLE_PIXELS) -> np.ndarray:
    """Plane ``z`` read whole when it has at most ``pixels`` pixels, else with an even stride."""
    h, w = image.plane_shape
    stride = max(1, math.ceil(math.sqrt(h * w / pixels)))
    return image.read(z, slice(None, None, stride), slice(None, None, stride))


# ---------------------------------------------------------------- resizing by rows

def resize_weights(n_in: int, n_out: int, lo: int, hi: int, antialias: bool) -> Tuple[int, np.ndarray]:
    """Rows ``lo:hi`` of the (n_out, n_in) matrix of ``torch.nn.functional.interpolate``
    (bilinear, align_corners=False, with or without antialias) along one axis: (first input
    index, weights over the inputs from there).  A block resizes with the rows it needs and
    gets what the whole-plane resize gives there."""
    scale = n_in / n_out
    rows = []
    for i in range(lo, hi):
        if antialias:
            support = scale if scale >= 1 else 1.0
            inv = 1 / scale if scale >= 1 else 1.0
            center = scale * (i + 0.5)
            first = max(int(center - support + 0.5), 0)
            last = min(int(center + support + 0.5), n_in)
            taps = np.arange(first, last)
            w = np.clip(1 - np.abs((taps - center + 0.5) * inv), 0, None)
            rows.append((first, w / w.sum()))
        else:
            src = max(scale * (i + 0.5) - 0.5, 0.0)
            i0 = int(src)
            i1 = i0 + (1 if i0 < n_in - 1 else 0)
            frac = src - i0
            rows.append((i0, np.array([1 - frac, frac]) if i1 > i0 else np.array([1.0])))
    from scipy.sparse import csr_matrix
    start = min(first for first, _ in rows)
    end = max(first + len(w) for first, w in rows)
    cols = np.concatenate([np.arange(first, first + len(w)) - start for first, w in rows])
    indptr = np.cumsum([0] + [len(w) for _, w in rows])
    return start, csr_matrix((np.concatenate([w for _, w in rows]).astype(np.float32), cols, indptr),
                             shape=(hi - lo, end - start))


def _resized(x: np.ndarray, wy, wx) -> np.ndarray:
    """(C, h, w) float32 through sparse row and column weights: (C, wy rows, wx rows)."""
    out = np.empty((len(x), wy.shape[0], wx.shape[0]), np.float32)
    for k, channel in enumerate(x):
        out[k] = (wx @ (wy @ channel).T).T
    return out


# ---------------------------------------------------------------- one block

@dataclass(frozen=True)
class PlanePlan:
    """Where the whole-plane pass of :func:`.infer.segment` puts its tiles (the same tiles make
    the same numbers here), and how a plane is resized for the network."""
    shape: Tuple[int, int]
    net: Tuple[int, int]
    tile: Tuple[int, int]             # (height, width) in the network's pixels
    ys: Tuple[int, ...]
    xs: Tuple[int, ...]

    @classmethod
    def of(cls, shape, model, tile: Optional[int]) -> "PlanePlan":
        return cls.of_info(shape, model.info, model.device, tile)

    @classmethod
    def of_info(cls, shape, info, device, tile: Optional[int]) -> "PlanePlan":
        """The plan from a model's header (``checkpoint.ModelInfo``) and device, without the model."""
        from .tiling import plan_tiles
        net = scaled_size(shape, info.input_scale)
        plan = plan_tiles(net, info.architecture, tile=tile, device=device)
        return cls(tuple(shape), net, tuple(plan.tile), tuple(plan.ys), tuple(plan.xs))

    def unit(self, block: int) -> int:
        """The side of the region one task makes: whole blocks, at least a tile's side in the
        image's pixels, so that a tile is run by few tasks (and a plane run in one piece, by one)."""
        scale = self.net[0] / self.shape[0]
        return block * max(1, math.ceil(max(self.tile) / scale / block))

    @property
    def resized(self) -> bool:
        return self.net != self.shape

    @property
    def tiles(self) -> int:
        return len(self.ys) * len(self.xs)


def block_probabilities(image: LazyImage, z: int, rows: slice, cols: slice, plan: PlanePlan,
                        intensity: Intensity, model, flips: bool, on_tile=None) -> np.ndarray:
    """Per-class probabilities (K, h, w) of one block, as the whole-plane pass finds them there."""
    from .infer import _predict, blend_window
    back = [_axis_back(plan, axis, s) for axis, s in enumerate((rows, cols))]   # (net lo, net hi, weights)
    (na, nb), (nc, nd) = [(b[0], b[1]) for b in back]
    th, tw = plan.tile
    ys = [y for y in plan.ys if y < nb and y + th > na]
    xs = [x for x in plan.xs if x < nd and x + tw > nc]
    ta, tb = ys[0], min(ys[-1] + th, plan.net[0])
    tc, td = xs[0], min(xs[-1] + tw, plan.net[1])
    x = _net_input(image, z, (ta, tb), (tc, td), plan, intensity, model.info.in_chans)
    if model.info.prompt_channels:             # a prompt-aware model, asked with no prompt
        x = np.concatenate([x, np.zeros((model.info.prompt_channels,) + x.shape[1:], np.float32)])
    probs = np.zeros((model.info.out_channels, tb - ta, td - tc), np.float32)
    weight = np.zeros((tb - ta, td - tc), np.float32)
    for y0 in ys:
        for x0 in xs:
            window = x[:, y0 - ta:y0 - ta + th, x0 - tc:x0 - tc + tw]
            tile_probs = _predict(model, window, flips)
            w = blend_window(*window.shape[1:]) if plan.tiles > 1 else 1.0
            probs[:, y0 - ta:y0 - ta + th, x0 - tc:x0 - tc + tw] += tile_probs * w
            weight[y0 - ta:y0 - ta + th, x0 - tc:x0 - tc + tw] += w
            if on_tile is not None:
                on_tile()
    probs = probs[:, na - ta:nb - ta, nc - tc:nd - tc] / weight[na - ta:nb - ta, nc - tc:nd - tc]
    if not plan.resized:
        return probs
    (_, _, wy), (_, _, wx) = back
    return _resized(probs, wy, wx)


def _axis_back(plan: PlanePlan, axis: int, span: slice):
    """(net lo, net hi, weights (span, net hi - net lo)) taking net probabilities to the block's pixels."""
    if not plan.resized:
        return span.start, span.stop, None
    n_net, n_img = plan.net[axis], plan.shape[axis]
    shrink = plan.shape[0] < plan.net[0] or plan.shape[1] < plan.net[1]
    first, weights = resize_weights(n_net, n_img, span.start, span.stop, shrink)
    return first, first + weights.shape[1], weights


def _net_input(image: LazyImage, z: int, net_rows, net_cols, plan: PlanePlan, intensity: Intensity,
               in_chans: int) -> np.ndarray:
    if not plan.resized:
        region = image.read(z, slice(*net_rows), slice(*net_cols))
        return region_channels(region, intensity, in_chans)
    shrink = plan.net[0] < plan.shape[0] or plan.net[1] < plan.shape[1]
    (r0, wy), (c0, wx) = (resize_weights(plan.shape[a], plan.net[a], *span, shrink)
                          for a, span in enumerate((net_rows, net_cols)))
    region = image.read(z, slice(r0, r0 + wy.shape[1]), slice(c0, c0 + wx.shape[1]))
    if intensity.mode == "rgb":
        return _resized(region_channels(region, intensity, in_chans), wy, wx)
    # Grey: one channel resized, then repeated, as the whole-plane path's copies are equal.
    return np.repeat(_resized(region_channels(region, intensity, 1), wy, wx), in_chans, axis=0)


def block_labels(probs: np.ndarray, binary: bool, threshold: float) -> np.ndarray:
    if binary:
        return (probs[0] > threshold).astype(np.uint8)
    return probs.argmax(0).astype(np.uint8 if len(probs) <= 256 else np.int32)


def probabilities_uint8(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as 0..255 (rounded)."""
    return np.clip(np.rint(probs * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the whole image

@dataclass(frozen=True)
class Job:
    """Everything a block needs, sent once to each Dask worker."""
    image: LazyImage
    model: object
    plans: Tuple[PlanePlan, ...]
    intensities: Tuple[Intensity, ...]
    settings: dict


def segment_blocks(image, model=None, out=None, *, tile: Optional[int] = None, block: Optional[int] = None,
                   return_probabilities: bool = False, rgb: Optional[bool] = None, device="auto",
                   flips: Optional[bool] = None, threshold: Optional[float] = None,
                   largest_component: Optional[bool] = None, progress=None, cancel=None, client=None):
    """:func:`.infer.segment` of an image read block by block; see there.  ``out``: None (numpy
    results), a path for a new zarr array, or an open zarr array (written in place); with
    ``return_probabilities`` a pair (labels, probabilities) of such targets, the probabilities
    stored as uint8 (0..255).  ``block``: the side of an output block and zarr chunk (default
    :data:`DEFAULT_BLOCK`).  ``client``: a ``dask.distributed.Client`` that runs the blocks."""
    job, targets, block = _prepare(image, model, out, tile, block, return_probabilities, rgb, device, flips,
                                   threshold, largest_component)
    regions = _regions(job, block)
    try:
        if client is None:
            _run_here(job, regions, targets, progress, cancel)
        else:
            _run_on(client, job, regions, targets, progress, cancel)
        _whole_plane_steps(job, targets, block, regions=regions)
        return targets.finish()
    except BaseException:
        targets.discard()
        raise


def iter_blocks(image, model=None, out=None, *, planes=None, rows=None, cols=None, tile: Optional[int] = None,
                block: Optional[int] = None, return_probabilities: bool = False, rgb: Optional[bool] = None,
                device="auto", flips: Optional[bool] = None, threshold: Optional[float] = None,
                largest_component: Optional[bool] = None, cancel=None):
    """:func:`segment_blocks` one task at a time: a generator that yields ``(done, total, (z,
    rows, cols))`` after each task's blocks are written, for a viewer that shows them as they
    come (the Segment widget).  ``planes`` (plane indices), ``rows`` and ``cols`` ((start,
    stop) in the image's pixels) keep only the tasks that meet them: whole blocks, snapped
    outward, written into the full-size ``out``.  The intensity range still comes from the whole
    plane, so a block holds what a run over the whole image writes there.  The largest-object
    filter needs whole planes: it runs only when every task of the image ran.  An instance
    model's objects are found once the last task ran, over the tasks run (an object is cut
    where they end); in a zarr ``out`` their ids follow those an earlier part of the plane got.  ``cancel()``
    returning True stops before the next tile; a task stopped so writes nothing.  Its return
    value (``StopIteration.value``) is :func:`segment_blocks`'s."""
    job, targets, block = _prepare(image, model, out, tile, block, return_probabilities, rgb, device, flips,
                                   threshold, largest_component)
    every = _regions(job, block)
    chosen = task_regions(every, planes, rows, cols)
    try:
        for done, (z, r, c) in enumerate(chosen, 1):
            targets.write(z, r, c, *run_block(job, z, r, c, _cancel_check(cancel)))
            yield done, len(chosen), (z, r, c)
        whole = [z for z in range(job.image.planes) if
                 sum(region[0] == z for region in chosen) == sum(region[0] == z for region in every)]
        _whole_plane_steps(job, targets, block, whole, chosen)
        return targets.finish()
    except BaseException:
        targets.discard()
        raise


def _cancel_check(cancel):
    from .infer import Cancelled

    def on_tile():
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")
    on_tile()
    return on_tile


def task_regions(regions, planes=None, rows=None, cols=None):
    """The (z, rows, cols) of ``regions`` in ``planes`` that meet ``rows`` x ``cols`` ((start, stop) pairs)."""
    def meets(region):
        z, r, c = region
        return (planes is None or z in planes) and all(
            span is None or (s.start < span[1] and s.stop > span[0]) for s, span in ((r, rows), (c, cols)))
    return [region for region in regions if meets(region)]


def plane_regions(shape, planes: int, unit: int):
    """(z, rows, cols) of every task over ``planes`` planes of ``shape`` pixels, tasks ``unit`` a side."""
    return [(z, rows, cols) for z in range(planes) for rows, cols in _grid(shape, unit)]


def _prepare(image, model, out, tile, block, return_probabilities, rgb, device, flips, threshold,
             largest_component):
    """(job, targets, block side): everything checked and opened before the first block."""
    from .model import SegmentationModel, load_model
    from .postprocess import inference_settings

    if model is None:
        raise ValueError("segment: pass model= (a shipped name, a checkpoint path, or a loaded model)")
    model = model if isinstance(model, SegmentationModel) else load_model(model, device=device)
    settings = inference_settings(model.info, flips, threshold, largest_component)
    source = image if isinstance(image, LazyImage) else LazyImage(image, rgb)
    if tile is not None and int(tile) < 32:
        raise ValueError(f"segment: tile={tile} is too small; use 32 or more, or leave it out")
    block = int(block or DEFAULT_BLOCK)
    if block < 16:
        raise ValueError(f"segment: block={block} is too small; use 16 or more (default {DEFAULT_BLOCK})")
    plan = PlanePlan.of(source.plane_shape, model, tile)
    intensities = tuple(plane_intensity(sample_plane(source, z), model.info.in_chans) for z in range(source.planes))
    job = Job(source, model, (plan,), intensities, settings)
    return job, _Targets.make(out, source, model, block, return_probabilities), block


def _regions(job: "Job", block: int):
    """(z, rows, cols) of every task: a task makes whole chunks (no two write one), as many as a
    tile spans at least."""
    return plane_regions(job.image.plane_shape, job.image.planes, job.plans[0].unit(block))


def _whole_plane_steps(job: "Job", targets, block: int, planes=None, regions=None) -> None:
    """What needs every block of a plane: an instance model's objects, the largest-object filter."""
    if job.model.info.instances:
        targets.find_instances(job, block, regions, planes)
        return
    if job.model.binary and job.settings["largest_component"]:
        for z in range(job.image.planes) if planes is None else planes:
            targets.keep_largest(z, block)


def _grid_in(rows: slice, cols: slice, block: int):
    """The blocks of a task region, as :func:`_grid` places them over the plane."""
    for r in range(rows.start, rows.stop, block):
        for c in range(cols.start, cols.stop, block):
            yield slice(r, min(r + block, rows.stop)), slice(c, min(c + block, cols.stop))


def _grid(shape, block: int):
    for r in range(0, shape[0], block):
        for c in range(0, shape[1], block):
            yield slice(r, min(r + block, shape[0])), slice(c, min(c + block, shape[1]))


def run_block(job: Job, z: int, rows: slice, cols: slice, on_tile=None):
    """(labels, probabilities or None) of one block."""
    probs = block_probabilities(job.image, z, rows, cols, job.plans[0], job.intensities[z], job.model,
                                job.settings["flips"], on_tile)
    labels = block_labels(probs, job.model.binary, job.settings["threshold"])
    return labels, probs


def _run_here(job: Job, regions, targets, progress, cancel) -> None:
    from .infer import Cancelled
    done, total = 0, sum(_tiles_in(job.plans[0], rows, cols) for _, rows, cols in regions)

    def on_tile():
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)
        if cancel is not None and cancel() and done < total:
            raise Cancelled("segmentation cancelled")

    if cancel is not None and cancel():
        raise Cancelled("segmentation cancelled")
    for z, rows, cols in regions:
        targets.write(z, rows, cols, *run_block(job, z, rows, cols, on_tile))


def _tiles_in(plan: PlanePlan, rows: slice, cols: slice) -> int:
    back = [_axis_back(plan, axis, s) for axis, s in enumerate((rows, cols))]
    ys = [y for y in plan.ys if y < back[0][1] and y + plan.tile[0] > back[0][0]]
    xs = [x for x in plan.xs if x < back[1][1] and x + plan.tile[1] > back[1][0]]
    return len(ys) * len(xs)


def _run_on(client, job: Job, regions, targets, progress, cancel) -> None:
    from distributed import as_completed
    from .infer import Cancelled
    job_future = client.scatter(job, broadcast=True, hash=False)   # one model per worker, loaded once
    writer = targets.writer()
    futures = [client.submit(_remote_block, job_future, z, rows, cols, writer, pure=False)
               for z, rows, cols in regions]
    where = {f.key: region for f, region in zip(futures, regions)}
    try:
        for done, future in enumerate(as_completed(futures), 1):
            result = future.result()
            if result is not None:
                targets.write(*where[future.key], *result)
            if progress is not None:
                progress(done, len(futures))
            if cancel is not None and cancel() and done < len(futures):
                raise Cancelled("segmentation cancelled")
    except BaseException:
        client.cancel(futures)
        raise


def _remote_block(job: Job, z: int, rows: slice, cols: slice, writer):
    """A block on a Dask worker: written there when the targets are zarr, else sent back."""
    _worker_threads()
    labels, probs = run_block(job, z, rows, cols)
    if writer is None:
        return labels, probs
    writer.write(z, rows, cols, labels, probs)
    return None


def _worker_threads() -> None:
    # A worker process's torch would use every core; several workers on one machine share them.
    # And it keeps freed memory for the next forward pass, as the command line does (engine/memory.py).
    import torch
    from .memory import retain_freed_memory
    try:
        from distributed import get_worker
        threads = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        return
    retain_freed_memory()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- where results go

class _Targets:
    """The labels (and probabilities) being written: numpy arrays, or zarr arrays made in a
    hidden folder next to the asked path and renamed into place when complete."""

    def __init__(self, labels, probs, binary: bool, stack: bool, made: List[Tuple[Path, Path]]):
        self.labels, self.probs, self.binary, self.stack, self.made = labels, probs, binary, stack, made
        # An instance model's probabilities, both channels, for finding objects once all blocks ran.
        self.scratch = self.scratch_folder = None
        self.labels_made = False

    @classmethod
    def make(cls, out, image: LazyImage, model, block: int, with_probs: bool) -> "_Targets":
        classes = model.info.num_classes
        stack = bool(image.stack_axes)
        spatial = ((image.planes,) if stack else ()) + tuple(image.plane_shape)
        label_dtype = np.uint8 if classes <= 256 else np.int32
        if model.info.instances:
            label_dtype = np.uint32          # narrowed to uint16 at the end when the objects fit
        prob_shape = spatial if model.binary else (classes,) + spatial
        if out is None:
            targets = cls(np.zeros(spatial, label_dtype),
                          np.zeros(prob_shape, np.float32) if with_probs else None, model.binary, stack, [])
            return targets.with_scratch(model, None, spatial, block)
        if with_probs:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise ValueError("segment: with return_probabilities, out= takes a pair (labels, probabilities), "
                                 "each a path for a new zarr array or an open zarr array")
            label_out, prob_out = out
        else:
            label_out, prob_out = out, None
        made = []
        chunks = ((1,) if stack else ()) + (block, block)
        labels = _zarr_target(label_out, spatial, label_dtype, chunks, made, "labels")
        probs = None
        if prob_out is not None:
            probs = _zarr_target(prob_out, prob_shape, np.uint8, chunks if model.binary else (1,) + chunks, made,
                                 "probabilities")
        targets = cls(labels, probs, model.binary, stack, made)
        targets.labels_made = isinstance(label_out, (str, os.PathLike))
        return targets.with_scratch(model, label_out, spatial, block)

    def with_scratch(self, model, out, spatial, block: int) -> "_Targets":
        if model.info.instances:
            from .block_instances import scratch_store
            self.scratch, self.scratch_folder = scratch_store(out, spatial, block)
        return self

    def writer(self):
        return None if isinstance(self.labels, np.ndarray) else self

    def write(self, z, rows, cols, labels, probs) -> None:
        where = ((z,) if self.stack else ()) + (rows, cols)
        self.labels[where] = labels
        if self.scratch is not None:
            self.scratch[(slice(None),) + where] = probs[:2]
        if self.probs is not None:
            values = probs[0] if self.binary else probs
            if isinstance(self.probs, np.ndarray):
                self.probs[where if self.binary else (slice(None),) + where] = values
            else:
                self.probs[where if self.binary else (slice(None),) + where] = probabilities_uint8(values)

    def keep_largest(self, z: int, block: int) -> None:
        from .postprocess import keep_largest_object
        if isinstance(self.labels, np.ndarray):
            plane = self.labels[z] if self.stack else self.labels
            plane[...] = keep_largest_object(plane)
        else:
            keep_largest_objects(self.labels, z if self.stack else None, block)

    def find_instances(self, job: "Job", block: int, regions, whole=None) -> None:
        """Each plane's objects from the probabilities of ``regions`` (engine/block_instances.py),
        written over the foreground the blocks wrote; then the labels' type fits their number.
        The largest-object filter runs on the ``whole`` planes only (None: all)."""
        from .block_instances import last_id, narrowed, plane_instances_by_blocks, record_last_id
        from .tiling import memory_budget
        budget, most = memory_budget(), 0
        for z in sorted({z for z, _, _ in regions}):
            blocks = [b for zz, rows, cols in regions if zz == z for b in _grid_in(rows, cols, block)]
            plane = z if self.stack else None
            part = whole is not None and z not in whole      # the rest of the plane keeps its objects and ids
            last = plane_instances_by_blocks(
                self.scratch, self.labels, plane, blocks, job.model.info.instances, job.settings["threshold"],
                job.settings["largest_component"] and not part, budget, last_id(self.labels, plane) if part else 0)
            record_last_id(self.labels, plane, last)
            most = max(most, last)
        path = self.made[0][0] if self.labels_made else None
        self.labels, new = narrowed(self.labels, most, path)
        if path is not None:
            self.made[0] = (new, self.made[0][1])

    def finish(self):
        from .block_instances import remove_scratch
        remove_scratch(self.scratch_folder)
        for tmp, final in self.made:
            if final.exists():
                raise FileExistsError(f"segment: {final} appeared while segmenting; the result is in {tmp}")
            os.rename(tmp, final)
        if self.made:
            import zarr
            opened = {str(final): zarr.open_array(str(final), mode="r") for _, final in self.made}
            self.labels = opened.get(str(self.made[0][1]), self.labels)
            if self.probs is not None and len(self.made) == 2:
                self.probs = opened[str(self.made[1][1])]
        return (self.labels, self.probs) if self.probs is not None else self.labels

    def discard(self) -> None:
        from .block_instances import remove_scratch
        remove_scratch(self.scratch_folder)
        for tmp, _ in self.made:
            shutil.rmtree(tmp, ignore_errors=True)

    def __getstate__(self):
        return {**self.__dict__, "made": []}


def _zarr_target(out, shape, dtype, chunks, made, what: str):
    import zarr
    if isinstance(out, (str, os.PathLike)):
        final = Path(out)
        if final.exists():
            raise FileExistsError(f"segment: {what} target {final} exists; remove it or give another path "
                                  "(results are never written over)")
        if not final.parent.is_dir():
            raise FileNotFoundError(f"segment: the folder of {what} target {final} does not exist; create it first")
        tmp = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
        array = zarr.open_array(str(tmp), mode="w-", shape=shape, chunks=chunks, dtype=dtype, fill_value=0)
        made.append((tmp, final))
        return array
    if not hasattr(out, "chunks") or not hasattr(out, "__setitem__"):
        raise TypeError(f"segment: out= for the {what} takes a path or an open zarr array, not {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"segment: the {what} array has shape {tuple(out.shape)}; this image needs {tuple(shape)}")
    if tuple(out.chunks[-2:]) != tuple(chunks[-2:]) and any(
            c % b for c, b in zip(chunks[-2:], out.chunks[-2:])):
        raise ValueError(f"segment: the {what} array's chunks {tuple(out.chunks)} do not divide the blocks "
                         f"{tuple(chunks[-2:])}; two blocks would write one chunk: pass block= a multiple of them")
    return out


# ---------------------------------------------------------------- largest object across blocks

def keep_largest_objects(labels, z: Optional[int], block: int) -> None:
    """:func:`.postprocess.keep_largest_object` of plane ``z`` of a zarr array, in place,
    reading one block at a time: objects are labelled in each block, joined across block faces
    (8-connected, corners too), and the largest (the first in raster order on a tie) stays."""
    from scipy import ndimage
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    eight = np.ones((3, 3), bool)
    shape = labels.shape[-2:]
    plane = (z,) if z is not None else ()
    offsets, sizes, firsts = {}, [], []
    bottom, top, right, left = {}, {}, {}, {}
    total = 0
    for rows, cols in _grid(shape, block):
        objects, count = ndimage.label(np.asarray(labels[plane + (rows, cols)]), structure=eight)
        ids = np.where(objects > 0, objects + total, 0)
        offsets[(rows.start, cols.start)] = total
        sizes.append(np.bincount(objects.ravel(), minlength=count + 1)[1:])
        _, first = np.unique(objects.ravel(), return_index=True)
        r, c = np.divmod(first[1:] if count else first[:0], objects.shape[1])
        firsts.append((rows.start + r) * shape[1] + cols.start + c)
        top[(rows.start, cols.start)], bottom[(rows.start, cols.start)] = ids[0], ids[-1]
        left[(rows.start, cols.start)], right[(rows.start, cols.start)] = ids[:, 0], ids[:, -1]
        total += count
    if total <= 1:
        return
    pairs = []
    for edge_a, edge_b, along in ((bottom, top, 1), (right, left, 0)):
        lines_a, lines_b = _face_lines(edge_a, edge_b, along, block, shape)
        for a, b in zip(lines_a, lines_b):
            for shift in (-1, 0, 1):
                x, y = _shifted(a, b, shift)
                both = (x > 0) & (y > 0)
                pairs.append(np.stack([x[both], y[both]]))
    pairs = np.concatenate(pairs, axis=1) - 1 if pairs else np.zeros((2, 0), int)
    graph = coo_matrix((np.ones(pairs.shape[1]), (pairs[0], pairs[1])), shape=(total, total))
    _, component = connected_components(graph, directed=False)
    size = np.bincount(component, weights=np.concatenate(sizes))
    first = np.full(component.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, component, np.concatenate(firsts))
    largest = size == size.max()
    keep = int(np.flatnonzero(largest)[np.argmin(first[largest])])
    for rows, cols in _grid(shape, block):
        where = plane + (rows, cols)
        objects, _ = ndimage.label(np.asarray(labels[where]), structure=eight)
        ids = np.where(objects > 0, objects + offsets[(rows.start, cols.start)] - 1, -1)
        kept = np.zeros(objects.shape, labels.dtype)
        kept[ids >= 0] = component[ids[ids >= 0]] == keep
        labels[where] = kept


def _face_lines(edge_a, edge_b, along: int, block: int, shape):
    """Pairs of whole image lines facing each other across block faces: the last row (column)
    of one row (column) of blocks, and the first of the next, each the full width (height)."""
    starts = sorted({k[1 - along] for k in edge_a})       # block rows (along=1) or block columns (along=0)
    pairs = []
    for s, s_next in zip(starts, starts[1:]):
        pick = (lambda k, s=s: k[0] == s) if along == 1 else (lambda k, s=s: k[1] == s)
        pick_next = (lambda k, s=s_next: k[0] == s) if along == 1 else (lambda k, s=s_next: k[1] == s)
        key = (lambda k: k[1]) if along == 1 else (lambda k: k[0])
        a = np.concatenate([edge_a[k] for k in sorted(filter(pick, edge_a), key=key)])
        b = np.concatenate([edge_b[k] for k in sorted(filter(pick_next, edge_b), key=key)])
        pairs.append((a, b))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _shifted(a: np.ndarray, b: np.ndarray, shift: int):
    if shift < 0:
        return a[-shift:], b[:shift]
    if shift > 0:
        return a[:-shift], b[shift:]
    return a, b
