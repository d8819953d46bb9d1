"""What the widgets share: moving worker results to the GUI thread, following the layer list,
refilling combo boxes silently, stopping jobs when napari quits.  Qt only; no napari import, no torch."""
import time
import weakref

from qtpy.QtCore import QEvent, QObject, Qt, Signal
from qtpy.QtWidgets import QComboBox, QMessageBox, QWidget

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


# ---------------------------------------------------------------------------- quitting while a job runs
#: How long closing napari waits for stopped jobs to finish (a fine-tuning saves its best epoch).
QUIT_WAIT_S = 30.0


class _QuitGuard(QObject):
    """Watches napari's main window: when it closes while a widget's job runs, asks (if the user
    closed it), stops the jobs and waits for them, so that nothing runs on, or writes, after the
    window has gone."""

    def __init__(self, window: QWidget):
        super().__init__(window)
        self.widgets = weakref.WeakSet()
        window.installEventFilter(self)

    def eventFilter(self, watched, event) -> bool:
        if event.type() != QEvent.Type.Close:
            return False
        busy = [widget for widget in list(self.widgets) if widget.busy()]
        if not busy:
            return False
        if event.spontaneous() and not _confirm_quit(watched, [widget.busy() for widget in busy]):
            event.ignore()
            return True
        for widget in busy:
            worker = widget.worker
            widget.stop_for_quit()
            # Its outcome would reach widgets that are gone by then.
            for signal in (worker.returned, worker.finished):
                try:
                    signal.disconnect()
                except (TypeError, RuntimeError):      # nothing connected
                    pass
        # Wait for the worker threads themselves (a fine-tuning saves there), not for their signals:
        # running the event loop inside a closing window upsets napari's own shutdown.
        deadline = time.monotonic() + QUIT_WAIT_S
        while any(_job_running(widget) for widget in busy) and time.monotonic() < deadline:
            time.sleep(0.02)
        return False


def _job_running(widget) -> bool:
    worker = widget.worker
    return worker is not None and worker.is_running


def _confirm_quit(window, jobs) -> bool:
    answer = QMessageBox.question(
        window, "Quit while MedRWKV is working?",
        "Still running:\n• " + "\n• ".join(jobs) + "\n\nQuit stops them: a fine-tuning keeps and saves the best "
        "model so far; a segmentation in progress is dropped.",
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes


def stop_jobs_on_quit(widget: QWidget, viewer) -> None:
    """Have ``widget``'s job stopped when napari's window closes.  The widget answers ``busy()`` (what
    runs, or "" when idle) and ``stop_for_quit()`` (ask the job to stop), and keeps its napari
    thread worker in ``worker``."""
    viewer = getattr(viewer, "__wrapped__", viewer)     # napari hands plugins a public-only proxy
    window = getattr(getattr(viewer, "window", None), "_qt_window", None)
    if not isinstance(window, QWidget):
        return
    guard = next((child for child in window.children() if isinstance(child, _QuitGuard)), None)
    (guard or _QuitGuard(window)).widgets.add(widget)
