"""`cliptune-compare` on a Hydra multirun of loss=clip,siglip: tables hold the numbers of
metrics.json, plots are PNGs, the paired CIs hold the observed difference and find the true one,
and each run's fine-tuning gain (after - before, paired) matches a brute-force bootstrap.

Most tests read runs whose files are written here, in the formats cliptune-train writes, with
per-query hits drawn so that the true difference between the runs is known; one slow test trains
two real runs and compares them.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from cliptune.eval.compare import build_parser, main
from cliptune.eval.compare_load import RunData, find_runs, load_run, write_run_metrics
from cliptune.eval.compare_plots import plot_val_mean_r, val_mean_r_curves
from cliptune.eval.compare_report import compare_runs
from cliptune.rundir import load_per_query, save_per_query

PLOTS = ("recall_at_k.png", "train_loss.png", "val_mean_R.png")
RETRIEVAL = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10")

# The synthetic validation set: 64 images with 2 captions each, 44 concepts for zero-shot.
N_IMG, N_TXT, N_CLASSES = 64, 128, 44
KS = (1, 5, 10)
# A query's rank is 1 + floor(n * u ** gamma) for a uniform u, so P(rank <= k) = (k / n) ** (1 / gamma):
# a larger gamma is a better model. The runs share each query's u, except for 30% redrawn, so they
# are paired and either can win a query; u stays uniform, so the true difference is known exactly.
GAMMA = {"before": 1.0, "clip": 2.0, "siglip": 6.0}
ZS_GAMMA = 1.5  # the same for both runs: no true zero-shot difference
LOSS_CLASS = {"clip": "ClipLoss", "siglip": "SigLipLoss"}


def true_diff(metric: str) -> float:
    """Expected siglip - clip of a retrieval metric (t2i ranks among images, i2t among captions)."""
    direction, k = metric.split("_R@")
    p = int(k) / (N_IMG if direction == "t2i" else N_TXT)
    return p ** (1 / GAMMA["siglip"]) - p ** (1 / GAMMA["clip"])


def _per_query(gamma: float, u_t2i: torch.Tensor, u_i2t: torch.Tensor, u_zs: torch.Tensor) -> dict:
    """The per-query values of one run, as cliptune-train saves them in per_query.pt."""
    t2i = 1 + (N_IMG * u_t2i**gamma).long()  # [N_TXT] 1-based rank of each caption's image
    i2t = 1 + (N_TXT * u_i2t**gamma).long()  # [N_IMG] rank of each image's best caption
    zs = 1 + (N_CLASSES * u_zs**ZS_GAMMA).long()  # [N_IMG] rank of each image's concept
    return {"keys": [f"{i:08d}" for i in range(N_IMG)],
            **{f"t2i_R@{k}": t2i <= k for k in KS}, **{f"i2t_R@{k}": i2t <= k for k in KS},
            "t2i_rank": t2i, "i2t_rank": i2t, "zs_top1": zs <= 1, "zs_top5": zs <= 5}


def _summary(pq: dict, loss: float) -> dict[str, float]:
    """The metrics of metrics.json computed from per-query values, in cliptune-train's order."""
    m = {k: float(pq[k].float().mean()) for k in RETRIEVAL}
    m["mean_R"] = sum(m.values()) / len(RETRIEVAL)
    for d in ("t2i", "i2t"):
        m[f"{d}_median_rank"] = float(pq[f"{d}_rank"].float().median())
        m[f"{d}_mean_rank"] = float(pq[f"{d}_rank"].float().mean())
    m["loss"] = loss
    m.update(zs_top1=float(pq["zs_top1"].float().mean()), zs_top5=float(pq["zs_top5"].float().mean()))
    m.update(zs_balanced_acc=m["zs_top1"], zs_n=float(N_IMG))
    return m


def _config(root: Path, run_dir: Path, loss: str) -> dict:
    """The part of the composed config the runs share, plus what loss=<loss> changes."""
    scale, bias = (math.log(10), -3) if loss == "siglip" else (math.log(1 / 0.07), None)
    return {
        "model": {"_target_": "cliptune.models.build_model", "name": "cliptune-tiny", "pretrained": None,
                  "init_logit_scale": scale, "init_logit_bias": bias},
        "loss": {"fn": {"_target_": f"cliptune.train.losses.{LOSS_CLASS[loss]}", "positives": "pair"},
                 "init_logit_scale": scale, "init_logit_bias": bias, "max_logit_scale": math.log(100),
                 "add_logit_bias": False},
        "data": {"_target_": "cliptune.data.synthetic.SyntheticDataModule", "num_samples": 192,
                 "val_samples": N_IMG, "batch_size": 32, "workers": 0, "seed": 0},
        "optim": {"_target_": "cliptune.train.optim.OptimConfig", "lr": 0.001, "betas": [0.9, 0.98],
                  "warmup_steps": 5, "schedule": "cosine"},
        "trainer": {"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "max_steps": 6,
                    "val_check_interval": 3},
        "logger": {"csv": {"_target_": "cliptune.train.loggers.CSVLogger", "save_dir": str(run_dir), "name": "csv"}},
        "callbacks": {"last": {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                               "dirpath": str(run_dir / "checkpoints"), "filename": "last"}},
        "name": "sweep", "out_root": str(root), "seed": 0, "batch_size": 32,
        "eval": {"before": True, "after": True, "monitor": None},
    }


def write_run(root: Path, loss: str, overrides: list[str], before: dict, after: dict, g: torch.Generator) -> Path:
    """``root/loss=<loss>`` with the files cliptune-train writes: metrics.json + per_query.pt (the
    last evaluation and the one before fine-tuning, `_write_metrics`), config.yaml, overrides.yaml,
    choices.yaml (`save_config`) and the CSV logger's csv/metrics.csv and csv/hparams.yaml."""
    run = root / f"loss={loss}"
    (run / "csv").mkdir(parents=True)
    cfg = _config(root, run, loss)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    choices = {"experiment": "smoke", "lora": "none", "callbacks": "default", "logger": "csv", "trainer": "cpu",
               "optim": "adamw", "data": "synthetic", "loss": loss, "model": "tiny"}
    (run / "choices.yaml").write_text(yaml.safe_dump(choices, sort_keys=False))
    hparams = {"hydra": {"overrides": {"hydra": [], "task": overrides}}, **cfg, "loss": LOSS_CLASS[loss]}
    (run / "csv" / "hparams.yaml").write_text(yaml.safe_dump(hparams, sort_keys=False))

    save_per_query(run / "per_query.pt", {"synthetic": after}, before={"synthetic": before})
    b, a = _summary(before, 3.85), _summary(after, 3.4 if loss == "clip" else 3.1)
    chance = {f"t2i_R@{k}": k / N_IMG for k in KS} | {f"i2t_R@{k}": k / N_TXT for k in KS}
    doc = {"before": {"synthetic": b}, "after": {"synthetic": a}, "chance": {"synthetic": chance},
           "global_step": 6, "fit_seconds": 2.5, "nonfinite_steps": 0, "per_query": "per_query.pt"}
    (run / "metrics.json").write_text(json.dumps(doc, indent=2))

    # Lightning's CSVLogger: one row per logging call, a blank cell for every metric not in it; the
    # last validation during fit (after the 6th step, logged at step 5) is repeated by the
    # evaluation after fit, logged at step 6 (as a real run's file holds them)
    steps = range(6)
    noise = 0.05 * torch.randn(len(steps), generator=g)
    rows = [{"epoch": 0, "step": s, "train/loss": 4.2 * 0.95**s + float(n), "train/logit_scale": 14.2}
            for s, n in zip(steps, noise)]
    for s, mean_r in ((0, b["mean_R"]), (2, (b["mean_R"] + a["mean_R"]) / 2), (5, a["mean_R"]), (6, a["mean_R"])):
        rows.append({"epoch": 0 if s < 6 else 1, "step": s, "val/synthetic/mean_R": mean_r, "val/synthetic/loss": 3.5})
    pd.DataFrame(rows).to_csv(run / "csv" / "metrics.csv", index=False)
    return run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A multirun folder ``sweep/{loss=clip,loss=siglip}`` written file by file."""
    root = tmp_path_factory.mktemp("sweep")
    g = torch.Generator().manual_seed(0)
    u = torch.rand(N_TXT, generator=g), torch.rand(N_IMG, generator=g), torch.rand(N_IMG, generator=g)
    before = _per_query(GAMMA["before"], torch.rand(N_TXT, generator=g), torch.rand(N_IMG, generator=g),
                        torch.rand(N_IMG, generator=g))
    common = ["experiment=smoke", "trainer.max_steps=6", "trainer.val_check_interval=3", "data.num_samples=192",
              f"data.val_samples={N_IMG}", f"out_root={root}", "name=sweep"]

    def redraw(u: torch.Tensor) -> torch.Tensor:  # 30% of the queries, still uniform
        return torch.where(torch.rand(u.shape, generator=g) < 0.3, torch.rand(u.shape, generator=g), u)

    for loss, draws, extra in (("clip", u, []), ("siglip", [redraw(x) for x in u], ["loss.init_logit_bias=-3"])):
        write_run(root, loss, [*common, f"loss={loss}", *extra], before, _per_query(GAMMA[loss], *draws), g)
    return root


def _after(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["after"]["synthetic"]


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100


def _check_tables_plots_and_cis(sweep: Path, out: Path) -> pd.DataFrame:
    """What a comparison of ``sweep/{loss=clip,loss=siglip}`` must show; returns the CI table."""
    res = compare_runs([sweep], out, n_boot=2000, show=False)  # the multirun folder expands to its runs
    clip, sig = sweep / "loss=clip", sweep / "loss=siglip"
    assert [r.path for r in res["runs"]] == [clip, sig]
    a, b = _after(clip), _after(sig)

    # CSV: one row per run, the final numbers of metrics.json
    csv = pd.read_csv(out / "comparison.csv")
    assert list(csv["dir"]) == [str(clip), str(sig)]
    for i, m in enumerate((a, b)):
        for k in (*RETRIEVAL, "mean_R", "zs_top1"):
            assert csv.loc[i, f"synthetic/{k}"] == pytest.approx(m[k], abs=1e-12), k
    # runs are named by their differing overrides; "differs" says what changed
    assert list(csv["run"]) == ["loss=clip", "loss=siglip,loss.init_logit_bias=-3"]
    assert "loss=siglip" in csv.loc[1, "differs"] and "loss.init_logit_bias=-3" in csv.loc[1, "differs"]
    assert csv.loc[0, "differs"].startswith("loss=clip")

    # Markdown: the same numbers, rounded
    md = (out / "comparison.md").read_text()
    for m in (a, b):
        assert f"{m['t2i_R@5']:.4f}" in md and f"{m['mean_R']:.4f}" in md
    assert "## Config differences" in md and "SigLipLoss" in md
    for p in PLOTS:
        assert f"]({p})" in md
        _assert_png(out / p)

    # Paired bootstrap: diff = siglip - clip from metrics.json, inside its own 95% CI
    ci = pd.read_csv(out / "bootstrap_ci.csv")
    assert set(ci["metric"]) >= {*RETRIEVAL, "zs_top1"}
    for row in ci.itertuples(index=False):
        assert row.diff == pytest.approx(b[row.metric] - a[row.metric], abs=1e-12), row.metric
        assert row.run_value == pytest.approx(b[row.metric]) and row.baseline_value == pytest.approx(a[row.metric])
        assert row.lo <= row.diff <= row.hi, row
        assert row.n == (128 if row.metric.startswith("t2i") else 64)
    assert (ci["hi"] > ci["lo"]).any()

    # Fine-tuning gain: after - before of each run, from metrics.json, inside its own paired CI
    gain = pd.read_csv(out / "finetune_gain.csv")
    assert list(gain.columns) == ["run", "set", "metric", "before", "after", "gain", "lo", "hi", "p_value", "n"]
    assert sorted(set(gain["run"])) == sorted(csv["run"])
    for row in gain.itertuples(index=False):
        m = a if row.run == csv.loc[0, "run"] else b
        before = json.loads(((clip if m is a else sig) / "metrics.json").read_text())["before"]["synthetic"]
        assert row.after == pytest.approx(m[row.metric], abs=1e-12)
        assert row.before == pytest.approx(before[row.metric], abs=1e-12)
        assert row.gain == pytest.approx(row.after - row.before, abs=1e-12)
        assert row.lo <= row.gain <= row.hi and (row.lo > 0 or row.hi < 0) == (row.p_value < 0.05), row
    assert "## Fine-tuning gain" in md and "p < 0.05 exactly when the 95% CI excludes 0" in md
    return ci


def test_tables_plots_and_cis(sweep, tmp_path):
    ci = _check_tables_plots_and_cis(sweep, tmp_path / "cmp").set_index("metric")
    # against the per-query hits themselves: the mean of the paired differences
    pq = {loss: torch.load(sweep / f"loss={loss}" / "per_query.pt", weights_only=True)["synthetic"]
          for loss in ("clip", "siglip")}
    # and a CI as wide as the normal approximation's (mean of the paired differences +- 1.96 SE)
    se = {}
    for m in (*RETRIEVAL, "zs_top1", "zs_top5"):
        d = pq["siglip"][m].double() - pq["clip"][m].double()
        assert ci.loc[m, "diff"] == pytest.approx(d.mean().item(), abs=1e-12), m
        assert (d < 0).any() and (d > 0).any(), m  # either run wins some queries
        se[m] = d.std(unbiased=False).item() / math.sqrt(d.numel())
        assert ci.loc[m, "hi"] - ci.loc[m, "lo"] == pytest.approx(2 * 1.96 * se[m], rel=0.25), m
    # against the truth the hits were drawn from (siglip better at retrieval, equal at zero-shot):
    # the difference is found, and the observed one lies within 4 standard errors of the true one
    for m in RETRIEVAL:
        assert ci.loc[m, "lo"] > 0 and ci.loc[m, "p_value"] < 0.01, m
        assert abs(ci.loc[m, "diff"] - true_diff(m)) <= 4 * se[m], (m, ci.loc[m, "diff"], true_diff(m))
    for m in ("zs_top1", "zs_top5"):
        assert abs(ci.loc[m, "diff"]) <= 4 * se[m], (m, ci.loc[m, "diff"])


@pytest.mark.slow
def test_trained_runs_compare(tmp_path):
    """Two real (tiny) runs, laid out as a Hydra multirun: the files cliptune-train writes."""
    from test_eval_cli import train_run

    root = tmp_path / "sweep"
    train_run(root, "sweep", "loss=clip", subdir="loss=clip")
    train_run(root, "sweep", "loss=siglip", "loss.init_logit_bias=-3", subdir="loss=siglip")
    _check_tables_plots_and_cis(root, tmp_path / "cmp")
    assert load_run(root / "loss=clip").choices["loss"] == "clip"
    assert load_run(root / "loss=siglip").curves is not None


def test_differs_names_the_group_option_a_run_kept(sweep, tmp_path):
    """A run that kept a group's default (no loss= override) against one that overrode it is
    described by its option (loss=clip) from choices.yaml, not by every key of the group."""
    kept = tmp_path / "kept"
    shutil.copytree(sweep / "loss=clip", kept)
    ov = [o for o in yaml.safe_load((kept / "overrides.yaml").read_text()) if o != "loss=clip"]
    (kept / "overrides.yaml").write_text(yaml.safe_dump(ov))
    assert (kept / "choices.yaml").is_file() and load_run(kept).choices["loss"] == "clip"
    compare_runs([kept, sweep / "loss=siglip"], tmp_path / "cmp", n_boot=10, show=False)
    csv = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    differs = csv.loc[0, "differs"].split(", ")
    assert differs[0] == "loss=clip" and not any(d.startswith("loss.") for d in differs), differs
    assert csv.loc[1, "differs"].startswith("loss=siglip")
    (kept / "choices.yaml").unlink()  # without it: the differing config values, as before
    compare_runs([kept, sweep / "loss=siglip"], tmp_path / "cmp2", n_boot=10, show=False)
    csv = pd.read_csv(tmp_path / "cmp2" / "comparison.csv")
    assert "loss.fn._target_=" in csv.loc[0, "differs"]


def test_baseline_and_cli(sweep, tmp_path):
    out = tmp_path / "cli"
    main([str(sweep / "loss=clip"), "--baseline", str(sweep / "loss=siglip"), "--out", str(out),
          "--metric", "val/synthetic/t2i_R@5", "--metric", "synthetic/mean_R", "--n-boot", "200", "--ci", "0.9"])
    csv = pd.read_csv(out / "comparison.csv")
    assert list(csv.columns[:3]) == ["run", "dir", "differs"]
    assert {"synthetic/t2i_R@5", "synthetic/mean_R"} <= set(csv.columns)
    assert csv.loc[0, "dir"] == str(sweep / "loss=siglip")  # the baseline is added first
    ci = pd.read_csv(out / "bootstrap_ci.csv")
    assert list(ci["metric"]) == ["t2i_R@5"]  # mean_R has no per-query values
    assert ci.loc[0, "baseline"].startswith("loss=siglip")
    diff = _after(sweep / "loss=clip")["t2i_R@5"] - _after(sweep / "loss=siglip")["t2i_R@5"]
    assert ci.loc[0, "diff"] == pytest.approx(diff)
    assert "90% CI" in (out / "comparison.md").read_text()
    a = build_parser().parse_args(["runs/a", "--out", "cmp"])
    assert (a.n_boot, a.ci, a.baseline, a.metric) == (1000, 0.95, None, None)


def test_degrades_without_config_curves_or_per_query(sweep, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(sweep / "loss=clip", a)
    shutil.copytree(sweep / "loss=siglip", b)
    for f in ("config.yaml", "overrides.yaml"):
        (a / f).unlink()
        (b / f).unlink()
    # only the CSV logger's hparams.yaml left: still config differences (lossy), overrides from it
    r = load_run(a)
    assert r.config and r.curves is not None
    assert r.config["loss"] == "ClipLoss" and "loss=clip" in r.overrides
    shutil.rmtree(b / "csv")
    (b / "per_query.pt").unlink()
    res = compare_runs([a, b], tmp_path / "out", show=False)
    assert res["ci"].empty  # no per-query file in b: no CIs, but tables and the R@K plot
    assert (tmp_path / "out" / "comparison.csv").is_file()
    _assert_png(tmp_path / "out" / "recall_at_k.png")
    assert "No per-query results" in (tmp_path / "out" / "comparison.md").read_text()
    # nothing but metrics.json: the table still has the numbers
    shutil.rmtree(a / "csv")
    res = compare_runs([a, b], tmp_path / "out2", show=False)
    assert res["table"].loc[1, "synthetic/mean_R"] == pytest.approx(_after(b)["mean_R"])
    assert res["plots"]["train_loss"] is None and res["plots"]["val_mean_R"] is None
    assert "train_loss: no data" in (tmp_path / "out2" / "comparison.md").read_text()


def test_different_eval_sets_are_not_paired(tmp_path):
    for name, keys, hits in (("x", ["a", "b", "c", "d"], [1, 1, 1, 1]), ("y", ["a", "b", "c", "zz"], [1, 0, 0, 1])):
        run = tmp_path / name
        write_run_metrics(run, {"s": {"t2i_R@1": float(np.mean(hits))}})
        torch.save({"s": {"keys": keys, "t2i_R@1": torch.tensor(hits, dtype=torch.bool)}}, run / "per_query.pt")
        m = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps({**m, "per_query": "per_query.pt"}))
    res = compare_runs([tmp_path / "x", tmp_path / "y"], tmp_path / "out", show=False)
    assert res["ci"].empty  # same count, different samples: pairing them would be wrong
    assert res["table"]["s/t2i_R@1"].tolist() == [1.0, 0.5]


def test_per_query_roundtrip(tmp_path):
    d = {"set/a": {"t2i_R@1": torch.tensor([True, False]), "i2t_rank": np.array([3, 1])}}
    for name in ("pq.npz", "pq.pt"):
        save_per_query(tmp_path / name, d)
        back = load_per_query(tmp_path / name)
        assert back["set/a"]["t2i_R@1"].tolist() == [True, False]
        assert back["set/a"]["i2t_rank"].tolist() == [3, 1]


def test_compares_cliptune_eval_outputs(tmp_path):
    """Folders written by cliptune-eval (results.json + per_query.pt) compare like training runs."""
    from cliptune.eval.runner import run
    from test_eval_cli import eval_cfg

    g = torch.Generator().manual_seed(0)
    img = torch.randn(50, 8, generator=g)
    np.save(tmp_path / "img.npy", img.numpy())
    for name, noise in (("good", 0.3), ("bad", 3.0)):
        np.save(tmp_path / f"{name}.npy", (img + noise * torch.randn(50, 8, generator=g)).numpy())
        run(eval_cfg(tmp_path / name, f"embeddings.images={tmp_path / 'img.npy'}",
                     f"embeddings.texts={tmp_path / name}.npy"))
    res = compare_runs([tmp_path / "bad", tmp_path / "good"], tmp_path / "cmp", show=False)
    good = json.loads((tmp_path / "good" / "results.json").read_text())["sets"]["embeddings"]["metrics"]
    assert res["table"].loc[1, "embeddings/t2i_R@1"] == pytest.approx(good["t2i_R@1"])
    row = res["ci"].set_index("metric").loc["t2i_R@1"]
    assert row["lo"] > 0  # clearly better than the noisy embedder


def test_paired_bootstrap_refuses_nan_per_query_values():
    """A NaN per-query value made every resampled mean NaN and the p-value 1/(n_boot+1): a
    'significant' difference out of a broken run."""
    from cliptune.eval.bootstrap import paired_bootstrap

    a, b = np.array([1.0, np.nan, 0.0, np.nan, 1.0]), np.array([1.0, 0.0, 0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"^set 'domain' t2i_rank: 2 of 5 per-query values of hits_a are not finite"):
        paired_bootstrap(a, b, name="set 'domain' t2i_rank")
    with pytest.raises(ValueError, match=r"1 of 5 per-query values of hits_b are not finite"):
        paired_bootstrap(b, np.array([0.0, 1.0, np.inf, 0.0, 0.0]))


# ----------------------------------------------------------------------------- fine-tuning gain
def _exact_bootstrap(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All n^n equally likely resamples of the paired differences: (distinct means, probabilities)."""
    means = [d[list(idx)].mean() for idx in itertools.product(range(d.size), repeat=d.size)]
    values, counts = np.unique(np.round(means, 12), return_counts=True)
    return values, counts / counts.sum()


def _brute_force_paired(after: np.ndarray, before: np.ndarray, n_boot: int, seed: int) -> dict:
    """Textbook paired bootstrap: the same resampled queries for both evaluations."""
    rng = np.random.default_rng(seed)
    d = after.astype(float) - before
    boot = np.array([d[rng.integers(0, d.size, d.size)].mean() for _ in range(n_boot)])
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"lo": lo, "hi": hi, "p": min(1.0, 2 * min(np.mean(boot <= 0), np.mean(boot >= 0)))}


def test_finetune_gain_is_the_paired_bootstrap_of_after_minus_before(tmp_path, capsys):
    """Each run's after - before on the same queries, against exact enumeration (5 queries: 5^5
    resamples) and a brute-force loop (300 queries); a run without per-query hits before fine-tuning
    has no gain row, and reading it still works."""
    tiny_before = np.array([0, 1, 0, 1, 0], bool)
    tiny_after = np.array([1, 1, 0, 1, 1], bool)
    g = np.random.default_rng(0)
    big_before = g.random(300) < 0.3
    big_after = np.where(g.random(300) < 0.25, g.random(300) < 0.6, big_before)  # paired: most queries keep their hit
    keys = [f"k{i}" for i in range(300)]

    def hits(x: np.ndarray, k: list[str]) -> dict:
        return {"keys": k, "t2i_R@1": torch.from_numpy(x)}

    for name, ov in (("tuned", "loss=clip"), ("eval_only", "loss=siglip")):
        run = tmp_path / "runs" / name
        after = {"tiny": {"t2i_R@1": tiny_after.mean()}, "big": {"t2i_R@1": big_after.mean()}}
        before = {"tiny": {"t2i_R@1": tiny_before.mean()}, "big": {"t2i_R@1": big_before.mean()}}
        pq = {"tiny": hits(tiny_after, keys[:5]), "big": hits(big_after, keys)}
        pq_before = {"tiny": hits(tiny_before, keys[:5]), "big": hits(big_before, keys)} if name == "tuned" else None
        write_run_metrics(run, after, before, per_query=pq, per_query_before=pq_before)
        (run / "overrides.yaml").write_text(yaml.safe_dump([ov]))
        (run / "config.yaml").write_text(yaml.safe_dump({"loss": ov.split("=")[1]}))
    res = compare_runs([tmp_path / "runs"], tmp_path / "cmp", n_boot=20_000, seed=1)
    gain = pd.read_csv(tmp_path / "cmp" / "finetune_gain.csv").set_index("set")
    assert list(gain["run"]) == ["loss=clip", "loss=clip"] and res["gain"].shape[0] == 2

    values, prob = _exact_bootstrap(tiny_after.astype(float) - tiny_before)
    lo = values[np.cumsum(prob) >= 0.025][0]  # 0: P(no improved query drawn) = 0.6^5 = 0.078
    hi = values[np.cumsum(prob[::-1])[::-1] >= 0.025][-1]  # 0.8: P(4 or 5 of 5) = 0.087, P(5 of 5) = 0.010
    row = gain.loc["tiny"]
    assert (row["before"], row["after"], row["gain"], row["n"]) == (pytest.approx(0.4), pytest.approx(0.8),
                                                                    pytest.approx(0.4), 5)
    assert (row["lo"], row["hi"]) == (pytest.approx(lo), pytest.approx(hi)) == (pytest.approx(0.0), pytest.approx(0.8))
    assert row["p_value"] == pytest.approx(2 * prob[values <= 0].sum(), abs=0.01)  # 2 * 0.6^5

    ref = _brute_force_paired(big_after, big_before, n_boot=20_000, seed=2)
    row = gain.loc["big"]
    assert row["gain"] == pytest.approx(big_after.mean() - big_before.mean(), abs=1e-12)
    assert row["lo"] == pytest.approx(ref["lo"], abs=2 / 300 + 0.003)
    assert row["hi"] == pytest.approx(ref["hi"], abs=2 / 300 + 0.003)
    assert row["p_value"] == pytest.approx(ref["p"], abs=0.01)
    # pairing is what makes the interval this narrow: resampling the two evaluations apart is wider
    rng = np.random.default_rng(3)
    unpaired = [big_after[rng.integers(0, 300, 300)].mean() - big_before[rng.integers(0, 300, 300)].mean()
                for _ in range(4000)]
    assert row["hi"] - row["lo"] < 0.8 * np.subtract(*np.quantile(unpaired, [0.975, 0.025]))

    md = (tmp_path / "cmp" / "comparison.md").read_text()
    section = md.split("## Fine-tuning gain")[1].split("## Config differences")[0]
    assert "paired bootstrap 95% CI of after − before" in section and "| loss=clip | big | t2i_R@1 |" in section
    assert "loss=siglip" not in section
    printed = capsys.readouterr().out
    assert "Fine-tuning gain" in printed and "excludes 0" in printed


def test_per_query_files_without_the_before_evaluation_still_read(tmp_path):
    """A per_query.pt written before the evaluation before fine-tuning was kept: the runs compare,
    with no gain rows."""
    for name, hits in (("x", [1, 1, 0, 1]), ("y", [1, 0, 0, 1])):
        run = tmp_path / name
        write_run_metrics(run, {"s": {"t2i_R@1": float(np.mean(hits))}}, before={"s": {"t2i_R@1": 0.25}})
        torch.save({"s": {"keys": list("abcd"), "t2i_R@1": torch.tensor(hits, dtype=torch.bool)}}, run / "per_query.pt")
        m = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps({**m, "per_query": "per_query.pt"}))
    res = compare_runs([tmp_path / "x", tmp_path / "y"], tmp_path / "out", n_boot=100, show=False)
    assert len(res["ci"]) == 1 and res["gain"].empty
    assert load_run(tmp_path / "x").per_query(before=True) == {}
    assert "No run holds per-query hits of both" in (tmp_path / "out" / "comparison.md").read_text()


# ----------------------------------------------------------------------------- sweep layouts
def _simple_run(path: Path, overrides: list[str], value: float, finished: bool = True) -> Path:
    """A run folder as cliptune-train leaves it: overrides.yaml + config.yaml, and metrics.json once
    finished (checkpoints/ only while it runs)."""
    path.mkdir(parents=True)
    (path / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    cfg = {"seed": 0, **{k: v for k, v in (o.split("=", 1) for o in overrides)}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    if finished:
        write_run_metrics(path, {"s": {"t2i_R@1": value, "mean_R": value}})
    else:
        (path / "checkpoints").mkdir()
    return path


def test_finds_runs_in_any_sweep_layout(tmp_path):
    """Hydra multirun folders named by overrides, folders a slash in an override value nested
    (old layout), numbered jobs, unfinished runs: found at any depth, in numeric order, named by the
    overrides that differ, an absolute path whole."""
    root = tmp_path / "runs"
    multi = [_simple_run(root / "multi" / f"loss={loss}", [f"loss={loss}"], v)
             for loss, v in (("clip", 0.5), ("siglip", 0.6))]
    _simple_run(multi[0] / "eval", [], 0.1)  # a run's own subfolders are not runs of the sweep
    _simple_run(root / "multi" / ".cache" / "x", [], 0.1)  # nor hidden folders
    # `cliptune-train -m data.train=/abs/p1,/abs/deeper/p2 loss=clip` with override_dirname in the run dir
    nested = [_simple_run(root / "nested" / f"data.train={p},loss=clip", [f"data.train={p}", "loss=clip"], v)
              for p, v in (("/abs/deeper/p2", 0.4), ("/abs/p1", 0.3))]  # in path order: "deeper" < "p1,..."
    assert nested[0] == root / "nested" / "data.train=" / "abs" / "deeper" / "p2,loss=clip"
    numbered = {i: _simple_run(root / "numbered" / str(i), ["seed=0"], i / 20, finished=i != 3)
                for i in (0, 1, 2, 3, 10)}

    assert find_runs([root / "multi"]) == multi
    assert find_runs([root / "nested"]) == nested
    assert find_runs([root / "numbered"]) == [numbered[i] for i in (0, 1, 2, 3, 10)]
    assert find_runs([root]) == [*multi, *nested, *(numbered[i] for i in (0, 1, 2, 3, 10))]
    assert find_runs([multi[0]]) == [multi[0]]  # a run stands for itself
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds none at any depth"):
        find_runs([tmp_path / "empty"])

    res = compare_runs([root / "nested"], tmp_path / "cmp_nested", n_boot=10, show=False)
    assert [r.name for r in res["runs"]] == ["data.train=/abs/deeper/p2", "data.train=/abs/p1"]
    assert res["table"]["s/t2i_R@1"].tolist() == [0.4, 0.3]
    md = (tmp_path / "cmp_nested" / "comparison.md").read_text()
    assert "| data.train=/abs/deeper/p2 | " in md and f"| {nested[0]} |" in md  # whole values, no ellipsis

    res = compare_runs([root / "numbered"], tmp_path / "cmp_numbered", n_boot=10, show=False)
    assert [r.name for r in res["runs"]] == [f"numbered/{i}" for i in (0, 1, 2, 3, 10)]
    assert math.isnan(res["table"].set_index("run").loc["numbered/3", "s/t2i_R@1"])  # unfinished: no numbers yet

    res = compare_runs([root], tmp_path / "cmp_all", n_boot=10, show=False)
    names = [r.name for r in res["runs"]]
    assert names[:4] == ["loss=clip", "loss=siglip", "loss=clip,data.train=/abs/deeper/p2",
                         "loss=clip,data.train=/abs/p1"]
    # the same overrides: the folder tells them apart
    assert names[4:] == [f"seed=0 [numbered/{i}]" for i in (0, 1, 2, 3, 10)]


# ----------------------------------------------------------------------------- curves
def test_val_mean_r_has_one_point_per_evaluation(sweep, tmp_path):
    """The evaluation after fit repeats the last in-training validation one step later (steps 29 and
    30 of a 30-step run): one point. A different value one step later, or a validation earlier in
    the run, stays; a step logged twice is drawn once."""
    assert [list(x) for x, _ in val_mean_r_curves(load_run(sweep / "loss=clip")).values()] == [[0, 2, 6]]

    def curve(rows: list[tuple[int, float]]) -> list[int]:
        df = pd.DataFrame([{"step": s, "val/a/mean_R": v} for s, v in rows]
                          + [{"step": s, "train/loss": 1.0} for s in range(0, 31, 5)])
        (x, y), = val_mean_r_curves(RunData(path=tmp_path, curves=df)).values()
        assert len(set(x)) == len(x) == len(y)
        return list(x)

    assert curve([(0, 0.1), (14, 0.2), (29, 0.3), (30, 0.3)]) == [0, 14, 30]
    assert curve([(0, 0.1), (14, 0.2), (30, 0.3)]) == [0, 14, 30]  # last validation before the last step
    assert curve([(0, 0.1), (14, 0.2), (29, 0.3), (30, 0.31)]) == [0, 14, 29, 30]  # not the same evaluation
    assert curve([(0, 0.1), (14, 0.2), (30, 0.3), (30, 0.3)]) == [0, 14, 30]  # one step, logged twice
    run = RunData(path=tmp_path, name="r", curves=pd.DataFrame({"step": [0, 29, 30], "val/a/mean_R": [0.1, 0.3, 0.3]}))
    _assert_png(plot_val_mean_r([run], tmp_path / "v.png"))


@pytest.mark.parametrize("args,line", [
    (["--metric", "val/synthetic/t2i_R@6"], "error: --metric 'val/synthetic/t2i_R@6': no run reports it; choose from "),
    (["--metric", "nonsense"], "error: --metric 'nonsense': no run reports it; choose from "),
    (["--baseline", "no/such/run"], "error: run directory 'no/such/run' does not exist"),
])
def test_cli_errors_are_one_line_naming_the_choice(sweep, tmp_path, capsys, monkeypatch, args, line):
    monkeypatch.delenv("CLIPTUNE_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as info:
        main([str(sweep), "--out", str(tmp_path / "cmp"), *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(line) and err.count("\n") == 1, err
    if "choose from" in line:
        assert "val/synthetic/t2i_R@5" in err and "val/synthetic/mean_R" in err
    assert not (tmp_path / "cmp").exists()  # nothing written
    monkeypatch.setenv("CLIPTUNE_TRACEBACK", "1")  # the traceback, for debugging
    with pytest.raises((ValueError, FileNotFoundError)):
        main([str(sweep), "--out", str(tmp_path / "cmp"), *args])
