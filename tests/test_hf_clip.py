"""AltCLIP through cliptune.hf_clip, offline: a tiny randomly initialised AltCLIPModel and an XLM-R
tokenizer trained here on a few en/zh sentences stand in for BAAI/AltCLIP (same classes, same files)."""

from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
import torch
import transformers
from hydra.utils import instantiate
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from cliptune import hf_clip
from cliptune.lora import apply_lora, merged_copy
from cliptune.models import build_model, ensure_logit_bias, export_model, load_model
from cliptune.rundir import RunDir
from cliptune.train.losses import ClipLoss, SigLipLoss
from cliptune.train.module import ContrastiveModule
from cliptune.train.optim import OptimConfig
from conftest import compose_train

SENTENCES = ["a photo of a cat", "a red car on the street", "two birds in the sky", "a dog playing in the park",
             "一只猫的照片", "街上的红色汽车", "天空中的两只鸟", "在公园里玩耍的狗"]
CAPTIONS = ["a cat", "一只猫", "a red car in the park", "两只鸟"]
CTX = 24  # the tiny vocabulary splits captions finely: every caption fits


def _features(out) -> torch.Tensor:
    """transformers >= 5 returns an output object (pooler_output), older versions the tensor."""
    return getattr(out, "pooler_output", out)


@pytest.fixture(scope="module")
def altclip_dir(tmp_path_factory):
    """A Hub-style AltCLIP folder: config.json, weights, XLM-R tokenizer, CLIP image processor."""
    folder = tmp_path_factory.mktemp("altclip")
    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids 0..4 (pad 1, as the text config)
    trained.train_from_iterator(SENTENCES * 4, trainers.UnigramTrainer(vocab_size=100, special_tokens=specials,
                                                                       unk_token="<unk>"))
    vocab = [(piece, score) for piece, score in json.loads(trained.to_str())["model"]["vocab"]]
    tokenizer = transformers.XLMRobertaTokenizer(vocab=vocab)
    config = transformers.AltCLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "intermediate_size": 64, "project_dim": 32, "max_position_embeddings": 40,
                     "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    transformers.AltCLIPModel(config).save_pretrained(folder)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                      image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    transformers.AltCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _preset(folder, *overrides):
    """``model=altclip`` as cliptune-train composes it, with the tiny folder as model.name."""
    cfg = compose_train(["model=altclip", f"model.name={folder}", f"model.context_length={CTX}", *overrides])
    return instantiate(cfg.model, _convert_="all")


def _images(n=4, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _embed(model, bundle, images):
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(bundle.tokenizer(CAPTIONS))


def _perturb(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _reference(folder, images):
    """What plain transformers computes for the folder (its own processor pads to the longest caption)."""
    ref = transformers.AltCLIPModel.from_pretrained(folder).eval()
    inputs = transformers.AutoProcessor.from_pretrained(folder)(text=CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return (_features(ref.get_image_features(pixel_values=images)),
                _features(ref.get_text_features(input_ids=inputs["input_ids"],
                                                attention_mask=inputs["attention_mask"])))


def test_names_it_handles(altclip_dir, tmp_path):
    assert hf_clip.is_hub_name("BAAI/AltCLIP") and hf_clip.is_hub_name("BAAI/AltCLIP-m9")
    assert not any(hf_clip.handles(n) for n in ("ViT-B-32", "xlm-roberta-base-ViT-B-32", "laion/CLIP-ViT-B-32",
                                                "cliptune-tiny", str(tmp_path)))
    assert hf_clip.handles(str(altclip_dir)) and hf_clip.handles(f"local-dir:{altclip_dir}")


def test_preset_builds_the_model_transformers_builds(altclip_dir):
    bundle = _preset(altclip_dir)
    assert isinstance(bundle.model, hf_clip.HFCLIP)
    tokens = bundle.tokenizer(CAPTIONS)
    assert tokens.dtype == torch.long and tokens.shape == (len(CAPTIONS), CTX)
    assert bundle.preprocess_cfg["size"] == 32 and bundle.preprocess_cfg["mean"] == (0.5, 0.4, 0.3)
    photo = Image.new("RGB", (50, 40), (200, 30, 30))
    assert bundle.preprocess_val(photo).shape == bundle.preprocess_train(photo).shape == (3, 32, 32)
    images = _images()
    img, txt = _embed(bundle.model, bundle, images)
    ref_img, ref_txt = _reference(altclip_dir, images)
    torch.testing.assert_close(img, ref_img)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-4)  # fixed-length padding is masked out
    assert bundle.model.logit_bias is None
    assert {n.split(".")[0] for n, _ in bundle.model.named_parameters()} == {"visual", "text", "logit_scale"}


def test_pretrained_null_initialises_from_the_config(altclip_dir):
    loaded = build_model(str(altclip_dir), pretrained=True)
    torch.manual_seed(123)  # the folder's weights were drawn with seed 0
    fresh = build_model(str(altclip_dir), pretrained=None, init_logit_scale=1.5, init_logit_bias=-3.0)
    assert fresh.model.logit_scale.item() == 1.5 and fresh.model.logit_bias.item() == -3.0
    w = "visual.visual_projection.weight"
    assert not torch.equal(loaded.model.state_dict()[w], fresh.model.state_dict()[w])
    assert loaded.model.logit_bias is None  # pretrained weights keep their own temperature, no bias


def test_errors_name_the_key(altclip_dir):
    with pytest.raises(ValueError, match="model.arch"):
        build_model(str(altclip_dir), pretrained=True, arch={"embed_dim": 8})
    with pytest.raises(ValueError, match="model.image_size=64"):
        build_model(str(altclip_dir), pretrained=True, image_size=64)
    assert build_model(str(altclip_dir), image_size=64).preprocess_cfg["size"] == 64  # random weights: any size
    with pytest.raises(ValueError, match="model.lock_text_unlocked_layers=3"):
        build_model(str(altclip_dir), pretrained=True, lock_text=True, lock_text_unlocked_layers=3)
    with pytest.raises(ValueError, match="model.context_length=39: .* 1..38 tokens"):
        build_model(str(altclip_dir), pretrained=True, context_length=39)
    with pytest.raises(OSError, match="(?s)model.name='BAAI/AltCLIP-not-cached'.*downloaded once"):
        build_model("BAAI/AltCLIP-not-cached", pretrained=True)  # offline here (conftest): not in the cache


def _trainable(model, prefix):
    return {n[len(prefix):] for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefix)}


def test_locking_leaves_the_expected_parameters_trainable(altclip_dir):
    model = build_model(str(altclip_dir), pretrained=True, lock_image=True, lock_image_unlocked_groups=1,
                        lock_text=True, lock_text_unlocked_layers=1).model
    assert _trainable(model, "visual.") == {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias",
                                            "visual_projection.weight"}
    text = _trainable(model, "text.")
    assert {n for n in text if ".layers.0." in n or ".layer.0." in n or "embeddings" in n} == set()
    last = {n for n, _ in model.named_parameters() if n.startswith("text.") and (".layers.1." in n or ".layer.1." in n)}
    head = {"text_model.pre_LN.weight", "text_model.pre_LN.bias", "text_model.transformation.weight",
            "text_model.transformation.bias", "text_projection.weight"}
    assert text == {n[len("text."):] for n in last} | head
    assert model.logit_scale.requires_grad
    model = build_model(str(altclip_dir), pretrained=True, lock_image=True, lock_text=True,
                        lock_text_freeze_layer_norm=False).model
    assert _trainable(model, "visual.") == set()
    assert "text_model.roberta.embeddings.LayerNorm.weight" in _trainable(model, "text.")
    assert not any("query" in n for n in _trainable(model, "text."))


def _fit_one_step(module, bundle):
    batch = {"image": _images(), "text": bundle.tokenizer(CAPTIONS)}
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_one_training_step_then_reload_the_checkpoint(altclip_dir, tmp_path, loss):
    bundle = _preset(altclip_dir, f"loss={loss}")
    model = bundle.model
    if loss == "siglip":
        ensure_logit_bias(model, -5.0, add=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = ContrastiveModule(model, ClipLoss() if loss == "clip" else SigLipLoss(),
                               optim=OptimConfig(lr=1e-3, warmup_steps=0), model_spec=bundle.spec)
    trainer = _fit_one_step(module, bundle)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    after = model.state_dict()
    for key in ("visual.vision_model.encoder.layers.0.self_attn.q_proj.weight", "visual.visual_projection.weight",
                "text.text_projection.weight", "logit_scale"):
        assert not torch.equal(before[key], after[key]), key
    assert any("query" in k and not torch.equal(before[k], after[k]) for k in after)
    if loss == "siglip":
        assert model.logit_bias.item() != -5.0
    run = RunDir(tmp_path / "run")
    trainer.save_checkpoint(run.last_ckpt)
    reloaded = load_model(run.path, allow=[str(altclip_dir)])  # the checkpoint names a folder outside the run
    images = _images()
    for a, b in zip(_embed(model, bundle, images), _embed(reloaded.model, reloaded, images)):
        torch.testing.assert_close(a, b)
    assert (reloaded.model.logit_bias is None) == (loss == "clip")


def test_lora_adapts_both_towers_and_merges(altclip_dir, tmp_path):
    bundle = build_model(str(altclip_dir), pretrained=True, context_length=CTX)
    model = bundle.model
    base_keys = set(model.state_dict())
    apply_lora(model, r=4, alpha=8)  # lora=default's targets: open_clip names map to AltCLIP's
    adapted = {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "query", "key", "value", "dense"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n == "logit_scale" for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    images, tokens = _images(), bundle.tokenizer(CAPTIONS)
    for _ in range(3):
        opt.zero_grad()
        logits = model.encode_image(images, normalize=True) @ model.encode_text(tokens, normalize=True).T * 10
        torch.nn.functional.cross_entropy(logits, torch.arange(len(CAPTIONS))).backward()
        opt.step()
    ref = _embed(model, bundle, images)
    merged = merged_copy(model)
    assert set(merged.state_dict()) == base_keys
    for a, b in zip(ref, _embed(merged, bundle, images)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    out = export_model(merged, bundle.model_cfg, bundle.preprocess_cfg, tmp_path / "export", tokenizer=bundle.tokenizer)
    torch.testing.assert_close(_reference(out, images)[0], ref[0], atol=1e-5, rtol=1e-4)


def test_export_loads_in_transformers_and_cliptune_wherever_it_is(altclip_dir, tmp_path):
    bundle = build_model(str(altclip_dir), pretrained=True, context_length=CTX)
    model = bundle.model
    ensure_logit_bias(model, -4.0, add=True)
    _perturb(model)  # the export must hold these weights, not the folder's
    images = _images()
    img, txt = _embed(model, bundle, images)
    run = RunDir(tmp_path / "run")
    out = export_model(model, bundle.model_cfg, bundle.preprocess_cfg, run.export, tokenizer=bundle.tokenizer)
    assert {"config.json", "model.safetensors", "tokenizer.json", hf_clip.MARKER} <= {p.name for p in out.iterdir()}
    for path in out.glob("*.json"):
        assert str(tmp_path) not in path.read_text() and str(altclip_dir) not in path.read_text(), path.name
    assert len(transformers.AutoTokenizer.from_pretrained(out)("a cat")["input_ids"]) < CTX  # not fixed-length
    ref_img, ref_txt = _reference(out, images)  # plain transformers, its own processor
    torch.testing.assert_close(ref_img, img)
    torch.testing.assert_close(ref_txt, txt, atol=1e-5, rtol=1e-4)
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(str(run.path), moved)
    for source in (moved / "export", moved):  # the export, and the run directory holding it
        loaded = load_model(source)
        assert loaded.model.logit_bias.item() == pytest.approx(model.logit_bias.item())
        assert loaded.tokenizer(CAPTIONS).shape == (len(CAPTIONS), CTX)
        assert loaded.preprocess_cfg == bundle.preprocess_cfg
        for a, b in zip((img, txt), _embed(loaded.model, loaded, images)):
            torch.testing.assert_close(a, b)


def test_grad_checkpointing_gives_the_same_gradients(altclip_dir):
    grads = []
    for on in (False, True):
        bundle = build_model(str(altclip_dir), pretrained=True, context_length=CTX, grad_checkpointing=on)
        model = bundle.model.train()
        logits = model.encode_image(_images(), normalize=True) @ model.encode_text(bundle.tokenizer(CAPTIONS),
                                                                                   normalize=True).T
        logits.logsumexp(1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
