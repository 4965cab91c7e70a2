"""Raw tar sample -> decoded sample -> contract batch: decoding, skip accounting and collation.

Error policy: a sample that cannot be used is skipped, never fatal: its reason
(:data:`SKIP_REASONS`: ``decode_error``, ``empty_caption``, ``missing_caption``, ``missing_image``,
``caption_lang``, and from the tar reader ``truncated``, ``duplicate_member``, ``member_too_large``) is
counted in the ``skipped`` tensor of the next batch its worker yields (so summing batches counts every skip once)
and logged with shard and key (rate-limited).
``strict=True`` (``data.strict``) makes a missing image or caption raise instead.
Samples whose json has no ``captions`` use their ``txt`` member whatever ``caption_lang`` says
(its language is unknown).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.utils.data import default_collate

from cliptune.data.specs import url_dirname
from cliptune.data.tar import ShardFormatError
from cliptune.log import get_logger

log = get_logger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# samples read without a single usable one before we declare the filter/data hopeless
_HOPELESS_AFTER = 5000

Tokenizer = Callable[[list[str]], torch.Tensor]
Transform = Callable[[Image.Image], torch.Tensor]
# training augmentation before the model's transform: (image, the sample's texts) -> image
# (cliptune.data.augment.Augment; the texts let it decide whether a flip keeps the captions true)
Augmenter = Callable[[Image.Image, Sequence[str]], Image.Image]


# ----------------------------------------------------------------------------------------------
# Caption languages and groups


def parse_caption_lang(caption_lang: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"any"`` -> None (all languages); ``"en"`` / ``"en,zh"`` / ``["en", "zh"]`` -> a tuple."""
    if caption_lang is None:
        return None
    langs = caption_lang.split(",") if isinstance(caption_lang, str) else list(caption_lang)
    langs = [x.strip() for x in langs if x.strip()]
    if not langs:
        raise ValueError(f"caption_lang={caption_lang!r}: give 'any', a language code or a comma list")
    return None if "any" in langs else tuple(langs)


def stable_hash(text: str) -> int:
    """A process-independent non-negative int64 hash (first 8 bytes of blake2b)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & (2**63 - 1)


def group_id(meta: Mapping[str, Any] | None, group_field: str, key: str, url: str) -> int:
    """The sample's group as int64: hash of ``meta[group_field]``, else of its directory + key.

    The fallback includes the shard's directory because two datasets written without source ids
    both use zero-padded indices as keys; mixing them must not make unrelated images positives.
    """
    value = meta.get(group_field) if meta else None
    if value is not None:
        return stable_hash(f"g:{value}")
    return stable_hash(f"k:{url_dirname(url)}/{key}")


# ----------------------------------------------------------------------------------------------
# Decoding samples


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def seeded_transform(transform: Transform, img: Image.Image, seed: int | None, augment: Augmenter | None = None,
                     texts: Sequence[str] = ()) -> torch.Tensor:
    """``transform(augment(img, texts))`` with torch's RNG (what torchvision's random augmentations draw
    from) seeded by ``seed`` and restored afterwards: a sample's augmentation depends on its place in
    the stream, not on what the process did before, so a resumed stream augments exactly as the
    original. Without ``augment`` it is ``transform(img)`` alone."""
    if seed is None:
        return transform(img if augment is None else augment(img, texts))
    with torch.random.fork_rng(devices=[]):
        # the CPU generator alone (what the transforms draw from): torch.manual_seed also seeds every
        # accelerator's generator and cost a third of a 64 px sample's decoding
        torch.default_generator.manual_seed(seed)
        return transform(img if augment is None else augment(img, texts))


def as_list(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else []
    return [c.strip() for c in items if isinstance(c, str) and c.strip()]


def _filter_lang(by_lang: Mapping[str, Any], langs: tuple[str, ...] | None) -> list[str]:
    order = list(by_lang) if langs is None else [lang for lang in langs if lang in by_lang]
    return [c for lang in order for c in as_list(by_lang[lang])]


# Why a sample was left out. Every loader batch carries ``skipped``: a LongTensor with one count per
# reason (this order) of the samples its worker dropped since its previous batch, so a consumer that
# sums the batches it receives counts every skip exactly once.
# New reasons go at the end: a checkpoint's per-reason counts keep their meaning.
SKIP_REASONS = ("decode_error", "empty_caption", "missing_caption", "missing_image", "caption_lang",
                "truncated", "duplicate_member", "member_too_large")
_SKIP_HELP = {
    "decode_error": "image, json or txt failed to decode",
    "empty_caption": "caption fields present but empty",
    "missing_caption": "no caption: neither a .txt nor json 'captions'",
    "missing_image": "no image member",
    "caption_lang": "captions only in languages outside data.caption_lang",
    "truncated": "lost when their shard broke off (a cut or damaged tar): re-write or re-copy the shard",
    "duplicate_member": "two members of one extension in one sample",
    "member_too_large": "a member over the reader's max_member_bytes",
}


def skip_counts(counts: Mapping[str, int] | None = None) -> dict[str, int]:
    """``{reason: count}`` over all :data:`SKIP_REASONS` (zeros filled in)."""
    return {r: int((counts or {}).get(r, 0)) for r in SKIP_REASONS}


def skipped_tensor(counts: Mapping[str, int] | None = None) -> torch.Tensor:
    return torch.tensor([int((counts or {}).get(r, 0)) for r in SKIP_REASONS], dtype=torch.long)


def skipped_dict(t: torch.Tensor | Sequence[int]) -> dict[str, int]:
    """A batch's ``skipped`` tensor (or a sum of them) as ``{reason: count}``."""
    return dict(zip(SKIP_REASONS, (int(x) for x in torch.as_tensor(t).reshape(-1).tolist())))


def describe_skips(counts: Mapping[str, int]) -> str:
    """``"3 skipped: 2 decode_error (image, json or txt failed to decode), 1 missing_image (...)"``."""
    total = sum(counts.values())
    parts = [f"{n} {r} ({_SKIP_HELP[r]})" for r, n in counts.items() if n]
    return f"{total} skipped: " + ", ".join(parts) if total else "0 skipped"


@dataclass
class _Stats:
    """Per-worker counts; ``pending`` is what the next batch reports as ``skipped``."""

    read: int = 0
    lost: int = 0  # of ``read``: samples a broken-off shard lost, counted without being parsed
    accepted: int = 0
    skipped: Counter = field(default_factory=Counter)
    pending: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    example: dict = field(default_factory=dict)

    def take_pending(self) -> torch.Tensor:
        t, self.pending = skipped_tensor(self.pending), Counter()
        return t


@dataclass(frozen=True)
class DecodeSettings:
    """How raw samples become samples: the data settings :class:`SampleDecoder` reads.

    ``caption_lang``: ``"any"``, a code or a comma list; ``group_field``: the json field hashed into a
    sample's group; ``max_negatives``: hard-negative captions per training sample (0: off); ``strict``:
    a sample without an image member or any caption field raises :class:`ShardFormatError` (the data
    needs fixing) instead of being skipped and counted; ``augment`` (training samples only) runs on the
    decoded image before the transform, under the same per-sample seed, and gets the sample's captions
    and negatives (``data.augment_flip=auto``).
    """

    caption_lang: str | Sequence[str] | None = "any"
    group_field: str = "group"
    max_negatives: int = 0
    strict: bool = False
    augment: Augmenter | None = None


class SampleDecoder:
    """Raw tar sample -> decoded sample dict; skips and counts samples that cannot be used
    (``settings``: :class:`DecodeSettings`, default: its defaults)."""

    def __init__(
        self,
        transform: Transform,
        settings: DecodeSettings | None = None,
        warn_first: int = 5,
        warn_every: int = 100,
    ) -> None:
        settings = settings or DecodeSettings()
        self.settings = settings
        self.transform = transform
        self.langs = parse_caption_lang(settings.caption_lang)  # checked here: a bad value fails before any worker
        self.warn_first = warn_first
        self.warn_every = warn_every
        self.stats = _Stats()

    def reset(self) -> None:
        self.stats = _Stats()

    def _skip(self, raw: dict[str, Any], reason: str, what: str = "", detail: str = "", count: int = 1) -> None:
        st = self.stats
        st.skipped[reason] += count
        st.pending[reason] += count
        st.example.setdefault(reason, f"shard '{raw['__url__']}' sample '{raw['__key__']}'")
        n = sum(st.skipped.values())
        # a shard that broke off is always worth its line: it may have cost many samples at once
        if reason != "caption_lang" and (n - count < self.warn_first
                                         or n // self.warn_every > (n - count) // self.warn_every
                                         or reason == "truncated"):
            more = f"; further warnings every {self.warn_every}th" if n == self.warn_first else ""
            log.warning("shard '%s' sample '%s': %s (%s: skipped, %d so far%s%s)", raw["__url__"], raw["__key__"],
                        what or _SKIP_HELP[reason], reason, n, f"; {detail}" if detail else "", more)
        # the hopeless-data stop judges samples parsed: one damaged shard's lost tail says nothing of the rest
        if st.accepted == 0 and st.read - st.lost >= _HOPELESS_AFTER:
            if reason == "caption_lang":
                raise ValueError(
                    f"caption_lang={self.settings.caption_lang!r} matched no caption in the first {st.read} samples; "
                    f"languages seen: {dict(st.languages)}; set data.caption_lang to one of them or 'any'"
                )
            raise ValueError(f"the first {st.read} samples were all skipped "
                             f"({describe_skips(skip_counts(st.skipped))}); "
                             f"e.g. {st.example.get(reason)}: check the shards")

    def _format_error(self, raw: dict[str, Any], problem: str) -> ShardFormatError:
        present = sorted(k for k in raw if not k.startswith("__"))
        return ShardFormatError(
            f"shard '{raw['__url__']}' sample '{raw['__key__']}': {problem} (members present: {present}); "
            "write shards with cliptune's shard writer or rename the members (data.strict=true makes this an error; "
            "the default skips and counts such samples)"
        )

    def _missing(self, raw: dict[str, Any], reason: str) -> None:
        if self.settings.strict:
            raise self._format_error(raw, _SKIP_HELP[reason])
        self._skip(raw, reason)

    def _parse(self, raw: dict[str, Any], rng: random.Random | None) -> tuple[dict, list[str], list[str], str] | None:
        """(meta, captions, negatives, image ext) or None when skipped."""
        st = self.stats
        if "__skip__" in raw:  # the tar reader could not read this sample (or the rest of its shard) whole
            count = int(raw.get("__count__", 1))
            st.read += count
            if raw["__skip__"] == "truncated":
                st.lost += count
            return self._skip(raw, raw["__skip__"], raw.get("__detail__", ""), count=count)
        st.read += 1
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            return self._missing(raw, "missing_image")
        if "json" not in raw and "txt" not in raw:
            return self._missing(raw, "missing_caption")
        meta: dict[str, Any] = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
                if not isinstance(meta, dict):
                    raise ValueError(f"top level is {type(meta).__name__}, not an object")
            except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deep
                return self._skip(raw, "decode_error", "json failed to parse", f"{type(e).__name__}: {str(e)[:120]}")
        by_lang = meta.get("captions")
        if isinstance(by_lang, Mapping) and by_lang:
            st.languages.update(by_lang.keys())
            captions = _filter_lang(by_lang, self.langs)
            if not captions:
                return self._skip(raw, "caption_lang" if _filter_lang(by_lang, None) else "empty_caption")
        elif "txt" in raw:
            try:
                captions = as_list(raw["txt"].decode("utf-8"))
            except UnicodeDecodeError as e:
                return self._skip(raw, "decode_error", "txt is not UTF-8", str(e)[:120])
            if not captions:
                return self._skip(raw, "empty_caption")
        else:
            return self._missing(raw, "missing_caption")
        negs: list[str] = []
        if self.settings.max_negatives > 0 and isinstance(meta.get("neg"), Mapping):
            negs = _filter_lang(meta["neg"], self.langs)
            if len(negs) > self.settings.max_negatives:
                negs = rng.sample(negs, self.settings.max_negatives) if rng else negs[: self.settings.max_negatives]
        return meta, captions, negs, ext

    def _image(self, raw: dict[str, Any], ext: str, seed: int | None = None, augment: Augmenter | None = None,
               texts: Sequence[str] = ()) -> torch.Tensor | None:
        try:
            img = decode_image(raw[ext])
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken data
            return self._skip(raw, "decode_error", "image failed to decode", f"{type(e).__name__}: {str(e)[:120]}")
        return seeded_transform(self.transform, img, seed, augment, texts)

    def train_sample(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        """``rng`` draws the augmentation seed, caption and negatives: seed it per sample for a
        replayable stream."""
        aug_seed = rng.getrandbits(63)
        parsed = self._parse(raw, rng)
        if parsed is None:
            return None
        meta, captions, negs, ext = parsed
        # decoded last: caption-less samples cost no decode; the texts are every one this image may be
        # paired with (positives and negatives), which a flip must not make false
        image = self._image(raw, ext, aug_seed, self.settings.augment, captions + negs)
        if image is None:
            return None
        self.stats.accepted += 1
        return {
            "image": image,
            "text": rng.choice(captions),
            "group": group_id(meta, self.settings.group_field, raw["__key__"], raw["__url__"]),
            "negs": negs,
        }

    def eval_sample(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        parsed = self._parse(raw, None)
        if parsed is None:
            return None
        meta, captions, _, ext = parsed
        image = self._image(raw, ext)
        if image is None:
            return None
        self.stats.accepted += 1
        return {"image": image, "captions": captions, "key": raw["__key__"], "label": meta.get("label")}


# ----------------------------------------------------------------------------------------------
# Collation (the batch contract)


def _tokens(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    out = tokenizer(texts)
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(out)
    return out.long()


def _stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """[B, 3, H, W]; in a DataLoader worker stacked straight into shared memory (torch's
    default_collate does this), which saves the copy torch makes when sending a batch to the
    main process: a 64 x 3 x 224 x 224 float batch is 38 MB."""
    try:
        return default_collate(images)
    except RuntimeError as e:  # the model's transform returned images of different sizes
        shapes = sorted({tuple(x.shape) for x in images})
        raise ValueError(f"the image transform returned tensors of different shapes {shapes[:4]}; it must "
                         "resize/crop to one size (the model's preprocess does)") from e


def collate_train(samples: list[dict[str, Any]], tokenizer: Tokenizer, max_negatives: int = 0,
                  skipped: torch.Tensor | None = None) -> dict:
    """Training batch: image [B,3,H,W], text [B,L], group [B], (neg_text [B,K,L], neg_mask [B,K]),
    skipped [len(SKIP_REASONS)]."""
    text = _tokens(tokenizer, [s["text"] for s in samples])  # [B, L]
    batch = {
        "image": _stack_images([s["image"] for s in samples]),
        "text": text,
        "group": torch.tensor([s["group"] for s in samples], dtype=torch.int64),
    }
    if max_negatives > 0:
        B, L = text.shape
        neg_text = torch.zeros(B, max_negatives, L, dtype=torch.long)
        neg_mask = torch.zeros(B, max_negatives, dtype=torch.bool)
        flat = [n for s in samples for n in s["negs"]]
        if flat:
            tok = _tokens(tokenizer, flat)  # [M, L]
            i = 0
            for b, s in enumerate(samples):
                k = len(s["negs"])
                neg_text[b, :k] = tok[i : i + k]
                neg_mask[b, :k] = True
                i += k
        batch["neg_text"], batch["neg_mask"] = neg_text, neg_mask
    batch["skipped"] = skipped_tensor() if skipped is None else skipped
    return batch


def collate_eval(samples: list[dict[str, Any]], tokenizer: Tokenizer, skipped: torch.Tensor | None = None) -> dict:
    """Eval batch: image [B,3,H,W], key, text [T,L] (all captions), text_owner [T], label,
    skipped [len(SKIP_REASONS)]. A worker whose last samples were all skipped ends with a batch
    holding only ``skipped`` (no ``image``): consumers count it and embed nothing."""
    captions = [c for s in samples for c in s["captions"]]
    owner = [i for i, s in enumerate(samples) for _ in s["captions"]]
    return {
        "image": _stack_images([s["image"] for s in samples]),
        "key": [s["key"] for s in samples],
        "text": _tokens(tokenizer, captions),
        "text_owner": torch.tensor(owner, dtype=torch.long),
        "label": [s["label"] for s in samples],
        "skipped": skipped_tensor() if skipped is None else skipped,
    }

