"""Distributed losses with 2 real gloo processes: DDP-averaged gradients == global-batch gradients.

One spawn runs every case (process start-up dominates the cost); each test checks one case.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from cliptune.train.losses import ClipLoss, SigLipLoss

pytestmark = pytest.mark.ddp

WORLD = 2
B_LOCAL, D_IN, D, K = 6, 8, 16, 2
CASES = [
    (kind, positives, negatives)
    for kind in ("clip", "siglip")
    for positives in ("pair", "group")
    for negatives in (False, True)
]


def _case_id(case: tuple) -> str:
    kind, positives, negatives = case
    return f"{kind}-{positives}" + ("-negs" if negatives else "")


class Tower(nn.Module):
    """Two linear 'encoders' and the temperature (+ bias for SigLIP): parameters DDP reduces."""

    def __init__(self, with_bias: bool) -> None:
        super().__init__()
        self.img = nn.Linear(D_IN, D)
        self.txt = nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-3.0)) if with_bias else None

    def forward(self, x_img, x_txt, x_neg=None):
        img = F.normalize(self.img(x_img), dim=-1)
        txt = F.normalize(self.txt(x_txt), dim=-1)
        neg = None if x_neg is None else F.normalize(self.txt(x_neg), dim=-1)
        return img, txt, neg, self.logit_scale.exp(), self.logit_bias


def _data() -> dict:
    g = torch.Generator().manual_seed(0)
    n = WORLD * B_LOCAL
    mask = torch.rand(n, K, generator=g) < 0.5
    mask[:B_LOCAL] = True  # rank 0 has more valid negatives than rank 1
    return {
        "x_img": torch.randn(n, D_IN, generator=g),
        "x_txt": torch.randn(n, D_IN, generator=g),
        "x_neg": torch.randn(n, K, D_IN, generator=g),
        "neg_mask": mask,
        # groups that span both ranks, with hash-like int64 ids
        "group": torch.tensor([5, 1, 5, 2, 9, 1, 2, 5, 7, 9, 1, 3]) * 1_000_000_007,
        "towers": {
            "clip": (torch.manual_seed(1), Tower(False).state_dict())[1],
            "siglip": (torch.manual_seed(2), Tower(True).state_dict())[1],
        },
    }


def _loss_and_grads(model: nn.Module, data: dict, case: tuple, sl: slice) -> tuple[float, dict]:
    kind, positives, negatives = case
    loss_fn = (ClipLoss if kind == "clip" else SigLipLoss)(positives=positives, tile_size=4)
    img, txt, neg, scale, bias = model(
        data["x_img"][sl], data["x_txt"][sl], data["x_neg"][sl] if negatives else None
    )
    loss = loss_fn(
        img, txt, scale, bias,
        group_ids=data["group"][sl] if positives == "group" else None,
        neg_text_features=neg, neg_mask=data["neg_mask"][sl] if negatives else None,
    )
    model.zero_grad()
    loss.backward()
    mod = getattr(model, "module", model)
    return loss.item(), {n: p.grad.clone() for n, p in mod.named_parameters()}


def _worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        data = torch.load(Path(tmp) / "data.pt")
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        results = {}
        for case in CASES:
            tower = Tower(with_bias=case[0] == "siglip")
            tower.load_state_dict(data["towers"][case[0]])
            model = nn.parallel.DistributedDataParallel(tower)
            results[case] = _loss_and_grads(model, data, case, sl)
        # unequal local batches must fail loudly on every rank, not hang
        n = B_LOCAL - rank
        feats = F.normalize(torch.randn(n, D), dim=-1)
        try:
            ClipLoss()(feats, feats, torch.tensor(10.0))
            results["unequal"] = None
        except ValueError as err:
            results["unequal"] = str(err)
        torch.save(results, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> tuple[dict, list[dict]]:
    tmp = tmp_path_factory.mktemp("ddp_losses")
    data = _data()
    torch.save(data, tmp / "data.pt")
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    return data, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_ddp_matches_global_batch(ddp_results, case: tuple) -> None:
    data, ranks = ddp_results
    tower = Tower(with_bias=case[0] == "siglip")
    tower.load_state_dict(data["towers"][case[0]])
    ref_loss, ref_grads = _loss_and_grads(tower, data, case, slice(None))

    # the mean of the per-rank losses is the global loss
    mean_loss = sum(r[case][0] for r in ranks) / WORLD
    assert mean_loss == pytest.approx(ref_loss, abs=1e-5, rel=1e-5)
    # DDP-averaged parameter gradients equal the single-process gradients, on every rank
    for r in ranks:
        for name, g in ref_grads.items():
            torch.testing.assert_close(r[case][1][name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_ddp_reference_is_open_clip_dense(ddp_results, kind: str) -> None:
    # independent check of the pair-mode reference: open_clip's dense loss on the global batch
    data, ranks = ddp_results
    tower = Tower(with_bias=kind == "siglip")
    tower.load_state_dict(data["towers"][kind])
    img, txt, _, scale, bias = tower(data["x_img"], data["x_txt"])
    ref = OpenClipLoss()(img, txt, scale) if kind == "clip" else OpenSigLipLoss()(img, txt, scale, bias)
    ref.backward()
    case = (kind, "pair", False)
    assert sum(r[case][0] for r in ranks) / WORLD == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    for name, p in tower.named_parameters():
        torch.testing.assert_close(ranks[0][case][1][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_ddp_unequal_local_batches_raise(ddp_results) -> None:
    _, ranks = ddp_results
    for r in ranks:
        assert r["unequal"] is not None and "same local batch size" in r["unequal"]
