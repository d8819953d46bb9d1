"""What the widgets share: moving worker results to the GUI thread, following the layer list,
refilling combo boxes silently, stopping jobs when napari quits, a layout that fits any docking
(a scroll area, collapsible sections).  Qt only; no napari import, no torch."""
import time
import weakref

from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import (QAbstractButton, QAbstractSpinBox, QComboBox, QDockWidget, QFrame, QLabel, QMainWindow,
                            QMessageBox, QScrollArea, QShortcut, QSizePolicy, QToolButton, QVBoxLayout, QWidget)

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
    """Call ``method`` whenever layers are added to, removed from, reordered in or renamed in ``layers``."""
    for event in (layers.events.inserted, layers.events.removed, layers.events.moved, layers.events.renamed):
        connect_while_alive(widget, event, method)


def scrolling_body(widget: QWidget) -> QVBoxLayout:
    """Give ``widget`` a vertical scroll area filling it, and return the layout of what scrolls.

    Docked below each other in a 1080-px-high window, the widgets get less height than they
    would like: they scroll rather than push the window (and its status bar) off the screen, and
    their controls keep their own minimum sizes instead of being squashed."""
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = QScrollArea(widget)
    area.setObjectName("medrwkv-scroll")
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    body = QWidget()
    area.setWidget(body)
    outer.addWidget(area)
    return QVBoxLayout(body)


#: A docked widget gets at least this height (or all it asks, if less): three of them below each
#: other fit a 1080-px-high window, and each still shows its main controls.
MIN_DOCK_HEIGHT = 100


def fit_dock(widget: QWidget) -> None:
    """After the widget's contents are laid out: never narrower than they need (plus a scroll
    bar), so that no label, button or spin box text is cut ("20 px" read "20 p"); never lower
    than ``MIN_DOCK_HEIGHT`` (what is below scrolls)."""
    area = widget.findChild(QScrollArea, "medrwkv-scroll")
    for spin in widget.findChildren(QAbstractSpinBox):      # room for the longest value and its unit
        spin.setMinimumWidth(max(spin.minimumSizeHint().width(), spin.sizeHint().width()))
    for combo in widget.findChildren(QComboBox):            # a long checkpoint path must not widen the widget
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(16)
    body = area.widget()
    area.setMinimumWidth(body.minimumSizeHint().width() + area.verticalScrollBar().sizeHint().width())
    area.setMinimumHeight(min(body.sizeHint().height(), MIN_DOCK_HEIGHT))
    widget.installEventFilter(_DockBalancer(widget))


class _DockBalancer(QObject):
    """On a widget's first showing in a dock: share the height of its dock area among the MedRWKV
    widgets docked there in proportion to what each asks.  Left to itself, Qt gives the first
    dock all it asks and the later ones their minimum."""

    def __init__(self, widget: QWidget):
        super().__init__(widget)
        self.shown = False

    def eventFilter(self, watched, event) -> bool:
        if event.type() == QEvent.Type.Show and not self.shown:
            self.shown = True
            QTimer.singleShot(0, lambda: _balance_docks(watched))
        return False


def _balance_docks(widget: QWidget) -> None:
    try:
        dock = widget.parentWidget()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parentWidget()
    except RuntimeError:                  # deleted meanwhile
        return
    window = dock.parentWidget() if dock is not None else None
    if not isinstance(window, QMainWindow) or dock.isFloating():
        return
    side = window.dockWidgetArea(dock)
    docks = [other for other in window.findChildren(QDockWidget)
             if other.isVisible() and not other.isFloating() and window.dockWidgetArea(other) == side
             and other.findChild(QScrollArea, "medrwkv-scroll") is not None]
    if len(docks) > 1:
        window.resizeDocks(docks, [other.sizeHint().height() for other in docks], Qt.Orientation.Vertical)


class Section(QWidget):
    """A titled part of a widget that folds away: a ▸/▾ button and the contents below it."""

    def __init__(self, title: str, contents: QWidget, expanded: bool = True, parent=None):
        super().__init__(parent)
        self.toggle = QToolButton()
        self.toggle.setText(title)
        self.toggle.setCheckable(True)
        self.toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.toggle.setAutoRaise(True)
        self.toggle.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.toggle.setToolTip(f"Show or hide {title.lower()}")
        self.contents = contents
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.toggle)
        layout.addWidget(contents)
        self.toggle.toggled.connect(self.set_expanded)
        self.toggle.setChecked(expanded)
        self.set_expanded(expanded)

    def set_expanded(self, expanded: bool) -> None:
        self.toggle.blockSignals(True)
        self.toggle.setChecked(expanded)
        self.toggle.blockSignals(False)
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if expanded else Qt.ArrowType.RightArrow)
        self.contents.setVisible(expanded)

    def expanded(self) -> bool:
        return self.toggle.isChecked()


# ---------------------------------------------------------------------------- keyboard shortcuts
def add_shortcut(widget: QWidget, button: QAbstractButton, keys: str) -> QShortcut:
    """``keys`` (e.g. "Shift+S") presses ``button`` while the window the widget is docked in is
    active, wherever the focus is (the canvas included); a disabled button does nothing.  The keys
    are added to the button's tooltip.  Shift and a letter: napari binds none of the ones used."""
    shortcut = QShortcut(QKeySequence(keys), widget)
    shortcut.setContext(Qt.ShortcutContext.WindowShortcut)
    shortcut.activated.connect(button.click)
    tip = button.toolTip()
    button.setToolTip(f"{tip} ({keys})" if tip else keys)
    return shortcut


def shortcut_legend(pairs) -> QLabel:
    """A small line showing the widget's keys: ``[("Shift+S", "segment"), ...]``."""
    label = QLabel("Keys: " + ", ".join(f"<b>{keys}</b> {what}" for keys, what in pairs))
    label.setObjectName("medrwkv-keys")
    label.setWordWrap(True)
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setEnabled(False)                 # drawn in the muted colour of the theme
    return label


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
            if worker is None:          # nothing runs: the user agreed to lose what busy() named
                continue
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
        "Still running or not saved:\n• " + "\n• ".join(jobs) + "\n\nQuit stops them: a fine-tuning keeps and "
        "saves the best model so far; a segmentation in progress is dropped.",
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
