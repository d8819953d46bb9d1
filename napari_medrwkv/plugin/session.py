"""The models of this napari session beyond the shipped ones, shared by every open widget.

The Fine-tune widget registers each checkpoint it saves (:func:`register`); a checkpoint file
chosen in any model menu is added with :func:`add_file`; the Models widget lists both with the
shipped ones and can take a file off every menu again (:func:`forget`, e.g. a broken file).
The Segment and Fine-tune widgets list ``registered() + opened()`` in their model menus, leave
out ``forgotten()``, and refresh when ``changed`` fires.  Plain Python and psygnal: no Qt, no torch.
"""
from pathlib import Path
from typing import List, Set, Union

from psygnal import Signal


class _Events:
    changed = Signal(str)            # the source just registered, added or forgotten ("" after clear())


_events = _Events()
_models: List[str] = []
_files: List[str] = []
_forgotten: Set[str] = set()

#: Emitted with the source after :func:`register`, :func:`add_file` and :func:`forget` (and "" after :func:`clear`).
changed = _events.changed


def _source(path_or_name: Union[str, Path]) -> str:
    source = str(Path(path_or_name).expanduser()) if isinstance(path_or_name, Path) or \
        str(path_or_name).endswith(".safetensors") else str(path_or_name)
    if not source:
        raise ValueError("empty model name")
    return source


def register(path_or_name: Union[str, Path]) -> str:
    """Offer a checkpoint path (or model name) fine-tuned in this session in every model list.

    Returns the source as it will appear in the lists; registering twice lists it once.
    """
    source = _source(path_or_name)
    _forgotten.discard(source)
    if source not in _models:
        _models.append(source)
    changed.emit(source)
    return source


def registered() -> List[str]:
    """The models fine-tuned in this session, oldest first (a copy)."""
    return list(_models)


def add_file(path: Union[str, Path]) -> str:
    """Offer a checkpoint file the user chose (in any widget) in every model list."""
    source = _source(path)
    _forgotten.discard(source)
    if source not in _files and source not in _models:
        _files.append(source)
        changed.emit(source)
    return source


def opened() -> List[str]:
    """The checkpoint files chosen in this session, oldest first (a copy)."""
    return list(_files)


def forget(source: str) -> None:
    """Take a fine-tuned model or a chosen file off every model list (the file stays on disk)."""
    for listed in (_models, _files):
        if source in listed:
            listed.remove(source)
    _forgotten.add(source)
    changed.emit(source)


def forgotten() -> Set[str]:
    """The sources taken off the lists with :func:`forget` (a copy)."""
    return set(_forgotten)


def clear() -> None:
    """Forget every registered model and chosen file (tests, or a fresh start)."""
    _models.clear()
    _files.clear()
    _forgotten.clear()
    changed.emit("")
