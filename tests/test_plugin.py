"""The napari plugin: manifest, lazy torch import, sample data, Models widget, launch smoke test.

Needs a display: pytest-xvfb starts Xvfb (napari's OpenGL canvas does not run
with QT_QPA_PLATFORM=offscreen).
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("npe2")

PLUGIN = "napari-medrwkv"
MANIFEST = Path(__file__).resolve().parents[1] / "napari_medrwkv" / "plugin" / "napari.yaml"


def _run_python(code: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, encoding="utf-8",
                          timeout=timeout, env=dict(os.environ), **kwargs)


# --------------------------------------------------------------------------- Qt binding
@pytest.mark.skipif("MEDRWKV_QT" not in os.environ, reason="MEDRWKV_QT unset: any binding qtpy finds")
def test_runs_under_the_qt_binding_asked_for():
    # scripts/test.sh with MEDRWKV_QT=pyqt6 must test PyQt6 (napari 0.9's default), not
    # silently fall back to PyQt5.
    import qtpy

    assert qtpy.API_NAME == {"pyqt5": "PyQt5", "pyqt6": "PyQt6"}[os.environ["MEDRWKV_QT"]]


# --------------------------------------------------------------------------- manifest
def test_manifest_validates():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)  # pydantic validation on load
    assert manifest.name == PLUGIN
    assert manifest.display_name == "MedRWKV"
    contributions = manifest.contributions
    assert [w.display_name for w in contributions.widgets] == ["Segment", "Correct", "Fine-tune", "Click to fix",
                                                               "Models"]
    assert contributions.widgets[3].command == "napari-medrwkv.click_to_fix_widget"
    assert contributions.widgets[4].command == "napari-medrwkv.models_widget"
    assert sorted(s.key for s in contributions.sample_data) == ["brightfield", "fluorescence"]
    segment_menu = contributions.menus["napari/layers/segment"]
    assert [item.command for item in segment_menu] == [
        "napari-medrwkv.segment_widget", "napari-medrwkv.correct_widget", "napari-medrwkv.finetune_widget",
        "napari-medrwkv.click_to_fix_widget", "napari-medrwkv.models_widget"]

    # the CLI, by file and by installed plugin name (the entry point), importing every python_name
    for target in (str(MANIFEST), PLUGIN):
        proc = subprocess.run([sys.executable, "-m", "npe2", "validate", target, "--imports"],
                              capture_output=True, text=True, encoding="utf-8", timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "valid" in proc.stdout


def test_plugin_modules_and_manifest_do_not_import_torch():
    proc = _run_python(f"""
        import sys
        from npe2 import PluginManager, PluginManifest

        manifest = PluginManifest.from_file({str(MANIFEST)!r})
        manifest.validate_imports()
        pm = PluginManager()
        pm.discover()
        assert pm.get_manifest({PLUGIN!r}).display_name == "MedRWKV"
        import napari_medrwkv.plugin.models_widget, napari_medrwkv.plugin.segment_widget, napari_medrwkv.plugin.sample_data
        import napari_medrwkv.plugin.correct_widget, napari_medrwkv.plugin.finetune_widget, napari_medrwkv.plugin.writers
        import napari_medrwkv.plugin.launch, napari_medrwkv.plugin.click_to_fix, napari_medrwkv
        print("torch imported:", "torch" in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "torch imported: False" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- sample data
@pytest.mark.parametrize("key, shape, rgb", [
    ("fluorescence", (256, 256), False),
    ("brightfield", (256, 320, 3), True),
])
def test_open_sample(make_napari_viewer, key, shape, rgb):
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, key)
    assert [layer._type_string for layer in layers] == ["image", "labels"]
    image, labels = layers
    assert image.data.shape == shape
    assert image.data.dtype == np.uint8
    assert image.rgb is rgb
    assert image.data.max() > image.data.min()
    assert labels.name == f"{image.name} ground truth"
    assert labels.data.shape == shape[:2]
    assert np.issubdtype(labels.data.dtype, np.integer)
    assert labels.data.max() > 10  # many nuclei
    assert len(np.unique(labels.data)) - 1 == labels.data.max()  # instance ids 1..N


def test_sample_functions_are_plain_layer_data():
    from napari_medrwkv.plugin import sample_data

    for fn in (sample_data.nuclei_fluorescence, sample_data.nuclei_brightfield):
        (image, image_kwargs, image_type), (labels, labels_kwargs, labels_type) = fn()
        assert (image_type, labels_type) == ("image", "labels")
        assert labels_kwargs["name"] == image_kwargs["name"] + " ground truth"
        assert labels.dtype == np.uint16 and labels.shape == image.shape[:2]
        if image.ndim == 3:  # RGB only when the channels actually differ
            assert image_kwargs["rgb"] is True
            assert not np.array_equal(image[..., 0], image[..., 1])
        else:
            assert image_kwargs["rgb"] is False


# --------------------------------------------------------------------------- Models widget
def test_models_widget_lists_every_model(make_napari_viewer, qtbot):
    from napari_medrwkv.plugin.models_widget import ModelsWidget
    from napari_medrwkv.models import list_models

    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Models")
    assert isinstance(widget, ModelsWidget)
    qtbot.waitUntil(lambda: widget.done, timeout=60000)

    table = widget.table
    names = [table.item(row, 0).text() for row in range(table.rowCount())]
    assert names == list_models()
    assert len(names) >= 3
    for row, name in enumerate(names):
        assert table.item(row, 1).text() not in ("", "?"), name
        assert float(table.item(row, 2).text()) > 0, name
    counts = widget.parameter_counts()
    assert set(counts) == set(names)
    assert all(isinstance(n, int) and n > 0 for n in counts.values()), counts

    status = widget.status.text()
    assert "Bi-WKV path:" in status and "CUDA available:" in status
    import torch
    if not torch.cuda.is_available():
        assert "torch (CPU)" in status


# --------------------------------------------------------------------------- launcher
@pytest.mark.slow
def test_launch_screenshot_smoke(tmp_path):
    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, "-m", "napari_medrwkv.plugin.launch", "--screenshot", str(shot)],
                          capture_output=True, text=True, encoding="utf-8", timeout=240, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Done: nuclei fluorescence [rwkv_unet_t-dsb2018]" in proc.stdout    # the model suggested for nuclei
    assert shot.is_file()

    from skimage.io import imread

    pixels = imread(str(shot))
    assert pixels.ndim == 3
    height, width = pixels.shape[:2]
    assert width > 800 and height > 500, pixels.shape
    flat = pixels[..., :3].reshape(-1, 3)
    assert len(np.unique(flat[:: max(1, len(flat) // 20000)], axis=0)) > 50  # not one colour
