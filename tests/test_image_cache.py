"""FrozenImageCache: a frozen image trunk's features computed once per image, equal to the tower's own
output, gradients reaching the trainable projection only; and when cliptune-train turns it on."""

from __future__ import annotations

import pytest
import torch

from cliptune.models import build_model
from cliptune.train.module import FrozenImageCache


def _arch(tiny_arch):
    return {"embed_dim": 16, "text_cfg": dict(tiny_arch["text_cfg"]),
            "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                           "timm_pool": "avg", "timm_proj": "linear", "image_size": 32}}


@pytest.fixture
def locked(tiny_arch):
    return build_model("t-imgcache", arch=_arch(tiny_arch), lock_image=True).model


def test_applies_only_to_a_frozen_trunk(tiny_arch, locked):
    assert FrozenImageCache.applies(locked)
    unlocked = build_model("t-imgcache-u", arch=_arch(tiny_arch), lock_image=True, lock_image_unlocked_groups=1).model
    assert not FrozenImageCache.applies(unlocked)
    assert not FrozenImageCache.applies(build_model("t-imgcache-v", arch=tiny_arch).model)  # a ViT training whole
    vit = build_model("t-imgcache-w", arch=tiny_arch, lock_image=True).model  # open_clip locks a ViT whole
    assert FrozenImageCache.applies(vit)


def test_cached_features_equal_the_tower_and_train_the_head(locked):
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    images[3] = images[0]  # a repeated image in one batch
    cache = FrozenImageCache(locked.visual)
    locked.visual.eval()
    with torch.no_grad():
        ref = locked.visual(images)
    got = cache(images)
    torch.testing.assert_close(got, ref)
    assert (cache.misses, cache.hits, len(cache.store)) == (5, 1, 5)
    again = cache(images.flip(0))  # every image seen before: no trunk call
    torch.testing.assert_close(again, ref.flip(0))
    assert (cache.misses, cache.hits) == (5, 7)
    again.sum().backward()
    grads = {n for n, p in locked.visual.named_parameters() if p.grad is not None}
    assert grads == {"head.proj.weight"}
    locked.visual.head.proj.weight.grad = None


def test_bounded_least_recently_used(locked):
    cache = FrozenImageCache(locked.visual, max_bytes=3 * (16 + 1280 * 4))  # three entries
    images = torch.randn(5, 3, 32, 32)
    cache.features(images)
    assert len(cache.store) == 3 and cache.nbytes <= cache.max_bytes
    cache.features(images[4:5])  # the newest is still there
    assert cache.hits == 1
    with pytest.raises(ValueError, match="max_bytes"):
        FrozenImageCache(locked.visual, max_bytes=-1)


def test_train_turns_it_on_with_the_eval_transform(tiny_arch):
    from conftest import compose_train

    from cliptune.train import run as train_run

    bundle = build_model("t-imgcache-x", arch=_arch(tiny_arch), lock_image=True)
    cfg = compose_train(["data=synthetic"])
    assert train_run.caches_images(cfg, bundle)
    module = train_run.build_module(cfg, bundle)
    assert module.image_cache is not None
    # the keys are taken on the host, before the copy to the device, in training only; they are the images' own
    images = torch.randn(4, 3, 32, 32)
    module.train()
    moved = module.transfer_batch_to_device({"image": images}, torch.device("cpu"), 0)
    assert moved["image_key"] == FrozenImageCache.keys(images) and len(set(moved["image_key"])) == 4
    torch.testing.assert_close(module.image_cache(images, moved["image_key"]), module.image_cache(images))
    module.eval()
    assert "image_key" not in module.transfer_batch_to_device({"image": images}, torch.device("cpu"), 0)
    assert not train_run.caches_images(compose_train(["data=synthetic", "cache_frozen_image=false"]), bundle)
    wds = compose_train(["data=wds", "data.train=x", "data.augment=strong"])
    assert not train_run.caches_images(wds, bundle)  # augmented images would never hit


def test_host_keys_follow_the_micro_batches(tiny_arch):
    """With accum_steps, each micro-batch reads its own slice of the host keys: the same loss and gradient
    as hashing each micro-batch's images in the step."""
    from conftest import compose_train

    from cliptune.train import run as train_run

    torch.manual_seed(0)
    bundle = build_model("t-imgcache-y", arch=_arch(tiny_arch), lock_image=True)
    module = train_run.build_module(compose_train(["data=synthetic", "accum_steps=2", "batch_size=4"]), bundle)
    module.train()
    batch = {"image": torch.randn(4, 3, 32, 32), "text": torch.randint(1, 100, (4, 8))}
    head = module.model.visual.head.proj.weight
    results = []
    for b in (batch, module.transfer_batch_to_device(batch, torch.device("cpu"), 0)):
        head.grad = None
        loss = module.contrastive_backward(b, lambda x: x.backward())
        results.append((loss, head.grad.clone()))
    assert "image_key" not in batch
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
