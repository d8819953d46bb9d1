"""Make MedRWKV napari's reader for medical scans, once, without overriding a user's choice.

napari's built-in reader also claims ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``, ``.dcm`` ... (it reads
them through imageio, without the scan's spacing, origin or orientation), and npe2 gives plugins
no way to rank readers: with two readers for a file napari asks the user which one, every time,
unless ``settings.plugins.extension2reader`` names one for the pattern.  So the first time
MedRWKV is used (its Segment widget opens, or its reader reads a scan the user opened with it),
each scan pattern of its reader that has no preference yet gets MedRWKV as its reader.  A
pattern the user already gave a reader is left as it is, and a pattern is set at most once:
if the user later removes or changes it (Preferences > Plugins), that stays their choice.
"""
import json
import os
from pathlib import Path
from typing import List, Optional

PLUGIN = "napari-medrwkv"
#: Where the patterns set once are remembered ($MEDRWKV_CONFIG_DIR, else the user's config folder).
MARKER_NAME = "reader-preference.json"


def scan_patterns() -> List[str]:
    """The file name patterns of MedRWKV's scan reader, as napari.yaml declares them."""
    import yaml
    manifest = yaml.safe_load((Path(__file__).with_name("napari.yaml")).read_text(encoding="utf-8"))
    return [pattern for reader in manifest["contributions"]["readers"]
            if reader["command"].endswith(".read_scan") for pattern in reader["filename_patterns"]]


def _marker() -> Path:
    folder = os.environ.get("MEDRWKV_CONFIG_DIR")
    if not folder:
        import platformdirs
        folder = platformdirs.user_config_dir(PLUGIN, appauthor=False)
    return Path(folder) / MARKER_NAME


def prefer_scan_reader(settings=None, marker: Optional[Path] = None) -> List[str]:
    """Name MedRWKV the reader of every scan pattern that has no reader preference and that this
    function has not set before; returns the patterns it set.  ``settings``: napari's (default
    ``napari.settings.get_settings()``); ``marker``: the file remembering what was set."""
    if settings is None:
        from napari.settings import get_settings
        settings = get_settings()
    marker = Path(marker) if marker is not None else _marker()
    try:
        done = set(json.loads(marker.read_text(encoding="utf-8")).get("set", []))
    except (OSError, ValueError, AttributeError):
        done = set()
    chosen = dict(settings.plugins.extension2reader)
    new = [pattern for pattern in scan_patterns() if pattern not in chosen and pattern not in done]
    if not new:
        return []
    settings.plugins.extension2reader = {**chosen, **{pattern: PLUGIN for pattern in new}}
    try:
        from ..engine.imageio import atomic_file
        marker.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(marker, True, ".json") as tmp:
            Path(tmp).write_text(json.dumps({"set": sorted(done | set(new))}), encoding="utf-8")
    except OSError:                      # a read-only home: the preference still holds for now
        pass
    return new


def prefer_scan_reader_quietly() -> None:
    """:func:`prefer_scan_reader`, never failing what called it (a widget opening, a scan being read)."""
    try:
        prefer_scan_reader()
    except Exception:  # noqa: BLE001 -- a preference is a convenience, never a reason to fail
        pass
