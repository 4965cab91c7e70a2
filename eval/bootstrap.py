"""Paired bootstrap for the difference of two runs' per-query scores on the same queries.

    from cliptune.eval.bootstrap import paired_bootstrap
    r = paired_bootstrap(hits_a["t2i_R@5"], hits_b["t2i_R@5"])   # {"diff", "lo", "hi", "p_value", ...}

Resampling query indices with replacement (the same indices for both runs) only matters through
how often each value of d = a - b is drawn, so for hit indicators (d in {-1, 0, 1}) the
bootstrap mean is drawn exactly from a multinomial over the distinct values of d: the same
distribution as index resampling at O(n_boot) cost instead of O(n_boot x n). Per-query values
with many distinct values fall back to index resampling in blocks.

The interval and the p-value come from the same resampled differences d*, so they never disagree:
the interval is the percentile interval (its ends are order statistics of d*, each with at most
(1 - ci) / 2 of the resamples beyond it), and the two-sided p-value is 2 * min(P(d* <= 0),
P(d* >= 0)), the smallest 1 - ci at which that interval excludes 0. Hence "the CI excludes 0"
exactly when "p < 1 - ci", resample for resample. (The p-value used to come from the bootstrap
shifted to the null, P(|d* - diff| >= |diff|): a different statistic, which could read p = 0.07
beside a 95% interval excluding 0.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["paired_bootstrap"]

_MAX_DISTINCT = 4096  # above this, index resampling is as cheap as the multinomial
_BLOCK = 2**24  # indices drawn at once by the fallback (128 MB of int64)


def _as_array(x: Any, name: str, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"paired_bootstrap: {name} must be 1-D per-query values, got shape {x.shape}")
    if not np.isfinite(x).all():
        # NaN would make every resampled mean NaN (and NaN >= |diff| is False, so p = 1/(n_boot+1)).
        raise ValueError(f"{what}: {int(np.count_nonzero(~np.isfinite(x)))} of {x.size} per-query values of {name} "
                         "are not finite (NaN/inf); that run's scores are broken — refusing to compare them")
    return x


def paired_bootstrap(
    hits_a: torch.Tensor | np.ndarray,
    hits_b: torch.Tensor | np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    *,
    name: str = "paired_bootstrap",
) -> dict[str, float]:
    """Bootstrap CI and p-value of mean(a) - mean(b) for two runs scored on the same n queries.

    Args:
        hits_a, hits_b: [n] per-query values (bool hits for Recall@K), query i the same in both.
        n_boot: bootstrap resamples; seed: RNG seed (numpy PCG64); ci: confidence level.
        name: what is compared, as error messages name it (``"set 'domain' t2i_R@5"``); a NaN or
            inf per-query value raises ``ValueError``.
    Returns:
        ``diff`` (observed mean(a) - mean(b)), ``lo``/``hi`` (percentile interval of the
        resampled differences d*: ``lo`` the smallest d* with at least (1 - ci) / 2 of them at or
        below it, ``hi`` the largest with at least that share at or above), ``p_value`` (two-sided,
        from the same d*: 2 * min(P(d* <= 0), P(d* >= 0)), at most 1; the interval excludes 0
        exactly when ``p_value < 1 - ci`` (0.05 for ci=0.95); 0 means no resample reached 0: p < 2 / n_boot),
        ``mean_a``, ``mean_b``, ``n`` and ``n_boot``.
    """
    a, b = _as_array(hits_a, "hits_a", name), _as_array(hits_b, "hits_b", name)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap needs both runs scored on the same queries: got {a.size} and "
                         f"{b.size} values")
    if a.size == 0:
        raise ValueError("paired_bootstrap: no queries")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    n = a.size
    d = a - b
    diff = float(d.mean())
    rng = np.random.default_rng(seed)
    values, counts = np.unique(d, return_counts=True)
    if values.size <= _MAX_DISTINCT:
        draws = rng.multinomial(n, counts / n, size=n_boot)  # [n_boot, n_distinct]
        boot = draws @ values / n
    else:
        boot = np.empty(n_boot)
        rows = max(1, _BLOCK // n)
        for s in range(0, n_boot, rows):
            e = min(s + rows, n_boot)
            boot[s:e] = d[rng.integers(0, n, size=(e - s, n))].mean(1)
    lo, hi, p = _percentile_interval_and_p(boot, 1 - ci)
    return {
        "diff": diff,
        "lo": float(lo),
        "hi": float(hi),
        "p_value": float(p),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "n": float(n),
        "n_boot": float(n_boot),
    }


def _percentile_interval_and_p(boot: np.ndarray, alpha: float) -> tuple[float, float, float]:
    """Ends of the (1 - alpha) percentile interval of ``boot`` and the p-value it inverts.

    With m = ceil(N * alpha / 2) (N resamples, sorted): lo is the m-th smallest and hi the m-th
    largest value, so lo > 0 exactly when fewer than N * alpha / 2 resamples are <= 0, hi < 0 exactly
    when fewer than N * alpha / 2 are >= 0, and both together say p < alpha.
    """
    srt = np.sort(boot)
    n = srt.size
    m = max(1, math.ceil(n * alpha / 2 - 1e-7))  # 1000 * (1 - 0.95) / 2 is 25.00000000000002 in floats: m = 25
    tail = min(np.count_nonzero(srt <= 0), np.count_nonzero(srt >= 0))
    return float(srt[m - 1]), float(srt[n - m]), min(1.0, 2 * tail / n)
