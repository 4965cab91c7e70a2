"""``cliptune-wiseft``: weight-space ensembles of a starting model and its fine-tune (WiSE-FT).

theta(alpha) = (1 - alpha) * theta_start + alpha * theta_finetuned. Each alpha is evaluated on the
domain set(s) and on reference set(s) (what the starting model knew), then a table, a plot of
domain vs reference recall against alpha, and the chosen model's export are written.

    cliptune-wiseft run=runs/demo sets='{emoji:demo_data/val.json}' reference=coco_val device=cpu
    cliptune-wiseft run=runs/demo sets=demo_data start=ViT-B-32 start_pretrained=openai \
        'alphas=[0,0.5,1]' select=0.5

Writes ``wiseft.json`` (every metric of every set at every alpha), ``wiseft.md`` / ``wiseft.csv``
(``metric`` per set and alpha), ``wiseft.png`` and ``export/`` (the chosen alpha, loadable with
plain open_clip: ``open_clip.create_model_and_transforms("local-dir:<out>/export")``).

The starting model defaults to ``<run>/export_start`` (written by cliptune-train), else the run's
model rebuilt from its recorded source (``model_spec``) when that lies inside the run directory; a tag
(downloaded) or a file elsewhere is refused: name it with ``start=`` / ``start_pretrained=``.

This module is the library (`run`); the command's entry is `cliptune.eval.cli.wiseft_main`, which answers
``--help``, ``--cfg job`` and tab completion without importing torch, open_clip or matplotlib.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig
from rich.table import Table

from cliptune import runtime
from cliptune.domains import WISEFT_SELECT
from cliptune.eval.runner import evaluate_sets, named_sets
from cliptune.log import get_logger, rank_zero_print
from cliptune.models import build_model, checkpoint_spec, export_model, load_model
from cliptune.rundir import RunDir, load_torch_file
from cliptune.validate import validate_wiseft_config

log = get_logger(__name__)


def interpolate(start: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * finetuned for floating tensors (computed in fp32, stored in the
    fine-tuned dtype); non-floating buffers take the fine-tuned value (the start's at alpha = 0).

    alpha = 0 and 1 return the endpoints bit for bit (no arithmetic is done there).
    """
    only_s, only_f = set(start) - set(finetuned), set(finetuned) - set(start)
    if only_s or only_f:
        raise ValueError(f"the two models differ in parameters: only in start {sorted(only_s)[:5]}, "
                         f"only in fine-tuned {sorted(only_f)[:5]}; WiSE-FT needs the same architecture")
    out = {}
    for k, f in finetuned.items():
        s = start[k]
        if s.shape != f.shape:
            raise ValueError(f"parameter '{k}' has shape {tuple(s.shape)} in start but {tuple(f.shape)} in fine-tuned")
        if alpha == 0:
            out[k] = s.clone()
        elif alpha == 1 or not f.is_floating_point():
            out[k] = f.clone()
        else:
            out[k] = torch.lerp(s.float(), f.float(), float(alpha)).to(f.dtype)
    return out


def start_model(run: str | Path, start: str | None = None, start_pretrained: str | None = None):
    """The model a fine-tune started from."""

    if start:
        try:
            return load_model(start, pretrained=start_pretrained)
        except ValueError as e:  # load_model's words are `pretrained=`: here the key is start_pretrained
            raise ValueError(f"start={start} start_pretrained={start_pretrained}: {e}") from e
    rd = RunDir(run)
    if rd.export_start.is_dir():
        return load_model(rd.export_start)
    ckpt = rd.last_ckpt
    if not ckpt.is_file():
        raise FileNotFoundError(f"no starting model for '{run}': no export_start/ and no checkpoints/last.ckpt; "
                                "pass start=<model>")
    raw = load_torch_file(ckpt)
    # The recorded source is rebuilt only when it is the run's own or open_clip's architecture: a tag, a file or
    # a folder elsewhere is what the user names (start=), never what the checkpoint names.
    spec = checkpoint_spec(ckpt, raw.get("hyper_parameters") if isinstance(raw, dict) else None, keep_pretrained=True,
                           hint="name the starting model yourself: start=<model> start_pretrained=<tag or file>")
    if not spec.get("pretrained") and not str(spec.get("name", "")).startswith(("local-dir:", "hf-hub:")):
        raise ValueError(f"run '{run}' started from random weights and kept no export_start/: pass start=<model>")
    return build_model(**spec)


def _plot(rows: list[dict], metric: str, path: Path, chosen: float | None = None) -> Path:
    fig = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    ax = fig.subplots()
    alphas = [r["alpha"] for r in rows]
    names = [k for k in rows[0] if k.startswith(("domain/", "reference/"))]
    for name in names:
        ax.plot(alphas, [r[name] for r in rows], marker="o", ls="-" if name.startswith("domain/") else "--", label=name)
    if chosen is not None:
        ax.axvline(chosen, color="grey", lw=1, ls=":", label=f"chosen alpha = {chosen:g}")
    ax.set_xlabel("alpha (0 = start, 1 = fine-tuned)")
    ax.set_ylabel(metric)
    ax.set_title("WiSE-FT: domain (solid) vs reference (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def _choose(rows: list[dict], select: Any) -> float:
    """The alpha to export: a given alpha, or the best by ``domain`` or ``sum`` (domain + reference)."""
    alphas = [r["alpha"] for r in rows]
    if isinstance(select, (int, float)) and not isinstance(select, bool):
        if float(select) not in alphas:
            raise ValueError(f"select={select} is not one of alphas={alphas}")
        return float(select)
    dom = [k for k in rows[0] if k.startswith("domain/")]
    ref = [k for k in rows[0] if k.startswith("reference/")]
    if select not in WISEFT_SELECT:
        raise ValueError(f"select={select!r}: use {', '.join(WISEFT_SELECT)}, or one of alphas={alphas}")
    keys = dom if select == "domain" else dom + ref
    # Ties go to the smallest alpha: the model closest to the start.
    return max(rows, key=lambda r: (sum(r[k] for k in keys), -r["alpha"]))["alpha"]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate every alpha, write ``wiseft.{json,md,csv,png}`` and ``export/`` (the chosen alpha)."""

    validate_wiseft_config(cfg)  # before anything is loaded or written
    if not cfg.get("run"):
        raise ValueError("set run=<fine-tuned cliptune run dir or export>")
    sets = named_sets(cfg.get("sets"), "sets")
    refs = named_sets(cfg.get("reference"), "reference")
    if not sets:
        raise ValueError("set at least one domain set: sets=<shard spec> or sets='{<name>:<spec>,...}'")
    both = sorted(set(sets) & set(refs))
    if both:
        raise ValueError(f"set name(s) {both} are used in both sets and reference: rename one")
    alphas = [float(a) for a in cfg.alphas]
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ValueError(f"alphas={alphas}: give values in [0, 1] (0 = start, 1 = fine-tuned)")
    out = Path(cfg.out)
    device = runtime.device(cfg.device)
    own_group = runtime.init_distributed(device)
    tuned = load_model(cfg.run)
    start = start_model(cfg.run, cfg.get("start"), cfg.get("start_pretrained"))
    s_state = {k: v.detach().cpu() for k, v in start.model.state_dict().items()}
    f_state = {k: v.detach().cpu() for k, v in tuned.model.state_dict().items()}
    if "logit_bias" in f_state and "logit_bias" not in s_state:
        s_state["logit_bias"] = f_state["logit_bias"].clone()  # the bias was added for the fine-tune
    metric = cfg.metric
    rows, full = [], {}
    bundle = copy.copy(tuned)
    bundle.model = copy.deepcopy(tuned.model)
    for alpha in alphas:
        bundle.model.load_state_dict(interpolate(s_state, f_state, alpha))
        res = evaluate_sets(bundle, {**sets, **refs}, [cfg.caption_lang], cfg.batch_size, cfg.workers, device,
                            ks=tuple(cfg.get("ks") or (1, 5, 10)), zeroshot_templates=None)
        row: dict[str, Any] = {"alpha": alpha}
        for name, r in res.items():
            if metric not in r["metrics"]:
                raise ValueError(f"metric='{metric}' is not computed for set '{name}'; "
                                 f"choose one of {sorted(r['metrics'])}")
            row[f"{'reference' if name in refs else 'domain'}/{name}"] = r["metrics"][metric]
        rows.append(row)
        full[alpha] = {n: r["metrics"] for n, r in res.items()}
        log.info("alpha=%.2f %s", alpha, {k: round(v, 4) for k, v in row.items() if k != "alpha"})
    if own_group:
        runtime.teardown_distributed()  # every rank has every alpha's results
    chosen = _choose(rows, cfg.select)
    doc = {"run": str(cfg.run), "metric": metric, "alphas": rows, "metrics": {str(a): m for a, m in full.items()},
           "chosen_alpha": chosen, "export": str(out / "export")}
    if runtime.rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        bundle.model.load_state_dict(interpolate(s_state, f_state, chosen))
        export_model(bundle.model, tuned.model_cfg, tuned.preprocess_cfg, out / "export", tokenizer=tuned.tokenizer)
        _plot(rows, metric, out / "wiseft.png", chosen)
        _write_tables(rows, out)
        (out / "wiseft.json").write_text(json.dumps(doc, indent=2))
        _print(rows, chosen, metric)
    return doc


def _write_tables(rows: list[dict], out: Path) -> None:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
              for r in rows]
    (out / "wiseft.md").write_text("\n".join(lines) + "\n")
    csv_rows = [",".join(str(r[c]) for c in cols) for r in rows]
    (out / "wiseft.csv").write_text("\n".join([",".join(cols)] + csv_rows) + "\n")


def _print(rows: list[dict], chosen: float, metric: str) -> None:
    t = Table(title=f"WiSE-FT ({metric}); chosen alpha = {chosen}")
    for c in rows[0]:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in r],
                  style="bold" if r["alpha"] == chosen else None)
    rank_zero_print(t)

