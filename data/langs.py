"""Caption languages of a set, and whether the text tower's tokenizer reads them: warnings given once.

    from cliptune.data.langs import check_set_languages
    check_set_languages("shards/emoji", tokenizer, "any", "data.val.emoji", role="val")  # -> the messages

Two things go wrong quietly with multilingual sets, and both are told once per set:

- ``caption_lang=any`` on a set with captions in several languages uses all of them: evaluation
  scores them in one gallery (a warning: per-language recall is what people compare), training draws
  its caption from any language (an info line: a bilingual run wants exactly that, and a language
  the tokenizer cannot read gets the warning below). Said with the count per language: the
  writer's ``<split>.json`` index gives them for the whole set (``caption_counts``), else the first
  :data:`PEEK_SAMPLES` samples are read (tar members only, no image decoded).
- a tokenizer that does not cover a language maps its text to the unknown token (MiniLM's English
  WordPiece turns most Chinese characters into ``[UNK]``): more than :data:`UNKNOWN_RATE_WARN` of
  a used language's tokens is worth a warning. Byte-level BPE (open_clip's SimpleTokenizer) has no
  unknown token and is never flagged.

:func:`check_set_languages` is the one call per set (a training run's data module makes it for
``data.train`` and every ``data.val.<name>``); :func:`check_languages` does the same on captions
already read; :func:`language_counts`, :func:`captions_by_language` and
:func:`unknown_token_rate` are the pure parts.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cliptune import runtime
from cliptune.data.decode import as_list, parse_caption_lang
from cliptune.data.specs import Source, url_dirname, UrlFs, is_local, url_join, uses_fsspec, resolve_sources
from cliptune.data.tar import iter_shard
from cliptune.domains import EVAL_SPLITS
from cliptune.log import get_logger, rank_zero_info, rank_zero_warn

__all__ = ["PEEK_SAMPLES", "UNKNOWN_RATE_WARN", "captions_by_language", "check_languages", "check_set_languages",
           "index_language_counts", "language_counts", "language_messages", "language_mix_note", "peek_captions",
           "unknown_token_rate"]

log = get_logger(__name__)

PEEK_SAMPLES = 200  # samples read from the first shards of a set when its index gives no counts
UNKNOWN_RATE_WARN = 0.05  # share of a language's tokens mapped to the unknown token that is worth a warning
_ROLES = ("train", "val", "eval")
_WARNED: set[str] = set()  # messages already logged by this process


# ----------------------------------------------------------------------------------------------
# Captions by language (pure)


def _caption_dict(sample: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """``{lang: captions}`` of a raw tar sample (its json member), a sample json, or such a dict itself.

    None when the language is unknown: a sample with only a ``txt`` member, or a json without captions.
    """
    if "json" in sample or "__key__" in sample:  # a raw tar sample: only its json's captions say a language
        try:
            meta = json.loads(sample.get("json") or b"")
        except (TypeError, ValueError, UnicodeDecodeError):
            return None
        captions = meta.get("captions") if isinstance(meta, Mapping) else None
        return captions if isinstance(captions, Mapping) and captions else None
    if "captions" in sample:
        captions = sample["captions"]
        return captions if isinstance(captions, Mapping) and captions else None
    if all(isinstance(v, str) or (isinstance(v, Sequence) and all(isinstance(x, str) for x in v))
           for v in sample.values()):
        return sample
    return None


def captions_by_language(samples: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """All captions per language of ``samples``: raw tar samples, sample jsons or ``{lang: [captions]}`` dicts.

    Samples whose language is unknown (a ``txt`` member only) are left out.
    """
    out: dict[str, list[str]] = {}
    for sample in samples:
        for lang, caps in (_caption_dict(sample) or {}).items():
            items = as_list(caps)
            if items:
                out.setdefault(str(lang), []).extend(items)
    return out


def language_counts(samples: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Samples per caption language (a sample with en and zh captions counts once for each), as the
    writer's ``caption_counts``; same inputs as :func:`captions_by_language`."""
    counts: Counter = Counter()
    for sample in samples:
        counts.update(str(lang) for lang, caps in (_caption_dict(sample) or {}).items() if as_list(caps))
    return dict(sorted(counts.items()))


def unknown_token_rate(tokenizer: Any, captions: Sequence[str]) -> float | None:
    """Share of the tokens of ``captions`` that ``tokenizer`` maps to its unknown token.

    Works for open_clip's HFTokenizer (its ``.tokenizer`` is a transformers tokenizer with
    ``unk_token_id``) and for a transformers tokenizer itself; padding and the other special tokens
    are not counted. None when the tokenizer has no unknown token (open_clip's SimpleTokenizer is
    byte-level BPE: every text has tokens) or there is no token to count.
    """
    hf = getattr(tokenizer, "tokenizer", tokenizer)
    unk = getattr(hf, "unk_token_id", None)
    if unk is None or not callable(hf):
        return None
    clean = getattr(tokenizer, "clean_fn", None)  # HFTokenizer cleans whitespace before tokenizing
    texts = [clean(t) if callable(clean) else t for t in captions]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        return None
    ids = hf(texts, add_special_tokens=False, verbose=False)["input_ids"]
    special = set(getattr(hf, "all_special_ids", ()) or ()) - {unk}
    tokens = [i for row in ids for i in row if i not in special]
    return sum(i == unk for i in tokens) / len(tokens) if tokens else None


def _has_unknown_token(tokenizer: Any) -> bool:
    return getattr(getattr(tokenizer, "tokenizer", tokenizer), "unk_token_id", None) is not None


def _unknown_token(tokenizer: Any) -> str:
    token = getattr(getattr(tokenizer, "tokenizer", tokenizer), "unk_token", None)
    return f"unknown token {token}" if isinstance(token, str) and token else "unknown token"


def _listing(counts: Mapping[str, int]) -> str:
    items = [f"{lang} ({n:,})" for lang, n in sorted(counts.items(), key=lambda x: (-x[1], x[0]))]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _counts(captions: Mapping[str, Sequence[str]], counts: Mapping[str, int] | None) -> dict[str, int]:
    return {k: int(v) for k, v in (counts if counts is not None else {k: len(v) for k, v in captions.items()}).items()
            if v}


def language_mix_note(
    captions: Mapping[str, Sequence[str]],
    caption_lang: str | Sequence[str],
    set_name: str,
    *,
    counts: Mapping[str, int] | None = None,
    counted: str = "",
) -> str | None:
    """The info line for a training set whose ``caption_lang=any`` draws from several languages (pure);
    None when one language (or a chosen list) is used. Not a warning: training a multilingual tower on
    all of a set's languages is deliberate, and a language its tokenizer cannot read is warned about
    by :func:`language_messages`."""
    counts = _counts(captions, counts)
    if parse_caption_lang(caption_lang) is not None or len(counts) < 2:
        return None
    top = min(counts, key=lambda k: (-counts[k], k))
    return (f"{set_name} holds captions in {_listing(counts)}{counted}; caption_lang=any draws each training "
            f"caption from any of them (data.caption_lang={top} trains on one)")


def language_messages(
    captions: Mapping[str, Sequence[str]],
    tokenizer: Any,
    caption_lang: str | Sequence[str],
    set_name: str,
    *,
    counts: Mapping[str, int] | None = None,
    counted: str = "",
    role: str = "train",
    max_rate: float = UNKNOWN_RATE_WARN,
) -> list[str]:
    """The warnings for one set (pure): several languages scored in one gallery under
    ``caption_lang=any`` (evaluation roles; training on all of them is :func:`language_mix_note`),
    and used languages whose tokens the tokenizer maps to unknown more than ``max_rate`` of the time.

    ``captions``: captions per language (a sample of the set); ``counts``: samples per language
    (default: the number of captions given); ``counted`` qualifies the counts in the message (e.g.
    ``" in its first 200 samples"``). ``role``: ``train`` (a training set), ``val`` (a training
    run's validation set) or ``eval`` (a set of cliptune-eval): it picks the advice.
    """
    if role not in _ROLES:
        raise ValueError(f"role must be one of {_ROLES}, got {role!r}")
    setting = "caption_lang" if role == "eval" else "data.caption_lang"
    counts = _counts(captions, counts)
    chosen = parse_caption_lang(caption_lang)
    messages = []
    top = sorted(counts, key=lambda k: (-counts[k], k))
    if chosen is None and len(counts) > 1 and role != "train":
        use = f"scores all of them in one gallery: set {setting}={top[0]} to score one"
        if role == "eval":
            use += f" ({setting}=[{','.join(sorted(counts))}] scores each on its own)"
        else:
            use += " (data.val_caption_langs=[" + ",".join(sorted(counts)) + "] scores each on its own)"
        messages.append(f"{set_name} holds captions in {_listing(counts)}{counted}; caption_lang=any {use}")
    used = sorted(captions) if chosen is None else [lang for lang in chosen if lang in captions]
    rates = {lang: unknown_token_rate(tokenizer, list(captions[lang])) for lang in used}
    fine = [lang for lang, r in rates.items() if r is not None and r <= max_rate]
    for lang, rate in rates.items():
        if rate is None or rate <= max_rate:
            continue
        other = f" (e.g. {setting}={fine[0]})" if fine else ""
        messages.append(
            f"{set_name}: the text tower's tokenizer maps {rate * 100:.1f}% of the {lang} caption tokens to its "
            f"{_unknown_token(tokenizer)} (in {len(captions[lang]):,} {lang} captions read), so the model gets "
            f"little of that text: use a text tower whose tokenizer covers {lang}, or set {setting} to languages "
            f"it reads{other}"
        )
    return messages


def _warn_once(messages: Iterable[str]) -> None:
    for msg in messages:
        if msg not in _WARNED:
            _WARNED.add(msg)
            rank_zero_warn("%s", msg)


def check_languages(
    samples_or_captions: Mapping[str, Sequence[str]] | Iterable[Mapping[str, Any]],
    tokenizer: Any,
    caption_lang: str | Sequence[str],
    set_name: str,
    *,
    counts: Mapping[str, int] | None = None,
    counted: str = "",
    role: str = "train",
) -> list[str]:
    """:func:`language_messages` for captions already read, each logged once per process (on rank 0).

    ``samples_or_captions``: ``{lang: [captions]}``, or samples (raw tar samples, sample jsons or
    caption dicts; their per-language sample counts are the counts unless ``counts`` is given).
    """
    if isinstance(samples_or_captions, Mapping):
        captions = {str(k): as_list(v) for k, v in samples_or_captions.items()}
    else:
        samples = list(samples_or_captions)
        captions = captions_by_language(samples)
        counts = language_counts(samples) if counts is None else counts
    messages = language_messages(captions, tokenizer, caption_lang, set_name, counts=counts, counted=counted,
                                 role=role)
    note = language_mix_note(captions, caption_lang, set_name, counts=counts, counted=counted) \
        if role == "train" else None
    if note is not None and note not in _WARNED:
        _WARNED.add(note)
        rank_zero_info("%s", note)
    _warn_once(messages)
    return messages


# ----------------------------------------------------------------------------------------------
# Reading a set cheaply


def peek_captions(sources: Sequence[Source], samples: int = PEEK_SAMPLES) -> tuple[list[Mapping[str, Any]], int]:
    """The caption dicts of the first ``samples`` samples of a set (shared out over its sources, in
    shard order), and how many samples were read. Only tar members are read: no image is decoded."""
    found: list[Mapping[str, Any]] = []
    read = 0
    per_source = max(1, samples // max(1, len(sources)))
    for src in sources:
        n = 0
        for url in src.urls:
            shard = iter_shard(url)
            try:
                for raw in shard:
                    n += 1
                    captions = _caption_dict(raw)
                    if captions:
                        found.append(captions)
                    if n >= per_source:
                        break
            finally:
                shard.close()  # stops reading the rest of the shard
            if n >= per_source:
                break
        read += n
    return found, read


def index_language_counts(sources: Sequence[Source]) -> dict[str, int] | None:
    """Samples per caption language of the whole set from the writer's ``<split>.json`` indexes
    (``caption_counts``); None unless indexes with counts cover exactly the set's shards."""
    groups: dict[str, set[str]] = {}
    for url in (u for s in sources for u in s.urls):
        if not (is_local(url) or uses_fsspec(url)):
            return None
        base = url.rstrip("/").rsplit("/", 1)[-1] if "/" in url else os.path.basename(url)
        if "-" not in base:
            return None
        groups.setdefault(url_join(url_dirname(url), base.rsplit("-", 1)[0] + ".json"), set()).add(base)
    if not groups:
        return None
    fs, total = UrlFs(), Counter()
    for index_url, names in groups.items():
        try:
            index = fs.read_json(index_url)
            listed = {e["name"] for e in index["shards"]}
            counts = index["caption_counts"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if listed != names or not isinstance(counts, Mapping):
            return None  # a part of the indexed shards (a brace range): the counts would not be this set's
        total.update({str(k): int(v) for k, v in counts.items()})
    return dict(sorted(total.items()))


def check_set_languages(
    spec: Any,
    tokenizer: Any,
    caption_lang: str | Sequence[str],
    set_name: str,
    *,
    role: str = "eval",
    split: str | Sequence[str] | None = None,
    samples: int = PEEK_SAMPLES,
    rank: int | None = None,
) -> list[str]:
    """The language warnings of one set (a shard spec), logged once; call it once per set.

    ``set_name`` names the set in messages (``data.train``, ``data.val.emoji``, ``sets.emoji``);
    ``role``: ``train``, ``val`` or ``eval`` (see :func:`language_messages`); ``split`` defaults to
    the split the loaders read (``train`` for the role train, else val / test / validation).
    Only rank 0 (``rank``, default the process's) reads anything; other ranks return ``[]``. A set
    that cannot be read is not checked (debug log): its loader reports the problem.
    """
    if (runtime.rank() if rank is None else rank) != 0:
        return []
    if parse_caption_lang(caption_lang) is not None and not _has_unknown_token(tokenizer):
        return []  # one chosen language set and nothing to measure: no read needed
    splits = split if split is not None else ("train" if role == "train" else EVAL_SPLITS)
    try:
        sources = resolve_sources(spec, splits, what=set_name)
        found, read = peek_captions(sources, samples)
        counts = index_language_counts(sources)
    except (OSError, ValueError) as e:  # shard and spec errors: the loader raises them with context
        log.debug("%s: caption languages not checked (%s: %s)", set_name, type(e).__name__, e)
        return []
    if counts is None:
        return check_languages(found, tokenizer, caption_lang, set_name, counted=f" in its first {read:,} samples",
                               role=role)
    return check_languages(captions_by_language(found), tokenizer, caption_lang, set_name, counts=counts, role=role)
