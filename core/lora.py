"""LoRA on either or both towers of an open_clip model, through ``peft``.

Adapters are injected in place (``peft.inject_adapter_in_model``), so the model stays an
open_clip ``CLIP`` with its usual ``encode_image`` / ``encode_text``. Before export the adapters
are merged into the base weights and the wrappers removed, so the exported state dict has exactly
open_clip's keys and plain open_clip loads it.

    cliptune-train lora=default lora.r=16 'lora.towers=[text]'
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from cliptune.domains import TOWERS
from cliptune.log import get_logger

log = get_logger(__name__)

# Linear layers (and attention blocks) worth adapting, by the last part of their module name.
# open_clip towers: attn (nn.MultiheadAttention: q/k/v in_proj + out_proj), mlp.c_fc, mlp.c_proj.
# Hugging Face BERT-style text towers: query, key, value, attention.output.dense, intermediate.dense.
# A model with other names declares ``lora_target_aliases`` (open_clip name -> its own names), e.g.
# cliptune.hf_clip's AltCLIP: attn -> q_proj, k_proj, v_proj, out_proj; c_fc -> fc1; c_proj -> fc2.
DEFAULT_TARGETS = ("attn", "c_fc", "c_proj", "query", "key", "value", "dense")

_TOWER_PREFIX = {
    "image": r"visual\.",
    # open_clip CLIP keeps its text transformer at the top level; CustomTextCLIP under `text.`
    "text": r"(?:text\.|transformer\.)",
}


def target_regex(towers: list[str], targets: list[str]) -> str:
    """A peft ``target_modules`` regex matching ``targets`` inside the chosen towers' blocks."""
    bad = [t for t in towers if t not in _TOWER_PREFIX]
    if bad:
        raise ValueError(f"lora.towers={towers}: unknown tower(s) {bad}; use image and/or text")
    prefixes = "|".join(_TOWER_PREFIX[t] for t in towers)
    names = "|".join(re.escape(t) for t in targets)
    return rf"^(?:{prefixes}).*(?:^|\.)(?:{names})$"


def _tower_of(name: str) -> str | None:
    """'image' or 'text' for a parameter of an open_clip model (None: temperature / bias)."""
    if name.startswith("visual."):
        return "image"
    if name in ("logit_scale", "logit_bias"):
        return None
    return "text"


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    towers: list[str] | tuple[str, ...] = TOWERS,
    targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
    train_logit_scale: bool = True,
    keep_trainable: list[str] | tuple[str, ...] = (),
    **_: object,
) -> nn.Module:
    """Inject LoRA adapters (rank ``r``, scaling ``alpha / r``) into ``model`` in place.

    The adapters (and the temperature/bias, if ``train_logit_scale``) train. Every other weight
    is frozen, as peft does, except in the towers named in ``keep_trainable``: those keep the
    trainability they had before (so ``model.lock_*`` settings still apply), e.g. LoRA on a
    pretrained text tower beside an image tower trained in full:
    ``lora.towers=[text] lora.keep_trainable=[image,text]``.
    """
    from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415 - peft (and transformers under it) only for LoRA runs

    if r <= 0:
        return model
    towers, keep = list(towers), list(keep_trainable or ())
    aliases = getattr(model, "lora_target_aliases", None) or {}
    targets = list(dict.fromkeys(a for t in targets for a in (t, *aliases.get(t, ()))))
    bad = [t for t in keep if t not in _TOWER_PREFIX]
    if bad:
        raise ValueError(f"lora.keep_trainable={keep}: unknown tower(s) {bad}; use image and/or text")
    pattern = target_regex(towers, list(targets))
    matched = [n for n, _ in model.named_modules() if re.match(pattern, n)]
    if not matched:
        raise ValueError(
            f"lora.targets={list(targets)} match no module of towers {towers}; module names look like "
            f"{[n for n, _ in model.named_modules()][5:12]}"
        )
    alpha = float(alpha if alpha is not None else r)
    config = LoraConfig(r=int(r), lora_alpha=alpha,  # type: ignore[arg-type]  # peft says int; it divides a float alike
                        lora_dropout=float(dropout), target_modules=pattern, bias="none")
    # by identity: peft moves wrapped layers under `.base_layer`, the tensors stay the same
    was_trainable = {id(p): p.requires_grad for p in model.parameters()}
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        keep_it = _tower_of(name) in keep and was_trainable.get(id(p), False)
        p.requires_grad = "lora_" in name or keep_it
    if train_logit_scale:
        model.logit_scale.requires_grad_(True)
        if getattr(model, "logit_bias", None) is not None:
            model.logit_bias.requires_grad_(True)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d on %d modules of %s%s: %.2f%% of %d parameters trainable", r, len(matched),
             "+".join(towers), f" (+ own weights of {'+'.join(keep)})" if keep else "",
             100 * n_train / max(n_all, 1), n_all)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the plain layer back (in place)."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415 - peft (and transformers under it) only for LoRA runs

    # Outermost first, re-scanning after each swap: peft's MultiheadAttention adapter wraps a
    # nested out_proj adapter, whose module path changes once its parent is unwrapped.
    while True:
        found = next(((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)), None)
        if found is None:
            break
        name, module = found
        if not module.merged:
            module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    # peft's attention merge swaps in_proj_weight / out_proj.weight for plain tensors: make them
    # parameters again so state_dict keys and optimisers see exactly open_clip's model.
    for sub in model.modules():
        for attr in ("in_proj_weight", "weight"):
            t = sub.__dict__.get(attr)
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                delattr(sub, attr)
                sub.register_parameter(attr, nn.Parameter(t.detach().clone()))
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy with adapters merged (the trained model keeps its adapters)."""
    return merge_lora(copy.deepcopy(model))


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())
