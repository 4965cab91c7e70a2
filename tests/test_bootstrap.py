"""Paired bootstrap: a hand-computed case, agreement with a brute-force index-resampling loop (both
code paths), and coverage sanity (identical runs, clearly different runs, simulated coverage)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import cliptune.eval.bootstrap as bs
from cliptune.eval.bootstrap import paired_bootstrap


def brute_force(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int, ci: float = 0.95) -> dict:
    """The textbook loop: resample query indices with replacement, the same for both runs."""
    rng = np.random.default_rng(seed)
    d = np.asarray(a, float) - np.asarray(b, float)
    n = d.size
    boot = np.array([d[rng.integers(0, n, size=n)].mean() for _ in range(n_boot)])
    lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    diff = d.mean()
    p = (1 + np.count_nonzero(np.abs(boot - diff) >= abs(diff))) / (n_boot + 1)
    return {"diff": diff, "lo": lo, "hi": hi, "p_value": p, "boot": boot}


def test_hand_computed_two_queries():
    # d = a - b = [1, 0]: a resample draws query 0 twice (mean 1), once (0.5) or never (0)
    # with probabilities 1/4, 1/2, 1/4.
    r = paired_bootstrap([True, False], [False, False], n_boot=40_000, seed=1)
    assert r["diff"] == 0.5 and r["mean_a"] == 0.5 and r["mean_b"] == 0.0 and r["n"] == 2
    assert (r["lo"], r["hi"]) == (0.0, 1.0)  # 2.5% and 97.5% quantiles of {0: 1/4, .5: 1/2, 1: 1/4}
    # P(|d* - 0.5| >= 0.5) = P(d* in {0, 1}) = 1/2
    assert r["p_value"] == pytest.approx(0.5, abs=0.01)
    # a 40% interval holds only the middle value
    r40 = paired_bootstrap([True, False], [False, False], n_boot=40_000, seed=1, ci=0.4)
    assert (r40["lo"], r40["hi"]) == (0.5, 0.5)


def test_exact_distribution_by_enumeration():
    """n = 4: all 4^4 equally likely resamples give the exact distribution of the bootstrap mean;
    paired_bootstrap's interval ends are its quantiles, at every coverage level."""
    a = np.array([1, 1, 0, 1], bool)
    b = np.array([0, 1, 1, 0], bool)
    d = a.astype(float) - b
    exact = np.array([d[list(idx)].mean() for idx in itertools.product(range(4), repeat=4)])
    for ci in (0.5, 0.8, 0.95):
        r = paired_bootstrap(a, b, n_boot=50_000, seed=0, ci=ci)
        lo, hi = np.quantile(exact, [(1 - ci) / 2, 1 - (1 - ci) / 2])
        assert r["lo"] == pytest.approx(lo) and r["hi"] == pytest.approx(hi), ci


@pytest.mark.parametrize("n", [50, 400])
def test_hits_match_brute_force_loop(n):
    g = np.random.default_rng(n)
    a = g.random(n) < 0.6
    b = np.where(g.random(n) < 0.7, a, g.random(n) < 0.5)  # correlated, as two runs on the same queries
    fast = paired_bootstrap(a, b, n_boot=4000, seed=3)
    slow = brute_force(a, b, n_boot=4000, seed=4)
    assert fast["diff"] == pytest.approx(slow["diff"], abs=1e-15)
    step = 1 / n  # the bootstrap mean lives on a grid of 1/n
    assert fast["lo"] == pytest.approx(slow["lo"], abs=2 * step + 0.01)
    assert fast["hi"] == pytest.approx(slow["hi"], abs=2 * step + 0.01)
    assert fast["p_value"] == pytest.approx(slow["p_value"], abs=0.03)


def test_many_distinct_values_use_index_resampling(monkeypatch):
    g = np.random.default_rng(0)
    a, b = g.normal(0.2, 1, 600), g.normal(0, 1, 600)
    slow = brute_force(a, b, n_boot=3000, seed=1)
    monkeypatch.setattr(bs, "_MAX_DISTINCT", 10)  # force the index-resampling path
    monkeypatch.setattr(bs, "_BLOCK", 600 * 7)  # in several blocks
    fast = paired_bootstrap(a, b, n_boot=3000, seed=2)
    sd = slow["boot"].std()
    assert fast["lo"] == pytest.approx(slow["lo"], abs=0.15 * sd)
    assert fast["hi"] == pytest.approx(slow["hi"], abs=0.15 * sd)
    # same seed, same numbers
    assert paired_bootstrap(a, b, n_boot=3000, seed=2) == fast


def test_identical_runs_give_a_zero_width_interval_at_zero():
    hits = torch.rand(500, generator=torch.Generator().manual_seed(0)) < 0.4
    r = paired_bootstrap(hits, hits.clone())
    assert (r["diff"], r["lo"], r["hi"], r["p_value"]) == (0.0, 0.0, 0.0, 1.0)


def test_clearly_different_runs_exclude_zero():
    g = np.random.default_rng(1)
    b = g.random(300) < 0.3
    a = b | (g.random(300) < 0.5)  # a finds everything b finds, and more
    r = paired_bootstrap(a, b, n_boot=2000)
    assert r["lo"] > 0 and r["lo"] <= r["diff"] <= r["hi"]
    assert r["p_value"] < 0.01
    flipped = paired_bootstrap(b, a, n_boot=2000)
    assert flipped["hi"] < 0 and flipped["diff"] == -r["diff"]


def test_coverage_of_a_known_difference():
    """Simulated studies with a true difference of 0.1: about 95% of the CIs must contain it."""
    g = np.random.default_rng(7)
    n, trials, hit = 400, 300, 0
    for t in range(trials):
        u = g.random(n)
        a, b = u < 0.6, u < 0.5  # paired: b's hits are a subset; E[a - b] = 0.1 exactly
        r = paired_bootstrap(a, b, n_boot=1000, seed=t)
        hit += r["lo"] <= 0.1 <= r["hi"]
    assert 0.90 <= hit / trials <= 0.99


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="same queries: got 3 and 2"):
        paired_bootstrap([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no queries"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="ci must be in"):
        paired_bootstrap([1], [0], ci=95)
    with pytest.raises(ValueError, match="hits_a must be 1-D"):
        paired_bootstrap(np.ones((2, 2)), np.ones((2, 2)))
