"""Callbacks come from configs/callbacks/: the composed config builds exactly the configured ones; a smoke
run logs the lr of every parameter group (checked against the schedule computed by hand) and a training
throughput that leaves validation and checkpoint saves out (checked with a fake clock that only steps and
pauses move, so the rate is exact on any machine)."""

from __future__ import annotations

import ast
import math
import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

from cliptune.train import run as train_run
from cliptune.train.callbacks import TrainThroughput
from cliptune.train.checkpointing import LastCheckpoint
from cliptune.train.module import ContrastiveModule
from conftest import compose_train


def _triggers(cb: ModelCheckpoint) -> dict:
    """What decides when a ModelCheckpoint saves (its public state key, which resume matches on)."""
    return ast.literal_eval(cb.state_key.removeprefix(type(cb).__qualname__))


def _dm(*sets: str) -> SimpleNamespace:
    return SimpleNamespace(val_set_names=list(sets))


def test_default_callbacks_are_exactly_the_configured_ones(tmp_path):
    cfg = compose_train(["checkpoint_every=7", f"out_root={tmp_path}", "callbacks.progress.style=bar"],
                        run_dir=tmp_path / "r")
    last, best, progress, lr, throughput = cbs = train_run.build_callbacks(cfg, _dm("domain", "coco"))
    assert [type(c) for c in cbs] == [LastCheckpoint, ModelCheckpoint, TQDMProgressBar, LearningRateMonitor,
                                      TrainThroughput]
    ckpts = str(tmp_path / "r" / "checkpoints")
    assert (last.dirpath, last.filename, last.save_top_k) == (ckpts, "last", 1)
    assert _triggers(last) == {"monitor": None, "mode": "min", "every_n_train_steps": 7, "every_n_epochs": 0,
                               "train_time_interval": None}
    # eval.monitor null: the first validation set's mean_R
    assert (best.dirpath, best.filename, best.save_top_k) == (ckpts, "best", 1)
    assert _triggers(best)["monitor"] == "val/domain/mean_R" and _triggers(best)["mode"] == "max"
    assert progress.refresh_rate == 10
    assert lr.logging_interval == "step"
    assert throughput.window_size == 20
    assert throughput.batch_size_fn({"image": torch.zeros(5, 3, 8, 8), "text": torch.zeros(5, 16)}) == 5


def test_monitor_override_none_and_dropped_entries(tmp_path):
    out = [f"out_root={tmp_path}"]
    cfg = compose_train(["eval.monitor=val/coco/t2i_R@1", *out], run_dir=tmp_path / "r")
    best = train_run.build_callbacks(cfg, _dm("domain", "coco"))[1]
    assert best.filename == "best" and best.monitor == "val/coco/t2i_R@1"
    # no validation set: nothing for best.ckpt to follow, so no best.ckpt
    cfg = compose_train(out, run_dir=tmp_path / "r")
    assert [getattr(c, "filename", None) for c in train_run.build_callbacks(cfg, _dm())] == ["last", None, None, None]
    # callbacks=none keeps only the checkpoint resume needs
    cfg = compose_train(["callbacks=none", *out], run_dir=tmp_path / "r")
    (only,) = train_run.build_callbacks(cfg, _dm("domain"))
    assert isinstance(only, ModelCheckpoint) and only.filename == "last"
    assert _triggers(only)["every_n_train_steps"] == 100
    cfg = compose_train(["callbacks.throughput=null", "callbacks.lr_monitor=null", "callbacks.progress.style=bar",
                         *out], run_dir=tmp_path / "r")
    assert [type(c) for c in train_run.build_callbacks(cfg, _dm("domain"))] == [LastCheckpoint, ModelCheckpoint,
                                                                           TQDMProgressBar]


def test_bad_entry_names_its_key(tmp_path):
    cfg = compose_train(["callbacks.throughput.window_size=1", f"out_root={tmp_path}"], run_dir=tmp_path / "r")
    with pytest.raises(Exception, match=r"(?s)window_size=1: must be >= 2.*callbacks\.throughput"):
        train_run.build_callbacks(cfg, _dm("domain"))


# ------------------------------------------------------------------------------------ one smoke run
STEP, PAUSE = 1.0, 100.0  # fake seconds each training step takes, and each validation end and checkpoint save
WINDOW = 6
LR, LR_TEXT, DECAY, WARMUP, STEPS, BATCH = 1e-3, 3e-3, 0.75, 5, 30, 32


class _FakeClock:
    """Seconds that pass only when the run says so: a step takes STEP, a pause PAUSE, the rest nothing."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Clock(Callback):
    """Reads the (fake) clock at the end of every training batch."""

    def __init__(self, clock: _FakeClock) -> None:
        self.clock = clock
        self.end: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.end.append(self.clock())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cb")
    cfg = compose_train(["experiment=smoke", f"out_root={tmp}", "name=s", "export=false", "export_start=false",
                         f"optim.layer_decay={DECAY}", f"optim.lr_text={LR_TEXT}", f"optim.lr={LR}",
                         f"optim.warmup_steps={WARMUP}", f"trainer.max_steps={STEPS}", f"batch_size={BATCH}",
                         "trainer.log_every_n_steps=1", f"callbacks.throughput.window_size={WINDOW}"],
                        run_dir=tmp / "s")
    fake = _FakeClock()
    clock, pauses = _Clock(fake), []

    def taking(seconds, hook, record=None):
        def wrapped(*args):
            out = hook(*args)
            if record is not None:
                record.append(fake.now)
            fake.now += seconds
            return out
        return wrapped

    def built(cfg, dm):
        cbs = build(cfg, dm)
        for cb in cbs:
            if isinstance(cb, TrainThroughput):
                cb.clock = fake
        return [*cbs, clock]

    build = train_run.build_callbacks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_run, "build_callbacks", built)
        mp.setattr(ContrastiveModule, "training_step", taking(STEP, ContrastiveModule.training_step))
        mp.setattr(ContrastiveModule, "on_validation_epoch_end",
                   taking(PAUSE, ContrastiveModule.on_validation_epoch_end, pauses))
        mp.setattr(ContrastiveModule, "on_save_checkpoint", taking(PAUSE, ContrastiveModule.on_save_checkpoint, pauses))
        train_run.run(cfg)
    return SimpleNamespace(run=tmp / "s", log=pd.read_csv(tmp / "s" / "csv" / "metrics.csv"), clock=clock,
                           pauses=pauses)


def _peak(part: str) -> float:
    """Peak lr of a group-name part by hand: tower lr x 0.75 ** (3 - depth) (2 blocks a tower: 0 is the
    embeddings, 3 the final norm and projection); head (temperature) takes optim.lr undecayed."""
    if part == "head":
        return LR
    tower, depth = re.fullmatch(r"(image|text)\.(\d)", part).groups()
    return (LR if tower == "image" else LR_TEXT) * DECAY ** (3 - int(depth))


def _schedule(step: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def test_lr_of_every_group_follows_the_schedule(smoke):
    ckpt = torch.load(smoke.run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    columns = sorted(c for c in smoke.log.columns if c.startswith("train/lr/"))
    # one column per parameter group: 4 depths x 2 towers (own lr each), with and without weight decay,
    # less text.0 with decay (the text embeddings have none); the temperature shares image.3's lr
    assert columns == sorted(f"train/lr/{g['name']}" for g in groups) and len(columns) == 15
    assert "train/lr/image.3+head/no_wd" in columns
    peak = {}
    for col in columns:
        name = col.removeprefix("train/lr/")
        peaks = {_peak(part) for part in name.removesuffix("/no_wd").split("+")}
        assert len(peaks) == 1, f"{col}: parts with different lr in one group"
        peak[name] = peaks.pop()
        rows = smoke.log[["step", col]].dropna()
        assert rows["step"].tolist() == list(range(STEPS))  # logged before every step, with that step's lr
        for step, value in zip(rows["step"], rows[col]):
            assert value == pytest.approx(peak[name] * _schedule(step), rel=1e-6), (col, step)
    # after the last step the optimiser holds the schedule's next value
    for g in groups:
        assert g["lr"] == pytest.approx(peak[g["name"]] * _schedule(STEPS), rel=1e-6, abs=1e-12), g["name"]
    assert len({round(g["initial_lr"], 12) for g in groups}) == 8  # 4 depths x 2 towers


def test_throughput_leaves_validation_and_checkpoints_out(smoke):
    rows = smoke.log[["step", "train/samples_per_s"]].dropna()
    assert rows["step"].tolist() == list(range(1, STEPS)) and (rows["train/samples_per_s"] > 0).all()  # from batch 2
    end = smoke.clock.end
    assert len(end) == STEPS
    paused_windows = 0
    for step, rate in zip(rows["step"], rows["train/samples_per_s"]):
        first = max(0, step - WINDOW + 1)  # the window: batches first..step, measured from first's end
        # only the steps count: every window's rate is one batch per step, pauses inside it or not
        assert rate == pytest.approx(BATCH / STEP, rel=1e-9), (step, rate)
        paused_windows += end[step] - end[first] > (step - first) * STEP  # the clock ran on through a pause
    # validation (at steps 0, 15, 30) and checkpoints (10, 20, the best at 15) fell inside windows
    assert paused_windows >= 5 and len(smoke.pauses) >= 5


def test_checkpoints_and_no_validation_rows(smoke):
    assert (smoke.run / "checkpoints" / "last.ckpt").is_file() and (smoke.run / "checkpoints" / "best.ckpt").is_file()
    best = torch.load(smoke.run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["global_step"] in (15, 30)  # taken at a validation
    # before, at steps 15 and 30 (logged at 14, 29: before the step counter moves on; the one at the last
    # step is the run's "after", not repeated); and no rows of Lightning's ThroughputMonitor, which logs
    # validation batches at the validation batch count
    val = smoke.log[smoke.log["val/synthetic/mean_R"].notna()]["step"].tolist()
    assert val == [0, 14, 29]
    assert not [c for c in smoke.log.columns if c.startswith(("validate/", "lr-"))]
