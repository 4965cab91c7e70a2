"""Checkpoints that survive a kill or a full disk, and the choice of the one to resume from.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction: the bytes go to a temporary
file in the system's temp folder, which is then *moved* onto ``checkpoints/last.ckpt``. When /tmp is
another filesystem than the run (the usual cluster set-up) that move is a copy, and a kill or a full
disk during it leaves a truncated ``last.ckpt`` (0 bytes seen) over the good one: the run cannot
resume at all. :class:`AtomicCheckpointIO` writes beside the target, flushes it to the disk and
renames it into place (``cliptune.rundir.replace_atomically``): the previous checkpoint stays until
the new one is whole. Remote paths (``s3://`` ...) keep Lightning's transaction.

:func:`resumable_checkpoint` picks what ``resume=true`` continues from: ``last.ckpt`` when it can be
read, else the newest readable checkpoint of the run (``best.ckpt``), saying so.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cliptune.faults import fault_point
from cliptune.log import get_logger
from cliptune.rundir import replace_atomically

log = get_logger(__name__)


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic on the target's own filesystem, and whose
    loads name the file when it cannot be read (a truncated or foreign file)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported for local checkpoints ({path})")

        def write(tmp: Path) -> None:
            # serialised in memory first (as Lightning does): a full disk then fails the write() with
            # ENOSPC, where torch.save straight to the file fails with a bare zip-writer error
            buf = io.BytesIO()
            torch.save(checkpoint, buf)
            with open(tmp, "wb") as f:
                f.write(buf.getbuffer())

        replace_atomically(str(path).removeprefix("file://"), write,
                           before_rename=lambda: fault_point("checkpoint.write"))
        fault_point("checkpoint.saved")

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as e:  # noqa: BLE001 - any failure to read it is reported with the file named
            raise ValueError(f"{path}: cannot be read as a checkpoint ({unreadable_reason(e)})") from None


def unreadable_reason(e: BaseException) -> str:
    """One line on why ``torch.load`` failed, without torch's advice to load with weights_only=False."""
    text = " ".join(str(e).split())
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds Python objects other than tensors and plain containers; refused (weights_only=True)"
    if isinstance(e, EOFError) or "failed finding central directory" in text or "zip archive" in text:
        return "truncated or not a torch checkpoint"
    return f"{type(e).__name__}: {text[:160]}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The global step a checkpoint was written at, or None when the file cannot be read.

    Reads it with ``weights_only=True`` and ``mmap=True``: the tensors are mapped, not copied, so
    checking a large checkpoint costs little.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["global_step"])
    except Exception:  # noqa: BLE001 - unreadable for any reason: not a candidate
        return None


def resumable_checkpoint(checkpoints: Path) -> tuple[Path, int] | None:
    """``(checkpoint, its step)`` to resume from: ``last.ckpt`` if it can be read, else the readable
    checkpoint of ``checkpoints`` with the highest step; None when there is none.

    ``best.ckpt`` holds the whole training state too (Lightning's ``ModelCheckpoint`` saves it), so a
    run whose ``last.ckpt`` was cut short continues from its best step, losing the steps since.
    """
    last = checkpoints / "last.ckpt"
    step = checkpoint_step(last) if last.is_file() else None
    if step is not None:
        return last, step
    found = [(s, p) for p in sorted(checkpoints.glob("*.ckpt")) if p != last
             for s in [checkpoint_step(p)] if s is not None]
    if last.is_file():
        if not found:
            raise ValueError(f"{last} cannot be read (truncated or not a checkpoint) and the run holds no other "
                             "readable checkpoint: start it over with overwrite=true")
        step, path = max(found)
        log.warning("%s cannot be read (truncated or not a checkpoint): resuming from %s (step %d) instead",
                    last, path, step)
        return path, step
    if found:
        step, path = max(found)
        return path, step
    return None


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether ``fit`` validates right after the training batch that just ended.

    Lightning's rule (``_TrainingEpochLoop._should_check_val_fx``) for the settings cliptune accepts:
    every ``val_check_interval`` batches of the run (``check_val_every_n_epoch: null``) or of the epoch,
    in every ``check_val_every_n_epoch``-th epoch; an epoch's last batch when the number of batches is
    unknown. ``tests/test_checkpointing.py`` holds it against the validations Lightning actually runs.
    """
    if not trainer.enable_validation:
        return False
    every = trainer.check_val_every_n_epoch
    if every is not None and (trainer.current_epoch + 1) % every:
        return False
    loop = trainer.fit_loop.epoch_loop
    interval = trainer.val_check_batch
    if interval is None or interval == float("inf"):
        return bool(loop.batch_progress.is_last_batch)
    done = loop.total_batch_idx if every is None else loop.batch_idx
    return (done + 1) % int(interval) == 0


class LastCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt`` every ``every_n_train_steps`` steps, written *after* the validation that
    follows its step when one does.

    A checkpoint written between a step and that step's validation resumes past the validation
    (Lightning counts it as done), so a run killed during it would lose its row of ``metrics.csv`` and
    its best-checkpoint update. Deferred to the validation's end, the checkpoint holds both; a kill
    during the validation resumes from the checkpoint before it and validates again. Likewise the
    step's own metrics are handed to the loggers before its checkpoint is written.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        every = self._every_n_train_steps
        if every < 1 or trainer.global_step % every:
            return
        if validation_follows(trainer):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves it then
            return
        # This step's metrics reach the loggers only after this hook: a kill right after the save would
        # resume past a step whose row was never written. Hand them over first (the loggers drop the
        # identical row Lightning hands over again: cliptune.train.loggers).
        connector = getattr(trainer, "_logger_connector", None)
        if connector is not None and hasattr(connector, "update_train_step_metrics"):
            connector.update_train_step_metrics()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class Preempted(RuntimeError):
    """The run was stopped by SIGTERM (a scheduler's preemption); its last checkpoint resumes it."""

    exit_code = 128 + 15  # what a shell reports for a process ended by SIGTERM


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (how SLURM and Kubernetes preempt), save ``last.ckpt`` of the step reached, then stop.

    Lightning turns SIGTERM into ``SIGTERMException`` (a ``SystemExit`` with code 0: a scheduler would
    record the preempted run as finished) at the next batch boundary, on every rank at the same step.
    Its ``on_exception`` hook runs before the trainer is torn down, with the loops' state whole: the
    checkpoint written there resumes at the next batch. A SIGTERM during a validation saves nothing
    (half a validation cannot be resumed): the previous checkpoint resumes and validates again.
    :func:`cliptune.train.run.fit_or_preempt` then raises :class:`Preempted`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.saved_step: int | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or trainer.validating:
            return
        if trainer.state.fn != "fit":
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved_step = int(trainer.global_step)


class ValidatedStep(L.Callback):
    """Remembers, in every checkpoint, the step of the last validation that ran inside ``fit``.

    A run killed after its final validation (while writing ``metrics.json`` or the export) resumes
    with nothing left to train, and has to score the final weights again for its files: that
    validation's row is already in ``metrics.csv``, so :func:`cliptune.train.run.validate_after_fit`
    runs it without logging when ``restored == trainer.global_step``.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.restored: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.step = int(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = self.restored = state_dict.get("step")


class EpochEndState(L.Callback):
    """Writes a checkpoint taken once an epoch was trained whole as the start of the next epoch.

    Lightning restores such a checkpoint (written after a preemption at the epoch's end, or by
    ``cliptune-train`` after the last step when it closes an epoch) into an odd state: it trains one
    batch of a phantom epoch, then starts the next one, two on. The data stream and the epoch count
    then differ from the uninterrupted run's (``tests/test_checkpointing.py`` resumes both ways).
    Marking the epoch done and its batch counters as not started is the state Lightning itself writes
    between two epochs, from which it resumes exactly.
    """

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        fit = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        batches = fit.get("epoch_loop.batch_progress")
        per_epoch = trainer.num_training_batches
        if not batches or not isinstance(per_epoch, int) or batches["current"]["completed"] < per_epoch:
            return
        batches["current"] = {k: 0 for k in batches["current"]}
        batches["is_last_batch"] = False
        steps = fit.get("epoch_loop.manual_optimization.optim_step_progress")
        if steps:
            steps["current"] = {k: 0 for k in steps["current"]}
        epochs = fit.get("epoch_progress")
        if epochs:
            for part in ("total", "current"):
                for k in ("processed", "completed"):
                    epochs[part][k] = epochs[part]["started"]
