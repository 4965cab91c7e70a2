"""Config validation: every shipped config is clean; each bad value is named with its allowed range.
(Wrong types of keys with a schema stop Hydra's composition already: tests/test_configs.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose
from hydra.core.hydra_config import HydraConfig

from cliptune.cli import CONFIG_DIR
from cliptune.validate import (ConfigError, validate_distill_config, validate_eval_config, validate_train_config,
                               validate_wiseft_config)
from conftest import initialize_configs

CONFIGS = Path(CONFIG_DIR)
VALIDATE = {"train": validate_train_config, "eval": validate_eval_config, "wiseft": validate_wiseft_config,
            "distill": validate_distill_config}
WDS = ["data=wds", "data.train=some/path/train.json"]


@pytest.fixture(autouse=True)
def _no_hydra_runtime(monkeypatch):
    """Validate as `run(cfg)` called outside Hydra would: no ${hydra:...} runtime set."""
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)


def _compose(name: str, overrides: list[str]):
    with initialize_configs():
        return compose(config_name=name, overrides=overrides)


def _assert_named(name: str, overrides: list[str], fragments: list[str]) -> None:
    """The config's error message holds every fragment (the key with its value, the allowed range)."""
    message = _problems(name, overrides)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def _problems(name: str, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        VALIDATE[name](_compose(name, overrides))
    return str(info.value)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml") if not p.stem.startswith("_"))


_EXTRA = {("model", "open_clip"): ["model.name=ViT-B-32"], ("data", "wds"): WDS[1:]}
GROUP_OPTIONS = [
    (group, option)
    for group in ("experiment", "model", "loss", "data", "optim", "trainer", "lora", "logger", "callbacks")
    for option in _options(group)
]


@pytest.mark.parametrize("name", ["train", "eval", "wiseft"])
def test_default_configs_are_valid(name):
    VALIDATE[name](_compose(name, []))


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_is_valid(group, option):
    validate_train_config(_compose("train", [f"{group}={option}", *_EXTRA.get((group, option), [])]))


# Edge values that are valid, grouped (one compose each); a failure names the offending key.
VALID_TRAIN = {
    "no step limit, epochs end the run": ["trainer.max_steps=-1", "trainer.max_epochs=2"],
    "epoch-fraction validation": ["trainer.val_check_interval=0.5", "trainer.check_val_every_n_epoch=1"],
    "time-based validation": ["trainer.val_check_interval='00:00:30:00'", "++on_nonfinite=skip"],
    "devices and precision": ["trainer.devices=[0,1]", "trainer.precision=16", "trainer.accelerator=gpu"],
    "ddp on cpu": ["trainer=ddp_cpu", "trainer.strategy=ddp", "trainer.devices='0,1'", "trainer.precision=bf16"],
    "all devices": ["trainer=ddp", "trainer.devices=-1", "++on_nonfinite=error"],
    "smallest batch": ["batch_size=2", "val_batch_size=1", "data.num_samples=2", "data.val_samples=1"],
    "accumulation": ["batch_size=12", "accum_steps=4", "data.workers=0"],
    "optimiser edges": ["optim.lr=1", "optim.grad_clip=0", "optim.layer_decay=1", "optim.lr_text=1e-5",
                        "optim.lr_image=2e-4", "optim.betas=[0,0.999]", "optim.schedule=constant",
                        "optim.min_lr_ratio=1", "optim.warmup_steps=0", "optim.weight_decay=0"],
    "optimiser nulls": ["optim.grad_clip=null", "optim.layer_decay=null", "optim.lr_text=null"],
    "sigmoid loss": ["loss=siglip", "loss.init_logit_bias=-5", "loss.max_logit_scale=null", "loss.fn.tile_size=1"],
    "lora": ["lora=default", "lora.alpha=null", "lora.dropout=0.5", "lora.towers=[text]"],
    "lora off": ["lora=default", "lora.r=0", "lora.towers=[]"],
    "wds": [*WDS, "data.caption_lang='en,zh'", "data.samples_per_epoch=64", "data.workers=0",
            "data.sample_shuffle=0", "data.max_negatives=3", "data.val_workers=0", "data.strict=true"],
    "wds language list": [*WDS, "data.caption_lang=[en,zh]", "data.samples_per_epoch=null"],
}


@pytest.mark.parametrize("overrides", VALID_TRAIN.values(), ids=VALID_TRAIN.keys())
def test_valid_train_values(overrides):
    validate_train_config(_compose("train", overrides))


# (overrides, fragments the message must contain: the key with its value, and the allowed range)
BAD_TRAIN = [
    (["batch_size=1"], ["batch_size=1", "int >= 2"]),
    (["accum_steps=0"], ["accum_steps=0", "int >= 1"]),
    (["batch_size=10", "accum_steps=3"], ["accum_steps=3", "must divide batch_size=10", "1, 2, 5, 10"]),
    (["val_batch_size=0"], ["val_batch_size=0", "null or an int >= 1"]),
    (["checkpoint_every=0"], ["checkpoint_every=0", "int >= 1"]),
    (["seed=-1"], ["seed=-1", "an int in [0, 4294967295]"]),
    (["optim.lr=-1"], ["optim.lr=-1", "must be > 0", "set optim.lr=<positive float>, e.g. 1e-4"]),
    (["optim.lr=0"], ["optim.lr=0", "> 0"]),
    (["optim.lr=nan"], ["optim.lr=nan", "finite", "> 0"]),
    (["optim.lr=inf"], ["optim.lr=inf", "finite", "> 0"]),
    (["optim.lr_text=0"], ["optim.lr_text=0", "null or > 0"]),
    (["optim.lr_image=-1e-5"], ["optim.lr_image=-1e-05", "null or > 0"]),
    (["optim.weight_decay=-0.1"], ["optim.weight_decay=-0.1", ">= 0"]),
    (["optim.betas=[0.9,1.0]"], ["optim.betas=[0.9, 1.0]", "each in [0, 1)"]),
    (["optim.betas=[0.9]"], ["optim.betas=[0.9]", "two numbers"]),
    (["optim.eps=0"], ["optim.eps=0", "> 0"]),
    (["optim.warmup_steps=-1"], ["optim.warmup_steps=-1", "int >= 0"]),
    (["optim.schedule=linear"], ["optim.schedule='linear'", "cosine, constant"]),
    (["optim.min_lr_ratio=1.5"], ["optim.min_lr_ratio=1.5", "in [0, 1]"]),
    (["optim.grad_clip=-1"], ["optim.grad_clip=-1", "null or >= 0"]),
    (["optim.layer_decay=0"], ["optim.layer_decay=0", "null or in (0, 1]"]),
    (["optim.layer_decay=1.5"], ["optim.layer_decay=1.5", "in (0, 1]"]),
    (["trainer.max_steps=0"], ["trainer.max_steps=0", "-1 or an int >= 1"]),
    (["trainer.max_steps=-1"], ["trainer.max_steps=-1", "trainer.max_epochs=-1", "never ends"]),
    (["trainer.max_steps=-1", "trainer.max_epochs=-1"], ["trainer.max_steps=-1", "never ends"]),
    (["trainer.max_steps=-1", "trainer.max_epochs=null"], ["trainer.max_steps=-1", "max_epochs must be an int >= 1"]),
    (["trainer.max_epochs=0"], ["trainer.max_epochs=0", "-1 or an int >= 1"]),
    (["trainer.val_check_interval=0"], ["trainer.val_check_interval=0", "int >= 1", "float in (0, 1]"]),
    (["trainer.val_check_interval=1.5", "trainer.check_val_every_n_epoch=1"],
     ["trainer.val_check_interval=1.5", "float in (0, 1]"]),
    (["trainer.val_check_interval=0.5"], ["trainer.val_check_interval=0.5", "check_val_every_n_epoch"]),
    (["trainer.val_check_interval='00:00:00:00'"], ["trainer.val_check_interval='00:00:00:00'", "DD:HH:MM:SS"]),
    (["trainer.check_val_every_n_epoch=0"], ["trainer.check_val_every_n_epoch=0", "null or an int >= 1"]),
    (["trainer.log_every_n_steps=0"], ["trainer.log_every_n_steps=0", "int >= 1"]),
    (["trainer.precision=bf17"], ["trainer.precision='bf17'", "bf16-mixed", "32-true"]),
    (["trainer.precision=8"], ["trainer.precision=8", "bf16-mixed"]),
    (["trainer.precision=bf16-true"], ["trainer.precision='bf16-true'", "temperature cannot train", "0.01562",
                                       "set trainer.precision=bf16-mixed"]),
    (["trainer.precision=16-true"], ["trainer.precision='16-true'", "fp16", "set trainer.precision=bf16-mixed"]),
    (["trainer.devices=0"], ["trainer.devices=0", "int >= 1"]),
    (["trainer.devices=[]"], ["trainer.devices=[]", "list of device indices"]),
    (["trainer.num_nodes=0"], ["trainer.num_nodes=0", "int >= 1"]),
    (["trainer.accelerator=gpus"], ["trainer.accelerator='gpus'", "cpu", "cuda"]),
    (["trainer.strategy=dpp"], ["trainer.strategy='dpp'", "ddp"]),
    (["trainer.num_sanity_val_steps=-2"], ["trainer.num_sanity_val_steps=-2", ">= 0"]),
    (["data.num_samples=0"], ["data.num_samples=0", "int >= 1"]),
    (["data.num_samples=10"], ["data.num_samples=10", "less than one global batch", "data.batch_size=64"]),
    (["data.val_samples=0"], ["data.val_samples=0", "int >= 1"]),
    (["data.workers=-1"], ["data.workers=-1", "int >= 0"]),
    ([*WDS, "data.val_workers=-1"], ["data.val_workers=-1", "null or an int >= 0"]),
    ([*WDS, "data.val_batch_size=0"], ["data.val_batch_size=0", "null or an int >= 1"]),
    ([*WDS, "data.samples_per_epoch=0"], ["data.samples_per_epoch=0", "null or an int >= 1"]),
    ([*WDS, "data.sample_shuffle=-1"], ["data.sample_shuffle=-1", "int >= 0"]),
    ([*WDS, "data.max_negatives=-1"], ["data.max_negatives=-1", "int >= 0"]),
    ([*WDS, "data.caption_lang=','"], ["data.caption_lang=','", "'any', a language code"]),
    ([*WDS, "data.caption_lang=[]"], ["data.caption_lang=[]", "'any', a language code"]),
    ([*WDS, "data.resampled=sometimes"], ["data.resampled='sometimes'", "true or false"]),
    ([*WDS, "data.strict=1"], ["data.strict=1", "true or false"]),
    (["loss.init_logit_scale=nan"], ["loss.init_logit_scale=nan", "finite"]),
    (["loss=siglip", "loss.init_logit_bias=-inf"], ["loss.init_logit_bias=-inf", "finite"]),
    (["loss.max_logit_scale=0"], ["loss.max_logit_scale=0", "null or > 0"]),
    (["loss.fn.tile_size=0"], ["loss.fn.tile_size=0", "int >= 1"]),
    (["loss.fn.positives=all"], ["loss.fn.positives='all'", "pair, group"]),
    (["loss.add_logit_bias=true"], ["loss.add_logit_bias=true", "loss.init_logit_bias"]),
    (["lora=default", "lora.r=-1"], ["lora.r=-1", "int >= 0"]),
    (["lora=default", "lora.alpha=0"], ["lora.alpha=0", "null or > 0"]),
    (["lora=default", "lora.dropout=1.0"], ["lora.dropout=1.0", "in [0, 1)"]),
    (["lora=default", "lora.towers=[audio]"], ["lora.towers=['audio']", "image and/or text"]),
    (["lora=default", "lora.towers=[]"], ["lora.towers=[]", "not empty"]),
    (["++on_nonfinite=ignore"], ["on_nonfinite='ignore'", "error, skip"]),
    (["model.context_length=0"], ["model.context_length=0", "null or an int >= 1"]),
    (["model.lock_text_unlocked_layers=-1"], ["model.lock_text_unlocked_layers=-1", "int >= 0"]),
    (["model.arch.embed_dim=0"], ["model.arch.embed_dim=0", "int >= 1"]),
    (["eval.zeroshot_templates=[a photo]"], ["eval.zeroshot_templates[0]='a photo'", "{c}"]),
    (["callbacks.progress.refresh_rate=-1"], ["callbacks.progress.refresh_rate=-1", "int >= 0"]),
]


@pytest.mark.parametrize("overrides,fragments", BAD_TRAIN, ids=[" ".join(o) for o, _ in BAD_TRAIN])
def test_bad_train_value_names_key_and_range(overrides, fragments):
    _assert_named("train", overrides, fragments)


def test_every_problem_is_reported_at_once():
    overrides = ["optim.lr=-1", "trainer.max_steps=-1", "trainer.val_check_interval=0", "checkpoint_every=0",
                 "batch_size=10", "accum_steps=3", "optim.betas=[0.9,1.0]", "lora=default", "lora.dropout=2"]
    with pytest.raises(ConfigError) as info:
        validate_train_config(_compose("train", overrides))
    err = info.value
    assert isinstance(err, ValueError)
    keys = ["optim.lr=-1", "trainer.max_steps=-1", "trainer.val_check_interval=0", "checkpoint_every=0",
            "accum_steps=3", "optim.betas=", "lora.dropout=2"]
    assert len(err.problems) == len(keys), err
    for key in keys:
        assert sum(p.startswith(key) for p in err.problems) == 1, f"{key} not reported once:\n{err}"
    assert str(err).startswith(f"invalid config: {len(keys)} problems")


def test_interpolated_values_are_checked_once_resolved():
    # data.batch_size is ${batch_size}: the bad value is reported once, under the key that holds it
    message = _problems("train", ["batch_size=1"])
    assert "batch_size=1" in message and "data.batch_size" not in message
    message = _problems("train", ["optim.lr=${optim.min_lr_ratio}"])
    assert "optim.lr=0.0: must be > 0" in message


def test_hydra_runtime_values_are_skipped_and_broken_interpolations_reported():
    validate_train_config(_compose("train", ["val_batch_size=${hydra:runtime.output_dir}"]))
    validate_eval_config(_compose("eval", []))  # out: ${hydra:runtime.output_dir}
    message = _problems("train", ["val_batch_size=${no_such_key}"])
    assert "val_batch_size='${no_such_key}': cannot be resolved" in message


@pytest.mark.parametrize("overrides,keys", [
    (["model=open_clip"], ["model.name"]),
    (["data=wds"], ["data.train"]),
    (["model=vit_b_32", "model.name=???", "data=wds", "optim.lr=0"], ["model.name", "data.train"]),
])
def test_missing_values_name_the_key_and_how_to_set_it(overrides, keys):
    message = _problems("train", overrides)
    for key in keys:
        assert f"{key}=???: required" in message and f"set it on the command line, e.g. {key}=" in message


BAD_EVAL = [
    (["batch_size=0"], ["batch_size=0", "int >= 1"]),
    (["workers=-1"], ["workers=-1", "int >= 0"]),
    (["device=gpu0"], ["device='gpu0'", "torch device"]),
    (["precision=fp16"], ["precision='fp16'", "auto, bf16, fp32"]),
    (["ks=[]"], ["ks=[]", "distinct ints >= 1"]),
    (["ks=[0,5]"], ["ks=[0, 5]", "distinct ints >= 1"]),
    (["ks=[1,1]"], ["ks=[1, 1]", "distinct ints >= 1"]),
    (["caption_lang=[]"], ["caption_lang=[]", "non-empty list"]),
    (["caption_lang=[en,en]"], ["caption_lang=['en', 'en']", "twice"]),
    (["caption_lang=null"], ["caption_lang=null", "'any', a language code"]),
    (["zeroshot.templates=[plain]"], ["zeroshot.templates[0]='plain'", "{c}"]),
    (["zeroshot.enabled=yes"], ["zeroshot.enabled='yes'", "true or false"]),
    (["embeddings.images=img.npy"], ["embeddings.texts=null", "both files"]),
]


@pytest.mark.parametrize("overrides,fragments", BAD_EVAL, ids=[" ".join(o) for o, _ in BAD_EVAL])
def test_bad_eval_value_names_key_and_range(overrides, fragments):
    _assert_named("eval", overrides, fragments)


@pytest.mark.parametrize("name,overrides", [
    ("eval", ["caption_lang=en"]), ("eval", ["caption_lang=[en,zh,'en,zh']", "device=cuda:1", "precision=bf16"]),
    ("eval", ["ks=[1]", "zeroshot.enabled=false", "embeddings.images=a.npy", "embeddings.texts=b.npy"]),
    ("wiseft", ["select=0.5"]), ("wiseft", ["select=domain", "metric=t2i_R@1"]),
    ("wiseft", ["ks=[1,3]", "metric=i2t_R@3", "alphas=[0,1]", "select=1"]), ("wiseft", ["caption_lang='en,zh'"]),
])
def test_valid_eval_and_wiseft_values(name, overrides):
    VALIDATE[name](_compose(name, overrides))


BAD_WISEFT = [
    (["alphas=[]"], ["alphas=[]", "numbers in [0, 1]"]),
    (["alphas=[0,1.5]"], ["alphas=[0, 1.5]", "numbers in [0, 1]"]),
    (["alphas=[0.5,0.5]"], ["alphas=[0.5, 0.5]", "twice"]),
    (["select=best"], ["select='best'", "domain, sum or one of the alphas"]),
    (["select=0.3"], ["select=0.3", "one of alphas"]),
    (["metric=R@1"], ["metric='R@1'", "mean_R", "t2i_R@1"]),
    (["metric=t2i_R@3"], ["metric='t2i_R@3'", "from ks"]),
    (["ks=[0]"], ["ks=[0]", "distinct ints >= 1"]),
    (["batch_size=0"], ["batch_size=0", "int >= 1"]),
    (["workers=-1"], ["workers=-1", "int >= 0"]),
    (["device=nope"], ["device='nope'", "torch device"]),
    (["caption_lang=''"], ["caption_lang=''", "'any', a language code"]),
]


@pytest.mark.parametrize("overrides,fragments", BAD_WISEFT, ids=[" ".join(o) for o, _ in BAD_WISEFT])
def test_bad_wiseft_value_names_key_and_range(overrides, fragments):
    _assert_named("wiseft", overrides, fragments)


# ------------------------------------------------------------------------------------ cliptune-distill
DISTILL = ["teacher.load=runs/demo", "data.train=[pairs.jsonl]"]


def test_distill_configs_are_valid():
    validate_distill_config(_compose("distill", DISTILL))
    validate_distill_config(_compose("distill", [*DISTILL, "student.path=xlm-roberta-base", "trainer=gpu",
                                                 "objective=cosine", "data.langs=[en,zh,ja]", "data.val_fraction=0"]))


@pytest.mark.parametrize("overrides", [
    ["optim.lr=-1"], ["optim.warmup_steps=-1"], ["optim.min_lr_ratio=2"], ["optim.betas=[0.9,1.5]"],
    ["optim.grad_clip=-1"], ["trainer.log_every_n_steps=0"], ["trainer.val_check_interval=0"],
    ["trainer.precision=17"], ["name=../x"], ["seed=-1"], ["checkpoint_every=0"], ["resume=true", "overwrite=true"],
])
def test_distill_checks_shared_keys_as_training_does(overrides):
    """A setting both commands have gets the same check and the same words in each (one checker)."""
    train = [line for line in _problems("train", overrides).splitlines()[1:]]
    distill = [line for line in _problems("distill", [*DISTILL, *overrides]).splitlines()[1:]]
    assert train and distill == train


@pytest.mark.parametrize("overrides, fragments", [
    (["objective=l1"], ["objective='l1': must be one of mse, cosine"]),
    (["data.langs=[en]"], ["data.langs=['en']: must list two or more distinct languages"]),
    (["data.langs=[en,en]"], ["data.langs=['en', 'en']: must list two or more distinct"]),
    (["data.val_fraction=1"], ["data.val_fraction=1: must be in [0, 1)"]),
    (["batch_size=0"], ["batch_size=0: must be an int >= 1"]),
    (["student.build.hidden=31"], ["student.build.hidden=31: must be a multiple of student.build.heads=4"]),
    (["student.build.dropout=1.0"], ["student.build.dropout=1.0: must be null or in [0, 1)"]),
    (["student.context_length=1"], ["student.context_length=1: must be an int >= 2"]),
    (["trainer.max_steps=-1"], ["trainer.max_steps=-1: must be an int >= 1: the stream of parallel rows is endless"]),
    (["data.train=[]"], ["data.train=[]: required, no value given"]),
])
def test_bad_distill_value_names_key_and_range(overrides, fragments):
    base = [o for o in DISTILL if o.split("=")[0] not in {x.split("=")[0] for x in overrides}]
    message = _problems("distill", [*base, *overrides])
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_distill_missing_values_are_named():
    message = _problems("distill", [])
    assert "teacher.load=???: required" in message and "data.train=???: required" in message
