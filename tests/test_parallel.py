"""Parallel text for distillation (cliptune.data.parallel): JSONL, TSV and the captions of bilingual shards,
errors naming the file and line, CLDR names, and a corpus that never holds a validation name."""

from __future__ import annotations

import json

import pytest

from cliptune.data.parallel import (ParallelFormatError, ParallelRow, build_corpus, cldr_rows, excluded_names,
                                    read_parallel, unique_rows, write_jsonl)
from helpers_shards import make_sample, write_shards


def _lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl(tmp_path):
    path = _lines(tmp_path / "p.jsonl", json.dumps({"en": "cat", "zh": "猫"}, ensure_ascii=False), "",
                  json.dumps({"en": ["dog", "hound"], "zh": "狗", "group": "d", "extra": 1}, ensure_ascii=False))
    rows = read_parallel(str(path), ("en", "zh"))
    assert [r.texts for r in rows] == [("cat", "猫"), ("dog", "狗"), ("hound", "狗")]
    assert rows[1].group == rows[2].group == "d" and rows[0].group != "d"
    assert [r.texts for r in read_parallel(str(path), ("zh", "en"))][0] == ("猫", "cat")  # the order asked for


@pytest.mark.parametrize("line,error", [
    ('{"en": "cat", "zh": "猫"', "line 2: not valid JSON"),
    ('{"en": "cat"}', "line 2: no 'zh' text"),
    ('{"en": "cat", "zh": ""}', "line 2: no 'zh' text"),
    ('{"en": "cat", "zh": [1]}', "line 2: no 'zh' text"),
    ('["cat", "猫"]', "line 2: expected an object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, error):
    path = _lines(tmp_path / "bad.jsonl", '{"en": "dog", "zh": "狗"}', line)
    with pytest.raises(ParallelFormatError, match=f"bad.jsonl {error}"):
        read_parallel(str(path), ("en", "zh"))


def test_tsv(tmp_path):
    path = _lines(tmp_path / "p.tsv", "zh\ten\tgroup", "猫\tcat\tanimals", "狗\t dog \t")
    rows = read_parallel(str(path), ("en", "zh"))
    assert [r.texts for r in rows] == [("cat", "猫"), ("dog", "狗")]
    assert rows[0].group == "animals"
    with pytest.raises(ParallelFormatError, match="p2.tsv line 3: 1 tab-separated fields"):
        read_parallel(str(_lines(tmp_path / "p2.tsv", "en\tzh", "cat\t猫", "dog")), ("en", "zh"))
    with pytest.raises(ParallelFormatError, match="p3.tsv line 1: the header names no 'zh' column"):
        read_parallel(str(_lines(tmp_path / "p3.tsv", "en\tfr", "cat\tchat")), ("en", "zh"))
    with pytest.raises(ParallelFormatError, match="p4.tsv line 2: empty 'zh' text"):
        read_parallel(str(_lines(tmp_path / "p4.tsv", "en\tzh", "cat\t ")), ("en", "zh"))
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        read_parallel(str(tmp_path / "missing.tsv"), ("en", "zh"))


def _shards(tmp_path, split="train"):
    samples = [
        make_sample("a", {"en": ["grinning face", "grinning"], "zh": ["嘿嘿"]}, group="g1"),
        make_sample("b", {"en": ["cat"]}, i=1),  # no Chinese: left out
        make_sample("c", {"en": ["flag: Iran"], "zh": ["旗: 伊朗"]}, i=2),
    ]
    write_shards(tmp_path / "shards", samples, per_shard=2, split=split)
    return tmp_path / "shards"


def test_shard_captions(tmp_path):
    rows = read_parallel(str(_shards(tmp_path)), ("en", "zh"))
    assert [r.texts for r in rows] == [("grinning face", "嘿嘿"), ("grinning", "嘿嘿"), ("flag: Iran", "旗: 伊朗")]
    assert rows[0].group == rows[1].group == "g:g1" and rows[2].group == "k:c"


def test_shard_errors_name_shard_and_sample(tmp_path):
    write_shards(tmp_path / "bad", [make_sample("x1", raw_json=b"{not json")], per_shard=1)
    with pytest.raises(ParallelFormatError, match="sample 'x1': its json does not decode"):
        read_parallel(str(tmp_path / "bad"), ("en", "zh"))


def test_cldr_names():
    pytest.importorskip("babel")
    rows = cldr_rows(["territories", "currencies"])
    texts = {r.texts for r in rows}
    assert ("France", "法国") in texts and ("Japan", "日本") in texts
    assert len(rows) > 400 and len({r.group for r in rows}) == len(rows)
    with pytest.raises(ValueError, match="territories"):
        cldr_rows(["planets"])


def test_corpus_never_holds_a_validation_name(tmp_path):
    """The validation emoji's names, and their parts (the country of a flag), are kept out of every row."""
    val = _shards(tmp_path / "v", split="val")  # names: grinning face / 嘿嘿, flag: Iran / 旗: 伊朗
    extra = _lines(tmp_path / "cldr_like.jsonl", *[json.dumps(r, ensure_ascii=False) for r in (
        {"en": "Iran", "zh": "伊朗"}, {"en": "France", "zh": "法国"}, {"en": "Grinning  Face", "zh": "笑"},
        {"en": "happy", "zh": "嘿嘿"}, {"en": "dog", "zh": "狗"})])
    names = excluded_names([str(val)])
    assert {"grinning face", "iran", "伊朗", "flag: iran"} <= names
    corpus = build_corpus([str(extra)], exclude=[str(val)])
    assert [r.texts for r in corpus.train] == [("France", "法国"), ("dog", "狗")]
    assert corpus.info["excluded"] == 3
    if pytest.importorskip("babel"):
        cldr = build_corpus(["cldr:territories"], exclude=[str(val)])
        assert not [r for r in cldr.train if "Iran" in r.texts or "伊朗" in r.texts]
        assert ("France", "法国") in {r.texts for r in cldr.train}


def test_held_out_groups_are_never_trained_on(tmp_path):
    rows = [{"en": f"w{i} {j}", "zh": f"字{i}{j}", "group": f"g{i}"} for i in range(40) for j in range(3)]
    path = _lines(tmp_path / "p.jsonl", *[json.dumps(r, ensure_ascii=False) for r in rows])
    corpus = build_corpus([str(path)], val_fraction=0.25, seed=1)
    held, trained = {r.group for r in corpus.val}, {r.group for r in corpus.train}
    assert held and trained and not held & trained and len(corpus.train) + len(corpus.val) == 120
    assert build_corpus([str(path)], val_fraction=0.25, seed=1).val == corpus.val  # deterministic
    out = write_jsonl(tmp_path / "out" / "train.jsonl", corpus.train, ("en", "zh"))
    assert read_parallel(str(out), ("en", "zh")) == corpus.train


def test_unique_rows_keep_one_answer_per_query():
    rows = [ParallelRow(("a", "甲"), "1"), ParallelRow(("a2", "甲"), "1"), ParallelRow(("b", "乙"), "2"),
            ParallelRow(("b", "丙"), "3"), ParallelRow(("a", "甲"), "1")]
    assert unique_rows(rows) == [rows[0], rows[2]]
