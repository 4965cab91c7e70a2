"""Text distillation (``cliptune-distill``): a multilingual text tower learns a CLIP's text space from
parallel sentences, before any image-text training (AltCLIP's stage 1, "teacher learning").

    cliptune-distill distill=demo                           # the emoji domain (after cliptune-train experiment=demo)
    cliptune-distill distill=demo resume=true               # continue a killed run (same command + resume)
    cliptune-distill teacher.load=runs/mine 'data.train=[pairs.jsonl]' student.path=xlm-roberta-base
    cliptune-train experiment=demo_bilingual                # stage 2: its export as the text tower (model.text_from)

The teacher is any CLIP cliptune loads (``teacher.load``: a run directory, an export, an open_clip name
with ``teacher.pretrained``), frozen. The student is a Hugging Face text tower (``student.path``: a
folder or Hub id; null builds a small XLM-R with a tokenizer trained on the training text,
``cliptune.text_tower``) with a pooler and a projection to the teacher's embedding width (open_clip's
``HFTextEncoder``). For each parallel row (``data.train``, ``cliptune.data.parallel``) the target is
the teacher's text embedding of the sentence in the first language of ``data.langs`` (English), after
its projection; the student regresses it from that sentence and from each translation
(``objective=mse``: squared distance, as AltCLIP; ``objective=cosine``: 1 - cosine).

Validation runs on held-out rows (``data.val`` or ``data.val_fraction``, never the contrastive
validation captions): each language's student embeddings search the teacher's embeddings of all
held-out English sentences, ``val/<set>/<lang>_R@1`` (``zh_R@1``: Chinese finds its English
sentence), with the cosine to the target and the loss; ``mean_R`` is the mean R@1 (the best checkpoint's
default monitor). The run directory is a training run's (``cliptune.rundir``: lock, log, config, CSV,
``checkpoints/last.ckpt`` and ``best.ckpt``, ``metrics.json`` with before/after); ``export/`` is the
teacher's CLIP with the student as its text tower, loadable as any export
(``cliptune-eval load=runs/demo_distill``: multilingual retrieval before image-text training) and
pluggable into a CLIP (``model.text_from=runs/demo_distill``). ``resume=true`` continues at the next
batch: batch ``i`` of the stream is a function of ``i``, and checkpoints keep how many were trained.

This module is the library (`run`); the command's entry is `cliptune.train.cli.distill_main`, which answers
``--help``, ``--cfg job`` and tab completion before torch is imported.
"""

from __future__ import annotations

import itertools
from pathlib import Path
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from open_clip.hf_model import HFTextEncoder
from open_clip.tokenizer import HFTokenizer
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from cliptune.config import register_configs, register_resolvers, to_plain
from cliptune.data.datamodule import ResumableTrainData
from cliptune.domains import DISTILL_OBJECTIVES
from cliptune.data.parallel import Corpus, ParallelRow, build_corpus
from cliptune.eval.retrieval import ranks_t2i
from cliptune.eval.runner import metrics_table
from cliptune.faults import fault_point
from cliptune.hf_clip import refuse_remote_code
from cliptune.log import get_logger, rank, rank_zero_print
from cliptune.models import ModelBundle, export_model, load_model, resolve_source
from cliptune.rundir import RunDir
from cliptune.text_tower import attach_text_tower, build_text_tower_folder
from cliptune.train.module import (NonFiniteError, fit_validation_step, nonfinite_entries, nonfinite_error,
                                   nonfinite_problem, optimizer_and_schedule, refuse_nonfinite_checkpoint, seed_step)
from cliptune.train.optim import OptimConfig
from cliptune.train.run import (before_after_rows, build_callbacks, build_trainer, chance_of, checkpoint_to_resume,
                                metrics_of, run_locked, save_config, validate_after_fit)
from cliptune.validate import validate_distill_config

log = get_logger(__name__)

__all__ = ["DistillModule", "ParallelDataModule", "ParallelStream", "TeacherTargets", "build_student", "distill_loss",
           "pairs_in_batch", "parallel_metrics", "run", "trim_padding"]

LOSSES = DISTILL_OBJECTIVES  # objective: cliptune.domains
STUDENT_INIT = "student_init"  # <run>/student_init: the student folder a run builds when student.path is null


# ----------------------------------------------------------------------------------------------
# Teacher targets, loss


class TeacherTargets:
    """The frozen teacher's text embeddings (``encode_text``: after its projection, not normalised),
    computed once per distinct sentence (up to ``max_cached`` sentences are kept).

    :meth:`precompute` embeds a corpus up front in a fixed order and fixed chunks: a sentence's target is
    then the same in every run (CPU kernels round a row differently in batches of other shapes), so a
    resumed run trains on exactly the targets of the uninterrupted one."""

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], max_cached: int = 1_000_000):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_cached = int(max_cached)
        self.cache: dict[str, torch.Tensor] = {}

    def to(self, device: torch.device | str) -> TeacherTargets:
        self.model.to(device)
        return self

    def precompute(self, texts: Sequence[str], batch_size: int = 256) -> int:
        """Embed the distinct ``texts`` not cached yet, shortest first, in chunks of ``batch_size`` (as many
        as the cache holds); returns how many were embedded."""
        todo = sorted({t for t in texts if t not in self.cache}, key=lambda t: (len(t), t))
        todo = todo[: max(0, self.max_cached - len(self.cache))]
        t0 = time.perf_counter()
        for i in range(0, len(todo), batch_size):
            self(todo[i:i + batch_size])
        if todo:
            log.info("teacher targets: %d sentences embedded in %.1f s", len(todo), time.perf_counter() - t0)
        return len(todo)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        found = {t: self.cache[t] for t in texts if t in self.cache}
        todo = [t for t in dict.fromkeys(texts) if t not in found]
        if todo:
            tokens = self.tokenizer(todo)
            pad = getattr(getattr(getattr(self.model, "text", None), "config", None), "pad_token_id", None)
            if pad is not None:  # a Hugging Face tower masks padding: cutting it changes nothing but the cost
                tokens = trim_padding(tokens, pad)
            emb = self.model.encode_text(tokens.to(device)).float().cpu()  # [n, D]
            for t, e in zip(todo, emb):
                found[t] = e = e.clone()
                if len(self.cache) < self.max_cached:
                    self.cache[t] = e
        return torch.stack([found[t] for t in texts]).to(device)  # [B, D]


def distill_loss(student: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """``mse``: mean squared distance between the rows of ``student`` and ``target`` [B, D] (AltCLIP's
    regression); ``cosine``: mean of 1 - cosine similarity."""
    if kind == "mse":
        return (student.float() - target.float()).pow(2).sum(-1).mean()
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), target.float(), dim=-1)).mean()
    raise ValueError(f"loss={kind!r}: use one of {', '.join(LOSSES)}")


def pairs_in_batch(batch: dict) -> int:
    """Parallel rows in a batch (``TrainThroughput``'s ``batch_size_fn`` in configs/distill.yaml)."""
    return len(batch["texts"][0])


# ----------------------------------------------------------------------------------------------
# Data


def trim_padding(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``tokens`` [B, L] cut after the last column holding a token (attention masks make it exact)."""
    used = (tokens != pad_id).any(0).nonzero()
    return tokens[:, : int(used.max()) + 1 if used.numel() else 1]


class ParallelStream(IterableDataset):
    """Training batches of rows, endless: pass ``e`` is a permutation seeded by (``seed``, ``e``), cut into
    global batches of ``batch_size x world_size`` rows (the remainder dropped); a rank takes its slice.

    Batch ``i`` is a function of ``i`` alone, and the stream starts at ``start()`` (the batches trained
    when the loader is iterated): a resumed run reads on from the next batch."""

    def __init__(self, rows: Sequence[ParallelRow], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start: Callable[[], int] = lambda: 0) -> None:
        self.rows, self.batch_size, self.seed = list(rows), int(batch_size), int(seed)
        self.rank, self.world_size, self.start = int(rank), int(world_size), start
        self.per_pass = len(self.rows) // (self.batch_size * self.world_size)
        if self.per_pass < 1:
            raise ValueError(f"data.train: {len(self.rows)} parallel rows make no batch of batch_size={batch_size} "
                             f"on {world_size} rank(s): lower batch_size")

    def batch(self, i: int, order: torch.Tensor | None = None) -> list[ParallelRow]:
        epoch, j = divmod(i, self.per_pass)
        if order is None:
            order = self.order(epoch)
        first = (j * self.world_size + self.rank) * self.batch_size
        return [self.rows[k] for k in order[first:first + self.batch_size].tolist()]

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __iter__(self):
        order, epoch = None, -1
        for i in itertools.count(int(self.start())):
            if i // self.per_pass != epoch:
                epoch = i // self.per_pass
                order = self.order(epoch)
            yield self.batch(i, order)


class ParallelDataModule(ResumableTrainData):
    """Parallel rows in, token batches out: ``{"texts": [per language: list[str]], "tokens": [per language:
    [B, L] long]}`` (student tokens, trimmed to the longest row). Every rank validates on every held-out
    row (a small set: the numbers need no gathering).

    The training stream starts at ``batches_trained`` (``ResumableTrainData``: the batches trained so far,
    kept in checkpoints), so a resumed run reads on from the next batch whatever the batches per optimiser
    step (``trainer.accumulate_grad_batches``)."""

    use_distributed_sampler = False  # read by the run: the stream splits batches over ranks itself

    def __init__(self, corpus: Corpus, tokenizer: Callable[[list[str]], torch.Tensor], pad_id: int,
                 batch_size: int = 256, val_batch_size: int | None = None, seed: int = 0, val_name: str = "parallel"):
        super().__init__()
        self.corpus, self.tokenizer, self.pad_id = corpus, tokenizer, int(pad_id)
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size or batch_size)
        self.seed, self.val_name = int(seed), val_name

    @property
    def val_set_names(self) -> list[str]:
        return [self.val_name] if self.corpus.val else []

    def teacher_texts(self) -> list[str]:
        """The sentences whose teacher embeddings are the targets (first language, training and held out)."""
        return [r.texts[0] for r in self.corpus.train + self.corpus.val]

    def collate(self, rows: list[ParallelRow]) -> dict:
        texts = [list(col) for col in zip(*(r.texts for r in rows))]
        return {"texts": texts, "tokens": [trim_padding(self.tokenizer(t), self.pad_id) for t in texts]}

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank_, world = self.rank_world()
        if trainer is not None and trainer.global_step and not self.batches_trained:
            # resumed from a checkpoint written before the position was kept: its stream stood at the step's batch
            self.batches_trained = int(trainer.global_step) * int(trainer.accumulate_grad_batches)
        stream = ParallelStream(self.corpus.train, self.batch_size, self.seed, rank_, world,
                                start=lambda: self.batches_trained)
        return DataLoader(stream, batch_size=None, collate_fn=self.collate, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        rows = self.corpus.val
        chunks = [rows[i:i + self.val_batch_size] for i in range(0, len(rows), self.val_batch_size)]
        return DataLoader(chunks, batch_size=None, collate_fn=self.collate, num_workers=0)


# ----------------------------------------------------------------------------------------------
# The module


class DistillModule(L.LightningModule):
    """Trains ``student`` (an open_clip ``HFTextEncoder``) to put every language of a row where ``targets``
    (a :class:`TeacherTargets`) puts the first language's sentence.

    Args:
        student: the text tower trained; its projection outputs the teacher's embedding width.
        targets: the teacher's embeddings of the first language's sentences (kept out of checkpoints).
        langs: the languages of a row; the first is the teacher's.
        loss: ``mse`` or ``cosine`` (:func:`distill_loss`).
        optim: optimiser and schedule (``cliptune.train.optim``).
        seed: each step seeds torch's RNG from (seed, step, rank): dropout draws the same in a resumed run.
        hparams: plain values stored in checkpoints (what the student is).
    """

    def __init__(self, student: nn.Module, targets: TeacherTargets, langs: Sequence[str], loss: str = "mse",
                 optim: OptimConfig | None = None, seed: int = 0, hparams: dict | None = None) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r}: use one of {', '.join(LOSSES)}")
        self.student = student
        self.targets = targets  # a plain attribute: no teacher weight in the checkpoints
        self.langs = tuple(langs)
        self.loss_kind = loss
        self.optim_cfg = optim or OptimConfig()
        self.seed = int(seed)
        self.save_hyperparameters({"distill": {"langs": list(self.langs), "loss": loss, "optim": asdict(self.optim_cfg),
                                               **(hparams or {})}})
        self._val: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self.last_val: dict[str, dict] = {}
        # the step of fit's validation that gave last_val (as the CLIP module)
        self.last_val_fit_step: int | None = None
        self.train_pairs = 0  # rows trained on by this process (throughput)
        self.train_seconds = 0.0  # time spent in training steps (throughput)
        self._t_step = 0.0
        self._step_loss: torch.Tensor | None = None  # the loss of the optimiser step under way (summed micro-batches)

    def setup(self, stage: str) -> None:
        self.targets.to(self.device)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "teacher_texts"):
            self.targets.precompute(dm.teacher_texts())

    def on_fit_start(self) -> None:
        self.targets.to(self.device)

    def on_validation_start(self) -> None:
        fault_point("validation.start")
        self.targets.to(self.device)

    def on_validation_end(self) -> None:
        fault_point("validation.end")

    def losses(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        target = self.targets(batch["texts"][0])  # [B, D]
        per_lang = {lang: distill_loss(self.student(tokens), target, self.loss_kind)
                    for lang, tokens in zip(self.langs, batch["tokens"])}
        return torch.stack(list(per_lang.values())).mean(), per_lang

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        seed_step(self.seed, self.global_step, self.global_rank, self.device)
        t0 = time.perf_counter()
        loss, per_lang = self.losses(batch)
        # checked with the gradients before the optimiser step (every micro-batch's loss counts)
        self._step_loss = loss.detach() if self._step_loss is None else self._step_loss + loss.detach()
        bs = pairs_in_batch(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for lang, value in per_lang.items():
            self.log(f"train/loss_{lang}", value, batch_size=bs)
        self.train_pairs += bs
        self._t_step = t0
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.train_seconds += time.perf_counter() - self._t_step  # forward, backward and optimiser step

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop before a non-finite loss or gradient reaches the weights: the check of ``cliptune-train``
        (every rank stops at the same step, none waits in a collective)."""
        loss, self._step_loss = self._step_loss, None
        problem, _, _ = nonfinite_problem(self, loss if loss is not None else torch.zeros(()))
        if problem is not None:
            raise nonfinite_error(self.global_step + 1, problem, self.optim_cfg)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        refuse_nonfinite_checkpoint(checkpoint)

    def configure_optimizers(self):
        return optimizer_and_schedule(self, self.student, self.optim_cfg)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self.optim_cfg.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim_cfg.grad_clip, gradient_clip_algorithm="norm")

    # ----------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val = []

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        target = self.targets(batch["texts"][0]).float().cpu()
        self._val.append((target, [self.student(tokens).float().cpu() for tokens in batch["tokens"]]))

    def on_validation_epoch_end(self) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        names = list(getattr(dm, "val_set_names", None) or ["parallel"])
        if not self._val:
            return
        target = torch.cat([t for t, _ in self._val])  # [N, D]
        students = [torch.cat([s[i] for _, s in self._val]) for i in range(len(self.langs))]
        metrics = parallel_metrics(target, dict(zip(self.langs, students)), self.loss_kind,
                                   name=f"val set {names[0]!r}")
        n = target.shape[0]
        for k, v in metrics.items():
            self.log(f"val/{names[0]}/{k}", float(v), sync_dist=False)
        chance = {**{f"{lang}_R@1": 1 / n for lang in self.langs}, "mean_R": 1 / n}
        self.last_val = {names[0]: {"metrics": metrics, "chance": chance, "n_pairs": n}}
        self.last_val_fit_step = fit_validation_step(self.trainer)
        self._val = []


def parallel_metrics(target: torch.Tensor, students: dict[str, torch.Tensor], loss: str = "mse",
                     name: str = "embeddings") -> dict[str, float]:
    """Held-out rows: ``<lang>_R@1``, how often a language's student embedding [N, D] finds its own row's
    teacher embedding among all N ``target`` rows by cosine (ties against it); ``<lang>_cos``, the mean
    cosine to it; ``<lang>_loss``; ``loss`` and ``mean_R`` (mean R@1), averaged over languages."""
    gallery = F.normalize(target.float(), dim=-1)
    own = torch.arange(target.shape[0])
    out: dict[str, float] = {}
    for lang, emb in students.items():
        ranks = ranks_t2i(gallery, F.normalize(emb.float(), dim=-1), own, name=name)  # [N]
        out[f"{lang}_R@1"] = (ranks <= 1).double().mean().item()
        out[f"{lang}_cos"] = F.cosine_similarity(emb.float(), target.float(), dim=-1).mean().item()
        out[f"{lang}_loss"] = float(distill_loss(emb, target, loss))
    out["loss"] = sum(out[f"{lang}_loss"] for lang in students) / len(students)
    out["mean_R"] = sum(out[f"{lang}_R@1"] for lang in students) / len(students)
    return out


# ----------------------------------------------------------------------------------------------
# Building the pieces


def build_student(path: str, embed_dim: int, tokenizer: str | None = None, pooler: str = "mean_pooler",
                  proj: str | None = "linear", pretrained: bool = True, context_length: int = 32,
                  ) -> tuple[HFTextEncoder, HFTokenizer, dict]:
    """The student (open_clip ``HFTextEncoder`` projecting to ``embed_dim``), its tokenizer and its
    ``text_cfg`` (as an open_clip model config names it). ``path`` / ``tokenizer``: a folder, a Hub id or a
    ``pkg:<package>/<folder>`` reference; ``pretrained``: load the folder's weights (false: its config,
    randomly initialised)."""
    source = resolve_source(path)
    tok_source = resolve_source(tokenizer or path)
    for folder in {str(source), str(tok_source)}:
        if Path(folder).is_dir():
            refuse_remote_code(folder)  # a model folder is data: no code shipped beside it runs
    try:
        student = HFTextEncoder(str(source), output_dim=int(embed_dim), pooler_type=pooler, proj_type=proj,
                                pretrained=bool(pretrained))
    except (OSError, ValueError) as e:
        hint = (" (a folder holding only config.json, as cliptune.text_tower builds, needs student.pretrained=false)"
                if pretrained else "")
        raise type(e)(f"student.path='{path}': cannot build the Hugging Face text tower: {e}{hint}") from e
    tok = HFTokenizer(str(tok_source), context_length=int(context_length), trust_remote_code=False)
    text_cfg = {"hf_model_name": path, "hf_tokenizer_name": tokenizer or path, "hf_pooler_type": pooler,
                "hf_proj_type": proj, "hf_model_pretrained": bool(pretrained), "context_length": int(context_length)}
    return student, tok, text_cfg


def _embed_dim(bundle: ModelBundle) -> int:
    """The width of the teacher's text embeddings (what its text tower outputs after the projection)."""
    with torch.no_grad():
        return int(bundle.model.encode_text(bundle.tokenizer(["a"])).shape[-1])


# ----------------------------------------------------------------------------------------------
# The run


def run(cfg: DictConfig) -> dict[str, Any]:
    """Distil as configured; returns ``{"before", "after", "run_dir", "export", ...}``. The config is checked
    before anything is written; the run directory is locked for the whole run (as ``cliptune-train``)."""
    register_resolvers()  # a config composed outside the CLI resolves ${pkg:...} and ${log:...} here
    register_configs()
    return run_locked(cfg, validate_distill_config, _run_locked)


def _student_folder(cfg: DictConfig, rd: RunDir, corpus: Corpus, fresh: bool) -> str:
    """``student.path``, or the folder this run builds (``<run>/student_init``; kept when resuming)."""
    if cfg.student.get("path"):
        return str(cfg.student.path)
    folder = rd / STUDENT_INIT
    if fresh or not (folder / "config.json").is_file():
        build = OmegaConf.to_container(cfg.student.build, resolve=True)
        build_text_tower_folder(folder, (t for row in corpus.train for t in row.texts),
                                context_length=int(cfg.student.context_length), **build)
    return str(folder.resolve())


def _run_locked(cfg: DictConfig, rd: RunDir) -> dict[str, Any]:
    rd.path.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    last = rd.last_ckpt
    ckpt_path = checkpoint_to_resume(cfg, rd)
    if rank() == 0:
        save_config(cfg, rd)
    langs = tuple(cfg.data.langs)
    teacher = load_model(cfg.teacher.load, pretrained=cfg.teacher.get("pretrained"))
    corpus = build_corpus(to_plain(cfg.data.train), langs, to_plain(cfg.data.get("exclude")) or (),
                          to_plain(cfg.data.get("val")), float(cfg.data.val_fraction), int(cfg.seed))
    student_path = _student_folder(cfg, rd, corpus, fresh=ckpt_path is None)
    torch.manual_seed(cfg.seed)  # the student's initial weights
    student, tokenizer, text_cfg = build_student(
        student_path, _embed_dim(teacher), cfg.student.get("tokenizer"), cfg.student.pooler, cfg.student.proj,
        bool(cfg.student.pretrained) if cfg.student.get("path") else False, int(cfg.student.context_length))
    optim = instantiate(cfg.optim, _convert_="all")
    module = DistillModule(student, TeacherTargets(teacher.model, teacher.tokenizer), langs, cfg.objective, optim,
                           cfg.seed, hparams={"text_cfg": text_cfg, "teacher": str(cfg.teacher.load)})
    dm = ParallelDataModule(corpus, tokenizer, student.config.pad_token_id, cfg.batch_size,
                            cfg.get("val_batch_size"), cfg.seed, cfg.data.get("val_name") or "parallel")
    log.info("teacher %s (text embeddings of %d dimensions); student %s: %.1fM parameters", cfg.teacher.load,
             student.output_dim, student_path, sum(p.numel() for p in student.parameters()) / 1e6)

    trainer = build_trainer(cfg, build_callbacks(cfg, dm), rd, resumed=ckpt_path is not None,
                            use_distributed_sampler=False)

    has_val = bool(dm.val_set_names)
    before: dict = {}
    if has_val and cfg.eval.before and ckpt_path is None:
        trainer.validate(module, datamodule=dm, verbose=False)
        before = metrics_of(module.last_val)
        if trainer.is_global_zero:
            rd.write_metrics({"before": before, "after": {}, "chance": chance_of(module.last_val),
                              "corpus": corpus.info})
    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    fit_s = time.perf_counter() - t_fit
    trainer.save_checkpoint(last, weights_only=False)
    if nonfinite_entries(student.state_dict()):
        raise NonFiniteError("the student holds non-finite weights: nothing exported")
    after: dict = {}
    if has_val and cfg.eval.after:
        validate_after_fit(trainer, module, dm)
        after = metrics_of(module.last_val)
    pairs_per_s = module.train_pairs / module.train_seconds if module.train_seconds else None
    throughput = {"pairs_per_s": pairs_per_s, "sentences_per_s": pairs_per_s and pairs_per_s * len(langs),
                  "ranks": trainer.world_size}
    result: dict[str, Any] = {"run_dir": str(rd.path), "global_step": trainer.global_step, "before": before,
                              "after": after, "fit_seconds": round(fit_s, 1), "throughput": throughput}
    if trainer.is_global_zero:
        old = rd.read_metrics()
        if ckpt_path is not None and not before:
            before = result["before"] = old.get("before", {})
        rd.write_metrics({"before": before, "after": after,
                          "chance": chance_of(module.last_val) or old.get("chance", {}),
                          "global_step": trainer.global_step, "fit_seconds": round(fit_s, 1),
                          "throughput": throughput, "corpus": corpus.info})
        if cfg.get("export", True):
            model, model_cfg = attach_text_tower(teacher.model, teacher.model_cfg, student.cpu(), text_cfg)
            result["export"] = str(export_model(model, model_cfg, teacher.preprocess_cfg, rd.export,
                                                tokenizer=tokenizer))
            log.info("exported the teacher's CLIP with the distilled text tower to %s (model.text_from=%s)",
                     rd.export, rd.path)
        if before or after:
            rank_zero_print(results_table(before, after, chance_of(module.last_val)))
    return result


def results_table(before: dict, after: dict, chance: dict | None = None) -> Table:
    """Held-out rows before and after distillation (:func:`cliptune.eval.runner.metrics_table`): R@1 and cosine
    per language, the loss."""
    rows = before_after_rows(before, after, chance)
    keys = list(dict.fromkeys(k for set_rows in rows.values() for label, d in set_rows if label != "chance"
                              for k in (d or {})))
    keys = [k for k in keys if k.endswith(("_R@1", "_cos"))] + [k for k in ("mean_R", "loss") if k in keys]
    return metrics_table("Distillation: held-out parallel rows, before and after", rows, keys)

