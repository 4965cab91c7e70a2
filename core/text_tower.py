"""Multilingual Hugging Face text towers: build a small one on the spot, and plug one into a CLIP.

    from cliptune.text_tower import build_text_tower_folder, plug_text_tower
    build_text_tower_folder("runs/x/student_init", texts, layers=4, hidden=256, heads=4)   # config + tokenizer
    cliptune-train experiment=demo_bilingual model.text_from=runs/demo_distill           # the plug-in, in a run

:func:`build_text_tower_folder` writes a Hugging Face model folder offline: an XLM-R architecture
(``transformers.XLMRobertaConfig``, ``config.json``; weights are drawn when the tower is built) and a
Unigram tokenizer trained with Hugging Face ``tokenizers`` on the given text (``tokenizer.json``, XLM-R's
special tokens ``<s> <pad> </s> <unk> <mask>`` at ids 0-4, so padding is id 1 as open_clip's
``HFTextEncoder`` reads it from the config). It is what ``cliptune-distill`` builds when
``student.path`` is null (the AltCLIP recipe's student, at a size a CPU trains in minutes).

:func:`plug_text_tower` is ``build_model(text_from=...)`` (``model.text_from`` in a config): the CLIP
the model settings build keeps its image tower, temperature and bias, and takes the text tower (Hugging
Face config, tokenizer, weights, pooler and projection) of another model's export, typically the
student a ``cliptune-distill`` run distilled against that CLIP's own text tower. The result is an open_clip
``CustomTextCLIP``: exports of it are self-contained as any other (``cliptune.models.export_model``).
:func:`attach_text_tower` does the same with a text tower already in memory (``cliptune-distill`` exports
the teacher's CLIP with its student in place this way).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.coca_model import CoCa, MultimodalCfg
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
from open_clip.tokenizer import HFTokenizer
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import PreTrainedTokenizerFast, XLMRobertaConfig

from cliptune.hf_clip import check_safetensors, refuse_remote_code
from cliptune.log import get_logger
from cliptune.rundir import RunDir

log = get_logger(__name__)

__all__ = ["SPECIAL_TOKENS", "attach_text_tower", "build_text_tower_folder", "check_model_cfg", "export_text_cfg",
           "plug_text_tower", "read_export_config", "text_tower_export"]

# XLM-R's special tokens and their ids: <s> (= CLS) 0, <pad> 1, </s> (= SEP) 2, <unk> 3; <mask> follows.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
EXPORT_CONFIG = "open_clip_config.json"  # as cliptune.models writes an export (that module imports this one)
EXPORT_WEIGHTS = "open_clip_model.safetensors"

# What a model config read from a file may hand to open_clip: the arguments open_clip's CLIP, CustomTextCLIP
# and CoCa take (``custom_text`` picks between the first two) and the fields of their tower configs.
MODEL_CFG_KEYS = frozenset(
    k for cls in (CLIP, CustomTextCLIP, CoCa) for k in inspect.signature(cls.__init__).parameters
    if k not in ("self", "cast_dtype")) | {"custom_text"}
TEXT_CFG_KEYS = frozenset(f.name for f in dataclasses.fields(CLIPTextCfg))
VISION_CFG_KEYS = frozenset(f.name for f in dataclasses.fields(CLIPVisionCfg))
MULTIMODAL_CFG_KEYS = frozenset(f.name for f in dataclasses.fields(MultimodalCfg))
# Tokenizer settings (open_clip's HFTokenizer / SimpleTokenizer own arguments): anything else would reach
# transformers' AutoTokenizer.from_pretrained, where a keyword can turn on remote code or choose a folder.
TOKENIZER_KWARGS = frozenset({"clean", "strip_sep_token", "language", "additional_special_tokens", "reduction_mask"})
PREPROCESS_KEYS = frozenset({"size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color"})
_PLAIN = (str, int, float, bool, type(None))


def check_model_cfg(cfg: Any, where: str) -> None:
    """Refuse a model config (an export's ``model_cfg``, a checkpoint's ``arch``) with a key outside the
    allow-lists, a tokenizer keyword that is no tokenizer setting, or weights to fetch from the network
    (``vision_cfg.timm_model_pretrained``). ``where`` names the file and key in the message.

    Raises:
        ValueError: one line naming ``where`` and the key.
    """
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{where}.{key}: {why}; cliptune takes only known model settings from a file: remove it")

    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object of open_clip model settings, got {type(cfg).__name__}")
    for key in sorted(set(cfg) - MODEL_CFG_KEYS):
        raise bad(key, "not an open_clip model setting")
    for tower, allowed in (("text_cfg", TEXT_CFG_KEYS), ("vision_cfg", VISION_CFG_KEYS),
                           ("multimodal_cfg", MULTIMODAL_CFG_KEYS)):
        sub = cfg.get(tower) or {}
        if not isinstance(sub, dict):
            raise bad(tower, f"expected an object, got {type(sub).__name__}")
        for key in sorted(set(sub) - allowed):
            raise bad(f"{tower}.{key}", f"not a field of open_clip's {tower}")
    text, vision = cfg.get("text_cfg") or {}, cfg.get("vision_cfg") or {}
    kwargs = text.get("tokenizer_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad("text_cfg.tokenizer_kwargs", f"expected an object, got {type(kwargs).__name__}")
    for key in sorted(kwargs):
        if key not in TOKENIZER_KWARGS:
            raise bad(f"text_cfg.tokenizer_kwargs.{key}",
                      f"not a tokenizer setting ({', '.join(sorted(TOKENIZER_KWARGS))})")
        value = kwargs[key]
        if not (isinstance(value, _PLAIN) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise bad(f"text_cfg.tokenizer_kwargs.{key}", f"{value!r} is not a plain value")
    for key in ("hf_model_name", "hf_tokenizer_name", "tokenizer_mode", "timm_model_name"):
        value = (vision if key.startswith("timm") else text).get(key)
        if value is not None and not isinstance(value, str):
            raise bad(f"{'vision_cfg' if key.startswith('timm') else 'text_cfg'}.{key}", f"{value!r} is not a string")
    if vision.get("timm_model_pretrained"):
        raise bad("vision_cfg.timm_model_pretrained", "true would download image-tower weights from the network")


def read_export_config(folder: str | Path) -> dict:
    """An export's ``open_clip_config.json``, checked: only ``model_cfg`` (allow-listed, :func:`check_model_cfg`)
    and ``preprocess_cfg`` (image preprocessing); no key anywhere in the folder's JSON files that asks for
    remote code (``cliptune.hf_clip.refuse_remote_code``).

    Raises:
        ValueError: naming the file and the key.
    """
    folder = Path(folder)
    path = folder / EXPORT_CONFIG
    refuse_remote_code(folder)
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); export the model again") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise ValueError(f"{path}: expected {{\"model_cfg\": {{...}}, \"preprocess_cfg\": {{...}}}}; "
                         "export the model again")
    for key in sorted(set(data) - {"model_cfg", "preprocess_cfg"}):
        raise ValueError(f"{path}: key '{key}' is not one an export holds (model_cfg, preprocess_cfg): remove it")
    check_model_cfg(data["model_cfg"], f"{path}: model_cfg")
    pp = data.get("preprocess_cfg") or {}
    if not isinstance(pp, dict):
        raise ValueError(f"{path}: preprocess_cfg: expected an object, got {type(pp).__name__}")
    for key in sorted(set(pp) - PREPROCESS_KEYS):
        raise ValueError(f"{path}: preprocess_cfg.{key}: not an image preprocessing setting "
                         f"({', '.join(sorted(PREPROCESS_KEYS))}): remove it")
    return data


def build_text_tower_folder(
    out: str | Path,
    texts: Iterable[str],
    vocab_size: int = 8000,
    layers: int = 4,
    hidden: int = 256,
    heads: int = 4,
    intermediate: int | None = None,
    context_length: int = 32,
    dropout: float = 0.1,
    split_cjk: bool = True,
) -> Path:
    """Write a Hugging Face XLM-R text tower folder to ``out``: ``config.json`` and a tokenizer trained on ``texts``.

    The tokenizer is a Unigram model (SentencePiece's, as XLM-R) over NFKC-normalised, lower-cased text.
    With ``split_cjk`` words are split at spaces and punctuation and every CJK character stands alone
    (BERT's basic tokenizer): a name never seen whole is read as the characters it is written with,
    which the student has met in other names. Without it, SentencePiece's ``Metaspace`` splitting: the
    Unigram model segments Chinese runs itself (and learns whole training names as pieces). ``vocab_size``
    is an upper bound: a small corpus yields fewer pieces. The model has no weights yet (open_clip's
    ``HFTextEncoder(..., pretrained=False)`` draws them): ``layers`` x ``hidden`` with ``heads`` heads and an
    ``intermediate`` feed-forward width (default 4 x hidden), positions for ``context_length`` tokens. Returns ``out``.
    """
    out = Path(out)
    if hidden % heads:
        raise ValueError(f"student hidden={hidden} must be a multiple of heads={heads}")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"{out}: no text to train the tokenizer on")
    tok = Tokenizer(models.Unigram())
    if split_cjk:  # BERT's basic tokenizer: spaces around every CJK character, then words at spaces and punctuation
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True)])
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    else:  # SentencePiece's: words marked by a leading "▁", Chinese runs left whole
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok = _canonical_order(tok, len(SPECIAL_TOKENS))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                     model_max_length=context_length)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out)
    _portable_tokenizer_class(out)
    config = XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden, max_position_embeddings=context_length + 2,  # XLM-R counts
        type_vocab_size=1, pad_token_id=tok.token_to_id("<pad>"), bos_token_id=bos, eos_token_id=eos,  # from pad+1
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    config.save_pretrained(out)
    log.info("student text tower %s: XLM-R %d layers x %d (%d heads), %d tokens (Unigram, trained on %d texts)",
             out, layers, hidden, heads, tok.get_vocab_size(), len(texts))
    return out


def _canonical_order(tok: Tokenizer, n_special: int) -> Tokenizer:
    """The same tokenizer for the same training text: the Unigram trainer's scores differ from run to run
    in their last digits (it sums in parallel), which reorders pieces of equal score. Scores are rounded
    to 8 digits and the pieces after the special tokens sorted by score, then by text."""
    data = json.loads(tok.to_str())
    vocab = [[piece, round(score, 8)] for piece, score in data["model"]["vocab"]]
    vocab[n_special:] = sorted(vocab[n_special:], key=lambda item: (-item[1], item[0]))
    data["model"]["vocab"] = vocab
    data["model"]["unk_id"] = next(i for i, (piece, _) in enumerate(vocab) if piece == "<unk>")
    return Tokenizer.from_str(json.dumps(data))


def _portable_tokenizer_class(folder: Path) -> None:
    """Name the tokenizer class every transformers release knows (v5 writes its own backend's name)."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def text_tower_export(source: str | Path) -> Path:
    """The export folder holding the text tower of ``source``: an export itself, or a run directory's ``export/``
    (a ``cliptune-distill`` or ``cliptune-train`` run). The tower must be a Hugging Face one."""
    path = Path(str(source).removeprefix("local-dir:"))
    folder = path if (path / EXPORT_CONFIG).is_file() else RunDir(path).export
    if not (folder / EXPORT_CONFIG).is_file():
        raise FileNotFoundError(
            f"model.text_from='{source}': neither an export folder ({EXPORT_CONFIG}) nor a run directory with one in "
            f"export/ (a finished cliptune-distill or cliptune-train run)")
    text_cfg = read_export_config(folder)["model_cfg"].get("text_cfg") or {}
    if not text_cfg.get("hf_model_name") or not (folder / "config.json").is_file():
        raise ValueError(f"model.text_from='{source}': the text tower of {folder} is not a Hugging Face one (its "
                         "text_cfg names no hf_model_name, or config.json is missing); text_from takes the text tower "
                         "of a cliptune-distill run or of an export of a model with a Hugging Face text tower")
    return folder


def export_text_cfg(text_cfg: dict, folder: Path, context_length: int | None = None) -> dict:
    """``text_cfg`` of an export with its Hugging Face names pointing at ``folder`` (offline, any machine)."""
    cfg = {k: v for k, v in text_cfg.items()}
    cfg["hf_model_name"] = cfg["hf_tokenizer_name"] = str(folder)
    cfg["hf_model_pretrained"] = False  # the weights are the export's
    if context_length is not None:
        cfg["context_length"] = int(context_length)
    return cfg


def attach_text_tower(clip: nn.Module, clip_cfg: dict, text: nn.Module, text_cfg: dict) -> tuple[CustomTextCLIP, dict]:
    """A ``CustomTextCLIP`` holding ``clip``'s image tower, temperature and bias (the same modules and
    parameters, not copies) and ``text`` (an open_clip ``HFTextEncoder`` whose projection outputs
    ``clip_cfg["embed_dim"]``) as its text tower. Returns ``(model, model_cfg)``: ``clip_cfg`` with
    ``text_cfg`` replaced (what an export records)."""
    embed_dim = int(clip_cfg["embed_dim"])
    out_dim = getattr(text, "output_dim", None)
    if out_dim != embed_dim:
        raise ValueError(f"the text tower projects to {out_dim} dimensions but the CLIP's embed_dim is {embed_dim}: "
                         "distil the text tower against this CLIP (its projection is sized by the teacher)")
    model_cfg = {k: copy.deepcopy(v) for k, v in clip_cfg.items() if k not in ("text_cfg", "custom_text")}
    model_cfg["text_cfg"] = copy.deepcopy(text_cfg)
    # Built on the meta device: every tower and parameter is replaced below, so nothing is drawn twice.
    with torch.device("meta"):
        model = CustomTextCLIP(embed_dim, vision_cfg=_TINY_VISION, text_cfg=_TINY_TEXT,
                               init_logit_bias=0.0 if getattr(clip, "logit_bias", None) is not None else None)
    model.visual = clip.visual
    model.text = text
    model.context_length = getattr(text, "context_length", None)
    model.vocab_size = getattr(text, "vocab_size", None)
    model.logit_scale = clip.logit_scale
    model.logit_bias = getattr(clip, "logit_bias", None)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"attach_text_tower: tensors {left[:5]} were not replaced "
                           "(open_clip's CustomTextCLIP changed)")
    return model, model_cfg


# Stand-in towers of the meta-device CustomTextCLIP that attach_text_tower fills (never allocated).
_TINY_VISION = {"image_size": 8, "layers": 1, "width": 8, "head_width": 8, "patch_size": 8}
_TINY_TEXT = {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1}


def plug_text_tower(clip: nn.Module, clip_cfg: dict, source: str | Path, context_length: int | None = None,
                    device: str | torch.device = "cpu") -> tuple[CustomTextCLIP, dict, Callable]:
    """``clip`` with the Hugging Face text tower of ``source`` (an export or a run directory, see
    :func:`text_tower_export`): its config, tokenizer, transformer weights, pooler and projection.

    Returns ``(model, model_cfg, tokenizer)``; ``model_cfg["text_cfg"]`` names the export folder, which
    ``cliptune.models.export_model`` turns into a self-contained export. ``context_length`` overrides the
    tower's own.
    """
    folder = text_tower_export(source)
    exported = read_export_config(folder)["model_cfg"]
    text_cfg = export_text_cfg(exported["text_cfg"], folder, context_length)
    if int(exported.get("embed_dim", -1)) != int(clip_cfg["embed_dim"]):
        raise ValueError(f"model.text_from='{source}': its text tower projects to "
                         f"embed_dim={exported.get('embed_dim')} but this CLIP's embed_dim is {clip_cfg['embed_dim']}: "
                         "plug a text tower distilled against this CLIP (cliptune-distill teacher.load=<this model>)")
    text = HFTextEncoder(str(folder), output_dim=int(clip_cfg["embed_dim"]), pooler_type=text_cfg.get("hf_pooler_type"),
                         proj_type=text_cfg.get("hf_proj_type"), pretrained=False)
    check_safetensors(folder / EXPORT_WEIGHTS)
    state = {k[len("text."):]: v for k, v in load_file(str(folder / EXPORT_WEIGHTS)).items() if k.startswith("text.")}
    missing, unexpected = text.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"model.text_from='{source}': the text weights of {folder} do not fit its config.json "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model, model_cfg = attach_text_tower(clip, clip_cfg, text, text_cfg)
    tokenizer = HFTokenizer(str(folder), context_length=text_cfg.get("context_length"), trust_remote_code=False)
    log.info("text tower from %s (%.1fM parameters) plugged into the CLIP", folder,
             sum(p.numel() for p in text.parameters()) / 1e6)
    return model.to(device), model_cfg, tokenizer
