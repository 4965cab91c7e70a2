"""Schemas of the ``cliptune-train`` config: Hydra checks keys and types while it composes.

:func:`register_configs` stores them in Hydra's ConfigStore and :func:`register_resolvers` adds the
resolvers the YAML uses (called where a job or a compose starts: ``cliptune.cli.hydra_cli``, the ``run``
functions of ``cliptune.train``; never at import); configs/train.yaml and the files of the ``optim`` and
``loss`` groups name theirs first in their defaults list, Hydra's documented pattern::

    defaults:
      - _schema      # configs/optim/adamw.yaml: OptimSchema below
      - _self_

A key that is not in its schema (a typo in a YAML file, an experiment's ``optim: {lrr: 1e-4}``) or a
value of the wrong type stops the composition with OmegaConf's error naming the full key::

    cliptune-train optim.lr=fast       # Value 'fast' of type 'str' could not be converted to Float
                                       #     full_key: optim.lr
    experiment/x.yaml: optim.lrr       # Key 'lrr' not in 'OptimSchema'

(On the command line a key that is not in the config already fails without ``+``; ``+key=`` is Hydra's
way to add one on purpose, and it adds it.)

Each field is declared once, here: its type, its default and, in ``field(metadata=...)``, its range
(``cliptune.domains.domain``), which ``cliptune.validate`` checks with the rules between keys
(accum_steps divides batch_size, ...). ``cliptune.train.optim`` takes :class:`OptimConfig` itself.
A new top-level key or config group needs a field in :class:`TrainSchema`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from cliptune.domains import NONNEG_INT, POS_FLOAT, POS_INT, POSITIVES, SCHEDULES, Num, domain

__all__ = ["EvalSchema", "LossFnSchema", "LossSchema", "OptimConfig", "OptimSchema", "TrainSchema", "package_path",
           "register_configs", "register_resolvers", "to_plain"]


@dataclass
class OptimConfig:
    """Optimiser settings (``configs/optim/*.yaml``), taken by ``cliptune.train.optim``. Each field carries
    its range, which ``cliptune.validate`` checks."""

    lr: float = domain(5e-4, "1e-4", POS_FLOAT)
    weight_decay: float = domain(0.2, "0.2", Num(lo=0))
    betas: tuple[float, float] = domain((0.9, 0.98), "[0.9,0.98]", each=Num(lo=0, hi=1, hi_open=True))
    eps: float = domain(1e-6, "1e-6", POS_FLOAT)
    warmup_steps: int = domain(100, "100", NONNEG_INT)
    schedule: str = domain("cosine", "cosine", choices=SCHEDULES)
    min_lr_ratio: float = domain(0.0, "0.0", Num(lo=0, hi=1), why="the final lr as a share of the peak")
    grad_clip: float | None = domain(1.0, "1.0", Num(lo=0, null=True), why="null or 0 = no clipping")
    # e.g. 0.75: block i of L gets lr * decay**(L - i)
    layer_decay: float | None = domain(None, "0.75", Num(lo=0, hi=1, lo_open=True, null=True), why="null = off")
    # separate peak lrs for the towers (e.g. a pretrained text tower)
    lr_text: float | None = domain(None, "1e-5", Num(lo=0, lo_open=True, null=True), why="null = optim.lr")
    lr_image: float | None = domain(None, "1e-5", Num(lo=0, lo_open=True, null=True), why="null = optim.lr")


@dataclass
class OptimSchema(OptimConfig):
    """``optim``: :class:`OptimConfig`'s fields, and the target Hydra instantiates them as."""

    _target_: str = "cliptune.train.optim.OptimConfig"


@dataclass
class LossFnSchema:
    """``loss.fn``: the arguments of ``cliptune.train.losses.ClipLoss`` / ``SigLipLoss`` a config sets."""

    _target_: str = MISSING
    positives: str = domain("pair", "pair", choices=POSITIVES)
    tile_size: int | None = domain(None, "1024", Num(lo=1, integer=True, null=True))


@dataclass
class LossSchema:
    """``loss``: the loss function and the temperature (log-space) and bias it starts and clamps at."""

    fn: LossFnSchema = field(default_factory=LossFnSchema)
    init_logit_scale: float | None = domain(None, "2.6593", Num(null=True), why="log-space temperature, log(1/0.07)")
    init_logit_bias: float | None = domain(None, "-10.0", Num(null=True))
    max_logit_scale: float | None = domain(None, "4.6052", Num(lo=0, lo_open=True, null=True),
                                           why="log-space clamp, log(100); null = no clamp")
    add_logit_bias: bool = False


@dataclass
class EvalSchema:
    """``eval``: validation before and after training, and what picks the best checkpoint."""

    before: bool = True
    after: bool = True
    monitor: str | None = None
    zeroshot_templates: list[str] | None = None


@dataclass
class TrainSchema:
    """configs/train.yaml's own keys, typed; each config group is one field (its option's schema, if it
    has one, comes with the option). Field order is the order of the composed config."""

    model: Any = MISSING
    loss: Any = MISSING
    data: Any = MISSING
    optim: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = None
    lora: Any = None
    name: str = "default"
    out_root: str = "runs"
    seed: int = domain(0, "0", Num(lo=0, hi=2**32 - 1, integer=True))
    batch_size: int = domain(64, "64", Num(lo=2, integer=True), why="a contrastive batch needs at least 2 pairs")
    accum_steps: int = domain(1, "1", POS_INT)
    val_batch_size: int | None = domain(None, "256", Num(lo=1, integer=True, null=True), why="null = batch_size")
    checkpoint_every: int = domain(100, "100", POS_INT, why="steps between checkpoints/last.ckpt")
    resume: bool = False
    resume_allow_changes: bool = False
    overwrite: bool = False
    export: bool = True
    export_start: bool = True
    compile: bool = False
    on_nonfinite: str = "error"
    eval: EvalSchema = field(default_factory=EvalSchema)
    cache_frozen_text: bool = True
    cache_frozen_image: bool = True
    demo_data: str | None = None  # experiment=demo's data folder (its data.train and data.val read it)


def to_plain(value: Any) -> Any:
    """A config value as plain Python: OmegaConf containers to dict/list with interpolations resolved (Hydra
    passes a DictConfig unless ``_convert_`` is set; library code never keeps one), any other mapping to a
    dict and sequence to a list (strings stay strings); anything else as it is."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    return value


def register_configs() -> None:
    """Store the schemas where the YAML files' defaults lists find them (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="_train_schema", node=TrainSchema)
    cs.store(group="optim", name="_schema", node=OptimSchema)
    cs.store(group="loss", name="_schema", node=LossSchema)


def package_path(package: str, *parts: str) -> str:
    """Folder of an installed package (configs point at bundled weights with it, offline)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package '{package}' is not installed; `pip install {package.replace('_', '-')}`"
        )
    return str(Path(list(spec.submodule_search_locations)[0], *parts))


def register_resolvers() -> None:
    """``${pkg:<package>,<sub>,...}`` (a folder inside an installed package) and ``${log:x}``."""
    if not OmegaConf.has_resolver("pkg"):
        OmegaConf.register_new_resolver("pkg", lambda name, *parts: package_path(name, *parts))
    if not OmegaConf.has_resolver("log"):
        OmegaConf.register_new_resolver("log", lambda x: math.log(float(x)))
