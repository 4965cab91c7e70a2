"""Paired bootstrap: a hand-computed case, exact enumeration, agreement with a brute-force
index-resampling loop (both code paths), the p-value agreeing with the interval, and coverage
sanity (identical runs, clearly different runs, simulated coverage)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import cliptune.eval.bootstrap as bs
from cliptune.eval.bootstrap import paired_bootstrap


def brute_force(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int, ci: float = 0.95) -> dict:
    """The textbook loop: resample query indices with replacement, the same for both runs; the
    percentile interval and the two-sided p-value of the same resampled differences."""
    rng = np.random.default_rng(seed)
    d = np.asarray(a, float) - np.asarray(b, float)
    n = d.size
    boot = np.array([d[rng.integers(0, n, size=n)].mean() for _ in range(n_boot)])
    lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    p = min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0)))
    return {"diff": d.mean(), "lo": lo, "hi": hi, "p_value": p, "boot": boot}


def exact_distribution(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every one of the n^n equally likely resamples of d: (distinct means, their probabilities)."""
    n = d.size
    means = np.array([d[list(idx)].mean() for idx in itertools.product(range(n), repeat=n)])
    values, counts = np.unique(np.round(means, 12), return_counts=True)
    return values, counts / counts.sum()


def test_hand_computed_two_queries():
    # d = a - b = [1, 0]: a resample draws query 0 twice (mean 1), once (0.5) or never (0)
    # with probabilities 1/4, 1/2, 1/4.
    r = paired_bootstrap([True, False], [False, False], n_boot=40_000, seed=1)
    assert r["diff"] == 0.5 and r["mean_a"] == 0.5 and r["mean_b"] == 0.0 and r["n"] == 2
    assert (r["lo"], r["hi"]) == (0.0, 1.0)  # 2.5% and 97.5% quantiles of {0: 1/4, .5: 1/2, 1: 1/4}
    # two-sided: 2 * min(P(d* <= 0), P(d* >= 0)) = 2 * 1/4
    assert r["p_value"] == pytest.approx(0.5, abs=0.01)
    # a 40% interval holds only the middle value
    r40 = paired_bootstrap([True, False], [False, False], n_boot=40_000, seed=1, ci=0.4)
    assert (r40["lo"], r40["hi"]) == (0.5, 0.5)


def test_exact_distribution_by_enumeration():
    """n = 4: all 4^4 equally likely resamples give the exact distribution of the bootstrap mean;
    paired_bootstrap's interval ends are its percentile ends (the smallest value with (1 - ci) / 2
    of the mass at or below it, the largest with as much at or above), at every coverage level,
    and its p-value is 2 * min(P(d* <= 0), P(d* >= 0)). (The levels are chosen so that no
    cumulative probability lies near (1 - ci) / 2, where 50 000 resamples could round either way.)"""
    a = np.array([1, 1, 0, 1], bool)
    b = np.array([0, 1, 1, 0], bool)
    values, prob = exact_distribution(a.astype(float) - b)
    for ci in (0.5, 0.8, 0.95):
        r = paired_bootstrap(a, b, n_boot=50_000, seed=0, ci=ci)
        tail = (1 - ci) / 2
        lo = values[np.cumsum(prob) >= tail][0]
        hi = values[np.cumsum(prob[::-1])[::-1] >= tail][-1]
        assert (r["lo"], r["hi"]) == (pytest.approx(lo), pytest.approx(hi)), ci
        exact_p = 2 * min(prob[values <= 0].sum(), prob[values >= 0].sum())  # 2 * 0.375
        assert r["p_value"] == pytest.approx(exact_p, abs=0.015), ci


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


@pytest.mark.parametrize("ci", [0.95, 0.9, 0.99, 0.8])
@pytest.mark.parametrize("n_boot", [1000, 999, 2000, 137])
def test_p_below_the_level_exactly_when_the_interval_excludes_zero(ci, n_boot):
    """Many random paired cases, near the boundary on purpose (small true differences): the interval
    excludes 0 if and only if p < 1 - ci. Both come from the same resamples, so there is no
    "p = 0.071 with a CI excluding 0". The index-resampling path is checked in the next test."""
    g = np.random.default_rng(int(ci * 1000) + n_boot)
    alpha = round(1 - ci, 10)  # the level as written: 1 - 0.95 is 0.05000000000000004 in floats
    seen = {True: 0, False: 0}
    for t in range(150):
        n = int(g.integers(5, 300))
        b = g.random(n) < 0.5
        a = np.where(g.random(n) < g.uniform(0.05, 0.5), g.random(n) < 0.5 + g.uniform(-0.35, 0.35), b)
        r = paired_bootstrap(a, b, n_boot=n_boot, seed=t, ci=ci)
        excludes = r["lo"] > 0 or r["hi"] < 0
        assert excludes == (r["p_value"] < alpha), (t, r)
        assert r["lo"] <= r["hi"]
        seen[excludes] += 1
    assert min(seen.values()) >= 10, seen  # both outcomes were tested


def test_p_agrees_with_the_interval_on_index_resampling(monkeypatch):
    monkeypatch.setattr(bs, "_MAX_DISTINCT", 10)
    g = np.random.default_rng(5)
    seen = {True: 0, False: 0}
    for t in range(100):
        n = int(g.integers(10, 200))
        a, b = g.normal(g.uniform(-0.3, 0.3), 1, n), g.normal(0, 1, n)
        r = paired_bootstrap(a, b, n_boot=500, seed=t)
        excludes = r["lo"] > 0 or r["hi"] < 0
        assert excludes == (r["p_value"] < 0.05), (t, r)
        seen[excludes] += 1
    assert min(seen.values()) >= 10, seen


@pytest.mark.parametrize("case", [12, 16, 24])  # p about 0.035, 0.10 and 0.06
def test_p_value_inverts_the_interval(case):
    """p is the smallest 1 - ci at which the interval excludes 0: just above it the interval excludes
    0, just below it does not (the same seed gives the same resamples)."""
    g = np.random.default_rng(case)
    b = g.random(200) < 0.5
    a = np.where(g.random(200) < 0.15, g.random(200) < 0.65, b)
    p = paired_bootstrap(a, b, n_boot=2000, seed=3)["p_value"]
    assert 0.01 < p < 0.5
    wider = paired_bootstrap(a, b, n_boot=2000, seed=3, ci=1 - p * 0.98)
    narrower = paired_bootstrap(a, b, n_boot=2000, seed=3, ci=1 - p * 1.02)
    assert not (wider["lo"] > 0 or wider["hi"] < 0)
    assert narrower["lo"] > 0 or narrower["hi"] < 0


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
