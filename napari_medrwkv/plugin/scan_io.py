"""napari reader and writer for medical scans (engine/scans.py): a scan opens as an image layer
with the voxel spacing as its ``scale``, the origin as its ``translate`` and the geometry in its
``metadata``; labels save back onto the scan's own grid as NIfTI, NRRD or MetaImage.  No Qt."""
import warnings
from pathlib import Path
from typing import Any, List

import numpy as np

from ..engine.scans import METADATA_KEY, ScanGeometry, is_scan, read_scan, scan_stem, write_scan


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
    scan = read_scan(path)
    if scan.note:                            # which DICOM series was read: napari shows it as a notification
        warnings.warn(scan.note, stacklevel=2)
    geometry = scan.geometry
    dim = len(geometry.shape)
    meta = {"name": scan_stem(path), "scale": geometry.spacing, "translate": geometry.origin,
            "metadata": {METADATA_KEY: geometry.to_metadata()},
            "rgb": scan.array.ndim > dim and scan.array.shape[-1] in (3, 4)}
    return [(scan.array, meta, "image")]


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
