"""Streaming WebDataset reader: shard specs -> per-worker sample streams -> contract batches.

The reader pipeline, one module per job (all under ``cliptune.data``):

- :mod:`~cliptune.data.specs`   shard spec -> :class:`Source` list (URLs, sample counts, weights);
  its docstring lists the spec forms (brace patterns, globs, directories, indexes, ``pipe:``, mixtures)
- :mod:`~cliptune.data.tar`     shard URL -> raw samples (a streaming tar parser); :func:`partition`
  splits shards between readers
- :mod:`~cliptune.data.decode`  raw sample -> decoded sample (skip accounting, seeded augmentation)
  -> contract batch (:func:`collate_train`, :func:`collate_eval`)
- :mod:`~cliptune.data.augment` training-image augmentation presets (``data.augment``), which the
  decoder runs on each training image before the model's transform, under the sample's seed
- this module                   per-worker streams (shard order or draws, weighted mixing, shuffle
  buffer), the datasets and the loaders (:func:`make_train_loader`, :func:`make_eval_loader`)

The public names of those modules are re-exported here, so ``from cliptune.data.wds import X``
works for all of them.

Error policy in short: a spec that matches nothing and a shard that cannot be opened raise; a
sample that cannot be used is skipped and counted per reason in the ``skipped`` tensor of the next
batch (:data:`SKIP_REASONS`; ``data.strict`` makes a missing image or caption raise); a tar that
breaks off mid-way loses the rest of that shard, and those samples are counted as ``truncated`` (as
many as the index promised); a member over ``max_member_bytes`` or a duplicate member skips its sample.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from cliptune import runtime
from cliptune.data.decode import (
    IMAGE_EXTS,
    as_list,
    SKIP_REASONS,
    Augmenter,
    DecodeSettings,
    SampleDecoder,
    Tokenizer,
    Transform,
    _Stats,
    collate_eval,
    collate_train,
    decode_image,
    describe_skips,
    group_id,
    parse_caption_lang,
    seeded_transform,
    skip_counts,
    skipped_dict,
    skipped_tensor,
    stable_hash,
)
from cliptune.data.specs import (
    ShardSpecError,
    Source,
    UrlFs,
    check_local_spec,
    is_local,
    local_path,
    resolve_sources,
    url_dirname,
    url_join,
    uses_fsspec,
)
from cliptune.data.tar import (
    DEFAULT_MAX_MEMBER_BYTES,
    ShardFormatError,
    ShardReadError,
    TarFormatError,
    TarMembers,
    iter_shard,
    open_shard,
    partition,
)
from cliptune.domains import EVAL_SPLITS
from cliptune.log import get_logger

__all__ = [
    # this module: datasets and loaders
    "LoaderSettings", "WdsEvalDataset", "WdsLoader", "WdsTrainDataset", "make_eval_loader", "make_train_loader",
    "worker_info",
    # re-exported from cliptune.data.specs
    "ShardSpecError", "Source", "UrlFs", "check_local_spec", "is_local", "local_path", "resolve_sources", "url_dirname",
    "url_join", "uses_fsspec",
    # re-exported from cliptune.data.tar
    "DEFAULT_MAX_MEMBER_BYTES", "ShardFormatError", "ShardReadError", "TarFormatError", "TarMembers", "iter_shard",
    "open_shard", "partition",
    # re-exported from cliptune.data.decode
    "IMAGE_EXTS", "SKIP_REASONS", "Augmenter", "as_list", "DecodeSettings", "SampleDecoder", "Tokenizer", "Transform",
    "collate_eval", "collate_train", "decode_image", "describe_skips", "group_id", "parse_caption_lang",
    "seeded_transform", "skip_counts", "skipped_dict", "skipped_tensor", "stable_hash",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class LoaderSettings:
    """A training loader's data settings, built once (by :class:`cliptune.data.datamodule.WdsDataModule`
    from the ``data.*`` keys) and passed down to the dataset and its decoder.

    ``batch_size`` per rank; ``workers`` per rank; ``samples_per_epoch`` global (all ranks; None: the
    index's count); ``resampled``: draw shards with replacement instead of passes (``shard_shuffle``
    shuffles each pass); ``sample_shuffle``: the per-worker buffer (0 or 1: off); ``seed``: shard and
    sample order, caption draws and augmentation; ``max_member_bytes``: larger tar members are never
    read (their samples are skipped and counted); ``decode``: :class:`DecodeSettings`.
    """

    batch_size: int
    workers: int = 2
    samples_per_epoch: int | None = None
    resampled: bool = True
    shard_shuffle: bool = True
    sample_shuffle: int = 1000
    seed: int = 0
    persistent_workers: bool = True
    pin_memory: bool = False
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    decode: DecodeSettings = field(default_factory=DecodeSettings)


# ----------------------------------------------------------------------------------------------
# Datasets


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _EpochReport:
    """Shared per-worker counters so one worker can log an epoch summary for its rank.

    A shared-memory tensor (not multiprocessing.Value) so the dataset pickles anywhere.
    Columns: read, accepted, one per skip reason, done.
    """

    def __init__(self, num_workers: int) -> None:
        self.table = torch.zeros(max(1, num_workers), 3 + len(SKIP_REASONS), dtype=torch.int64).share_memory_()

    def reset(self) -> None:
        self.table.zero_()

    def finish(self, worker: int, st: _Stats) -> bool:
        """Store this worker's counts; True for the worker that completes the table."""
        if worker >= len(self.table):
            return False
        self.table[worker, :-1] = torch.tensor([st.read, st.accepted, *skipped_tensor(st.skipped).tolist()])
        self.table[worker, -1] = 1
        return bool(self.table[:, -1].all())

    def totals(self) -> dict[str, int]:
        row = self.table.sum(0).tolist()
        return {"read": row[0], "accepted": row[1], **dict(zip(SKIP_REASONS, row[2:-1]))}


class _WdsBase(IterableDataset):
    def __init__(
        self,
        sources: list[Source],
        decoder: SampleDecoder,
        tokenizer: Tokenizer,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        name: str,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ) -> None:
        super().__init__()
        if tokenizer is None:
            raise ValueError(f"{name}: a tokenizer is needed (the model's tokenizer, list[str] -> LongTensor)")
        if decoder.transform is None:
            raise ValueError(f"{name}: an image transform is needed (the model's preprocess)")
        self.sources = sources
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.name = name
        self.max_member_bytes = max_member_bytes
        # the index's sample count per shard: how many samples a shard that breaks off has lost
        self.expected = {u: n for s in sources for u, n in zip(s.urls, s.sizes)}
        self.report = _EpochReport(num_workers)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def begin_epoch(self, epoch: int) -> None:
        """Called by the loader in the main process before workers start iterating."""
        self._epoch[0] = epoch
        self.report.reset()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def _shard(self, url: str, take: tuple[int, int] = (1, 0)) -> Iterator[dict]:
        """Raw samples of one shard, with a ``__skip__`` marker for each it could not read whole."""
        return iter_shard(url, take, expected=self.expected.get(url), max_member_bytes=self.max_member_bytes,
                          report_skips=True)

    def _summary(self, worker: int) -> None:
        if not self.report.finish(worker, self.decoder.stats) or self.rank != 0:
            return
        t = self.report.totals()
        skips = {r: t[r] for r in SKIP_REASONS}
        if any(skips.values()):
            self._log_summary(t, skips)

    def _log_summary(self, t: dict[str, int], skips: dict[str, int]) -> None:
        raise NotImplementedError


class WdsTrainDataset(_WdsBase):
    """Infinite shuffled stream per worker, cut to a fixed number of batches per rank per epoch.

    Every rank yields exactly ``batches_per_rank`` batches (spread over its workers), whatever
    the shard count, so DDP ranks run the same number of steps.

    Exact resume: each batch carries ``data_pos = [worker, batches made, raw samples read]`` of the
    (logical) worker that made it, in the worker's epoch stream. The stream (shard order or draws,
    mixing, shuffle buffer) depends only on (seed, epoch, rank, worker) and the caption drawn for a
    sample on its stream index, so a worker restarted with :meth:`resume_from` replays its stream up
    to the recorded position without decoding anything and continues with the very next sample.
    Batch ``j`` of a rank comes from worker ``j % workers`` (DataLoader round robin); after ``k``
    trained batches, physical worker ``p`` takes logical worker ``(p + k) % workers``'s place so the
    order continues unchanged.
    """

    def __init__(
        self,
        sources: list[Source],
        decoder: SampleDecoder,
        tokenizer: Tokenizer,
        settings: LoaderSettings,
        batches_per_rank: int,
        rank: int = 0,
        world_size: int = 1,
        name: str = "train",
    ) -> None:
        super().__init__(sources, decoder, tokenizer, settings.batch_size, rank, world_size, settings.workers, name,
                         settings.max_member_bytes)
        self.batches_per_rank = batches_per_rank
        self.resampled = settings.resampled
        self.shard_shuffle = settings.shard_shuffle
        self.sample_shuffle = settings.sample_shuffle
        self.seed = settings.seed
        self.resume: dict | None = None

    def __len__(self) -> int:
        return self.batches_per_rank

    def resume_from(self, epoch: int, batches: int, positions: Mapping[int, Sequence[int]]) -> None:
        """Continue ``epoch`` after ``batches`` trained batches; ``positions[worker] = (made, raw)``
        for each logical worker that made any. Takes effect at the next iteration over that epoch."""
        self.resume = {"epoch": int(epoch), "batches": int(batches),
                       "positions": {int(w): (int(m), int(r)) for w, m_r in positions.items() for m, r in [m_r]}}

    def _resampled(self, src: Source, rng: random.Random) -> Iterator[dict]:
        empty = 0
        while True:
            url = rng.choice(src.urls)
            n = 0
            for raw in self._shard(url):
                n += raw.get("__skip__") != "truncated"  # a lost tail is no sample: all-cut shards must stop
                yield raw
            empty = 0 if n else empty + 1
            if empty > 2 * len(src.urls) + 10:
                raise ShardReadError(f"{self.name}: source '{src.name}': {empty} shards in a row had no samples")

    def _passes(self, src: Source, src_index: int, reader: int, n_readers: int) -> Iterator[dict]:
        # every reader derives the same shard order from (seed, epoch, pass), then takes its part
        for n_pass in range(10**12):
            urls = list(src.urls)
            if self.shard_shuffle:
                # seeded by the source's position, not its path: moving the data keeps the order
                random.Random(f"{self.seed}/{self.epoch}/{n_pass}/{src_index}").shuffle(urls)
            n = 0
            for url, take in partition(urls, reader, n_readers):
                for raw in self._shard(url, take):
                    n += raw.get("__skip__") != "truncated"  # a lost tail is no sample: all-cut shards must stop
                    yield raw
            if n == 0:
                raise ShardReadError(f"{self.name}: source '{src.name}': reader {reader} of {n_readers} got no samples")

    def _stream(self, worker: int, num_workers: int) -> tuple[Iterator[dict], list[Iterator[dict]]]:
        """The worker's raw sample stream for this epoch: a function of (seed, epoch, rank, worker)."""
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        reader, n_readers = self.rank * num_workers + worker, self.world_size * num_workers
        streams = [
            self._resampled(s, rng) if self.resampled else self._passes(s, i, reader, n_readers)
            for i, s in enumerate(self.sources)
        ]
        stream = streams[0] if len(streams) == 1 else _mix(streams, [s.weight for s in self.sources], rng)
        if self.sample_shuffle > 1:
            stream = shuffle(self.sample_shuffle, min(100, self.sample_shuffle), rng=rng)(stream)
        return stream, streams

    def __iter__(self) -> Iterator[dict]:
        physical, num_workers = worker_info()
        worker, made, raw_index = physical, 0, 0
        resume = self.resume if self.resume is not None and self.resume["epoch"] == self.epoch else None
        if resume is not None:
            worker = (physical + resume["batches"]) % num_workers
            made, raw_index = resume["positions"].get(worker, (0, 0))
        quota = self.batches_per_rank // num_workers + (worker < self.batches_per_rank % num_workers)
        self.decoder.reset()
        if made >= quota:
            self._summary(physical)
            return
        stream, streams = self._stream(worker, num_workers)
        try:
            for _ in range(raw_index):  # replay up to the resume point: read, never decoded
                next(stream)
            samples = []
            for raw in stream:
                raw_index += 1
                # the caption draw depends only on the sample's place in the stream (replayable)
                rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{raw_index}")
                sample = self.decoder.train_sample(raw, rng)
                if sample is None:
                    continue
                samples.append(sample)
                if len(samples) == self.batch_size:
                    batch = collate_train(samples, self.tokenizer, self.decoder.settings.max_negatives,
                                          self.decoder.stats.take_pending())
                    made += 1
                    batch["data_pos"] = torch.tensor([worker, made, raw_index], dtype=torch.long)
                    yield batch
                    samples = []
                    if made == quota:
                        break
        finally:
            for s in streams:
                s.close()
        self._summary(physical)

    def _log_summary(self, t: dict[str, int], skips: dict[str, int]) -> None:
        log.info("%s epoch %d, rank 0: %d samples read, %s", self.name, self.epoch, t["read"], describe_skips(skips))


def _mix(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Per-sample draw from infinite streams with probability proportional to ``weights``."""
    # Not webdataset's RandomMix / random_samples: it draws from the global ``random`` module, not
    # a seeded generator, so the worker's stream would not be a function of (seed, epoch, rank,
    # worker) and exact resume could not replay the draws.
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    while True:
        i = min(bisect.bisect_right(cum, rng.random() * total), len(streams) - 1)
        yield next(streams[i])


class WdsEvalDataset(_WdsBase):
    """Each sample exactly once across all ranks and workers, in shard order; no padding."""

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_info()
        self.decoder.reset()
        urls = [u for s in self.sources for u in s.urls]
        reader, n_readers = self.rank * num_workers + worker, self.world_size * num_workers
        samples: list[dict] = []
        for url, take in partition(urls, reader, n_readers):
            for raw in self._shard(url, take):
                sample = self.decoder.eval_sample(raw)
                if sample is None:
                    continue
                # a full batch waits for the next good sample, so skips after it are still counted
                if len(samples) == self.batch_size:
                    yield collate_eval(samples, self.tokenizer, self.decoder.stats.take_pending())
                    samples = []
                samples.append(sample)
        if samples:
            yield collate_eval(samples, self.tokenizer, self.decoder.stats.take_pending())
        elif sum(self.decoder.stats.pending.values()):
            yield {"skipped": self.decoder.stats.take_pending()}  # skips after the last (or without any) batch
        self._summary(worker)

    def _log_summary(self, t: dict[str, int], skips: dict[str, int]) -> None:
        example = next(iter(self.decoder.stats.example.values()), "")
        log.warning(
            "%s: rank 0 left out samples of the %d it read (%s%s); metrics cover the rest. Other ranks read other "
            "samples and may skip more.", self.name, t["read"], describe_skips(skips),
            f"; e.g. {example}" if example else "",
        )


# ----------------------------------------------------------------------------------------------
# Loaders


class WdsLoader(DataLoader):
    """DataLoader over a Wds dataset (batches made in the workers) that tells it the epoch.

    ``epoch_fn`` (e.g. ``lambda: trainer.current_epoch``) keeps shuffling in step with a resumed
    run; without it the loader counts its own iterations.
    """

    def __init__(
        self,
        dataset: _WdsBase,
        workers: int,
        epoch_fn: Callable[[], int | None] | None = None,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            persistent_workers=persistent_workers and workers > 0,
            pin_memory=pin_memory,
            prefetch_factor=(prefetch_factor or 2) if workers > 0 else None,
        )
        self.epoch_fn = epoch_fn
        self._n_iter = 0

    def __iter__(self):  # noqa: ANN204 - returns torch's private iterator type
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        self.dataset.begin_epoch(self._n_iter if epoch is None else epoch)  # type: ignore[attr-defined]
        self._n_iter += 1
        return super().__iter__()


def _need_model_parts(tokenizer: Tokenizer | None, transform: Transform | None, what: str) -> None:
    missing = [n for n, v in (("tokenizer", tokenizer), ("image transform", transform)) if v is None]
    if missing:
        raise ValueError(
            f"{what}: no {' and no '.join(missing)} given; the loader needs the model's (ModelBundle.tokenizer, "
            "preprocess_train / preprocess_val), which cliptune.train.run.build_datamodule passes"
        )


def make_train_loader(
    spec: Any,
    settings: LoaderSettings,
    tokenizer: Tokenizer,
    transform: Transform,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    epoch_fn: Callable[[], int | None] | None = None,
    what: str = "data.train",
) -> WdsLoader:
    """Training loader: ``samples_per_epoch // (batch_size * world_size)`` batches on every rank.

    ``settings.samples_per_epoch`` is global (all ranks); by default the sample count of the index.
    ``settings.decode.augment`` (:class:`cliptune.data.augment.Augment`) runs in the workers on each
    decoded image before ``transform``, seeded by the sample's stream position like the rest of the sample.
    ``rank``/``world_size`` default to torch.distributed, else 0/1; ``epoch_fn``: see :class:`WdsLoader`.
    """
    _need_model_parts(tokenizer, transform, what)
    rank = runtime.rank(launcher=False) if rank is None else rank  # the process group's, else 0
    world_size = runtime.world_size(launcher=False) if world_size is None else world_size
    sources = resolve_sources(spec, "train", what=what)
    samples_per_epoch, batch_size, workers = settings.samples_per_epoch, settings.batch_size, settings.workers
    if samples_per_epoch is None:
        counts = [s.num_samples for s in sources]
        if any(n is None for n in counts):
            unknown = [s.name for s, n in zip(sources, counts) if n is None]
            raise ShardSpecError(
                f"{what}: cannot infer samples_per_epoch, no index json gives sample counts for {unknown}; "
                "set data.samples_per_epoch (or num_samples in the source dict)"
            )
        samples_per_epoch = int(sum(counts))  # type: ignore[arg-type]
    batches_per_rank = samples_per_epoch // (batch_size * world_size)
    if batches_per_rank < 1:
        raise ValueError(
            f"{what}: samples_per_epoch={samples_per_epoch} is less than one batch per rank "
            f"(batch_size={batch_size} x world_size={world_size}); lower the batch size or raise samples_per_epoch"
        )
    n_shards, n_readers = sum(len(s.urls) for s in sources), world_size * max(1, workers)
    if rank == 0:
        if n_shards < n_readers:
            log.warning(
                "%s: %d shards for %d readers (%d ranks x %d workers): %s. Write more, smaller shards "
                "(at least one per reader) for better mixing.", what, n_shards, n_readers, world_size,
                max(1, workers), "readers draw shards at random and overlap within an epoch" if settings.resampled
                else "readers share shards and split them by sample index",
            )
        log.info(
            "%s: %d shards in %d source(s), %d samples per epoch -> %d batches of %d per rank (%d ranks)",
            what, n_shards, len(sources), samples_per_epoch, batches_per_rank, batch_size, world_size,
        )
    decoder = SampleDecoder(transform, settings.decode)
    dataset = WdsTrainDataset(sources, decoder, tokenizer, settings, batches_per_rank, rank=rank,
                              world_size=world_size, name=what)
    return WdsLoader(dataset, workers, epoch_fn=epoch_fn, persistent_workers=settings.persistent_workers,
                     pin_memory=settings.pin_memory)


def make_eval_loader(
    spec: Any,
    batch_size: int,
    workers: int,
    tokenizer: Tokenizer,
    transform: Transform,
    caption_lang: str | Sequence[str] = "any",
    rank: int | None = None,
    world_size: int | None = None,
    name: str = "val",
    pin_memory: bool = False,
    strict: bool = False,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> WdsLoader:
    """Eval loader: every sample exactly once across ranks and workers; batches of unequal count.

    Ranks may get different numbers of batches: per-step code must not run collectives (gather
    metrics once at epoch end). ``rank``/``world_size`` default to torch.distributed, else 0/1.
    """
    _need_model_parts(tokenizer, transform, name)
    rank = runtime.rank(launcher=False) if rank is None else rank  # the process group's, else 0
    world_size = runtime.world_size(launcher=False) if world_size is None else world_size
    sources = resolve_sources(spec, EVAL_SPLITS, what=name)
    n_shards, n_readers = sum(len(s.urls) for s in sources), world_size * max(1, workers)
    if rank == 0 and n_shards < n_readers:
        log.info(
            "%s: %d shards for %d readers (%d ranks x %d workers): readers share shards and split "
            "them by sample index (each reads its whole shard)", name, n_shards, n_readers, world_size, max(1, workers),
        )
    decoder = SampleDecoder(transform, DecodeSettings(caption_lang, strict=strict))
    dataset = WdsEvalDataset(sources, decoder, tokenizer, batch_size, rank, world_size, workers, name,
                             max_member_bytes)
    return WdsLoader(dataset, workers, persistent_workers=False, pin_memory=pin_memory)
