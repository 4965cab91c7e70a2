"""A run killed (SIGKILL) at any write boundary and resumed with ``resume=true`` ends as the run that was
never killed: same weights, same metrics.json, every row of metrics.csv once, no temporary file.

The boundaries come from the code (``cliptune.faults``, traced from an uninterrupted run): a new write
boundary is covered here without a new test. The default suite kills at one boundary of each kind;
``CLIPTUNE_ALL_KILLPOINTS=1`` kills at every one the run crosses (about 60, a few minutes).
"""

from __future__ import annotations

import pytest

from cliptune.faults import POINTS
from helpers_shards import basic_samples, write_shards
from killpoints import assert_same_run, kill_at, pick, resume, trace

# 12 steps of 16 from 64 samples: 4 batches an epoch (checkpoints at 3, 6, 9, 12 cross epoch boundaries
# at 4, 8, 12), validations before fit and at steps 6 and 12 (the last one inside fit).
COMMON = ["experiment=smoke", "trainer.max_steps=12", "checkpoint_every=3", "trainer.val_check_interval=6",
          "trainer.log_every_n_steps=1", "batch_size=16", "data.num_samples=64", "data.val_samples=32"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("killpoints")
    args = [*COMMON, f"out_root={root}", "name=ref"]
    return root, trace(args, root / "trace.txt")


def test_the_trace_reaches_every_training_point(reference):
    """Every registered point but the shard writer's is crossed by a training run (a point no run reaches
    would never be killed at)."""
    _, boundaries = reference
    assert {p for p, _ in boundaries} == set(POINTS) - {"shards.index"}
    # a checkpoint due at a validated step is written after that validation (it would resume past it)
    order = [b for b in boundaries if b[0] in ("validation.start", "checkpoint.write")]
    assert order[order.index(("validation.start", 2)) + 1] == ("checkpoint.write", 2)


def _cases():
    # the kinds the default suite covers; the rest with CLIPTUNE_ALL_KILLPOINTS=1 (test below)
    default = ["checkpoint.write@2", "validation.start@2", "validation.start@3", "metrics.write@2"]
    more = ["csv.flush@2", "export.write@2", "checkpoint.saved@2"]  # make test-all
    return [*default, *(pytest.param(b, marks=pytest.mark.exhaustive) for b in more)]



@pytest.mark.slow
@pytest.mark.parametrize("boundary", _cases())
def test_killed_at_a_boundary_and_resumed_equals_the_uninterrupted_run(reference, tmp_path, boundary):
    root, boundaries = reference
    point, n = boundary.split("@")
    assert (point, int(n)) in boundaries
    args = [*COMMON, f"out_root={tmp_path}", "name=cut"]
    kill_at(args, (point, int(n)))
    resume(args)
    assert_same_run(root / "ref", tmp_path / "cut", boundary)


@pytest.mark.slow
def test_every_boundary_when_asked(reference, tmp_path):
    """``CLIPTUNE_ALL_KILLPOINTS=1``: every boundary of the trace (skipped otherwise: a few minutes)."""
    import os

    if os.environ.get("CLIPTUNE_ALL_KILLPOINTS") != "1":
        pytest.skip("set CLIPTUNE_ALL_KILLPOINTS=1 to kill the run at every boundary it crosses")
    root, boundaries = reference
    for i, b in enumerate(pick(boundaries, every=True)):
        args = [*COMMON, f"out_root={tmp_path}", f"name=cut{i}"]
        kill_at(args, b)
        resume(args)
        assert_same_run(root / "ref", tmp_path / f"cut{i}", f"{b[0]}@{b[1]}")


@pytest.mark.slow
@pytest.mark.parametrize("data", [pytest.param("synthetic", marks=pytest.mark.exhaustive), "wds"])
def test_a_checkpoint_on_an_epoch_boundary_resumes_the_same_stream(tmp_path, data):
    """Checkpoints at steps 4 and 8 of 4-batch epochs (the epoch's last batch): the resumed run draws the
    next epoch's batches, not the end of the last one again, nor another epoch's shuffle.

    Lightning numbers the epoch after such a resume one too high (it counts the finished epoch twice):
    the ``epoch`` column of metrics.csv is Lightning's and is left out; the data stream counts its own
    (``ResumableTrainData.data_epoch``), which the weights and every logged value below hold to."""
    args = ["experiment=smoke", "trainer.max_steps=12", "checkpoint_every=4", "trainer.val_check_interval=12",
            "trainer.log_every_n_steps=1", "batch_size=16", "export_start=false"]
    if data == "synthetic":
        args += ["data.num_samples=64", "data.val_samples=32"]
    else:
        shards = tmp_path / "shards"
        write_shards(shards, basic_samples(64, prefix="t"), 16, split="train")
        write_shards(shards, basic_samples(32, prefix="v"), 16, split="val")
        args += ["data=wds", f"data.train={shards}", f"data.val.domain={shards}", "data.resampled=false",
                 "data.samples_per_epoch=64", "data.sample_shuffle=8", "data.workers=2",
                 "data.persistent_workers=false"]
    boundaries = trace([*args, f"out_root={tmp_path}", "name=ref"], tmp_path / "trace.txt")
    assert ("checkpoint.saved", 2) in boundaries
    cut = [*args, f"out_root={tmp_path}", "name=cut"]
    kill_at(cut, ("checkpoint.saved", 2))  # right after the checkpoint of step 8, the end of epoch 2
    resume(cut)
    assert_same_run(tmp_path / "ref", tmp_path / "cut", f"{data}: epoch boundary", ignore=("epoch",))
