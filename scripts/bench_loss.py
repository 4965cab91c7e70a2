"""Forward+backward time and peak memory: cliptune's tiled losses vs open_clip's dense ones.

    python scripts/bench_loss.py --quick                      # CPU, B = 1024, 4096
    python scripts/bench_loss.py                              # CPU, B = 1024, 4096, 16384
    python scripts/bench_loss.py --device cuda --sizes 16384 65536
    python scripts/bench_loss.py --quick --tile-size 512 1024 2048 4096   # pick a tile size

Every (loss, implementation, B) case runs in a fresh subprocess so peak memory is its own. CPU
peak = the process's peak RSS (getrusage ru_maxrss) minus its RSS just before the measured call,
with inputs allocated and the kernels warmed up on a small batch; CUDA peak =
torch.cuda.max_memory_allocated minus the memory allocated before the call. The measured call is
one forward + backward of the loss on L2-normalised [B, D] features (single process); time is the
median over --repeats further calls.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

IMPLS = ("cliptune", "open_clip")


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _child(case: dict) -> dict:
    """Runs one case; returns {"time_s", "peak_mib"}."""
    import torch
    import torch.nn.functional as F

    if case["threads"]:
        torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    b, d, kind = case["batch"], case["dim"], case["loss"]
    if case["impl"] == "cliptune":
        from cliptune.train.losses import ClipLoss, SigLipLoss

        cls = ClipLoss if kind == "clip" else SigLipLoss
        loss_fn = cls(tile_size=case["tile_size"], rank=0, world_size=1)
    else:
        from open_clip.loss import ClipLoss, SigLipLoss

        loss_fn = ClipLoss() if kind == "clip" else SigLipLoss()

    def make(n: int):
        g = torch.Generator(device="cpu").manual_seed(0)
        img = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device).requires_grad_()
        txt = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device).requires_grad_()
        scale = torch.tensor(14.0, device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        return img, txt, scale, bias

    def step(img, txt, scale, bias) -> None:
        for t in (img, txt, scale, bias):
            t.grad = None
        loss = loss_fn(img, txt, scale, bias) if kind == "siglip" else loss_fn(img, txt, scale)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(*make(64))  # warm-up: load kernels and allocators on a small batch
    inputs = make(b)
    step(*make(min(b, 256)))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step(*inputs)
        first = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = _rss_kib()
        t0 = time.perf_counter()
        step(*inputs)
        first = time.perf_counter() - t0
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times = []
    for _ in range(case["repeats"]):
        t0 = time.perf_counter()
        step(*inputs)
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times) if times else first, "peak_mib": peak}


def _run_case(case: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(case)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="global batch sizes B")
    p.add_argument("--quick", action="store_true", help="B = 1024, 4096 only")
    p.add_argument("--dim", type=int, default=256, help="feature dimension D")
    p.add_argument("--loss", nargs="+", default=["clip", "siglip"], choices=["clip", "siglip"])
    p.add_argument("--tile-size", type=int, nargs="+", default=[None],
                   help="cliptune tile size(s); default: the library default")
    p.add_argument("--repeats", type=int, default=2, help="timed calls after the measured one")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    from rich.progress import Progress
    from rich.table import Table

    from cliptune.log import console
    from cliptune.train.losses import DEFAULT_TILE_SIZE

    sizes = args.sizes or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    tiles = [t or DEFAULT_TILE_SIZE for t in args.tile_size]
    base = {"device": args.device, "dim": args.dim, "repeats": args.repeats,
            "threads": args.threads}
    plan = [(kind, b) for kind in args.loss for b in sizes]
    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task("cases", total=len(plan) * (1 + len(tiles)))
        for kind, b in plan:
            case = {**base, "loss": kind, "batch": b, "tile_size": None}
            progress.update(task, description=f"{kind} B={b} open_clip")
            dense = _run_case({**case, "impl": "open_clip"})
            progress.advance(task)
            for tile in tiles:
                progress.update(task, description=f"{kind} B={b} cliptune tile={tile}")
                tiled = _run_case({**case, "impl": "cliptune", "tile_size": tile})
                progress.advance(task)
                rows.append((kind, b, tile, tiled, dense))

    def fmt(r: dict, key: str, spec: str) -> str:
        return r["error"][:40] if "error" in r else format(r[key], spec)

    def ratio(a: dict, b: dict, key: str) -> str:
        if "error" in a or "error" in b or not b[key]:
            return "-"
        return f"{a[key] / b[key]:.2f}x"

    table = Table(title=f"loss forward+backward, D={args.dim}, device={args.device}")
    for col in ("loss", "B", "tile", "cliptune s", "open_clip s", "time ratio",
                "cliptune MiB", "open_clip MiB", "memory ratio"):
        table.add_column(col, justify="left" if col == "loss" else "right")
    for kind, b, tile, tiled, dense in rows:
        table.add_row(
            kind, str(b), str(tile),
            fmt(tiled, "time_s", ".3f"), fmt(dense, "time_s", ".3f"), ratio(tiled, dense, "time_s"),
            fmt(tiled, "peak_mib", ".0f"), fmt(dense, "peak_mib", ".0f"),
            ratio(tiled, dense, "peak_mib"),
        )
    console().print(table)  # whole outside a terminal too (a log file, CI)


if __name__ == "__main__":
    main()
