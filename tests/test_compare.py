"""`cliptune-compare` on two real (tiny) runs, laid out as a Hydra multirun of loss=clip,siglip:
tables hold the numbers of metrics.json, plots are PNGs, the paired CIs hold the observed difference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from cliptune.eval.compare import compare_runs, load_per_query, load_run, main, save_per_query, write_run_metrics
from test_eval_cli import train_run

PLOTS = ("recall_at_k.png", "train_loss.png", "val_mean_R.png")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    train_run(root, "sweep", "loss=clip", subdir="loss=clip")
    train_run(root, "sweep", "loss=siglip", "loss.init_logit_bias=-3", subdir="loss=siglip")
    return root


def _after(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["after"]["synthetic"]


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) > 100


def test_tables_plots_and_cis(sweep, tmp_path):
    out = tmp_path / "cmp"
    res = compare_runs([sweep], out, n_boot=2000, show=False)  # the multirun folder expands to its runs
    clip, sig = sweep / "loss=clip", sweep / "loss=siglip"
    assert [r.path for r in res["runs"]] == [clip, sig]
    a, b = _after(clip), _after(sig)

    # CSV: one row per run, the final numbers of metrics.json
    csv = pd.read_csv(out / "comparison.csv")
    assert list(csv["dir"]) == [str(clip), str(sig)]
    for i, m in enumerate((a, b)):
        for k in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "mean_R", "zs_top1"):
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
    assert set(ci["metric"]) >= {"t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "zs_top1"}
    for row in ci.itertuples(index=False):
        assert row.diff == pytest.approx(b[row.metric] - a[row.metric], abs=1e-12), row.metric
        assert row.run_value == pytest.approx(b[row.metric]) and row.baseline_value == pytest.approx(a[row.metric])
        assert row.lo <= row.diff <= row.hi, row
        assert row.n == (128 if row.metric.startswith("t2i") else 64)
    assert (ci["hi"] > ci["lo"]).any()


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
    assert "90% CI" in (out / "comparison.md").read_text()


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
    from cliptune.eval.cli import run
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
