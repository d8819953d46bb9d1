#!/usr/bin/env bash
# Opens napari with the plugin docked and a sample image loaded; sets up .venv on first run.
source "$(dirname "$0")/_bootstrap.sh"
bootstrap "napari,pyqt5"
cd "$ROOT"
exec "$VENV/bin/python" -m napari_medrwkv.launch "$@"
