"""Streaming WebDataset reader: shard specs -> per-worker sample streams -> contract batches.

Shard-spec forms (strings may be joined with ``::``, webdataset style):

- ``"/data/out/train-{000000..000127}.tar"``  brace pattern; local, ``file://``, fsspec URLs
  (``s3://``, ``gs://``, ``memory://`` ...) and ``https://`` (read with curl, as webdataset does)
- ``"/data/out/train-*.tar"``  glob (local and fsspec file systems)
- ``"/data/out"``  a directory: its ``<split>.json`` index when present, else its ``.tar`` files
- ``"/data/out/train.json"``  the index written by cliptune's shard writer
- ``"pipe:aws s3 cp s3://bucket/train-{0..9}.tar -"``  a command whose stdout is a tar
- ``["a.tar", "b.tar"]``  explicit list (one source)
- ``{"shards": ..., "weight": 2, "split": "train", "num_samples": 1000}``  one source, options
- ``[{"shards": ..., "weight": 2}, {"shards": ..., "weight": 1}]``  weighted mixture: ``weight`` is
  the relative share of training samples drawn from each source

Sample counts come from the ``<split>.json`` index next to the shards (or open_clip's
``sizes.json``); they set the default epoch length.

Error policy: a shard that cannot be opened and a spec that matches nothing raise. A sample that
cannot be used is skipped, never fatal: its reason (:data:`SKIP_REASONS`: ``decode_error``,
``empty_caption``, ``missing_caption``, ``missing_image``, ``caption_lang``) is counted in the
``skipped`` tensor of the next batch its worker yields (so summing batches counts every skip once)
and logged with shard and key (rate-limited). ``strict=True`` (``data.strict``) makes a missing
image or caption raise instead. A tar that breaks off mid-way loses the rest of that shard, with a
warning.
Samples whose json has no ``captions`` use their ``txt`` member whatever ``caption_lang`` says
(its language is unknown).
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import io
import json
import os
import random
import lzma
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import fsspec
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.filters import _shuffle
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from cliptune import runtime
from cliptune.log import get_logger

log = get_logger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# samples read without a single usable one before we declare the filter/data hopeless
_HOPELESS_AFTER = 5000
_META_MEMBER = re.compile(r"__[^/]*__($|/)")

Tokenizer = Callable[[list[str]], torch.Tensor]
Transform = Callable[[Image.Image], torch.Tensor]


class ShardSpecError(ValueError):
    """A shard spec that cannot be resolved to shards."""


class ShardFormatError(ValueError):
    """A shard or sample that does not follow the shard format (fix the data, not a skip)."""


class ShardReadError(OSError):
    """A shard that cannot be opened or is not a tar archive."""


# ----------------------------------------------------------------------------------------------
# Spec resolution


@dataclass
class Source:
    """One data source: a list of shard URLs with optional per-shard sample counts."""

    name: str
    urls: list[str]
    weight: float = 1.0
    sizes: list[int | None] = field(default_factory=list)
    declared_samples: int | None = None

    @property
    def num_samples(self) -> int | None:
        """Samples in the source: declared, or summed from the index; None when unknown."""
        if self.declared_samples is not None:
            return self.declared_samples
        if self.sizes and all(n is not None for n in self.sizes):
            return int(sum(self.sizes))  # type: ignore[arg-type]
        return None


def _scheme(url: str) -> str:
    scheme = urlparse(url).scheme
    return "" if len(scheme) <= 1 else scheme  # "C:" on Windows is a drive, not a scheme


def _is_local(url: str) -> bool:
    return _scheme(url) in ("", "file")


def _local_path(url: str) -> str:
    return url2pathname(urlparse(url).path) if _scheme(url) == "file" else os.path.expanduser(url)


def _uses_fsspec(url: str) -> bool:
    return _scheme(url) not in ("", "file", "pipe", "http", "https")


def _dirname(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url else "."


def _join(base: str, name: str) -> str:
    if _is_local(base) and _scheme(base) == "":
        return os.path.join(base, name)
    return base.rstrip("/") + "/" + name


class _Fs:
    """Existence / listing / reading for local paths, file:// and fsspec URLs (cached)."""

    def __init__(self) -> None:
        self._listing: dict[str, set[str] | None] = {}

    def isdir(self, url: str) -> bool:
        if _is_local(url):
            return os.path.isdir(_local_path(url))
        if _uses_fsspec(url):
            fs, path = fsspec.core.url_to_fs(url)
            return bool(fs.isdir(path))
        return False

    def exists(self, url: str) -> bool:
        if _is_local(url):
            return os.path.exists(_local_path(url))
        if _uses_fsspec(url):
            # list each parent once: one request per directory, not per shard
            parent = _dirname(url)
            if parent not in self._listing:
                fs, path = fsspec.core.url_to_fs(parent)
                try:
                    self._listing[parent] = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
                except (FileNotFoundError, NotADirectoryError):
                    self._listing[parent] = set()
            return url.rstrip("/").rsplit("/", 1)[-1] in self._listing[parent]  # type: ignore[operator]
        return True  # http(s): nothing cheap to check; a failure shows up when the shard is opened

    def glob(self, url: str) -> list[str]:
        if _is_local(url):
            hits = sorted(glob.glob(_local_path(url)))
            return [("file://" + h) if _scheme(url) == "file" else h for h in hits]
        if _uses_fsspec(url):
            fs, path = fsspec.core.url_to_fs(url)
            return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))
        raise ShardSpecError(f"shard spec '{url}': glob patterns need a local path or an fsspec URL")

    def read_json(self, url: str) -> Any:
        if _is_local(url):
            with open(_local_path(url), encoding="utf-8") as f:
                return json.load(f)
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            return json.load(f)


def _read_index(fs: _Fs, index_url: str) -> tuple[list[str], list[int | None]]:
    """Shard URLs and sample counts from a cliptune ``<split>.json`` index."""
    try:
        index = fs.read_json(index_url)
        entries = index["shards"]
        urls = [_join(_dirname(index_url), e["name"]) for e in entries]
        sizes = [int(e["num_samples"]) if e.get("num_samples") is not None else None for e in entries]
    except (KeyError, TypeError, ValueError) as e:
        raise ShardSpecError(
            f"index '{index_url}' is not a cliptune shard index (expected "
            f'{{"shards": [{{"name": ..., "num_samples": ...}}, ...]}}): {e!r}'
        ) from e
    if not urls:
        raise ShardSpecError(f"index '{index_url}' lists no shards")
    return urls, sizes


def _sizes_from_neighbours(fs: _Fs, urls: list[str]) -> list[int | None]:
    """Per-shard sample counts from ``<prefix>.json`` indexes or ``sizes.json`` next to shards."""
    cache: dict[str, dict[str, int]] = {}
    sizes: list[int | None] = []
    for url in urls:
        if not (_is_local(url) or _uses_fsspec(url)):
            sizes.append(None)
            continue
        parent, base = _dirname(url), url.rstrip("/").rsplit("/", 1)[-1]
        prefix = base.rsplit("-", 1)[0] if "-" in base else None
        for candidate in ([f"{prefix}.json"] if prefix else []) + ["sizes.json"]:
            index_url = _join(parent, candidate)
            if index_url not in cache:
                cache[index_url] = {}
                try:
                    if fs.exists(index_url):
                        data = fs.read_json(index_url)
                        if candidate == "sizes.json":
                            cache[index_url] = {k: int(v) for k, v in data.items()}
                        else:
                            cache[index_url] = {
                                e["name"]: int(e["num_samples"]) for e in data.get("shards", [])
                            }
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    pass  # an unreadable neighbour index only costs us the sample count
            if base in cache[index_url]:
                sizes.append(cache[index_url][base])
                break
        else:
            sizes.append(None)
    return sizes


_KNOWN_SPLITS = {"train", "val", "validation", "test"}


def _resolve_dir(fs: _Fs, url: str, splits: Sequence[str], spec: str) -> tuple[list[str], list[int | None]]:
    for split in splits:
        index_url = _join(url, f"{split}.json")
        if fs.exists(index_url):
            return _read_index(fs, index_url)
    for split in splits:
        tars = fs.glob(_join(url, f"{split}-*.tar"))
        if tars:
            return tars, _sizes_from_neighbours(fs, tars)
    # Fallbacks for directories of other tools' shards. Files of another cliptune split are never
    # taken: a val set must not silently read the training shards (or the reverse).
    other = _KNOWN_SPLITS - set(splits)

    def foreign(u: str, sep: str) -> bool:
        return os.path.basename(u).split(sep)[0] in other

    indexes = [u for u in fs.glob(_join(url, "*.json")) if not u.endswith("sizes.json") and not foreign(u, ".")]
    if len(indexes) == 1:
        return _read_index(fs, indexes[0])
    tars = [u for u in fs.glob(_join(url, "*.tar")) if not foreign(u, "-")]
    if tars:
        return tars, _sizes_from_neighbours(fs, tars)
    raise ShardSpecError(
        f"shard spec '{spec}': directory '{url}' has no {' / '.join(f'{s}.json' for s in splits)} "
        "index and no .tar shards; point at the shards (e.g. 'dir/train-{000000..000009}.tar'), "
        "the index json, or give the split: {shards: dir, split: name}"
    )


def _resolve_string(fs: _Fs, spec: str, splits: Sequence[str]) -> tuple[list[str], list[int | None]]:
    """Expand one spec string (brace, glob, dir, index, pipe:) into URLs and sample counts."""
    spec = os.path.expandvars(spec)
    if spec.startswith("pipe:"):
        urls = list(braceexpand.braceexpand(spec))
        return urls, [None] * len(urls)
    urls: list[str] = []
    sizes: list[int | None] = []
    missing: list[str] = []
    for part in spec.split("::"):
        for item in braceexpand.braceexpand(part):
            if item.endswith(".json"):
                if not fs.exists(item):
                    missing.append(item)
                    continue
                u, s = _read_index(fs, item)
            elif any(c in item for c in "*?["):
                u = fs.glob(item)
                s = _sizes_from_neighbours(fs, u)
            elif fs.isdir(item):
                u, s = _resolve_dir(fs, item, splits, spec)
            else:
                if not fs.exists(item):
                    missing.append(item)
                    continue
                u, s = [item], [None]
            urls += u
            sizes += s
    if not urls:
        raise ShardSpecError(
            f"shard spec '{spec}' matches no shards"
            + (f" (looked for {missing[0]!r}{' and others' if len(missing) > 1 else ''})" if missing else "")
            + "; check the path, the brace range and the split name"
        )
    if missing:
        raise ShardSpecError(
            f"shard spec '{spec}': {len(missing)} of {len(urls) + len(missing)} shards do not exist, "
            f"e.g. {', '.join(missing[:3])}{f' ... {missing[-1]}' if len(missing) > 3 else ''}; "
            "fix the brace range or the file names"
        )
    if any(n is None for n in sizes):
        pending = [i for i, n in enumerate(sizes) if n is None]
        found = _sizes_from_neighbours(fs, [urls[i] for i in pending])
        for i, n in zip(pending, found):
            sizes[i] = n
    return urls, sizes


_SOURCE_KEYS = {"shards", "weight", "split", "num_samples", "name"}


def resolve_sources(spec: Any, split: str | Sequence[str] = "train", what: str = "data") -> list[Source]:
    """Turn any supported shard spec into a list of :class:`Source` (one per weighted part).

    ``split`` names the index to use when the spec is a directory (a sequence: first found).
    ``what`` names the config key in error messages.
    """
    if spec is None:
        raise ShardSpecError(f"{what}: no shard spec given")
    splits = [split] if isinstance(split, str) else list(split)
    fs = _Fs()

    def one(item: Any, idx: int) -> Source:
        if isinstance(item, (str, os.PathLike)):
            try:
                urls, sizes = _resolve_string(fs, os.fspath(item), splits)
            except ShardSpecError as e:
                raise ShardSpecError(f"{what}: {e}") from None
            except (ImportError, ValueError) as e:  # s3:// without s3fs, gs:// without gcsfs, unknown scheme
                raise ShardSpecError(
                    f"{what}: shard spec '{os.fspath(item)}': {e} (fsspec reads URLs; install its backend)"
                ) from e
            return Source(name=os.fspath(item), urls=urls, sizes=sizes)
        if isinstance(item, Mapping):
            unknown = set(item) - _SOURCE_KEYS
            if unknown or "shards" not in item:
                raise ShardSpecError(
                    f"{what}[{idx}]: a source dict needs 'shards' and may have {sorted(_SOURCE_KEYS - {'shards'})}; "
                    f"got keys {sorted(map(str, item))}"
                )
            sub_splits = [item["split"]] if item.get("split") else splits
            src = resolve_sources(item["shards"], sub_splits, what=f"{what}[{idx}].shards")
            urls = [u for s in src for u in s.urls]
            sizes = [n for s in src for n in s.sizes]
            weight = float(item.get("weight", 1.0))
            if not weight > 0:
                raise ShardSpecError(f"{what}[{idx}].weight must be > 0, got {item.get('weight')!r}")
            declared = item.get("num_samples")
            return Source(
                name=str(item.get("name") or src[0].name),
                urls=urls,
                weight=weight,
                sizes=sizes,
                declared_samples=int(declared) if declared is not None else None,
            )
        if isinstance(item, Sequence):
            parts = [one(x, i) for i, x in enumerate(item)]
            return Source(
                name=",".join(p.name for p in parts),
                urls=[u for p in parts for u in p.urls],
                sizes=[n for p in parts for n in p.sizes],
            )
        raise ShardSpecError(f"{what}: cannot read a shard spec of type {type(item).__name__}: {item!r}")

    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        if len(spec) == 0:
            raise ShardSpecError(f"{what}: empty list of shards")
        if any(isinstance(x, Mapping) for x in spec):
            return [one(x, i) for i, x in enumerate(spec)]
    return [one(spec, 0)]


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
    return stable_hash(f"k:{_dirname(url)}/{key}")


# ----------------------------------------------------------------------------------------------
# Reading shards


def open_shard(url: str) -> Any:
    """A binary stream for a shard URL: local/file://, pipe: and http(s) via webdataset, else fsspec."""
    try:
        if _is_local(url):
            return open(_local_path(url), "rb")
        if _uses_fsspec(url):
            return fsspec.open(url, "rb").open()
        return gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - re-raised with the shard named
        raise ShardReadError(f"shard '{url}': cannot open ({type(e).__name__}: {e})") from e


def _close(stream: Any, url: str) -> None:
    try:
        stream.close()
    except Exception as e:  # noqa: BLE001 - a pipe command's exit status; the data was read already
        log.warning("shard '%s': error on close (%s: %s)", url, type(e).__name__, e)


class TarFormatError(ValueError):
    """A tar stream that is not a tar archive (or breaks off mid-member)."""


_BLOCK = 512
_TAR_ERRORS = (TarFormatError, OSError, EOFError, zlib.error, lzma.LZMAError)  # bz2/gzip raise OSError
_REGULAR = (b"0", b"\0", b"7")
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}


def _number(field: bytes) -> int:
    """A tar header number: NUL/space terminated octal, or GNU base-256 for large values."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"bad number field {field!r} in a tar header") from None


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``"<len> <key>=<value>\\n"`` records of a pax extended header."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        if length <= 0:
            raise TarFormatError(f"bad pax record at offset {pos}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key] = value
        pos += length
    return out


class _Replay:
    """A read()-able stream that first returns ``head`` (bytes already read), then the rest."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out if len(out) == n else out + self.stream.read(n - len(out))


class TarMembers:
    """Streaming tar reader: yields the names of regular members; :meth:`read` gets the current one's bytes.

    Replaces ``tarfile``'s stream mode on the hot path: it parses only name, size and type (ustar,
    GNU long names, pax ``path``/``size``), checks each header's checksum, and skips members nobody
    reads without copying them out. gzip/bz2/xz-compressed tars are decompressed on the fly.
    Own code because it is measurably cheaper: ``scripts/bench_tar.py`` measures ~4x less CPU than
    ``tarfile`` and than webdataset's ``tar_file_expander`` (which reads through ``tarfile``).
    """

    def __init__(self, stream: Any) -> None:
        head = self._read(stream, _BLOCK, allow_short=True)
        if not head:
            raise TarFormatError("empty file")
        kind = next((k for magic, k in _COMPRESSED.items() if head.startswith(magic)), None)
        if kind is not None:
            import bz2
            import gzip

            raw = _Replay(head, stream)
            if kind == "gzip":
                stream = gzip.GzipFile(fileobj=raw)  # type: ignore[arg-type]
            else:
                stream = (bz2.BZ2File if kind == "bz2" else lzma.LZMAFile)(raw)  # type: ignore[arg-type]
            head = self._read(stream, _BLOCK, allow_short=True)
        if len(head) < _BLOCK or (any(head) and not self._checksum_ok(head)):
            raise TarFormatError("not a tar archive (first header block is invalid)")
        self.stream = stream
        self._head: bytes | None = head
        self._size = 0
        self._unread = False

    @staticmethod
    def _read(stream: Any, n: int, allow_short: bool = False) -> bytes:
        data = stream.read(n)
        if len(data) == n or not data:
            if not data and n and not allow_short:
                raise TarFormatError(f"unexpected end of data (wanted {n} more bytes)")
            return data
        parts, got = [data], len(data)
        while got < n:  # pipes and some remote files return short reads before the end
            more = stream.read(n - got)
            if not more:
                if allow_short:
                    break
                raise TarFormatError(f"unexpected end of data ({got} of {n} bytes)")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    @staticmethod
    def _checksum_ok(block: bytes) -> bool:
        try:
            stored = _number(block[148:156])
        except TarFormatError:
            return False
        unsigned = sum(block) - sum(block[148:156]) + 256
        if stored == unsigned:
            return True
        # some old writers summed signed bytes: each byte > 127 then counts 256 less
        signed = unsigned - 256 * (sum(b > 127 for b in block[:148]) + sum(b > 127 for b in block[156:]))
        return stored == signed

    def _skip(self, n: int) -> None:
        while n > 0:
            chunk = self._read(self.stream, min(n, 1 << 20))
            n -= len(chunk)

    def read(self) -> bytes:
        """Bytes of the member last yielded (once)."""
        if not self._unread:
            raise RuntimeError("TarMembers.read(): the current member was read already")
        self._unread = False
        data = self._read(self.stream, self._size) if self._size else b""
        self._skip(-self._size % _BLOCK)
        return data

    def __iter__(self) -> Iterator[str]:
        long_name: bytes | None = None
        pax: dict[bytes, bytes] = {}
        while True:
            if self._unread:  # the caller did not want the last member: skip its data
                self._unread = False
                self._skip(self._size + (-self._size % _BLOCK))
            block, self._head = (self._head, None) if self._head is not None else (
                self._read(self.stream, _BLOCK, allow_short=True), None)
            if not block or not any(block):
                return  # end of archive (zero block), or a tar without its end blocks
            if len(block) < _BLOCK:
                raise TarFormatError("truncated header")
            if not self._checksum_ok(block):
                raise TarFormatError("bad header checksum")
            kind = block[156:157]
            size = _number(block[124:136])
            if kind in (b"x", b"g", b"L", b"K"):
                data = self._read(self.stream, size) if size else b""
                self._skip(-size % _BLOCK)
                if kind == b"x":
                    pax = _pax_records(data)
                elif kind == b"L":
                    long_name = data.split(b"\0", 1)[0]
                continue
            if b"size" in pax:
                try:
                    size = int(pax[b"size"])
                except ValueError:
                    raise TarFormatError(f"bad pax size {pax[b'size']!r}") from None
            if b"path" in pax:
                raw = pax[b"path"]
            elif long_name is not None:
                raw = long_name
            else:
                raw = block[0:100].split(b"\0", 1)[0]
                if block[257:263] == b"ustar\x00" and block[345] != 0:  # POSIX ustar prefix field
                    raw = block[345:500].split(b"\0", 1)[0] + b"/" + raw
            long_name, pax = None, {}
            self._size, self._unread = size, True
            if kind in _REGULAR:
                yield raw.decode("utf-8", "surrogateescape")


def iter_shard(url: str, take: tuple[int, int] = (1, 0)) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard: ``{"__key__", "__url__", "__index__", <ext>: bytes}``.

    ``take=(m, r)`` keeps only samples whose index in the shard is ``r`` modulo ``m``: readers
    sharing a shard split it without decoding each other's samples.
    """
    mod, rem = take
    stream = open_shard(url)
    try:
        try:
            tar = TarMembers(stream)
        except _TAR_ERRORS as e:
            raise ShardReadError(
                f"shard '{url}': not a readable tar archive ({type(e).__name__}: {e}); "
                "check the path / pipe command, or re-write the shard"
            ) from e
        current: dict[str, Any] | None = None
        owned = False
        index = -1
        try:
            for name in tar:
                if _META_MEMBER.match(name):
                    continue
                key, ext = base_plus_ext(name)
                if key is None:
                    continue
                if current is None or key != current["__key__"]:
                    if current is not None and owned:
                        yield current
                    index += 1
                    owned = index % mod == rem
                    current = {"__key__": key, "__url__": url, "__index__": index}
                if owned:
                    ext = ext.lower()
                    if ext in current:
                        raise ShardFormatError(
                            f"shard '{url}' sample '{key}': duplicate member '{name}'; "
                            "each sample's files must be unique and adjacent in the tar"
                        )
                    current[ext] = tar.read()
            if current is not None and owned:
                yield current
        except _TAR_ERRORS as e:
            log.warning(
                "shard '%s': tar stream broke off after %d samples (%s: %s); rest of the shard skipped",
                url, max(index, 0), type(e).__name__, e,
            )
    finally:
        _close(stream, url)


def partition(urls: Sequence[str], reader: int, n_readers: int) -> list[tuple[str, tuple[int, int]]]:
    """Shards (with sample-modulo ``take``) for one of ``n_readers`` readers; exact cover, no overlap.

    With at least as many shards as readers, reader r gets shards r, r+n, r+2n, ...; with fewer,
    readers r, r+S, r+2S, ... share shard r % S and split it by sample index modulo their count.
    """
    n_shards = len(urls)
    if n_shards >= n_readers:
        return [(urls[i], (1, 0)) for i in range(reader, n_shards, n_readers)]
    shard = reader % n_shards
    sharers = len(range(shard, n_readers, n_shards))
    return [(urls[shard], (sharers, reader // n_shards))]


# ----------------------------------------------------------------------------------------------
# Decoding samples


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def seeded_transform(transform: Transform, img: Image.Image, seed: int | None) -> torch.Tensor:
    """``transform(img)`` with torch's RNG (what torchvision's random augmentations draw from) seeded
    by ``seed`` and restored afterwards: a sample's augmentation depends on its place in the stream,
    not on what the process did before, so a resumed stream augments exactly as the original."""
    if seed is None:
        return transform(img)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(img)


def _as_list(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else []
    return [c.strip() for c in items if isinstance(c, str) and c.strip()]


def _filter_lang(by_lang: Mapping[str, Any], langs: tuple[str, ...] | None) -> list[str]:
    order = list(by_lang) if langs is None else [lang for lang in langs if lang in by_lang]
    return [c for lang in order for c in _as_list(by_lang[lang])]


# Why a sample was left out. Every loader batch carries ``skipped``: a LongTensor with one count per
# reason (this order) of the samples its worker dropped since its previous batch, so a consumer that
# sums the batches it receives counts every skip exactly once.
SKIP_REASONS = ("decode_error", "empty_caption", "missing_caption", "missing_image", "caption_lang")
_SKIP_HELP = {
    "decode_error": "image, json or txt failed to decode",
    "empty_caption": "caption fields present but empty",
    "missing_caption": "no caption: neither a .txt nor json 'captions'",
    "missing_image": "no image member",
    "caption_lang": "captions only in languages outside data.caption_lang",
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
    accepted: int = 0
    skipped: Counter = field(default_factory=Counter)
    pending: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    example: dict = field(default_factory=dict)

    def take_pending(self) -> torch.Tensor:
        t, self.pending = skipped_tensor(self.pending), Counter()
        return t


class SampleDecoder:
    """Raw tar sample -> decoded sample dict; skips and counts samples that cannot be used.

    With ``strict=True`` a sample without an image member or without any caption field raises
    :class:`ShardFormatError` (the data needs fixing) instead of being skipped and counted.
    """

    def __init__(
        self,
        transform: Transform,
        caption_lang: str | Sequence[str] | None = "any",
        group_field: str = "group",
        max_negatives: int = 0,
        warn_first: int = 5,
        warn_every: int = 100,
        strict: bool = False,
    ) -> None:
        self.transform = transform
        self.caption_lang = caption_lang
        self.langs = parse_caption_lang(caption_lang)
        self.group_field = group_field
        self.max_negatives = max_negatives
        self.warn_first = warn_first
        self.warn_every = warn_every
        self.strict = strict
        self.stats = _Stats()

    def reset(self) -> None:
        self.stats = _Stats()

    def _skip(self, raw: dict[str, Any], reason: str, what: str = "", detail: str = "") -> None:
        st = self.stats
        st.skipped[reason] += 1
        st.pending[reason] += 1
        st.example.setdefault(reason, f"shard '{raw['__url__']}' sample '{raw['__key__']}'")
        n = sum(st.skipped.values())
        if reason != "caption_lang" and (n <= self.warn_first or n % self.warn_every == 0):
            more = f"; further warnings every {self.warn_every}th" if n == self.warn_first else ""
            log.warning("shard '%s' sample '%s': %s (%s: skipped, %d so far%s%s)", raw["__url__"], raw["__key__"],
                        what or _SKIP_HELP[reason], reason, n, f"; {detail}" if detail else "", more)
        if st.accepted == 0 and st.read >= _HOPELESS_AFTER:
            if reason == "caption_lang":
                raise ValueError(
                    f"caption_lang={self.caption_lang!r} matched no caption in the first {st.read} samples; "
                    f"languages seen: {dict(st.languages)}; set data.caption_lang to one of them or 'any'"
                )
            raise ValueError(f"the first {st.read} samples were all skipped ({describe_skips(skip_counts(st.skipped))}); "
                             f"e.g. {st.example.get(reason)}: check the shards")

    def _format_error(self, raw: dict[str, Any], problem: str) -> ShardFormatError:
        present = sorted(k for k in raw if not k.startswith("__"))
        return ShardFormatError(
            f"shard '{raw['__url__']}' sample '{raw['__key__']}': {problem} (members present: {present}); "
            "write shards with cliptune's shard writer or rename the members (data.strict=true makes this an error; "
            "the default skips and counts such samples)"
        )

    def _missing(self, raw: dict[str, Any], reason: str) -> None:
        if self.strict:
            raise self._format_error(raw, _SKIP_HELP[reason])
        self._skip(raw, reason)

    def _parse(self, raw: dict[str, Any], rng: random.Random | None) -> tuple[dict, list[str], list[str], str] | None:
        """(meta, captions, negatives, image ext) or None when skipped."""
        st = self.stats
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
            except (ValueError, UnicodeDecodeError) as e:
                return self._skip(raw, "decode_error", "json failed to parse", f"{type(e).__name__}: {str(e)[:120]}")
        by_lang = meta.get("captions")
        if isinstance(by_lang, Mapping) and by_lang:
            st.languages.update(by_lang.keys())
            captions = _filter_lang(by_lang, self.langs)
            if not captions:
                return self._skip(raw, "caption_lang" if _filter_lang(by_lang, None) else "empty_caption")
        elif "txt" in raw:
            try:
                captions = _as_list(raw["txt"].decode("utf-8"))
            except UnicodeDecodeError as e:
                return self._skip(raw, "decode_error", "txt is not UTF-8", str(e)[:120])
            if not captions:
                return self._skip(raw, "empty_caption")
        else:
            return self._missing(raw, "missing_caption")
        negs: list[str] = []
        if self.max_negatives > 0 and isinstance(meta.get("neg"), Mapping):
            negs = _filter_lang(meta["neg"], self.langs)
            if len(negs) > self.max_negatives:
                negs = rng.sample(negs, self.max_negatives) if rng else negs[: self.max_negatives]
        return meta, captions, negs, ext

    def _image(self, raw: dict[str, Any], ext: str, seed: int | None = None) -> torch.Tensor | None:
        try:
            img = decode_image(raw[ext])
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken data
            return self._skip(raw, "decode_error", "image failed to decode", f"{type(e).__name__}: {str(e)[:120]}")
        return seeded_transform(self.transform, img, seed)

    def train_sample(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any] | None:
        """``rng`` draws the augmentation seed, caption and negatives: seed it per sample for a
        replayable stream."""
        aug_seed = rng.getrandbits(63)
        parsed = self._parse(raw, rng)
        if parsed is None:
            return None
        meta, captions, negs, ext = parsed
        image = self._image(raw, ext, aug_seed)  # decoded last: caption-less samples cost no decode
        if image is None:
            return None
        self.stats.accepted += 1
        return {
            "image": image,
            "text": rng.choice(captions),
            "group": group_id(meta, self.group_field, raw["__key__"], raw["__url__"]),
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


# ----------------------------------------------------------------------------------------------
# Datasets


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _EpochReport:
    """Shared per-worker counters so one worker can log an epoch summary for its rank.

    A shared-memory tensor (not multiprocessing.Value) so the dataset pickles anywhere.
    Columns: read, accepted, one per skip reason, done.
    """

    def __init__(self, num_workers: int) -> None:
        self.table = torch.zeros(max(1, num_workers), 3 + len(SKIP_REASONS), dtype=torch.int64).share_memory_()

    def reset(self) -> None:
        self.table.zero_()

    def finish(self, worker: int, st: _Stats) -> bool:
        """Store this worker's counts; True for the worker that completes the table."""
        if worker >= len(self.table):
            return False
        self.table[worker, :-1] = torch.tensor([st.read, st.accepted, *skipped_tensor(st.skipped).tolist()])
        self.table[worker, -1] = 1
        return bool(self.table[:, -1].all())

    def totals(self) -> dict[str, int]:
        row = self.table.sum(0).tolist()
        return {"read": row[0], "accepted": row[1], **dict(zip(SKIP_REASONS, row[2:-1]))}


class _WdsBase(IterableDataset):
    def __init__(
        self,
        sources: list[Source],
        decoder: SampleDecoder,
        tokenizer: Tokenizer,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        name: str,
    ) -> None:
        super().__init__()
        if tokenizer is None:
            raise ValueError(f"{name}: a tokenizer is needed (the model's tokenizer, list[str] -> LongTensor)")
        if decoder.transform is None:
            raise ValueError(f"{name}: an image transform is needed (the model's preprocess)")
        self.sources = sources
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.name = name
        self.report = _EpochReport(num_workers)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def begin_epoch(self, epoch: int) -> None:
        """Called by the loader in the main process before workers start iterating."""
        self._epoch[0] = epoch
        self.report.reset()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def _summary(self, worker: int) -> None:
        if not self.report.finish(worker, self.decoder.stats) or self.rank != 0:
            return
        t = self.report.totals()
        skips = {r: t[r] for r in SKIP_REASONS}
        if any(skips.values()):
            self._log_summary(t, skips)

    def _log_summary(self, t: dict[str, int], skips: dict[str, int]) -> None:
        raise NotImplementedError


class WdsTrainDataset(_WdsBase):
    """Infinite shuffled stream per worker, cut to a fixed number of batches per rank per epoch.

    Every rank yields exactly ``batches_per_rank`` batches (spread over its workers), whatever
    the shard count, so DDP ranks run the same number of steps.

    Exact resume: each batch carries ``data_pos = [worker, batches made, raw samples read]`` of the
    (logical) worker that made it, in the worker's epoch stream. The stream (shard order or draws,
    mixing, shuffle buffer) depends only on (seed, epoch, rank, worker) and the caption drawn for a
    sample on its stream index, so a worker restarted with :meth:`resume_from` replays its stream up
    to the recorded position without decoding anything and continues with the very next sample.
    Batch ``j`` of a rank comes from worker ``j % workers`` (DataLoader round robin); after ``k``
    trained batches, physical worker ``p`` takes logical worker ``(p + k) % workers``'s place so the
    order continues unchanged.
    """

    def __init__(
        self,
        sources: list[Source],
        decoder: SampleDecoder,
        tokenizer: Tokenizer,
        batch_size: int,
        batches_per_rank: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        resampled: bool = True,
        shard_shuffle: bool = True,
        sample_shuffle: int = 1000,
        seed: int = 0,
        name: str = "train",
    ) -> None:
        super().__init__(sources, decoder, tokenizer, batch_size, rank, world_size, num_workers, name)
        self.batches_per_rank = batches_per_rank
        self.resampled = resampled
        self.shard_shuffle = shard_shuffle
        self.sample_shuffle = sample_shuffle
        self.seed = seed
        self.resume: dict | None = None

    def __len__(self) -> int:
        return self.batches_per_rank

    def resume_from(self, epoch: int, batches: int, positions: Mapping[int, Sequence[int]]) -> None:
        """Continue ``epoch`` after ``batches`` trained batches; ``positions[worker] = (made, raw)``
        for each logical worker that made any. Takes effect at the next iteration over that epoch."""
        self.resume = {"epoch": int(epoch), "batches": int(batches),
                       "positions": {int(w): (int(m), int(r)) for w, m_r in positions.items() for m, r in [m_r]}}

    def _resampled(self, src: Source, rng: random.Random) -> Iterator[dict]:
        empty = 0
        while True:
            url = rng.choice(src.urls)
            n = 0
            for raw in iter_shard(url):
                n += 1
                yield raw
            empty = 0 if n else empty + 1
            if empty > 2 * len(src.urls) + 10:
                raise ShardReadError(f"{self.name}: source '{src.name}': {empty} shards in a row had no samples")

    def _passes(self, src: Source, src_index: int, reader: int, n_readers: int) -> Iterator[dict]:
        # every reader derives the same shard order from (seed, epoch, pass), then takes its part
        for n_pass in range(10**12):
            urls = list(src.urls)
            if self.shard_shuffle:
                # seeded by the source's position, not its path: moving the data keeps the order
                random.Random(f"{self.seed}/{self.epoch}/{n_pass}/{src_index}").shuffle(urls)
            n = 0
            for url, take in partition(urls, reader, n_readers):
                for raw in iter_shard(url, take):
                    n += 1
                    yield raw
            if n == 0:
                raise ShardReadError(f"{self.name}: source '{src.name}': reader {reader} of {n_readers} got no samples")

    def _stream(self, worker: int, num_workers: int) -> tuple[Iterator[dict], list[Iterator[dict]]]:
        """The worker's raw sample stream for this epoch: a function of (seed, epoch, rank, worker)."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        reader, n_readers = self.rank * num_workers + worker, self.world_size * num_workers
        streams = [
            self._resampled(s, rng) if self.resampled else self._passes(s, i, reader, n_readers)
            for i, s in enumerate(self.sources)
        ]
        stream = streams[0] if len(streams) == 1 else _mix(streams, [s.weight for s in self.sources], rng)
        if self.sample_shuffle > 1:
            stream = _shuffle(stream, self.sample_shuffle, min(100, self.sample_shuffle), rng)
        return stream, streams

    def __iter__(self) -> Iterator[dict]:
        physical, num_workers = worker_info()
        worker, made, raw_index = physical, 0, 0
        resume = self.resume if self.resume is not None and self.resume["epoch"] == self.epoch else None
        if resume is not None:
            worker = (physical + resume["batches"]) % num_workers
            made, raw_index = resume["positions"].get(worker, (0, 0))
        quota = self.batches_per_rank // num_workers + (worker < self.batches_per_rank % num_workers)
        self.decoder.reset()
        if made >= quota:
            self._summary(physical)
            return
        stream, streams = self._stream(worker, num_workers)
        try:
            for _ in range(raw_index):  # replay up to the resume point: read, never decoded
                next(stream)
            samples = []
            for raw in stream:
                raw_index += 1
                # the caption draw depends only on the sample's place in the stream (replayable)
                rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{raw_index}")
                sample = self.decoder.train_sample(raw, rng)
                if sample is None:
                    continue
                samples.append(sample)
                if len(samples) == self.batch_size:
                    batch = collate_train(samples, self.tokenizer, self.decoder.max_negatives,
                                          self.decoder.stats.take_pending())
                    made += 1
                    batch["data_pos"] = torch.tensor([worker, made, raw_index], dtype=torch.long)
                    yield batch
                    samples = []
                    if made == quota:
                        break
        finally:
            for s in streams:
                s.close()
        self._summary(physical)

    def _log_summary(self, t: dict[str, int], skips: dict[str, int]) -> None:
        log.info("%s epoch %d, rank 0: %d samples read, %s", self.name, self.epoch, t["read"], describe_skips(skips))


def _mix(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Per-sample draw from infinite streams with probability proportional to ``weights``."""
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    while True:
        i = min(bisect.bisect_right(cum, rng.random() * total), len(streams) - 1)
        yield next(streams[i])


class WdsEvalDataset(_WdsBase):
    """Each sample exactly once across all ranks and workers, in shard order; no padding."""

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_info()
        self.decoder.reset()
        urls = [u for s in self.sources for u in s.urls]
        reader, n_readers = self.rank * num_workers + worker, self.world_size * num_workers
        samples: list[dict] = []
        for url, take in partition(urls, reader, n_readers):
            for raw in iter_shard(url, take):
                sample = self.decoder.eval_sample(raw)
                if sample is None:
                    continue
                # a full batch waits for the next good sample, so skips after it are still counted
                if len(samples) == self.batch_size:
                    yield collate_eval(samples, self.tokenizer, self.decoder.stats.take_pending())
                    samples = []
                samples.append(sample)
        if samples:
            yield collate_eval(samples, self.tokenizer, self.decoder.stats.take_pending())
        elif sum(self.decoder.stats.pending.values()):
            yield {"skipped": self.decoder.stats.take_pending()}  # skips after the last (or without any) batch
        self._summary(worker)

    def _log_summary(self, t: dict[str, int], skips: dict[str, int]) -> None:
        example = next(iter(self.decoder.stats.example.values()), "")
        log.warning(
            "%s: rank 0 left out samples of the %d it read (%s%s); metrics cover the rest. Other ranks read other "
            "samples and may skip more.", self.name, t["read"], describe_skips(skips),
            f"; e.g. {example}" if example else "",
        )


# ----------------------------------------------------------------------------------------------
# Loaders


class WdsLoader(DataLoader):
    """DataLoader over a Wds dataset (batches made in the workers) that tells it the epoch.

    ``epoch_fn`` (e.g. ``lambda: trainer.current_epoch``) keeps shuffling in step with a resumed
    run; without it the loader counts its own iterations.
    """

    def __init__(
        self,
        dataset: _WdsBase,
        workers: int,
        epoch_fn: Callable[[], int | None] | None = None,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            persistent_workers=persistent_workers and workers > 0,
            pin_memory=pin_memory,
            prefetch_factor=(prefetch_factor or 2) if workers > 0 else None,
        )
        self.epoch_fn = epoch_fn
        self._n_iter = 0

    def __iter__(self):  # noqa: ANN204 - returns torch's private iterator type
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        self.dataset.begin_epoch(self._n_iter if epoch is None else epoch)  # type: ignore[attr-defined]
        self._n_iter += 1
        return super().__iter__()


def _need_model_parts(tokenizer: Tokenizer | None, transform: Transform | None, what: str) -> None:
    missing = [n for n, v in (("tokenizer", tokenizer), ("image transform", transform)) if v is None]
    if missing:
        raise ValueError(
            f"{what}: no {' and no '.join(missing)} given; the loader needs the model's (ModelBundle.tokenizer, "
            "preprocess_train / preprocess_val), which cliptune.train.cli.build_datamodule passes"
        )


def make_train_loader(
    spec: Any,
    batch_size: int,
    tokenizer: Tokenizer,
    transform: Transform,
    workers: int = 2,
    samples_per_epoch: int | None = None,
    resampled: bool = True,
    shard_shuffle: bool = True,
    sample_shuffle: int = 1000,
    caption_lang: str | Sequence[str] = "any",
    group_field: str = "group",
    max_negatives: int = 0,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    epoch_fn: Callable[[], int | None] | None = None,
    persistent_workers: bool = True,
    pin_memory: bool = False,
    what: str = "data.train",
    strict: bool = False,
) -> WdsLoader:
    """Training loader: ``samples_per_epoch // (batch_size * world_size)`` batches on every rank.

    ``samples_per_epoch`` is global (all ranks); by default the sample count of the index.
    """
    _need_model_parts(tokenizer, transform, what)
    rank = runtime.rank(launcher=False) if rank is None else rank  # the process group's, else 0
    world_size = runtime.world_size(launcher=False) if world_size is None else world_size
    sources = resolve_sources(spec, "train", what=what)
    if samples_per_epoch is None:
        counts = [s.num_samples for s in sources]
        if any(n is None for n in counts):
            unknown = [s.name for s, n in zip(sources, counts) if n is None]
            raise ShardSpecError(
                f"{what}: cannot infer samples_per_epoch, no index json gives sample counts for {unknown}; "
                "set data.samples_per_epoch (or num_samples in the source dict)"
            )
        samples_per_epoch = int(sum(counts))  # type: ignore[arg-type]
    batches_per_rank = samples_per_epoch // (batch_size * world_size)
    if batches_per_rank < 1:
        raise ValueError(
            f"{what}: samples_per_epoch={samples_per_epoch} is less than one batch per rank "
            f"(batch_size={batch_size} x world_size={world_size}); lower the batch size or raise samples_per_epoch"
        )
    n_shards, n_readers = sum(len(s.urls) for s in sources), world_size * max(1, workers)
    if rank == 0:
        if n_shards < n_readers:
            log.warning(
                "%s: %d shards for %d readers (%d ranks x %d workers): %s. Write more, smaller shards "
                "(at least one per reader) for better mixing.", what, n_shards, n_readers, world_size,
                max(1, workers), "readers draw shards at random and overlap within an epoch" if resampled
                else "readers share shards and split them by sample index",
            )
        log.info(
            "%s: %d shards in %d source(s), %d samples per epoch -> %d batches of %d per rank (%d ranks)",
            what, n_shards, len(sources), samples_per_epoch, batches_per_rank, batch_size, world_size,
        )
    decoder = SampleDecoder(transform, caption_lang, group_field, max_negatives, strict=strict)
    dataset = WdsTrainDataset(
        sources, decoder, tokenizer, batch_size, batches_per_rank, rank=rank, world_size=world_size,
        num_workers=workers, resampled=resampled, shard_shuffle=shard_shuffle, sample_shuffle=sample_shuffle,
        seed=seed, name=what,
    )
    return WdsLoader(dataset, workers, epoch_fn=epoch_fn, persistent_workers=persistent_workers, pin_memory=pin_memory)


def make_eval_loader(
    spec: Any,
    batch_size: int,
    workers: int,
    tokenizer: Tokenizer,
    transform: Transform,
    caption_lang: str | Sequence[str] = "any",
    rank: int | None = None,
    world_size: int | None = None,
    name: str = "val",
    pin_memory: bool = False,
    strict: bool = False,
) -> WdsLoader:
    """Eval loader: every sample exactly once across ranks and workers; batches of unequal count.

    Ranks may get different numbers of batches: per-step code must not run collectives (gather
    metrics once at epoch end). ``rank``/``world_size`` default to torch.distributed, else 0/1.
    """
    _need_model_parts(tokenizer, transform, name)
    rank = runtime.rank(launcher=False) if rank is None else rank  # the process group's, else 0
    world_size = runtime.world_size(launcher=False) if world_size is None else world_size
    sources = resolve_sources(spec, ("val", "test", "validation"), what=name)
    n_shards, n_readers = sum(len(s.urls) for s in sources), world_size * max(1, workers)
    if rank == 0 and n_shards < n_readers:
        log.info(
            "%s: %d shards for %d readers (%d ranks x %d workers): readers share shards and split "
            "them by sample index (each reads its whole shard)", name, n_shards, n_readers, world_size, max(1, workers),
        )
    decoder = SampleDecoder(transform, caption_lang, "group", 0, strict=strict)
    dataset = WdsEvalDataset(sources, decoder, tokenizer, batch_size, rank, world_size, workers, name)
    return WdsLoader(dataset, workers, persistent_workers=False, pin_memory=pin_memory)
