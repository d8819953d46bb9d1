"""Click to fix: one object's mask from clicks, a box and its current mask (:func:`refine`).

A prompt-aware model is an ordinary network of the registry whose input has, beside the image's
channels, :data:`PROMPT_CHANNELS` maps at the network's resolution: positive clicks and negative
clicks as disks, the box filled, and the object's current mask (RITM's click disks plus the
previous mask; ScribblePrompt's filled box).  Its checkpoint says so (``ModelInfo.prompt_channels``);
with every prompt map empty it segments like an automatic model, so ``segment`` runs it too.

``refine`` never runs a large image whole: it crops a window around the prompts (their extent
enlarged :data:`WINDOW_EXPAND` times), resizes it to :data:`INPUT_SIZE`, and widens the window
(:data:`WIDEN_FACTOR` times, towards the object) while the object touches its edge
(nnInteractive's "AutoZoom").  :func:`next_click` is the simulated user of training and of
``bench/interactive.py`` (RITM's clicker).  No Qt, no napari.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from scipy import ndimage

from .preprocess import image_to_channels, plane_layout, resize_channels

#: The prompt maps after the image channels, in this order.
PROMPT_NAMES = ("positive clicks", "negative clicks", "box", "previous mask")
PROMPT_CHANNELS = len(PROMPT_NAMES)
#: Side of the square window the network sees, in its pixels, unless the checkpoint says otherwise
#: (a prompt-aware model's ``ModelInfo.tile_size`` is its window).
INPUT_SIZE = 160
#: Radius of a click's disk, in network pixels (RITM's released configs use 5).
CLICK_RADIUS = 5
#: The window around the prompts' extent, as a multiple of that extent (RITM's zoom-in uses 1.4).
WINDOW_EXPAND = 1.4
#: The smallest window, in image pixels: a single click on a small object still shows its context.
MIN_WINDOW = 64
#: How many times the window may widen while the object touches its edge, and by how much each
#: time: a lone first click on a large object reaches 8x the smallest window in three steps.
MAX_WIDENINGS = 3
WIDEN_FACTOR = 2.0
#: The shipped prompt-aware model, meant for any kind of image.
DEFAULT_MODEL = "rwkv_unet_t-interactive"

Point = Tuple[float, float, bool]
Box = Tuple[float, float, float, float]
Window = Tuple[int, int, int, int]          # row0, col0, row1, col1 (end exclusive)


# --------------------------------------------------------------------------- prompt-aware networks


def add_prompt_inputs(net: nn.Module, new_net: nn.Module) -> nn.Module:
    """Load ``net``'s weights into ``new_net``, the same architecture with :data:`PROMPT_CHANNELS`
    more input channels.  Every tensor that grew keeps its old values in the leading block; what
    the new channels feed into starts at zero (the input dimension of a weight), so ``new_net``
    computes exactly what ``net`` did, whatever the prompt maps hold, until it is trained."""
    old, new = net.state_dict(), new_net.state_dict()
    merged = {}
    for key, value in new.items():
        before = old[key]
        if before.shape == value.shape:
            merged[key] = before
            continue
        if before.dim() != value.dim() or any(b > n for b, n in zip(before.shape, value.shape)):
            raise ValueError(f"{key}: cannot grow {tuple(before.shape)} into {tuple(value.shape)}")
        grown = value.clone()
        if grown.dim() >= 2 and before.shape[1] != value.shape[1]:
            grown[:, before.shape[1]:] = 0              # new inputs contribute nothing yet
        grown[tuple(slice(0, n) for n in before.shape)] = before
        merged[key] = grown
    new_net.load_state_dict(merged)
    return new_net


# --------------------------------------------------------------------------- prompts as maps


def _disk(maps: np.ndarray, row: float, col: float, radius: float) -> None:
    h, w = maps.shape
    r0, r1 = max(0, int(np.floor(row - radius))), min(h, int(np.ceil(row + radius)) + 1)
    c0, c1 = max(0, int(np.floor(col - radius))), min(w, int(np.ceil(col + radius)) + 1)
    if r0 >= r1 or c0 >= c1:
        return
    rr, cc = np.mgrid[r0:r1, c0:c1]
    maps[r0:r1, c0:c1] |= (rr - row) ** 2 + (cc - col) ** 2 <= radius ** 2


def encode_prompts(size: int, points: Sequence[Point], box: Optional[Box], mask: Optional[np.ndarray],
                   radius: float = CLICK_RADIUS) -> np.ndarray:
    """The prompt maps ``float32 (PROMPT_CHANNELS, size, size)`` for prompts already in network
    pixel coordinates (``mask``: a ``size`` x ``size`` array, or None)."""
    maps = np.zeros((PROMPT_CHANNELS, size, size), dtype=bool)
    for row, col, positive in points:
        _disk(maps[0 if positive else 1], row, col, radius)
    if box is not None:
        r0, c0, r1, c1 = box
        maps[2, max(0, int(round(r0))):max(0, int(round(r1))), max(0, int(round(c0))):max(0, int(round(c1)))] = True
    if mask is not None:
        maps[3] = mask > 0
    return maps.astype(np.float32)


# --------------------------------------------------------------------------- the window


def prompt_extent(shape, points: Sequence[Point], box: Optional[Box], mask: Optional[np.ndarray]):
    """(row0, col0, row1, col1) spanning the positive clicks, the box and the mask, or None when
    there is none of them (negative clicks alone say nothing of where the object is)."""
    rows, cols = [], []
    for row, col, positive in points:
        if positive:
            rows.append(row)
            cols.append(col)
    if box is not None:
        rows += [box[0], box[2]]
        cols += [box[1], box[3]]
    if mask is not None and mask.any():
        where_rows, where_cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        rows += [where_rows[0], where_rows[-1] + 1]
        cols += [where_cols[0], where_cols[-1] + 1]
    if not rows:
        return None
    return min(rows), min(cols), max(rows), max(cols)


def square_window(shape, extent, expand: float = WINDOW_EXPAND, minimum: int = MIN_WINDOW) -> Window:
    """A square window around ``extent`` (``expand`` times its longer side, at least ``minimum``),
    shifted to lie inside an image of ``shape`` where it fits, cut to it where it does not."""
    h, w = shape[:2]
    r0, c0, r1, c1 = extent
    side = int(np.ceil(max(r1 - r0, c1 - c0, 1) * expand))
    side = max(side, minimum)
    centre_r, centre_c = (r0 + r1) / 2, (c0 + c1) / 2
    top = int(round(centre_r - side / 2))
    left = int(round(centre_c - side / 2))
    top = min(max(top, 0), max(h - side, 0))
    left = min(max(left, 0), max(w - side, 0))
    return top, left, min(top + side, h), min(left + side, w)


def widened_window(shape, window: Window, inside: np.ndarray, factor: float = WIDEN_FACTOR) -> Window:
    """The next window when the object (``inside``, the window's prediction) touches ``window``'s
    edge: ``factor`` times its side, centred on the object as far as it was seen, so that it grows
    towards the sides the object ran out of."""
    top, left, bottom, right = window
    side = max(bottom - top, right - left)
    extent = prompt_extent(shape, [], None, inside)
    extent = window if extent is None else (top + extent[0], left + extent[1], top + extent[2], left + extent[3])
    return square_window(shape, extent, expand=1.0, minimum=int(np.ceil(side * factor)))


def _touches_edge(prediction: np.ndarray, window: Window, shape) -> bool:
    """Whether the object reaches a side of the window that is not the image's own edge."""
    top, left, bottom, right = window
    h, w = shape[:2]
    return bool((top > 0 and prediction[0].any()) or (bottom < h and prediction[-1].any())
                or (left > 0 and prediction[:, 0].any()) or (right < w and prediction[:, -1].any()))


# --------------------------------------------------------------------------- refine


@dataclass
class _Prompts:
    points: List[Point]
    box: Optional[Box]
    mask: Optional[np.ndarray]


def _check_prompts(shape, points, box, mask) -> _Prompts:
    h, w = shape[:2]
    checked = []
    for i, point in enumerate(points or []):
        try:
            row, col, positive = point
            row, col = float(row), float(col)
        except (TypeError, ValueError):
            raise ValueError(f"refine: points[{i}] = {point!r}; give (row, col, True) for inside the object "
                             "or (row, col, False) for outside") from None
        if not (0 <= row < h and 0 <= col < w):
            raise ValueError(f"refine: points[{i}] = ({row:g}, {col:g}) lies outside the {h}x{w} image")
        checked.append((row, col, bool(positive)))
    if box is not None:
        try:
            r0, c0, r1, c1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(f"refine: box = {box!r}; give (row0, col0, row1, col1)") from None
        r0, r1 = sorted((min(max(r0, 0), h), min(max(r1, 0), h)))
        c0, c1 = sorted((min(max(c0, 0), w), min(max(c1, 0), w)))
        if r1 - r0 < 1 or c1 - c0 < 1:
            raise ValueError(f"refine: box = {tuple(box)} covers no pixel of the {h}x{w} image")
        box = (r0, c0, r1, c1)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (h, w):
            raise ValueError(f"refine: mask has shape {mask.shape}; it must have the image's shape {(h, w)}")
        mask = mask > 0
    if prompt_extent(shape, checked, box, mask) is None:
        raise ValueError("refine: nothing says where the object is; give a positive point, a box, or its mask")
    return _Prompts(checked, box, mask)


def _load(model, device):
    from .model import SegmentationModel, load_model
    model = model if isinstance(model, SegmentationModel) else load_model(model or DEFAULT_MODEL, device=device)
    if not model.info.prompt_channels:
        raise ValueError(f"refine: {model.name} is an automatic model; it takes no clicks. Use a prompt-aware "
                         f"model such as {DEFAULT_MODEL}")
    return model


def window_input(image: np.ndarray, window: Window, prompts: _Prompts, in_chans: int,
                 size: int = INPUT_SIZE) -> np.ndarray:
    """The network's input ``float32 (in_chans + PROMPT_CHANNELS, size, size)`` for ``window`` of
    ``image``: the crop normalised and resized, the prompts drawn at that scale."""
    top, left, bottom, right = window
    crop = image[top:bottom, left:right]
    x = resize_channels(image_to_channels(crop, in_chans), (size, size))
    scale_r, scale_c = size / (bottom - top), size / (right - left)
    points = [((r - top + 0.5) * scale_r - 0.5, (c - left + 0.5) * scale_c - 0.5, p) for r, c, p in prompts.points
              if top <= r < bottom and left <= c < right]
    box = None
    if prompts.box is not None:
        r0, c0, r1, c1 = prompts.box
        box = ((r0 - top) * scale_r, (c0 - left) * scale_c, (r1 - top) * scale_r, (c1 - left) * scale_c)
    mask = None
    if prompts.mask is not None:
        mask = resize_channels(prompts.mask[top:bottom, left:right][None].astype(np.float32), (size, size))[0] >= 0.5
    return np.concatenate([x, encode_prompts(size, points, box, mask)])


def predict_window(model, x: np.ndarray) -> np.ndarray:
    """Foreground probabilities ``(size, size)`` of one window's input."""
    with torch.inference_mode():
        batch = torch.from_numpy(np.ascontiguousarray(x))[None].to(model.device, memory_format=torch.channels_last)
        return torch.sigmoid(model.inference_net()(batch).float())[0, 0].cpu().numpy()


def refine(image, points: Sequence[Point] = (), box: Optional[Box] = None, mask=None, model=None,
           device="auto", threshold: float = 0.5, rgb: Optional[bool] = None) -> np.ndarray:
    """One object's mask from clicks, a box and its current mask.

    Args:
        image: a 2-D image as :func:`napari_medrwkv.segment` takes it: (Y, X) or (Y, X, 3|4), any
            dtype (one plane of a stack).
        points: ``(row, col, True)`` inside the object, ``(row, col, False)`` outside, in image
            pixels; the newest last.
        box: ``(row0, col0, row1, col1)`` around the object, or None.
        mask: the object's current mask (bool, the image's shape), or None.
        model: a prompt-aware model, shipped name or checkpoint; None: :data:`DEFAULT_MODEL`.
        threshold: foreground where the probability is above this.

    Returns:
        A bool mask of the image's shape (Y, X).

    Example:
        >>> mask = refine(image, points=[(120, 88, True)])
        >>> mask = refine(image, points=[(120, 88, True), (140, 60, False)], mask=mask)
    """
    image = np.asarray(image)
    stack_axes, _ = plane_layout(image.shape, rgb)
    if stack_axes:
        raise ValueError(f"refine: the image has shape {image.shape}, a stack; give one plane of it")
    prompts = _check_prompts(image.shape, points, box, mask)
    model = _load(model, device)
    shape = image.shape[:2]
    window = square_window(shape, prompt_extent(shape, prompts.points, prompts.box, prompts.mask))
    for widening in range(MAX_WIDENINGS + 1):
        probs = predict_window(model, window_input(image, window, prompts, model.info.in_chans,
                                                   model.info.tile_size))
        top, left, bottom, right = window
        probs = resize_channels(probs[None], (bottom - top, right - left))[0]
        inside = probs > threshold
        full = (top, left, bottom, right) == (0, 0) + tuple(shape)
        if widening == MAX_WIDENINGS or full or not _touches_edge(inside, window, shape):
            break
        window = widened_window(shape, window, inside)
    result = np.zeros(shape, dtype=bool)
    result[top:bottom, left:right] = inside
    return result


# --------------------------------------------------------------------------- the simulated user


def _distance_inside(region: np.ndarray) -> np.ndarray:
    """Distance of each pixel of ``region`` to its edge, the image border counting as an edge."""
    return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]


def next_click(prediction: np.ndarray, truth: np.ndarray) -> Optional[Point]:
    """RITM's clicker: in whichever error region (missed, or wrongly included) reaches farther
    from its edge, click the pixel farthest from the edge; positive in a missed region.  None
    when the prediction is the truth."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    missed = _distance_inside(truth & ~prediction)
    extra = _distance_inside(prediction & ~truth)
    far_missed, far_extra = missed.max(initial=0), extra.max(initial=0)
    if far_missed == 0 and far_extra == 0:
        return None
    positive = far_missed >= far_extra
    distances = missed if positive else extra
    row, col = np.unravel_index(int(np.argmax(distances)), distances.shape)
    return float(row), float(col), bool(positive)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
