"""What the widgets share: moving worker results to the GUI thread, following the layer list,
refilling combo boxes silently.  Qt only; no napari import, no torch."""
import hashlib
import weakref

import numpy as np
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import QComboBox, QWidget

BROWSE = "Checkpoint file…"


class WorkerRelay(QObject):
    """Carries messages from a worker thread to the GUI thread (queued signals)."""
    tiles = Signal(int, int)           # tiles done, tiles in all
    progressed = Signal(object)        # engine.train.TrainProgress
    phase = Signal(str)


def unwrap_outcome(outcome, status, action: str, cancelled_text: str, notify):
    """The value of a worker's ("done", value) outcome, or None after telling the user
    about ("cancelled", _) or ("error", message)."""
    kind, value = outcome
    if kind == "cancelled":
        status.setText(cancelled_text)
        return None
    if kind == "error":
        status.setText(f"Failed: {value}")
        notify(f"{action} failed: {value}")
        return None
    return value


def connect_while_alive(widget: QWidget, signal, method) -> None:
    """``signal.connect(method)`` until the Qt widget is destroyed, without keeping it alive
    meanwhile (the Python object can outlive its Qt widget)."""
    signal.connect(method)
    ref = weakref.WeakMethod(method)
    widget.destroyed.connect(lambda *_: ref() is not None and signal.disconnect(ref()))


def follow_layer_list(widget: QWidget, layers, method) -> None:
    """Call ``method`` whenever layers are added to, removed from or reordered in ``layers``."""
    for event in (layers.events.inserted, layers.events.removed, layers.events.moved):
        connect_while_alive(widget, event, method)


def refill(combo: QComboBox, items, choices, tooltips=None) -> None:
    """Replace a combo box's items (with ``tooltips``: item -> text) and select the first of
    ``choices`` that is among them, without emitting its signals: an entry passing by on the way
    (or a tooltip set on the current one, which Qt reports as a change of its text) must not act
    as if the user chose it."""
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(items)
    for index, item in enumerate(items):
        if tooltips and item in tooltips:
            combo.setItemData(index, tooltips[item], Qt.ItemDataRole.ToolTipRole)
    chosen = next((choice for choice in choices if choice in items), None)
    if chosen is not None:
        combo.setCurrentText(chosen)
    combo.blockSignals(False)


def data_digest(data: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(data).view(np.uint8)).hexdigest()
