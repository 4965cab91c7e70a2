"""``cliptune-train``: the Hydra entry point.

    cliptune-train experiment=smoke                          # CPU, synthetic data, < 1 min
    cliptune-train experiment=demo                           # bundled emoji domain
    cliptune-train -m experiment=demo loss=clip,siglip       # one run per loss, then cliptune-compare
    cliptune-train experiment=demo resume=true               # continue a killed run (same command + resume)
    cliptune-train model=vit_b_32 data=wds 'data.train="shards/train-{000000..000127}.tar"' \
        'data.val.domain="shards/val-{000000..000003}.tar"' trainer=gpu   # quoted for shell and Hydra

``--help`` lists the config groups with their options and the top-level keys with their comments.
A sweep (``-m``) puts each run in ``<out_root>/<name>/<swept overrides>``, named after the swept keys
only (``loss=clip``, ``loss=siglip,optim.lr=1e-4``), one path component each: the other overrides are
the same for every run (each run's own are in its ``overrides.yaml``).

This module imports only Hydra and cliptune's light core (the helpers every Hydra CLI shares are
`cliptune.cli`): ``--help``, ``--cfg job`` and tab completion answer without loading torch, Lightning or
open_clip. The run itself is `cliptune.train.run.run`; ``distill_main`` is ``cliptune-distill``'s entry, whose
run is `cliptune.train.distill.run`.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf

from cliptune.cli import hydra_cli, hydra_overrides, quote_equals
from cliptune.log import configure_job_logging
from cliptune.validate import run_name_problem

MAX_DIRNAME = 200  # bytes of a sweep job's folder name (file systems allow 255)


def job_dirname(overrides: str, num: int | str = 0) -> str:
    """A sweep job's folder name, one path component: its swept overrides with ``/`` (and ``\\``) as ``_``
    (``data.train=/a/b`` -> ``data.train=_a_b``), its job number when nothing is swept, and a hash
    ending a name longer than ``MAX_DIRNAME`` bytes."""
    name = re.sub(r"[/\\\x00]", "_", str(overrides)).strip() or str(num)
    if name in (".", ".."):
        name = f"job{num}"
    if len(name.encode()) > MAX_DIRNAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:12]
        name = name.encode()[:MAX_DIRNAME - 13].decode(errors="ignore") + "-" + digest
    return name


def register_job_dirname() -> None:
    """``${job_dirname:...}``, which names a sweep's job folders (``hydra.sweep.subdir`` in configs/train.yaml)."""
    if not OmegaConf.has_resolver("job_dirname"):
        OmegaConf.register_new_resolver("job_dirname", job_dirname)


def sweep_overrides(argv: Sequence[str]) -> list[str]:
    """What ``cliptune-train`` adds to a sweep's command line: ``override_dirname`` leaves out every key
    that is not swept, so each run's folder is named after its swept values only.

    Nothing is added without ``-m``, when the command line sets the folder names itself, or when its
    overrides do not parse (Hydra then reports the error).
    """
    if not any(a in ("-m", "--multirun") for a in argv) and "hydra.mode=MULTIRUN" not in argv:
        return []
    words = hydra_overrides(argv)
    if any(w.lstrip("+~").startswith(("hydra.job.config.override_dirname", "hydra.sweep.subdir")) for w in words):
        return []
    try:
        parsed = OverridesParser.create().parse_overrides(words)
    except OverrideParseException:
        return []
    fixed = sorted({o.key_or_group for o in parsed if not o.is_hydra_override() and not o.is_sweep_override()})
    return ["hydra.job.config.override_dirname.exclude_keys=[" + ",".join(f"'{k}'" for k in fixed) + "]"]


def run_name_error(argv: Sequence[str]) -> str | None:
    """``name=`` on the command line that would put the run directory outside the runs folder
    (`cliptune.validate.run_name_problem`), as ``"error: ..."``; checked before Hydra runs, because Hydra
    makes the run directory (``../x`` included) before the job starts. A sweep's values are checked by each job."""
    words = hydra_overrides(argv)
    values: dict[str, Any] = {}
    for word in words:
        key = word.split("=", 1)[0].lstrip("+~")
        if key in ("name", "out_root") and "=" in word:
            try:
                parsed = OverridesParser.create().parse_overrides([word])[0]
            except OverrideParseException:
                return None  # Hydra reports it
            if not parsed.is_sweep_override():
                values[key] = parsed.value()
    if "name" not in values:
        return None
    name = values["name"]
    problem = run_name_problem(str(name) if isinstance(name, (int, float)) else name, values.get("out_root") or "runs")
    return f"error: {problem}" if problem else None


def _task(cfg: DictConfig) -> float | None:
    from cliptune.train.run import run  # noqa: PLC0415 - torch, Lightning, open_clip: only once a job runs

    configure_job_logging()
    result = run(cfg)
    after = result.get("after") or {}
    first = next(iter(after.values()), {})
    return first.get("mean_R")  # the value Hydra sweepers optimise


def _refuse_bad_name(argv: Sequence[str]) -> None:
    error = None if any(a in ("-sc", "--shell-completion") for a in argv) else run_name_error(argv)
    if error:
        sys.stderr.write(error + "\n")
        raise SystemExit(2)


def main() -> None:
    argv = quote_equals(sys.argv[1:])  # runs/losses/loss=clip as printed (before the sweep's names are made)
    _refuse_bad_name(argv)
    sys.argv[1:] = argv + sweep_overrides(argv)  # Hydra reads sys.argv
    register_job_dirname()
    hydra_cli("cliptune-train", "train", _task, argv, advice=None, groups=True)


def _distill_job(cfg: DictConfig) -> float | None:
    from cliptune.train.distill import run as distill_run  # noqa: PLC0415 - torch, Lightning, open_clip: only once a job runs

    configure_job_logging()
    after = distill_run(cfg).get("after") or {}
    return next(iter(after.values()), {}).get("mean_R")


def distill_main(argv: Sequence[str] | None = None) -> None:
    """``cliptune-distill``: configs/distill.yaml and `cliptune.train.distill.run`, with ``--help``, ``--cfg job``
    and tab completion answered before torch is imported (as ``cliptune-train``)."""
    saved = list(sys.argv)
    if argv is not None:
        sys.argv[1:] = list(argv)
    try:
        _refuse_bad_name(quote_equals(sys.argv[1:]))
        hydra_cli("cliptune-distill", "distill", _distill_job, sys.argv[1:], advice=None, groups=True)
    finally:
        sys.argv[:] = saved


if __name__ == "__main__":
    main()
