"""Medical scans: NIfTI, NRRD, MetaImage and DICOM series in, labels out on the scan's own grid.

Headless, on SimpleITK (the ``medical`` extra), imported only when a scan is read or written.

* Every scan is read in one orientation whatever its file stores: the array axes are
  (inferior->superior, anterior->posterior, right->left), so ``array[z]`` is an axial slice
  as radiologists view it, and a scan stored LPS (DICOM, NRRD) gives the same array as one
  stored RAS (NIfTI).  Oblique scans take the nearest such axes; the exact direction is kept.
* :class:`ScanGeometry` holds the voxel spacing and origin in array-axis order (napari's
  ``scale`` and ``translate``), which axis the scanner acquired slice by slice, and how the
  file stored the voxels, so :func:`write_scan` puts labels back on the source's own grid:
  same voxel order, spacing, origin and direction, so they overlay the scan in 3D Slicer,
  ITK-SNAP or a planning system.
"""
import functools
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .imageio import SUPPORTED_EXTENSIONS, DataError, PathLike, atomic_file

#: Single-file scan formats, and the label format each is written back as.
SCAN_SUFFIXES = {".nii": ".nii.gz", ".nii.gz": ".nii.gz", ".nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha",
                 ".mhd": ".mha", ".dcm": ".nii.gz"}
#: Formats :func:`write_scan` writes (one file each: .mhd and .nhdr keep their voxels in a second file).
WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_INSTALL = 'install the medical extra: pip install "napari-medrwkv[medical]" (SimpleITK)'


def scan_suffix(path: PathLike) -> str:
    """The scan extension of ``path`` (``.nii.gz`` counted whole), or "" for other files."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    suffix = Path(name).suffix
    return suffix if suffix in SCAN_SUFFIXES else ""


def scan_stem(path: PathLike) -> str:
    """The name of ``path`` without its scan extension (``brain.nii.gz`` -> ``brain``)."""
    path = Path(path)
    suffix = scan_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def is_dicom_folder(path: PathLike) -> bool:
    """Whether ``path`` is a folder holding at least one DICOM series (and no other images)."""
    path = Path(path)
    if not path.is_dir() or any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup")):
        return False                       # a zarr store: its chunk files have no suffix either
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not files or any(p.suffix.lower() in SUPPORTED_EXTENSIONS or scan_suffix(p) not in ("", ".dcm")
                        for p in files):
        return False
    try:
        sitk = _sitk()
    except ImportError:                    # without SimpleITK no folder is read as DICOM
        return False
    # A folder that holds no series is an answer here, not a problem: ITK would print a warning.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def is_scan(path: PathLike) -> bool:
    """Whether ``path`` is read by :func:`read_scan`: a scan file, or a DICOM series folder."""
    return bool(scan_suffix(path)) or is_dicom_folder(path)


def labels_name(path: PathLike, kind: str = "labels") -> str:
    """``<stem>_labels`` plus the format the scan's labels are written in (its own where it can)."""
    return f"{scan_stem(path)}_{kind}{SCAN_SUFFIXES.get(scan_suffix(path), '.nii.gz')}"


#: Where a napari layer keeps its scan's geometry (:meth:`ScanGeometry.to_metadata`).
METADATA_KEY = "scan_geometry"


@dataclass(frozen=True)
class ScanGeometry:
    """Where a scan's voxels lie, in the orientation :func:`read_scan` gives.

    ``spacing``, ``origin``: mm per voxel and the physical (LPS) position of voxel 0, both
    in array-axis order (napari's ``scale`` and ``translate``).  ``direction``: row ``a``
    is the physical (L, P, S) unit vector along array axis ``a``.  ``slice_axis``: the array
    axis the scanner acquired slice by slice (thick slices, the natural axis to segment
    along).  ``stored_axes``, ``stored_flips``: how the file's voxel order becomes this one
    (array axis ``a`` is the file's axis ``stored_axes[a]``, reversed where ``stored_flips``);
    ``stored_spacing``, ``stored_origin``, ``stored_direction``: the file's own geometry as
    ITK holds it (x first), written back unchanged.
    """

    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[Tuple[float, ...], ...]
    slice_axis: int
    shape: Tuple[int, ...]
    stored_axes: Tuple[int, ...]
    stored_flips: Tuple[bool, ...]
    stored_spacing: Tuple[float, ...]
    stored_origin: Tuple[float, ...]
    stored_direction: Tuple[float, ...]
    source: str = ""

    def to_metadata(self) -> dict:
        """Plain lists and numbers (a napari layer's ``metadata``, JSON)."""
        return {key: (list(map(list, v)) if key == "direction" else list(v) if isinstance(v, tuple) else v)
                for key, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict) -> "ScanGeometry":
        try:
            fields = {key: meta[key] for key in cls.__dataclass_fields__ if key in meta}
            fields["direction"] = tuple(tuple(float(x) for x in row) for row in fields["direction"])
            for key in ("spacing", "origin", "stored_spacing", "stored_origin", "stored_direction"):
                fields[key] = tuple(float(x) for x in fields[key])
            for key in ("shape", "stored_axes"):
                fields[key] = tuple(int(x) for x in fields[key])
            fields["stored_flips"] = tuple(bool(x) for x in fields["stored_flips"])
            fields["slice_axis"] = int(fields["slice_axis"])
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"the scan geometry is incomplete or damaged ({type(err).__name__}: {err}); "
                             "read the scan again from its file") from None

    @classmethod
    def of_grid(cls, shape, spacing, origin) -> "ScanGeometry":
        """The geometry of an array laid out as :func:`read_scan` lays scans out, from its shape and
        napari's ``scale`` and ``translate`` only (direction: the axes themselves, stored as they are)."""
        dim = len(shape)
        if dim not in (2, 3) or len(spacing) != dim or len(origin) != dim:
            raise ValueError(f"a scan grid is 2-D or 3-D with a spacing and origin per axis; got shape {tuple(shape)}, "
                             f"scale {tuple(spacing)}, translate {tuple(origin)}")
        return cls(spacing=tuple(map(float, spacing)), origin=tuple(map(float, origin)),
                   direction=tuple(tuple(float(a + b == dim - 1) for b in range(dim)) for a in range(dim)), slice_axis=0,
                   shape=tuple(map(int, shape)), stored_axes=tuple(range(dim)), stored_flips=(False,) * dim,
                   stored_spacing=tuple(map(float, spacing[::-1])), stored_origin=tuple(map(float, origin[::-1])),
                   stored_direction=tuple(float(a == b) for a in range(dim) for b in range(dim)))

    def to_stored(self, array: np.ndarray) -> np.ndarray:
        """``array`` (this orientation, any trailing channels) in the file's voxel order, numpy-style (z, y, x)."""
        for axis, flipped in enumerate(self.stored_flips):
            if flipped:
                array = np.flip(array, axis)
        spatial = len(self.stored_axes)
        order = np.argsort(self.stored_axes)
        return np.transpose(array, tuple(order) + tuple(range(spatial, array.ndim)))


@dataclass
class Scan:
    """A scan as :func:`read_scan` reads it: ``array`` in the common orientation, its
    ``geometry``, and a ``note`` for the user (which DICOM series was taken) or None."""

    array: np.ndarray
    geometry: ScanGeometry
    note: Optional[str] = None


def _sitk():
    try:
        import SimpleITK
    except ImportError:
        raise ImportError(f"reading and writing medical scans needs SimpleITK; {_INSTALL}") from None
    return SimpleITK


def read_scan(path: PathLike, series: Optional[str] = None) -> Scan:
    """Read a NIfTI, NRRD or MetaImage file, or a DICOM series (a folder, or one of its files).

    A DICOM folder with several series reads ``series`` (its SeriesInstanceUID), else the one
    with the most slices, saying so in ``Scan.note``.  2-D and 3-D scans, grey or multi-component.
    Raises :class:`DataError` naming the file for a missing or unreadable file, a 4-D scan (a
    time series: pick one volume) and an unknown series.
    """
    sitk = _sitk()
    path = Path(path)
    if not path.exists():
        raise DataError(f"scan {path} does not exist; check the path")
    note = None
    try:
        if path.is_dir() or scan_suffix(path) == ".dcm":
            image, note = _read_dicom(sitk, path, series)
        else:
            if series is not None:
                raise DataError(f"scan {path} is one volume, not a DICOM folder; leave out the series")
            image = sitk.ReadImage(str(path))
    except DataError:
        raise
    except RuntimeError as err:              # ITK's exceptions: the file's fault
        text = str(err).strip().splitlines()
        detail = next((line.split(":", 1)[-1].strip() for line in reversed(text) if "Description" in line),
                      text[-1] if text else "")
        raise DataError(f"cannot read scan {path} ({detail}); the file may be damaged, or not the format its "
                        "extension says") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:     # one volume stored as 4-D
        image = image[:, :, :, 0]
    if image.GetDimension() > 3:
        size = "x".join(map(str, image.GetSize()))
        raise DataError(f"scan {path} is 4-D ({size}: a time series or several volumes); the models segment one "
                        "volume: pick one and save it as its own file (e.g. fslroi in.nii.gz out.nii.gz 0 1, or "
                        "nibabel's img.slicer[..., 0])")
    array = sitk.GetArrayFromImage(image)
    if array.ndim == image.GetDimension() + 1 and array.shape[-1] == 1:
        array = array[..., 0]
    geometry = _common_orientation(image, array.shape, str(path))
    array = np.ascontiguousarray(_to_common(array, geometry))
    return Scan(array, geometry, note)


@dataclass(frozen=True)
class DicomSeries:
    """One series of a DICOM folder, from its first file's header: ``uid`` (SeriesInstanceUID, what
    :func:`read_scan` takes as ``series``), ``slices`` (files), ``description`` and ``number``
    (SeriesDescription, SeriesNumber: "" where the files have none), ``voxels`` (all slices)."""

    uid: str
    slices: int
    description: str
    number: str
    voxels: int

    @property
    def title(self) -> str:
        """How a person tells the series apart: "#3 T1 axial", else its UID."""
        words = " ".join(part for part in (f"#{self.number}" if self.number else "", self.description) if part)
        return words or self.uid


def dicom_series(folder: PathLike) -> List[DicomSeries]:
    """The DICOM series in ``folder``, the one with the most slices first (headers only, no pixels)."""
    sitk = _sitk()
    folder = Path(folder)
    found = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        try:
            reader.ReadImageInformation()
        except RuntimeError:                 # an unreadable header: the series still counts, read says why
            found.append(DicomSeries(uid, len(files), "", "", 0))
            continue

        def tag(key):
            return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""
        size = reader.GetSize()
        found.append(DicomSeries(uid, len(files), tag("0008|103e"), tag("0020|0011"), len(files) * size[0] * size[1]))
    return sorted(found, key=lambda s: (-s.slices, -s.voxels))


def _read_dicom(sitk, path: Path, series: Optional[str]):
    folder = path if path.is_dir() else path.parent
    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not ids:
        raise DataError(f"folder {folder} holds no DICOM series; choose the folder with the scan's .dcm files")
    files = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in ids}
    note = None
    if series is not None:
        if series not in files:
            raise DataError(f"folder {folder} has no DICOM series {series!r}; its series: "
                            + ", ".join(f"{uid} ({len(files[uid])} slices)" for uid in ids))
        chosen = series
    elif not path.is_dir():
        chosen = next((uid for uid in ids if any(Path(f).samefile(path) for f in files[uid])), ids[0])
    else:
        chosen = max(ids, key=lambda uid: len(files[uid]))
        if len(ids) > 1:
            others = ", ".join(f"{uid} ({len(files[uid])} slices)" for uid in ids if uid != chosen)
            note = (f"{folder} holds {len(ids)} DICOM series; read the largest, {chosen} ({len(files[chosen])} "
                    f"slices); the others: {others}. Name one to read it instead")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    return reader.Execute(), note


def _common_orientation(image, shape, source: str) -> ScanGeometry:
    """The geometry of ``image`` (numpy voxel array of ``shape``) read in the common orientation."""
    dim = image.GetDimension()
    spacing = np.asarray(image.GetSpacing(), float)
    origin = np.asarray(image.GetOrigin(), float)
    direction = np.asarray(image.GetDirection(), float).reshape(dim, dim)   # column j: index axis j, in LPS
    # numpy axis n of the stored array is ITK index axis dim-1-n.  The common array's axis a
    # runs along physical axis dim-1-a (S, P, L for 3-D), taken from the stored axis closest to it.
    cosines = np.abs(direction[:, ::-1])[::-1]           # [a, n]: |physical axis of a . stored numpy axis n|
    stored_axes = _best_assignment(cosines)
    columns = direction[:, ::-1][:, list(stored_axes)]   # physical direction of each common axis, unflipped
    flips = tuple(bool(columns[dim - 1 - a, a] < 0) for a in range(dim))
    stored_spacing = spacing[::-1]
    extent = np.asarray(shape[:dim]) - 1
    corner = np.zeros(dim)                               # stored numpy index of the common array's voxel 0
    for a, n in enumerate(stored_axes):
        corner[n] = extent[n] if flips[a] else 0
    voxel0 = origin + direction @ (spacing * corner[::-1])
    sign = np.where(flips, -1.0, 1.0)
    common_direction = (columns * sign).T                # row a: physical direction of common axis a
    common_spacing = stored_spacing[list(stored_axes)]
    common_origin = voxel0[::-1]
    # The acquisition's slice axis: the file's slowest (DICOM, NIfTI, NRRD store slice after slice).
    slice_axis = stored_axes.index(0) if dim == 3 else 0
    return ScanGeometry(spacing=tuple(map(float, common_spacing)), origin=tuple(map(float, common_origin)),
                        direction=tuple(tuple(map(float, row)) for row in common_direction), slice_axis=slice_axis,
                        shape=tuple(int(shape[n]) for n in stored_axes), stored_axes=stored_axes,
                        stored_flips=flips, stored_spacing=tuple(map(float, spacing)),
                        stored_origin=tuple(map(float, origin)),
                        stored_direction=tuple(map(float, direction.ravel())), source=source)


def _best_assignment(cosines: np.ndarray) -> Tuple[int, ...]:
    """For each row, a distinct column, maximising the summed cosines (at most 3! tries)."""
    from itertools import permutations
    dim = len(cosines)
    return max(permutations(range(dim)), key=lambda p: (sum(cosines[a, p[a]] for a in range(dim)),
                                                         tuple(-x for x in p)))


def _to_common(array: np.ndarray, geometry: ScanGeometry) -> np.ndarray:
    spatial = len(geometry.stored_axes)
    array = np.transpose(array, geometry.stored_axes + tuple(range(spatial, array.ndim)))
    for axis, flipped in enumerate(geometry.stored_flips):
        if flipped:
            array = np.flip(array, axis)
    return array


def write_scan(path: PathLike, array: np.ndarray, geometry: ScanGeometry, overwrite: bool = False) -> Path:
    """Write ``array`` (in the orientation :func:`read_scan` gave, the scan's shape) to ``path``
    (.nii.gz, .nii, .nrrd, .mha) on the source scan's grid: its voxel order, spacing, origin and
    direction.  Atomic; with ``overwrite=False`` an existing file is never replaced
    (:class:`FileExistsError`).  Labels are stored as the smallest unsigned type that holds them."""
    sitk = _sitk()
    path = Path(path)
    suffix = scan_suffix(path)
    if suffix not in WRITABLE_SUFFIXES:
        raise ValueError(f"{path}: write scans and labels as {', '.join(WRITABLE_SUFFIXES)} "
                         "(.mhd and .nhdr need a second file; use .mha or .nrrd)")
    array = np.asarray(array)
    dim = len(geometry.stored_axes)
    if tuple(array.shape[:dim]) != tuple(geometry.shape):
        raise ValueError(f"{path}: the array is {array.shape[:dim]} but the scan "
                         f"{geometry.source or ''} is {tuple(geometry.shape)}; labels must have the scan's shape")
    if array.dtype == bool or array.dtype.kind in "iu":
        high, low = int(array.max(initial=0)), int(array.min(initial=0))
        if low < 0:
            raise ValueError(f"{path}: labels must not be negative (smallest {low})")
        array = array.astype(np.uint8 if high < 256 else np.uint16 if high < 65536 else np.uint32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(geometry.to_stored(array)), isVector=array.ndim > dim)
    image.SetSpacing(geometry.stored_spacing)
    image.SetOrigin(geometry.stored_origin)
    image.SetDirection(geometry.stored_direction)
    with atomic_file(path, overwrite, suffix) as tmp:
        sitk.WriteImage(image, tmp, True)
    return path


def scan_planes(path: PathLike):
    """``(planes, geometry)``: the scan at ``path`` as a stack of the planes the scanner acquired
    (first axis), read once while the file is unchanged (a training folder reads it slice by slice)."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    return _cached_planes(str(path), stat.st_mtime_ns if stat else None, stat.st_size if stat else None)


@functools.lru_cache(maxsize=2)            # an image volume and its mask
def _cached_planes(path: str, mtime, size):
    scan = read_scan(path)
    planes = np.moveaxis(scan.array, scan.geometry.slice_axis, 0)
    planes.setflags(write=False)           # shared by every reader of the file
    return planes, scan.geometry


#: The planes a scan can be segmented in, by the array axis they are stacked along.
PLANES = {"axial": 0, "coronal": 1, "sagittal": 2}


def plane_axis(geometry: ScanGeometry, planes: Optional[str] = None) -> int:
    """The array axis to segment along: ``planes`` "axial", "coronal", "sagittal", or
    "acquired"/None for the planes the scanner acquired (its slice axis)."""
    if planes in (None, "acquired"):
        return geometry.slice_axis
    if planes not in PLANES:
        raise ValueError(f"planes must be acquired, {', '.join(PLANES)}; got {planes!r}")
    return PLANES[planes]


def segment_scan(scan: Scan, planes: Optional[str] = None, **segment_args):
    """:func:`.infer.segment` on every plane of ``scan`` (``planes``: see :func:`plane_axis`; default
    those the scanner acquired); labels (and probabilities, when asked) come back in the scan's
    orientation, with its shape."""
    from .infer import segment
    axis = plane_axis(scan.geometry, planes)
    if scan.array.ndim != 3:
        return segment(scan.array, **segment_args)
    result = segment(np.moveaxis(scan.array, axis, 0), rgb=False, **segment_args)
    if isinstance(result, tuple):
        labels, probs = result
        return np.moveaxis(labels, 0, axis), np.moveaxis(probs, probs.ndim - 3, probs.ndim - 3 + axis)
    return np.moveaxis(result, 0, axis)


def warn_note(scan: Scan) -> None:
    if scan.note:
        warnings.warn(scan.note, stacklevel=2)
