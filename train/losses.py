"""Contrastive losses for CLIP fine-tuning: softmax (`ClipLoss`) and sigmoid (`SigLipLoss`).

Both are pure torch, work in one process or under `torch.distributed`, and never hold more than
one [tile_size, tile_size] block of the [B_local, N_global] logit matrix: logits are recomputed in
blocks inside custom autograd functions, so loss memory is O(tile_size^2 + N * D) instead of
O(B * N). When the whole matrix fits in one tile (B_local and N_global <= tile_size, the usual case
per device up to B = 1024 with the default tile), tiling saves nothing and costs a fixed overhead,
so the logits are computed densely with plain autograd instead (same values and gradients; as fast
as open_clip's dense loss or faster at every B, see scripts/bench_loss.py).

    loss_fn = ClipLoss(positives="pair", tile_size=1024)          # or SigLipLoss(...)
    loss = loss_fn(image_features, text_features, logit_scale)    # SigLIP: + logit_bias
    loss.backward()

Semantics (features are L2-normalised, z_ij = logit_scale * img_i . txt_j [+ logit_bias]):

- ClipLoss: symmetric cross-entropy, (mean_i CE(img_i vs all texts) + mean_t CE(txt_t vs all
  images)) / 2. In one process it equals `open_clip.loss.ClipLoss` in value and gradient.
- SigLipLoss: -sum_ij logsigmoid(y_ij * z_ij) / B_local, y = +1 on positives, -1 elsewhere, over
  the local images against all (gathered) texts. Equals `open_clip.loss.SigLipLoss` in one process.
- Positives: `positives="pair"` makes only sample i's own caption positive for image i.
  `positives="group"` takes `group_ids` [B] (long) and makes every pair of samples with the same
  id positive for each other: the softmax target of a row is uniform over its positives
  (loss_i = -mean_{j in P_i} log p_ij); the sigmoid label is +1 for every same-group pair. Pair
  mode is group mode with group id = global sample index.
- Hard negatives (NegCLIP style): `neg_text_features` [B, K, D] with `neg_mask` [B, K] (True = a
  real negative; None = all real). The valid negatives of every rank are appended as extra text
  columns that are positive for no image. They enter only the image->text direction (the softmax
  denominator of each image, or extra y = -1 terms of the sigmoid loss); the text->image direction
  and its denominators are unchanged, since a negative caption has no image of its own.
- Distributed: every rank gathers the features of all ranks with gradient (backward sums the
  gradient over ranks) and computes its own rows against all gathered columns (open_clip's
  local_loss=True, gather_with_grad=True). The mean over ranks of the returned loss is the loss of
  the global batch, and the DDP-averaged gradient is the gradient of that global loss. Every rank
  must have the same local batch size (and K); a mismatch raises a ValueError on all ranks (drop
  the last incomplete batch, or give every rank a fixed number of samples per step).
- Precision: bf16 / fp16 inputs are computed in fp32 and the loss is fp32 (fp64 stays fp64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cliptune import runtime
from cliptune.domains import POSITIVES  # option names only: no import behind it

__all__ = ["ClipLoss", "SigLipLoss", "DEFAULT_TILE_SIZE"]

Positives = Literal["pair", "group"]

# Square logit blocks of this side. On CPU (D=256) 1024 is as fast as larger tiles and keeps
# per-block memory at ~4 MB fp32; see scripts/bench_loss.py.
DEFAULT_TILE_SIZE = 1024


def _blocks(n: int, tile: int):
    for start in range(0, n, tile):
        yield start, min(start + tile, n)


def _lse_(z: Tensor, dim: int) -> Tensor:
    """logsumexp of z along dim, overwriting z (one block buffer instead of torch's several)."""
    m = z.amax(dim=dim, keepdim=True)
    return z.sub_(m).exp_().sum(dim=dim).log_().add_(m.squeeze(dim))


class _TiledSoftmaxLSE(torch.autograd.Function):
    """row_lse[i] = logsumexp_j z_ij over all m columns; col_lse[j] = logsumexp_i z_ij over the
    n rows, for the first n_col columns only; z = scale * q @ k.T, one block at a time.

    The caller casts q, k, scale to the compute dtype; scale is a 0-dim tensor."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: Tensor, n_col: int, tile: int):
        n, m = q.shape[0], k.shape[0]
        row_lse = q.new_empty(n)
        col_lse = q.new_full((n_col,), float("-inf"))
        for r0, r1 in _blocks(n, tile):
            qs = q[r0:r1] * scale  # [t, D]
            acc = q.new_full((r1 - r0,), float("-inf"))
            for c0, c1 in _blocks(m, tile):
                z = qs @ k[c0:c1].T  # [t, t']
                w = min(n_col, c1) - c0
                if w > 0:
                    col_lse[c0 : c0 + w] = torch.logaddexp(
                        col_lse[c0 : c0 + w], _lse_(z[:, :w].clone(), dim=0)
                    )
                # streaming LSE: combine this block's row LSE with the running one
                acc = torch.logaddexp(acc, _lse_(z, dim=1))
            row_lse[r0:r1] = acc
        ctx.save_for_backward(q, k, scale, row_lse, col_lse)
        ctx.tile, ctx.n_col = tile, n_col
        ctx.set_materialize_grads(False)  # a None grad means that output was unused
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, g_row: Tensor | None, g_col: Tensor | None):
        q, k, scale, row_lse, col_lse = ctx.saved_tensors
        tile, n_col = ctx.tile, ctx.n_col
        n, m = q.shape[0], k.shape[0]
        gq = torch.zeros_like(q)  # G @ k, G = dLoss/dz (unscaled by `scale`)
        gk = torch.zeros_like(k)  # G.T @ q
        if g_row is None and g_col is None:
            return None, None, None, None, None
        for r0, r1 in _blocks(n, tile):
            q_r = q[r0:r1]
            qs = q_r * scale
            for c0, c1 in _blocks(m, tile):
                z = qs @ k[c0:c1].T  # recomputed block [t, t']
                w = min(n_col, c1) - c0
                g_c = None
                if g_col is not None and w > 0:
                    # column softmax of this block times the column grads
                    g_c = (z[:, :w] - col_lse[c0 : c0 + w]).exp_().mul_(g_col[c0 : c0 + w])
                if g_row is not None:
                    g = z.sub_(row_lse[r0:r1, None]).exp_().mul_(g_row[r0:r1, None])
                else:
                    g = z.zero_()
                if g_c is not None:
                    g[:, :w] += g_c
                gq[r0:r1].addmm_(g, k[c0:c1])
                gk[c0:c1].addmm_(g.T, q_r)
        # dz/dscale = q.k, so sum_ij G_ij q_i.k_j = sum(q * (G @ k)): no extra block pass
        g_scale = (q * gq).sum() if ctx.needs_input_grad[2] else None
        return gq.mul_(scale), gk.mul_(scale), g_scale, None, None


def _dense_softmax_lse(q: Tensor, k: Tensor, scale: Tensor, n_col: int) -> tuple[Tensor, Tensor]:
    """``_TiledSoftmaxLSE`` in one block with plain autograd (one tile: nothing to save by tiling)."""
    z = (q * scale) @ k.T  # [n, m]; scaling q keeps the scale's gradient a [n, D] product
    return torch.logsumexp(z, dim=1), torch.logsumexp(z[:, :n_col], dim=0)


def _dense_softplus_sum(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """``_TiledSoftplusSum`` in one block with plain autograd."""
    return F.softplus(torch.addmm(bias, q * scale, k.T)).sum(dim=1)


class _TiledSoftplusSum(torch.autograd.Function):
    """out[i] = sum_j softplus(z_ij) with z = scale * q @ k.T + bias, one block at a time."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, tile: int):
        n, m = q.shape[0], k.shape[0]
        out = q.new_zeros(n)
        for r0, r1 in _blocks(n, tile):
            qs = q[r0:r1] * scale
            for c0, c1 in _blocks(m, tile):
                z = torch.addmm(bias, qs, k[c0:c1].T)
                out[r0:r1] += F.softplus(z).sum(dim=1)
        ctx.save_for_backward(q, k, scale, bias)
        ctx.tile = tile
        return out

    @staticmethod
    def backward(ctx, g_row: Tensor):
        q, k, scale, bias = ctx.saved_tensors
        tile = ctx.tile
        n, m = q.shape[0], k.shape[0]
        gq = torch.zeros_like(q)
        gk = torch.zeros_like(k)
        g_bias = torch.zeros_like(bias)
        for r0, r1 in _blocks(n, tile):
            q_r = q[r0:r1]
            qs = q_r * scale
            for c0, c1 in _blocks(m, tile):
                g = torch.addmm(bias, qs, k[c0:c1].T).sigmoid_().mul_(g_row[r0:r1, None])
                g_bias += g.sum()
                gq[r0:r1].addmm_(g, k[c0:c1])
                gk[c0:c1].addmm_(g.T, q_r)
        g_scale = (q * gq).sum() if ctx.needs_input_grad[2] else None
        return gq.mul_(scale), gk.mul_(scale), g_scale, g_bias, None


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate x [n, ...] from all ranks (rank order); backward sums the gradient over ranks.

    Same semantics as torch.distributed.nn.functional.all_gather (deprecated, warns every call)."""

    @staticmethod
    def forward(ctx, x: Tensor):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's features
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def _all_gather_no_grad(x: Tensor) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _positive_dots(q: Tensor, k: Tensor, gq: Tensor, gk: Tensor) -> tuple[Tensor, Tensor]:
    """dots[i] = sum_{j: gk_j == gq_i} q_i . k_j and counts[i] = |{j: gk_j == gq_i}|.

    O((n + m) D) via per-group sums of k; fixed-size ops only (no host sync on GPU)."""
    m = k.shape[0]
    gk_sorted, order = torch.sort(gk)
    seg = torch.zeros_like(gk_sorted)  # segment (group) index of each sorted column
    seg[1:] = (gk_sorted[1:] != gk_sorted[:-1]).cumsum(0)
    k_sum = k.new_zeros(m, k.shape[1]).index_add(0, seg, k[order])  # [m, D], rows >= #groups unused
    cnt = torch.zeros(m, dtype=torch.long, device=k.device).index_add(0, seg, torch.ones_like(seg))
    pos = torch.searchsorted(gk_sorted, gq).clamp_(max=m - 1)
    hit = gk_sorted[pos] == gq  # rows whose group has no column get no positives
    s = seg[pos]
    dots = (q * k_sum[s]).sum(dim=1) * hit
    counts = cnt[s] * hit
    return dots, counts


def _pair_dots(q: Tensor, k_all: Tensor, rank: int) -> Tensor:
    """``_positive_dots`` in pair mode: local row i's one positive is global column rank * n + i."""
    n = q.shape[0]
    return (q * k_all[rank * n : (rank + 1) * n]).sum(dim=1)


@dataclass
class _Gathered:
    rank: int
    world: int
    n_local: int
    img: Tensor  # [B, D] local, compute dtype
    txt: Tensor  # [B, D]
    img_all: Tensor | None  # [N, D] all ranks (None when the loss does not need it)
    txt_all: Tensor  # [N, D]
    neg_all: Tensor | None  # [M, D] valid hard negatives of all ranks
    gid: Tensor  # [B] group id of the local samples
    gid_all: Tensor  # [N]


class _ContrastiveLoss(nn.Module):
    """Argument checks, rank discovery and the gathers shared by both losses."""

    needs_all_images: bool = True

    def __init__(
        self,
        positives: Positives = "pair",
        tile_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if positives not in POSITIVES:
            raise ValueError(f"{name}: loss.positives must be 'pair' or 'group', got {positives!r}")
        tile_size = DEFAULT_TILE_SIZE if tile_size is None else tile_size
        if int(tile_size) < 1:
            raise ValueError(f"{name}: loss.tile_size must be a positive int, got {tile_size!r}")
        self.positives = positives
        self.tile_size = int(tile_size)
        self.rank = rank
        self.world_size = world_size

    def extra_repr(self) -> str:
        return (
            f"positives={self.positives!r}, tile_size={self.tile_size}, "
            f"rank={self.rank}, world_size={self.world_size}"
        )

    def _one_tile(self, n: int, m: int) -> bool:
        """Whether the [n, m] logits fit in one tile: then they are computed densely (see the module doc)."""
        return n <= self.tile_size and m <= self.tile_size

    def _plain_pair(self, img: Tensor, txt: Tensor, neg: Tensor | None, neg_mask: Tensor | None) -> tuple | None:
        """``(img, txt)`` in the compute dtype when the plain dense loss applies (one process, pair positives,
        no hard negatives, one tile: open_clip's own case, with less Python per call), else None."""
        if (self.positives != "pair" or neg is not None or neg_mask is not None or img.ndim != 2
                or img.shape != txt.shape or img.shape[0] > self.tile_size or self._rank_world()[1] != 1):
            return None
        cdt = torch.promote_types(torch.promote_types(img.dtype, txt.dtype), torch.float32)
        return img.to(cdt), txt.to(cdt)

    def _rank_world(self) -> tuple[int, int]:
        name = type(self).__name__
        # None = the process group's (0 / 1 without one: the gathers need a group, not just a launcher)
        world = self.world_size if self.world_size is not None else runtime.world_size(launcher=False)
        rank = self.rank if self.rank is not None else runtime.rank(launcher=False)
        if world > 1:
            if not runtime.is_distributed():
                raise ValueError(
                    f"{name}: world_size={world} but torch.distributed is not initialised; "
                    "initialise the process group first, or leave rank/world_size as None"
                )
            group = (runtime.rank(), runtime.world_size())
            if (rank, world) != group:
                raise ValueError(
                    f"{name}: rank/world_size ({rank}, {world}) disagree with torch.distributed "
                    f"{group}; leave them as None"
                )
        return rank, world

    def _gather(
        self,
        image_features: Tensor,
        text_features: Tensor,
        group_ids: Tensor | None,
        neg_text_features: Tensor | None,
        neg_mask: Tensor | None,
    ) -> _Gathered:
        name = type(self).__name__
        if image_features.ndim != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                f"{name}: image_features and text_features must both be [B, D], got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        b, d = image_features.shape
        device = image_features.device
        if self.positives == "group":
            if group_ids is None:
                raise ValueError(
                    f"{name}: loss.positives='group' needs group_ids [B] (the batch's 'group'); "
                    "pass them, or set loss.positives=pair"
                )
            if group_ids.shape != (b,) or group_ids.is_floating_point():
                raise ValueError(
                    f"{name}: group_ids must be an integer tensor of shape [{b}], got "
                    f"{group_ids.dtype} {tuple(group_ids.shape)}"
                )
        k = -1
        if neg_text_features is not None:
            if neg_text_features.ndim != 3 or neg_text_features.shape[0] != b or (
                neg_text_features.shape[2] != d
            ):
                raise ValueError(
                    f"{name}: neg_text_features must be [B={b}, K, D={d}], got "
                    f"{tuple(neg_text_features.shape)}"
                )
            k = neg_text_features.shape[1]
            if neg_mask is None:
                neg_mask = torch.ones(b, k, dtype=torch.bool, device=device)
            if neg_mask.shape != (b, k) or neg_mask.dtype != torch.bool:
                raise ValueError(
                    f"{name}: neg_mask must be a bool tensor [B={b}, K={k}], got "
                    f"{neg_mask.dtype} {tuple(neg_mask.shape)}"
                )
        elif neg_mask is not None:
            raise ValueError(f"{name}: neg_mask given without neg_text_features")

        rank, world = self._rank_world()
        cdt = torch.promote_types(
            torch.promote_types(image_features.dtype, text_features.dtype), torch.float32
        )
        local_gid = torch.arange(b, device=device) + b * rank
        # group_ids is checked above when positives == "group"
        gid = local_gid if self.positives == "pair" or group_ids is None else group_ids.to(device, torch.long)
        neg_all = None
        img_all: Tensor | None
        if world == 1:
            img_all, txt_all, gid_all = image_features, text_features, gid
            if neg_text_features is not None and neg_mask is not None:  # k >= 0
                neg_all = neg_text_features[neg_mask]
        else:
            # Collectives need equal shapes on every rank; check cheaply so a mismatch is an
            # error on all ranks instead of a hang or garbage.
            meta = torch.tensor([b, d, k], device=device)
            sizes = _all_gather_no_grad(meta[None]).tolist()
            if any(s != sizes[0] for s in sizes):
                raise ValueError(
                    f"{name}: ranks disagree on [local batch, dim, hard negatives K] "
                    f"({sizes}); the distributed loss needs the same local batch size on every "
                    "rank: drop the last incomplete batch or use a fixed number of samples per "
                    "rank and step, and the same max_negatives everywhere"
                )
            img_all = _AllGatherWithGrad.apply(image_features) if self.needs_all_images else None
            txt_all = _AllGatherWithGrad.apply(text_features)
            gid_all = (
                torch.arange(b * world, device=device)
                if self.positives == "pair"
                else _all_gather_no_grad(gid)
            )
            if neg_text_features is not None and neg_mask is not None:  # k >= 0
                negs = _AllGatherWithGrad.apply(neg_text_features.reshape(b * k, d))
                mask = _all_gather_no_grad(neg_mask.reshape(b * k))
                neg_all = negs[mask]
        return _Gathered(
            rank=rank,
            world=world,
            n_local=b,
            img=image_features.to(cdt),
            txt=text_features.to(cdt),
            img_all=None if img_all is None else img_all.to(cdt),
            txt_all=txt_all.to(cdt),
            neg_all=None if neg_all is None else neg_all.to(cdt),
            gid=gid,
            gid_all=gid_all,
        )

    @staticmethod
    def _scalar(x: Tensor | float, dtype: torch.dtype, device: torch.device) -> Tensor:
        if not torch.is_tensor(x):
            x = torch.tensor(float(x))
        if x.numel() != 1:
            raise ValueError(f"logit_scale / logit_bias must be scalars, got {tuple(x.shape)}")
        return x.to(device=device, dtype=dtype).reshape(())


class ClipLoss(_ContrastiveLoss):
    """Symmetric softmax (InfoNCE) loss of CLIP, tiled; see the module docstring.

    forward(image_features [B, D], text_features [B, D], logit_scale (exp'd, scalar),
    logit_bias=None, group_ids [B] | None, neg_text_features [B, K, D] | None,
    neg_mask [B, K] | None) -> scalar loss of this rank's rows."""

    needs_bias = False  # the trainer freezes a model's logit_bias under this loss (DDP needs no unused parameter)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | None = None,
        group_ids: Tensor | None = None,
        neg_text_features: Tensor | None = None,
        neg_mask: Tensor | None = None,
    ) -> Tensor:
        if logit_bias is not None:
            raise ValueError(
                "ClipLoss takes no logit_bias (a bias cancels in the softmax and, left unused, "
                "breaks DDP gradient reduction): use SigLipLoss for a model with logit_bias, or "
                "build the model without one"
            )
        with torch.autocast(image_features.device.type, enabled=False):
            plain = self._plain_pair(image_features, text_features, neg_text_features, neg_mask)
            if plain is not None:
                img, txt = plain
                z = (img * self._scalar(logit_scale, img.dtype, img.device)) @ txt.T  # [B, B]
                # log-softmax is one fused kernel each way (logsumexp is several): the diagonal holds the positives
                return -(F.log_softmax(z, dim=1).diagonal().mean() + F.log_softmax(z, dim=0).diagonal().mean()) / 2
            g = self._gather(image_features, text_features, group_ids, neg_text_features, neg_mask)
            scale = self._scalar(logit_scale, g.img.dtype, g.img.device)
            n_all = g.txt_all.shape[0]
            cols = g.txt_all if g.neg_all is None else torch.cat([g.txt_all, g.neg_all])
            # rows: local images vs all texts (+ negatives); columns: partial LSE over local rows
            if self._one_tile(g.n_local, cols.shape[0]):
                row_lse, col_lse = _dense_softmax_lse(g.img, cols, scale, n_all)
            else:
                row_lse, col_lse = _TiledSoftmaxLSE.apply(g.img, cols, scale, n_all, self.tile_size)

            if self.positives == "pair":  # one positive per row: the diagonal of the global batch
                dots_i = _pair_dots(g.img, g.txt_all, g.rank)
                loss_i2t = (row_lse - scale * dots_i).mean()
            else:
                dots_i, cnt_i = _positive_dots(g.img, g.txt_all, g.gid, g.gid_all)
                loss_i2t = (row_lse - scale * dots_i / cnt_i.clamp(min=1)).mean()

            if g.world > 1:
                # a text's softmax runs over the images of all ranks: combine partial LSEs
                parts = _AllGatherWithGrad.apply(col_lse[None])  # [W, N]
                col_lse = torch.logsumexp(parts, dim=0)
            b = g.n_local
            col_lse = col_lse[g.rank * b : (g.rank + 1) * b]
            if self.positives == "pair":  # text t's positive is image t: the same dot products
                loss_t2i = (col_lse - scale * dots_i).mean()
            else:
                assert g.img_all is not None  # ClipLoss.needs_all_images
                dots_t, cnt_t = _positive_dots(g.txt, g.img_all, g.gid, g.gid_all)
                loss_t2i = (col_lse - scale * dots_t / cnt_t.clamp(min=1)).mean()
            return (loss_i2t + loss_t2i) / 2


class SigLipLoss(_ContrastiveLoss):
    """Sigmoid loss of SigLIP, tiled; see the module docstring.

    forward(image_features [B, D], text_features [B, D], logit_scale (exp'd, scalar),
    logit_bias (scalar, required), group_ids, neg_text_features, neg_mask) -> scalar loss of
    this rank's rows (sum over its B images x all texts, divided by B)."""

    needs_all_images = False  # one direction only: local images vs all texts
    needs_bias = True  # the trainer passes the model's logit_bias (and refuses a model without one)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        group_ids: Tensor | None = None,
        neg_text_features: Tensor | None = None,
        neg_mask: Tensor | None = None,
    ) -> Tensor:
        if logit_bias is None:
            raise ValueError(
                "SigLipLoss needs logit_bias (the model's learnt bias, e.g. "
                "model.logit_bias); build the model with a logit bias (init about -10, or "
                "-log(batch) for small batches) or use ClipLoss"
            )
        with torch.autocast(image_features.device.type, enabled=False):
            plain = self._plain_pair(image_features, text_features, neg_text_features, neg_mask)
            if plain is not None:
                img, txt = plain
                scale = self._scalar(logit_scale, img.dtype, img.device)
                z = torch.addmm(self._scalar(logit_bias, img.dtype, img.device), img * scale, txt.T)  # [B, B]
                # -logsigmoid(y z) = softplus(z) - [y = +1] z, positives on the diagonal
                return (F.softplus(z).sum() - z.diagonal().sum()) / z.shape[0]
            g = self._gather(image_features, text_features, group_ids, neg_text_features, neg_mask)
            scale = self._scalar(logit_scale, g.img.dtype, g.img.device)
            bias = self._scalar(logit_bias, g.img.dtype, g.img.device)
            cols = g.txt_all if g.neg_all is None else torch.cat([g.txt_all, g.neg_all])
            # -logsigmoid(y z) = softplus(z) - [y = +1] z: a label-free tiled sum over every
            # pair plus a linear term over the positives only
            if self._one_tile(g.n_local, cols.shape[0]):
                softplus_sum = _dense_softplus_sum(g.img, cols, scale, bias)
            else:
                softplus_sum = _TiledSoftplusSum.apply(g.img, cols, scale, bias, self.tile_size)
            if self.positives == "pair":
                pos_logits = scale * _pair_dots(g.img, g.txt_all, g.rank) + bias
            else:
                dots, cnt = _positive_dots(g.img, g.txt_all, g.gid, g.gid_all)
                pos_logits = scale * dots + bias * cnt
            return (softplus_sum - pos_logits).sum() / g.n_local
