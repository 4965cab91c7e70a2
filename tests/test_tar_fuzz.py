"""Hostile and damaged shards: every outcome of reading one is a decoded sample, a counted skip or a
``ShardReadError`` naming the shard; never another exception, a hang or unbounded memory.

Archives are built with Python's ``tarfile`` (the reference writer) and then damaged byte by byte;
expected counts are worked out by hand from what the test wrote.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
import tempfile
import tracemalloc
from pathlib import Path

import pytest

pytest.importorskip("hypothesis", reason="needs the dev extra: pip install hypothesis")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cliptune.data.decode import SampleDecoder, skip_counts, skipped_dict
from cliptune.data.tar import ShardReadError, iter_shard
from cliptune.data.wds import make_eval_loader
from helpers_shards import char_tokenizer, image_bytes, tiny_transform, train_loader, write_shards, basic_samples

CAP = 1 << 16  # the reader's member cap in these tests


# ----------------------------------------------------------------------------------------------
# Building and damaging archives


def sample_members(key: str, i: int) -> list[tuple[str, bytes]]:
    meta = {"id": key, "captions": {"en": [f"cap {key}"]}}
    return [(f"{key}.jpg", image_bytes(i, size=8)), (f"{key}.json", json.dumps(meta).encode()),
            (f"{key}.txt", f"cap {key}".encode())]


def build_tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def header_offsets(data: bytes) -> list[int]:
    """Offsets of each member's own header block (after any pax / long-name headers), via tarfile."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset_data - 512 for m in tar.getmembers()]


def fix_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


def set_size(data: bytes, member: int, size: int) -> bytes:
    """``data`` with the header of member ``member`` declaring ``size`` (GNU base-256 when it does not fit octal)."""
    out = bytearray(data)
    off = header_offsets(data)[member]
    block = out[off: off + 512]
    block[124:136] = b"%011o\0" % size if size < 8**11 else b"\x80" + size.to_bytes(11, "big")
    fix_checksum(block)
    out[off: off + 512] = block
    return bytes(out)


def raw_header(name: bytes, size_field: bytes, kind: bytes) -> bytes:
    block = bytearray(512)
    block[0: len(name[:100])] = name[:100]
    block[100:108] = b"0000644\0"
    block[124:136] = size_field.ljust(12, b"\0")[:12]
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    fix_checksum(block)
    return bytes(block)


def pax_record(record: bytes) -> bytes:
    """``b"<len> <key>=<value>\\n"`` where len counts the whole record, its own digits included."""
    n = len(record) + 3
    while len(b"%d %s\n" % (n, record)) != n:
        n = len(b"%d %s\n" % (n, record))
    return b"%d %s\n" % (n, record)


def write(tmp: Path, data: bytes, name: str = "val-000000.tar") -> str:
    path = tmp / name
    path.write_bytes(data)
    return str(path)


def read_all(url: str, expected: int | None = None, cap: int = CAP) -> tuple[list[str], dict[str, int]]:
    """(keys of the samples decoded, skip counts) of one shard, through the reader and the decoder."""
    decoder = SampleDecoder(tiny_transform())
    keys = []
    for raw in iter_shard(url, expected=expected, max_member_bytes=cap, report_skips=True):
        sample = decoder.eval_sample(raw)
        if sample is not None:
            keys.append(sample["key"])
    assert decoder.stats.read == decoder.stats.accepted + sum(decoder.stats.skipped.values())
    return keys, {r: n for r, n in skip_counts(decoder.stats.skipped).items() if n}


def three_samples() -> list[tuple[str, bytes]]:
    return [m for i in range(3) for m in sample_members(f"k{i}", i)]


def eval_loader(spec: Path | dict, workers: int = 0, **kw):
    return make_eval_loader(spec if isinstance(spec, dict) else str(spec), 4, workers, char_tokenizer, tiny_transform(),
                            rank=0, world_size=1, name="sets.t", **kw)


def loader_totals(loader) -> tuple[list[str], dict[str, int]]:
    keys, skipped = [], 0
    for b in loader:
        keys += b.get("key", [])
        skipped = skipped + b["skipped"]
    return keys, {r: n for r, n in skipped_dict(skipped).items() if n}


# ----------------------------------------------------------------------------------------------
# Sizes: absurd headers, members over the cap, gzip bombs


@pytest.mark.parametrize("size", [2**62, 2**70, 8**11 + 5])
def test_absurd_member_size_is_counted_in_bounded_memory(tmp_path, size):
    """k1.jpg declares ``size`` bytes (base-256 for the first two): k0 is read, k1 and k2 counted as lost."""
    url = write(tmp_path, set_size(build_tar(three_samples()), 3, size))
    tracemalloc.start()
    try:
        keys, skips = read_all(url, expected=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert keys == ["k0"]
    assert skips == {"truncated": 2}  # the over-sized member's skip reads to the end: its sample and k2 lost
    assert peak < 8 << 20
    keys, skips = read_all(url)  # no index: at least the sample in progress is counted
    assert keys == ["k0"] and skips == {"truncated": 1}


def test_member_over_the_cap_is_skipped_naming_member_and_cap(tmp_path, caplog):
    members = three_samples()
    members[3] = ("k1.jpg", image_bytes(1, size=8) + b"\0" * 5000)  # a real member, over a 4000-byte cap
    url = write(tmp_path, build_tar(members))
    keys, skips = read_all(url, expected=3, cap=4000)
    assert keys == ["k0", "k2"] and skips == {"member_too_large": 1}
    # without skip reporting (other readers of shards): logged, naming shard, member and the cap
    logger = logging.getLogger("cliptune")
    logger.addHandler(caplog.handler)
    try:
        got = [r["__key__"] for r in iter_shard(url, max_member_bytes=4000)]
    finally:
        logger.removeHandler(caplog.handler)
    assert got == ["k0", "k2"]
    assert "member 'k1.jpg'" in caplog.text and "max_member_bytes=4000" in caplog.text and url in caplog.text


def test_gzip_bomb_member_is_bounded_by_the_same_cap(tmp_path):
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 200_000
    members = three_samples()
    members[5] = ("k1.txt.gz", bomb)  # k1's caption, gzipped
    members[4] = ("k1.json.gz", gzip.compress(members[4][1]))  # a small gz member is read as its content
    url = write(tmp_path, build_tar(members))
    tracemalloc.start()
    try:
        keys, skips = read_all(url, expected=3, cap=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert keys == ["k0", "k2"] and skips == {"member_too_large": 1}
    assert peak < 8 << 20
    members[5] = ("k1.txt.gz", gzip.compress(b"cap k1"))
    url = write(tmp_path, build_tar(members))
    assert read_all(url, expected=3)[0] == ["k0", "k1", "k2"]
    raws = list(iter_shard(url))
    assert raws[1]["txt"] == b"cap k1" and json.loads(raws[1]["json"])["id"] == "k1"
    members[5] = ("k1.txt.gz", b"\x1f\x8b not gzip")
    assert read_all(write(tmp_path, build_tar(members)), expected=3) == (["k0", "k2"], {"decode_error": 1})


def test_oversized_pax_and_negative_pax_sizes_break_off_counted(tmp_path):
    base = build_tar(three_samples())
    cut = header_offsets(base)[3]  # k1.jpg's header
    for pax in (raw_header(b"././@PaxHeader", b"\x80" + (2**62).to_bytes(11, "big"), b"x"),
                raw_header(b"././@PaxHeader", b"%011o\0" % 16, b"x") + b"11 size=-5\n".ljust(512, b"\0")):
        url = write(tmp_path, base[:cut] + pax + base[cut:])
        # the break comes before k1's first member: k0 is still in progress (more of its members
        # could follow), so it is counted with the rest rather than passed on possibly incomplete
        assert read_all(url, expected=3) == ([], {"truncated": 3})


def test_deeply_nested_json_is_a_decode_error_not_a_crash(tmp_path):
    members = three_samples()
    members[4] = ("k1.json", b"[" * 30_000 + b"]" * 30_000)  # under the cap, deeper than the C parser goes
    url = write(tmp_path, build_tar(members))
    assert read_all(url, expected=3) == (["k0", "k2"], {"decode_error": 1})


# ----------------------------------------------------------------------------------------------
# Truncation and duplicates, through the loaders


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_cut_at_60_percent_counts_every_lost_sample(tmp_path, workers):
    paths = write_shards(tmp_path, basic_samples(12, prefix="t"), 6, split="val")
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: int(len(data) * 0.6)])
    keys, skips = loader_totals(eval_loader(tmp_path, workers))
    n_lost = 12 - len(keys)
    assert 0 < n_lost <= 6 and keys[:6] == [f"t{i:05d}" for i in range(6)] if workers == 0 else n_lost > 0
    assert skips == {"truncated": n_lost}
    # training in shard order counts them once per pass (what metrics.json's skipped sums): two passes here
    train_dir = tmp_path / "train"
    tpaths = write_shards(train_dir, basic_samples(12, prefix="t"), 6, split="train")
    tpaths[1].write_bytes(data[: int(len(data) * 0.6)])
    loader = train_loader(str(train_dir), 2, workers=0, samples_per_epoch=2 * (12 - n_lost),
                          resampled=False, shard_shuffle=False, sample_shuffle=0, rank=0, world_size=1)
    batches = list(loader)
    assert skipped_dict(sum(b["skipped"] for b in batches))["truncated"] in (n_lost, 2 * n_lost)
    assert skipped_dict(sum(b["skipped"] for b in batches[: len(batches) // 2 + 1]))["truncated"] == n_lost


def test_shard_with_fewer_samples_than_its_index_counts_the_missing(tmp_path):
    url = write(tmp_path, build_tar(three_samples()))
    assert read_all(url, expected=5) == (["k0", "k1", "k2"], {"truncated": 2})
    assert read_all(url, expected=3) == (["k0", "k1", "k2"], {})


def test_shard_cut_at_a_member_boundary_is_not_read_as_complete(tmp_path):
    data = build_tar(three_samples())
    url = write(tmp_path, data[: header_offsets(data)[6]])  # cut before k2: no end-of-archive blocks
    assert read_all(url, expected=3) == (["k0"], {"truncated": 2})  # k1 may be whole: it is counted, not read


@pytest.mark.parametrize("workers", [0, 2])
def test_duplicate_member_skips_its_sample_and_counts_it(tmp_path, workers):
    members = three_samples()
    members.insert(4, ("k1.jpg", image_bytes(9, size=8)))  # two .jpg for k1
    (tmp_path / "val-000000.tar").write_bytes(build_tar(members))
    (tmp_path / "val-000001.tar").write_bytes(build_tar([m for i in range(3, 5) for m in sample_members(f"k{i}", i)]))
    keys, skips = loader_totals(eval_loader(tmp_path, workers))
    assert sorted(keys) == ["k0", "k2", "k3", "k4"] and skips == {"duplicate_member": 1}


def test_unreadable_shard_is_a_shard_read_error_naming_it(tmp_path):
    url = write(tmp_path, b"\x80" * 1000)
    with pytest.raises(ShardReadError, match=str(url)):
        read_all(url)


# ----------------------------------------------------------------------------------------------
# Property: any damage to any header field


def all_header_offsets(data: bytes) -> list[int]:
    """Offsets of every header block of an intact archive: members' own and their pax / long-name ones."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return sorted({m.offset for m in tar.getmembers()} | {m.offset_data - 512 for m in tar.getmembers()})


def _damage(draw, data: bytes, offsets: list[int]) -> bytes:
    """One hostile edit of ``data``: a header field (of a header at one of ``offsets``), a pax header, a cut
    or garbage. Offsets are those of the intact archive: after an earlier edit they may point anywhere."""
    if len(data) < 512:  # cut to less than a header already: nothing left to damage
        return data
    offsets = [o for o in offsets if o + 512 <= len(data)] or [0]
    kind = draw(st.sampled_from(["size", "type", "name", "checksum", "pax", "truncate", "garbage"]))
    out = bytearray(data)
    off = draw(st.sampled_from(offsets))
    block = out[off: off + 512]
    if kind == "size":
        size = draw(st.one_of(st.integers(0, 4 * CAP), st.integers(0, 8**11 - 1), st.integers(8**11, 2**87),
                              st.sampled_from([2**62, 2**70])))
        block[124:136] = b"%011o\0" % size if size < 8**11 else b"\x80" + size.to_bytes(11, "big")
    elif kind == "type":
        block[156:157] = draw(st.sampled_from(list(b"0\x00125679xgLKSAD7")).map(lambda b: bytes([b]))
                              | st.binary(min_size=1, max_size=1))
    elif kind == "name":
        name = draw(st.binary(max_size=100))
        block[0:100] = name.ljust(100, b"\0")
    elif kind == "checksum":
        block[148:156] = draw(st.binary(min_size=8, max_size=8))
    if kind in ("size", "type", "name"):
        if draw(st.booleans()):  # mostly a header the checksum accepts; sometimes not
            fix_checksum(block)
        out[off: off + 512] = block
    elif kind == "checksum":
        out[off: off + 512] = block
    elif kind == "pax":
        records = draw(st.lists(st.sampled_from([b"path", b"size", b"linkpath", b"x"]).flatmap(
            lambda k: st.one_of(st.integers(-10, 2**70).map(str), st.text(max_size=20)).map(
                lambda v: k + b"=" + v.encode("utf-8", "surrogatepass"))), max_size=3))
        body = b"".join(pax_record(r) for r in records)
        body = draw(st.sampled_from([body, body + draw(st.binary(max_size=20))]))
        pax = raw_header(b"././@PaxHeader", b"%011o\0" % len(body), b"x") + body + b"\0" * (-len(body) % 512)
        out[off:off] = pax
    elif kind == "truncate":
        del out[draw(st.integers(0, len(out) - 1)):]
    else:
        start = draw(st.integers(0, len(out) - 1))
        junk = draw(st.binary(min_size=1, max_size=600))
        out[start: start + len(junk)] = junk
    return bytes(out)


@st.composite
def damaged_shards(draw) -> tuple[bytes, int]:
    n = draw(st.integers(1, 3))
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    members = [m for i in range(n) for m in sample_members(f"k{i}", i)]
    if draw(st.booleans()):  # a long name: GNU 'L' / pax 'path' headers in the archive
        members[0] = ("d" * 120 + "/k0.jpg", members[0][1])
    data = build_tar(members, fmt)
    offsets = all_header_offsets(data)
    for _ in range(draw(st.integers(1, 3))):
        data = _damage(draw, data, offsets)
    return data, n


_TMP = Path(tempfile.mkdtemp(prefix="tar-fuzz-"))


@pytest.mark.timeout(120)  # a hang fails the test instead of stalling the suite
@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(damaged_shards(), st.booleans())
def test_any_damaged_shard_yields_samples_counted_skips_or_a_named_error(shard, with_index):
    data, n = shard
    url = write(_TMP, data, "fuzz.tar")
    tracemalloc.start()
    try:
        keys, skips = read_all(url, expected=n if with_index else None)
    except ShardReadError as e:
        assert url in str(e) and "\n" not in str(e)
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 16 * CAP + (4 << 20)  # bounded by the cap, whatever the headers declare
    assert set(skips) <= {"truncated", "duplicate_member", "member_too_large", "decode_error", "missing_image",
                          "missing_caption", "empty_caption"}
    assert len(keys) <= max(n, 1) + 4  # damage may rename members, never invent many samples
    if with_index:  # every sample the index promised is decoded or counted: nothing lost silently
        assert len(keys) + sum(skips.values()) >= n



@pytest.mark.timeout(120)
@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["gzip", "bz2", "xz"]), st.data())
def test_damaged_compressed_shards_yield_samples_counted_skips_or_a_named_error(codec, data):
    """A .tar.gz / .tar.bz2 / .tar.xz shard cut or overwritten anywhere in its compressed bytes."""
    import bz2
    import lzma

    raw = build_tar(three_samples())
    packed = bytearray({"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[codec](raw))
    if data.draw(st.booleans()):
        del packed[data.draw(st.integers(1, len(packed) - 1)):]
    else:
        start = data.draw(st.integers(0, len(packed) - 1))
        junk = data.draw(st.binary(min_size=1, max_size=64))
        packed[start: start + len(junk)] = junk
    url = write(_TMP, bytes(packed), "fuzz.tar")
    try:
        keys, skips = read_all(url, expected=3)
    except ShardReadError as e:
        assert url in str(e)
        return
    assert set(keys) <= {"k0", "k1", "k2"}
    assert len(keys) + sum(skips.values()) >= 3  # nothing lost without a count


def test_a_large_loss_up_front_is_counted_not_mistaken_for_hopeless_data(tmp_path):
    """The first shard breaks off early while its index promised 6000 samples: those are counted, and the
    good samples after it are still read (the 'first N samples all skipped' stop is for unusable data)."""
    paths = write_shards(tmp_path, basic_samples(12, prefix="t"), 6, split="val")
    index = json.loads((tmp_path / "val.json").read_text())
    index["shards"][0]["num_samples"] = 6000
    (tmp_path / "val.json").write_text(json.dumps(index))
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[:700])  # inside its first member: not one sample of it is read
    keys, skips = loader_totals(eval_loader(tmp_path))
    assert keys[-6:] == [f"t{i:05d}" for i in range(6, 12)]
    assert len(keys) == 6 and skips == {"truncated": 6000}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("resampled", [False, True])
def test_training_on_shards_that_all_broke_off_stops_naming_the_source_not_hangs(tmp_path, resampled):
    paths = write_shards(tmp_path, basic_samples(12, prefix="t"), 6, split="train")
    for p in paths:
        p.write_bytes(p.read_bytes()[:700])  # each cut inside its first member: no sample at all
    loader = train_loader(str(tmp_path), 2, workers=0, samples_per_epoch=4,
                          resampled=resampled, sample_shuffle=0, rank=0, world_size=1)
    with pytest.raises(ShardReadError, match="no samples"):
        next(iter(loader))
