"""Where the shipped, non-Python files live.

An installed wheel carries ``kernels/`` and ``weights/`` inside the package; an
editable checkout keeps them at the repository root.
"""
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _bundled(name: str) -> Path:
    inside = _PACKAGE / name
    return inside if inside.is_dir() else _PACKAGE.parent / name


def kernels_dir() -> Path:
    return _bundled("kernels")


def weights_dir() -> Path:
    return _bundled("weights")
