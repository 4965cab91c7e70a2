"""Hugging Face CLIP-family models (transformers' ``AltCLIPModel``) behind cliptune's model interface.

AltCLIP (BAAI) pairs a CLIP ViT-L/14 image tower with an XLM-R text tower: zh/en (``BAAI/AltCLIP``) or
nine languages (``BAAI/AltCLIP-m9``). ``HFCLIP`` wraps the transformers model so that training, LoRA,
locking, evaluation and export treat it as they treat an open_clip ``CLIP``:

    cliptune-train model=altclip data=wds data.train=shards data.val.domain=shards trainer=gpu

``cliptune.models.build_model`` hands a name to this module when :func:`handles` says so: a Hub id naming
AltCLIP, a local folder holding such a model (``config.json`` with ``model_type: altclip``, weights,
tokenizer, image processor), or an export of one. An export is the transformers model's own folder plus
``cliptune_model.json``, so both load it offline, wherever it was copied to:

    model = transformers.AltCLIPModel.from_pretrained("runs/zh/export")        # without cliptune
    bundle = cliptune.models.load_model("runs/zh/export")                      # with it

Parameter names follow open_clip's layout, which cliptune's optimiser groups, layer-wise lr decay and
LoRA tower selection read: the image tower under ``visual.`` (``visual.vision_model``,
``visual.visual_projection``), the text tower under ``text.`` (``text.text_model``,
``text.text_projection``), ``logit_scale`` (log space, as open_clip) and, once the sigmoid loss adds one,
``logit_bias``.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
import torch.nn.functional as F
import transformers
from open_clip.tokenizer import HFTokenizer
from torch import nn

from cliptune.log import get_logger

log = get_logger(__name__)

MARKER = "cliptune_model.json"  # in an export: what cliptune needs beyond the transformers files
# model_type (config.json) -> the transformers class; its pooled text and image outputs are CLIP's features
MODEL_CLASSES = {"altclip": "AltCLIPModel"}
DEFAULT_CONTEXT_LENGTH = 77  # AltCLIP's training length (FlagAI); XLM-R itself takes up to 512 tokens
INTERPOLATION = "bicubic"  # CLIP's image processor (resample=3)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Keys by which a model folder's files ask transformers to import a .py shipped with them.
REMOTE_CODE_KEYS = ("trust_remote_code", "auto_map")
# JSON files of a model folder that hold tokens, not settings (a token may be spelt like a key)
_TOKEN_FILES = ("tokenizer.json", "vocab.json", "added_tokens.json")


def refuse_remote_code(folder: str | Path) -> None:
    """Refuse a model folder any of whose JSON files holds ``trust_remote_code`` or ``auto_map``.

    Those keys make transformers import Python code shipped beside the files (or offer to): a model
    folder is data, and cliptune never runs code from one. Every transformers call here also passes
    ``trust_remote_code=False``; this check makes the refusal name the file and key instead of
    leaving it to whichever transformers version is installed.

    Raises:
        ValueError: naming the file and the key.
    """
    for path in sorted(Path(folder).glob("*.json")):
        if path.name in _TOKEN_FILES or not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not a settings file cliptune or transformers can read: whoever reads it reports it
        key = _find_key(data, REMOTE_CODE_KEYS)
        if key is not None:
            raise ValueError(f"{path}: key '{key}' asks to run Python code shipped with the model; cliptune never "
                             "runs code from a file: remove the key (and the .py files it names) if the model "
                             "works without them, else use a model that needs no code of its own")


def _find_key(data: Any, keys: tuple[str, ...], prefix: str = "") -> str | None:
    """The dotted path of the first of ``keys`` anywhere in ``data`` (dicts and lists), or None."""
    if isinstance(data, dict):
        for k, v in data.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if k in keys:
                return path
            found = _find_key(v, keys, path)
            if found is not None:
                return found
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found = _find_key(v, keys, f"{prefix}[{i}]")
            if found is not None:
                return found
    return None


def check_safetensors(path: str | Path) -> None:
    """Refuse a weights file that is not a whole safetensors file (cut short in a copy, say), naming it:
    safetensors' own error does not say which file it read."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415 - only where weights are loaded

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a whole safetensors file, truncated or corrupt ({e}); copy or export "
                         "it again") from None


@dataclass
class HFBuild:
    """What :func:`build` makes; ``cliptune.models`` puts it in a ``ModelBundle``."""

    model: HFCLIP
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: HFTokenizer
    model_cfg: dict
    preprocess_cfg: dict


class ImageTower(nn.Module):
    """The vision transformer and its projection: pooled [CLS] -> ``[B, D]`` features."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class TextTower(nn.Module):
    """The text transformer and its projection: token ids ``[B, L]`` -> ``[B, D]`` features.

    The attention mask comes from the pad id, as the tokenizer pads every caption to the context length.
    """

    def __init__(self, text_model: nn.Module, text_projection: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        self.text_model = text_model
        self.text_projection = text_projection
        self.pad_token_id = int(pad_token_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_token_id).long()
        return self.text_projection(self.text_model(input_ids=input_ids, attention_mask=mask).pooler_output)


class HFCLIP(nn.Module):
    """A transformers CLIP-family model with open_clip's interface (``encode_image``, ``encode_text``,
    ``logit_scale``, ``lock_image_tower``, ``lock_text_tower``, ``set_grad_checkpointing``).

    The towers are the transformers model's own modules, not copies: :meth:`hf_model` returns the
    transformers model holding the current ones (after LoRA merging, say), ready for ``save_pretrained``.
    """

    # LoRA (cliptune.lora): open_clip's module names and the ones that play their part here
    lora_target_aliases = {"attn": ("q_proj", "k_proj", "v_proj", "out_proj"), "c_fc": ("fc1",), "c_proj": ("fc2",)}
    _hf: transformers.PreTrainedModel
    logit_scale: nn.Parameter
    logit_bias: nn.Parameter | None

    def __init__(self, hf_model: transformers.PreTrainedModel, pad_token_id: int) -> None:
        super().__init__()
        # Attributes every class of MODEL_CLASSES has, but not PreTrainedModel itself.
        clip: Any = hf_model
        self.visual = ImageTower(clip.vision_model, clip.visual_projection)
        self.text = TextTower(clip.text_model, clip.text_projection, pad_token_id)
        self.logit_scale = clip.logit_scale
        self.logit_bias = None  # the sigmoid loss adds one (cliptune.models.ensure_logit_bias)
        # Not a submodule (its weights are the towers' own), and no `config` here: peft would then take
        # this wrapper for a transformers model and look for what only those have.
        object.__setattr__(self, "_hf", hf_model)

    def hf_model(self) -> transformers.PreTrainedModel:
        """The transformers model, holding this wrapper's current modules and temperature."""
        hf = self._hf
        hf.vision_model, hf.visual_projection = self.visual.vision_model, self.visual.visual_projection
        hf.text_model, hf.text_projection = self.text.text_model, self.text.text_projection
        hf.logit_scale = self.logit_scale
        return hf

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)  # [B, D]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(text)  # [B, D]
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """open_clip's tuple: normalised image and text features, the scale (and the bias, if any)."""
        img = self.encode_image(image, normalize=True) if image is not None else None
        txt = self.encode_text(text, normalize=True) if text is not None else None
        if self.logit_bias is not None:
            return img, txt, self.logit_scale.exp(), self.logit_bias
        return img, txt, self.logit_scale.exp()

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the image tower but its last ``unlocked_groups`` groups, counted as open_clip does:
        [embeddings + pre-norm], each encoder layer, [post-norm + projection] (the last).
        ``freeze_bn_stats`` is accepted for open_clip's signature (a ViT has no BatchNorm)."""
        vm: Any = self.visual.vision_model  # a transformers vision transformer (AltCLIP's, CLIP's)
        groups = [[vm.embeddings, vm.pre_layrnorm], *[[layer] for layer in vm.encoder.layers],
                  [vm.post_layernorm, self.visual.visual_projection]]
        n = _count("model.lock_image_unlocked_groups", unlocked_groups, len(groups), "groups in the image tower")
        for p in self.visual.parameters():
            p.requires_grad = False
        for group in groups[len(groups) - n:]:
            for module in group:
                for p in module.parameters():
                    p.requires_grad = True

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the text transformer but its last ``unlocked_layers`` layers; the head after it
        (final LayerNorm, transformation, projection) always trains, as the projection of open_clip's
        Hugging Face text towers. LayerNorms in the frozen part train with ``freeze_layer_norm=False``."""
        tm: Any = self.text.text_model  # AltCLIP's text model: an XLM-R encoder and its head
        encoder = tm.roberta.encoder
        layers = list(getattr(encoder, "layers", None) or encoder.layer)
        n = _count("model.lock_text_unlocked_layers", unlocked_layers, len(layers), "layers in the text tower")
        unlocked = {id(p) for layer in layers[len(layers) - n:] for p in layer.parameters()}
        for name, p in tm.roberta.named_parameters():
            is_norm = "LayerNorm" in name.split(".")
            p.requires_grad = id(p) in unlocked or (is_norm and not freeze_layer_norm)
        for module in (tm.pre_LN, tm.transformation, self.text.text_projection):
            for p in module.parameters():
                p.requires_grad = True
        log.info("text tower locked: last %d of %d layers and the head train", n, len(layers))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        hf = self.hf_model()
        if enable:
            on = getattr(hf, "activation_checkpointing_enable", None)  # transformers >= 5 (the old name warns)
            if on is not None:
                on({"use_reentrant": False})
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            off = getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable
            off()


def _count(key: str, value: int, most: int, what: str) -> int:
    n = int(value or 0)
    if not 0 <= n <= most:
        raise ValueError(f"{key}={n}: there are {most} {what}; choose 0..{most}")
    return n


def _folder(name: str) -> Path | None:
    path = Path(name[len("local-dir:"):] if name.startswith("local-dir:") else name)
    return path if path.is_dir() else None


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` is an export written by :func:`export`."""
    return (Path(folder) / MARKER).is_file()


def is_hub_name(name: str) -> bool:
    """A Hub id this module builds (``BAAI/AltCLIP``, ``BAAI/AltCLIP-m9``): one with AltCLIP in its name.

    Other Hub models of the same class: download them (``huggingface-cli download <id> --local-dir
    <folder>``) and name the folder."""
    return bool(_HUB_ID.fullmatch(name)) and "altclip" in name.lower() and not os.path.exists(name)


def handles(name: str) -> bool:
    """Whether ``name`` is a model of this module: an AltCLIP Hub id, or a local folder (``local-dir:``
    prefix allowed) holding a model of a class in ``MODEL_CLASSES``, or an export of one."""
    folder = _folder(name)
    if folder is not None:
        return is_export(folder) or _model_type(folder) in MODEL_CLASSES
    return is_hub_name(name)


def _model_class(config: Any) -> type[transformers.PreTrainedModel]:
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"model_type '{model_type}' is not a CLIP model cliptune wraps ({', '.join(MODEL_CLASSES)})")
    return getattr(transformers, MODEL_CLASSES[model_type])


def build(
    name: str,
    pretrained: bool | str | None = True,
    image_size: int | None = None,
    context_length: int | None = None,
    aug_cfg: dict | None = None,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
    image_mean: tuple[float, ...] | None = None,
    image_std: tuple[float, ...] | None = None,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
) -> HFBuild:
    """The wrapped model, its transforms and tokenizer, from a Hub id or a local folder.

    ``pretrained`` (any true value): load the folder's or Hub model's weights; false or None: initialise
    them at random from its config (a checkpoint's weights follow). An export's weights always load.
    ``init_logit_scale`` / ``init_logit_bias`` apply to randomly initialised weights only, as in open_clip.
    ``image_size`` may differ from the model's only with random weights (its position embeddings have
    that size). ``context_length``: tokens per caption (default 77, at most what the text tower takes).
    """
    folder = _folder(name)
    source = str(folder) if folder is not None else name
    if folder is not None:
        refuse_remote_code(folder)
    marker = _read_marker(folder) if folder is not None and is_export(folder) else {}
    load_weights = bool(pretrained) or bool(marker)
    if folder is not None and load_weights:
        for weights in sorted(folder.glob("*.safetensors")):
            check_safetensors(weights)
    try:
        config = transformers.AutoConfig.from_pretrained(source, cache_dir=cache_dir, trust_remote_code=False)
    except OSError as e:
        raise OSError(f"model.name='{name}': no model config found ({e}). A Hub model is downloaded once, online "
                      "(then it loads offline from the cache); or set model.name to a local folder holding it") from e
    cls = _model_class(config)
    if image_size is not None and int(image_size) != config.vision_config.image_size:
        if load_weights:
            raise ValueError(f"model.image_size={image_size}: {name} takes {config.vision_config.image_size} px "
                             "images (its position embeddings); leave model.image_size null")
        config.vision_config.image_size = int(image_size)
    if load_weights:
        hf = cls.from_pretrained(source, cache_dir=cache_dir, trust_remote_code=False)
    else:
        hf = cls(config)
        if init_logit_scale is not None:
            with torch.no_grad():
                hf.get_parameter("logit_scale").fill_(float(init_logit_scale))
    hf = hf.float()
    ctx = int(context_length or marker.get("context_length") or _default_context_length(config))
    most = _max_context_length(config)
    if not 1 <= ctx <= most:
        raise ValueError(f"model.context_length={ctx}: the text tower of {name} takes 1..{most} tokens")
    tokenizer = HFTokenizer(source, context_length=ctx, cache_dir=cache_dir, trust_remote_code=False)
    pad = tokenizer.tokenizer.pad_token_id
    if pad != config.text_config.pad_token_id:
        raise ValueError(f"{name}: the tokenizer pads with id {pad}, the text tower's config expects "
                         f"{config.text_config.pad_token_id}; they must agree")
    model = HFCLIP(hf, pad_token_id=pad)
    if marker.get("logit_bias") is not None:
        model.logit_bias = nn.Parameter(torch.tensor(float(marker["logit_bias"])))
    elif not load_weights and init_logit_bias is not None:
        model.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
    model.to(device)
    size = config.vision_config.image_size
    mean, std = _image_stats(source, cache_dir)
    preprocess_cfg = {"size": size, "mode": "RGB", "mean": tuple(float(x) for x in (image_mean or mean)),
                      "std": tuple(float(x) for x in (image_std or std)), "interpolation": INTERPOLATION,
                      "resize_mode": "shortest", "fill_color": 0}
    transform = {k: preprocess_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")}
    preprocess_train = open_clip.image_transform(size, is_train=True, aug_cfg=aug_cfg or None, **transform)
    preprocess_val = open_clip.image_transform(size, is_train=False, **transform)
    model_cfg = {"hf_model_type": config.model_type, "source": marker.get("source") or _portable(name),
                 "context_length": ctx, "image_size": size}
    return HFBuild(model, preprocess_train, preprocess_val, tokenizer, model_cfg, preprocess_cfg)


_MARKER_KEYS = {"wrapper", "model_type", "source", "context_length", "logit_bias", "preprocess_cfg"}


def _read_marker(folder: Path) -> dict:
    """``cliptune_model.json``, allow-listed: what :func:`export` writes, with the types it writes."""
    path = folder / MARKER
    try:
        marker = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); export the model again") from None
    if not isinstance(marker, dict):
        raise ValueError(f"{path}: expected a JSON object; export the model again")
    unknown = sorted(set(marker) - _MARKER_KEYS)
    if unknown:
        raise ValueError(f"{path}: key '{unknown[0]}' is not one cliptune writes ({', '.join(sorted(_MARKER_KEYS))}); "
                         "cliptune takes no other setting from a file: remove it")
    for key, types in (("context_length", (int, type(None))), ("logit_bias", (int, float, type(None))),
                       ("source", (str, type(None)))):
        if not isinstance(marker.get(key), types) or isinstance(marker.get(key), bool):
            raise ValueError(f"{path}: key '{key}'={marker.get(key)!r} is not a {types[0].__name__} (or null)")
    return marker


def _max_context_length(config: Any) -> int:
    # XLM-R's positions start after the pad id: max_position_embeddings - pad - 1 tokens fit
    text = config.text_config
    return text.max_position_embeddings - text.pad_token_id - 1


def _default_context_length(config: Any) -> int:
    return min(DEFAULT_CONTEXT_LENGTH, _max_context_length(config))


def _image_stats(source: str, cache_dir: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image processor's mean and std (CLIP's own without one)."""
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source, cache_dir=cache_dir,
                                                                    trust_remote_code=False)
    except (OSError, ValueError):
        return open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    mean = getattr(processor, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(processor, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return tuple(mean), tuple(std)


def _portable(name: str) -> str | None:
    """A Hub id as it is; a local folder -> None (no path of this machine goes into an export)."""
    return name if is_hub_name(name) else None


def export(model: HFCLIP, model_cfg: dict, preprocess_cfg: dict, out: str | Path, tokenizer: Any) -> Path:
    """Write ``model`` as a transformers folder plus ``cliptune_model.json`` (written last: an export
    with it is complete). ``AltCLIPModel.from_pretrained(out)`` and ``AutoProcessor.from_pretrained(out)``
    load it without cliptune; ``cliptune.models.load_model(out)`` rebuilds the wrapper (context length,
    ``logit_bias``, preprocessing). No path is recorded. LoRA adapters must be merged before."""
    hf_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if not callable(getattr(hf_tokenizer, "save_pretrained", None)):
        raise ValueError(f"export to {out}: pass the model's tokenizer "
                         "(export_model(..., tokenizer=bundle.tokenizer)); its files go beside the weights")
    hf_tokenizer = copy.deepcopy(hf_tokenizer)
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is not None:  # saved as found, not fixed to cliptune's length by its last call
        backend.no_truncation()
        backend.no_padding()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    model.hf_model().save_pretrained(out)
    _save_processor(preprocess_cfg, hf_tokenizer, out)
    bias = model.logit_bias
    marker = {
        "wrapper": f"{HFCLIP.__module__}.{HFCLIP.__qualname__}",
        "model_type": model_cfg.get("hf_model_type") or model.hf_model().config.model_type,
        "source": model_cfg.get("source"),  # the Hub id it was fine-tuned from, if any
        "context_length": int(model_cfg.get("context_length") or getattr(tokenizer, "context_length", None)
                              or DEFAULT_CONTEXT_LENGTH),
        "logit_bias": None if bias is None else float(bias.detach().reshape(-1)[0]),
        "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_cfg.items()},
    }
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2))
    os.replace(tmp, out / MARKER)
    return out


def _save_processor(preprocess_cfg: dict, hf_tokenizer: Any, out: Path) -> None:
    """The preprocessing as CLIP's image processor, saved with the tokenizer (as ``AltCLIPProcessor``
    when the tokenizer is XLM-R's, so ``AutoProcessor`` loads the pair)."""
    size = preprocess_cfg["size"]
    size = int(size if isinstance(size, int) else size[0])
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3,  # bicubic
        image_mean=list(preprocess_cfg["mean"]), image_std=list(preprocess_cfg["std"]))
    try:
        transformers.AltCLIPProcessor(image_processor=image_processor, tokenizer=hf_tokenizer).save_pretrained(out)
    except (TypeError, ValueError):  # another tokenizer class: the two files on their own
        image_processor.save_pretrained(out)
        hf_tokenizer.save_pretrained(out)
