"""The Segment widget on images too large to hold: block by block into a zarr store.

A lazy layer (Dask or zarr data, a memory map), a multiscale one (its full-resolution level),
one whose in-memory segmentation would not fit the available memory, or any layer when "only
the part in view" is ticked, is segmented by :func:`.engine.blocks.iter_blocks` into a zarr
store.  The store is shown at once as a Labels layer backed by it, refreshed on the GUI thread
as each block is written; Cancel stops before the next tile and leaves the finished blocks.
"Only the part in view" runs the blocks the canvas shows (snapped outward to whole blocks) into
the same full-size store, so that the user can pan and segment more.

The store is a temporary folder, removed when its layer is removed or Python exits (save the
layer to keep it), or a path the user names; an existing store is never replaced, nor labels
already in a store written over, without asking.
"""
import atexit
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
from napari.qt.threading import thread_worker
from qtpy.QtWidgets import QCheckBox, QFileDialog, QHBoxLayout, QLineEdit, QMessageBox, QPushButton, QWidget

from ..engine.scans import METADATA_KEY as SCAN_GEOMETRY
from .qt_helpers import connect_while_alive
from .review import link

#: Side of a block (one zarr chunk) of the stores made here; a task may span several (a tile's side).
BLOCK = 512
#: Where a store-backed layer keeps its store: {"path": str, "temporary": bool}.
STORE_KEY = "napari_medrwkv_store"
#: An in-memory segmentation may take at most this share of the memory the system says is available.
MEMORY_SHARE = 0.5
#: A multiscale image's labels get a pyramid of their own, each level half the one above (nearest
#: pixel), down to this side: napari then reads only what the canvas shows, at its zoom.
PYRAMID_SMALLEST = 1024

_TEMPORARY = set()             # folders made here, removed with their layer or when Python exits


@atexit.register
def _remove_temporary() -> None:
    for folder in list(_TEMPORARY):
        shutil.rmtree(folder, ignore_errors=True)
    _TEMPORARY.clear()


def wants_blocks(layer, in_view: bool) -> bool:
    """Whether ``layer`` is segmented block by block into a store (else in memory, as before)."""
    data = layer.data
    if in_view or layer.multiscale or isinstance(data, np.memmap) or not isinstance(data, np.ndarray):
        return True
    return in_memory_bytes(data.shape, layer.rgb) > MEMORY_SHARE * _available_bytes()


def in_memory_bytes(shape, rgb: bool, classes: int = 1) -> int:
    """About what the in-memory path holds for an image of ``shape``: float32 probabilities of
    every plane, and a plane's network input (3 channels), blend weights and labels."""
    spatial = tuple(shape[:-1] if rgb else shape)
    plane = int(np.prod(spatial[-2:]))
    return int(np.prod(spatial)) * 4 * classes + plane * (4 * 3 + 4 + 4 * classes + 1)


def _available_bytes() -> int:
    from ..engine.tiling import _free_bytes          # what the tile budget is a share of
    return _free_bytes("cpu")


def view_region(viewer, layer, plane_shape):
    """((row start, stop), (column start, stop)) of the full-resolution pixels of ``layer`` that the
    canvas shows, from the camera (centre, zoom) and the canvas size."""
    dims = viewer.dims
    if dims.ndisplay != 2:
        raise ValueError("'only the part in view' works in the 2D view; switch the viewer to 2D first.")
    displayed = list(dims.displayed)
    if displayed != [dims.ndim - 2, dims.ndim - 1]:
        raise ValueError("'only the part in view' needs the image's rows and columns on screen; reset the "
                         "axis order (the viewer's transpose and roll buttons) first.")
    camera = _camera(viewer)
    half = np.asarray(viewer.canvas.size, float) / camera.zoom / 2
    centre = np.asarray(camera.center, float)[-2:]
    corners = []
    for dy in (-1, 1):
        for dx in (-1, 1):
            point = np.asarray(dims.point, float)
            point[-2:] = centre + half * (dy, dx)
            corners.append(np.asarray(layer.world_to_data(point), float)[-2:])     # (row, column), rgb or not
    low = np.floor(np.min(corners, axis=0)).astype(int)
    high = np.ceil(np.max(corners, axis=0)).astype(int)
    low, high = np.maximum(low, 0), np.minimum(high, plane_shape)
    if np.any(high <= low):
        raise ValueError(f"The view shows none of {layer.name}; pan or zoom to the part to segment.")
    return (int(low[0]), int(high[0])), (int(low[1]), int(high[1]))


def _camera(viewer):
    scene = getattr(viewer, "scene", None)         # napari 0.9 moved it there
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


class BlockSegmenter:
    """The Segment widget's block-by-block runs: its controls, stores, worker and result layers."""

    def __init__(self, widget):
        self.widget = widget
        self.view_check = QCheckBox("only the part in view")
        self.view_check.setToolTip("Segment only the part of the image the canvas shows (whole blocks of "
                                   f"{BLOCK} px), into a zarr store that panning and segmenting again adds to")
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("temporary (save the layer to keep it)")
        self.store_edit.setToolTip("The zarr store that large, lazy or multiscale images are segmented into, "
                                   "block by block; an existing one is replaced only if you agree")
        browse = QPushButton("…")
        browse.setToolTip("Choose where the labels' zarr store goes")
        browse.clicked.connect(self._choose_store)
        self.store_row = QWidget()
        row = QHBoxLayout(self.store_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.store_edit)
        row.addWidget(browse)
        self.running = None               # the _Run in progress
        self.temporary = set()            # temporary folders made for this viewer's layers
        connect_while_alive(widget, widget.viewer.layers.events.removed, self._on_removed)

    def _choose_store(self):
        path, _ = QFileDialog.getSaveFileName(self.widget, "Zarr store for the labels", "", "Zarr stores (*.zarr)")
        if path:
            self.store_edit.setText(path if path.endswith(".zarr") else path + ".zarr")

    def wanted(self, image_layer) -> bool:
        in_view = self.view_check.isChecked()
        if _acquired_axis(image_layer) and not in_view:
            return False                 # a scan (in memory) is segmented in its acquired planes
        return wants_blocks(image_layer, in_view)

    # ------------------------------------------------------------------ starting
    def run(self, image_layer, source: str) -> None:
        """Check the input, find or make the store and its layer, start the worker (GUI thread)."""
        from ..engine.model import read_model_info, resolve_device
        if importlib.util.find_spec("zarr") is None:
            raise ValueError("Segmenting a large, lazy or multiscale image (or the part in view) needs zarr: "
                             "pip install 'napari-medrwkv[scale]'")
        w = self.widget
        info = read_model_info(source)
        choices = w.inference_choices()
        if "window" in choices:
            raise ValueError("CT windows work on images held in memory; this image is segmented block by block: "
                             "choose Intensities: each slice's range.")
        if _acquired_axis(image_layer):
            raise ValueError(f"{image_layer.name} is a scan; it is segmented in memory in its acquired planes: "
                             "untick 'only the part in view'.")
        data = image_layer.data[0] if image_layer.multiscale else image_layer.data
        spatial = data.ndim - (1 if image_layer.rgb else 0)
        if spatial not in (2, 3):
            raise ValueError(f"{image_layer.name} has {spatial} spatial dimensions {tuple(data.shape)}; the Segment "
                             "widget handles 2D images and 3D stacks (Z, Y, X). Split the other axes into layers "
                             "first.")
        if np.dtype(data.dtype).kind not in "biuf":
            raise ValueError(f"{image_layer.name} has pixel type {data.dtype}; Segment takes real numbers "
                             "(integers or floats).")
        shape = tuple(int(s) for s in data.shape[:spatial])
        planes = None
        if spatial == 3 and w.scope_combo.currentText() != "all slices":
            planes = [min(max(int(w.viewer.dims.current_step[w.viewer.dims.ndim - 3]), 0), shape[0] - 1)]
        rows = cols = None
        if self.view_check.isChecked():
            rows, cols = view_region(w.viewer, image_layer, shape[-2:])
        classes = info.num_classes if info is not None else 1
        tile = w.tile_spin.value() or None
        unit = BLOCK if info is None else _task_side(shape[-2:], info, resolve_device(w.device_combo.currentText()),
                                                      tile)
        from ..engine.blocks import plane_regions, task_regions
        every = task_regions(plane_regions(shape[-2:], shape[0] if spatial == 3 else 1, unit), planes)
        tasks = task_regions(every, planes, rows, cols)
        name = f"{image_layer.name} [{Path(source).stem if source.endswith('.safetensors') else source}]"
        levels = pyramid_levels(shape) if image_layer.multiscale else 1
        # An instance model's object ids: uint32, as many as a whole slide holds (a store's type is fixed).
        dtype = np.uint32 if info is not None and info.instances else np.uint8 if classes <= 256 else np.int32
        target = self._labels_target(name, shape, dtype, image_layer, tasks, levels)
        if target is None:
            return
        labels, layer, made = target
        probs, prob_layer = None, None
        if w.probability_check.isChecked() and classes == 1:
            probs, prob_layer = self._probability_target(f"{layer.name} probability", shape, image_layer,
                                                         Path(_store_of(layer)), levels)
        run = _Run(image_layer, source, layer, prob_layer, made, len(tasks), len(every))
        self.running = run
        w._cancel.clear()
        w._set_running(True)
        w.progress_bar.setMaximum(len(tasks))
        w.progress_bar.setFormat(f"block 0/{len(tasks)}")
        w.status.setText(f"Segmenting {image_layer.name} with {source}, block by block into {_store_of(layer)}…")
        worker = self._make_worker(data, source, w.device_combo.currentText(), tile, image_layer.rgb, choices,
                                   labels if probs is None else (labels, probs), planes, rows, cols)
        worker.yielded.connect(lambda step: self._on_block(step, run))
        worker.returned.connect(lambda outcome: self._on_outcome(outcome, run))
        worker.finished.connect(w._on_finished)
        w.worker = worker
        worker.start()

    def _labels_target(self, name, shape, dtype, image_layer, tasks, levels: int):
        """(zarr arrays (full resolution first), their Labels layer, whether made now) to write into,
        or None when the user stops."""
        w = self.widget
        chosen = self.store_edit.text().strip()
        layer = w.viewer.layers[name] if name in w.viewer.layers else None
        store = _store_of(layer) if layer is not None else None
        if layer is not None and store is not None and _full(layer).shape == shape and \
                (not chosen or Path(chosen).expanduser().resolve() == Path(store).resolve()):
            if not _holds_labels(_full(layer), tasks) or self._confirm_write_over(layer.name):
                return _levels_of(layer), layer, False
            name = w._free_name(name)
        elif layer is not None:
            name = w._free_name(name)                # other labels under this name: never replaced
        path = self._new_store_path(chosen, name)
        if path is None:
            return None
        labels = _open_store(path, shape, dtype, levels)
        # A scan's geometry goes with its labels, as in SegmentWidget._new_labels.
        geometry = {key: image_layer.metadata[key] for key in (SCAN_GEOMETRY,) if key in image_layer.metadata}
        layer = w.viewer.add_labels(labels if len(labels) > 1 else labels[0], name=name,
                                    multiscale=len(labels) > 1, scale=image_layer.scale[-len(shape):],
                                    translate=image_layer.translate[-len(shape):],
                                    metadata={**geometry, STORE_KEY: {"path": str(path), "temporary": not chosen}})
        link(layer, image_layer.name)
        return labels, layer, True

    def _new_store_path(self, chosen: str, name: str) -> Optional[Path]:
        if not chosen:
            folder = Path(tempfile.mkdtemp(prefix="medrwkv-labels-"))
            self._made(folder)
            return folder / f"{_safe(name)}.zarr"
        path = Path(chosen).expanduser()
        if not path.parent.is_dir():
            raise ValueError(f"The folder of the store {path} does not exist; create it or choose another path.")
        if path.exists():
            if not _is_zarr(path):
                raise ValueError(f"{path} exists and is not a zarr store; choose a new path for the labels.")
            if not self._confirm_replace_store(path):
                self.widget.status.setText(f"{path} was kept; choose another store path to segment into.")
                return None
            shutil.rmtree(path)
        return path

    def _probability_target(self, name, shape, image_layer, labels_path: Path, levels: int):
        """(uint8 zarr arrays of probabilities x 255, full resolution first; their Image layer)
        beside the labels' store."""
        w = self.widget
        layer = w.viewer.layers[name] if name in w.viewer.layers else None
        if layer is not None and layer.metadata.get(STORE_KEY) and _full(layer).shape == shape:
            return _levels_of(layer), layer
        if layer is not None:
            name = w._free_name(name)
        path = labels_path.with_name(labels_path.stem + "-probability.zarr")
        if path.exists():
            path = Path(tempfile.mkdtemp(prefix="medrwkv-probability-")) / path.name
            self._made(path.parent)
        probs = _open_store(path, shape, np.uint8, levels)
        layer = w.viewer.add_image(probs if len(probs) > 1 else probs[0], multiscale=len(probs) > 1, name=name,
                                   colormap="magma", opacity=0.5, blending="additive",
                                   contrast_limits=(0, 255), scale=image_layer.scale[-len(shape):],
                                   translate=image_layer.translate[-len(shape):],
                                   metadata={"napari_medrwkv": {"probability_of": image_layer.name},
                                             STORE_KEY: {"path": str(path), "temporary": True}})
        if str(path.parent) not in self.temporary:
            layer.metadata[STORE_KEY]["temporary"] = False
        return probs, layer

    def _confirm_write_over(self, name: str) -> bool:
        answer = QMessageBox.question(self.widget, "Write over labels?",
                                      f"'{name}' already holds labels where this run segments (its zarr store is "
                                      "written in place, with no undo).\nYes writes over them.\nNo writes the "
                                      "result to a new layer and store.",
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _confirm_replace_store(self, path: Path) -> bool:
        answer = QMessageBox.question(self.widget, "Replace the store?",
                                      f"The zarr store {path} exists.\nYes deletes it and segments into a new "
                                      "one.\nNo keeps it and segments nothing.",
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    # ------------------------------------------------------------------ running
    def _make_worker(self, data, source, device, tile, rgb, choices, targets, planes, rows, cols):
        """``targets``: the labels' levels, or (labels' levels, probabilities' levels)."""
        pyramids = [t for t in (targets if isinstance(targets, tuple) else (targets,)) if len(t) > 1]
        out = tuple(t[0] for t in targets) if isinstance(targets, tuple) else targets[0]
        cancel, models = self.widget._cancel, self.widget._models

        @thread_worker
        def work():
            # Outcomes come back as values (see SegmentWidget._make_worker); progress as yields.
            from ..engine.blocks import iter_blocks
            from ..engine.infer import Cancelled
            from ..engine.model import load_model
            done = 0
            try:
                key = (source, device)
                if key not in models:
                    models[key] = load_model(source, device=device)
                model = models[key]
                steps = iter_blocks(data, model, out, planes=planes, rows=rows, cols=cols, tile=tile, block=BLOCK,
                                    return_probabilities=isinstance(out, tuple), rgb=rgb, cancel=cancel.is_set,
                                    **choices)
                written = []
                for done, total, region in steps:
                    for levels in pyramids:
                        downsample(levels, *region)
                    written.append(region)
                    yield done, total
                if pyramids and (choices.get("largest_component") or model.info.instances):
                    # The filter, or the objects found once every block ran, changed whole planes.
                    for region in written:
                        for levels in pyramids:
                            downsample(levels, *region)
            except Cancelled:
                return "cancelled", done
            except Exception as err:  # noqa: BLE001 -- reported to the user, never swallowed
                return "error", (done, f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err))
            return "done", model

        return work()

    def _on_block(self, step, run: "_Run") -> None:
        done, total = step
        bar = self.widget.progress_bar
        bar.setMaximum(total)
        bar.setFormat(f"block {done}/{total}")
        bar.setValue(done)
        run.done = done
        for layer in (run.layer, run.prob_layer):
            if layer is not None and layer in self.widget.viewer.layers:
                layer.refresh()

    def _on_outcome(self, outcome, run: "_Run") -> None:
        from napari.utils.notifications import show_error
        w = self.widget
        kind, value = outcome
        self.running = None
        self._remove_unused_stores()          # a layer removed while its blocks were being written
        for layer in (run.layer, run.prob_layer):
            if layer is not None and layer in w.viewer.layers:
                layer.refresh()
        if kind == "error":
            done, message = value
            w.status.setText(f"Failed: {message}")
            show_error(f"Segmentation failed: {message}")
            if run.made and not done:           # an empty layer of its own: nothing to keep
                for layer in (run.layer, run.prob_layer):
                    if layer is not None and layer in w.viewer.layers:
                        w.viewer.layers.remove(layer)
            return
        where = f"{run.layer.name} ({_store_words(run.layer)})"
        if kind == "cancelled":
            w.status.setText(f"Cancelled: {value} of {run.tasks} blocks were written into {where}; the rest are "
                             "unchanged.")
            return
        model = value
        part = f"{run.tasks} of {run.every} blocks (the part in view; pan and Segment again for more)" \
            if run.tasks < run.every else f"all {run.tasks} blocks"
        kept = "" if not (model.binary and w.largest_check.isChecked()) or run.tasks == run.every else \
            "; 'keep only the largest object' needs the whole image and was not applied"
        w.viewer.layers.selection.active = run.layer
        w.status.setText(f"Done: {part} of {run.image_layer.name} segmented into {where}{kept}.")

    def _on_removed(self, event) -> None:
        """A temporary store goes with its layer (the labels were saved, or are no longer wanted);
        a run writing into it is cancelled first, and the store removed when it has stopped."""
        run = self.running
        if run is not None and event.value in (run.layer, run.prob_layer):
            self.widget.cancel()
            return
        self._remove_unused_stores()

    def _remove_unused_stores(self) -> None:
        # The folder may hold the labels' store and the probabilities' beside it: gone when both are.
        used = {str(Path(_store_of(layer)).parent) for layer in self.widget.viewer.layers if _store_of(layer)}
        for folder in list(self.temporary):
            if folder not in used and (self.running is None or folder not in self.running.folders()):
                shutil.rmtree(folder, ignore_errors=True)
                self.temporary.discard(folder)
                _TEMPORARY.discard(folder)

    def _made(self, folder: Path) -> None:
        self.temporary.add(str(folder))
        _TEMPORARY.add(str(folder))


class _Run:
    """One block-by-block run, as the GUI thread follows it."""

    def __init__(self, image_layer, source, layer, prob_layer, made, tasks, every):
        self.image_layer, self.source, self.layer, self.prob_layer = image_layer, source, layer, prob_layer
        self.made, self.tasks, self.every, self.done = made, tasks, every, 0

    def folders(self):
        return {str(Path(_store_of(layer)).parent) for layer in (self.layer, self.prob_layer) if layer is not None}


def _task_side(plane_shape, info, device, tile) -> int:
    from ..engine.blocks import PlanePlan
    return PlanePlan.of_info(plane_shape, info, device, tile).unit(BLOCK)


def _holds_labels(array, tasks) -> bool:
    """Whether any of the (z, rows, cols) ``tasks`` of a store holds a label (read a task at a time)."""
    stack = array.ndim == 3
    return any(np.asarray(array[((z,) if stack else ()) + (rows, cols)]).any() for z, rows, cols in tasks)


def pyramid_levels(shape) -> int:
    """Levels of a pyramid of ``shape`` halving down to :data:`PYRAMID_SMALLEST` a side; a factor
    never past :data:`BLOCK`, so that every block maps onto whole pixels of every level."""
    levels = 1
    while max(shape[-2:]) / 2 ** (levels - 1) > PYRAMID_SMALLEST and 2 ** levels <= BLOCK:
        levels += 1
    return levels


def downsample(levels, z: int, rows: slice, cols: slice) -> None:
    """Carry a block of the full-resolution level down the pyramid (every 2^k-th pixel at level k)."""
    lead = (z,) if levels[0].ndim == 3 else ()
    region = np.asarray(levels[0][lead + (rows, cols)])
    for k, level in enumerate(levels[1:], 1):
        f = 2 ** k
        part = region[::f, ::f]
        top, left = rows.start // f, cols.start // f
        level[lead + (slice(top, top + part.shape[0]), slice(left, left + part.shape[1]))] = part


def _open_store(path: Path, shape, dtype, levels: int = 1):
    """[full-resolution array, half, quarter, ...]: a zarr array at ``path``, or with several
    levels a zarr group there holding them as "0", "1", ..."""
    import zarr
    chunks = ((1,) if len(shape) == 3 else ()) + (BLOCK, BLOCK)
    if levels == 1:
        return [zarr.open_array(str(path), mode="w-", shape=shape, chunks=chunks, dtype=dtype, fill_value=0)]
    group = zarr.open_group(str(path), mode="w-")
    group.attrs["napari_medrwkv"] = {"levels": levels, "downsampling": "level k: every 2^k-th pixel of level 0"}
    return [zarr.open_array(str(path / str(k)), mode="w-", chunks=chunks, dtype=dtype, fill_value=0,
                            shape=shape[:-2] + tuple(-(-n // 2 ** k) for n in shape[-2:])) for k in range(levels)]


def _full(layer):
    """The full-resolution array of a layer (its level 0 when multiscale)."""
    return layer.data[0] if layer.multiscale else layer.data


def _levels_of(layer):
    return list(layer.data) if layer.multiscale else [layer.data]


def _is_zarr(path: Path) -> bool:
    return any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))


def _store_of(layer) -> Optional[str]:
    return (layer.metadata.get(STORE_KEY) or {}).get("path")


def _store_words(layer) -> str:
    store = layer.metadata.get(STORE_KEY) or {}
    return "a temporary store: save the layer to keep it" if store.get("temporary") else store.get("path", "")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100] or "labels"


def _acquired_axis(layer) -> int:
    from .segment_widget import _acquired_axis as acquired
    return acquired(layer)
