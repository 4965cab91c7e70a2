"""AdamW with CLIP's weight-decay exclusions, layer-wise lr decay, warm-up + cosine schedule."""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.torch_version import TorchVersion

from cliptune.config import OptimConfig  # the settings, declared once with their ranges (configs/optim/*.yaml)
from cliptune.domains import SCHEDULES, TOWERS

__all__ = ["OptimConfig", "build_optimizer", "lr_lambda", "param_groups"]


# Parameters CLIP trains without weight decay: gains, biases, temperature, embeddings.
_NO_DECAY = re.compile(
    r"(^|\.)(bias|logit_scale|logit_bias|positional_embedding|class_embedding|token_embedding\.weight"
    r"|embeddings\.)|(^|\.)(ln|norm|bn|layernorm|LayerNorm)[^.]*\."
)


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or bool(_NO_DECAY.search(name))


def layer_id(name: str, n_image: int, n_text: int) -> tuple[str, int]:
    """(tower, depth) of a parameter: embeddings are 0, block i is i + 1, heads are depth + 1."""
    m = re.search(r"(?:resblocks|layer|layers|blocks)\.(\d+)\.", name)
    tower = "image" if name.startswith("visual.") else ("text" if _is_text(name) else "head")
    depth = n_image if tower == "image" else n_text
    if tower == "head":
        return tower, 0
    if m:
        return tower, int(m.group(1)) + 1
    if re.search(r"(embed|class_embedding|conv1|ln_pre|token_embedding|positional)", name):
        return tower, 0
    return tower, depth + 1


def _is_text(name: str) -> bool:
    return name.startswith(("transformer.", "token_embedding", "positional_embedding", "ln_final", "text_projection",
                            "text."))


def _depth(model: nn.Module, prefix_match) -> int:
    ids = [int(m.group(1)) for n, _ in model.named_parameters() if prefix_match(n)
           for m in [re.search(r"(?:resblocks|layer|layers|blocks)\.(\d+)\.", n)] if m]
    return max(ids) + 1 if ids else 0


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split by (weight decay?, lr multiplier); each group's ``name`` (see
    :func:`group_name`) is its column in the lr monitor's log, ``train/lr/<name>``."""
    n_image = _depth(model, lambda n: n.startswith("visual."))
    n_text = _depth(model, _is_text)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower, lid = layer_id(name, n_image, n_text)
        peak = cfg.lr
        if tower == "text" and cfg.lr_text is not None:
            peak = cfg.lr_text
        if tower == "image" and cfg.lr_image is not None:
            peak = cfg.lr_image
        scale = 1.0
        if cfg.layer_decay is not None and tower in TOWERS:
            depth = (n_image if tower == "image" else n_text) + 1
            scale = cfg.layer_decay ** (depth - lid)
        wd = 0.0 if no_weight_decay(name, p) else cfg.weight_decay
        key = (wd, peak * scale)
        g = groups.setdefault(key, {"params": [], "weight_decay": wd, "lr": peak * scale, "names": [], "layers": {}})
        g["params"].append(p)
        g["names"].append(name)
        g["layers"].setdefault(tower, set()).add(lid)
    if not groups:
        raise ValueError("no trainable parameters: both towers locked and nothing unlocked (model.lock_*)")
    for g in groups.values():
        g["name"] = group_name(g.pop("layers"), g["weight_decay"], by_layer=cfg.layer_decay is not None)
    return list(groups.values())


def group_name(layers: dict[str, set[int]], weight_decay: float, by_layer: bool) -> str:
    """What a group holds: its towers (``image+text+head``; head = temperature and bias), with layer
    decay their depths (``image.1+text.1``: 0 is the embeddings), and ``/no_wd`` without weight decay.
    Unique within one optimiser: groups differ in weight decay or in lr, and the lr follows the depth."""
    parts = []
    for tower in ("image", "text", "head"):
        ids = sorted(layers.get(tower, ()))
        if not ids:
            continue
        contiguous = ids == list(range(ids[0], ids[-1] + 1))
        depth = str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}" if contiguous else "_".join(map(str, ids))
        parts.append(f"{tower}.{depth}" if by_layer and tower != "head" else tower)
    return "+".join(parts) + ("" if weight_decay else "/no_wd")


# Devices whose fused AdamW (one kernel for the whole update of a tensor list) is used by default.
# CPU: 6x faster than the per-tensor loop torch picks there (tiny64: 11 vs 70 ms a step on one thread,
# most of it the 6.3M-entry token embedding); CUDA: the documented fastest implementation.
FUSED_DEVICES = ("cuda", "cpu")


def fused_applies(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these parameters: all floating point, on one device of
    ``FUSED_DEVICES`` (CPU from torch 2.4, which brought its fused kernel)."""
    if not params or len({p.device for p in params}) != 1 or not all(p.is_floating_point() for p in params):
        return False
    device = params[0].device.type
    return device in FUSED_DEVICES and (device != "cpu" or TorchVersion(torch.__version__) >= "2.4")


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`. ``fused``: torch's fused implementation (same update, one kernel per
    step instead of several per tensor); None picks it where :func:`fused_applies`. Build the optimiser
    after the model is on its device. Not with an fp16 ``GradScaler`` and gradient clipping: a fused
    optimiser unscales inside its step, so Lightning cannot clip (the caller passes ``fused=False``)."""
    groups = param_groups(model, cfg)
    for g in groups:
        g["initial_lr"] = g["lr"]
        g.pop("names")
    if fused is None:
        fused = fused_applies([p for g in groups for p in g["params"]])
    # foreach=None: torch's default (foreach on CUDA, the per-tensor loop on CPU) when not fused
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of each group's peak lr at a step: linear warm-up, then cosine (or constant)."""
    warm = max(0, int(cfg.warmup_steps))
    total = max(total_steps, warm + 1)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule='{cfg.schedule}' is not one of {', '.join(SCHEDULES)}")
        if cfg.schedule == "constant":
            return 1.0
        t = min(1.0, (step - warm) / max(1, total - warm))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f
