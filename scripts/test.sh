#!/usr/bin/env bash
# Runs the whole test suite; sets up .venv on first run (MEDRWKV_QT=pyqt6: under PyQt6, in .venv-pyqt6).
source "$(dirname "$0")/_bootstrap.sh"
# PyQt5 through the `testing` extra, as ever; PyQt6 with the same tools.
if [ "$MEDRWKV_QT" = pyqt6 ]; then bootstrap "napari,pyqt6,test-tools"; else bootstrap "testing"; fi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests "$@"
