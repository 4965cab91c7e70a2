"""The shard writer: records -> ``<split>-NNNNNN.tar`` shards and ``<split>.json`` indexes.

:func:`build_shards` reads an input (:mod:`cliptune.data.inputs`), splits it, encodes the images
in worker processes, and writes each shard atomically with a done record, so a rerun resumes; it
holds the output folder's lock and refuses to mix datasets. :class:`ShardSettings` holds its
options (``cliptune-shards`` builds them from its flags). The format and the guarantees are
described in :mod:`cliptune.data.shards`.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from cliptune.data.inputs import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_TEMPLATES,
    Fields,
    InputError,
    Record,
    RejectedFile,
    assign_splits,
    caption_fields_read,
    mark_duplicates,
    read_input,
    read_regular_file,
    split_key,
)
from cliptune.faults import fault_point
from cliptune.log import console as log_console  # `console` names the local table printer below
from cliptune.log import get_logger
from cliptune.rundir import RunDirBusyError, RunLock

log = get_logger(__name__)

SPLITS = ("train", "val")
IMAGE_FORMATS = ("jpg", "png", "webp", "original")
STATE_DIR = ".cliptune-shards"
MAX_EXAMPLES = 5
MAX_IMAGE_SIZE = 16384  # --image-size: far above any CLIP input; a larger value is a typo
MAX_WORKERS = 512  # --workers: more processes than any machine's cores is a typo
PLAN_FILE = "plan.json"  # in STATE_DIR: which dataset the shards in --out belong to
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SHARD_NAME = re.compile(r"^(train|val)-(\d{6})\.tar$")
# temp files of shards, done records and indexes; the pid is absent in names from older versions
_TEMP_NAME = re.compile(r"^\.(?:(?:train|val)-\d{6}\.tar(?:\.json)?|(?:train|val)\.json)(?:\.(\d+))?\.tmp$")


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


@dataclass(frozen=True)
class ShardSettings:
    """What :func:`build_shards` does with its input; ``cliptune-shards`` builds it from its flags (same names).

    Split: ``val_fraction`` of the ``group_key`` values go to val, each side chosen by a hash of
    (``seed``, key); ``split`` (``"train"`` or ``"val"``) sends every record to that split instead (``val``:
    an evaluation-only set, as ``val_fraction=1``). Images: ``image_size`` (shorter side, 0 keeps it),
    ``image_format``, ``quality``; image and caption files over ``max_image_bytes`` are skipped. Fields:
    ``*_col`` name the input's columns (``caption_col`` entries may be comma lists and ``col:lang``);
    ``lang`` is the language of captions given without one. Checked when built: a bad value raises
    ValueError naming it.
    """

    val_fraction: float = 0.0
    split: str | None = None
    group_key: str | None = None
    seed: int = 0
    image_size: int = 512
    image_format: str = "jpg"
    quality: int = 95
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    shard_size: int = 1000
    workers: int | None = None  # None: min(8, cpus)
    overwrite: bool = False
    progress: bool = True
    summary: bool = True
    input_format: str | None = None
    lang: str = "en"
    image_col: str | None = None
    caption_col: str | Sequence[str] | None = None
    label_col: str | None = None
    group_col: str | None = None
    neg_col: str | None = None
    sep: str | None = None
    templates: Sequence[str] | None = None  # None: DEFAULT_TEMPLATES
    labels_from_folders: bool | None = None
    image_root: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1] (1: everything to val), got {self.val_fraction}")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (every record to that split), got {self.split!r}")
        if self.split is not None and self.val_fraction > 0:
            raise ValueError(f"split={self.split!r} writes every record to {self.split}, so it excludes "
                             f"val_fraction={self.val_fraction} (--split and --val-fraction: give one of them)")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be >= 1, got {self.max_image_bytes}")
        if not 0 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size (--image-size) must be 0 (keep the size) to {MAX_IMAGE_SIZE} px, "
                             f"got {self.image_size}")
        if self.workers is not None and not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers (--workers) must be 1 to {MAX_WORKERS} processes, got {self.workers}")
        bad = [t for t in self.templates or () if "{c}" not in t]
        if bad:
            raise ValueError(f"templates must contain '{{c}}' (the class name): {bad}")

    @property
    def target(self) -> str | None:
        """The one split every record goes to, if any."""
        return self.split or ("val" if self.val_fraction >= 1 else None)

    def fields(self) -> Fields:
        """The input columns; names given here must exist, the defaults are optional."""
        explicit = {n for n, v in (("image", self.image_col), ("captions", self.caption_col), ("label", self.label_col),
                                   ("group", self.group_col), ("neg", self.neg_col)) if v}
        cols = [self.caption_col] if isinstance(self.caption_col, str) else list(self.caption_col or ["caption"])
        cols = [c.strip() for spec in cols for c in spec.split(",") if c.strip()]
        return Fields(image=self.image_col or "image", captions=cols, label=self.label_col or "label",
                      group=self.group_col or "group", neg=self.neg_col or "neg", explicit=frozenset(explicit))

    def encoding(self) -> EncodeOptions:
        return EncodeOptions(image_size=self.image_size, image_format=self.image_format, quality=self.quality,
                             lang=self.lang, max_image_bytes=self.max_image_bytes)


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


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add ``data`` as member ``name`` with fixed metadata, so the same input gives the same bytes."""
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
                add_member(tar, f"{key}.{ext}", data)
                add_member(tar, f"{key}.json", json.dumps(sample, ensure_ascii=False).encode("utf-8"))
                add_member(tar, f"{key}.txt", _primary_caption(rec.captions, task.enc.lang).encode("utf-8"))
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


def write_index(out: Path, split: str, shards: Sequence[Mapping[str, Any]], caption_counts: Mapping[str, int],
                num_groups: int, skipped: Mapping[str, Mapping[str, Any]], *, created_by: str, input: str,
                options: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out/<split>.json``, the index the reader takes a folder's shards and sample counts from; returns it.

    ``shards``: ``[{"name", "num_samples"}]`` in order; ``caption_counts``: captions per language;
    ``skipped``: ``{reason: {"count", "examples"}}``. Written beside its target and renamed (atomic): write
    it after the shards it names, so its presence means they are complete.
    """
    index: dict[str, Any] = {
        "split": split,
        "num_samples": sum(int(s["num_samples"]) for s in shards),
        "shards": [dict(s) for s in shards],
        "languages": sorted(caption_counts, key=lambda x: (-caption_counts[x], x)),
        "caption_counts": dict(sorted(caption_counts.items())),
        "num_groups": num_groups,
        "num_skipped": sum(int(v["count"]) for v in skipped.values()),
        "skipped": {k: dict(v) for k, v in sorted(skipped.items())},
        "input": input,
    }
    if options is not None:
        index["options"] = dict(options)
    index["created_by"] = created_by
    if info is not None:
        index["info"] = dict(info)
    _write_json(out / f"{split}.json", index)
    return index


def build_shards(
    input: str | os.PathLike | Sequence[Mapping[str, Any]],
    out: str | os.PathLike,
    settings: ShardSettings | None = None,
    *,
    info: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write ``out/<split>-NNNNNN.tar`` shards and ``out/<split>.json`` indexes; returns ``{split: index}``.

    ``input``: a CSV/TSV/JSONL/JSON/parquet file, an image folder, or a list of dicts (rows; the
    image may be bytes). ``settings``: see :class:`ShardSettings` (default: its defaults). ``info``
    is stored in each index as is (callers record their own provenance there). See :mod:`cliptune.data.shards`.

    Raises:
        InputError: the input cannot be read, names no sample, or its output folder is busy or holds another
            dataset; nothing was written (every sample skipped, with the reasons).
    """
    t0 = time.perf_counter()
    st = settings or ShardSettings()
    target = st.target
    templates = list(st.templates) if st.templates else list(DEFAULT_TEMPLATES)
    fields = st.fields()

    out_dir = Path(out)
    lock = _lock_out(out_dir)  # creates the folder; one writer at a time
    try:
        records, kind = read_input(input, fields, st.lang, st.sep, st.image_root, st.input_format,
                                   st.labels_from_folders, templates, skip_dir=out_dir.resolve(),
                                   max_file_bytes=st.max_image_bytes)
        if not records:
            raise InputError(f"{input if isinstance(input, (str, os.PathLike)) else 'records'}: no samples")
        duplicates = mark_duplicates(records)
        if duplicates:
            shown = "; ".join(r.problem[1] for r in duplicates[:5])  # type: ignore[index]
            log.warning("%s: %d duplicate rows (same image and captions as an earlier row) skipped: %s%s", input,
                        len(duplicates), shown, f" ... and {len(duplicates) - 5} more" if len(duplicates) > 5 else "")
        gkey = st.group_key or ("sample" if kind == "flyp" else "group")
        if gkey not in ("group", "label", "sample") and not any(gkey in r.meta for r in records):
            extra = sorted({k for r in records[:1000] for k in r.meta})
            raise InputError(f"--group-key '{gkey}' is not a column of {input}; use group, label, sample or "
                             f"one of {extra}")
        if target is not None:
            splits = [target] * len(records)
        else:
            splits = assign_splits([split_key(r, i, gkey) for i, r in enumerate(records)], st.val_fraction, st.seed)
        enc = st.encoding()
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
            for j in range(0, len(items), st.shard_size):
                chunk = items[j : j + st.shard_size]
                name = f"{name_split}-{j // st.shard_size:06d}.tar"
                tasks.append(_Task(str(out_dir), name_split, name, chunk, enc, _fingerprint(enc, chunk)))

        existing = _existing_output(out_dir)
        plan = _plan_fingerprint(tasks)
        if st.overwrite:
            _remove_output(out_dir, existing)
        elif existing and not _same_plan(out_dir, tasks, existing, plan):
            raise InputError(
                f"--out {out_dir} already holds shards of another dataset (or of other options): {len(existing)} "
                f"shard/index files such as {existing[0].name}; add --overwrite to replace them, or choose "
                "another --out"
            )
        (out_dir / STATE_DIR).mkdir(exist_ok=True)
        _write_json(out_dir / STATE_DIR / PLAN_FILE, {"fingerprint": plan, "input": str(input) if isinstance(
            input, (str, os.PathLike)) else "<records>", "shards": len(tasks)})
        _clean_stale(out_dir, {t.name for t in tasks})
        done_records: dict[str, dict] = {}
        for t in tasks:
            rec = None if st.overwrite else _finished(t)
            if rec is not None:
                done_records[t.name] = rec
        todo = [t for t in tasks if t.name not in done_records]
        reused = len(done_records)
        if done_records:
            log.info("resuming in %s: %d of %d shards already written", out_dir, len(done_records), len(tasks))
        n_workers = st.workers if st.workers is not None else min(8, os.cpu_count() or 1)
        for rec in _run_tasks(todo, n_workers, st.progress, len(done_records), len(tasks)):
            done_records[rec["name"]] = rec

        options = {
            "input_kind": kind, "val_fraction": st.val_fraction, "split": target, "group_key": gkey, "seed": st.seed,
            "shard_size": st.shard_size, "image_size": st.image_size, "resize": "shorter side, never upscaled",
            "image_format": st.image_format, "quality": st.quality, "lang": st.lang,
            "max_image_bytes": st.max_image_bytes,
            "fields": {"image": fields.image, "captions": caption_fields_read(records) or fields.captions,
                       "label": fields.label, "group": fields.group, "neg": fields.neg},
            "templates": templates if kind == "flyp" else None,
        }
        # the splits that should get samples: a missing one is worth a warning
        expected = {target} if target else ({"train", "val"} if st.val_fraction > 0 else {"train"})
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
            fault_point("shards.index")
            indexes[name_split] = write_index(  # last: its presence means the split is complete
                out_dir, name_split, shards, langs, len(groups), skipped, created_by="cliptune-shards",
                input=str(input) if isinstance(input, (str, os.PathLike)) else "<records>", options=options, info=info)
        if st.summary:
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
