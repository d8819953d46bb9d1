"""Writing results without ever leaving a half-written file behind."""
import os
import tempfile
from pathlib import Path

import numpy as np


def write_labels(path, array: np.ndarray) -> Path:
    """Write ``array`` to ``path`` (.png for 2D integer images, .tif/.tiff for anything)
    atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".tif", ".tiff"):
        raise ValueError(f"{path}: write labels as .png (2D) or .tif (any)")
    if suffix == ".png" and (array.ndim != 2 or array.dtype.kind not in "ui"):
        raise ValueError(f"{path}: PNG holds 2D integer labels only; use .tif for {array.ndim}D {array.dtype}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        if suffix == ".png":
            from PIL import Image
            data = array.astype(np.uint16 if array.max(initial=0) > 255 else np.uint8)
            Image.fromarray(data).save(tmp, format="PNG")
        else:
            import tifffile
            tifffile.imwrite(tmp, array, compression="zlib")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
