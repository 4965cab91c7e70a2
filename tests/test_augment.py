"""Training-image augmentation presets (cliptune.data.augment) and their place in the loader."""

from __future__ import annotations

import io
import logging

import numpy as np
import open_clip
import pytest
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from PIL import Image
from torchvision import transforms

from cliptune import validate
from cliptune.data import augment as aug
from cliptune.data.datamodule import WdsDataModule
from cliptune.data.decode import seeded_transform
from conftest import initialize_configs
from helpers_shards import char_tokenizer, make_sample, tiny_transform, train_loader, write_shards

SIZE = 32


def pattern(w: int = 40, h: int = 30, shift: int = 0) -> Image.Image:
    """An image that every crop, flip and colour change alters: a colour gradient with an off-centre block."""
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    a = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                        np.full((h, w, 1), (60 + 40 * shift) % 256)], axis=2).astype(np.uint8)
    a[5:12, 4:10] = (250, 30, 30)
    return Image.fromarray(a)


def model_transform() -> transforms.Compose:
    """open_clip's training transform at 32 px (random resized crop, RGB, tensor, normalise)."""
    return open_clip.image_transform(SIZE, is_train=True)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("preset", aug.PRESETS)
@pytest.mark.parametrize("flip", aug.FLIP_MODES)
def test_each_preset_keeps_the_model_output(preset, flip):
    a = aug.Augment(preset, flip)
    img = pattern()
    out = a(img, ["a cat"])
    assert isinstance(out, Image.Image) and out.size == img.size and out.mode == "RGB"
    x = seeded_transform(model_transform(), img, 7, a, ["a cat"])
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_none_is_the_model_transform_bit_for_bit():
    t, img = model_transform(), pattern()
    assert aug.build_augment("none", False) is None  # the loader gets no augmentation at all
    for seed in range(5):
        plain = seeded_transform(t, img, seed)
        # a no-op Augment draws nothing from the RNG either: the model's own crop stays the same
        assert torch.equal(seeded_transform(t, img, seed, aug.Augment("none", False), ["x"]), plain)


def test_strong_and_light_differ_from_none_and_from_each_other():
    t, img = model_transform(), pattern()
    for seed in range(3):
        none = seeded_transform(t, img, seed)
        light = seeded_transform(t, img, seed, aug.Augment("light"), ())
        strong = seeded_transform(t, img, seed, aug.Augment("strong"), ())
        assert not torch.equal(none, light) and not torch.equal(none, strong) and not torch.equal(light, strong)


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_same_seed_same_tensor(preset):
    t, img, a = model_transform(), pattern(), aug.Augment(preset, True)
    torch.manual_seed(123)
    first = [seeded_transform(t, img, s, a, ["dog"]) for s in range(6)]
    torch.rand(17)  # whatever the process drew in between
    again = [seeded_transform(t, img, s, a, ["dog"]) for s in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert len({x.numpy().tobytes() for x in first}) == 6  # and different seeds give different images


def test_unknown_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"data.augment='heavy'.*none, light, strong"):
        aug.Augment("heavy")
    with pytest.raises(ValueError, match=r"data.augment_flip='sometimes'.*auto, true or false"):
        aug.Augment("light", "sometimes")
    with pytest.raises(ValueError, match=r"data.augment='heavy'"):
        WdsDataModule(train=str(tmp_path), augment="heavy", tokenizer=char_tokenizer,
                      train_transform=tiny_transform(), val_transform=tiny_transform())
    assert aug.check_flip("true") is True and aug.check_flip("False") is False and aug.check_flip("auto") == "auto"


def test_validate_knows_the_presets(monkeypatch):
    # cliptune.validate may not import cliptune.data (it sits below it): its copies must match
    assert validate.AUGMENT_PRESETS == aug.PRESETS
    assert validate.AUGMENT_FLIP == aug.FLIP_MODES
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # as run(cfg) outside Hydra
    wds = ["data=wds", "data.train=some/path/train.json"]
    with initialize_configs():
        good = compose(config_name="train", overrides=[*wds, "data.augment=strong", "data.augment_flip=auto"])
        bad = compose(config_name="train", overrides=[*wds, "data.augment=heavy", "data.augment_flip=yes"])
        default = compose(config_name="train", overrides=wds)
    assert (default.data.augment, default.data.augment_flip) == ("none", False)
    validate.validate_train_config(good)
    with pytest.raises(validate.ConfigError) as info:
        validate.validate_train_config(bad)
    assert info.value.problems == [
        "data.augment='heavy': must be one of none, light, strong; set data.augment=<one of them>, "
        "e.g. data.augment=none",
        "data.augment_flip='yes': must be one of auto, true, false; set data.augment_flip=<one of them>, "
        "e.g. data.augment_flip=auto",
    ]


# ------------------------------------------------------------------------------------------ flips


@pytest.mark.parametrize("text, direction", [
    ("arrow pointing left", True), ("left_arrow", True), ("right-facing fist", True), ("RIGHTWARDS ARROW", True),
    ("counterclockwise arrows button", True), ("anticlockwise", True), ("向右箭头", True), ("左", True),
    ("westward", True), ("bright sun", False), ("copyright", False), ("upright piano", False),
    ("a cat on a mat", False), ("西瓜", False), ("leftover", False),
])
def test_mentions_direction(text, direction):
    assert aug.mentions_direction([text]) is direction
    assert aug.mentions_direction(["a dog", text]) is direction


def test_flip_modes():
    img = pattern()
    mirrored = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    def outcomes(flip: str | bool, texts: list[str]) -> set[str]:
        a, seen = aug.Augment("none", flip), set()
        for seed in range(24):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out = a(img, texts)
            seen.add("same" if out.tobytes() == img.tobytes() else "mirrored" if out.tobytes() == mirrored.tobytes()
                     else "other")
        return seen

    assert outcomes(False, ["a cat"]) == {"same"}
    assert outcomes(True, ["arrow pointing left"]) == {"same", "mirrored"}
    assert outcomes("auto", ["a cat", "un chat"]) == {"same", "mirrored"}
    assert outcomes("auto", ["a cat", "cat looking left"]) == {"same"}  # any of the sample's texts counts


def test_describe_names_every_step():
    line = aug.Augment("strong", "auto").describe()
    for part in ("data.augment=strong", "resized crop (area 0.35..1", "TrivialAugmentWide", "colour jitter",
                 "grayscale p=0.2", "gaussian blur", "data.augment_flip=auto", "model's training transform"):
        assert part in line, (part, line)
    assert "flip (data.augment_flip=false): off" in aug.Augment("light").describe()


# ------------------------------------------------------------------------------------------ in the loader


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    out = tmp_path_factory.mktemp("textured")
    samples = [make_sample(f"t{i:03d}", {"en": [f"thing {i}"]}, ext="png", image=png(pattern(shift=i)))
               for i in range(24)]
    write_shards(out, samples, 8, split="train")
    return out


def _loader(spec, augment=None, **kw):
    return train_loader(str(spec), 4, workers=0, rank=0, world_size=1,
                        persistent_workers=False, sample_shuffle=8, seed=3, augment=augment, **kw)


def _images(loader) -> list[torch.Tensor]:
    return [b["image"] for b in loader]


def test_loader_augments_per_sample_position_and_resumes_exactly(textured):
    strong = aug.Augment("strong", "auto")
    plain = _images(_loader(textured))
    first = _images(_loader(textured, strong))
    assert len(first) == 6 and all(x.shape == (4, 3, 16, 16) for x in first)
    assert all(not torch.equal(a, b) for a, b in zip(plain, first))  # augmented ...
    torch.manual_seed(999)  # ... and independent of the process's RNG state
    assert all(torch.equal(a, b) for a, b in zip(first, _images(_loader(textured, strong))))
    # a resumed stream continues with the same augmented images
    loader = _loader(textured, strong)
    batches = list(loader)
    worker, made, raw = batches[2]["data_pos"].tolist()
    resumed = _loader(textured, strong)
    resumed.dataset.resume_from(epoch=0, batches=3, positions={worker: (made, raw)})
    rest = _images(resumed)
    assert len(rest) == 3 and all(torch.equal(a, b) for a, b in zip(rest, first[3:]))
    # none: exactly the loader without augmentation
    assert all(torch.equal(a, b) for a, b in zip(plain, _images(_loader(textured, aug.build_augment("none")))))


def test_datamodule_builds_and_logs_the_preset(textured, caplog):
    logger = logging.getLogger("cliptune")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="cliptune")
    try:
        dm = WdsDataModule(train=str(textured), batch_size=4, workers=0, sample_shuffle=8, seed=3, augment="strong",
                           augment_flip="auto", tokenizer=char_tokenizer, train_transform=tiny_transform(),
                           val_transform=tiny_transform(), persistent_workers=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records if "training images" in r.getMessage()] == [
        "training images: " + aug.Augment("strong", "auto").describe()]
    got = _images(dm.train_dataloader())
    assert all(torch.equal(a, b) for a, b in zip(got, _images(_loader(textured, aug.Augment("strong", "auto")))))
    assert WdsDataModule(train=str(textured), tokenizer=char_tokenizer, train_transform=tiny_transform(),
                         val_transform=tiny_transform()).settings.decode.augment is None  # default: none
