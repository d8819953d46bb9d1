"""napari reader and writer for medical scans (engine/scans.py): a scan opens as an image layer
with the voxel spacing as its ``scale``, the origin as its ``translate`` and the geometry in its
``metadata``; labels save back onto the scan's own grid as NIfTI, NRRD or MetaImage.  A DICOM
folder holding several series opens as one layer per series, named by its number and description,
the largest shown and the others hidden (a reader cannot ask: the layer list is the choice).  No Qt."""
import warnings
from pathlib import Path
from typing import Any, List

import numpy as np

from ..engine.scans import (METADATA_KEY, ScanGeometry, dicom_series, is_dicom_folder, is_scan, read_scan, scan_stem,
                            write_scan)
from .reader_preference import prefer_scan_reader_quietly

#: Opening every series of a DICOM folder at once: at most this many bytes (16-bit voxels), else the largest alone.
ALL_SERIES_BYTES = 2 * 1024 ** 3


def get_reader(path):
    """napari's reader hook: a function that reads ``path`` when it is a scan or a DICOM folder, else None."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        return read_scan_layers if is_scan(path) else None
    except ImportError:                      # no SimpleITK: leave the file to other readers
        return None


def read_scan_layers(path) -> List[tuple]:
    if isinstance(path, (list, tuple)):
        path = path[0]
    prefer_scan_reader_quietly()             # chosen for this scan: for the other scan formats too, once
    if is_dicom_folder(path):
        series = dicom_series(path)
        if len(series) > 1:
            return _series_layers(Path(path), series)
    scan = read_scan(path)
    if scan.note:                            # which DICOM series was read: napari shows it as a notification
        warnings.warn(scan.note, stacklevel=2)
    return [_layer(scan, scan_stem(path))]


def _layer(scan, name: str, visible: bool = True) -> tuple:
    geometry = scan.geometry
    dim = len(geometry.shape)
    meta = {"name": name, "scale": geometry.spacing, "translate": geometry.origin,
            "metadata": {METADATA_KEY: geometry.to_metadata()}, "visible": visible,
            "rgb": scan.array.ndim > dim and scan.array.shape[-1] in (3, 4)}
    return (scan.array, meta, "image")


def _series_layers(folder: Path, series) -> List[tuple]:
    """One layer per series of a DICOM folder, named "<folder> #<number> <description>", the largest
    shown; or, past :data:`ALL_SERIES_BYTES`, the largest alone.  A notification says which."""
    titles = [s.title for s in series]
    names = [f"{folder.name} {t}" if titles.count(t) == 1 else f"{folder.name} {t} {s.uid}"
             for s, t in zip(series, titles)]
    listed = "; ".join(f"{t} ({s.slices} slices)" for s, t in zip(series, titles))
    if 2 * sum(s.voxels for s in series) > ALL_SERIES_BYTES:
        warnings.warn(f"{folder} holds {len(series)} DICOM series, too large to open together: opened the largest, "
                      f"{titles[0]}. The series: {listed}. To open one of them, open one of its files (File > "
                      "Open): napari reads the series that file belongs to; or nm.read_scan(folder, series=UID).",
                      stacklevel=3)
        return [_layer(read_scan(folder, series=series[0].uid), names[0])]
    layers, failed = [], []
    for s, name in zip(series, names):
        try:
            layers.append(_layer(read_scan(folder, series=s.uid), name, visible=not layers))
        except Exception as err:  # noqa: BLE001 -- one damaged series (a scout, a report) leaves the others
            failed.append(f"{s.title} ({err})")
    if not layers:
        raise ValueError(f"{folder}: none of its {len(series)} DICOM series could be read: {'; '.join(failed)}")
    skipped = f" Not read: {'; '.join(failed)}." if failed else ""
    warnings.warn(f"{folder} holds {len(series)} DICOM series, opened as {len(layers)} layers: {listed}. The largest "
                  f"is shown, the others hidden: show the one you want with its eye icon in the layer list (and "
                  f"choose it in Segment), remove the others.{skipped}", stacklevel=3)
    return layers


def layer_geometry(meta: dict, shape) -> ScanGeometry:
    """The scan geometry a layer carries (a scan's image, or labels segmented from one), or else the
    one its scale and translate describe."""
    stored = (meta.get("metadata") or {}).get(METADATA_KEY)
    if stored is not None:
        geometry = ScanGeometry.from_metadata(stored)
        if tuple(geometry.shape) == tuple(shape[:len(geometry.shape)]):
            return geometry
    dim = len(shape)
    scale = meta.get("scale", (1.0,) * dim)
    translate = meta.get("translate", (0.0,) * dim)
    return ScanGeometry.of_grid(shape, scale[-dim:], translate[-dim:])


def write_labels_scan(path: str, data: Any, meta: dict) -> List[str]:
    """Labels to .nii.gz/.nii/.nrrd/.mha on the scan's grid (the geometry in the layer's metadata,
    else its scale and translate); never over an existing file."""
    data = np.asarray(data)
    if data.ndim not in (2, 3):
        raise ValueError(f"{path}: scans hold 2-D or 3-D labels; this layer is {data.ndim}-D {data.shape}")
    if Path(path).exists():
        raise FileExistsError(f"{path} already exists; choose another name (labels are never overwritten)")
    return [str(write_scan(path, data, layer_geometry(meta, data.shape)))]
