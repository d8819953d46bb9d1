"""MedRWKV becomes napari's reader for scans once, without overriding a reader the user chose:
napari's built-in reader claims the same files, and npe2 cannot rank readers."""
import numpy as np
import pytest

pytest.importorskip("napari")
sitk = pytest.importorskip("SimpleITK")

from napari.settings import NapariSettings  # noqa: E402

from napari_medrwkv.plugin.reader_preference import PLUGIN, prefer_scan_reader, scan_patterns  # noqa: E402


def test_scan_patterns_get_medrwkv_once_and_a_users_choice_stays(tmp_path):
    settings = NapariSettings(None)                            # not saved anywhere
    settings.plugins.extension2reader = {"*.nrrd": "napari"}     # the user chose napari's own for NRRD
    marker = tmp_path / "marker.json"
    assert scan_patterns() == ["*.nii", "*.nii.gz", "*.nrrd", "*.nhdr", "*.mha", "*.mhd", "*.dcm"]
    assert prefer_scan_reader(settings, marker) == ["*.nii", "*.nii.gz", "*.nhdr", "*.mha", "*.mhd", "*.dcm"]
    chosen = settings.plugins.extension2reader
    assert chosen["*.nrrd"] == "napari" and chosen["*.nii.gz"] == PLUGIN and chosen["*.dcm"] == PLUGIN
    # The user removes a preference later (Preferences > Plugins): it is not set again.
    settings.plugins.extension2reader = {k: v for k, v in chosen.items() if k != "*.nii.gz"}
    assert prefer_scan_reader(settings, marker) == []
    assert "*.nii.gz" not in settings.plugins.extension2reader
    # Fresh settings (another profile), same user: only what was never set before (NRRD, the user's then).
    assert prefer_scan_reader(NapariSettings(None), marker) == ["*.nrrd"]


def test_after_the_segment_widget_opened_a_scan_opens_with_medrwkv_without_asking(make_napari_viewer, tmp_path,
                                                                                    monkeypatch):
    from napari.errors import MultipleReaderError
    from napari.settings import get_settings
    from napari_medrwkv.engine.scans import METADATA_KEY
    from napari_medrwkv.plugin.segment_widget import SegmentWidget
    monkeypatch.setenv("MEDRWKV_CONFIG_DIR", str(tmp_path / "config"))
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    image.SetSpacing((0.5, 0.5, 3.0))
    sitk.WriteImage(image, str(tmp_path / "head.nii.gz"))
    viewer = make_napari_viewer()
    settings = get_settings()
    before = dict(settings.plugins.extension2reader)
    try:
        settings.plugins.extension2reader = {}
        # plugin=None is what File > Open and drag and drop do: the preference decides, else napari asks.
        with pytest.raises(MultipleReaderError):                 # napari's own reader claims it too: napari asks
            viewer.open(str(tmp_path / "head.nii.gz"), plugin=None)
        viewer.window.add_dock_widget(SegmentWidget(viewer))
        [layer] = viewer.open(str(tmp_path / "head.nii.gz"), plugin=None)
        assert METADATA_KEY in layer.metadata
        np.testing.assert_allclose(layer.scale, (3.0, 0.5, 0.5))
    finally:
        settings.plugins.extension2reader = before
