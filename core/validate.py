"""Check a composed config before a run writes anything: every bad value at once, each named.

    from cliptune.validate import validate_train_config
    validate_train_config(cfg)   # cliptune-train; validate_eval_config / validate_wiseft_config likewise

A bad value raises one :class:`ConfigError` listing every offending key with its value, the
allowed range and how to fix it::

    optim.lr=-1: must be > 0; set optim.lr=<positive float>, e.g. 1e-4
    trainer.max_steps=-1: with trainer.max_epochs=-1 the run never ends (-1 means no limit for both); ...

Values are read as the run reads them (interpolations resolved). A value that needs Hydra's
runtime (``${hydra:...}``) while none is set is skipped; a missing one (``???``) is reported once,
by name. The domains follow the code that consumes each value (``cliptune.train.optim``,
``cliptune.train.losses``, ``cliptune.lora``, ``cliptune.data``) and Lightning's ``Trainer``.

The train config's own keys, ``optim.*`` and ``loss.*`` have schemas (``cliptune.config``): Hydra has
checked their names and types while composing, and their ranges are the schemas' own (``_schema``
reads them); the option names of every choice come from ``cliptune.domains``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue, OmegaConfBaseException

from cliptune.config import LossFnSchema, LossSchema, OptimSchema, TrainSchema
from cliptune.domains import (
    AUGMENT_FLIP,
    AUGMENT_PRESETS,
    DISTILL_OBJECTIVES,
    EVAL_PRECISIONS,
    EVAL_SPLITS,
    NONNEG_INT,
    ON_NONFINITE,
    POS_INT,
    TOWERS,
    WISEFT_SELECT,
    Domain,
    Num,
    is_int,
    is_number,
    show_value,
)
from cliptune.rundir import RunDir

__all__ = ["ConfigError", "validate_train_config", "validate_distill_config", "validate_eval_config",
           "validate_wiseft_config", "validate_paths", "run_name_problem", "validation_metrics"]


class ConfigError(ValueError):
    """Invalid config values; ``problems`` holds one line per offending key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        head = f"invalid config: {n} problem{'s' if n != 1 else ''}"
        super().__init__(head + "".join(f"\n  - {p}" for p in self.problems))


_ABSENT = object()  # key not in the config, missing (reported separately) or not resolvable now

# Lightning's accepted `Trainer(precision=...)` values (lightning.fabric's _PRECISION_INPUT).
PRECISIONS: tuple[Any, ...] = (16, 32, 64, "16", "32", "64", "bf16", "16-true", "16-mixed", "bf16-true",
                               "bf16-mixed", "32-true", "64-true", "transformer-engine",
                               "transformer-engine-float16")
# Precisions that keep the weights (loss.logit_scale among them) in a 16-bit type, and the spacing of that
# type between 2 and 4 (where log(1/0.07) lies): a step of the temperature smaller than half of it is lost.
FROZEN_TEMPERATURE = {"bf16-true": ("bf16", 2.0 ** -6), "16-true": ("fp16", 2.0 ** -9)}
# What validation logs for each set, as val/<set>/<metric> (cliptune.train.module on_validation_epoch_end):
# cliptune.eval.retrieval.retrieval_metrics at the K the module uses (cliptune.eval.embed.evaluate_gathered),
# the validation loss, and the zero-shot accuracy of sets whose samples carry a label (zeroshot_from_collected).
VAL_KS = (1, 5, 10)
VAL_METRICS: tuple[str, ...] = (
    *(f"{d}_R@{k}" for d in ("t2i", "i2t") for k in VAL_KS), "mean_R",
    *(f"{d}_{r}" for d in ("t2i", "i2t") for r in ("median_rank", "mean_rank")), "loss",
    "zs_top1", "zs_top5", "zs_balanced_acc", "zs_n")
# ... and for the cross-lingual consistency of a set validated in several languages (val/<set>:<a>~<b>/...,
# cliptune.eval.retrieval.crosslingual_consistency)
XLING_METRICS: tuple[str, ...] = ("xling_top1", "xling_top1_correct")
_TIMEDELTA_KEYS = ("weeks", "days", "hours", "minutes", "seconds", "milliseconds", "microseconds")
_EXAMPLES = {"model.name": "ViT-B-32", "data.train": "'shards/train-{000000..000009}.tar'"}


class _Checker:
    """Reads resolved values from ``cfg`` and collects one problem line per bad key."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.raw = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dict(cfg)
        self.problems: list[str] = []
        for key in self._missing(self.raw, ""):
            example = _EXAMPLES.get(key, "<value>")
            self.problems.append(f"{key}=???: required, no value given; set it on the command line, "
                                 f"e.g. {key}={example}")

    @staticmethod
    def _missing(node: Any, prefix: str) -> Iterator[str]:
        items: Iterable = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            key = f"{prefix}[{k}]" if isinstance(node, list) else (f"{prefix}.{k}" if prefix else str(k))
            if key == "hydra":
                continue
            if v == "???":
                yield key
            else:
                yield from _Checker._missing(v, key)

    def keys_named(self, name: str) -> list[str]:
        """Every dotted key whose last part is ``name`` (Hydra's own config excluded)."""
        found: list[str] = []

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    key = f"{prefix}.{k}" if prefix else str(k)
                    if key == "hydra":
                        continue
                    if k == name:
                        found.append(key)
                    walk(v, key)

        walk(self.raw, "")
        return found

    def _raw(self, key: str) -> Any:
        node: Any = self.raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def get(self, key: str) -> Any:
        """The resolved value at ``key``, or ``_ABSENT`` (absent, missing or needing Hydra's runtime)."""
        try:
            v = OmegaConf.select(self.cfg, key, default=_ABSENT, throw_on_missing=True,
                                 throw_on_resolution_failure=True)
            if OmegaConf.is_config(v):
                v = OmegaConf.to_container(v, resolve=True)
        except (MissingMandatoryValue, InterpolationToMissingValueError):
            return _ABSENT  # reported by name already
        except OmegaConfBaseException as e:
            raw, text = self._raw(key), str(e)
            if "HydraConfig" in text or (isinstance(raw, str) and "${hydra:" in raw):
                return _ABSENT  # Hydra resolves it at run time
            first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            self._add(f"{key}={show_value(raw)}: cannot be resolved ({first}); fix the interpolation or "
                      f"set {key}=<value>")
            return _ABSENT
        return v

    def _add(self, line: str) -> None:
        if line not in self.problems:  # a key read by two checks is reported once
            self.problems.append(line)

    def fail(self, key: str, value: Any, rule: str, fix: str) -> None:
        self._add(f"{key}={show_value(value)}: {rule}; {fix}")

    def num(self, key: str, dom: Num, example: str, why: str | None = None, typed: bool = False) -> Any:
        """Check a number; returns the value when it is valid, else ``_ABSENT``."""
        v = self.get(key)
        if v is _ABSENT:
            return _ABSENT
        if dom.ok(v, typed):
            return v
        rule = dom.describe(v) + (f" ({why})" if why else "")
        self.fail(key, v, rule, f"set {key}={dom.placeholder()}, e.g. {example}")
        return _ABSENT

    def range(self, key: str, dom: Num, example: str, why: str | None = None) -> Any:
        """Check the range of a number whose key and type a schema guarantees (``cliptune.config``)."""
        return self.num(key, dom, example, why, typed=True)

    def choice(self, key: str, options: Iterable[Any], null: bool = False) -> Any:
        v = self.get(key)
        if v is _ABSENT:
            return _ABSENT
        options = list(options)
        if (v is None and null) or any(v == o and type(v) is type(o) for o in options):
            return v
        names = ", ".join(show_value(o) if not isinstance(o, str) else o for o in options) + (", null" if null else "")
        self.fail(key, v, f"must be one of {names}", f"set {key}=<one of them>, e.g. {key}={options[0]}")
        return _ABSENT

    def flag(self, key: str, null: bool = False) -> Any:
        v = self.get(key)
        if v is _ABSENT or isinstance(v, bool) or (v is None and null):
            return v
        self.fail(key, v, "must be true or false" + (" or null" if null else ""), f"set {key}=true or {key}=false")
        return _ABSENT

    def string(self, key: str, null: bool = True, example: str = "<name>") -> Any:
        v = self.get(key)
        if v is _ABSENT or (isinstance(v, str) and v.strip()) or (v is None and null):
            return v
        self.fail(key, v, "must be a non-empty string" + (" or null" if null else ""), f"set {key}={example}")
        return _ABSENT

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _interpolates(c: _Checker, key: str, target: str) -> bool:
    """True when ``key`` is just ``${target}`` (checked once, under ``target``)."""
    raw = c._raw(key)
    return isinstance(raw, str) and raw.replace(" ", "") == "${" + target + "}"


# ------------------------------------------------------------------------------------ shared pieces
def _caption_lang(c: _Checker, key: str, many: bool = False) -> None:
    """``any``, a language code, a comma list (``en,zh``) or a list of codes (cliptune.data.wds
    parse_caption_lang); with ``many`` each list entry is one language (set) reported separately."""
    v = c.get(key)
    if v is _ABSENT or (v is None and not many):
        return
    fix = f"set {key}=any, {key}=en or {key}=en,zh" if not many else f"set {key}=[any] or {key}=[en,zh]"

    def codes(x: Any) -> list[str] | None:
        parts = x.split(",") if isinstance(x, str) else x if isinstance(x, list) else None
        if parts is None or not all(isinstance(p, str) for p in parts):
            return None
        return [p.strip() for p in parts if p.strip()]

    if many and isinstance(v, list):
        bad = [x for x in v if not isinstance(x, str) or not codes(x)]
        if not v or bad:
            c.fail(key, v, "must be a non-empty list of 'any', language codes or comma lists", fix)
        elif len(set(v)) != len(v):
            c.fail(key, v, "lists a language twice (results are keyed by it)", fix)
        return
    if not codes(v):
        c.fail(key, v, "must be 'any', a language code (en) or a comma list (en,zh)", fix)


def _templates(c: _Checker, key: str) -> None:
    """Zero-shot prompts: ``str.format`` strings with ``{c}`` (or ``{}``) for the class name."""
    v = c.get(key)
    if v is _ABSENT or v is None:
        return
    if not isinstance(v, list):
        c.fail(key, v, "must be a list of prompt templates", f"set {key}=['a photo of a {{c}}.']")
        return
    for i, t in enumerate(v):
        try:
            ok = isinstance(t, str) and "{" in t and t.format("x", c="x") != t
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            c.fail(f"{key}[{i}]", t, "must be a template with {c} for the class name",
                   "write it like 'a photo of a {c}.'")


def _ks(c: _Checker, key: str) -> list[int] | None:
    v = c.get(key)
    if v is _ABSENT:
        return None
    if not isinstance(v, list) or not v or not all(is_int(k) and k >= 1 for k in v) or len(set(v)) != len(v):
        c.fail(key, v, "must be a non-empty list of distinct ints >= 1 (the K of Recall@K)", f"set {key}=[1,5,10]")
        return None
    return v


def _device(c: _Checker, key: str) -> None:
    v = c.get(key)
    if v is _ABSENT or v == "auto":
        return
    ok = isinstance(v, str)
    if ok:
        import torch  # noqa: PLC0415 - only to check a device string: the config check must not import torch

        try:
            torch.device(v)
        except (RuntimeError, ValueError):
            ok = False
    if not ok:
        c.fail(key, v, "must be auto or a torch device (cpu, cuda, cuda:1, mps)", f"set {key}=auto")


# ------------------------------------------------------------------------------------ train
def _lightning_names() -> tuple[set[str], set[str]]:
    """Accelerator and strategy names Lightning knows (its registries, plus its aliases)."""
    accelerators = {"auto", "cpu", "gpu", "cuda", "mps", "tpu"}
    strategies = {"auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp", "deepspeed", "single_device"}
    try:
        from lightning.pytorch.accelerators import AcceleratorRegistry  # noqa: PLC0415 - only when an accelerator or strategy is named (fast config check)
        from lightning.pytorch.strategies import StrategyRegistry  # noqa: PLC0415 - only when an accelerator or strategy is named (fast config check)

        accelerators |= set(AcceleratorRegistry.available_accelerators())
        strategies |= set(StrategyRegistry.available_strategies())
    except ImportError:  # pragma: no cover - lightning is a dependency
        pass
    return accelerators, strategies


def _world_size(c: _Checker) -> int | None:
    devices, nodes = c.get("trainer.devices"), c.get("trainer.num_nodes")
    n = len(devices) if isinstance(devices, list) and devices else None
    if is_int(devices) and devices >= 1:
        n = devices
    return n * nodes if n is not None and is_int(nodes) and nodes >= 1 else None


def _trainer(c: _Checker) -> None:
    max_steps = c.num("trainer.max_steps", Num(lo=1, integer=True, also=(-1,)), "1000",
                      why="-1 = no step limit, then trainer.max_epochs ends the run")
    max_epochs = c.num("trainer.max_epochs", Num(lo=1, integer=True, also=(-1,), null=True), "10",
                       why="-1 = no epoch limit")
    if max_steps == -1 and max_epochs is not _ABSENT and not (is_int(max_epochs) and max_epochs >= 1):
        if max_epochs == -1:
            rule = "with trainer.max_epochs=-1 the run never ends (-1 means no limit for both)"
        else:
            rule = "with no step limit trainer.max_epochs must be an int >= 1 to end the run"
        c.fail("trainer.max_steps", max_steps, rule,
               "set trainer.max_steps=<int >= 1>, e.g. 1000, or trainer.max_epochs=<int >= 1>, e.g. 10")
    for key in ("trainer.min_steps", "trainer.min_epochs"):
        c.num(key, Num(lo=0, integer=True, null=True), "0")

    every_n_epoch = c.num("trainer.check_val_every_n_epoch", Num(lo=1, integer=True, null=True), "1",
                          why="null = validate by step count across epochs")
    key, v = "trainer.val_check_interval", c.get("trainer.val_check_interval")
    if v is not _ABSENT and v is not None:
        fix = f"set {key}=<int >= 1> (every N steps), e.g. 200"
        if isinstance(v, str):
            parts = v.split(":")
            if not (len(parts) == 4 and all(p.strip().isdigit() for p in parts) and any(int(p) for p in parts)):
                c.fail(key, v, "a time-based interval must be 'DD:HH:MM:SS' and longer than 0", fix)
        elif isinstance(v, dict):
            if not (v and set(v) <= set(_TIMEDELTA_KEYS) and all(is_number(x) and x >= 0 for x in v.values())
                    and any(x > 0 for x in v.values())):
                c.fail(key, v, f"a time-based interval must map {', '.join(_TIMEDELTA_KEYS)} to numbers >= 0", fix)
        elif is_int(v):
            if v < 1:
                c.fail(key, v, "must be an int >= 1 (steps between validations) or a float in (0, 1]", fix)
        elif isinstance(v, float):
            if not (math.isfinite(v) and 0 < v <= 1):
                c.fail(key, v, "must be an int >= 1 (steps between validations) or a float in (0, 1] "
                               "(fraction of an epoch)", fix)
            elif every_n_epoch is None:
                c.fail(key, v, "a float (fraction of an epoch) needs trainer.check_val_every_n_epoch "
                               "set; with null it must be an int >= 1 (steps)",
                       f"{fix}, or trainer.check_val_every_n_epoch=1")
        else:
            c.fail(key, v, "must be an int >= 1 (steps) or a float in (0, 1] (fraction of an epoch)", fix)

    c.num("trainer.log_every_n_steps", POS_INT, "10")
    c.num("trainer.num_sanity_val_steps", Num(lo=0, integer=True, also=(-1,), null=True), "0",
          why="-1 = every validation batch")
    c.num("trainer.num_nodes", POS_INT, "1")
    for key in ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches",
                "trainer.limit_predict_batches", "trainer.overfit_batches"):
        v = c.get(key)
        if v is not _ABSENT and v is not None and not (
                (is_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1)):
            c.fail(key, v, "must be an int >= 0 (batches) or a float in [0, 1] (fraction)", f"set {key}=1.0")
    v = c.get("trainer.fast_dev_run")
    if v is not _ABSENT and not isinstance(v, bool) and not (is_int(v) and v >= 0):
        c.fail("trainer.fast_dev_run", v, "must be true, false or an int >= 0 (batches)",
               "set trainer.fast_dev_run=false")

    precision = c.get("trainer.precision")
    if precision is not _ABSENT and precision is not None and not any(
            precision == p and type(precision) is type(p) for p in PRECISIONS):
        c.fail("trainer.precision", precision, "must be one of Lightning's precisions: 32-true, 16-mixed, "
               "bf16-mixed, 16-true, bf16-true, 64-true, transformer-engine, transformer-engine-float16 "
               "(or 16, 32, 64, bf16)",
               "set trainer.precision=32-true (CPU) or trainer.precision=bf16-mixed (GPU)")
    elif precision in FROZEN_TEMPERATURE:
        dtype, spacing = FROZEN_TEMPERATURE[precision]
        c.fail("trainer.precision", precision, f"keeps the weights in {dtype}, where the temperature cannot train: "
               f"near its start, log(1/0.07) = 2.66, the next {dtype} value is {spacing:.4g} away, far more than an "
               "optimiser step of about optim.lr, so every step rounds back to the same value",
               "set trainer.precision=bf16-mixed (weights in fp32, matrix products in bf16) or "
               "trainer.precision=32-true")

    devices = c.get("trainer.devices")
    if devices is not _ABSENT and not _devices_ok(devices):
        c.fail("trainer.devices", devices, "must be auto, -1 (all), an int >= 1 (how many), a list of "
               "device indices ([0, 1]) or a string of them ('0,1')", "set trainer.devices=1 or trainer.devices=auto")
    accelerators, strategies = _lightning_names()
    acc = c.get("trainer.accelerator")
    if isinstance(acc, str) and acc not in accelerators:
        c.fail("trainer.accelerator", acc, f"must be one of {', '.join(sorted(accelerators))}",
               "set trainer.accelerator=cpu or trainer.accelerator=gpu")
    elif acc is not _ABSENT and not isinstance(acc, (str, dict)) and acc is not None:
        c.fail("trainer.accelerator", acc, "must be an accelerator name", "set trainer.accelerator=cpu")
    strategy = c.get("trainer.strategy")
    if isinstance(strategy, str) and strategy not in strategies:
        c.fail("trainer.strategy", strategy, f"must be one of {', '.join(sorted(strategies))} (or a _target_ node)",
               "set trainer.strategy=auto or trainer.strategy=ddp")
    v = c.get("trainer.deterministic")
    if v is not _ABSENT and v is not None and not isinstance(v, bool) and v != "warn":
        c.fail("trainer.deterministic", v, "must be true, false, warn or null", "set trainer.deterministic=false")
    for key in ("trainer.enable_model_summary", "trainer.enable_checkpointing", "trainer.enable_progress_bar",
                "trainer.benchmark", "trainer.sync_batchnorm"):
        c.flag(key, null=True)


def _devices_ok(v: Any) -> bool:
    """Lightning's ``devices``: auto, -1, a count >= 1, a list of indices, or those as a string."""
    if v == "auto" or (is_int(v) and (v == -1 or v >= 1)):
        return True
    if isinstance(v, list):
        return bool(v) and all(is_int(i) and i >= 0 for i in v) and len(set(v)) == len(v)
    if isinstance(v, str):
        s = v.strip()
        if s == "-1":
            return True
        if "," in s:
            ids = [p.strip() for p in s.split(",") if p.strip()]
            return bool(ids) and all(p.isdigit() for p in ids) and len(set(map(int, ids))) == len(ids)
        return s.isdigit() and int(s) >= 1
    return False


def _schema(c: _Checker, prefix: str, schema: type) -> dict[str, Any]:
    """The ranges and options a schema's fields carry (``cliptune.domains.domain``); Hydra has checked the
    names and types while composing. Returns ``{field: value}`` of those that are valid."""
    good: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        dom: Domain | None = f.metadata.get("domain")
        if dom is None:
            continue
        key, v = f"{prefix}{f.name}", _ABSENT
        if dom.num is not None:
            v = c.range(key, dom.num, dom.example, why=dom.why)
        elif dom.choices:
            v = c.choice(key, dom.choices)
        elif dom.each is not None:
            v = c.get(key)
            assert isinstance(f.default, tuple), key  # per-item domains are on tuple fields
            n = len(f.default)
            if v is not _ABSENT and not (len(v) == n and all(dom.each.ok(x, typed=True) for x in v)):
                words = {2: "two", 3: "three"}.get(n, str(n))
                c.fail(key, v, f"must be {words} numbers, each {dom.each.range()}", f"set {key}={dom.example}")
                v = _ABSENT
        if v is not _ABSENT:
            good[f.name] = v
    return good


def _loss(c: _Checker) -> None:
    """``loss.*``: names, types and ranges from cliptune.config.LossSchema."""
    _schema(c, "loss.fn.", LossFnSchema)
    bias = _schema(c, "loss.", LossSchema).get("init_logit_bias", _ABSENT)
    if c.get("loss.add_logit_bias") is True and bias is None:
        c.fail("loss.add_logit_bias", True, "needs loss.init_logit_bias, the new bias's starting value",
               "set loss.init_logit_bias=<float>, e.g. -10.0")


def _model(c: _Checker) -> None:
    c.string("model.name", null=False, example="ViT-B-32")
    v = c.get("model.image_size")
    if v is not _ABSENT and v is not None and not (
            (is_int(v) and v >= 1) or (isinstance(v, list) and len(v) == 2 and all(is_int(x) and x >= 1 for x in v))):
        c.fail("model.image_size", v, "must be null, an int >= 1 or [height, width]", "set model.image_size=224")
    c.num("model.context_length", Num(lo=1, integer=True, null=True), "77")
    c.num("model.lock_image_unlocked_groups", NONNEG_INT, "0")
    c.num("model.lock_text_unlocked_layers", NONNEG_INT, "0")
    for key in ("model.lock_image", "model.lock_image_freeze_bn_stats", "model.lock_text",
                "model.lock_text_freeze_layer_norm", "model.grad_checkpointing"):
        c.flag(key)
    # sizes of an architecture defined in the config (named open_clip models check their own)
    c.num("model.arch.embed_dim", POS_INT, "512")
    for tower, keys in (("vision_cfg", ("layers", "width", "patch_size", "head_width")),
                        ("text_cfg", ("context_length", "vocab_size", "width", "heads", "layers"))):
        for k in keys:
            c.num(f"model.arch.{tower}.{k}", Num(lo=1, integer=True, null=True), "64")
    v = c.get("model.arch.vision_cfg.image_size")
    if v is not _ABSENT and v is not None and not (
            (is_int(v) and v >= 1) or (isinstance(v, list) and len(v) == 2 and all(is_int(x) and x >= 1 for x in v))):
        c.fail("model.arch.vision_cfg.image_size", v, "must be an int >= 1 or [height, width]",
               "set model.arch.vision_cfg.image_size=64")


def _like(c: _Checker, key: str, schema: type, name: str) -> Any:
    """Check ``key`` (not in a schema) against the range of the schema field ``name`` it stands for."""
    dom: Domain = next(f for f in dataclasses.fields(schema) if f.name == name).metadata["domain"]
    assert dom.num is not None, name  # a numeric field: what _like stands for
    return c.num(key, dom.num, dom.example, why=dom.why)


def _data(c: _Checker) -> None:
    # data.batch_size, data.seed and data.val_batch_size are the top-level keys, interpolated by default
    for name in ("batch_size", "seed", "val_batch_size"):
        if not _interpolates(c, f"data.{name}", name):
            _like(c, f"data.{name}", TrainSchema, name)
    c.num("data.workers", NONNEG_INT, "4", why="0 = load in the main process")
    c.num("data.val_workers", Num(lo=0, integer=True, null=True), "1", why="null = data.workers")
    world = _world_size(c)
    batch = c.get("data.batch_size")
    per_step = batch * (world or 1) if is_int(batch) and batch >= 1 else None
    for key, why in (("data.samples_per_epoch", "global samples per epoch; null = the index's count"),
                     ("data.num_samples", "training pairs")):
        n = c.num(key, Num(lo=1, integer=True, null=key == "data.samples_per_epoch"), "4096", why=why)
        if is_int(n) and per_step is not None and n < per_step:
            c.fail(key, n, f"is less than one global batch (data.batch_size={batch} x {world or 1} rank(s))",
                   f"set {key}=<int >= {per_step}> or lower batch_size")
    c.num("data.val_samples", POS_INT, "128")
    c.num("data.sample_shuffle", NONNEG_INT, "1000", why="0 disables the shuffle buffer")
    c.num("data.max_negatives", NONNEG_INT, "0", why="0 = no hard negatives")
    c.num("data.max_member_bytes", POS_INT, "268435456", why="larger tar members are skipped and counted unread")
    _caption_lang(c, "data.caption_lang")
    c.string("data.group_field", null=False, example="group")
    for key in ("data.resampled", "data.shard_shuffle", "data.persistent_workers", "data.strict"):
        c.flag(key)
    c.flag("data.pin_memory", null=True)
    c.choice("data.augment", AUGMENT_PRESETS)
    c.choice("data.augment_flip", AUGMENT_FLIP)


def _lora(c: _Checker) -> None:
    r = c.num("lora.r", NONNEG_INT, "8", why="0 = no LoRA")
    c.num("lora.alpha", Num(lo=0, lo_open=True, null=True), "16", why="scaling alpha / r; null = r")
    c.num("lora.dropout", Num(lo=0, hi=1, hi_open=True), "0.0")
    c.flag("lora.train_logit_scale")
    for key, need in (("lora.towers", True), ("lora.keep_trainable", False)):
        v = c.get(key)
        if v is _ABSENT or (v is None and not need):
            continue
        if not isinstance(v, list) or not all(t in TOWERS for t in v) or (need and is_int(r) and r > 0 and not v):
            c.fail(key, v, "must be a list of image and/or text" + (" (not empty with lora.r > 0)" if need else ""),
                   f"set {key}=[image,text]")
    v = c.get("lora.targets")
    if v is not _ABSENT and not (isinstance(v, list) and all(isinstance(t, str) and t for t in v)
                                 and (v or not (is_int(r) and r > 0))):
        c.fail("lora.targets", v, "must be a non-empty list of module names", "set lora.targets=[attn,c_fc,c_proj]")


def run_name_problem(name: Any, out_root: Any = "runs") -> str | None:
    """Why ``name`` cannot name a run directory inside ``out_root``, or None: it must be a relative path
    (``demo``, ``losses/a``) that stays inside ``out_root``, so that a run never writes beside or above
    the runs folder (``../x``, ``a/../../b``, ``/abs``) nor into the runs folder itself (empty, ``.``)."""
    root = out_root if isinstance(out_root, str) and out_root else "runs"
    fix = f"set name=<a folder name inside {root}>, e.g. name=mine"
    if not isinstance(name, str) or not name.strip():
        return f"name={show_value(name)}: must be a non-empty folder name (the run directory is {root}/<name>); {fix}"
    if name.startswith(("/", "\\")):
        return (f"name={show_value(name)}: must be relative to out_root={root} (an absolute path would put the run "
                f"outside it); {fix}, or out_root=<folder> for another runs folder")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            return f"name={show_value(name)}: climbs out of out_root={root} ('..'); {fix}"
    if depth == 0:
        return f"name={show_value(name)}: names {root} itself, where every run has its folder; {fix}"
    if ".." in parts:
        return f"name={show_value(name)}: must not contain '..' (the run directory would not be {root}/{name}); {fix}"
    return None


def _run_name(c: _Checker) -> None:
    name = c.get("name")
    if name is _ABSENT:
        return
    out_root = c.get("out_root")
    problem = run_name_problem(name, out_root if isinstance(out_root, str) else "runs")
    if problem:
        c._add(problem)


def _val_set_names(c: _Checker) -> list[str] | None:
    """The names validation logs its sets under (``val/<name>/...``), as the data module builds them
    (cliptune.data.datamodule ``val_set_names`` and the module's cross-lingual sets); None when the
    data module is not one of cliptune's."""
    target = c.get("data._target_")
    if not isinstance(target, str):
        return None
    if target.endswith(".SyntheticDataModule"):
        return ["synthetic"]
    if not target.endswith(".WdsDataModule"):
        return None
    val = c.get("data.val")
    if val is _ABSENT:
        return None
    if isinstance(val, dict):
        sets = [str(k) for k, v in val.items() if v is not None]
    else:
        sets = [] if val is None else ["val"]
    langs = c.get("data.val_caption_langs")
    langs = [langs] if isinstance(langs, str) else langs if isinstance(langs, list) else None
    if not langs:
        return sets
    single = [str(x) for x in langs if x != "any" and "," not in str(x)]
    pairs = [f"{a}~{b}" for i, a in enumerate(single) for b in single[i + 1:]] if len(langs) > 1 else []
    return [f"{s}:{lang}" for s in sets for lang in [*map(str, langs), *pairs]]


def validation_metrics(set_name: str) -> tuple[str, ...]:
    """The metrics validation logs for a set (``val/<set_name>/<metric>``)."""
    return XLING_METRICS if "~" in set_name.rpartition(":")[2] else VAL_METRICS


def _monitor(c: _Checker) -> None:
    """``eval.monitor`` must be a metric validation logs, else no ``best.ckpt`` is ever written."""
    monitor = c.get("eval.monitor")
    if not isinstance(monitor, str) or not monitor.strip():
        return  # null: the first set's mean_R (or no best checkpoint without sets); empty: c.string reports it
    sets = _val_set_names(c)
    if sets is None:
        return
    if not sets:
        c.fail("eval.monitor", monitor, "the run has no validation set, so nothing is logged to monitor",
               "add one (data.val.<name>=<shard spec>) or set eval.monitor=null")
        return
    known = [f"val/{s}/{m}" for s in sets for m in validation_metrics(s)]
    if monitor in known:
        return
    prefix, _, metric = monitor.rpartition("/")
    head, _, set_name = prefix.partition("/")
    if head != "val" or set_name not in sets:
        rule = (f"names no validation set of this run (val/<set>/<metric> with <set> one of "
                f"{', '.join(sets)})")
    else:
        rule = (f"{metric!r} is not a metric validation logs for {set_name} "
                f"(one of {', '.join(validation_metrics(set_name))})")
    c.fail("eval.monitor", monitor, rule, f"set eval.monitor=val/{sets[0]}/mean_R or eval.monitor=null")


def validate_train_config(cfg: DictConfig) -> None:
    """Check a ``cliptune-train`` config (configs/train.yaml and its groups, composed by Hydra: the schemas
    of cliptune.config have typed its keys); raises :class:`ConfigError` listing every bad value. Call it
    before the run directory or any file is created."""
    c = _Checker(cfg)
    # the config's own keys: names, types and ranges from cliptune.config.TrainSchema
    own = _schema(c, "", TrainSchema)
    batch, accum = own.get("batch_size", _ABSENT), own.get("accum_steps", _ABSENT)
    if batch is not _ABSENT and accum is not _ABSENT and batch % accum:
        divisors = [d for d in range(1, min(batch, 64) + 1) if batch % d == 0]
        c.fail("accum_steps", accum, f"must divide batch_size={batch} (equal micro-batches)",
               f"set accum_steps to one of {', '.join(map(str, divisors[:8]))}{', ...' if len(divisors) > 8 else ''}")
    c.string("eval.monitor", example="val/<set>/mean_R")  # not empty
    _monitor(c)
    _templates(c, "eval.zeroshot_templates")
    for key in c.keys_named("on_nonfinite"):
        c.choice(key, ON_NONFINITE)
    _run_settings(c)
    _loss(c)
    _model(c)
    _data(c)
    _lora(c)
    c.raise_if_any()


def _run_settings(c: _Checker) -> None:
    """What every training entry point's config holds alike: the run's name, seed, resume/overwrite,
    checkpoints, the optimiser (``cliptune.config.OptimSchema``), the trainer, progress bar and loggers."""
    _run_name(c)
    if c.get("resume") is True and c.get("overwrite") is True:
        c.fail("overwrite", True, "contradicts resume=true (overwrite removes the checkpoint resume continues from)",
               "drop overwrite=true to continue the run, or resume=true to start it over")
    strategy = c.get("trainer.strategy")
    if c.get("resume") is True and isinstance(strategy, str) and strategy.startswith("deepspeed"):
        # DeepSpeed's engine reads its checkpoint folder with torch.load(weights_only=False): a run
        # directory from anyone could run code on resume
        c.fail("trainer.strategy", strategy, "cannot resume safely (DeepSpeed loads its checkpoints unrestricted, "
               "which runs any code a checkpoint carries)", "resume with trainer.strategy=ddp or fsdp")
    _schema(c, "optim.", OptimSchema)
    _trainer(c)
    c.num("callbacks.progress.refresh_rate", NONNEG_INT, "10", why="0 = no progress bar")
    c.flag("logger.wandb.offline")


def validate_distill_config(cfg: DictConfig) -> None:
    """Check a ``cliptune-distill`` config (configs/distill.yaml: its optim and trainer groups are cliptune-train's,
    checked alike); raises :class:`ConfigError` listing every bad value. Call it before anything is written."""
    c = _Checker(cfg)
    for key, example in (("teacher.load", "teacher.load=runs/demo"), ("data.train", "'data.train=[pairs.jsonl]'")):
        v = c.get(key)
        if v is not _ABSENT and not v:
            c.fail(key, v, "required, no value given", f"set it, e.g. {example}")
    langs = c.get("data.langs")
    if langs is not _ABSENT and not (isinstance(langs, list) and len(langs) >= 2
                                     and all(isinstance(x, str) and x for x in langs)
                                     and len(set(langs)) == len(langs)):
        c.fail("data.langs", langs, "must list two or more distinct languages, the teacher's first",
               "set 'data.langs=[en,zh]'")
    c.choice("objective", DISTILL_OBJECTIVES)
    c.num("data.val_fraction", Num(lo=0, hi=1, hi_open=True), "0.05", why="the share of rows held out")
    c.num("seed", Num(lo=0, hi=2**32 - 1, integer=True), "0")
    c.num("batch_size", POS_INT, "256", why="parallel rows per step and rank")
    c.num("val_batch_size", Num(lo=1, integer=True, null=True), "256", why="null = batch_size")
    c.num("checkpoint_every", POS_INT, "100", why="steps between checkpoints/last.ckpt")
    c.num("student.context_length", Num(lo=2, integer=True), "32")
    for key in ("vocab_size", "layers", "hidden", "heads", "intermediate"):
        c.num(f"student.build.{key}", Num(lo=1, integer=True, null=True), "4")
    c.num("student.build.dropout", Num(lo=0, hi=1, hi_open=True, null=True), "0.1")
    hidden, heads = c.get("student.build.hidden"), c.get("student.build.heads")
    if not c.get("student.path") and is_int(hidden) and is_int(heads) and heads > 0 and hidden % heads:
        c.fail("student.build.hidden", hidden, f"must be a multiple of student.build.heads={heads}",
               "set student.build.hidden=256")
    if c.get("trainer.max_steps") == -1:
        c.fail("trainer.max_steps", -1, "must be an int >= 1: the stream of parallel rows is endless",
               "set trainer.max_steps=1000")
    c.string("eval.monitor", example="val/<val_name>/mean_R")  # not empty
    _run_settings(c)
    c.raise_if_any()


# ------------------------------------------------------------------------------------ paths
def _is_local_path(spec: str) -> bool:
    """``spec`` names a file or folder on this machine rather than a model by name (``ViT-B-32``, a Hub id
    ``BAAI/AltCLIP``, ``hf-hub:...``): ``local-dir:<path>``, an absolute or ``./`` path, a ``.ckpt``, a path of
    three or more parts, or one whose first folder exists here (``runs/demo`` beside ``runs/``)."""
    if spec.startswith(("hf-hub:", "pipe:")) or "://" in spec:
        return False
    if spec.startswith(("local-dir:", "/", "./", "../", "~")) or spec.endswith(".ckpt"):
        return True
    parts = [p for p in spec.split("/") if p]
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _model_path(c: _Checker, key: str, what: str, need_export: bool = False) -> None:
    """``key`` names a local folder or file (``local-dir:`` or a path) that must exist; ``need_export``: an
    export (``open_clip_config.json``) or a run directory with one in ``export/``."""
    v = c.get(key)
    if not isinstance(v, str) or not v.strip() or not (need_export or _is_local_path(v)):
        return
    if key == "model.name" and not v.startswith("local-dir:"):
        return  # a model name: open_clip's, a Hub id or a folder of Hugging Face weights (cliptune.models)
    path = Path(os.path.expanduser(v.removeprefix("local-dir:")))
    if not path.exists():
        c._add(f"{key}={show_value(v)}: {path} does not exist; set {key}=<{what}>")
    elif need_export and not ((path / RunDir.EXPORT_CONFIG).is_file()
                              or (RunDir(path).export / RunDir.EXPORT_CONFIG).is_file()):
        c._add(f"{key}={show_value(v)}: {path} is neither an export folder ({RunDir.EXPORT_CONFIG}) nor a run "
               f"directory with one in {RunDir.EXPORT}/ (a finished cliptune-distill or cliptune-train run); "
               f"set {key}=<{what}>")


def validate_paths(cfg: DictConfig, check_spec: Callable[[Any, str | tuple[str, ...], str], None]) -> None:
    """Check that every setting naming data or a model on this machine names something that exists, before a
    run writes anything; raises :class:`ConfigError` listing each, with the key and the path.

    - ``name`` (`run_name_problem`), as `validate_train_config` does, for every entry point with a run directory;
    - ``data.train`` and ``data.val.<set>`` of cliptune's shard data modules: ``check_spec(spec, splits, key)``
      resolves a shard spec's local paths and raises ``ValueError`` naming the key and the path
      (`cliptune.data.specs.check_local_spec`: the resolver lives above this module, so the caller hands it in;
      remote URLs and ``pipe:`` commands are left to the loader);
    - ``model.text_from`` (an export or a run with ``export/``), ``model.name=local-dir:<export>`` and
      ``teacher.load`` (cliptune-distill) when it is a path rather than an open_clip name.
    """
    c = _Checker(cfg)
    c.problems = []  # missing values are validate_train_config's to report
    _run_name(c)
    target = c.get("data._target_")
    if isinstance(target, str) and target.endswith(".WdsDataModule"):
        specs: list[tuple[str, Any, str | tuple[str, ...]]] = []
        train = c.get("data.train")
        if train is not _ABSENT and train is not None:
            specs.append(("data.train", train, "train"))
        val = c.get("data.val")
        if isinstance(val, dict):
            specs += [(f"data.val.{k}", v, EVAL_SPLITS) for k, v in val.items() if v is not None]
        elif val is not _ABSENT and val is not None:
            specs.append(("data.val", val, EVAL_SPLITS))
        for key, spec, splits in specs:
            try:
                check_spec(spec, splits, key)
            except ValueError as e:
                c._add(str(e))
    _model_path(c, "model.text_from", "a cliptune-distill run or an export", need_export=True)
    _model_path(c, "model.name", "an export folder, or an open_clip name")
    _model_path(c, "teacher.load", "a run directory, an export, a .ckpt or an open_clip name")
    c.raise_if_any()


# ------------------------------------------------------------------------------------ eval, wiseft
def validate_eval_config(cfg: DictConfig) -> None:
    """Check a ``cliptune-eval`` config (configs/eval.yaml); raises :class:`ConfigError`."""
    c = _Checker(cfg)
    _caption_lang(c, "caption_lang", many=True)
    c.num("batch_size", POS_INT, "128")
    c.num("workers", NONNEG_INT, "2", why="0 = load in the main process")
    _device(c, "device")
    c.choice("precision", EVAL_PRECISIONS)
    _ks(c, "ks")
    c.flag("zeroshot.enabled")
    _templates(c, "zeroshot.templates")
    images, texts = c.get("embeddings.images"), c.get("embeddings.texts")
    if images is not _ABSENT and texts is not _ABSENT and bool(images) != bool(texts):
        key = "embeddings.texts" if images else "embeddings.images"
        c.fail(key, texts if images else images, "precomputed embeddings need both files",
               f"set {key}=<.npy or .parquet>")
    for key in ("embeddings.name", "embeddings.column", "embeddings.id_column", "embeddings.image_id_column"):
        c.string(key, null=False)
    c.raise_if_any()


def validate_wiseft_config(cfg: DictConfig) -> None:
    """Check a ``cliptune-wiseft`` config (configs/wiseft.yaml); raises :class:`ConfigError`."""
    c = _Checker(cfg)
    alphas = c.get("alphas")
    dom = Num(lo=0, hi=1)
    if alphas is not _ABSENT:
        if not (isinstance(alphas, list) and alphas and all(dom.ok(a) for a in alphas)):
            c.fail("alphas", alphas, "must be a non-empty list of numbers in [0, 1] (0 = start, 1 = fine-tuned)",
                   "set alphas=[0,0.25,0.5,0.75,1]")
            alphas = _ABSENT
        elif len({float(a) for a in alphas}) != len(alphas):
            c.fail("alphas", alphas, "lists an alpha twice", "set alphas=[0,0.25,0.5,0.75,1]")
    select = c.get("select")
    if select is not _ABSENT:
        if is_number(select):
            if isinstance(alphas, list) and float(select) not in [float(a) for a in alphas]:
                c.fail("select", select, f"a number must be one of alphas={show_value(alphas)}",
                       "set select=sum, select=domain or one of the alphas")
        elif select not in WISEFT_SELECT:
            c.fail("select", select, "must be domain, sum or one of the alphas", "set select=sum")
    ks = _ks(c, "ks")
    metric = c.get("metric")
    if metric is not _ABSENT:
        known = ["mean_R"] + [f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (ks or [1, 5, 10])]
        if metric not in known:
            c.fail("metric", metric, f"must be one of {', '.join(known)} (from ks)", "set metric=mean_R")
    _caption_lang(c, "caption_lang")
    c.num("batch_size", POS_INT, "128")
    c.num("workers", NONNEG_INT, "2", why="0 = load in the main process")
    _device(c, "device")
    c.raise_if_any()
