"""napari-medrwkv: RWKV U-Net segmentation for napari, with a headless core.

The public API (imported lazily, so that napari can read the plugin manifest
without importing torch)::

    import napari_medrwkv as nm
    nm.list_shipped()
    model = nm.load_model("rwkv_unet_t-kvasir", device="auto")
    labels = nm.segment(image, model=model)
    result = nm.train(model, "path/to/dataset", out="tuned.safetensors", max_minutes=5)
    scores = nm.evaluate(model, "path/to/dataset", split="test")
    nm.suggest_model(image)          # the shipped model trained on images like this one
    mask = nm.refine(image, points=[(120, 88, True)])    # one object from a click
"""
__version__ = "0.1.0"

_API = {
    "list_shipped": "engine.model",
    "load_model": "engine.model",
    "available_devices": "engine.model",
    "SegmentationModel": "engine.model",
    "segment": "engine.infer",
    "Cancelled": "engine.infer",
    "train": "engine.train",
    "TrainConfig": "engine.train",
    "evaluate": "engine.evaluate",
    "suggest_model": "engine.appearance",
    "refine": "engine.interactive",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
    if name in _API:
        import importlib
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'napari_medrwkv' has no attribute {name!r}")


def __dir__():
    return __all__
