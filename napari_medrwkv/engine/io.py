"""Writing results without ever leaving a half-written file behind."""
import os
import tempfile
from pathlib import Path

import numpy as np


def write_labels(path, array: np.ndarray) -> Path:
    """Write ``array`` to ``path`` (.png for 2D integer images, .tif/.tiff for anything)
    atomically: a temporary file in the same folder, on disk before a rename puts it in place,
    with the permissions a new file gets (the umask's)."""
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
        flush_to_disk(tmp)
        give_default_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
