"""Build, lock, export and reload open_clip models.

Every model is an open_clip ``CLIP`` / ``CustomTextCLIP``; cliptune adds no wrapper class, so an
exported model loads with plain open_clip:

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:runs/demo/export")

Sources for weights (``pretrained``): an open_clip tag (downloaded through the hub once and
cached), a local checkpoint file, or ``None`` (train from scratch). Custom architectures come
from config as an open_clip model-config dict (``arch``), registered under ``name``.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn

from cliptune.config import package_path  # noqa: F401 - re-exported: configs and tests name it here
from cliptune.log import get_logger
from cliptune.lora import apply_lora, merge_lora
from cliptune.rundir import RunDir, load_torch_file

log = get_logger(__name__)

EXPORT_CONFIG = "open_clip_config.json"
EXPORT_WEIGHTS = "open_clip_model.safetensors"


@dataclass
class ModelBundle:
    """A model with everything needed to feed it."""

    model: nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    model_name: str
    model_cfg: dict
    preprocess_cfg: dict = field(default_factory=dict)
    spec: dict = field(default_factory=dict)  # the build_model kwargs, to rebuild from a checkpoint


def _register_arch(name: str, arch: dict) -> None:
    """Register a config dict with open_clip under `name` (open_clip only reads configs from files)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(arch))
        open_clip.add_model_config(path)


def _check_name(name: str) -> None:
    if name.startswith(("local-dir:", "hf-hub:")):
        return
    if name.replace("/", "-") not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower().split("-")[0] in m.lower()][:8]
        raise ValueError(
            f"model.name='{name}' is not an open_clip model. Set model.arch to define a custom "
            f"architecture, or choose a known name{' such as ' + ', '.join(close) if close else ''} "
            "(`python -c 'import open_clip; print(open_clip.list_models())'` lists them all)."
        )


def build_model(
    name: str,
    pretrained: str | None = None,
    arch: dict | None = None,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
    image_size: int | None = None,
    context_length: int | None = None,
    aug_cfg: dict | None = None,
    lock_image: bool = False,
    lock_image_unlocked_groups: int = 0,
    lock_image_freeze_bn_stats: bool = False,
    lock_text: bool = False,
    lock_text_unlocked_layers: int = 0,
    lock_text_freeze_layer_norm: bool = True,
    grad_checkpointing: bool = False,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
) -> ModelBundle:
    """Create an open_clip model with its transforms and tokenizer.

    Locking follows open_clip: ``lock_image_unlocked_groups`` counts the image tower's last
    groups (the last of which is the final norm + projection); ``lock_text_unlocked_layers``
    counts the text tower's last groups (projection, then last block + ln_final, ...) or, for
    Hugging Face text towers, the last encoder layers (the projection always stays trainable).

    ``init_logit_scale`` / ``init_logit_bias`` (log-space scale, raw bias) apply to models
    trained from scratch; pretrained weights keep their own values.
    """
    spec = {k: v for k, v in locals().items() if k != "device"}
    spec = copy.deepcopy(spec)
    if arch is not None:
        _register_arch(name, _plain(arch))
    else:
        _check_name(name)
    if pretrained and not name.startswith(("local-dir:", "hf-hub:")):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags and not os.path.isfile(pretrained):
            raise FileNotFoundError(
                f"model.pretrained='{pretrained}' is neither a file nor an open_clip tag for "
                f"'{name}' (tags: {tags or 'none'})"
            )
    from_scratch = not pretrained and not name.startswith(("local-dir:", "hf-hub:"))
    kwargs: dict[str, Any] = {}
    if from_scratch and init_logit_scale is not None:
        kwargs["init_logit_scale"] = float(init_logit_scale)
    if from_scratch and init_logit_bias is not None:
        kwargs["init_logit_bias"] = float(init_logit_bias)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name,
        pretrained=pretrained or None,
        force_image_size=image_size,
        force_context_length=context_length,
        aug_cfg=_plain(aug_cfg) if aug_cfg else None,
        cache_dir=cache_dir,
        device=device,
        **kwargs,
    )
    tokenizer = open_clip.get_tokenizer(name, context_length=context_length, cache_dir=cache_dir)
    model_cfg = _model_cfg_of(name, arch, image_size, context_length)
    if lock_image:
        model.lock_image_tower(
            unlocked_groups=lock_image_unlocked_groups, freeze_bn_stats=lock_image_freeze_bn_stats
        )
    if lock_text:
        if _is_hf_text(model):
            lock_hf_text(model.text, lock_text_unlocked_layers, lock_text_freeze_layer_norm)
        else:
            model.lock_text_tower(
                unlocked_layers=lock_text_unlocked_layers,
                freeze_layer_norm=lock_text_freeze_layer_norm,
            )
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return ModelBundle(
        model=model,
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        tokenizer=tokenizer,
        model_name=name,
        model_cfg=model_cfg,
        preprocess_cfg=dict(getattr(model.visual, "preprocess_cfg", {}) or {}),
        spec=spec,
    )


def _is_hf_text(model: nn.Module) -> bool:
    text = getattr(model, "text", None)
    return text is not None and hasattr(getattr(text, "transformer", None), "config")


def lock_hf_text(text: nn.Module, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
    """Lock a Hugging Face text tower (open_clip's HFTextEncoder) but its last ``unlocked_layers``
    encoder layers; the projection after the pooler always trains.

    Written here because open_clip's ``HFTextEncoder.lock`` looks the layer list up in its own
    architecture table, which lacks it for BERT-family towers (MiniLM, the sentence-transformers
    models): unlocking layers there raises ``KeyError('layer_attr')``. It also leaves weights
    outside the embeddings and layers (BERT's unused pooler) trainable, which DDP then reports as
    unused parameters. Here the layer list is found from the model's config, and every weight of
    the transformer outside the unlocked layers is frozen (LayerNorms too, unless
    ``freeze_layer_norm=False``, as in open_clip).
    """
    transformer = text.transformer
    n_layers = int(unlocked_layers or 0)
    layers: list[nn.Module] = []
    if n_layers > 0:
        depth = getattr(transformer.config, "num_hidden_layers", None)
        layers = next(
            (list(m) for m in transformer.modules() if isinstance(m, nn.ModuleList) and len(m) == depth),
            [],
        )
        if not layers:
            raise ValueError(
                f"model.lock_text_unlocked_layers={n_layers}: found no list of {depth} encoder "
                f"layers in the text tower ({type(transformer).__name__}); use 0 (train only the "
                "projection) or lock_text=false"
            )
        if n_layers > len(layers):
            raise ValueError(
                f"model.lock_text_unlocked_layers={n_layers}: the text tower has only "
                f"{len(layers)} layers"
            )
    unlocked = {id(p) for layer in layers[len(layers) - n_layers:] for p in layer.parameters()}
    for name, p in transformer.named_parameters():
        is_norm = "LayerNorm" in name.split(".") or "layer_norm" in name.split(".")
        p.requires_grad = id(p) in unlocked or (is_norm and not freeze_layer_norm)
    log.info("text tower locked: last %d of %d layers and the projection train", n_layers,
             len(layers) or getattr(transformer.config, "num_hidden_layers", 0))


def _plain(x: Any) -> Any:
    """DictConfig/ListConfig -> plain containers (library code never keeps a DictConfig)."""
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


def _model_cfg_of(name: str, arch: dict | None, image_size: int | None, ctx: int | None) -> dict:
    if arch is not None:
        cfg = copy.deepcopy(_plain(arch))
    elif name.startswith("local-dir:"):
        cfg = json.loads((Path(name[len("local-dir:"):]) / EXPORT_CONFIG).read_text())["model_cfg"]
    else:
        cfg = copy.deepcopy(open_clip.get_model_config(name) or {})
    if image_size is not None:
        cfg.setdefault("vision_cfg", {})["image_size"] = image_size
    if ctx is not None:
        cfg.setdefault("text_cfg", {})["context_length"] = ctx
    return cfg


def unwrap(model: nn.Module) -> nn.Module:
    """The plain open_clip module under torch.compile / DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def export_model(model: nn.Module, model_cfg: dict, preprocess_cfg: dict, out_dir: str | Path) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` loadable by plain open_clip.

    LoRA adapters, if any, must be merged before (see ``cliptune.lora.merge_lora``).
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    cfg = copy.deepcopy(model_cfg)
    if getattr(model, "logit_bias", None) is not None:
        cfg["init_logit_bias"] = float(model.logit_bias.detach().reshape(-1)[0])  # so open_clip creates it
    else:
        cfg.pop("init_logit_bias", None)
    text_cfg = cfg.get("text_cfg", {})
    if "hf_model_name" in text_cfg:
        # The exported weights hold the tuned text tower: never re-download the base weights.
        text_cfg["hf_model_pretrained"] = False
    pp = {k: v for k, v in (preprocess_cfg or {}).items() if k in ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")}
    tmp_w = out / (EXPORT_WEIGHTS + ".tmp")
    save_file(state, str(tmp_w))
    os.replace(tmp_w, out / EXPORT_WEIGHTS)
    tmp_c = out / (EXPORT_CONFIG + ".tmp")
    tmp_c.write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}, indent=2))
    os.replace(tmp_c, out / EXPORT_CONFIG)
    return out


def load_model(spec: str | Path, pretrained: str | None = None, device: str | torch.device = "cpu") -> ModelBundle:
    """Load a model from any source cliptune knows.

    ``spec``: an open_clip name (with ``pretrained`` tag or file), ``local-dir:<export dir>``, an
    export folder, a cliptune run directory (its ``export/`` or else ``checkpoints/last.ckpt``),
    or a Lightning checkpoint written by cliptune.
    """
    s = str(spec)
    path = Path(s[len("local-dir:"):] if s.startswith("local-dir:") else s)
    if path.is_dir():
        if (path / EXPORT_CONFIG).is_file():
            return build_model(f"local-dir:{path}", device=device)
        run = RunDir(path)
        if (run.export / EXPORT_CONFIG).is_file():
            return build_model(f"local-dir:{run.export}", device=device)
        ckpt = run.last_ckpt
        if ckpt.is_file():
            return load_checkpoint_model(ckpt, device=device)
        raise FileNotFoundError(
            f"'{path}' is neither an export folder ({EXPORT_CONFIG}) nor a cliptune run directory "
            "(export/ or checkpoints/last.ckpt)"
        )
    if path.suffix == ".ckpt" and not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".ckpt" and path.is_file():
        return load_checkpoint_model(path, device=device)
    return build_model(s, pretrained=pretrained, device=device)


def load_checkpoint_model(ckpt_path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
    """Rebuild the model recorded in a cliptune Lightning checkpoint and load its weights."""
    ckpt = load_torch_file(ckpt_path)
    hp = ckpt.get("hyper_parameters", {})
    spec = hp.get("model_spec")
    if not spec:
        raise ValueError(f"checkpoint '{ckpt_path}' was not written by cliptune (no model_spec in hyper_parameters)")
    spec = dict(spec)
    spec["pretrained"] = None  # weights come from the checkpoint
    lora = hp.get("lora")
    bundle = build_model(**spec, device=device)
    if lora:
        apply_lora(bundle.model, **lora)
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        _load_state(bundle.model, state, ckpt_path)
        merge_lora(bundle.model)
    else:
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        _load_state(bundle.model, state, ckpt_path)
    bundle.model.eval()
    return bundle


def _load_state(model: nn.Module, state: dict, src: Any) -> None:
    state = {k.replace("._orig_mod.", ".").removeprefix("_orig_mod."): v for k, v in state.items()}
    if "logit_bias" in state and getattr(model, "logit_bias", None) is None:
        model.logit_bias = nn.Parameter(torch.zeros_like(state["logit_bias"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights in '{src}' do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def ensure_logit_bias(model: nn.Module, init: float, add: bool) -> None:
    """Give a model without ``logit_bias`` one (needed by the sigmoid loss), or explain how."""
    if getattr(model, "logit_bias", None) is not None:
        return
    if not add:
        raise ValueError(
            "loss=siglip needs a learnable logit_bias but this model has none (it was pretrained "
            "with the softmax loss). Set loss.add_logit_bias=true to add one initialised to "
            f"loss.init_logit_bias={init}, or use loss=clip."
        )
    ref = model.logit_scale
    model.logit_bias = nn.Parameter(torch.full_like(ref.detach(), float(init)))
    log.info("added logit_bias=%.3f to the model (loss.add_logit_bias=true)", init)
