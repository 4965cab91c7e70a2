"""A non-finite loss or gradient never reaches the weights, a checkpoint or an export: by default the
run stops naming the step; with ``on_nonfinite=skip`` the step is dropped and counted. Invalid
settings are refused before anything is written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from cliptune.train import run as train_run
from cliptune.train.module import ContrastiveModule, NonFiniteError, nonfinite_entries
from cliptune.rundir import load_torch_file
from conftest import compose_train, subprocess_env, train_cmd


def _finite_checkpoints(run: Path) -> list[Path]:
    ckpts = sorted((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").is_dir() else []
    for c in ckpts:
        assert not nonfinite_entries(load_torch_file(c)["state_dict"]), c
    return ckpts


def test_diverging_run_stops_at_the_first_nonfinite_step(tmp_path):
    """The reported case: lr 1e4 without clipping. Before, the NaN model scored R@1 = 1.0 and
    became best.ckpt, exit code 0."""
    cfg = compose_train(["experiment=smoke", f"out_root={tmp_path}", "name=nan", "optim.lr=1e4", "optim.grad_clip=0",
                         "optim.warmup_steps=0", "trainer.max_steps=10", "trainer.val_check_interval=5",
                         "checkpoint_every=1", "export_start=false"], run_dir=tmp_path / "nan")
    with pytest.raises(NonFiniteError, match=r"step \d+: the (loss|gradient norm) is (nan|inf).*optim.lr=10000"):
        train_run.run(cfg)
    run = tmp_path / "nan"
    assert _finite_checkpoints(run)  # checkpoints up to the step before, all finite
    assert not (run / "export").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["after"] == {}  # no "after" figure for a diverged model


class _Poison:
    """Makes chosen steps non-finite: the gradient (loss finite) or the loss itself."""

    def __init__(self, grad_calls: set[int], loss_calls: set[int]) -> None:
        self.grad_calls, self.loss_calls, self.calls = grad_calls, loss_calls, 0
        self.original = ContrastiveModule.contrastive_backward

    def __call__(self, module, batch, backward):
        self.calls += 1
        loss = self.original(module, batch, backward)
        if self.calls in self.grad_calls:
            next(p for p in module.parameters() if p.grad is not None).grad.fill_(float("nan"))
        if self.calls in self.loss_calls:
            loss = loss * float("inf")
        return loss


def _poisoned_run(tmp_path, monkeypatch, name, grad_calls, loss_calls, *overrides):
    poison = _Poison(set(grad_calls), set(loss_calls))
    monkeypatch.setattr(ContrastiveModule, "contrastive_backward", lambda self, b, bw: poison(self, b, bw))
    cfg = compose_train(["experiment=smoke", f"out_root={tmp_path}", f"name={name}", "trainer.max_steps=8",
                         "trainer.val_check_interval=4", "checkpoint_every=2", "export_start=false",
                         "eval.before=false", *overrides], run_dir=tmp_path / name)
    return train_run.run(cfg), tmp_path / name


def test_skip_drops_and_counts_nonfinite_steps(tmp_path, monkeypatch):
    res, run = _poisoned_run(tmp_path, monkeypatch, "skip", [3, 6], [4], "on_nonfinite=skip")
    assert res["global_step"] == 8  # 11 batches for 8 real steps
    assert res["nonfinite_steps"] == 3
    assert json.loads((run / "metrics.json").read_text())["nonfinite_steps"] == 3
    _finite_checkpoints(run)
    import pandas as pd

    log = pd.read_csv(run / "csv" / "metrics.csv")
    assert log["train/nonfinite_steps"].max() == 3


def test_error_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(NonFiniteError, match=r"step 5: the gradient norm is nan .*on_nonfinite=skip"):
        _poisoned_run(tmp_path, monkeypatch, "err", [5], [])
    run = tmp_path / "err"
    last = load_torch_file(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and not nonfinite_entries(last["state_dict"])


def test_no_checkpoint_with_nonfinite_weights(tmp_path):
    cfg = compose_train(["experiment=smoke", f"out_root={tmp_path}", "name=w"], run_dir=tmp_path / "w")
    bundle = train_run.build_bundle(cfg)
    module = train_run.build_module(cfg, bundle)
    with torch.no_grad():
        next(module.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="refusing to save a checkpoint with non-finite weights"):
        module.on_save_checkpoint({"state_dict": module.state_dict()})
    with pytest.raises(NonFiniteError, match="refusing to export non-finite weights"):
        train_run._export(cfg, bundle, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr=-1"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0"),
    ("checkpoint_every=0", "checkpoint_every=0"),
    ("trainer.max_epochs=-1 trainer.max_steps=-1", "trainer.max_steps=-1"),
])
def test_invalid_settings_fail_before_anything_is_written(tmp_path, override, key):
    """The error names the key and the run directory is not left (the entry point: the test below)."""
    cfg = compose_train(["experiment=smoke", f"out_root={tmp_path}", "name=bad", *override.split()],
                        run_dir=tmp_path / "bad")
    with pytest.raises(Exception) as info:
        train_run.run(cfg)
    assert key in str(info.value) and ("must" in str(info.value) or "never ends" in str(info.value)), info.value
    assert not (tmp_path / "bad").exists()


def test_an_invalid_setting_fails_through_the_entry_point(tmp_path):
    """As the user meets it: a non-zero exit, the key on stderr, no run directory."""
    done = subprocess.run(train_cmd("experiment=smoke", f"out_root={tmp_path}", "name=bad", "optim.lr=-1"),
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "optim.lr=-1" in done.stderr and "must" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


def test_max_steps_minus_one_means_the_epoch_limit(tmp_path):
    cfg = compose_train(["experiment=smoke", f"out_root={tmp_path}", "name=ep", "trainer.max_steps=-1",
                         "trainer.max_epochs=1", "data.num_samples=128", "trainer.val_check_interval=2",
                         "export_start=false", "export=false", "eval.before=false"], run_dir=tmp_path / "ep")
    res = train_run.run(cfg)
    assert res["global_step"] == 128 // cfg.batch_size  # one epoch, as Lightning means -1
