"""Zero-shot classification with prompt templates (pure torch).

    from cliptune.eval.zeroshot import build_classifier, zeroshot_metrics
    encode = lambda texts: model.encode_text(tokenizer(texts).to(device), normalize=True)
    clf = build_classifier(encode, ["cat", "dog"])             # [D, C]
    m = zeroshot_metrics(image_emb, clf, labels)                # {"top1", "top5", "balanced_acc", "n"}

Templates are ``str.format`` strings with ``{c}`` (or ``{}``) for the class name, or callables
``name -> prompt`` (open_clip's template lists are lambdas). A class is the mean of its
L2-normalised template embeddings, renormalised (CLIP's prompt ensembling).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence, overload

import torch
import torch.nn.functional as F

from cliptune.eval.retrieval import check_finite

__all__ = ["DEFAULT_TEMPLATES", "build_classifier", "zeroshot_metrics"]

Template = str | Callable[[str], str]

# The one default list of zero-shot prompts (cliptune-train eval.zeroshot_templates and cliptune-eval
# zeroshot.templates stand for it when null). Generic; a domain's own list usually does better.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{c}",
    "a photo of a {c}.",
    "a picture of {c}.",
    "an image of {c}.",
)


def _render(template: Template, name: str) -> str:
    if callable(template):
        return template(name)
    if "{" not in template:
        raise ValueError(f"template {template!r} has no '{{c}}' placeholder for the class name")
    return template.format(name, c=name)


@torch.no_grad()
def build_classifier(
    encode_text: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Zero-shot weights [D, C]: per class, the renormalised mean of its normalised prompt embeddings.

    ``encode_text`` maps a list of prompts to [n, D] embeddings (normalised or not). Prompts of
    all classes are encoded in batches of ``batch_size``; the result is fp32 on the device
    ``encode_text`` returns.
    """
    if not classnames:
        raise ValueError("build_classifier: classnames is empty")
    if not templates:
        raise ValueError("build_classifier: templates is empty")
    prompts = [_render(t, c) for c in classnames for t in templates]  # class-major
    embs = []
    for s in range(0, len(prompts), batch_size):
        e = encode_text(prompts[s:s + batch_size])
        if e.ndim != 2 or e.shape[0] != len(prompts[s:s + batch_size]):
            raise ValueError(f"encode_text returned shape {tuple(e.shape)} for {len(prompts[s:s + batch_size])} "
                             "prompts; expected [n, D]")
        embs.append(F.normalize(e.float(), dim=-1))
    emb = torch.cat(embs).view(len(classnames), len(templates), -1)  # [C, T, D]
    return F.normalize(emb.mean(1), dim=-1).T.contiguous()  # [D, C]


@torch.no_grad()
@overload
def zeroshot_metrics(
    image_emb: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor | Sequence[int],
    ks: Sequence[int] = ..., chunk_size: int = ...,
    return_per_query: Literal[False] = ..., *, name: str = ...,
) -> dict[str, float]: ...


@overload
def zeroshot_metrics(
    image_emb: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor | Sequence[int],
    ks: Sequence[int] = ..., chunk_size: int = ...,
    *, return_per_query: Literal[True], name: str = ...,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]: ...


@overload
def zeroshot_metrics(
    image_emb: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor | Sequence[int],
    ks: Sequence[int] = ..., chunk_size: int = ...,
    return_per_query: bool = ..., *, name: str = ...,
) -> dict[str, float] | tuple[dict[str, float], dict[str, torch.Tensor]]: ...


def zeroshot_metrics(
    image_emb: torch.Tensor,
    classifier: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 65536,
    return_per_query: bool = False,
    *,
    name: str = "embeddings",
) -> dict[str, float] | tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Top-k accuracy and balanced accuracy of zero-shot classification.

    Args:
        image_emb: [N, D] (normalised here); classifier: [D, C] from `build_classifier`;
        labels: [N] class indices in 0..C-1.
        name: the set, as error messages name it. A NaN or inf in ``image_emb`` or in a class of
            ``classifier`` raises ``ValueError`` with the number of non-finite images and classes.
    Returns:
        ``top{k}`` (k clipped to C), ``balanced_acc`` (mean over classes present in ``labels``
        of the per-class top-1 recall) and ``n``. Ties count against the image, as in
        `cliptune.eval.retrieval`: correct iff fewer than k wrong classes score >= the true one.
        With ``return_per_query``: also bool hit vectors ``top{k}`` [N].
    """
    labels = torch.as_tensor(labels, dtype=torch.long).to(image_emb.device)
    n, c = image_emb.shape[0], classifier.shape[1]
    if image_emb.ndim != 2 or classifier.ndim != 2 or image_emb.shape[1] != classifier.shape[0]:
        raise ValueError(f"shapes do not match: image_emb {tuple(image_emb.shape)} vs classifier "
                         f"{tuple(classifier.shape)} (expected [N, D] and [D, C])")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    if n == 0:
        raise ValueError("zeroshot_metrics: no images")
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"labels must lie in [0, {c - 1}] (one per class of the classifier), "
                         f"got [{int(labels.min())}, {int(labels.max())}]")
    check_finite(name, image_emb, classifier.T, text_what="class text embeddings (zero-shot classifier)")
    img = F.normalize(image_emb.float(), dim=-1)
    clf = classifier.float().to(img.device)
    rank = torch.empty(n, dtype=torch.long, device=img.device)
    for s in range(0, n, chunk_size):
        logits = img[s:s + chunk_size] @ clf  # [b, C]
        true = logits.gather(1, labels[s:s + chunk_size, None])
        rank[s:s + chunk_size] = (logits >= true).sum(1)  # 1 + wrong classes scoring >= the true one
    out: dict[str, float] = {}
    per_query: dict[str, torch.Tensor] = {}
    for k in ks:
        hit = rank <= k
        out[f"top{k}"] = hit.double().mean().item()
        per_query[f"top{k}"] = hit.cpu()
    top1 = (rank == 1).double()
    counts = torch.bincount(labels, minlength=c).double()
    correct = torch.zeros(c, dtype=torch.float64, device=img.device).scatter_add(0, labels, top1)
    present = counts > 0
    out["balanced_acc"] = (correct[present] / counts[present]).mean().item()
    out["n"] = float(n)
    return (out, per_query) if return_per_query else out
