"""LoRA through peft: trainable set, training moves only adapters, merge round trip via plain open_clip."""

from __future__ import annotations

import open_clip
import pytest
import torch

from cliptune.lora import apply_lora, merge_lora, merged_copy
from cliptune.models import build_model, export_model


def _train_a_bit(model, tok, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, 32, 32)
    t = tok(["a", "b", "c", "d"])
    for _ in range(steps):
        opt.zero_grad()
        logits = model.encode_image(x, normalize=True) @ model.encode_text(t, normalize=True).T * 10
        torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
        opt.step()
    return x, t


@pytest.mark.parametrize("towers", [["image"], ["text"], ["image", "text"]])
def test_lora_trains_adapters_and_merges(tmp_path, tiny_arch, towers):
    b = build_model("t-lora", arch=tiny_arch)
    base = {k: v.clone() for k, v in b.model.state_dict().items()}
    apply_lora(b.model, r=4, alpha=8, towers=towers)
    trainable = [n for n, p in b.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n == "logit_scale" for n in trainable)
    if towers == ["image"]:
        assert all(n.startswith("visual.") for n in trainable if "lora_" in n)
    if towers == ["text"]:
        assert not any(n.startswith("visual.") for n in trainable)
    x, t = _train_a_bit(b.model, b.tokenizer)
    b.model.eval()
    with torch.no_grad():
        ref_i = b.model.encode_image(x, normalize=True)
        ref_t = b.model.encode_text(t, normalize=True)
    merged = merged_copy(b.model)
    assert not any("lora_" in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(base)
    # base weights of adapted layers really changed, the others did not
    changed = [k for k in base if not torch.equal(base[k], merged.state_dict()[k])]
    assert changed
    if towers == ["image"]:
        assert all(k.startswith("visual.") or k == "logit_scale" for k in changed)
    if towers == ["text"]:
        assert not any(k.startswith("visual.") for k in changed)
    out = export_model(merged, b.model_cfg, b.preprocess_cfg, tmp_path / "export")
    plain, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(x, normalize=True), ref_i, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(plain.encode_text(t, normalize=True), ref_t, atol=1e-5, rtol=1e-4)


def test_lora_errors(tiny_arch):
    b = build_model("t-lora2", arch=tiny_arch)
    with pytest.raises(ValueError, match="lora.towers"):
        apply_lora(b.model, r=4, towers=["audio"])
    with pytest.raises(ValueError, match="lora.targets"):
        apply_lora(b.model, r=4, targets=["nothing_like_this"])


def test_export_refuses_unmerged_adapters(tmp_path, tiny_arch):
    b = build_model("t-lora-unmerged", arch=tiny_arch)
    apply_lora(b.model, r=2)
    with pytest.raises(ValueError, match="still holds LoRA adapters; merge them first"):
        export_model(b.model, b.model_cfg, b.preprocess_cfg, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_merge_in_place_matches(tiny_arch):
    b = build_model("t-lora3", arch=tiny_arch)
    apply_lora(b.model, r=2, towers=["image"])
    for n, p in b.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero: make the adapter do something
    x = torch.randn(2, 3, 32, 32)
    b.model.eval()
    with torch.no_grad():
        ref = b.model.encode_image(x)
        merge_lora(b.model)
        torch.testing.assert_close(b.model.encode_image(x), ref, atol=1e-5, rtol=1e-4)


def test_lora_keep_trainable_respects_locks(tiny_arch):
    """keep_trainable leaves a tower's own weights as the model's lock settings had them."""
    b = build_model("t-lora4", arch=tiny_arch, lock_image=True, lock_image_unlocked_groups=1)
    before = {n: p.requires_grad for n, p in b.model.named_parameters() if n.startswith("visual.")}
    assert any(before.values()) and not all(before.values())  # last group unlocked, rest locked
    apply_lora(b.model, r=2, towers=["text"], keep_trainable=["image"])
    after = {n: p.requires_grad for n, p in b.model.named_parameters()}
    assert {n: after[n] for n in before} == before  # image tower: exactly as locked
    text_base = [n for n in after if not n.startswith("visual.") and "lora_" not in n and n != "logit_scale"]
    assert text_base and not any(after[n] for n in text_base)  # text base frozen, as peft does
    assert any(after[n] for n in after if "lora_" in n)
    start = {n: p.detach().clone() for n, p in b.model.named_parameters()}
    _train_a_bit(b.model, b.tokenizer)
    now = dict(b.model.named_parameters())
    moved = {n for n in start if not torch.equal(start[n], now[n])}
    assert any(n.startswith("visual.") for n in moved)  # the kept image weights trained
    assert not any(n.startswith("visual.") and not before[n] for n in moved)  # locked ones did not
    with pytest.raises(ValueError, match="lora.keep_trainable"):
        apply_lora(build_model("t-lora5", arch=tiny_arch).model, r=2, keep_trainable=["audio"])
