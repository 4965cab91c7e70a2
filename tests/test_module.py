"""The Lightning module's contrastive step: cached-feature accumulation equals the full batch."""

from __future__ import annotations

import copy

import pytest
import torch

from cliptune.train.losses import ClipLoss, SigLipLoss
from cliptune.models import build_model
from cliptune.train.module import ContrastiveModule, nonfinite_problem, text_columns_needed, trimmable_text


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


# ---- costs beyond the model: text padding, one gradient norm, fused AdamW ----


def _text_grads(model, fn, tokens, weights):
    model.zero_grad(set_to_none=True)
    feats = fn(tokens)
    (feats * weights).sum().backward()
    return feats.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pool", ["argmax", "eos"])
def test_trimmed_text_equals_open_clip_on_full_tokens(tiny_arch, pool):
    """Dropping the padding after the last end-of-text token changes no feature and no gradient."""
    arch = copy.deepcopy(tiny_arch)
    if pool == "eos":
        arch["text_cfg"].update(pool_type="eos", eos_id=49407)
    bundle = build_model(f"t-trim-{pool}", arch=arch)
    m = ContrastiveModule(bundle.model, ClipLoss())
    assert m.trim_text
    tokens = bundle.tokenizer(["a red square", "a purple square on top", "x"])  # [3, 16], 7 tokens at most
    trimmed = m.trim_text_batch({"text": tokens, "image": torch.zeros(3)})
    assert trimmed["text"].shape == (3, 8) and torch.equal(trimmed["text"], tokens[:, :8])
    w = torch.randn(3, bundle.model.text_projection.shape[1], generator=torch.Generator().manual_seed(0))
    ref, ref_g = _text_grads(bundle.model, lambda t: bundle.model.encode_text(t, normalize=True), tokens, w)
    got, got_g = _text_grads(bundle.model, m.encode_text, trimmed["text"], w)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    assert got_g.keys() == ref_g.keys()
    for name in ref_g:  # the same sums in another order (other matrix shapes): equal to float rounding
        scale = float(ref_g[name].abs().max())
        torch.testing.assert_close(got_g[name], ref_g[name], atol=1e-5 * scale, rtol=1e-5, msg=name)
    # full-length tokens (zero-shot prompts, another loader) still take open_clip's own path
    torch.testing.assert_close(m.encode_text(tokens), ref)


def test_trimmed_batch_keeps_whole_contrastive_step(tiny_arch):
    bundle = build_model("t-trim-step", arch=tiny_arch)
    batch = _batch(bundle.tokenizer, b=8, k=2)
    full = ContrastiveModule(copy.deepcopy(bundle.model), ClipLoss(), trim_text_padding=False)
    trim = ContrastiveModule(copy.deepcopy(bundle.model), ClipLoss())
    short = trim.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert short["text"].shape[1] < batch["text"].shape[1] and short["neg_text"].shape[2] < batch["neg_text"].shape[2]
    (l1, g1), (l2, g2) = _grads(full, batch), _grads(trim, short)
    torch.testing.assert_close(l2, l1)
    for name in g1:
        scale = float(g1[name].abs().max())
        torch.testing.assert_close(g2[name], g1[name], atol=1e-5 * scale, rtol=1e-5, msg=name)


@pytest.mark.parametrize("text_cfg", [{"no_causal_mask": True}, {"pool_type": "last"}])
def test_no_trimming_where_padding_is_read(tiny_arch, text_cfg):
    """Bidirectional attention or pooling at the last position reads the padding: nothing is trimmed."""
    arch = copy.deepcopy(tiny_arch)
    arch["text_cfg"].update(text_cfg)
    bundle = build_model("t-notrim", arch=arch)
    m = ContrastiveModule(bundle.model, ClipLoss())
    assert not trimmable_text(bundle.model) and not m.trim_text
    batch = {"text": bundle.tokenizer(["a red square"])}
    assert m.transfer_batch_to_device(batch, torch.device("cpu"), 0)["text"].shape == batch["text"].shape
    assert not ContrastiveModule(build_model("t-notrim2", arch=tiny_arch).model, ClipLoss(),
                                 trim_text_padding=False).trim_text


def test_text_columns_needed():
    eot = 49407
    t = torch.zeros(3, 20, dtype=torch.long)
    t[0, :4] = torch.tensor([eot - 1, 5, 6, eot])  # pooled at 3
    t[1, :10] = 7
    t[1, 9] = eot  # pooled at 9
    assert text_columns_needed(t, "argmax") == 16  # 10 columns, rounded up to a multiple of 8
    assert text_columns_needed(t, "argmax", multiple=1) == 10
    assert text_columns_needed(t[:, :12], "argmax") == 12  # never more than there are
    assert text_columns_needed(t, "eos", eos_id=eot, multiple=1) == 10
    assert text_columns_needed(t.reshape(3, 1, 20), "argmax", multiple=1) == 10  # hard negatives [B, K, L]
    assert text_columns_needed(t[:0], "argmax") == 20


def _attached(module, **trainer_kw):
    import lightning as L

    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, **trainer_kw)
    return module


def test_clipping_with_the_checked_norm_equals_clip_grad_norm(tiny_arch):
    from cliptune.train.optim import OptimConfig

    bundle = build_model("t-clip-norm", arch=tiny_arch)
    m = _attached(ContrastiveModule(bundle.model, ClipLoss(), optim=OptimConfig(grad_clip=0.05)))
    loss = m.contrastive_backward(_batch(bundle.tokenizer), lambda l: l.backward())
    names = [n for n, p in m.named_parameters() if p.grad is not None]
    ref = [torch.nn.Parameter(p.detach().clone()) for n, p in m.named_parameters() if p.grad is not None]
    for r, (_, p) in zip(ref, [(n, p) for n, p in m.named_parameters() if p.grad is not None]):
        r.grad = p.grad.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 0.05)
    problem, params, norm = nonfinite_problem(m, loss)
    assert problem is None and len(params) == len(ref)
    torch.testing.assert_close(norm, ref_norm)
    assert float(norm) > 0.05  # the clip bites
    m._clip(None, params, norm)
    for name, p, r in zip(names, params, ref):
        torch.testing.assert_close(p.grad, r.grad, msg=name)


def test_adamw_is_fused_without_a_grad_scaler(tiny_arch, monkeypatch):
    bundle = build_model("t-fused", arch=tiny_arch)
    m = _attached(ContrastiveModule(bundle.model, ClipLoss()))
    assert m.configure_optimizers()["optimizer"].defaults["fused"]
    # an fp16 GradScaler unscales before clipping, which a fused optimiser does inside its step
    monkeypatch.setattr(m.trainer.precision_plugin, "scaler", object(), raising=False)
    assert not m.configure_optimizers()["optimizer"].defaults["fused"]


def test_fused_adamw_steps_as_the_loop(tiny_arch):
    from cliptune.train.optim import OptimConfig, build_optimizer

    bundle = build_model("t-fused-eq", arch=tiny_arch)
    batch = _batch(bundle.tokenizer)
    start = copy.deepcopy(bundle.model.state_dict())
    states = []
    for fused in (False, True):
        m = ContrastiveModule(copy.deepcopy(bundle.model), ClipLoss())
        opt = build_optimizer(m.model, OptimConfig(lr=1e-2), fused=fused)
        m.contrastive_backward(batch, lambda l: l.backward())
        opt.step()
        states.append(m.model.state_dict())
    for name, value in states[0].items():  # the same update, to float rounding (later steps then drift apart)
        update = float((value - start[name]).abs().max())
        torch.testing.assert_close(states[1][name], value, atol=1e-5 * update + 1e-9, rtol=0, msg=name)
