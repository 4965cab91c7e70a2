"""Every config composes, every group option instantiates, bad values get errors naming the key."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cliptune.train import cli
from conftest import compose_train

CONFIGS = Path(cli.CONFIG_DIR)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(overrides: list[str], name: str = "train"):
    return compose_train(overrides, config_name=name)


def test_every_yaml_opens_with_a_comment():
    for path in CONFIGS.rglob("*.yaml"):
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path} should open with a comment giving the command that uses it"


@pytest.mark.parametrize("option", _options("model"))
def test_model_presets(option):
    cfg = _compose([f"model={option}", "model.name=ViT-B-32" if option == "open_clip" else "seed=0"])
    if cfg.model.get("arch") is None:  # named open_clip models: no download, no 150M-parameter build here
        assert cfg.model.name in open_clip.list_models()
        return
    bundle = instantiate(cfg.model, _convert_="all")
    assert hasattr(bundle.model, "encode_image")


@pytest.mark.parametrize("group", ["loss", "optim", "lora", "trainer", "logger", "callbacks", "data", "experiment"])
def test_groups_compose_and_instantiate(group, tmp_path):
    for option in _options(group):
        cfg = _compose([f"{group}={option}", f"out_root={tmp_path}"])
        for key in ("model", "loss", "data", "optim", "trainer", "lora"):
            OmegaConf.to_container(cfg[key], resolve=True)  # every interpolation resolves
        if group == "loss":
            fn = instantiate(cfg.loss.fn)
            assert callable(fn)
        elif group == "optim":
            instantiate(cfg.optim)
        elif group == "trainer":
            assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
        elif group in ("logger", "callbacks"):
            for c in (cfg.get(group) or {}).values():
                assert c._target_.startswith(("lightning.", "cliptune."))


def test_targets_are_namespaced():
    import re

    for path in CONFIGS.rglob("*.yaml"):
        for target in re.findall(r"_target_:\s*(\S+)", path.read_text()):
            assert target.startswith(("cliptune.", "lightning.", "torch.")), f"{path}: {target}"


def test_missing_required_value_names_the_key(tmp_path):
    cfg = _compose(["model=open_clip", f"out_root={tmp_path}"])
    with pytest.raises(ValueError, match="model.name"):
        cli.run(cfg)


def test_bad_batch_and_accum_name_the_key(tmp_path):
    cfg = _compose(["batch_size=10", "accum_steps=3", f"out_root={tmp_path}"])
    with pytest.raises(ValueError, match="accum_steps=3"):
        cli.run(cfg)
