"""Synthetic (image, caption) pairs that a tiny model can learn in seconds: tests and smoke runs.

Each sample shows one coloured square at one of nine grid cells on a noisy background, and its
captions name both ("a red square in the top left"). 8 colours x 9 cells = 72 concepts, so
retrieval is learnable but far from trivial, and samples of the same concept form groups
(``batch["group"]``) for multi-positive losses. Images go through the model's own transforms,
exactly as decoded shard images do, and batches follow the same contract as the WebDataset
loaders (:func:`cliptune.data.decode.collate_train` / ``collate_eval``).

    cliptune-train data=synthetic data.num_samples=4096

Ranks split the data themselves (``use_distributed_sampler = False``): training draws an equal
number of batches per rank; validation shows every sample to exactly one rank.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cliptune.data.datamodule import ResumableTrainData
from cliptune.data.decode import collate_eval, collate_train, seeded_transform

COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
    "purple": (140, 50, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
CELLS = ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]
TEMPLATES = ["a {c} square in the {p}", "{p}: a {c} block", "there is a {c} square, {p}"]
N_CONCEPTS = len(COLORS) * len(CELLS)


def concept_name(concept: int) -> str:
    color, cell = divmod(concept, len(CELLS))
    return f"{list(COLORS)[color]} square, {CELLS[cell]}"


def render(concept: int, seed: int, size: int = 64) -> Image.Image:
    """The image of ``concept``: a coloured square in its grid cell over seeded noise."""
    rng = np.random.default_rng(seed)
    color, cell = divmod(concept, len(CELLS))
    img = rng.integers(60, 140, size=(size, size, 3), dtype=np.uint8)
    r, c = divmod(cell, 3)
    side = size // 3
    jitter = rng.integers(-side // 8, side // 8 + 1, size=2)
    y0 = int(np.clip(r * side + side // 6 + jitter[0], 0, size - side // 1.5))
    x0 = int(np.clip(c * side + side // 6 + jitter[1], 0, size - side // 1.5))
    s = int(side / 1.5)
    img[y0 : y0 + s, x0 : x0 + s] = COLORS[list(COLORS)[color]]
    return Image.fromarray(img)


def caption(concept: int, template: int) -> str:
    color, cell = divmod(concept, len(CELLS))
    return TEMPLATES[template % len(TEMPLATES)].format(c=list(COLORS)[color], p=CELLS[cell])


class SyntheticPairs(Dataset):
    """``n`` pairs; sample i has a concept, a rendering and captions all fixed by (seed, i)."""

    def __init__(self, n: int, seed: int, transform: Callable, train: bool) -> None:
        self.n, self.seed, self.transform, self.train = n, seed, transform, train

    def __len__(self) -> int:
        return self.n

    def _rand(self, i: int) -> int:
        return zlib.crc32(f"{self.seed}/{int(self.train)}/{i}".encode())

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = i if isinstance(i, tuple) else (0, i)  # training samplers pass (epoch, index)
        h = self._rand(i)
        concept = h % N_CONCEPTS
        # the augmentation is a function of (seed, epoch, index): a resumed run augments as the original
        image = seeded_transform(self.transform, render(concept, h), zlib.crc32(f"{self.seed}/{epoch}/{i}".encode()))
        if self.train:
            return {"image": image, "text": caption(concept, h // N_CONCEPTS), "group": concept, "negs": []}
        return {
            "image": image,
            "key": f"{i:08d}",
            "captions": [caption(concept, 0), caption(concept, 1)],
            "label": concept_name(concept),
        }


class _Strided(torch.utils.data.Sampler[int]):
    """Indices rank, rank + W, ...: every validation sample on exactly one rank, none repeated."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


class _ResumableSampler(DistributedSampler):
    """DistributedSampler that can start one epoch part-way (exact resume of a killed run)."""

    skip_epoch: int | None = None
    skip = 0
    epoch_fn = None  # the data module's own epoch count (ResumableTrainData.data_epoch), over Lightning's

    def set_epoch(self, epoch: int) -> None:
        mine = self.epoch_fn() if self.epoch_fn is not None else None
        super().set_epoch(epoch if mine is None else mine)

    def __iter__(self):
        idx = list(super().__iter__())
        idx = idx[self.skip:] if self.epoch == self.skip_epoch else idx
        return iter([(self.epoch, i) for i in idx])


class SyntheticDataModule(ResumableTrainData):
    """Synthetic train pairs and one validation set named ``synthetic``.

    Args:
        num_samples: training pairs (an epoch is ``num_samples // (batch_size * world)`` steps).
        val_samples: validation images (two captions each).
        batch_size: per-rank training batch; ``val_batch_size`` defaults to it.
        workers: DataLoader workers.
        seed: fixes every image and caption.
        tokenizer, train_transform, val_transform: the model's, passed at run time.
    """

    use_distributed_sampler = False
    val_set_names = ["synthetic"]

    def __init__(self, num_samples: int = 1024, val_samples: int = 128, batch_size: int = 64,
                 val_batch_size: int | None = None, workers: int = 0, seed: int = 0,
                 tokenizer: Callable | None = None, train_transform: Callable | None = None,
                 val_transform: Callable | None = None) -> None:
        super().__init__()
        if tokenizer is None or train_transform is None or val_transform is None:
            raise ValueError("SyntheticDataModule needs the model's tokenizer and transforms "
                             "(cliptune-train passes them)")
        self.num_samples, self.val_samples = num_samples, val_samples
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.workers, self.seed = workers, seed
        self.tokenizer, self.train_transform, self.val_transform = tokenizer, train_transform, val_transform

    def _collate_train(self, samples):
        return collate_train(samples, self.tokenizer)

    def _collate_eval(self, samples):
        return collate_eval(samples, self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()
        ds = SyntheticPairs(self.num_samples, self.seed, self.train_transform, train=True)
        if ds.n < self.batch_size * world:
            raise ValueError(f"data.num_samples={ds.n} is smaller than one global batch "
                             f"({self.batch_size} x {world} ranks)")
        sampler = _ResumableSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=True)
        sampler.epoch_fn = self.data_epoch
        resume = self.resume_state_for_rank(rank, world, len(sampler) // self.batch_size)
        if resume is not None:
            sampler.skip_epoch, sampler.skip = resume["epoch"], resume["batches"] * self.batch_size
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.workers, collate_fn=self._collate_train,
                          persistent_workers=self.workers > 0)

    def val_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()
        ds = SyntheticPairs(self.val_samples, self.seed, self.val_transform, train=False)
        return DataLoader(ds, batch_size=self.val_batch_size, sampler=_Strided(len(ds), rank, world),
                          num_workers=self.workers, collate_fn=self._collate_eval)
