"""One run, one directory, at its edges: overwrite leaves nothing of the old run, a run name stays inside the
runs folder, every setting naming data or a model exists before anything is written, a folder cliptune names
itself (``runs/losses/loss=clip``) is accepted as printed, and the CLIs say what is wrong in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cliptune.rundir import RunDir, RunLock
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
