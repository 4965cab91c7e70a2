"""The shard writer (cliptune.data.shards): every input form, read back with the real reader."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from rich.progress import Progress

from cliptune.data import inputs, writer
from cliptune.data.inputs import InputError, assign_splits, parse_captions
from cliptune.data.shards import main
from cliptune.data.writer import ShardSettings, build_shards
from cliptune.data.decode import decode_image
from cliptune.data.tar import iter_shard
from cliptune.data.specs import ShardSpecError, resolve_sources
from cliptune.data.wds import make_eval_loader
from helpers_shards import char_tokenizer, tiny_transform, untokenize

FAST = dict(workers=1, progress=False, summary=False)


def colour(i: int) -> tuple[int, int, int]:
    return ((37 * i + 11) % 256, (91 * i + 5) % 256, (53 * i + 200) % 256)


def save_image(path: Path, i: int, size: tuple[int, int] = (40, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour(i)).save(path, format=fmt)
    return path


def read_split(out: Path, split: str = "train") -> tuple[dict, list[dict]]:
    """The index and every sample of a split, read shard by shard with the reader's iter_shard."""
    index = json.loads((out / f"{split}.json").read_text(encoding="utf-8"))
    samples = []
    for entry in index["shards"]:
        n = 0
        for raw in iter_shard(str(out / entry["name"])):
            ext = next(e for e in ("jpg", "png", "webp") if e in raw)
            samples.append({
                "key": raw["__key__"], "json": json.loads(raw["json"]), "txt": raw["txt"].decode("utf-8"),
                "ext": ext, "bytes": raw[ext], "image": decode_image(raw[ext]), "shard": entry["name"],
            })
            n += 1
        assert n == entry["num_samples"], entry
    assert len(samples) == index["num_samples"]
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == len(keys) and not any("." in k or "/" in k for k in keys)
    return index, samples


def by_meta(samples: list[dict], field: str = "uid") -> dict[str, dict]:
    return {s["json"]["meta"][field]: s for s in samples}


def close(a: tuple, b: tuple, tol: int = 8) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------
# Input formats


def test_parse_captions_forms():
    assert parse_captions(" a cat ", "en") == {"en": ["a cat"]}
    assert parse_captions(["a", " ", "b"], "de") == {"de": ["a", "b"]}
    assert parse_captions({"en": "x", "zh": ["y", "z"]}, "en") == {"en": ["x"], "zh": ["y", "z"]}
    assert parse_captions('["a", "b"]', "en") == {"en": ["a", "b"]}
    assert parse_captions('{"zh": ["猫"]}', "en") == {"zh": ["猫"]}
    assert parse_captions("[sic] not json", "en") == {"en": ["[sic] not json"]}
    assert parse_captions("[]", "en") == {} and parse_captions("   ", "en") == {} and parse_captions(None, "en") == {}


def test_csv_roundtrip_through_reader(tmp_path):
    sizes = [(40, 30), (30, 40), (64, 64), (17, 50), (50, 20), (33, 33), (12, 12)]
    captions = ['a red, "quoted" caption', '["first", "second"]', '{"en": ["english"], "zh": ["中文说明"]}']
    expected = {}
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "label", "group", "uid", "note"])
        for i, size in enumerate(sizes):
            save_image(tmp_path / "imgs" / f"{i}.jpg", i, size)
            cap = captions[i] if i < len(captions) else f"caption {i}"
            w.writerow([f"imgs/{i}.jpg", cap, f"class {i % 2}", f"g{i // 2}", f"u{i}", "" if i == 3 else f"n{i}"])
            expected[f"u{i}"] = (size, cap, f"class {i % 2}", f"g{i // 2}", "" if i == 3 else f"n{i}")
    out = tmp_path / "out"
    build_shards(tmp_path / "pairs.csv", out, ShardSettings(image_size=16, image_format="png", shard_size=3, **FAST))
    index, samples = read_split(out)
    assert [s["num_samples"] for s in index["shards"]] == [3, 3, 1]
    assert index["languages"] == ["en", "zh"] and index["skipped"] == {} and not (out / "val.json").exists()
    got = by_meta(samples)
    assert set(got) == set(expected)
    parsed_caps = {"u0": {"en": [captions[0]]}, "u1": {"en": ["first", "second"]},
                   "u2": {"en": ["english"], "zh": ["中文说明"]}}
    for uid, (size, _, label, group, note) in expected.items():
        s = got[uid]
        i = int(uid[1:])
        assert s["json"]["captions"] == parsed_caps.get(uid, {"en": [f"caption {i}"]})
        assert s["txt"] == s["json"]["captions"]["en"][0]
        assert s["json"]["label"] == label and s["json"]["group"] == group
        assert s["json"]["meta"] == {"uid": uid, "note": note}
        assert s["ext"] == "png"
        w, h = s["image"].size
        if min(size) > 16:  # shorter side -> 16, aspect kept
            assert min(w, h) == 16 and abs(w / h - size[0] / size[1]) < 0.1
        else:  # never upscaled
            assert (w, h) == size
        assert close(s["image"].getpixel((w // 2, h // 2)), colour(i))

    # the training/eval loader reads it: every image once, every caption attached to its image
    loader = make_eval_loader(str(out / "train.json"), batch_size=4, workers=0, tokenizer=char_tokenizer,
                              transform=tiny_transform())
    texts, n_images = [], 0
    for batch in loader:
        n_images += batch["image"].shape[0]
        texts += [untokenize(t) for t in batch["text"]]
        assert batch["text_owner"].max() < batch["image"].shape[0]
    all_caps = [c for s in samples for caps in s["json"]["captions"].values() for c in caps]
    assert n_images == 7 and sorted(texts) == sorted(c[:24] for c in all_caps)


def test_tsv_with_several_caption_columns_and_languages(tmp_path):
    with open(tmp_path / "pairs.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["path", "text", "text_zh", "uid"])
        for i in range(4):
            save_image(tmp_path / f"{i}.png", i, fmt="PNG")
            w.writerow([f"{i}.png", f"caption, with comma {i}", f"中文 {i}" if i != 2 else "", f"u{i}"])
    out = tmp_path / "out"
    build_shards(tmp_path / "pairs.tsv", out, ShardSettings(image_col="path", caption_col=["text,text_zh:zh"],
                                                            image_size=0, image_format="original", **FAST))
    _, samples = read_split(out)
    got = by_meta(samples)
    for i in range(4):
        caps = got[f"u{i}"]["json"]["captions"]
        assert caps == ({"en": [f"caption, with comma {i}"]} | ({"zh": [f"中文 {i}"]} if i != 2 else {}))
        assert got[f"u{i}"]["ext"] == "png"
        assert got[f"u{i}"]["bytes"] == (tmp_path / f"{i}.png").read_bytes()  # unchanged: copied as is


def test_jsonl_neg_lang_and_nested_meta(tmp_path):
    rows = []
    for i in range(5):
        save_image(tmp_path / "img" / f"{i}.jpg", i)
        rows.append({"image": f"img/{i}.jpg", "captions": {"de": [f"eine Katze {i}"], "en": f"a cat {i}"}
                     if i % 2 else f"ein Hund {i}", "neg": [f"kein Hund {i}"], "uid": f"u{i}",
                     "extra": {"a": [1, 2], "b": None}})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    out = tmp_path / "out"
    build_shards(tmp_path / "data.jsonl", out, ShardSettings(lang="de", image_format="webp", quality=90, **FAST))
    index, samples = read_split(out)
    got = by_meta(samples)
    for i in range(5):
        j = got[f"u{i}"]["json"]
        want = {"de": [f"eine Katze {i}"], "en": [f"a cat {i}"]} if i % 2 else {"de": [f"ein Hund {i}"]}
        assert j["captions"] == want
        assert j["neg"] == {"de": [f"kein Hund {i}"]}
        assert j["meta"] == {"uid": f"u{i}", "extra": {"a": [1, 2], "b": None}}
        assert j["label"] is None and j["group"] is None
        assert got[f"u{i}"]["ext"] == "webp" and close(got[f"u{i}"]["image"].getpixel((5, 5)), colour(i), 12)
    assert index["languages"] == ["de", "en"] and index["caption_counts"] == {"de": 5, "en": 2}


def test_parquet_with_image_bytes_and_paths(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    images, caps, labels, uids = [], [], [], []
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), colour(i)).save(buf, "PNG")
        if i % 2:
            images.append({"bytes": buf.getvalue(), "path": f"mem{i}.png"})
        else:
            save_image(tmp_path / "files" / f"{i}.png", i, (24, 24), "PNG")
            images.append({"bytes": None, "path": f"files/{i}.png"})
        caps.append([f"pq caption {i}", f"second {i}"])
        labels.append(i % 3)
        uids.append(f"u{i}")
    pq.write_table(pa.table({"image": images, "caption": caps, "label": labels, "uid": uids}), tmp_path / "d.parquet")
    out = tmp_path / "out"
    build_shards(tmp_path / "d.parquet", out, ShardSettings(image_format="png", **FAST))
    _, samples = read_split(out)
    got = by_meta(samples)
    assert len(got) == 6
    for i in range(6):
        j = got[f"u{i}"]["json"]
        assert j["captions"] == {"en": [f"pq caption {i}", f"second {i}"]} and j["label"] == str(i % 3)
        assert got[f"u{i}"]["image"].getpixel((3, 3)) == colour(i)


def test_folder_with_txt_and_json_sidecars(tmp_path):
    root = tmp_path / "photos"
    save_image(root / "a.jpg", 1)
    (root / "a.txt").write_text("first caption of a\n\n  second caption of a  \n", encoding="utf-8")
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 10, 20))  # left half fully transparent
    rgba.save(root / "b.png")
    (root / "b.json").write_text(json.dumps({"caption": {"en": ["b en"], "zh": ["b 中文"]}, "label": "L",
                                             "group": "G", "uid": "b", "neg": "not b"}), encoding="utf-8")
    save_image(root / "sub" / "c.jpg", 3)
    (root / "sub" / "c.txt").write_text("c caption", encoding="utf-8")
    save_image(root / "d.jpg", 4)  # no sidecar
    out = tmp_path / "out"
    index = build_shards(root, out, ShardSettings(image_format="png", **FAST))["train"]
    _, samples = read_split(out)
    got = {s["json"]["source"]: s for s in samples}
    assert set(got) == {"a.jpg", "b.png", "sub/c.jpg"}
    assert got["a.jpg"]["json"]["captions"] == {"en": ["first caption of a", "second caption of a"]}
    b = got["b.png"]["json"]
    assert b["captions"] == {"en": ["b en"], "zh": ["b 中文"]} and (b["label"], b["group"]) == ("L", "G")
    assert b["neg"] == {"en": ["not b"]} and b["meta"] == {"uid": "b"}
    img = got["b.png"]["image"]
    assert img.getpixel((2, 10)) == (255, 255, 255) and img.getpixel((15, 10)) == (255, 0, 0)  # alpha -> white
    assert got["sub/c.jpg"]["json"]["captions"] == {"en": ["c caption"]}
    assert index["skipped"] == {"no caption": {"count": 1, "examples": ["d.jpg: no .txt or .json sidecar"]}}


def test_labelled_folders_flyp(tmp_path):
    root = tmp_path / "classes"
    for i, (cls, n) in enumerate([("golden_retriever", 3), ("tabby_cat", 2)]):
        for j in range(n):
            save_image(root / cls / f"{j}.jpg", 10 * i + j)
    save_image(root / "stray.jpg", 99)  # not in a class folder
    out = tmp_path / "out"
    index = build_shards(root, out, ShardSettings(**FAST))["train"]
    _, samples = read_split(out)
    assert len(samples) == 5 and index["options"]["input_kind"] == "flyp" and index["options"]["group_key"] == "sample"
    for s in samples:
        cls = "golden retriever" if s["json"]["source"].startswith("golden_retriever/") else "tabby cat"
        assert s["json"]["label"] == cls and s["json"]["group"] == cls
        assert s["json"]["captions"] == {"en": [t.format(c=cls) for t in inputs.DEFAULT_TEMPLATES]}
    assert index["skipped"]["no class folder"]["count"] == 1
    assert "stray.jpg" in index["skipped"]["no class folder"]["examples"][0]

    out2 = tmp_path / "out2"
    build_shards(root, out2, ShardSettings(templates=["itap of a {c}"], **FAST))
    _, samples2 = read_split(out2)
    firsts = sorted(s["json"]["captions"]["en"][0] for s in samples2)
    assert firsts == ["itap of a golden retriever"] * 3 + ["itap of a tabby cat"] * 2
    with pytest.raises(ValueError, match="must contain"):
        build_shards(root, tmp_path / "o3", ShardSettings(templates=["no placeholder"], **FAST))


def test_image_passthrough_and_exif_rotation(tmp_path):
    src = save_image(tmp_path / "small.jpg", 5, (20, 12))
    rot = Image.new("RGB", (40, 20), colour(6))
    exif = rot.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rot.save(tmp_path / "rot.jpg", exif=exif)
    rows = [{"image": "small.jpg", "caption": "small", "uid": "s"}, {"image": "rot.jpg", "caption": "rot", "uid": "r"}]
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, rows)))
    build_shards(tmp_path / "d.jsonl", tmp_path / "out", ShardSettings(image_size=32, **FAST))
    _, samples = read_split(tmp_path / "out")
    got = by_meta(samples)
    assert got["s"]["bytes"] == src.read_bytes()  # small enough and already jpg: not re-encoded
    assert got["r"]["image"].size == (20, 40)  # EXIF orientation applied


# ----------------------------------------------------------------------------------------------
# Splits


def _grouped_jsonl(tmp_path: Path, n_groups: int = 60, per_group: int = 5) -> Path:
    save_image(tmp_path / "one.jpg", 1, (8, 8))
    rows = [{"image": "one.jpg", "caption": f"g{g} s{k}", "group": f"g{g}", "label": f"l{g % 7}", "uid": f"{g}-{k}"}
            for g in range(n_groups) for k in range(per_group)]
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, rows)))
    return tmp_path / "d.jsonl"


def test_split_keeps_groups_whole_and_is_deterministic(tmp_path):
    src = _grouped_jsonl(tmp_path)
    kw = dict(val_fraction=0.25, image_size=0, image_format="original", shard_size=50, **FAST)
    build_shards(src, tmp_path / "a", ShardSettings(seed=1, **kw))
    split_groups = {}
    keys = {}
    for split in ("train", "val"):
        index, samples = read_split(tmp_path / "a", split)
        split_groups[split] = {s["json"]["group"] for s in samples}
        keys[split] = {s["key"] for s in samples}
        assert index["num_groups"] == len(split_groups[split])
    assert not split_groups["train"] & split_groups["val"]
    assert len(split_groups["train"] | split_groups["val"]) == 60
    assert 0.1 <= len(split_groups["val"]) / 60 <= 0.4

    build_shards(src, tmp_path / "b", ShardSettings(seed=1, **kw))  # same seed: same split, same keys
    assert {s["key"] for s in read_split(tmp_path / "b", "val")[1]} == keys["val"]
    build_shards(src, tmp_path / "c", ShardSettings(seed=2, **kw))
    assert {s["json"]["group"] for s in read_split(tmp_path / "c", "val")[1]} != split_groups["val"]

    build_shards(src, tmp_path / "d", ShardSettings(group_key="label", **kw))  # any field can be the split key
    labels = {sp: {s["json"]["label"] for s in read_split(tmp_path / "d", sp)[1]} for sp in ("train", "val")}
    assert labels["train"] and labels["val"] and not labels["train"] & labels["val"]
    with pytest.raises(InputError, match="group-key 'nope'"):
        build_shards(src, tmp_path / "e", ShardSettings(group_key="nope", **kw))


def test_assign_splits_fraction_and_stability():
    keys = [f"k{i}" for i in range(20000)]
    splits = assign_splits(keys, 0.2, seed=0)
    assert abs(splits.count("val") / len(keys) - 0.2) < 0.02
    # adding keys does not move existing ones (hash per key, not a permutation)
    more = assign_splits(keys + [f"new{i}" for i in range(500)], 0.2, seed=0)
    assert more[: len(keys)] == splits
    assert assign_splits(["a", "b"], 0.01, seed=0).count("val") == 1  # never an empty side
    assert assign_splits(["a", "a", "a"], 0.0, seed=0) == ["train"] * 3


# ----------------------------------------------------------------------------------------------
# Resume


def _twenty(tmp_path: Path) -> Path:
    rows = []
    for i in range(20):
        save_image(tmp_path / "img" / f"{i}.jpg", i, (30, 20))
        rows.append({"image": f"img/{i}.jpg", "caption": f"caption {i}", "uid": f"u{i}"})
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, rows)))
    return tmp_path / "d.jsonl"


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, monkeypatch):
    src = _twenty(tmp_path)
    kw = dict(image_size=8, shard_size=4, **FAST)
    ref_index = build_shards(src, tmp_path / "ref", ShardSettings(**kw))
    out = tmp_path / "out"

    real = writer.encode_image
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:  # third shard, third sample: like Ctrl-C mid-write
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "encode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_shards(src, out, ShardSettings(**kw))
    monkeypatch.setattr(writer, "encode_image", real)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert (out / f".train-000002.tar.{os.getpid()}.tmp").exists() and not (out / "train.json").exists()
    before = {n: _stat(out / n) for n in ("train-000000.tar", "train-000001.tar")}

    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)  # the resume happens later: same bytes anyway
    written = []
    real_write = writer.write_shard
    monkeypatch.setattr(writer, "write_shard", lambda t: written.append(t.name) or real_write(t))
    index = build_shards(src, out, ShardSettings(**kw))
    assert written == ["train-000002.tar", "train-000003.tar", "train-000004.tar"]
    assert {n: _stat(out / n) for n in before} == before  # finished shards untouched
    assert not list(out.glob(".*.tmp"))
    assert index == ref_index
    for name in [f"train-{i:06d}.tar" for i in range(5)] + ["train.json"]:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name

    # a deleted shard and stale temp files: only that shard is rewritten; temp files of dead writers
    # (and unnamed ones, from older versions) go, that of a live process stays: it cannot collide with ours
    (out / "train-000003.tar").unlink()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    stale = [out / ".train-000001.tar.tmp", out / f".train-000001.tar.{dead}.tmp", out / f".train.json.{dead}.tmp",
             out / writer.STATE_DIR / f".train-000003.tar.json.{dead}.tmp"]
    live = out / f".train-000002.tar.{os.getppid()}.tmp"
    for p in [*stale, live]:
        p.write_bytes(b"partial")
    written.clear()
    build_shards(src, out, ShardSettings(**kw))
    assert written == ["train-000003.tar"] and not any(p.exists() for p in stale) and live.exists()
    live.unlink()
    assert (out / "train-000003.tar").read_bytes() == (tmp_path / "ref" / "train-000003.tar").read_bytes()

    # other options change every shard's fingerprint: another dataset, refused without --overwrite; with it
    # all are rewritten, and the old shards go first (fewer shards: none of the old ones is left)
    with pytest.raises(InputError, match="already holds shards of another dataset.*--overwrite"):
        build_shards(src, out, ShardSettings(**{**kw, "shard_size": 8}))
    written.clear()
    build_shards(src, out, ShardSettings(**{**kw, "shard_size": 8, "overwrite": True}))
    assert written == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == written
    assert read_split(out)[0]["num_samples"] == 20


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root (temp files and done records included) by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}  # the writer's lock holds its PID


def _running(procs: list) -> list:
    """The processes of ``procs`` that still run (zombies have stopped: they only wait to be reaped)."""
    import psutil

    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and process groups are POSIX")
@pytest.mark.timeout(180)
def test_sigkill_leaves_no_worker_behind_and_rerun_equals_uninterrupted_run(tmp_path):
    psutil = pytest.importorskip("psutil")
    for i in range(8):  # a few images, many rows: a run of a few seconds from a tiny input
        Image.effect_noise((96, 96), 60 + 10 * i).convert("RGB").save(tmp_path / f"{i}.jpg", quality=90)
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([f"{i % 8}.jpg", f"caption {i}"] for i in range(3000))
    args = [str(tmp_path / "d.csv"), "--image-size", "48", "--image-format", "png", "--shard-size", "60",
            "--workers", "2", "--no-progress"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cliptune.data.shards", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree: list = []
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("train-*.tar")):  # kill once some shard is finished
            assert proc.poll() is None and time.monotonic() < deadline, "no shard finished"
            time.sleep(0.01)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "no worker processes"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / "train.json").exists(), "the run ended before the kill"

        def group() -> list:  # every process of the writer's session, started before or after the snapshot
            found = []
            for p in psutil.process_iter():
                try:
                    if os.getpgid(p.pid) == proc.pid:
                        found.append(p)
                except (ProcessLookupError, psutil.NoSuchProcess):
                    pass
            return _running(found)

        deadline = time.monotonic() + 60  # bounds the wait, not the speed: the loop ends once they are gone
        while (_running(tree) or group()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(tree) and not group(), f"outlived the killed writer: {_running(tree) + group()}"
    finally:
        for p in _running(tree):
            p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    ref = _tree(tmp_path / "ref")
    assert sum(n.endswith(".tar") for n in ref) == 50 and "train.json" in ref
    got = _tree(out)
    assert sorted(got) == sorted(ref)  # no temp file left, no shard missing
    assert [n for n in ref if got[n] != ref[n]] == []  # shards, index and done records byte for byte


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_samples_are_skipped_with_reasons(tmp_path, capsys):
    save_image(tmp_path / "good0.jpg", 0)
    save_image(tmp_path / "good1.jpg", 1)
    (tmp_path / "corrupt.jpg").write_bytes(os.urandom(300))
    full = (tmp_path / "good0.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "adir.jpg").mkdir()
    rows = [("good0.jpg", "ok zero"), ("missing.jpg", "gone"), ("corrupt.jpg", "noise"), ("truncated.jpg", "half"),
            ("good1.jpg", ""), ("good1.jpg", "   "), ("good1.jpg", "[]"), ("adir.jpg", "dir"), ("good1.jpg", "ok one"),
            ("", "no image")]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    index = build_shards(tmp_path / "d.csv", tmp_path / "out", ShardSettings(workers=1, progress=False))["train"]
    _, samples = read_split(tmp_path / "out")
    assert sorted(s["txt"] for s in samples) == ["ok one", "ok zero"]
    sk = index["skipped"]
    assert {k: v["count"] for k, v in sk.items()} == {
        "corrupt image": 2, "empty caption": 3, "missing image": 1, "not a regular file": 1, "no image": 1}
    assert index["num_skipped"] == 8
    missing = str(tmp_path / "missing.jpg")
    assert sk["missing image"]["examples"] == [f"d.csv line 3 (missing.jpg): file not found ({missing})"]
    assert any("corrupt.jpg" in e for e in sk["corrupt image"]["examples"])
    assert any("truncated.jpg" in e for e in sk["corrupt image"]["examples"])
    assert sk["empty caption"]["examples"][0].startswith("d.csv line 6 (good1.jpg)")
    assert sk["not a regular file"]["examples"] == ["d.csv line 9 (adir.jpg): not a regular file (directory)"]
    printed = capsys.readouterr().out
    assert "missing image" in printed and "corrupt image" in printed and "empty caption" in printed


def _limit_memory() -> None:  # a writer that reads /dev/zero to the end fails here, not on the machine
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs FIFOs and /dev/zero")
@pytest.mark.timeout(90)
def test_devices_fifos_and_oversized_files_are_skipped_by_the_cli(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"good{i}.jpg", i, (8, 8))
    Image.effect_noise((64, 64), 80).convert("RGB").save(tmp_path / "big.png")
    big = (tmp_path / "big.png").stat().st_size
    os.mkfifo(tmp_path / "pipe.jpg")  # no writer: opening it for reading blocks
    rows = [("good0.jpg", "ok 0"), ("/dev/zero", "endless"), ("pipe.jpg", "fifo"), ("good1.jpg", "ok 1"),
            ("big.png", "too big"), ("good2.jpg", "ok 2")]
    assert all((tmp_path / f"good{i}.jpg").stat().st_size < 2000 < big for i in range(3))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    out = tmp_path / "out"
    # the timeout only stops a writer stuck on the FIFO; the memory limit fails one that reads /dev/zero
    run = subprocess.run([sys.executable, "-m", "cliptune.data.shards", str(tmp_path / "d.csv"), "--out", str(out),
                          "--max-image-bytes", "2000", "--workers", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=60, preexec_fn=_limit_memory)
    assert run.returncode == 0, run.stderr
    index, samples = read_split(out)
    assert sorted(s["txt"] for s in samples) == ["ok 0", "ok 1", "ok 2"]
    assert index["num_skipped"] == 3 and index["options"]["max_image_bytes"] == 2000
    assert index["skipped"] == {
        "not a regular file": {"count": 2, "examples": [
            "d.csv line 3 (/dev/zero): not a regular file (character device)",
            "d.csv line 4 (pipe.jpg): not a regular file (FIFO)"]},
        "file too large": {"count": 1, "examples": [
            f"d.csv line 6 (big.png): {big} bytes, over --max-image-bytes 2000"]},
    }
    assert "not a regular file" in run.stdout and "file too large" in run.stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.timeout(30)
def test_caption_sidecars_follow_the_same_rules(tmp_path):
    root = tmp_path / "photos"
    for name in "abcd":
        save_image(root / f"{name}.jpg", ord(name), (8, 8))
    (root / "a.txt").write_text("caption a", encoding="utf-8")
    (root / "b.txt").write_text("caption b " * 400, encoding="utf-8")  # 4000 bytes
    os.mkfifo(root / "c.txt")
    (root / "d.json").mkdir()
    (root / "d.txt").write_text("caption d", encoding="utf-8")
    index = build_shards(root, tmp_path / "out", ShardSettings(max_image_bytes=2000, **FAST))["train"]
    _, samples = read_split(tmp_path / "out")
    assert [s["txt"] for s in samples] == ["caption a"]
    assert index["skipped"] == {
        "file too large": {"count": 1, "examples": ["b.jpg: b.txt: 4000 bytes, over --max-image-bytes 2000"]},
        "not a regular file": {"count": 2, "examples": ["c.jpg: c.txt: not a regular file (FIFO)",
                                                        "d.jpg: d.json: not a regular file (directory)"]},
    }
    with pytest.raises(ValueError, match="max_image_bytes"):
        build_shards(root, tmp_path / "o2", ShardSettings(max_image_bytes=0, **FAST))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.timeout(10)
def test_path_turned_into_a_fifo_after_the_check_does_not_block(tmp_path, monkeypatch):
    good = save_image(tmp_path / "good.jpg", 0, (8, 8))
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    real_stat = os.stat
    # the check sees a regular file, the open finds a FIFO: a path swapped in between
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(good if os.fspath(p) == str(fifo) else p, *a, **k))
    with pytest.raises(Exception, match=r"not a regular file \(FIFO\)") as err:
        writer.encode_image(str(fifo), writer.EncodeOptions())
    assert err.value.reason == "not a regular file"


def test_unparseable_input_names_file_and_line(tmp_path):
    save_image(tmp_path / "x.jpg", 0)
    (tmp_path / "extra.csv").write_text("image,caption\nx.jpg,fine\nx.jpg,too,many\n")
    with pytest.raises(InputError, match=r"extra\.csv line 3: 3 fields but the header has 2"):
        build_shards(tmp_path / "extra.csv", tmp_path / "o", ShardSettings(**FAST))
    (tmp_path / "quote.csv").write_text('image,caption\nx.jpg,fine\nx.jpg,"never closed\n')
    with pytest.raises(InputError, match=r"quote\.csv line \d+: cannot parse the row"):
        build_shards(tmp_path / "quote.csv", tmp_path / "o", ShardSettings(**FAST))
    (tmp_path / "bad.jsonl").write_text('{"image": "x.jpg", "caption": "ok"}\n{"image": "x.jpg", caption: 1}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl line 2: invalid JSON"):
        build_shards(tmp_path / "bad.jsonl", tmp_path / "o", ShardSettings(**FAST))
    (tmp_path / "list.jsonl").write_text('["x.jpg", "caption"]\n')
    with pytest.raises(InputError, match=r"list\.jsonl line 1: expected one JSON object per line"):
        build_shards(tmp_path / "list.jsonl", tmp_path / "o", ShardSettings(**FAST))
    (tmp_path / "cols.csv").write_text("img,text\nx.jpg,a\n")
    with pytest.raises(InputError, match=r"image column 'image' \(--image-col\).*available columns: \['img', 'text'\]"):
        build_shards(tmp_path / "cols.csv", tmp_path / "o", ShardSettings(**FAST))
    with pytest.raises(InputError, match=r"caption column 'caption_zh'.*available columns"):
        build_shards(tmp_path / "cols.csv", tmp_path / "o",
                     ShardSettings(image_col="img", caption_col="text,caption_zh", **FAST))
    (tmp_path / "side").mkdir()
    save_image(tmp_path / "side" / "a.jpg", 0)
    (tmp_path / "side" / "a.json").write_text('{"caption": "a",\n "label": }')
    with pytest.raises(InputError, match=r"a\.json line 2: invalid JSON"):
        build_shards(tmp_path / "side", tmp_path / "o", ShardSettings(**FAST))
    assert main([str(tmp_path / "extra.csv"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_end_to_end_with_workers(tmp_path):
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "text", "album"])
        for i in range(24):
            save_image(tmp_path / "im" / f"{i}.jpg", i, (20, 16))
            w.writerow([f"im/{i}.jpg", f"photo {i}", f"album {i // 3}"])
    out = tmp_path / "out"
    argv = [str(tmp_path / "d.csv"), "--out", str(out), "--image-col", "file", "--caption-col", "text",
            "--val-fraction", "0.3", "--group-key", "album", "--image-size", "8", "--shard-size", "4",
            "--workers", "2", "--no-progress", "--seed", "3"]
    assert main(argv) == 0
    tr_index, train = read_split(out, "train")
    va_index, val = read_split(out, "val")
    assert len(train) + len(val) == 24 and train and val
    albums = [{s["json"]["meta"]["album"] for s in part} for part in (train, val)]
    assert not albums[0] & albums[1]
    assert all(min(s["image"].size) == 8 for s in train + val)
    assert tr_index["options"]["group_key"] == "album" and tr_index["options"]["seed"] == 3
    stats = {p.name: _stat(p) for p in out.glob("*.tar")}
    assert main(argv) == 0  # resumed: nothing rewritten
    assert {p.name: _stat(p) for p in out.glob("*.tar")} == stats


# ----------------------------------------------------------------------------------------------
# Evaluation-only sets, recorded fields, progress rate


def _multilingual(tmp_path: Path, n: int = 6) -> Path:
    rows = []
    for i in range(n):
        save_image(tmp_path / "img" / f"{i}.jpg", i, (20, 16))
        captions = {"en": [f"photo {i}"], "zh": [f"照片 {i}"]}
        rows.append({"image": f"img/{i}.jpg", "captions": captions, "uid": f"u{i}"})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    return tmp_path / "d.jsonl"


@pytest.mark.parametrize("how", [dict(val_fraction=1.0), dict(split="val")])
def test_evaluation_only_set_is_all_val_and_reads_as_an_eval_set(tmp_path, how):
    src = _multilingual(tmp_path)
    out = tmp_path / "heldout"
    build_shards(src, out, ShardSettings(shard_size=4, image_size=8, **how, **FAST))
    assert sorted(p.name for p in out.glob("*.tar")) == ["val-000000.tar", "val-000001.tar"]
    assert not (out / "train.json").exists()
    index, samples = read_split(out, "val")
    assert len(samples) == 6 and index["split"] == "val" and index["options"]["split"] == "val"
    assert index["caption_counts"] == {"en": 6, "zh": 6}

    # the folder is an evaluation set, read from its val shards
    loader = make_eval_loader(str(out), batch_size=4, workers=0, tokenizer=char_tokenizer, transform=tiny_transform(),
                              caption_lang="en")
    assert sum(len(b["key"]) for b in loader if "image" in b) == 6
    assert resolve_sources(str(out), "val")[0].num_samples == 6
    # ... and not a training set: the error says what the folder is and how to use it
    only_val = r"no train.json index or train-\*.tar shards, only val shards.*data\.val\.<name>.*split: val"
    with pytest.raises(ShardSpecError, match=only_val):
        resolve_sources(str(out), "train", what="data.train")


def test_split_option_rules_and_rewrite_of_a_mixed_folder(tmp_path):
    src = _multilingual(tmp_path)
    out = tmp_path / "out"
    build_shards(src, out, ShardSettings(val_fraction=0.5, image_size=8, **FAST))
    assert (out / "train.json").exists() and (out / "val.json").exists()
    # the same folder, now evaluation-only
    build_shards(src, out, ShardSettings(split="val", image_size=8, overwrite=True, **FAST))
    assert not (out / "train.json").exists() and not list(out.glob("train-*.tar"))
    assert read_split(out, "val")[0]["num_samples"] == 6
    indexes = build_shards(src, tmp_path / "t", ShardSettings(split="train", image_size=8, **FAST))
    assert list(indexes) == ["train"] and indexes["train"]["num_samples"] == 6
    with pytest.raises(ValueError, match="excludes val_fraction"):
        build_shards(src, tmp_path / "x", ShardSettings(split="val", val_fraction=0.2, **FAST))
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\]"):
        build_shards(src, tmp_path / "x", ShardSettings(val_fraction=1.5, **FAST))
    with pytest.raises(ValueError, match="split must be one of"):
        build_shards(src, tmp_path / "x", ShardSettings(split="test", **FAST))
    assert assign_splits(["a", "b", "c"], 1.0, seed=0) == ["val"] * 3  # no key moved back to train


def test_cli_split_val_and_its_exclusion(tmp_path, caplog):
    src = _multilingual(tmp_path)
    out = tmp_path / "cli"
    assert main([str(src), "--out", str(out), "--split", "val", "--image-size", "8", "--no-progress"]) == 0
    assert (out / "val.json").exists() and not (out / "train.json").exists()
    assert main([str(src), "--out", str(tmp_path / "one"), "--val-fraction", "1", "--no-progress"]) == 0
    assert (tmp_path / "one" / "val.json").exists() and not (tmp_path / "one" / "train.json").exists()
    assert main([str(src), "--out", str(tmp_path / "bad"), "--split", "val", "--val-fraction", "0.2"]) == 2
    assert "excludes val_fraction" in caplog.text


def test_index_records_the_caption_fields_read(tmp_path):
    src = _multilingual(tmp_path)  # its column is "captions", the default name is "caption"
    index = build_shards(src, tmp_path / "a", ShardSettings(image_size=8, **FAST))["train"]
    assert index["options"]["fields"]["captions"] == ["captions"]

    with open(tmp_path / "pairs.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["image", "text", "text_zh", "unused"])
        for i in range(3):
            w.writerow([f"img/{i}.jpg", f"text {i}", f"中文 {i}", ""])
    index = build_shards(tmp_path / "pairs.tsv", tmp_path / "b",
                         ShardSettings(caption_col=["text,text_zh:zh,unused:de"], image_size=8, **FAST))["train"]
    assert index["options"]["fields"]["captions"] == ["text", "text_zh:zh"]  # "unused" gave no caption


def test_progress_rate_is_the_average_not_the_burst_between_two_shards():
    # two shards of 1000 that land in the same poll, 40 us apart: rich's own speed reads 25,000,000/s
    now = [0.0]
    bar = Progress(writer._RateColumn(), writer._EtaColumn(), get_time=lambda: now[0], disable=True)
    job = bar.add_task("writing", total=3000)
    task = bar.tasks[0]
    assert str(writer._RateColumn().render(task)) == "- samples/s"
    now[0] = 10.0
    bar.advance(job, 1000)
    now[0] = 10.00004
    bar.advance(job, 1000)
    assert task.speed > 1e7  # the burst this column does not show
    assert str(writer._RateColumn().render(task)) == "200 samples/s"
    assert str(writer._EtaColumn().render(task)) == "0:00:05"
    now[0] = 15.0
    bar.advance(job, 1000)
    assert task.finished and str(writer._RateColumn().render(task)) == "200 samples/s"
    assert str(writer._EtaColumn().render(task)) == "0:00:15"  # elapsed, once done
    assert writer.throughput(0, 5.0) is None and writer.throughput(10, 0.0) is None
    assert writer.throughput(10, None) is None and writer.throughput(500, 2.0) == 250.0
