"""Tiled contrastive losses vs open_clip's dense losses and brute-force dense references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss

import cliptune.train.losses as losses_mod
from cliptune.train.losses import ClipLoss, SigLipLoss, _TiledSoftmaxLSE, _TiledSoftplusSum

LOSSES = {"clip": ClipLoss, "siglip": SigLipLoss}


def _unit(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def _inputs(b: int, d: int, k: int = 0, seed: int = 0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    # texts correlated with their images so positives actually score high
    txt = F.normalize(img + 0.8 * torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    out = {
        "img": img,
        "txt": txt,
        "scale": torch.tensor(14.0, dtype=dtype),
        "bias": torch.tensor(-4.0, dtype=dtype),
    }
    if k:
        out["neg"] = F.normalize(torch.randn(b, k, d, generator=g, dtype=dtype), dim=-1)
        out["mask"] = torch.rand(b, k, generator=g) < 0.6
    return out


def _run(fn, x: dict, kind: str, **kw) -> tuple[torch.Tensor, dict]:
    """Loss value and gradients of every floating input (fresh leaves each call)."""
    leaves = {n: v.clone().requires_grad_() for n, v in x.items() if v.is_floating_point()}
    args = [leaves["img"], leaves["txt"], leaves["scale"]]
    if kind == "siglip":
        args.append(leaves["bias"])
    if "neg" in leaves and kw.pop("negatives", True):
        kw = {**kw, "neg_text_features": leaves["neg"], "neg_mask": x["mask"]}
    loss = fn(*args, **kw)
    loss.backward()
    grads = {n: v.grad for n, v in leaves.items() if v.grad is not None}
    return loss.detach(), grads


def _assert_same(a: tuple, b: tuple, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, atol=atol, rtol=rtol)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=rtol, msg=name)


# ---- brute-force dense references (the whole logit matrix, written from the definitions) ----


def _dense_clip(img, txt, scale, group_ids=None, neg_text_features=None, neg_mask=None):
    b = img.shape[0]
    gid = torch.arange(b) if group_ids is None else group_ids
    same = (gid[:, None] == gid[None, :]).to(img.dtype)  # [B, B]
    cols, tgt = txt, same
    if neg_text_features is not None:
        negs = neg_text_features[neg_mask]  # [M, D], never positive
        cols = torch.cat([txt, negs])
        tgt = torch.cat([same, same.new_zeros(b, negs.shape[0])], dim=1)
    logp_i2t = torch.log_softmax(scale * img @ cols.T, dim=1)
    logp_t2i = torch.log_softmax(scale * txt @ img.T, dim=1)  # negatives play no part here
    loss_i2t = -((tgt / tgt.sum(1, keepdim=True)) * logp_i2t).sum(1).mean()
    loss_t2i = -((same / same.sum(1, keepdim=True)) * logp_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def _dense_siglip(img, txt, scale, bias, group_ids=None, neg_text_features=None, neg_mask=None):
    b = img.shape[0]
    gid = torch.arange(b) if group_ids is None else group_ids
    y = (gid[:, None] == gid[None, :]).to(img.dtype) * 2 - 1
    cols = txt
    if neg_text_features is not None:
        negs = neg_text_features[neg_mask]
        cols = torch.cat([txt, negs])
        y = torch.cat([y, -y.new_ones(b, negs.shape[0])], dim=1)
    return -F.logsigmoid(y * (scale * img @ cols.T + bias)).sum() / b


DENSE = {"clip": _dense_clip, "siglip": _dense_siglip}


# ---- equality with open_clip ----


@pytest.mark.parametrize("tile", [1, 5, 8, 23, 64])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_matches_open_clip_value_and_grads(kind: str, tile: int) -> None:
    x = _inputs(23, 16, seed=tile)
    ours = _run(LOSSES[kind](tile_size=tile), x, kind)
    ref = _run(OpenClipLoss() if kind == "clip" else OpenSigLipLoss(), x, kind)
    _assert_same(ours, ref)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_matches_open_clip_at_extreme_scale(kind: str) -> None:
    # scale 100 (CLIP's clamp) makes logits span +-100: the streaming LSE must not overflow
    x = _inputs(16, 8, seed=3)
    x["scale"] = torch.tensor(100.0)
    x["bias"] = torch.tensor(-10.0)
    ours = _run(LOSSES[kind](tile_size=3), x, kind)
    ref = _run(OpenClipLoss() if kind == "clip" else OpenSigLipLoss(), x, kind)
    _assert_same(ours, ref, atol=1e-4)


# ---- multi-positive (group) mode ----


def _groups(b: int, n_groups: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n_groups, (b,), generator=g)
    # int64 hash-like ids, negative ones included: only equality may matter
    return ids * 7_919_000_000_001 - 3_000_000_000_000_000


@pytest.mark.parametrize("tile", [5, 64])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_group_positives_match_dense_reference(kind: str, tile: int) -> None:
    x = _inputs(24, 16, seed=1)
    gid = _groups(24, 7, seed=2)
    assert len(set(gid.tolist())) < 24  # some groups really have several members
    ours = _run(LOSSES[kind](positives="group", tile_size=tile), x, kind, group_ids=gid)
    ref = _run(DENSE[kind], x, kind, group_ids=gid)
    _assert_same(ours, ref)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_distinct_groups_equal_pair_mode(kind: str) -> None:
    x = _inputs(20, 16, seed=4)
    gid = torch.randperm(20) * 1_000_003 - 17  # all distinct, not in sample order
    group = _run(LOSSES[kind](positives="group", tile_size=6), x, kind, group_ids=gid)
    pair = _run(LOSSES[kind](positives="pair", tile_size=6), x, kind)
    _assert_same(group, pair)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_pair_mode_ignores_group_ids(kind: str) -> None:
    x = _inputs(12, 8, seed=5)
    with_ids = _run(LOSSES[kind](tile_size=5), x, kind, group_ids=torch.zeros(12, dtype=torch.long))
    _assert_same(with_ids, _run(LOSSES[kind](tile_size=5), x, kind))


# ---- hard negatives ----


@pytest.mark.parametrize("positives", ["pair", "group"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hard_negatives_match_dense_reference(kind: str, positives: str) -> None:
    x = _inputs(23, 16, k=3, seed=6)
    kw = {"group_ids": _groups(23, 9, seed=7)} if positives == "group" else {}
    loss_fn = LOSSES[kind](positives=positives, tile_size=5)
    ours = _run(loss_fn, x, kind, **kw)
    ref = _run(DENSE[kind], x, kind, **kw)
    _assert_same(ours, ref)
    assert "neg" in ours[1]  # the negatives receive gradient

    # the increase over the loss without negatives is the brute-force increase
    ours_plain = _run(loss_fn, x, kind, negatives=False, **kw)[0]
    ref_plain = _run(DENSE[kind], x, kind, negatives=False, **kw)[0]
    assert ours[0] > ours_plain
    torch.testing.assert_close(ours[0] - ours_plain, ref[0] - ref_plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_fully_masked_negatives_change_nothing(kind: str) -> None:
    x = _inputs(10, 8, k=2, seed=8)
    x["mask"] = torch.zeros(10, 2, dtype=torch.bool)
    with_negs = _run(LOSSES[kind](tile_size=4), x, kind)
    without = _run(LOSSES[kind](tile_size=4), x, kind, negatives=False)
    torch.testing.assert_close(with_negs[0], without[0])
    assert float(with_negs[1]["neg"].abs().max()) == 0.0


# ---- autograd ----


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradcheck_full_loss(kind: str) -> None:
    torch.manual_seed(0)
    b, d, k = 5, 4, 2
    img, txt = _unit(b, d, dtype=torch.float64), _unit(b, d, dtype=torch.float64)
    neg = _unit(b, k, d, dtype=torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64)
    bias = torch.tensor(-1.0, dtype=torch.float64)
    mask = torch.tensor([[True, False], [True, True], [False, False], [True, False], [False, True]])
    gid = torch.tensor([3, 1, 3, 2, 1])
    loss_fn = LOSSES[kind](positives="group", tile_size=2)

    def f(img, txt, scale, bias, neg):
        return loss_fn(
            img, txt, scale, bias if kind == "siglip" else None,
            group_ids=gid, neg_text_features=neg, neg_mask=mask,
        )

    inputs = [t.clone().requires_grad_() for t in (img, txt, scale, bias, neg)]
    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_tiled_functions() -> None:
    # the column LSE on only the first n_col columns, rows and columns both ragged
    torch.manual_seed(1)
    q = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, s: _TiledSoftmaxLSE.apply(q, k, s, 6, 4), (q, k, s))
    assert torch.autograd.gradcheck(lambda q, k, s: _TiledSoftmaxLSE.apply(q, k, s, 6, 4)[0].sum(), (q, k, s))
    assert torch.autograd.gradcheck(lambda q, k, s: _TiledSoftmaxLSE.apply(q, k, s, 6, 4)[1].sum(), (q, k, s))
    assert torch.autograd.gradcheck(lambda *a: _TiledSoftplusSum.apply(*a, 4), (q, k, s, b))
    row, col = _TiledSoftmaxLSE.apply(q, k, s, 6, 4)
    z = s * q @ k.T
    torch.testing.assert_close(row, torch.logsumexp(z, 1))
    torch.testing.assert_close(col, torch.logsumexp(z[:, :6], 0))


# ---- the three paths: plain dense (one process, pairs, one tile), dense in one tile, tiled ----


def _forbid(monkeypatch, *names: str) -> None:
    """Make these functions of cliptune.train.losses raise: the path under test must not use them."""
    def boom(*args, **kwargs):
        raise AssertionError("this path was not meant to be taken")

    for name in names:
        if name.startswith("_Tiled"):
            monkeypatch.setattr(getattr(losses_mod, name), "apply", boom)
        else:
            monkeypatch.setattr(losses_mod, name, boom)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_plain_dense_path_equals_tiled_and_open_clip(kind: str, monkeypatch) -> None:
    x = _inputs(20, 16, seed=21)
    tiled = _run(LOSSES[kind](tile_size=6), x, kind)
    ref = _run(OpenClipLoss() if kind == "clip" else OpenSigLipLoss(), x, kind)
    _forbid(monkeypatch, "_TiledSoftmaxLSE", "_TiledSoftplusSum", "_dense_softmax_lse", "_dense_softplus_sum",
            "_positive_dots")
    plain = _run(LOSSES[kind](), x, kind)  # B = 20 <= the default tile: the plain path
    _assert_same(plain, tiled)
    _assert_same(plain, ref)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("positives,k", [("group", 0), ("pair", 3), ("group", 3)])
def test_dense_one_tile_equals_tiled(kind: str, positives: str, k: int, monkeypatch) -> None:
    x = _inputs(14, 8, k=k, seed=22)
    kw = {"group_ids": _groups(14, 5, seed=22)} if positives == "group" else {}
    tiled = _run(LOSSES[kind](positives=positives, tile_size=4), x, kind, **kw)
    ref = _run(DENSE[kind], x, kind, **kw)
    _forbid(monkeypatch, "_TiledSoftmaxLSE", "_TiledSoftplusSum")
    dense = _run(LOSSES[kind](positives=positives, tile_size=64), x, kind, **kw)
    _assert_same(dense, tiled)
    _assert_same(dense, ref)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradcheck_plain_path(kind: str) -> None:
    torch.manual_seed(2)
    img, txt = _unit(5, 4, dtype=torch.float64), _unit(5, 4, dtype=torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64)
    bias = torch.tensor(-1.0, dtype=torch.float64)
    loss_fn = LOSSES[kind]()

    def f(img, txt, scale, bias):
        return loss_fn(img, txt, scale, bias if kind == "siglip" else None)

    assert torch.autograd.gradcheck(f, [t.clone().requires_grad_() for t in (img, txt, scale, bias)])


# ---- dtypes, arguments, errors ----


@pytest.mark.parametrize("tile", [5, None])  # tiled; the plain dense path
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_bf16_inputs_give_fp32_loss(kind: str, tile: int | None) -> None:
    x = _inputs(16, 16, k=2 if tile else 0, seed=9)
    x16 = {n: v.bfloat16() if v.is_floating_point() else v for n, v in x.items()}
    loss16, grads16 = _run(LOSSES[kind](tile_size=tile), x16, kind)
    # reference: the same bf16-rounded numbers, computed densely in fp32
    x32 = {n: v.float() if v.is_floating_point() else v for n, v in x16.items()}
    loss32, grads32 = _run(DENSE[kind], x32, kind)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, atol=1e-5, rtol=1e-5)
    for name, g in grads16.items():
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), grads32[name], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("tile", [3, None])
def test_python_float_scale_and_shape_one_scale(tile: int | None) -> None:
    x = _inputs(8, 8, seed=10)
    ref = ClipLoss(tile_size=tile)(x["img"], x["txt"], x["scale"])
    torch.testing.assert_close(ClipLoss(tile_size=tile)(x["img"], x["txt"], float(x["scale"])), ref)
    torch.testing.assert_close(ClipLoss(tile_size=tile)(x["img"], x["txt"], x["scale"].reshape(1)), ref)
    bias = SigLipLoss(tile_size=tile)(x["img"], x["txt"], x["scale"], x["bias"])
    torch.testing.assert_close(SigLipLoss(tile_size=tile)(x["img"], x["txt"], 14.0, x["bias"].reshape(1)), bias)


def test_clear_errors() -> None:
    x = _inputs(6, 4, k=2)
    with pytest.raises(ValueError, match="ClipLoss takes no logit_bias"):
        ClipLoss()(x["img"], x["txt"], x["scale"], x["bias"])
    with pytest.raises(ValueError, match="SigLipLoss needs logit_bias"):
        SigLipLoss()(x["img"], x["txt"], x["scale"])
    with pytest.raises(ValueError, match="loss.positives"):
        ClipLoss(positives="group")(x["img"], x["txt"], x["scale"])
    with pytest.raises(ValueError, match="loss.positives"):
        ClipLoss(positives="triplet")
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        ClipLoss()(x["img"], x["txt"][:5], x["scale"])
    with pytest.raises(ValueError, match="neg_text_features must be"):
        ClipLoss()(x["img"], x["txt"], x["scale"], neg_text_features=x["neg"][:3])
    with pytest.raises(ValueError, match="neg_mask must be"):
        ClipLoss()(x["img"], x["txt"], x["scale"], neg_text_features=x["neg"], neg_mask=x["mask"].long())
    with pytest.raises(ValueError, match="not initialised"):
        ClipLoss(rank=0, world_size=2)(x["img"], x["txt"], x["scale"])


def test_missing_mask_means_all_negatives_valid() -> None:
    x = _inputs(8, 8, k=2, seed=11)
    a = ClipLoss(tile_size=3)(x["img"], x["txt"], x["scale"], neg_text_features=x["neg"])
    b = ClipLoss(tile_size=3)(
        x["img"], x["txt"], x["scale"], neg_text_features=x["neg"],
        neg_mask=torch.ones(8, 2, dtype=torch.bool),
    )
    torch.testing.assert_close(a, b)


# ---- the one-tile dense path across 2 real gloo ranks (tests/test_losses_ddp.py runs the tiled one) ----

_DDP_WORLD, _DDP_B, _DDP_D, _DDP_K = 2, 5, 8, 2


def _ddp_data() -> dict:
    x = _inputs(_DDP_WORLD * _DDP_B, _DDP_D, k=_DDP_K, seed=31)
    x["group"] = _groups(_DDP_WORLD * _DDP_B, 4, seed=31)
    return x


def _ddp_cases():
    return [(kind, positives, negs) for kind in ("clip", "siglip") for positives in ("pair", "group")
            for negs in (False, True)]


def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=_DDP_WORLD)
    try:
        x = _ddp_data()
        sl = slice(rank * _DDP_B, (rank + 1) * _DDP_B)
        local = {n: (v[sl] if v.ndim and v.shape[0] == _DDP_WORLD * _DDP_B else v) for n, v in x.items()}
        out = {}
        for kind, positives, negs in _ddp_cases():
            kw = {"group_ids": local["group"]} if positives == "group" else {}
            if not negs:
                kw["negatives"] = False
            for tile in (64, 3):  # one tile (dense), tiled
                out[(kind, positives, negs, tile)] = _run(LOSSES[kind](positives=positives, tile_size=tile), local,
                                                          kind, **kw)
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_dense_one_tile_path_across_ranks(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=_DDP_WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(_DDP_WORLD)]
    x = _ddp_data()
    for kind, positives, negs in _ddp_cases():
        kw = {"group_ids": x["group"]} if positives == "group" else {}
        if not negs:
            kw["negatives"] = False
        ref_loss, ref_grads = _run(DENSE[kind], x, kind, **kw)  # the global batch in one process
        for r, res in enumerate(ranks):
            _assert_same(res[(kind, positives, negs, 64)], res[(kind, positives, negs, 3)])
        mean = sum(res[(kind, positives, negs, 64)][0] for res in ranks) / _DDP_WORLD
        torch.testing.assert_close(mean, ref_loss, atol=1e-5, rtol=1e-5)
        # a rank's gradient of its own inputs is that of the sum of the ranks' losses (DDP then averages)
        for name in ("img", "txt"):
            got = torch.cat([res[(kind, positives, negs, 64)][1][name] for res in ranks])
            torch.testing.assert_close(got, _DDP_WORLD * ref_grads[name], atol=1e-5, rtol=1e-4,
                                       msg=f"{kind} {positives} negs={negs} {name}")
