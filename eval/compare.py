"""Compare finished runs: final metrics, config differences, curves and paired-bootstrap CIs.

    cliptune-compare runs/demo --out cmp/        # a multirun folder (runs/demo/loss=clip, loss=siglip, ...)
    cliptune-compare runs/a runs/b --out cmp/ --metric val/emoji/t2i_R@5 --baseline runs/a
    cliptune-compare eval_runs/x eval_runs/y --out cmp/   # cliptune-eval outputs compare the same way

Writes ``cmp/comparison.md``, ``cmp/comparison.csv`` (one row per run), ``cmp/bootstrap_ci.csv``
(paired bootstrap CI of each run minus the baseline, per set and R@K) and ``recall_at_k.png``,
``train_loss.png``, ``val_mean_R.png``. A directory that holds no ``metrics.json`` but has run
subdirectories (a Hydra multirun) is expanded to them.

What is read from each run directory (written by ``cliptune-train``; `write_run_metrics` writes
the same format for other tools):
- the composed config, for the "differs" column: ``.hydra/config.yaml`` + ``.hydra/overrides.yaml``
  (the override strings; runs are named by the overrides that differ) when Hydra launched the run,
  else ``config.yaml`` + ``overrides.yaml`` (written by ``cliptune.train.cli.run`` itself), else
  the CSV logger's ``csv/hparams.yaml`` (lossy: the Lightning module's hyper-parameters overwrite
  some groups, e.g. ``loss`` becomes the loss class name; its ``hydra.overrides.task`` gives the
  overrides); with none of them the run still gets its row, with no config differences.
  ``choices.yaml`` (or Hydra's ``.hydra/hydra.yaml``) gives each group's option, so a run that
  kept a default another run overrode reads ``loss=clip`` rather than every key of the group.
- ``metrics.json``: ``{"before": {set: {metric: float}} | null, "after": {set: {metric: float}},
  "per_query": "per_query.pt" | "per_query.npz" | null}``; ``per_query`` is relative to the run
  directory and holds the final evaluation's per-query values (bool hits ``t2i_R@k``,
  ``i2t_R@k``, ``zs_topk``...): ``.pt`` with ``{set: {"keys": [image keys], metric: tensor}}`` or
  ``.npz`` with one array per ``"<set>/<metric>"``. Runs are paired query by query only when
  their keys agree. A ``cliptune-eval`` output folder (``results.json``) also works: its sets
  are the "after" values.
- ``csv/metrics.csv``: Lightning CSVLogger output (``step``, ``train/loss``, ``val/<set>/mean_R``...).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import yaml

from cliptune.eval.bootstrap import paired_bootstrap
from cliptune.log import get_logger, rank_zero_print

log = get_logger(__name__)

__all__ = [
    "RunData",
    "load_run",
    "find_runs",
    "write_run_metrics",
    "save_per_query",
    "load_per_query",
    "flatten_config",
    "config_differences",
    "compare_runs",
    "main",
]

METRICS_FILE = "metrics.json"
EVAL_FILE = "results.json"  # cliptune-eval output
CONFIG_FILES = (".hydra/config.yaml", "config.yaml", "csv/hparams.yaml")
CSV_FILE = "csv/metrics.csv"
PER_QUERY_FILE = "per_query.npz"
# Keys that differ between runs for bookkeeping reasons only.
DEFAULT_IGNORE = ("hydra.*", "*output_dir", "*save_dir", "*log_dir", "*dirpath", "*.dir")
_DEFAULT_METRIC = re.compile(r"^(t2i|i2t)_R@\d+$|^mean_R$|^(zs_)?top\d+$|^(zs_)?balanced_acc$")
_MISSING = "—"


# ----------------------------------------------------------------------------- run-dir contract
def save_per_query(path: str | Path, per_query: dict[str, dict[str, Any]]) -> Path:
    """Save ``{set: {metric: [n] tensor/array}}`` as ``.npz`` (keys ``"<set>/<metric>"``) or ``.pt``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt":
        torch.save({s: {m: torch.as_tensor(v).cpu() for m, v in d.items()} for s, d in per_query.items()}, path)
        return path
    arrays = {}
    for s, d in per_query.items():
        for m, v in d.items():
            arrays[f"{s}/{m}"] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    with open(path, "wb") as f:  # an open file keeps numpy from appending ".npz" to other suffixes
        np.savez_compressed(f, **arrays)
    return path


def load_per_query(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of `save_per_query`: ``{set: {metric: np.ndarray}}``; a set's image keys, when
    stored, come back as a string array under ``"keys"``."""
    path = Path(path)
    out: dict[str, dict[str, np.ndarray]] = {}
    if path.suffix == ".pt":
        from cliptune.train.models import load_checkpoint_file  # imports open_clip: only when needed

        data = load_checkpoint_file(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected {{set: {{metric: tensor}}}}, got {type(data).__name__}")
        for s, d in data.items():
            out[s] = {}
            for m, v in d.items():
                if m == "keys":
                    if v is not None and len(v):
                        out[s]["keys"] = np.asarray([str(k) for k in v])
                elif isinstance(v, (torch.Tensor, np.ndarray, list, tuple)):
                    out[s][m] = torch.as_tensor(v).numpy() if not isinstance(v, np.ndarray) else v
        return out
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            if "/" not in key:
                raise ValueError(f"{path}: array {key!r} is not named '<set>/<metric>'")
            s, m = key.rsplit("/", 1)
            out.setdefault(s, {})[m] = z[key]
    return out


def write_run_metrics(
    run_dir: str | Path,
    after: dict[str, dict[str, float]],
    before: dict[str, dict[str, float]] | None = None,
    per_query: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write ``<run>/metrics.json`` (and ``<run>/per_query.npz``) in the format `load_run` reads."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pq_name = None
    if per_query:
        save_per_query(run_dir / PER_QUERY_FILE, per_query)
        pq_name = PER_QUERY_FILE

    def plain(d: dict | None) -> dict | None:
        return None if d is None else {s: {m: float(v) for m, v in ms.items()} for s, ms in d.items()}

    path = run_dir / METRICS_FILE
    path.write_text(json.dumps({"before": plain(before), "after": plain(after), "per_query": pq_name}, indent=2))
    return path


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

    def per_query(self) -> dict[str, dict[str, np.ndarray]]:
        return load_per_query(self.per_query_path) if self.per_query_path is not None else {}


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
    m_file = path / METRICS_FILE
    e_file = path / EVAL_FILE
    if m_file.exists():
        m = _read_json(m_file, "{'before': ..., 'after': ..., 'per_query': ...}")
        run.after = m.get("after") or {}
        run.before = m.get("before") or {}
    elif e_file.exists():
        m = _read_json(e_file, "{'sets': {set: {'metrics': ...}}, 'per_query': ...} (cliptune-eval)")
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


def _read_json(path: Path, expected: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {expected}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {expected}")
    return data


def _is_run(d: Path) -> bool:
    return (d / METRICS_FILE).exists() or (d / EVAL_FILE).exists() or (d / ".hydra").is_dir()


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths``; a directory without ``metrics.json`` / ``results.json`` / ``.hydra`` whose
    subdirectories are runs (a Hydra multirun) stands for those, in numeric/name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"run directory '{p}' does not exist")
        if _is_run(p):
            out.append(p)
            continue
        subs = [d for d in p.iterdir() if d.is_dir() and _is_run(d)]
        if not subs:
            raise FileNotFoundError(f"'{p}' holds neither {METRICS_FILE}, {EVAL_FILE} nor .hydra/, nor run subdirectories")
        out.extend(sorted(subs, key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name)))
    return out


# ----------------------------------------------------------------------------- differences
def _parse_override(o: str) -> tuple[str, str]:
    key, _, val = o.partition("=")
    return key.lstrip("+~"), val


def _fmt_value(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    if isinstance(v, str) and v.count(".") >= 2 and re.fullmatch(r"[\w.]+", v):
        return v.rsplit(".", 1)[1]  # _target_ paths: the class name says enough
    return str(v)


def _is_own_path(value: Any, run: RunData) -> bool:
    if not isinstance(value, str) or not value:
        return False
    v = value.rstrip("/")
    return v == str(run.path) or v.endswith("/" + run.path.name) or str(run.path.resolve()) in v


def config_differences(runs: Sequence[RunData], ignore: Sequence[str] = DEFAULT_IGNORE) -> dict[str, list[Any]]:
    """Flattened config keys whose values differ across runs: ``{key: [value per run]}``
    (absent keys as None). Keys matching an ``ignore`` glob, or holding each run's own
    directory, are left out."""
    keys: dict[str, None] = {}
    for r in runs:
        keys.update(dict.fromkeys(r.config))
    out: dict[str, list[Any]] = {}
    for k in keys:
        if any(fnmatch.fnmatchcase(k, pat) for pat in ignore):
            continue
        vals = [r.config.get(k) for r in runs]
        if len({json.dumps(v, sort_keys=True, default=str) for v in vals}) <= 1:
            continue
        if all(_is_own_path(v, r) for v, r in zip(vals, runs)):
            continue
        out[k] = vals
    return out


def override_differences(runs: Sequence[RunData]) -> dict[str, list[str | None]]:
    """Override keys (``.hydra/overrides.yaml``) whose values differ across runs."""
    parsed = [dict(_parse_override(o) for o in r.overrides) for r in runs]
    keys: dict[str, None] = {}
    for p in parsed:
        keys.update(dict.fromkeys(p))
    out = {}
    for k in keys:
        if k.startswith("hydra."):
            continue
        vals = [p.get(k) for p in parsed]
        if len(set(vals)) > 1:
            out[k] = vals
    return out


def _differs_text(i: int, ov: dict[str, list], cfg: dict[str, list], choices: dict[str, str] | None = None) -> str:
    parts = [f"{k}={v[i]}" for k, v in ov.items() if v[i] is not None]
    # A run that kept the default of a group that another run overrode names its option
    # (loss=clip against loss=siglip) instead of listing the group's keys one by one.
    kept = [k for k, v in ov.items() if v[i] is None and k in (choices or {})]
    parts += [f"{k}={choices[k]}" for k in kept]
    # Config keys explained by those groups or by this run's own differing overrides (the key,
    # or inside a group it selects); anything else that differs shows its config value.
    covered = tuple(k for k, v in ov.items() if v[i] is not None) + tuple(kept)
    for k, v in cfg.items():
        if any(k == c or k.startswith(c + ".") for c in covered):
            continue
        parts.append(f"{k}={_MISSING if v[i] is None else _fmt_value(v[i])}")
    return ", ".join(parts)


def name_runs(runs: Sequence[RunData], ov: dict[str, list]) -> list[str]:
    """Name each run by its differing overrides (Hydra multirun subdirs are just numbers)."""
    names = []
    for i, r in enumerate(runs):
        name = ",".join(f"{k}={v[i]}" for k, v in ov.items() if v[i] is not None)
        if not name:
            name = r.path.name if not r.path.name.isdigit() else f"{r.path.parent.name}/{r.path.name}"
        names.append(name)
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [f"{n} [{r.path.name}]" if seen[n] > 1 else n for n, r in zip(names, runs)]


# ----------------------------------------------------------------------------- tables
def _split_metric(spec: str) -> tuple[str, str]:
    """``val/<set>/<metric>`` or ``<set>/<metric>`` -> (set, metric)."""
    parts = spec.split("/")
    if len(parts) < 2:
        raise ValueError(f"--metric {spec!r}: expected 'val/<set>/<metric>' or '<set>/<metric>', e.g. val/emoji/t2i_R@5")
    if len(parts) >= 3 and parts[0] in ("val", "test", "eval"):
        parts = parts[1:]
    return "/".join(parts[:-1]), parts[-1]


def _metric_sort_key(m: str) -> tuple:
    g = re.fullmatch(r"(t2i|i2t)_R@(\d+)", m)
    if g:
        return (0, g.group(1) == "i2t", int(g.group(2)), m)
    return (1, 0, 0, m)


def default_metrics(runs: Sequence[RunData]) -> list[tuple[str, str]]:
    sets: dict[str, dict[str, None]] = {}
    for r in runs:
        for s, ms in r.after.items():
            sets.setdefault(s, {}).update(dict.fromkeys(m for m in ms if _DEFAULT_METRIC.match(m)))
    return [(s, m) for s in sets for m in sorted(sets[s], key=_metric_sort_key)]


def _md_table(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return _MISSING if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


def _rich_table(df: pd.DataFrame, title: str, floatfmt: str = ".4f") -> Any:
    from rich.table import Table

    t = Table(title=title)
    for c in df.columns:
        t.add_column(str(c), overflow="fold")
    for row in df.itertuples(index=False):
        t.add_row(*[(_MISSING if isinstance(v, float) and math.isnan(v) else format(v, floatfmt)) if isinstance(v, float) else str(v) for v in row])
    return t


def bootstrap_table(runs: Sequence[RunData], baseline: int, metrics: Sequence[tuple[str, str]],
                    n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Paired-bootstrap CI of (run - baseline) for every selected metric with per-query values."""
    cols = ["run", "baseline", "set", "metric", "run_value", "baseline_value", "diff", "lo", "hi", "p_value", "n"]
    base = runs[baseline].per_query()
    if not base:
        log.warning("baseline '%s' has no per-query file: no bootstrap CIs", runs[baseline].path)
        return pd.DataFrame(columns=cols)
    rows = []
    for i, r in enumerate(runs):
        if i == baseline:
            continue
        pq = r.per_query()
        for s, m in metrics:
            a, b = pq.get(s, {}).get(m), base.get(s, {}).get(m)
            if a is None or b is None:
                continue
            ka, kb = pq[s].get("keys"), base[s].get("keys")
            if ka is not None and kb is not None and not np.array_equal(ka, kb):
                log.warning("%s vs baseline %s: set '%s' holds different samples (%d vs %d keys, not the same "
                            "evaluation set): no paired CI", r.path, runs[baseline].path, s, ka.size, kb.size)
                continue
            if a.shape != b.shape:
                log.warning("%s vs baseline %s: %s/%s has %d vs %d queries (not the same evaluation set): CI skipped",
                            r.path, runs[baseline].path, s, m, a.size, b.size)
                continue
            res = paired_bootstrap(a, b, n_boot=n_boot, seed=seed, ci=ci)
            rows.append([r.name, runs[baseline].name, s, m, res["mean_a"], res["mean_b"], res["diff"],
                         res["lo"], res["hi"], res["p_value"], int(res["n"])])
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------- plots
def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in servers/tests

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_recall(runs: Sequence[RunData], path: Path) -> Path | None:
    """Grouped bars: R@k per run (after), t2i and i2t side by side, one row per set; a black
    tick marks the value before fine-tuning when present."""
    sets = list(dict.fromkeys(s for r in runs for s in r.after))
    panels = []
    for s in sets:
        for d in ("t2i", "i2t"):
            ks = sorted({int(m.split("@")[1]) for r in runs for m in r.after.get(s, {}) if m.startswith(f"{d}_R@")})
            if ks:
                panels.append((s, d, ks))
    if not panels:
        return None
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(5.2 * ncols, 3.4 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = _colors(len(runs))
    width = 0.8 / len(runs)
    any_before = False
    for ax, (s, d, ks) in zip(axes.flat, panels):
        x = np.arange(len(ks))
        for i, r in enumerate(runs):
            vals = [r.after.get(s, {}).get(f"{d}_R@{k}", np.nan) for k in ks]
            pos = x - 0.4 + width * (i + 0.5)
            bars = ax.bar(pos, vals, width * 0.92, color=colors[i], label=r.name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
            before = [r.before.get(s, {}).get(f"{d}_R@{k}", np.nan) for k in ks]
            if not all(np.isnan(before)):
                any_before = True
                ax.scatter(pos, before, marker="_", s=(width * 260) ** 2 / 4, color="black", linewidths=2, zorder=3)
        ax.set_xticks(x, [f"R@{k}" for k in ks])
        ax.set_ylim(0, 1.08)
        ax.set_title(f"{s}: {'text→image' if d == 't2i' else 'image→text'}")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if any_before:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="black", marker="_", linestyle="none", markersize=14, markeredgewidth=2))
        labels.append("before fine-tuning")
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8)
    fig.suptitle("Recall@K after fine-tuning")
    fig.savefig(path)
    return path


def _ema(y: np.ndarray, weight: float) -> np.ndarray:
    # TensorBoard-style debiased exponential moving average.
    out = np.empty_like(y, dtype=float)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(y):
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out


def _series(df: pd.DataFrame | None, col: str) -> tuple[np.ndarray, np.ndarray] | None:
    if df is None or col not in df.columns or "step" not in df.columns:
        return None
    d = df[["step", col]].dropna()
    if d.empty:
        return None
    d = d.groupby("step", as_index=False)[col].last()  # a step logged twice keeps its last value
    return d["step"].to_numpy(), d[col].to_numpy(dtype=float)


def _loss_column(df: pd.DataFrame | None) -> str | None:
    if df is None:
        return None
    for c in ("train/loss", "train/loss_step"):
        if c in df.columns:
            return c
    return None


def plot_train_loss(runs: Sequence[RunData], path: Path, smooth: float = 0.9) -> Path | None:
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    drawn = False
    for r, c in zip(runs, _colors(len(runs))):
        col = _loss_column(r.curves)
        xy = _series(r.curves, col) if col else None
        if xy is None:
            continue
        x, y = xy
        ax.plot(x, y, color=c, alpha=0.25, linewidth=0.8)
        ax.plot(x, _ema(y, smooth) if len(y) > 1 else y, color=c, linewidth=1.8, label=r.name)
        drawn = True
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("train/loss")
    ax.set_title(f"Training loss (faint: raw; solid: EMA {smooth})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def plot_val_mean_r(runs: Sequence[RunData], path: Path) -> Path | None:
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    styles = ["-", "--", ":", "-."]
    drawn = False
    pat = re.compile(r"^val/(.+)/mean_R$")
    for r, c in zip(runs, _colors(len(runs))):
        if r.curves is None:
            continue
        cols = [col for col in r.curves.columns if pat.match(col)]
        for j, col in enumerate(cols):
            xy = _series(r.curves, col)
            if xy is None:
                continue
            label = r.name if len(cols) == 1 else f"{r.name} ({pat.match(col).group(1)})"
            ax.plot(*xy, color=c, linestyle=styles[j % len(styles)], marker="o", markersize=3, label=label)
            drawn = True
    if not drawn:
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("mean Recall@K (both directions)")
    ax.set_title("Validation mean_R")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- entry points
def compare_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    metrics: Sequence[str] | None = None,
    baseline: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    smooth: float = 0.9,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    show: bool = True,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Load runs, write the tables and plots to ``out_dir``; returns the tables and file paths.

    ``metrics``: ``val/<set>/<metric>`` (or ``<set>/<metric>``) names; default every R@k,
    ``mean_R`` and zero-shot accuracy of every set. ``baseline``: a run directory (added if not
    among ``run_dirs``); default the first run.
    """
    paths = find_runs(run_dirs)
    if baseline is not None:
        b = Path(baseline)
        resolved = [p.resolve() for p in paths]
        if b.resolve() in resolved:
            base_idx = resolved.index(b.resolve())
        else:
            paths = find_runs([b]) + paths
            base_idx = 0
    else:
        base_idx = 0
    runs = [load_run(p) for p in paths]
    ov = override_differences(runs)
    cfg = config_differences(runs, ignore)
    for r, n in zip(runs, name_runs(runs, ov)):
        r.name = n
    selected = [_split_metric(m) for m in metrics] if metrics else default_metrics(runs)

    # Final metrics, one row per run.
    rows = []
    for i, r in enumerate(runs):
        row: dict[str, Any] = {"run": r.name, "dir": str(r.path), "differs": _differs_text(i, ov, cfg, r.choices)}
        for s, m in selected:
            row[f"{s}/{m}"] = float(r.after.get(s, {}).get(m, np.nan))
        for s, m in selected:
            if m in r.before.get(s, {}):
                row[f"before:{s}/{m}"] = float(r.before[s][m])
        rows.append(row)
    table = pd.DataFrame(rows)
    ci_table = bootstrap_table(runs, base_idx, selected, n_boot=n_boot, seed=seed, ci=ci)
    cfg_table = pd.DataFrame({"key": list(cfg), **{r.name: [_MISSING if v[i] is None else _fmt_value(v[i]) for v in cfg.values()]
                                                   for i, r in enumerate(runs)}})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    ci_table.to_csv(out / "bootstrap_ci.csv", index=False)
    plots = {
        "recall_at_k": plot_recall(runs, out / "recall_at_k.png"),
        "train_loss": plot_train_loss(runs, out / "train_loss.png", smooth),
        "val_mean_R": plot_val_mean_r(runs, out / "val_mean_R.png"),
    }

    # Markdown: the after value with its change since "before" in one cell keeps the table narrow.
    shown = table[["run", "differs"]].copy()
    for s, m in selected:
        col, bcol = f"{s}/{m}", f"before:{s}/{m}"
        if bcol in table:
            shown[col] = [f"{a:.4f} ({a - b:+.4f})" if not (math.isnan(a) or math.isnan(b)) else
                          (_MISSING if math.isnan(a) else f"{a:.4f}") for a, b in zip(table[col], table[bcol])]
        else:
            shown[col] = table[col]
    base_name = runs[base_idx].name
    md = ["# Run comparison", "", "## Runs", "",
          _md_table(pd.DataFrame({"run": [r.name for r in runs], "directory": [str(r.path) for r in runs],
                                  "differs": table["differs"]})), "",
          "## Final metrics", "",
          "Values after fine-tuning; in brackets the change since the evaluation before the first step.", "",
          _md_table(shown), "",
          f"## Paired bootstrap {ci:.0%} CI vs baseline `{base_name}`", ""]
    if ci_table.empty:
        md.append("No per-query results to compare (each run needs `per_query` in metrics.json).")
    else:
        md += [f"diff = run − baseline on the same queries; {n_boot} resamples; p: two-sided.", "",
               _md_table(ci_table.drop(columns=["baseline"]))]
    md += ["", "## Config differences", ""]
    md.append(_md_table(cfg_table) if not cfg_table.empty else "The runs' configs are identical.")
    md += ["", "## Plots", ""]
    for key, p in plots.items():
        md.append(f"![{key}]({p.name})" if p is not None else f"{key}: no data in the runs.")
    (out / "comparison.md").write_text("\n".join(md) + "\n")

    if show:
        rank_zero_print(_rich_table(shown.astype({c: object for c in shown.columns}), "Final metrics"))
        if not ci_table.empty:
            rank_zero_print(_rich_table(ci_table.drop(columns=["baseline"]), f"Paired bootstrap {ci:.0%} CI vs {base_name}"))
        rank_zero_print(f"Wrote {out / 'comparison.md'}, {out / 'comparison.csv'} and plots to {out}/")
    return {"runs": runs, "table": table, "ci": ci_table, "config_diff": cfg_table,
            "plots": plots, "md": out / "comparison.md", "csv": out / "comparison.csv"}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cliptune-compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (or a multirun directory holding them)")
    p.add_argument("--out", required=True, help="output directory for comparison.md/.csv and plots")
    p.add_argument("--metric", action="append", default=None,
                   help="metric to tabulate, e.g. val/emoji/t2i_R@5 (repeatable; default: all R@k, mean_R, top-k)")
    p.add_argument("--baseline", default=None, help="run the CIs are relative to (default: the first run)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ci", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    p.add_argument("--smooth", type=float, default=0.9, help="EMA weight of the loss curve (0: none)")
    p.add_argument("--ignore", action="append", default=None,
                   help=f"config key glob to leave out of the differences (repeatable; default {' '.join(DEFAULT_IGNORE)})")
    a = p.parse_args(argv)
    compare_runs(a.runs, a.out, metrics=a.metric, baseline=a.baseline, n_boot=a.n_boot, seed=a.seed,
                 smooth=a.smooth, ignore=tuple(DEFAULT_IGNORE) + tuple(a.ignore or ()), ci=a.ci)


if __name__ == "__main__":
    main()
