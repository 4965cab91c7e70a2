"""Training throughput over training time only (``configs/callbacks/throughput.yaml``).

Lightning's ``ThroughputMonitor`` leaves out the validation *batches* but counts the rest of a
validation (its epoch end, where the retrieval metrics are computed, and the best checkpoint written
after it) and every checkpoint save as training time, and it logs validation rows whose step is the
validation loop's batch count (rows at steps 1, 2, ... among the training steps of metrics.csv).
``TrainThroughput`` keeps its arithmetic (a rolling window; this rank's rate times the world size)
and stops the clock for validation and checkpoints instead. Unlike Lightning's ``Throughput`` it
reports from the second batch on rather than only once the window is full, so a short or resumed
run has the column too.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

import lightning as L
import torch


class TrainThroughput(L.Callback):
    """Logs ``train/samples_per_s`` (also in the progress bar): training samples per second of all
    ranks together, a rolling mean over the last ``window_size`` training batches.

    The clock starts with ``fit`` and leaves out validation and checkpoint saves: when either follows a
    training batch, the time from that batch's end to the next batch's start is not counted (that
    gap also holds one data fetch). All ranks are taken to run at rank 0's rate, as in Lightning.

    Args:
        batch_size_fn: samples in a batch (``cliptune.train.module.batch_size_of``).
        window_size: training batches in the rolling mean (>= 2; fewer until that many have run).
    """

    def __init__(self, batch_size_fn: Callable[[Any], int], window_size: int = 20) -> None:
        if window_size < 2:
            raise ValueError(f"window_size={window_size}: must be >= 2 (a rate needs two batch ends)")
        self.batch_size_fn = batch_size_fn
        self.window_size = int(window_size)
        self._window: deque[tuple[float, int]] = deque(maxlen=self.window_size)  # (training clock, samples) at batch ends
        self._t0 = 0.0
        self._left_out = 0.0  # seconds of validation and checkpointing since _t0
        self._last_end = 0.0
        self._paused = False
        self._samples = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window.clear()
        self._left_out, self._paused, self._samples = 0.0, False, 0
        self._t0 = self._last_end = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._paused:
            self._left_out += time.perf_counter() - self._last_end
            self._paused = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the step's kernels have finished when the clock is read
        self._last_end = time.perf_counter()
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
