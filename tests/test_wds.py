"""The streaming shard reader (cliptune.data.wds) against shards written independently with TarWriter.

Every check compares the loader's output with what the test itself wrote: keys, captions, shard
of origin (encoded in the caption), counts.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from cliptune.data.decode import SKIP_REASONS, skip_counts, skipped_dict, stable_hash
from cliptune.data.specs import ShardSpecError, resolve_sources
from cliptune.data.tar import ShardFormatError, iter_shard
from cliptune.data.wds import make_eval_loader
from helpers_shards import (
    basic_samples,
    char_tokenizer,
    copy_tree_to_fsspec,
    image_bytes,
    make_sample,
    tiny_transform,
    train_loader,
    untokenize,
    write_shards,
)

N, PER_SHARD = 50, 8  # 7 shards, the last one short: nothing divides evenly
N_SHARDS = 7


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, basic_samples(N, prefix="s", langs=("en", "zh")), PER_SHARD, split="train")
    write_shards(out, basic_samples(23, prefix="v"), 5, split="val")
    return out


@pytest.fixture
def cliptune_logs(caplog):
    """The cliptune logger does not propagate (rich handler): attach caplog's handler to it."""
    logger = logging.getLogger("cliptune")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="cliptune")
    yield caplog
    logger.removeHandler(caplog.handler)


def _texts(batch: dict) -> list[str]:
    return [untokenize(t) for t in batch["text"]]


def _train(spec, batch_size=4, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    kw.setdefault("persistent_workers", False)
    return train_loader(spec, batch_size, **kw)


def _eval(spec, batch_size=4, workers=0, **kw):
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    return make_eval_loader(spec, batch_size, workers, char_tokenizer, tiny_transform(), **kw)


def _eval_keys(spec, **kw) -> list[str]:
    return [k for b in _eval(spec, **kw) for k in b["key"]]


def _train_names(shards: Path) -> list[str]:
    return sorted(p.name for p in shards.glob("train-*.tar"))


# ------------------------------------------------------------------------------------------ specs


def _names(sources) -> list[str]:
    return [u.rstrip("/").rsplit("/", 1)[-1] for s in sources for u in s.urls]


def test_spec_forms_resolve_to_the_same_shards(shards):
    expected = _train_names(shards)
    assert len(expected) == N_SHARDS
    forms = {
        "brace": f"{shards}/train-{{000000..{N_SHARDS - 1:06d}}}.tar",
        "glob": f"{shards}/train-*.tar",
        "dir": str(shards),
        "index": f"{shards}/train.json",
        "list": [str(shards / n) for n in expected],
        "file_url": f"file://{shards}/train-{{000000..{N_SHARDS - 1:06d}}}.tar",
        "joined": f"{shards}/train-{{000000..000003}}.tar::{shards}/train-{{000004..{N_SHARDS - 1:06d}}}.tar",
        "source_dict": {"shards": str(shards), "split": "train"},
    }
    for form, spec in forms.items():
        sources = resolve_sources(spec, "train")
        assert len(sources) == 1, form
        assert _names(sources) == expected, form
        # sample counts come from the train.json index next to the shards
        assert sources[0].num_samples == N, form


def test_dir_without_index_and_val_split(tmp_path, shards):
    for p in shards.glob("train-*.tar"):
        shutil.copy(p, tmp_path / p.name)
    (src,) = resolve_sources(str(tmp_path), "train")
    assert _names([src]) == _train_names(shards)
    assert src.num_samples is None  # no index: unknown, the training loader then asks for it
    with pytest.raises(ShardSpecError, match="samples_per_epoch"):
        _train(str(tmp_path))
    (val,) = resolve_sources(str(shards), ("val", "test"))
    assert _names([val]) == sorted(p.name for p in shards.glob("val-*.tar"))
    assert val.num_samples == 23


def test_eval_split_never_falls_back_to_training_shards(tmp_path, shards):
    """A directory holding only train shards (+ train.json) is not a validation set."""
    for p in [*shards.glob("train-*.tar"), shards / "train.json"]:
        shutil.copy(p, tmp_path / p.name)
    with pytest.raises(ShardSpecError, match="val.json"):
        resolve_sources(str(tmp_path), ("val",))
    # shards of other tools (no cliptune split name) are still taken
    shutil.copy(shards / "train-000000.tar", tmp_path / "mine-000000.tar")
    (src,) = resolve_sources(str(tmp_path), ("val",))
    assert _names([src]) == ["mine-000000.tar"]


def test_pipe_spec_reads_through_the_command(shards):
    spec = f"pipe:cat {shards}/train-{{000000..{N_SHARDS - 1:06d}}}.tar"
    (src,) = resolve_sources(spec)
    assert len(src.urls) == N_SHARDS and all(u.startswith("pipe:cat ") for u in src.urls)
    keys = _eval_keys(spec)
    assert keys == [f"s{i:05d}" for i in range(N)]
    # a pipe has no index: the epoch length must be given, then training works
    loader = _train(spec, samples_per_epoch=16)
    assert sum(len(b["text"]) for b in loader) == 16


@pytest.mark.parametrize("root", ["memory://cliptune-test", "file://{tmp}/remote"])
def test_fsspec_urls(shards, tmp_path, root):
    root = root.format(tmp=tmp_path)
    copy_tree_to_fsspec(shards, root)
    try:
        specs = [
            f"{root}/train-{{000000..{N_SHARDS - 1:06d}}}.tar",
            f"{root}/train-*.tar",
            f"{root}/train.json",
            root,
        ]
        for spec in specs:
            (src,) = resolve_sources(spec, "train")
            assert _names([src]) == _train_names(shards), spec
            assert src.num_samples == N, spec
        keys = _eval_keys(f"{root}/train-*.tar", workers=2, batch_size=7)
        assert sorted(keys) == [f"s{i:05d}" for i in range(N)]
        with pytest.raises(ShardSpecError, match="train-000099.tar"):
            resolve_sources(f"{root}/train-{{000000..000099}}.tar")
    finally:
        if root.startswith("memory://"):
            import fsspec

            fsspec.filesystem("memory").rm("/cliptune-test", recursive=True)


def test_https_shards(shards):
    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http(s) with curl")
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/val-{{000000..000004}}.tar"
        assert _eval_keys(url) == [f"v{i:05d}" for i in range(23)]
    finally:
        server.shutdown()


def test_spec_matching_nothing_names_the_spec(tmp_path, shards):
    cases = {
        f"{shards}/nope-{{000000..000003}}.tar": "nope-",
        f"{shards}/nope-*.tar": "nope-",
        str(tmp_path / "missing_dir"): "missing_dir",
        str(tmp_path / "missing.json"): "missing.json",
    }
    for spec, name in cases.items():
        with pytest.raises(ShardSpecError, match=re.escape(name)):
            resolve_sources(spec)
        with pytest.raises(ShardSpecError, match=re.escape(name)):
            _train(spec, samples_per_epoch=8)
    # an empty directory, and a brace range reaching past the last shard
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSpecError, match="empty"):
        resolve_sources(str(tmp_path / "empty"))
    with pytest.raises(ShardSpecError, match="train-000009.tar"):
        resolve_sources(f"{shards}/train-{{000000..000009}}.tar")
    with pytest.raises(ShardSpecError, match=re.escape("data.val.x")):
        _eval(str(tmp_path / "gone.tar"), name="data.val.x")
    # a URL scheme whose fsspec backend is missing (or unknown) names the spec too
    with pytest.raises(ShardSpecError, match="nosuchproto://bucket/train"):
        resolve_sources("nosuchproto://bucket/train-{000000..000001}.tar")


def test_weighted_mixture_proportions(tmp_path):
    write_shards(tmp_path / "a", basic_samples(40, prefix="a"), 10)
    write_shards(tmp_path / "b", basic_samples(40, prefix="b"), 10)
    spec = [{"shards": str(tmp_path / "a"), "weight": 3}, {"shards": str(tmp_path / "b"), "weight": 1}]
    sources = resolve_sources(spec)
    assert [s.weight for s in sources] == [3.0, 1.0]
    loader = _train(spec, batch_size=40, samples_per_epoch=1600, sample_shuffle=50)
    counts = Counter(t[0] for b in loader for t in _texts(b))
    assert sum(counts.values()) == 1600
    # binomial std at n=1600, p=0.75 is 0.011: 0.75 +- 0.045 is a 4-sigma band
    assert abs(counts["a"] / 1600 - 0.75) < 0.045, counts
    with pytest.raises(ShardSpecError, match="weight"):
        resolve_sources([{"shards": str(tmp_path / "a"), "weight": 0}])
    with pytest.raises(ShardSpecError, match="shards"):
        resolve_sources([{"path": str(tmp_path / "a")}])


# ------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("resampled", [True, False])
def test_train_ranks_take_equal_steps_with_uneven_shards(shards, resampled):
    """3 ranks x 2 workers over 7 shards of unequal size: every rank yields the same batch count."""
    world, bs, per_epoch = 3, 4, 3 * N  # 150 // (4 * 3) = 12 batches per rank
    expected = per_epoch // (bs * world)
    seen_shards: set[int] = set()
    per_rank = []
    for rank in range(world):
        loader = _train(shards, bs, workers=2, rank=rank, world_size=world, samples_per_epoch=per_epoch,
                        resampled=resampled, sample_shuffle=20)
        assert len(loader) == expected
        epochs = []
        for _ in range(2):
            batches = list(loader)
            assert all(b["image"].shape == (bs, 3, 16, 16) and b["text"].shape == (bs, 24) for b in batches)
            epochs.append([t for b in batches for t in _texts(b)])
            for t in epochs[-1]:
                seen_shards.add(int(t[1:6]) // PER_SHARD)
        assert [len(e) for e in epochs] == [expected * bs] * 2
        assert epochs[0] != epochs[1]  # reshuffled per epoch
        per_rank.append(epochs[0])
    assert seen_shards == set(range(N_SHARDS))
    assert per_rank[0] != per_rank[1]  # ranks read different data


def test_train_is_deterministic_per_seed(shards):
    def run(seed):
        loader = _train(shards, 5, workers=2, seed=seed, sample_shuffle=10)
        return [t for b in loader for t in _texts(b)]

    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c
    assert len(a) == (N // 5) * 5


def test_train_batches_are_well_formed(shards):
    (batch,) = list(_train(shards, 8, samples_per_epoch=8, resampled=False, sample_shuffle=0))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (8, 3, 16, 16)
    assert batch["text"].dtype == torch.long and batch["text"].shape == (8, 24)
    assert batch["group"].dtype == torch.int64 and batch["group"].shape == (8,)
    assert batch["skipped"].dtype == torch.long and batch["skipped"].shape == (len(SKIP_REASONS),)
    assert "neg_text" not in batch
    # no group field in these samples: groups are per key, all distinct
    assert len(set(batch["group"].tolist())) == 8


def test_fewer_shards_than_readers_warns(tmp_path, cliptune_logs):
    write_shards(tmp_path, basic_samples(40), 20)  # 2 shards
    loader = _train(tmp_path, 4, workers=2, rank=0, world_size=2, persistent_workers=False)
    warnings = [r.getMessage() for r in cliptune_logs.records if r.levelno == logging.WARNING]
    assert any("2 shards for 4 readers (2 ranks x 2 workers)" in w for w in warnings), warnings
    assert len(list(loader)) == 40 // 8  # it still works, with equal steps
    cliptune_logs.clear()
    _train(tmp_path, 4, workers=1, rank=0, world_size=2)
    assert not [r for r in cliptune_logs.records if r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------------------- eval


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
@pytest.mark.parametrize("per_shard", [5, 12])  # 5 shards (more readers than shards), 2 shards
@pytest.mark.parametrize("workers", [0, 1, 3])
def test_eval_every_sample_exactly_once_over_ranks_and_workers(tmp_path, per_shard, workers):
    samples = basic_samples(23, prefix="v")
    write_shards(tmp_path, samples, per_shard, split="val")
    keys: list[str] = []
    for rank in range(2):
        loader = _eval(tmp_path, batch_size=4, workers=workers, rank=rank, world_size=2)
        for b in loader:
            keys += b["key"]
            # every caption belongs to its image (text_owner), none is lost
            for text, owner in zip(_texts(b), b["text_owner"].tolist()):
                assert text.startswith(b["key"][owner])
            assert b["image"].shape[0] == len(b["key"]) <= 4
            assert int(b["skipped"].sum()) == 0
    assert len(keys) == len(set(keys)) == 23
    assert set(keys) == {s["__key__"] for s in samples}


def test_eval_batches_carry_all_captions_and_labels(tmp_path):
    samples = [
        make_sample("k0", {"en": ["k0 a", "k0 b"], "zh": ["k0 zh"]}, i=0, label="cat"),
        make_sample("k1", {"en": ["k1 a"]}, i=1, label=None),
    ]
    write_shards(tmp_path, samples, 2, split="val")
    (b,) = list(_eval(tmp_path, batch_size=8))
    assert b["key"] == ["k0", "k1"] and b["label"] == ["cat", None]
    assert _texts(b) == ["k0 a", "k0 b", "k0 zh", "k1 a"]
    assert b["text_owner"].tolist() == [0, 0, 0, 1]


# ------------------------------------------------------------------------------------- captions


def _lang_samples() -> list[dict]:
    return [
        make_sample("k0", {"en": ["k0 en a", "k0 en b"], "zh": ["k0 zh"]}, i=0),
        make_sample("k1", {"zh": ["k1 zh"]}, i=1),
        make_sample("k2", None, i=2, txt="k2 txt", with_json=False),  # language unknown: always used
        make_sample("k3", {"en": ["k3 en"]}, i=3),
    ]


@pytest.mark.parametrize(
    "lang, expected",
    [
        ("en", {"k0": ["k0 en a", "k0 en b"], "k2": ["k2 txt"], "k3": ["k3 en"]}),
        ("zh", {"k0": ["k0 zh"], "k1": ["k1 zh"], "k2": ["k2 txt"]}),
        ("any", {"k0": ["k0 en a", "k0 en b", "k0 zh"], "k1": ["k1 zh"], "k2": ["k2 txt"], "k3": ["k3 en"]}),
        ("zh,en", {"k0": ["k0 zh", "k0 en a", "k0 en b"], "k1": ["k1 zh"], "k2": ["k2 txt"], "k3": ["k3 en"]}),
        (["en", "zh"], {"k0": ["k0 en a", "k0 en b", "k0 zh"], "k1": ["k1 zh"], "k2": ["k2 txt"], "k3": ["k3 en"]}),
    ],
)
def test_caption_language_filter_eval(tmp_path, lang, expected):
    write_shards(tmp_path, _lang_samples(), 4, split="val")
    got: dict[str, list[str]] = {}
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    for b in _eval(tmp_path, batch_size=8, caption_lang=lang):
        for text, owner in zip(_texts(b), b.get("text_owner", torch.zeros(0)).tolist()):
            got.setdefault(b["key"][owner], []).append(text)
        skipped += b["skipped"]
    assert got == expected
    # a sample without a caption in the language is left out and counted under its own reason
    assert skipped_dict(skipped) == {**skip_counts(), "caption_lang": 4 - len(expected)}


def test_caption_drawn_at_random_per_step_in_language(tmp_path):
    samples = [make_sample(f"x{i:03d}", {"en": [f"x{i:03d} a", f"x{i:03d} b"], "zh": [f"x{i:03d} zh"]}, i=i)
               for i in range(30)]
    write_shards(tmp_path, samples, 10)
    loader = _train(tmp_path, 10, caption_lang="en", sample_shuffle=0, resampled=False)
    per_key: dict[str, set[str]] = {}
    for _ in range(6):
        for b in loader:
            for t in _texts(b):
                per_key.setdefault(t[:4], set()).add(t[5:])
    assert len(per_key) == 30
    assert set().union(*per_key.values()) == {"a", "b"}  # never zh
    # each sample met both of its English captions over 6 epochs (chance of not: 2 * 2^-6 per key)
    assert sum(v == {"a", "b"} for v in per_key.values()) >= 25


def test_bad_caption_lang_is_rejected(shards):
    with pytest.raises(ValueError, match="caption_lang"):
        _train(shards, caption_lang=" , ")


# ------------------------------------------------------------------------------- bad data, errors


def _corrupt_samples() -> list[dict]:
    samples = basic_samples(12, prefix="c")
    samples[3] = make_sample("c00003", i=3, image=b"definitely not a jpeg")
    samples[5] = make_sample("c00005", i=5, image=image_bytes(5, size=64)[:300])  # truncated jpeg
    samples[7] = make_sample("c00007", i=7, raw_json=b'{"captions": {"en": [')  # json cut off
    return samples


def test_corrupt_samples_skipped_counted_and_warned(tmp_path, cliptune_logs):
    write_shards(tmp_path, _corrupt_samples(), 6, split="val")
    keys, skipped = [], 0
    for b in _eval(tmp_path, batch_size=4):
        keys += b["key"]
        skipped += b["skipped"]
    assert skipped_dict(skipped) == {**skip_counts(), "decode_error": 3}
    assert keys == [f"c{i:05d}" for i in range(12) if i not in (3, 5, 7)]
    warnings = " | ".join(r.getMessage() for r in cliptune_logs.records if r.levelno == logging.WARNING)
    for key, what in (("c00003", "image failed to decode"), ("c00005", "image failed to decode"),
                      ("c00007", "json failed to parse")):
        assert re.search(rf"shard '[^']*val-00000\d\.tar' sample '{key}': {what}", warnings), warnings


def test_corrupt_samples_in_training(tmp_path):
    write_shards(tmp_path, _corrupt_samples(), 6)
    # in order, three passes over the 9 good samples: each corrupt one met (and counted) 3 times
    batches = list(_train(tmp_path, 3, samples_per_epoch=27, resampled=False, shard_shuffle=False, sample_shuffle=0))
    assert len(batches) == 9
    assert skipped_dict(sum(b["skipped"] for b in batches)) == {**skip_counts(), "decode_error": 9}
    # with workers and shuffling the loader goes on and still fills every batch
    batches = list(_train(tmp_path, 3, workers=2, samples_per_epoch=36, sample_shuffle=10))
    assert len(batches) == 12
    assert not {t for b in batches for t in _texts(b)} & {"c00003 en", "c00005 en", "c00007 en"}
    assert int(sum(b["skipped"] for b in batches)[SKIP_REASONS.index("decode_error")]) > 0


def test_eval_counts_a_corrupt_last_sample(tmp_path):
    samples = basic_samples(9, prefix="e")
    samples[8] = make_sample("e00008", i=8, image=b"broken")
    write_shards(tmp_path, samples, 9, split="val")
    batches = list(_eval(tmp_path, batch_size=4))
    assert [len(b["key"]) for b in batches] == [4, 4]
    assert int(sum(b["skipped"].sum() for b in batches)) == 1


def test_truncated_tar_loses_its_tail_with_a_warning(tmp_path, cliptune_logs):
    (path,) = write_shards(tmp_path, basic_samples(10, prefix="t"), 10, split="val")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 700])
    keys = _eval_keys(tmp_path)
    assert 0 < len(keys) < 10 and keys == [f"t{i:05d}" for i in range(len(keys))]
    assert any("broke off" in r.getMessage() for r in cliptune_logs.records)


def _raises_through(loader, exc, pattern) -> None:
    it = iter(loader)
    with pytest.raises(exc, match=pattern):
        for _ in it:
            pass
    # torch's re-raise leaves the iterator in a reference cycle: its workers would otherwise be
    # shut down by the garbage collector, which waits 5 s per loader for them
    if hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()


_MISSING = [
    (make_sample("bad01", i=1, ext=""), "no image member", "missing_image", 0),
    (make_sample("bad01", i=1, txt=None, with_json=False), "no caption", "missing_caption", 2),
    (make_sample("bad01", i=1, ext="bmp"), "no image member", "missing_image", 2),
    (make_sample("bad01", {"en": ["  "]}, i=1), None, "empty_caption", 0),
    (make_sample("bad01", None, i=1, txt="  ", with_json=False), None, "empty_caption", 2),
]


@pytest.mark.parametrize("bad, problem, reason, workers", _MISSING)
def test_unusable_samples_are_skipped_and_counted_by_reason(tmp_path, bad, problem, reason, workers, cliptune_logs):
    samples = basic_samples(8, prefix="ok")
    samples[5] = bad
    write_shards(tmp_path, samples, 4, split="val")
    keys, skipped = [], 0
    for b in _eval(tmp_path, workers=workers):
        keys += b.get("key", [])
        skipped += b["skipped"]
    assert sorted(keys) == sorted(x["__key__"] for i, x in enumerate(samples) if i != 5)
    assert skipped_dict(skipped) == {**skip_counts(), reason: 1}
    write_shards(tmp_path / "t", samples, 4, split="train")
    # 7 good samples, 3 passes of batch 2 in order: every batch full, the bad one met and counted each pass
    batches = list(_train(tmp_path / "t", 2, samples_per_epoch=14, workers=0, resampled=False,
                          shard_shuffle=False, sample_shuffle=0))
    assert len(batches) == 7 and all(b["image"].shape[0] == 2 for b in batches)
    assert skipped_dict(sum(b["skipped"] for b in batches)) == {**skip_counts(), reason: 2}
    if workers == 0:  # the log names the shard and the sample
        warnings = " | ".join(r.getMessage() for r in cliptune_logs.records if r.levelno == logging.WARNING)
        assert re.search(r"shard '[^']*val-000001\.tar' sample 'bad01': .*" + reason, warnings), warnings


@pytest.mark.parametrize("bad, problem, reason, workers", [m for m in _MISSING if m[1]])
def test_strict_makes_missing_members_raise_naming_shard_and_key(tmp_path, bad, problem, reason, workers):
    samples = basic_samples(8, prefix="ok")
    samples[5] = bad
    write_shards(tmp_path, samples, 4, split="val")  # the bad sample is in val-000001.tar
    pattern = rf"shard '[^']*val-000001\.tar' sample 'bad01': {problem}"
    _raises_through(_eval(tmp_path, workers=workers, strict=True), ShardFormatError, pattern)
    write_shards(tmp_path / "t", samples, 4, split="train")
    _raises_through(_train(tmp_path / "t", 2, workers=workers, resampled=False, sample_shuffle=0, strict=True),
                    ShardFormatError,
                    pattern.replace("val", "train"))


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_set_of_only_corrupt_samples_reports_every_skip(tmp_path, workers):
    samples = [make_sample(f"z{i:05d}", i=i, image=b"broken") for i in range(5)]
    write_shards(tmp_path, samples, 3, split="val")
    batches = list(_eval(tmp_path, batch_size=4, workers=workers))
    assert all("image" not in b for b in batches)  # nothing to embed, only the counts
    assert skipped_dict(sum(b["skipped"] for b in batches)) == {**skip_counts(), "decode_error": 5}


def test_not_a_tar_names_the_shard(tmp_path):
    write_shards(tmp_path, basic_samples(4), 4, split="val")
    (tmp_path / "val-000000.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(OSError, match="val-000000.tar"):
        list(iter_shard(str(tmp_path / "val-000000.tar")))


# ------------------------------------------------------------------------- negatives and groups


def test_hard_negatives_shapes_and_mask(tmp_path):
    samples = [
        make_sample("n0", {"en": ["n0"]}, i=0),  # no neg field
        make_sample("n1", {"en": ["n1"]}, i=1, neg={"en": ["n1 neg0"], "zh": ["n1 zh neg"]}),
        make_sample("n2", {"en": ["n2"]}, i=2, neg={"en": [f"n2 neg{j}" for j in range(5)]}),
    ]
    write_shards(tmp_path, samples, 3)
    K = 3
    loader = _train(tmp_path, 3, max_negatives=K, caption_lang="en", sample_shuffle=0, resampled=False,
                    shard_shuffle=False)
    (b,) = list(loader)
    assert _texts(b) == ["n0", "n1", "n2"]
    assert b["neg_text"].shape == (3, K, 24) and b["neg_text"].dtype == torch.long
    assert b["neg_mask"].dtype == torch.bool
    assert b["neg_mask"].tolist() == [[False] * 3, [True, False, False], [True] * 3]
    assert (b["neg_text"][~b["neg_mask"]] == 0).all()
    assert untokenize(b["neg_text"][1, 0]) == "n1 neg0"  # the zh negative is filtered out
    negs2 = [untokenize(t) for t in b["neg_text"][2]]
    assert len(set(negs2)) == 3 and set(negs2) <= {f"n2 neg{j}" for j in range(5)}
    # with caption_lang=any the zh negative is allowed
    (b,) = list(_train(tmp_path, 3, max_negatives=K, sample_shuffle=0, resampled=False, shard_shuffle=False))
    assert b["neg_mask"][1].tolist() == [True, True, False]


def test_group_field_hashed_into_group(tmp_path):
    samples = [
        make_sample("g0", {"en": ["g0"]}, i=0, group="same", label="L1"),
        make_sample("g1", {"en": ["g1"]}, i=1, group="same", label="L2"),
        make_sample("g2", {"en": ["g2"]}, i=2, group="other", label="L1"),
        make_sample("g3", {"en": ["g3"]}, i=3, group=None, label=None),
    ]
    write_shards(tmp_path, samples, 4)

    def groups(field):
        loader = _train(tmp_path, 4, group_field=field, sample_shuffle=0, resampled=False, shard_shuffle=False)
        (b,) = list(loader)
        assert _texts(b) == ["g0", "g1", "g2", "g3"]
        return b["group"].tolist()

    g = groups("group")
    assert g[0] == g[1] == stable_hash("g:same") and len({g[0], g[2], g[3]}) == 3
    g = groups("label")
    assert g[0] == g[2] != g[1] and g[3] not in g[:3]


# ------------------------------------------------------------------------------- data module


def _compose_data(overrides: list[str]):
    """The train config with ``overrides``, composed without importing the training stack (fast)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import cliptune.configs
    from cliptune.config import register_configs, register_resolvers

    register_configs()  # the schemas train.yaml names (the CLIs register them as a job starts)
    register_resolvers()
    with initialize_config_dir(config_dir=str(Path(cliptune.configs.__file__).parent), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return instantiate(cfg.data, tokenizer=char_tokenizer, train_transform=tiny_transform(),
                       val_transform=tiny_transform(), _convert_="all")


def test_datamodule_from_the_hydra_config(shards):
    dm = _compose_data([
        "data=wds", f"data.train='{shards}/train-{{000000..{N_SHARDS - 1:06d}}}.tar'",
        f"data.val.domain={shards}/val.json", f"+data.val.dup={shards}", "data.workers=0", "batch_size=5",
    ])
    assert dm.val_set_names == ["domain", "dup"]
    assert dm.use_distributed_sampler is False
    train = dm.train_dataloader()
    assert len(train) == N // 5 == len(list(train))
    for loader in dm.val_dataloader():
        assert sorted(k for b in loader for k in b["key"]) == [f"v{i:05d}" for i in range(23)]
    # the unset default set is dropped; a plain spec names its set "val"
    dm = _compose_data(["data=wds", f"data.train={shards}", f"data.val={shards}", "data.workers=0"])
    assert dm.val_set_names == ["val"]
    dm = _compose_data(["data=wds", f"data.train={shards}"])
    assert dm.val_set_names == [] and dm.val_dataloader() == []
    with pytest.raises(Exception, match="data.train"):
        _compose_data(["data=wds"])  # required: ???


def test_datamodule_needs_model_tokenizer_and_transforms(shards):
    from cliptune.data.datamodule import WdsDataModule

    dm = WdsDataModule(train=str(shards), workers=0)
    with pytest.raises(ValueError, match="tokenizer"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="caption_lang"):
        WdsDataModule(train=str(shards), caption_lang="")


def test_env_vars_in_specs(shards, monkeypatch):
    monkeypatch.setenv("CLIPTUNE_TEST_SHARDS", str(shards))
    (src,) = resolve_sources("$CLIPTUNE_TEST_SHARDS/train-*.tar")
    assert _names([src]) == _train_names(shards)
    assert os.path.isabs(src.urls[0])


# ------------------------------------------------------------------------------ the tar reader


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
@pytest.mark.parametrize("compression", ["", "gz", "xz"])
def test_tar_reader_matches_tarfile(tmp_path, fmt, compression):
    """cliptune's streaming tar parser against Python's tarfile, on archives tarfile writes."""
    import io
    import tarfile

    from cliptune.data.tar import TarMembers

    rng = torch.Generator().manual_seed(0)
    members = [
        ("a/0001.jpg", bytes(torch.randint(0, 256, (1000,), generator=rng).tolist())),
        ("a/0001.txt", "caption é 中文".encode()),
        ("a/0002.json", b""),  # empty member
        ("a/" + "long_dir_name/" * 6 + "0003.jpg", b"x" * 513),  # > 100 chars: prefix / GNU L / pax path
        ("a/0004.bin", b"y" * 512),
    ]
    if fmt != "ustar":
        members.append(("a/" + "n" * 120 + ".txt", b"long base name"))  # no ustar split possible
    if fmt == "pax":
        members.append(("a/ü" * 40 + ".txt", b"non-ascii long name"))
    path = tmp_path / f"t.tar{'.' + compression if compression else ''}"
    tar_format = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[fmt]
    with tarfile.open(path, f"w:{compression}" if compression else "w", format=tar_format) as tar:
        dir_info = tarfile.TarInfo("a")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "0001.jpg"
        tar.addfile(link)
    with tarfile.open(path) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert [n for n, _ in expected] == [n for n, _ in members]
    with open(path, "rb") as f:
        reader = TarMembers(f)
        got = [(name, reader.read()) for name in reader]
    assert got == expected
    with open(path, "rb") as f:  # members not read are skipped correctly
        reader = TarMembers(f)
        got = [(name, reader.read()) for i, name in enumerate(reader) if i % 2]
    assert got == expected[1::2]


def test_tar_reader_rejects_damage(tmp_path):
    from cliptune.data.tar import TarFormatError, TarMembers

    (path,) = write_shards(tmp_path, basic_samples(3), 3)
    data = bytearray(path.read_bytes())
    with pytest.raises(TarFormatError, match="empty"):
        TarMembers(io.BytesIO(b""))
    with pytest.raises(TarFormatError, match="not a tar"):
        TarMembers(io.BytesIO(b"PK\x03\x04" + b"\x00" * 600))
    import tarfile

    with tarfile.open(path) as tar:
        offset = tar.getmembers()[4].offset  # header of a later member (pax headers count as its own)
    bad = bytearray(data)
    bad[offset + 10] ^= 0xFF  # its name damaged: the checksum catches it, nothing misread
    reader = TarMembers(io.BytesIO(bytes(bad)))
    with pytest.raises(TarFormatError):
        for _ in reader:
            reader.read()
    reader = TarMembers(io.BytesIO(bytes(data[:2000])))
    with pytest.raises(TarFormatError, match="end of data|truncated"):
        for _ in reader:
            reader.read()


def test_tar_reader_accepts_signed_checksums():
    """Old writers summed header bytes as signed chars; tarfile accepts both, so do we."""
    import tarfile

    from cliptune.data.tar import TarMembers

    info = tarfile.TarInfo("k/caf\xe9.txt")  # a latin-1 byte > 127 in the header
    info.size = 3
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="latin-1"))
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in block)
    block[148:156] = f"{signed:06o}\0 ".encode()
    data = bytes(block) + b"abc".ljust(512, b"\0") + b"\0" * 1024
    reader = TarMembers(io.BytesIO(data))
    assert [(n, reader.read()) for n in reader] == [("k/caf\udce9.txt", b"abc")]


def test_wds_reexports_the_reader_modules_public_names():
    """``from cliptune.data.wds import X`` keeps working for names that live in specs/tar/decode."""
    import types

    import cliptune.data.decode as decode
    import cliptune.data.specs as specs
    import cliptune.data.tar as tar
    import cliptune.data.wds as wds

    for module in (specs, tar, decode):
        # names defined there (functions, classes, constants), not the ones it imports
        public = {n for n, v in vars(module).items() if not n.startswith("_") and n != "log"
                  and not isinstance(v, types.ModuleType)
                  and getattr(v, "__module__", module.__name__) == module.__name__}
        missing = sorted(public - set(wds.__all__))
        assert not missing, f"{module.__name__} names not re-exported by cliptune.data.wds: {missing}"
    for name in wds.__all__:
        assert hasattr(wds, name), name
    assert wds.Tokenizer is decode.Tokenizer and wds.Transform is decode.Transform


def test_reader_modules_do_not_import_the_pipeline():
    """specs <- tar <- decode <- wds: the lower modules never import the pipeline module."""
    import ast
    import importlib

    for name, allowed in (("specs", set()), ("tar", {"specs"}), ("decode", {"specs", "tar"})):
        module = importlib.import_module(f"cliptune.data.{name}")
        tree = ast.parse(Path(module.__file__).read_text())
        used = {n.module.rsplit(".", 1)[-1] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("cliptune.data.")}
        assert used <= allowed, f"cliptune.data.{name} imports {sorted(used - allowed)}"


def test_evaluation_only_folder_is_a_val_set_never_a_training_set(tmp_path, shards):
    """A folder of val shards only (cliptune-shards --split val) is read as data.val.<name>; as
    data.train it is refused with an error that says what it is."""
    from cliptune.data.datamodule import WdsDataModule

    heldout = tmp_path / "heldout"
    write_shards(heldout, basic_samples(9, prefix="h"), 4, split="val")
    parts = dict(tokenizer=char_tokenizer, train_transform=tiny_transform(), val_transform=tiny_transform(),
                 workers=0, batch_size=5, persistent_workers=False)
    dm = WdsDataModule(train=str(shards), val={"heldout": str(heldout)}, **parts)
    assert dm.val_set_names == ["heldout"]
    (loader,) = dm.val_dataloader()
    assert sorted(k for b in loader for k in b["key"]) == [f"h{i:05d}" for i in range(9)]
    dm = WdsDataModule(train=str(heldout), **parts)
    with pytest.raises(ShardSpecError, match=r"data.train: .*only val shards, an evaluation-only set"):
        dm.train_dataloader()
    # the reverse: a folder of train shards only is no evaluation set, and the error says how to read it
    with pytest.raises(ShardSpecError, match=r"only train shards: read them with \{shards: .*, split: train\}"):
        resolve_sources(str(write_shards(tmp_path / "train_only", basic_samples(3), 4)[0].parent), ("val", "test"))


def _cut_shards(folder: Path, split: str = "val") -> None:
    """12 samples in 2 shards, the second cut at 60% of its bytes (a copy that stopped short)."""
    paths = write_shards(folder, basic_samples(12, prefix=split[0]), 6, split=split)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: int(len(data) * 0.6)])


def _cut_totals(loader) -> tuple[list[str], dict[str, int]]:
    """(keys read, non-zero skip counts) over a whole eval loader."""
    keys, skipped = [], 0
    for b in loader:
        keys += b.get("key", [])
        skipped = skipped + b["skipped"]
    return keys, {r: n for r, n in skipped_dict(skipped).items() if n}


# ----------------------------------------------------------------------------------------------
# A cut shard end to end: cliptune-eval's results.json, table and eval.log; a training run's metrics.json


@pytest.mark.timeout(300)
def test_cliptune_eval_reports_truncated_samples_in_results_table_and_eval_log(tmp_path):
    import subprocess
    import sys

    import torch

    from cliptune.models import build_model, export_model
    from conftest import TINY_ARCH, subprocess_env

    torch.manual_seed(0)
    bundle = build_model("cliptune-tiny-evallog", arch=TINY_ARCH)
    model = export_model(bundle.model, bundle.model_cfg, bundle.preprocess_cfg, tmp_path / "export",
                         tokenizer=bundle.tokenizer)
    sets = tmp_path / "cut"
    _cut_shards(sets)
    keys, skips = _cut_totals(_eval(str(sets)))  # the reference: the reader's own counts
    assert list(skips) == ["truncated"] and skips["truncated"] == 12 - len(keys) > 0
    out = tmp_path / "ev"
    proc = subprocess.run([sys.executable, "-m", "cliptune.eval.cli", f"load={model}", f"sets={sets}", "device=cpu",
                           "workers=0", "zeroshot.enabled=false", f"out={out}"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    got = doc["sets"]["cut"]
    assert got["n_images"] == len(keys) and got["skipped"]["truncated"] == skips["truncated"]
    assert got["n_skipped"] == skips["truncated"]
    assert f"{skips['truncated']} truncated" in proc.stdout  # the table's note under the set
    log_text = (out / "eval.log").read_text()
    assert "val-000001.tar" in log_text and "broke off" in log_text  # the shard named, in the log file
    assert log_text.count("results written to") == 1  # once: no second path to the file


@pytest.mark.timeout(300)
def test_training_run_counts_truncated_samples_in_metrics_json(tmp_path):
    from cliptune.train.run import run as train
    from conftest import compose_train

    cut = {}
    for split in ("train", "val"):
        _cut_shards(tmp_path / split, split)
        keys, skips = _cut_totals(_eval({"shards": str(tmp_path / split), "split": split}))  # the reader's count
        cut[split] = skips["truncated"]
        assert cut[split] == 12 - len(keys) > 0
    good = 12 - cut["train"]
    cfg = compose_train(["experiment=smoke", "data=wds", f"data.train={tmp_path / 'train'}",
                         f"data.val.domain={tmp_path / 'val'}", "data.resampled=false", "data.shard_shuffle=false",
                         "data.sample_shuffle=0", "data.workers=0", "data.persistent_workers=false",
                         f"data.samples_per_epoch={good + 1}", f"batch_size={good + 1}", "trainer.max_steps=1",
                         "trainer.val_check_interval=1", f"out_root={tmp_path / 'runs'}", "name=cut"],
                        run_dir=tmp_path / "runs" / "cut")
    run_dir = Path(train(cfg)["run_dir"])
    doc = json.loads((run_dir / "metrics.json").read_text())
    # one batch of good + 1 samples: the whole first pass (and its lost samples) was read to make it
    assert doc["skipped"]["train"]["truncated"] == cut["train"]
    assert doc["skipped"]["val"]["domain"]["truncated"] == cut["val"]


def test_data_max_member_bytes_reaches_the_loaders(tmp_path):
    """``data.max_member_bytes`` (configs/data/wds.yaml) is the reader's cap in the data module's loaders:
    every image member of these shards is larger than 200 bytes, so every sample is skipped unread and
    counted as member_too_large; the default cap reads them all."""
    from cliptune.data.datamodule import WdsDataModule
    shards = tmp_path / "s"
    write_shards(shards, basic_samples(6, prefix="v"), 3, split="val")
    sizes = [len(b) for s in basic_samples(6, prefix="v") for k, b in s.items() if k.endswith(("jpg", "png"))]
    assert min(sizes) > 200
    parts = dict(tokenizer=char_tokenizer, train_transform=tiny_transform(), val_transform=tiny_transform(),
                 workers=0, batch_size=3, persistent_workers=False)
    (loader,) = WdsDataModule(train=None, val={"v": str(shards)}, **parts).val_dataloader()
    assert sum(len(b["key"]) for b in loader) == 6
    (loader,) = WdsDataModule(train=None, val={"v": str(shards)}, max_member_bytes=200, **parts).val_dataloader()
    batches = list(loader)
    assert sum(len(b.get("key", ())) for b in batches) == 0
    assert skipped_dict(sum(b["skipped"] for b in batches if "skipped" in b))["member_too_large"] == 6
    with pytest.raises(ValueError, match="data.max_member_bytes must be >= 1"):
        WdsDataModule(train=None, max_member_bytes=0, **parts)
    assert "member_too_large" in SKIP_REASONS
