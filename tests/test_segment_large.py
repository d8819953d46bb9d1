"""The Segment widget on lazy, multiscale and large layers (block by block into a zarr store),
in a real napari viewer under Xvfb."""
import numpy as np
import pytest

pytest.importorskip("napari")
zarr = pytest.importorskip("zarr")

from napari_medrwkv.engine.checkpoint import save_checkpoint  # noqa: E402
from napari_medrwkv.plugin import block_segment  # noqa: E402
from napari_medrwkv.plugin.segment_widget import SegmentWidget  # noqa: E402

from conftest import SAMPLES, random_image  # noqa: E402
from test_blocks import tiny_model  # noqa: E402

BLOCK = 128
TILE = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The block tests' tiny model, as a checkpoint file the widget loads."""
    model = tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(model.net, path, model.info, half=False)
    return str(path)


@pytest.fixture
def widget(make_napari_viewer, checkpoint, monkeypatch):
    monkeypatch.setattr(block_segment, "BLOCK", BLOCK)        # small blocks: many of them on a small image
    viewer = make_napari_viewer()
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.add_model_source(checkpoint)
    w.tile_spin.setValue(TILE)
    return w


@pytest.fixture
def errors(monkeypatch):
    from napari_medrwkv.plugin import segment_widget
    seen = []
    monkeypatch.setattr(segment_widget, "show_error", seen.append)
    return seen


def _wait(widget, qtbot, timeout=120000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def _reference(widget, image):
    """(labels of the in-memory path, where they may differ from any other path by float rounding)."""
    import napari_medrwkv as nm
    model = next(iter(widget._models.values()))
    labels, probs = nm.segment(np.asarray(image), model=model, tile=TILE, return_probabilities=True)
    assert 0.2 < labels.mean() < 0.8, "labels of one value test nothing"
    return labels, np.abs(probs - 0.5) < 1e-5


def _assert_equal_where_certain(got, labels, unsure):
    got = np.asarray(got)
    assert got.shape == labels.shape
    assert unsure.mean() < 0.005                   # probabilities spread evenly: 0.1% lie that close
    assert int(((got != labels) & ~unsure).sum()) == 0


def _zarr_image(tmp_path, shape, seed=3, name="image.zarr"):
    array = zarr.open_array(str(tmp_path / name), mode="w", shape=shape, chunks=(256, 256) + shape[2:],
                            dtype=np.uint8)
    array[...] = random_image(shape, seed=seed)
    return array


def _blocks(shape, block=BLOCK):
    return [(slice(r, r + block), slice(c, c + block)) for r in range(0, shape[0], block)
            for c in range(0, shape[1], block)]


def test_a_zarr_layer_fills_a_store_backed_labels_layer_equal_to_the_in_memory_result(widget, qtbot, tmp_path):
    viewer = widget.viewer
    image = _zarr_image(tmp_path, (384, 512))
    viewer.add_image(image, name="slide")
    widget.image_combo.setCurrentText("slide")
    formats = []
    widget.progress_bar.valueChanged.connect(lambda _: formats.append(widget.progress_bar.format()))
    widget.run()
    labels = viewer.layers["slide [tiny]"]                  # shown at once, filled in as blocks finish
    assert isinstance(labels.data, zarr.Array) and labels.data.chunks == (BLOCK, BLOCK)
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    _wait(widget, qtbot)
    assert widget.status.text().startswith("Done: all 12 blocks"), widget.status.text()
    assert formats[-1] == "block 12/12" and "block 1/12" in formats
    _assert_equal_where_certain(labels.data, *_reference(widget, image))
    store = labels.metadata[block_segment.STORE_KEY]
    assert store["temporary"] and zarr.open_array(store["path"], mode="r").shape == (384, 512)
    # the temporary store goes with its layer
    from pathlib import Path
    viewer.layers.remove(labels)
    assert not Path(store["path"]).exists()


def test_cancel_leaves_whole_finished_blocks_and_zeros(widget, qtbot, tmp_path):
    import dask.array as da
    viewer = widget.viewer
    image = da.from_zarr(_zarr_image(tmp_path, (1024, 1024), seed=4))
    viewer.add_image(image, name="dask")
    widget.image_combo.setCurrentText("dask")
    widget.progress_bar.valueChanged.connect(lambda done: done >= 2 and widget.cancel())
    widget.run()
    _wait(widget, qtbot)
    assert widget.status.text().startswith("Cancelled:"), widget.status.text()
    assert widget.run_button.isEnabled()
    got = np.asarray(viewer.layers["dask [tiny]"].data)
    labels, unsure = _reference(widget, image)
    written = 0
    for where in _blocks(got.shape):
        if got[where].any():
            _assert_equal_where_certain(got[where], labels[where], unsure[where])
            written += 1
        else:
            assert labels[where].any()                # every block of the reference holds labels
    assert 2 <= written < len(_blocks(got.shape))


def test_only_the_part_in_view_and_then_more_after_panning(widget, qtbot, monkeypatch):
    viewer = widget.viewer
    image = random_image((1024, 1024), seed=5)
    viewer.add_image(image, name="wide")                  # in memory: the option alone takes the block path
    widget.image_combo.setCurrentText("wide")
    widget._blocks.view_check.setChecked(True)
    asked = []
    monkeypatch.setattr(block_segment.QMessageBox, "question", lambda *a, **k: asked.append(a))

    def look_at(centre, side):
        camera = block_segment._camera(viewer)
        camera.center = centre
        camera.zoom = min(viewer.canvas.size) / side
        # what napari's own canvas says it shows (its multiscale layers load by this), in world pixels
        corners = viewer.window._qt_viewer.canvas._viewbox_corners_in_world[:, -2:]
        return corners.min(0), corners.max(0)

    def in_view(where, low, high):
        return all(s.start < hi and s.stop > lo for s, lo, hi in zip(where, low, high))

    first = look_at((200, 300), 200)
    widget.run()
    _wait(widget, qtbot)
    got = np.asarray(viewer.layers["wide [tiny]"].data)
    assert got.shape == (1024, 1024)
    labels, unsure = _reference(widget, image)
    seen = [where for where in _blocks(got.shape) if in_view(where, *first)]
    assert 0 < len(seen) < 16
    assert f"Done: {len(seen)} of 64 blocks (the part in view" in widget.status.text()
    for where in _blocks(got.shape):
        if where in seen:
            _assert_equal_where_certain(got[where], labels[where], unsure[where])
        else:
            assert not got[where].any()
    second = look_at((850, 800), 200)                     # pan, segment again: into the same store
    widget.run()
    _wait(widget, qtbot)
    assert not asked                                     # nothing there yet: nothing to ask about
    got = np.asarray(viewer.layers["wide [tiny]"].data)
    assert "wide [tiny] (2)" not in viewer.layers
    seen += [where for where in _blocks(got.shape) if in_view(where, *second) and where not in seen]
    for where in _blocks(got.shape):
        assert got[where].any() == (where in seen)
    # the first part again: it holds labels now, so the user is asked (No: a new layer and store)
    look_at((200, 300), 200)
    widget.run()
    _wait(widget, qtbot)
    assert len(asked) == 1 and "wide [tiny] (2)" in viewer.layers


def test_a_multiscale_layer_is_segmented_at_full_resolution_into_a_pyramid(widget, qtbot, tmp_path, monkeypatch):
    monkeypatch.setattr(block_segment, "PYRAMID_SMALLEST", 128)       # 512 -> 256 -> 128: three levels
    viewer = widget.viewer
    full = _zarr_image(tmp_path, (512, 384, 3), seed=6)
    viewer.add_image([full, np.asarray(full)[::2, ::2]], multiscale=True, rgb=True, name="pyramid")
    widget.image_combo.setCurrentText("pyramid")
    widget.probability_check.setChecked(True)
    widget.run()
    _wait(widget, qtbot)
    layer = viewer.layers["pyramid [tiny]"]
    assert layer.multiscale and [level.shape for level in layer.data] == [(512, 384), (256, 192), (128, 96)]
    labels = np.asarray(layer.data[0])
    reference, unsure = _reference(widget, full)
    _assert_equal_where_certain(labels, reference, unsure)
    for k in (1, 2):                                       # each level: every 2^k-th pixel of the full one
        assert np.array_equal(np.asarray(layer.data[k]), labels[::2 ** k, ::2 ** k])
    probs = viewer.layers["pyramid [tiny] probability"].data             # x 255, rounded
    assert probs[0].dtype == np.uint8 and np.array_equal(np.asarray(probs[2]), np.asarray(probs[0])[::4, ::4])
    _assert_equal_where_certain((np.asarray(probs[0]) >= 128).astype(np.uint8), reference, unsure)
    # the two stores share a temporary folder: it goes when both layers are gone
    from pathlib import Path
    store = Path(layer.metadata[block_segment.STORE_KEY]["path"])
    viewer.layers.remove("pyramid [tiny] probability")
    assert np.array_equal(zarr.open_group(str(store), mode="r")["0"][...], labels)
    viewer.layers.remove("pyramid [tiny]")
    assert not store.parent.exists()


def test_a_chosen_store_is_never_replaced_without_asking(widget, qtbot, tmp_path, monkeypatch, errors):
    viewer = widget.viewer
    viewer.add_image(_zarr_image(tmp_path, (256, 256), seed=7), name="img")
    widget.image_combo.setCurrentText("img")
    mine = zarr.open_array(str(tmp_path / "mine.zarr"), mode="w", shape=(8, 8), dtype=np.uint8)
    mine[...] = 9
    widget._blocks.store_edit.setText(str(tmp_path / "mine.zarr"))
    answers = [block_segment.QMessageBox.StandardButton.No]
    monkeypatch.setattr(block_segment.QMessageBox, "question", lambda *a, **k: answers.pop(0))
    widget.run()
    assert widget.worker is None and not answers and "img [tiny]" not in viewer.layers
    assert (zarr.open_array(str(tmp_path / "mine.zarr"), mode="r")[...] == 9).all()
    assert "was kept" in widget.status.text()
    (tmp_path / "notes").mkdir()
    widget._blocks.store_edit.setText(str(tmp_path / "notes"))
    widget.run()
    assert "is not a zarr store" in errors[-1] and widget.worker is None
    widget._blocks.store_edit.setText(str(tmp_path / "result.zarr"))
    widget.run()
    _wait(widget, qtbot)
    saved = zarr.open_array(str(tmp_path / "result.zarr"), mode="r")
    assert saved.shape == (256, 256) and np.array_equal(saved[...], np.asarray(viewer.layers["img [tiny]"].data))
    viewer.layers.remove("img [tiny]")
    assert (tmp_path / "result.zarr").exists()            # the user's store stays


def test_bad_inputs_say_what_to_do(widget, qtbot, tmp_path, errors):
    viewer = widget.viewer
    viewer.add_image(zarr.zeros((2, 3, 64, 64), dtype=np.uint8), name="4d")
    widget.image_combo.setCurrentText("4d")
    widget.run()
    assert "4 spatial dimensions" in errors[-1] and widget.worker is None
    viewer.add_image(_zarr_image(tmp_path, (256, 256)), name="lazy")
    widget.image_combo.setCurrentText("lazy")
    widget.window_combo.setCurrentIndex(1)                 # a CT window
    widget.run()
    assert "CT windows work on images held in memory" in errors[-1] and widget.worker is None
    widget.window_combo.setCurrentIndex(0)
    widget._blocks.view_check.setChecked(True)
    block_segment._camera(viewer).center = (5000, 5000)
    widget.run()
    assert "The view shows none of lazy" in errors[-1]
    assert not any(layer.name.startswith("lazy [") for layer in viewer.layers)


def test_a_lazy_stack_by_slice_and_an_image_past_the_memory_share(widget, qtbot, tmp_path, monkeypatch):
    viewer = widget.viewer
    stack = zarr.open_array(str(tmp_path / "stack.zarr"), mode="w", shape=(3, 256, 256), chunks=(1, 256, 256),
                            dtype=np.uint8)
    stack[...] = random_image((3, 256, 256), seed=8)
    viewer.add_image(stack, name="stack")
    viewer.dims.set_current_step(0, 1)
    widget.image_combo.setCurrentText("stack")
    widget.run()                                          # the current slice: that plane alone
    _wait(widget, qtbot)
    got = np.asarray(viewer.layers["stack [tiny]"].data)
    assert got.shape == (3, 256, 256) and viewer.layers["stack [tiny]"].data.chunks == (1, BLOCK, BLOCK)
    labels, unsure = _reference(widget, stack)
    _assert_equal_where_certain(got[1], labels[1], unsure[1])
    assert not got[0].any() and not got[2].any()
    widget.scope_combo.setCurrentText("all slices")        # plane 1 holds labels: asked, Yes writes over
    asked = []
    monkeypatch.setattr(block_segment.QMessageBox, "question",
                        lambda *a, **k: asked.append(a) or block_segment.QMessageBox.StandardButton.Yes)
    widget.run()
    _wait(widget, qtbot)
    assert len(asked) == 1 and [layer.name for layer in viewer.layers] == ["stack", "stack [tiny]"]
    _assert_equal_where_certain(viewer.layers["stack [tiny]"].data, labels, unsure)
    # An image in memory goes the block path when its in-memory segmentation would not fit.
    image = random_image((256, 256), seed=9)
    viewer.add_image(image, name="plain")
    widget.image_combo.setCurrentText("plain")
    widget.run()
    _wait(widget, qtbot)
    assert isinstance(viewer.layers["plain [tiny]"].data, np.ndarray)        # it fits: in memory, as ever
    viewer.layers.remove("plain [tiny]")
    monkeypatch.setattr(block_segment, "MEMORY_SHARE", 1e-6)
    widget.run()
    _wait(widget, qtbot)
    assert isinstance(viewer.layers["plain [tiny]"].data, zarr.Array)
    _assert_equal_where_certain(viewer.layers["plain [tiny]"].data, *_reference(widget, image))


def test_removing_the_layer_while_it_fills_stops_the_run_and_removes_its_store(widget, qtbot, tmp_path):
    from pathlib import Path
    viewer = widget.viewer
    viewer.add_image(_zarr_image(tmp_path, (1024, 1024), seed=11), name="gone")
    widget.image_combo.setCurrentText("gone")
    widget.run()
    layer = viewer.layers["gone [tiny]"]
    store = Path(layer.metadata[block_segment.STORE_KEY]["path"])
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 1, timeout=120000)
    viewer.layers.remove(layer)
    _wait(widget, qtbot)
    assert widget.status.text().startswith("Cancelled:") and widget.progress_bar.value() < 64
    assert not store.parent.exists()                      # not half made again by a block written late


def test_the_part_in_view_of_a_scaled_multiscale_layer(widget, qtbot, tmp_path, monkeypatch):
    """World to image pixels through the layer's scale and translation; the pyramid follows."""
    monkeypatch.setattr(block_segment, "PYRAMID_SMALLEST", 256)
    viewer = widget.viewer
    full = _zarr_image(tmp_path, (1024, 768), seed=12)
    viewer.add_image([full, np.asarray(full)[::2, ::2]], multiscale=True, name="wsi", scale=(0.5, 0.5),
                     translate=(100, -50))
    widget.image_combo.setCurrentText("wsi")
    widget._blocks.view_check.setChecked(True)
    camera = block_segment._camera(viewer)
    camera.center = (100 + 0.5 * 700, -50 + 0.5 * 200)    # the world position of image pixel (700, 200)
    camera.zoom = min(viewer.canvas.size) / 60             # about 120 image pixels across
    corners = viewer.window._qt_viewer.canvas._viewbox_corners_in_world[:, -2:]
    low, high = (corners.min(0) - (100, -50)) / 0.5, (corners.max(0) - (100, -50)) / 0.5
    widget.run()
    _wait(widget, qtbot)
    layer = viewer.layers["wsi [tiny]"]
    assert layer.multiscale and np.allclose(layer.scale, (0.5, 0.5)) and np.allclose(layer.translate, (100, -50))
    got = np.asarray(layer.data[0])
    labels, unsure = _reference(widget, full)
    seen = [w for w in _blocks(got.shape) if all(s.start < hi and s.stop > lo for s, lo, hi in zip(w, low, high))]
    assert 0 < len(seen) <= 9 and (slice(640, 768), slice(128, 256)) in seen
    for where in _blocks(got.shape):
        if where in seen:
            _assert_equal_where_certain(got[where], labels[where], unsure[where])
        else:
            assert not got[where].any()
    assert np.array_equal(np.asarray(layer.data[1]), got[::2, ::2])


def test_the_temporary_store_is_saved_as_a_zarr_store_chunk_by_chunk(widget, qtbot, tmp_path, monkeypatch):
    monkeypatch.setattr(block_segment, "PYRAMID_SMALLEST", 128)
    viewer = widget.viewer
    image = _zarr_image(tmp_path, (384, 256), seed=13)
    viewer.add_image(image, name="flat")
    viewer.add_image([image, np.asarray(image)[::2, ::2]], multiscale=True, name="levels")
    for name in ("flat", "levels"):
        widget.image_combo.setCurrentText(name)
        widget.run()
        _wait(widget, qtbot)
    flat, levels = viewer.layers["flat [tiny]"], viewer.layers["levels [tiny]"]
    viewer.layers.selection = {flat}
    path = tmp_path / "kept.zarr"
    assert viewer.layers.save(str(path), selected=True, plugin="napari-medrwkv") == [str(path)]
    saved = zarr.open_array(str(path), mode="r")
    assert saved.chunks == (BLOCK, BLOCK) and np.array_equal(saved[...], np.asarray(flat.data))
    assert saved.attrs["napari_medrwkv"]["name"] == "flat [tiny]"
    with pytest.raises(Exception, match="already exists"):
        viewer.layers.save(str(path), selected=True, plugin="napari-medrwkv")
    viewer.layers.selection = {levels}
    path = tmp_path / "pyramid.zarr"
    viewer.layers.save(str(path), selected=True, plugin="napari-medrwkv")
    group = zarr.open_group(str(path), mode="r")
    for k in range(3):
        assert np.array_equal(group[str(k)][...], np.asarray(levels.data[k]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no partial folder left


def test_the_part_in_view_of_the_current_slice_of_an_rgb_stack(widget, qtbot, tmp_path):
    viewer = widget.viewer
    stack = zarr.open_array(str(tmp_path / "rgb.zarr"), mode="w", shape=(2, 512, 512, 3), chunks=(1, 256, 256, 3),
                            dtype=np.uint8)
    stack[...] = random_image((2, 512, 512, 3), seed=14)
    viewer.add_image(stack, rgb=True, name="rgb")
    viewer.dims.set_current_step(0, 1)
    widget.image_combo.setCurrentText("rgb")
    widget._blocks.view_check.setChecked(True)
    camera = block_segment._camera(viewer)
    camera.center = (400, 100)
    camera.zoom = min(viewer.canvas.size) / 100
    corners = viewer.window._qt_viewer.canvas._viewbox_corners_in_world[:, -2:]
    low, high = corners.min(0), corners.max(0)
    widget.run()
    _wait(widget, qtbot)
    got = np.asarray(viewer.layers["rgb [tiny]"].data)
    assert got.shape == (2, 512, 512) and not got[0].any()
    labels, unsure = _reference(widget, stack)
    seen = [w for w in _blocks(got.shape[1:]) if all(s.start < hi and s.stop > lo for s, lo, hi in zip(w, low, high))]
    assert 0 < len(seen) <= 4 and (slice(384, 512), slice(0, 128)) in seen
    for where in _blocks(got.shape[1:]):
        if where in seen:
            _assert_equal_where_certain(got[1][where], labels[1][where], unsure[1][where])
        else:
            assert not got[1][where].any()


def test_an_instance_model_fills_the_store_with_one_id_per_nucleus(widget, qtbot, tmp_path):
    """The block path with an instance model: uint32 ids, the in-memory path's objects."""
    import napari_medrwkv as nm
    from napari_medrwkv.engine.imageio import read_image
    from napari_medrwkv.engine.model import with_instances
    from test_block_instances import assert_same_objects
    model = with_instances(nm.load_model("rwkv_unet_t-dsb2018", device="cpu"), "distance")
    path = tmp_path / "nuclei.safetensors"
    save_checkpoint(model.net, path, model.info, half=False)
    nuclei = np.tile(read_image(SAMPLES / "nuclei_fluorescence.png"), (2, 2, 1))[:300, :340]
    image = zarr.open_array(str(tmp_path / "nuclei.zarr"), mode="w", shape=nuclei.shape, chunks=(128, 128, 3),
                            dtype=np.uint8)
    image[...] = nuclei
    widget.add_model_source(str(path))
    widget.viewer.add_image(image, name="nuclei", rgb=True)
    widget.image_combo.setCurrentText("nuclei")
    widget.run()
    _wait(widget, qtbot)
    assert widget.status.text().startswith("Done"), widget.status.text()
    labels = widget.viewer.layers["nuclei [nuclei]"].data
    assert labels.dtype == np.uint32
    whole, probs = nm.segment(nuclei, model, tile=TILE, return_probabilities=True)
    assert whole.max() > 50
    assert_same_objects(labels, whole, np.abs(probs - 0.5) < 1e-4)
