"""Med-URWKV: shapes, gradients, Vision-RWKV parameter counts and the checkpoint loader."""
import pytest
import torch

from napari_medrwkv.models import create_model, list_models
from napari_medrwkv.models.med_urwkv import load_vrwkv_checkpoint, resize_pos_embed

SIZES = {"t": (192, False), "s": (384, True), "b": (768, True)}   # embed dim, layer scale
PAPER_PARAMS = {"t": 6.2e6, "s": 23.8e6, "b": 93.7e6}               # VRWKV README, with the 1000-class head


@pytest.fixture(scope="module")
def tiny_t():
    torch.manual_seed(0)
    return create_model("med_urwkv_t", in_chans=3, num_classes=2)


# --------------------------------------------------------------------------- forward

def test_registered():
    assert {"med_urwkv_t", "med_urwkv_s", "med_urwkv_b"} <= set(list_models())


@pytest.mark.parametrize("in_chans,num_classes,hw", [(1, 1, (33, 50)), (3, 2, (48, 80)), (1, 4, (17, 16))])
def test_output_shape_any_size(in_chans, num_classes, hw):
    model = create_model("med_urwkv_t", in_chans=in_chans, num_classes=num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, *hw))
    assert out.shape == (2, num_classes, *hw)
    assert torch.isfinite(out).all()


def test_every_parameter_gets_gradient(tiny_t):
    model = tiny_t.train()
    model.zero_grad()
    out = model(torch.randn(2, 3, 48, 80))
    (out.square().mean() + out[:, 0].mean()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


def test_seeded_construction_is_deterministic():
    torch.manual_seed(3)
    a = create_model("med_urwkv_t", in_chans=1).state_dict()
    torch.manual_seed(3)
    b = create_model("med_urwkv_t", in_chans=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- parameter counts

def vrwkv_encoder_params(dim: int, layer_scale: bool, in_chans: int = 3, n_layer: int = 12) -> int:
    """Vision-RWKV backbone parameters, counted from the architecture (no head)."""
    patch = in_chans * dim * 16 * 16 + dim
    pos = 196 * dim
    att = 5 * dim + 4 * dim * dim                    # decay, first, 3 mixes; K, V, R, O
    ffn = 2 * dim + 4 * dim * dim + dim * dim + 4 * dim * dim   # 2 mixes; key, receptance, value
    block = 2 * 2 * dim + att + ffn + (2 * dim if layer_scale else 0)
    return patch + pos + n_layer * block + 2 * dim + 2 * dim   # + ln0 of layer 0 + final ln1


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size", ["t", "s", "b"])
def test_encoder_parameter_count_matches_vision_rwkv(size):
    dim, layer_scale = SIZES[size]
    model = create_model(f"med_urwkv_{size}")
    encoder = _count(model.encoder)
    assert encoder == vrwkv_encoder_params(dim, layer_scale)
    with_head = encoder + dim * 1000 + 1000
    assert abs(with_head - PAPER_PARAMS[size]) < 0.06e6
    assert _count(model) > encoder                  # the decoder comes on top


def test_t_counts():
    model = create_model("med_urwkv_t")
    assert _count(model.encoder) == 5_962_176      # 6.155M with the ImageNet head, as the README's 6.2M
    assert abs(_count(model.encoder) - 5.99e6) / 5.99e6 < 0.03
    assert 8e6 < _count(model) < 15e6


def test_s_builds_and_has_layer_scales():
    model = create_model("med_urwkv_s", in_chans=1, num_classes=3)
    assert torch.equal(model.encoder.layers[5].gamma1, torch.ones(384))
    assert model.encoder.layers[0].ln0 is not None and model.encoder.layers[1].ln0 is None


# --------------------------------------------------------------------------- checkpoint loader

def official_state_dict(dim: int, layer_scale: bool, seed: int = 0, make=torch.randn) -> dict:
    """A Vision-RWKV mmcls checkpoint's state_dict, key names and shapes written out by hand."""
    g = torch.Generator().manual_seed(seed)
    rnd = (lambda *s: make(*s, generator=g)) if make is torch.randn else (lambda *s: make(*s))
    sd = {"backbone.patch_embed.projection.weight": rnd(dim, 3, 16, 16),
          "backbone.patch_embed.projection.bias": rnd(dim),
          "backbone.pos_embed": rnd(1, 196, dim)}
    for i in range(12):
        p = f"backbone.layers.{i}."
        norms = ["ln0", "ln1", "ln2"] if i == 0 else ["ln1", "ln2"]
        for n in norms:
            sd[p + n + ".weight"], sd[p + n + ".bias"] = rnd(dim), rnd(dim)
        if layer_scale:
            sd[p + "gamma1"], sd[p + "gamma2"] = rnd(dim), rnd(dim)
        for n in ["spatial_decay", "spatial_first"]:
            sd[p + "att." + n] = rnd(dim)
        for n in ["spatial_mix_k", "spatial_mix_v", "spatial_mix_r"]:
            sd[p + "att." + n] = rnd(1, 1, dim)
        for n in ["key", "value", "receptance", "output"]:
            sd[p + f"att.{n}.weight"] = rnd(dim, dim)
        sd[p + "ffn.spatial_mix_k"], sd[p + "ffn.spatial_mix_r"] = rnd(1, 1, dim), rnd(1, 1, dim)
        sd[p + "ffn.key.weight"] = rnd(4 * dim, dim)
        sd[p + "ffn.receptance.weight"] = rnd(dim, dim)
        sd[p + "ffn.value.weight"] = rnd(dim, 4 * dim)
    sd["backbone.ln1.weight"], sd["backbone.ln1.bias"] = rnd(dim), rnd(dim)
    sd["head.fc.weight"], sd["head.fc.bias"] = rnd(1000, dim), rnd(1000)
    return sd


@pytest.fixture(scope="module")
def t_ckpt(tmp_path_factory):
    sd = official_state_dict(192, False)
    path = tmp_path_factory.mktemp("ckpt") / "vrwkv_t_in1k_224.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    return path, sd


def _save(tmp_path, sd, name="ckpt.pth"):
    path = tmp_path / name
    torch.save({"state_dict": sd, "meta": {}}, path)
    return path


def test_loads_official_checkpoint_exactly(t_ckpt):
    path, sd = t_ckpt
    model = create_model("med_urwkv_t", num_classes=2)
    report = load_vrwkv_checkpoint(model, path)
    enc = model.encoder.state_dict()
    backbone = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    assert set(enc) == set(backbone)
    assert all(torch.equal(enc[k], backbone[k]) for k in backbone)
    assert report["loaded"] == len(backbone)
    assert report["ignored"] == ["head.fc.bias", "head.fc.weight"]
    assert report["resized"] == [] and report["adapted"] == []
    with torch.no_grad():                           # the loaded encoder runs inside the U-Net
        out = model.eval()(torch.randn(1, 3, 20, 30))
    assert out.shape == (1, 2, 20, 30) and torch.isfinite(out).all()


def test_pos_embed_resized_for_larger_grid(t_ckpt):
    path, sd = t_ckpt
    model = create_model("med_urwkv_t", img_size=256)
    report = load_vrwkv_checkpoint(model, path)
    want = resize_pos_embed(sd["backbone.pos_embed"], (14, 14), (16, 16))
    assert model.encoder.pos_embed.shape == (1, 256, 192)
    assert torch.equal(model.encoder.pos_embed.data, want)
    assert report["resized"] and "14x14 -> 16x16" in report["resized"][0]
    assert torch.equal(model.encoder.layers[3].att.key.weight, sd["backbone.layers.3.att.key.weight"])


def test_resize_pos_embed_keeps_constant_and_identity():
    pos = torch.randn(1, 196, 8)
    assert resize_pos_embed(pos, (14, 14), (14, 14)) is pos
    const = torch.full((1, 196, 8), 0.7)
    assert torch.allclose(resize_pos_embed(const, (14, 14), (5, 9)), torch.full((1, 45, 8), 0.7), atol=1e-6)


def test_single_channel_adapts_patch_embed(t_ckpt):
    path, sd = t_ckpt
    model = create_model("med_urwkv_t", in_chans=1)
    report = load_vrwkv_checkpoint(model, path)
    want = sd["backbone.patch_embed.projection.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(model.encoder.patch_embed.projection.weight, want)
    assert report["adapted"] and "3 -> 1" in report["adapted"][0]


def test_extra_key_is_rejected(t_ckpt, tmp_path):
    sd = dict(t_ckpt[1])
    sd["backbone.layers.3.att.bogus"] = torch.zeros(3)
    path = _save(tmp_path, sd, "extra.pth")
    with pytest.raises(ValueError, match=r"(?s)extra\.pth.*unexpected keys: layers\.3\.att\.bogus"):
        load_vrwkv_checkpoint(create_model("med_urwkv_t"), path)


def test_missing_key_is_rejected(t_ckpt, tmp_path):
    sd = dict(t_ckpt[1])
    del sd["backbone.layers.7.ffn.value.weight"]
    path = _save(tmp_path, sd, "missing.pth")
    with pytest.raises(ValueError, match=r"(?s)missing\.pth.*missing keys: layers\.7\.ffn\.value\.weight"):
        load_vrwkv_checkpoint(create_model("med_urwkv_t"), path)


def test_wrong_shape_is_rejected(t_ckpt, tmp_path):
    sd = dict(t_ckpt[1])
    sd["backbone.layers.2.ffn.key.weight"] = torch.zeros(2 * 192, 192)
    path = _save(tmp_path, sd, "shape.pth")
    with pytest.raises(ValueError, match=r"shape mismatches: layers\.2\.ffn\.key\.weight"):
        load_vrwkv_checkpoint(create_model("med_urwkv_t"), path)


def test_other_size_checkpoint_names_the_right_model(tmp_path):
    # Zeros, not random: only names and shapes matter here.
    path = _save(tmp_path, official_state_dict(384, True, make=torch.zeros), "vrwkv_s.pth")
    model = create_model("med_urwkv_t")
    before = model.encoder.pos_embed.detach().clone()
    with pytest.raises(ValueError, match=r"vrwkv_s\.pth.*VRWKV-S.*use med_urwkv_s"):
        load_vrwkv_checkpoint(model, path)
    assert torch.equal(model.encoder.pos_embed, before)        # nothing half-loaded


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth"):
        load_vrwkv_checkpoint(create_model("med_urwkv_t"), text)
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(ValueError, match=r"list\.pth.*not a Vision-RWKV checkpoint"):
        load_vrwkv_checkpoint(create_model("med_urwkv_t"), listing)
