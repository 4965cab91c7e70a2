"""cliptune's own callbacks: training throughput over training time only (``configs/callbacks/throughput.yaml``)
and the progress display (``configs/callbacks/progress.yaml``).

Lightning's ``ThroughputMonitor`` leaves out the validation *batches* but counts the rest of a
validation (its epoch end, where the retrieval metrics are computed, and the best checkpoint written
after it) and every checkpoint save as training time, and it logs validation rows whose step is the
validation loop's batch count (rows at steps 1, 2, ... among the training steps of metrics.csv).
``TrainThroughput`` keeps its arithmetic (a rolling window; this rank's rate times the world size)
and stops the clock for validation and checkpoints instead. Unlike Lightning's ``Throughput`` it
reports from the second batch on rather than only once the window is full, so a short or resumed
run has the column too.

``progress_bar`` (``configs/callbacks/progress.yaml``) picks the progress display: Lightning's bar in a
terminal, and ``TextProgress`` (a plain line every few steps) when the output is a file or a pipe, where
a bar's carriage-return redraws would flood the log.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from datetime import timedelta
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from cliptune.log import get_logger

log = get_logger(__name__)


class TrainThroughput(L.Callback):
    """Logs ``train/samples_per_s`` (also in the progress bar): training samples per second of all
    ranks together, a rolling mean over the last ``window_size`` training batches.

    The clock starts with ``fit`` and leaves out validation and checkpoint saves: when either follows a
    training batch, the time from that batch's end to the next batch's start is not counted (that
    gap also holds one data fetch). All ranks are taken to run at rank 0's rate, as in Lightning.

    Args:
        batch_size_fn: samples in a batch (``cliptune.train.module.batch_size_of``).
        window_size: training batches in the rolling mean (>= 2; fewer until that many have run).
        clock: the seconds it reads (a fake one in tests makes the rate exact).
    """

    def __init__(self, batch_size_fn: Callable[[Any], int], window_size: int = 20,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if window_size < 2:
            raise ValueError(f"window_size={window_size}: must be >= 2 (a rate needs two batch ends)")
        self.batch_size_fn = batch_size_fn
        self.window_size = int(window_size)
        self.clock = clock
        # (training clock, samples) at batch ends
        self._window: deque[tuple[float, int]] = deque(maxlen=self.window_size)
        self._t0 = 0.0
        self._left_out = 0.0  # seconds of validation and checkpointing since _t0
        self._last_end = 0.0
        self._paused = False
        self._samples = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window.clear()
        self._left_out, self._paused, self._samples = 0.0, False, 0
        self._t0 = self._last_end = self.clock()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._paused:
            self._left_out += self.clock() - self._last_end
            self._paused = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the step's kernels have finished when the clock is read
        self._last_end = self.clock()
        n = int(self.batch_size_fn(batch))
        self._samples += n
        self._window.append((self._last_end - self._t0 - self._left_out, self._samples))
        (t_first, s_first), (t_last, s_last) = self._window[0], self._window[-1]
        if t_last > t_first:  # from the second batch on
            per_rank = (s_last - s_first) / (t_last - t_first)
            pl_module.log("train/samples_per_s", per_rank * trainer.world_size, prog_bar=True, batch_size=n)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._paused = True


def progress_bar(style: str = "auto", refresh_rate: int = 10, text_every: int | None = None) -> ProgressBar:
    """The progress display of a run.

    Args:
        style: ``bar`` (Lightning's ``TQDMProgressBar``), ``text`` (``TextProgress``) or ``auto``: the bar
            when stdout is a terminal, text lines otherwise (``cliptune-train ... > log.txt``, nohup, CI).
        refresh_rate: steps between redraws of the bar; 0 turns every progress display off.
        text_every: steps between text lines (``None``: about every 5% of the run).
    """
    if style not in ("auto", "bar", "text"):
        raise ValueError(f"style={style!r}: use auto, bar or text")
    if refresh_rate == 0:
        return TQDMProgressBar(refresh_rate=0)  # Lightning's way to show nothing
    if style == "bar" or (style == "auto" and _is_terminal()):
        return TQDMProgressBar(refresh_rate=refresh_rate)
    return TextProgress(every=text_every)


def _is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


class TextProgress(ProgressBar):
    """Progress as plain log lines, for output that is not a terminal: one line every ``every`` training
    steps (and at the last), with the step, the bar's metrics (loss, samples/s), steps/s and the time
    left; one line per validation with each set's ``mean_R``. Lines go through cliptune's logger, so a
    run's ``train.log`` holds them too.

    Args:
        every: steps between lines (``None``: about 5% of the run's steps, at least 1).
    """

    def __init__(self, every: int | None = None) -> None:
        super().__init__()
        if every is not None and every < 1:
            raise ValueError(f"every={every}: must be >= 1 (or null: about every 5% of the run)")
        self.every = every
        self._enabled = True
        self._t0 = 0.0
        self._step0 = 0
        self._last = -1
        self._val_t0 = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @staticmethod
    def _total(trainer: L.Trainer) -> int | None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        return int(total) if total and math.isfinite(total) else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._step0, self._last = time.perf_counter(), trainer.global_step, -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, total = trainer.global_step, self._total(trainer)
        every = self.every or max(1, round((total or 20) / 20))
        if not self._enabled or step == self._last or (step % every and step != total):
            return
        self._last = step
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._step0) / elapsed if elapsed > 0 else 0.0
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        for key, value in self.get_metrics(trainer, pl_module).items():
            if key != "v_num":
                parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        parts.append(f"{rate:.2f} steps/s")
        if total and rate > 0:
            parts.append(f"ETA {timedelta(seconds=round((total - step) / rate))}")
        log.info(" | ".join(parts))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        scores = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/") and k.endswith("/mean_R")}
        shown = " ".join(f"{k}={float(v):.4f}" for k, v in scores.items()) or "done"
        what = "validation" if trainer.state.fn == "fit" else "evaluation"  # trainer.validate: before/after training
        log.info("%s at step %d: %s (%.1f s)", what, trainer.global_step, shown, time.perf_counter() - self._val_t0)
