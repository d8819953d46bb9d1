"""``python -m napari_medrwkv``: the ``medrwkv`` command, so that ``torchrun -m napari_medrwkv train``
runs it on several processes (see engine/ddp.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
