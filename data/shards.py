"""Shard writer: image-text data -> webdataset shards + ``<split>.json`` index (the shard format).

    cliptune-shards pairs.csv --out shards/ --val-fraction 0.05 --group-key album
    cliptune-shards pairs.tsv --out shards/ --caption-col caption,caption_zh:zh --image-size 384
    cliptune-shards pairs.jsonl --out shards/ --image-format webp --quality 90 --workers 8
    cliptune-shards photos/ --out shards/          # images with same-stem .txt / .json sidecars
    cliptune-shards classes/ --out shards/         # FLYP: class subfolders, captions from templates
    cliptune-shards heldout.csv --out eval_sets/heldout --split val   # an evaluation-only set
    cliptune-shards tiny.csv --out /tmp/s --image-size 64 --shard-size 100 --workers 2   # CPU-sized

Inputs: CSV/TSV (header row), JSONL (or a .json list of objects), parquet, or a folder. Image
paths are relative to the input file (``--image-root`` overrides); parquet may also hold image
bytes (Hugging Face style ``{"bytes": ..., "path": ...}``). A caption cell is a string, a list,
or a dict by language (``{"en": [...], "zh": [...]}``; in CSV/TSV written as JSON); a caption
column named ``col:lang`` gives its plain strings that language, else ``--lang``. ``label``,
``group`` and ``neg`` (hard-negative captions, same forms) are optional; every other column is
kept in the sample json's ``meta``.

Images: decoded, EXIF-rotated, alpha flattened onto white, and downscaled so that the *shorter*
side is ``--image-size`` (aspect kept, never upscaled; 0 keeps the size), then encoded as
``--image-format``. An image that needs no change and is already in the target format is copied
byte for byte (no second JPEG generation).

Split: ``--val-fraction`` of the split keys (``--group-key``: ``group`` by default, ``label``,
any extra column, or ``sample``) go to ``val``, each key's side chosen by a hash of (seed, key):
groups never straddle, and adding data does not move existing groups. For class folders (FLYP)
the default key is ``sample`` (a split by class would leave val classes unseen in training).
An evaluation-only set goes wholly to ``val`` (``--split val``, or ``--val-fraction 1``): its folder
then holds ``val-*.tar`` and ``val.json`` only, and is read as a set of cliptune-eval's ``sets`` or
a training run's ``data.val.<name>`` (named after the folder), never as ``data.train``.
``--split train`` puts everything in train.

Resume: shards are written to ``.<name>.<pid>.tmp`` (the writing process's pid) and renamed; a
small done record per shard (in ``OUT/.cliptune-shards/``) holds a fingerprint of its samples and
the options. Shards are byte-deterministic, so re-running the same command after any interruption
(Ctrl-C, SIGKILL) skips finished shards, removes leftover temp files of dead processes and
rewrites only what is missing: the result equals an uninterrupted run. Worker processes end with
the writer (Linux: PR_SET_PDEATHSIG; elsewhere a thread that watches the parent pid), so a killed
run leaves nothing writing behind it.

One folder, one writer, one dataset: a writer holds ``OUT/.lock`` (an flock the kernel drops when
it dies), so a second one on the same ``--out`` refuses at once, naming the first one's PID. Shards
of another dataset (other input or options; the plan is recorded in ``OUT/.cliptune-shards/``) are
never mixed with or silently replaced: that needs ``--overwrite``, which removes the old shards,
indexes and done records first and rewrites everything (also needed if image files changed in
place). The ``<split>.json`` index is written last; the reader refuses a folder of writer shards
without it (a killed run: re-run the same command).

Bad inputs (missing, unreadable or corrupt images, empty captions, a row repeating an earlier
row's image and captions) are skipped, counted by reason with examples in the index and the
printed summary; a run that writes no sample at all fails (exit 2) with the reasons. Images and caption sidecars are read only
from regular files of at most ``--max-image-bytes``: a device (``/dev/zero``), a FIFO, a
directory or a larger file is skipped as "not a regular file" or "file too large". Input that
cannot be parsed (a bad CSV row, an over-long field, an invalid JSON line, bytes that are not
UTF-8, a lone surrogate) or a missing column is an error naming the file and line or the columns.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import signal
import stat
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from cliptune.faults import fault_point
from cliptune.log import configure_job_logging, get_logger
from cliptune.log import console as log_console  # `console` names the local table printer below
from cliptune.rundir import RunDirBusyError, RunLock

log = get_logger(__name__)

SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_FORMATS = ("jpg", "png", "webp", "original")
DEFAULT_TEMPLATES = ("a photo of a {c}.", "a picture of a {c}.", "{c}")
STATE_DIR = ".cliptune-shards"
MAX_EXAMPLES = 5
DEFAULT_MAX_IMAGE_BYTES = 64 << 20  # far above any photo a CLIP model trains on; bounds what one read takes
MAX_IMAGE_SIZE = 16384  # --image-size: far above any CLIP input; a larger value is a typo
MAX_WORKERS = 512  # --workers: more processes than any machine's cores is a typo
PLAN_FILE = "plan.json"  # in STATE_DIR: which dataset the shards in --out belong to
_PIL_SAVE = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SHARD_NAME = re.compile(r"^(train|val)-(\d{6})\.tar$")
# temp files of shards, done records and indexes; the pid is absent in names from older versions
_TEMP_NAME = re.compile(r"^\.(?:(?:train|val)-\d{6}\.tar(?:\.json)?|(?:train|val)\.json)(?:\.(\d+))?\.tmp$")
_FILE_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
               (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"))


class InputError(ValueError):
    """Input that cannot be read as asked: names the file and line, or the missing column."""


class RejectedFile(Exception):
    """A path that is not read: not a regular file, or larger than the cap. ``reason`` is the skip reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _check_regular(st: os.stat_result, cap: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "special file")
        raise RejectedFile("not a regular file", f"not a regular file ({kind})")
    if st.st_size > cap:
        raise RejectedFile("file too large", f"{st.st_size} bytes, over --max-image-bytes {cap}")


def read_regular_file(path: str | os.PathLike, cap: int) -> bytes:
    """The bytes of a regular file of at most ``cap`` bytes; raises :class:`RejectedFile` for anything else.

    Checked before opening (a device or FIFO is never opened), opened non-blocking and checked again
    (the path may have been swapped for a FIFO in between), and read only to cap + 1 bytes (a file
    that grows past the cap is rejected, not read to the end). Missing or unreadable files raise OSError.
    """
    _check_regular(os.stat(path), cap)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        _check_regular(os.fstat(fd), cap)
        parts, n = [], 0
        while n <= cap:
            chunk = os.read(fd, min(cap + 1 - n, 1 << 20))
            if not chunk:
                break
            parts.append(chunk)
            n += len(chunk)
    finally:
        os.close(fd)
    if n > cap:
        raise RejectedFile("file too large", f"over --max-image-bytes {cap} bytes (grew while read)")
    return b"".join(parts)


# ----------------------------------------------------------------------------------------------
# Options and records


@dataclass
class Fields:
    """Which input column (or sidecar/JSON key) holds what."""

    image: str = "image"
    captions: list[str] = field(default_factory=lambda: ["caption"])  # "col" or "col:lang"
    label: str = "label"
    group: str = "group"
    neg: str = "neg"
    # user-given names must exist; defaults are optional (captions default also tries "captions")
    explicit: frozenset = frozenset()


@dataclass
class Record:
    """One input sample before encoding. ``problem`` = (reason, detail) marks a known skip."""

    where: str  # "pairs.csv line 12", "cat/1.jpg": names the sample in skip reports
    image: str | bytes | None  # a path or encoded bytes
    captions: dict[str, list[str]]
    label: str | None = None
    group: str | None = None
    neg: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    problem: tuple[str, str] | None = None
    caption_fields: tuple[str, ...] = ()  # the caption columns ("col" or "col:lang") its captions came from


@dataclass(frozen=True)
class EncodeOptions:
    """What decides the bytes of a shard (part of each shard's fingerprint)."""

    image_size: int = 512
    image_format: str = "jpg"
    quality: int = 95
    lang: str = "en"
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # decides which files are skipped


@dataclass
class _Task:
    out: str
    split: str
    name: str
    items: list[tuple[str, Record]]
    enc: EncodeOptions
    fingerprint: str


# ----------------------------------------------------------------------------------------------
# Value normalisation


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _clean_list(value: Any) -> list[str]:
    if _is_missing(value):
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, (list, tuple)):
        items = [v for v in value if not _is_missing(v) and isinstance(v, (str, int, float))]
        return [str(v).strip() for v in items if str(v).strip()]
    return [str(value).strip()] if str(value).strip() else []


def parse_captions(value: Any, lang: str) -> dict[str, list[str]]:
    """A caption cell -> ``{lang: [captions]}``: a string, a list, a dict by language, or JSON text of those."""
    if _is_missing(value):
        return {}
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in ("[", "{"):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None  # a caption that happens to start with a bracket
            if isinstance(parsed, (list, dict)):  # valid JSON is taken as meant: "[]" is no caption
                return parse_captions(parsed, lang)
        return {lang: [text]} if text else {}
    if isinstance(value, Mapping):
        out: dict[str, list[str]] = {}
        for k, v in value.items():
            items = _clean_list(v)
            if items:
                out.setdefault(str(k), []).extend(items)
        return out
    items = _clean_list(value)
    return {lang: items} if items else {}


def _merge(into: dict[str, list[str]], more: Mapping[str, list[str]]) -> None:
    for lang, caps in more.items():
        into.setdefault(lang, []).extend(caps)


def _opt_str(value: Any) -> str | None:
    if _is_missing(value):
        return None
    text = str(value).strip()
    return text or None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # dates, decimals ... from parquet


def _encodable(value: Any) -> bool:
    """Whether every string in ``value`` (keys of mappings too) encodes as UTF-8 (no lone surrogate)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, Mapping):
        return all(_encodable(k) and _encodable(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_encodable(v) for v in value)
    return True


def _caption_spec(spec: str) -> tuple[str, str | None]:
    col, sep, lang = spec.rpartition(":")
    return (col, lang or None) if sep and col else (spec, None)


# ----------------------------------------------------------------------------------------------
# Rows -> records


class _RowParser:
    """Maps rows (dicts) of one input to records; checks columns once per input."""

    def __init__(self, fields: Fields, lang: str, base: Path, path: str) -> None:
        self.fields = fields
        self.lang = lang
        self.base = base
        self.path = path
        self.caption_cols: list[tuple[str, str | None]] = [_caption_spec(c) for c in fields.captions]
        self.checked = False

    def check(self, available: Sequence[str], need_image: bool = True) -> None:
        """Error listing the available columns when a required or user-named column is missing."""
        f, have = self.fields, set(available)
        missing = []
        if need_image and f.image not in have:
            missing.append(f"image column '{f.image}' (--image-col)")
        cols = [c for c, _ in self.caption_cols]
        present = [c for c in cols if c in have]
        if "captions" not in f.explicit and not present and "captions" in have:
            self.caption_cols, present = [("captions", None)], ["captions"]
        if "captions" in f.explicit:
            missing += [f"caption column '{c}' (--caption-col)" for c in cols if c not in have]
        elif not present:
            missing.append(f"caption column '{cols[0]}' (--caption-col)")
        for name in ("label", "group", "neg"):
            if name in f.explicit and getattr(f, name) not in have:
                missing.append(f"{name} column '{getattr(f, name)}' (--{name}-col)")
        if missing:
            raise InputError(
                f"{self.path}: missing {', '.join(missing)}; available columns: {sorted(map(str, available))}"
            )
        self.checked = True

    def used(self) -> set[str]:
        f = self.fields
        return {f.image, f.label, f.group, f.neg} | {c for c, _ in self.caption_cols}

    def image_of(self, value: Any) -> tuple[str | bytes | None, str]:
        """(path or bytes, how to name it in reports)."""
        if isinstance(value, Mapping):  # Hugging Face datasets' image struct
            if value.get("bytes"):
                return bytes(value["bytes"]), str(value.get("path") or "<bytes>")
            value = value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value), "<bytes>"
        text = _opt_str(value)
        if text is None:
            return None, ""
        p = Path(os.path.expanduser(text))
        return str(p if p.is_absolute() else self.base / p), text

    def _check_encodable(self, row: Mapping[str, Any], where: str) -> None:
        """Refuse text that cannot be written as UTF-8 (a lone surrogate: JSON's ``"\\ud800"``, or a
        file name that is not UTF-8), naming the file, the line and the field."""
        for k, v in row.items():
            if not _encodable(k) or not _encodable(v):
                name = Path(self.path).name
                at = str(self.path) + where[len(name):] if where.startswith(name) and self.path != "records" else where
                raise InputError(f"{at}: field {ascii(k)} holds a lone surrogate, which is not text UTF-8 can "
                                 f"hold ({ascii(v)[:80]}); fix the value (a JSON '\\ud800' escape needs its pair)")

    def record(self, row: Mapping[str, Any], where: str, image: Any = None) -> Record:
        if not _encodable(where) or not _encodable(image):
            raise InputError(f"{ascii(where)}: the file name is not UTF-8 (it cannot be written in a sample's json); "
                             "rename the file")
        self._check_encodable(row, where)
        f = self.fields
        if image is None:
            image, shown = self.image_of(row.get(f.image))
        else:
            shown = ""
        cols = self.caption_cols
        if "captions" not in f.explicit and all(_is_missing(row.get(c)) for c, _ in cols) and "captions" in row:
            cols = [("captions", None)]  # the plural is common in JSON: accept it unless columns were named
        captions: dict[str, list[str]] = {}
        read = []
        for col, lang in cols:
            found = parse_captions(row.get(col), lang or self.lang)
            if found:
                read.append(f"{col}:{lang}" if lang else col)
            _merge(captions, found)
        neg = parse_captions(row.get(f.neg), self.lang)
        used = self.used() | {c for c, _ in cols}
        meta = {str(k): _jsonable(v) for k, v in row.items() if k not in used}
        rec = Record(
            where=f"{where} ({shown})" if shown else where,
            image=image,
            captions=captions,
            label=_opt_str(row.get(f.label)),
            group=_opt_str(row.get(f.group)),
            neg=neg,
            meta=meta,
            caption_fields=tuple(read),
        )
        if image is None:
            rec.problem = ("no image", f"{where}: empty '{f.image}' field")
        elif not captions:
            rec.problem = ("empty caption", f"{rec.where}: no caption in {[c for c, _ in cols]}")
        return rec


def _utf8_lines(f: Any, path: Path) -> Iterator[str]:
    """The lines of a binary file, each decoded on its own: invalid UTF-8 (a lone surrogate's bytes
    included) is reported on its exact line, not near the decoder's 8 KiB chunk that held it."""
    for lineno, raw in enumerate(f, 1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = raw[max(0, e.start - 20): e.end + 20]
            raise InputError(f"{path} line {lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line, "
                             f"in {bad!r}); save the file as UTF-8") from None


def _read_csv(path: Path, sep: str, parser: _RowParser) -> Iterator[Record]:
    with open(path, "rb") as f:
        reader = csv.reader(_utf8_lines(f, path), delimiter=sep, strict=True)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise InputError(f"{path}: empty file; expected a header row naming the columns") from None
        except csv.Error as e:
            raise InputError(f"{path} line 1: cannot parse the header ({e})") from e
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise InputError(f"{path} line 1: duplicate column names {dupes}")
        parser.check(header)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                if "field limit" in str(e):  # named where the row starts: an unclosed quote runs on for many lines
                    raise InputError(
                        f"{path} line {start}: the row starting here has a field over csv's limit of "
                        f"{csv.field_size_limit()} characters ({e}; reached by line {reader.line_num}); a quote "
                        "opened in it and never closed reads on as one field: close it, or shorten the field"
                    ) from e
                raise InputError(f"{path} line {reader.line_num}: cannot parse the row ({e})") from e
            if not row:
                continue  # blank line
            if len(row) != len(header):
                raise InputError(
                    f"{path} line {start}: {len(row)} fields but the header has {len(header)} "
                    f"(separator {sep!r}); quote fields that contain the separator, or set --sep"
                )
            yield parser.record(dict(zip(header, row)), f"{path.name} line {start}")


def _json_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) from JSONL, or from a .json file holding one list of objects."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.suffix.lower() == ".json" and head.startswith(b"["):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise InputError(f"{path} line {line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise InputError(f"{path} line {getattr(e, 'lineno', '?')}: invalid JSON ({getattr(e, 'msg', e)})") from e
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise InputError(f"{path}: item {i} is {type(obj).__name__}, expected an object")
            yield i + 1, obj
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(_utf8_lines(f, path), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                msg, col = getattr(e, "msg", e), getattr(e, "colno", "?")
                raise InputError(f"{path} line {lineno}: invalid JSON ({msg} at column {col})") from e
            if not isinstance(obj, dict):
                raise InputError(
                    f"{path} line {lineno}: expected one JSON object per line, got {type(obj).__name__}"
                )
            yield lineno, obj


def _read_jsonl(path: Path, parser: _RowParser) -> Iterator[Record]:
    for lineno, obj in _json_rows(path):
        if not parser.checked:
            parser.check(list(obj))
        yield parser.record(obj, f"{path.name} line {lineno}")


def _read_parquet(path: Path, parser: _RowParser) -> Iterator[Record]:
    import pyarrow.parquet as pq  # noqa: PLC0415 - parquet input only (pyarrow is a heavy import)

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for non-parquet files
        raise InputError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from e
    parser.check(pf.schema_arrow.names)
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield parser.record(row, f"{path.name} row {i}")
            i += 1


def _read_records(rows: Iterable[Mapping[str, Any]], parser: _RowParser) -> Iterator[Record]:
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InputError(f"record {i}: expected a mapping, got {type(row).__name__}")
        if not parser.checked:
            parser.check(list(row))
        yield parser.record(row, f"record {i}")


def _sidecar_bytes(path: Path, cap: int) -> bytes | None:
    """A sidecar's bytes, None when there is none; RejectedFile names the sidecar."""
    try:
        return read_regular_file(path, cap)
    except FileNotFoundError:
        return None
    except RejectedFile as e:
        raise RejectedFile(e.reason, f"{path.name}: {e}") from None


def _sidecar(path: Path, parser: _RowParser, lang: str, cap: int = DEFAULT_MAX_IMAGE_BYTES) -> dict[str, Any] | None:
    """Fields from ``stem.json`` and/or ``stem.txt`` next to an image (None when neither exists).

    Raises RejectedFile for a sidecar that is not a regular file or is larger than ``cap``.
    """
    js, txt = path.with_suffix(".json"), path.with_suffix(".txt")
    row: dict[str, Any] | None = None
    raw = _sidecar_bytes(js, cap)
    if raw is not None:
        try:
            row = json.loads(raw.decode("utf-8-sig"))
        except ValueError as e:
            raise InputError(f"{js} line {getattr(e, 'lineno', '?')}: invalid JSON ({getattr(e, 'msg', e)})") from e
        if not isinstance(row, dict):
            raise InputError(f"{js}: expected a JSON object, got {type(row).__name__}")
        row.pop(parser.fields.image, None)  # the image is the file itself
    raw = _sidecar_bytes(txt, cap)
    if raw is not None:
        try:
            lines = [ln.strip() for ln in raw.decode("utf-8-sig").splitlines() if ln.strip()]
        except UnicodeDecodeError as e:
            raise InputError(f"{txt}: not UTF-8 text ({e})") from e
        row = row or {}
        has_caption = any(not _is_missing(row.get(c)) for c, _ in parser.caption_cols)
        if not has_caption:
            row[parser.caption_cols[0][0]] = {lang: lines}
    return row


def _read_folder(
    root: Path,
    parser: _RowParser,
    labels_from_folders: bool | None,
    templates: Sequence[str],
    skip: Path | None,
    cap: int = DEFAULT_MAX_IMAGE_BYTES,
) -> tuple[list[Record], bool]:
    """Records of an image folder; the bool tells whether class folders (FLYP) were used."""
    images = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (skip is None or Path(dirpath, d).resolve() != skip)
        )
        images += [Path(dirpath, n) for n in sorted(filenames) if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    images.sort(key=lambda p: p.relative_to(root).as_posix())
    if not images:
        raise InputError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder or its subfolders")
    parser.checked = True
    sidecars: dict[Path, dict[str, Any] | None] = {}
    rejected: dict[Path, tuple[str, str]] = {}  # a sidecar that is there but not read
    for p in images:
        try:
            sidecars[p] = _sidecar(p, parser, parser.lang, cap)
        except RejectedFile as e:
            sidecars[p], rejected[p] = {}, (e.reason, f"{p.relative_to(root).as_posix()}: {e}")
    flyp = labels_from_folders
    if flyp is None:
        flyp = all(s is None for s in sidecars.values()) and any(p.parent != root for p in images)
    if not flyp and all(s is None for s in sidecars.values()):
        raise InputError(
            f"{root}: none of the {len(images)} images has a same-stem .txt or .json caption sidecar and "
            "there are no class subfolders; add sidecars or use --labels-from-folders"
        )
    records = []
    for p in images:
        rel = p.relative_to(root).as_posix()
        row = dict(sidecars[p] or {})
        if flyp:
            if p.parent == root:
                rec = parser.record(row, rel, image=str(p))
                rec.problem = ("no class folder", f"{rel}: image outside a class subfolder")
                records.append(rec)
                continue
            f = parser.fields
            cls = p.parent.name.replace("_", " ").strip()
            if _opt_str(row.get(f.label)) is None:
                row[f.label] = cls
            if not any(not _is_missing(row.get(c)) for c, _ in parser.caption_cols):
                row[parser.caption_cols[0][0]] = {parser.lang: [t.format(c=row[f.label]) for t in templates]}
            if _opt_str(row.get(f.group)) is None:
                row[f.group] = row[f.label]
        rec = parser.record(row, rel, image=str(p))
        if sidecars[p] is None and not flyp:
            rec.problem = ("no caption", f"{rel}: no .txt or .json sidecar")
        rec.problem = rejected.get(p, rec.problem)
        records.append(rec)
    return records, flyp


def _input_kind(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    kinds = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
             ".parquet": "parquet", ".pq": "parquet"}
    if suffix not in kinds:
        raise InputError(
            f"{path}: unknown input type '{suffix}'; use .csv/.tsv/.jsonl/.json/.parquet, a folder, or --format"
        )
    return kinds[suffix]


def read_input(
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    fields: Fields | None = None,
    lang: str = "en",
    sep: str | None = None,
    image_root: str | os.PathLike | None = None,
    input_format: str | None = None,
    labels_from_folders: bool | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    skip_dir: str | os.PathLike | None = None,
    max_file_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> tuple[list[Record], str]:
    """All records of an input (a file, a folder or a list of dicts) and its kind (``flyp`` for class folders).

    ``max_file_bytes`` caps the caption sidecars of a folder (images are read later, by the writer).
    """
    fields = fields or Fields()
    if not isinstance(source, (str, os.PathLike)):
        parser = _RowParser(fields, lang, Path(image_root or "."), "records")
        return list(_read_records(source, parser)), "records"
    path = Path(source)
    if not path.exists():
        raise InputError(f"input '{path}' does not exist")
    kind = _input_kind(path, input_format)
    base = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    parser = _RowParser(fields, lang, base, str(path))
    if kind == "folder":
        if not path.is_dir():
            raise InputError(f"input '{path}' is not a folder")
        records, flyp = _read_folder(path, parser, labels_from_folders, templates, Path(skip_dir) if skip_dir else None,
                                     max_file_bytes)
        return records, "flyp" if flyp else "folder"
    if kind in ("csv", "tsv"):
        separator = sep if sep is not None else ("\t" if kind == "tsv" else ",")
        separator = separator.encode().decode("unicode_escape") if "\\" in separator else separator
        return list(_read_csv(path, separator, parser)), kind
    if kind in ("jsonl", "json"):
        return list(_read_jsonl(path, parser)), "jsonl"
    if kind == "parquet":
        return list(_read_parquet(path, parser)), kind
    raise InputError(f"unknown input format '{kind}' (csv, tsv, jsonl, json, parquet, folder)")


# ----------------------------------------------------------------------------------------------
# Split and shard plan


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") / 2.0**64


def split_key(rec: Record, index: int, group_key: str) -> str:
    """The value that decides a record's split; records without one are their own group."""
    if group_key == "group":
        value = rec.group
    elif group_key == "label":
        value = rec.label
    elif group_key == "sample":
        value = None
    else:
        value = _opt_str(rec.meta.get(group_key))
    return f"v:{value}" if value is not None else f"s:{index}"


def assign_splits(keys: Sequence[str], val_fraction: float, seed: int) -> list[str]:
    """Split name per record: a key goes to val when hash(seed, key) < val_fraction.

    0 sends everything to train and 1 everything to val (an evaluation-only set). In between, both
    sides are non-empty when there are at least two keys (the nearest key is moved over).
    """
    if val_fraction <= 0:
        return ["train"] * len(keys)
    if val_fraction >= 1:
        return ["val"] * len(keys)
    u = {k: _unit_hash(f"{seed}\0{k}") for k in set(keys)}
    val = {k for k, x in u.items() if x < val_fraction}
    if len(u) >= 2 and not val:
        val = {min(u, key=u.get)}
    elif len(u) >= 2 and len(val) == len(u):
        val.discard(max(u, key=u.get))
    return ["val" if k in val else "train" for k in keys]


def caption_fields_read(records: Iterable[Record]) -> list[str]:
    """The caption columns (``col`` or ``col:lang``) that gave any record a caption, in first-seen order."""
    seen: dict[str, None] = {}
    for rec in records:
        seen.update(dict.fromkeys(rec.caption_fields))
    return list(seen)


def _fingerprint(enc: EncodeOptions, items: list[tuple[str, Record]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(asdict(enc), sort_keys=True).encode())
    for key, rec in items:
        if isinstance(rec.image, str):
            image = rec.image
        else:
            image = "b:" + hashlib.blake2b(rec.image or b"", digest_size=16).hexdigest()
        row = [key, rec.where, image, rec.captions, rec.label, rec.group, rec.neg, rec.meta]
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Encoding one shard (runs in worker processes)


def _flatten(img: Image.Image) -> Image.Image:
    """RGB (or L) with any transparency composited onto white: readers drop alpha bluntly."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info) or img.mode == "RGBa":
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def encode_image(src: str | bytes, enc: EncodeOptions) -> tuple[bytes, str]:
    """Image bytes in the target format and size, and their extension. Raises on unreadable data.

    A path is read only if it is a regular file of at most ``enc.max_image_bytes`` (else RejectedFile).
    """
    raw = src if isinstance(src, bytes) else read_regular_file(src, enc.max_image_bytes)
    img = Image.open(io.BytesIO(raw))
    fmt = img.format
    w, h = img.size
    resize = enc.image_size > 0 and min(w, h) > enc.image_size
    if resize and fmt == "JPEG":
        img.draft("RGB", (enc.image_size, enc.image_size))  # DCT-domain downscale: much faster decode
    img.load()
    rotated = img.getexif().get(0x0112, 1) not in (1, None)
    target = enc.image_format if enc.image_format != "original" else _PIL_EXT.get(fmt or "", "png")
    if not resize and not rotated and _PIL_EXT.get(fmt or "") == target and img.mode in ("RGB", "L"):
        return raw, target
    if rotated:
        img = ImageOps.exif_transpose(img)
    img = _flatten(img)
    if resize:
        w, h = img.size
        s = enc.image_size / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    if target == "jpg":
        img.save(buf, "JPEG", quality=enc.quality)
    elif target == "webp":
        img.save(buf, "WEBP", quality=enc.quality, method=4)
    else:
        img.save(buf, "PNG")
    return buf.getvalue(), target


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed: the same input gives byte-identical shards (exact resume, reproducible)
    info.mode = 0o444
    info.uname = info.gname = "cliptune"
    tar.addfile(info, io.BytesIO(data))


def _primary_caption(captions: Mapping[str, list[str]], lang: str) -> str:
    return (captions.get(lang) or next(iter(captions.values())))[0]


def _add_skip(skipped: dict[str, dict], reason: str, detail: str, count: int = 1) -> None:
    entry = skipped.setdefault(reason, {"count": 0, "examples": []})
    entry["count"] += count
    if len(entry["examples"]) < MAX_EXAMPLES:
        entry["examples"].append(detail)


def _temp_path(path: Path) -> Path:
    """This process's temp file for ``path``: two processes never share one (see _clean_stale)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def write_shard(task: _Task) -> dict[str, Any]:
    """Encode and write one shard atomically; returns its done record (also stored on disk)."""
    out = Path(task.out)
    final = out / task.name
    tmp = _temp_path(final)
    skipped: dict[str, dict] = {}
    langs: Counter = Counter()
    written: list[str] = []
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for key, rec in task.items:
                try:
                    data, ext = encode_image(rec.image, task.enc)  # type: ignore[arg-type]
                except FileNotFoundError as e:
                    _add_skip(skipped, "missing image", f"{rec.where}: file not found ({e.filename})")
                    continue
                except RejectedFile as e:
                    _add_skip(skipped, e.reason, f"{rec.where}: {e}")
                    continue
                except (IsADirectoryError, PermissionError) as e:
                    _add_skip(skipped, "unreadable image", f"{rec.where}: {type(e).__name__}: {e}")
                    continue
                except Exception as e:  # noqa: BLE001 - PIL raises many types for broken images
                    msg = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))[:160]
                    _add_skip(skipped, "corrupt image", f"{rec.where}: {type(e).__name__}: {msg}")
                    continue
                sample = {"id": key, "source": rec.where, "captions": rec.captions, "label": rec.label,
                          "group": rec.group}
                if rec.neg:
                    sample["neg"] = rec.neg
                sample["meta"] = rec.meta
                _add_member(tar, f"{key}.{ext}", data)
                _add_member(tar, f"{key}.json", json.dumps(sample, ensure_ascii=False).encode("utf-8"))
                _add_member(tar, f"{key}.txt", _primary_caption(rec.captions, task.enc.lang).encode("utf-8"))
                langs.update(rec.captions.keys())
                written.append(key)
        f.flush()
        os.fsync(f.fileno())
        size = os.fstat(f.fileno()).st_size  # of our own file: `final` may be replaced by an identical one meanwhile
    n = len(written)
    if n:
        os.replace(tmp, final)  # atomic; a stray writer of the same shard renames identical bytes
    else:  # nothing survived: no empty tar for readers to trip over
        tmp.unlink()
        final.unlink(missing_ok=True)
    record = {
        "name": task.name,
        "num_samples": n,
        "bytes": size if n else 0,
        "languages": dict(langs),
        "skipped": skipped,
        "written": written,  # keys of the samples in the shard: the index counts their groups
        "fingerprint": task.fingerprint,
    }
    _write_json(out / STATE_DIR / f"{task.name}.json", record)
    return record


def _finished(task: _Task) -> dict[str, Any] | None:
    """The done record of a shard that needs no rewrite, else None."""
    out = Path(task.out)
    try:
        record = json.loads((out / STATE_DIR / f"{task.name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != task.fingerprint or "written" not in record:
        return None
    final = out / task.name
    if record.get("num_samples") == 0:
        return None if final.exists() else record
    try:
        return record if final.stat().st_size == record.get("bytes") else None
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# Running

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)  # re-parented: the writer is gone, and nobody will use what this worker writes


def _worker_init(parent: int, pdeathsig: bool) -> None:
    """Pool initializer: the worker ends with the writer process, even when that one is SIGKILLed.

    Without it a killed writer leaves its workers running (they block on the task queue or keep
    writing queued shards) and they race a rerun on the same files.
    """
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watcher thread below still ends the worker
    if os.getppid() != parent:  # the writer died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="cliptune-shards-parent", daemon=True).start()


def throughput(samples: float, seconds: float | None) -> float | None:
    """Samples per second over the whole run so far; None before the first sample or any elapsed time.

    Not rich's ``task.speed``: that divides the samples of all but the first update by the time
    between the first and the last update in its window, and shards finish in bursts (several
    workers' shards land in one poll, microseconds apart), so two shards of 1000 samples read as
    "25,999,170 samples/s". The average since the start is what a user can plan with.
    """
    if not samples or not seconds or seconds <= 0:
        return None
    return samples / seconds


class _RateColumn(ProgressColumn):
    """Average samples/s since the bar started (see :func:`throughput`)."""

    def render(self, task: Any) -> Text:
        speed = throughput(task.completed, task.finished_time if task.finished else task.elapsed)
        return Text(f"{speed:,.0f} samples/s" if speed else "- samples/s")


class _EtaColumn(ProgressColumn):
    """Time left at the average rate (rich's own column uses the bursty ``task.speed``); elapsed when done."""

    def render(self, task: Any) -> Text:
        if task.finished:
            seconds = task.finished_time
        else:
            speed = throughput(task.completed, task.elapsed)
            seconds = None if speed is None or task.total is None else (task.total - task.completed) / speed
        if seconds is None:
            return Text("-:--:--", style="progress.remaining")
        minutes, sec = divmod(int(round(seconds)), 60)
        hours, minutes = divmod(minutes, 60)
        style = "progress.elapsed" if task.finished else "progress.remaining"
        return Text(f"{hours}:{minutes:02d}:{sec:02d}", style=style)


def _run_tasks(tasks: list[_Task], workers: int, progress: bool, done: int, total_shards: int) -> list[dict]:
    results: list[dict] = []
    if not tasks:
        return results
    total = sum(len(t.items) for t in tasks)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(), _EtaColumn())
    desc = f"writing {len(tasks)} shards" + (f" ({done} of {total_shards} already done)" if done else "")
    if workers <= 1 or len(tasks) <= 1:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            job = bar.add_task(desc, total=total)
            for t in tasks:
                results.append(write_shard(t))
                bar.advance(job, len(t.items))
        return results
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # submit before the progress bar starts its refresh thread: with fork, workers start at the first submit.
    # That makes this thread their parent thread, and PR_SET_PDEATHSIG fires when the parent *thread* ends:
    # arm it only from the main thread (it lives as long as the process); the watcher covers the rest.
    main_thread = threading.current_thread() is threading.main_thread()
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=multiprocessing.get_context(method),
                               initializer=_worker_init, initargs=(os.getpid(), main_thread))
    try:
        futures = {pool.submit(write_shard, t): t for t in tasks}
        with Progress(*columns, disable=not progress, transient=False) as bar:
            job = bar.add_task(desc, total=total)
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION, timeout=0.5)
                for fut in finished:
                    t = futures[fut]
                    try:
                        results.append(fut.result())
                    except Exception as e:
                        raise RuntimeError(f"shard '{t.name}' ({t.split}) failed: {type(e).__name__}: {e}") from e
                    bar.advance(job, len(t.items))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (and so may still write its temp file); True when that cannot be told."""
    if os.name != "posix":
        return True  # no safe probe: os.kill(pid, 0) terminates the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: a zombie (killed, not yet reaped by its new parent) writes nothing more
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] not in ([b"Z"], [b"X"])
    except OSError:
        return True


def _clean_stale(out: Path, planned: set[str]) -> None:
    """Remove leftover temp files, and shards (with done records) that the current plan does not have.

    A temp file is removed when its writer is this process or a dead one (or is unnamed, from an
    older version). One of a live process is left alone: its name is not ours, so it cannot collide.
    Files may vanish meanwhile (a stray writer renames its own): never an error.
    """
    state = out / STATE_DIR
    for folder in (out, state):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            m = _TEMP_NAME.match(p.name)
            if not m:
                continue
            pid = int(m.group(1)) if m.group(1) else None
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                log.warning("keeping %s: process %d is still writing it (another cliptune-shards into %s?)",
                            p, pid, out)
                continue
            log.info("removing leftover temp file %s (an interrupted run)", p)
            p.unlink(missing_ok=True)
    if not state.is_dir():
        return
    for rec_path in state.glob("*.tar.json"):
        name = rec_path.name[: -len(".json")]
        if _SHARD_NAME.match(name) and name not in planned:
            if (out / name).exists():
                log.info("removing stale shard %s (not part of this run's plan)", out / name)
                (out / name).unlink(missing_ok=True)
            rec_path.unlink(missing_ok=True)


def _lock_out(out: Path) -> RunLock:
    """The writer's lock of ``out`` (``out/.lock``, an flock the kernel drops when the process dies):
    two writers into one folder would interleave shards of two plans."""
    lock = RunLock(out)
    try:
        return lock.acquire()
    except RunDirBusyError:
        try:
            holder = lock.path.read_text(encoding="ascii", errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise InputError(f"--out {out} is in use by another cliptune-shards (PID {holder}): wait for it to "
                         "finish, stop it, or choose another --out") from None


def _existing_output(out: Path) -> list[Path]:
    """Shards and indexes of a finished or partial earlier run in ``out``."""
    return sorted(p for p in out.iterdir() if _SHARD_NAME.match(p.name) or p.name in {f"{s}.json" for s in SPLITS})


def _plan_fingerprint(tasks: Sequence[_Task]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([[t.name, t.fingerprint] for t in tasks]).encode())
    return h.hexdigest()


def _same_plan(out: Path, tasks: Sequence[_Task], existing: Sequence[Path], plan: str) -> bool:
    """Whether the shards in ``out`` belong to this plan (a rerun or resume), not to another dataset.

    The plan record says so; without one (an older writer), every shard there must have a done record
    of the same-named planned shard."""
    try:
        recorded = json.loads((out / STATE_DIR / PLAN_FILE).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded is not None:
        return recorded == plan
    planned = {t.name: t.fingerprint for t in tasks}
    for p in existing:
        if not _SHARD_NAME.match(p.name):
            continue
        try:
            rec = json.loads((out / STATE_DIR / f"{p.name}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(rec, dict) or rec.get("fingerprint") != planned.get(p.name):
            return False
    return True


def _remove_output(out: Path, existing: Sequence[Path]) -> None:
    """``--overwrite``: the earlier run's shards, indexes and done records go before anything is written."""
    for p in existing:
        p.unlink(missing_ok=True)
    state = out / STATE_DIR
    if state.is_dir():
        for p in state.iterdir():
            if p.name == PLAN_FILE or p.name.endswith(".tar.json"):
                p.unlink(missing_ok=True)
    if existing:
        log.info("--overwrite: removed %d shard and index files of the earlier run in %s", len(existing), out)


def mark_duplicates(records: Sequence[Record]) -> list[Record]:
    """Mark each record with the same image and captions as an earlier one as a skip (``duplicate row``,
    naming both rows); returns the marked ones. A repeated pair only weighs one sample more in training,
    and with ``--group-key sample`` its copies could land on both sides of the split."""
    seen: dict[tuple[str, str], Record] = {}
    marked = []
    for rec in records:
        if rec.problem or rec.image is None:
            continue
        if isinstance(rec.image, str):
            image = "p:" + os.path.normpath(rec.image)
        else:
            image = "b:" + hashlib.blake2b(rec.image, digest_size=16).hexdigest()
        key = (image, json.dumps(rec.captions, sort_keys=True, ensure_ascii=False))
        first = seen.setdefault(key, rec)
        if first is not rec:
            rec.problem = ("duplicate row", f"{rec.where}: same image and captions as {first.where}")
            marked.append(rec)
    return marked


def _nothing_written(out: Path, skipped: Mapping[str, Mapping[str, dict]]) -> InputError:
    merged: dict[str, dict] = {}
    for by_reason in skipped.values():
        for reason, entry in by_reason.items():
            m = merged.setdefault(reason, {"count": 0, "examples": []})
            m["count"] += entry["count"]
            m["examples"] += entry["examples"][: 2 - len(m["examples"])]
    total = sum(e["count"] for e in merged.values())
    reasons = ", ".join(f"{e['count']} {r}" for r, e in sorted(merged.items(), key=lambda x: -x[1]["count"]))
    examples = "; ".join(x for e in merged.values() for x in e["examples"])
    return InputError(f"{out}: no sample was written: all {total} skipped ({reasons}); e.g. {examples}. "
                      "Fix the input (paths are relative to the input file, or give --image-root) and run again")


def build_shards(
    input: str | os.PathLike | Sequence[Mapping[str, Any]],
    out: str | os.PathLike,
    *,
    val_fraction: float = 0.0,
    group_key: str | None = None,
    image_size: int = 512,
    image_format: str = "jpg",
    quality: int = 95,
    shard_size: int = 1000,
    workers: int | None = None,
    seed: int = 0,
    lang: str = "en",
    image_col: str | None = None,
    caption_col: str | Sequence[str] | None = None,
    label_col: str | None = None,
    group_col: str | None = None,
    neg_col: str | None = None,
    sep: str | None = None,
    templates: Sequence[str] | None = None,
    labels_from_folders: bool | None = None,
    image_root: str | os.PathLike | None = None,
    input_format: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    info: Mapping[str, Any] | None = None,
    summary: bool = True,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    split: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Write ``out/<split>-NNNNNN.tar`` shards and ``out/<split>.json`` indexes; returns ``{split: index}``.

    ``input``: a CSV/TSV/JSONL/JSON/parquet file, an image folder, or a list of dicts (rows; the
    image may be bytes). ``caption_col`` entries may be comma lists and ``col:lang``. ``info`` is
    stored in each index as is (callers record their own provenance there). ``max_image_bytes``
    caps image and caption files; only regular files are read. ``split`` (``"train"`` or ``"val"``)
    writes every record to that split (``val``: an evaluation-only set, as ``val_fraction=1``); it
    excludes ``val_fraction``. See the module doc.
    """
    t0 = time.perf_counter()
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1] (1: everything to val), got {val_fraction}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (every record to that split), got {split!r}")
    if split is not None and val_fraction > 0:
        raise ValueError(f"split={split!r} writes every record to {split}, so it excludes val_fraction={val_fraction} "
                         "(--split and --val-fraction: give one of them)")
    target = split or ("val" if val_fraction >= 1 else None)  # the one split everything goes to, if any
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if max_image_bytes < 1:
        raise ValueError(f"max_image_bytes must be >= 1, got {max_image_bytes}")
    if not 0 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size (--image-size) must be 0 (keep the size) to {MAX_IMAGE_SIZE} px, got {image_size}")
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers (--workers) must be 1 to {MAX_WORKERS} processes, got {workers}")
    templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{c}}' (the class name): {bad}")
    explicit = {n for n, v in (("image", image_col), ("captions", caption_col), ("label", label_col),
                               ("group", group_col), ("neg", neg_col)) if v}
    cap_cols = [caption_col] if isinstance(caption_col, str) else list(caption_col or ["caption"])
    cap_cols = [c.strip() for spec in cap_cols for c in spec.split(",") if c.strip()]
    fields = Fields(image=image_col or "image", captions=cap_cols, label=label_col or "label",
                    group=group_col or "group", neg=neg_col or "neg", explicit=frozenset(explicit))

    out_dir = Path(out)
    lock = _lock_out(out_dir)  # creates the folder; one writer at a time
    try:
        records, kind = read_input(input, fields, lang, sep, image_root, input_format, labels_from_folders, templates,
                                   skip_dir=out_dir.resolve(), max_file_bytes=max_image_bytes)
        if not records:
            raise InputError(f"{input if isinstance(input, (str, os.PathLike)) else 'records'}: no samples")
        duplicates = mark_duplicates(records)
        if duplicates:
            shown = "; ".join(r.problem[1] for r in duplicates[:5])  # type: ignore[index]
            log.warning("%s: %d duplicate rows (same image and captions as an earlier row) skipped: %s%s", input,
                        len(duplicates), shown, f" ... and {len(duplicates) - 5} more" if len(duplicates) > 5 else "")
        gkey = group_key or ("sample" if kind == "flyp" else "group")
        if gkey not in ("group", "label", "sample") and not any(gkey in r.meta for r in records):
            extra = sorted({k for r in records[:1000] for k in r.meta})
            raise InputError(f"--group-key '{gkey}' is not a column of {input}; use group, label, sample or one of {extra}")
        if target is not None:
            splits = [target] * len(records)
        else:
            splits = assign_splits([split_key(r, i, gkey) for i, r in enumerate(records)], val_fraction, seed)
        enc = EncodeOptions(image_size=image_size, image_format=image_format, quality=quality, lang=lang,
                            max_image_bytes=max_image_bytes)
        n_digits = max(9, len(str(len(records) - 1)))

        tasks: list[_Task] = []
        plan_skips: dict[str, dict[str, dict]] = {s: {} for s in SPLITS}
        for name_split in SPLITS:
            items = []
            for i, (rec, s) in enumerate(zip(records, splits)):
                if s != name_split:
                    continue
                if rec.problem:
                    _add_skip(plan_skips[name_split], *rec.problem)
                    continue
                items.append((f"{i:0{n_digits}d}", rec))  # input position: stable, unique, no dots
            for j in range(0, len(items), shard_size):
                chunk = items[j : j + shard_size]
                name = f"{name_split}-{j // shard_size:06d}.tar"
                tasks.append(_Task(str(out_dir), name_split, name, chunk, enc, _fingerprint(enc, chunk)))

        existing = _existing_output(out_dir)
        plan = _plan_fingerprint(tasks)
        if overwrite:
            _remove_output(out_dir, existing)
        elif existing and not _same_plan(out_dir, tasks, existing, plan):
            raise InputError(
                f"--out {out_dir} already holds shards of another dataset (or of other options): {len(existing)} "
                f"shard/index files such as {existing[0].name}; add --overwrite to replace them, or choose another --out"
            )
        (out_dir / STATE_DIR).mkdir(exist_ok=True)
        _write_json(out_dir / STATE_DIR / PLAN_FILE, {"fingerprint": plan, "input": str(input) if isinstance(
            input, (str, os.PathLike)) else "<records>", "shards": len(tasks)})
        _clean_stale(out_dir, {t.name for t in tasks})
        done_records: dict[str, dict] = {}
        for t in tasks:
            rec = None if overwrite else _finished(t)
            if rec is not None:
                done_records[t.name] = rec
        todo = [t for t in tasks if t.name not in done_records]
        reused = len(done_records)
        if done_records:
            log.info("resuming in %s: %d of %d shards already written", out_dir, len(done_records), len(tasks))
        n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
        for rec in _run_tasks(todo, n_workers, progress, len(done_records), len(tasks)):
            done_records[rec["name"]] = rec

        options = {
            "input_kind": kind, "val_fraction": val_fraction, "split": target, "group_key": gkey, "seed": seed,
            "shard_size": shard_size, "image_size": image_size, "resize": "shorter side, never upscaled",
            "image_format": image_format, "quality": quality, "lang": lang, "max_image_bytes": max_image_bytes,
            "fields": {"image": fields.image, "captions": caption_fields_read(records) or fields.captions,
                       "label": fields.label, "group": fields.group, "neg": fields.neg},
            "templates": templates if kind == "flyp" else None,
        }
        # the splits that should get samples: a missing one is worth a warning
        expected = {target} if target else ({"train", "val"} if val_fraction > 0 else {"train"})
        indexes: dict[str, dict[str, Any]] = {}
        split_skips: dict[str, dict[str, dict]] = {}
        for name_split in SPLITS:
            split_tasks = [t for t in tasks if t.split == name_split]
            index_path = out_dir / f"{name_split}.json"
            skipped = {k: {"count": v["count"], "examples": list(v["examples"])}
                       for k, v in plan_skips[name_split].items()}
            langs: Counter = Counter()
            groups: set[str] = set()  # of the samples written, not of those planned
            shards = []
            for t in split_tasks:
                rec = done_records[t.name]
                groups.update(split_key(records[int(k)], int(k), gkey) for k in rec["written"])
                for reason, entry in rec["skipped"].items():
                    have = skipped.setdefault(reason, {"count": 0, "examples": []})
                    have["count"] += entry["count"]
                    have["examples"] += entry["examples"][: MAX_EXAMPLES - len(have["examples"])]
                langs.update(rec["languages"])
                if rec["num_samples"]:
                    shards.append({"name": t.name, "num_samples": rec["num_samples"]})
            split_skips[name_split] = skipped
            if not shards:
                if index_path.exists():
                    index_path.unlink()
                if name_split in expected:
                    log.warning("%s: no %s samples written (%d skipped)", out_dir, name_split,
                                sum(v["count"] for v in skipped.values()))
                continue
            index = {
                "split": name_split,
                "num_samples": sum(s["num_samples"] for s in shards),
                "shards": shards,
                "languages": sorted(langs, key=lambda x: (-langs[x], x)),
                "caption_counts": dict(sorted(langs.items())),
                "num_groups": len(groups),
                "num_skipped": sum(v["count"] for v in skipped.values()),
                "skipped": dict(sorted(skipped.items())),
                "input": str(input) if isinstance(input, (str, os.PathLike)) else "<records>",
                "options": options,
                "created_by": "cliptune-shards",
            }
            if info is not None:
                index["info"] = dict(info)
            fault_point("shards.index")
            _write_json(index_path, index)  # last: its presence means the split is complete
            indexes[name_split] = index
        if summary:
            print_summary(indexes, out_dir, time.perf_counter() - t0, resumed=reused)
        if not indexes:
            raise _nothing_written(out_dir, split_skips)
        return indexes
    finally:
        lock.release()


def print_summary(indexes: Mapping[str, Mapping[str, Any]], out: Path | str, seconds: float, resumed: int = 0) -> None:
    """A table of splits (samples, shards, groups, languages, skipped) plus skip reasons with examples."""

    # not cliptune.log.rank_zero_print: the writer is a single-process tool, never run under DDP;
    # cliptune.log.console: whole tables outside a terminal too
    console = log_console()

    table = Table(title=f"shards in {out} ({seconds:.1f} s" + (f", {resumed} shards reused" if resumed else "") + ")")
    for col in ("split", "samples", "shards", "groups", "languages", "skipped"):
        table.add_column(col, justify="right" if col in ("samples", "shards", "groups", "skipped") else "left")
    for split, idx in indexes.items():
        table.add_row(split, str(idx["num_samples"]), str(len(idx["shards"])), str(idx["num_groups"]),
                      ",".join(idx["languages"]), str(idx["num_skipped"]))
    console.print(table)
    for split, idx in indexes.items():
        for reason, entry in idx["skipped"].items():
            console.print(f"  {split}: skipped {entry['count']} x {reason}, e.g. " + "; ".join(entry["examples"][:3]),
                            markup=False, highlight=False)


# ----------------------------------------------------------------------------------------------
# CLI


def _int_in(low: int, high: int) -> Any:
    """An argparse type: an int in [low, high]; argparse names the flag in its error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cliptune-shards",
        description="Write webdataset shards (+ <split>.json indexes) from CSV/TSV/JSONL/parquet or an image folder.",
    )  # each default is said once, in its help: "(default: ...)"
    p.add_argument("input", help="a .csv/.tsv/.jsonl/.json/.parquet file or an image folder")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_argument_group("split")
    g.add_argument("--val-fraction", type=float, default=0.0, help="share of split keys that go to val; 1: an evaluation-only set, like --split val (default: %(default)s)")
    g.add_argument("--group-key", default=None,
                   help="what keeps samples together in one split: group, label, sample or an extra column "
                        "(default: group; sample for class folders)")
    g.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    g.add_argument("--split", choices=SPLITS, default=None,
                   help="write every record to this split (val: an evaluation-only set); excludes --val-fraction")
    g = p.add_argument_group("images and shards")
    g.add_argument("--image-size", type=_int_in(0, MAX_IMAGE_SIZE), default=512, help="shorter side in px, downscale only; 0 keeps the size (default: %(default)s)")
    g.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpg",
                   help="format of the stored images (default: %(default)s)")
    g.add_argument("--quality", type=int, default=95, help="jpg/webp quality (default: %(default)s)")
    g.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                   help="larger image or caption files are skipped, as are devices, FIFOs, directories (default: %(default)s)")
    g.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)")
    g.add_argument("--workers", type=_int_in(1, MAX_WORKERS), default=None,
                   help=f"processes, 1 to {MAX_WORKERS} (default: min(8, cpus))")
    g.add_argument("--overwrite", action="store_true",
                   help="remove the shards and indexes already in --out, then write every shard (no resume); "
                        "needed to write another dataset there")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("fields")
    g.add_argument("--format", dest="input_format", choices=("csv", "tsv", "jsonl", "json", "parquet", "folder"),
                   help="input type (default: from the extension)")
    g.add_argument("--image-col", help="image path column (default: image)")
    g.add_argument("--caption-col", action="append",
                   help="caption column(s); repeat or comma list; 'col:lang' sets the language (default: caption)")
    g.add_argument("--label-col", help="label column (default: label, optional)")
    g.add_argument("--group-col", help="group column (default: group, optional)")
    g.add_argument("--neg-col", help="hard-negative captions column (default: neg, optional)")
    g.add_argument("--sep", help="CSV/TSV separator (default: from the extension; '\\t' works)")
    g.add_argument("--lang", default="en", help="language of captions given without one (default: %(default)s)")
    g.add_argument("--image-root", help="base folder for relative image paths (default: the input's folder)")
    g.add_argument("--labels-from-folders", action=argparse.BooleanOptionalAction, default=None,
                   help="class subfolders -> label and prompt captions (FLYP); default: when no sidecars")
    g.add_argument("--templates", action="append",
                   help=f"prompt template with {{c}} (repeat) or a file with one per line "
                        f"(default: {list(DEFAULT_TEMPLATES)})")
    return p


def _load_templates(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    if len(values) == 1 and Path(values[0]).is_file():
        return [ln.strip() for ln in Path(values[0]).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return values


def main(argv: Sequence[str] | None = None) -> int:
    """``cliptune-shards``: returns 0 on success, 2 for input errors (message logged)."""
    args = _parser().parse_args(argv)
    configure_job_logging()
    try:
        build_shards(
            args.input, args.out, val_fraction=args.val_fraction, group_key=args.group_key,
            image_size=args.image_size, image_format=args.image_format, quality=args.quality,
            shard_size=args.shard_size, workers=args.workers, seed=args.seed, lang=args.lang,
            image_col=args.image_col, caption_col=args.caption_col, label_col=args.label_col,
            group_col=args.group_col, neg_col=args.neg_col, sep=args.sep, templates=_load_templates(args.templates),
            labels_from_folders=args.labels_from_folders, image_root=args.image_root,
            input_format=args.input_format, overwrite=args.overwrite, progress=not args.no_progress,
            max_image_bytes=args.max_image_bytes, split=args.split,
        )
    except (InputError, ValueError) as e:
        log.error("cliptune-shards: %s", e)
        return 2
    except KeyboardInterrupt:
        log.error("cliptune-shards: interrupted; run the same command again to resume (finished shards are kept)")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
