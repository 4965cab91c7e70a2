"""Checkpoints survive a full disk and a cut-short file, preemption saves and stops non-zero, resume
refuses other settings and adds nothing to a finished run, and a rank alone in trouble stops all."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cliptune.train.checkpointing import (AtomicCheckpointIO, LastCheckpoint, checkpoint_step, resumable_checkpoint,
                                          validation_follows)
from conftest import subprocess_env, train_cmd
from killpoints import assert_same_run, kill_at, resume

SMOKE = ["experiment=smoke", "trainer.max_steps=8", "checkpoint_every=4", "trainer.val_check_interval=4",
         "trainer.log_every_n_steps=1", "batch_size=16", "data.num_samples=64", "data.val_samples=32",
         "export_start=false"]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*args), env=subprocess_env(), capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------ when Lightning validates
class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(2, 1)
        self.predicted: list[int] = []
        self.validated: list[int] = []

    def training_step(self, batch, batch_idx):
        return self.w(batch[0]).sum()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if validation_follows(self.trainer):
            self.predicted.append(self.global_step)

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_start(self):
        if not self.trainer.sanity_checking:
            self.validated.append(self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("settings", [
    {"val_check_interval": 3, "check_val_every_n_epoch": None},   # cliptune's default: every n steps of the run
    {"val_check_interval": 2, "check_val_every_n_epoch": 1},      # every n batches of each epoch
    {"val_check_interval": 0.5, "check_val_every_n_epoch": 2},    # half epochs, every other epoch
    {"val_check_interval": 1.0, "check_val_every_n_epoch": 1},    # epoch ends
])
def test_validation_follows_predicts_the_validations_lightning_runs(tmp_path, settings):
    """The rule LastCheckpoint defers by, held against Lightning's own schedule (5-batch epochs)."""
    data = DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=2)
    model = _Tiny()
    trainer = L.Trainer(max_steps=17, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **settings)
    trainer.fit(model, data, DataLoader(TensorDataset(torch.randn(2, 2)), batch_size=2))
    assert model.validated, settings
    assert model.predicted == model.validated


def test_last_checkpoint_is_written_after_the_validation_of_its_step(tmp_path):
    """A save due at a validated step lands after that validation: resuming from it does not skip it."""
    events: list[tuple[str, int]] = []

    class Record(_Tiny):
        def on_validation_start(self):
            events.append(("validation", self.global_step))

    class Ckpt(LastCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            events.append(("checkpoint", trainer.global_step))
            super()._save_checkpoint(trainer, filepath)

    data = DataLoader(TensorDataset(torch.randn(40, 2)), batch_size=2)
    trainer = L.Trainer(max_steps=12, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, val_check_interval=6, check_val_every_n_epoch=None,
                        callbacks=[Ckpt(dirpath=tmp_path, filename="last", every_n_train_steps=3, save_top_k=1,
                                        enable_version_counter=False)], default_root_dir=tmp_path)
    trainer.fit(Record(), data, DataLoader(TensorDataset(torch.randn(2, 2)), batch_size=2))
    assert events == [("checkpoint", 3), ("validation", 6), ("checkpoint", 6), ("checkpoint", 9),
                      ("validation", 12), ("checkpoint", 12)]


# ------------------------------------------------------------------ a full disk, a cut-short file
def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_disk(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "w": torch.ones(3)}, path)

    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):  # half written when the disk fills
            self.f.write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return FullDisk(f) if "w" in mode and str(file).endswith(".tmp") else f

    import builtins

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(OSError, match=r"no space left on the disk of .*checkpoints.*last\.ckpt.*previous last\.ckpt"):
        io.save_checkpoint({"global_step": 8, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(builtins, "open", real_open)
    assert checkpoint_step(path) == 4  # the previous one, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left


def _small_filesystem(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.slow
def test_a_run_on_a_filesystem_that_fills_up_leaves_only_loadable_checkpoints(tmp_path):
    """A real full disk: a run on a 2 MiB filesystem (its checkpoints are ~1 MiB) fails naming the disk;
    every checkpoint left loads, and no temporary file is left (needs root to mount a tmpfs)."""
    fs = tmp_path / "small"
    if not _small_filesystem(fs, "2m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        done = _run([*SMOKE, f"out_root={fs}", "name=full", "trainer.max_steps=12", "checkpoint_every=2"])
        assert done.returncode != 0
        assert "no space left on the disk of" in done.stderr, done.stderr[-2000:]
        ckpts = list(fs.rglob("*.ckpt"))
        assert all(checkpoint_step(p) is not None for p in ckpts), ckpts
        assert not [p for p in fs.rglob("*.tmp")]
    finally:
        subprocess.run(["umount", str(fs)], capture_output=True, timeout=30)


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 6}, ckpts / "best.ckpt")
    torch.save({"global_step": 9}, ckpts / "last.ckpt")
    assert resumable_checkpoint(ckpts) == (ckpts / "last.ckpt", 9)
    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:40])  # cut short
    assert resumable_checkpoint(ckpts) == (ckpts / "best.ckpt", 6)
    assert "last.ckpt cannot be read" in caplog.text and "best.ckpt (step 6)" in caplog.text
    (ckpts / "best.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"last\.ckpt cannot be read .* no other readable checkpoint.*overwrite=true"):
        resumable_checkpoint(ckpts)
    assert resumable_checkpoint(tmp_path / "none") is None


def test_a_cut_short_checkpoint_is_named_when_loaded(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 1, "w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{path}: cannot be read as a checkpoint \(truncated"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=True)


# ------------------------------------------------------------------ resume: settings, finished runs, no checkpoint
@pytest.mark.slow
def test_resume_refuses_other_settings_and_adds_nothing_to_a_finished_run(tmp_path):
    args = [*SMOKE, f"out_root={tmp_path}", "name=r"]
    assert _run(args).returncode == 0
    run = tmp_path / "r"
    files = {n: (run / n).read_bytes() for n in ("config.yaml", "overrides.yaml", "csv/metrics.csv")}
    metrics = json.loads((run / "metrics.json").read_text())
    # finished: nothing to do, no row added, no file rewritten
    done = _run([*args, "resume=true"])
    assert done.returncode == 0 and "already finished at step 8" in done.stderr + done.stdout
    assert {n: (run / n).read_bytes() for n in files} == files
    assert json.loads((run / "metrics.json").read_text()) == metrics
    # train on: max_steps may change; the data stream's settings may not
    done = _run([*args, "resume=true", "trainer.max_steps=12", "data.workers=1", "seed=3"])
    assert done.returncode != 0
    assert "data.workers: 0 -> 1" in done.stderr and "seed: 0 -> 3" in done.stderr
    assert "resume_allow_changes=true" in done.stderr
    assert {n: (run / n).read_bytes() for n in files} == files  # nothing written
    done = _run([*args, "resume=true", "trainer.max_steps=12", "data.workers=1", "resume_allow_changes=true"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "config.yaml").read_bytes() == files["config.yaml"]  # the first part's settings kept
    record = (run / "overrides.resume-1.yaml").read_text()
    assert "data.workers=1" in record and "data.workers: 0 -> 1" in record
    history = pd.read_csv(run / "csv" / "metrics.csv")
    steps = history[history["train/loss"].notna()]["step"].tolist()
    # 8 steps, then 4 more: the first part's rows kept, each step once (the added rows are numbered from
    # Lightning's restored step counter, one past the end of the first part)
    assert len(steps) == 12 and steps[:8] == list(range(8)) and steps == sorted(set(steps))


@pytest.mark.slow
def test_killed_before_the_first_checkpoint_resume_starts_over_with_a_notice(tmp_path):
    args = [*SMOKE, f"out_root={tmp_path}", "name=r"]
    kill_at(args, ("validation.start", 1))  # the evaluation before fine-tuning
    assert not list((tmp_path / "r").rglob("*.ckpt"))
    done = resume(args)
    out = done.stdout + done.stderr
    assert "holds no checkpoint yet" in out and "starting it from the beginning" in out
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["global_step"] == 8


# ------------------------------------------------------------------ preemption
@pytest.mark.slow
@pytest.mark.parametrize("flush", [pytest.param(5, marks=pytest.mark.exhaustive), 8])
def test_sigterm_saves_a_resumable_checkpoint_and_exits_non_zero(tmp_path, flush):
    """A real SIGTERM (sent by the run to itself at a metrics.csv flush: mid-epoch, and right at the end of
    the first epoch, whose checkpoint Lightning would restore into a phantom epoch): exit 143 naming the
    checkpoint of the step reached, and the resumed run ends as the one never stopped, row for row."""
    args = [*SMOKE, "trainer.max_steps=12", "checkpoint_every=100", "trainer.val_check_interval=100"]
    assert _run([*args, f"out_root={tmp_path}", "name=whole"]).returncode == 0
    cut = [*args, f"out_root={tmp_path}", "name=cut"]
    env = {**subprocess_env(), "CLIPTUNE_FAULT": f"csv.flush@{flush}:TERM"}
    done = subprocess.run(train_cmd(*cut), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 143, (done.returncode, done.stderr[-3000:])
    step = checkpoint_step(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert step is not None and 0 < step < 12  # saved where it stopped (no periodic checkpoint was due)
    assert "stopped by SIGTERM" in done.stderr and f"(step {step})" in done.stderr and "resume=true" in done.stderr
    assert not json.loads((tmp_path / "cut" / "metrics.json").read_text()).get("after")
    resume(cut)
    assert_same_run(tmp_path / "whole", tmp_path / "cut", f"SIGTERM at csv.flush@{flush} (step {step})")


# ------------------------------------------------------------------ a rank alone in trouble
def _nonfinite_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from cliptune.train.module import nonfinite_on_any_rank

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)

    class Strategy:
        @staticmethod
        def reduce(t, reduce_op="sum"):
            dist.all_reduce(t)
            return t

    trainer = type("T", (), {"world_size": world, "strategy": Strategy()})()
    answers = []
    for bad_rank in (None, 1, 0):
        loss = torch.tensor(float("nan") if rank == bad_rank else 1.0)
        answers.append(nonfinite_on_any_rank(trainer, loss, torch.ones(3)))
    Path(out, f"{rank}.json").write_text(json.dumps(answers))
    dist.destroy_process_group()


@pytest.mark.ddp
def test_a_nonfinite_value_on_one_rank_is_seen_by_every_rank(tmp_path):
    """The decision the training and distillation modules stop on: the same on every rank, so none is
    left waiting in a collective (the distillation stage used to raise on the bad rank alone)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nonfinite_worker, args=(2, f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [False, True, True]
