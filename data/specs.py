"""Shard specs -> :class:`Source` lists: which shard URLs a loader reads, with their sample counts.

Shard-spec forms (strings may be joined with ``::``, webdataset style):

- ``"/data/out/train-{000000..000127}.tar"``  brace pattern; local, ``file://``, fsspec URLs
  (``s3://``, ``gs://``, ``memory://`` ...) and ``https://`` (read with curl, as webdataset does)
- ``"/data/out/train-*.tar"``  glob (local and fsspec file systems)
- ``"/data/out"``  a directory: its ``<split>.json`` index when present, else its ``.tar`` files
- ``"/data/out/train.json"``  the index written by cliptune's shard writer
- ``"pipe:aws s3 cp s3://bucket/train-{0..9}.tar -"``  a shell command whose stdout is a tar: it runs
  as written, so it is taken only from the user's own spec, never from an index file
- ``["a.tar", "b.tar"]``  explicit list (one source)
- ``{"shards": ..., "weight": 2, "split": "train", "num_samples": 1000}``  one source, options
- ``[{"shards": ..., "weight": 2}, {"shards": ..., "weight": 1}]``  weighted mixture: ``weight`` is
  the relative share of training samples drawn from each source

Sample counts come from the ``<split>.json`` index next to the shards (or open_clip's
``sizes.json``); they set the default epoch length.

Error policy: a spec that matches nothing (or names shards that do not exist) raises
:class:`ShardSpecError`.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
import fsspec


class ShardSpecError(ValueError):
    """A shard spec that cannot be resolved to shards."""


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


def is_local(url: str) -> bool:
    return _scheme(url) in ("", "file")


def local_path(url: str) -> str:
    return url2pathname(urlparse(url).path) if _scheme(url) == "file" else os.path.expanduser(url)


def uses_fsspec(url: str) -> bool:
    return _scheme(url) not in ("", "file", "pipe", "http", "https")


def url_dirname(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url else "."


def url_join(base: str, name: str) -> str:
    if is_local(base) and _scheme(base) == "":
        return os.path.join(base, name)
    return base.rstrip("/") + "/" + name


class UrlFs:
    """Existence / listing / reading for local paths, file:// and fsspec URLs (cached)."""

    def __init__(self) -> None:
        self._listing: dict[str, set[str] | None] = {}

    def isdir(self, url: str) -> bool:
        if is_local(url):
            return os.path.isdir(local_path(url))
        if uses_fsspec(url):
            fs, path = fsspec.core.url_to_fs(url)
            return bool(fs.isdir(path))
        return False

    def exists(self, url: str) -> bool:
        if is_local(url):
            return os.path.exists(local_path(url))
        if uses_fsspec(url):
            # list each parent once: one request per directory, not per shard
            parent = url_dirname(url)
            if parent not in self._listing:
                fs, path = fsspec.core.url_to_fs(parent)
                try:
                    self._listing[parent] = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
                except (FileNotFoundError, NotADirectoryError):
                    self._listing[parent] = set()
            return url.rstrip("/").rsplit("/", 1)[-1] in self._listing[parent]  # type: ignore[operator]
        return True  # http(s): nothing cheap to check; a failure shows up when the shard is opened

    def glob(self, url: str) -> list[str]:
        if is_local(url):
            hits = sorted(glob.glob(local_path(url)))
            return [("file://" + h) if _scheme(url) == "file" else h for h in hits]
        if uses_fsspec(url):
            fs, path = fsspec.core.url_to_fs(url)
            return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))
        raise ShardSpecError(f"shard spec '{url}': glob patterns need a local path or an fsspec URL")

    def read_json(self, url: str) -> Any:
        if is_local(url):
            with open(local_path(url), encoding="utf-8") as f:
                return json.load(f)
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            return json.load(f)


def _read_index(fs: UrlFs, index_url: str) -> tuple[list[str], list[int | None]]:
    """Shard URLs and sample counts from a cliptune ``<split>.json`` index."""
    try:
        index = fs.read_json(index_url)
        entries = index["shards"]
        urls = [url_join(url_dirname(index_url), e["name"]) for e in entries]
        sizes = [int(e["num_samples"]) if e.get("num_samples") is not None else None for e in entries]
    except (KeyError, TypeError, ValueError) as e:
        raise ShardSpecError(
            f"index '{index_url}' is not a cliptune shard index (expected "
            f'{{"shards": [{{"name": ..., "num_samples": ...}}, ...]}}): {e!r}'
        ) from e
    if not urls:
        raise ShardSpecError(f"index '{index_url}' lists no shards")
    for e in entries:
        _check_index_name(index_url, e["name"])
    return urls, sizes


def _check_index_name(index_url: str, name: Any) -> None:
    """An index lists shard files beside it. A ``pipe:`` name would run a shell command, and a URL, an
    absolute path or ``..`` would read another place: a file never chooses either (``pipe:`` specs come
    from the user's command line or config only)."""
    text = str(name)
    if text.startswith("pipe:"):
        raise ShardSpecError(f"index '{index_url}': shard name {text!r} is a shell command (pipe:); an index lists "
                             "shard files, and cliptune runs no command a file names: give pipe: specs on the "
                             "command line or in your own config")
    if not isinstance(name, str) or not text or _scheme(text) or os.path.isabs(text) or ".." in text.split("/"):
        raise ShardSpecError(f"index '{index_url}': shard name {text!r} is not a file beside the index (a URL, "
                             "an absolute path or '..'); an index does not choose where shards are read from: "
                             "name that place in the shard spec instead")


def _sizes_from_neighbours(fs: UrlFs, urls: list[str]) -> list[int | None]:
    """Per-shard sample counts from ``<prefix>.json`` indexes or ``sizes.json`` next to shards."""
    cache: dict[str, dict[str, int]] = {}
    sizes: list[int | None] = []
    for url in urls:
        if not (is_local(url) or uses_fsspec(url)):
            sizes.append(None)
            continue
        parent, base = url_dirname(url), url.rstrip("/").rsplit("/", 1)[-1]
        prefix = base.rsplit("-", 1)[0] if "-" in base else None
        for candidate in ([f"{prefix}.json"] if prefix else []) + ["sizes.json"]:
            index_url = url_join(parent, candidate)
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


_WRITER_STATE_DIR = ".cliptune-shards"  # cliptune.data.writer.STATE_DIR: the writer's done records


def _check_writer_finished(fs: UrlFs, url: str, split: str, spec: str) -> None:
    """Refuse a folder of cliptune-shards output whose ``<split>.json`` index is missing.

    The writer writes the index last, after every shard: shards beside its state folder without the
    index are a run that was killed or still runs, and reading them would silently miss the rest.
    Other tools' shards (no state folder) are read without an index as before.
    """
    if fs.exists(url_join(url, _WRITER_STATE_DIR)):
        raise ShardSpecError(
            f"shard spec '{spec}': directory '{url}' holds {split}-*.tar shards of cliptune-shards but no {split}.json "
            "index: the writer did not finish (killed, or still running); re-run the same cliptune-shards command "
            "to complete it (finished shards are kept)"
        )


def _resolve_dir(fs: UrlFs, url: str, splits: Sequence[str], spec: str) -> tuple[list[str], list[int | None]]:
    for split in splits:
        index_url = url_join(url, f"{split}.json")
        if fs.exists(index_url):
            return _read_index(fs, index_url)
    for split in splits:
        tars = fs.glob(url_join(url, f"{split}-*.tar"))
        if tars:
            _check_writer_finished(fs, url, split, spec)
            return tars, _sizes_from_neighbours(fs, tars)
    # Fallbacks for directories of other tools' shards. Files of another cliptune split are never
    # taken: a val set must not silently read the training shards (or the reverse).
    other = _KNOWN_SPLITS - set(splits)

    def foreign(u: str, sep: str) -> bool:
        return os.path.basename(u).split(sep)[0] in other

    indexes = [u for u in fs.glob(url_join(url, "*.json")) if not u.endswith("sizes.json") and not foreign(u, ".")]
    if len(indexes) == 1:
        return _read_index(fs, indexes[0])
    tars = [u for u in fs.glob(url_join(url, "*.tar")) if not foreign(u, "-")]
    if tars:
        return tars, _sizes_from_neighbours(fs, tars)
    present = sorted(s for s in other if fs.exists(url_join(url, f"{s}.json")) or fs.glob(url_join(url, f"{s}-*.tar")))
    if present:
        have, explicit = " and ".join(present), f"{{shards: {url}, split: {present[0]}}}"
        if "train" in splits:
            hint = (", an evaluation-only set (as cliptune-shards --split val writes): use it as data.val.<name> or "
                    "in cliptune-eval's sets and train on a folder with train shards, or train on these with "
                    f"{explicit}")
        else:
            hint = f": read them with {explicit}, or write an evaluation-only set with cliptune-shards --split val"
        raise ShardSpecError(f"shard spec '{spec}': directory '{url}' has no {' / '.join(f'{s}.json' for s in splits)} "
                             f"index or {splits[0]}-*.tar shards, only {have} shards{hint}")
    raise ShardSpecError(
        f"shard spec '{spec}': directory '{url}' has no {' / '.join(f'{s}.json' for s in splits)} "
        "index and no .tar shards; point at the shards (e.g. 'dir/train-{000000..000009}.tar'), "
        "the index json, or give the split: {shards: dir, split: name}"
    )


def _resolve_string(fs: UrlFs, spec: str, splits: Sequence[str]) -> tuple[list[str], list[int | None]]:
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
    fs = UrlFs()

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


def _local_string(spec: str) -> bool:
    """Every part of a spec string (``a::b``) is a local path or ``file://`` URL (no pipe:, no remote URL)."""
    spec = os.path.expandvars(spec)
    return not spec.startswith("pipe:") and all(is_local(part) for part in spec.split("::"))


def check_local_spec(spec: Any, split: str | Sequence[str] = "train", what: str = "data") -> None:
    """Resolve the local paths of a shard spec as the loader will, without reading a shard: raises
    :class:`ShardSpecError` (``what``: the config key, named in the message with the path) when one names
    nothing. Remote URLs (``s3://``, ``https://`` ...) and ``pipe:`` commands are not resolved here: that
    would need the network or run a command before the run starts, and the loader reports them itself.

    cliptune-train calls it (through `cliptune.validate.validate_paths`) before anything is written: a
    misspelt ``data.train`` stops at once instead of after the model is built and evaluated.
    """
    if spec is None:
        raise ShardSpecError(f"{what}: no shard spec given")
    splits = [split] if isinstance(split, str) else list(split)

    def strings(item: Any) -> list[str]:
        if isinstance(item, (str, os.PathLike)):
            return [os.fspath(item)]
        if isinstance(item, Mapping):
            return strings(item.get("shards"))
        if isinstance(item, Sequence):
            return [s for x in item for s in strings(x)]
        return []

    if all(_local_string(s) for s in strings(spec)):
        resolve_sources(spec, splits, what=what)  # the loader's own resolution: the same errors
        return

    def walk(item: Any, item_splits: list[str]) -> None:  # a mixture with remote parts: its local ones
        if isinstance(item, (str, os.PathLike)):
            if _local_string(os.fspath(item)):
                resolve_sources(os.fspath(item), item_splits, what=what)
        elif isinstance(item, Mapping):
            walk(item.get("shards"), [item["split"]] if item.get("split") else item_splits)
        elif isinstance(item, Sequence):
            for x in item:
                walk(x, item_splits)

    walk(spec, splits)
