"""The tables of ``cliptune-compare``: final metrics, config differences and paired-bootstrap CIs.

`compare_runs` loads the runs (`cliptune.eval.compare_load`), names each by the overrides that
differ, tabulates the chosen metrics, computes the paired bootstrap of each run minus the
baseline and of each run's fine-tuned minus starting model (same queries, both evaluations kept in
its per-query file), draws the plots (`cliptune.eval.compare_plots`) and writes ``comparison.md``,
``comparison.csv``, ``bootstrap_ci.csv`` and ``finetune_gain.csv``.

Each interval and its p-value come from the same resamples (`cliptune.eval.bootstrap`): the
interval excludes 0 exactly when p < 1 - level.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from rich.table import Table

from cliptune.eval.bootstrap import paired_bootstrap
from cliptune.eval.compare_load import RunData, find_runs, load_run
from cliptune.eval.compare_plots import plot_recall, plot_train_loss, plot_val_mean_r
from cliptune.log import get_logger, rank_zero_print

log = get_logger(__name__)

__all__ = [
    "DEFAULT_IGNORE",
    "compare_runs",
    "config_differences",
    "override_differences",
    "name_runs",
    "default_metrics",
    "bootstrap_table",
    "finetune_gain_table",
]

# Keys that differ between runs for bookkeeping reasons only.
DEFAULT_IGNORE = ("hydra.*", "*output_dir", "*save_dir", "*log_dir", "*dirpath", "*.dir")
_DEFAULT_METRIC = re.compile(r"^(t2i|i2t)_R@\d+$|^mean_R$|^(zs_)?top\d+$|^(zs_)?balanced_acc$")
_MISSING = "—"


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
    choices = choices or {}
    parts = [f"{k}={v[i]}" for k, v in ov.items() if v[i] is not None]
    # A run that kept the default of a group that another run overrode names its option
    # (loss=clip against loss=siglip) instead of listing the group's keys one by one.
    kept = [k for k, v in ov.items() if v[i] is None and k in choices]
    parts += [f"{k}={choices[k]}" for k in kept]
    # Config keys explained by those groups or by this run's own differing overrides (the key,
    # or inside a group it selects); anything else that differs shows its config value.
    covered = tuple(k for k, v in ov.items() if v[i] is not None) + tuple(kept)
    for k, v in cfg.items():
        if any(k == c or k.startswith(c + ".") for c in covered):
            continue
        parts.append(f"{k}={_MISSING if v[i] is None else _fmt_value(v[i])}")
    return ", ".join(parts)


def _relative_names(paths: Sequence[Path]) -> list[str]:
    """Each path relative to the folder all of them share (``data.train=/abs/p,loss=clip`` for the
    folders a slash in an override nested); a bare number keeps its parent (``sweep/3``)."""
    resolved = [p.resolve() for p in paths]
    try:
        common = Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0].parent
    except ValueError:  # different drives
        return [str(p) for p in paths]
    out = []
    for p, r in zip(paths, resolved):
        rel = r.relative_to(common).as_posix() if r != common else p.name
        out.append(f"{p.parent.name}/{p.name}" if rel.isdigit() else rel)
    return out


def name_runs(runs: Sequence[RunData], ov: dict[str, list]) -> list[str]:
    """Name each run by its differing overrides (values whole, absolute paths included); a run
    with none by its folder relative to the others' (Hydra multirun folders are numbers)."""
    folders = _relative_names([r.path for r in runs])
    names = []
    for i, folder in enumerate(folders):
        name = ",".join(f"{k}={v[i]}" for k, v in ov.items() if v[i] is not None)
        names.append(name or folder)
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [f"{n} [{folder}]" if seen[n] > 1 and n != folder else n for n, folder in zip(names, folders)]


# ----------------------------------------------------------------------------- tables
def _split_metric(spec: str) -> tuple[str, str]:
    """``val/<set>/<metric>`` or ``<set>/<metric>`` -> (set, metric)."""
    parts = spec.split("/")
    if len(parts) < 2:
        raise ValueError(f"--metric {spec!r}: expected 'val/<set>/<metric>' or '<set>/<metric>', "
                         "e.g. val/emoji/t2i_R@5")
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
    """A Markdown table holding every value whole (a pipe or line break inside a cell escaped)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return _MISSING if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")

    head = "| " + " | ".join(cell(str(c)) for c in df.columns) + " |"  # run names head the config table
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


def _rich_table(df: pd.DataFrame, title: str, floatfmt: str = ".4f", caption: str | None = None) -> Any:
    t = Table(title=title, caption=caption)
    for c in df.columns:
        t.add_column(str(c), overflow="fold")
    for row in df.itertuples(index=False):
        t.add_row(*[(_MISSING if math.isnan(v) else format(v, floatfmt)) if isinstance(v, float) else str(v)
                    for v in row])
    return t


def _paired_hits(a_set: dict, b_set: dict, m: str, what: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-query values of ``m`` in two evaluations of one set, or None (with a warning naming
    ``what``) when they are missing or were not computed on the same samples."""
    a, b = a_set.get(m), b_set.get(m)
    if a is None or b is None:
        return None
    ka, kb = a_set.get("keys"), b_set.get("keys")
    if ka is not None and kb is not None and not np.array_equal(ka, kb):
        log.warning("%s: different samples (%d vs %d keys, not the same evaluation set): no paired CI",
                    what, ka.size, kb.size)
        return None
    if a.shape != b.shape:
        log.warning("%s: %d vs %d queries (not the same evaluation set): CI skipped", what, a.size, b.size)
        return None
    return a, b


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
            what = f"{r.path} vs baseline {runs[baseline].path}: set '{s}' {m}"
            pair = _paired_hits(pq.get(s, {}), base.get(s, {}), m, what)
            if pair is None:
                continue
            res = paired_bootstrap(*pair, n_boot=n_boot, seed=seed, ci=ci, name=what)
            rows.append([r.name, runs[baseline].name, s, m, res["mean_a"], res["mean_b"], res["diff"],
                         res["lo"], res["hi"], res["p_value"], int(res["n"])])
    return pd.DataFrame(rows, columns=cols)


def finetune_gain_table(runs: Sequence[RunData], metrics: Sequence[tuple[str, str]],
                        n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> pd.DataFrame:
    """Paired-bootstrap CI of each run's fine-tuned minus starting model (``gain`` = after - before,
    the same queries resampled together) for every selected metric both evaluations hold per query.
    Runs without the evaluation before fine-tuning in their per-query file are left out."""
    cols = ["run", "set", "metric", "before", "after", "gain", "lo", "hi", "p_value", "n"]
    rows = []
    for r in runs:
        before = r.per_query(before=True)
        if not before:
            continue
        after = r.per_query()
        for s, m in metrics:
            what = f"{r.path}: set '{s}' {m} after vs before fine-tuning"
            pair = _paired_hits(after.get(s, {}), before.get(s, {}), m, what)
            if pair is None:
                continue
            res = paired_bootstrap(*pair, n_boot=n_boot, seed=seed, ci=ci, name=what)
            rows.append([r.name, s, m, res["mean_b"], res["mean_a"], res["diff"], res["lo"], res["hi"],
                         res["p_value"], int(res["n"])])
    return pd.DataFrame(rows, columns=cols)


def _p_note(ci: float, n_boot: int) -> str:
    """What p means beside its interval (the caption of every CI table)."""
    return (f"p: two-sided, from the same {n_boot} resamples as the interval (2 × the share of resampled "
            f"differences on the far side of 0), so p < {1 - ci:.2g} exactly when the {ci:.0%} CI excludes 0; "
            f"p < {2 / n_boot:.2g}: no resample reached 0.")


def _shown_p(df: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """``p_value`` as printed: the resolution of the resamples instead of a bare 0."""
    out = df.copy()
    out["p_value"] = [f"< {2 / n_boot:.2g}" if p == 0 else format(p, ".4f") for p in df["p_value"]]
    return out


# ----------------------------------------------------------------------------- the comparison
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
    gain_table = finetune_gain_table(runs, selected, n_boot=n_boot, seed=seed, ci=ci)
    cfg_table = pd.DataFrame({"key": list(cfg),
                              **{r.name: [_MISSING if v[i] is None else _fmt_value(v[i]) for v in cfg.values()]
                                 for i, r in enumerate(runs)}})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    ci_table.to_csv(out / "bootstrap_ci.csv", index=False)
    gain_table.to_csv(out / "finetune_gain.csv", index=False)
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
        md += [f"diff = run − baseline on the same queries. {_p_note(ci, n_boot)}", "",
               _md_table(_shown_p(ci_table.drop(columns=["baseline"]), n_boot))]
    md += ["", f"## Fine-tuning gain: paired bootstrap {ci:.0%} CI of after − before", ""]
    if gain_table.empty:
        md.append("No run holds per-query hits of both its evaluation before fine-tuning and its last one "
                  "(cliptune-train keeps both in `per_query.pt` when `eval.before` is on).")
    else:
        md += [f"gain = fine-tuned − starting model of each run, on the same queries. {_p_note(ci, n_boot)}", "",
               _md_table(_shown_p(gain_table, n_boot))]
    md += ["", "## Config differences", ""]
    md.append(_md_table(cfg_table) if not cfg_table.empty else "The runs' configs are identical.")
    md += ["", "## Plots", ""]
    for key, p in plots.items():
        md.append(f"![{key}]({p.name})" if p is not None else f"{key}: no data in the runs.")
    (out / "comparison.md").write_text("\n".join(md) + "\n")

    if show:
        rank_zero_print(_rich_table(shown.astype({c: object for c in shown.columns}), "Final metrics"))
        if not ci_table.empty:
            rank_zero_print(_rich_table(_shown_p(ci_table.drop(columns=["baseline"]), n_boot),
                                        f"Paired bootstrap {ci:.0%} CI vs {base_name}", caption=_p_note(ci, n_boot)))
        if not gain_table.empty:
            rank_zero_print(_rich_table(_shown_p(gain_table, n_boot),
                                        f"Fine-tuning gain (after − before), paired {ci:.0%} CI",
                                        caption=_p_note(ci, n_boot)))
        rank_zero_print(f"Wrote {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'bootstrap_ci.csv'}, "
                        f"{out / 'finetune_gain.csv'} and plots to {out}/")
    return {"runs": runs, "table": table, "ci": ci_table, "gain": gain_table, "config_diff": cfg_table,
            "plots": plots, "md": out / "comparison.md", "csv": out / "comparison.csv"}
