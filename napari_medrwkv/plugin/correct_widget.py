"""Correct widget: fast fixes to a model's mask, and marking slices as reviewed.

napari's own Labels tools paint, erase and fill; this widget adds object-level
helpers (delete / keep the object under a click, split one object at the seeds
clicked inside it, merge the objects clicked, fill holes, remove small objects,
smooth outlines) computed by ``napari_medrwkv.engine.edit`` and written
back through ``Labels.data_setitem`` inside ``Labels.block_history()``, so each
helper action is ONE step of napari's undo (Ctrl+Z) and redo.  For a 3-D stack
every helper acts on the slice shown.  Reviewed slices (``plugin.review``) are what
the Fine-tune widget learns from.  No torch.
"""
from typing import Callable, Optional

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (QComboBox, QFormLayout, QGridLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton,
                            QSpinBox, QVBoxLayout, QWidget)

from ..engine import edit
from . import review
from .qt_helpers import add_shortcut, fit_dock, refill, scrolling_body, shortcut_legend

DELETE, KEEP = "delete", "keep"
SPLIT, MERGE = "split", "merge"          # click modes that collect clicks, then Apply acts on them all
PAN_ZOOM = "pan_zoom"
NO_LABELS = "No labels layer: segment an image first (Segment widget) or add a Labels layer."


class CorrectWidget(QWidget):
    """Object-level correction helpers and reviewed-slice marks for a Labels layer."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._click_mode: Optional[str] = None
        self._hooked: Optional[Labels] = None      # the layer carrying our mouse callback
        self._mode_before: Optional[str] = None    # that layer's tool before a click mode
        self._watched = set()                      # ids of layers whose name changes we follow
        self._picks = []                           # (slice, y, x) clicked in split / merge mode

        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("The Labels layer to correct (follows the selected Labels layer).")

        self.delete_button = QPushButton("Delete object")
        self.keep_button = QPushButton("Keep object")
        self.split_button = QPushButton("Split object")
        self.merge_button = QPushButton("Merge objects")
        self.apply_picks_button = QPushButton("Apply")
        self._mode_buttons = {DELETE: self.delete_button, KEEP: self.keep_button, SPLIT: self.split_button,
                              MERGE: self.merge_button}
        self.split_button.setToolTip("While on, each click inside one object puts a seed; Apply splits the object "
                                     "into one object per seed (a seeded watershed).")
        self.merge_button.setToolTip("While on, each click picks an object; Apply gives them all the first one's id.")
        self.apply_picks_button.setToolTip("Split or merge at the clicks so far (one undo step).")
        self.apply_picks_button.setEnabled(False)
        self.delete_button.setToolTip("While on, a click on an object in the canvas deletes it.")
        self.keep_button.setToolTip("While on, a click on an object keeps it and deletes every other object "
                                    "(of the current slice).")
        for mode, button in self._mode_buttons.items():
            button.setCheckable(True)
            button.toggled.connect(lambda checked, mode=mode: self._on_mode_toggled(mode, checked))

        self.fill_button = QPushButton("Fill holes")
        self.fill_button.setToolTip("Background enclosed by one object becomes that object.")
        self.small_spin = QSpinBox()
        self.small_spin.setRange(1, 10_000_000)
        self.small_spin.setValue(20)
        self.small_spin.setSuffix(" px")
        self.small_spin.setToolTip("Objects with fewer pixels than this are removed.")
        self.small_button = QPushButton("Remove small objects")
        self.radius_spin = QSpinBox()
        self.radius_spin.setRange(0, 50)
        self.radius_spin.setValue(2)
        self.radius_spin.setSuffix(" px")
        self.radius_spin.setToolTip("Disk radius of the opening and closing; objects thinner than the disk vanish.")
        self.smooth_button = QPushButton("Smooth boundary")

        self.mark_button = QPushButton("Mark reviewed")
        self.mark_button.setToolTip("This slice is correct: fine-tuning learns from reviewed slices.")
        self.unmark_button = QPushButton("Unmark")
        self.review_label = QLabel("")
        self.review_label.setWordWrap(True)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Labels", self.labels_combo)

        click_box = QGroupBox("Click an object")
        click_layout = QVBoxLayout(click_box)
        click_row = QHBoxLayout()
        click_row.addWidget(self.delete_button)
        click_row.addWidget(self.keep_button)
        pick_row = QHBoxLayout()
        pick_row.addWidget(self.split_button)
        pick_row.addWidget(self.merge_button)
        pick_row.addWidget(self.apply_picks_button)
        click_layout.addLayout(click_row)
        click_layout.addLayout(pick_row)

        tidy_box = QGroupBox("Clean up (current slice)")
        grid = QGridLayout(tidy_box)
        grid.addWidget(self.fill_button, 0, 0, 1, 2)
        grid.addWidget(self.small_button, 1, 0)
        grid.addWidget(self.small_spin, 1, 1)
        grid.addWidget(self.smooth_button, 2, 0)
        grid.addWidget(self.radius_spin, 2, 1)

        review_box = QGroupBox("Review")
        review_layout = QVBoxLayout(review_box)
        review_row = QHBoxLayout()
        review_row.addWidget(self.mark_button)
        review_row.addWidget(self.unmark_button)
        review_layout.addLayout(review_row)
        review_layout.addWidget(self.review_label)

        layout = scrolling_body(self)
        layout.addLayout(form)
        layout.addWidget(click_box)
        layout.addWidget(tidy_box)
        layout.addWidget(review_box)
        layout.addWidget(self.status)
        keys = [("Shift+D", "delete"), ("Shift+K", "keep"), ("Shift+F", "fill holes"), ("Shift+R", "remove small"),
                ("Shift+B", "smooth"), ("Shift+M", "mark reviewed"), ("Shift+U", "unmark"), ("Shift+X", "split"),
                ("Shift+J", "merge (join)"), ("Shift+Return", "apply split / merge")]
        layout.addWidget(shortcut_legend(keys))
        layout.addStretch()
        self.small_button.setToolTip("Remove objects with fewer pixels than the size beside it")
        self.smooth_button.setToolTip("Open then close each object with a disk of the radius beside it; "
                                      "neighbouring objects never merge")
        buttons = (self.delete_button, self.keep_button, self.fill_button, self.small_button, self.smooth_button,
                   self.mark_button, self.unmark_button, self.split_button, self.merge_button,
                   self.apply_picks_button)
        for button, (key, _) in zip(buttons, keys):
            add_shortcut(self, button, key)
        fit_dock(self)

        self.fill_button.clicked.connect(self.fill_holes)
        self.apply_picks_button.clicked.connect(self.apply_picks)
        self.small_button.clicked.connect(self.remove_small)
        self.smooth_button.clicked.connect(self.smooth)
        self.mark_button.clicked.connect(lambda: self.mark_reviewed(True))
        self.unmark_button.clicked.connect(lambda: self.mark_reviewed(False))
        self.labels_combo.currentTextChanged.connect(self._on_layer_chosen)

        layers = self.viewer.layers
        review.follow_renames(layers)       # reviewed pairs survive renaming their image
        layers.events.inserted.connect(self._on_inserted)
        layers.events.removed.connect(self._on_removed)
        layers.events.moved.connect(self._refresh_layers)
        layers.selection.events.active.connect(self._on_active)
        self.viewer.dims.events.current_step.connect(self._update_review)
        self.viewer.dims.events.ndisplay.connect(self._update_review)
        for layer in layers:
            self._watch(layer)
        self._refresh_layers()

    # ------------------------------------------------------------------ layer choice
    def _watch(self, layer):
        if isinstance(layer, Labels) and id(layer) not in self._watched:
            layer.events.name.connect(self._refresh_layers)
            self._watched.add(id(layer))

    def _on_inserted(self, event):
        self._watch(event.value)
        self._refresh_layers()

    def _on_removed(self, event):
        layer = event.value
        if id(layer) in self._watched:
            layer.events.name.disconnect(self._refresh_layers)
            self._watched.discard(id(layer))
        if layer is self._hooked:
            self._set_click_mode(None)
        self._refresh_layers()

    def _refresh_layers(self, event=None):
        active = self.viewer.layers.selection.active
        refill(self.labels_combo, [layer.name for layer in self.viewer.layers if isinstance(layer, Labels)],
               [self.labels_combo.currentText(), active.name if isinstance(active, Labels) else None])
        self._on_layer_chosen()

    def _on_active(self, event=None):
        active = self.viewer.layers.selection.active
        if isinstance(active, Labels) and active.name != self.labels_combo.currentText():
            self.labels_combo.setCurrentText(active.name)      # emits currentTextChanged

    def _on_layer_chosen(self, text=None):
        layer = self._current_layer()
        if self._click_mode is not None and layer is not self._hooked:
            if layer is None:
                self._set_click_mode(None)
            else:
                self._set_click_mode(self._click_mode)          # move the click hook to the new layer
        self._update_review()

    def _current_layer(self) -> Optional[Labels]:
        name = self.labels_combo.currentText()
        layer = self.viewer.layers[name] if name and name in self.viewer.layers else None
        return layer if isinstance(layer, Labels) else None

    def _labels_layer(self) -> Labels:
        """The chosen layer, checked for what the helpers handle (ValueError otherwise)."""
        layer = self._current_layer()
        if layer is None:
            raise ValueError(NO_LABELS)
        if layer.multiscale:
            raise ValueError(f"{layer.name} is multiscale; the Correct helpers edit single-scale labels only.")
        if layer.ndim not in (2, 3):
            raise ValueError(f"{layer.name} has {layer.ndim} dimensions {layer.data.shape}; the Correct widget "
                             "handles 2-D labels and 3-D stacks (Z, Y, X).")
        return layer

    def _slice_index(self, layer: Labels, position=None) -> int:
        """The slice shown (0 for a 2-D layer), from the viewer's dims or a clicked world position:
        its index across the layer's slice axis (the first, or a scan's acquired planes), which the
        viewer must be sliding through."""
        if layer.ndim == 2:
            return 0
        axis = review.slice_axis(layer)
        dims = self.viewer.dims
        offset = dims.ndim - layer.ndim
        if dims.ndisplay != 2 or set(dims.displayed) != {offset + a for a in range(3) if a != axis}:
            if axis == 0:
                raise ValueError(f"{layer.name} is a stack: show it in 2-D with Y and X on screen (slices along "
                                 "the first axis) to correct one slice.")
            from ..engine.scans import PLANES
            planes = next(name for name, a in PLANES.items() if a == axis)
            raise ValueError(f"{layer.name}'s slices are its scan's acquired {planes} planes (across axis {axis}): "
                             "show them in 2-D to correct or mark one (napari's Roll dimensions button, under the "
                             f"layer list, until the slider moves across axis {axis}).")
        point = dims.point if position is None else position
        z = int(np.round(layer.world_to_data(point)[axis]))
        if not 0 <= z < layer.data.shape[axis]:
            raise ValueError(f"The slice shown ({z}) is outside {layer.name} (0..{layer.data.shape[axis] - 1}).")
        return z

    @staticmethod
    def _plane(layer: Labels, index: int):
        """Slice ``index`` of ``layer`` (the layer itself when 2-D)."""
        return layer.data if layer.ndim == 2 else review.take_slice(layer.data, index, review.slice_axis(layer))

    @staticmethod
    def _plane_point(layer: Labels, world_position):
        """(row, column) of a world position in the layer's slices."""
        point = np.asarray(layer.world_to_data(world_position), dtype=float)
        if layer.ndim == 3:
            point = np.delete(point, review.slice_axis(layer))
        return tuple(int(v) for v in np.round(point[-2:]))

    # ------------------------------------------------------------------ editing
    def _edit(self, title: str, func: Callable[[np.ndarray], np.ndarray], layer: Optional[Labels] = None,
              index: Optional[int] = None) -> int:
        """Apply ``func`` to the current slice of the layer as ONE undoable step; the number of pixels changed."""
        try:
            layer = layer if layer is not None else self._labels_layer()
            index = index if index is not None else self._slice_index(layer)
        except ValueError as err:
            self._error(str(err))
            return 0
        before = np.asarray(self._plane(layer, index))
        after = func(before)
        indices, values = edit.changed(before, after)
        count = int(indices[0].size)
        where = "" if layer.ndim == 2 else f" (slice {index})"
        if count == 0:
            self.status.setText(f"{title}: nothing to change in {layer.name}{where}.")
            return 0
        if layer.ndim == 3:
            axis = review.slice_axis(layer)
            indices = tuple(indices[:axis]) + (np.full(count, index, dtype=np.intp),) + tuple(indices[axis:])
        with layer.block_history():                 # everything inside is one undo step
            layer.data_setitem(indices, values.astype(layer.data.dtype, copy=False))
        self.status.setText(f"{title}: {count} pixel{'s' if count != 1 else ''} changed in {layer.name}{where}. "
                            "Undo with Ctrl+Z.")
        return count

    def _error(self, message: str) -> None:
        """An error the user must act on: in the status line (which stays) and as a notification."""
        self.status.setText(message)
        show_error(message)

    def fill_holes(self) -> int:
        return self._edit("Fill holes", edit.fill_holes)

    def remove_small(self) -> int:
        size = self.small_spin.value()
        return self._edit(f"Remove objects < {size} px", lambda plane: edit.remove_small(plane, size))

    def smooth(self) -> int:
        radius = self.radius_spin.value()
        return self._edit(f"Smooth (radius {radius})", lambda plane: edit.smooth(plane, radius))

    def apply_at(self, mode: str, layer: Labels, world_position) -> int:
        """Delete or keep the object at a world position of ``layer`` (what a click does)."""
        if self.viewer.dims.ndisplay != 2:
            show_info("Delete / Keep object work in the 2-D view.")
            return 0
        try:
            index = self._slice_index(layer, world_position)
        except ValueError as err:
            self._error(str(err))
            return 0
        y, x = self._plane_point(layer, world_position)
        height, width = review.plane_shape(layer)
        if not (0 <= y < height and 0 <= x < width):
            return 0
        plane = self._plane(layer, index)
        if plane[y, x] == 0:
            self.status.setText("No object under the click (background).")
            return 0
        func = edit.delete_object if mode == DELETE else edit.keep_object
        return self._edit(f"{'Delete' if mode == DELETE else 'Keep'} object {plane[y, x]}",
                          lambda p: func(p, (y, x)), layer, index)

    def pick_at(self, layer: Labels, world_position) -> bool:
        """In split or merge mode: add the clicked pixel to the picks (a seed, an object); whether it counted."""
        try:
            index = self._slice_index(layer, world_position)
        except ValueError as err:
            self._error(str(err))
            return False
        y, x = self._plane_point(layer, world_position)
        height, width = review.plane_shape(layer)
        if not (0 <= y < height and 0 <= x < width):
            return False
        plane = self._plane(layer, index)
        if plane[y, x] == 0:
            self.status.setText("No object under the click (background); click inside an object.")
            return False
        if self._picks and self._picks[0][0] != index:       # another slice: start again there
            self._picks = []
        if self._click_mode == SPLIT and self._picks and plane[y, x] != plane[self._picks[0][1:]]:
            self.status.setText(f"That is object {plane[y, x]}, not object {plane[self._picks[0][1:]]}: every "
                                "seed goes inside the one object to split.")
            return False
        self._picks.append((index, y, x))
        count = len(self._picks)
        where = "" if layer.ndim == 2 else f" (slice {index})"
        if self._click_mode == SPLIT:
            what = f"{count} seed{'s' if count != 1 else ''} in object {plane[y, x]}{where}"
        else:
            ids = list(dict.fromkeys(int(plane[p[1:]]) for p in self._picks))
            what = f"object{'s' if len(ids) != 1 else ''} {', '.join(map(str, ids))} picked{where}"
        self.status.setText(f"{what}; {'Apply splits' if self._click_mode == SPLIT else 'Apply merges'} "
                            f"{'it' if self._click_mode == SPLIT else 'them'} once there are two or more.")
        self.apply_picks_button.setEnabled(count >= 2)
        return True

    def apply_picks(self) -> int:
        """Split (or merge) at the picks so far, as one undo step; the number of pixels changed."""
        picks, mode, layer = self._picks, self._click_mode, self._hooked
        if mode not in (SPLIT, MERGE) or layer is None or len(picks) < 2:
            self.status.setText("Turn on Split or Merge and click two or more times first.")
            return 0
        self._picks = []
        self.apply_picks_button.setEnabled(False)
        index, points = picks[0][0], [p[1:] for p in picks]
        func = edit.split_object if mode == SPLIT else edit.merge_objects
        title = f"Split into {len(points)}" if mode == SPLIT else "Merge"
        try:
            return self._edit(title, lambda plane: func(plane, points), layer, index)
        except ValueError as err:
            self._error(f"{title}: {err}")
            return 0

    # ------------------------------------------------------------------ click modes
    def _on_mode_toggled(self, mode: str, checked: bool):
        if checked:
            self._set_click_mode(mode)
        elif self._click_mode == mode:
            self._set_click_mode(None)

    def _set_click_mode(self, mode: Optional[str]):
        """Turn a click mode on (on the chosen layer) or off (``None``)."""
        self._unhook()
        self._picks = []
        self.apply_picks_button.setEnabled(False)
        layer = None
        if mode is not None:
            try:
                layer = self._labels_layer()
            except ValueError as err:
                self._error(str(err))
                mode = None
        self._click_mode = mode
        for name, button in self._mode_buttons.items():
            button.blockSignals(True)
            button.setChecked(name == mode)
            button.blockSignals(False)
        if layer is not None:
            self._hook(layer)

    def _hook(self, layer: Labels):
        self._hooked = layer
        self._mode_before = str(layer.mode)
        layer.mode = PAN_ZOOM                       # no painting under our clicks
        layer.cursor = "crosshair"
        layer.mouse_drag_callbacks.append(self._on_click)
        layer.events.mode.connect(self._on_layer_mode)
        self.viewer.layers.selection.active = layer  # napari calls the active layer's callbacks
        self.status.setText({SPLIT: f"Click two or more seeds inside one object of {layer.name}, then Apply.",
                             MERGE: f"Click two or more objects of {layer.name}, then Apply."}.get(
            self._click_mode, f"Click an object in {layer.name} to {self._click_mode} it."))

    def _unhook(self):
        layer, self._hooked = self._hooked, None
        if layer is None:
            return
        layer.events.mode.disconnect(self._on_layer_mode)
        if self._on_click in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.remove(self._on_click)
        if str(layer.mode) == PAN_ZOOM:
            layer.cursor = "standard"
            if self._mode_before and self._mode_before != PAN_ZOOM:
                layer.mode = self._mode_before
        self._mode_before = None

    def _on_layer_mode(self, event=None):
        """The user picked another Labels tool (paint, fill...): leave the click mode."""
        if self._hooked is not None and str(self._hooked.mode) != PAN_ZOOM:
            self._mode_before = None
            self._set_click_mode(None)

    def _on_click(self, layer, event):
        if event.type != "mouse_press" or self._click_mode is None or getattr(event, "button", 1) != 1:
            return
        if self._click_mode in (SPLIT, MERGE):
            self.pick_at(layer, event.position)
        else:
            self.apply_at(self._click_mode, layer, event.position)

    def hideEvent(self, event):
        if not event.spontaneous():                 # dock closed or hidden, not the window minimised
            self._set_click_mode(None)
        super().hideEvent(event)

    # ------------------------------------------------------------------ review
    def mark_reviewed(self, value: bool = True) -> None:
        """Mark (or unmark) the slice shown of the chosen layer as reviewed."""
        try:
            layer = self._labels_layer()
            index = self._slice_index(layer)
        except ValueError as err:
            self._error(str(err))
            return
        if value and review.linked_image(layer) not in self.viewer.layers:
            image = self._guess_image(layer)
            if image is not None:
                review.link(layer, image)
        review.set_reviewed(layer, index, value)
        where = "" if layer.ndim == 2 else f" slice {index}"
        self.status.setText(f"{layer.name}{where}: {'reviewed' if value else 'not reviewed'}.")
        self._update_review()

    def _guess_image(self, labels: Labels) -> Optional[str]:
        """The image a Labels layer annotates: same Y/X(/Z) shape, preferring the longest name that
        begins the labels' name ("nuclei" for "nuclei ground truth"); None when ambiguous."""
        fits = []
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                shape = layer.data.shape[:-1] if layer.rgb else layer.data.shape
                if tuple(shape) == tuple(labels.data.shape):
                    fits.append(layer.name)
        prefixed = sorted((n for n in fits if labels.name.startswith(n)), key=len, reverse=True)
        if prefixed:
            return prefixed[0]
        return fits[0] if len(fits) == 1 else None

    def _usable_reviewed(self) -> int:
        """Reviewed slices over all Labels layers that are linked to an image in the viewer."""
        return sum(len(review.reviewed(layer)) for layer in self.viewer.layers
                   if isinstance(layer, Labels) and review.linked_image(layer) in self.viewer.layers)

    def _update_review(self, event=None):
        layer = self._current_layer()
        total = self._usable_reviewed()
        if layer is None or layer.ndim not in (2, 3):
            self.review_label.setText(f"Reviewed: all layers {total}")
            self.mark_button.setEnabled(False)
            self.unmark_button.setEnabled(False)
            return
        marks = review.reviewed(layer)
        count = review.slice_count(layer)
        text = f"Reviewed: this layer {len(marks)} of {count} slice{'s' if count != 1 else ''}; all layers {total}"
        if marks and review.linked_image(layer) not in self.viewer.layers:
            text += "\nNot linked to an image layer: fine-tuning cannot use this layer's slices."
        self.review_label.setText(text)
        try:
            index = self._slice_index(layer)
        except ValueError:
            index = None
        self.mark_button.setEnabled(index is not None and index not in marks)
        self.unmark_button.setEnabled(index is not None and index in marks)
