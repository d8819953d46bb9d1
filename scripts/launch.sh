#!/usr/bin/env bash
# Opens napari with the plugin docked and a sample image loaded; sets up .venv on first run
# (MEDRWKV_QT=pyqt6: with PyQt6, in .venv-pyqt6).
source "$(dirname "$0")/_bootstrap.sh"
bootstrap "napari,$MEDRWKV_QT"
cd "$ROOT"
exec "$VENV/bin/python" -m napari_medrwkv.plugin.launch "$@"
