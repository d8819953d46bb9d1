"""Training data: dataset folders and their splits, image/mask pairs, and the torch Dataset
that serves augmented patches from them.

A dataset folder holds ``images/`` and ``masks/`` whose files pair by stem, and optionally
``splits.json`` (``{"train": [stems], "val": [...], "test": [...]}``).  A pair of scans (NIfTI,
NRRD, MetaImage; engine/scans.py) is a pair per slice the scanner acquired, ``<stem>_z<slice>``;
splits name the scans' stems, so that no scan is split between training and validation.  Training patches pad
masks with :data:`IGNORE_INDEX` (-1): losses and metrics must skip those pixels.
"""
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .imageio import SUPPORTED_EXTENSIONS, DataError, PathLike, mask_classes, read_image, read_mask
from .instances import encode_targets, instance_pair
from .scans import scan_planes, scan_stem, scan_suffix
from .preprocess import image_to_channels, is_grey, resize_channels, resize_labels, scaled_size

#: Mask value of padded pixels in training patches; losses must ignore it.
IGNORE_INDEX = -1


@dataclass
class Pair:
    """One training example: its stem and the paths of its image and mask."""

    stem: str
    image: Path
    mask: Path
    plane: Optional[int] = None      # a scan's slice (along the acquired axis); None: a 2-D image file


def _list_by_stem(folder: Path, what: str) -> Dict[str, Path]:
    files: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or (path.suffix.lower() not in SUPPORTED_EXTENSIONS
                                                                and not scan_suffix(path)):
            continue
        stem = scan_stem(path)
        if stem in files:
            raise DataError(f"two {what}s share the stem {stem!r}: {files[stem]} and {path}; "
                            f"keep one of them (pairs are matched by file name without extension)")
        files[stem] = path
    return files


def _some(stems: Iterable[str], limit: int = 5) -> str:
    stems = sorted(stems)
    shown = ", ".join(stems[:limit])
    return shown + (f", ... ({len(stems)} in all)" if len(stems) > limit else f" ({len(stems)} in all)")


def read_splits(folder: PathLike) -> Dict[str, List[str]]:
    """The splits of ``folder/splits.json`` as ``{name: [stems]}`` (non-list entries such as "seed" skipped).

    Raises :class:`DataError` if the file is missing or is not a JSON object.
    """
    path = Path(folder) / "splits.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist; create it as {{\"train\": [stems], \"val\": [...], "
                        f"\"test\": [...]}} or use all pairs (split=None)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path} ({exc}); fix the JSON or delete the file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} must hold a JSON object like {{\"train\": [stems], \"val\": [...]}}")
    return {str(k): [str(s) for s in v] for k, v in data.items() if isinstance(v, list)}


def find_pairs(folder: PathLike, split: Optional[str] = None) -> List[Pair]:
    """Image/mask pairs of a dataset folder, sorted by stem.

    ``folder`` holds ``images/`` and ``masks/``; files pair by stem (name without
    extension, any supported extension on either side).  With ``split`` the stems
    listed under that key of ``folder/splits.json`` are returned; ``split=None``
    returns every pair.  Raises :class:`DataError` (naming the folder or file)
    for a missing folder or subfolder, no images, images without masks or masks
    without images, two files with the same stem, a missing ``splits.json`` or
    split key, and split stems without files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist; choose a folder holding images/ and masks/")
    images_dir, masks_dir = folder / "images", folder / "masks"
    missing = [d.name + "/" for d in (images_dir, masks_dir) if not d.is_dir()]
    if missing:
        raise DataError(f"dataset folder {folder} has no {' and no '.join(missing)} subfolder; put the images "
                        f"in {images_dir} and their masks (same file names) in {masks_dir}")
    images = _list_by_stem(images_dir, "image")
    masks = _list_by_stem(masks_dir, "mask")
    if not images and not masks:
        raise DataError(f"dataset folder {folder} is empty: no image files in {images_dir} or {masks_dir} "
                        f"(supported: {', '.join(SUPPORTED_EXTENSIONS)})")
    no_mask = set(images) - set(masks)
    no_image = set(masks) - set(images)
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(f"images without a mask in {masks_dir}: {_some(no_mask)}")
        if no_image:
            parts.append(f"masks without an image in {images_dir}: {_some(no_image)}")
        raise DataError(f"dataset folder {folder} has unmatched files: {'; '.join(parts)}. Give every image a "
                        f"mask with the same name (extensions may differ), or move the extra files out")
    stems = sorted(images)
    if split is not None:
        splits = read_splits(folder)
        if split not in splits:
            raise DataError(f"{folder / 'splits.json'} has no {split!r} split; it has: "
                            f"{', '.join(sorted(splits)) or 'none'}. Add the key or pick one of those")
        wanted = set(splits[split])
        if not wanted:
            raise DataError(f"{folder / 'splits.json'}: the {split!r} split is empty; list the stems of its images "
                            f"under {split!r}, or leave out the split to use every pair")
        absent = wanted - set(images)
        if absent:
            raise DataError(f"{folder / 'splits.json'} lists stems under {split!r} with no files in {images_dir}: "
                            f"{_some(absent)}; fix splits.json or add the files")
        stems = sorted(wanted)
    return [pair for stem in stems for pair in _slices(Pair(stem, images[stem], masks[stem]))]


def _slices(pair: Pair) -> List[Pair]:
    """A pair of scans as one pair per acquired slice; any other pair as it is."""
    if not (scan_suffix(pair.image) or scan_suffix(pair.mask)):
        return [pair]
    if not (scan_suffix(pair.image) and scan_suffix(pair.mask)):
        raise DataError(f"{pair.image} and {pair.mask}: a scan's mask must be a scan too (and an image's an image); "
                        "save the mask in the scan's format, on its grid")
    planes, geometry = scan_planes(pair.image)
    mask_planes, mask_geometry = scan_planes(pair.mask)
    if planes.shape[:3] != mask_planes.shape[:3] or not np.allclose(geometry.spacing, mask_geometry.spacing,
                                                                    rtol=1e-4):
        raise DataError(f"scan {pair.image} ({'x'.join(map(str, geometry.shape))} voxels of "
                        f"{'x'.join(f'{v:g}' for v in geometry.spacing)} mm) and its mask {pair.mask} "
                        f"({'x'.join(map(str, mask_geometry.shape))} of {'x'.join(f'{v:g}' for v in mask_geometry.spacing)}"
                        " mm) are not on one grid; save the mask on the scan's grid")
    return [Pair(f"{pair.stem}_z{z:03d}", pair.image, pair.mask, z) for z in range(len(planes))]


def pairs_matching(items, patterns: Sequence[str], where, argument: str = "include") -> list:
    """The pairs among ``items`` whose stem matches one of ``patterns`` (shell-style, e.g.
    ``benign_*``), in order.  A pattern that matches nothing is an error naming ``where`` (the
    dataset folder), so a typo does not silently shrink the set; ``argument`` is the caller's
    name for ``patterns``, for the errors."""
    if not all(hasattr(item, "stem") for item in items):
        raise ValueError(f"{argument}= picks pairs of a dataset folder by stem; pass a folder")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(item.stem, pattern) for item in items):
            raise DataError(f"{argument} pattern {pattern!r} matches no image stem in {where}")
    return [item for item in items if any(fnmatch.fnmatchcase(item.stem, p) for p in patterns)]


def read_pair(pair: Pair, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """The image and mask of a pair of files, or of one slice of a pair of scans."""
    if pair.plane is None:
        return read_image(pair.image), read_mask(pair.mask, num_classes)
    image, mask = scan_planes(pair.image)[0][pair.plane], scan_planes(pair.mask)[0][pair.plane]
    return image, mask_classes(mask, num_classes, f"mask {pair.mask} (slice {pair.plane})")


def check_pair(pair, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """Read and validate one pair (a :class:`Pair` of files, or an ``(image, mask)`` tuple of arrays);
    returns ``(image, mask)`` as :func:`read_image` / :func:`read_mask` give them.

    Raises :class:`DataError` if the image is not a single 2-D image, if the sizes
    differ ("image X is 256x320 but its mask Y is 256x256") or the mask's class
    ids do not fit ``num_classes``.
    """
    if isinstance(pair, tuple):      # in-memory (image, mask), e.g. reviewed layers in napari
        image, mask = np.asarray(pair[0]), mask_classes(np.asarray(pair[1]), num_classes, "the in-memory mask")
        image_name, mask_name = "the in-memory image", "its mask"
    elif pair.plane is not None:    # a slice of a scan
        image, mask = read_pair(pair, num_classes)
        image_name, mask_name = f"slice {pair.plane} of scan {pair.image}", f"its mask {pair.mask}"
    else:
        image, mask = read_image(pair.image), read_mask(pair.mask, num_classes)
        image_name, mask_name = f"image {pair.image}", f"its mask {pair.mask}"
    if image.ndim == 3 and image.shape[-1] <= 8 and image.shape[-1] not in (3, 4):
        raise DataError(f"{image_name} has {image.shape[-1]} channels (shape {image.shape}); the models take grey or "
                        "RGB images: save one channel, or the image as grey or RGB")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        raise DataError(f"{image_name} has shape {image.shape}; training needs one 2-D grey or RGB image "
                        f"per file, not a stack; save each slice as its own image")
    if image.shape[:2] != mask.shape:
        raise DataError(f"{image_name} is {image.shape[0]}x{image.shape[1]} but {mask_name} is "
                        f"{mask.shape[0]}x{mask.shape[1]}; masks must have the size of their image")
    return image, mask


# --------------------------------------------------------------------------- training patches


def _place(size: int, patch: int, rng: Optional[np.random.Generator], keep: Optional[int] = None) -> int:
    """Offset of a patch inside a longer axis (crop) or of the axis inside a longer patch (pad).

    ``keep``: a pixel index that a crop must contain (the offset is uniform among those that do).
    """
    slack = abs(size - patch)
    if rng is None:
        return slack // 2
    if keep is not None and size > patch:
        return int(rng.integers(max(0, keep - patch + 1), min(keep, slack) + 1))
    return int(rng.integers(0, slack + 1))


def _foreground_pixel(y: np.ndarray, rng: np.random.Generator) -> Optional[Tuple[int, int]]:
    """A random pixel of a random class present in ``y`` (> 0), or None when ``y`` has no foreground.

    Class first, then pixel: a rare class is found as often as a common one.
    """
    classes = np.unique(y[y > 0])
    if classes.size == 0:
        return None
    where = np.flatnonzero(y == classes[int(rng.integers(0, classes.size))])
    return tuple(int(i) for i in np.unravel_index(where[int(rng.integers(0, where.size))], y.shape))


#: Augmentation at strength 1: random scale range, brightness/contrast jitter, noise sigma bound.
_SCALE_JITTER, _INTENSITY, _NOISE = 0.25, 0.2, 0.05
MAX_AUGMENT_STRENGTH = 3.0          # scale down to 1 - 0.75: beyond, images would shrink to nothing


def augmentation(strength: float = 1.0) -> dict:
    """:class:`SegmentationDataset` keyword arguments for an augmentation ``strength``.

    1 gives the defaults (scale 0.75-1.25, brightness and contrast +-0.2, noise sigma up to
    0.05); 0 leaves the flips and 90-degree rotations only; the three ranges grow linearly
    in between and up to :data:`MAX_AUGMENT_STRENGTH`.
    """
    strength = float(strength)
    if not 0 <= strength <= MAX_AUGMENT_STRENGTH:
        raise ValueError(f"augment_strength must lie in [0, {MAX_AUGMENT_STRENGTH:g}], got {strength:g}")
    jitter = _SCALE_JITTER * strength
    return dict(scale=(1 - jitter, 1 + jitter) if jitter else None, intensity=_INTENSITY * strength,
                noise=_NOISE * strength)


class SegmentationDataset(Dataset):
    """Training / validation patches from image-mask pairs, preloaded into memory.

    ``(pairs, in_chans, num_classes, patch_size=256, augment=True, samples_per_epoch=None, seed=0)``.
    Item ``i`` is ``(x, y)``: ``x`` float32 tensor ``(in_chans, P, P)`` normalised
    with :func:`image_to_channels`, ``y`` int64 tensor ``(P, P)`` (0/1 for a binary
    model, class ids otherwise, :data:`IGNORE_INDEX` = -1 where the patch was padded).
    Item ``i`` uses pair ``i % len(pairs)``; ``len`` is ``samples_per_epoch`` or
    ``len(pairs)``.

    Patches: images smaller than P are padded (``x`` reflect-padded where the axis
    has more than one pixel, else zero; ``y`` with -1); larger ones are cropped,
    at random with ``augment``, centred without.  With ``augment``, a fraction
    ``foreground`` (default 1/3, as nnU-Net) of the crops are placed to contain a
    random foreground pixel (of a class drawn first, so rare classes count): on
    large images with small objects (a 1024² slide of sparse nuclei, a 2048²
    micrograph) uniform crops are nearly all background.  Augmentation (``augment=True``):
    random scale (``scale``, default 0.75-1.25; image bilinear, mask nearest)
    before cropping, horizontal/vertical flips and 90-degree rotations (``flips``),
    brightness and contrast jitter of +-``intensity`` (0.2) on the normalised
    values, and Gaussian noise with sigma up to ``noise`` (0.05).  Pass
    ``scale=None``, ``flips=False``, ``intensity=0``, ``noise=0`` to switch parts off;
    :func:`augmentation` scales the three ranges together.
    ``input_scale`` resizes every pair once, before all of this, as the model's
    ``ModelInfo.input_scale`` says (inference resizes the same way).

    Determinism: a patch is drawn from ``numpy.random.default_rng([seed, epoch, i, k])``
    where ``k`` counts the earlier requests of item ``i`` since the last
    :meth:`set_epoch` (the epoch and the counters live in shared memory, so every
    DataLoader worker, persistent or not, sees and advances the same values).  A
    DataLoader requests each index once per epoch, so ``k`` is the number of
    finished epochs and the patches change every epoch even if :meth:`set_epoch` is
    never called; they depend only on the seed and on which indices were requested
    before, never on the worker or the order within an epoch, hence are identical
    for any ``num_workers``.  (No per-worker seed offset is used: it would make the
    patches depend on how the indices were spread over the workers.)  A sampler that
    repeats an index within one epoch (``replacement=True``) on several workers may
    race on that index's counter.  :meth:`sample` draws a patch without touching
    the counters; :meth:`set_epoch` resets them.
    """

    def __init__(self, pairs: Sequence[Pair], in_chans: int, num_classes: int, patch_size: int = 256,
                 augment: bool = True, samples_per_epoch: Optional[int] = None, seed: int = 0, *,
                 scale: Optional[Tuple[float, float]] = (1 - _SCALE_JITTER, 1 + _SCALE_JITTER), flips: bool = True,
                 intensity: float = _INTENSITY, noise: float = _NOISE, input_scale: float = 1.0,
                 foreground: float = 1 / 3, instances: bool = False, window=None):
        self.pairs = list(pairs)
        if not self.pairs:
            raise ValueError("SegmentationDataset: no pairs given; check the dataset folder and split")
        self.in_chans, self.num_classes = int(in_chans), int(num_classes)
        self.patch_size = int(patch_size)
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        self.augment = bool(augment)
        self.samples_per_epoch = None if samples_per_epoch is None else int(samples_per_epoch)
        self.seed = int(seed) % 2 ** 63
        self.scale = tuple(scale) if scale else None
        self.flips, self.intensity, self.noise = bool(flips), float(intensity), float(noise)
        self.foreground = float(foreground)
        if not 0 <= self.foreground <= 1:
            raise ValueError(f"foreground must lie in [0, 1] (a fraction of the crops), got {foreground}")
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._draws = torch.zeros(len(self), dtype=torch.int64).share_memory_()
        self._images: List[np.ndarray] = []        # float32 (1 or in_chans, H, W); grey kept once
        self._masks: List[np.ndarray] = []         # int16 (H, W)
        for pair in self.pairs:
            if instances:       # an instance model's targets, packed in one map (engine/instances.py)
                image, labels = instance_pair(pair)
                mask = encode_targets(labels)
            else:
                image, mask = check_pair(pair, self.num_classes)
            try:
                x = image_to_channels(image, 1 if is_grey(image) else self.in_chans, window)
            except DataError:
                raise
            except ValueError as exc:
                raise DataError(f"image {pair.image}: {exc}") from None
            if input_scale != 1:
                size = scaled_size(mask.shape, input_scale)
                x, mask = resize_channels(x, size), resize_labels(mask, size)
            self._images.append(x)
            self._masks.append(mask.astype(np.int16))

    # -- epoch ---------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch used in the random seed of every item."""
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` in the seeds from now on and reset the per-item draw counters (reaches running workers)."""
        self._epoch.fill_(int(epoch))
        self._draws.zero_()

    # -- items ---------------------------------------------------------------------
    def __len__(self) -> int:
        return self.samples_per_epoch if self.samples_per_epoch is not None else len(self.pairs)

    def _expand(self, x: np.ndarray) -> np.ndarray:
        return np.repeat(x, self.in_chans, axis=0) if x.shape[0] != self.in_chans else x

    def full_item(self, i: int):
        """Pair ``i`` whole, unpadded and unaugmented: ``(x (in_chans, H, W) float32, y (H, W) int64)`` tensors."""
        x = self._expand(self._images[i])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(self._masks[i].astype(np.int64))

    def __getitem__(self, index: int):
        """The next ``(x, y)`` patch for item ``index``: :meth:`sample` with the epoch and the item's draw counter."""
        index = self._check_index(index)
        draw = int(self._draws[index].item())
        self._draws[index] += 1
        return self.sample(index, self.epoch, draw)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return index

    def sample(self, index: int, epoch: int = 0, draw: int = 0):
        """The ``(x, y)`` patch of item ``index`` for ``(epoch, draw)``; pure: same arguments, same patch."""
        index = self._check_index(index)
        k = index % len(self.pairs)
        x, y = self._images[k], self._masks[k]
        rng = np.random.default_rng([self.seed, int(epoch), index, int(draw)]) if self.augment else None
        if rng is not None and self.scale is not None:
            factor = float(rng.uniform(*self.scale))
            x, y = self._rescale(x, y, factor)
        x, y = self._patch(x, y, rng)
        if rng is not None:
            if self.flips:
                if rng.random() < 0.5:
                    x, y = x[:, :, ::-1], y[:, ::-1]
                if rng.random() < 0.5:
                    x, y = x[:, ::-1, :], y[::-1, :]
                turns = int(rng.integers(0, 4))
                if turns:
                    x, y = np.rot90(x, turns, axes=(1, 2)), np.rot90(y, turns)
            x = np.ascontiguousarray(x, dtype=np.float32)
            if self.intensity > 0:
                contrast = rng.uniform(1 - self.intensity, 1 + self.intensity)
                brightness = rng.uniform(-self.intensity, self.intensity)
                x = x * np.float32(contrast) + np.float32(brightness)
            if self.noise > 0:
                sigma = rng.uniform(0, self.noise)
                x = x + rng.normal(0.0, sigma, size=x.shape).astype(np.float32)
        x = self._expand(np.ascontiguousarray(x, dtype=np.float32))
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    @staticmethod
    def _rescale(x: np.ndarray, y: np.ndarray, factor: float):
        size = scaled_size(y.shape, factor)
        if size == y.shape:
            return x, y
        return resize_channels(x, size), resize_labels(y, size)

    def _patch(self, x: np.ndarray, y: np.ndarray, rng: Optional[np.random.Generator]):
        p = self.patch_size
        keep = None
        if rng is not None and rng.random() < self.foreground and max(y.shape) > p:
            keep = _foreground_pixel(y, rng)
        for axis in (0, 1):
            size = y.shape[axis]
            offset = _place(size, p, rng, None if keep is None else keep[axis])
            if size > p:                            # crop
                sl = slice(offset, offset + p)
                x = x[:, sl] if axis == 0 else x[:, :, sl]
                y = y[sl] if axis == 0 else y[:, sl]
            elif size < p:                          # pad
                before, after = offset, p - size - offset
                x_pad = [(0, 0), (0, 0), (0, 0)]
                y_pad = [(0, 0), (0, 0)]
                x_pad[axis + 1] = (before, after)
                y_pad[axis] = (before, after)
                x = np.pad(x, x_pad, mode="reflect") if size > 1 else np.pad(x, x_pad, mode="constant")
                y = np.pad(y, y_pad, mode="constant", constant_values=IGNORE_INDEX)
        return x, y
