"""Operators shared by every model.  Imports neither Qt nor napari."""
from .bi_wkv import bi_wkv
from .depthwise_conv import depthwise_conv2d

__all__ = ["bi_wkv", "depthwise_conv2d"]
