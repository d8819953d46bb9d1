"""Reading images and masks from files, and writing labels to files.

Headless: numpy, tifffile and Pillow; no torch, Qt or napari.

* An image is read as it is stored: grey ``(H, W)``, RGB ``(H, W, 3)``, RGBA
  ``(H, W, 4)``, or for a multi-page TIFF a stack ``(Z, H, W[, C])``; any dtype.
* A mask is a 2-D ``int64`` label image.  For a binary model (``num_classes == 1``)
  every value > 0 is foreground (so 0/255, 0/1 and instance labels all work);
  otherwise the values are class ids ``0 .. num_classes - 1``.
* Labels are written atomically: a reader never sees a half-written file.
"""
import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import List, Sequence, Union

import numpy as np

PathLike = Union[str, Path]

#: File extensions :func:`read_image` and :func:`list_image_files` understand (lower case).
SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")

_TIFF = (".tif", ".tiff")
_HINT_REEXPORT = "the file may be corrupt or truncated; re-export it as PNG or TIFF"


class DataError(ValueError):
    """A problem with the user's images, masks or dataset folder.

    Every message names the file or folder at fault and says what to do.
    """


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, not a file; choose an image file inside it")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a regular file (a pipe, socket or device); save the image to a file "
                        "and give that")
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS and not _scan_suffix(path):
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
    if array.ndim >= 3 and array.shape[-1] == 1:       # one sample per pixel: grey, not a stack of 1-pixel columns
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
        if array.shape[-1] == 3 and channels_equal(array):
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
    except MemoryError:
        raise DataError(f"{what} {path} does not fit in memory; crop it or save it in tiles") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
        if type(exc).__name__ == "DecompressionBombError":      # Pillow's limit on pixels, not damage
            raise DataError(f"{what} {path} is larger than Pillow opens ({exc}); save it as TIFF, which is "
                            "read without that limit, or crop it into smaller images") from None
        raise DataError(f"cannot read {what} {path} ({type(exc).__name__}: {exc}); {_HINT_REEXPORT}") from None
    if array.ndim < 2 or min(array.shape[:2]) == 0 or array.size == 0:
        raise DataError(f"{what} {path} holds no 2-D image (shape {array.shape}); {_HINT_REEXPORT}")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{what} {path} has unsupported pixel type {array.dtype}; save it as 8/16-bit or float")
    return array


def channels_equal(array: np.ndarray) -> bool:
    """Whether the first three channels of an (..., C) array are one grey image stored as colour."""
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
    if _scan_suffix(path) or _is_dicom_folder(path):    # NIfTI, NRRD, MetaImage, DICOM: engine/scans.py
        from .scans import read_scan
        return read_scan(path).array
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
                      and (p.suffix.lower() in SUPPORTED_EXTENSIONS or _scan_suffix(p) not in ("", ".dcm"))]
            if not inside and _is_dicom_folder(path):   # a DICOM series is read whole, from its folder
                inside = [path]
            if not inside:
                raise DataError(f"folder {path} has no image files ({', '.join(SUPPORTED_EXTENSIONS)}); "
                                "choose the folder that holds the images")
            files.extend(inside)
        else:
            _check_file(path, "image")
            files.append(path)
    return files


def _scan_suffix(path: Path) -> str:
    from .scans import scan_suffix
    return scan_suffix(path)


def _is_dicom_folder(path: Path) -> bool:
    from .scans import is_dicom_folder
    try:
        return is_dicom_folder(path)
    except ImportError:             # no SimpleITK: not read as a scan, so said to hold no images
        return False


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
        if not channels_equal(array):
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


# --------------------------------------------------------------------------- writing


def write_labels(path, array: np.ndarray, overwrite: bool = True) -> Path:
    """Write ``array`` to ``path`` (.png for 2D integer images, .tif/.tiff for anything)
    atomically (see :func:`atomic_file`): a reader never sees a half-written file, and with
    ``overwrite=False`` a file at ``path`` is never replaced, even one created by another
    process while this one was writing (:class:`FileExistsError`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".tif", ".tiff"):
        raise ValueError(f"{path}: write labels as .png (2D) or .tif (any)")
    if suffix == ".png" and (array.ndim != 2 or array.dtype.kind not in "ui"):
        raise ValueError(f"{path}: PNG holds 2D integer labels only; use .tif for {array.ndim}D {array.dtype}")
    if suffix == ".png" and array.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError(f"{path}: {int(array.max())} objects do not fit a 16-bit PNG (65535 at most); use .tif")
    with atomic_file(path, overwrite, suffix) as tmp:
        if suffix == ".png":
            from PIL import Image
            data = array.astype(np.uint16 if array.max(initial=0) > 255 else np.uint8)
            Image.fromarray(data).save(tmp, format="PNG")
        else:
            import tifffile
            # A stack of 3 or 4 planes is planes, not the colour planes of one RGB(A) image (tifffile's guess).
            colour = array.ndim >= 3 and array.shape[-1] in (3, 4)
            tifffile.imwrite(tmp, array, compression="zlib", photometric="rgb" if colour else "minisblack")
    return path


#: errno values of a file system that has no hard links (FAT, some network shares).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def check_target(path: Path) -> None:
    """An :class:`OSError` naming ``path`` when no file can be written there: it is a folder,
    a part of its folder is a file, or the folder is missing."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name inside it", str(path))
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder, so nothing can be written "
                                                        f"under it (writing {path})", str(folder))
            break
    if not parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "folder does not exist; create it first", str(parent))


def publish(tmp, path, overwrite: bool) -> None:
    """Give the finished temporary file ``tmp`` (in ``path``'s folder) the name ``path``.

    ``overwrite=True``: a rename over whatever is there.  ``overwrite=False``: a file at
    ``path`` is never replaced, whoever made it and whenever (also another process, after
    this one checked): a hard link (which fails when the name exists) and then the temporary
    name removed; on a file system without hard links the name is reserved with an exclusive
    create and the file renamed onto the reservation.  Raises :class:`FileExistsError`.
    """
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))   # FileExistsError when taken
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(path, overwrite: bool = True, suffix: str = ".tmp"):
    """Yields the name of a hidden temporary file beside ``path`` to write; once the block ends,
    the file is flushed to disk, given the permissions a new file gets and put in place by
    :func:`publish`.  On any failure, or an interrupt, the temporary file is removed and
    ``path`` is as it was.  An :class:`OSError` (no space, no permission, read-only) names
    ``path``, not the temporary file; :class:`FileExistsError` means ``overwrite=False`` and
    ``path`` existed when the file was to be put there."""
    path = Path(path)
    check_target(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        yield tmp
        flush_to_disk(tmp)
        give_default_permissions(tmp)
        publish(tmp, path, overwrite)
    except FileExistsError:
        if overwrite or not os.path.lexists(path):      # not the refusal to replace: some other cause
            raise
        raise FileExistsError(errno.EEXIST, "exists (made after this run checked: by another run into the same "
                                            "place?); it was left as it is", str(path)) from None
    except OSError as exc:
        if exc.filename == str(path) and exc.filename2 is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def flush_to_disk(filename) -> None:
    """Have the file's bytes on disk, so that a crash after the rename cannot leave it empty."""
    with open(filename, "rb+") as fh:
        os.fsync(fh.fileno())


def give_default_permissions(filename) -> None:
    """The permissions an ordinary new file gets (0666 less the umask): ``mkstemp`` makes
    0600, which would hide results and checkpoints from the rest of a shared group."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(filename, 0o666 & ~umask)
    except OSError:
        pass
