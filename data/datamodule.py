"""Lightning data module over WebDataset shards, and an eval loader usable without Lightning.

Trainer settings this module relies on::

    Trainer(use_distributed_sampler=False, ...)   # the loaders split data across ranks themselves

(Lightning never wraps an IterableDataset in a DistributedSampler anyway; the flag keeps other
map-style loaders from being re-wrapped.)

Training: every rank yields ``samples_per_epoch // (batch_size * world_size)`` batches per epoch,
so all ranks step in lockstep even when shards do not divide evenly.
Validation: every sample exactly once across ranks and workers, so ranks may run different numbers
of validation steps. Nothing collective may happen per validation step (no ``self.log(...,
sync_dist=True)`` in ``validation_step``, no all_gather there): gather embeddings / metrics once in
``on_validation_epoch_end``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch

from cliptune import runtime
from cliptune.config import to_plain
from cliptune.data.augment import Augment, build_augment
from cliptune.data.decode import DecodeSettings, Tokenizer, Transform, parse_caption_lang
from cliptune.data.langs import EVAL_SPLITS, check_set_languages
from cliptune.data.wds import DEFAULT_MAX_MEMBER_BYTES, LoaderSettings, WdsLoader, make_eval_loader, make_train_loader
from cliptune.log import rank_zero_info, rank_zero_warn

__all__ = ["ResumableTrainData", "WdsDataModule", "make_eval_loader"]


class ResumableTrainData(L.LightningDataModule):
    """Checkpoints where the training stream stands, so a resumed run continues with the next batch.

    Lightning stores ``state_dict()`` in every checkpoint and hands it back through
    ``load_state_dict()`` before the loaders are built. The position is taken from the batches the
    trainer actually moved to the device for a training step (``on_before_batch_transfer``), not
    from what the loader has produced: loaders prefetch ahead of training. Each rank's position is
    kept (gathered into the checkpoint, which rank 0 writes), so N-rank runs resume exactly too.
    ``batches_trained`` counts the training batches of the whole run (every epoch, every rank alike):
    a stream that is a function of its batch index starts there.

    Subclasses apply ``self.resume_state_for_rank(rank)`` when they build the training loader.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pos_epoch: int | None = None
        self._pos_batches = 0
        self._pos_workers: dict[int, tuple[int, int]] = {}
        self._resume: dict | None = None
        self._epochs_seen: tuple[int, int] | None = None  # (Lightning's epoch, the data's) last seen
        self._start_epoch: int | None = None  # the stream's epoch when the run resumed
        self.batches_trained = 0  # training batches moved to the device for a step, whole run (restored on resume)

    def data_epoch(self) -> int | None:
        """The training stream's epoch, counted by the stream itself: the epoch the run started or resumed
        in, plus one each time Lightning starts a new epoch after a whole one was trained.

        Lightning's ``current_epoch`` is not that after a resume from a checkpoint written at an epoch's
        end (its last batch, or a preemption there): it iterates the finished epoch once more (empty)
        and then reports the next one as two on. Taken as it is, the resumed stream would be another
        epoch's shuffle than the uninterrupted run's.
        """
        trainer = self.trainer
        if trainer is None:
            return None
        now = int(trainer.current_epoch)
        seen = self._epochs_seen
        if seen is None:
            data = now if self._start_epoch is None else self._start_epoch
        elif now == seen[0]:
            data = seen[1]
        else:  # a new epoch of Lightning's: the stream's next one only once its current one was trained whole
            per_epoch = trainer.num_training_batches
            whole = (not isinstance(per_epoch, int)  # length unknown: Lightning's count is all there is
                     or (self._pos_epoch == seen[1] and self._pos_batches >= per_epoch))
            data = seen[1] + 1 if whole else seen[1]
        self._epochs_seen = (now, data)
        return data

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict):
            epoch = self.data_epoch()
            if epoch != self._pos_epoch:
                self._pos_epoch, self._pos_batches, self._pos_workers = epoch, 0, {}
            self._pos_batches += 1
            self.batches_trained += 1
            pos = batch.pop("data_pos", None)
            if pos is not None:
                worker, made, raw = (int(x) for x in pos.tolist())
                self._pos_workers[worker] = (made, raw)
        return batch

    def state_dict(self) -> dict[str, Any]:
        mine = {str(w): list(v) for w, v in self._pos_workers.items()}
        ranks = [mine]
        world = runtime.world_size(launcher=False)
        if world > 1:  # every rank saves the checkpoint state (rank 0 writes it): a collective is safe here
            ranks = [None] * world
            torch.distributed.all_gather_object(ranks, mine)
        return {"epoch": -1 if self._pos_epoch is None else self._pos_epoch, "batches": self._pos_batches,
                "workers": ranks, "trained": self.batches_trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)
        self.batches_trained = int(state.get("trained", 0))  # 0: a checkpoint written before it was kept

    def rank_world(self) -> tuple[int, int]:
        """(rank, world size) to split data by: the attached trainer's, else the process group's, else (0, 1)."""
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return runtime.rank(launcher=False), runtime.world_size(launcher=False)

    def resume_state_for_rank(self, rank: int, world_size: int, batches_per_epoch: int | None = None) -> dict | None:
        """``{"epoch", "batches", "positions": {worker: (made, raw)}}`` of this rank, or None (a fresh
        start, or a checkpoint written once its epoch was trained whole: the stream goes on with the next
        epoch from its top; ``batches_per_epoch`` tells)."""
        st, self._resume = self._resume, None  # applied once: a rebuilt loader later starts its epoch whole
        if not st or st.get("epoch", -1) < 0:
            return None
        if batches_per_epoch is not None and st["batches"] >= batches_per_epoch:
            self._start_epoch = st["epoch"] + 1
            self._pos_epoch, self._pos_batches, self._pos_workers = self._start_epoch, 0, {}
            return None
        self._start_epoch = st["epoch"]
        ranks = st.get("workers") or []
        if len(ranks) != world_size:
            rank_zero_warn("the checkpoint was written by %d rank(s), this run has %d: the training stream restarts "
                           "at the top of epoch %d instead of where it stopped", len(ranks), world_size, st["epoch"])
            return None
        positions = {int(w): (int(m), int(r)) for w, (m, r) in ranks[rank].items()}
        # later checkpoints of this epoch count on from here
        self._pos_epoch, self._pos_batches, self._pos_workers = st["epoch"], st["batches"], dict(positions)
        return {"epoch": st["epoch"], "batches": st["batches"], "positions": positions}


class WdsDataModule(ResumableTrainData):
    """Train and validation loaders over cliptune shards (see :mod:`cliptune.data.wds` for specs).

    Args:
        train: training shard spec (string, list, source dict, or list of weighted source dicts).
        val: ``{set name: shard spec}``; a single spec is named ``"val"``; sets set to None are dropped.
        batch_size: per-rank training batch size; ``val_batch_size`` defaults to it.
        workers: DataLoader workers per rank (``val_workers`` defaults to it).
        samples_per_epoch: global samples per training epoch (all ranks); default: index count.
        resampled: draw shards with replacement (per rank/worker/epoch seed) instead of passes.
        shard_shuffle: shuffle the shard order of each pass (``resampled=False`` only).
        sample_shuffle: sample shuffle buffer per worker (raw bytes; 0 or 1 disables).
        caption_lang: ``"any"``, a language code or a comma list (``"en,zh"``).
        group_field: json field hashed into ``batch["group"]`` (falls back to the sample key).
        max_negatives: K hard-negative captions per sample (``neg_text`` / ``neg_mask``), 0 = off.
        seed: base seed for shard and sample order, caption draws and augmentation.
        augment: training-image augmentation preset, ``none`` / ``light`` / ``strong``
            (:mod:`cliptune.data.augment`); applied in the workers before ``train_transform``.
        augment_flip: horizontal flips, ``false`` / ``true`` / ``"auto"`` (only samples whose captions
            and negatives name no direction).
        tokenizer, train_transform, val_transform: the model's, usually passed at run time.
        val_caption_langs: score each validation set once per language, as its own set ``<set>:<lang>``
            (e.g. ``["en", "zh"]``: ``emoji:en`` and ``emoji:zh``); None: one set each, at ``caption_lang``.

    Each set's caption languages are checked once, when its loader is first built (rank 0 reads a
    few samples; :func:`cliptune.data.langs.check_set_languages`): a validation set scored in several
    languages at once under ``caption_lang=any``, or a language the tokenizer maps mostly to its unknown
    token, is a warning; training on several languages is an info line.

    The training settings are built once, as ``self.settings`` (:class:`cliptune.data.wds.LoaderSettings`,
    its ``decode`` a :class:`cliptune.data.decode.DecodeSettings`), and passed down to the loader, the
    dataset and the decoder; the keyword arguments stay the config's keys (``configs/data/wds.yaml``).
    """

    # read by cliptune.train.cli: the loaders split the data over ranks themselves
    use_distributed_sampler = False

    def __init__(
        self,
        train: str | list | dict | None = None,
        val: dict[str, Any] | str | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        workers: int = 2,
        val_workers: int | None = None,
        samples_per_epoch: int | None = None,
        resampled: bool = True,
        shard_shuffle: bool = True,
        sample_shuffle: int = 1000,
        caption_lang: str = "any",
        group_field: str = "group",
        max_negatives: int = 0,
        seed: int = 0,
        tokenizer: Tokenizer | None = None,
        train_transform: Transform | None = None,
        val_transform: Transform | None = None,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
        strict: bool = False,
        augment: str = "none",
        augment_flip: str | bool = False,
        val_caption_langs: Sequence[str] | None = None,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if max_negatives < 0:
            raise ValueError(f"data.max_negatives must be >= 0, got {max_negatives}")
        if max_member_bytes < 1:
            raise ValueError(f"data.max_member_bytes must be >= 1, got {max_member_bytes}")
        parse_caption_lang(caption_lang)  # fail at construction, not in a worker
        aug = Augment(augment, augment_flip)  # fail at construction on an unknown preset
        rank_zero_info("training images: %s", aug.describe())
        self.train = to_plain(train)
        val = to_plain(val)
        if val is not None and not isinstance(val, Mapping):
            val = {"val": val}
        # sets left unset (the config's ``domain: null`` placeholder) are not evaluated
        self.val: dict[str, Any] = {str(k): v for k, v in (val or {}).items() if v is not None}
        # the training loader's settings, built once here and passed down to the dataset and its decoder
        self.settings = LoaderSettings(
            batch_size=batch_size, workers=workers, samples_per_epoch=samples_per_epoch, resampled=resampled,
            shard_shuffle=shard_shuffle, sample_shuffle=sample_shuffle, seed=seed,
            persistent_workers=persistent_workers,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            max_member_bytes=int(max_member_bytes),
            decode=DecodeSettings(caption_lang=caption_lang, group_field=group_field, max_negatives=max_negatives,
                                  strict=strict,
                                  augment=build_augment(augment, augment_flip)),  # None: the model's transform alone
        )
        self.val_batch_size = val_batch_size or batch_size
        self.val_workers = workers if val_workers is None else val_workers
        self.tokenizer = tokenizer
        self.train_transform = train_transform
        self.val_transform = val_transform
        self._languages_checked: set[str] = set()
        langs = to_plain(val_caption_langs)
        self.val_caption_langs: list[str] | None = [str(x) for x in ([langs] if isinstance(langs, str) else langs)] \
            if langs else None
        for lang in self.val_caption_langs or ():
            parse_caption_lang(lang)

    def val_sets(self) -> list[tuple[str, Any, str]]:
        """(name, shard spec, caption language) of each validation set, in the order of :meth:`val_dataloader`."""
        if not self.val_caption_langs:
            return [(name, spec, self.settings.decode.caption_lang) for name, spec in self.val.items()]
        return [(f"{name}:{lang}", spec, lang) for name, spec in self.val.items() for lang in self.val_caption_langs]

    def _check_languages(self, spec: Any, name: str, role: str, rank: int, caption_lang: str | None = None) -> None:
        """The language warnings of one set, once per data module (loaders are rebuilt: no second read)."""
        if name in self._languages_checked or self.tokenizer is None:
            return
        self._languages_checked.add(name)
        check_set_languages(spec, self.tokenizer, caption_lang or self.settings.decode.caption_lang, name, role=role,
                            split="train" if role == "train" else EVAL_SPLITS, rank=rank)

    @property
    def val_set_names(self) -> list[str]:
        """Names of the validation sets, in the order of :meth:`val_dataloader`."""
        return [name for name, _, _ in self.val_sets()]

    def _epoch(self) -> int | None:
        return self.data_epoch()

    def train_dataloader(self) -> WdsLoader:
        if self.train is None:
            raise ValueError("data.train is not set: give a shard spec to train on")
        rank, world_size = self.rank_world()
        self._check_languages(self.train, "data.train", "train", rank)
        loader = make_train_loader(
            self.train,
            self.settings,
            tokenizer=self.tokenizer,  # type: ignore[arg-type]
            transform=self.train_transform,  # type: ignore[arg-type]
            rank=rank,
            world_size=world_size,
            epoch_fn=self._epoch,
        )
        resume = self.resume_state_for_rank(rank, world_size, len(loader))
        if resume is not None:
            loader.dataset.resume_from(**resume)  # type: ignore[attr-defined]
        return loader

    def val_dataloader(self) -> list[WdsLoader]:
        rank, world_size = self.rank_world()
        for name, spec, lang in self.val_sets():
            self._check_languages(spec, f"data.val.{name}", "val", rank, lang)
        return [
            make_eval_loader(
                spec,
                batch_size=self.val_batch_size,
                workers=self.val_workers,
                tokenizer=self.tokenizer,  # type: ignore[arg-type]
                transform=self.val_transform,  # type: ignore[arg-type]
                caption_lang=lang,
                rank=rank,
                world_size=world_size,
                name=f"data.val.{name}",
                pin_memory=self.settings.pin_memory,
                strict=self.settings.decode.strict,
                max_member_bytes=self.settings.max_member_bytes,
            )
            for name, spec, lang in self.val_sets()
        ]


