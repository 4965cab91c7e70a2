"""The run directory: every file a run writes or reads, by name, with its reader and writer.

:class:`RunDir` is the one place that knows the layout (README "What a run directory holds");
``cliptune-train`` writes through it, ``cliptune-eval`` writes ``results.json`` / ``per_query.pt``
through it, and ``cliptune-compare``, ``cliptune-eval load=<run>`` and ``cliptune-wiseft`` read
through it. Files are written atomically (a temporary file, then a rename), and every file read
with torch goes through :func:`load_torch_file` (``weights_only=True``: a file never runs code).

One run, one directory: :class:`RunLock` is an exclusive ``fcntl.flock`` on ``<run>/.lock``. The
lock is held by the open file, so the kernel releases it when the process ends in any way (SIGKILL
included): a killed run leaves no stale lock, and its directory can be resumed at once. The holder
writes its PID into the file so a refused run can say who holds it.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

from cliptune.faults import fault_point

LOCK_FILE = ".lock"


def load_torch_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: every file cliptune reads with torch goes through here.

    A file whose pickle holds anything but tensors, numbers, strings and plain containers (a class,
    a function, an object with ``__reduce__``) is refused with a ``ValueError`` naming it: loading
    it unrestricted would run whatever code it names. cliptune's own checkpoints hold only those
    types (hyperparameters are saved as plain dicts), so nothing is allow-listed.
    """
    import torch  # noqa: PLC0415 - the lock and the JSON files need no torch (fast CLI start)

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError) as e:  # torch names no file: a cut copy reads as "failed finding central directory"
        if isinstance(e, RuntimeError) and "PytorchStreamReader" not in str(e):
            raise  # not the file's bytes (a device mapping, say): torch's own words say it
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200] or "the file ends early"
        raise ValueError(f"{path}: not a whole torch file, truncated or corrupt ({reason}); copy it again, or use "
                         "another checkpoint of the run") from None
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain containers "
            f"({_refusal_reason(str(e))}); cliptune loads checkpoints with weights_only=True and never runs "
            "code from a file. Re-save it with torch.save(model.state_dict(), ...) from a trusted environment"
        ) from None  # torch's own message suggests weights_only=False, which is what we refuse to do


def _refusal_reason(msg: str) -> str:
    """The one informative line of torch's weights-only error (which global or opcode it hit)."""
    m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", msg)
    if m:
        return f"it references {m.group(1)}"
    m = re.search(r"Unsupported operand \S+", msg)
    if m:
        return f"pickle opcode outside weights_only: {m.group(0)}"
    skip = ("Weights only load failed", "Check the documentation", "(1)", "(2)", "Please file an issue")
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    return (lines[0] if lines else msg.strip())[:200]


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], Any],
                       before_rename: Callable[[], None] | None = None) -> Path:
    """``write(tmp)``, then rename ``tmp`` onto ``path``: a reader never sees half a file.

    ``tmp`` lies in ``path``'s own folder, so the rename is atomic (a temporary file in /tmp moved
    onto another filesystem is a copy, which a kill or a full disk cuts short). The bytes and the
    rename are flushed to the disk (``fsync``) before returning, so a power cut leaves the old file
    or the new one. On any failure (a full disk included) the temporary file is removed and the
    previous ``path`` is left as it was; a full disk is named as such.
    ``before_rename`` runs between the write and the rename (a fault point).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left on the disk of {path.parent} while writing {path.name} "
                          f"({os.strerror(e.errno)}); the previous {path.name}, if any, is kept: free space and "
                          "run again (resume=true continues a training run)") from None
        raise
    _fsync(path.parent)
    return path


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk; folders that cannot be opened are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


BEFORE_PREFIX = "before:"  # per-query file: "before:<set>" holds that set's hits before fine-tuning


def save_per_query(path: str | os.PathLike, per_query: dict[str, dict[str, Any]],
                   before: dict[str, dict[str, Any]] | None = None) -> Path:
    """Save ``{set: {metric: [n] tensor/array}}`` (optionally ``"keys"``: the image keys) as ``.pt``,
    or as ``.npz`` with one array per ``"<set>/<metric>"``.

    ``before``, the same for the evaluation before fine-tuning, is stored beside it under
    ``"before:<set>"`` (a name no Hydra key can take): ``per_query`` stays at the top level, as
    cliptune-eval writes it and as files written before ``before`` was kept hold it.
    """
    import numpy as np  # noqa: PLC0415 - see load_torch_file
    import torch  # noqa: PLC0415 - see load_torch_file

    path = Path(path)
    clash = [s for s in per_query if s.startswith(BEFORE_PREFIX)]
    if clash:
        raise ValueError(f"{path}: set name {clash[0]!r} starts with {BEFORE_PREFIX!r}, which per-query files "
                         "reserve for the evaluation before fine-tuning: rename the set")
    merged = {**per_query, **{BEFORE_PREFIX + s: d for s, d in (before or {}).items()}}
    if path.suffix == ".pt":
        data = {s: {m: ([str(k) for k in v] if m == "keys" else torch.as_tensor(v).cpu()) for m, v in d.items()}
                for s, d in merged.items()}
        return replace_atomically(path, lambda tmp: torch.save(data, tmp))
    arrays = {f"{s}/{m}": (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
              for s, d in merged.items() for m, v in d.items()}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # an open file keeps numpy from appending ".npz" to other suffixes
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # numpy's stub takes **arrays for allow_pickle

    return replace_atomically(path, write)


def load_per_query(path: str | os.PathLike, before: bool = False) -> dict[str, dict[str, Any]]:
    """Inverse of `save_per_query`: ``{set: {metric: np.ndarray}}``; a set's image keys, when
    stored, come back as a string array under ``"keys"``. ``before=True``: the evaluation before
    fine-tuning instead (``{}`` when the file holds none, e.g. cliptune-eval's output)."""
    import numpy as np  # noqa: PLC0415 - see load_torch_file
    import torch  # noqa: PLC0415 - see load_torch_file

    path = Path(path)
    out: dict[str, dict[str, Any]] = {}
    if path.suffix == ".pt":
        data = load_torch_file(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected {{set: {{metric: tensor}}}}, got {type(data).__name__}")
        for s, d in data.items():
            if not isinstance(d, dict):
                raise ValueError(f"{path}: set {s!r} holds a {type(d).__name__}, expected {{metric: tensor}}")
            out[s] = {}
            for m, v in d.items():
                if m == "keys":
                    if v is not None and len(v):
                        out[s]["keys"] = np.asarray([str(k) for k in v])
                elif isinstance(v, (torch.Tensor, np.ndarray, list, tuple)):
                    out[s][m] = torch.as_tensor(v).numpy() if not isinstance(v, np.ndarray) else v
    else:
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                if "/" not in key:
                    raise ValueError(f"{path}: array {key!r} is not named '<set>/<metric>'")
                s, m = key.rsplit("/", 1)
                out.setdefault(s, {})[m] = z[key]
    if before:
        return {s[len(BEFORE_PREFIX):]: d for s, d in out.items() if s.startswith(BEFORE_PREFIX)}
    return {s: d for s, d in out.items() if not s.startswith(BEFORE_PREFIX)}


class RunDir:
    """A run directory (``cliptune-train``) or an evaluation folder (``cliptune-eval``).

        rd = RunDir("runs/x")
        rd.write_metrics({...}); rd.read_metrics(); rd.last_ckpt; rd.export
    """

    METRICS = "metrics.json"        # before / after / chance / skipped / global_step ... (cliptune-train)
    RESULTS = "results.json"        # cliptune-eval's output
    PER_QUERY = "per_query.pt"      # {set: {"keys": [...], metric: [n] hits}} of the last evaluation, and
                                    # {"before:<set>": ...} of the one before fine-tuning (save_per_query)
    CONFIG = "config.yaml"          # the resolved config
    OVERRIDES = "overrides.yaml"    # the command-line overrides
    CHOICES = "choices.yaml"        # each config group's option
    CSV = "csv/metrics.csv"         # every logged value with its step
    LOG = "train.log"
    CHECKPOINTS = "checkpoints"
    EXPORT = "export"               # final weights plain open_clip loads
    EXPORT_START = "export_start"   # the starting weights (WiSE-FT's other endpoint)
    WANDB = "wandb"                 # logger=wandb's offline files
    EXPORT_CONFIG = "open_clip_config.json"  # in export/ and export_start/: what makes a folder an export

    # What a run (cliptune-train, cliptune-distill, cliptune-eval) writes here: `clear_run` removes exactly these.
    RUN_FILES = (METRICS, RESULTS, PER_QUERY, CONFIG, OVERRIDES, CHOICES, LOG)
    RUN_FOLDERS = (CHECKPOINTS, EXPORT, EXPORT_START, CSV.split("/")[0], WANDB)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def best_ckpt(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def export(self) -> Path:
        return self.path / self.EXPORT

    @property
    def export_start(self) -> Path:
        return self.path / self.EXPORT_START

    def is_run(self) -> bool:
        """Holds the results of a training run or an evaluation (or Hydra's record of one)."""
        return any((self.path / n).exists() for n in (self.METRICS, self.RESULTS, ".hydra"))

    def lock(self) -> RunLock:
        return RunLock(self.path)

    def clear_run(self) -> list[Path]:
        """Remove what an earlier run wrote here (``RUN_FILES``, ``RUN_FOLDERS`` and the temporary files of
        an interrupted atomic write) and nothing else: the lock and any file of the user's stay. Returns
        what was removed.

        ``overwrite=true`` calls it with the lock held, before the new run writes anything: a run killed
        after that point leaves none of the old run's files behind (an old ``export/`` beside new
        checkpoints would be loaded as this run's weights). A link is removed, never followed.
        """
        names = set(self.RUN_FILES) | set(self.RUN_FOLDERS)
        temp = re.compile(r"\.(" + "|".join(re.escape(n) for n in self.RUN_FILES) + r")\.\d+\.tmp")
        removed = []
        for path in sorted(self.path.iterdir()) if self.path.is_dir() else ():
            if path.name not in names and not temp.fullmatch(path.name):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        return removed

    # ---------------------------------------------------------------------------- JSON files
    def read_json(self, name: str, expected: str = "a JSON object") -> dict:
        """``{}`` when the file is missing; a clear error when it is not a JSON object."""
        path = self.path / name
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected {expected}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected {expected}")
        return data

    def write_json(self, name: str, data: dict) -> Path:
        text = json.dumps(data, indent=2)
        return replace_atomically(self.path / name, lambda tmp: tmp.write_text(text))

    def read_metrics(self) -> dict:
        return self.read_json(self.METRICS, "{'before': ..., 'after': ..., 'per_query': ...}")

    def write_metrics(self, data: dict) -> Path:
        fault_point("metrics.write")
        return self.write_json(self.METRICS, data)

    def read_results(self) -> dict:
        return self.read_json(self.RESULTS, "{'sets': {set: {'metrics': ...}}, 'per_query': ...} (cliptune-eval)")

    def write_results(self, doc: dict) -> Path:
        return self.write_json(self.RESULTS, doc)

    # ---------------------------------------------------------------------------- other files
    def write_per_query(self, per_query: dict[str, dict[str, Any]],
                        before: dict[str, dict[str, Any]] | None = None) -> str:
        """Write ``per_query.pt`` (``before``: the hits before fine-tuning, see `save_per_query`);
        returns its name, as ``metrics.json`` / ``results.json`` cite it."""
        save_per_query(self.path / self.PER_QUERY, per_query, before=before)
        return self.PER_QUERY

    def read_per_query(self, name: str | None = None, before: bool = False) -> dict[str, dict[str, Any]]:
        """The per-query file ``name`` (default ``per_query.pt``) as `load_per_query` reads it;
        ``{}`` when it is missing."""
        path = self.path / (name or self.PER_QUERY)
        return load_per_query(path, before=before) if path.is_file() else {}

    def write_config(self, config_yaml: str, overrides_yaml: str, choices_yaml: str) -> None:
        """``config.yaml``, ``overrides.yaml`` and ``choices.yaml``: what ``cliptune-compare`` diffs."""
        for name, text in ((self.CONFIG, config_yaml), (self.OVERRIDES, overrides_yaml), (self.CHOICES, choices_yaml)):
            replace_atomically(self.path / name, functools.partial(Path.write_text, data=text))

    def read_config(self) -> dict | None:
        """``config.yaml`` as plain data (None when the run has none yet)."""
        import yaml  # noqa: PLC0415 - see load_torch_file

        path = self.path / self.CONFIG
        if not path.is_file():
            return None
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected the run's settings as a YAML mapping")
        return data

    RESUME_RECORD = "overrides.resume-{n}.yaml"  # each resumed part's command line (config.yaml stays the first's)

    def write_resume_record(self, text: str) -> str:
        """Write the next ``overrides.resume-<n>.yaml`` (n = 1, 2, ...); returns its name."""
        n = 1
        while (self.path / self.RESUME_RECORD.format(n=n)).exists():
            n += 1
        name = self.RESUME_RECORD.format(n=n)
        replace_atomically(self.path / name, lambda tmp: tmp.write_text(text))
        return name

    def remove_temp_files(self) -> list[Path]:
        """Remove the temporary files a killed atomic write left (``.<name>.<pid>.tmp``, never read: they
        were not renamed into place) in the run directory and its checkpoint, export and CSV folders."""
        removed = []
        for folder in (self.path, self.checkpoints, self.export, self.export_start, self.path / "csv"):
            if folder.is_dir():
                for p in folder.glob(".*.tmp"):
                    if re.fullmatch(r"\..+\.\d+\.tmp", p.name) and p.is_file() and not p.is_symlink():
                        p.unlink(missing_ok=True)
                        removed.append(p)
        return removed


class RunDirBusyError(RuntimeError):
    """Another process is running in this run directory."""


class RunLock:
    """Exclusive, non-blocking lock of a run directory (created if missing).

        with RunLock(run_dir):
            ...  # only this process writes run_dir
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl  # noqa: PLC0415 - POSIX only; elsewhere runs are not locked
        except ImportError:  # pragma: no cover - Windows
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunDirBusyError(
                f"{self.run_dir} is in use by another run (PID {holder}): wait for it to finish, stop it, or "
                "choose another name=<run name>"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
