"""CPU cost of reading tar shards: cliptune's streaming parser vs ``tarfile`` and webdataset.

    python scripts/bench_tar.py                     # synthetic shards in a temp dir, ~20 s
    python scripts/bench_tar.py --shards '/data/train-{000000..000009}.tar' --rounds 5

Each side reads every member of the same shards (names and bytes, what a data loader needs),
from the page cache (one untimed warm-up pass first), in alternating rounds; the median CPU time
(process time, so other load on the machine counts less) and the ratio are printed.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import braceexpand
from webdataset.tariterators import tar_file_expander, url_opener

from cliptune.data.tar import TarMembers


def _write_shards(out: Path, n_shards: int, per_shard: int, member_bytes: int) -> list[str]:
    urls = []
    payload = bytes(range(256)) * (member_bytes // 256 + 1)
    for s in range(n_shards):
        path = out / f"bench-{s:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                for ext, size in (("jpg", member_bytes), ("json", 200), ("txt", 40)):
                    info = tarfile.TarInfo(f"{s:06d}{i:06d}.{ext}")
                    info.size = size
                    tar.addfile(info, io.BytesIO(payload[:size]))
        urls.append(str(path))
    return urls


def read_cliptune(urls: list[str]) -> int:
    n = 0
    for url in urls:
        with open(url, "rb") as f:
            tar = TarMembers(f)
            for _name in tar:
                n += len(tar.read())
    return n


def read_tarfile(urls: list[str]) -> int:
    n = 0
    for url in urls:
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                if info.isreg():
                    n += len(tar.extractfile(info).read())
    return n


def read_webdataset(urls: list[str]) -> int:
    samples = tar_file_expander(url_opener({"url": u} for u in urls), eof_value=None)
    return sum(len(s["data"]) for s in samples if s is not None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="brace pattern of tar shards (default: synthetic shards in a temp dir)")
    p.add_argument("--num-shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=1000, help="samples per synthetic shard (3 members each)")
    p.add_argument("--member-bytes", type=int, default=12_000, help="image member size of synthetic samples")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = list(braceexpand.braceexpand(args.shards)) if args.shards else _write_shards(
            Path(tmp), args.num_shards, args.per_shard, args.member_bytes)
        impls = {"cliptune": read_cliptune, "tarfile": read_tarfile, "webdataset": read_webdataset}
        sizes = {name: fn(urls) for name, fn in impls.items()}  # warm-up; all must read the same bytes
        assert len(set(sizes.values())) == 1, sizes
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                t0 = time.process_time()
                fn(urls)
                times[name].append(time.process_time() - t0)
        mb = sizes["cliptune"] / 1e6
        base = statistics.median(times["cliptune"])
        print(f"{len(urls)} shards, {mb:.0f} MB, median CPU seconds over {args.rounds} rounds")
        print(f"{'reader':<12}{'CPU s':>8}{'MB/s':>9}{'x cliptune':>12}")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{name:<12}{med:>8.3f}{mb / med:>9.0f}{med / base:>11.2f}x")


if __name__ == "__main__":
    main()
