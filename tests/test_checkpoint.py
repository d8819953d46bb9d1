"""Checkpoints: one .safetensors file, weights + JSON metadata, atomic writes, no pickle."""
import json
import os
import pickle

import pytest
import torch

import safetensors
import safetensors.torch

import napari_medrwkv
from napari_medrwkv.engine import checkpoint as ckpt
from napari_medrwkv.engine.checkpoint import (
    CheckpointError,
    ModelInfo,
    load_checkpoint,
    read_info,
    save_checkpoint,
)
from napari_medrwkv.models import create_model


def _info(**overrides):
    kw = dict(
        architecture="rwkv_unet_t",
        in_chans=3,
        num_classes=1,
        class_names=["background", "nucleus"],
        normalization={"mode": "percentile", "low": 1.0, "high": 99.8, "per_channel": True},
        tile_size=256,
        training={
            "data": "/data/Zellkerne – Ångström/train",
            "command": "medrwkv-train --epochs 3",
            "epochs": 3,
            "device": "cpu",
            "minutes": 1.5,
            "started": "2025-01-02T03:04:05+00:00",
            "finished": "2025-01-02T03:05:35+00:00",
            "base_model": None,
            "seed": 7,
            "loss_history": [0.9, 0.5, 0.25],
            "augment": {"flip": True, "rotate90": True, "nested": {"deep": ["é", "漢字", "🦠"]}},
        },
        metrics={"dice": 0.81, "iou": 0.68},
    )
    kw.update(overrides)
    return ModelInfo(**kw)


def _randomized(model):
    """Move weights and BatchNorm statistics away from their init so outputs are not trivial."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, v in model.state_dict().items():
            if not v.is_floating_point():
                continue
            if key.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) * 1.5 + 0.5)
            elif key.endswith("running_mean"):
                v.copy_(torch.randn(v.shape, generator=g) * 0.1)
            else:
                v.add_(torch.randn(v.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _randomized(create_model("rwkv_unet_t"))


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """(half path, full path) of the same model."""
    folder = tmp_path_factory.mktemp("ckpt")
    half = save_checkpoint(model, folder / "half.safetensors", _info(), half=True)
    full = save_checkpoint(model, folder / "full.safetensors", _info(), half=False)
    return half, full


@pytest.fixture(scope="module")
def reference(model):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
    return x, y


# ------------------------------------------------------------------- round trips

def test_full_precision_round_trip_is_exact(saved, reference, model):
    loaded, info = load_checkpoint(saved[1])
    assert not loaded.training
    x, y = reference
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    assert info.architecture == "rwkv_unet_t"


def test_half_precision_round_trip_within_float16_tolerance(saved, reference, model):
    loaded, _ = load_checkpoint(saved[0])
    x, y = reference
    with torch.no_grad():
        y2 = loaded(x)
    scale = y.abs().max().item()
    assert scale > 1e-3, "reference output is trivial"
    assert torch.allclose(y2, y, rtol=0, atol=1e-2 * scale)
    # dtypes come back as the model's, whatever the file stored
    for k, v in loaded.state_dict().items():
        assert v.dtype == model.state_dict()[k].dtype


def test_half_file_stores_float16_but_keeps_bn_statistics_and_ints(saved):
    with safetensors.safe_open(str(saved[0]), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert any(k.endswith("num_batches_tracked") for k in dtypes)
    for k, dt in dtypes.items():
        if k.endswith("num_batches_tracked"):
            assert dt == "I64"
        elif k.endswith(("running_mean", "running_var")):
            assert dt == "F32"
        else:
            assert dt == "F16", k


def test_half_file_is_roughly_half_the_size(saved):
    half, full = (os.path.getsize(p) for p in saved)
    assert 0.45 < half / full < 0.6


def test_metadata_round_trip(saved):
    for path in saved:
        info = read_info(path)
        expected = _info()
        assert info.class_names == ["background", "nucleus"]
        assert info.normalization == expected.normalization
        assert info.training == expected.training
        assert info.training["augment"]["nested"]["deep"] == ["é", "漢字", "🦠"]
        assert info.metrics == {"dice": 0.81, "iou": 0.68}
        assert info.tile_size == 256 and info.in_chans == 3 and info.num_classes == 1
        assert info.version == napari_medrwkv.__version__
        assert info.created


def test_header_is_one_json_key(saved):
    with safetensors.safe_open(str(saved[0]), "pt") as f:
        meta = f.metadata()
    assert set(meta) - {"format"} == {"napari_medrwkv"}
    assert json.loads(meta["napari_medrwkv"])["architecture"] == "rwkv_unet_t"


def test_model_info_json_forward_compatible_and_defaults():
    info = ModelInfo.from_json(json.dumps({
        "architecture": "med_urwkv_t", "in_chans": 1, "num_classes": 3, "from_the_future": {"x": 1},
    }))
    assert info.class_names == ["background", "class_1", "class_2"]
    assert info.arch_kwargs == {} and info.training == {} and info.metrics == {}
    assert info.tile_size >= 1 and info.version and info.created
    assert info.input_scale == 1.0         # files written before input_scale existed
    assert ModelInfo.from_json(info.to_json()) == info
    for bad in (0, -0.5, 5, "half", True):
        with pytest.raises(ValueError, match="input_scale"):
            ModelInfo("rwkv_unet_t", 3, 1, input_scale=bad)
    for missing in ("architecture", "in_chans", "num_classes"):
        data = {"architecture": "rwkv_unet_t", "in_chans": 3, "num_classes": 1}
        del data[missing]
        with pytest.raises(ValueError, match=missing):
            ModelInfo.from_json(json.dumps(data))
    # A binary model named by its foreground class alone gets background in front.
    assert ModelInfo("rwkv_unet_t", 3, 1, class_names=["cell"]).class_names == ["background", "cell"]


def test_multiclass_checkpoint_with_arch_kwargs(tmp_path):
    model = create_model("rwkv_unet_t", in_chans=1, num_classes=3, drop_path=0.0)
    info = ModelInfo("rwkv_unet_t", 1, 3, arch_kwargs={"drop_path": 0.0}, class_names=["bg", "a", "b"])
    path = save_checkpoint(model, tmp_path / "multi.safetensors", info)
    loaded, info2 = load_checkpoint(str(path))
    assert info2.class_names == ["bg", "a", "b"] and info2.arch_kwargs == {"drop_path": 0.0}
    assert loaded.head.out_channels == 3


def test_loading_never_unpickles(saved, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model, info = load_checkpoint(saved[0])
    assert read_info(saved[0]).architecture == "rwkv_unet_t"


def test_shared_storage_is_saved(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.register_buffer("view", self.a.bias.detach()[:2])

    for half in (True, False):
        path = save_checkpoint(Tied(), tmp_path / f"tied{half}.safetensors", _info(), half=half)
        tensors = safetensors.torch.load_file(str(path))
        assert torch.equal(tensors["a.weight"], tensors["b.weight"])
        assert tensors["view"].shape == (2,)


# ------------------------------------------------------------------- atomic save

def test_failed_save_leaves_existing_checkpoint_untouched(model, tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    small = create_model("rwkv_unet_t")
    save_checkpoint(small, target, _info())
    before = target.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise RuntimeError("disk exploded")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(CheckpointError, match="disk exploded") as err:     # any failure of the writer: named
        save_checkpoint(model, target, _info())
    assert str(target) in str(err.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    monkeypatch.undo()
    assert read_info(target).architecture == "rwkv_unet_t"


def test_save_overwrites_and_leaves_no_temp_files(model, tmp_path):
    target = tmp_path / "m.safetensors"
    save_checkpoint(model, target, _info(metrics={"dice": 0.1}))
    save_checkpoint(model, target, _info(metrics={"dice": 0.9}))
    assert read_info(target).metrics == {"dice": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_into_missing_folder(model, tmp_path):
    folder = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="nope") as err:
        save_checkpoint(model, folder / "m.safetensors", _info())
    assert "does not exist" in str(err.value)


# ------------------------------------------------------------------- broken files

def _raises(path, *fragments, loader=load_checkpoint):
    with pytest.raises(CheckpointError) as err:
        loader(path)
    msg = str(err.value)
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_missing_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    _raises(path, "does not exist", loader=read_info)
    _raises(path, "does not exist")


def test_corrupt_file(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(os.urandom(4096))
    _raises(path, "is not a readable .safetensors checkpoint", loader=read_info)
    _raises(path, "is not a readable .safetensors checkpoint")


def test_truncated_file(saved, tmp_path):
    data = saved[0].read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    _raises(path, "is not a readable .safetensors checkpoint", loader=read_info)
    _raises(path, "is not a readable .safetensors checkpoint")


def test_plain_safetensors_without_our_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    _raises(path, "was not written by napari-medrwkv", loader=read_info)
    _raises(path, "was not written by napari-medrwkv")


def _resave(src, dst, tensors=None, info=None):
    with safetensors.safe_open(str(src), "pt") as f:
        meta = f.metadata()
    if tensors is None:
        tensors = safetensors.torch.load_file(str(src))
    if info is not None:
        meta = dict(meta, napari_medrwkv=info)
    safetensors.torch.save_file(tensors, str(dst), metadata=meta)
    return dst


def test_unknown_architecture(saved, tmp_path):
    data = json.loads(read_info(saved[0]).to_json())
    data["architecture"] = "rwkv_unet_xxl"
    path = _resave(saved[0], tmp_path / "future.safetensors", info=json.dumps(data))
    assert read_info(path).architecture == "rwkv_unet_xxl"  # the header alone is fine
    msg = _raises(path, "rwkv_unet_xxl", "rwkv_unet_t", "med_urwkv_t")
    assert "available" in msg


def test_missing_key(saved, tmp_path):
    tensors = safetensors.torch.load_file(str(saved[0]))
    del tensors["head.weight"]
    tensors["extra.thing"] = torch.zeros(1)
    path = _resave(saved[0], tmp_path / "missing.safetensors", tensors=tensors)
    _raises(path, "missing keys", "head.weight", "unexpected keys", "extra.thing")


def test_many_unexpected_keys_are_abbreviated(saved, tmp_path):
    tensors = safetensors.torch.load_file(str(saved[0]))
    tensors.update({f"junk.{i:02d}": torch.zeros(1) for i in range(25)})
    path = _resave(saved[0], tmp_path / "junk.safetensors", tensors=tensors)
    msg = _raises(path, "unexpected keys (25)", "junk.09", "+15 more")
    assert "junk.10" not in msg


def test_wrong_shape(tmp_path):
    two = create_model("rwkv_unet_t", num_classes=2)
    honest = save_checkpoint(two, tmp_path / "two.safetensors", _info(num_classes=2, class_names=["bg", "a"]))
    lie = json.loads(read_info(honest).to_json())
    lie.update(num_classes=1, class_names=["background", "a"])
    path = _resave(honest, tmp_path / "liar.safetensors", info=json.dumps(lie))
    width = two.head.in_channels
    _raises(path, "shape mismatches", f"head.weight: file (2, {width}, 1, 1) vs model (1, {width}, 1, 1)",
            "head.bias: file (2,) vs model (1,)")


def test_unusable_metadata(saved, tmp_path):
    path = _resave(saved[0], tmp_path / "bad_json.safetensors", info="{not json")
    _raises(path, "metadata", loader=read_info)
    path = _resave(saved[0], tmp_path / "no_arch.safetensors", info=json.dumps({"in_chans": 3}))
    _raises(path, "architecture", loader=read_info)


def test_engine_imports_no_gui():
    import sys
    import subprocess

    code = ("import sys, napari_medrwkv.engine.checkpoint; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PySide2', 'PyQt6', 'PySide6')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_bare_architecture_names_its_classes_as_a_checkpoint_does(tmp_path):
    # The widgets show these names; a model must not change them by being saved and reloaded.
    from napari_medrwkv import load_model
    model = load_model("rwkv_unet_t", device="cpu", num_classes=3)
    assert model.info.class_names == ["background", "class_1", "class_2"]
    save_checkpoint(model.net, tmp_path / "m.safetensors", model.info)
    assert read_info(tmp_path / "m.safetensors").class_names == model.info.class_names
    assert load_model("rwkv_unet_t", device="cpu").info.class_names == ["background", "foreground"]


def test_class_names_rename_a_checkpoint_that_starts_training_on_another_kind_of_object(tmp_path):
    # The polyp model as the start of a lesion model: the names it is saved with must be the new ones,
    # and a name list that does not fit the model's classes is an error, not silently dropped.
    from napari_medrwkv import load_model
    model = load_model("rwkv_unet_t", device="cpu", class_names=["background", "polyp"])
    path = save_checkpoint(model.net, tmp_path / "polyp.safetensors", model.info)
    renamed = load_model(path, device="cpu", class_names=["background", "lesion"])
    assert renamed.info.class_names == ["background", "lesion"]
    assert load_model(path, device="cpu").info.class_names == ["background", "polyp"]
    with pytest.raises(ValueError, match=r"polyp\.safetensors.*3 entries"):
        load_model(path, device="cpu", class_names=["background", "a", "b"])
