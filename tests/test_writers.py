"""napari writers: labels as PNG, image + labels as a training folder."""
import numpy as np
import pytest

pytest.importorskip("napari")

from napari_medrwkv.engine.datasets import find_pairs  # noqa: E402
from napari_medrwkv.engine.imageio import read_image, read_mask  # noqa: E402

PLUGIN = "napari-medrwkv"


def test_labels_png_round_trip_and_no_overwrite(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _, truth = viewer.open_sample(PLUGIN, "fluorescence")
    path = tmp_path / "nuclei.png"
    viewer.layers.selection = {truth}
    assert viewer.layers.save(str(path), selected=True, plugin=PLUGIN) == [str(path)]
    assert np.array_equal(read_mask(path, 200), truth.data)        # instance ids survive
    before = path.read_bytes()
    with pytest.raises(Exception, match="already exists"):
        viewer.layers.save(str(path), selected=True, plugin=PLUGIN)
    assert path.read_bytes() == before


def test_stack_cannot_be_a_png(tmp_path):
    from napari_medrwkv.plugin.writers import write_labels_png
    with pytest.raises(ValueError, match="Save stacks as .tif"):
        write_labels_png(str(tmp_path / "s.png"), np.zeros((2, 8, 8), dtype=np.uint8), {})
    assert not (tmp_path / "s.png").exists()


def test_training_folder_is_readable_by_the_engine(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    image, truth = viewer.open_sample(PLUGIN, "brightfield")
    viewer.layers.selection = {image, truth}
    folder = tmp_path / "dataset"
    written = viewer.layers.save(str(folder), selected=True, plugin=PLUGIN)
    assert len(written) == 2
    (pair,) = find_pairs(folder)
    assert np.array_equal(read_image(pair.image), image.data)
    assert np.array_equal(read_mask(pair.mask, 1), (truth.data > 0).astype(np.int64))
    with pytest.raises(Exception, match="already exists"):
        viewer.layers.save(str(folder), selected=True, plugin=PLUGIN)
