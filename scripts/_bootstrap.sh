# Sourced by launch.sh and test.sh: installs what is missing, quickly a second time.
#   bootstrap EXTRAS   e.g. bootstrap "napari,$MEDRWKV_QT"; bootstrap "" for the headless core only
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The Qt binding of launch.sh and test.sh: PyQt5 (default, in .venv) or PyQt6 (napari 0.9's own
# default, in .venv-pyqt6: one binding per environment, or qtpy would pick PyQt5).
MEDRWKV_QT="${MEDRWKV_QT:-pyqt5}"
case "$MEDRWKV_QT" in
pyqt5) VENV="$ROOT/.venv" ;;
pyqt6) VENV="$ROOT/.venv-pyqt6" ;;
*) echo "[medrwkv] MEDRWKV_QT=$MEDRWKV_QT: use pyqt5 (default) or pyqt6" >&2; exit 2 ;;
esac
# Debian packages a headless or desktop Qt/OpenGL napari needs.
QT_DEBS="xvfb libgl1 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1"

install_debs() {
    command -v dpkg-query >/dev/null || return 0
    local missing=()
    for pkg in $QT_DEBS; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ]; then
        echo "[medrwkv] installing Debian packages: ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "[medrwkv] missing Debian packages for Qt: ${missing[*]}"
        echo "[medrwkv] install them with: sudo apt-get install -y ${missing[*]}"
    fi
}

pick_python() {
    for py in python3.11 python3.12 python3.10 python3; do
        if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
            echo "$py"; return
        fi
    done
    echo "[medrwkv] need Python >= 3.10 (3.11 recommended)" >&2; exit 1
}

bootstrap() {
    local extras="$1"
    # Only the Qt extras need the Debian packages; training and the CLI do not.
    [ -z "$extras" ] || install_debs
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        py="$(pick_python)"
        # Debian/Ubuntu ship venv's pip bootstrap separately (python3-venv).
        if ! "$py" -c 'import ensurepip' 2>/dev/null; then
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            else
                echo "[medrwkv] $py cannot create virtual environments; run: sudo apt-get install -y python3-venv" >&2
                exit 1
            fi
        fi
        echo "[medrwkv] creating $VENV"
        "$py" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
    fi
    # Reinstall only when the package metadata or the requested extras changed.
    local stamp="$VENV/.medrwkv-$(echo "$extras" | tr ',' '-')"
    local digest
    digest="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
        # The CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
        "$VENV/bin/python" -c 'import torch' 2>/dev/null || "$VENV/bin/python" -m pip install -q "torch==2.13.0"
        "$VENV/bin/python" -m pip install -q -e "$ROOT${extras:+[$extras]}"
        echo "$digest" > "$stamp"
    fi
}
