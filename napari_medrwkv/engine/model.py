"""A network together with what it needs to be used: its metadata and device.

``load_model`` resolves a shipped name, a checkpoint file, or a bare
architecture name (an untrained model, for training from scratch).
"""
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Union

import torch
import torch.nn as nn

from .._resources import weights_dir
from ..models import create_model, list_models
from .checkpoint import ModelInfo, load_checkpoint, read_info
from .preprocess import NORMALIZATION
from .fuse import fuse_for_inference
from .memory import retain_freed_memory

DEFAULT_TILE = 512


@dataclass
class SegmentationModel:
    net: nn.Module
    info: ModelInfo
    source: str                       # shipped name, checkpoint path or architecture name
    device: torch.device
    _fused: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source.endswith(".safetensors") else self.source

    @property
    def binary(self) -> bool:
        return self.info.num_classes == 1

    def inference_net(self) -> nn.Module:
        """The eval-mode network with BatchNorm folded in and channels_last weights
        (oneDNN's native layout: ~30% faster on CPU), built once per model."""
        if self._fused is None:
            self._fused = fuse_for_inference(self.net).to(self.device, memory_format=torch.channels_last)
        return self._fused

    def to(self, device) -> "SegmentationModel":
        device = resolve_device(device)
        if device != self.device:
            self.net.to(device)
            self.device, self._fused = device, None
        return self


def _renamed(info: ModelInfo, class_names: Optional[List[str]], source: str) -> ModelInfo:
    if not class_names:
        return info
    try:
        return replace(info, class_names=list(class_names))
    except ValueError as err:
        raise ValueError(f"class names {','.join(class_names)!r} for {source}: {err}") from None


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """'auto' -> cuda if usable, else mps, else cpu.  Unavailable devices are an error."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine (use 'cpu' or 'auto').")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r}: Apple MPS is not available on this machine (use 'cpu' or 'auto').")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a device: use auto, cpu, cuda, cuda:N or mps ({err})") from None


def available_devices() -> List[str]:
    """Devices this machine can run on, best first (for menus)."""
    devices = ["auto"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(1, torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices + ["cpu"]


def list_shipped() -> List[str]:
    """Names of the checkpoints shipped in ``weights/``."""
    return sorted(p.stem for p in weights_dir().glob("*.safetensors"))


def list_automatic() -> List[str]:
    """The shipped models that segment whole images on their own (not the prompt-aware ones, which
    take clicks: ``refine``)."""
    return [name for name in list_shipped() if not read_info(shipped_path(name)).prompt_channels]


def shipped_path(name: str) -> Path:
    """The file of the shipped checkpoint ``name`` (one of :func:`list_shipped`)."""
    return weights_dir() / f"{name}.safetensors"


def read_model_info(source: str) -> Optional[ModelInfo]:
    """The metadata of a shipped name or a checkpoint file, from its header alone (no
    weights read); None for anything else (an architecture name)."""
    if source in list_shipped():
        return read_info(shipped_path(source))
    if str(source).endswith(".safetensors"):
        return read_info(Path(source).expanduser())
    return None


def describe_model(info: ModelInfo) -> str:
    """One line on what a checkpoint segments, what it learnt from and how it scored, for menus."""
    parts = [f"finds {', '.join(info.class_names[1:]) or 'foreground'}"]
    data = info.training.get("data")
    if data:
        split = info.training.get("split")
        parts.append(f"trained on {Path(str(data)).name}" + (f" ({split} split)" if split else ""))
    elif info.training.get("averaged"):
        parts.append(f"the average of {len(info.training['averaged'])} checkpoints")
    dice = info.metrics.get("test_dice")
    if isinstance(dice, (int, float)):
        parts.append(f"test Dice {dice:.3f} on {info.metrics.get('test_split', 'its test split')}")
    return "; ".join(parts)


def with_instances(model: SegmentationModel, kind: str = "border") -> SegmentationModel:
    """A copy of a binary ``model`` made an instance model of ``kind`` (engine/instances.py):
    the same network with the extra output channel(s) the kind needs, every trained weight
    kept.  A "border" channel starts at "no border" (weights 0, bias -3), so the copy first segments
    as the original did, each connected object its own label; a "distance" channel starts as a copy
    of the foreground's (the probability is highest inside objects, as the distance is).  An
    instance model of that kind comes back as it is."""
    from dataclasses import replace as replaced
    from .instances import check_kind
    kind = check_kind(kind)
    if model.info.instances == kind:
        return model
    if model.info.instances or not model.binary or model.info.prompt_channels:
        raise ValueError(f"{model.name} cannot become an instance model: only a binary (foreground) model can "
                         f"(it has {model.info.num_classes} classes"
                         f"{', prompts' if model.info.prompt_channels else ''}, instances={model.info.instances!r})")
    info = replaced(model.info, instances=kind)
    net = create_model(info.architecture, in_chans=info.in_chans, num_classes=info.out_channels, **info.arch_kwargs)
    old, new = model.net.state_dict(), net.state_dict()
    with torch.no_grad():
        for key, value in new.items():
            trained = old[key]
            if trained.shape == value.shape:
                value.copy_(trained)
            elif trained.shape[1:] == value.shape[1:] and trained.shape[0] == model.info.num_classes:
                value[:trained.shape[0]] = trained          # the output layer: its class rows kept
                if kind == "distance":
                    value[trained.shape[0]:] = trained[:1]
                else:
                    value[trained.shape[0]:] = -3.0 if key.endswith("bias") else 0.0
            else:
                raise ValueError(f"{model.name}: cannot widen {key} from {tuple(trained.shape)} to "
                                 f"{tuple(value.shape)} for an instance model")
    net.to(model.device).eval()
    return SegmentationModel(net, info, model.source, model.device)


def load_model(name_or_path, device="auto", *, in_chans: int = 3, num_classes: int = 1,
               class_names: Optional[List[str]] = None) -> SegmentationModel:
    """A shipped name, a ``.safetensors`` checkpoint path, or an architecture name.

    ``in_chans`` and ``num_classes`` apply only to a bare architecture, which
    starts untrained.  ``class_names`` names a bare architecture's classes, or
    renames a checkpoint's (as many names as it has classes): a model trained on
    one kind of object that starts training on another.
    """
    if isinstance(name_or_path, SegmentationModel):
        return name_or_path.to(device)
    device = resolve_device(device)
    if device.type == "cpu":
        retain_freed_memory()      # every CPU forward pass re-allocates its activations
    source = str(name_or_path)
    if source in list_shipped():
        net, info = load_checkpoint(shipped_path(source), device=device)
        return SegmentationModel(net, _renamed(info, class_names, source), source, device)
    path = Path(source).expanduser()
    if path.suffix == ".safetensors" or path.exists():
        net, info = load_checkpoint(path, device=device)
        return SegmentationModel(net, _renamed(info, class_names, str(path)), str(path), device)
    if source in list_models():
        info = ModelInfo(architecture=source, arch_kwargs={}, in_chans=in_chans, num_classes=num_classes,
                         class_names=list(class_names or []),  # empty: ModelInfo's defaults
                         normalization=dict(NORMALIZATION), tile_size=DEFAULT_TILE)
        net = create_model(source, in_chans=in_chans, num_classes=num_classes).to(device).eval()
        return SegmentationModel(net, info, source, device)
    raise ValueError(f"model {source!r} is neither a shipped model ({', '.join(list_shipped()) or 'none'}), "
                     f"a checkpoint file, nor an architecture ({', '.join(list_models())}).")

