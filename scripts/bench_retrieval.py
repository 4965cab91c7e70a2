"""Recall@K at scale: cliptune's chunked exact metric against the dense styles of open_clip and
CLIP_benchmark, in time and peak memory, with the results asserted identical query by query.

    python scripts/bench_retrieval.py --quick                  # N <= 20k, CPU-sized (make bench)
    python scripts/bench_retrieval.py                          # N up to 100k
    python scripts/bench_retrieval.py --device cuda --sizes 10000,100000 --max-dense-gb 60
    python scripts/bench_retrieval.py --captions 5             # 5 captions per image (no open_clip row)

Methods (all on the same fp32 unit-norm embeddings, N images x N*captions texts, D dims):
- cliptune: `cliptune.eval.retrieval.retrieval_metrics`, queries in chunks of --chunk; memory
  O(chunk x N), ties counted against the query.
- open_clip: open_clip_train's `get_clip_metrics` (train.py evaluate): the full logits matrix
  ``image @ text.T`` and ``argsort`` of every row, both directions (logit_scale 1: scaling is
  monotonic). One caption per image only.
- clip_benchmark: CLIP_benchmark's zeroshot_retrieval: the full ``texts @ images.T`` scores, a dense
  bool positive-pair matrix, then ``topk`` + one-hot per batch of --cb-batch queries.
Dense methods are skipped when their estimated memory exceeds --max-dense-gb, and any method whose
run time, projected quadratically from the previous size, exceeds --max-seconds; the table says so.

Identity: every per-query rank / hit of a reference method must equal cliptune's, except where
the positive's score equals a wrong item's score exactly (fp32 ties happen at N ~ 20k even for
random vectors): argsort / topk break those arbitrarily, cliptune counts them against the query,
and the script checks the reference's answer is one a tie-break could give, and reports how many.

Peak memory: on CPU each measurement runs in a forked child that resets its high-water mark
(/proc/self/clear_refs) after building the inputs, so the figure is the resident memory the method
adds (allocator caching and fragmentation included); on CUDA, torch.cuda.max_memory_allocated.
Timings on a shared machine vary; the ratios are the point. Small N (<= 2000) take the best of 3.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import pickle
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

KS = (1, 5, 10)
METHODS = ("cliptune", "open_clip", "clip_benchmark")


# ----------------------------------------------------------------------------- inputs
def make_embeddings(n: int, captions: int, dim: int, noise: float, seed: int, device: str):
    """Unit-norm images and noisy captions of them; ``noise`` sets how hard retrieval is."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    owner = torch.arange(n).repeat_interleave(captions)
    txt = F.normalize(img[owner] + noise * torch.randn(n * captions, dim, generator=g) / math.sqrt(dim), dim=-1)
    return img.to(device), txt.to(device), owner.to(device)


# ----------------------------------------------------------------------------- the methods
def run_cliptune(img, txt, owner, chunk: int) -> dict:
    from cliptune.eval.retrieval import retrieval_metrics

    m, pq = retrieval_metrics(img, txt, owner, ks=KS, chunk_size=chunk, return_per_query=True)
    return {"metrics": {k: v for k, v in m.items() if "_R@" in k},
            "t2i_rank": pq["t2i_rank"], "i2t_rank": pq["i2t_rank"],
            **{f"hit/{k}": pq[k] for k in pq if "_R@" in k}}


def run_open_clip(img, txt, owner, _chunk: int) -> dict:
    """open_clip_train.train.get_clip_metrics, verbatim in substance (logit_scale = 1)."""
    logits_per_image = (img @ txt.t()).detach()
    logits_per_text = logits_per_image.t().detach()
    logits = {"i2t": logits_per_image, "t2i": logits_per_text}
    ground_truth = torch.arange(len(txt), device=img.device).view(-1, 1)
    out: dict[str, Any] = {"metrics": {}}
    for name, logit in logits.items():
        ranking = torch.argsort(logit, descending=True)
        preds = torch.where(ranking == ground_truth)[1]
        out[f"{name}_rank"] = (preds + 1).cpu()
        for k in KS:
            out["metrics"][f"{name}_R@{k}"] = (preds < k).double().mean().item()
        del ranking, preds
    return out


def _cb_recall_at_k(scores, positive_pairs, k):
    # CLIP_benchmark clip_benchmark/metrics/zeroshot_retrieval.py recall_at_k
    nb_texts, nb_images = scores.shape
    topk_indices = torch.topk(scores, k, dim=1)[1]
    nb_positive = positive_pairs.sum(dim=1)
    topk_indices_onehot = torch.nn.functional.one_hot(topk_indices, num_classes=nb_images)
    positive_pairs_reshaped = positive_pairs.view(nb_texts, 1, nb_images)
    nb_true_positive = (topk_indices_onehot * positive_pairs_reshaped).sum(dim=(1, 2))
    return nb_true_positive / nb_positive


def _cb_batchify(func, X, Y, batch_size, *args, **kwargs):
    results = []
    for start in range(0, len(X), batch_size):
        results.append(func(X[start:start + batch_size], Y[start:start + batch_size], *args, **kwargs).cpu())
    return torch.cat(results)


def run_clip_benchmark(img, txt, owner, _chunk: int, batch_size: int = 64) -> dict:
    scores = txt @ img.t()
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores), device=scores.device), owner] = True
    out: dict[str, Any] = {"metrics": {}}
    for k in KS:
        t2i = _cb_batchify(_cb_recall_at_k, scores, positive_pairs, batch_size, k=k) > 0
        i2t = _cb_batchify(_cb_recall_at_k, scores.T, positive_pairs.T, batch_size, k=k) > 0
        out["metrics"][f"t2i_R@{k}"] = t2i.float().mean().item()
        out["metrics"][f"i2t_R@{k}"] = i2t.float().mean().item()
        out[f"hit/t2i_R@{k}"], out[f"hit/i2t_R@{k}"] = t2i, i2t
    return out


RUNNERS: dict[str, Callable] = {"cliptune": run_cliptune, "open_clip": run_open_clip,
                                "clip_benchmark": run_clip_benchmark}


def estimate_bytes(method: str, n_img: int, n_txt: int, chunk: int, cb_batch: int) -> int:
    """Rough peak of what each method allocates (for the skip decision only)."""
    nn = n_img * n_txt
    if method == "cliptune":
        return 6 * min(chunk, max(n_img, n_txt)) * max(n_img, n_txt)  # fp32 scores + bool compare
    if method == "open_clip":
        return 17 * nn  # logits 4 + argsort: int64 indices 8 and a sorted copy 4 + bool compare 1
    return 5 * nn + 8 * cb_batch * max(KS) * max(n_img, n_txt)  # scores 4 + bool pairs 1 + one-hot


# ----------------------------------------------------------------------------- measuring
def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmHWM: peak RSS, VmRSS: current) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _measure(method: str, args: argparse.Namespace, n: int) -> dict:
    """Build the inputs, then time the method and record the memory it adds."""
    img, txt, owner = make_embeddings(n, args.captions, args.dim, args.noise, args.seed, args.device)
    fn = RUNNERS[method]
    kw = {"batch_size": args.cb_batch} if method == "clip_benchmark" else {}
    cuda = args.device.startswith("cuda")
    repeats = 3 if n <= 2000 else 1
    best, res, peak = math.inf, None, 0
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base = _status_bytes("VmRSS")
        t0 = time.perf_counter()
        res = fn(img, txt, owner, args.chunk, **kw)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        peak = max(peak, (torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")) - base)
    check = {} if method == "cliptune" else check_against_cliptune(img, txt, owner, args.chunk, res, method)
    return {"seconds": best, "peak_bytes": peak, "metrics": res["metrics"], **check}


def _child(method: str, args: argparse.Namespace, n: int, conn) -> None:
    try:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        out = _measure(method, args, n)
    except BaseException as e:  # report, never hang the parent
        out = {"error": f"{type(e).__name__}: {e}"}
    try:
        # plain pickle: multiprocessing would share tensors through file descriptors that die with us
        conn.send_bytes(pickle.dumps(out))
    finally:
        conn.close()


def measure(method: str, args: argparse.Namespace, n: int) -> dict:
    if args.device.startswith("cuda") or not os.path.exists("/proc/self/clear_refs"):
        return _measure(method, args, n)
    ctx = mp.get_context("fork")  # the parent has run no torch kernel: forking is safe
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(method, args, n, child))
    p.start()
    child.close()
    try:
        out = pickle.loads(parent.recv_bytes())
    except EOFError:
        out = {"error": f"the measuring process died (exit code {p.exitcode}; out of memory?)"}
    p.join()
    if "error" in out:
        raise RuntimeError(f"{method} at N={n}: {out['error']}")
    return out


# ----------------------------------------------------------------------------- checks
@torch.no_grad()
def tie_bounds(img, txt, owner, chunk: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per query, the best and worst rank any tie-breaking could give, from the very products
    cliptune computes (same chunks): ``lo = 1 + #wrong > pos``, ``hi = 1 + #wrong >= pos``."""
    out = {}
    n_img, n_txt = img.shape[0], txt.shape[0]
    lo, hi = torch.empty(n_txt, dtype=torch.long), torch.empty(n_txt, dtype=torch.long)
    for s in range(0, n_txt, chunk):
        sc = txt[s:s + chunk] @ img.T  # [c, N_img] as in ranks_t2i
        pos = sc.gather(1, owner[s:s + chunk, None])
        wrong = torch.ones_like(sc, dtype=torch.bool).scatter_(1, owner[s:s + chunk, None], False)
        lo[s:s + chunk] = 1 + ((sc > pos) & wrong).sum(1).cpu()
        hi[s:s + chunk] = 1 + ((sc >= pos) & wrong).sum(1).cpu()
    out["t2i"] = (lo, hi)
    lo, hi = torch.empty(n_img, dtype=torch.long), torch.empty(n_img, dtype=torch.long)
    for s in range(0, n_img, chunk):
        sc = img[s:s + chunk] @ txt.T  # [c, N_txt] as in ranks_i2t
        mine = owner[None, :] == torch.arange(s, s + sc.shape[0], device=sc.device)[:, None]
        best = sc.masked_fill(~mine, -math.inf).amax(1, keepdim=True)
        lo[s:s + chunk] = 1 + ((sc > best) & ~mine).sum(1).cpu()
        hi[s:s + chunk] = 1 + ((sc >= best) & ~mine).sum(1).cpu()
    out["i2t"] = (lo, hi)
    return out


def check_against_cliptune(img, txt, owner, chunk: int, res: dict, method: str) -> dict:
    """``res`` must equal cliptune query for query, except where scores tie exactly: argsort and
    topk break ties arbitrarily (cliptune counts them against the query), so there any rank
    within the tie is right. Anything else raises."""
    ref = run_cliptune(img, txt, owner, chunk)
    bounds = None
    tied = {"t2i": torch.zeros_like(ref["t2i_rank"], dtype=torch.bool),
            "i2t": torch.zeros_like(ref["i2t_rank"], dtype=torch.bool)}
    for key in [k for k in res if k.endswith("_rank") or k.startswith("hit/")]:
        got, want = res[key].cpu(), ref[key]
        diff = got.to(want.dtype) != want
        if not diff.any():
            continue
        bounds = bounds or tie_bounds(img, txt, owner, chunk)
        if key.endswith("_rank"):
            d = key[:3]
            lo, hi = bounds[d]
            ok = (got >= lo) & (got <= hi)
        else:
            d, k = key[4:7], int(key.rsplit("@", 1)[1])
            lo, hi = bounds[d]
            ok = (lo <= k) & (hi > k)  # a tie straddles k: hit and miss are both right
        if not ok[diff].all():
            q = int(diff.nonzero()[0])
            raise AssertionError(f"{method} differs from cliptune on {int(diff.sum())} queries of {key} (first: "
                                 f"query {q}: {got[q].item()} vs {want[q].item()}) and not only at exact ties")
        tied[d] |= diff
    for name, v in res["metrics"].items():
        d = name[:3]
        slack = tied[d].sum().item() / tied[d].numel() + 1e-6  # CLIP_benchmark averages in fp32
        if abs(v - ref["metrics"][name]) > slack:
            raise AssertionError(f"{method} {name}={v} but cliptune {name}={ref['metrics'][name]}")
    return {"tied_queries": int(tied["t2i"].sum() + tied["i2t"].sum())}


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GB" if b >= 2**30 else f"{b / 2**20:.0f} MB"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="cap N at 20k (CPU-sized)")
    p.add_argument("--sizes", default="1000,5000,10000,20000,50000,100000", help="comma list of N (images)")
    p.add_argument("--captions", type=int, default=1, help="captions per image (open_clip needs 1)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--noise", type=float, default=5.0, help="caption noise; 5 gives R@1 ~0.9 at 20k")
    p.add_argument("--chunk", type=int, default=4096, help="cliptune queries per chunk")
    p.add_argument("--cb-batch", type=int, default=64, help="CLIP_benchmark batch (its --batch_size default)")
    p.add_argument("--max-dense-gb", type=float, default=8.0, help="skip dense methods needing more memory")
    p.add_argument("--max-seconds", type=float, default=120.0,
                   help="skip runs projected (quadratically from the previous N) to take longer; 0: no limit")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes = [s for s in sizes if s <= 20_000] or [min(sizes)]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    if "cliptune" not in methods:
        methods.insert(0, "cliptune")  # the reference every ratio is taken against
    print(f"device={args.device} D={args.dim} captions/image={args.captions} chunk={args.chunk} "
          f"threads={args.threads or torch.get_num_threads()} max_dense={args.max_dense_gb} GB "
          f"max_seconds={args.max_seconds}", flush=True)

    rows: list[dict] = []
    last_time: dict[str, tuple[int, float]] = {}
    for n in sizes:
        n_txt = n * args.captions
        for method in methods:
            row = {"N": n, "texts": n_txt, "method": method, "seconds": None, "peak": None, "note": ""}
            rows.append(row)
            if method == "open_clip" and args.captions != 1:
                row["note"] = "n/a: one caption per image only"
                continue
            need = estimate_bytes(method, n, n_txt, args.chunk, args.cb_batch)
            if method != "cliptune" and need > args.max_dense_gb * 2**30:
                row["note"] = f"skipped: needs ~{_fmt_bytes(need)} > --max-dense-gb {args.max_dense_gb:g}"
                continue
            if method in last_time and args.max_seconds > 0:
                n0, t0 = last_time[method]
                projected = t0 * (n / n0) ** 2
                if projected > args.max_seconds:
                    row["note"] = f"skipped: projected {projected:.0f} s > --max-seconds {args.max_seconds:g}"
                    continue
            out = measure(method, args, n)  # raises unless identical to cliptune (up to exact ties)
            row["seconds"], row["peak"] = out["seconds"], out["peak_bytes"]
            row["R@1"] = out["metrics"]["t2i_R@1"]
            last_time[method] = (n, out["seconds"])
            if method != "cliptune":
                ties = out["tied_queries"]
                row["note"] = "identical to cliptune" + (
                    f" (except {ties} queries whose positive ties exactly with a wrong item: "
                    "broken arbitrarily there, counted against by cliptune)" if ties else "")
            print(f"  N={n:>7} {method:<15} {row['seconds']:8.2f} s  {_fmt_bytes(row['peak']):>9}  {row['note']}",
                  flush=True)

    # the table, ratios against cliptune at the same N
    base = {r["N"]: r for r in rows if r["method"] == "cliptune"}
    print()
    print("| N | method | time (s) | peak memory | time / cliptune | memory / cliptune | t2i R@1 | note |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        b = base[r["N"]]
        if r["seconds"] is None:
            print(f"| {r['N']:,} | {r['method']} | - | - | - | - | - | {r['note']} |")
            continue
        tr = f"{r['seconds'] / b['seconds']:.1f}x" if b["seconds"] else "-"
        mr = f"{r['peak'] / b['peak']:.1f}x" if b["peak"] else "-"
        print(f"| {r['N']:,} | {r['method']} | {r['seconds']:.2f} | {_fmt_bytes(r['peak'])} | {tr} | {mr} | "
              f"{r['R@1']:.4f} | {r['note']} |")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
