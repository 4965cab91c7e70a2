"""The shard writer at its edges: concurrent writers, a second dataset in one folder, a partial
output, duplicated rows, input the csv/UTF-8 decoders refuse, flags out of range, nothing written.

Expected counts and line numbers are worked out by hand from the input each test writes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cliptune.data.inputs import InputError
from cliptune.data.shards import main
from cliptune.data.writer import ShardSettings, build_shards
from cliptune.data.specs import ShardSpecError, resolve_sources
from cliptune.data.tar import iter_shard

FAST = dict(workers=1, progress=False, summary=False, image_size=8)


def save_image(path: Path, i: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), ((37 * i) % 256, (91 * i) % 256, (53 * i + 7) % 256)).save(path)
    return path.name


def pairs_csv(folder: Path, rows: list[tuple[str, str]], name: str = "pairs.csv", extra: dict | None = None) -> Path:
    """A CSV (header: image, caption, group) with images img/<n>.jpg made for every distinct name."""
    for image, _ in rows:
        if not (folder / image).exists() and image.endswith(".jpg"):
            save_image(folder / image, sum(map(ord, image)))
    path = folder / name
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "group"])
        for i, (image, caption) in enumerate(rows):
            w.writerow([image, caption, (extra or {}).get(i, f"g{i}")])
    return path


def six(folder: Path, tag: str = "a") -> Path:
    return pairs_csv(folder, [(f"img/{tag}{i}.jpg", f"{tag} caption {i}") for i in range(6)], name=f"{tag}.csv")


def keys_and_captions(out: Path, split: str = "train") -> list[str]:
    index = json.loads((out / f"{split}.json").read_text())
    return [raw["txt"].decode() for e in index["shards"] for raw in iter_shard(str(out / e["name"]))]


# ----------------------------------------------------------------------------------------------
# One writer per folder


def test_second_writer_on_the_same_out_refuses_naming_the_holder(tmp_path):
    src, out = six(tmp_path), tmp_path / "out"
    # a live process holds the folder's lock, as a running writer does
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cliptune.rundir import RunLock; "
         f"l = RunLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"--out {out} is in use by another cliptune-shards \(PID {holder.pid}\)"):
            build_shards(src, out, ShardSettings(**FAST))
        assert not list(out.glob("*.tar")) and not (out / "train.json").exists()  # nothing written
        assert main([str(src), "--out", str(out), "--no-progress", "--workers", "1"]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert build_shards(src, out, ShardSettings(**FAST))["train"]["num_samples"] == 6  # free once the holder is gone


def test_a_second_dataset_needs_overwrite_which_removes_the_old_shards(tmp_path):
    out = tmp_path / "out"
    build_shards(six(tmp_path, "a"), out, ShardSettings(shard_size=2, **FAST))
    assert len(list(out.glob("train-*.tar"))) == 3
    # the same command again: a resume, allowed
    build_shards(six(tmp_path, "a"), out, ShardSettings(shard_size=2, **FAST))
    other = pairs_csv(tmp_path, [(f"img/b{i}.jpg", f"b caption {i}") for i in range(4)], name="b.csv")
    with pytest.raises(InputError, match=rf"--out {out} already holds shards of another dataset.*--overwrite"):
        build_shards(other, out, ShardSettings(shard_size=2, **FAST))
    assert keys_and_captions(out) == [f"a caption {i}" for i in range(6)]  # untouched
    assert main([str(other), "--out", str(out), "--no-progress", "--workers", "1", "--shard-size", "2"]) == 2
    # --overwrite: the old shards and index go first; 2 new shards, no third one left of the old set
    build_shards(other, out, ShardSettings(shard_size=2, overwrite=True, **FAST))
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert keys_and_captions(out) == [f"b caption {i}" for i in range(4)]
    # a val set where a train set was: no train.json / train-*.tar of the old set survives
    build_shards(other, out, ShardSettings(split="val", overwrite=True, **FAST))
    assert not (out / "train.json").exists() and not list(out.glob("train-*.tar"))


def test_a_partial_output_is_not_read_as_a_complete_set(tmp_path):
    src, out = six(tmp_path), tmp_path / "out"
    build_shards(src, out, ShardSettings(shard_size=2, **FAST))
    (out / "train.json").unlink()  # a writer killed before its index
    for split in ("train", ("val", "test", "validation")):
        with pytest.raises(ShardSpecError, match=rf"{out}.*no train.json index.*re-run the same cliptune-shards"
                           if split == "train" else rf"{out}"):
            resolve_sources(str(out), split, what="data.train")
    # shards of other tools (no writer state folder) still read without an index
    other = tmp_path / "other"
    other.mkdir()
    for p in out.glob("train-*.tar"):
        (other / p.name).write_bytes(p.read_bytes())
    assert len(resolve_sources(str(other), "train")[0].urls) == 3
    build_shards(src, out, ShardSettings(shard_size=2, **FAST))  # the rerun completes it
    assert resolve_sources(str(out), "train")[0].num_samples == 6


# ----------------------------------------------------------------------------------------------
# What the index says


def test_num_groups_counts_only_groups_of_written_samples(tmp_path):
    rows = [(f"img/c{i}.jpg", f"caption {i}") for i in range(6)]
    src = pairs_csv(tmp_path, rows, extra={0: "x", 1: "x", 2: "y", 3: "z", 4: "w", 5: "w"})
    (tmp_path / "img" / "c3.jpg").write_bytes(b"not an image")  # group z: its only sample is skipped
    (tmp_path / "img" / "c2.jpg").unlink()  # group y: its only image is missing
    index = build_shards(src, tmp_path / "out", ShardSettings(**FAST))["train"]
    assert index["num_samples"] == 4 and index["num_skipped"] == 2
    assert index["num_groups"] == 2  # x and w


def test_duplicated_rows_are_skipped_counted_and_named_by_line(tmp_path, caplog):
    rows = [("img/d0.jpg", "a cat"), ("img/d1.jpg", "a dog"), ("img/d0.jpg", "a cat"), ("img/d0.jpg", "a kitten"),
            ("img/d1.jpg", "a dog"), ("img/d0.jpg", "a cat")]
    src = pairs_csv(tmp_path, rows)
    logger = logging.getLogger("cliptune")  # it does not propagate: caplog listens on it directly
    logger.addHandler(caplog.handler)
    try:
        index = build_shards(src, tmp_path / "out", ShardSettings(**FAST))["train"]
    finally:
        logger.removeHandler(caplog.handler)
    # lines 4, 6 and 7 repeat lines 2, 3 and 2 (header on line 1); d0 + "a kitten" is a new pair
    assert index["num_samples"] == 3
    dup = index["skipped"]["duplicate row"]
    assert dup["count"] == 3
    assert dup["examples"][0] == ("pairs.csv line 4 (img/d0.jpg): same image and captions as pairs.csv line 2 "
                                  "(img/d0.jpg)")
    assert "pairs.csv line 7" in " ".join(dup["examples"])
    assert "3 duplicate rows" in caplog.text and "line 4" in caplog.text


# ----------------------------------------------------------------------------------------------
# Input the decoders refuse: the file and the line


def test_overlong_csv_field_names_file_and_line(tmp_path):
    save_image(tmp_path / "x.jpg", 0)
    path = tmp_path / "long.csv"
    path.write_text("image,caption\nx.jpg,fine\nx.jpg,fine too\nx.jpg," + "w" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"{path} line 4: .*field larger than field limit \(131072\)"):
        build_shards(path, tmp_path / "o", ShardSettings(**FAST))
    # a quote opened on line 3 and never closed: the field runs on; the error names line 3, not where it gave up
    rows = "".join(f"x.jpg,caption {i} with enough words to fill the csv module's field limit soon\n"
                   for i in range(3000))
    path.write_text('image,caption\nx.jpg,fine\nx.jpg,"opened and never closed\n' + rows, encoding="utf-8")
    with pytest.raises(InputError, match=rf"{path} line 3: the row starting here has a field over csv's limit"):
        build_shards(path, tmp_path / "o", ShardSettings(**FAST))


def test_invalid_utf8_names_file_and_exact_line(tmp_path):
    save_image(tmp_path / "x.jpg", 0)
    body = "".join(f"x.jpg,caption number {i} with some text to fill the decoder's chunk\n" for i in range(400))
    path = tmp_path / "latin.csv"
    path.write_bytes(b"image,caption\n" + body.encode() + b"x.jpg,caf\xe9\n" + body.encode())
    with pytest.raises(InputError, match=rf"{path} line 402: not UTF-8 text"):
        build_shards(path, tmp_path / "o", ShardSettings(**FAST))
    jl = tmp_path / "latin.jsonl"
    jl.write_bytes(b"".join(b'{"image": "x.jpg", "caption": "c%d"}\n' % i for i in range(300))
                   + b'{"image": "x.jpg", "caption": "caf\xe9"}\n')
    with pytest.raises(InputError, match=rf"{jl} line 301: not UTF-8 text"):
        build_shards(jl, tmp_path / "o", ShardSettings(**FAST))


def test_lone_surrogate_names_file_and_line(tmp_path):
    save_image(tmp_path / "x.jpg", 0)
    path = tmp_path / "s.jsonl"
    path.write_text('{"image": "x.jpg", "caption": "fine"}\n{"image": "x.jpg", "caption": "half \\ud800 pair"}\n',
                    encoding="utf-8")
    with pytest.raises(InputError, match=rf"{path} line 2: field 'caption' holds a lone surrogate"):
        build_shards(path, tmp_path / "o", ShardSettings(**FAST))
    with pytest.raises(InputError, match=r"record 1: field 'uid' holds a lone surrogate"):
        build_shards([{"image": str(tmp_path / "x.jpg"), "caption": "a"},
                      {"image": str(tmp_path / "x.jpg"), "caption": "b", "uid": "\udcff"}],
                     tmp_path / "o2", ShardSettings(**FAST))


# ----------------------------------------------------------------------------------------------
# Flags and the exit status


@pytest.mark.parametrize("flag, value", [("--image-size", "-1"), ("--image-size", "100000"), ("--workers", "0"),
                                         ("--workers", "-2"), ("--workers", "100000")])
def test_flags_out_of_range_are_refused_naming_the_flag(tmp_path, capsys, flag, value):
    src = six(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([str(src), "--out", str(tmp_path / "o"), flag, value])
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    kw = {"image_size" if flag == "--image-size" else "workers": int(value)}
    with pytest.raises(ValueError, match=flag):
        build_shards(src, tmp_path / "o", ShardSettings(**{**FAST, **kw}))


def test_a_run_where_every_sample_is_skipped_exits_nonzero_with_the_reasons(tmp_path, capsys):
    rows = [(f"img/missing{i}.jpg", f"caption {i}") for i in range(3)] + [("img/bad.jpg", "x"), ("img/e.jpg", " ")]
    src = pairs_csv(tmp_path, rows[:3] + rows[4:])
    for i in range(3):
        (tmp_path / "img" / f"missing{i}.jpg").unlink()  # three images missing; e.jpg is there, its caption blank
    with pytest.raises(InputError, match=r"no sample was written: all 4 skipped \(3 missing image.*1 empty caption"):
        build_shards(src, tmp_path / "o", ShardSettings(**FAST))
    proc = subprocess.run([sys.executable, "-m", "cliptune.data.shards", str(src), "--out", str(tmp_path / "o2"),
                           "--no-progress", "--workers", "1"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "missing image" in proc.stdout + proc.stderr and "missing0.jpg" in proc.stdout + proc.stderr


def test_a_writer_killed_before_its_index_leaves_no_readable_set_and_its_rerun_equals_a_whole_run(tmp_path):
    """SIGKILL at the writer's last boundary (``cliptune.faults`` point ``shards.index``: every shard written,
    the index not yet): the folder is refused as incomplete, and the same command then finishes it with
    shards and index byte-identical to an uninterrupted run's."""
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 20, 200 - 40 * i)).save(tmp_path / f"{i}.png")
    (tmp_path / "d.csv").write_text("image,caption\n" + "".join(f"{i % 4}.png,caption {i}\n" for i in range(40)))
    args = [str(tmp_path / "d.csv"), "--image-size", "32", "--shard-size", "10", "--workers", "1", "--no-progress"]

    def write(out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cliptune.data.shards", *args, "--out", str(out)],
                              capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})

    assert write(tmp_path / "whole").returncode == 0
    cut = tmp_path / "cut"
    killed = write(cut, {"CLIPTUNE_FAULT": "shards.index@1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list(cut.glob("train-*.tar")) and not (cut / "train.json").exists()
    with pytest.raises(ShardSpecError, match="re-run"):
        resolve_sources(str(cut))
    assert write(cut).returncode == 0
    for f in sorted(p.name for p in (tmp_path / "whole").glob("train*")):
        assert (cut / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f
