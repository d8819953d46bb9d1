"""The widgets fit a 1920×1080 window in any docking, and no control is squashed (pytest-qt, Xvfb).

Docked below each other (napari's default) the three widgets used to need a window 1,544 px
tall, pushing Fine-tune's buttons and napari's status bar off a 1080-px screen; two of them
squashed Correct's spin boxes until "20 px" read "20 p".
"""
import time

import pytest

pytest.importorskip("napari")

from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtWidgets import QAbstractSpinBox, QApplication, QPushButton, QScrollArea  # noqa: E402

PLUGIN = "napari-medrwkv"
WIDGETS = ("Segment", "Correct", "Fine-tune")


def _settle():
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.01)


def _dock(viewer, names, area="right", tabify=False):
    widgets = [viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=tabify)[1] for name in names]
    if area != "right":
        for dock in list(viewer.window._dock_widgets.values()):
            if dock.widget() in widgets or getattr(dock, "inner_widget", None) in widgets:
                viewer.window._qt_window.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, dock)
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(1920, 1080)
    _settle()
    return window, widgets


def _nothing_cut(widget):
    """Every spin box shows its whole text, every button its whole label."""
    for spin in widget.findChildren(QAbstractSpinBox):
        if not spin.isVisibleTo(widget):
            continue
        edit = spin.findChild(type(spin.lineEdit()))
        text = spin.text()
        room = edit.contentsRect().width() if edit is not None else spin.width()
        assert edit.fontMetrics().horizontalAdvance(text) <= room, (type(widget).__name__, text, room)
    for button in widget.findChildren(QPushButton):
        if button.isVisibleTo(widget) and button.text():
            need = button.fontMetrics().horizontalAdvance(button.text())
            assert button.width() >= need, (type(widget).__name__, button.text(), button.width(), need)


def _reachable(widget, control):
    """``control`` can be scrolled into view inside ``widget``."""
    area = widget.findChild(QScrollArea, "medrwkv-scroll")
    assert area is not None, f"{type(widget).__name__} does not scroll"
    area.ensureWidgetVisible(control)
    _settle()
    top_left = control.mapTo(area.viewport(), control.rect().topLeft())
    bottom_right = control.mapTo(area.viewport(), control.rect().bottomRight())
    assert area.viewport().rect().contains(top_left) and area.viewport().rect().contains(bottom_right), \
        (type(widget).__name__, control.text() if hasattr(control, "text") else control, area.viewport().size(),
         area.widget().size(), area.widget().minimumSizeHint(), control.size(), area.horizontalScrollBar().value())


@pytest.mark.parametrize("names, area, tabify", [
    (WIDGETS, "right", False),                      # napari's default: below each other
    (WIDGETS[1:], "right", False),                  # Correct and Fine-tune
    (WIDGETS, "left", False),                       # on the other side
    (WIDGETS, "right", True),                       # tabbed
])
def test_the_widgets_fit_a_1080_px_screen(make_napari_viewer, names, area, tabify):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "fluorescence")
    window, widgets = _dock(viewer, names, area, tabify)
    assert window.height() <= 1080, f"the window needs {window.height()} px"
    status_bar = window.statusBar()
    assert status_bar.isVisible() and status_bar.geometry().bottom() < window.height()
    for widget in widgets:
        if not widget.isVisible():                  # a tab behind another
            continue
        # Shared out: on the right each shows most of itself, not one all and the others a sliver.
        assert widget.height() >= (200 if area == "right" else 90), (type(widget).__name__, widget.height())
        _nothing_cut(widget)
        _reachable(widget, widget.run_button if hasattr(widget, "run_button") else widget.mark_button)
    fine_tune = next((w for w in widgets if hasattr(w, "save_pairs_button")), None)
    if fine_tune is not None and fine_tune.isVisible():
        _reachable(fine_tune, fine_tune.save_pairs_button)


def test_fine_tune_settings_fold_away_and_open_with_a_click(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    _, (widget,) = _dock(viewer, ["Fine-tune"])
    section = widget.settings_section
    assert not section.expanded() and not widget.lr_spin.isVisible()
    assert widget.minutes_spin.isVisible()             # the budget stays at hand
    qtbot.mouseClick(section.toggle, Qt.MouseButton.LeftButton)
    _settle()
    assert section.expanded() and widget.lr_spin.isVisible() and widget.folder_edit.isVisible()
    qtbot.mouseClick(section.toggle, Qt.MouseButton.LeftButton)
    assert not widget.lr_spin.isVisible()
