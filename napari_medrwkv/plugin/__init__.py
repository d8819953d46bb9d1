"""The napari side of napari-medrwkv: widgets, sample data and writers over the headless core.

``napari.yaml`` here is the map of what the plugin offers; each entry names a module of this
package.  Nothing outside this package imports it, and it is the only part of napari_medrwkv
that imports Qt or napari.
"""
