"""Cross-lingual consistency (how often an image's captions in two languages retrieve the same top-1 image)
against a brute-force reference; per-language validation sets (data.val_caption_langs) and the consistency
in cliptune-eval's results and in a training run's metrics and table."""

from __future__ import annotations

import json

import pytest
import torch

from cliptune.data.datamodule import WdsDataModule
from cliptune.eval.retrieval import crosslingual_chance, crosslingual_consistency
from cliptune.eval.runner import crosslingual_results, evaluate_sets
from cliptune.models import build_model
from conftest import TINY_ARCH, compose_train
from helpers_shards import char_tokenizer, make_sample, tiny_transform, untokenize, write_shards


def _brute(img, ta, oa, tb, ob):
    """Per image with a caption in both languages (its first of each): same top-1 image? and is it its own?"""
    img, ta, tb = (torch.nn.functional.normalize(x.float(), dim=-1) for x in (img, ta, tb))
    same, right = [], []
    for i in range(img.shape[0]):
        ca, cb = [k for k in range(len(oa)) if oa[k] == i], [k for k in range(len(ob)) if ob[k] == i]
        if not ca or not cb:
            continue
        tops = []
        for text, k in ((ta, ca[0]), (tb, cb[0])):
            scores = (img @ text[k]).tolist()
            tops.append(min(j for j in range(len(scores)) if scores[j] == max(scores)))  # first of the best
        same.append(tops[0] == tops[1])
        right.append(tops[0] == tops[1] == i)
    return sum(same) / len(same), sum(right) / len(right), len(same)


@pytest.mark.parametrize("seed", range(6))
def test_consistency_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = 23, 6
    img = torch.randn(n, d, generator=g)
    img[7] = img[3]  # equal images: ties the first-of-the-best rule must break the same way
    img[15] = img[3]
    oa = torch.randint(0, n, (40,), generator=g).sort().values  # several captions per image, some images none
    ob = torch.randint(0, n, (30,), generator=g)
    ta = img[oa] + 0.8 * torch.randn(len(oa), d, generator=g)
    tb = img[ob] + 0.8 * torch.randn(len(ob), d, generator=g)
    tb[: 5] = torch.round(tb[: 5])  # some coarse captions: more ties
    metrics, per_image = crosslingual_consistency(img, ta, oa, tb, ob, chunk_size=7, return_per_image=True)
    same, right, count = _brute(img, ta, oa, tb, ob)
    assert metrics["xling_top1"] == pytest.approx(same) and metrics["xling_top1_correct"] == pytest.approx(right)
    assert per_image["xling_top1"].numel() == count == per_image["xling_image_index"].numel()
    assert set(per_image["xling_image_index"].tolist()) == set(oa.tolist()) & set(ob.tolist())


def test_consistency_edge_cases():
    img = torch.eye(4)
    m = crosslingual_consistency(img, img.clone(), torch.arange(4), img.clone(), torch.arange(4))
    assert m == {"xling_top1": 1.0, "xling_top1_correct": 1.0}
    m = crosslingual_consistency(img, img.clone(), torch.arange(4), img[[1, 0, 3, 2]], torch.arange(4))
    assert m == {"xling_top1": 0.0, "xling_top1_correct": 0.0}
    with pytest.raises(ValueError, match="no image has a caption in both"):
        crosslingual_consistency(img, img[:2], torch.tensor([0, 1]), img[2:], torch.tensor([2, 3]))
    bad = img.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        crosslingual_consistency(img, bad, torch.arange(4), img, torch.arange(4))
    assert crosslingual_chance(10) == {"xling_top1": 0.1, "xling_top1_correct": pytest.approx(0.01)}


def test_results_search_every_image_of_either_language():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(5, 4, generator=g)
    a = {"keys": ["k0", "k1", "k2", "k3"], "img": img[:4], "txt": img[[0, 1, 2, 3]] + 0.1, "owner": torch.arange(4)}
    b = {"keys": ["k1", "k2", "k4"], "img": img[[1, 2, 4]], "txt": img[[4, 1, 2]], "owner": torch.tensor([2, 0, 1])}
    out = crosslingual_results("s", {"en": a, "zh": b, "any": a})
    assert list(out) == ["s:en~zh"]  # pairs of single languages only
    res = out["s:en~zh"]
    expected = crosslingual_consistency(img, a["txt"], a["owner"], b["txt"], torch.tensor([4, 1, 2]))
    assert res["metrics"] == expected and res["n_images"] == 2 and res["keys"] == ["k1", "k2"]
    assert res["chance"]["xling_top1"] == pytest.approx(1 / 5)
    assert crosslingual_results("s", {"en": a, "zh": {**b, "keys": ["x1", "x2", "x3"]}}) == {}  # no image in both


def _bilingual_shards(tmp_path, n=12):
    samples = [make_sample(f"s{i:03d}", {"en": [f"thing {i}", f"alias {i}"], "zh": [f"东西{i}"]}, i=i)
               for i in range(n)]
    samples.append(make_sample("s999", {"en": ["only english"]}, i=99))
    write_shards(tmp_path / "shards", samples, per_shard=5, split="train")
    write_shards(tmp_path / "shards", samples, per_shard=5, split="val")
    return tmp_path / "shards"


def test_per_language_validation_sets(tmp_path):
    shards = _bilingual_shards(tmp_path)
    dm = WdsDataModule(train=str(shards), val={"emoji": str(shards)}, batch_size=4, workers=0, tokenizer=char_tokenizer,
                       train_transform=tiny_transform(), val_transform=tiny_transform(), val_caption_langs=["en", "zh"])
    assert dm.val_set_names == ["emoji:en", "emoji:zh"]
    texts = [[untokenize(t) for b in loader for t in b.get("text", [])] for loader in dm.val_dataloader()]
    assert all(t.startswith(("thing", "alias", "only")) for t in texts[0]) and len(texts[0]) == 25
    assert all(t.startswith("东西") for t in texts[1]) and len(texts[1]) == 12
    plain = WdsDataModule(train=str(shards), val={"emoji": str(shards)}, batch_size=4, workers=0)
    assert plain.val_set_names == ["emoji"]


def test_eval_reports_consistency_with_several_languages(tmp_path):
    shards = _bilingual_shards(tmp_path)
    bundle = build_model("cliptune-tiny-xl", arch=TINY_ARCH)
    res = evaluate_sets(bundle, {"v": str(shards)}, ["en", "zh"], batch_size=8, workers=0)
    assert list(res) == ["v:en", "v:zh", "v:en~zh"]
    xl = res["v:en~zh"]
    assert xl["n_images"] == 12 and set(xl["metrics"]) == {"xling_top1", "xling_top1_correct"}
    assert xl["chance"]["xling_top1"] == pytest.approx(1 / 13)  # the gallery: every image of either language
    assert list(evaluate_sets(bundle, {"v": str(shards)}, ["zh"], batch_size=8, workers=0)) == ["v"]


def test_training_run_reports_each_language_and_their_consistency(tmp_path, capsys):
    from cliptune.train.run import run

    shards = _bilingual_shards(tmp_path, n=16)
    cfg = compose_train(["model=tiny", "data=wds", f"data.train={shards}", f"data.val.domain={shards}",
                         "+data.val_caption_langs=[en,zh]", "data.caption_lang=any", "data.workers=0",
                         "data.val_workers=0", "data.persistent_workers=false", "batch_size=8",
                         "trainer.max_steps=2", "trainer.val_check_interval=2", "export_start=false",
                         f"out_root={tmp_path}", "name=xl", "callbacks.progress.refresh_rate=0"],
                        run_dir=tmp_path / "xl")
    result = run(cfg)
    metrics = json.loads((tmp_path / "xl" / "metrics.json").read_text())
    for when in ("before", "after"):
        assert set(metrics[when]) == {"domain:en", "domain:zh", "domain:en~zh"}, metrics[when]
        assert 0 <= metrics[when]["domain:en~zh"]["xling_top1"] <= 1
        assert "t2i_R@5" in metrics[when]["domain:zh"]
    assert metrics["chance"]["domain:en~zh"]["xling_top1"] == pytest.approx(1 / 17)
    assert result["after"]["domain:en~zh"] == metrics["after"]["domain:en~zh"]
    out = capsys.readouterr().out
    assert "domain:en~zh" in out and "xling top1" in out.replace("_", " ")
    # computed from the validation's own embeddings; a separate pass over the set with the exported model agrees
    from cliptune.eval.runner import evaluate_sets
    from cliptune.models import load_model

    again = evaluate_sets(load_model(str(tmp_path / "xl" / "export")), {"domain": str(shards)}, ["en", "zh"],
                          batch_size=8, workers=0)
    for k in ("xling_top1", "xling_top1_correct"):
        assert metrics["after"]["domain:en~zh"][k] == pytest.approx(again["domain:en~zh"]["metrics"][k]), k
    import pandas as pd

    log = pd.read_csv(tmp_path / "xl" / "csv" / "metrics.csv")
    assert log["val/domain:en~zh/xling_top1"].notna().sum() == 2  # before and at step 2 (the run's after)
