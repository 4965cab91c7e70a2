"""The Lightning module's contrastive step: cached-feature accumulation equals the full batch."""

from __future__ import annotations

import copy

import pytest
import torch

from cliptune.train.losses import ClipLoss, SigLipLoss
from cliptune.models import build_model
from cliptune.train.module import ContrastiveModule


def _batch(tok, b=8, k=0):
    g = torch.Generator().manual_seed(3)
    batch = {
        "image": torch.randn(b, 3, 32, 32, generator=g),
        "text": tok([f"caption number {i}" for i in range(b)]),
        "group": torch.tensor([i // 2 for i in range(b)]),
    }
    if k:
        batch["neg_text"] = torch.stack([tok([f"wrong {i} {j}" for j in range(k)]) for i in range(b)])
        batch["neg_mask"] = torch.rand(b, k, generator=g) > 0.3
    return batch


def _grads(module, batch):
    module.zero_grad(set_to_none=True)
    loss = module.contrastive_backward(batch, lambda l: l.backward())
    return loss, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_name,positives,k", [("clip", "pair", 0), ("siglip", "pair", 0),
                                                    ("clip", "group", 0), ("clip", "pair", 2)])
def test_accumulation_equals_full_batch(tiny_arch, loss_name, positives, k):
    arch = copy.deepcopy(tiny_arch)
    arch["vision_cfg"]["patch_dropout"] = 0.5  # random per forward: the RNG replay must make it exact
    bundle = build_model("t-accum", arch=arch, init_logit_bias=-2.0 if loss_name == "siglip" else None)
    loss_cls = ClipLoss if loss_name == "clip" else SigLipLoss
    batch = _batch(bundle.tokenizer, b=8, k=k)
    results = []
    for n in (1, 4):
        torch.manual_seed(7)
        m = ContrastiveModule(copy.deepcopy(bundle.model), loss_cls(positives=positives, tile_size=3), accum_steps=n)
        m.train()
        results.append(_grads(m, batch))
    (l1, g1), (l4, g4) = results
    torch.testing.assert_close(l4, l1, atol=1e-5, rtol=1e-5)
    assert set(g1) == set(g4)
    assert "model.logit_scale" in g1
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], atol=1e-5, rtol=1e-4, msg=name)


def test_plain_accumulation_would_differ(tiny_arch):
    """Sanity of the test above: splitting the batch into independent micro-batches changes the gradient."""
    bundle = build_model("t-accum2", arch=tiny_arch)
    batch = _batch(bundle.tokenizer, b=8)
    m = ContrastiveModule(bundle.model, ClipLoss(), accum_steps=1)
    _, full = _grads(m, batch)
    m.zero_grad(set_to_none=True)
    for s in (slice(0, 4), slice(4, 8)):
        sub = {k: v[s] for k, v in batch.items()}
        (m.contrastive_backward(sub, lambda l: l.backward()) / 2)
    naive = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert not torch.allclose(naive["model.visual.conv1.weight"], full["model.visual.conv1.weight"], atol=1e-6)


def test_clip_loss_freezes_unused_bias(tiny_arch):
    bundle = build_model("t-bias", arch=tiny_arch, init_logit_bias=-10.0)
    m = ContrastiveModule(bundle.model, ClipLoss())
    assert not m.model.logit_bias.requires_grad
    bundle2 = build_model("t-bias2", arch=tiny_arch)
    with pytest.raises(ValueError, match="add_logit_bias"):
        ContrastiveModule(bundle2.model, SigLipLoss())


@pytest.fixture
def minilm_bundle(minilm_arch):
    return build_model("t-minilm", arch=minilm_arch, lock_text=True)


def test_frozen_text_cache_matches_the_tower(minilm_bundle):
    """Cached, padding-trimmed MiniLM features equal the full forward, and the projection still learns."""
    b = minilm_bundle
    m = ContrastiveModule(b.model, ClipLoss())
    assert m.text_cache is not None
    m.train()
    assert not m.model.text.transformer.training  # frozen tower runs without dropout
    caps = ["red heart", "a grinning face with big eyes", "红心", "red heart"]
    tokens = b.tokenizer(caps)
    with torch.no_grad():
        m.model.text.transformer.eval()
        ref = m.model.encode_text(tokens, normalize=True)
    got = m.encode_text(tokens)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert len(m.text_cache.store) == 3  # the repeated caption is computed once
    got.sum().backward()
    assert m.model.text.proj.weight.grad is not None


def test_unlocked_hf_tower_trains_in_train_mode(minilm_arch):
    """from_pretrained leaves a HF tower in eval mode; the module trains it with dropout like
    open_clip does, and keeps only a cached frozen transformer in eval mode."""
    b = build_model("t-minilm-unlock", arch=minilm_arch, lock_text=True, lock_text_unlocked_layers=1)
    assert not b.model.text.transformer.training  # as Hugging Face hands it over
    m = ContrastiveModule(b.model, ClipLoss())
    assert m.text_cache is None
    assert all(mod.training for mod in m.model.modules())
    tokens = b.tokenizer(["red heart", "grinning face"])
    a, c = m.encode_text(tokens), m.encode_text(tokens)
    assert not torch.allclose(a, c)  # dropout is active
    m.eval()
    torch.testing.assert_close(m.encode_text(tokens), m.encode_text(tokens))
