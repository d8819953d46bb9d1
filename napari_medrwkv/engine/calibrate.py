"""Choose a binary model's inference settings on validation images (nnU-Net's way with its
post-processing): the foreground threshold, whether to keep only the largest object, and
optionally test-time flips, by the mean Dice they give.

Each image runs through the network once per flips setting; the rest of the grid is
thresholding and labelling of the stored probabilities.  Imports neither Qt nor napari.
"""
from itertools import product
from typing import Callable, Optional, Sequence

from .checkpoint import INFERENCE_DEFAULTS
from .evaluate import load_pair, scored_pairs
from .defaults import CALIBRATION_THRESHOLDS
from .infer import Cancelled, segment
from .metrics import mean_finite, per_class_scores
from .model import SegmentationModel, load_model
from .postprocess import binary_labels


def calibrate(model, data, split: Optional[str] = None, include: Optional[Sequence[str]] = None,
              try_flips: bool = False, thresholds: Sequence[float] = CALIBRATION_THRESHOLDS, device="auto",
              tile: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None,
              cancel: Optional[Callable[[], bool]] = None, min_gain: float = 0.001) -> dict:
    """The settings with the best mean Dice on ``data`` (a folder, its ``split``, the stems
    matching ``include``; or a list of (image, mask) pairs), and what each candidate scored.

    Returns ``{"inference": {...}, "dice": best, "baseline_dice": with the defaults (no flips,
    0.5, every object), "n": images, "grid": [{"flips", "threshold", "largest_component",
    "dice"}, ...]}``.  The grid is listed plainest first (no flips, thresholds nearest 0.5,
    every object), and the plainest candidate within ``min_gain`` of the best Dice is chosen:
    a setting must earn its place by more than noise.  ``try_flips`` adds test-time flips to
    the grid (4x the time of each segmentation that uses them).
    """
    model = model if isinstance(model, SegmentationModel) else load_model(model, device=device)
    if not model.binary:
        raise ValueError(f"calibrate: {model.name} has {model.info.num_classes} classes; calibration chooses the "
                         "threshold and largest-object filter of binary (one-output) models")
    thresholds = _checked_thresholds(thresholds)
    if not 0 <= min_gain < 1:
        raise ValueError(f"calibrate: min_gain={min_gain!r} is a Dice difference in [0, 1)")
    items = scored_pairs(data, split, include)
    if not items:
        raise ValueError(f"calibrate: no image/mask pairs in {data}" + (f" (split {split!r})" if split else ""))
    flip_options = (False, True) if try_flips else (False,)
    total, done = len(items) * len(flip_options), 0
    dice = {}
    for i, item in enumerate(items):
        _, image, truth = load_pair(item, i, 1)
        for flips in flip_options:
            if cancel is not None and cancel():
                raise Cancelled("calibration cancelled")
            _, foreground = segment(image, model=model, tile=tile, flips=flips, return_probabilities=True,
                                    threshold=0.5, largest_component=False)
            for threshold, largest in product(thresholds, (False, True)):
                labels = binary_labels(foreground, threshold, largest)
                dice.setdefault((flips, threshold, largest), []).append(per_class_scores(labels, truth, 1)["dice"])
            done += 1
            if progress is not None:
                progress(done, total)
    grid = [{"flips": f, "threshold": t, "largest_component": lc, "dice": mean_finite(dice[f, t, lc])[0]}
            for f, t, lc in _plainest_first(flip_options, thresholds)]
    top = max(c["dice"] for c in grid)
    best = next(c for c in grid if c["dice"] >= top - min_gain)
    baseline = grid[0]                # the plainest candidate is the defaults
    chosen = {k: best[k] for k in INFERENCE_DEFAULTS}
    return {"inference": chosen, "dice": best["dice"], "baseline_dice": baseline["dice"], "n": len(items),
            "grid": grid}


def _checked_thresholds(thresholds) -> tuple:
    values = tuple(float(t) for t in thresholds)
    bad = [t for t in values if not 0 < t < 1]
    if bad or not values:
        raise ValueError(f"calibrate: thresholds must be probabilities strictly between 0 and 1, got {list(thresholds)}")
    # The defaults are always a candidate, so the choice is never worse than them on these images.
    return tuple(sorted(set(values) | {INFERENCE_DEFAULTS["threshold"]}))


def _plainest_first(flip_options, thresholds):
    by_distance = sorted(thresholds, key=lambda t: (abs(t - INFERENCE_DEFAULTS["threshold"]), t))
    return [(f, t, lc) for f in flip_options for lc in (False, True) for t in by_distance]
