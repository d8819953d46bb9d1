"""The package as users get it: the wheel's contents, a Qt-free core, the README's commands."""
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("napari_medrwkv-*.whl")
    return path


def test_wheel_carries_kernels_weights_manifest_and_samples(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for source in ROOT.glob("kernels/*"):
        assert f"napari_medrwkv/kernels/{source.name}" in names
    for source in ROOT.glob("weights/*"):
        assert f"napari_medrwkv/weights/{source.name}" in names
    assert "napari_medrwkv/napari.yaml" in names
    assert any(n.startswith("napari_medrwkv/samples/") and n.endswith(".png") for n in names)
    assert "napari_medrwkv/ops/bi_wkv/chunked.py" in names
    assert not any(n.startswith(("tests/", "bench/", "scripts/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "napari_medrwkv:napari.yaml" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_carries_every_module_of_the_package(wheel):
    # A subpackage missing from setup.cfg's list builds without a word and breaks on import.
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "napari_medrwkv"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    modules = [name for name in tracked if name.endswith(".py")]
    assert modules and [name for name in modules if name not in names] == []


def test_installed_wheel_segments_and_runs_its_command_line(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = ("import napari_medrwkv, torch; from napari_medrwkv.models import create_model; "
            "from napari_medrwkv.cli import main; "
            "assert napari_medrwkv.__file__.startswith(%r), napari_medrwkv.__file__; "
            "print(tuple(create_model('rwkv_unet_t').eval()(torch.rand(1, 3, 37, 45)).shape)); "
            "main(['models'])" % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "(1, 1, 37, 45)" in out.stdout and "rwkv_unet_t-dsb2018" in out.stdout


def test_installed_wheel_finds_its_kernels_and_weights(wheel, tmp_path):
    # Unpacked as site-packages would hold it, away from the checkout.
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = ("from napari_medrwkv._resources import kernels_dir, weights_dir; "
            "print(kernels_dir()); print(weights_dir())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    kernels, weights = out.stdout.split()
    assert Path(kernels) == tmp_path / "napari_medrwkv" / "kernels"
    assert Path(weights) == tmp_path / "napari_medrwkv" / "weights"


def test_core_imports_without_qt_or_napari():
    code = ("import sys, torch; import napari_medrwkv.ops, napari_medrwkv.models as m; "
            "m.create_model('rwkv_unet_t'); "
            "bad = [n for n in sys.modules if n.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', "
            "'PySide6', 'magicgui', 'vispy')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_sources_never_import_gui_libraries():
    gui = re.compile(r"^\s*(from|import)\s+(napari|qtpy|PyQt5|PyQt6|PySide2|PySide6|magicgui|vispy)\b", re.M)
    for folder in ("ops", "models"):
        for source in (ROOT / "napari_medrwkv" / folder).rglob("*.py"):
            assert not gui.search(source.read_text()), source


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^\./scripts/\S+\.sh$", quick_start, re.M)
    assert commands == ["./scripts/launch.sh", "./scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\./scripts/test\.sh$", ci, re.M)
