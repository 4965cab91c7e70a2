"""A run killed with SIGKILL and resumed with ``resume=true`` ends exactly where the uninterrupted
run ends: same weights, same metrics, one unbroken metric history (no lost rows, no step twice), and
the per-query hits of its evaluation before fine-tuning. Also: one run per directory (a second one
refuses at once, naming the holder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cliptune.rundir import RunDir, RunDirBusyError, RunLock
from conftest import subprocess_env, train_cmd
from helpers_shards import basic_samples, write_shards


def _step_of(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # noqa: BLE001 - being written
        return -1


def _kill_after_checkpoint(args: list[str], last: Path, min_step: int, timeout: float = 300) -> int:
    proc = subprocess.Popen(train_cmd(*args), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                raise AssertionError(f"training ended before the kill ({proc.returncode}): "
                                     f"{proc.stderr.read().decode()[-3000:]}")
            if last.is_file() and _step_of(last) >= min_step:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("no checkpoint appeared")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return _step_of(last)


def _run(args: list[str]) -> None:
    done = subprocess.run(train_cmd(*args), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("data", ["synthetic", "wds"])
def test_killed_and_resumed_run_equals_the_uninterrupted_run(tmp_path, data):
    common = ["experiment=smoke", f"out_root={tmp_path}", "trainer.max_steps=36", "checkpoint_every=6",
              "trainer.val_check_interval=12", "trainer.log_every_n_steps=1", "export_start=false",
              "batch_size=16", "data.workers=2"]
    if data == "synthetic":
        common += ["data.num_samples=320"]  # 20 steps an epoch: the kill lands mid-epoch, the run crosses epochs
    else:
        shards = tmp_path / "shards"
        write_shards(shards, basic_samples(150, prefix="t"), 15, split="train")
        write_shards(shards, basic_samples(40, prefix="v"), 20, split="val")
        common += ["data=wds", f"data.train={shards}", f"data.val.domain={shards}", "data.resampled=false",
                   "data.samples_per_epoch=320", "data.sample_shuffle=20", "data.persistent_workers=false"]
    _run([*common, "name=whole"])
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    killed_at = _kill_after_checkpoint([*common, "name=cut"], last, min_step=18)
    assert 18 <= killed_at < 36
    _run([*common, "name=cut", "resume=true"])

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _step_of(cut / "checkpoints" / "last.ckpt") == 36
    a = load_file(str(whole / "export" / "open_clip_model.safetensors"))
    b = load_file(str(cut / "export" / "open_clip_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (whole, cut))
    for when in ("before", "after"):
        for k, v in ma[when]["synthetic" if data == "synthetic" else "domain"].items():
            assert mb[when][next(iter(mb[when]))][k] == pytest.approx(v, abs=1e-5), (when, k)

    # one unbroken history: the same rows (every step once), the same values
    ha, hb = pd.read_csv(whole / "csv" / "metrics.csv"), pd.read_csv(cut / "csv" / "metrics.csv")
    assert sorted(ha.columns) == sorted(hb.columns)
    ta, tb = ha[ha["train/loss"].notna()], hb[hb["train/loss"].notna()]
    assert tb["step"].is_unique and ta["step"].tolist() == tb["step"].tolist()
    torch.testing.assert_close(torch.tensor(tb["train/loss"].to_numpy()), torch.tensor(ta["train/loss"].to_numpy()),
                               rtol=1e-5, atol=1e-6)
    val = [c for c in ha.columns if c.startswith("val/") and c.endswith("mean_R")][0]
    va, vb = ha[ha[val].notna()], hb[hb[val].notna()]
    assert va["step"].tolist() == vb["step"].tolist() and len(va) >= 3
    assert vb[val].to_numpy() == pytest.approx(va[val].to_numpy(), abs=1e-5)
    assert not (cut / "csv" / "metrics.csv.resume").exists()
    # the per-query hits before fine-tuning, written in the killed part, survive the resume
    pa, pb = (RunDir(d).read_per_query(before=True) for d in (whole, cut))
    assert list(pa) == list(pb) and pa
    for name in pa:
        assert pa[name]["keys"].tolist() == pb[name]["keys"].tolist()
        assert (pa[name]["t2i_R@5"] == pb[name]["t2i_R@5"]).all()
        assert (pa[name]["t2i_rank"] == pb[name]["t2i_rank"]).all()


def _val(hits: list[bool], keys: list[str]) -> dict:
    """A validation result as ``ContrastiveModule.last_val`` holds it, for one set."""
    t = torch.tensor(hits)
    return {"s": {"metrics": {"t2i_R@1": float(t.float().mean())}, "chance": {"t2i_R@1": 0.25},
                  "per_query": {"t2i_R@1": t}, "keys": keys}}


def test_write_metrics_keeps_the_hits_before_fine_tuning_across_a_resume(tmp_path):
    """``_write_metrics`` as ``_run_locked`` calls it: right after the evaluation before fit, at the
    end of the killed part's resumed run (which does not evaluate "before" again), and at the end of a
    run whose last evaluation was the one before fit (those hits are not the fine-tuned model's)."""
    from cliptune.train.run import _write_metrics

    rd, keys = RunDir(tmp_path / "run"), ["a", "b", "c", "d"]
    before_val, after_val = _val([False, True, False, False], keys), _val([True, True, False, True], keys)
    _write_metrics(rd, {"s": {"t2i_R@1": 0.25}}, {}, {}, resumed=False, before_val=before_val)
    assert rd.read_per_query(before=True)["s"]["t2i_R@1"].tolist() == [False, True, False, False]
    assert rd.read_per_query() == {} and rd.read_metrics()["per_query"] == rd.PER_QUERY
    # the resumed process: no "before" of its own
    _write_metrics(rd, {}, {"s": {"t2i_R@1": 0.75}}, after_val, resumed=True)
    m = rd.read_metrics()
    assert m["before"] == {"s": {"t2i_R@1": 0.25}} and m["after"] == {"s": {"t2i_R@1": 0.75}}
    assert rd.read_per_query(m["per_query"], before=True)["s"]["t2i_R@1"].tolist() == [False, True, False, False]
    assert rd.read_per_query(m["per_query"])["s"]["t2i_R@1"].tolist() == [True, True, False, True]
    assert rd.read_per_query(before=True)["s"]["keys"].tolist() == keys
    # started over in place (overwrite=true): nothing of the old run is kept
    _write_metrics(rd, {}, {"s": {"t2i_R@1": 0.75}}, after_val, resumed=False)
    assert rd.read_per_query(before=True) == {}
    # eval.after=false and no validation during fit: last_val is still the evaluation before fit
    other = RunDir(tmp_path / "other")
    _write_metrics(other, {"s": {"t2i_R@1": 0.25}}, {}, before_val, resumed=False, before_val=before_val)
    assert other.read_per_query() == {} and list(other.read_per_query(before=True)) == ["s"]


def test_second_run_on_a_busy_name_refuses_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "busy"
    with RunLock(run_dir):
        done = subprocess.run(train_cmd("experiment=smoke", f"out_root={tmp_path}", "name=busy"), env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        assert f"PID {os.getpid()}" in done.stderr and "in use" in done.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing of the other run touched
        with pytest.raises(RunDirBusyError, match=str(os.getpid())):
            RunLock(run_dir).acquire()
    RunLock(run_dir).acquire().release()  # free again once the holder is gone


def test_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from cliptune.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"), str(tmp_path / "r")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusyError, match=str(holder.pid)):
            RunLock(tmp_path / "r").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(tmp_path / "r").acquire().release()  # no stale lock after a SIGKILL
