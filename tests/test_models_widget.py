"""The Models tab: the checkpoints users can use, what each is for, and taking a broken file off
the model menus (pytest-qt, Xvfb)."""
import pytest

from conftest import untrained_checkpoint

pytest.importorskip("napari")

from qtpy.QtCore import Qt  # noqa: E402

from napari_medrwkv.plugin import segment_widget, session  # noqa: E402
from napari_medrwkv.plugin.qt_helpers import BROWSE  # noqa: E402

PLUGIN = "napari-medrwkv"


@pytest.fixture(autouse=True)
def fresh_session():
    session.clear()
    yield
    session.clear()


def _rows(models):
    table = models.checkpoints
    return {table.item(r, 0).data(Qt.ItemDataRole.UserRole): (table.item(r, 1).text(), table.item(r, 2).text(),
                                                               table.item(r, 0).text())
            for r in range(table.rowCount())}


def _click_row(qtbot, models, source):
    table = models.checkpoints
    row = models.checkpoint_sources().index(source)
    rect = table.visualItemRect(table.item(row, 1))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())


def _menu(widget):
    return [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]


def test_models_tab_lists_usable_checkpoints_and_takes_a_broken_file_off_the_menus(make_napari_viewer, qtbot,
                                                                                   tmp_path, monkeypatch):
    from napari_medrwkv.models import list_models
    viewer = make_napari_viewer(show=True)
    _, models = viewer.window.add_plugin_dock_widget(PLUGIN, "Models")
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    _, finetune = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    rows = _rows(models)
    # The shipped checkpoints, with what each finds; no untrained architecture among them.
    assert rows["rwkv_unet_t-busi"][:1] == ("shipped",) and "finds lesion" in rows["rwkv_unet_t-busi"][1]
    assert "finds polyp" in rows["rwkv_unet_t-kvasir"][1] and "finds nucleus" in rows["rwkv_unet_t-dsb2018"][1]
    assert not set(rows) & set(list_models())
    assert not models.architectures_section.expanded()

    # A model fine-tuned in this session, as the Fine-tune widget registers it.
    tuned = untrained_checkpoint(tmp_path / "tuned.safetensors")
    session.register(tuned)
    assert _rows(models)[tuned][0] == "fine-tuned here"

    # A damaged file chosen with "Checkpoint file…" in Segment's menu (keyboard: End picks it).
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(segment_widget.QFileDialog, "getOpenFileName", lambda *a, **k: (str(broken), ""))
    segment.model_combo.setFocus()
    qtbot.keyClick(segment.model_combo, Qt.Key.Key_End)
    assert str(broken) in _menu(segment) and str(broken) in _menu(finetune)
    kind, what, shown = _rows(models)[str(broken)]
    assert kind == "file" and what.startswith("cannot be read") and shown.startswith("⚠")

    _click_row(qtbot, models, "rwkv_unet_t-busi")
    assert not models.remove_button.isEnabled()                # shipped models stay
    _click_row(qtbot, models, str(broken))
    assert models.remove_button.isEnabled()
    qtbot.mouseClick(models.remove_button, Qt.MouseButton.LeftButton)
    assert str(broken) not in _rows(models)
    assert str(broken) not in _menu(segment) and str(broken) not in _menu(finetune)
    assert segment.model_combo.currentText() not in ("", BROWSE)
    assert broken.is_file()                                     # off the menus, not deleted
    assert tuned in _menu(segment) and tuned in _rows(models)
