"""Preparing an image for the network: how its shape reads as planes, intensity normalisation,
channels, and resizing.

The network sees ``float32 (in_chans, H, W)`` arrays made by :func:`image_to_channels`,
which applies :func:`normalize` (described by :data:`NORMALIZATION`, stored in
checkpoints so that inference matches training).  numpy only; torch is imported by
:func:`resize_channels` when it runs.
"""
from typing import Optional, Tuple

import numpy as np

from .imageio import channels_equal

#: How :func:`normalize` scales an image; stored in checkpoints so inference matches training.
NORMALIZATION = {"mode": "percentile", "low": 0.5, "high": 99.5, "center": 0.5, "scale": 0.25}

#: CT windows (level, width) in Hounsfield units.  A window, not the percentiles, sets what a
#: model sees of a CT slice: robust percentiles of a whole slice are set by air and bone.
CT_WINDOWS = {"soft tissue": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}

#: ITU-R BT.709 luma weights (as in ``skimage.color.rgb2gray``) for RGB -> grey.
LUMA_WEIGHTS = (0.2125, 0.7154, 0.0721)


def plane_layout(shape: Tuple[int, ...], rgb: Optional[bool] = None) -> Tuple[int, bool]:
    """(number of leading stack axes, whether the last axis is colour) for an image shape."""
    colour = rgb if rgb is not None else (len(shape) >= 3 and shape[-1] in (3, 4))
    if rgb is None and len(shape) >= 3 and shape[-1] not in (3, 4) and shape[-1] <= 8 and min(shape[-3:-1]) > shape[-1]:
        # (Y, X, 2) is two channels, not Y slices of X x 2 pixels; training refuses such images too.
        raise ValueError(f"segment: an image of shape {tuple(shape)} has {shape[-1]} channels (its last axis); the "
                         "models take grey or RGB images: select one channel (image[..., 0]) or save it as grey or RGB")
    spatial = len(shape) - (1 if colour else 0)
    if spatial == 2:
        return 0, colour
    if spatial == 3:
        return 1, colour
    raise ValueError(f"segment: expected a 2D image (Y, X), (Y, X, 3|4), or a stack (Z, Y, X[, 3|4]); "
                     f"got an array of shape {tuple(shape)}. Select one channel or time point first.")


def window_range(window) -> Tuple[float, float]:
    """(low, high) of a window: a name of :data:`CT_WINDOWS` or a (level, width) pair."""
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(f"window {window!r}: use one of {', '.join(CT_WINDOWS)}, or a (level, width) pair")
        window = CT_WINDOWS[window]
    try:
        level, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"window {window!r}: give a name ({', '.join(CT_WINDOWS)}) or a (level, width) pair") from None
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        raise ValueError(f"window {window!r}: the level must be finite and the width positive")
    return level - width / 2, level + width / 2


#: ``window=`` asking for each plane's own percentiles, also for a model trained with a window.
PERCENTILES = "percentiles"


def window_normalization(window) -> dict:
    """What a checkpoint's ``normalization`` records for a model trained with ``window`` (a name of
    :data:`CT_WINDOWS` or a (level, width) pair; None or "percentiles": each image's percentiles)."""
    if window is None or window == PERCENTILES:
        return dict(NORMALIZATION)
    window_range(window)
    return {"mode": "window", "window": window if isinstance(window, str) else [float(v) for v in window],
            "center": NORMALIZATION["center"], "scale": NORMALIZATION["scale"]}


def recorded_window(normalization: dict):
    """The window a checkpoint's ``normalization`` records (None: the percentiles)."""
    return normalization.get("window") if (normalization or {}).get("mode") == "window" else None


def normalize_window(x, window) -> np.ndarray:
    """:func:`normalize` with a fixed intensity window instead of the image's percentiles: the
    window's low and high map as the percentiles would, and values outside it are clipped to it
    (as a viewer shows a CT window).  NaN becomes the low value."""
    low, high = window_range(window)
    values = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=low, posinf=high, neginf=low)
    return _scale(np.clip(values, low, high), low, high)


def normalize(x) -> np.ndarray:
    """Robust per-image scaling to ``float32``, as described by :data:`NORMALIZATION`.

    The 0.5th and 99.5th percentiles over the whole array (all channels) map to 0
    and 1; the result is clipped to [-0.5, 1.5] and returned as ``(x - 0.5) / 0.25``
    (so values lie in [-4, 4], the percentile range in [-2, 2]).  Works for any
    numeric dtype.  A constant image gives zeros; if the two percentiles coincide
    but the image is not constant (a few bright pixels on a flat background) the
    minimum and maximum are used instead.  NaN/inf pixels become the low value.
    """
    x = np.asarray(x)
    if x.dtype in (np.uint8, np.uint16) and x.size:
        return _normalize_by_histogram(x)
    return normalize_reference(x)


def normalize_reference(x) -> np.ndarray:
    """:func:`normalize` computed directly in float64 (``np.percentile`` sorts the image):
    the definition, and the path for every dtype but uint8/uint16."""
    x = np.asarray(x)
    values = x.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            return np.zeros(x.shape, dtype=np.float32)
        fill = values[finite].min()
        values = np.where(finite, values, fill)
    if values.size == 0:
        return np.zeros(x.shape, dtype=np.float32)
    low, high = np.percentile(values, [NORMALIZATION["low"], NORMALIZATION["high"]])
    if not high > low:
        low, high = values.min(), values.max()
        if not high > low:
            return np.zeros(x.shape, dtype=np.float32)
    return _scale(values, low, high)


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = np.clip((values - low) / (high - low), -0.5, 1.5)
    return ((scaled - NORMALIZATION["center"]) / NORMALIZATION["scale"]).astype(np.float32)


def _normalize_by_histogram(x: np.ndarray) -> np.ndarray:
    # uint8/uint16: the percentiles are read off a histogram and every value is mapped through
    # a lookup table, O(n) instead of a sort and float64 arithmetic per pixel: 26 -> 6 ms for
    # a 512x512 RGB image, and a 4000x4000 slide no longer waits seconds before its first tile.
    counts = np.bincount(x.ravel())                 # up to the largest value present
    cumulative = np.cumsum(counts)
    low, high = (_order_statistic_percentile(cumulative, q) for q in (NORMALIZATION["low"], NORMALIZATION["high"]))
    if not high > low:
        present = np.flatnonzero(counts)
        low, high = float(present[0]), float(present[-1])
        if not high > low:
            return np.zeros(x.shape, dtype=np.float32)
    table = _scale(np.arange(len(counts), dtype=np.float64), low, high)
    return np.take(table, x)


def _order_statistic_percentile(cumulative: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation between order statistics) from the
    cumulative histogram of the non-negative integers ``values``."""
    n = int(cumulative[-1])
    position = q / 100 * (n - 1)
    below = int(np.floor(position))
    above = min(below + 1, n - 1)
    v_below, v_above = np.searchsorted(cumulative, [below, above], side="right")
    return float(v_below + (v_above - v_below) * (position - below))


def image_to_channels(image, in_chans: int, window=None) -> np.ndarray:
    """One 2-D image -> the network input ``float32 (in_chans, H, W)``, normalised
    (:func:`normalize`, or :func:`normalize_window` with a ``window``).

    ``image``: grey ``(H, W)`` / ``(H, W, 1)``, RGB ``(H, W, 3)`` or RGBA
    ``(H, W, 4)`` (alpha dropped), any dtype.  Grey (also RGB with R = G = B) is
    normalised once and repeated to ``in_chans`` channels; RGB with ``in_chans == 1`` becomes
    luminance (BT.709 weights).  Raises ``ValueError`` for stacks or a channel
    count that cannot be matched.
    """
    in_chans = int(in_chans)
    image = np.asarray(image)
    scale = normalize if window is None else (lambda x: normalize_window(x, window))
    if image.ndim == 3 and image.shape[-1] in (1, 2, 3, 4):
        channels = image.shape[-1]
        if channels in (2, 4):                     # grey + alpha, RGB + alpha
            image = image[..., : channels - 1]
        if image.shape[-1] == 1 or (image.shape[-1] == 3 and channels_equal(image)):
            image = image[..., 0]                  # grey, possibly stored as R = G = B
    if image.ndim == 2:
        return np.repeat(scale(image)[None], in_chans, axis=0) if in_chans > 1 else scale(image)[None]
    if image.ndim != 3:
        raise ValueError(f"expected one 2-D image (H, W) or (H, W, 3|4), got an array of shape {image.shape}; "
                         f"select one slice of a stack first")
    if image.shape[-1] == in_chans:
        return np.ascontiguousarray(np.moveaxis(scale(image), -1, 0))
    if in_chans == 1 and image.shape[-1] == 3:
        weights = np.asarray(LUMA_WEIGHTS, dtype=np.float64)
        return scale(image.astype(np.float64) @ weights)[None]
    raise ValueError(f"cannot turn an image with {image.shape[-1]} channels into the {in_chans} channels "
                     f"the model expects; use a grey or RGB image")


def is_grey(image: np.ndarray) -> bool:
    return image.ndim == 2 or (image.ndim == 3 and (image.shape[-1] in (1, 2) or channels_equal(image)))


def scaled_size(shape, factor: float) -> Tuple[int, int]:
    """(H, W) of ``shape[:2]`` times ``factor``, at least one pixel each."""
    h, w = shape[:2]
    return max(1, round(h * factor)), max(1, round(w * factor))


def resize_channels(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Float (C, H, W) resized bilinearly to ``size``; antialiased when shrinking, so that fine
    texture does not alias into the smaller image."""
    if tuple(x.shape[1:]) == tuple(size):
        return x
    import torch

    shrink = size[0] < x.shape[1] or size[1] < x.shape[2]
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False,
                                           antialias=shrink)[0].numpy()


def resize_labels(y: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Label image resized by nearest neighbour at pixel centres (the grid of bilinear with
    align_corners=False), so labels stay labels."""
    h, w = y.shape
    nh, nw = size
    rows = np.minimum(((np.arange(nh) + 0.5) * h / nh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(nw) + 0.5) * w / nw).astype(np.int64), w - 1)
    return y[rows[:, None], cols[None, :]]
