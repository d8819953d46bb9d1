"""Open napari with a MedRWKV sample and the Models widget docked.

    python -m napari_medrwkv.launch [--sample fluorescence|brightfield] [--screenshot PATH]

With ``--screenshot PATH`` it does not enter the event loop: it waits (at most
``--timeout`` seconds) until the Models widget has counted every model, saves a
screenshot of the whole window to PATH and exits -- the smoke test of the
plugin.  Exit status 0 on success, 1 if the widget did not finish in time.
"""
import argparse
import sys
import time

PLUGIN = "napari-medrwkv"
SAMPLES = ("fluorescence", "brightfield")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m napari_medrwkv.launch", description=__doc__.splitlines()[0])
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
    import napari

    viewer = napari.Viewer(title="MedRWKV")
    viewer.open_sample(PLUGIN, args.sample)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Models")

    if args.screenshot is None:
        napari.run()
        return 0

    viewer.window.resize(1400, 850)
    finished = _wait_for(widget, args.timeout)
    viewer.reset_view()
    _wait_for(widget, 0)  # repaint after the reset
    viewer.screenshot(args.screenshot, canvas_only=False)
    viewer.close()
    if not finished:
        print(f"the Models widget did not finish within {args.timeout:g} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
