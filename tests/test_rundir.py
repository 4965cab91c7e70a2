"""RunDir: the run-directory layout, its readers and writers (round trips, atomic writes, clear errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliptune.rundir import RunDir, load_per_query, save_per_query


def test_layout_names_every_file(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert rd.last_ckpt == tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert rd.best_ckpt.name == "best.ckpt" and rd.export.name == "export" and rd.export_start.name == "export_start"
    assert rd / rd.CSV == tmp_path / "run" / "csv" / "metrics.csv"
    assert not rd.is_run()
    rd.write_metrics({"after": {}})
    assert rd.is_run()


def test_json_round_trip_is_atomic_and_missing_reads_empty(tmp_path):
    rd = RunDir(tmp_path)
    assert rd.read_metrics() == {} and rd.read_results() == {}
    data = {"before": {"s": {"mean_R": 0.25}}, "after": {"s": {"mean_R": 0.5}}, "global_step": 3}
    rd.write_metrics(data)
    assert rd.read_metrics() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left


def test_broken_json_names_the_file(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"results.json: not valid JSON"):
        RunDir(tmp_path).read_results()
    (tmp_path / "metrics.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"metrics.json: expected \{'before'"):
        RunDir(tmp_path).read_metrics()


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_per_query_round_trip(tmp_path, suffix):
    hits = torch.rand(7, generator=torch.Generator().manual_seed(0)) < 0.5
    ranks = torch.arange(1, 8)
    keys = [f"k{i}" for i in range(7)]
    per_query = {"val": {"keys": keys, "t2i_R@1": hits, "t2i_rank": ranks}} if suffix == ".pt" else \
        {"val": {"t2i_R@1": hits, "t2i_rank": ranks}}
    path = save_per_query(tmp_path / f"pq{suffix}", per_query)
    back = load_per_query(path)
    np.testing.assert_array_equal(back["val"]["t2i_R@1"], hits.numpy())
    np.testing.assert_array_equal(back["val"]["t2i_rank"], ranks.numpy())
    if suffix == ".pt":
        assert back["val"]["keys"].tolist() == keys


def test_run_writes_per_query_and_config_by_name(tmp_path):
    rd = RunDir(tmp_path)
    name = rd.write_per_query({"val": {"keys": ["a", "b"], "i2t_R@5": torch.tensor([True, False])}})
    assert name == rd.PER_QUERY and load_per_query(tmp_path / name)["val"]["keys"].tolist() == ["a", "b"]
    rd.write_config("seed: 1\n", "- seed=1\n", "loss: clip\n")
    assert (tmp_path / rd.CONFIG).read_text() == "seed: 1\n"
    assert (tmp_path / rd.OVERRIDES).read_text() == "- seed=1\n"
    assert (tmp_path / rd.CHOICES).read_text() == "loss: clip\n"


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_per_query_keeps_the_evaluation_before_fine_tuning(tmp_path, suffix):
    """The hits before fine-tuning sit beside the last evaluation's, which stay where cliptune-eval and
    older files put them; a file without them reads as before (no "before" part)."""
    after = {"val": {"t2i_R@1": torch.tensor([True, True, False])}, "x/y": {"i2t_R@5": torch.tensor([True])}}
    before = {"val": {"t2i_R@1": torch.tensor([False, True, False])}}
    if suffix == ".pt":
        after["val"]["keys"] = before["val"]["keys"] = ["a", "b", "c"]
    path = save_per_query(tmp_path / f"pq{suffix}", after, before=before)
    got, got_before = load_per_query(path), load_per_query(path, before=True)
    assert sorted(got) == ["val", "x/y"] and list(got_before) == ["val"]
    assert got["val"]["t2i_R@1"].tolist() == [True, True, False]
    assert got_before["val"]["t2i_R@1"].tolist() == [False, True, False]
    if suffix == ".pt":  # the last evaluation stays at the top level: torch.load(...)[set] as before
        assert torch.load(path, weights_only=True)["val"]["keys"] == ["a", "b", "c"]
        assert got_before["val"]["keys"].tolist() == ["a", "b", "c"]
    old = save_per_query(tmp_path / f"old{suffix}", after)
    assert load_per_query(old, before=True) == {} and sorted(load_per_query(old)) == ["val", "x/y"]
    with pytest.raises(ValueError, match="set name 'before:val' starts with 'before:'"):
        save_per_query(tmp_path / f"bad{suffix}", {"before:val": after["val"]})


def test_run_dir_reads_back_what_it_wrote_keys_and_all(tmp_path):
    """Re-writing what was read (a resumed run keeps its first part's hits) round-trips, keys
    included, and the file still loads with weights_only."""
    rd = RunDir(tmp_path)
    assert rd.read_per_query() == {} and rd.read_per_query(before=True) == {}
    rd.write_per_query({}, before={"val": {"keys": ["a", "b"], "t2i_R@1": torch.tensor([True, False])}})
    again = rd.read_per_query(before=True)
    rd.write_per_query({"val": {"keys": ["a", "b"], "t2i_R@1": torch.tensor([True, True])}}, before=again)
    assert rd.read_per_query(rd.PER_QUERY, before=True)["val"]["keys"].tolist() == ["a", "b"]
    assert rd.read_per_query()["val"]["t2i_R@1"].tolist() == [True, True]
