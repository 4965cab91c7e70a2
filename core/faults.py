"""Fault points: the places where a run writes something, named, so a test can kill it there.

Every write boundary of a run (a checkpoint save, a validation's start and end, ``metrics.json``,
the export, a ``metrics.csv`` flush, the shard writer's index) calls :func:`fault_point` with its
name. Outside tests it does nothing but one dictionary lookup. Two environment variables turn it on:

- ``CLIPTUNE_FAULT_TRACE=<file>``: append ``<point>\\t<n>`` to ``<file>`` each time the process
  reaches a point (``n``: how often it has reached that point so far, from 1). An uninterrupted run
  run this way lists every boundary it crosses, in order: the kill-point harness
  (``tests/killpoints.py``) reads that list instead of guessing where a run writes.
- ``CLIPTUNE_FAULT=<point>@<n>``: the process sends itself SIGKILL the ``n``-th time it reaches
  ``<point>`` (``n`` defaults to 1): the kill a scheduler or the OOM killer would deliver there,
  with no chance to clean up. ``<point>@<n>:TERM`` sends SIGTERM instead (a preemption notice,
  which the run handles).

A new write boundary is one ``fault_point("<name>")`` call and one entry in :data:`POINTS`; the
harness then kills runs there too without any other change.
"""

from __future__ import annotations

import os
import signal

# name -> where it is (the harness reports it)
POINTS: dict[str, str] = {
    "checkpoint.write": "a checkpoint's bytes are being written beside their target (before the rename)",
    "checkpoint.saved": "a checkpoint was renamed into place",
    "validation.start": "a validation begins (fit's, the one before fine-tuning, or the one after)",
    "validation.end": "a validation's metrics were computed and logged",
    "csv.flush": "rows were appended to csv/metrics.csv",
    "metrics.write": "metrics.json is about to be replaced",
    "export.write": "an export folder is about to be written",
    "shards.index": "the shard writer is about to write its index",
}

_counts: dict[str, int] = {}
_target: tuple[str, int] | None | bool = False  # False: not read yet
_signal = signal.SIGKILL


def _parse_target() -> tuple[str, int] | None:
    global _signal
    spec = os.environ.get("CLIPTUNE_FAULT", "").strip()
    if not spec:
        return None
    spec, _, sig = spec.partition(":")
    name, _, n = spec.partition("@")
    if name not in POINTS:
        raise ValueError(f"CLIPTUNE_FAULT={spec!r}: unknown fault point {name!r}; known: {', '.join(POINTS)}")
    if sig not in ("", "KILL", "TERM"):
        raise ValueError(f"CLIPTUNE_FAULT={spec}:{sig}: the signal is KILL (default) or TERM")
    _signal = signal.SIGTERM if sig == "TERM" else signal.SIGKILL
    return name, int(n or 1)


def fault_point(name: str) -> None:
    """Mark a write boundary (see the module docstring); a no-op unless a test asked for it."""
    global _target
    if _target is False:
        _target = _parse_target()
    trace = os.environ.get("CLIPTUNE_FAULT_TRACE")
    if _target is None and not trace:
        return
    if name not in POINTS:  # a call site that was not registered: the harness would never reach it
        raise KeyError(f"fault point {name!r} is not in cliptune.faults.POINTS")
    n = _counts[name] = _counts.get(name, 0) + 1
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{name}\t{n}\n")
    if _target is not None and _target == (name, n):
        os.kill(os.getpid(), _signal)
