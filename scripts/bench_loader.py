"""Training-loader throughput: cliptune's make_train_loader vs open_clip's get_wds_dataset.

    python scripts/bench_loader.py --quick                 # ~1 min: 1 and 2 workers, one round
    python scripts/bench_loader.py                         # 3 rounds, median
    python scripts/bench_loader.py --workers 1 2 4 8 --samples 8000 --rounds 3
    python scripts/bench_loader.py --shards '/data/train-{000000..000127}.tar' --samples 20000
    python scripts/bench_loader.py --profile cliptune      # cProfile of one reader in-process (or open_clip)

Both loaders read the same shards (by default ~2000 synthetic 64 px JPEG samples in cliptune's
shard format, written to a temp dir), apply the same open_clip preprocessing
(``open_clip.image_transform(224, is_train=True)``: random resized crop, to tensor, normalise) and
the same tokenizer (``open_clip.get_tokenizer("ViT-B-32")``, CLIP BPE), with resampled shards and a
5000-sample shuffle buffer on both sides, and yield batches of --batch-size. samples/s counts the
samples of all batches after the first (steady state: worker start-up and the shuffle buffer's
initial fill are reported separately as "first batch s"). open_clip's reader gets the one-line fix
it needs with webdataset >= 0.2.96 (eof_value=None, see _patch_open_clip_for_webdataset_1). Rounds interleave
the two loaders so load from other processes hits both alike; the table shows the median over rounds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

IMPLS = ("cliptune", "open_clip")


def write_synthetic_shards(out: Path, n: int, per_shard: int, size: int = 64, seed: int = 0) -> str:
    """``n`` random-block JPEGs with captions in cliptune's shard format (+ index and sizes.json)."""
    import webdataset as wds
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    shards, sizes = [], {}
    for s in range(0, n, per_shard):
        name = f"train-{s // per_shard:06d}.tar"
        count = 0
        with wds.TarWriter(str(out / name)) as w:
            for i in range(s, min(n, s + per_shard)):
                img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
                draw = ImageDraw.Draw(img)
                for _ in range(6):
                    x, y = rng.randrange(size), rng.randrange(size)
                    draw.rectangle((x, y, x + rng.randrange(4, size // 2), y + rng.randrange(4, size // 2)),
                                   fill=tuple(rng.randrange(256) for _ in range(3)))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                caption = f"a synthetic picture number {i} with {rng.randrange(2, 9)} coloured blocks"
                meta = {"captions": {"en": [caption, f"picture {i}"]}, "label": None, "group": None, "meta": {}}
                w.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "txt": caption.encode(),
                         "json": json.dumps(meta).encode()})
                count += 1
        shards.append({"name": name, "num_samples": count})
        sizes[name] = count
    (out / "train.json").write_text(json.dumps({"split": "train", "num_samples": n, "shards": shards}))
    (out / "sizes.json").write_text(json.dumps(sizes))
    return str(out / f"train-{{000000..{len(shards) - 1:06d}}}.tar")


def _cliptune_loader(shards: str, args: argparse.Namespace, workers: int, transform, tokenizer):
    from cliptune.data.wds import LoaderSettings, make_train_loader

    settings = LoaderSettings(args.batch_size, workers=workers, samples_per_epoch=args.samples, resampled=True,
                              sample_shuffle=5000, seed=0, persistent_workers=True)
    return make_train_loader(shards, settings, tokenizer, transform, rank=0, world_size=1)


def _patch_open_clip_for_webdataset_1() -> None:
    """open_clip pins webdataset<=0.2.86; since 0.2.96 ``tar_file_expander`` yields an end-of-shard
    marker ``{}`` that open_clip's ``group_by_keys_nothrow`` fails on (KeyError 'fname'; webdataset
    issue 384, open_clip issue 935). Apply the fix given there, eof_value=None, and nothing else."""
    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander, url_opener

    def tarfile_to_samples_nothrow(src, handler=ocd.log_and_continue):
        streams = url_opener(src, handler=handler)
        files = tar_file_expander(streams, handler=handler, eof_value=None)
        return ocd.group_by_keys_nothrow(files, handler=handler)

    ocd.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow


def _open_clip_loader(shards: str, args: argparse.Namespace, workers: int, transform, tokenizer):
    from open_clip_train.data import get_wds_dataset

    _patch_open_clip_for_webdataset_1()

    oc_args = SimpleNamespace(
        train_data=shards, val_data=None, train_num_samples=args.samples, dataset_resampled=True,
        train_data_upsampling_factors=None, seed=0, batch_size=args.batch_size, world_size=1, workers=workers,
    )
    return get_wds_dataset(oc_args, transform, is_train=True, epoch=0, tokenizer=tokenizer).dataloader


def _cpu_s() -> float:
    """CPU seconds used so far by this process and its live children (the loader's workers)."""
    import psutil

    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(impl: str, shards: str, args: argparse.Namespace, workers: int, transform, tokenizer) -> dict:
    """One epoch of one loader: first-batch latency, steady-state samples/s and samples per CPU second.

    Samples per CPU second (main process + workers, from psutil) hardly moves when other processes
    share the cores, unlike wall-clock samples/s.
    """
    make = _cliptune_loader if impl == "cliptune" else _open_clip_loader
    loader = make(shards, args, workers, transform, tokenizer)
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t1, c1 = time.perf_counter(), _cpu_s()
    n = 0
    for batch in it:
        image = batch["image"] if isinstance(batch, dict) else batch[0]
        n += image.shape[0]
    t2, c2 = time.perf_counter(), _cpu_s()
    shape = tuple((first["image"] if isinstance(first, dict) else first[0]).shape)
    del it, loader  # shut the workers down before the next loader starts its own
    return {"first_s": t1 - t0, "samples_per_s": n / max(t2 - t1, 1e-9), "samples_per_cpu_s": n / max(c2 - c1, 1e-9),
            "samples": n, "batch_shape": shape}


def profile(shards: str, args: argparse.Namespace, transform, tokenizer, impl: str) -> None:
    """cProfile of one reader run in the main process (workers=0): where a worker's time goes."""
    import cProfile
    import pstats

    make = _cliptune_loader if impl == "cliptune" else _open_clip_loader
    loader = make(shards, args, 0, transform, tokenizer)
    prof = cProfile.Profile()
    c0 = time.process_time()
    prof.enable()
    n = 0
    for b in loader:
        n += (b["image"] if isinstance(b, dict) else b[0]).shape[0]
    prof.disable()
    print(f"{impl}: profiled {n} samples (workers=0), {time.process_time() - c0:.2f} CPU s with the profiler on")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard spec read by both loaders (default: synthetic shards in a temp dir)")
    p.add_argument("--num-synthetic", type=int, default=2000, help="synthetic samples to write")
    p.add_argument("--per-shard", type=int, default=125, help="synthetic samples per shard")
    p.add_argument("--samples", type=int, default=None, help="samples per measured epoch (default 2 x synthetic)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--quick", action="store_true", help="one round of 2000 samples (~1 min)")
    p.add_argument("--profile", choices=IMPLS, help="profile one reader in-process (workers=0) and exit")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.rounds = 1
        args.samples = args.samples or 2000
    args.samples = args.samples or 2 * args.num_synthetic

    import open_clip
    import torch

    torch.set_num_threads(1)  # the main process only receives batches; leave the cores to the workers
    transform = open_clip.image_transform(args.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        shards = args.shards
        if shards is None:
            t = time.perf_counter()
            shards = write_synthetic_shards(Path(tmp), args.num_synthetic, args.per_shard)
            print(f"wrote {args.num_synthetic} synthetic samples to {tmp} in {time.perf_counter() - t:.1f} s")
        if args.profile:
            profile(shards, args, transform, tokenizer, args.profile)
            return
        print(f"cpus: {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}), load {os.getloadavg()[0]:.1f}; "
              f"{args.samples} samples per epoch, batch {args.batch_size}, {args.image_size} px")
        results: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.rounds):
            for workers in args.workers:
                order = IMPLS if r % 2 == 0 else IMPLS[::-1]
                for impl in order:
                    res = measure(impl, shards, args, workers, transform, tokenizer)
                    results.setdefault((impl, workers), []).append(res)
                    print(f"  round {r} {impl:9s} workers={workers}: {res['samples_per_s']:7.0f} samples/s, "
                          f"{res['samples_per_cpu_s']:6.0f} samples/CPU-s, first batch {res['first_s']:.2f} s",
                          flush=True)

    def med(impl: str, workers: int, key: str) -> float:
        return statistics.median(x[key] for x in results[(impl, workers)])

    print(f"\n{'':>7} | {'samples/s (wall clock)':^30} | {'samples per CPU second':^30} | {'first batch s':^13}")
    print(f"{'workers':>7} | {'cliptune':>9} {'open_clip':>9} {'ratio':>9} | {'cliptune':>9} {'open_clip':>9} "
          f"{'ratio':>9} | {'ct':>6} {'oc':>6}")
    print("-" * 92)
    table = []
    for workers in args.workers:
        row = {"workers": workers}
        for key in ("samples_per_s", "samples_per_cpu_s", "first_s"):
            row[key] = {impl: med(impl, workers, key) for impl in IMPLS}
        w, c = row["samples_per_s"], row["samples_per_cpu_s"]
        print(f"{workers:>7} | {w['cliptune']:>9.0f} {w['open_clip']:>9.0f} {w['cliptune'] / w['open_clip']:>9.2f} | "
              f"{c['cliptune']:>9.0f} {c['open_clip']:>9.0f} {c['cliptune'] / c['open_clip']:>9.2f} | "
              f"{row['first_s']['cliptune']:>6.2f} {row['first_s']['open_clip']:>6.2f}")
        table.append(row)
    print("ratio = cliptune / open_clip (> 1: cliptune faster)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "table": table}, indent=2))


if __name__ == "__main__":
    main()
