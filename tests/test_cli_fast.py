"""The command lines: every CLI answers --help and --cfg job without importing torch, Lightning or
open_clip; --help shows each CLI's own keys; cliptune-eval refuses training keys with the right advice;
a sweep's folders are named after the swept keys; logs and tables read whole outside a terminal."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.table import Table

from conftest import subprocess_env, train_cmd

HEAVY = ("torch", "lightning", "open_clip")

SCRIPTS = {"cliptune.train.cli:main": "cliptune-train", "cliptune.eval.cli:main": "cliptune-eval",
           "cliptune.eval.cli:wiseft_main": "cliptune-wiseft", "cliptune.eval.compare:main": "cliptune-compare",
           "cliptune.data.shards:main": "cliptune-shards", "cliptune.data.demo:main": "cliptune-demo-data",
           "cliptune.train.cli:distill_main": "cliptune-distill"}
# (entry point as module:function, arguments)
FAST = [
    ("cliptune.train.cli:main", ["--help"]),
    ("cliptune.train.cli:main", ["--cfg", "job", "experiment=smoke"]),
    ("cliptune.train.cli:main", ["-sc", "query=bash"]),
    ("cliptune.eval.cli:main", ["--help"]),
    ("cliptune.eval.cli:main", ["--cfg", "job", "load=runs/x", "sets=shards"]),
    ("cliptune.eval.cli:main", ["model=minilm"]),
    ("cliptune.eval.cli:wiseft_main", ["--help"]),
    ("cliptune.eval.cli:wiseft_main", ["--cfg", "job", "run=runs/x", "sets=shards"]),
    ("cliptune.eval.compare:main", ["--help"]),
    ("cliptune.data.shards:main", ["--help"]),
    ("cliptune.data.demo:main", ["--help"]),
    ("cliptune.train.cli:distill_main", ["--help"]),
    ("cliptune.train.cli:distill_main", ["--cfg", "job", "distill=demo"]),
]


def test_every_entry_point_is_checked():
    import tomllib
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert {v: k for k, v in scripts.items()} == SCRIPTS
    assert {t for t, _ in FAST} == set(SCRIPTS)


PROBE = """
import importlib, json, sys
target, out, *args = sys.argv[1:]
module, function = target.split(":")
sys.argv = [module, *args]
try:
    getattr(importlib.import_module(module), function)()
except SystemExit as e:
    code = e.code
else:
    code = 0
with open(out, "w") as f:
    json.dump({"code": code, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in %r)}, f)
""" % (HEAVY,)


def _probe(tmp_path: Path, target: str, args: list[str], **env: str) -> tuple[dict, subprocess.CompletedProcess]:
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, "-c", PROBE, target, str(out), *args], capture_output=True, text=True,
                          env={**subprocess_env(), **env}, cwd=tmp_path, timeout=120)
    assert out.is_file(), done.stderr[-3000:]
    return json.loads(out.read_text()), done


@pytest.mark.parametrize("target,args", FAST, ids=[f"{SCRIPTS[t]} {' '.join(a)}" for t, a in FAST])
def test_cli_answers_without_heavy_imports(tmp_path, target, args):
    env = {"COMP_LINE": "cliptune-train mod"} if "-sc" in args else {}
    result, done = _probe(tmp_path, target, args, **env)
    assert result["loaded"] == [], f"{target} {args} imported {result['loaded'][:5]}"
    assert result["code"] in (0, None, 2), done.stderr[-3000:]
    if "-sc" in args:
        assert "model=" in done.stdout  # Hydra's completion answered


def test_help_shows_each_clis_own_keys(tmp_path):
    _, train = _probe(tmp_path, "cliptune.train.cli:main", ["--help"])
    text = train.stdout
    assert re.search(r"^  model\s+.*\btiny\*", text, re.M), text  # the groups, the default marked
    assert re.search(r"^  experiment\s+demo, (\S+, )*smoke", text, re.M)
    assert re.search(r"^  batch_size: 64\s+# global contrastive batch", text, re.M)  # a key with its comment
    assert "hydra:" not in text and "_train_schema" not in text

    _, ev = _probe(tmp_path, "cliptune.eval.cli:main", ["--help"])
    text = ev.stdout
    assert re.search(r"^  load: null\s+# the model:", text, re.M)
    assert re.search(r"^  sets: null\s+#", text, re.M)
    for training in ("Config groups", "loss", "optim", "trainer", "_train_schema"):
        assert training not in text, f"cliptune-eval --help lists {training!r}"

    _, wiseft = _probe(tmp_path, "cliptune.eval.cli:wiseft_main", ["--help"])
    assert re.search(r"^  alphas: \[", wiseft.stdout, re.M) and "trainer" not in wiseft.stdout


@pytest.mark.parametrize("override,advice", [
    ("model=minilm", "load=<run dir"), ("model.name=ViT-B-32", "pretrained=<tag"),
    ("+model.pretrained=openai", "load="),
    ("data=wds", "sets=<shard folder"), ("loss=siglip", "cliptune-eval has no key 'loss'"),
    ("seed=1", "cliptune-eval has no key 'seed'"),
])
def test_eval_refuses_training_keys_with_advice(override, advice):
    from cliptune.cli import misused_key_error
    from cliptune.eval.cli import EVAL_ADVICE

    error = misused_key_error("cliptune-eval", "eval", ["load=runs/x", override], EVAL_ADVICE)
    assert error is not None and override in error and advice in error
    assert "+model" not in error.replace(override, "")  # not Hydra's "use +model=..." advice


def test_eval_keys_pass_the_check():
    from cliptune.cli import misused_key_error
    from cliptune.eval.cli import EVAL_ADVICE, WISEFT_ADVICE

    ok = ["load=runs/x", "pretrained=openai", "+sets.a=s", "sets={a:x}", "batch_size=8", "zeroshot.enabled=false",
          "hydra.run.dir=x", "-m", "--cfg", "job", "device=cpu,cuda"]
    assert misused_key_error("cliptune-eval", "eval", ok, EVAL_ADVICE) is None
    wiseft_ok = ["run=x", "reference=y", "alphas=[0,1]"]
    assert misused_key_error("cliptune-wiseft", "wiseft", wiseft_ok, WISEFT_ADVICE) is None
    assert "start=" in misused_key_error("cliptune-wiseft", "wiseft", ["model=tiny"], WISEFT_ADVICE)


def test_eval_misuse_exits_before_hydra(tmp_path):
    result, done = _probe(tmp_path, "cliptune.eval.cli:main", ["model=minilm", "sets=x"])
    assert result["code"] == 2
    assert "load=<run dir | export folder | open_clip name>" in done.stderr and "+model" not in done.stderr


def test_job_dirname_is_one_path_component():
    from cliptune.train.cli import MAX_DIRNAME, job_dirname

    assert job_dirname("loss=clip") == "loss=clip"
    assert job_dirname("data.train=/abs/shards,loss=clip") == "data.train=_abs_shards,loss=clip"
    assert job_dirname("", 3) == "3"
    long = job_dirname("x=" + "a" * 400)
    assert "/" not in long and len(long.encode()) <= MAX_DIRNAME
    assert job_dirname("x=" + "a" * 400) != job_dirname("x=" + "a" * 399 + "b")


def test_sweep_overrides_exclude_every_key_not_swept():
    from cliptune.train.cli import sweep_overrides

    assert sweep_overrides(["experiment=smoke", "loss=clip,siglip"]) == []  # not a sweep
    (added,) = sweep_overrides(["-m", "experiment=smoke", "data.train=/abs/x", "+model.aug_cfg.scale=[1.0,1.0]",
                                "loss=clip,siglip", "optim.lr=range(1,3)", "hydra.verbose=true"])
    assert added == ("hydra.job.config.override_dirname.exclude_keys="
                     "['data.train','experiment','model.aug_cfg.scale']")
    assert sweep_overrides(["-m", "loss=clip,siglip", "hydra.job.config.override_dirname.exclude_keys=[]"]) == []


def test_multirun_folders_are_named_by_the_swept_keys(tmp_path):
    """A real sweep: an absolute path among the overrides, two losses swept; the folders are
    loss=clip and loss=siglip, the log is plain lines (no bar redraws, no tips, no open_clip chatter),
    and each run's overrides.yaml still records every override."""
    abs_path = str(tmp_path / "some" / "abs" / "path")
    done = subprocess.run(
        train_cmd("-m", "experiment=smoke", f"out_root={tmp_path}", "name=sweep", "loss=clip,siglip",
                  f"demo_data={abs_path}", "trainer.max_steps=2", "eval.before=false", "eval.after=false",
                  "export=false", "export_start=false", "data.num_samples=64", "data.val_samples=16",
                  "trainer.log_every_n_steps=1", "callbacks.progress.text_every=1"),
        env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["loss=clip", "loss=siglip"]
    overrides = (sweep / "loss=siglip" / "overrides.yaml").read_text()
    assert "loss=siglip" in overrides and abs_path in overrides
    out = done.stdout
    assert "\r" not in out and "Tip:" not in out and "Parsing model identifier" not in out
    assert re.search(r"INFO step 2/2 \(100%\) \| train/loss=", out), out[-3000:]
    assert out.count("GPU available") == 2  # once per run, not twice (Lightning's own handler and the root's)


def test_progress_bar_style():
    from lightning.pytorch.callbacks import TQDMProgressBar

    from cliptune.train.callbacks import TextProgress, progress_bar

    assert type(progress_bar(style="bar")) is TQDMProgressBar
    assert isinstance(progress_bar(style="text", text_every=5), TextProgress)
    assert type(progress_bar(style="auto")) is TextProgress  # pytest captures stdout: not a terminal
    off = progress_bar(style="text", refresh_rate=0)
    assert type(off) is TQDMProgressBar and off.refresh_rate == 0
    with pytest.raises(ValueError, match="style='fancy'"):
        progress_bar(style="fancy")


def test_wide_table_prints_whole_outside_a_terminal(capsys):
    from cliptune.log import rank_zero_print

    table = Table(title="wide")
    cells = [f"{0.1234567 + i:.6f}" for i in range(30)]
    for i in range(30):
        table.add_column(f"val/domain_set_{i}/t2i_R@10")
    table.add_row(*cells)
    rank_zero_print(table)
    out = capsys.readouterr().out
    assert "…" not in out
    assert all(c in out for c in cells) and all(f"val/domain_set_{i}/t2i_R@10" in out for i in range(30))


def test_load_report_becomes_one_line(caplog):
    from cliptune.log import _load_report_line

    report = ("\x1b[1mBertModel LOAD REPORT\x1b[0m from: /models/minilm\n"
              "Key                 | Status     |  | \n--------------------+------------+--+-\n"
              "pooler.dense.bias   | UNEXPECTED |  | \npooler.dense.weight | UNEXPECTED |  | \n\n"
              "Notes:\n- UNEXPECTED:\tcan be ignored when loading from different task/architecture")
    report = re.sub(r"\x1b\[[0-9;]*m", "", report)  # the filter strips terminal codes first
    level, line = _load_report_line(report)
    assert level == logging.INFO and "\n" not in line
    assert line == ("pretrained BertModel loaded from /models/minilm; 2 checkpoint weights this architecture "
                    "does not use, left out: pooler.dense.bias, pooler.dense.weight")
    missing = report.replace("pooler.dense.bias   | UNEXPECTED", "encoder.x.weight    | MISSING   ")
    level, line = _load_report_line(missing)
    assert level == logging.WARNING and "1 weight not in the checkpoint, initialised fresh: encoder.x.weight" in line


@pytest.mark.parametrize("target", ["cliptune.data.shards:main", "cliptune.data.demo:main",
                                    "cliptune.eval.compare:main"])
def test_argparse_help_says_each_default_once(tmp_path, target):
    _, done = _probe(tmp_path, target, ["--help"])
    text = " ".join(done.stdout.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"\)\s+\(default", text), text
