"""Which model was trained on images that look like this one.

A model segments the kind of image it learnt from (a polyp model colonoscopy frames,
a nuclei model microscopy) and little else, so before segmenting the app suggests the
shipped model whose training images look most like the user's.  A checkpoint carries an
*appearance profile* of its training images in ``training["appearance"]``: six numbers
measured on each of up to :data:`PROFILE_IMAGES` of them, as the network sees them (after
the per-image percentile normalisation, so dtype and exposure do not matter).  ``train``
records it; ``medrwkv appearance`` adds it to a checkpoint trained before it existed.

An image's distance to a profile is its distance to the nearest training image, feature by
feature in units of :data:`SCALE` (root mean square).  A nearest neighbour rather than a
mean and spread, because one data set may hold several kinds of image (DSB2018: dark
fluorescence and bright stained slides).  The model at the smallest distance is suggested,
if the image *fits* it: is within :func:`fit_threshold` of the profile, twice as far as its
own training images are from each other (the 95th percentile of each one's distance to its
nearest other), within [:data:`MIN_DISTANCE`, :data:`MAX_DISTANCE`].  Calibrated by holding out
one of the three shipped models' sets and its model: the other two are proposed for 0%, 2%
and 5% of the held-out Kvasir-SEG, BUSI and DSB2018 images (a fixed 3.0 proposed them for
43%, 100% and 89%), while each model is still suggested for 100%, 100% and 98% of its own
set's val and test images (``bench/suggest.py --held-out``, bench/RESULTS.md "Which-model
suggestion", 2026-12-07).

A profile of a few images (a model fine-tuned on a handful of the user's slices) is nearer to
a new image of that kind than its count suggests: the nearest of n samples in six features is
farther by about n^(-1/6), so its distances are scaled by (n / :data:`PROFILE_IMAGES`)^(1/6)
before they are compared.  And a model fine-tuned from another (``training["base"]``) learnt
what that one knows and the user's slices besides: where an image fits both, the fine-tuned
one is suggested.
"""
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from .datasets import check_pair
from .preprocess import NORMALIZATION, image_to_channels

FEATURES = ("colourfulness", "red_minus_blue", "brightness", "contrast", "dark_fraction", "fine_texture")
CROP = 512                 # features come from the central CROP x CROP pixels, at the image's own resolution
# One unit of difference per feature: about its spread within one training set (the median over
# the three shipped models' sets), fixed so that distances to different models compare.
SCALE = (0.06, 0.06, 0.06, 0.03, 0.1, 0.03)
FIT_FACTOR = 2.0           # an image fits a model within this many times its training images' spread
MIN_DISTANCE, MAX_DISTANCE = 0.5, 1.5    # bounds of that threshold
FEW_IMAGES = 20            # a profile of fewer images has no reliable spread: it gets FEW_IMAGES_DISTANCE
FEW_IMAGES_DISTANCE = 1.0
PROFILE_IMAGES = 256       # training images a profile keeps (evenly spaced through the set)


@dataclass
class Suggestion:
    source: str            # the shipped name (or checkpoint) suggested
    distance: float        # to the nearest of the model's training images (see SCALE and effective_distance)
    threshold: float = MAX_DISTANCE     # the farthest an image may be and still fit the model (fit_threshold)


def central_crop(image, size: int = CROP):
    """The central ``size`` x ``size`` pixels of a 2-D image (H, W) or (H, W, C), sliced before
    it is read, so that a lazy (dask, zarr) array only loads that part."""
    h, w = image.shape[0], image.shape[1]
    top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return image[top:top + size, left:left + size]


def appearance(image) -> np.ndarray:
    """Six numbers describing one 2-D image (grey or RGB, any dtype), in the order of :data:`FEATURES`.

    Measured on the central :data:`CROP` pixels as the network sees them, mapped to [0, 1]:
    colourfulness (mean max - min over R, G, B), mean red minus blue, brightness (mean grey),
    contrast (its standard deviation), the fraction of dark pixels (grey < 0.1), and fine texture
    (ten times the mean absolute difference of grey from its 3 x 3 mean: speckle, grain).
    """
    x = image_to_channels(np.asarray(central_crop(image)), 3).astype(np.float64)
    rgb = np.clip(x * NORMALIZATION["scale"] + NORMALIZATION["center"], 0.0, 1.0)
    grey = rgb.mean(0)
    return np.array([
        (rgb.max(0) - rgb.min(0)).mean(),
        (rgb[0] - rgb[2]).mean(),
        grey.mean(),
        grey.std(),
        (grey < 0.1).mean(),
        10 * np.abs(grey - ndimage.uniform_filter(grey, 3, mode="reflect")).mean(),
    ])


def appearance_profile(images: Iterable) -> dict:
    """The profile of a set of images (arrays) as a checkpoint stores it: each image's features."""
    samples = [[round(float(v), 5) for v in appearance(image)] for image in images]
    if not samples:
        raise ValueError("an appearance profile needs at least one image")
    return {"features": list(FEATURES), "samples": samples}


def pairs_profile(items: Sequence, num_classes: int) -> dict:
    """The profile of training pairs (:class:`.data.Pair` files or ``(image, mask)`` arrays): up to
    :data:`PROFILE_IMAGES` of them, evenly spaced, read and checked as training reads them (so an
    error names the file)."""
    return appearance_profile(check_pair(item, num_classes)[0] for item in evenly_spaced(items))


def evenly_spaced(items: Sequence, limit: int = PROFILE_IMAGES) -> list:
    """At most ``limit`` of ``items``, spread evenly over them (all when there are fewer)."""
    if len(items) <= limit:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def profile_of(info) -> Optional[dict]:
    """A checkpoint's appearance profile (from its :class:`.checkpoint.ModelInfo`), or None when it
    has none or one measured with other features (an older or newer version of this module)."""
    profile = (info.training or {}).get("appearance") if info is not None else None
    if not isinstance(profile, dict) or profile.get("features") != list(FEATURES) or not profile.get("samples"):
        return None
    return profile


def merged_profile(profiles: Iterable[Optional[dict]]) -> Optional[dict]:
    """One profile holding the images of several (a model trained on all their data), each image
    once; None when none of them is a profile."""
    samples = {}
    for profile in profiles:
        if profile is not None:
            samples.update((tuple(sample), None) for sample in profile["samples"])
    return {"features": list(FEATURES), "samples": [list(s) for s in samples]} if samples else None


def distance(profile: dict, features: np.ndarray) -> float:
    """Distance of an image's ``features`` to the nearest image of the profile, in units of :data:`SCALE`."""
    differences = (np.asarray(profile["samples"], dtype=np.float64) - np.asarray(features)) / np.asarray(SCALE)
    return float(np.sqrt((differences ** 2).mean(1)).min())


def _samples(profile: dict) -> np.ndarray:
    return np.asarray(profile["samples"], dtype=np.float64) / np.asarray(SCALE)


def fit_threshold(profile: dict) -> float:
    """How far (see :func:`effective_distance`) an image may be from a profile and still fit its
    model: :data:`FIT_FACTOR` times the 95th percentile of the distances of the profile's images
    to their nearest other one, within [:data:`MIN_DISTANCE`, :data:`MAX_DISTANCE`];
    :data:`FEW_IMAGES_DISTANCE` for a profile of fewer than :data:`FEW_IMAGES` images."""
    samples = _samples(profile)
    if len(samples) < FEW_IMAGES:
        return FEW_IMAGES_DISTANCE
    pairwise = np.sqrt(((samples[:, None] - samples[None]) ** 2).mean(-1))
    np.fill_diagonal(pairwise, np.inf)
    spread = float(np.percentile(pairwise.min(1), 95))
    return float(np.clip(FIT_FACTOR * spread, MIN_DISTANCE, MAX_DISTANCE))


def effective_distance(profile: dict, features: np.ndarray) -> float:
    """:func:`distance`, scaled by (n / :data:`PROFILE_IMAGES`)^(1/6) for a profile of n < PROFILE_IMAGES
    images: the nearest of fewer samples is farther by that much, which is no sign of another kind."""
    n = min(len(profile["samples"]), PROFILE_IMAGES)
    return distance(profile, features) * (n / PROFILE_IMAGES) ** (1 / 6)


def suggest_model(image, sources: Optional[List[str]] = None) -> Optional[Suggestion]:
    """The model among ``sources`` (default: the shipped models that segment on their own) whose
    training images look most like ``image``, or None when the image fits none of them (see
    :func:`fit_threshold`)."""
    from .model import list_automatic, read_model_info
    profiles, bases = {}, {}
    for source in list_automatic() if sources is None else sources:
        try:
            info = read_model_info(source)
        except ValueError:           # a damaged file is not a candidate; loading it says what is wrong
            continue
        profiles[source] = profile_of(info)
        bases[source] = (info.training or {}).get("base") if info is not None else None
    return suggest_from_profiles(appearance(image), profiles, bases)


def suggest_from_profiles(features: np.ndarray, profiles: dict, bases: Optional[dict] = None) -> Optional[Suggestion]:
    """:func:`suggest_model` for an image's ``features``, ``{source: profile or None}`` and
    ``{source: the model it was fine-tuned from}``: the nearest model the image fits, or a model
    fine-tuned from it (at any remove) that the image fits too."""
    fitting = {}
    for source, profile in profiles.items():
        if profile is None:
            continue
        d, limit = effective_distance(profile, features), fit_threshold(profile)
        if d <= limit:
            fitting[source] = Suggestion(source, d, limit)
    if not fitting:
        return None
    best = min(fitting.values(), key=lambda s: s.distance)
    bases = bases or {}

    def descends(source, ancestor, seen=()):
        base = bases.get(source)
        return base is not None and base not in seen and (base == ancestor or descends(base, ancestor, seen + (base,)))
    heirs = [s for s in fitting.values() if descends(s.source, best.source)]
    return min(heirs, key=lambda s: s.distance) if heirs else best
