"""Exact image<->text Recall@K in chunks (pure torch).

    from cliptune.eval.retrieval import retrieval_metrics, chance_recall
    m = retrieval_metrics(img_emb, txt_emb, text_to_image)            # {"t2i_R@1": ..., "mean_R": ...}
    m, hits = retrieval_metrics(img_emb, txt_emb, text_to_image, return_per_query=True)

Conventions (shared with CLIP_benchmark, stricter on ties):
- t2i: each caption is a query and must find the image it belongs to; averaged over captions.
- i2t: each image is a query and scores a hit if ANY of its captions is in the top k; averaged
  over images that have at least one caption (images without a caption are left out).
- Ties count against the query: rank = 1 + number of wrong items scoring >= the (best) correct
  item. open_clip's older argsort-based metric broke ties arbitrarily, which inflates recall for
  collapsed embeddings (a constant model would score R@1 = 1 on some orderings).
- Similarities are computed in fp32 on the embeddings' device, one chunk of queries at a time:
  memory O(chunk_size x N), never the full N_txt x N_img matrix.
- Non-finite embeddings raise: a NaN compares false with everything, so every query would rank
  first and a diverged model would score perfect recall.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence, overload

import torch
import torch.nn.functional as F

__all__ = ["retrieval_metrics", "chance_recall", "ranks_t2i", "ranks_i2t", "check_finite", "crosslingual_consistency",
           "crosslingual_chance", "first_caption", "top1_images"]


def check_finite(name: str, image: torch.Tensor, text: torch.Tensor, text_what: str = "text embeddings") -> None:
    """Raise ``ValueError`` if ``image`` [N_img, D] or ``text`` [N_txt, D] holds a NaN or inf.

    ``name`` labels the set in the message (``"val set 'domain'"``); ``text_what`` says what the
    text rows are. One ``isfinite().all()`` per tensor; rows are counted only on failure.
    """
    ok_img, ok_txt = bool(torch.isfinite(image).all()), bool(torch.isfinite(text).all())
    if ok_img and ok_txt:
        return

    def bad_rows(x: torch.Tensor) -> int:
        return int((~torch.isfinite(x)).any(1).sum())

    raise ValueError(
        f"{name}: {0 if ok_img else bad_rows(image)} of {image.shape[0]} image embeddings and "
        f"{0 if ok_txt else bad_rows(text)} of {text.shape[0]} {text_what} are not finite (NaN/inf); "
        "the model has diverged or its input is broken — refusing to rank them")


def _prepare(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = x.float()  # fp16/bf16 scores would create spurious ties
    if normalize:
        norms = x.norm(dim=-1)
        # Already unit-norm embeddings are left bit-exact (the usual case: encode_*(normalize=True)).
        if norms.numel() and not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            x = F.normalize(x, dim=-1)
    return x


def _check(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, D]; got image {tuple(image_emb.shape)}, "
                         f"text {tuple(text_emb.shape)}")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding widths differ: image D={image_emb.shape[1]}, text D={text_emb.shape[1]}")
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:
        raise ValueError(f"empty evaluation set: {image_emb.shape[0]} images, {text_emb.shape[0]} captions")
    if text_to_image.shape != (text_emb.shape[0],):
        raise ValueError(f"text_to_image must have shape [N_txt]=[{text_emb.shape[0]}], "
                         f"got {tuple(text_to_image.shape)}")
    lo, hi = int(text_to_image.min()), int(text_to_image.max())
    if lo < 0 or hi >= image_emb.shape[0]:
        raise ValueError(f"text_to_image holds image indices in [{lo}, {hi}] but there are only "
                         f"{image_emb.shape[0]} images")


@torch.no_grad()
def ranks_t2i(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
              chunk_size: int = 4096, *, name: str = "embeddings") -> torch.Tensor:
    """1-based rank of each caption's image among all images (ties against the caption). [N_txt] long.

    Inputs are used as given (no normalisation, no dtype change): see `retrieval_metrics`.
    Non-finite inputs raise `ValueError` naming ``name`` (see `check_finite`).
    """
    check_finite(name, image_emb, text_emb)
    n_txt = text_emb.shape[0]
    ranks = torch.empty(n_txt, dtype=torch.long, device=text_emb.device)
    for s in range(0, n_txt, chunk_size):
        e = min(s + chunk_size, n_txt)
        scores = text_emb[s:e] @ image_emb.T  # [c, N_img]
        # Read the positive score from the same matrix so the >= comparison is exact.
        pos = scores.gather(1, text_to_image[s:e, None])  # [c, 1]
        # Counts the correct image itself once (it is >= itself): that is the "1 +".
        ranks[s:e] = (scores >= pos).sum(1)
    return ranks


@torch.no_grad()
def ranks_i2t(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
              chunk_size: int = 4096, *, name: str = "embeddings") -> torch.Tensor:
    """1-based rank of each image's best-ranked caption among all captions. [N_img] long.

    Wrong items are captions of other images; ties count against the image. Images without a
    caption get rank 0 (callers drop them). Non-finite inputs raise, as in `ranks_t2i`.
    """
    check_finite(name, image_emb, text_emb)
    n_img = image_emb.shape[0]
    device = image_emb.device
    # Captions sorted by owner: the positives of a chunk of images are one contiguous slice.
    order = torch.argsort(text_to_image, stable=True)
    owner_sorted = text_to_image[order]
    bounds = torch.searchsorted(owner_sorted, torch.arange(n_img + 1, device=device))
    ranks = torch.zeros(n_img, dtype=torch.long, device=device)
    for s in range(0, n_img, chunk_size):
        e = min(s + chunk_size, n_img)
        c = e - s
        scores = image_emb[s:e] @ text_emb.T  # [c, N_txt]
        cap = order[bounds[s]:bounds[e]]  # captions of images s..e-1
        if cap.numel() == 0:
            continue
        row = text_to_image[cap] - s  # [P] row of each positive pair in this chunk
        pos = scores[row, cap]  # [P] positive scores, read from the same matrix
        best = torch.full((c,), -math.inf, device=device).scatter_reduce(0, row, pos, reduce="amax")
        n_ge = (scores >= best[:, None]).sum(1)  # wrong + correct captions >= best
        n_pos_ge = torch.zeros(c, dtype=torch.long, device=device).scatter_add(
            0, row, (pos >= best[row]).long())
        has = torch.zeros(c, dtype=torch.bool, device=device)
        has[row] = True
        ranks[s:e] = torch.where(has, 1 + n_ge - n_pos_ge, 0)
    return ranks


def _median(x: torch.Tensor) -> float:
    # The usual median (mean of the two middle values for even n); open_clip floors it.
    v = x.sort().values
    n = v.numel()
    return float((v[(n - 1) // 2] + v[n // 2]).double() / 2)


@torch.no_grad()
@overload
def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = ...,
    chunk_size: int = ..., normalize: bool = ...,
    return_per_query: Literal[False] = ..., *, name: str = ...,
) -> dict[str, float]: ...


@overload
def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = ...,
    chunk_size: int = ..., normalize: bool = ...,
    *, return_per_query: Literal[True], name: str = ...,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]: ...


@overload
def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = ...,
    chunk_size: int = ..., normalize: bool = ...,
    return_per_query: bool = ..., *, name: str = ...,
) -> dict[str, float] | tuple[dict[str, float], dict[str, torch.Tensor]]: ...


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 4096,
    normalize: bool = True,
    return_per_query: bool = False,
    *,
    name: str = "embeddings",
) -> dict[str, float] | tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Exact Recall@K both ways, with ranks, for several captions per image.

    Args:
        image_emb: [N_img, D]; text_emb: [N_txt, D]. Cast to fp32; L2-normalised unless already
            unit-norm (pass ``normalize=False`` to score raw dot products).
        text_to_image: [N_txt] long, index of the image each caption belongs to.
        ks: the K of Recall@K.
        chunk_size: queries scored at once (memory ~12 bytes x chunk_size x N: scores, comparison masks).
        return_per_query: also return per-query tensors (on CPU) for paired tests.
        name: the set, as error messages name it (``"val set 'domain'"``). A NaN or inf in either
            embedding matrix raises ``ValueError`` with the number of non-finite rows of each.

    Returns:
        ``metrics``: ``t2i_R@k`` (over captions), ``i2t_R@k`` (over images that have at least one
        caption; images with no caption are excluded), ``mean_R`` (mean of every R@k of both
        directions), ``{t2i,i2t}_{median,mean}_rank`` (1-based rank of the best correct item).
        With ``return_per_query``: ``(metrics, per_query)`` where per_query holds bool hit vectors
        ``t2i_R@k`` [N_txt] and ``i2t_R@k`` [N_img_with_caption], long ``t2i_rank`` / ``i2t_rank``,
        and ``i2t_image_index`` (which images the i2t rows are).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    device = image_emb.device
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long).to(device)
    text_emb = text_emb.to(device)
    _check(image_emb, text_emb, text_to_image)
    check_finite(name, image_emb, text_emb)
    img, txt = _prepare(image_emb, normalize), _prepare(text_emb, normalize)

    r_t2i = ranks_t2i(img, txt, text_to_image, chunk_size, name=name)
    r_i2t_all = ranks_i2t(img, txt, text_to_image, chunk_size, name=name)
    has_caption = r_i2t_all > 0
    r_i2t = r_i2t_all[has_caption]

    metrics: dict[str, float] = {}
    per_query: dict[str, torch.Tensor] = {}
    for name, r in (("t2i", r_t2i), ("i2t", r_i2t)):
        for k in ks:
            hit = r <= k
            metrics[f"{name}_R@{k}"] = hit.double().mean().item()
            per_query[f"{name}_R@{k}"] = hit.cpu()
    metrics["mean_R"] = sum(metrics[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in ks) / (2 * len(ks))
    for name, r in (("t2i", r_t2i), ("i2t", r_i2t)):
        metrics[f"{name}_median_rank"] = _median(r)
        metrics[f"{name}_mean_rank"] = r.double().mean().item()
    if not return_per_query:
        return metrics
    per_query["t2i_rank"] = r_t2i.cpu()
    per_query["i2t_rank"] = r_i2t.cpu()
    per_query["i2t_image_index"] = has_caption.nonzero().squeeze(1).cpu()
    return metrics, per_query


def chance_recall(n_img: int, text_to_image: torch.Tensor | Sequence[int],
                  ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Expected Recall@K of a uniformly random ranking (same keys as `retrieval_metrics`).

    t2i: k / N_img. i2t: for an image with c captions among N_txt, the chance that a random top k
    misses all of them is C(N_txt - c, k) / C(N_txt, k); averaged over images with >= 1 caption.
    """
    owner = torch.as_tensor(text_to_image, dtype=torch.long).cpu()
    n_txt = owner.numel()
    counts = torch.bincount(owner, minlength=n_img)
    counts = counts[counts > 0].double()
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_R@{k}"] = min(k, n_img) / n_img
    for k in ks:
        # C(n-c, k) / C(n, k) = prod_{j<k} (n - c - j) / (n - j), clamped at 0 once n - c - j <= 0.
        miss = torch.ones_like(counts)
        for j in range(min(k, n_txt)):
            miss = miss * ((n_txt - counts - j).clamp(min=0) / (n_txt - j))
        out[f"i2t_R@{k}"] = float((1 - miss).mean())
    out["mean_R"] = sum(out[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in ks) / (2 * len(ks))
    return out


# ----------------------------------------------------------------------------- cross-lingual consistency
@torch.no_grad()
def top1_images(image_emb: torch.Tensor, text_emb: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Index of the image each caption scores highest, the lowest index among equal scores. [N_txt] long."""
    out = torch.empty(text_emb.shape[0], dtype=torch.long, device=text_emb.device)
    for s in range(0, text_emb.shape[0], chunk_size):
        out[s:s + chunk_size] = (text_emb[s:s + chunk_size] @ image_emb.T).argmax(1)  # [c, N_img] -> first maximum
    return out


def first_caption(owner: torch.Tensor, n_img: int) -> torch.Tensor:
    """Row of each image's first caption (in caption order), -1 for an image without one. [N_img] long."""
    first = torch.full((n_img,), -1, dtype=torch.long, device=owner.device)
    idx = torch.arange(owner.shape[0], device=owner.device)
    return first.scatter_reduce(0, owner, idx, reduce="amin", include_self=False)


@torch.no_grad()
@overload
def crosslingual_consistency(
    image_emb: torch.Tensor, text_a: torch.Tensor, owner_a: torch.Tensor, text_b: torch.Tensor,
    owner_b: torch.Tensor, chunk_size: int = ..., normalize: bool = ...,
    return_per_image: Literal[False] = ..., *, name: str = ...,
) -> dict[str, float]: ...


@overload
def crosslingual_consistency(
    image_emb: torch.Tensor, text_a: torch.Tensor, owner_a: torch.Tensor, text_b: torch.Tensor,
    owner_b: torch.Tensor, chunk_size: int = ..., normalize: bool = ...,
    *, return_per_image: Literal[True], name: str = ...,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]: ...


@overload
def crosslingual_consistency(
    image_emb: torch.Tensor, text_a: torch.Tensor, owner_a: torch.Tensor, text_b: torch.Tensor,
    owner_b: torch.Tensor, chunk_size: int = ..., normalize: bool = ...,
    return_per_image: bool = ..., *, name: str = ...,
) -> dict[str, float] | tuple[dict[str, float], dict[str, torch.Tensor]]: ...


def crosslingual_consistency(
    image_emb: torch.Tensor,
    text_a: torch.Tensor,
    owner_a: torch.Tensor,
    text_b: torch.Tensor,
    owner_b: torch.Tensor,
    chunk_size: int = 4096,
    normalize: bool = True,
    return_per_image: bool = False,
    *,
    name: str = "embeddings",
) -> dict[str, float] | tuple[dict[str, float], dict[str, torch.Tensor]]:
    """How often an image's captions in two languages retrieve the same top-1 image.

    Args:
        image_emb: [N_img, D], the gallery both languages search.
        text_a, text_b: [N_a, D], [N_b, D] captions in language a and b; ``owner_a`` / ``owner_b`` [N_a] / [N_b]
            the image each belongs to. An image's caption in a language is its first one (caption order).
        normalize: L2-normalise the embeddings (unless already unit-norm), as `retrieval_metrics`.

    Over the images that have a caption in both languages: ``xling_top1`` is the share whose two captions
    score the same image highest (the lowest index among equal top scores: a tie between images is read
    the same way in both languages), ``xling_top1_correct`` the share where that image is their own
    (both captions R@1). With ``return_per_image``: ``(metrics, per_image)`` with bool ``xling_top1`` /
    ``xling_top1_correct`` [n] and ``xling_image_index`` [n] (which images: their number is n).
    """
    n_img = image_emb.shape[0]
    device = image_emb.device
    owner_a = torch.as_tensor(owner_a, dtype=torch.long).to(device)
    owner_b = torch.as_tensor(owner_b, dtype=torch.long).to(device)
    text_a, text_b = text_a.to(device), text_b.to(device)
    _check(image_emb, text_a, owner_a)
    _check(image_emb, text_b, owner_b)
    check_finite(name, image_emb, torch.cat([text_a, text_b]))
    img, ta, tb = _prepare(image_emb, normalize), _prepare(text_a, normalize), _prepare(text_b, normalize)
    first_a, first_b = first_caption(owner_a, n_img), first_caption(owner_b, n_img)
    both = ((first_a >= 0) & (first_b >= 0)).nonzero().squeeze(1)  # [n]
    if both.numel() == 0:
        raise ValueError(f"{name}: no image has a caption in both languages: nothing to compare")
    top_a = top1_images(img, ta[first_a[both]], chunk_size)  # [n]
    top_b = top1_images(img, tb[first_b[both]], chunk_size)
    same = top_a == top_b
    correct = same & (top_a == both)
    metrics = {"xling_top1": same.double().mean().item(), "xling_top1_correct": correct.double().mean().item()}
    if not return_per_image:
        return metrics
    return metrics, {"xling_top1": same.cpu(), "xling_top1_correct": correct.cpu(), "xling_image_index": both.cpu()}


def crosslingual_chance(n_img: int) -> dict[str, float]:
    """`crosslingual_consistency` of two independent uniformly random rankings over ``n_img`` images."""
    return {"xling_top1": 1 / n_img, "xling_top1_correct": 1 / n_img ** 2}
