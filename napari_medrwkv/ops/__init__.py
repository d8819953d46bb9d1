"""Operators shared by every model.  Imports neither Qt nor napari."""
from .bi_wkv import bi_wkv

__all__ = ["bi_wkv"]
