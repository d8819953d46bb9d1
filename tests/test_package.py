"""The package as users get it: the wheel's contents, a Qt-free core, the README's commands."""
import os
import re
import subprocess
import sys
import textwrap
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
    assert "napari_medrwkv/plugin/napari.yaml" in names
    assert any(n.startswith("napari_medrwkv/plugin/samples/") and n.endswith(".png") for n in names)
    assert "napari_medrwkv/ops/bi_wkv/chunked.py" in names
    assert not any(n.startswith(("tests/", "bench/", "scripts/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "napari_medrwkv.plugin:napari.yaml" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_carries_every_module_of_the_package(wheel):
    # A subpackage missing from setup.cfg's list builds without a word and breaks on import.
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "napari_medrwkv"], cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
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
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, encoding="utf-8",
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "(1, 1, 37, 45)" in out.stdout and "rwkv_unet_t-dsb2018" in out.stdout


def test_installed_wheel_imports_every_python_name_of_its_manifest(wheel, tmp_path):
    # The manifest is the map of the plugin: every command it names must import from the wheel
    # (not from the checkout), and the entry point must lead to the manifest inside the wheel.
    pytest.importorskip("napari")
    yaml = pytest.importorskip("yaml")
    archive = zipfile.ZipFile(wheel)
    archive.extractall(tmp_path)
    entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
    entry = re.search(r"^napari-medrwkv\s*=\s*([\w.]+):(\S+)$", archive.read(entry_points).decode(), re.M)
    manifest_path = tmp_path.joinpath(*entry.group(1).split("."), entry.group(2))
    commands = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))["contributions"]["commands"]
    names = [command["python_name"] for command in commands]
    assert len(names) >= 8
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {names!r}:
            module, attribute = name.split(":")
            imported = importlib.import_module(module)
            assert imported.__file__.startswith({str(tmp_path)!r}), imported.__file__
            assert callable(getattr(imported, attribute)), name
        print("imported", len({names!r}))
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", env=env)
    assert out.returncode == 0, out.stderr
    assert f"imported {len(names)}" in out.stdout


def test_installed_wheel_finds_its_kernels_and_weights(wheel, tmp_path):
    # Unpacked as site-packages would hold it, away from the checkout.
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = ("from napari_medrwkv._resources import kernels_dir, weights_dir; "
            "print(kernels_dir()); print(weights_dir())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", check=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    kernels, weights = out.stdout.split()
    assert Path(kernels) == tmp_path / "napari_medrwkv" / "kernels"
    assert Path(weights) == tmp_path / "napari_medrwkv" / "weights"


def test_core_imports_without_qt_or_napari():
    code = ("import sys, torch; import napari_medrwkv.ops, napari_medrwkv.models as m; "
            "m.create_model('rwkv_unet_t'); "
            "bad = [n for n in sys.modules if n.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', "
            "'PySide6', 'magicgui', 'vispy')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, encoding="utf-8")
    assert result.returncode == 0, result.stdout + result.stderr


# The architecture, lowest first: a layer may import those before it, never those after it, and
# only the plugin may import a GUI library.
LAYERS = ("ops", "models", "engine", "cli", "plugin")
GUI = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy")
IMPORT = re.compile(r"^\s*(?:from\s+(\.*)([\w.]*)\s+import|import\s+([\w.]+))", re.M)


def _imported_modules(source: Path):
    """Absolute names of the modules a source file imports (relative imports resolved)."""
    package = list(source.relative_to(ROOT).with_suffix("").parts[:-1])
    for dots, name, plain in IMPORT.findall(source.read_text(encoding="utf-8")):
        if plain:
            yield plain
        elif dots:
            base = package[: len(package) - (len(dots) - 1)]
            yield ".".join(base + ([name] if name else []))
        else:
            yield name


def _layer(module: str):
    parts = module.split(".")
    if parts[0] != "napari_medrwkv" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def test_layers_import_only_layers_below_them_and_only_the_plugin_imports_gui_libraries():
    sources = [ROOT / "napari_medrwkv" / "cli.py"]
    for layer in LAYERS:
        sources += sorted((ROOT / "napari_medrwkv" / layer).rglob("*.py"))
    seen = set()
    for source in sources:
        own = _layer(".".join(source.relative_to(ROOT).with_suffix("").parts))
        seen.add(own)
        for module in _imported_modules(source):
            imported = _layer(module)
            assert imported is None or LAYERS.index(imported) <= LAYERS.index(own), (source, module)
            if own != "plugin":
                assert module.split(".")[0] not in GUI, (source, module)
    assert seen == set(LAYERS)


def test_the_layer_check_sees_relative_imports(tmp_path):
    # The check above must not pass for want of parsing: a relative import of the plugin from
    # the engine resolves to napari_medrwkv.plugin.
    source = ROOT / "napari_medrwkv" / "engine" / "infer.py"
    assert "napari_medrwkv.engine.preprocess" in set(_imported_modules(source))
    assert _layer("napari_medrwkv.plugin.review") == "plugin"


# A reader outside the team cannot follow a numbered development step ("session" and a number);
# results are named by their date, machine and command.
DEVELOPMENT_STEP = re.compile(r"\bsessions?\s+\d+", re.I)


def test_no_tracked_text_names_a_development_step_by_number():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = []
    for name in listed.stdout.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue                                   # binary: images, weights
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if DEVELOPMENT_STEP.search(line):
                offenders.append(f"{name}:{number}: {line.strip()[:80]}")
    assert offenders == []
    assert DEVELOPMENT_STEP.search("as measured in Session " + "12") and not DEVELOPMENT_STEP.search("session-wide")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^\./scripts/\S+\.sh$", quick_start, re.M)
    assert commands == ["./scripts/launch.sh", "./scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^\./scripts/test\.sh$", ci, re.M)
