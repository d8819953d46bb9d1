"""Model families and their registry.  Imports neither Qt nor napari."""
from .registry import create_model, list_models, register_model
from . import rwkv_unet  # noqa: F401  (registers rwkv_unet_t/s/b)
from . import med_urwkv  # noqa: F401
from . import dynamic_scan  # noqa: F401
