"""Compare finished runs: final metrics, config differences, curves and paired-bootstrap CIs.

    cliptune-compare runs/demo --out cmp/        # a multirun folder (runs/demo/loss=clip, loss=siglip, ...)
    cliptune-compare runs/a runs/b --out cmp/ --metric val/emoji/t2i_R@5 --baseline runs/a
    cliptune-compare eval_runs/x eval_runs/y --out cmp/   # cliptune-eval outputs compare the same way

Writes ``cmp/comparison.md``, ``cmp/comparison.csv`` (one row per run), ``cmp/bootstrap_ci.csv``
(paired bootstrap CI of each run minus the baseline, per set and R@K) and ``recall_at_k.png``,
``train_loss.png``, ``val_mean_R.png``. A directory that holds no ``metrics.json`` but has run
subdirectories (a Hydra multirun) is expanded to them. An error (a missing run, a ``--metric`` no run
reports) is one line on stderr with exit code 2; ``CLIPTUNE_TRACEBACK=1`` shows its traceback.

The files read from each run and their formats: `cliptune.eval.compare_load`. Tables and CIs:
`cliptune.eval.compare_report`; plots: `cliptune.eval.compare_plots`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cliptune.log import configure_job_logging

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``cliptune-compare`` argument parser (each default is said once, in its help)."""
    p = argparse.ArgumentParser(prog="cliptune-compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Errors: one line on stderr, exit code 2; CLIPTUNE_TRACEBACK=1 shows the "
                                       "traceback.")
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
    """``cliptune-compare``; a missing run, an unknown ``--metric`` or an unreadable file stops with one line
    ``error: <message>`` and exit code 2 (``CLIPTUNE_TRACEBACK=1``: the traceback instead)."""
    a = build_parser().parse_args(argv)
    # torch, pandas, matplotlib: imported once arguments parse, not for --help
    from cliptune.eval.compare_load import check_metrics, find_runs  # noqa: PLC0415 - heavy: only once the job runs
    from cliptune.eval.compare_report import DEFAULT_IGNORE, compare_runs  # noqa: PLC0415 - heavy: only once the job runs

    configure_job_logging()
    try:
        if a.metric:
            check_metrics(a.metric, find_runs([*a.runs, *([a.baseline] if a.baseline else [])]))
        compare_runs(a.runs, a.out, metrics=a.metric, baseline=a.baseline, n_boot=a.n_boot, seed=a.seed,
                     smooth=a.smooth, ignore=tuple(DEFAULT_IGNORE) + tuple(a.ignore or ()), ci=a.ci)
    except Exception as e:
        from cliptune.cli import user_error  # noqa: PLC0415 - Hydra's parser: only to report an error

        line = user_error(e)
        if line is None:
            raise
        sys.stderr.write(line + "\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
