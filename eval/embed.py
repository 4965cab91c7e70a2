"""Embed evaluation sets (in training and standalone) and score them, exact across DDP ranks.

Each rank embeds the validation samples its loader gives it (every sample exactly once over all
ranks, see ``cliptune.data``); at the end the per-rank pieces are gathered once, put in key
order and scored on every rank, so 1 and N processes give the same numbers. (Only as exact as the
embeddings themselves: CPU kernels can round a sample's embedding differently, ~1e-7, in a batch
of another shape, which can flip exact near-ties of an untrained model.)
"""

from __future__ import annotations

import contextlib
import copy
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from cliptune import runtime
from cliptune.data.decode import describe_skips, skipped_dict, skipped_tensor
from cliptune.eval.retrieval import chance_recall, first_caption, retrieval_metrics
from cliptune.eval.zeroshot import build_classifier, zeroshot_metrics
from cliptune.log import get_logger

if TYPE_CHECKING:
    from cliptune.models import ClipModel

log = get_logger(__name__)


class EmptyEvalSetError(ValueError):
    """An evaluation set with no usable image or caption: there is no number to report.
    ``skipped`` holds the samples the set left out, per reason."""

    def __init__(self, message: str, skipped: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.skipped = dict(skipped or {})


class EmbeddingCollector:
    """Accumulates image/text embeddings of validation batches (see the batch contract)."""

    def __init__(self) -> None:
        self.img: list[torch.Tensor] = []
        self.txt: list[torch.Tensor] = []
        self.owner: list[torch.Tensor] = []
        self.keys: list[str] = []
        self.labels: list[Any] = []
        self.n_img = 0
        self.skipped = skipped_tensor()  # per reason (cliptune.data.wds.SKIP_REASONS)

    @torch.no_grad()
    def add_batch(self, model: ClipModel, batch: dict, encode_text=None) -> None:
        if batch.get("skipped") is not None:
            self.skipped += torch.as_tensor(batch["skipped"]).cpu().long().reshape(-1)
        if "image" not in batch:  # a worker's closing report of skips, nothing to embed
            return
        img = model.encode_image(batch["image"], normalize=True)
        enc = encode_text or (lambda t: model.encode_text(t, normalize=True))
        txt = enc(batch["text"]) if batch["text"].numel() else img.new_zeros(0, img.shape[1])
        self.add_embeddings(img, txt, batch["text_owner"], batch.get("key"), batch.get("label"))

    def add_embeddings(self, img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor,
                       keys: Iterable[str] | None = None, labels: Iterable[Any] | None = None) -> None:
        b = img.shape[0]
        self.img.append(img.float().cpu())
        self.txt.append(txt.float().cpu())
        self.owner.append(owner.long().cpu() + self.n_img)
        self.keys.extend(list(keys) if keys is not None else [str(self.n_img + i) for i in range(b)])
        self.labels.extend(list(labels) if labels is not None else [None] * b)
        self.n_img += b

    def local(self) -> dict:
        d = self.img[0].shape[1] if self.img else 0
        return {
            "img": torch.cat(self.img) if self.img else torch.zeros(0, d),
            "txt": torch.cat(self.txt) if self.txt else torch.zeros(0, d),
            "owner": torch.cat(self.owner) if self.owner else torch.zeros(0, dtype=torch.long),
            "keys": self.keys,
            "labels": self.labels,
            "skipped": self.skipped.clone(),
        }

    def gather(self) -> dict:
        """All ranks' embeddings, in key order (identical on every rank)."""
        parts: list[Any] = [self.local()]  # all_gather_object fills a list of placeholders
        world = runtime.world_size(launcher=False)
        if world > 1:
            parts = [None] * world
            torch.distributed.all_gather_object(parts, self.local())
        return merge_parts(parts)


def merge_parts(parts: list[dict]) -> dict:
    """Concatenate per-rank pieces and sort images by key; caption owners are remapped."""
    skipped = sum((torch.as_tensor(p["skipped"]) for p in parts if p.get("skipped") is not None), skipped_tensor())
    parts = [p for p in parts if p["img"].shape[0]]
    if not parts:
        return {"img": torch.zeros(0, 0), "txt": torch.zeros(0, 0), "owner": torch.zeros(0, dtype=torch.long),
                "keys": [], "labels": [], "skipped": skipped}
    imgs: list[torch.Tensor] = []
    txts: list[torch.Tensor] = []
    owners: list[torch.Tensor] = []
    keys: list[str] = []
    labels: list[Any] = []
    off = 0
    for p in parts:
        imgs.append(p["img"])
        txts.append(p["txt"])
        owners.append(p["owner"] + off)
        keys.extend(p["keys"])
        labels.extend(p["labels"])
        off += p["img"].shape[0]
    img, txt, owner = torch.cat(imgs), torch.cat(txts), torch.cat(owners)
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = []  # each repeat of a key
        for k in keys:
            if k in seen:
                dup.append(k)
            seen.add(k)
        raise RuntimeError(
            f"{len(dup)} sample keys occur twice in the evaluation set (e.g. {dup[:3]}): either the set "
            "holds duplicate keys (give every sample a unique key) or ranks/workers read overlapping "
            "shards; the evaluation would not be exact")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    new_owner = inv[owner]
    t_order = torch.argsort(new_owner, stable=True)
    return {
        "img": img[order],
        "txt": txt[t_order],
        "owner": new_owner[t_order],
        "keys": [keys[i] for i in order],
        "labels": [labels[i] for i in order],
        "skipped": skipped,
    }


def _local_loss(loss_fn: nn.Module) -> nn.Module:
    """A copy of the training loss that treats its input as one whole batch (no gathering)."""
    fn = copy.copy(loss_fn)
    for attr, val in (("rank", 0), ("world_size", 1), ("positives", "pair")):
        if hasattr(fn, attr):
            setattr(fn, attr, val)
    return fn


@torch.no_grad()
def evaluate_gathered(data: dict, loss_fn: nn.Module | None = None, scale_bias: tuple | None = None,
                      batch_size: int = 256, ks: tuple[int, ...] = (1, 5, 10), per_query: bool = True,
                      zeroshot: tuple | None = None, *, name: str = "embeddings") -> dict:
    """Score a whole set: ``data`` is the output of `EmbeddingCollector.gather` (a collective: every rank
    gathers, then scores the same set) or `merge_parts`.

    Returns ``{"metrics", "chance", "per_query", "keys", "n_images", "n_texts", "skipped", "n_skipped"}``
    (``skipped``: samples left out per reason over all ranks, ``n_skipped`` their total):
    Recall@K (see `retrieval_metrics`), the chance level of each R@K, the contrastive loss over
    the set in batches of ``batch_size`` (first caption of each image, in key order, so the value
    does not depend on the number of ranks) when ``loss_fn`` and ``scale_bias`` are given, and
    zero-shot accuracy over the set's labels when ``zeroshot=(encode_strings, templates)``.
    ``name`` is the set as errors name it (``"val set 'domain'"``): non-finite embeddings raise.
    """

    ks = tuple(int(k) for k in ks)
    out: dict[str, Any] = {"metrics": {}, "chance": {}, "per_query": None, "n_images": len(data["keys"]),
                           "n_texts": int(data["txt"].shape[0]), "keys": data["keys"],
                           "skipped": skipped_dict(data.get("skipped", skipped_tensor()))}
    out["n_skipped"] = sum(out["skipped"].values())
    if not data["keys"] or data["txt"].shape[0] == 0:
        raise EmptyEvalSetError(
            f"{name}: nothing usable to evaluate ({len(data['keys'])} images, {int(data['txt'].shape[0])} captions; "
            f"{describe_skips(out['skipped'])}). Check the set's shards and data.caption_lang.", out["skipped"])
    # Raises on NaN/inf embeddings, before the loss and zero-shot use them too.
    res = retrieval_metrics(data["img"], data["txt"], data["owner"], ks=ks, return_per_query=per_query, name=name)
    if isinstance(res, tuple):  # per_query
        metrics, hits = res
        out["per_query"] = {k: v.cpu() for k, v in hits.items()}
    else:
        metrics = res
    out["metrics"] = {k: float(v) for k, v in metrics.items()}
    out["chance"] = chance_recall(len(data["keys"]), data["owner"], ks)
    if loss_fn is not None and scale_bias is not None:
        loss = _set_loss(data, loss_fn, scale_bias, batch_size)
        if loss is not None:
            out["metrics"]["loss"] = loss
    if zeroshot is not None and zeroshot[1]:
        zs = zeroshot_from_collected(data, zeroshot[0], zeroshot[1], name=name)
        if zs:
            out["metrics"].update(zs["metrics"])
            out["chance"].update(zs["chance"])
            out["n_classes"] = zs["n_classes"]
            if out["per_query"] is not None:
                out["per_query"].update(zs["per_query"])
    return out


def _set_loss(data: dict, loss_fn: nn.Module, scale_bias: tuple, batch_size: int) -> float | None:
    """Mean contrastive loss over the set in fixed batches (images in key order, first caption each)."""
    first = first_caption(data["owner"], len(data["keys"]))
    has = first >= 0
    img, txt = data["img"][has], data["txt"][first[has]]
    fn = _local_loss(loss_fn)
    s, b = scale_bias
    s = s.detach().float().cpu()
    b = None if b is None else b.detach().float().cpu()
    losses, weights = [], []
    for i in range(0, img.shape[0], batch_size):
        bi, bt = img[i:i + batch_size], txt[i:i + batch_size]
        if bi.shape[0] < 2:  # a one-pair "batch" has no negatives
            continue
        val = fn(bi, bt, s, b) if b is not None else fn(bi, bt, s)
        losses.append(float(val))
        weights.append(bi.shape[0])
    return sum(v * w for v, w in zip(losses, weights)) / sum(weights) if losses else None


def _progress(desc: str, total: int | None):
    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                 disable=runtime.rank() != 0, transient=False)
    return p, p.add_task(desc, total=total, rate="")


def embed_loader(model: nn.Module, loader: Iterable[dict], device: torch.device | str = "cpu",
                 desc: str = "embedding", total: int | None = None,
                 autocast_dtype: torch.dtype | None = None,
                 encode_text: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EmbeddingCollector:
    """Embed every batch of an eval loader (the eval batch contract), with a progress bar on rank 0.

    ``total``: images this rank will see (for the bar; None shows a spinner-like count).
    Embeddings are kept in fp32 on the CPU, so a 100k set at D=512 costs ~200 MB per tower.
    """
    device = torch.device(device)
    col = EmbeddingCollector()
    progress, task = _progress(desc, total)
    t0 = time.perf_counter()
    with progress, torch.no_grad():
        for batch in loader:
            batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                     for k, v in batch.items()}
            ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                   else contextlib.nullcontext())
            with ctx:
                col.add_batch(model, batch, encode_text=encode_text)
            rate = col.n_img / max(time.perf_counter() - t0, 1e-9)
            progress.update(task, advance=batch["image"].shape[0] if "image" in batch else 0, rate=f"{rate:,.0f} img/s")
    return col


def zeroshot_from_collected(data: dict, encode_text, templates, ks=(1, 5), *, name: str = "embeddings") -> dict:
    """Zero-shot classification of a gathered set whose samples carry a ``label``.

    The classes are the distinct labels of the set (sorted); samples without a label are left out.
    """

    # sample index -> its label, for the samples that have one
    labels = {i: str(lab) for i, lab in enumerate(data["labels"]) if lab is not None and str(lab) != ""}
    keep = list(labels)
    if not keep:
        return {}
    classes = sorted(set(labels.values()))
    clf = build_classifier(encode_text, [c.replace("-", " ").replace("_", " ") for c in classes], templates)
    y = torch.tensor([classes.index(labels[i]) for i in keep])
    metrics, hits = zeroshot_metrics(data["img"][keep].to(clf.device), clf, y, ks=ks, return_per_query=True, name=name)
    c = len(classes)
    chance = {f"zs_top{k}": min(k, c) / c for k in ks}
    chance["zs_balanced_acc"] = 1 / c
    return {"metrics": {f"zs_{k}": float(v) for k, v in metrics.items()},
            "per_query": {f"zs_{k}": v.cpu() for k, v in hits.items()},
            "chance": chance, "n_classes": c}
