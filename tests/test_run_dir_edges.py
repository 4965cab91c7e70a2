"""One run, one directory, at its edges: overwrite leaves nothing of the old run, a run name stays inside the
runs folder, every setting naming data or a model exists before anything is written, a folder cliptune names
itself (``runs/losses/loss=clip``) is accepted as printed, and the CLIs say what is wrong in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cliptune.data.specs import check_local_spec
from cliptune.rundir import RunDir, RunLock
from cliptune.validate import ConfigError, validate_paths, validate_train_config
from conftest import compose_train

# What each run writes (README "What a run directory holds"), by hand: the reference clear_run is checked against.
OLD_RUN = ["metrics.json", "results.json", "per_query.pt", "config.yaml", "overrides.yaml", "choices.yaml",
           "train.log", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "export/open_clip_config.json",
           "export/open_clip_model.safetensors", "export_start/open_clip_config.json", "csv/metrics.csv",
           "csv/hparams.yaml", "wandb/offline-run/run.wandb", ".metrics.json.4242.tmp"]
# ... and what a user may keep beside them: never removed.
USER_FILES = ["notes.txt", "my_data/pairs.csv", "export_old/open_clip_config.json", "metrics.json.bak",
              ".metrics.json.tmp", "checkpoints.txt"]


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def _old_run(root: Path, user: bool = True) -> None:
    for rel in OLD_RUN + (USER_FILES if user else []):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("old run")


def test_clear_run_removes_exactly_what_a_run_writes(tmp_path):
    root = tmp_path / "run"
    _old_run(root)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("the user's")
    (root / "my_link").symlink_to(outside)
    with RunLock(root):
        removed = RunDir(root).clear_run()
        assert _tree(root) == set(USER_FILES) | {".lock", "my_link"}
    assert {p.name for p in removed} == {Path(r).parts[0] for r in OLD_RUN}
    assert (outside / "keep.txt").read_text() == "the user's"
    assert RunDir(tmp_path / "missing").clear_run() == []  # nothing to clear: nothing happens


def test_clear_run_removes_a_linked_export_without_following_it(tmp_path):
    weights = tmp_path / "shared_weights"
    weights.mkdir()
    (weights / "open_clip_config.json").write_text("{}")
    root = tmp_path / "run"
    root.mkdir()
    (root / "export").symlink_to(weights)
    RunDir(root).clear_run()
    assert not (root / "export").exists() and (weights / "open_clip_config.json").is_file()


def test_overwrite_clears_the_old_run_before_the_new_one_writes(tmp_path):
    """The new run fails right after taking the lock (its model cannot be built): nothing of the old
    run may be left for ``load_model`` to mistake for this one."""
    from cliptune.train.run import run

    root = tmp_path / "run"
    _old_run(root)
    cfg = compose_train(["model=open_clip", "model.name=no-such-open-clip-model", "overwrite=true"], run_dir=root)
    with pytest.raises(Exception, match="no-such-open-clip-model"):
        run(cfg)
    left = _tree(root)
    assert not left & set(OLD_RUN) - {"config.yaml", "overrides.yaml", "choices.yaml", "train.log"}, left
    assert left >= set(USER_FILES)
    assert "old run" not in (root / "train.log").read_text()  # the new run's log only


def test_without_overwrite_a_finished_run_is_refused_and_kept(tmp_path):
    from cliptune.train.run import run

    root = tmp_path / "run"
    _old_run(root, user=False)
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run(compose_train(["experiment=smoke"], run_dir=root))
    kept = {r for r in OLD_RUN if not r.endswith(".tmp")}  # a killed writer's temporary file may go
    assert _tree(root) >= kept and (root / "export/open_clip_config.json").read_text() == "old run"


# ----------------------------------------------------------------------------------------------- run names
@pytest.mark.parametrize("name", ["''", "' '", "/tmp/elsewhere", "../escaped", "a/../../b", ".", "a/..", "a/../b"])
def test_a_run_name_outside_the_runs_folder_is_refused_naming_the_key(name):
    with pytest.raises(ConfigError, match=r"name=.*(non-empty|relative to out_root|climbs out|itself|'\.\.')"):
        validate_train_config(compose_train([f"name={name}"]))


@pytest.mark.parametrize("name", ["demo", "losses/loss=clip", "a/./b", "x..y"])
def test_a_run_name_inside_the_runs_folder_is_accepted(name):
    validate_train_config(compose_train([f"name='{name}'"]))


def test_a_climbing_name_writes_nothing_anywhere(tmp_path):
    from cliptune.train.run import run

    root = tmp_path / "runs"
    cfg = compose_train([f"out_root={root}", "name=../../escaped", "experiment=smoke"], run_dir=root / "../../escaped")
    with pytest.raises(ConfigError, match=r"name='\.\./\.\./escaped': climbs out of out_root="):
        run(cfg)
    assert not (tmp_path.parent / "escaped").exists() and not root.exists()


def test_a_distill_run_name_is_checked_too(tmp_path):
    cfg = compose_train(["name=/abs/distill", "teacher.load=ViT-B-32", "data.train=[x.jsonl]"], config_name="distill")
    with pytest.raises(ConfigError, match=r"name='/abs/distill': must be relative"):
        validate_paths(cfg, check_local_spec)


# ------------------------------------------------------------------------------- settings that name data
@pytest.fixture
def shards(tmp_path) -> Path:
    from helpers_shards import basic_samples, write_shards

    out = tmp_path / "shards"
    write_shards(out, basic_samples(4), per_shard=2, split="train")
    write_shards(out, basic_samples(4, prefix="v"), per_shard=2, split="val")
    return out


def _path_problems(overrides: list[str], config_name: str = "train") -> str:
    with pytest.raises(ConfigError) as info:
        validate_paths(compose_train(overrides, config_name=config_name), check_local_spec)
    return str(info.value)


def test_existing_local_data_and_remote_specs_pass(shards):
    validate_paths(compose_train(["data=wds", f"data.train={shards}", f"data.val.domain={shards}",
                                  f"+data.val.other='{shards}/val-{{000000..000001}}.tar'"]), check_local_spec)
    # not resolved here (no request, no command): the loader reads them
    validate_paths(compose_train(["data=wds", "data.train='s3://bucket/train-{000000..000009}.tar'",
                                  "data.val.domain='pipe:cat /no/such/val.tar'"]), check_local_spec)


@pytest.mark.parametrize("key,value", [
    ("data.train", "shardz"),
    ("data.val.domain", "shardz"),
    ("data.train", "'[{shards: shardz, weight: 2}, {shards: s3://bucket/x.tar, weight: 1}]'"),
])
def test_a_missing_data_path_is_named_with_its_key(shards, key, value, tmp_path):
    overrides = ["data=wds", f"data.train={shards}", f"data.val.domain={shards}"]
    problems = _path_problems([*overrides, f"{key}={value.replace('shardz', str(tmp_path / 'shardz'))}"])
    assert f"- {key}" in problems and str(tmp_path / "shardz") in problems, problems
    assert problems.count("\n  - ") == 1, problems


def test_a_missing_shard_in_a_brace_range_is_named(shards):
    problems = _path_problems(["data=wds", f"data.train='{shards}/train-{{000000..000005}}.tar'"])
    assert "data.train" in problems and "4 of 6 shards do not exist" in problems and "train-000002.tar" in problems


def test_model_and_teacher_paths_are_checked(tmp_path):
    problems = _path_problems([f"model.text_from={tmp_path}/no_distill_run"])
    assert f"model.text_from='{tmp_path}/no_distill_run': {tmp_path}/no_distill_run does not exist" in problems
    (tmp_path / "killed").mkdir()  # a run killed before its export
    problems = _path_problems([f"model.text_from={tmp_path}/killed"])
    assert "is neither an export folder (open_clip_config.json) nor a run directory" in problems
    problems = _path_problems(["model=open_clip", f"model.name=local-dir:{tmp_path}/gone/export"])
    assert "model.name=" in problems and "does not exist" in problems
    problems = _path_problems([f"teacher.load={tmp_path}/no_teacher", "data.train=[x.jsonl]"], config_name="distill")
    assert f"teacher.load='{tmp_path}/no_teacher'" in problems
    # names, not paths: left to the model loader
    validate_paths(compose_train(["model=altclip"]), check_local_spec)
    validate_paths(compose_train(["teacher.load=ViT-B-32", "data.train=[x.jsonl]"], config_name="distill"),
                   check_local_spec)


def test_a_missing_data_folder_stops_the_run_before_anything_is_written(tmp_path):
    from cliptune.train.run import run

    root = tmp_path / "runs" / "x"
    cfg = compose_train(["data=wds", f"data.train={tmp_path}/shardz", f"data.val.domain={tmp_path}/shardz"],
                        run_dir=root)
    with pytest.raises(ConfigError, match=r"data.train: shard spec '.*shardz' matches no shards"):
        run(cfg)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------- eval.monitor
@pytest.mark.parametrize("overrides,fragment", [
    (["eval.monitor=val/emoji/mean_R"],
     "names no validation set of this run (val/<set>/<metric> with <set> one of synthetic)"),
    (["eval.monitor=val/synthetic/R@1"], "'R@1' is not a metric validation logs for synthetic (one of t2i_R@1"),
    (["eval.monitor=val_loss"], "names no validation set"),
    (["data=wds", "data.train=x", "data.val.domain=null", "eval.monitor=val/domain/mean_R"], "has no validation set"),
    (["data=wds", "data.train=x", "data.val.domain=v", "data.val_caption_langs=[en,zh]",
      "eval.monitor=val/domain/mean_R"], "with <set> one of domain:en, domain:zh, domain:en~zh"),
    (["data=wds", "data.train=x", "data.val.domain=v", "data.val_caption_langs=[en,zh]",
      "eval.monitor='val/domain:en~zh/mean_R'"], "not a metric validation logs for domain:en~zh (one of xling_top1"),
])
def test_a_monitor_no_validation_logs_is_refused_with_the_choices(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        validate_train_config(compose_train(overrides))
    assert "eval.monitor=" in str(info.value) and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("overrides", [
    ["eval.monitor=val/synthetic/t2i_R@5"], ["eval.monitor=val/synthetic/loss"], ["eval.monitor=null"],
    ["data=wds", "data.train=x", "data.val.domain=v", "+data.val.b=w", "eval.monitor=val/b/zs_top1"],
    ["data=wds", "data.train=x", "data.val=v", "eval.monitor=val/val/mean_R"],
    ["data=wds", "data.train=x", "data.val.domain=v", "data.val_caption_langs=[en,zh]",
     "eval.monitor='val/domain:en~zh/xling_top1'"],
])
def test_a_monitor_validation_logs_is_accepted(overrides):
    validate_train_config(compose_train(overrides))


def test_the_metric_list_is_what_validation_computes():
    """VAL_METRICS against the functions validation calls, on random embeddings."""
    import torch
    import torch.nn.functional as F

    from cliptune.eval.retrieval import crosslingual_consistency, retrieval_metrics
    from cliptune.eval.zeroshot import zeroshot_metrics
    from cliptune.validate import VAL_METRICS, XLING_METRICS

    img, txt = F.normalize(torch.randn(12, 8), dim=-1), F.normalize(torch.randn(12, 8), dim=-1)
    owner = torch.arange(12)
    computed = set(retrieval_metrics(img, txt, owner)) | {"loss"}
    computed |= {f"zs_{k}" for k in zeroshot_metrics(img, F.normalize(torch.randn(8, 3), dim=0), owner % 3)}
    assert computed == set(VAL_METRICS)
    assert set(crosslingual_consistency(img, txt, owner, txt, owner)) == set(XLING_METRICS)


def test_overwrite_with_resume_is_refused():
    """Both at once would remove the checkpoint resume continues from."""
    with pytest.raises(ConfigError, match=r"overwrite=true: contradicts resume=true"):
        validate_train_config(compose_train(["overwrite=true", "resume=true"]))
    validate_train_config(compose_train(["overwrite=true"]))
    validate_train_config(compose_train(["resume=true"]))


def test_resume_under_deepspeed_is_refused():
    """DeepSpeed reads its checkpoints with torch.load(weights_only=False): a handed-over run dir could run code."""
    with pytest.raises(ConfigError, match=r"trainer.strategy='deepspeed': cannot resume safely"):
        validate_train_config(compose_train(["resume=true", "trainer.strategy=deepspeed"]))
    validate_train_config(compose_train(["trainer.strategy=deepspeed"]))
