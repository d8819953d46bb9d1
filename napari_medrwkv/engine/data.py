"""Reading images and masks, normalising them, and serving training patches.

Headless: numpy, scikit-image, tifffile and Pillow; torch only for
:class:`SegmentationDataset`.  Never imports Qt or napari.

Conventions
-----------
* An image is read as it is stored: grey ``(H, W)``, RGB ``(H, W, 3)``, RGBA
  ``(H, W, 4)``, or for a multi-page TIFF a stack ``(Z, H, W[, C])``; any dtype.
* A mask is a 2-D ``int64`` label image.  For a binary model (``num_classes == 1``)
  every value > 0 is foreground (so 0/255, 0/1 and instance labels all work);
  otherwise the values are class ids ``0 .. num_classes - 1``.
* The network sees ``float32 (in_chans, H, W)`` arrays made by
  :func:`image_to_channels`, which applies :func:`normalize` (described by
  :data:`NORMALIZATION`, stored in checkpoints).
* Training patches pad masks with :data:`IGNORE_INDEX` (-1): losses and metrics
  must skip those pixels.
"""
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, Path]

#: File extensions :func:`read_image` and :func:`find_pairs` understand (lower case).
SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")

#: How :func:`normalize` scales an image; stored in checkpoints so inference matches training.
NORMALIZATION = {"mode": "percentile", "low": 0.5, "high": 99.5, "center": 0.5, "scale": 0.25}

#: Mask value of padded pixels in training patches; losses must ignore it.
IGNORE_INDEX = -1

#: ITU-R BT.709 luma weights (as in ``skimage.color.rgb2gray``) for RGB -> grey.
LUMA_WEIGHTS = (0.2125, 0.7154, 0.0721)

_TIFF = (".tif", ".tiff")
_HINT_REEXPORT = "the file may be corrupt or truncated; re-export it as PNG or TIFF"


class DataError(ValueError):
    """A problem with the user's images, masks or dataset folder.

    Every message names the file or folder at fault and says what to do.
    """


# --------------------------------------------------------------------------- reading


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, not a file; choose an image file inside it")
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{what} {path} has an unsupported extension {path.suffix!r}; "
                        f"supported: {', '.join(SUPPORTED_EXTENSIONS)}. Convert it to PNG or TIFF")


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        if not tif.series:
            raise ValueError("no image data in the file")
        series = tif.series[0]
        array = series.asarray()
        axes = str(series.axes)
    if len(axes) != array.ndim:                    # unusual metadata: trust the shape only
        axes = "Q" * (array.ndim - 2) + "YX"
        if array.ndim >= 3 and array.shape[-1] in (3, 4):
            axes = "Q" * (array.ndim - 3) + "YXS"
    if "S" in axes and axes.index("S") != array.ndim - 1:   # planar RGB: samples last
        array = np.moveaxis(array, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    samples = array.ndim - 1 if axes.endswith("S") else None
    # Every axis other than Y, X and samples: drop the singletons, merge the rest into Z.
    lead = axes.index("Y") if "Y" in axes else array.ndim - (3 if samples is not None else 2)
    lead_shape = [n for n in array.shape[:lead] if n != 1]
    rest = array.shape[lead:]
    array = array.reshape((int(np.prod(lead_shape)),) + rest if lead_shape else rest)
    if array.ndim >= 3 and array.shape[-1] == 1 and samples is not None:
        array = array[..., 0]
    return array


def _grey_palette(im) -> bool:
    palette = im.getpalette() or []
    rgb = np.asarray(palette[: 3 * 256], dtype=np.int64).reshape(-1, 3) if palette else np.zeros((0, 3))
    used = np.unique(np.asarray(im))
    used = used[used < len(rgb)]
    return bool(len(rgb)) and bool(np.all(rgb[used, 0] == rgb[used, 1]) and np.all(rgb[used, 0] == rgb[used, 2]))


def _pil_to_array(im, palette_index: bool) -> np.ndarray:
    mode = im.mode
    if mode in ("P", "PA"):
        if palette_index and mode == "P" and not _grey_palette(im):
            return np.asarray(im)                  # indexed-colour label image: indices are the labels
        im = im.convert("RGBA" if (mode == "PA" or "transparency" in im.info) else "RGB")
        array = np.asarray(im)
        if array.shape[-1] == 4 and np.all(array[..., 3] == 255):
            array = array[..., :3]
        if array.shape[-1] == 3 and _channels_equal(array):
            array = array[..., 0]
        return np.ascontiguousarray(array)
    if mode == "1":
        return np.asarray(im, dtype=np.uint8) * (1 if palette_index else 255)
    if mode in ("L", "I", "F", "RGB", "RGBA") or mode.startswith("I;16"):
        return np.asarray(im)
    if mode in ("LA", "La"):
        return np.asarray(im.convert("L"))
    if mode == "RGBa":
        return np.asarray(im.convert("RGBA"))
    return np.asarray(im.convert("RGB"))          # CMYK, YCbCr, LAB, HSV, RGBX ...


def _read_array(path: Path, what: str, palette_index: bool = False) -> np.ndarray:
    _check_file(path, what)
    try:
        if path.suffix.lower() in _TIFF:
            array = _read_tiff(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.seek(0)                         # GIF / multi-frame: the first frame
                im.load()
                array = _pil_to_array(im, palette_index)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
        raise DataError(f"cannot read {what} {path} ({type(exc).__name__}: {exc}); {_HINT_REEXPORT}") from None
    if array.ndim < 2 or min(array.shape[:2]) == 0 or array.size == 0:
        raise DataError(f"{what} {path} holds no 2-D image (shape {array.shape}); {_HINT_REEXPORT}")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{what} {path} has unsupported pixel type {array.dtype}; save it as 8/16-bit or float")
    return array


def _channels_equal(array: np.ndarray) -> bool:
    return bool(np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]))


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as stored.

    PNG, JPEG, BMP, GIF (first frame) and TIFF.  Returns grey ``(H, W)``, RGB
    ``(H, W, 3)`` or RGBA ``(H, W, 4)``; a multi-page TIFF gives a stack
    ``(Z, H, W[, C])`` (all non-spatial axes merged into Z).  The dtype is kept
    (uint8, uint16, float ...).  Palette images become grey when their palette is
    grey, RGB(A) otherwise.  Raises :class:`DataError` naming the file when it is
    missing, unsupported, unreadable or corrupt.
    """
    path = Path(path)
    array = _read_array(path, "image")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return array


def list_image_files(paths: Sequence[PathLike]) -> List[Path]:
    """The image files ``paths`` name, in order: a file as it is, a folder as the image files
    directly inside it (sorted by name; hidden files and other extensions skipped).  Raises
    :class:`DataError` for a path that does not exist, a file of an unsupported type, or a
    folder without image files, before any image is read."""
    files: List[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")
                      and p.suffix.lower() in SUPPORTED_EXTENSIONS]
            if not inside:
                raise DataError(f"folder {path} has no image files ({', '.join(SUPPORTED_EXTENSIONS)}); "
                                "choose the folder that holds the images")
            files.extend(inside)
        else:
            _check_file(path, "image")
            files.append(path)
    return files


def read_mask(path: PathLike, num_classes: int) -> np.ndarray:
    """Read a mask as an ``int64 (H, W)`` label image for a model with ``num_classes`` outputs.

    ``num_classes == 1`` (binary model): foreground is every value > 0, returned
    as 0/1 (so 0/255, 0/1 and uint16 instance labels all work).
    ``num_classes >= 2``: values are class ids and must be integers in
    ``0 .. num_classes - 1``.  An RGB(A) mask whose colour channels are equal is
    reduced to one channel; a truly colour mask, a stack, negative or fractional
    class ids raise :class:`DataError` naming the file.  Indexed-colour (palette)
    PNG/GIF masks use their palette indices as class ids.
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (1 = binary), got {num_classes}")
    path = Path(path)
    return mask_classes(_read_array(path, "mask", palette_index=True), num_classes, f"mask {path}")


def mask_classes(array: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    """The checks and conversion of :func:`read_mask` for an array; ``name`` starts every error message."""
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if not _channels_equal(array):
            raise DataError(f"{name} is a colour image (its R, G, B channels differ); save it as a "
                            f"single-channel label image (0 = background, 1, 2, ... = classes)")
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise DataError(f"{name} has shape {array.shape}; expected one 2-D label image (H, W), "
                        f"not a stack; save each slice as its own mask")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise DataError(f"{name} contains NaN or infinite values; save it as an integer label image")
    if num_classes == 1:
        return (array > 0).astype(np.int64)
    if array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise DataError(f"{name} has fractional values; class ids must be whole numbers "
                        f"0..{num_classes - 1}; save it as an integer label image")
    low, high = array.min(), array.max()
    if low < 0:
        raise DataError(f"{name} has negative value {low:g}; class ids must be 0..{num_classes - 1}")
    if high >= num_classes:
        hint = ("a 0/255 binary mask needs a binary (1-class) model" if high == 255 and num_classes == 2
                else "relabel the mask or choose a model with more classes")
        raise DataError(f"{name} has class id {high:g} but the model has {num_classes} classes "
                        f"(0..{num_classes - 1}); {hint}")
    return array.astype(np.int64)


# --------------------------------------------------------------------------- normalisation


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


def image_to_channels(image, in_chans: int) -> np.ndarray:
    """One 2-D image -> the network input ``float32 (in_chans, H, W)``, normalised.

    ``image``: grey ``(H, W)`` / ``(H, W, 1)``, RGB ``(H, W, 3)`` or RGBA
    ``(H, W, 4)`` (alpha dropped), any dtype.  Grey (also RGB with R = G = B) is
    normalised once and repeated to ``in_chans`` channels; RGB with ``in_chans == 1`` becomes
    luminance (BT.709 weights).  Raises ``ValueError`` for stacks or a channel
    count that cannot be matched.
    """
    in_chans = int(in_chans)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (1, 2, 3, 4):
        channels = image.shape[-1]
        if channels in (2, 4):                     # grey + alpha, RGB + alpha
            image = image[..., : channels - 1]
        if image.shape[-1] == 1 or (image.shape[-1] == 3 and _channels_equal(image)):
            image = image[..., 0]                  # grey, possibly stored as R = G = B
    if image.ndim == 2:
        return np.repeat(normalize(image)[None], in_chans, axis=0) if in_chans > 1 else normalize(image)[None]
    if image.ndim != 3:
        raise ValueError(f"expected one 2-D image (H, W) or (H, W, 3|4), got an array of shape {image.shape}; "
                         f"select one slice of a stack first")
    if image.shape[-1] == in_chans:
        return np.ascontiguousarray(np.moveaxis(normalize(image), -1, 0))
    if in_chans == 1 and image.shape[-1] == 3:
        weights = np.asarray(LUMA_WEIGHTS, dtype=np.float64)
        return normalize(image.astype(np.float64) @ weights)[None]
    raise ValueError(f"cannot turn an image with {image.shape[-1]} channels into the {in_chans} channels "
                     f"the model expects; use a grey or RGB image")


# --------------------------------------------------------------------------- dataset folders


@dataclass
class Pair:
    """One training example: its stem and the paths of its image and mask."""

    stem: str
    image: Path
    mask: Path


def _list_by_stem(folder: Path, what: str) -> Dict[str, Path]:
    files: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            continue
        if path.stem in files:
            raise DataError(f"two {what}s share the stem {path.stem!r}: {files[path.stem]} and {path}; "
                            f"keep one of them (pairs are matched by file name without extension)")
        files[path.stem] = path
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
        absent = wanted - set(images)
        if absent:
            raise DataError(f"{folder / 'splits.json'} lists stems under {split!r} with no files in {images_dir}: "
                            f"{_some(absent)}; fix splits.json or add the files")
        stems = sorted(wanted)
    return [Pair(stem, images[stem], masks[stem]) for stem in stems]


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
    else:
        image, mask = read_image(pair.image), read_mask(pair.mask, num_classes)
        image_name, mask_name = f"image {pair.image}", f"its mask {pair.mask}"
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        raise DataError(f"{image_name} has shape {image.shape}; training needs one 2-D grey or RGB image "
                        f"per file, not a stack; save each slice as its own image")
    if image.shape[:2] != mask.shape:
        raise DataError(f"{image_name} is {image.shape[0]}x{image.shape[1]} but {mask_name} is "
                        f"{mask.shape[0]}x{mask.shape[1]}; masks must have the size of their image")
    return image, mask


# --------------------------------------------------------------------------- training dataset

try:  # torch is needed only for the dataset; the functions above work without it
    import torch
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    torch = None
    _TorchDataset = object


def scaled_size(shape, factor: float) -> Tuple[int, int]:
    """(H, W) of ``shape[:2]`` times ``factor``, at least one pixel each."""
    h, w = shape[:2]
    return max(1, round(h * factor)), max(1, round(w * factor))


def resize_channels(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Float (C, H, W) resized bilinearly to ``size``; antialiased when shrinking, so that fine
    texture does not alias into the smaller image."""
    if tuple(x.shape[1:]) == tuple(size):
        return x
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


def _is_grey(image: np.ndarray) -> bool:
    return image.ndim == 2 or (image.ndim == 3 and (image.shape[-1] in (1, 2) or _channels_equal(image)))


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


class SegmentationDataset(_TorchDataset):
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
                 foreground: float = 1 / 3):
        if torch is None:  # pragma: no cover
            raise ImportError("SegmentationDataset needs PyTorch")
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
            image, mask = check_pair(pair, self.num_classes)
            try:
                x = image_to_channels(image, 1 if _is_grey(image) else self.in_chans)
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
