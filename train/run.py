"""The training run behind ``cliptune-train`` (the library; ``cliptune.train.cli`` is its thin CLI and
shows the commands).

``run(cfg)`` builds the model, data, module and trainer from a composed config, holds the run
directory's lock, trains, evaluates before and after, writes the run's files and returns the final
metrics. Tests and other programs call it with a config composed by Hydra's compose API.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cliptune.config import register_configs, register_resolvers
from cliptune.data.specs import check_local_spec
from cliptune.eval.runner import metrics_table
from cliptune.log import get_logger, rank, rank_zero_print
from cliptune.lora import apply_lora, merged_copy
from cliptune.models import ModelBundle, ensure_logit_bias, export_model
from cliptune.rundir import RunDir
from cliptune.faults import fault_point
from cliptune.train.checkpointing import (AtomicCheckpointIO, EpochEndState, PreemptionCheckpoint, Preempted,
                                         ValidatedStep, resumable_checkpoint)
from cliptune.train.module import ContrastiveModule, FrozenImageCache, NonFiniteError, nonfinite_entries
from cliptune.validate import validate_paths, validate_train_config

log = get_logger(__name__)


def ignore_expected_warnings() -> None:
    """Silence Lightning's warnings about what a cliptune run does on purpose; called as a trainer is built
    (never at import: importing cliptune leaves ``warnings.filters`` as it is)."""
    # Our checkpoints hold the state after the optimiser step on purpose: resuming continues from it.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    # The training loaders are resumable through the data module's state (ResumableTrainData), which
    # knows what was *trained*; Lightning's check only looks at the loader object itself.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    # Lightning warns that an IterableDataset's __len__ may be wrong with several workers; the training
    # dataset's length is exact by construction (a fixed number of batches per rank, split over workers).
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def run_dir_of(cfg: DictConfig) -> Path:
    """The run directory: Hydra's output folder, else ``run_dir`` or ``<out_root>/<name>``."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path(cfg.get("run_dir") or Path(cfg.out_root) / cfg.name)


def build_bundle(cfg: DictConfig) -> ModelBundle:
    """The model from ``cfg.model``, with the temperature/bias the loss needs."""
    try:
        bundle: ModelBundle = instantiate(cfg.model, _convert_="all")
    except Exception as e:  # name the config group in the message
        raise type(e)(f"model config (model=...): {e}") from e
    if cfg.loss.get("init_logit_bias") is not None:
        ensure_logit_bias(bundle.model, cfg.loss.init_logit_bias, bool(cfg.loss.get("add_logit_bias", False)))
    if cfg.get("lora") and cfg.lora.get("r"):
        apply_lora(bundle.model, **OmegaConf.to_container(cfg.lora, resolve=True))
    return bundle


def caches_images(cfg: DictConfig, bundle: ModelBundle) -> bool:
    """``cache_frozen_image`` applies: the image trunk is frozen and the training images are not augmented."""
    return bool(cfg.get("cache_frozen_image", True)) and FrozenImageCache.applies(bundle.model) \
        and str(cfg.data.get("augment") or "none") == "none"


def build_datamodule(cfg: DictConfig, bundle: ModelBundle) -> L.LightningDataModule:
    train_transform = bundle.preprocess_train
    if caches_images(cfg, bundle):
        # open_clip's training transform crops at random (scale 0.9-1): a frozen trunk would see new
        # pixels every epoch and its cache would never hit. The eval transform makes each image's
        # features a fixed point (cache_frozen_image=false keeps the random crop; data.augment=... too).
        train_transform = bundle.preprocess_val
        log.info("image trunk frozen and data.augment=none: training images use the eval transform, "
                 "so their features are computed once (cache_frozen_image=false: the random crop instead)")
    return instantiate(
        cfg.data,
        tokenizer=bundle.tokenizer,
        train_transform=train_transform,
        val_transform=bundle.preprocess_val,
        _convert_="all",
    )


def build_module(cfg: DictConfig, bundle: ModelBundle):
    loss_fn = instantiate(cfg.loss.fn)
    optim = instantiate(cfg.optim, _convert_="all")
    return ContrastiveModule(
        model=bundle.model,
        loss_fn=loss_fn,
        optim=optim,
        accum_steps=cfg.accum_steps,
        max_logit_scale=cfg.loss.get("max_logit_scale"),
        model_spec=bundle.spec,
        lora=OmegaConf.to_container(cfg.lora, resolve=True) if cfg.get("lora") and cfg.lora.get("r") else None,
        compile=cfg.get("compile", False),
        val_batch_size=cfg.get("val_batch_size") or cfg.batch_size,
        cache_frozen_text=cfg.get("cache_frozen_text", True),
        cache_frozen_image=caches_images(cfg, bundle),
        tokenizer=bundle.tokenizer,
        zeroshot_templates=cfg.eval.get("zeroshot_templates"),
        on_nonfinite=cfg.get("on_nonfinite", "error"),
        seed=cfg.seed,
    )


def default_monitor(dm) -> str | None:
    """The metric ``eval.monitor: null`` stands for: ``val/<first validation set>/mean_R`` (None without sets)."""
    names = list(getattr(dm, "val_set_names", None) or [])
    return f"val/{names[0]}/mean_R" if names else None


def build_callbacks(cfg: DictConfig, dm) -> list[L.Callback]:
    """One callback per entry of ``cfg.callbacks`` (``configs/callbacks/``); null entries are dropped.

    An entry whose ``monitor`` is null (``best``: ``monitor: ${eval.monitor}`` with ``eval.monitor: null``)
    watches :func:`default_monitor`, and is left out when the run has no validation set to watch.
    """
    callbacks = []
    for key, node in (cfg.get("callbacks") or {}).items():
        if not node:
            continue
        kwargs = {}
        if "monitor" in node and node.monitor is None:
            kwargs["monitor"] = default_monitor(dm)
            if kwargs["monitor"] is None:
                log.info("callbacks.%s left out: it monitors eval.monitor and the run has no validation set", key)
                continue
        callbacks.append(instantiate(node, **kwargs))  # an error names the entry (full_key: callbacks.<key>)
    return callbacks


def run_locked(cfg: DictConfig, validate: Callable[[DictConfig], None],
               body: Callable[[DictConfig, RunDir], dict[str, Any]]) -> dict[str, Any]:
    """``body(cfg, run_dir)`` with the run directory checked and locked, the way every cliptune run goes.

    ``validate`` runs before any file is written (an invalid config leaves no run directory behind:
    Hydra makes it before calling us); rank 0 then holds the directory's lock for the whole run (a
    second run with the same name refuses at once, naming the holder's PID) and appends the log to
    ``<run>/train.log``. The other ranks are this run's own processes.
    """
    path = run_dir_of(cfg)
    try:
        validate(cfg)
        validate_paths(cfg, check_local_spec)  # the run name, and every data or model path a setting names
    except ValueError:
        remove_if_empty(path)
        raise
    rd = RunDir(path)
    lock = rd.lock() if rank() == 0 else None
    if lock is not None:
        lock.acquire()
        if cfg.get("overwrite") and not cfg.get("resume"):
            rd.clear_run()  # overwrite: nothing of the old run outlives this point (cliptune.rundir.RunDir.clear_run)
    log_file = log_to_file(rd / rd.LOG) if lock is not None else None
    if lock is not None:
        rd.remove_temp_files()  # what a killed writer left beside its target (never read: it was not renamed)
    try:
        return body(cfg, rd)
    except SIGTERMException:
        raise Preempted(preempted_message(rd)) from None
    finally:
        if log_file is not None:
            for name in ("", "cliptune"):
                logging.getLogger(name).removeHandler(log_file)
            log_file.close()
        if lock is not None:
            lock.release()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; returns ``{"before": ..., "after": ..., "run_dir": ...}``.

    The config is checked before anything is written; the run directory is then locked for the
    whole run (a second run with the same ``name=`` refuses at once, naming the holder's PID).
    """
    register_resolvers()  # a config composed outside the CLI resolves ${pkg:...} and ${log:...} here
    register_configs()
    return run_locked(cfg, validate_train_config, _run_locked)


def remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()  # only ever removes an empty directory
    except OSError:
        pass


def log_to_file(path: Path) -> logging.Handler:
    """Append this run's log records (cliptune's, Lightning's, the libraries') to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    for name in ("", "cliptune"):  # cliptune's logger does not propagate to the root
        logging.getLogger(name).addHandler(handler)
    return handler


def preempted_message(rd: RunDir) -> str:
    """What a run stopped by SIGTERM says: where it can be resumed from."""
    found = resumable_checkpoint(rd.checkpoints)
    where = f"{found[0]} (step {found[1]})" if found else "the beginning (no checkpoint yet)"
    return (f"stopped by SIGTERM (preempted): the run in {rd.path} resumes from {where} with the same command "
            "and resume=true")


def checkpoint_to_resume(cfg: DictConfig, rd: RunDir) -> str | None:
    """The checkpoint ``resume=true`` continues from, else None (a fresh start).

    ``last.ckpt``, or when it cannot be read (cut short by a full disk, say) the newest readable
    checkpoint of the run, saying so. A run killed before its first checkpoint starts over, with a
    notice. The settings must be those of the run being resumed (:func:`check_resume_settings`).
    Without ``resume``, a run directory that already holds a run is refused unless ``cfg.overwrite``
    (nothing a run wrote is lost by starting another over it).
    """
    if cfg.resume:
        found = resumable_checkpoint(rd.checkpoints)
        if found is None:
            log.warning("resume=true, but %s holds no checkpoint yet (the run stopped before its first one): "
                        "starting it from the beginning", rd.path)
            return None
        check_resume_settings(cfg, rd)
        return str(found[0])
    held = sorted(rd.checkpoints.glob("*.ckpt")) if rd.checkpoints.is_dir() else []
    if held and not cfg.get("overwrite", False):
        raise FileExistsError(
            f"{rd.path} already holds a run ({held[-1]}). Add resume=true to continue it, "
            "name=<other> for a new run, or overwrite=true to start over in place."
        )
    return None


# Settings a resumed run may change: where the run lives, how long it runs, what it reports and
# writes at the end. Every other one changes the data stream or the optimisation, so the resumed run
# would not continue the same run (resume_allow_changes=true accepts that, and records it).
RESUME_MAY_CHANGE = ("name", "out_root", "run_dir", "resume", "overwrite", "resume_allow_changes", "hydra",
                     "callbacks", "logger", "trainer.max_steps", "trainer.max_epochs", "trainer.enable_progress_bar",
                     "checkpoint_every", "export", "export_start", "eval.before", "eval.after", "demo_data")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def resume_differences(saved: dict, now: dict) -> list[str]:
    """``"key: saved -> now"`` for each setting (dotted key) that differs and may not change on resume."""
    a, b = _flat(saved), _flat(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return out


def check_resume_settings(cfg: DictConfig, rd: RunDir) -> list[str]:
    """Refuse to resume with settings that differ from the run's own (``config.yaml``), naming them;
    with ``resume_allow_changes=true`` return them instead (the caller records them)."""
    saved = rd.read_config()
    if saved is None:
        return []
    now = OmegaConf.to_container(cfg, resolve=True)
    diffs = resume_differences(saved, {k: v for k, v in now.items() if k != "hydra"})
    if diffs and not cfg.get("resume_allow_changes", False):
        raise ValueError(
            f"resume=true with settings that differ from the run's ({rd / rd.CONFIG}): {'; '.join(diffs)}. "
            "They change the data stream or the optimisation, so the result would not be the run that was "
            "stopped: resume with the run's settings, or add resume_allow_changes=true to continue with these "
            "(recorded in overrides.resume-<n>.yaml)")
    if diffs:
        log.warning("resume_allow_changes=true: continuing with settings changed since the run started: %s",
                    "; ".join(diffs))
    return diffs


def finished_run(cfg: DictConfig, rd: RunDir, ckpt_path: str | None) -> dict[str, Any] | None:
    """``metrics.json`` of a run that already finished with these limits, when ``resume=true`` finds one
    (resuming it again would add nothing but rows repeated); None otherwise."""
    if ckpt_path is None:
        return None
    m = rd.read_metrics()
    done = m.get("finished") or {}
    limits = {"max_steps": cfg.trainer.get("max_steps"), "max_epochs": cfg.trainer.get("max_epochs")}
    if not done or {k: done.get(k) for k in limits} != limits or m.get("global_step") != done.get("global_step"):
        return None
    log.info("%s already finished at step %s (trainer.max_steps=%s): nothing to resume; raise trainer.max_steps "
             "to train on", rd.path, m.get("global_step"), limits["max_steps"])
    return {**m, "run_dir": str(rd.path)}


def mark_finished(cfg: DictConfig, rd: RunDir, step: int) -> None:
    """Record in ``metrics.json`` that every file of the run is written (see `finished_run`)."""
    m = rd.read_metrics()
    m["finished"] = {"global_step": int(step), "max_steps": cfg.trainer.get("max_steps"),
                     "max_epochs": cfg.trainer.get("max_epochs")}
    rd.write_metrics(m)


def fit(trainer: L.Trainer, module: L.LightningModule, dm, ckpt_path: str | None) -> float:
    """``trainer.fit`` from ``ckpt_path`` (never running code from the file), then the final state saved
    as ``last.ckpt`` whatever ``max_steps % checkpoint_every``; returns fit's seconds."""
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    seconds = time.perf_counter() - t0
    trainer.save_checkpoint(RunDir(trainer.default_root_dir).last_ckpt, weights_only=False)  # the full state
    return seconds


def save_settings(cfg: DictConfig, rd: RunDir, ckpt_path: str | None) -> None:
    """The run's settings (`save_config`) when it starts; a resumed part keeps the first part's files and
    adds its own command line (and the settings it changed) as ``overrides.resume-<n>.yaml``."""
    if ckpt_path is None or rd.read_config() is None:
        save_config(cfg, rd)
        return
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # run(cfg) called outside Hydra
        overrides = []
    changed = resume_differences(rd.read_config() or {}, OmegaConf.to_container(cfg, resolve=True)) \
        if cfg.get("resume_allow_changes", False) else []
    name = rd.write_resume_record(OmegaConf.to_yaml(OmegaConf.create(
        {"checkpoint": str(ckpt_path), "overrides": overrides, "changed": changed})))
    log.info("resuming from %s; this part's command line is in %s", ckpt_path, name)


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], rd: RunDir, resumed: bool,
                  use_distributed_sampler: bool) -> L.Trainer:
    """``cfg.trainer`` with ``cfg.logger``'s loggers (a resumed run appends to their history instead of
    starting it over), the run's config logged as their hyperparameters."""
    ignore_expected_warnings()
    loggers = [lg for lg in (instantiate(c) for c in (cfg.get("logger") or {}).values() if c) if lg is not None]
    for lg in loggers:
        if hasattr(lg, "keep_history"):
            lg.keep_history = resumed
    plugins = list(instantiate(cfg.trainer.get("plugins")) or []) if cfg.trainer.get("plugins") else []
    if not any(hasattr(p, "save_checkpoint") for p in plugins):
        plugins.append(AtomicCheckpointIO())  # saved beside the target, then renamed (cliptune.train.checkpointing)
    extra = [PreemptionCheckpoint(rd.last_ckpt), ValidatedStep(), EpochEndState()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, *extra],
                                     logger=loggers or False, plugins=plugins, default_root_dir=str(rd.path),
                                     use_distributed_sampler=use_distributed_sampler)
    for lg in loggers:
        if hasattr(lg, "log_hyperparams"):
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer


def validate_after_fit(trainer: L.Trainer, module: L.LightningModule, dm) -> None:
    """Leave the final weights' validation in ``module.last_val``: fit's own when it ran at the last step
    (the same numbers; every rank knows the step, so all skip alike under DDP, and metrics.csv keeps one
    row for that step), else one more pass."""
    if module.last_val and module.last_val_fit_step == trainer.global_step:
        return
    record = next((c for c in trainer.callbacks if isinstance(c, ValidatedStep)), None)
    if record is None or record.restored != trainer.global_step:
        trainer.validate(module, datamodule=dm, verbose=False)
        return
    # resumed after fit's final validation (killed while writing the run's files): its row is in
    # metrics.csv already, so the same numbers are computed again without a second row
    loggers, trainer.loggers = trainer.loggers, []
    try:
        trainer.validate(module, datamodule=dm, verbose=False)
    finally:
        trainer.loggers = loggers


def _run_locked(cfg: DictConfig, rd: RunDir) -> dict[str, Any]:
    run_dir = rd.path
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = checkpoint_to_resume(cfg, rd)
    done = finished_run(cfg, rd, ckpt_path)
    if done is not None:
        return done
    if rank() == 0:
        save_settings(cfg, rd, ckpt_path)
    bundle = build_bundle(cfg)
    if cfg.get("export_start") and ckpt_path is None and rank() == 0:
        _export(cfg, bundle, rd.export_start)  # the WiSE-FT endpoint and the "before" model
    dm = build_datamodule(cfg, bundle)
    module = build_module(cfg, bundle)

    trainer = build_trainer(cfg, build_callbacks(cfg, dm), rd, resumed=ckpt_path is not None,
                            use_distributed_sampler=bool(getattr(dm, "use_distributed_sampler", True)))

    has_val = bool(getattr(dm, "val_set_names", None))
    before, before_val = {}, None
    if has_val and cfg.eval.before and ckpt_path is None:
        trainer.validate(module, datamodule=dm, verbose=False)  # per-language sets: with their consistency
        before_val = module.last_val  # its per-query hits too: cliptune-compare's paired fine-tuning gain
        before = metrics_of(before_val)
        if trainer.is_global_zero:  # on disk now: a run killed later still has its starting point
            _write_metrics(rd, before, {}, {}, resumed=False, before_val=before_val)
    fit_s = fit(trainer, module, dm, ckpt_path)
    after = {}
    if has_val and cfg.eval.after:
        validate_after_fit(trainer, module, dm)
        after = metrics_of(module.last_val)
    skipped = {"train": module.skipped_totals(),
               "val": {name: dict(res.get("skipped") or {}) for name, res in (module.last_val or {}).items()}}
    result: dict[str, Any] = {"run_dir": str(run_dir), "global_step": trainer.global_step, "before": before,
                              "after": after, "fit_seconds": round(fit_s, 1), "skipped": skipped,
                              "nonfinite_steps": module.nonfinite_steps}
    if trainer.is_global_zero:
        _write_metrics(rd, before, after, module.last_val, resumed=ckpt_path is not None, before_val=before_val,
                       extra={"global_step": trainer.global_step, "fit_seconds": round(fit_s, 1),
                              "skipped": skipped, "nonfinite_steps": module.nonfinite_steps})
        if cfg.export:
            result["export"] = str(_export(cfg, bundle, rd.export))
        mark_finished(cfg, rd, trainer.global_step)
        if before or after:
            rank_zero_print(results_table(before, after, chance_of(module.last_val), skipped=skipped))
    return result


def _export(cfg: DictConfig, bundle: ModelBundle, out: Path) -> Path:
    model = bundle.model
    if cfg.get("lora") and cfg.lora.get("r"):
        model = merged_copy(model)

    bad = nonfinite_entries(model.state_dict())
    if bad:  # never hand out weights that would score garbage
        raise NonFiniteError(f"refusing to export non-finite weights to {out} ({len(bad)} tensors, "
                             f"e.g. {', '.join(bad[:3])})")
    fault_point("export.write")
    return export_model(model, bundle.model_cfg, bundle.preprocess_cfg, out, tokenizer=bundle.tokenizer)


def save_config(cfg: DictConfig, rd: RunDir) -> None:
    """The resolved config (without Hydra's own keys), the overrides and each config group's
    option (defaults included): what ``cliptune-compare`` diffs between runs."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    resolved = OmegaConf.create(plain)
    try:
        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
        choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    except Exception:  # run(cfg) called outside Hydra
        overrides, choices = [], {}
    rd.write_config(OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(resolved, resolve=True))),
                    OmegaConf.to_yaml(OmegaConf.create(overrides)), OmegaConf.to_yaml(OmegaConf.create(choices)))


def metrics_of(val: dict) -> dict:
    """``{set: metrics}`` of a validation result (``module.last_val``)."""
    return {name: dict(res.get("metrics", {})) for name, res in (val or {}).items()}


def _write_metrics(rd: RunDir, before: dict, after: dict, last_val: dict, resumed: bool,
                   extra: dict | None = None, before_val: dict | None = None) -> None:
    """``metrics.json`` and ``per_query.pt``: the per-query hits of ``last_val`` (the last evaluation)
    and of ``before_val`` (the evaluation before fine-tuning), kept from the first part when resumed."""
    old = rd.read_metrics()
    before_pq = _per_query(before_val)
    if resumed and not before:
        before = old.get("before", {})  # the resumed run measured "before" in its first part
        if old.get("per_query"):
            before_pq = rd.read_per_query(old["per_query"], before=True)
    data = {"before": before, "after": after, "chance": chance_of(last_val) or old.get("chance", {}),
            **(extra or {})}
    # last_val is before_val when nothing was evaluated since: those hits are not the fine-tuned model's
    per_query = _per_query(last_val) if last_val is not before_val else {}
    if per_query or before_pq:
        data["per_query"] = rd.write_per_query(per_query, before=before_pq)
    rd.write_metrics(data)


def _per_query(val: dict | None) -> dict:
    """``{set: {"keys": [...], metric: [n] hits}}`` of a validation result (``module.last_val``)."""
    return {name: {"keys": res["keys"], **res["per_query"]} for name, res in (val or {}).items()
            if res.get("per_query")}


def chance_of(val: dict) -> dict:
    """``{set: chance level of each metric}`` of a validation result (``module.last_val``)."""
    return {name: dict(res.get("chance") or {}) for name, res in (val or {}).items()}


def results_table(before: dict, after: dict, chance: dict | None = None, skipped: dict | None = None):
    """cliptune-train's :func:`cliptune.eval.runner.metrics_table`: per validation set, rows before / after /
    chance, one column per metric; ``skipped`` (``{"train": {reason: n}, "val": {set: {reason: n}}}``) adds
    the samples left out."""
    keys = ["t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "mean_R", "zs_top1", "loss",
            "xling_top1", "xling_top1_correct"]
    left_out = None
    if skipped is not None:
        val = skipped.get("val") or {}
        left_out = {"training": skipped.get("train") or {}, **{n: c for n, c in val.items() if sum(c.values())}}
    return metrics_table("Validation: before and after fine-tuning", before_after_rows(before, after, chance), keys,
                         left_out)


def before_after_rows(before: dict, after: dict, chance: dict | None = None) -> dict[str, list]:
    """``{set: [("before", ...), ("after", ...), ("chance", ...)]}`` of a run's ``metrics.json`` parts, sets sorted."""
    return {name: [("before", before.get(name)), ("after", after.get(name)), ("chance", (chance or {}).get(name))]
            for name in sorted(set(before) | set(after))}
