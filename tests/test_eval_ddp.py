"""Evaluation is exact across processes: a 2-process (gloo) training run's in-training validation,
a 1-process `cliptune-eval` of its export, and a 2-process `torchrun cliptune-eval` all agree.

Batches have the same shapes on every path (16 images): CPU kernels may round an embedding
differently (~1e-7) for other batch shapes, which can flip exact near-ties of a barely trained model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cliptune.eval.runner import run
from test_eval_cli import eval_cfg, synthetic_val_shards

pytestmark = pytest.mark.ddp

TOL = 1e-5


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evalddp")
    # Lightning re-launches `python -m cliptune.train.cli` for rank 1: a real 2-process gloo run.
    proc = subprocess.run(
        [sys.executable, "-m", "cliptune.train.cli", "experiment=smoke", "trainer=ddp_cpu", "batch_size=16",
         "trainer.max_steps=4", "trainer.val_check_interval=4", "data.num_samples=256", "data.val_samples=64",
         "eval.before=false", f"out_root={root}", "name=ddp"],
        env=_env(), capture_output=True, text=True, timeout=300)
    _check(proc, "2-process training")
    return {"run": root / "ddp", "shards": synthetic_val_shards(root / "shards", per_shard=16), "root": root}


def test_ddp_validation_equals_single_process_eval(ddp_run, tmp_path):
    run_dir = ddp_run["run"]
    after = json.loads((run_dir / "metrics.json").read_text())["after"]["synthetic"]
    res = run(eval_cfg(tmp_path / "ev", f"load={run_dir}", f"+sets.synthetic={ddp_run['shards']}", "batch_size=16"))
    got = res["synthetic"]["metrics"]
    assert set(got) == set(after) - {"loss"}
    for k, v in got.items():
        assert v == pytest.approx(after[k], abs=TOL), k
    # the same queries, hit for hit
    train_pq = torch.load(run_dir / "per_query.pt", weights_only=True)["synthetic"]
    assert train_pq["keys"] == res["synthetic"]["keys"]
    assert torch.equal(train_pq["t2i_rank"], res["synthetic"]["per_query"]["t2i_rank"])


def test_torchrun_eval_equals_single_process(ddp_run, tmp_path):
    run_dir, shards = ddp_run["run"], ddp_run["shards"]
    single = run(eval_cfg(tmp_path / "one", f"load={run_dir}", f"sets={shards}", "batch_size=16"))["shards"]
    out = tmp_path / "two"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cliptune.eval.cli", f"load={run_dir}", f"sets={shards}", "device=cpu", "workers=1",
         "batch_size=16", f"out={out}", f"hydra.run.dir={out}"],
        env=_env(), capture_output=True, text=True, timeout=300)
    _check(proc, "torchrun cliptune-eval")
    doc = json.loads((out / "results.json").read_text())
    assert doc["world_size"] == 2
    got = doc["sets"]["shards"]
    assert got["n_images"] == single["n_images"] == 64
    for k, v in single["metrics"].items():
        assert got["metrics"][k] == pytest.approx(v, abs=TOL), k
    pq_two = torch.load(out / "per_query.pt", weights_only=True)["shards"]
    assert pq_two["keys"] == single["keys"]
    assert torch.equal(pq_two["i2t_rank"], single["per_query"]["i2t_rank"])
