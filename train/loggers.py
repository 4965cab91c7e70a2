"""A CSV logger that keeps a run's history across a resume.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it starts in a non-empty directory, so a
resumed run lost every row it had logged before the kill (and ``cliptune-compare`` reads that
file). ``CSVLogger(keep_history=True)`` keeps the rows: when the resumed process first writes, the
rows it is about to log again (those at or after its first logged step: the killed process had
got past the checkpoint) are dropped and the rest stay, so the file reads as one uninterrupted run.
Until then the file stays as it was: a resumed process that logs nothing, or is killed first, loses
no row.
Rows are written every ``flush_logs_every_n_steps`` logging calls (1 in cliptune's config), so a
killed run loses nothing it logged.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _Writer

from cliptune.faults import fault_point
from cliptune.rundir import replace_atomically

__all__ = ["CSVLogger"]


class _HistoryWriter(_Writer):
    """Keeps the rows of ``metrics.csv`` that precede what this process logs (see module doc)."""

    def __init__(self, log_dir: str, keep_history: bool) -> None:
        self._old_rows: list[dict[str, Any]] | None = None
        self._last_row: tuple | None = None
        self._old_keys: list[str] = []
        path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        aside = path + ".resume"  # the history while this process has written nothing yet
        if keep_history:
            if os.path.isfile(aside) and not os.path.isfile(path):
                os.replace(aside, path)  # a process killed while the history was set aside below
            if os.path.isfile(path):
                with open(path, newline="") as f:
                    reader = csv.DictReader(f)
                    self._old_rows = list(reader)
                    self._old_keys = list(reader.fieldnames or [])
                os.replace(path, aside)  # the parent deletes an existing metrics.csv on start
        super().__init__(log_dir)
        if keep_history and os.path.isfile(aside):
            # back in place at once: a process that logs nothing (or is killed before it does) leaves the
            # history as it found it; the first save below rewrites it whole
            os.replace(aside, path)

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        # the same row twice in a row is one row: a step's metrics are handed over before its checkpoint
        # is written (cliptune.train.checkpointing.LastCheckpoint), then once more by Lightning
        row = (step, {k: float(v) if hasattr(v, "item") else v for k, v in metrics_dict.items()})
        if row == self._last_row:
            return
        self._last_row = row
        super().log_metrics(metrics_dict, step)

    def save(self) -> None:
        if self._old_rows is not None and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            kept = [r for r in self._old_rows if r.get("step") not in (None, "") and int(float(r["step"])) < first]
            keys = sorted(set(self._old_keys) | set().union(*self.metrics) | set().union(*kept))
            self.metrics_keys = keys
            def write(tmp) -> None:
                with open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=keys)
                    writer.writeheader()
                    writer.writerows(kept)
                    writer.writerows(self.metrics)

            replace_atomically(self.metrics_file_path, write)
            self._old_rows, self.metrics = None, []
            fault_point("csv.flush")
            return
        had_rows = bool(self.metrics)
        super().save()
        if had_rows:
            fault_point("csv.flush")


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSV logger, plus ``keep_history``: append to a resumed run's ``metrics.csv``.

    ``cliptune-train`` sets ``keep_history`` when it resumes; a fresh run starts a new file.
    """

    def __init__(self, *args: Any, keep_history: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_history = keep_history

    @property
    @rank_zero_experiment
    def experiment(self) -> _FabricWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(log_dir=self.log_dir, keep_history=self.keep_history)
        return self._experiment
