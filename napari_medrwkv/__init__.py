"""napari-medrwkv: RWKV U-Net segmentation for napari, with a headless core."""
__version__ = "0.1.0"
