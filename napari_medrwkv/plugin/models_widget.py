"""The Models widget: every architecture, its size, the device and the Bi-WKV path in use.

torch and ``napari_medrwkv.models`` are imported only inside the worker, so
opening napari (or reading the manifest) never imports torch.
"""
from typing import Iterator, List, NamedTuple, Optional

from napari.qt.threading import thread_worker
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)


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
    """The registered architectures (name, family, parameters) and which
    Bi-WKV path would run on this machine."""

    COLUMNS = ("Name", "Family", "Parameters (M)")

    def __init__(self, napari_viewer=None, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.done = False

        self.status = QLabel("Loading models…")
        self.status.setWordWrap(True)
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(self.COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)

        self.setMinimumWidth(400)  # room for all three columns when docked

        layout = QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addWidget(self.table)

        self._rows = {}
        self._counted = 0
        self._env: Optional[_Environment] = None
        self.worker = _survey()
        self.worker.yielded.connect(self._on_yielded)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        self.destroyed.connect(self.worker.quit)
        self.worker.start()

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
