"""Open napari with a MedRWKV sample loaded and the Segment (and Models) widgets docked.

    python -m napari_medrwkv.plugin.launch [--sample fluorescence|brightfield] [--screenshot PATH]

With ``--screenshot PATH`` it does not enter the event loop: it waits (at most
``--timeout`` seconds) until the Models widget has counted every model, segments
the sample with the model the Segment widget suggests for it (the shipped nuclei
model: the samples are nuclei), prints the widget's status line, saves a screenshot
of the whole window to PATH and exits -- the smoke test of the plugin.  Exit status
0 on success, 1 if a widget did not finish in time.
"""
import argparse
import sys
import time

PLUGIN = "napari-medrwkv"
SAMPLES = ("fluorescence", "brightfield")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m napari_medrwkv.plugin.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--sample", choices=SAMPLES, default="fluorescence", help="sample to open (default: %(default)s)")
    parser.add_argument("--screenshot", metavar="PATH", help="save a screenshot of the window to PATH and exit")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the Models widget in --screenshot mode (default: %(default)s)")
    return parser.parse_args(argv)


def _wait_for(widget, timeout: float) -> bool:
    from qtpy.QtWidgets import QApplication

    deadline = time.monotonic() + timeout
    while not widget.done and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)
    for _ in range(10):  # let the table and the canvas repaint
        QApplication.processEvents()
        time.sleep(0.02)
    return widget.done


def main(argv=None) -> int:
    args = _parse(argv)
    from ..engine.memory import retain_freed_memory

    retain_freed_memory()        # before napari starts its threads, so that the widgets' workers share it
    import napari

    viewer = napari.Viewer(title="MedRWKV")
    viewer.open_sample(PLUGIN, args.sample)
    _, models = viewer.window.add_plugin_dock_widget(PLUGIN, "Models")
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment", tabify=True)
    segment.image_combo.setCurrentText(viewer.layers[0].name)    # which selects the model suggested for it
    segment.probability_check.setChecked(True)
    viewer.layers[-1].visible = False      # the ground truth: there to compare, hidden to see the result

    if args.screenshot is None:
        napari.run()
        return 0

    viewer.window.resize(1400, 850)
    finished = _wait_for(models, args.timeout)
    if segment.model_combo.currentText() and not segment.model_combo.currentText().endswith("…"):
        segment.run()              # the main job, with the model suggested for the sample (the nuclei one)
        finished = _wait_for(_Done(lambda: segment.worker is None), args.timeout) and finished
        print(segment.status.text())
    viewer.reset_view()
    _close_toasts(viewer)
    _wait_for(models, 0)  # repaint after the reset
    viewer.screenshot(args.screenshot, canvas_only=False)
    viewer.close()
    if not finished:
        print(f"the widgets did not finish within {args.timeout:g} s", file=sys.stderr)
        return 1
    return 0


def _close_toasts(viewer):
    """Pop-up notifications (e.g. napari's PyQt5 deprecation notice) would cover the canvas."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification   # private, hence guarded
    except ImportError:
        return
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()


class _Done:
    """Adapts a condition to the ``.done`` attribute that :func:`_wait_for` polls."""

    def __init__(self, condition):
        self._condition = condition

    @property
    def done(self) -> bool:
        return self._condition()


if __name__ == "__main__":
    sys.exit(main())
