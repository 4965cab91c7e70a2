"""Start-up time of every cliptune CLI against importing the libraries a job needs.

    python scripts/bench_cli.py                 # 5 alternating rounds, about a minute
    python scripts/bench_cli.py --rounds 9

Each round runs ``python -c "import torch, lightning, open_clip"`` (the reference: what a CLI that
imports its job's libraries pays before it can answer) and then each case below as a subprocess,
and takes the wall time of each. A case's ratio is its time over the reference time of the same
round, so load on the machine hits both alike; the table shows the median ratio of the rounds and
their spread (lowest-highest), and whether it meets the goal of at most ``--goal`` (0.3x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REFERENCE = ("import torch, lightning, open_clip", [sys.executable, "-c", "import torch, lightning, open_clip"], {})


def _script(name: str, *args: str) -> list[str]:
    return [str(BIN / name), *args]


def _wiseft_entry(*args: str) -> list[str]:
    """cliptune-wiseft's light entry, as an entry point pointing at it would run it."""
    code = ("import sys; sys.argv = ['cliptune-wiseft', *sys.argv[1:]]; "
            "from cliptune.eval.cli import wiseft_main; wiseft_main()")
    return [sys.executable, "-c", code, *args]


CASES: list[tuple[str, list[str], dict[str, str]]] = [
    ("cliptune-train --help", _script("cliptune-train", "--help"), {}),
    ("cliptune-train --cfg job experiment=smoke", _script("cliptune-train", "--cfg", "job", "experiment=smoke"), {}),
    ("cliptune-train tab completion (model=)", _script("cliptune-train", "-sc", "query=bash"),
     {"COMP_LINE": "cliptune-train model="}),
    ("cliptune-eval --help", _script("cliptune-eval", "--help"), {}),
    ("cliptune-eval --cfg job load=x sets=y", _script("cliptune-eval", "--cfg", "job", "load=x", "sets=y"), {}),
    ("cliptune-wiseft --help", _script("cliptune-wiseft", "--help"), {}),
    ("cliptune.eval.cli:wiseft_main --help", _wiseft_entry("--help"), {}),
    ("cliptune-compare --help", _script("cliptune-compare", "--help"), {}),
    ("cliptune-shards --help", _script("cliptune-shards", "--help"), {}),
    ("cliptune-demo-data --help", _script("cliptune-demo-data", "--help"), {}),
    ("cliptune-distill --help", _script("cliptune-distill", "--help"), {}),
]


def _time(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: %(default)s)")
    p.add_argument("--goal", type=float, default=0.3,
                   help="the ratio each case should stay under (default: %(default)s)")
    args = p.parse_args()

    for _, cmd, env in [REFERENCE, *CASES]:  # warm the page cache and the bytecode caches, untimed
        _time(cmd, env)
    times: dict[str, list[float]] = {name: [] for name, _, _ in [REFERENCE, *CASES]}
    for r in range(args.rounds):
        order = [REFERENCE, *CASES] if r % 2 == 0 else [*CASES[::-1], REFERENCE]  # alternate the order too
        for name, cmd, env in order:
            times[name].append(_time(cmd, env))
        print(f"round {r + 1}/{args.rounds}: reference {times[REFERENCE[0]][-1]:.2f} s", file=sys.stderr)

    ref = times[REFERENCE[0]]
    print(f"\nreference `{REFERENCE[0]}`: median {statistics.median(ref):.2f} s "
          f"({min(ref):.2f}-{max(ref):.2f}) over {args.rounds} rounds\n")
    print("| command | time / import time (median) | spread | median s | <= goal |")
    print("|---|---|---|---|---|")
    for name, _, _ in CASES:
        ratios = [t / r for t, r in zip(times[name], ref)]
        med = statistics.median(ratios)
        print(f"| `{name}` | {med:.3f}x | {min(ratios):.3f}-{max(ratios):.3f}x | {statistics.median(times[name]):.2f} "
              f"| {'yes' if med <= args.goal else 'NO'} |")


if __name__ == "__main__":
    main()
