"""Click to fix widget: one object at a time from clicks, with a prompt-aware model.

A thin shell over :func:`napari_medrwkv.engine.interactive.refine`.  While the mode is on, a left
click on the canvas adds a point inside the object (green), Shift+click or a right click a point
outside it (red), and Ctrl+drag draws a box around it; the prompts show on a Points layer
("click-to-fix prompts") and, after each one, the object redraws in a preview Labels layer
("click-to-fix object"), computed off the GUI thread.  Only the newest prompts' answer is ever
shown: a request made stale by a newer click is dropped, before it runs when it can be.

Keys (bound on the prompts layer, which the mode selects; they leave with it):

* C: commit the object to the chosen Labels layer as a new id (one step of napari's undo), painting
  only background unless "overwrite other objects" is ticked;
* Z or Ctrl+Z: undo the last prompt;  R or Escape: reset the object;
* F: fix the object under the cursor: its mask is the start, and commit replaces its pixels under
  the same id;  T: left clicks add points outside the object, until T again.

On a stack the widget works on the slice shown; "carry to neighbouring slices" refines the
committed mask on the next slices (both ways, no clicks) until the object vanishes or after N
slices, all in the same undo step.  A commit is an edit like painting (``Labels.data_setitem``
inside ``block_history``): review marks stay as they are and nothing is marked reviewed by
itself.  What runs on the worker thread, and how an object is painted, is in ``click_jobs.py``;
torch is imported on first use.
"""
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QPushButton,
                            QSpinBox, QWidget)

from . import review, session
from .click_jobs import Job, make_worker, next_id, paint_object, prompt_aware
from .qt_helpers import (BROWSE, connect_while_alive, fit_dock, follow_layer_list, refill, scrolling_body,
                         stop_jobs_on_quit)

PROMPTS = "click-to-fix prompts"
PREVIEW = "click-to-fix object"
BOX = "click-to-fix box"
NEW_LABELS = "New labels layer"
POSITIVE = (0.2, 0.9, 0.3, 1.0)
NEGATIVE = (1.0, 0.25, 0.25, 1.0)
PREVIEW_COLOR = (1.0, 0.85, 0.1, 1.0)
#: A press that moves farther than this (screen pixels) before its release is a drag (panning), not a click.
DRAG_PIXELS = 5
PAN_ZOOM = "pan_zoom"
#: How many earlier answers are kept so that undoing a prompt shows its object at once.
CACHE_SIZE = 64

KEYS = ("Left click: a point inside the object (green)\n"
        "Shift+click or right click: a point outside it (red)\n"
        "Ctrl+drag: a box around the object\n"
        "C: commit the object to the labels layer (a new id)\n"
        "Z or Ctrl+Z: undo the last prompt\n"
        "R or Esc: reset the object\n"
        "F: fix the object under the cursor (commit replaces it)\n"
        "T: swap inside and outside for left clicks\n"
        "Keys act while the prompts layer is selected; a drag pans as ever.")


class ClickToFixWidget(QWidget):
    """Clicks, a box and an object's current mask -> that object, committed to a Labels layer."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self._models = {}                 # (source, device) -> loaded model, reused
        self._extra_sources: List[str] = []
        self._new_labels_chosen = False   # New labels layer picked, not merely the only entry
        self._image_choice: Optional[Image] = None        # the chosen layers, followed when renamed
        self._labels_choice: Optional[Labels] = None
        self._negative_clicks = False     # T: left clicks add points outside the object
        self._on = False
        self._stopping = False
        self._image: Optional[Image] = None
        self._prompts = None              # the Points layer
        self._preview: Optional[Labels] = None
        self._box_layer = None
        self._pan_before: Optional[bool] = None
        # the current object
        self._object = 0                  # counts objects: part of every cache key
        self._slice: Optional[int] = None
        self._actions: List[Tuple[str, tuple]] = []      # ("point", (row, col, positive)) | ("box", box)
        self._start_mask: Optional[np.ndarray] = None
        self._fix_id: Optional[int] = None
        self._mask: Optional[np.ndarray] = None            # what the preview shows
        self._shown_key: Optional[tuple] = None            # the prompt state it answers
        self._awaiting: Optional[int] = None               # the request answering the current prompts
        self._shown_slice: Optional[int] = None
        self._cache: Dict[tuple, np.ndarray] = {}
        self._commit_when_ready = False
        self._note = ""                   # said before the status of the current object's prompts
        # requests
        self._number = 0                  # the newest request; answers to older ones are dropped
        self._pending: Optional[Job] = None               # the newest prompts' request, not yet running
        self._carries: List[Job] = []                     # commits waiting for their neighbouring slices
        self.dropped = 0                  # stale answers dropped (and requests never run)
        self.shown = 0                    # answers shown

        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The image to click on (a 2-D image or a stack: the slice shown).")
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("Committed objects go into this Labels layer, each under a new id.")
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("A prompt-aware model (one that takes clicks) or such a checkpoint file.")
        self.device_combo = QComboBox()
        for combo in (self.image_combo, self.labels_combo, self.model_combo):
            # a long layer name or checkpoint path must not widen the dock over the canvas
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(12)
        self.overwrite_check = QCheckBox("overwrite other objects")
        self.overwrite_check.setToolTip("Unticked, a commit paints only background: other objects keep their pixels.")
        self.carry_check = QCheckBox("carry to neighbouring slices")
        self.carry_check.setToolTip("On a stack, commit also refines the object on the next slices both ways "
                                    "(the committed mask as their start) until it vanishes.")
        self.carry_spin = QSpinBox()
        self.carry_spin.setRange(1, 1000)
        self.carry_spin.setValue(5)
        self.carry_spin.setSuffix(" slices each way")
        self.carry_spin.setToolTip("The carried object goes at most this far from the committed slice.")
        self.start_button = QPushButton("Start")
        self.start_button.setCheckable(True)
        self.start_button.setToolTip("Turn the click mode on or off.")
        self.commit_button = QPushButton("Commit (C)")
        self.undo_button = QPushButton("Undo prompt (Z)")
        self.reset_button = QPushButton("Reset (R)")
        self.keys_label = QLabel(KEYS)
        self.keys_label.setWordWrap(True)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("Device", self.device_combo)
        carry_row = QHBoxLayout()
        carry_row.addSpacing(24)
        carry_row.addWidget(QLabel("at most"))
        carry_row.addWidget(self.carry_spin)
        carry_row.addStretch()
        buttons = QHBoxLayout()
        for button in (self.start_button, self.commit_button, self.undo_button, self.reset_button):
            buttons.addWidget(button)
        layout = scrolling_body(self)
        layout.addLayout(form)
        layout.addWidget(self.overwrite_check)
        layout.addWidget(self.carry_check)
        layout.addLayout(carry_row)
        layout.addLayout(buttons)
        layout.addWidget(self.keys_label)
        layout.addWidget(self.status)
        layout.addStretch()
        fit_dock(self)

        self.start_button.toggled.connect(self._on_start_toggled)
        self.commit_button.clicked.connect(self.commit)
        self.undo_button.clicked.connect(self.undo_prompt)
        self.reset_button.clicked.connect(self.reset)
        self.model_combo.activated.connect(self._on_model_chosen)
        self.image_combo.currentTextChanged.connect(self._on_image_chosen)
        self.labels_combo.currentTextChanged.connect(self._on_labels_chosen)
        follow_layer_list(self, self.viewer.layers, self._refresh_layers)
        connect_while_alive(self, self.viewer.layers.events.renamed, self._refresh_layers)
        stop_jobs_on_quit(self, self.viewer)
        connect_while_alive(self, session.changed, self._on_session_changed)
        self._fill_models_and_devices()
        self._refresh_layers()
        self._update_controls()
        if self.model_combo.currentText() == BROWSE:
            self.status.setText("No prompt-aware model is installed: choose a checkpoint file of one "
                                "(Model > Checkpoint file…).")

    # ------------------------------------------------------------------ choices
    def _refresh_layers(self, event=None):
        if self._on and not self._stopping and not all(
                layer is not None and layer in self.viewer.layers for layer in (self._image, self._prompts,
                                                                                self._preview)):
            self.stop("Stopped: a layer of the click mode was removed.")
        layers = self.viewer.layers
        active = layers.selection.active
        active_name = active.name if active is not None else None
        chosen = self._image if self._on else self._image_choice
        current = chosen.name if chosen is not None and chosen in layers else self.image_combo.currentText()
        refill(self.image_combo, [layer.name for layer in layers if isinstance(layer, Image)], [current, active_name])
        labels = [layer.name for layer in layers
                  if isinstance(layer, Labels) and layer is not self._preview and layer.name != PREVIEW]
        chosen = self._labels_choice
        current = chosen.name if chosen is not None and chosen in layers else self.labels_combo.currentText()
        new_by_default = current == "" or (current == NEW_LABELS and not self._new_labels_chosen)
        choices = [active_name] + labels + [NEW_LABELS] if new_by_default else [current, active_name]
        refill(self.labels_combo, labels + [NEW_LABELS], choices + labels)
        self._image_choice, self._labels_choice = self._chosen_image(), self._target()
        self._update_controls()

    def _on_image_chosen(self, text: str):
        self._image_choice = self._chosen_image()
        self._update_controls()

    def _on_labels_chosen(self, text: str):
        self._new_labels_chosen = text == NEW_LABELS
        self._labels_choice = self._target()

    def _fill_models_and_devices(self):
        from ..engine.model import available_devices, list_shipped
        current = self.model_combo.currentText()
        sources = [source for source in dict.fromkeys(list_shipped() + session.registered())
                   if prompt_aware(source)]
        sources = list(dict.fromkeys(sources + self._extra_sources))
        refill(self.model_combo, sources + [BROWSE], [current] if current in sources else [])
        device = self.device_combo.currentText()
        refill(self.device_combo, available_devices(), [device])

    def _on_session_changed(self, source=None):
        self._fill_models_and_devices()

    def _on_model_chosen(self, index: int):
        if self.model_combo.itemText(index) != BROWSE:
            return
        path, _ = QFileDialog.getOpenFileName(self, "Choose a prompt-aware checkpoint", "",
                                              "Checkpoints (*.safetensors)")
        if path:
            self.add_model_source(path)
        else:
            self._fill_models_and_devices()

    def add_model_source(self, source: str) -> bool:
        """Offer a checkpoint file and select it, if it takes clicks (an error otherwise)."""
        if not prompt_aware(source):
            self._fill_models_and_devices()
            self._error(f"{source} is not a prompt-aware model: it takes no clicks. Choose one trained to "
                        "follow clicks (such as rwkv_unet_t-interactive).")
            return False
        if source not in self._extra_sources:
            self._extra_sources.append(source)
        self._fill_models_and_devices()
        self.model_combo.setCurrentText(source)
        return True

    def _update_controls(self, *_):
        layer = self._image if self._on else self._chosen_image()
        stack = layer is not None and _spatial_ndim(layer) == 3
        self.carry_check.setEnabled(stack)
        self.carry_spin.setEnabled(stack)
        self.image_combo.setEnabled(not self._on)
        for button in (self.commit_button, self.undo_button, self.reset_button):
            button.setEnabled(self._on)

    def _chosen_image(self) -> Optional[Image]:
        name = self.image_combo.currentText()
        layer = self.viewer.layers[name] if name and name in self.viewer.layers else None
        return layer if isinstance(layer, Image) else None

    def _target(self) -> Optional[Labels]:
        name = self.labels_combo.currentText()
        layer = self.viewer.layers[name] if name and name != NEW_LABELS and name in self.viewer.layers else None
        return layer if isinstance(layer, Labels) else None

    # ------------------------------------------------------------------ the mode
    def _on_start_toggled(self, checked: bool):
        if checked:
            self.start()
        else:
            self.stop()

    def start(self) -> bool:
        """Turn the click mode on for the chosen image (an error in the status line otherwise)."""
        if self._on:
            return True
        try:
            image = self._check_image(self._chosen_image())
            self._check_model()
        except ValueError as err:
            self._error(str(err))
            self._set_button(False)
            return False
        self._image = image
        ndim = _spatial_ndim(image)
        shape = _spatial_shape(image)
        geometry = dict(scale=image.scale[-ndim:], translate=image.translate[-ndim:])
        self._stopping = True          # the layers added below are ours: not a reason to stop
        try:
            self._preview = self.viewer.add_labels(np.zeros(shape, np.uint8), name=PREVIEW, opacity=0.55,
                                                   **geometry)
            _colour_preview(self._preview)
            size = max(3.0, min(shape[-2:]) / 40)
            self._prompts = self.viewer.add_points(np.empty((0, ndim)), name=PROMPTS, size=size,
                                                   border_color="white", border_width=0.15, **geometry)
        finally:
            self._stopping = False
        self._prompts.events.mode.connect(self._keep_pan_zoom)
        self._bind_keys(self._prompts)
        self.viewer.mouse_drag_callbacks.append(self._on_mouse)
        self.viewer.layers.selection.active = self._prompts
        self._on = True
        self._set_button(True)
        self._clear_object()
        self._update_controls()
        self.status.setText(f"Click on {image.name}: left inside the object, Shift or right outside it.")
        return True

    def stop(self, message: str = "Stopped.") -> None:
        """Turn the click mode off: our layers go, and with them our keys; napari's come back."""
        if not self._on:
            self._set_button(False)
            return
        self._on = False
        self._negative_clicks = False
        self._stopping = True
        try:
            self._number += 1                       # whatever runs now is stale
            self._pending = self._awaiting = None
            self._commit_when_ready = False
            if self._on_mouse in self.viewer.mouse_drag_callbacks:
                self.viewer.mouse_drag_callbacks.remove(self._on_mouse)
            self._restore_pan()
            for layer in (self._prompts, self._box_layer, self._preview):
                if layer is not None and layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
            self._prompts = self._box_layer = self._preview = None
            self._image = None
        finally:
            self._stopping = False
        self._set_button(False)
        self._update_controls()
        self._refresh_layers()
        self.status.setText(message)

    def _set_button(self, on: bool):
        self.start_button.blockSignals(True)
        self.start_button.setChecked(on)
        self.start_button.setText("Stop" if on else "Start")
        self.start_button.blockSignals(False)

    def _check_image(self, layer: Optional[Image]) -> Image:
        if layer is None:
            raise ValueError("No image layer: open an image first (File > Open, or File > Open Sample > MedRWKV).")
        if layer.multiscale:
            raise ValueError(f"{layer.name} is multiscale; Click to fix works on single-scale images.")
        ndim = _spatial_ndim(layer)
        if ndim not in (2, 3):
            raise ValueError(f"{layer.name} has {ndim} spatial dimensions {layer.data.shape}; Click to fix works "
                             "on 2-D images and stacks (Z, Y, X).")
        self._check_view(layer)
        return layer

    def _check_view(self, layer: Image):
        dims = self.viewer.dims
        if dims.ndisplay != 2:
            raise ValueError("Click to fix works in the 2-D view: switch napari to 2-D first.")
        if _spatial_ndim(layer) == 3 and tuple(dims.displayed) != (dims.ndim - 2, dims.ndim - 1):
            raise ValueError(f"{layer.name} is a stack: show it with Y and X on screen (slices along the first "
                             "axis) to click on one slice.")

    def _check_model(self) -> str:
        source = self.model_combo.currentText()
        if not source or source == BROWSE:
            raise ValueError("Choose a prompt-aware model first (Model > Checkpoint file… when none is listed).")
        if not prompt_aware(source):
            raise ValueError(f"{source} is not a prompt-aware model: it takes no clicks.")
        return source

    def _keep_pan_zoom(self, event=None):
        """The prompts layer is drawn by the widget: napari's own point tools stay off on it."""
        if self._prompts is not None and str(self._prompts.mode) != PAN_ZOOM:
            self._prompts.mode = PAN_ZOOM
            self.status.setText("The prompts layer follows your clicks on the canvas: no tool needed.")

    def _bind_keys(self, layer):
        bindings = {"C": self.commit, "Z": self.undo_prompt, "Control-Z": self.undo_prompt, "R": self.reset,
                    "Escape": self.reset, "F": self.fix_under_cursor, "T": self.toggle_polarity}
        for key, method in bindings.items():
            layer.bind_key(key, lambda _layer, method=method: method(), overwrite=True)

    def hideEvent(self, event):
        if not event.spontaneous():                 # the dock closed, not the window minimised
            self.stop()
        super().hideEvent(event)

    # ------------------------------------------------------------------ mouse
    def _on_mouse(self, viewer, event):
        """Clicks add points (on release, when the mouse barely moved: a drag pans); Ctrl+drag a box."""
        if not self._on:
            return
        try:
            self._check_view(self._image)
        except ValueError as err:
            self.status.setText(str(err))
            return
        active = viewer.layers.selection.active
        if active is not None and active is not self._prompts and str(getattr(active, "mode", PAN_ZOOM)) != PAN_ZOOM:
            return                                   # another layer's tool (paint, select...) has the click
        modifiers = {str(getattr(m, "name", m)) for m in event.modifiers}
        if "Control" in modifiers and event.button == 1:
            yield from self._drag_box(viewer, event)
            return
        start = np.asarray(event.pos, dtype=float)
        position, button = tuple(event.position), event.button
        yield
        dragged = False
        while event.type == "mouse_move":
            dragged = dragged or np.hypot(*(np.asarray(event.pos, float) - start)) > DRAG_PIXELS
            yield
        if not dragged and button in (1, 2):
            inside = button == 1 and "Shift" not in modifiers
            self.add_point(position, positive=inside != (self._negative_clicks and button == 1))

    def _drag_box(self, viewer, event):
        self._pan_before = viewer.camera.mouse_pan
        viewer.camera.mouse_pan = False
        corner = tuple(event.position)
        try:
            yield
            while event.type == "mouse_move":
                self._draw_box(corner, tuple(event.position))
                yield
            self.set_box(corner, tuple(event.position))
        finally:
            self._restore_pan()

    def _restore_pan(self):
        if self._pan_before is not None:
            self.viewer.camera.mouse_pan = self._pan_before
            self._pan_before = None

    # ------------------------------------------------------------------ prompts
    def _to_pixel(self, world_position, what: str = "The click") -> Tuple[Optional[int], int, int]:
        """(slice or None, row, col) of a world position in the image, or ValueError naming it."""
        data = self._image.world_to_data(world_position)
        ndim = _spatial_ndim(self._image)
        coords = [int(np.floor(v + 0.5)) for v in list(data)[-ndim:]]
        shape = _spatial_shape(self._image)
        if not all(0 <= c < n for c, n in zip(coords, shape)):
            shown = ", ".join(f"{v:.1f}" for v in list(data)[-ndim:])
            size = "x".join(str(n) for n in shape)
            raise ValueError(f"{what} at ({shown}) lies outside {self._image.name} ({size}): "
                             f"{'click' if what == 'The click' else 'point'} on the image.")
        return (coords[0] if ndim == 3 else None), coords[-2], coords[-1]

    def _enter_slice(self, index: Optional[int]) -> str:
        """Prompts belong to one slice: a prompt on another slice starts a new object there (and
        the returned note says so)."""
        note = ""
        if index != self._slice and (self._actions or self._fix_id is not None):
            note = f"Slice {index}: a new object (the one on slice {self._slice} was not committed). "
            self._clear_object()
        self._slice = index
        return note

    def add_point(self, world_position, positive: bool = True) -> bool:
        """A prompt at a world position (what a click does); False with a message when outside the image."""
        if not self._on:
            return False
        try:
            index, row, col = self._to_pixel(world_position)
        except ValueError as err:
            self._error(str(err))
            return False
        self._note = self._enter_slice(index)
        self._actions.append(("point", (row, col, bool(positive))))
        self.viewer.layers.selection.active = self._prompts      # the keys act on it
        self._update()
        return True

    def set_box(self, world_corner, world_other) -> bool:
        """A box prompt between two world positions (what a Ctrl+drag does)."""
        if not self._on:
            return False
        data = [np.asarray(self._image.world_to_data(p))[-2:] for p in (world_corner, world_other)]
        (r0, c0), (r1, c1) = np.minimum(*data), np.maximum(*data)
        height, width = _spatial_shape(self._image)[-2:]
        r0, c0 = max(0, int(np.floor(r0 + 0.5))), max(0, int(np.floor(c0 + 0.5)))
        r1, c1 = min(height, int(np.floor(r1 + 0.5)) + 1), min(width, int(np.floor(c1 + 0.5)) + 1)
        if r1 - r0 < 2 or c1 - c0 < 2:
            self._draw_shapes()
            self._error("The box covers no part of the image: Ctrl+drag across the object.")
            return False
        try:
            index = self._to_pixel(world_corner)[0] if _spatial_ndim(self._image) == 3 else None
        except ValueError:                            # a corner outside the image: the slice is still the one shown
            index = self._current_slice()
        self._note = self._enter_slice(index)
        self._actions.append(("box", (r0, c0, r1, c1)))
        self.viewer.layers.selection.active = self._prompts
        self._update()
        return True

    def toggle_polarity(self) -> None:
        """T: plain left clicks add points outside the object (for a mouse or trackpad without a right
        button), until T again; Shift+click then adds points inside."""
        if not self._on:
            return
        self._negative_clicks = not self._negative_clicks
        self.status.setText("Left clicks now add points OUTSIDE the object (red); T switches back." if
                            self._negative_clicks else "Left clicks add points inside the object (green) again.")

    def _current_slice(self) -> Optional[int]:
        if _spatial_ndim(self._image) != 3:
            return None
        z = int(np.floor(self._image.world_to_data(self.viewer.dims.point)[0] + 0.5))
        return min(max(z, 0), _spatial_shape(self._image)[0] - 1)

    def undo_prompt(self) -> None:
        if not self._on:
            return
        if not self._actions:
            target = self._target()
            hint = f" (to undo a commit, select {target.name} and press Ctrl+Z)" if target is not None else ""
            self.status.setText(f"No prompt to undo{hint}.")
            return
        self._actions.pop()
        self._note = ""
        self._update()

    def reset(self) -> None:
        if not self._on:
            return
        self._clear_object()
        self.status.setText("Reset: click on the next object.")

    def _clear_object(self):
        self._object += 1
        self._number += 1                       # answers for the old object are stale
        self._pending = self._awaiting = None
        self._commit_when_ready = False
        self._actions, self._start_mask, self._fix_id, self._slice = [], None, None, None
        self._note = ""
        self._cache.clear()
        self._show(None, self._state())
        self._draw_prompts()

    def fix_under_cursor(self) -> bool:
        """F: start from the object under the mouse in the chosen Labels layer."""
        return self.fix_object_at(self.viewer.cursor.position)

    def fix_object_at(self, world_position) -> bool:
        if not self._on:
            return False
        target = self._target()
        if target is None:
            self._error("Choose the Labels layer whose object to fix (Labels).")
            return False
        try:
            index, row, col = self._to_pixel(world_position, "The cursor")
            self._check_target(target)
        except ValueError as err:
            self._error(str(err))
            return False
        plane = np.asarray(target.data if index is None else target.data[index])
        object_id = int(plane[row, col])
        if object_id == 0:
            self.status.setText(f"No object of {target.name} under the cursor: point at one and press F.")
            return False
        self._clear_object()
        self._slice, self._fix_id = index, object_id
        self._start_mask = plane == object_id
        self._show(self._start_mask, self._state())
        where = "" if index is None else f" on slice {index}"
        self.status.setText(f"Fixing object {object_id} of {target.name}{where}: click to correct it, C to commit "
                            "(its pixels are replaced under the same id).")
        return True

    # ------------------------------------------------------------------ requests
    def _state(self) -> tuple:
        return self._object, self._slice, tuple(self._actions)

    def _points(self) -> List[tuple]:
        return [value for kind, value in self._actions if kind == "point"]

    def _box(self) -> Optional[tuple]:
        boxes = [value for kind, value in self._actions if kind == "box"]
        return boxes[-1] if boxes else None

    def _update(self):
        """The prompts changed: draw them and show (or request) the object they describe."""
        self._draw_prompts()
        self._number += 1
        if self._pending is not None:           # a queued request for older prompts never runs
            self.dropped += 1
        self._pending = self._awaiting = None
        key = self._state()
        if key in self._cache:
            self._show(self._cache[key], key)
            self.status.setText(self._describe())
            return
        if not self._actions:
            self._show(self._start_mask, key)
            self.status.setText(self._describe())
            return
        if not any(p[2] for p in self._points()) and self._box() is None and self._start_mask is None:
            self._show(None, key)
            self.status.setText("A point outside the object alone says nothing of where it is: click inside it.")
            return
        try:
            source = self._check_model()
        except ValueError as err:
            self._error(str(err))
            return
        mask = self._mask if self._mask is not None and self._mask.any() else self._start_mask
        self._pending = Job(self._number, "refine", source, self.device_combo.currentText(), key=key,
                             image=self._plane(self._slice), points=tuple(self._points()), box=self._box(),
                             mask=mask)
        self._awaiting = self._number
        loaded = (source, self._pending.device) in self._models
        self.status.setText(self._note + ("Refining…" if loaded else
                                          f"Loading {_short(source)} (the first click only)…"))
        self._run_next()

    def _plane(self, index: Optional[int]) -> np.ndarray:
        return np.asarray(self._image.data if index is None else self._image.data[index])

    def _run_next(self):
        if self.worker is not None:
            return
        if self._carries:
            job = self._carries.pop(0)
        elif self._pending is not None:
            job, self._pending = self._pending, None
        else:
            return
        self.worker = make_worker(job, self._models)
        self.worker.returned.connect(lambda outcome, job=job: self._on_outcome(job, outcome))
        self.worker.finished.connect(self._on_finished)
        self.worker.start()

    def _on_finished(self):
        self.worker = None
        self._run_next()

    def _on_outcome(self, job: Job, outcome):
        kind, value = outcome
        if job.kind == "carry":
            self._finish_carry(job, outcome)
            return
        if kind == "done" and len(self._cache) < CACHE_SIZE:
            self._cache[job.key] = value          # right for its prompts even when stale (undo shows it)
        if job.number != self._number or not self._on:
            self.dropped += 1
            return
        self._awaiting = None
        if kind == "error":
            self._commit_when_ready = False
            self._error(f"Refining failed: {value}")
            return
        self._show(value, job.key)
        self.shown += 1
        self.status.setText(f"{self._describe()} (redrawn in {job.seconds:.2f} s)")
        if self._commit_when_ready:
            self._commit_when_ready = False
            self.commit()

    def busy(self) -> str:
        return "Click to fix: refining an object" if self.worker is not None else ""

    def stop_for_quit(self) -> None:
        self._pending = None
        self._carries.clear()
        self._number += 1

    def _describe(self) -> str:
        points = self._points()
        positive = sum(p[2] for p in points)
        parts = [f"{positive} inside", f"{len(points) - positive} outside"] + (["a box"] if self._box() else [])
        size = int(self._mask.sum()) if self._mask is not None else 0
        fixing = f"Fixing object {self._fix_id}: " if self._fix_id is not None else ""
        return f"{self._note}{fixing}{', '.join(parts)}; the object has {size} pixels. C commits it."

    # ------------------------------------------------------------------ drawing
    def _show(self, mask: Optional[np.ndarray], key: Optional[tuple]):
        self._mask = None if mask is None else np.asarray(mask, dtype=bool)
        self._shown_key = key
        layer = self._preview
        if layer is None or layer not in self.viewer.layers:
            return
        data = layer.data
        if self._shown_slice is not None or data.ndim == 2:
            (data if data.ndim == 2 else data[self._shown_slice])[...] = 0
        self._shown_slice = None
        if self._mask is not None:
            index = self._slice if data.ndim == 3 else None
            (data if index is None else data[index])[self._mask] = 1
            self._shown_slice = index
        layer.refresh()

    def _draw_prompts(self):
        layer = self._prompts
        if layer is None:
            return
        points = self._points()
        coords = np.array([([self._slice] if self._slice is not None else []) + [r, c] for r, c, _ in points],
                          dtype=float).reshape(len(points), layer.ndim)
        layer.data = coords
        if points:
            layer.face_color = np.array([POSITIVE if p else NEGATIVE for _, _, p in points])
        layer.refresh()
        self._draw_shapes()

    def _draw_box(self, world_corner, world_other):
        data = [np.asarray(self._image.world_to_data(p)) for p in (world_corner, world_other)]
        self._draw_shapes(data)

    def _draw_shapes(self, corners=None):
        """The box (or the one being dragged, as two data positions) as a rectangle in a Shapes layer."""
        box = self._box()
        if corners is not None:
            (r0, c0), (r1, c1) = corners[0][-2:], corners[1][-2:]
        elif box is not None:
            r0, c0, r1, c1 = box[0] - 0.5, box[1] - 0.5, box[2] - 0.5, box[3] - 0.5
        else:
            if self._box_layer is not None and len(self._box_layer.data):
                self._box_layer.data = []
            return
        ndim = _spatial_ndim(self._image)
        z = [] if ndim == 2 else [self._slice if self._slice is not None else self._current_slice()]
        rectangle = np.array([z + [r0, c0], z + [r0, c1], z + [r1, c1], z + [r1, c0]], dtype=float)
        if self._box_layer is None or self._box_layer not in self.viewer.layers:
            self._stopping = True
            try:
                self._box_layer = self.viewer.add_shapes(
                    [rectangle], shape_type="rectangle", name=BOX, edge_color="yellow", face_color="transparent",
                    edge_width=max(1.0, min(_spatial_shape(self._image)[-2:]) / 200),
                    scale=self._image.scale[-ndim:], translate=self._image.translate[-ndim:])
            finally:
                self._stopping = False
            self.viewer.layers.selection.active = self._prompts
        else:
            self._box_layer.data = [rectangle]
            self._box_layer.shape_type = "rectangle"

    # ------------------------------------------------------------------ commit
    def commit(self) -> int:
        """Write the object into the chosen Labels layer (one undo step); the pixels changed."""
        if not self._on:
            return 0
        if self._awaiting is not None:
            self._commit_when_ready = True          # the newest prompts are being answered: commit that
            self.status.setText("Committing when the object has redrawn…")
            return 0
        if self._shown_key != self._state():
            self._error("The object could not be computed for these prompts: undo the last prompt or reset.")
            return 0
        mask = self._mask
        if mask is None or not mask.any():
            if self._fix_id is None:
                self.status.setText("Nothing to commit: click inside an object first.")
                return 0
            mask = np.zeros(_spatial_shape(self._image)[-2:], bool)     # a fixed object clicked away: delete it
        try:
            target = self._target_or_new()
            self._check_target(target)
            object_id = self._fix_id if self._fix_id is not None else next_id(target.data, target.name)
        except ValueError as err:
            self._error(str(err))
            return 0
        index = self._slice
        plan = dict(target=target, object_id=object_id, index=index, mask=mask, replace=self._fix_id is not None,
                    overwrite=self.overwrite_check.isChecked())
        if index is not None and self.carry_check.isChecked() and mask.any():
            self._start_carry(plan)
            return 0
        changed = self._apply(plan, {})
        if changed or self._fix_id is not None:
            self._clear_object()
        return changed

    def _apply(self, plan: dict, carried: Dict[int, np.ndarray]) -> int:
        target = plan["target"]
        if target not in self.viewer.layers:
            self._error(f"{target.name} is no longer in the viewer; nothing was committed.")
            return 0
        masks = {plan["index"]: plan["mask"], **carried}
        planes = {}
        for index, mask in masks.items():
            before = np.asarray(target.data if index is None else target.data[index])
            planes[0 if index is None else index] = paint_object(before, mask, plan["object_id"],
                                                                 plan["overwrite"], plan["replace"])
        _, changed = review.write_slices(target, planes)
        target.refresh()
        slices = "" if plan["index"] is None else \
            f" on slice{'s' if len(masks) > 1 else ''} {', '.join(str(i) for i in sorted(masks))}"
        verb = "Replaced" if plan["replace"] else "Committed"
        if changed == 0:
            self.status.setText(f"Nothing changed in {target.name}: the object's pixels all belong to other "
                                "objects (tick 'overwrite other objects' to paint over them).")
            return 0
        self.status.setText(f"{verb} object {plan['object_id']} in {target.name}{slices} ({changed} pixels "
                            f"changed). napari's undo (Ctrl+Z on {target.name}) takes it back.")
        return changed

    def _start_carry(self, plan: dict):
        job = Job(self._number, "carry", self.model_combo.currentText(), self.device_combo.currentText(),
                   commit=dict(plan, stack=self._image, limit=self.carry_spin.value()))
        self._clear_object()                         # the object is handed over; the next one can start
        self._carries.append(job)
        self.status.setText(f"Carrying object {plan['object_id']} to the neighbouring slices…")
        self._run_next()

    def _finish_carry(self, job: Job, outcome):
        kind, value = outcome
        if kind == "error":
            self._error(f"Carrying the object failed: {value}; nothing was committed.")
            return
        self._apply(job.commit, value)

    def _target_or_new(self) -> Labels:
        target = self._target()
        if target is not None:
            return target
        image = self._image
        name, i = f"{image.name} objects", 2
        while name in self.viewer.layers:
            name, i = f"{image.name} objects ({i})", i + 1
        ndim = _spatial_ndim(image)
        layer = self.viewer.add_labels(np.zeros(_spatial_shape(image), np.int32), name=name,
                                       scale=image.scale[-ndim:], translate=image.translate[-ndim:])
        review.link(layer, image.name)               # Mark reviewed and Fine-tune know its image
        layers = self.viewer.layers
        if self._preview in layers:                  # under the preview and the prompts, not over them
            layers.move(layers.index(layer), layers.index(self._preview))
        self.labels_combo.setCurrentText(name)
        self.viewer.layers.selection.active = self._prompts
        return layer

    def _check_target(self, target: Labels):
        shape = _spatial_shape(self._image)
        if tuple(target.data.shape) != tuple(shape):
            raise ValueError(f"{target.name} has shape {tuple(target.data.shape)}, {self._image.name} "
                             f"{tuple(shape)}: choose labels of this image (or New labels layer).")

    def _error(self, message: str):
        self.status.setText(message)
        show_error(message)


def _short(source: str) -> str:
    return Path(source).name if source.endswith(".safetensors") else source


def _spatial_ndim(layer: Image) -> int:
    return layer.data.ndim - (1 if layer.rgb else 0)


def _spatial_shape(layer: Image) -> tuple:
    return tuple(layer.data.shape[:_spatial_ndim(layer)])


def _colour_preview(layer: Labels):
    try:
        from napari.utils.colormaps import DirectLabelColormap
        layer.colormap = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: PREVIEW_COLOR})
    except (ImportError, TypeError, ValueError):       # an older napari: its own colour for label 1
        pass


