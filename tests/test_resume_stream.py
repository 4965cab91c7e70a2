"""Exact resume of the training streams: a loader restarted from the position of the last trained
batch yields exactly the batches the uninterrupted loader would have yielded next."""

from __future__ import annotations

import pytest
import torch

from cliptune.data.synthetic import SyntheticDataModule
from helpers_shards import (basic_samples, char_tokenizer, image_bytes, make_sample, tiny_transform, train_loader,
                            write_shards)

EPOCH = 3


def _loader(spec, workers, resampled, epoch=EPOCH, **kw):
    return train_loader(spec, 4, workers=workers, samples_per_epoch=48,
                        resampled=resampled, sample_shuffle=8, seed=7, rank=0, world_size=1,
                        persistent_workers=False, epoch_fn=lambda: epoch, **kw)


def _positions(batches: list[dict]) -> dict[int, tuple[int, int]]:
    """What the trainer records: the last position of each worker among the trained batches."""
    pos: dict[int, tuple[int, int]] = {}
    for b in batches:
        worker, made, raw = b["data_pos"].tolist()
        pos[worker] = (made, raw)
    return pos


def _same(a: dict, b: dict) -> None:
    for key in ("image", "text", "group", "skipped", "data_pos"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume_shards")
    samples = basic_samples(30, prefix="r")
    samples[4] = make_sample("r00004", i=4, image=b"not an image")  # skips move batch boundaries
    samples[17] = make_sample("r00017", i=17, image=image_bytes(17, size=64)[:200])
    write_shards(path, samples, 6)
    return path


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("k", [1, 5, 11])
def test_wds_loader_resumes_exactly_after_k_batches(shards, workers, resampled, k):
    reference = list(_loader(shards, workers, resampled))
    assert len(reference) == 12
    resumed_loader = _loader(shards, workers, resampled)
    resumed_loader.dataset.resume_from(EPOCH, k, _positions(reference[:k]))
    resumed = list(resumed_loader)
    assert len(resumed) == 12 - k
    for a, b in zip(resumed, reference[k:]):
        _same(a, b)
    # the resume applies to its epoch only: the next epoch is whole again
    nxt = _loader(shards, workers, resampled, epoch=EPOCH + 1)
    nxt.dataset.resume_from(EPOCH, k, _positions(reference[:k]))
    assert len(list(nxt)) == 12


def test_wds_epochs_differ_and_repeat(shards):
    a = [b["text"] for b in _loader(shards, 0, True)]
    b = [b["text"] for b in _loader(shards, 0, True)]
    c = [b["text"] for b in _loader(shards, 0, True, epoch=EPOCH + 1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


class _Trainer:
    """The two attributes the data module reads while training."""

    def __init__(self, epoch: int) -> None:
        self.current_epoch, self.training = epoch, True
        self.global_rank, self.world_size = 0, 1


@pytest.mark.parametrize("k", [1, 6])
def test_synthetic_module_state_round_trip_resumes_exactly(k):
    def make():
        dm = SyntheticDataModule(num_samples=64, val_samples=8, batch_size=4, tokenizer=char_tokenizer,
                                 train_transform=tiny_transform(), val_transform=tiny_transform())
        dm.trainer = _Trainer(EPOCH)
        return dm

    dm = make()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(EPOCH)
    reference = list(loader)
    for b in reference[:k]:
        dm.on_before_batch_transfer(b, 0)  # what the trainer moves to the device for a step
    state = dm.state_dict()
    assert state["epoch"] == EPOCH and state["batches"] == k

    fresh = make()
    fresh.load_state_dict(state)
    loader = fresh.train_dataloader()
    loader.sampler.set_epoch(EPOCH)
    resumed = list(loader)
    assert len(resumed) == len(reference) - k
    for a, b in zip(resumed, reference[k:]):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        assert torch.equal(a["text"], b["text"])
