"""Parallel sentences (one text in several languages): the input of text distillation (``cliptune-distill``).

    from cliptune.data.parallel import read_parallel, build_corpus
    rows = read_parallel("pairs.jsonl", ("en", "zh"))           # {"en": "...", "zh": "..."} per line
    rows = read_parallel("pairs.tsv", ("en", "zh"))             # a header line naming the columns, then rows
    rows = read_parallel("demo_data/train.json", ("en", "zh"))  # the en/zh captions of bilingual shards
    rows = read_parallel("cldr:territories,languages", ("en", "zh"))  # CLDR names (PyPI babel)
    python -m cliptune.data.parallel demo_data/train.json cldr:territories,languages,currencies \
        --exclude demo_data/val.json --out parallel               # write the corpus a run would use, as JSONL

Sources, one string each (a list reads them all, in order):

- ``.jsonl`` / ``.ndjson``: one JSON object per line with a text per language (a list of texts gives one
  row per combination: aliases); ``"group"`` optional (rows of a group stay on one side of a held-out split).
- ``.tsv``: a header line naming the columns (the languages, optionally ``group``), then one row per line.
- ``cldr:<kinds>``: names from the Unicode CLDR as PyPI ``babel`` ships them, for ``territories``,
  ``languages``, ``scripts`` and ``currencies`` (``babel.Locale("en").territories`` beside
  ``Locale("zh")``'s): a few thousand short, exactly parallel names, offline.
- anything else is a shard spec (``cliptune.data.specs``): each sample whose json ``captions`` holds
  every language gives one row per combination of its captions (``{"en": [name, alias], "zh": [name]}``:
  two rows), grouped by the sample's ``group`` (else its key).

A malformed line stops with its file and line number (``pairs.jsonl line 7: no "zh" text``); a shard
sample without one of the languages is left out and counted.

:func:`build_corpus` makes what a distillation run trains and validates on: the training sources,
without any row that holds a name of the ``exclude`` sources (say the validation split of the
contrastive data: its names must not be trained on, in any stage), deduplicated, with held-out rows
(``val`` sources, or ``val_fraction`` of the groups).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliptune.data.decode import stable_hash
from cliptune.data.langs import EVAL_SPLITS
from cliptune.data.specs import resolve_sources
from cliptune.data.tar import iter_shard
from cliptune.log import configure_job_logging, get_logger

log = get_logger(__name__)

__all__ = ["CLDR_KINDS", "Corpus", "ParallelFormatError", "ParallelRow", "build_corpus", "cldr_rows", "excluded_names",
           "read_parallel", "unique_rows", "write_jsonl"]

CLDR_KINDS = ("territories", "languages", "scripts", "currencies")  # babel.Locale attributes: {code: name}
CLDR_PREFIX = "cldr:"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TSV_SUFFIXES = (".tsv", ".tab")


class ParallelFormatError(ValueError):
    """A parallel-text file that cannot be read as such (the message names the file and line)."""


@dataclass(frozen=True)
class ParallelRow:
    """One text per language (in the order asked for) and the group the row belongs to."""

    texts: tuple[str, ...]
    group: str


@dataclass
class Corpus:
    """What a distillation run trains and validates on (:func:`build_corpus`)."""

    langs: tuple[str, ...]
    train: list[ParallelRow]
    val: list[ParallelRow]
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Reading


def read_parallel(spec: str | Sequence[str], langs: Sequence[str] = ("en", "zh"), split: str | Sequence[str] = "train",
                  what: str = "data") -> list[ParallelRow]:
    """Rows of ``langs`` from a source or a list of sources (see the module docstring); ``split`` is the
    split a shard directory is read from; ``what`` names the setting in errors."""
    langs = tuple(langs)
    if len(langs) < 2 or len(set(langs)) != len(langs):
        raise ValueError(f"{what}: langs={list(langs)}: give two or more distinct languages, e.g. [en, zh]")
    if not isinstance(spec, (str, Path)):
        return [row for i, s in enumerate(spec) for row in read_parallel(s, langs, split, f"{what}[{i}]")]
    text = str(spec)
    if text.startswith(CLDR_PREFIX):
        kinds = [k.strip() for k in text[len(CLDR_PREFIX):].split(",") if k.strip()]
        return cldr_rows(kinds, langs)
    suffix = Path(text).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(Path(text), langs)
    if suffix in TSV_SUFFIXES:
        return _read_tsv(Path(text), langs)
    return _read_shards(text, langs, split, what)


def _texts(value: Any) -> list[str] | None:
    """A text or a non-empty list of texts, stripped; None when it is neither (or holds an empty text)."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if not items or not all(isinstance(t, str) and t.strip() for t in items):
        return None
    return [" ".join(t.split()) for t in items]


def _rows(by_lang: Sequence[list[str]], group: str) -> list[ParallelRow]:
    return [ParallelRow(tuple(combo), group) for combo in itertools.product(*by_lang)]


def _read_jsonl(path: Path, langs: tuple[str, ...]) -> list[ParallelRow]:
    rows: list[ParallelRow] = []
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ParallelFormatError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, Mapping):
                raise ParallelFormatError(f"{path} line {n}: expected an object like "
                                          f"{json.dumps(dict.fromkeys(langs, '...'))}, got {type(obj).__name__}")
            by_lang = []
            for lang in langs:
                texts = _texts(obj.get(lang))
                if texts is None:
                    got = "none" if lang not in obj else repr(obj[lang])[:60]
                    raise ParallelFormatError(f"{path} line {n}: no {lang!r} text (a non-empty string or list of "
                                              f"strings; got {got}; keys: {sorted(obj)})")
                by_lang.append(texts)
            group = obj.get("group")
            rows += _rows(by_lang, str(group) if group not in (None, "") else f"{path.name}:{by_lang[0][0]}")
    return rows


def _read_tsv(path: Path, langs: tuple[str, ...]) -> list[ParallelRow]:
    rows: list[ParallelRow] = []
    with _open_text(path) as f:
        header = f.readline().rstrip("\r\n").split("\t")
        missing = [lang for lang in langs if lang not in header]
        if missing:
            raise ParallelFormatError(f"{path} line 1: the header names no {missing[0]!r} column (columns: {header}); "
                                      f"the first line names the columns, e.g. {chr(9).join(langs)}")
        cols = [header.index(lang) for lang in langs]
        group_col = header.index("group") if "group" in header else None
        for n, line in enumerate(f, 2):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                raise ParallelFormatError(f"{path} line {n}: {len(fields)} tab-separated fields, the header has "
                                          f"{len(header)} ({header})")
            texts = [" ".join(fields[c].split()) for c in cols]
            empty = [lang for lang, t in zip(langs, texts) if not t]
            if empty:
                raise ParallelFormatError(f"{path} line {n}: empty {empty[0]!r} text")
            group = fields[group_col].strip() if group_col is not None else ""
            rows.append(ParallelRow(tuple(texts), group or f"{path.name}:{texts[0]}"))
    return rows


def _open_text(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"parallel text file {path} does not exist")
    return open(path, encoding="utf-8")


def _shard_samples(spec: str, split: str | Sequence[str], what: str) -> Iterator[tuple[Mapping | None, str]]:
    """(captions by language or None, group) of every sample of a shard spec."""
    for source in resolve_sources(spec, split, what=what):
        for url in source.urls:
            for raw in iter_shard(url):
                if "json" not in raw:
                    yield None, f"k:{raw['__key__']}"
                    continue
                try:
                    meta = json.loads(raw["json"])
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ParallelFormatError(f"shard '{url}' sample '{raw['__key__']}': its json does not decode "
                                              f"({e})") from None
                captions = meta.get("captions") if isinstance(meta, Mapping) else None
                group = meta.get("group") if isinstance(meta, Mapping) else None
                yield (captions if isinstance(captions, Mapping) else None,
                       f"g:{group}" if group not in (None, "") else f"k:{raw['__key__']}")


def _read_shards(spec: str, langs: tuple[str, ...], split: str | Sequence[str], what: str) -> list[ParallelRow]:
    rows: list[ParallelRow] = []
    missing = 0
    for captions, group in _shard_samples(spec, split, what):
        by_lang = [_texts(captions.get(lang)) if captions is not None else None for lang in langs]
        if any(t is None for t in by_lang):
            missing += 1
            continue
        rows += _rows(by_lang, group)
    if missing:
        log.info("%s '%s': %d samples without captions in each of %s left out", what, spec, missing, ", ".join(langs))
    return rows


def cldr_rows(kinds: Sequence[str], langs: Sequence[str] = ("en", "zh")) -> list[ParallelRow]:
    """CLDR display names (territories, languages, scripts, currencies) in ``langs``, from PyPI ``babel``:
    one row per code every language names, grouped by kind and code."""
    try:
        from babel import Locale  # noqa: PLC0415 - the demo extra ([demo]): only cldr: sources need it
    except ImportError as e:
        raise ModuleNotFoundError("cldr: sources read the CLDR names of PyPI 'babel': pip install babel "
                                  "(it is in cliptune's demo and dev extras)") from e
    bad = [k for k in kinds if k not in CLDR_KINDS]
    if bad or not kinds:
        raise ValueError(f"cldr:{','.join(kinds)}: the kinds are {', '.join(CLDR_KINDS)} (a comma list)")
    locales = [Locale.parse(lang.replace("-", "_")) for lang in langs]
    rows = []
    for kind in kinds:
        tables = [getattr(loc, kind) for loc in locales]
        for code in sorted(tables[0], key=str):
            texts = [_texts(t.get(code)) for t in tables]
            if all(texts):
                rows.append(ParallelRow(tuple(t[0] for t in texts), f"cldr:{kind}:{code}"))
    return rows


# ----------------------------------------------------------------------------------------------
# Building a corpus


def _norm(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def excluded_names(sources: str | Sequence[str], langs: Sequence[str] = ("en", "zh"),
                   split: str | Sequence[str] = EVAL_SPLITS) -> set[str]:
    """The names :func:`build_corpus` keeps out: every text in ``langs`` of the ``sources`` (a shard sample
    counts with any of the languages) and each part of it between colons (``flag: Iran`` -> ``flag: iran``,
    ``flag``, ``iran``), normalised (NFKC, case-folded, single spaces). Shard directories are read at ``split``."""
    texts: list[str] = []
    for i, spec in enumerate([sources] if isinstance(sources, (str, Path)) else sources):
        text = str(spec)
        if text.startswith(CLDR_PREFIX) or Path(text).suffix.lower() in JSONL_SUFFIXES + TSV_SUFFIXES:
            texts += [t for row in read_parallel(text, langs, split, f"data.exclude[{i}]") for t in row.texts]
            continue
        for captions, _ in _shard_samples(text, split, f"data.exclude[{i}]"):
            texts += [t for lang in langs for t in (_texts((captions or {}).get(lang)) or [])]
    names: set[str] = set()
    for text in texts:
        names.add(_norm(text))
        names.update(p for p in (_norm(x) for x in re.split(r"[:：]", text)) if p)
    return names


def _held_out(group: str, fraction: float, seed: int) -> bool:
    return fraction > 0 and (stable_hash(f"heldout:{seed}:{group}") % 1_000_000) < fraction * 1_000_000


def unique_rows(rows: Iterable[ParallelRow]) -> list[ParallelRow]:
    """``rows`` without repeats, and with at most one row per text of each language (the first): held-out
    rows where each query has one right answer (text-to-text R@1 is then well defined)."""
    seen: list[set[str]] = []
    out = []
    for row in rows:
        if not seen:
            seen = [set() for _ in row.texts]
        if any(t in s for t, s in zip(row.texts, seen)):
            continue
        for t, s in zip(row.texts, seen):
            s.add(t)
        out.append(row)
    return out


def build_corpus(train: str | Sequence[str], langs: Sequence[str] = ("en", "zh"), exclude: Sequence[str] = (),
                 val: str | Sequence[str] | None = None, val_fraction: float = 0.0, seed: int = 0) -> Corpus:
    """The training and held-out rows of a distillation run.

    ``train``: sources (see :func:`read_parallel`); ``exclude``: sources whose names (:func:`excluded_names`)
    no row may hold, in training or held out (shard directories are read at their val split); ``val``:
    held-out sources (taken as they are), else ``val_fraction`` of the training groups (by a hash of the
    group and ``seed``; no training row then shares a group with them). Training rows are deduplicated;
    held-out rows hold each text once (:func:`unique_rows`).
    """
    langs = tuple(langs)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
    rows = read_parallel(train, langs, "train", "data.train")
    banned = excluded_names(exclude, langs) if exclude else set()
    kept = [r for r in rows if not any(_norm(t) in banned for t in r.texts)]
    if val:  # given: as it is (it may share rows with training, as the caller chose)
        held = [r for r in read_parallel(val, langs, EVAL_SPLITS, "data.val")
                if not any(_norm(t) in banned for t in r.texts)]
        train_rows = list(dict.fromkeys(kept))
    else:  # a share of the groups, none of whose rows is trained on
        held = [r for r in kept if _held_out(r.group, val_fraction, seed)]
        held_groups = {r.group for r in held}
        train_rows = list(dict.fromkeys(r for r in kept if r.group not in held_groups))
    held = unique_rows(held)
    if not train_rows:
        raise ValueError(f"data.train: no parallel rows in {', '.join(langs)} left to train on "
                         f"({len(rows)} read, {len(rows) - len(kept)} excluded)")
    info = {"langs": list(langs), "read": len(rows), "excluded": len(rows) - len(kept), "train": len(train_rows),
            "val": len(held), "train_groups": len({r.group for r in train_rows})}
    log.info("parallel text: %d rows read, %d hold an excluded name, %d to train on (%d groups), %d held out",
             info["read"], info["excluded"], info["train"], info["train_groups"], info["val"])
    return Corpus(langs, train_rows, held, info)


def write_jsonl(path: str | Path, rows: Iterable[ParallelRow], langs: Sequence[str]) -> Path:
    """Rows as JSONL (``{"en": ..., "zh": ..., "group": ...}`` per line), readable by :func:`read_parallel`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**dict(zip(langs, row.texts)), "group": row.group}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cliptune.data.parallel``: write a corpus (what ``cliptune-distill`` would use) as JSONL."""
    p = argparse.ArgumentParser(prog="python -m cliptune.data.parallel", description=__doc__.splitlines()[0])
    p.add_argument("train", nargs="+", help="sources: .jsonl, .tsv, shard specs, cldr:<kinds>")
    p.add_argument("--out", required=True, help="folder for train.jsonl and val.jsonl")
    p.add_argument("--langs", default="en,zh", help="comma list; the first is the teacher's (default: %(default)s)")
    p.add_argument("--exclude", nargs="*", default=[], help="sources whose names never enter the corpus")
    p.add_argument("--val", nargs="*", default=None, help="held-out sources (default: --val-fraction of the groups)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="held-out share of the groups (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    configure_job_logging()
    langs = tuple(x.strip() for x in args.langs.split(",") if x.strip())
    try:
        corpus = build_corpus(args.train, langs, args.exclude, args.val or None, args.val_fraction, args.seed)
    except (OSError, ValueError) as e:
        log.error("%s", e)
        return 2
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", corpus.train, langs)
    write_jsonl(out / "val.jsonl", corpus.val, langs)
    (out / "corpus.json").write_text(json.dumps(corpus.info, indent=2))
    log.info("wrote %s/train.jsonl (%d rows) and val.jsonl (%d rows)", out, len(corpus.train), len(corpus.val))
    return 0


if __name__ == "__main__":
    sys.exit(main())
