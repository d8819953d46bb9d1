"""Sample data: two DSB2018 nuclei images with their ground-truth instance labels.

Each function returns napari ``LayerData`` tuples: the image, then a Labels
layer named ``"<name> ground truth"``.  No torch, no Qt.
"""
from pathlib import Path
from typing import List, Tuple

import numpy as np

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"

LayerDataTuple = Tuple[np.ndarray, dict, str]


def _read(path: Path) -> np.ndarray:
    from skimage.io import imread

    return imread(str(path))


def _as_display_image(image: np.ndarray) -> Tuple[np.ndarray, bool]:
    """Drop an alpha channel; collapse R = G = B images to 2-D grey.

    Returns the image and whether it is RGB.
    """
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        image = image[..., :3]
        if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]):
            return np.ascontiguousarray(image[..., 0]), False
        return image, True
    return image, False


def load_sample(stem: str, name: str) -> List[LayerDataTuple]:
    """``samples/<stem>.png`` and ``samples/<stem>_mask.png`` as layer data."""
    image, rgb = _as_display_image(_read(SAMPLES_DIR / f"{stem}.png"))
    labels = _read(SAMPLES_DIR / f"{stem}_mask.png")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"sample {stem!r}: mask {labels.shape} does not match image {image.shape[:2]}")
    image_kwargs = {"name": name, "rgb": rgb}
    if not rgb:
        image_kwargs["colormap"] = "gray"
    labels_kwargs = {"name": f"{name} ground truth", "opacity": 0.4}
    return [(image, image_kwargs, "image"), (labels, labels_kwargs, "labels")]


def nuclei_fluorescence() -> List[LayerDataTuple]:
    """DSB2018 fluorescence nuclei (grey, bright nuclei on dark), 256 x 256, 99 nuclei."""
    return load_sample("nuclei_fluorescence", "nuclei fluorescence")


def nuclei_brightfield() -> List[LayerDataTuple]:
    """DSB2018 stained bright-field nuclei (RGB, dark nuclei on light), 256 x 320, 65 nuclei."""
    return load_sample("nuclei_brightfield", "nuclei brightfield")
