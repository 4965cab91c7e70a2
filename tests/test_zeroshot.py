"""Zero-shot classifier and accuracy against hand-computed values and torchmetrics."""

from __future__ import annotations

import zlib

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from cliptune.eval.zeroshot import DEFAULT_TEMPLATES, build_classifier, zeroshot_metrics

D = 16


def fake_encode(texts: list[str]) -> torch.Tensor:
    """Deterministic, unnormalised embedding per string (a stand-in text tower)."""
    out = []
    for t in texts:
        g = torch.Generator().manual_seed(zlib.crc32(t.encode()))
        out.append(torch.randn(D, generator=g) * (1 + len(t)))
    return torch.stack(out)


def test_classifier_is_mean_of_normalised_prompts() -> None:
    classes = ["cat", "red apple", "dog"]
    templates = ["a photo of a {c}.", "{}", lambda c: f"an emoji of {c}"]
    clf = build_classifier(fake_encode, classes, templates, batch_size=2)
    assert clf.shape == (D, 3) and clf.dtype == torch.float32
    for j, c in enumerate(classes):
        prompts = [f"a photo of a {c}.", c, f"an emoji of {c}"]
        e = torch.nn.functional.normalize(fake_encode(prompts), dim=-1).mean(0)
        assert torch.allclose(clf[:, j], e / e.norm(), atol=1e-6)
    assert torch.allclose(clf.norm(dim=0), torch.ones(3), atol=1e-6)
    # Batching does not change the result.
    assert torch.allclose(clf, build_classifier(fake_encode, classes, templates, batch_size=1000), atol=1e-7)


def test_default_templates_and_encoder_calls() -> None:
    calls: list[int] = []

    def enc(texts: list[str]) -> torch.Tensor:
        calls.append(len(texts))
        return fake_encode(texts)

    clf = build_classifier(enc, ["a", "b", "c"], batch_size=4)
    assert clf.shape == (D, 3)
    assert sum(calls) == 3 * len(DEFAULT_TEMPLATES) and max(calls) <= 4
    with pytest.raises(ValueError, match="placeholder"):
        build_classifier(fake_encode, ["a"], ["no placeholder"])


def test_hand_computed_case() -> None:
    clf = torch.eye(3)  # [D=3, C=3]: the logits are the image coordinates
    img = torch.tensor([
        [0.9, 0.1, 0.0],   # label 0: top1 hit
        [0.5, 0.4, 0.1],   # label 1: rank 2
        [0.2, 0.3, 0.5],   # label 2: top1 hit
        [0.6, 0.0, 0.4],   # label 2: rank 2
        [0.5, 0.5, 0.0],   # label 0: tie with class 1 -> counts against, rank 2
    ])
    labels = torch.tensor([0, 1, 2, 2, 0])
    m, pq = zeroshot_metrics(img, clf, labels, ks=(1, 2), return_per_query=True)
    assert m["top1"] == pytest.approx(2 / 5)
    assert m["top2"] == pytest.approx(1.0)
    # per-class top-1 recall: class 0 1/2, class 1 0/1, class 2 1/2
    assert m["balanced_acc"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert m["n"] == 5
    assert pq["top1"].tolist() == [True, False, True, False, False]


def test_absent_class_is_left_out_of_balanced_accuracy() -> None:
    clf = torch.eye(3)
    img = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 2])  # class 1 has no image
    m = zeroshot_metrics(img, clf, labels, ks=(1,))
    assert m["balanced_acc"] == pytest.approx((0.5 + 0.0) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchmetrics(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, c = 300, 12
    protos = torch.randn(c, D, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[:c] = torch.arange(c)  # every class present (torchmetrics macro averages over all)
    img = protos[labels] + 2.0 * torch.randn(n, D, generator=g)
    clf = torch.nn.functional.normalize(protos, dim=-1).T
    m = zeroshot_metrics(img, clf, labels, ks=(1, 5), chunk_size=37)
    logits = torch.nn.functional.normalize(img, dim=-1) @ clf
    for k in (1, 5):
        ref = MulticlassAccuracy(num_classes=c, top_k=k, average="micro")(logits, labels)
        assert m[f"top{k}"] == pytest.approx(float(ref), abs=1e-6)
    ref_bal = MulticlassAccuracy(num_classes=c, top_k=1, average="macro")(logits, labels)
    assert m["balanced_acc"] == pytest.approx(float(ref_bal), abs=1e-6)


def test_bad_labels_are_reported() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        zeroshot_metrics(torch.randn(2, 3), torch.eye(3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shapes do not match"):
        zeroshot_metrics(torch.randn(2, 4), torch.eye(3), torch.tensor([0, 1]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_or_classes_are_refused(bad) -> None:
    """NaN logits never compare >=, so every image used to count as correct (top1 = 1)."""
    g = torch.Generator().manual_seed(0)
    img, labels = torch.randn(5, D, generator=g), torch.tensor([0, 1, 2, 0, 1])
    clf = build_classifier(fake_encode, ["a", "b", "c"])
    broken = img.clone()
    broken[[0, 3], 2] = bad
    with pytest.raises(ValueError) as e:
        zeroshot_metrics(broken, clf, labels, name="val set 'pets'")
    assert str(e.value) == (
        "val set 'pets': 2 of 5 image embeddings and 0 of 3 class text embeddings (zero-shot classifier) are not "
        "finite (NaN/inf); the model has diverged or its input is broken — refusing to rank them")

    # a text tower that embeds one class's prompts to non-finite values: that class is counted
    def enc(texts: list[str]) -> torch.Tensor:
        e = fake_encode(texts)
        e[[i for i, t in enumerate(texts) if t.endswith(" b.") or t == "b"]] = bad
        return e

    with pytest.raises(ValueError, match=r"^embeddings: 0 of 5 image embeddings and 1 of 3 class text embeddings"):
        zeroshot_metrics(img, build_classifier(enc, ["a", "b", "c"]), labels)
