"""scripts/bench_train.py, piece by piece: both trainers get the same work, the clock and the counts are right.

No timing is asserted; the end-to-end run (marked slow) checks that both trainers start through the script's
prelude, train and report every optimiser step.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_train.py"


@pytest.fixture(scope="module")
def bt():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _case(bt, preset: str, **kw) -> dict:
    cfg = bt.PRESETS[preset]
    case = {k: cfg[k] for k in ("device", "batch", "workers", "precision", "threads", "steps", "warmup")}
    case.update(model=cfg["models"][0], arch=None, compile=cfg["compile"][-1], shards="/s/train-{000000..000003}.tar")
    case.update(kw)
    return case


def _flags(argv: list[str]) -> dict[str, str | bool]:
    """open_clip_train's argv as {flag: value} (True for a bare flag)."""
    out: dict[str, str | bool] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[a] = nxt if nxt is not None and not nxt.startswith("--") else True
    return out


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_both_trainers_get_the_same_work(bt, preset, tmp_path):
    case = _case(bt, preset)
    ct = dict(a.split("=", 1) for a in bt.cliptune_argv(case, tmp_path, "c"))
    oc = _flags(bt.open_clip_argv(case, tmp_path, "o"))
    b, steps = case["batch"], case["steps"]
    assert ct["batch_size"] == oc["--batch-size"] == str(b)
    assert ct["data.workers"] == oc["--workers"] == str(case["workers"])
    assert ct["trainer.max_steps"] == str(steps)
    assert ct["data.samples_per_epoch"] == oc["--train-num-samples"] == str(steps * b)  # one epoch on both sides
    assert ct["data.train"].strip('"') == oc["--train-data"] == case["shards"]
    assert ct["data.sample_shuffle"] == "5000"  # open_clip_train's buffer
    assert oc["--dataset-resampled"] is True and ct.get("data.resampled", "true") == "true"
    assert ct["optim.lr"] == oc["--lr"] and ct["optim.weight_decay"] == oc["--wd"]
    assert ct["optim.warmup_steps"] == oc["--warmup"] and ct["optim.grad_clip"] == oc["--grad-clip-norm"]
    assert (ct["trainer.precision"], oc["--precision"]) == (
        ("bf16-mixed", "amp_bf16") if case["precision"] == "bf16" else ("32-true", "fp32"))
    assert (ct["compile"] == "true") == (oc.get("--torchcompile") is True) == (case["compile"] == "on")
    if preset == "gpu":  # an open_clip architecture from scratch, CLIP's pre-training optimiser values
        assert (ct["model"], ct["model.name"], ct["model.pretrained"], ct["optim"]) == (
            "open_clip", "ViT-B-32", "null", "adamw")
        assert oc["--model"] == "ViT-B-32" and ct["trainer"] == "gpu"
    else:  # cliptune's preset, registered with open_clip_train under its open_clip name
        assert ct["model"] == "tiny64" and oc["--model"] == "cliptune-tiny64"
    # nothing outside the measured steps is left on: no evaluation, export or mid-run checkpoint
    assert ct["eval.before"] == ct["eval.after"] == ct["export"] == ct["export_start"] == "false"
    assert int(ct["checkpoint_every"]) > steps


def test_preset_arch_is_the_cliptune_config(bt):
    arch = bt.preset_arch("tiny64")
    assert arch["vision_cfg"]["image_size"] == bt.PRESETS["cpu"]["image_size"] == 64
    assert arch["embed_dim"] == 128 and arch["text_cfg"]["context_length"] == 32


def test_steady_rate_leaves_the_warm_up_out(bt):
    ends = [0.0, 5.0, 6.0, 7.0, 8.5, 9.5]  # step 1 slow (start-up), then ~1 s a step
    assert bt.steady_rate(ends, batch=10, warmup=2) == pytest.approx(10 * 4 / (9.5 - 5.0))
    assert bt.median_step_rate(ends, batch=10, warmup=2) == pytest.approx(10 / statistics.median([1, 1, 1.5, 1]))
    with pytest.raises(ValueError, match="warmup"):
        bt.steady_rate(ends[:2], batch=10, warmup=2)


def test_shards_hold_what_both_readers_need(bt, tmp_path):
    pattern = bt.write_shards(tmp_path, num_samples=30, image_size=32, shard_size=12)
    assert pattern == str(tmp_path / "train-{000000..000002}.tar")
    index = json.loads((tmp_path / "train.json").read_text())
    assert index["num_samples"] == 30
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        exts = {m.name.split(".", 1)[1] for m in tar.getmembers()}
    assert {"jpg", "txt", "json"} <= exts  # open_clip_train reads jpg + txt, cliptune jpg + json


def test_flops_per_sample(bt):
    tiny = bt.preset_arch("tiny64")
    per = [bt.flops_per_sample("tiny64", tiny, b, 64) for b in (4, 16)]
    assert per[0] > 0 and per[1] == pytest.approx(per[0], rel=0.01)  # linear in the batch (the loss is tiny)
    # open_clip's docs/model_profile.csv: ViT-B/32 forward 14.8 GFLOPs a pair; training ~3x
    assert bt.flops_per_sample("ViT-B-32", None, 2, 224) / 1e9 == pytest.approx(3 * 14.8, rel=0.03)


def test_summary_and_table(bt, capsys):
    case = _case(bt, "cpu")
    res = {impl: [{"samples_per_s": r, "samples_per_cpu_s": r / 2, "median_step_samples_per_s": r,
                   "max_rss_mib": 100.0 + r, "wall_s": 30.0} for r in rates]
           for impl, rates in (("cliptune", [150.0, 160.0]), ("open_clip", [100.0, 128.0]))}
    row = bt.summarise(case, res, flops=1e9, peak=1e12)
    assert row["ratio"] == pytest.approx([1.5, 1.25]) and row["cpu_ratio"] == pytest.approx([1.5, 1.25])
    assert row["cliptune"]["peak_mib"] == 260.0
    assert row["cliptune"]["mfu"] == pytest.approx(155.0 * 1e9 / 1e12)
    bt.print_table([row], "cpu")
    out = capsys.readouterr().out
    assert "1.38 (1.25-1.50)" in out and "tiny64" in out


@pytest.mark.slow
def test_both_trainers_run_through_the_prelude(bt, tmp_path):
    """A 4-step run of each trainer on 32 px shards: every optimiser step timed, memory and CPU recorded."""
    shards = bt.write_shards(tmp_path / "shards", num_samples=64, image_size=32, shard_size=16)
    case = {"device": "cpu", "batch": 8, "workers": 1, "precision": "fp32", "threads": 1, "steps": 4, "warmup": 1,
            "model": "tiny", "arch": bt.preset_arch("tiny"), "compile": "off", "shards": shards}
    for impl in bt.IMPLS:
        res = bt.run_one(impl, case, tmp_path, "smoke", timeout=300)
        assert res["samples_per_s"] > 0 and res["samples_per_cpu_s"] > 0, impl
        assert res["max_rss_mib"] > 50 and res["main_cpu_s"] > 0, impl
