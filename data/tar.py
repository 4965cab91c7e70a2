"""Reading shards: open a shard URL, stream its tar members, group them into raw samples.

:func:`iter_shard` yields ``{"__key__", "__url__", "__index__", <ext>: bytes}`` per sample;
:func:`partition` splits a shard list (or one shard, by sample index) between readers.

Error policy: a shard that cannot be opened, or is not a tar archive, raises
:class:`ShardReadError`. Nothing a shard holds makes the reader fail otherwise or read without
bound: a member larger than ``max_member_bytes`` (:data:`DEFAULT_MAX_MEMBER_BYTES`; a ``.gz``
member counts decompressed) is never read into memory, and its sample is skipped
(``member_too_large``); a sample with two members of one extension is skipped
(``duplicate_member``); a tar that breaks off mid-way (a cut file, a damaged header, a header
declaring more bytes than there are) loses the rest of that shard, and those samples are counted
(``truncated``: the number the index promised, else at least the one in progress). With
``report_skips=True`` each such loss is yielded as a marker sample carrying ``__skip__`` (the
reason), ``__count__`` and ``__detail__``, which :class:`cliptune.data.decode.SampleDecoder`
counts; otherwise it is logged.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from cliptune.data.specs import is_local, local_path, uses_fsspec
from cliptune.log import get_logger

log = get_logger(__name__)

_META_MEMBER = re.compile(r"__[^/]*__($|/)")


class ShardFormatError(ValueError):
    """A shard or sample that does not follow the shard format (fix the data, not a skip)."""


class ShardReadError(OSError):
    """A shard that cannot be opened or is not a tar archive."""


# Largest member the reader takes into memory (a .gz member: decompressed). Far above any image or
# caption a CLIP model trains on; it bounds what one hostile header (a base-256 size of 2**62, a
# gzip bomb) can make the reader allocate.
DEFAULT_MAX_MEMBER_BYTES = 256 << 20
# pax and GNU long-name headers are read whole: real ones are a few hundred bytes
_MAX_HEADER_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------
# Reading shards


def open_shard(url: str) -> Any:
    """A binary stream for a shard URL: local/file://, pipe: and http(s) via webdataset, else fsspec."""
    try:
        if is_local(url):
            return open(local_path(url), "rb")
        if uses_fsspec(url):
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

    @property
    def size(self) -> int:
        """Size in bytes (as its header declares) of the member last yielded: check it before :meth:`read`."""
        return self._size

    def read(self) -> bytes:
        """Bytes of the member last yielded (once); the caller bounds :attr:`size` first."""
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
            if not block:
                # every tar writer ends an archive with zero blocks: a stream that stops at a member
                # boundary without them was cut there, and whatever followed is lost
                raise TarFormatError("the archive ends without its end-of-archive blocks (the file was cut)")
            if not any(block):
                return  # the end-of-archive zero block
            if len(block) < _BLOCK:
                raise TarFormatError("truncated header")
            if not self._checksum_ok(block):
                raise TarFormatError("bad header checksum")
            kind = block[156:157]
            size = _number(block[124:136])
            if kind in (b"x", b"g", b"L", b"K"):
                if size > _MAX_HEADER_BYTES:
                    raise TarFormatError(f"a {kind.decode('latin-1')!r} header declares {size} bytes "
                                         f"(real ones are far below {_MAX_HEADER_BYTES})")
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
                    raise TarFormatError(f"bad pax size {pax[b'size'][:40]!r}") from None
                if size < 0:
                    raise TarFormatError(f"negative pax size {size}")
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


def _gunzip(data: bytes, cap: int) -> bytes | None:
    """A gzip member's content, None when it is over ``cap`` bytes (a bomb is never expanded past cap + 1)."""
    d = zlib.decompressobj(wbits=31)
    out = d.decompress(data, cap + 1)
    if len(out) > cap:
        return None
    out += d.flush()
    if len(out) > cap:
        return None
    if not d.eof:
        raise zlib.error("incomplete gzip stream")
    return out


def _marker(sample: dict[str, Any], reason: str, count: int, detail: str) -> dict[str, Any]:
    return {"__key__": sample["__key__"], "__url__": sample["__url__"], "__index__": sample["__index__"],
            "__skip__": reason, "__count__": count, "__detail__": detail}


def iter_shard(url: str, take: tuple[int, int] = (1, 0), expected: int | None = None,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
               report_skips: bool = False) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard: ``{"__key__", "__url__", "__index__", <ext>: bytes}``.

    ``take=(m, r)`` keeps only samples whose index in the shard is ``r`` modulo ``m``: readers
    sharing a shard split it without decoding each other's samples. ``expected`` (the index's
    sample count) says how many samples a shard that breaks off has lost. Samples that cannot be
    read whole (see the module doc) are yielded as ``__skip__`` markers with ``report_skips``,
    else logged and left out.
    """
    mod, rem = take
    if max_member_bytes < 1:
        raise ValueError(f"max_member_bytes must be >= 1, got {max_member_bytes}")
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

        def finish(sample: dict[str, Any]) -> dict[str, Any] | None:
            problem = sample.pop("__problem__", None)
            if problem is None:
                return sample
            marker = _marker(sample, problem[0], 1, problem[1])
            if report_skips:
                return marker
            log.warning("shard '%s' sample '%s': %s (%s: skipped)", url, sample["__key__"], problem[1], problem[0])
            return None

        try:
            for name in tar:
                if _META_MEMBER.match(name):
                    continue
                key, ext = base_plus_ext(name)
                if key is None:
                    continue
                if current is None or key != current["__key__"]:
                    if current is not None and owned:
                        done = finish(current)
                        if done is not None:
                            yield done
                    index += 1
                    owned = index % mod == rem
                    current = {"__key__": key, "__url__": url, "__index__": index}
                if not owned or "__problem__" in current:
                    continue  # not this reader's sample, or already lost: its members are skipped unread
                ext = ext.lower()
                gz = ext.endswith(".gz")
                plain = ext[:-3] if gz else ext
                if plain in current:
                    current["__problem__"] = ("duplicate_member", f"duplicate member '{name}' (two '.{plain}' "
                                              "files in one sample; each sample's files must be unique)")
                    continue
                if tar.size > max_member_bytes:
                    current["__problem__"] = ("member_too_large", f"member '{name}' declares {tar.size} bytes, over "
                                              f"the reader's max_member_bytes={max_member_bytes}")
                    continue
                data = tar.read()
                if gz:
                    try:
                        unpacked = _gunzip(data, max_member_bytes)
                    except zlib.error as e:
                        current["__problem__"] = ("decode_error", f"member '{name}' is not valid gzip ({e})")
                        continue
                    if unpacked is None:
                        current["__problem__"] = ("member_too_large", f"member '{name}' decompresses to over the "
                                                  f"reader's max_member_bytes={max_member_bytes}")
                        continue
                    data = unpacked
                current[plain] = data
            if current is not None and owned:
                done = finish(current)
                if done is not None:
                    yield done
            if expected is not None and index + 1 < expected:  # whole archive, fewer samples than its index says
                lost = len(range(index + 1 + (rem - index - 1) % mod, expected, mod))
                detail = (f"the shard holds {index + 1} samples but its index says {expected}; "
                          f"{expected - index - 1} missing (re-write the shard or its index)")
                if report_skips and lost:
                    yield {"__key__": "", "__url__": url, "__index__": index + 1, "__skip__": "truncated",
                           "__count__": lost, "__detail__": detail}
                else:
                    log.warning("shard '%s': %s", url, detail)
        except _TAR_ERRORS as e:
            # the sample in progress is lost with the rest: its members may be incomplete
            first = index if current is not None else 0
            end = expected if expected is not None and expected > first else first + 1
            lost = len(range(first + (rem - first) % mod, end, mod))
            detail = (f"tar stream broke off at sample {first} ({type(e).__name__}: {e}); "
                      f"{end - first}{'' if expected is not None else ' or more'} samples of the shard lost")
            if report_skips and lost:
                yield {"__key__": current["__key__"] if current is not None else "", "__url__": url, "__index__": first,
                       "__skip__": "truncated", "__count__": lost, "__detail__": detail}
            else:
                log.warning("shard '%s': %s", url, detail)
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
