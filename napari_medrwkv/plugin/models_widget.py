"""The Models widget: the checkpoints users can segment with or fine-tune from (shipped, fine-tuned
in this session, files chosen), with what each is for; and, folded away, every architecture, its
size, the device and the Bi-WKV path in use.

Importing this module (napari reading the manifest) imports no torch; opening the widget reads
the checkpoints' headers (with the engine, as the Segment widget does), and the architectures
are built and counted inside a worker.
"""
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional

from napari.qt.threading import thread_worker
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import session
from .qt_helpers import Section, connect_while_alive, fit_dock, scrolling_body

SHIPPED, FINE_TUNED, FILE = "shipped", "fine-tuned here", "file"


def checkpoint_rows() -> List[tuple]:
    """``(source, kind, what it is for, readable)`` for every checkpoint in the model menus."""
    from ..engine.model import describe_model, list_shipped, read_model_info
    gone = session.forgotten()
    rows = []
    for kind, sources in ((SHIPPED, list_shipped()), (FINE_TUNED, session.registered()), (FILE, session.opened())):
        for source in sources:
            if source in gone:
                continue
            try:
                info = read_model_info(source)
                text, readable = (describe_model(info), True) if info is not None else ("an untrained architecture", True)
            except Exception as err:  # noqa: BLE001 -- a damaged or missing file is shown, not raised
                text, readable = f"cannot be read: {err}", False
            rows.append((source, kind, text, readable))
    return rows


class _Environment(NamedTuple):
    wkv_path: str          # e.g. "torch (CPU)" or "cuda"
    cuda: str              # e.g. "yes (NVIDIA H100)" or "no"
    names: List[str]       # list_models()


class _ModelRow(NamedTuple):
    name: str
    family: str
    n_params: Optional[int]   # None when the model could not be built
    error: str = ""


def _environment() -> _Environment:
    import torch

    from ..models import list_models
    from ..ops.bi_wkv import selected_path

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    try:
        path = selected_path(torch.empty(1, 1, 1, device=device))
        wkv_path = "cuda" if path == "cuda" else f"torch ({device.upper()})"
    except (ValueError, RuntimeError) as err:   # e.g. a bad MEDRWKV_WKV
        wkv_path = f"error: {err}"
    cuda_text = f"yes ({torch.cuda.get_device_name(0)})" if cuda else "no"
    return _Environment(wkv_path, cuda_text, list_models())


def _count(name: str) -> _ModelRow:
    """Parameters of ``create_model(name)``, built on the meta device (no
    memory, no initialisation cost); on CPU if a model cannot be built there."""
    import torch

    from ..models import create_model

    try:
        try:
            with torch.device("meta"):
                model = create_model(name)
        except Exception:
            model = create_model(name)
        n_params = sum(p.numel() for p in model.parameters())
        return _ModelRow(name, type(model).__name__, n_params)
    except Exception as err:  # one broken model must not hide the others
        return _ModelRow(name, "?", None, f"{type(err).__name__}: {err}")


@thread_worker
def _survey() -> Iterator:
    env = _environment()
    yield env
    for name in env.names:
        yield _count(name)


class ModelsWidget(QWidget):
    """The checkpoints in the model menus (what each finds, learnt from and scored; a broken file
    can be taken off the menus), then the registered architectures (name, family, parameters) and
    which Bi-WKV path would run on this machine."""

    COLUMNS = ("Name", "Family", "Parameters (M)")
    CHECKPOINT_COLUMNS = ("Model", "Kind", "What it is for")

    def __init__(self, napari_viewer=None, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.done = False

        self.checkpoints = QTableWidget(0, len(self.CHECKPOINT_COLUMNS))
        self.checkpoints.setHorizontalHeaderLabels(self.CHECKPOINT_COLUMNS)
        self.checkpoints.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.checkpoints.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.checkpoints.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.checkpoints.setWordWrap(True)
        self.checkpoints.verticalHeader().setVisible(False)
        self.checkpoints.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.checkpoints.horizontalHeader().setStretchLastSection(True)
        self.checkpoints.setMinimumHeight(150)
        self.remove_button = QPushButton("Remove from the model menus")
        self.remove_button.setToolTip("Take the selected fine-tuned model or checkpoint file off every model menu "
                                      "(the file stays on disk); shipped models stay")
        self.remove_button.setEnabled(False)

        self.status = QLabel("Loading models…")
        self.status.setWordWrap(True)
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(self.COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(150)

        self.setMinimumWidth(400)  # room for all three columns when docked

        architectures = QWidget()
        inner = QVBoxLayout(architectures)
        inner.setContentsMargins(0, 0, 0, 0)
        inner.addWidget(QLabel("Untrained networks, for training from scratch (medrwkv train):"))
        inner.addWidget(self.status)
        inner.addWidget(self.table)
        self.architectures_section = Section("Architectures and device", architectures, expanded=False)
        layout = scrolling_body(self)
        layout.addWidget(QLabel("Checkpoints to segment with or fine-tune from:"))
        layout.addWidget(self.checkpoints, 1)
        layout.addWidget(self.remove_button)
        layout.addWidget(self.architectures_section)
        fit_dock(self)

        self.checkpoints.itemSelectionChanged.connect(self._on_checkpoint_selected)
        self.remove_button.clicked.connect(self.remove_selected)
        connect_while_alive(self, session.changed, self.refresh_checkpoints)
        self.refresh_checkpoints()

        self._rows = {}
        self._counted = 0
        self._env: Optional[_Environment] = None
        self.worker = _survey()
        self.worker.yielded.connect(self._on_yielded)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        self.destroyed.connect(self.worker.quit)
        self.worker.start()

    # ------------------------------------------------------------ checkpoints
    def refresh_checkpoints(self, source=None) -> None:
        """(Re)list the checkpoints of the model menus."""
        rows = checkpoint_rows()
        self.checkpoints.setRowCount(len(rows))
        for row, (source, kind, text, readable) in enumerate(rows):
            shown = Path(source).name if source.endswith(".safetensors") else source
            name = QTableWidgetItem(shown if readable else f"⚠ {shown}")
            name.setData(Qt.ItemDataRole.UserRole, source)
            name.setToolTip(source)
            what = QTableWidgetItem(text)
            what.setToolTip(text)
            for column, item in enumerate((name, QTableWidgetItem(kind), what)):
                self.checkpoints.setItem(row, column, item)
        self.checkpoints.resizeRowsToContents()
        self._on_checkpoint_selected()

    def checkpoint_sources(self) -> List[str]:
        return [self.checkpoints.item(row, 0).data(Qt.ItemDataRole.UserRole)
                for row in range(self.checkpoints.rowCount())]

    def _selected_checkpoint(self) -> Optional[tuple]:
        rows = {index.row() for index in self.checkpoints.selectedIndexes()}
        if len(rows) != 1:
            return None
        row = rows.pop()
        return self.checkpoints.item(row, 0).data(Qt.ItemDataRole.UserRole), self.checkpoints.item(row, 1).text()

    def _on_checkpoint_selected(self) -> None:
        selected = self._selected_checkpoint()
        self.remove_button.setEnabled(selected is not None and selected[1] != SHIPPED)

    def remove_selected(self) -> None:
        """Take the selected (not shipped) checkpoint off every model menu."""
        selected = self._selected_checkpoint()
        if selected is not None and selected[1] != SHIPPED:
            session.forget(selected[0])

    # ------------------------------------------------------------ worker slots
    def _on_yielded(self, item) -> None:
        if isinstance(item, _Environment):
            self._env = item
            self.status.setText(self._status_text(counted=0))
            self.table.setRowCount(len(item.names))
            for row, name in enumerate(item.names):
                self._rows[name] = row
                self._set(row, 0, name)
                self._set(row, 2, "…", right=True)
            return
        row = self._rows[item.name]
        self._set(row, 1, item.family)
        if item.n_params is None:
            self._set(row, 2, "error", right=True).setToolTip(item.error)
        else:
            cell = self._set(row, 2, f"{item.n_params / 1e6:.2f}", right=True)
            cell.setData(Qt.ItemDataRole.UserRole, item.n_params)
            cell.setToolTip(f"{item.n_params:,} parameters")
        self._counted += 1
        self.status.setText(self._status_text(counted=self._counted))

    def _on_errored(self, err: Exception) -> None:
        self.status.setText(f"Could not list the models: {type(err).__name__}: {err}")

    def _on_finished(self) -> None:
        self.done = True
        self.table.resizeColumnsToContents()
        if self._env is not None:
            self.status.setText(self._status_text())

    # ------------------------------------------------------------ helpers
    def _status_text(self, counted: Optional[int] = None) -> str:
        env = self._env
        text = f"Bi-WKV path: {env.wkv_path}\nCUDA available: {env.cuda}"
        if counted is not None:
            text += f"\nCounting parameters… {counted}/{len(env.names)}"
        return text

    def _set(self, row: int, column: int, text: str, right: bool = False) -> QTableWidgetItem:
        item = QTableWidgetItem(text)
        if right:
            item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.table.setItem(row, column, item)
        return item

    def parameter_counts(self) -> dict:
        """name -> parameter count (None until counted or if it failed)."""
        counts = {}
        for name, row in self._rows.items():
            cell = self.table.item(row, 2)
            counts[name] = cell.data(Qt.ItemDataRole.UserRole) if cell is not None else None
        return counts
