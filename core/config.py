"""Schemas of the ``cliptune-train`` config: Hydra checks keys and types while it composes.

:func:`register_configs` stores them in Hydra's ConfigStore and :func:`register_resolvers` adds the
resolvers the YAML uses (``cliptune.train.cli`` calls both when imported); configs/train.yaml and the files of the ``optim`` and ``loss`` groups name theirs first in
their defaults list, Hydra's documented pattern::

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

Value ranges (lr > 0, accum_steps divides batch_size, ...) are checked in one place, ``cliptune.validate``.
A new top-level key or config group needs a field in :class:`TrainSchema`.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

__all__ = ["EvalSchema", "LossFnSchema", "LossSchema", "OptimSchema", "TrainSchema", "package_path", "register_configs",
           "register_resolvers"]


@dataclass
class OptimSchema:
    """``optim``: the fields of ``cliptune.train.optim.OptimConfig``, which it instantiates (a test keeps
    the two equal); defaults as there, values in configs/optim/."""

    _target_: str = "cliptune.train.optim.OptimConfig"
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    layer_decay: float | None = None
    lr_text: float | None = None
    lr_image: float | None = None


@dataclass
class LossFnSchema:
    """``loss.fn``: the arguments of ``cliptune.train.losses.ClipLoss`` / ``SigLipLoss`` a config sets."""

    _target_: str = MISSING
    positives: str = "pair"
    tile_size: int | None = None


@dataclass
class LossSchema:
    """``loss``: the loss function and the temperature (log-space) and bias it starts and clamps at."""

    fn: LossFnSchema = field(default_factory=LossFnSchema)
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    max_logit_scale: float | None = None
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
    seed: int = 0
    batch_size: int = 64
    accum_steps: int = 1
    val_batch_size: int | None = None
    checkpoint_every: int = 100
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
