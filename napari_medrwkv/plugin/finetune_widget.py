"""Fine-tune widget: learn from the reviewed image/labels pairs in the viewer, then re-segment the rest.

The loop: Segment -> Correct (mark slices reviewed) -> Fine-tune -> re-segment the slices
nobody reviewed yet -> Correct ...  The reviewed pairs come from Labels layer metadata
(``plugin.review``); training, evaluation and segmentation are the engine's (``engine.train``,
``engine.evaluate``, ``engine.infer``), run in a napari thread worker.  torch is imported
on first use, never when this module is imported.
"""
import re
import threading
from datetime import datetime
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                            QMessageBox, QProgressBar, QPushButton, QSpinBox, QWidget)

from ..engine.defaults import FEW_SHOT, FEW_SHOT_MINUTES
from ..engine.memory import retain_freed_memory
from . import review, session
from .qt_helpers import (BROWSE, Section, WorkerRelay, add_shortcut, connect_while_alive, fit_dock, follow_layer_list,
                         refill, scrolling_body, shortcut_legend, stop_jobs_on_quit, unwrap_outcome)
from .review import KEY as METADATA_KEY
from .training_curve import TrainingCurve

HOLD_OUT_FRACTION = 0.2          # of the reviewed pairs, when there are at least HOLD_OUT_MIN_PAIRS
HOLD_OUT_MIN_PAIRS = 3
HOLD_OUT_SEED = 0
MODELS_DIR = "~/medrwkv-models"
#: What "Separate touching objects" makes of a binary base model: the distance kind learns in far
#: fewer steps than the thin touching border (engine/instances.py), which a few-shot run needs.
INSTANCE_KIND = "distance"
INSTANCES_TIP = ("Train the base model into an instance model: it also learns each object's distance to its edge, "
                 "and segmenting gives every object (nucleus, cell) its own label. It learns from reviewed labels "
                 "that give touching objects different ids.")

_FINETUNED_SUFFIX = re.compile(r"-finetuned-\d{8}-\d{4}(-\d+)?$")


def few_shot_config(**overrides):
    """An ``engine.train.TrainConfig`` with the few-shot defaults (imports torch)."""
    from ..engine.train import TrainConfig
    return TrainConfig.few_shot(**overrides)


def split_held_out(n: int, fraction: float = HOLD_OUT_FRACTION, seed: int = HOLD_OUT_SEED,
                   minimum: int = HOLD_OUT_MIN_PAIRS) -> Tuple[List[int], List[int]]:
    """(training indices, held-out indices) of ``n`` reviewed pairs: ~``fraction`` (at least 1) held
    out, chosen by a seeded shuffle; with fewer than ``minimum`` pairs nothing is held out."""
    if n < minimum:
        return list(range(n)), []
    count = max(1, int(round(fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in order[count:]), sorted(int(i) for i in order[:count])


def unreviewed_slices(layers) -> List[Tuple[object, object, List[int]]]:
    """``[(labels layer, image layer, slice indices)]``: the slices of Labels layers linked to an
    image in ``layers`` that are not marked reviewed (a 2-D layer is its slice 0)."""
    targets = []
    for layer in layers:
        if getattr(layer, "_type_string", "") != "labels":
            continue
        image_name = review.linked_image(layer)
        if image_name is None or image_name not in layers:
            continue
        image = layers[image_name]
        spatial = image.data.shape[:-1] if getattr(image, "rgb", False) else image.data.shape
        if tuple(spatial) != tuple(layer.data.shape) or layer.data.ndim not in (2, 3):
            continue
        done = set(review.reviewed(layer))
        indices = [i for i in range(review.slice_count(layer)) if i not in done]
        if indices:
            targets.append((layer, image, indices))
    return targets


def default_output(base: str, now: Optional[datetime] = None) -> str:
    """``~/medrwkv-models/<base>-finetuned-<YYYYmmdd-HHMM>.safetensors``, not an existing file."""
    stem = Path(base).stem if base.endswith(".safetensors") else Path(base).name
    stem = _FINETUNED_SUFFIX.sub("", stem) or "model"
    name = f"{stem}-finetuned-{(now or datetime.now()).strftime('%Y%m%d-%H%M')}"
    folder = Path(MODELS_DIR)
    path, i = folder / f"{name}.safetensors", 2
    while path.expanduser().exists():
        path, i = folder / f"{name}-{i}.safetensors", i + 1
    return str(path)


def _held_out_words(count: int) -> str:
    """What the before/after Dice rests on, e.g. "1 held-out reviewed pair (one image: a rough guide)"."""
    if count == 1:
        return "1 held-out reviewed pair (one image: a rough guide; review more slices for a surer figure)"
    return f"{count} held-out reviewed pairs"


class FineTuneWidget(QWidget):
    """Reviewed pairs (+ an optional dataset folder) + base model -> a fine-tuned checkpoint."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        retain_freed_memory()      # before this widget's workers first allocate: they share the kept memory
        self.viewer = napari_viewer
        self.worker = None
        self.result = None                # engine TrainResult of the last finished fine-tune
        self._cancel = threading.Event()
        self._extra_sources: List[str] = []
        self._base_chosen = False         # True once the user (or code) picked a base model
        self._suggested_output = ""
        self._confirmed_output = ""
        self._unsaved = None              # (model, result, before, after) of a run whose weights no place took
        self._last_step: Optional[Tuple[int, int]] = None
        self._compare_kind = ""

        # data
        self.pairs_label = QLabel()
        self.refresh_button = QPushButton("Refresh")
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("optional: a folder with images/ and masks/")
        self.folder_button = QPushButton("Browse…")
        # model and settings
        self.model_combo = QComboBox()
        self.device_combo = QComboBox()
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.1, 24 * 60)
        self.minutes_spin.setDecimals(1)
        self.minutes_spin.setValue(FEW_SHOT_MINUTES)
        self.minutes_spin.setSuffix(" min")
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(0, 100000)
        self.epochs_spin.setSpecialValueText("no limit")
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 0.1)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(FEW_SHOT["lr"])
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(32, 4096)
        self.patch_spin.setSingleStep(32)
        self.patch_spin.setValue(FEW_SHOT["patch_size"])
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 256)
        self.batch_spin.setValue(FEW_SHOT["batch_size"])
        self.samples_spin = QSpinBox()
        self.samples_spin.setRange(1, 1000000)
        self.samples_spin.setValue(FEW_SHOT["samples_per_epoch"])
        self.instances_check = QCheckBox("Separate touching objects")
        self.instances_check.setToolTip(INSTANCES_TIP)
        self.output_edit = QLineEdit()
        self.output_button = QPushButton("Save as…")
        # running and results
        self.run_button = QPushButton("Fine-tune")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.curve = TrainingCurve()
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.resegment_button = QPushButton("Re-segment unreviewed slices")
        self.resegment_button.setEnabled(False)
        self.resegment_button.setToolTip("Segment every slice not marked reviewed with the fine-tuned model; "
                                         "reviewed slices are kept")
        self.save_pairs_button = QPushButton("Save reviewed pairs as training folder…")
        self.save_pairs_button.setToolTip("images/ + masks/ for `medrwkv train` or a bigger machine")

        pairs_row = QHBoxLayout()
        pairs_row.addWidget(self.pairs_label, 1)
        pairs_row.addWidget(self.refresh_button)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_edit, 1)
        folder_row.addWidget(self.folder_button)
        output_row = QHBoxLayout()
        output_row.addWidget(self.output_edit, 1)
        output_row.addWidget(self.output_button)
        form = QFormLayout()
        form.addRow(pairs_row)
        form.addRow("Base model", self.model_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Time budget", self.minutes_spin)
        form.addRow(self.instances_check)
        form.addRow("Save to", output_row)
        settings = QWidget()
        settings_form = QFormLayout(settings)
        settings_form.setContentsMargins(0, 0, 0, 0)
        settings_form.addRow("Dataset folder", folder_row)
        settings_form.addRow("Max epochs", self.epochs_spin)
        settings_form.addRow("Learning rate", self.lr_spin)
        settings_form.addRow("Patch size", self.patch_spin)
        settings_form.addRow("Batch size", self.batch_spin)
        settings_form.addRow("Patches per epoch", self.samples_spin)
        self.settings_section = Section("More settings (folder, learning rate, patches)", settings, expanded=False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = scrolling_body(self)
        layout.addLayout(form)
        layout.addWidget(self.settings_section)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addWidget(self.curve, 1)
        layout.addWidget(self.result_label)
        layout.addWidget(self.resegment_button)
        layout.addWidget(self.save_pairs_button)
        layout.addWidget(shortcut_legend([("Shift+T", "fine-tune")]))
        self.run_button.setToolTip("Fine-tune the base model on the reviewed pairs")
        add_shortcut(self, self.run_button, "Shift+T")
        fit_dock(self)

        self._relay = WorkerRelay()
        self._relay.progressed.connect(self._on_progress)
        self._relay.phase.connect(self.status.setText)
        self._relay.tiles.connect(self._on_tiles)
        self.refresh_button.clicked.connect(self.refresh_pairs)
        self.folder_button.clicked.connect(self._browse_folder)
        self.output_button.clicked.connect(self._browse_output)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.resegment_button.clicked.connect(self.resegment)
        self.save_pairs_button.clicked.connect(self.save_pairs)
        self.model_combo.activated.connect(self._on_model_chosen)
        self.model_combo.currentTextChanged.connect(self._suggest_output)
        self.model_combo.currentTextChanged.connect(self._offer_instances)
        follow_layer_list(self, self.viewer.layers, self.refresh_pairs)
        review.follow_renames(self.viewer.layers)   # reviewed pairs survive renaming their image
        connect_while_alive(self, session.changed, self._on_session_changed)
        connect_while_alive(self, review.changed, self.refresh_pairs)    # a slice marked or unmarked anywhere
        stop_jobs_on_quit(self, self.viewer)
        self._fill_models_and_devices()
        self._offer_instances()
        self.refresh_pairs()

    # ------------------------------------------------------------------ data
    def refresh_pairs(self, event=None) -> int:
        """Recount the reviewed pairs in the viewer's Labels layers (on every layer-list change and
        every mark; the Refresh button for anything else); counting reads no pixels, so it stays
        cheap for large or lazy images."""
        counts = [len(review.reviewed(layer)) for layer in self.viewer.layers
                  if getattr(layer, "_type_string", "") == "labels"
                  and review.linked_image(layer) in self.viewer.layers]
        total, layers = sum(counts), sum(1 for c in counts if c)
        self.pairs_label.setText(f"Reviewed pairs: {total} (from {layers} layer{'s' * (layers != 1)})")
        if not self._base_chosen:
            in_use = self._model_in_use()
            if in_use:
                self._select_model(in_use)
        return total

    def _reviewed_pairs(self) -> List[review.ReviewedPair]:
        self.refresh_pairs()
        return review.reviewed_pairs(self.viewer.layers)

    def showEvent(self, event):
        super().showEvent(event)
        self.refresh_pairs()

    def _model_in_use(self) -> Optional[str]:
        """The model that made the reviewed labels (most reviewed slices), if recorded."""
        counts = {}
        for layer in self.viewer.layers:
            source = layer.metadata.get(METADATA_KEY, {}).get("model") if hasattr(layer, "metadata") else None
            if source and review.linked_image(layer) and review.reviewed(layer):
                counts[source] = counts.get(source, 0) + len(review.reviewed(layer))
        return max(counts, key=counts.get) if counts else None

    def _window_in_use(self):
        """The intensity window Segment showed the model the reviewed images through (most reviewed
        slices; "percentiles" for none), which fine-tuning learns with and records; None when no layer
        says (the base model's own)."""
        counts = {}
        for layer in self.viewer.layers:
            window = layer.metadata.get(METADATA_KEY, {}).get("window") if hasattr(layer, "metadata") else None
            if window is not None and review.linked_image(layer) and review.reviewed(layer):
                key = window if isinstance(window, str) else tuple(window)
                counts[key] = counts.get(key, 0) + len(review.reviewed(layer))
        return max(counts, key=counts.get) if counts else None

    def _browse_folder(self):
        folder = QFileDialog.getExistingDirectory(self, "Dataset folder (images/ + masks/)", self.folder_edit.text())
        if folder:
            self.folder_edit.setText(folder)

    # ------------------------------------------------------------------ models
    def _fill_models_and_devices(self):
        from ..engine.model import available_devices, list_automatic
        model, device = self.model_combo.currentText(), self.device_combo.currentText()
        gone = session.forgotten()
        sources = [source for source in dict.fromkeys(list_automatic() + session.registered() + session.opened()
                                                      + self._extra_sources) if source not in gone]
        refill(self.model_combo, sources + [BROWSE], [model] if model in sources else [])
        self.device_combo.clear()
        self.device_combo.addItems(available_devices())
        if device:
            self.device_combo.setCurrentText(device)
        self._suggest_output()

    def _on_session_changed(self, source=None):
        self._fill_models_and_devices()

    def _select_model(self, source: str):
        if self.model_combo.findText(source) < 0:
            if source.endswith(".safetensors") and source not in session.registered():
                source = session.add_file(source)         # every model menu lists it
            else:
                self._extra_sources.append(source)
            self._fill_models_and_devices()
        self.model_combo.setCurrentText(source)

    def add_model_source(self, source: str):
        """Offer a checkpoint path (or a model name) as the base model and select it."""
        self._base_chosen = True
        self._select_model(str(source))

    def _on_model_chosen(self, index: int):
        if self.model_combo.itemText(index) != BROWSE:
            self._base_chosen = True
            return
        path, _ = QFileDialog.getOpenFileName(self, "Base model checkpoint", "", "Checkpoints (*.safetensors)")
        if path:
            self.add_model_source(path)

    def _offer_instances(self, *_):
        """The instance switch fits the base model: ticked and fixed for an instance model, open to a
        binary one, off for anything else (a model of several classes, a prompt-aware one)."""
        from ..engine.model import read_model_info
        source = self.model_combo.currentText()
        try:
            info = read_model_info(source) if source and source != BROWSE else None
        except (ValueError, OSError):
            info = None
        already = bool(info and info.instances)
        possible = bool(info and not info.instances and info.num_classes == 1 and not info.prompt_channels)
        self.instances_check.setEnabled(possible)
        if already or not possible:
            self.instances_check.setChecked(already)
        self.instances_check.setToolTip(INSTANCES_TIP + (
            "\nThe base model is an instance model already." if already else
            "" if possible else "\nThis base model cannot become one: only a binary (foreground) model can."))

    def _suggest_output(self, *_):
        """Prefill the checkpoint path from the base model, unless the user typed or chose one."""
        base = self.model_combo.currentText()
        if not base or base == BROWSE:
            return
        if self.output_edit.text() in ("", self._suggested_output):
            self._suggested_output = default_output(base)
            self.output_edit.setText(self._suggested_output)

    def _browse_output(self):
        start = str(Path(self.output_edit.text() or default_output("model")).expanduser())
        path, _ = QFileDialog.getSaveFileName(self, "Save the fine-tuned model as", start,
                                              "Checkpoints (*.safetensors)")
        if path:
            if not path.endswith(".safetensors"):
                path += ".safetensors"
            self.output_edit.setText(path)
            self._confirmed_output = str(Path(path).expanduser())   # the dialog asked about replacing
            if self._unsaved is not None:
                self._save_unsaved(Path(self._confirmed_output))

    def _save_unsaved(self, path: Path) -> None:
        """Save the weights of a finished run that no place took before, at ``path`` (chosen
        with Save as…, which asked about replacing)."""
        from ..engine.checkpoint import CheckpointError, save_checkpoint
        model, result, before, after = self._unsaved
        try:
            save_checkpoint(model.net, path, model.info, overwrite=True)
        except CheckpointError as err:
            self._error(f"The trained model is still not saved: {err}. Choose another place with Save as….")
            return
        self._confirmed_output = ""
        self._unsaved = None
        result.path, result.moved = path, ""
        self._on_trained(("done", (result, before, after)))

    # ------------------------------------------------------------------ fine-tuning
    def run(self):
        """Start fine-tuning (does nothing while something is running)."""
        if self.worker is not None:
            show_info("The Fine-tune widget is busy; wait or cancel first.")
            return
        pairs = self._reviewed_pairs()
        folder = self.folder_edit.text().strip()
        source = self.model_combo.currentText()
        try:
            if not pairs and not folder:
                raise ValueError("Nothing to learn from: mark corrected slices as reviewed (Correct widget), "
                                 "or choose a dataset folder (images/ + masks/).")
            if not source or source == BROWSE:
                raise ValueError("Choose a base model or a checkpoint file first.")
            chosen = self._output_path()
        except ValueError as err:
            self._error(str(err))
            return
        if chosen is None:
            return
        out, replace = chosen
        train_idx, held_idx = split_held_out(len(pairs))
        # Copies of the masks: the user may keep correcting while the worker reads them.
        as_items = [(p.image, np.array(p.mask, copy=True)) for p in pairs]
        train_items = [as_items[i] for i in train_idx]
        held_out = [as_items[i] for i in held_idx]
        compare = held_out or train_items                 # before/after set
        self._compare_kind = _held_out_words(len(held_out)) if held_out else \
            f"the {len(compare)} training pair(s) (fewer than 3 reviewed pairs, none held out)" if compare else ""
        settings = dict(lr=self.lr_spin.value(), patch_size=self.patch_spin.value(),
                        batch_size=self.batch_spin.value(), samples_per_epoch=self.samples_spin.value(),
                        seed=HOLD_OUT_SEED, window=self._window_in_use())
        if self.instances_check.isChecked() and self.instances_check.isEnabled():
            settings["instances"] = INSTANCE_KIND
        command = self._provenance(pairs, train_idx, held_idx, folder)
        self._cancel.clear()
        self._last_step = None
        self.curve.clear()
        self.result_label.setText("")
        self.resegment_button.setEnabled(False)
        self._set_running(True)
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setValue(0)
        self.status.setText(f"Fine-tuning {Path(source).stem if source.endswith('.safetensors') else source} "
                            f"on {len(train_items)} reviewed pair(s){' + ' + folder if folder else ''}…")
        self.worker = self._make_train_worker(
            source, self.device_combo.currentText(), train_items, folder or None, compare, str(out), replace,
            self.epochs_spin.value() or None, self.minutes_spin.value(), settings, command)
        self.worker.returned.connect(self._on_trained)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()

    def _error(self, message: str) -> None:
        """An error the user must act on: in the status line (which stays) and as a notification."""
        self.status.setText(message)
        show_error(message)

    def cancel(self):
        """Stop: training keeps (and saves) the best model so far; a re-segmentation changes nothing."""
        if self.worker is not None:
            self._cancel.set()
            self.status.setText("Cancelling… (the best model so far is kept)")

    def busy(self) -> str:
        """What runs, or what quitting would lose, for the question napari asks on quitting ("" when idle)."""
        if self._unsaved is not None:
            return "Fine-tune: a trained model that could not be saved (quitting discards it; use Save as…)"
        return f"Fine-tune: {self.status.text()}" if self.worker is not None else ""

    def stop_for_quit(self) -> None:
        self.cancel()

    def _output_path(self) -> Optional[Tuple[Path, bool]]:
        """Where to save, and whether the user agreed to replace a file there; None when they did not."""
        text = self.output_edit.text().strip()
        if not text:
            raise ValueError("Choose where to save the fine-tuned model (Save as…).")
        out = Path(text).expanduser()
        if out.suffix != ".safetensors":
            raise ValueError(f"{out}: save the model as a .safetensors file, e.g. {out.stem}.safetensors")
        if out.is_dir():
            raise ValueError(f"{out} is a folder; give a file name ending in .safetensors")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"Cannot create the folder {out.parent}: {err}") from None
        confirmed, self._confirmed_output = self._confirmed_output, ""   # Save as… answers for one round
        if not out.exists():
            # Replacing was not agreed to: a file another program makes there while training runs
            # is kept, and the weights go beside it (the status line says where).
            return out, False
        if str(out) != confirmed:
            answer = QMessageBox.question(self, "Replace checkpoint?", f"{out} exists. Replace it?",
                                          QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                          QMessageBox.StandardButton.No)
            if answer != QMessageBox.StandardButton.Yes:
                return None
        return out, True

    @staticmethod
    def _provenance(pairs, train_idx, held_idx, folder) -> str:
        def names(indices):
            return ", ".join(f"{pairs[i].labels_name}[{pairs[i].index}]" for i in indices) or "none"
        text = f"napari Fine-tune widget: trained on reviewed {names(train_idx)}"
        if folder:
            text += f" + dataset folder {folder}"
        return text + f"; held out: {names(held_idx)}"

    def _make_train_worker(self, source, device, train_items, folder, compare, out, replace, epochs, minutes,
                           settings, command):
        relay, cancel = self._relay, self._cancel

        @thread_worker
        def work():
            # Outcomes come back as values: an exception leaving a worker would surface as a
            # traceback in the event loop, where users should see a notification.
            from ..engine.datasets import find_pairs
            from ..engine.infer import Cancelled
            from ..engine.model import load_model
            from ..engine.train import WeightsNotSaved, train
            try:
                relay.phase.emit(f"Loading {source}…")
                model = load_model(source, device=device)
                items = list(train_items) + (find_pairs(folder) if folder else [])
                if compare:
                    relay.phase.emit(f"Measuring the base model on {len(compare)} pair(s), then training…")
                else:
                    relay.phase.emit("Training…")
                result = train(model, items, out=out, epochs=epochs, max_minutes=minutes, device=device,
                               progress=relay.progressed.emit, cancel=cancel.is_set,
                               val_data=compare or None, config=few_shot_config(**settings), command=command,
                               overwrite=replace)
                # train scores the start and the epochs on ``compare`` as evaluate would (segment
                # with the model's settings): "before" is the start, "after" what it kept, never lower.
                before, after = (result.start_val_dice, result.best_val_dice) if compare else (None, None)
            except Cancelled:
                return "cancelled", None
            except WeightsNotSaved as err:       # finished work, kept in memory until saved somewhere
                before, after = (err.result.start_val_dice, err.result.best_val_dice) if compare else (None, None)
                return "unsaved", (str(err), (err.model, err.result, before, after))
            except Exception as err:  # noqa: BLE001 -- reported to the user, never swallowed
                return "error", str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
            return "done", (result, before, after)

        return work()

    def _on_progress(self, progress):
        if progress.epoch == 0:              # the starting weights' score: the chart's "before" line
            self.curve.set_baseline(progress.val_dice)
            return
        self.progress_bar.setValue(int(round(1000 * progress.fraction)))
        key = (progress.epoch, progress.step)
        last = self._last_step
        epoch_end = progress.val_dice is not None or key == last or \
            (last is not None and progress.epoch == last[0] and progress.step != last[1] + 1)
        if epoch_end:
            if progress.val_dice is not None:
                self.curve.add_val_dice(progress.val_dice)
            return
        self._last_step = key
        self.curve.add_loss(progress.loss)
        epochs = f"/{progress.epochs}" if progress.epochs else ""
        self.status.setText(f"Epoch {progress.epoch}{epochs}, step {progress.step}/{progress.steps_per_epoch}: "
                            f"loss {progress.loss:.3f} ({progress.elapsed:.0f} s)")

    def _on_trained(self, outcome):
        if outcome[0] == "unsaved":
            message, self._unsaved = outcome[1]
            self._error(f"Training finished, but the model could not be saved: {message}. It is kept until you "
                        "save it: choose a place with Save as….")
            return
        value = unwrap_outcome(outcome, self.status, "Fine-tuning",
                               "Cancelled before training started; nothing was saved.", show_error)
        if value is None:
            return
        result, before, after = value
        self.result = result
        path = str(result.path)
        self._base_chosen = True
        session.register(path)              # every open model list refreshes
        self._select_model(path)             # the next round starts from this model
        how = "Cancelled" if result.cancelled else "Done"
        best = "the best so far" if result.cancelled else "the best"
        if result.best_epoch == 0:
            kept = (f"no epoch beat the starting model on {self._compare_kind or 'the validation images'}, "
                    "so its weights were kept")
        else:
            kept = f"kept epoch {result.best_epoch} ({best})"
            if result.blend < 1:
                kept += f", blended with the starting model ({result.blend:.0%} the epoch's)"
            elif result.blend_val_dice is not None:
                kept += f"; its blend with the starting model scored lower ({result.blend_val_dice:.2f})"
        saved = f"Saved {path}" + (f" ({result.moved})" if result.moved else "")
        self.status.setText(f"{how}: {len(result.history)} epoch(s) in {result.minutes:.1f} min; {kept}. "
                            f"{saved}; it is in the model lists of this session.")
        self.curve.set_kept(result.best_val_dice)
        # An instance model is ranked by the DSB2018 object score (engine/train.validate), not Dice.
        score = "DSB object score" if result.model.info.instances else "Dice"
        if before is not None and after is not None:
            self.result_label.setText(f"{score} on {self._compare_kind}: before {before:.2f} → after {after:.2f}")
        elif result.best_val_dice is not None:
            self.result_label.setText(f"Best validation {score} (held out from the dataset folder): "
                                      f"{result.best_val_dice:.2f}")
        targets = unreviewed_slices(self.viewer.layers)
        count = sum(len(indices) for _, _, indices in targets)
        self.resegment_button.setEnabled(bool(count))
        if count and result.best_epoch != 0:      # the start kept: re-segmenting would change nothing
            self.status.setText(self.status.text() + f" Re-segment the {count} unreviewed slice(s) with it?")

    def _on_finished(self):
        self.worker = None
        self._set_running(False)

    def _set_running(self, running: bool):
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.save_pairs_button.setEnabled(not running)
        if running:
            self.resegment_button.setEnabled(False)

    # ------------------------------------------------------------------ re-segmenting
    def resegment(self):
        """Segment every unreviewed slice with the fine-tuned model, after asking; reviewed slices stay."""
        if self.worker is not None:
            show_info("The Fine-tune widget is busy; wait or cancel first.")
            return
        if self.result is None:
            self._error("Fine-tune a model first.")
            return
        targets = unreviewed_slices(self.viewer.layers)
        count = sum(len(indices) for _, _, indices in targets)
        if not count:
            show_info("Every slice of the labelled images is reviewed; nothing to re-segment.")
            return
        lines = "\n".join(f"• {layer.name}: " + ("the image" if layer.data.ndim == 2 else
                                                 f"slice(s) {', '.join(str(i) for i in indices)}")
                          for layer, _, indices in targets)
        answer = QMessageBox.question(
            self, "Re-segment unreviewed slices?",
            f"Re-segment {count} unreviewed slice(s) with {self.result.model.name}?\n\n{lines}\n\n"
            "Their current labels are replaced (one undo step per labels layer); reviewed slices are kept.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.Yes)
        if answer != QMessageBox.StandardButton.Yes:
            return
        jobs = []
        for layer, image, indices in targets:
            data, axis = np.asarray(image.data), review.slice_axis(layer)     # a scan's acquired planes
            planes = data if layer.data.ndim == 2 else np.moveaxis(np.take(data, indices, axis=axis), axis, 0)
            jobs.append((layer.name, indices, planes, bool(image.rgb)))
        self._cancel.clear()
        self._set_running(True)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.status.setText(f"Re-segmenting {count} slice(s) with {self.result.model.name}…")
        self.worker = self._make_segment_worker(self.result.model, jobs)
        self.worker.returned.connect(self._on_resegmented)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()

    def _make_segment_worker(self, model, jobs):
        relay, cancel = self._relay, self._cancel

        @thread_worker
        def work():
            from ..engine.infer import Cancelled, segment
            total, done, results = sum(len(job[1]) for job in jobs), 0, []
            try:
                for name, indices, data, rgb in jobs:
                    def tick(i, n, before=done, size=len(indices)):   # tiles of this job -> overall per mille
                        relay.tiles.emit(int(1000 * (before + size * i / n) / total), 1000)
                    labels = segment(data, model=model, rgb=rgb, cancel=cancel.is_set, progress=tick)
                    done += len(indices)
                    results.append((name, indices, labels))
            except Cancelled:
                return "cancelled", None
            except Exception as err:  # noqa: BLE001
                return "error", str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
            return "done", results

        return work()

    def _on_tiles(self, done: int, total: int):
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(min(done, total))

    def _on_resegmented(self, outcome):
        value = unwrap_outcome(outcome, self.status, "Re-segmentation",
                               "Re-segmentation cancelled; nothing was changed.", show_error)
        if value is None:
            return
        written = changed = 0
        for name, indices, labels in value:
            if name not in self.viewer.layers:
                continue
            layer = self.viewer.layers[name]
            # Slices reviewed while the worker ran stay as they are.
            still_open = set(range(review.slice_count(layer))) - set(review.reviewed(layer))
            planes = dict(zip(indices, [labels] if layer.data.ndim == 2 else labels))
            planes = {i: plane for i, plane in planes.items()
                      if i in still_open and plane.shape == review.plane_shape(layer)}
            changed += review.replace_slices(layer, planes)      # one undo step per layer
            written += len(planes)
            review.record_written(layer, str(self.result.path))
            layer.refresh()
        self.progress_bar.setValue(self.progress_bar.maximum())
        self.status.setText(f"Re-segmented {written} unreviewed slice(s) with {self.result.model.name} ({changed} "
                            "pixels changed; Ctrl+Z on a labels layer undoes it); correct them and mark them "
                            "reviewed for the next round.")

    # ------------------------------------------------------------------ export
    def save_pairs(self):
        """Write the reviewed pairs as images/ + masks/ for `medrwkv train`."""
        pairs = self._reviewed_pairs()
        if not pairs:
            self._error("No reviewed pairs to save: mark corrected slices as reviewed first.")
            return
        folder = QFileDialog.getExistingDirectory(self, "Save the reviewed pairs as a training folder")
        if not folder:
            return
        try:
            review.save_training_folder(pairs, folder)
        except (OSError, ValueError) as err:
            self._error(f"Could not save the training folder: {err}")
            return
        self.status.setText(f"Saved {len(pairs)} reviewed pair(s) to {folder} (images/ + masks/); "
                            f"train on it with: medrwkv train --model M --data {folder} --out FILE")
        show_info(f"Saved {len(pairs)} reviewed pair(s) to {folder}")
