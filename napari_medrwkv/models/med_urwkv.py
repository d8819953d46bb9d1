"""Med-URWKV: a pure-RWKV U-Net on an ImageNet-pretrained Vision-RWKV encoder.

Layout (Zhou, arXiv 2506.10858 v1; the paper's code is not public, so the
decoder details below are our own choices)::

    input --pad to /16--> VisionRWKV encoder (12 VRWKV blocks at 1/16)
        taps after layers 3, 6, 9, 12 (the last one through the final ``ln1``)
        neck: tap 12 -> 1x1 conv at 1/16, tap 9 -> 1/8, tap 6 -> 1/4, tap 3 -> 1/2
              (UNETR-style: each 2x step is a stride-2 transposed conv + BN + GELU)
        bottleneck: 2 VRWKV blocks on the 1/16 token grid
        decoder 1/8, 1/4: 2x transposed conv, concat skip, 3x3 conv fuse, 2 VRWKV blocks
        decoder 1/2, 1/1: 2x transposed conv, concat skip, two 3x3 conv-BN-ReLU
        (the full-resolution skip comes from a small conv stem on the input)
        1x1 conv to num_classes, crop back to the input size

Why conv instead of RWKV at 1/2 and full resolution: those grids hold 4x and
16x the tokens of the 1/4 stage (65k and 262k at 512x512).  A VRWKV block's work
there is mostly memory-bound element-wise passes per token (two Q-shifts, five
lerps, the Bi-WKV exponentials, a 4x-wide channel-MLP activation), so training
memory and CPU time would grow several-fold for stages that mainly need to
place edges -- local convs do that, and global mixing already happened at
1/16 .. 1/4.

The encoder keeps Vision-RWKV's module and parameter names exactly
(``patch_embed.projection``, ``pos_embed``, ``layers.{i}.{ln0,ln1,ln2,att,ffn,
gamma1,gamma2}``, ``ln1``) so an official mmcls checkpoint loads strictly with
:func:`load_vrwkv_checkpoint`.  The classification head is not part of the model.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ChannelMix, DropPath, LayerNorm2d, SpatialMix, conv_bn_act, grid, pad_to_multiple, tokens
from .registry import register_model

__all__ = ["VisionRWKV", "VRWKVBlock", "MedURWKV", "load_vrwkv_checkpoint",
           "med_urwkv_t", "med_urwkv_s", "med_urwkv_b"]

PATCH = 16
PRETRAIN_IMG_SIZE = 224          # official checkpoints carry a 14x14 pos_embed
TAPS = (3, 6, 9, 12)             # 1-based encoder depths whose outputs feed the decoder
_VRWKV_NAMES = {192: "VRWKV-T", 384: "VRWKV-S", 768: "VRWKV-B", 1024: "VRWKV-L"}
_MODEL_FOR_NAME = {"VRWKV-T": "med_urwkv_t", "VRWKV-S": "med_urwkv_s", "VRWKV-B": "med_urwkv_b"}


# --------------------------------------------------------------------------- blocks

class VRWKVBlock(nn.Module):
    """One Vision-RWKV block on a (B, T, C) token sequence laid out on an (H, W) grid.

    Pre-norm:  x += dp(g1 * att(ln1(x)));  x += dp(g2 * ffn(ln2(x)))
    Post-norm: x += dp(g1 * ln1(att(x)));  x += dp(g2 * ln2(ffn(x)))
    (g1/g2 = ``gamma1``/``gamma2`` exist only when ``init_values`` is given).
    The first block of a Vision-RWKV stack also normalises its input with ``ln0``.
    """

    def __init__(self, dim: int, layer_id: int = 0, n_layer: int = 1, hidden_rate: int = 4,
                 post_norm: bool = False, init_values: Optional[float] = None,
                 drop_path: float = 0.0, with_ln0: bool = False):
        super().__init__()
        self.post_norm = post_norm
        self.ln0 = nn.LayerNorm(dim) if with_ln0 else None
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.att = SpatialMix(dim, layer_id, n_layer, key_norm=False, init="fancy")
        self.ffn = ChannelMix(dim, hidden_rate, layer_id, n_layer, key_norm=False, init="fancy")
        self.drop_path = DropPath(drop_path)
        if init_values is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        if self.ln0 is not None:
            x = self.ln0(x)
        x = x + self.drop_path(self._scaled(self._branch(self.att, self.ln1, x, hw), self.gamma1))
        x = x + self.drop_path(self._scaled(self._branch(self.ffn, self.ln2, x, hw), self.gamma2))
        return x

    def _branch(self, mix, norm, x, hw):
        return norm(mix(x, hw)) if self.post_norm else mix(norm(x), hw)

    @staticmethod
    def _scaled(x, gamma):
        return x if gamma is None else gamma * x


class PatchEmbed(nn.Module):
    """mmcv's PatchEmbed as Vision-RWKV configures it: one 16x16 stride-16 conv named ``projection``."""

    def __init__(self, in_chans: int, embed_dims: int):
        super().__init__()
        self.projection = nn.Conv2d(in_chans, embed_dims, PATCH, PATCH, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


class VisionRWKV(nn.Module):
    """The Vision-RWKV backbone (mmcls ``VRWKV``), returning token maps at the tap depths.

    ``img_size`` only sets the stored ``pos_embed`` grid (14x14 at 224 px, as
    pretrained); any input whose sides are multiples of 16 works, with the
    position embedding resized bicubically to the actual grid.
    """

    def __init__(self, in_chans: int = 3, embed_dims: int = 192, num_layers: int = 12,
                 img_size: Union[int, Sequence[int]] = PRETRAIN_IMG_SIZE, post_norm: bool = False,
                 init_values: Optional[float] = None, hidden_rate: int = 4,
                 drop_path_rate: float = 0.0, out_indices: Sequence[int] = TAPS):
        super().__init__()
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.pos_hw = (img_hw[0] // PATCH, img_hw[1] // PATCH)
        self.embed_dims = embed_dims
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(in_chans, embed_dims)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_hw[0] * self.pos_hw[1], embed_dims))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        rates = torch.linspace(0, drop_path_rate, num_layers).tolist()
        self.layers = nn.ModuleList(
            VRWKVBlock(embed_dims, i, num_layers, hidden_rate, post_norm, init_values,
                       rates[i], with_ln0=(i == 0))
            for i in range(num_layers))
        self.ln1 = nn.LayerNorm(embed_dims)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, in_chans, H, W) with H, W multiples of 16 -> list of (B, D, H/16, W/16)."""
        x = self.patch_embed(x)
        hw = tuple(x.shape[-2:])
        x = tokens(x) + resize_pos_embed(self.pos_embed, self.pos_hw, hw)
        outs = []
        for depth, layer in enumerate(self.layers, start=1):
            x = layer(x, hw)
            if depth == len(self.layers):
                x = self.ln1(x)             # the final norm, as the segmentation backbone applies it
            if depth in self.out_indices:
                outs.append(grid(x, hw))
        return outs


def resize_pos_embed(pos: torch.Tensor, src_hw: Tuple[int, int], dst_hw: Tuple[int, int]) -> torch.Tensor:
    """(1, h*w, C) position embedding on ``src_hw`` -> (1, H*W, C) on ``dst_hw``, bicubic."""
    if tuple(src_hw) == tuple(dst_hw):
        return pos
    pos2d = grid(pos, src_hw)
    # Bicubic in float32: half-precision bicubic is missing on some backends.
    out = F.interpolate(pos2d.float(), size=tuple(dst_hw), mode="bicubic", align_corners=False)
    return tokens(out).to(pos.dtype)


# --------------------------------------------------------------------------- neck and decoder

def _up2(c_in: int, c_out: int) -> nn.Sequential:
    """2x upsampling: stride-2 transposed conv + BN + GELU."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.GELU())


def _neck_branch(dim: int, c_out: int, n_up: int) -> nn.Sequential:
    """Encoder tap (D at 1/16) -> c_out channels at 1/16 / 2**n_up, UNETR style."""
    if n_up == 0:
        return conv_bn_act(dim, c_out, 1)
    steps = [_up2(dim, c_out)] + [_up2(c_out, c_out) for _ in range(n_up - 1)]
    return nn.Sequential(*steps, conv_bn_act(c_out, c_out, 3))


class RWKVStage(nn.Module):
    """VRWKV blocks (pre-norm, fancy init) applied to a (B, C, H, W) map on its token grid."""

    def __init__(self, dim: int, depth: int, drop_path: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(VRWKVBlock(dim, i, depth, drop_path=drop_path) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hw = tuple(x.shape[-2:])
        t = tokens(x)
        for block in self.blocks:
            t = block(t, hw)
        return grid(t, hw)


class UpStage(nn.Module):
    """Decoder stage: 2x up, concat the skip, 3x3 conv fuse, then RWKV blocks or a second conv."""

    def __init__(self, c_in: int, c_out: int, rwkv_depth: int, drop_path: float = 0.0):
        super().__init__()
        self.up = _up2(c_in, c_out)
        self.fuse = conv_bn_act(2 * c_out, c_out, 3)
        self.mix = RWKVStage(c_out, rwkv_depth, drop_path) if rwkv_depth else conv_bn_act(c_out, c_out, 3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.mix(self.fuse(torch.cat([self.up(x), skip], dim=1)))


class MedURWKV(nn.Module):
    """Med-URWKV: Vision-RWKV encoder + RWKV bottleneck + RWKV/conv U-Net decoder.

    ``widths`` are the decoder channels at 1/16, 1/8, 1/4, 1/2 and 1/1.
    ``rwkv_depth`` is the number of VRWKV blocks in the bottleneck and in the
    1/8 and 1/4 decoder stages.
    """

    encoder_parts = ("encoder",)          # the Vision-RWKV backbone: what TrainConfig(freeze="encoder") holds fixed

    def __init__(self, in_chans: int = 3, num_classes: int = 1, embed_dims: int = 192,
                 post_norm: bool = False, init_values: Optional[float] = None,
                 widths: Sequence[int] = (256, 128, 64, 32, 16), rwkv_depth: int = 2,
                 img_size: Union[int, Sequence[int]] = PRETRAIN_IMG_SIZE,
                 drop_path_rate: float = 0.0, decoder_drop_path: float = 0.0):
        super().__init__()
        if in_chans < 1 or num_classes < 1:
            raise ValueError(f"in_chans and num_classes must be >= 1, got {in_chans} and {num_classes}")
        c16, c8, c4, c2, c1 = widths
        self.encoder = VisionRWKV(in_chans, embed_dims, 12, img_size, post_norm, init_values,
                                  drop_path_rate=drop_path_rate, out_indices=TAPS)
        # Taps 3/6/9 are raw residual streams (their scale drifts with depth, and with
        # post-norm layer scales); tap 12 already went through the encoder's ln1.
        self.tap_norms = nn.ModuleList(LayerNorm2d(embed_dims) for _ in TAPS[:-1])
        self.neck = nn.ModuleList([_neck_branch(embed_dims, c2, 3), _neck_branch(embed_dims, c4, 2),
                                   _neck_branch(embed_dims, c8, 1), _neck_branch(embed_dims, c16, 0)])
        self.stem = nn.Sequential(conv_bn_act(in_chans, c1, 3), conv_bn_act(c1, c1, 3))
        self.bottleneck = RWKVStage(c16, rwkv_depth, decoder_drop_path)
        self.up8 = UpStage(c16, c8, rwkv_depth, decoder_drop_path)
        self.up4 = UpStage(c8, c4, rwkv_depth, decoder_drop_path)
        self.up2 = UpStage(c4, c2, 0)
        self.up1 = UpStage(c2, c1, 0)
        self.head = nn.Conv2d(c1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (H, W) = pad_to_multiple(x, PATCH)
        taps = self.encoder(x)
        taps = [norm(t) for norm, t in zip(self.tap_norms, taps[:-1])] + [taps[-1]]
        s2, s4, s8, s16 = (branch(t) for branch, t in zip(self.neck, taps))
        y = self.bottleneck(s16)
        y = self.up4(self.up8(y, s8), s4)
        y = self.up1(self.up2(y, s2), self.stem(x))
        return self.head(y)[..., :H, :W]


# --------------------------------------------------------------------------- registry

_CONFIGS = {
    "t": dict(embed_dims=192, post_norm=False, init_values=None, widths=(256, 128, 64, 32, 16)),
    "s": dict(embed_dims=384, post_norm=True, init_values=1.0, widths=(384, 192, 96, 48, 24)),
    "b": dict(embed_dims=768, post_norm=True, init_values=1e-5, widths=(512, 256, 128, 64, 32)),
}


def _build(size: str, in_chans: int, num_classes: int, kw: dict) -> MedURWKV:
    cfg = dict(_CONFIGS[size])
    cfg.update(kw)
    return MedURWKV(in_chans=in_chans, num_classes=num_classes, **cfg)


@register_model
def med_urwkv_t(in_chans: int = 3, num_classes: int = 1, **kw) -> MedURWKV:
    """Med-URWKV-T: VRWKV-T encoder (D=192, pre-norm)."""
    return _build("t", in_chans, num_classes, kw)


@register_model
def med_urwkv_s(in_chans: int = 3, num_classes: int = 1, **kw) -> MedURWKV:
    """Med-URWKV-S: VRWKV-S encoder (D=384, post-norm, layer scale 1)."""
    return _build("s", in_chans, num_classes, kw)


@register_model
def med_urwkv_b(in_chans: int = 3, num_classes: int = 1, **kw) -> MedURWKV:
    """Med-URWKV-B: VRWKV-B encoder (D=768, post-norm, layer scale 1e-5)."""
    return _build("b", in_chans, num_classes, kw)


# --------------------------------------------------------------------------- checkpoint loading

_PROJ = "patch_embed.projection.weight"


def load_vrwkv_checkpoint(model: nn.Module, path) -> Dict[str, list]:
    """Load an official Vision-RWKV (mmcls) ImageNet checkpoint into ``model.encoder``.

    The file's ``backbone.*`` keys must match the encoder exactly; ``head.*`` (the
    ImageNet classifier) is ignored.  ``pos_embed`` is resized bicubically when
    its grid differs from the model's.  For ``in_chans != 3`` the RGB patch
    filters are adapted: summed for 1 channel (a grey image then gives the same
    response as its RGB copy); otherwise the RGB filters are cycled over the
    channels and scaled by 3 / in_chans, which keeps the response to an input
    whose channels are all equal (exactly when in_chans is a multiple of 3).

    Returns ``{"loaded": n, "ignored": [...], "resized": [...], "adapted": [...]}``.
    Raises ValueError naming the file on anything that does not fit.
    """
    encoder = getattr(model, "encoder", model)
    if not isinstance(encoder, VisionRWKV):
        raise TypeError(f"load_vrwkv_checkpoint needs a Med-URWKV model or a VisionRWKV, got {type(model).__name__}")
    backbone, ignored = _backbone_state(path)
    _check_embed_dims(encoder, backbone, path)
    report = {"loaded": 0, "ignored": ignored, "resized": [], "adapted": []}
    _fit_pos_embed(encoder, backbone, report, path)
    _fit_patch_embed(encoder, backbone, report)
    _check_keys(encoder, backbone, path)
    encoder.load_state_dict(backbone, strict=True)
    report["loaded"] = len(backbone)
    return report


def _backbone_state(path) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The file's backbone tensors (prefix stripped) and the ignored head keys."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise                           # a wrong path is not a "bad checkpoint"; keep the plain error
    except Exception as err:     # pickle / zip / weights_only errors all mean "not a checkpoint"
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(t) for t in state.values()):
        raise ValueError(f"{path}: not a Vision-RWKV checkpoint (expected a dict of tensors under 'state_dict')")
    ignored = sorted(k for k in state if k.startswith("head."))
    prefixed = any(k.startswith("backbone.") for k in state)
    backbone = {}
    for key, value in state.items():
        if key.startswith("head."):
            continue
        if prefixed and not key.startswith("backbone."):
            backbone[key] = value       # kept so the strict check reports it as unexpected
        else:
            backbone[key[len("backbone."):] if prefixed else key] = value
    return backbone, ignored


def _check_embed_dims(encoder: VisionRWKV, state: dict, path):
    """A clear message for the common mistake: a checkpoint of another size."""
    if _PROJ not in state:
        return                          # the strict key check reports it
    dims = state[_PROJ].shape[0]
    if dims == encoder.embed_dims:
        return
    name = _VRWKV_NAMES.get(dims, f"embed-dim-{dims}")
    hint = f"; use {_MODEL_FOR_NAME[name]}" if name in _MODEL_FOR_NAME else ""
    raise ValueError(f"{path}: this looks like a {name} checkpoint (embed dim {dims}) but the model's "
                     f"encoder has embed dim {encoder.embed_dims}{hint}")


def _fit_pos_embed(encoder: VisionRWKV, state: dict, report: dict, path):
    pos = state.get("pos_embed")
    if pos is None or pos.dim() != 3 or pos.shape[-1] != encoder.embed_dims:
        return                          # missing or odd: left to the strict check
    side = math.isqrt(pos.shape[1])
    if side * side != pos.shape[1]:
        raise ValueError(f"{path}: pos_embed has {pos.shape[1]} tokens, not a square grid")
    if (side, side) != encoder.pos_hw:
        state["pos_embed"] = resize_pos_embed(pos, (side, side), encoder.pos_hw)
        report["resized"].append(f"pos_embed {side}x{side} -> {encoder.pos_hw[0]}x{encoder.pos_hw[1]} (bicubic)")


def _fit_patch_embed(encoder: VisionRWKV, state: dict, report: dict):
    weight = state.get(_PROJ)
    want = encoder.patch_embed.projection.in_channels
    if weight is None or weight.dim() != 4 or weight.shape[1] == want:
        return
    have = weight.shape[1]
    if want == 1:
        state[_PROJ] = weight.sum(dim=1, keepdim=True)
        rule = "summed over input channels"
    else:
        idx = torch.arange(want) % have
        state[_PROJ] = weight[:, idx] * (have / want)
        rule = f"channels cycled and scaled by {have}/{want}"
    report["adapted"].append(f"{_PROJ}: {have} -> {want} input channels ({rule})")


def _check_keys(encoder: VisionRWKV, state: dict, path):
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                   for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if keys]
    if problems:
        raise ValueError(f"{path}: does not match the Vision-RWKV encoder ({'; '.join(problems)})")
