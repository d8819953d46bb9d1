"""Checkpoints: one ``.safetensors`` file holding the weights, with everything needed to
rebuild and use the model (architecture, classes, normalization, tile size, how it was
trained, its metrics) as JSON in the file's header.

The header is a string->string map; we store a single key, ``"napari_medrwkv"``, whose
value is a JSON object (:class:`ModelInfo`).  Loading never unpickles anything:
:func:`read_info` parses only the header, :func:`load_checkpoint` reads raw tensors with
``safetensors``.  Imports neither Qt nor napari.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple, Union

try:
    import fcntl
except ImportError:   # Windows: no advisory locks, so two header updates at once can still lose one
    fcntl = None

import torch
import torch.nn as nn

import safetensors
import safetensors.torch

from .. import __version__
from .imageio import atomic_file
from .instances import check_kind, extra_channels

__all__ = [
    "CheckpointError",
    "ModelInfo",
    "INFERENCE_DEFAULTS",
    "METADATA_KEY",
    "save_checkpoint",
    "read_info",
    "write_info",
    "update_info",
    "load_checkpoint",
]

METADATA_KEY = "napari_medrwkv"
PathLike = Union[str, os.PathLike]

# Buffers whose statistics we keep at full precision even in a half-precision checkpoint.
_KEEP_FULL_PRECISION_SUFFIXES = ("running_mean", "running_var")
_FP16_MAX = 65504.0


class CheckpointError(ValueError):
    """A checkpoint cannot be written or used.  The message names the file and says what to do."""


def _now_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def default_class_names(num_classes: int) -> List[str]:
    """``["background", "foreground"]`` for a binary model, else background + class_1..."""
    if num_classes <= 1:
        return ["background", "foreground"]
    return ["background"] + [f"class_{i}" for i in range(1, num_classes)]


def check_input_scale(value) -> float:
    """``value`` as a float in (0, 4], else a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 4:
        raise ValueError(f"input_scale must be a number in (0, 4] (0.5 = the network sees half-size images), "
                         f"got {value!r}")
    return float(value)


#: How ``segment`` turns probabilities into labels when its caller does not say: test-time
#: flips, the foreground threshold of a binary model, and whether only the largest connected
#: object of each plane is kept (binary models).  ``medrwkv calibrate`` chooses them on
#: validation images and stores them in the checkpoint.
INFERENCE_DEFAULTS: Dict[str, Any] = {"flips": False, "threshold": 0.5, "largest_component": False}


def check_inference(settings, num_classes: int) -> Dict[str, Any]:
    """``settings`` completed with :data:`INFERENCE_DEFAULTS`, else a ValueError naming the key."""
    if not isinstance(settings, dict):
        raise ValueError(f"inference must be a JSON object such as {INFERENCE_DEFAULTS}, got {settings!r}")
    unknown = sorted(set(settings) - set(INFERENCE_DEFAULTS))
    if unknown:
        raise ValueError(f"inference has unknown key(s) {', '.join(unknown)}; known: {', '.join(INFERENCE_DEFAULTS)}")
    merged = {**INFERENCE_DEFAULTS, **settings}
    for key in ("flips", "largest_component"):
        if not isinstance(merged[key], bool):
            raise ValueError(f"inference {key} must be true or false, got {merged[key]!r}")
    threshold = merged["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError(f"inference threshold must be a probability strictly between 0 and 1, got {threshold!r}")
    merged["threshold"] = float(threshold)
    if num_classes != 1 and (merged["threshold"] != 0.5 or merged["largest_component"]):
        raise ValueError("inference threshold and largest_component apply to binary models only "
                         f"(this one has {num_classes} classes and labels each pixel with its likeliest class)")
    return merged


@dataclass
class ModelInfo:
    """What a checkpoint says about its model.

    ``num_classes == 1`` means one sigmoid output (binary: ``class_names`` is
    ``["background", name]``); ``num_classes >= 2`` means softmax over classes, class 0 is
    background and ``class_names`` has one entry per class.
    """

    architecture: str
    in_chans: int
    num_classes: int
    arch_kwargs: Dict[str, Any] = field(default_factory=dict)
    class_names: List[str] = field(default_factory=list)
    normalization: Dict[str, Any] = field(default_factory=dict)
    tile_size: int = 256
    # Images are resized by this factor before the network sees them (0.5: half size), so a
    # model can work on large, smooth structures at a fraction of the pixels; labels come back
    # at the image's own size.  Training resizes the same way.
    input_scale: float = 1.0
    # A prompt-aware model (engine/interactive.py) takes this many prompt maps after the image's
    # ``in_chans`` channels; 0 for an automatic model.
    prompt_channels: int = 0
    # "border": an instance model (engine/instances.py), one output channel more than its classes
    # (the border between touching objects), labels 1..N per object; "" for any other model.
    instances: str = ""
    inference: Dict[str, Any] = field(default_factory=lambda: dict(INFERENCE_DEFAULTS))
    training: Dict[str, Any] = field(default_factory=dict)
    metrics: Dict[str, Any] = field(default_factory=dict)
    version: str = __version__
    created: str = field(default_factory=_now_iso)

    def __post_init__(self):
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ValueError(f"architecture must be a non-empty string, got {self.architecture!r}")
        for name in ("in_chans", "num_classes", "tile_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.prompt_channels, bool) or not isinstance(self.prompt_channels, int) \
                or self.prompt_channels < 0:
            raise ValueError(f"prompt_channels must be an integer >= 0, got {self.prompt_channels!r}")
        self.input_scale = check_input_scale(self.input_scale)
        self.instances = check_kind(self.instances)
        if self.instances and self.num_classes != 1:
            raise ValueError(f"instances={self.instances!r} needs a binary model (num_classes=1), "
                             f"got num_classes={self.num_classes}")
        self.inference = check_inference(self.inference or {}, self.num_classes)
        self.arch_kwargs = dict(self.arch_kwargs or {})
        self.normalization = dict(self.normalization or {})
        self.training = dict(self.training or {})
        self.metrics = dict(self.metrics or {})
        names = [str(n) for n in (self.class_names or [])]
        if not names:
            names = default_class_names(self.num_classes)
        elif self.num_classes == 1 and len(names) == 1:
            names = ["background", names[0]]
        expected = 2 if self.num_classes == 1 else self.num_classes
        if len(names) != expected:
            raise ValueError(
                f"class_names has {len(names)} entries but a model with num_classes={self.num_classes} "
                f"needs {expected}" + (" (background + the foreground name)" if self.num_classes == 1 else "")
            )
        self.class_names = names

    @property
    def binary(self) -> bool:
        return self.num_classes == 1

    @property
    def window(self):
        """The intensity window the model was trained with (a CT preset name or [level, width]), which
        ``segment`` uses unless told otherwise; None for each image's percentiles (every older checkpoint)."""
        from .preprocess import recorded_window
        return recorded_window(self.normalization)

    @property
    def out_channels(self) -> int:
        """The network's output channels: one per class (one for a binary model), plus an instance model's."""
        return self.num_classes + extra_channels(self.instances)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, default=_json_default)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelInfo":
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        missing = [k for k in ("architecture", "in_chans", "num_classes") if k not in data]
        if missing:
            raise ValueError(f"missing required field(s): {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        # Unknown keys come from newer versions: ignore them.  Explicit nulls take defaults.
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "ModelInfo":
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"metadata is not valid JSON ({exc})") from None
        return cls.from_dict(data)


def _json_default(obj: Any):
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    tolist = getattr(obj, "tolist", None)  # numpy arrays, tensors
    if callable(tolist):
        return tolist()
    return str(obj)


# ---------------------------------------------------------------------------- saving

def _tensors_for_file(model: nn.Module, half: bool) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    seen_storage = set()
    for key, tensor in model.state_dict().items():
        t = tensor.detach()
        fresh = False
        if half and t.is_floating_point() and t.dtype != torch.float16 \
                and not key.endswith(_KEEP_FULL_PRECISION_SUFFIXES) and t.numel() \
                and t.abs().max().item() <= _FP16_MAX:  # never turn a large value into inf
            t = t.to(torch.float16)
            fresh = True
        if t.device.type != "cpu":
            t = t.cpu()
            fresh = True
        if not t.is_contiguous():
            t = t.contiguous()
            fresh = True
        if not fresh:
            # safetensors refuses tensors sharing storage (tied weights, views): give each its own.
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            else:
                seen_storage.add(ptr)
        out[key] = t
    return out


def save_checkpoint(model: nn.Module, path: PathLike, info: ModelInfo, half: bool = True,
                    overwrite: bool = True) -> Path:
    """Write ``model``'s weights and ``info`` to one ``.safetensors`` file, atomically.

    With ``half=True`` floating weights are stored as float16 (BatchNorm running statistics,
    integer buffers and values beyond float16 range keep their dtype).  The file is written
    to a temporary file in the same folder and then renamed over ``path``: a crash never
    leaves a half-written file and never destroys an existing checkpoint.  With
    ``overwrite=False`` a file at ``path`` is never replaced, even one another process made
    while this one worked (:class:`FileExistsError`).
    """
    path = Path(path)
    if not isinstance(info, ModelInfo):
        raise TypeError(f"info must be a ModelInfo, got {type(info).__name__}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(
            f"cannot save checkpoint {path}: folder {parent} does not exist; create it first or choose another folder"
        )
    if path.is_dir():
        raise CheckpointError(f"cannot save checkpoint {path}: it is a folder; give a file name ending in .safetensors")
    tensors = _tensors_for_file(model, half)
    with _locked(path) if overwrite else contextlib.nullcontext():
        _write_atomically(tensors, info, path, overwrite)
    return path


@contextlib.contextmanager
def _locked(path: Path):
    """While the block runs, no other writer of this module replaces the checkpoint at ``path``.

    An advisory lock on the file itself, so nothing is left behind.  Writers replace a
    checkpoint by renaming a new file over its name, so after waiting for the lock the name
    may point at a newer file than the one locked: then lock that one instead."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY) if fcntl is not None else None
        except OSError:            # no file yet (nothing to protect) or not ours to open
            fd = None
        if fd is None:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                yield
                return
        finally:
            os.close(fd)               # releases the lock


def update_info(path: PathLike, change: Callable[[ModelInfo], None], out: PathLike = None,
                overwrite: bool = True) -> ModelInfo:
    """Read a checkpoint's :class:`ModelInfo`, let ``change`` edit it, and write the result to
    ``out`` (default: over ``path``) with the weights as stored, byte for byte.

    Reading and writing happen under one lock on ``path``: two updates at once (two
    ``evaluate --record`` runs, or one beside a training that saves over the file) both land,
    one after the other, instead of the later one writing back a header that misses the
    earlier one's change (or weights that were replaced meanwhile)."""
    path = Path(path)
    out = Path(out) if out is not None else path
    with _locked(path):
        info = read_info(path)
        change(info)
        same = out.exists() and path.exists() and os.path.samefile(out, path)
        with contextlib.nullcontext() if same or not overwrite else _locked(out):
            write_info(path, info, out, overwrite)
    return info


def record_metrics(path: PathLike, metrics: Dict[str, Any]) -> ModelInfo:
    """Add ``metrics`` to those in a checkpoint's header (same keys are replaced), atomically
    and under a lock (:func:`update_info`).  The weights are copied as stored, byte for byte."""
    return update_info(path, lambda info: info.metrics.update(metrics))


def write_info(path: PathLike, info: ModelInfo, out: PathLike = None, overwrite: bool = True) -> Path:
    """Checkpoint ``path`` with ``info`` as its metadata, written atomically to ``out``
    (default: over ``path``); the weights are copied as stored, byte for byte.  With
    ``overwrite=False`` an existing ``out`` is never replaced (:class:`FileExistsError`)."""
    path = Path(path)
    out = Path(out) if out is not None else path
    if not isinstance(info, ModelInfo):
        raise TypeError(f"info must be a ModelInfo, got {type(info).__name__}")
    _check_file(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(f"cannot write checkpoint {out}: folder {parent} does not exist; create it first")
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as exc:  # noqa: BLE001 -- safetensors raises several types for a damaged file
        raise CheckpointError(f"cannot read the weights of {path} ({exc}); the file may be damaged") from None
    _write_atomically(tensors, info, out, overwrite)
    return out


def _write_atomically(tensors: Dict[str, torch.Tensor], info: ModelInfo, path: Path, overwrite: bool) -> None:
    metadata = {"format": "pt", METADATA_KEY: info.to_json()}
    try:
        with atomic_file(path, overwrite) as tmp:
            try:
                safetensors.torch.save_file(tensors, tmp, metadata=metadata)
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 -- SafetensorError: a full disk, mostly
                raise OSError(None, f"{type(exc).__name__}: {exc}") from None
    except FileExistsError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CheckpointError(f"cannot save checkpoint {path}: {reason}; check that the folder is writable and "
                              "has space, or choose another place") from None


# ---------------------------------------------------------------------------- reading

def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file; choose the .safetensors file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (a pipe or device); give a .safetensors file")


def read_info(path: PathLike) -> ModelInfo:
    """The :class:`ModelInfo` stored in a checkpoint's header.  Reads only the header."""
    path = Path(path)
    _check_file(path)
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            metadata = f.metadata()
    except Exception as exc:  # SafetensorError, OSError, ...
        raise CheckpointError(
            f"{path} is not a readable .safetensors checkpoint ({type(exc).__name__}: {exc}); "
            "the file may be corrupt or incomplete: save or download it again"
        ) from None
    if not metadata or METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{path} was not written by napari-medrwkv; it has no {METADATA_KEY!r} metadata, so its "
            "architecture and classes are unknown. Use a checkpoint saved by napari-medrwkv, or "
            "load the weights into a model you build yourself"
        )
    try:
        return ModelInfo.from_json(metadata[METADATA_KEY])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{path} has unusable napari-medrwkv metadata ({exc}); save the checkpoint again"
        ) from None


def _mismatch_report(path: Path, file_sd: Dict[str, torch.Tensor], model_sd: Dict[str, torch.Tensor],
                     architecture: str) -> str:
    missing = [k for k in model_sd if k not in file_sd]
    unexpected = [k for k in file_sd if k not in model_sd]
    shapes = [
        f"{k}: file {tuple(file_sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
        for k in model_sd if k in file_sd and tuple(file_sd[k].shape) != tuple(model_sd[k].shape)
    ]
    parts = []

    def listing(title, items):
        shown = ", ".join(items[:10])
        more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
        parts.append(f"{title} ({len(items)}): {shown}{more}")

    if missing:
        listing("missing keys", missing)
    if unexpected:
        listing("unexpected keys", unexpected)
    if shapes:
        listing("shape mismatches", shapes)
    if not parts:
        return ""
    return (
        f"checkpoint {path} does not match the {architecture!r} model its metadata describes; "
        + "; ".join(parts)
        + ". The file was probably edited or written for a different configuration: save it again from the trained model"
    )


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, ModelInfo]:
    """Rebuild the model a checkpoint describes and load its weights.

    Returns ``(model, info)``; the model is in eval mode on ``device`` with the dtypes
    ``create_model`` gives it (float16 weights in the file are cast back).
    """
    from ..models import create_model, list_models

    path = Path(path)
    info = read_info(path)
    available = list_models()
    if info.architecture not in available:
        raise CheckpointError(
            f"checkpoint {path} needs architecture {info.architecture!r}, which this version of "
            f"napari-medrwkv ({__version__}) does not have; available: {', '.join(available)}. "
            "Update napari-medrwkv or use another checkpoint"
        )
    try:
        model = create_model(info.architecture, in_chans=info.in_chans + info.prompt_channels,
                             num_classes=info.out_channels, **info.arch_kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: cannot build {info.architecture!r} with in_chans={info.in_chans}, "
            f"num_classes={info.num_classes}, arch_kwargs={info.arch_kwargs} ({exc}); the metadata does "
            "not fit this version of napari-medrwkv"
        ) from None
    try:
        file_sd = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable .safetensors checkpoint ({type(exc).__name__}: {exc}); "
            "the file may be corrupt or incomplete: save or download it again"
        ) from None

    model_sd = model.state_dict()
    report = _mismatch_report(path, file_sd, model_sd, info.architecture)
    if report:
        raise CheckpointError(report)
    state = {k: file_sd[k].to(model_sd[k].dtype) for k in model_sd}
    del file_sd
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # pragma: no cover - the pre-check catches what strict loading would
        raise CheckpointError(f"checkpoint {path} does not fit its model: {exc}") from None
    model.eval()
    model.to(device)
    return model, info
