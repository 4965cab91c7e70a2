"""Reading the formats people have: CSV/TSV, JSONL/JSON, parquet, image folders or rows -> records.

The input forms and fields are described in :mod:`cliptune.data.shards` (``cliptune-shards``).
Input that cannot be parsed (a bad CSV row, an over-long field, an invalid JSON line, bytes that
are not UTF-8, a lone surrogate) or a missing column raises :class:`InputError` naming the file and
line or the columns. Files are read only when they are regular and at most a cap in size
(:func:`read_regular_file`). Also here: what decides a record's split (:func:`split_key`,
:func:`assign_splits`) and the duplicate-row check (:func:`mark_duplicates`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_TEMPLATES = ("a photo of a {c}.", "a picture of a {c}.", "{c}")
DEFAULT_MAX_IMAGE_BYTES = 64 << 20  # far above any photo a CLIP model trains on; bounds what one read takes
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
