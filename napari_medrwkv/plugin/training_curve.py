"""The Fine-tune widget's chart: training loss and validation Dice as training goes, painted with QPainter."""
import math
from typing import List, Optional, Tuple

from qtpy.QtCore import QPointF, QRectF, QSize, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget


class TrainingCurve(QWidget):
    """Per-step training loss (line, left axis) and per-epoch validation Dice (points, right axis 0..1),
    the base model's Dice (dashed) and, when training ends, the Dice of the weights kept (a diamond
    at the right edge: a blend of the best epoch and the start, or the start itself, is none of
    the epochs' points).

    Drawn with QPainter on its own dark panel so it reads the same in napari's light and dark themes.
    """
    BACKGROUND = QColor(30, 33, 40)
    AXES = QColor(120, 126, 136)
    TEXT = QColor(205, 210, 216)
    LOSS = QColor(255, 167, 38)
    DICE = QColor(79, 195, 247)
    BASE = QColor(176, 176, 176)
    KEPT = QColor(129, 199, 132)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.losses: List[float] = []
        self.val_points: List[Tuple[int, float]] = []    # (step count at the epoch's end, Dice)
        self.baseline: Optional[float] = None             # the base model's Dice ("before")
        self.kept: Optional[float] = None                 # the kept weights' Dice ("after")
        self.setMinimumHeight(120)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def sizeHint(self) -> QSize:
        return QSize(320, 160)

    def clear(self):
        self.losses, self.val_points, self.baseline, self.kept = [], [], None, None
        self.update()

    def add_loss(self, loss: float):
        if math.isfinite(loss):
            self.losses.append(float(loss))
            self.update()

    def add_val_dice(self, dice: float):
        self.val_points.append((len(self.losses), float(dice)))
        self.update()

    def set_baseline(self, dice: Optional[float]):
        self.baseline = None if dice is None or not math.isfinite(dice) else float(dice)
        self.update()

    def set_kept(self, dice: Optional[float]):
        self.kept = None if dice is None or not math.isfinite(dice) else float(dice)
        self.update()

    # ------------------------------------------------------------------ drawing
    def paintEvent(self, event):
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), self.BACKGROUND)
        metrics = painter.fontMetrics()
        text_h = metrics.height()
        left = metrics.horizontalAdvance("0.00") + 12
        right = metrics.horizontalAdvance("0.5") + 12
        top, bottom = text_h + 10, text_h + 6
        plot = QRectF(left, top, max(self.width() - left - right, 10), max(self.height() - top - bottom, 10))
        self._draw_axes(painter, plot, metrics)
        self._draw_legend(painter, left, text_h)
        if not self.losses and not self.val_points and self.baseline is None:
            painter.setPen(self.TEXT)
            painter.drawText(plot, int(Qt.AlignmentFlag.AlignCenter),
                             "Loss and validation Dice\nappear here while fine-tuning")
            painter.end()
            return
        steps = max([len(self.losses)] + [s for s, _ in self.val_points] + [1])

        def x_at(step):
            return plot.left() + plot.width() * step / steps

        def y_dice(value):
            return plot.bottom() - plot.height() * min(max(value, 0.0), 1.0)

        if self.baseline is not None:
            pen = QPen(self.BASE, 1.5, Qt.PenStyle.DashLine)
            painter.setPen(pen)
            y = y_dice(self.baseline)
            painter.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
        if self.losses:
            top_loss = _nice_ceiling(max(self.losses))
            painter.setPen(self.LOSS)
            painter.drawText(QRectF(0, plot.top() - text_h / 2, left - 6, text_h),
                             int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), f"{top_loss:.2g}")
            points = [QPointF(x_at(i + 1), plot.bottom() - plot.height() * loss / top_loss)
                      for i, loss in enumerate(self.losses)]
            painter.setPen(QPen(self.LOSS, 1.5))
            if len(points) == 1:
                painter.setBrush(self.LOSS)
                painter.drawEllipse(points[0], 2.5, 2.5)
            else:
                painter.drawPolyline(QPolygonF(points))
        if self.val_points:
            points = [QPointF(x_at(step), y_dice(value)) for step, value in self.val_points]
            painter.setPen(QPen(self.DICE, 1.5))
            if len(points) > 1:
                painter.drawPolyline(QPolygonF(points))
            painter.setBrush(self.DICE)
            for point in points:
                painter.drawEllipse(point, 3.5, 3.5)
        if self.kept is not None:
            _draw_diamond(painter, QPointF(plot.right(), y_dice(self.kept)), 5.5, self.KEPT)
        painter.setPen(self.TEXT)
        painter.drawText(QRectF(plot.left(), plot.bottom() + 2, plot.width(), text_h),
                         int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop),
                         f"{len(self.losses)} steps")
        painter.end()

    def _draw_axes(self, painter: QPainter, plot: QRectF, metrics):
        text_h = metrics.height()
        grid = QColor(self.AXES)
        grid.setAlpha(70)
        for value in (0.25, 0.5, 0.75, 1.0):
            y = plot.bottom() - plot.height() * value
            painter.setPen(QPen(grid, 1))
            painter.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
        painter.setPen(QPen(self.AXES, 1))
        painter.drawRect(plot)
        painter.setPen(self.DICE)
        for value in (0.0, 0.5, 1.0):
            y = plot.bottom() - plot.height() * value
            painter.drawText(QRectF(plot.right() + 4, y - text_h / 2, 40, text_h),
                             int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter), f"{value:g}")
        painter.setPen(self.LOSS)
        painter.drawText(QRectF(0, plot.bottom() - text_h / 2, plot.left() - 6, text_h),
                         int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), "0")

    def _draw_legend(self, painter: QPainter, x: float, text_h: int):
        y = 4 + text_h / 2
        entries = [("loss", self.LOSS, "line"), ("val Dice", self.DICE, "dot")]
        if self.baseline is not None:
            entries.append(("before", self.BASE, "dash"))
        if self.kept is not None:
            entries.append(("kept", self.KEPT, "diamond"))
        for label, colour, mark in entries:
            if mark == "diamond":
                _draw_diamond(painter, QPointF(x + 9, y), 5.0, colour)
            elif mark == "dot":
                painter.setPen(QPen(colour, 1.5))
                painter.setBrush(colour)
                painter.drawEllipse(QPointF(x + 9, y), 3.5, 3.5)
            else:
                painter.setPen(QPen(colour, 2, Qt.PenStyle.DashLine if mark == "dash" else Qt.PenStyle.SolidLine))
                painter.drawLine(QPointF(x, y), QPointF(x + 18, y))
            painter.setPen(self.TEXT)
            width = painter.fontMetrics().horizontalAdvance(label)
            painter.drawText(QRectF(x + 22, y - text_h / 2, width + 4, text_h),
                             int(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter), label)
            x += 22 + width + 14


def _draw_diamond(painter: QPainter, centre: QPointF, radius: float, colour: QColor):
    painter.setPen(QPen(QColor(255, 255, 255), 1.2))
    painter.setBrush(colour)
    painter.drawPolygon(QPolygonF([centre + QPointF(0, -radius), centre + QPointF(radius, 0),
                                   centre + QPointF(0, radius), centre + QPointF(-radius, 0)]))


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= value (axis top)."""
    if not value > 0:
        return 1.0
    scale = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if m * scale >= value:
            return m * scale
    return 10 * scale
