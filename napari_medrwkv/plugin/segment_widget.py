"""Segment widget: run a model on an image layer, off the GUI thread, with progress and cancel.

A thin shell over ``napari_medrwkv.segment``; torch is imported on first use.
"""
import threading
from pathlib import Path
from typing import Optional

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel,
                            QMessageBox, QProgressBar, QPushButton, QSpinBox, QWidget)

from ..engine.memory import retain_freed_memory
from ..engine.preprocess import CT_WINDOWS
from ..engine.scans import METADATA_KEY as SCAN_GEOMETRY
from . import review, session
from .block_segment import BlockSegmenter
from .qt_helpers import (BROWSE, Section, WorkerRelay, add_shortcut, connect_while_alive, fit_dock, follow_layer_list,
                         refill, scrolling_body, shortcut_legend, stop_jobs_on_quit, unwrap_outcome)
from .reader_preference import prefer_scan_reader_quietly
from .review import link, record_written


def _description(source: str) -> str:
    """What a model in the menu segments, learnt from and scored (its tooltip)."""
    from ..engine.model import describe_model, read_model_info
    try:
        info = read_model_info(source)
    except ValueError as err:
        return str(err)
    return describe_model(info) if info is not None else "an untrained architecture"


class SegmentWidget(QWidget):
    """Image layer + model + device -> a Labels layer (and optionally a probability layer)."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        retain_freed_memory()      # before this widget's workers first allocate: they share the kept memory
        prefer_scan_reader_quietly()   # scans open with MedRWKV's reader from now on (unless the user chose)
        self.viewer = napari_viewer
        self.worker = None
        self._slices = 1
        self._cancel = threading.Event()
        self._models = {}                 # source -> loaded SegmentationModel, reused between runs
        self._extra_sources = []          # checkpoint files chosen in this session

        self.image_combo = QComboBox()
        self.model_combo = QComboBox()
        self.device_combo = QComboBox()
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(["current slice", "all slices"])
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(0, 8192)
        self.tile_spin.setSingleStep(128)
        self.tile_spin.setSpecialValueText("auto")
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("The largest piece of the image the model sees at once (in the network's pixels); "
                                  "larger images are cut into overlapping tiles and blended.  'auto': the whole "
                                  "image in one pass when that fits in memory (the fastest, and what tiles are "
                                  "measured against), else the largest tiles that fit.  Smaller tiles use less "
                                  "memory but see less around each pixel: a tile under a quarter of the model's "
                                  "(128 px for the shipped models) is refused.")
        self.tile_plan = QLabel("")       # what 'auto' chooses for the chosen image and model
        self.tile_plan.setWordWrap(True)
        self.probability_check = QCheckBox("add a probability layer")
        self.flips_check = QCheckBox("test-time flips (4x slower, steadier)")
        self.flips_check.setToolTip("Average the model's answer over the image and its left-right, "
                                    "up-down and double flips")
        self.largest_check = QCheckBox("keep only the largest object")
        self.largest_check.setToolTip("One object per image or slice (a lesion, a polyp): drop every "
                                      "smaller detached piece")
        self.window_combo = QComboBox()
        self.window_combo.addItem(PERCENTILES, None)
        for name, (level, width) in CT_WINDOWS.items():
            self.window_combo.addItem(f"CT window: {name} ({level:g} / {width:g} HU)", name)
        self.window_combo.setToolTip("What the model sees of each slice: its own brightness range (robust "
                                     "percentiles), or a CT window (level / width), because the percentiles of "
                                     "a whole CT slice are set by air and bone")
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.05, 0.95)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setDecimals(2)
        self.threshold_spin.setToolTip("Foreground where the model's probability is above this")
        self._set_inference_controls(None)
        self.run_button = QPushButton("Segment")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.suggestion = QLabel("")
        self.suggestion.setWordWrap(True)
        self._model_by_hand = False       # until the user picks a model, the suggested one is selected
        self._blocks = BlockSegmenter(self)   # large, lazy and multiscale images, into a zarr store

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("", self.suggestion)
        form.addRow("Device", self.device_combo)
        form.addRow("Stack", self.scope_combo)
        form.addRow("", self._blocks.view_check)
        settings = QWidget()
        settings_form = QFormLayout(settings)
        settings_form.setContentsMargins(0, 0, 0, 0)
        settings_form.addRow("Tile", self.tile_spin)
        settings_form.addRow("", self.tile_plan)
        settings_form.addRow("Threshold", self.threshold_spin)
        settings_form.addRow("Intensities", self.window_combo)
        settings_form.addRow(self.probability_check)
        settings_form.addRow(self.flips_check)
        settings_form.addRow(self.largest_check)
        settings_form.addRow("Store", self._blocks.store_row)
        self.settings_section = Section("Settings (tile, threshold, flips, one object)", settings, expanded=False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = scrolling_body(self)
        layout.addLayout(form)
        layout.addWidget(self.settings_section)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addWidget(shortcut_legend([("Shift+S", "segment")]))
        layout.addStretch()
        self.run_button.setToolTip("Segment the chosen image (or the current slice of a stack)")
        add_shortcut(self, self.run_button, "Shift+S")
        fit_dock(self)

        self._relay = WorkerRelay()
        self._relay.tiles.connect(self._on_progress)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.model_combo.activated.connect(self._on_model_chosen)
        self.model_combo.currentTextChanged.connect(self._on_model_changed)
        self.image_combo.currentTextChanged.connect(self._suggest_model)
        for changed in (self.image_combo.currentTextChanged, self.model_combo.currentTextChanged,
                        self.tile_spin.valueChanged):
            changed.connect(self._describe_tiles)
        follow_layer_list(self, self.viewer.layers, self._refresh_images)
        review.follow_renames(self.viewer.layers)   # reviewed pairs survive renaming their image
        connect_while_alive(self, self.viewer.layers.selection.events.active, self._follow_selection)
        stop_jobs_on_quit(self, self.viewer)
        self._fill_models_and_devices()
        self._refresh_images()
        connect_while_alive(self, session.changed, self._on_session_changed)

    # ------------------------------------------------------------------ choices
    def _refresh_images(self, event=None):
        # Only a new choice of image brings a suggestion (which may switch the model and reset its settings).
        current = self.image_combo.currentText()
        active = self.viewer.layers.selection.active
        refill(self.image_combo, [layer.name for layer in self.viewer.layers
                                  if isinstance(layer, Image) and self._image_of(layer)],
               [current, self._image_of(active)])
        if self.image_combo.currentText() != current:
            self._suggest_model(self.image_combo.currentText())
        self._describe_tiles()           # the image may be new, or reshaped under the same name

    def _follow_selection(self, event=None):
        """The image the user just opened or selected becomes the one to segment: an Image layer
        (not a probability layer this widget added), or the image a selected Labels layer annotates."""
        image = self._image_of(self.viewer.layers.selection.active)
        if image is not None and image != self.image_combo.currentText() and self.image_combo.findText(image) >= 0:
            self.image_combo.setCurrentText(image)          # emits currentTextChanged: the suggestion follows

    def _image_of(self, layer) -> Optional[str]:
        if isinstance(layer, Image):
            return None if layer.metadata.get(review.KEY, {}).get("probability_of") else layer.name
        if isinstance(layer, Labels):
            name = review.linked_image(layer)
            return name if name in self.viewer.layers else None
        return None

    def _fill_models_and_devices(self):
        """(Re)list the models, keeping the current one (a change resets the inference settings the
        user set for it), and the devices."""
        from ..engine.model import available_devices, list_automatic
        current = self.model_combo.currentText()
        gone = session.forgotten()
        sources = [source for source in dict.fromkeys(list_automatic() + session.registered() + session.opened()
                                                      + self._extra_sources) if source not in gone]
        refill(self.model_combo, sources + [BROWSE], [current] if current in sources else [],
               {source: _description(source) for source in sources})
        if self.model_combo.currentText() != current:
            self._on_model_changed(self.model_combo.currentText())
        self.device_combo.clear()
        self.device_combo.addItems(available_devices())

    def _on_session_changed(self, source=None):
        """A model was fine-tuned: list it, keeping the current model and device."""
        device = self.device_combo.currentText()
        self._fill_models_and_devices()
        self.device_combo.setCurrentText(device)

    def add_model_source(self, source: str):
        """Offer a checkpoint path (or a model registered by fine-tuning) and select it: a deliberate
        choice, which suggestions for later images leave as it is."""
        self._model_by_hand = True
        if str(source).endswith(".safetensors") and source not in session.registered():
            source = session.add_file(source)             # every model menu lists it
        elif source not in self._extra_sources:
            self._extra_sources.append(source)
        self._fill_models_and_devices()
        self.model_combo.setCurrentText(source)

    def _on_model_chosen(self, index: int):
        self._model_by_hand = True
        if self.model_combo.itemText(index) != BROWSE:
            return
        path, _ = QFileDialog.getOpenFileName(self, "Choose a checkpoint", "", "Checkpoints (*.safetensors)")
        if path:
            self.add_model_source(path)

    def _suggest_model(self, name: str):
        """Say which model in the menu (shipped, fine-tuned this session, or chosen from a file) was
        trained on images like this one, and select it until the user has picked a model by hand."""
        from ..engine.appearance import suggest_model
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if not isinstance(layer, Image):
            self.suggestion.setText("")
            return
        sources = [self.model_combo.itemText(i) for i in range(self.model_combo.count())
                   if self.model_combo.itemText(i) != BROWSE]
        try:
            suggestion = suggest_model(self._plane(layer), sources)
        except ValueError:              # not one 2-D image or stack; Segment says what to do
            self.suggestion.setText("")
            return
        if suggestion is None:
            self.suggestion.setText("None of these models was trained on images like this one: try the one whose "
                                    "result looks closest, fix its mistakes (Click to fix, Correct) and fine-tune "
                                    "it on a few corrected slices (Fine-tune).")
            return
        shown = Path(suggestion.source).name if suggestion.source.endswith(".safetensors") else suggestion.source
        self.suggestion.setText(f"Suggested for this image: {shown} (trained on images like it).")
        if not self._model_by_hand and self.model_combo.findText(suggestion.source) >= 0:
            self.model_combo.setCurrentText(suggestion.source)

    def _plane(self, layer: Image):
        """The image, or the current slice of a stack, left lazy (dask, zarr) for the caller to crop."""
        data = layer.data[0] if layer.multiscale else layer.data
        spatial = data.ndim - (1 if layer.rgb else 0)
        if spatial == 3:
            z = min(max(int(self.viewer.dims.current_step[0]), 0), data.shape[0] - 1)
            return data[z]
        if spatial != 2:
            raise ValueError(f"{layer.name}: {spatial} spatial dimensions")
        return data

    def _describe_tiles(self, *_):
        """Say how the chosen image will be tiled ('auto': by the memory budget)."""
        self.tile_plan.setText(self.tiles_in_words())

    def tiles_in_words(self) -> str:
        """How Segment will tile the chosen image with the chosen model and Tile, or ""."""
        from ..engine.model import read_model_info
        from ..engine.preprocess import plane_layout, scaled_size
        from ..engine.tiling import plan_tiles
        name, source = self.image_combo.currentText(), self.model_combo.currentText()
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if layer is None or not source or source == BROWSE:
            return ""
        try:
            info = read_model_info(source)
            stack_axes, _ = plane_layout(np.shape(layer.data), layer.rgb)
        except ValueError:
            return ""
        if info is None:
            return ""
        plane = list(np.shape(layer.data)[:3 if stack_axes else 2])
        if stack_axes:
            del plane[_acquired_axis(layer)]          # the planes Segment runs, a scan's acquired ones
        plan = plan_tiles(scaled_size(plane, info.input_scale), info.architecture, tile=self.tile_spin.value() or None)
        return plan.reason if plan.count > 1 or not self.tile_spin.value() else "the whole image in one pass"

    def _on_model_changed(self, source: str):
        """Show the chosen model's own inference settings (those ``medrwkv calibrate`` chose)."""
        if not source or source == BROWSE:
            return
        from ..engine.model import read_model_info
        try:
            info = read_model_info(source)
        except ValueError:
            info = None                   # a damaged file: Segment will say what is wrong with it
        self._set_inference_controls(info)

    def _set_inference_controls(self, info):
        from ..engine.checkpoint import INFERENCE_DEFAULTS
        settings = info.inference if info is not None else INFERENCE_DEFAULTS
        binary = info is None or info.binary
        self.flips_check.setChecked(settings["flips"])
        self.largest_check.setChecked(settings["largest_component"])
        self.threshold_spin.setValue(settings["threshold"])
        self.largest_check.setEnabled(binary)
        self.threshold_spin.setEnabled(binary)
        self._offer_windows(info.window if info is not None else None)

    def _offer_windows(self, own) -> None:
        """The Intensities menu for a model trained with window ``own`` (or None): its first entry,
        the model's own, names it; with a window of its own, the percentiles are a choice of their own."""
        self.window_combo.setItemText(0, PERCENTILES if own is None else f"the model's own: {window_words(own)}")
        index = self.window_combo.findData(PERCENTILES_CHOICE)
        if own is not None and index < 0:
            self.window_combo.insertItem(1, PERCENTILES, PERCENTILES_CHOICE)
        elif own is None and index >= 0:
            self.window_combo.removeItem(index)
        self.window_combo.setCurrentIndex(0)        # another model: its own, as its other settings

    def inference_choices(self) -> dict:
        """What the controls ask of ``segment``; threshold and largest object for binary models only."""
        choices = {"flips": self.flips_check.isChecked()}
        if self.window_combo.currentData() is not None:
            choices["window"] = self.window_combo.currentData()
        if self.threshold_spin.isEnabled():
            choices.update(threshold=round(self.threshold_spin.value(), 2),
                           largest_component=self.largest_check.isChecked())
        return choices

    # ------------------------------------------------------------------ running
    def run(self):
        """Start segmenting (does nothing while a run is in progress)."""
        if self.worker is not None:
            show_info("A segmentation is already running; cancel it first.")
            return
        try:
            image_layer = self._image_layer()
            source = self.model_combo.currentText()
            if not source or source == BROWSE:
                raise ValueError("Choose a model or a checkpoint file first.")
            if self._blocks.wanted(image_layer):
                self._check_tile(source)
                self._blocks.run(image_layer, source)      # block by block, shown as the blocks finish
                return
            data, slice_index = self._input(image_layer)
            self._check_tile(source)
        except ValueError as err:
            self._error(str(err))
            return
        self._cancel.clear()
        self._slices = 1 if slice_index is not None or data.ndim - (1 if image_layer.rgb else 0) == 2 else len(data)
        self._set_running(True)
        self.status.setText(f"Segmenting {image_layer.name} with {source}…")
        self._window_chosen = self.window_combo.currentData()      # recorded on the result (Fine-tune uses it)
        self.worker = self._make_worker(data, source, self.device_combo.currentText(), self.tile_spin.value() or None,
                                        image_layer.rgb, self.inference_choices(),
                                        _acquired_axis(image_layer) if slice_index is None else 0)
        self.worker.returned.connect(lambda outcome: self._on_outcome(outcome, image_layer, source, slice_index))
        self.worker.finished.connect(self._on_finished)
        self.worker.start()

    def _error(self, message: str) -> None:
        """An error the user must act on: in the status line (which stays) and as a notification."""
        self.status.setText(message)
        show_error(message)

    def _check_tile(self, source: str) -> None:
        """A tile under a quarter of the model's own loses so much context that the result falls
        apart (a tile of 33 px: 0.85 Dice where the default gives 0.93 on the nuclei sample)."""
        tile = self.tile_spin.value()
        if not tile:
            return
        from ..engine.model import read_model_info
        try:
            info = read_model_info(source)
        except ValueError:
            return                          # a damaged file: loading it says what is wrong
        own = info.tile_size if info is not None else 128
        smallest = max(32, own // 4)
        if tile < smallest:
            raise ValueError(f"Tile {tile} px is smaller than {Path(source).stem} allows ({smallest} px, a quarter "
                             f"of its own {own} px): the model would see too little around each pixel. Choose "
                             f"{smallest} px or more, or 'auto'.")

    def cancel(self):
        self._cancel.set()
        self.status.setText("Cancelling…")

    def busy(self) -> str:
        """What runs, for the question napari asks on quitting ("" when idle)."""
        return f"Segment: {self.status.text()}" if self.worker is not None else ""

    def stop_for_quit(self) -> None:
        self.cancel()

    def _make_worker(self, data, source, device, tile, rgb, choices, axis=0):
        """``axis``: the stack axis whose planes are segmented (a scan's acquired planes); the
        result comes back in the layer's axis order."""
        relay, cancel, models = self._relay, self._cancel, self._models

        @thread_worker
        def work():
            # Outcomes come back as values: an exception leaving a worker would surface as a
            # traceback in the event loop, where users should see a notification.
            from ..engine.infer import Cancelled, segment
            from ..engine.model import load_model
            try:
                key = (source, device)
                if key not in models:
                    models[key] = load_model(source, device=device)
                model = models[key]
                planes = np.moveaxis(data, axis, 0) if axis else data
                labels, probs = segment(planes, model=model, tile=tile, rgb=rgb, return_probabilities=True,
                                        progress=relay.tiles.emit, cancel=cancel.is_set, **choices)
                if axis:
                    labels = np.moveaxis(labels, 0, axis)
                    probs = np.moveaxis(probs, probs.ndim - 3, probs.ndim - 3 + axis)
            except Cancelled:
                return "cancelled", None
            except Exception as err:  # noqa: BLE001 -- reported to the user, never swallowed
                return "error", f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err)
            return "done", (labels, probs, model)

        return work()

    def _image_layer(self) -> Image:
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise ValueError("No image layer: open an image first (File > Open, or File > Open Sample > MedRWKV).")
        return self.viewer.layers[name]

    def _input(self, layer: Image):
        """The array to segment and, for 'current slice' of a stack, the slice index."""
        data = np.asarray(layer.data)
        spatial = data.ndim - (1 if layer.rgb else 0)
        if spatial == 2:
            return data, None
        if spatial != 3:
            raise ValueError(f"{layer.name} has {spatial} spatial dimensions {data.shape}; the Segment widget "
                             "handles 2D images and 3D stacks (Z, Y, X). Split the other axes into layers first.")
        if self.scope_combo.currentText() == "all slices":
            return data, None
        axis = _acquired_axis(layer)                      # a scan: the current acquired plane
        z = int(self.viewer.dims.current_step[self.viewer.dims.ndim - 3 + axis])
        z = min(max(z, 0), data.shape[axis] - 1)
        return review.take_slice(data, z, axis), z

    # ------------------------------------------------------------------ results
    def _on_progress(self, done: int, total: int):
        self.progress_bar.setMaximum(total)
        self.progress_bar.setValue(done)
        if self._slices > 1:          # every slice has the same tiles, so the slice follows from the tile
            per_slice = max(total // self._slices, 1)
            self.progress_bar.setFormat(f"slice {min(-(-done // per_slice), self._slices)}/{self._slices}  %p%")
        else:
            self.progress_bar.setFormat("%p%")

    def _on_outcome(self, outcome, image_layer: Image, source: str, slice_index: Optional[int]):
        value = unwrap_outcome(outcome, self.status, "Segmentation", "Cancelled; nothing was changed.", show_error)
        if value is None:
            return
        def unwrapped(layer):                # napari hands plugins public-only proxies of its layers
            return getattr(layer, "__wrapped__", layer)
        if not any(unwrapped(layer) is unwrapped(image_layer) for layer in self.viewer.layers):
            self.status.setText(f"{image_layer.name} was closed while it was being segmented; its result was dropped.")
            return
        self._show_result(*value, image_layer, source, slice_index)

    def _show_result(self, labels, probs, model, image_layer: Image, source: str, slice_index: Optional[int]):
        name = f"{image_layer.name} [{model.name}]"
        full_shape = image_layer.data.shape[:-1] if image_layer.rgb else image_layer.data.shape
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        axis = _acquired_axis(image_layer)                    # slices: a scan's acquired planes
        if layer is not None and (layer.data.shape != full_shape or review.slice_axis(layer) != axis):
            name, layer = self._free_name(name), None        # another image's labels: never replaced
        planes, kept = self._planes(labels, full_shape, slice_index, axis), ""
        if layer is not None:
            planes, kept = self._planes_to_replace(layer, planes)
            if planes is None:                               # the user keeps it: the result goes beside it
                name, layer = self._free_name(name), None
        if layer is None:
            data = labels if slice_index is None else np.zeros(full_shape, dtype=labels.dtype)
            layer = self._new_labels(name, data, image_layer)
            if slice_index is not None:
                layer.data[(slice(None),) * axis + (slice_index,)] = labels
            changed = None
        else:
            changed = review.replace_slices(layer, planes)
        record_written(layer, source)
        # The window the model saw the image through: fine-tuning on these labels uses it too.
        layer.metadata[review.KEY]["window"] = getattr(self, "_window_chosen", None) or model.info.window \
            or PERCENTILES_CHOICE
        link(layer, image_layer.name)
        layer.refresh()
        if self.probability_check.isChecked() and model.binary:
            self._show_probability(f"{name} probability", probs, image_layer, slice_index, full_shape, axis)
        self.viewer.layers.selection.active = layer          # the paint tools at hand, not the probabilities
        if model.info.instances:             # one label per object, numbered per slice
            found = f"{int(labels.max())} objects" if labels.ndim == 2 else \
                f"{sum(int(plane.max()) for plane in labels)} objects in {len(labels)} slices"
        else:
            found = f"{(labels > 0).mean():.1%} foreground" if model.binary else \
                f"classes {', '.join(str(c) for c in np.unique(labels) if c)}"
        undo = f"; {changed} pixels changed, Ctrl+Z undoes it" if changed else ""
        self.status.setText(f"Done: {name} ({found}{undo}){kept}.")

    @staticmethod
    def _planes(labels, full_shape, slice_index: Optional[int], axis: int = 0) -> dict:
        """The result as {slice index: labels}, slices across ``axis``; a 2-D image is slice 0."""
        if slice_index is not None:
            return {slice_index: labels}
        if len(full_shape) == 2:
            return {0: labels}
        return {i: review.take_slice(labels, i, axis) for i in range(labels.shape[axis])}

    def _planes_to_replace(self, layer: Labels, planes: dict):
        """(the planes of ``planes`` that may replace the labels in ``layer``, or None to write the result
        to a new layer instead; a note on what was kept), after asking where the user reviewed or
        edited the labels."""
        kept = ""
        hit = sorted(set(planes) & set(review.reviewed(layer)))
        if hit:
            choice = self._ask_about_reviewed(layer, hit)
            if choice == "new":
                return None, ""
            if choice == "skip":
                kept = f"; reviewed slice(s) {', '.join(map(str, hit))} kept" if layer.ndim == 3 \
                    else "; the reviewed labels were kept"
                planes = {i: plane for i, plane in planes.items() if i not in hit}
        # Edited slices nobody marked reviewed: the old question, about those alone.
        edited = set(review.edited_slices(layer)) & set(planes) - set(hit)
        if edited and not self._confirm_overwrite(layer.name):
            return None, ""
        return planes, kept

    def _ask_about_reviewed(self, layer: Labels, hit) -> str:
        """'skip' (the default), 'replace' or 'new': what to do with labels the user marked reviewed."""
        where = "It is" if layer.ndim == 2 else f"Slice(s) {', '.join(map(str, hit))} are"
        box = QMessageBox(QMessageBox.Icon.Question, "Replace reviewed labels?",
                          f"{where} marked reviewed in '{layer.name}'.\n\nKeep reviewed: the new result fills only "
                          "the other slices.\nReplace: the reviewed labels are replaced (one undo step) and no "
                          "longer marked reviewed.\nNew layer: the result goes to a new layer.", parent=self)
        buttons = {"skip": box.addButton("Keep reviewed", QMessageBox.ButtonRole.AcceptRole),
                   "replace": box.addButton("Replace", QMessageBox.ButtonRole.DestructiveRole),
                   "new": box.addButton("New layer", QMessageBox.ButtonRole.ActionRole)}
        for key, button in buttons.items():
            button.setObjectName(f"reviewed-{key}")
        box.setDefaultButton(buttons["skip"])
        box.setEscapeButton(buttons["skip"])
        box.exec()
        return next((key for key, button in buttons.items() if box.clickedButton() is button), "skip")

    def _new_labels(self, name, data, image_layer) -> Labels:
        # A scan's geometry goes with its labels, so that they save back onto the scan's grid.
        geometry = {key: image_layer.metadata[key] for key in (SCAN_GEOMETRY,) if key in image_layer.metadata}
        return self.viewer.add_labels(data, name=name, scale=image_layer.scale[-data.ndim:],
                                      translate=image_layer.translate[-data.ndim:], metadata=geometry)

    def _show_probability(self, name, probs, image_layer, slice_index, full_shape, axis=0):
        if slice_index is not None:
            full = self.viewer.layers[name].data if name in self.viewer.layers and \
                self.viewer.layers[name].data.shape == full_shape else np.zeros(full_shape, np.float32)
            full[(slice(None),) * axis + (slice_index,)] = probs
            probs = full
        if name in self.viewer.layers:
            self.viewer.layers[name].data = probs
        else:
            self.viewer.add_image(probs, name=name, colormap="magma", opacity=0.5, blending="additive",
                                  contrast_limits=(0, 1), scale=image_layer.scale[-probs.ndim:],
                                  translate=image_layer.translate[-probs.ndim:],
                                  metadata={review.KEY: {"probability_of": image_layer.name}})

    def _confirm_overwrite(self, name: str) -> bool:
        answer = QMessageBox.question(self, "Replace edited labels?",
                                      f"'{name}' has been edited since it was segmented. Replace it?\n"
                                      "Yes replaces it (one undo step: Ctrl+Z brings the edits back).\n"
                                      "No keeps it and writes the new result to a new layer.",
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _free_name(self, name: str) -> str:
        i = 2
        while f"{name} ({i})" in self.viewer.layers:
            i += 1
        return f"{name} ({i})"

    def _on_finished(self):
        self.worker = None
        self._set_running(False)

    def _set_running(self, running: bool):
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self.progress_bar.setValue(0)


#: The window menu's first entry for a model trained without a window: each slice's own range.
PERCENTILES = "each slice's range (percentiles)"
#: ``segment(window=)`` for the percentiles, also with a model trained with a window.
PERCENTILES_CHOICE = "percentiles"


def window_words(window) -> str:
    """A window as the Intensities menu names it: "CT window lung (-600 / 1500 HU)"."""
    if isinstance(window, str):
        level, width = CT_WINDOWS[window]
        return f"CT window {window} ({level:g} / {width:g} HU)"
    level, width = window
    return f"window {level:g} / {width:g}"


def _acquired_axis(layer) -> int:
    """The axis along which the scanner acquired a scan's slices (0 for anything but a scan)."""
    geometry = layer.metadata.get(SCAN_GEOMETRY)
    if not geometry or layer.rgb or np.ndim(layer.data) != 3:
        return 0
    return int(geometry.get("slice_axis", 0))
