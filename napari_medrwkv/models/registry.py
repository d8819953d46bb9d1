"""Name -> model factory, as in timm: ``create_model("rwkv_unet_t", in_chans=3, num_classes=1)``."""
from typing import Callable, Dict, List

import torch.nn as nn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> List[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, in_chans: int = 3, num_classes: int = 1, **kwargs) -> nn.Module:
    """Build a registered architecture.  Every model maps (B, in_chans, H, W) to
    logits (B, num_classes, H, W) for any H, W."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if in_chans < 1 or num_classes < 1:
        raise ValueError(f"in_chans and num_classes must be >= 1, got {in_chans} and {num_classes}")
    return _REGISTRY[name](in_chans=in_chans, num_classes=num_classes, **kwargs)
