"""Recall@K against a brute-force argsort reference, torchmetrics and a hand-computed case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.retrieval import retrieval_recall
from torchmetrics.retrieval import RetrievalHitRate, RetrievalRecall

from cliptune.eval.retrieval import chance_recall, ranks_i2t, ranks_t2i, retrieval_metrics

KS = (1, 2, 5, 10)


def brute_force(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Full score matrix + sort; among equal scores wrong items are placed before correct ones
    (the pessimistic rule), so the rank is the position of the first correct item."""
    s = (txt.double() @ img.double().T).numpy()  # [N_txt, N_img]; exact for integer inputs
    owner = owner.numpy()
    n_txt, n_img = s.shape
    t2i = np.empty(n_txt, dtype=np.int64)
    for t in range(n_txt):
        correct = np.arange(n_img) == owner[t]
        order = np.lexsort((correct, -s[t]))  # primary: score desc; ties: wrong (False) first
        t2i[t] = int(np.nonzero(correct[order])[0][0]) + 1
    i2t = []
    for i in range(n_img):
        correct = owner == i
        if not correct.any():
            continue
        order = np.lexsort((correct, -s[:, i]))
        i2t.append(int(np.nonzero(correct[order])[0][0]) + 1)
    return t2i, np.array(i2t)


def expected_metrics(t2i: np.ndarray, i2t: np.ndarray, ks=KS) -> dict[str, float]:
    out = {}
    for name, r in (("t2i", t2i), ("i2t", i2t)):
        for k in ks:
            out[f"{name}_R@{k}"] = float(np.mean(r <= k))
    out["mean_R"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in ks]))
    for name, r in (("t2i", t2i), ("i2t", i2t)):
        out[f"{name}_median_rank"] = float(np.median(r))
        out[f"{name}_mean_rank"] = float(np.mean(r))
    return out


def tied_data(seed: int, n_img: int = 37, n_txt: int = 90, d: int = 6):
    """Integer embeddings from {-1, 0, 1} (many exact ties), several captions per image, and a
    few images with no caption at all."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(-1, 2, (n_img, d), generator=g).float()
    img[1] = img[0]  # duplicated images: guaranteed ties
    owner = torch.randint(0, n_img - 3, (n_txt,), generator=g)  # last 3 images have no caption
    txt = torch.randint(-1, 2, (n_txt, d), generator=g).float()
    return img, txt, owner


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 90, 4096])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_with_ties(chunk: int, seed: int) -> None:
    img, txt, owner = tied_data(seed)
    m, pq = retrieval_metrics(img, txt, owner, ks=KS, chunk_size=chunk, normalize=False, return_per_query=True)
    t2i, i2t = brute_force(img, txt, owner)
    exp = expected_metrics(t2i, i2t)
    assert m.keys() == exp.keys()
    for k, v in exp.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
    assert torch.equal(pq["t2i_rank"], torch.from_numpy(t2i))
    assert torch.equal(pq["i2t_rank"], torch.from_numpy(i2t))
    for k in KS:
        assert pq[f"t2i_R@{k}"].dtype == torch.bool
        assert torch.equal(pq[f"t2i_R@{k}"], torch.from_numpy(t2i <= k))
        assert torch.equal(pq[f"i2t_R@{k}"], torch.from_numpy(i2t <= k))
    with_caption = torch.unique(owner)
    assert torch.equal(pq["i2t_image_index"], with_caption)


def test_hand_computed_tiny_case_with_ties() -> None:
    # Images I0=[1,0], I1=[0,1], I2=[1,0] (I2 duplicates I0).
    # Captions T0->I0 [1,0], T1->I1 [0,1], T2->I1 [1,1], T3->I2 [1,0].
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    owner = torch.tensor([0, 1, 1, 2])
    # t2i: T0 ties I2 -> rank 2; T1 -> 1; T2 scores 1 on all three -> 3; T3 ties I0 -> 2.
    # i2t: I0 (own T0=1; wrong T2=1, T3=1) -> 3; I1 (own T1=T2=1, no wrong >= 1) -> 1;
    #      I2 (own T3=1; wrong T0=1, T2=1) -> 3.
    m, pq = retrieval_metrics(img, txt, owner, ks=(1, 2, 3), normalize=False, return_per_query=True)
    assert pq["t2i_rank"].tolist() == [2, 1, 3, 2]
    assert pq["i2t_rank"].tolist() == [3, 1, 3]
    assert m["t2i_R@1"] == pytest.approx(1 / 4)
    assert m["t2i_R@2"] == pytest.approx(3 / 4)
    assert m["t2i_R@3"] == pytest.approx(1.0)
    assert m["i2t_R@1"] == pytest.approx(1 / 3)
    assert m["i2t_R@2"] == pytest.approx(1 / 3)
    assert m["i2t_R@3"] == pytest.approx(1.0)
    assert m["mean_R"] == pytest.approx((1 / 4 + 3 / 4 + 1 + 1 / 3 + 1 / 3 + 1) / 6)
    assert m["t2i_median_rank"] == 2.0 and m["t2i_mean_rank"] == pytest.approx(2.0)
    assert m["i2t_median_rank"] == 3.0 and m["i2t_mean_rank"] == pytest.approx(7 / 3)


def test_image_without_caption_is_excluded() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m, pq = retrieval_metrics(img, txt, torch.tensor([0, 1]), ks=(1,), return_per_query=True)
    assert pq["i2t_R@1"].numel() == 2
    assert pq["i2t_image_index"].tolist() == [0, 1]
    assert m["i2t_R@1"] == 1.0


def test_constant_embeddings_score_worst_rank() -> None:
    # A collapsed model (every score equal) must not get credit from tie-breaking.
    n = 20
    img = torch.ones(n, 8)
    txt = torch.ones(n, 8)
    m = retrieval_metrics(img, txt, torch.arange(n), ks=(1, 5))
    assert m["t2i_R@1"] == 0.0 and m["i2t_R@5"] == 0.0
    assert m["t2i_mean_rank"] == n and m["i2t_median_rank"] == n


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torchmetrics_on_continuous_data(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_img, n_txt, d = 40, 110, 16
    img = torch.randn(n_img, d, generator=g)
    owner = torch.randint(0, n_img, (n_txt,), generator=g)
    txt = img[owner] + 1.2 * torch.randn(n_txt, d, generator=g)  # informative but imperfect
    m, pq = retrieval_metrics(img, txt, owner, ks=KS, chunk_size=13, return_per_query=True)

    img_n = torch.nn.functional.normalize(img, dim=-1)
    txt_n = torch.nn.functional.normalize(txt, dim=-1)
    s = txt_n @ img_n.T  # [N_txt, N_img]
    pos = owner[:, None] == torch.arange(n_img)[None, :]
    t_idx = torch.arange(n_txt)[:, None].expand(n_txt, n_img)
    i_idx = torch.arange(n_img)[:, None].expand(n_img, n_txt)
    for k in KS:
        ref_t2i = RetrievalRecall(top_k=k)(s.flatten(), pos.flatten(), indexes=t_idx.flatten())
        assert m[f"t2i_R@{k}"] == pytest.approx(float(ref_t2i), abs=1e-6)
        # i2t: hit if ANY caption is in the top k = hit rate; images without captions skipped.
        ref_i2t = RetrievalHitRate(top_k=k, empty_target_action="skip")(
            s.T.flatten(), pos.T.flatten(), indexes=i_idx.flatten())
        assert m[f"i2t_R@{k}"] == pytest.approx(float(ref_i2t), abs=1e-6)
        # Per query, CLIP_benchmark's rule: recall > 0.
        hits = [bool(retrieval_recall(s[:, i], pos[:, i], top_k=k) > 0) for i in range(n_img) if pos[:, i].any()]
        assert pq[f"i2t_R@{k}"].tolist() == hits


def test_low_precision_inputs_are_scored_in_fp32() -> None:
    img, txt, owner = tied_data(3)
    ref = retrieval_metrics(img, txt, owner, normalize=False)
    half = retrieval_metrics(img.half(), txt.bfloat16(), owner, normalize=False)
    assert half == ref


def test_already_normalised_inputs_are_not_rescaled() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    owner = torch.arange(30)
    a = retrieval_metrics(img, txt, owner, normalize=True, return_per_query=True)
    b = retrieval_metrics(img, txt, owner, normalize=False, return_per_query=True)
    assert a[0] == b[0]
    c = retrieval_metrics(img * 3, txt * 0.5, owner, return_per_query=True)
    assert torch.equal(c[1]["t2i_rank"], a[1]["t2i_rank"])


def test_bad_inputs_name_the_problem() -> None:
    img, txt = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="only 4 images"):
        retrieval_metrics(img, txt, torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(img, txt, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="widths"):
        retrieval_metrics(img, torch.randn(5, 7), torch.zeros(5, dtype=torch.long))


def test_chance_recall_matches_simulation_and_closed_form() -> None:
    owner = torch.tensor([0, 0, 0, 1, 2, 2, 4])  # image 3 has no caption
    n_img, n_txt = 5, owner.numel()
    ch = chance_recall(n_img, owner, ks=(1, 2, 10))
    assert ch["t2i_R@1"] == pytest.approx(1 / 5)
    assert ch["t2i_R@10"] == 1.0
    counts = [3, 1, 2, 1]
    exp = np.mean([1 - math.comb(n_txt - c, 2) / math.comb(n_txt, 2) for c in counts])
    assert ch["i2t_R@2"] == pytest.approx(exp)
    assert ch["i2t_R@10"] == 1.0
    # Random embeddings: average recall over many draws approaches the chance level.
    g = torch.Generator().manual_seed(0)
    sims = [retrieval_metrics(torch.randn(n_img, 4, generator=g), torch.randn(n_txt, 4, generator=g), owner,
                              ks=(1, 2)) for _ in range(2000)]
    for key in ("t2i_R@1", "t2i_R@2", "i2t_R@1", "i2t_R@2"):
        assert np.mean([s[key] for s in sims]) == pytest.approx(ch[key], abs=0.02), key


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("side", ["image", "text"])
def test_non_finite_embeddings_are_refused_with_set_and_counts(bad, side) -> None:
    """A NaN compares false with everything, so NaN embeddings used to rank every query first
    (R@1 = 1): a diverged model must raise instead, naming the set and the broken rows."""
    g = torch.Generator().manual_seed(0)
    img, txt, owner = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g), torch.arange(9) % 6
    x = img if side == "image" else txt
    x[1, 0] = bad
    x[4] = bad  # a whole broken row counts once
    want = {"image": (2, 0), "text": (0, 2)}[side]
    with pytest.raises(ValueError) as e:
        retrieval_metrics(img, txt, owner, name="val set 'domain'")
    assert str(e.value) == (
        f"val set 'domain': {want[0]} of 6 image embeddings and {want[1]} of 9 text embeddings are not finite "
        "(NaN/inf); the model has diverged or its input is broken — refusing to rank them")
    # the low-level rank functions refuse as well
    for fn in (ranks_t2i, ranks_i2t):
        with pytest.raises(ValueError, match=r"^embeddings: \d of 6 image embeddings and \d of 9 text"):
            fn(img, txt, owner)


def test_all_nan_model_no_longer_scores_perfect_recall() -> None:
    img, txt = torch.full((5, 3), math.nan), torch.full((5, 3), math.nan, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^embeddings: 5 of 5 image embeddings and 5 of 5 text embeddings"):
        retrieval_metrics(img, txt, torch.arange(5))


def test_evaluate_gathered_refuses_non_finite_before_loss_and_zero_shot() -> None:
    """The in-training / cliptune-eval path: the error names the set it was given."""
    from cliptune.eval.embed import EmbeddingCollector, evaluate_gathered
    from cliptune.train.losses import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=-1)

    def collected(img, txt):
        col = EmbeddingCollector()
        col.add_embeddings(img, txt, torch.arange(8), labels=["cat", "dog"] * 4)
        return col.gather()

    ok = evaluate_gathered(collected(img, txt), ClipLoss(), (torch.tensor(10.0), None), name="val set 'domain'")
    ref = retrieval_metrics(img, txt, torch.arange(8))
    assert {k: v for k, v in ok["metrics"].items() if k != "loss"} == ref and math.isfinite(ok["metrics"]["loss"])

    bad = txt.clone()
    bad[[2, 5]] = math.nan
    with pytest.raises(ValueError, match=r"^val set 'domain': 0 of 8 image embeddings and 2 of 8 text embeddings"):
        evaluate_gathered(collected(img, bad), ClipLoss(), (torch.tensor(10.0), None), name="val set 'domain'")

    # zero-shot: finite set embeddings, but the class prompts embed to NaN
    def nan_encode(texts: list[str]) -> torch.Tensor:
        return torch.full((len(texts), 4), math.nan)

    with pytest.raises(ValueError, match=r"^val set 'domain': 0 of 8 image embeddings and 2 of 2 class text"):
        evaluate_gathered(collected(img, txt), zeroshot=(nan_encode, ["{c}"]), name="val set 'domain'")
