"""The kill-point harness: kill a run at a write boundary, resume it, and hold it to the run that was
never killed.

The boundaries are not guessed: an uninterrupted run with ``CLIPTUNE_FAULT_TRACE`` lists every
``cliptune.faults.fault_point`` it crosses, in order (:func:`trace`). :func:`kill_at` reruns the same
command with ``CLIPTUNE_FAULT=<point>@<n>``, which SIGKILLs the process right there, and
:func:`resume` runs it again with ``resume=true`` until it finishes. :func:`assert_same_run` then
compares what the two runs left: final weights, ``metrics.json``, every row of ``csv/metrics.csv``,
and no temporary file anywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import subprocess_env, train_cmd

Boundary = tuple[str, int]  # (fault point, n-th time the run reaches it)
Command = Callable[..., list[str]]  # overrides -> argv: train_cmd (cliptune-train) or distill_cmd


def distill_cmd(*overrides: str) -> list[str]:
    """``cliptune-distill`` with these overrides, as a subprocess argv."""
    return [sys.executable, "-c", "from cliptune.train.cli import distill_main; distill_main()", *overrides]


def _env(**extra: str) -> dict:
    env = subprocess_env()
    env.pop("CLIPTUNE_FAULT", None)
    env.pop("CLIPTUNE_FAULT_TRACE", None)
    env.update(extra)
    return env


def _run(args: list[str], env: dict, timeout: float = 600, cmd: Command = train_cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


def trace(args: list[str], trace_file: Path, cmd: Command = train_cmd) -> list[Boundary]:
    """Run ``cliptune-train args`` (or ``cmd``'s command) to the end, returning the boundaries it crossed, in order."""
    done = _run(args, _env(CLIPTUNE_FAULT_TRACE=str(trace_file)), cmd=cmd)
    assert done.returncode == 0, done.stderr[-4000:]
    return [(name, int(n)) for name, n in (line.split("\t") for line in trace_file.read_text().splitlines())]


def kill_at(args: list[str], boundary: Boundary, cmd: Command = train_cmd) -> None:
    """Run ``cliptune-train args`` (or ``cmd``'s command) and SIGKILL it at ``boundary``."""
    point, n = boundary
    done = _run(args, _env(CLIPTUNE_FAULT=f"{point}@{n}"), cmd=cmd)
    assert done.returncode == -signal.SIGKILL, (
        f"expected the run to be killed at {point}@{n}, it ended with {done.returncode}: {done.stderr[-3000:]}")


def resume(args: list[str], cmd: Command = train_cmd) -> subprocess.CompletedProcess:
    """The same command with ``resume=true``, run to the end."""
    done = _run([*args, "resume=true"], _env(), cmd=cmd)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def temp_files(root: Path) -> list[Path]:
    """Files an interrupted write leaves (``.<name>.<pid>.tmp``, ``*.tmp``, Lightning's ``metrics.csv.resume``)."""
    return [p for p in root.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or p.name.endswith(".resume"))]


def csv_rows(run: Path) -> pd.DataFrame:
    """``csv/metrics.csv`` with its columns sorted (a resumed writer may order them differently)."""
    df = pd.read_csv(run / "csv" / "metrics.csv")
    return df[sorted(df.columns)]


def assert_same_run(ref: Path, run: Path, what: str, ignore: tuple[str, ...] = ()) -> None:
    """``run`` (killed and resumed) left what ``ref`` (never killed) left (``ignore``: metrics.csv columns
    not compared)."""
    assert not temp_files(run), f"{what}: temporary files left: {temp_files(run)}"
    a = load_file(str(ref / "export" / "open_clip_model.safetensors"))
    b = load_file(str(run / "export" / "open_clip_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{what}: weights {k}")
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    for when in ("before", "after"):
        assert ma[when].keys() == mb[when].keys(), (what, when)
        for name in ma[when]:
            for k, v in ma[when][name].items():
                assert mb[when][name][k] == pytest.approx(v, abs=1e-5), (what, when, name, k)
    assert mb["global_step"] == ma["global_step"] and mb.get("finished") == ma.get("finished"), what
    # one unbroken history: every row of the uninterrupted run, in order, and nothing else (timings aside)
    ha, hb = csv_rows(ref), csv_rows(run)
    ha = ha.drop(columns=[c for c in ha.columns if "samples_per_s" in c or c in ignore])
    hb = hb.drop(columns=[c for c in hb.columns if "samples_per_s" in c or c in ignore])
    assert list(hb.columns) == list(ha.columns), what
    assert len(hb) == len(ha), f"{what}: {len(hb)} rows of metrics.csv, the uninterrupted run has {len(ha)}:\n" \
                               f"{_row_diff(ha, hb)}"
    pd.testing.assert_frame_equal(hb.reset_index(drop=True), ha.reset_index(drop=True), check_exact=False,
                                  rtol=1e-5, atol=1e-6, obj=f"{what}: metrics.csv")


def _row_diff(a: pd.DataFrame, b: pd.DataFrame) -> str:
    def kinds(df: pd.DataFrame) -> list[str]:
        val = [c for c in df.columns if c.startswith("val/")]
        return [f"{int(r.step)}:{'val' if val and r[val].notna().any() else 'train'}" for _, r in df.iterrows()]
    ka, kb = kinds(a), kinds(b)
    return f"missing {sorted(set(ka) - set(kb))}, extra {sorted(set(kb) - set(ka))}" if set(ka) != set(kb) else \
        f"rows repeated: {sorted(k for k in kb if kb.count(k) > ka.count(k))}"


def pick(boundaries: list[Boundary], every: bool = False) -> list[Boundary]:
    """The boundaries a test kills at: all of them with ``every`` (``CLIPTUNE_ALL_KILLPOINTS=1``), else the
    first mid-run occurrence of each point and the last validation's start and end (one of each kind)."""
    if every or os.environ.get("CLIPTUNE_ALL_KILLPOINTS") == "1":
        return list(boundaries)
    chosen: dict[str, Boundary] = {}
    for b in boundaries:
        if b[0] not in chosen and b[1] >= 2 or (b[0] not in chosen and b is boundaries[-1]):
            chosen[b[0]] = b
    for point in ("validation.start", "validation.end"):
        last = [b for b in boundaries if b[0] == point]
        if last:
            chosen[point + " (last)"] = last[-1]
    for b in boundaries:  # points reached only once
        chosen.setdefault(b[0], b)
    return sorted(set(chosen.values()), key=boundaries.index)
