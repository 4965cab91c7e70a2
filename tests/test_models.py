"""Model building, locking, export round trip through plain open_clip, reload from checkpoints."""

from __future__ import annotations

import open_clip
import pytest
import torch

from cliptune.models import build_model, ensure_logit_bias, export_model, load_model


def _outputs(model, tok):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    texts = tok(["a red heart", "a cat face", "a rocket"])
    model.eval()
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)


def test_build_from_arch_sets_init_values(tiny_arch):
    b = build_model("t-init", arch=tiny_arch, init_logit_scale=2.0, init_logit_bias=-3.0)
    assert b.model.logit_scale.item() == pytest.approx(2.0)
    assert b.model.logit_bias.item() == pytest.approx(-3.0)
    assert b.tokenizer(["hello"]).shape == (1, 16)
    assert b.preprocess_val.transforms[0].size in (32, (32, 32), [32, 32])


def test_export_round_trip_plain_open_clip(tmp_path, tiny_arch):
    b = build_model("t-export", arch=tiny_arch, init_logit_bias=-5.0)
    with torch.no_grad():
        for p in b.model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the init: the weights must really travel
    ref = _outputs(b.model, b.tokenizer)
    out = export_model(b.model, b.model_cfg, b.preprocess_cfg, tmp_path / "export")
    # Plain open_clip, nothing from cliptune: config + weights from the folder.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    got = _outputs(model, tok)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    assert model.logit_bias.item() == pytest.approx(b.model.logit_bias.item())
    # and with a registered name + pretrained=<file>, the other plain open_clip route
    open_clip.add_model_config(_write_cfg(tmp_path, "t-export-named", b.model_cfg))
    model2, _, _ = open_clip.create_model_and_transforms(
        "t-export-named", pretrained=str(out / "open_clip_model.safetensors"))
    torch.testing.assert_close(_outputs(model2, tok)[0], ref[0])


def _write_cfg(tmp_path, name, cfg):
    import json

    p = tmp_path / f"{name}.json"
    c = dict(cfg)
    c["init_logit_bias"] = 0.0  # the exported weights carry a logit_bias
    p.write_text(json.dumps(c))
    return p


def test_load_model_from_export_dir(tmp_path, tiny_arch):
    b = build_model("t-load", arch=tiny_arch)
    export_model(b.model, b.model_cfg, b.preprocess_cfg, tmp_path / "run" / "export")
    ref = _outputs(b.model, b.tokenizer)
    for spec in (tmp_path / "run", tmp_path / "run" / "export", f"local-dir:{tmp_path / 'run' / 'export'}"):
        got = load_model(spec)
        torch.testing.assert_close(_outputs(got.model, got.tokenizer)[0], ref[0])


def test_load_model_wants_weights_for_an_open_clip_name(tiny_arch):
    """An architecture name alone would evaluate random weights: refused, naming the tags, unless
    pretrained="random" asks for them."""
    with pytest.raises(ValueError, match=r"'ViT-B-32' is an open_clip architecture without weights"
                                         r".*openai.*laion2b_s34b_b79k.*pretrained=random"):
        load_model("ViT-B-32")
    build_model("t-random", arch=tiny_arch)  # registers the name with open_clip
    with pytest.raises(ValueError, match="open_clip has no tags for it"):
        load_model("t-random")
    b = load_model("t-random", pretrained="random")
    assert b.tokenizer(["x"]).shape == (1, 16)
    with pytest.raises(ValueError, match="model.name='runs/nothing-here'"):
        load_model("runs/nothing-here")


def test_lock_towers(tiny_arch):
    b = build_model("t-lock", arch=tiny_arch, lock_image=True, lock_image_unlocked_groups=1,
                    lock_text=True, lock_text_unlocked_layers=2)
    m = b.model
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "visual.conv1.weight" not in trainable
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" not in trainable
    assert any(n.startswith("visual.") for n in trainable)  # the last group stays unlocked
    assert "token_embedding.weight" not in trainable
    assert "transformer.resblocks.0.attn.in_proj_weight" not in trainable
    # open_clip counts the projection as the last group, the last block (+ ln_final) before it
    assert "transformer.resblocks.1.attn.in_proj_weight" in trainable
    assert "ln_final.weight" in trainable and "text_projection" in trainable


@pytest.mark.parametrize("unlocked", [0, 2])
def test_lock_hf_text_tower_unlocks_last_layers(unlocked, minilm_arch):
    """MiniLM (BERT) tower: exactly its last N encoder layers + the projection train, and every
    trainable weight gets a gradient (no unused parameters for DDP)."""
    b = build_model(f"t-minilm-lock{unlocked}", arch=minilm_arch, lock_text=True,
                    lock_text_unlocked_layers=unlocked)
    m = b.model
    text = {n: p.requires_grad for n, p in m.named_parameters() if n.startswith("text.")}
    expected = {n for n in text if n.startswith("text.proj")} | {
        n for n in text for i in range(6 - unlocked, 6) if n.startswith(f"text.transformer.encoder.layer.{i}.")
    }
    assert {n for n, t in text.items() if t} == expected
    m.zero_grad()
    feats = m.encode_text(b.tokenizer(["red heart", "grinning face"]), normalize=True)
    (feats @ m.encode_image(torch.randn(2, 3, 32, 32), normalize=True).T).sum().backward()
    no_grad = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None and n != "logit_scale"]
    assert not no_grad
    with pytest.raises(ValueError, match="model.lock_text_unlocked_layers=7"):
        build_model("t-minilm-lock7", arch=minilm_arch, lock_text=True, lock_text_unlocked_layers=7)


def test_errors_name_the_key(tiny_arch):
    with pytest.raises(ValueError, match="model.name='ViT-Q-99'"):
        build_model("ViT-Q-99")
    with pytest.raises(FileNotFoundError, match="model.pretrained='nope'"):
        build_model("RN50", pretrained="nope")
    b = build_model("t-nobias", arch=tiny_arch)
    with pytest.raises(ValueError, match="loss.add_logit_bias"):
        ensure_logit_bias(b.model, -10.0, add=False)
    ensure_logit_bias(b.model, -10.0, add=True)
    assert b.model.logit_bias.item() == -10.0


def test_grad_checkpointing_same_gradients(tiny_arch):
    torch.manual_seed(0)
    a = build_model("t-gc", arch=tiny_arch)
    b = build_model("t-gc", arch=tiny_arch, grad_checkpointing=True)
    b.model.load_state_dict(a.model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    t = a.tokenizer(["a", "b", "c", "d"])
    for m in (a.model, b.model):
        m.train()
        (m.encode_image(x, normalize=True) @ m.encode_text(t, normalize=True).T).sum().backward()
    ga = a.model.visual.conv1.weight.grad
    gb = b.model.visual.conv1.weight.grad
    torch.testing.assert_close(ga, gb)


def _lite0_arch(tiny_arch):
    return {"embed_dim": 32, "text_cfg": dict(tiny_arch["text_cfg"]),
            "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                           "timm_pool": "avg", "timm_proj": "linear", "image_size": 64}}


def test_pretrained_image_tower_offline(tmp_path, tiny_arch):
    """image_tower_weights=efficientnet_lite0: the ImageNet trunk (cliptune.towers' mapping), its
    normalisation, locking, and a reload from a checkpoint spec or an export that does not reload it."""
    towers = pytest.importorskip("cliptune.towers")
    pytest.importorskip(towers.WEIGHTS_PACKAGE)
    arch = _lite0_arch(tiny_arch)
    b = build_model("t-lite0", arch=arch, image_tower_weights="efficientnet_lite0", lock_image=True,
                    lock_image_freeze_bn_stats=True)
    from helpers_towers import lite0_timm_state_dict

    ref = lite0_timm_state_dict()
    trunk = b.model.visual.trunk.state_dict()
    for k, v in trunk.items():
        if k in ref and not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
    assert b.preprocess_cfg["mean"] == b.preprocess_cfg["std"] == (0.5, 0.5, 0.5)
    assert b.preprocess_val.transforms[-1].mean == (0.5, 0.5, 0.5)
    trainable = {n for n, p in b.model.visual.named_parameters() if p.requires_grad}
    assert trainable == {"head.proj.weight"}  # LiT: the trunk is frozen, its projection trains
    # a checkpoint's spec rebuilds the architecture without loading the file again (weights come from the ckpt)
    spec = {**b.spec, "image_tower_weights": None, "arch": arch}
    scratch = build_model(**{**spec, "name": "t-lite0-b"})
    assert not torch.equal(scratch.model.visual.trunk.conv_stem.weight, b.model.visual.trunk.conv_stem.weight)
    # an export keeps the statistics and the trunk
    out = export_model(b.model, b.model_cfg, b.preprocess_cfg, tmp_path / "export", tokenizer=b.tokenizer)
    back = load_model(out)
    assert tuple(back.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    torch.testing.assert_close(back.model.visual.trunk.conv_stem.weight, b.model.visual.trunk.conv_stem.weight)
    with pytest.raises(ValueError, match="image_tower_weights"):
        build_model("t-lite0-c", arch=arch, image_tower_weights="resnet")


def test_frozen_batchnorm_keeps_the_timm_activation(tiny_arch):
    """lock_image_freeze_bn_stats on a timm trunk with BatchNormAct2d (EfficientNet): the frozen tower
    computes what the unfrozen one does in eval mode (open_clip's own freezing drops the activation)."""
    arch = _lite0_arch(tiny_arch)
    torch.manual_seed(0)
    plain = build_model("t-bn-a", arch=arch, lock_image=True)
    frozen = build_model("t-bn-b", arch=arch, lock_image=True, lock_image_freeze_bn_stats=True)
    frozen.model.load_state_dict(plain.model.state_dict(), strict=False)
    images = torch.randn(4, 3, 64, 64)
    plain.model.eval()
    frozen.model.train()  # frozen statistics: train mode must not matter
    with torch.no_grad():
        torch.testing.assert_close(frozen.model.visual(images), plain.model.visual(images))
    partial = build_model("t-bn-c", arch=arch, lock_image=True, lock_image_unlocked_groups=1,
                          lock_image_freeze_bn_stats=True)
    kinds = {type(m).__name__ for m in partial.model.visual.trunk.blocks[0].modules()}
    assert "FrozenBatchNormAct2d" in kinds  # locked groups frozen...
    assert type(partial.model.visual.trunk.bn2).__name__ == "BatchNormAct2d"  # ...the unlocked head group not
