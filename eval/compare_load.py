"""Read finished runs for ``cliptune-compare``: find the run directories, load each one's files.

A run directory is what ``cliptune-train`` writes (`write_run_metrics` writes the same for other
tools); a ``cliptune-eval`` output folder also works. `load_run` reads, each file optional:

- ``metrics.json``: ``{"before": {set: {metric: float}} | null, "after": {set: {metric: float}},
  "per_query": <file> | null}`` (other keys are ignored). A cliptune-eval folder has
  ``results.json`` instead, whose ``sets.<set>.metrics`` are the "after" values.
- the per-query file it names, relative to the run: ``.pt`` holding ``{set: {"keys": [image
  keys], metric: [n] tensor}}`` or ``.npz`` with one array per ``"<set>/<metric>"`` (bool hits
  ``t2i_R@k``, ``i2t_R@k``, ``zs_topk``, ranks), and, for a training run that evaluated before
  fine-tuning, the same under ``"before:<set>"`` (`cliptune.rundir.save_per_query`; files without
  it still read). Runs are paired query by query only when their keys agree.
- the composed config, the first found of: ``.hydra/config.yaml`` + ``.hydra/overrides.yaml``
  (Hydra launched the run); ``config.yaml`` + ``overrides.yaml`` (cliptune-train writes them);
  the CSV logger's ``csv/hparams.yaml``, lossy (some groups hold the module's hyper-parameters,
  e.g. ``loss: ClipLoss``) with the overrides in its ``hydra.overrides.task``. Without any, the
  run still gets its row, with no config differences.
- ``choices.yaml`` (or Hydra's ``.hydra/hydra.yaml``): each config group's option, defaults
  included, so a run that kept a default another run overrode reads ``loss=clip``.
- ``csv/metrics.csv``: the CSV logger's curves (``step``, ``train/loss``, ``val/<set>/mean_R``...).

`find_runs` expands a folder that is not itself a run to the runs found under it at any depth: a
folder holding ``metrics.json``, ``results.json`` or ``.hydra/``, or ``config.yaml`` and
``checkpoints/`` (a training run not finished yet). So a Hydra multirun (``runs/x/0``,
``runs/x/loss=clip``), a sweep whose override held a slash (``runs/x/data.train=/abs/path,loss=clip``
nests folders) and folders of sweeps all expand; a run's own subfolders are not searched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import yaml

from cliptune.log import get_logger
from cliptune.rundir import RunDir, load_per_query, save_per_query

log = get_logger(__name__)

__all__ = [
    "RunData",
    "load_run",
    "find_runs",
    "is_run_dir",
    "write_run_metrics",
    "flatten_config",
]

# file names: cliptune.rundir.RunDir owns them
METRICS_FILE, EVAL_FILE, CSV_FILE = RunDir.METRICS, RunDir.RESULTS, RunDir.CSV
CONFIG_FILES = (".hydra/config.yaml", RunDir.CONFIG, "csv/hparams.yaml")
PER_QUERY_FILE = "per_query.npz"


def write_run_metrics(
    run_dir: str | Path,
    after: dict[str, dict[str, float]],
    before: dict[str, dict[str, float]] | None = None,
    per_query: dict[str, dict[str, Any]] | None = None,
    per_query_before: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write ``<run>/metrics.json`` (and ``<run>/per_query.npz``: ``per_query`` and, when given,
    ``per_query_before``, the hits before fine-tuning) in the format `load_run` reads."""
    run = RunDir(run_dir)
    pq_name = None
    if per_query or per_query_before:
        save_per_query(run / PER_QUERY_FILE, per_query or {}, before=per_query_before)
        pq_name = PER_QUERY_FILE

    def plain(d: dict | None) -> dict | None:
        return None if d is None else {s: {m: float(v) for m, v in ms.items()} for s, ms in d.items()}

    return run.write_metrics({"before": plain(before), "after": plain(after), "per_query": pq_name})


@dataclass
class RunData:
    """Everything `compare_runs` reads from one run directory."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)  # flattened
    overrides: list[str] = field(default_factory=list)
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option, defaults included
    after: dict[str, dict[str, float]] = field(default_factory=dict)
    before: dict[str, dict[str, float]] = field(default_factory=dict)
    per_query_path: Path | None = None
    curves: pd.DataFrame | None = None
    name: str = ""

    def per_query(self, before: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """``{set: {metric: [n] array, "keys": [n]}}`` of the last evaluation; ``before=True``: of the
        one before fine-tuning (``{}`` when the run did not keep it)."""
        return load_per_query(self.per_query_path, before=before) if self.per_query_path is not None else {}


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists stay whole values (compared as JSON)."""
    out: dict[str, Any] = {}
    if isinstance(cfg, dict):
        if not cfg and prefix:
            out[prefix] = {}
        for k, v in cfg.items():
            out.update(flatten_config(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = cfg
    return out


def _read_config(path: Path) -> tuple[dict[str, Any], list[str], str | None]:
    """(flattened config, override strings, the file it came from) of a run directory."""
    for name in CONFIG_FILES:
        f = path / name
        if not f.is_file():
            continue
        try:
            cfg = yaml.safe_load(f.read_text()) or {}
        except yaml.YAMLError as e:
            log.warning("%s: not valid YAML (%s); config differences leave this run out", f, e)
            continue
        if not isinstance(cfg, dict):
            continue
        overrides: list[str] = []
        ov_file = f.parent / "overrides.yaml"  # .hydra/overrides.yaml, or the one cliptune-train writes
        if name != "csv/hparams.yaml" and ov_file.is_file():
            overrides = [str(o) for o in (yaml.safe_load(ov_file.read_text()) or [])]
        elif isinstance(cfg.get("hydra"), dict):
            overrides = [str(o) for o in ((cfg["hydra"].get("overrides") or {}).get("task") or [])]
        if name == "csv/hparams.yaml":
            log.warning("%s: no .hydra/config.yaml or config.yaml; using the logger's %s for config "
                        "differences (lossy: some groups are replaced by the module's hyper-parameters)", path, name)
        return flatten_config(cfg), overrides, name
    log.warning("%s: no %s, config differences will not include this run", path, " or ".join(CONFIG_FILES))
    return {}, [], None


def _read_choices(path: Path) -> dict[str, str]:
    """Each config group's option (``choices.yaml`` written by cliptune-train, else Hydra's
    ``.hydra/hydra.yaml`` runtime choices); empty when neither is there or readable."""
    for name, keys in (("choices.yaml", ()), (".hydra/hydra.yaml", ("hydra", "runtime", "choices"))):
        f = path / name
        if not f.is_file():
            continue
        try:
            doc = yaml.safe_load(f.read_text()) or {}
        except yaml.YAMLError:
            continue
        for k in keys:
            doc = doc.get(k) if isinstance(doc, dict) else None
        if isinstance(doc, dict):
            return {str(k): str(v) for k, v in doc.items() if not str(k).startswith("hydra/") and v is not None}
    return {}


def load_run(path: str | Path) -> RunData:
    """Read one run directory (see the module docstring for the files and their formats)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory '{path}' does not exist")
    run = RunData(path=path)
    run.config, run.overrides, _ = _read_config(path)
    run.choices = _read_choices(path)
    rd = RunDir(path)
    m_file = path / METRICS_FILE
    e_file = path / EVAL_FILE
    if m_file.exists():
        m = rd.read_metrics()
        run.after = m.get("after") or {}
        run.before = m.get("before") or {}
    elif e_file.exists():
        m = rd.read_results()
        run.after = {s: dict(r.get("metrics") or {}) for s, r in (m.get("sets") or {}).items()}
        m_file = e_file
    else:
        m = {}
        log.warning("%s: no %s (run unfinished?), final metrics will be empty", path, METRICS_FILE)
    if m.get("per_query"):
        pq = path / m["per_query"]
        if pq.exists():
            run.per_query_path = pq
        else:
            log.warning("%s names per-query file '%s' which is missing: no bootstrap CIs for this run", m_file, pq)
    csv_file = path / CSV_FILE
    if csv_file.exists():
        try:
            run.curves = pd.read_csv(csv_file)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            log.warning("%s: unreadable (%s): no curves for this run", csv_file, e)
    return run


def is_run_dir(path: Path) -> bool:
    """A run directory: ``metrics.json``, ``results.json`` or ``.hydra/``, or a training run not
    finished yet (``config.yaml`` and ``checkpoints/``)."""
    rd = RunDir(path)
    return rd.is_run() or ((path / RunDir.CONFIG).is_file() and rd.checkpoints.is_dir())


def _natural_key(rel: Path) -> tuple:
    """Numbered Hydra jobs in numeric order (``2`` before ``10``), before named ones, at every level."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in rel.parts)


def _runs_under(root: Path) -> list[Path]:
    """The run directories below ``root`` at any depth; a run's own subfolders are not searched,
    nor hidden folders, and symbolic links are not followed."""
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and is_run_dir(here):
            found.append(here)
            dirnames.clear()
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found, key=lambda d: _natural_key(d.relative_to(root)))


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths``; a directory that is not a run (`is_run_dir`) stands for the
    runs found under it at any depth (a Hydra multirun, a nested sweep), in numeric/name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"run directory '{p}' does not exist")
        if is_run_dir(p):
            out.append(p)
            continue
        subs = _runs_under(p)
        if not subs:
            raise FileNotFoundError(
                f"'{p}' is not a run directory ({METRICS_FILE}, {EVAL_FILE}, .hydra/, or {RunDir.CONFIG} with "
                f"{RunDir.CHECKPOINTS}/) and holds none at any depth: give a run or a folder of runs")
        out.extend(subs)
    return out


def reported_metrics(paths: Iterable[str | Path]) -> list[str]:
    """``<set>/<metric>`` of every value the runs at ``paths`` report (after, before or an evaluation's)."""
    found: set[str] = set()
    for path in paths:
        rd = RunDir(path)
        m = rd.read_metrics()
        sets = [m.get("after") or {}, m.get("before") or {}]
        sets += [{s: r.get("metrics") or {} for s, r in (rd.read_results().get("sets") or {}).items()}]
        found |= {f"{s}/{k}" for d in sets for s, vals in d.items() if isinstance(vals, dict) for k in vals}
    return sorted(found)


def check_metrics(metrics: Iterable[str], paths: Iterable[str | Path]) -> None:
    """Refuse a ``--metric`` that no run reports (a misspelt name would be a column of NaN), listing those
    that exist. ``val/<set>/<metric>`` and ``<set>/<metric>`` both name a set's metric."""
    known = reported_metrics(paths)
    for spec in metrics:
        parts = spec.split("/")
        if len(parts) >= 3 and parts[0] in ("val", "test", "eval"):
            parts = parts[1:]
        if len(parts) >= 2 and "/".join(parts) in known:
            continue
        choices = ", ".join(f"val/{k}" for k in known) if known else "none: no run has finished metrics"
        raise ValueError(f"--metric {spec!r}: no run reports it; choose from {choices}")
