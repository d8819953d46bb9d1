"""Average the weights of several checkpoints of one network (a "model soup", Wortsman et al.
2022; or a fine-tuned model blended with its start, WiSE-FT).  Runs that stayed near their
common start can average to a model better than either; runs that moved far apart need not
(BUSI's two 95-minute seeds averaged 0.01-0.03 Dice below either, 2026-12-06, bench/RESULTS.md "rwkv_unet_t-busi"),
and runs from different starts give noise: score the mean on validation data before using it.
Imports neither Qt nor napari.
"""
import copy
from typing import Optional, Sequence

import torch

from .appearance import merged_profile, profile_of
from .checkpoint import INFERENCE_DEFAULTS
from .model import SegmentationModel, load_model

#: What must agree for two checkpoints to be one network, used the same way.
_SAME = ("architecture", "arch_kwargs", "in_chans", "num_classes", "class_names", "normalization", "input_scale")


def average_models(sources: Sequence, shares: Optional[Sequence[float]] = None, device="cpu",
                   command: str = "") -> SegmentationModel:
    """The weighted mean of the weights of ``sources`` (shipped names, checkpoint paths or loaded
    models; at least two), every floating tensor averaged in float64 (BatchNorm statistics
    included; integer buffers from the first).  ``shares`` weigh them (default equal; positive,
    scaled to sum to 1).

    The result keeps the first model's metadata, with default inference settings (thresholds
    and filters chosen for one model are not chosen for the mean: calibrate it again), no
    recorded scores, the sources' provenance under ``training["averaged"]`` (less their per-epoch
    history; ``command``, how the average was asked for, beside it), and the union of their
    appearance profiles (see :mod:`.appearance`).
    """
    if len(sources) < 2:
        raise ValueError(f"average: give at least two checkpoints to average, got {len(sources)}")
    shares = _checked_shares(shares, len(sources))
    models = [load_model(source, device=device) for source in sources]
    _check_siblings(models)
    states = [model.net.state_dict() for model in models]
    mean = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = sum(share * state[key].double() for share, state in zip(shares, states))
            mean[key] = total.to(first.dtype)
        else:
            mean[key] = first          # copied by load_state_dict below
    net = copy.deepcopy(models[0].net)
    net.load_state_dict(mean)
    info = copy.deepcopy(models[0].info)
    info.inference = dict(INFERENCE_DEFAULTS)
    info.metrics = {}
    sources = [{"source": model.source, "share": share, "training": _provenance(model.info.training),
                "metrics": model.info.metrics} for model, share in zip(models, shares)]
    info.training = {"command": command, "averaged": sources}
    profile = merged_profile(profile_of(model.info) for model in models)
    if profile is not None:
        info.training["appearance"] = profile
    return SegmentationModel(net.eval(), info, f"average of {', '.join(m.name for m in models)}", models[0].device)


def _provenance(training: dict) -> dict:
    """A source's training record without its bulk: the per-epoch history and the appearance
    profile (merged into the average's own)."""
    return {key: value for key, value in training.items() if key not in ("history", "appearance")}


def _checked_shares(shares, n: int) -> list:
    if shares is None:
        return [1.0 / n] * n
    shares = [float(s) for s in shares]
    if len(shares) != n:
        raise ValueError(f"average: {len(shares)} shares for {n} checkpoints; give one share per checkpoint")
    if not all(s > 0 for s in shares):
        raise ValueError(f"average: shares {shares} must all be positive (leave a checkpoint out instead of a 0)")
    total = sum(shares)
    return [s / total for s in shares]


def _check_siblings(models) -> None:
    first = models[0]
    for other in models[1:]:
        for name in _SAME:
            mine, theirs = getattr(first.info, name), getattr(other.info, name)
            if mine != theirs:
                raise ValueError(f"average: {first.name} and {other.name} differ in {name} ({mine!r} against "
                                 f"{theirs!r}); only checkpoints of one network, trained from one start, can be "
                                 "averaged")
