"""Models fine-tuned in this napari session, shared by every open widget.

The Fine-tune widget registers each checkpoint it saves; the Segment and Fine-tune
widgets list ``registered()`` in their model menus and refresh when ``changed``
fires.  Plain Python and psygnal: no Qt, no torch.
"""
from pathlib import Path
from typing import List, Union

from psygnal import Signal


class _Events:
    changed = Signal(str)            # the source just registered ("" after clear())


_events = _Events()
_models: List[str] = []

#: Emitted with the new source after :func:`register` (and with "" after :func:`clear`).
changed = _events.changed


def register(path_or_name: Union[str, Path]) -> str:
    """Offer a checkpoint path (or model name) in every model list for the rest of the session.

    Returns the source as it will appear in the lists; registering twice lists it once.
    """
    source = str(Path(path_or_name).expanduser()) if isinstance(path_or_name, Path) or \
        str(path_or_name).endswith(".safetensors") else str(path_or_name)
    if not source:
        raise ValueError("register: empty model name")
    if source not in _models:
        _models.append(source)
    changed.emit(source)
    return source


def registered() -> List[str]:
    """The registered sources, oldest first (a copy)."""
    return list(_models)


def clear() -> None:
    """Forget every registered model (tests, or a fresh start)."""
    _models.clear()
    changed.emit("")
