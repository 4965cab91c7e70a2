"""Where this process runs: rank, world size, device and process group. The only place that asks.

    from cliptune import runtime
    dev = runtime.device("auto")            # cuda (cuda:LOCAL_RANK under a launcher) or cpu
    own = runtime.init_distributed(dev)     # joins the group torchrun describes; False in one process
    ...
    if own:
        runtime.teardown_distributed()

Two views of rank and world size:

- ``rank()`` / ``world_size()``: the process group's when one is initialised, else what the
  launcher put in the environment (torchrun: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; SLURM:
  ``SLURM_PROCID``/``SLURM_NTASKS``), else 0 / 1. Right for "who prints" and "who writes", also
  before the group exists and after it is torn down.
- ``rank(launcher=False)`` / ``world_size(launcher=False)``: the process group's only, else 0 / 1.
  Right for splitting data and for gathers: without a group no rank ever sees another's share, so
  a split that followed the environment alone (an ``salloc -n 4`` shell sets ``SLURM_NTASKS=4``)
  would silently leave data out.

Nothing here imports torch just to ask: a process group can only exist once ``torch.distributed``
has been imported, so the lookups read ``sys.modules`` (a CLI that never touches torch starts in
milliseconds, not seconds). ``device`` and ``init_distributed`` need torch and import it.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "device",
    "init_distributed",
    "is_distributed",
    "local_rank",
    "rank",
    "teardown_distributed",
    "world_size",
]

_RANK_VARS = ("RANK", "SLURM_PROCID", "LOCAL_RANK")
_WORLD_VARS = ("WORLD_SIZE", "SLURM_NTASKS")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID")


def _group():
    """The ``torch.distributed`` module when a process group is initialised, else None."""
    dist = sys.modules.get("torch.distributed")  # never import torch just to ask (3 s for a CLI)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def _env_int(names: tuple[str, ...], default: int) -> int:
    for var in names:
        value = os.environ.get(var)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {var}={value!r} is not an integer; "
                                 "fix or unset it (the launcher sets it)") from None
    return default


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised (even one of world size 1)."""
    return _group() is not None


def rank(launcher: bool = True) -> int:
    """Global rank: the process group's; else (``launcher=True``) RANK, SLURM_PROCID, LOCAL_RANK; else 0."""
    dist = _group()
    if dist is not None:
        return dist.get_rank()
    return _env_int(_RANK_VARS, 0) if launcher else 0


def world_size(launcher: bool = True) -> int:
    """Number of processes: the process group's; else (``launcher=True``) WORLD_SIZE, SLURM_NTASKS; else 1."""
    dist = _group()
    if dist is not None:
        return dist.get_world_size()
    return _env_int(_WORLD_VARS, 1) if launcher else 1


def local_rank() -> int:
    """Rank on this machine (LOCAL_RANK, SLURM_LOCALID; else 0): which GPU this process drives."""
    return _env_int(_LOCAL_RANK_VARS, 0)


def device(spec: str = "auto") -> torch.device:
    """The device a spec names: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.

    A bare ``cuda`` under a multi-process launcher becomes ``cuda:<local rank>`` (one GPU per rank;
    modulo the visible GPUs, so a launcher that shows each rank only its own GPU also works).
    Raises ValueError when the spec is not a device or names one this machine does not have.
    """
    import torch  # noqa: PLC0415 - asking for the rank must not import torch (fast CLI start)

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device={spec!r} is not a device: use auto, cpu, cuda, cuda:<index> or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device={spec!r} but CUDA is not available ({why}); use device=cpu or device=auto")
        n = torch.cuda.device_count()
        if dev.index is None and world_size() > 1:
            dev = torch.device("cuda", local_rank() % n)
        elif dev.index is not None and dev.index >= n:
            raise ValueError(f"device={spec!r} but only {n} GPU(s) are visible (cuda:0 to cuda:{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={spec!r} but MPS is not available on this machine; use device=cpu or device=auto")
    return dev


def init_distributed(device: torch.device) -> bool:
    """Join the process group the environment describes (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    NCCL on a CUDA device, else gloo. Returns True when this call created the group: the caller
    then calls :func:`teardown_distributed`. Returns False in one process, or when a group exists.
    A bare ``srun`` sets only SLURM variables, which ``init_process_group`` cannot read: each task
    then runs alone (and ``rank()`` still tells rank 0 apart for writing).
    """
    import torch  # noqa: PLC0415 - asking for the rank must not import torch (fast CLI start)
    import torch.distributed as dist  # noqa: PLC0415 - asking for the rank must not import torch (fast CLI start)

    if _env_int(("WORLD_SIZE",), 1) <= 1 or is_distributed():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def teardown_distributed() -> None:
    """Destroy the process group, if one is initialised (after the last collective)."""
    dist = _group()
    if dist is not None:
        dist.destroy_process_group()
