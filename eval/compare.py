"""Compare finished runs: final metrics, config differences, curves and paired-bootstrap CIs.

    cliptune-compare runs/demo --out cmp/        # a multirun folder (runs/demo/loss=clip, loss=siglip, ...)
    cliptune-compare runs/a runs/b --out cmp/ --metric val/emoji/t2i_R@5 --baseline runs/a
    cliptune-compare eval_runs/x eval_runs/y --out cmp/   # cliptune-eval outputs compare the same way

Writes ``cmp/comparison.md``, ``cmp/comparison.csv`` (one row per run), ``cmp/bootstrap_ci.csv``
(paired bootstrap CI of each run minus the baseline, per set and R@K) and ``recall_at_k.png``,
``train_loss.png``, ``val_mean_R.png``. A directory that holds no ``metrics.json`` but has run
subdirectories (a Hydra multirun) is expanded to them.

The files read from each run and their formats: `cliptune.eval.compare_load`. Tables and CIs:
`cliptune.eval.compare_report`; plots: `cliptune.eval.compare_plots`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from cliptune.log import configure_job_logging

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``cliptune-compare`` argument parser (each default is said once, in its help)."""
    p = argparse.ArgumentParser(prog="cliptune-compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (or a multirun directory holding them)")
    p.add_argument("--out", required=True, help="output directory for comparison.md/.csv and plots")
    p.add_argument("--metric", action="append", default=None,
                   help="metric to tabulate, e.g. val/emoji/t2i_R@5 (repeatable; default: all R@k, mean_R, top-k)")
    p.add_argument("--baseline", default=None, help="run the CIs are relative to (default: the first run)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level of the intervals (default: %(default)s)")
    p.add_argument("--smooth", type=float, default=0.9,
                   help="EMA weight of the loss curve, 0: none (default: %(default)s)")
    p.add_argument("--ignore", action="append", default=None,
                   help="config key glob to leave out of the differences, besides Hydra's keys and the output "
                        "folders (repeatable; the full list: cliptune.eval.compare_report.DEFAULT_IGNORE)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    # torch, pandas, matplotlib: imported once arguments parse, not for --help
    from cliptune.eval.compare_report import DEFAULT_IGNORE, compare_runs  # noqa: PLC0415 - heavy: only once the job runs

    configure_job_logging()
    compare_runs(a.runs, a.out, metrics=a.metric, baseline=a.baseline, n_boot=a.n_boot, seed=a.seed,
                 smooth=a.smooth, ignore=tuple(DEFAULT_IGNORE) + tuple(a.ignore or ()), ci=a.ci)


if __name__ == "__main__":
    main()
