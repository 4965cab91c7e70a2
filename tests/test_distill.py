"""Text distillation (cliptune-distill) and the plug-in of its student (model.text_from): the loss falls and
the student puts Chinese next to the teacher's English; the run resumes exactly; the plugged CLIP keeps the
teacher's image tower and takes the student's text tower; its exports stay self-contained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cliptune.models import build_model, export_model, load_model
from cliptune.text_tower import build_text_tower_folder, plug_text_tower
from cliptune.train import distill
from cliptune.validate import validate_distill_config
from conftest import TINY_ARCH, compose_train
from helpers_shards import make_sample, write_shards

COLORS = {"red": "红", "blue": "蓝", "green": "绿", "black": "黑", "white": "白", "yellow": "黄"}
THINGS = {"cat": "猫", "dog": "狗", "car": "车", "tree": "树", "house": "房子"}
STUDENT = ["student.build.layers=1", "student.build.hidden=32", "student.build.heads=2",
           "student.build.intermediate=64", "student.build.vocab_size=200", "student.context_length=12"]


def _pairs(path: Path) -> Path:
    rows = [{"en": f"{c} {t}", "zh": f"{zc}{zt}"} for c, zc in COLORS.items() for t, zt in THINGS.items()]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny CLIP (random weights: its text embeddings are the targets) as an export."""
    torch.manual_seed(0)
    bundle = build_model("cliptune-tiny-teacher", arch=TINY_ARCH)
    out = tmp_path_factory.mktemp("teacher") / "export"
    export_model(bundle.model, bundle.model_cfg, bundle.preprocess_cfg, out, tokenizer=bundle.tokenizer)
    return out


def _cfg(tmp: Path, teacher: Path, name: str, *overrides: str):
    pairs = _pairs(tmp / "pairs.jsonl")
    return compose_train([f"teacher.load={teacher}", f"data.train=[{pairs}]", f"data.val={pairs}",
                          f"out_root={tmp}", f"name={name}", "batch_size=10", "optim.lr=3e-3", "optim.warmup_steps=5",
                          "optim.weight_decay=0.0", "trainer.max_steps=60", "trainer.val_check_interval=30",
                          "trainer.log_every_n_steps=1", "checkpoint_every=10", "callbacks.progress.refresh_rate=0",
                          *STUDENT, *overrides], run_dir=tmp / name, config_name="distill")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, teacher) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("distill")
    return tmp / "d", distill.run(_cfg(tmp, teacher, "d"))


def test_distillation_brings_chinese_to_the_teachers_english(distilled):
    run_dir, result = distilled
    before, after = result["before"]["parallel"], result["after"]["parallel"]
    assert result["global_step"] == 60
    for lang in ("en", "zh"):
        assert after[f"{lang}_loss"] < 0.3 * before[f"{lang}_loss"], (before, after)
        assert after[f"{lang}_cos"] > 0.9  # next to the teacher's embedding of the English sentence
    # the targets of "red cat" and "red dog" lie close together (a random teacher): R@1 is the strict test
    assert after["zh_R@1"] >= 0.5 and after["zh_R@1"] > before["zh_R@1"] + 0.4, (before, after)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["after"] == result["after"] and metrics["chance"]["parallel"]["zh_R@1"] == pytest.approx(1 / 30)
    assert metrics["throughput"]["sentences_per_s"] == pytest.approx(2 * metrics["throughput"]["pairs_per_s"])
    curves = pd.read_csv(run_dir / "csv" / "metrics.csv")
    assert {"train/loss", "train/loss_zh", "val/parallel/zh_R@1", "train/samples_per_s"} <= set(curves.columns)
    assert (run_dir / "checkpoints" / "best.ckpt").is_file() and (run_dir / "student_init" / "tokenizer.json").is_file()


def test_the_export_is_the_teacher_clip_with_the_student(distilled, teacher):
    run_dir, _ = distilled
    plugged = load_model(run_dir)  # its export/: loadable as any export
    base = load_model(teacher)
    assert type(plugged.model).__name__ == "CustomTextCLIP"
    for k, v in base.model.visual.state_dict().items():
        assert torch.equal(v, plugged.model.visual.state_dict()[k]), k
    assert torch.equal(base.model.logit_scale, plugged.model.logit_scale)
    plugged.model.eval()
    zh = plugged.model.encode_text(plugged.tokenizer(["红猫", "蓝狗"]), normalize=True)
    en = base.model.encode_text(base.tokenizer(["red cat", "blue dog"]), normalize=True)
    assert (zh @ en.T).argmax(1).tolist() == [0, 1]  # each Chinese name finds its English one
    export = json.loads((run_dir / "export" / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert export["hf_model_name"] == export["hf_tokenizer_name"] == "."  # self-contained, no path


def test_text_from_plugs_the_student_into_the_teacher(distilled, teacher, tmp_path):
    run_dir, _ = distilled
    bundle = build_model(f"local-dir:{teacher}", text_from=str(run_dir), lock_image=True)
    base = load_model(teacher)
    student = load_file(str(run_dir / "export" / "open_clip_model.safetensors"))
    assert type(bundle.model.text).__name__ == "HFTextEncoder"
    for k, v in bundle.model.text.state_dict().items():
        assert torch.equal(v, student[f"text.{k}"]), k
    for k, v in base.model.visual.state_dict().items():
        assert torch.equal(v, bundle.model.visual.state_dict()[k]), k
    assert not any(p.requires_grad for p in bundle.model.visual.parameters())
    assert all(p.requires_grad for p in bundle.model.text.parameters())
    assert bundle.spec["text_from"] == str(run_dir)
    # its export is self-contained: copied elsewhere, with the distill run gone, it loads and embeds the same
    out = export_model(bundle.model, bundle.model_cfg, bundle.preprocess_cfg, tmp_path / "a" / "export",
                       tokenizer=bundle.tokenizer)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    again = load_model(moved)
    again.model.eval()  # no dropout
    tokens = bundle.tokenizer(["绿树", "white house"])
    assert torch.allclose(again.model.encode_text(again.tokenizer(["绿树", "white house"])),
                          bundle.model.eval().encode_text(tokens), atol=1e-6)


def test_text_from_refuses_a_tower_of_another_width(distilled, tmp_path):
    run_dir, _ = distilled
    wide = build_model("cliptune-tiny-wide", arch={**TINY_ARCH, "embed_dim": 48})
    with pytest.raises(ValueError, match="embed_dim"):
        plug_text_tower(wide.model, wide.model_cfg, run_dir)
    with pytest.raises(FileNotFoundError, match="text_from"):
        plug_text_tower(wide.model, wide.model_cfg, tmp_path)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_continues_at_the_next_batch(tmp_path, teacher, monkeypatch, accumulate):
    """Killed after the checkpoint of step 10, resumed: the same weights and history as the uninterrupted run.
    With two batches per optimiser step the stream stands at batch 20 there, not at the step (10)."""
    common = ["trainer.max_steps=20", "eval.before=false", "data.val=null", "data.val_fraction=0.0",
              f"++trainer.accumulate_grad_batches={accumulate}"]
    whole = distill.run(_cfg(tmp_path, teacher, "whole", *common))
    step = distill.DistillModule.training_step

    def killed(self, batch, batch_idx):
        if self.global_step == 13:
            raise RuntimeError("killed")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(distill.DistillModule, "training_step", killed)
    with pytest.raises(RuntimeError, match="killed"):
        distill.run(_cfg(tmp_path, teacher, "cut", *common))
    monkeypatch.setattr(distill.DistillModule, "training_step", step)
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    cut = distill.run(_cfg(tmp_path, teacher, "cut", *common, "resume=true"))
    assert cut["global_step"] == whole["global_step"] == 20
    a = load_file(str(tmp_path / "whole" / "export" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "export" / "open_clip_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = pd.read_csv(tmp_path / "cut" / "csv" / "metrics.csv").dropna(subset=["train/loss"])["step"].tolist()
    assert steps == sorted(set(steps)) and steps == pd.read_csv(tmp_path / "whole" / "csv" / "metrics.csv").dropna(
        subset=["train/loss"])["step"].tolist()


def test_stream_is_a_function_of_the_step():
    rows = [distill.ParallelRow((str(i), str(i)), str(i)) for i in range(50)]
    stream = distill.ParallelStream(rows, batch_size=8, seed=3)
    first = [b for _, b in zip(range(20), iter(stream))]
    late = distill.ParallelStream(rows, batch_size=8, seed=3, start=lambda: 13)
    assert next(iter(late)) == first[13]
    assert sorted(r.texts[0] for b in first[:6] for r in b) == sorted({r.texts[0] for b in first[:6] for r in b})
    ranks = [distill.ParallelStream(rows, batch_size=4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    a, b = next(iter(ranks[0])), next(iter(ranks[1]))
    assert not {r.texts for r in a} & {r.texts for r in b}


def test_bad_settings_fail_before_anything_is_written(tmp_path, teacher):
    cfg = _cfg(tmp_path, teacher, "bad", "objective=l1", "data.langs=[en]", "batch_size=0", "student.build.hidden=31")
    with pytest.raises(ValueError) as info:
        distill.run(cfg)
    text = str(info.value)
    for key in ("objective=", "data.langs=", "batch_size=", "student.build.hidden="):
        assert key in text, text
    assert not (tmp_path / "bad").exists()


def test_built_student_folder_reads_chinese_by_character(tmp_path):
    folder = build_text_tower_folder(tmp_path / "s", ["红猫 red cat", "蓝狗 blue dog"] * 5, vocab_size=60, layers=1,
                                     hidden=16, heads=2, context_length=8)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "xlm-roberta" and cfg["pad_token_id"] == 1 and cfg["max_position_embeddings"] == 10
    student, tok, text_cfg = distill.build_student(str(folder), 24, pretrained=False, context_length=8)
    ids = tok(["红狗", "蓝猫"])
    assert ids.shape == (2, 8) and ids[0, 0] == 0 and (ids == 3).sum() == 0  # <s> first, no <unk>
    assert student(ids).shape == (2, 24) and text_cfg["hf_model_pretrained"] is False


def test_distill_configs_compose(tmp_path):
    """The commands of configs/distill.yaml and the demo preset compose, and every value resolves."""
    from omegaconf import OmegaConf

    cfg = compose_train(["distill=demo", f"out_root={tmp_path}"], config_name="distill")
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert plain["teacher"]["load"] == f"{tmp_path}/demo" and plain["name"] == "demo_distill"
    assert plain["data"]["exclude"] == ["demo_data/val.json"]
    cfg = compose_train(["teacher.load=runs/mine", "data.train=[pairs.jsonl]", "student.path=xlm-roberta-base",
                         "trainer=gpu"], config_name="distill")
    validate_distill_config(cfg)
    with pytest.raises(ValueError, match="teacher.load"):
        validate_distill_config(compose_train(["data.train=[p.jsonl]"], config_name="distill"))


def test_stage_two_trains_the_plugged_clip_on_both_languages(distilled, teacher, tmp_path):
    """cliptune-train with model.text_from: the student trains, the image tower stays the teacher's, and the
    validation reports each language and their consistency."""
    from cliptune.train.run import run

    run_dir, _ = distilled
    samples = [make_sample(f"s{i:03d}", {"en": [f"{c} {t}"], "zh": [f"{zc}{zt}"]}, i=i)
               for i, ((c, zc), (t, zt)) in enumerate((a, b) for a in COLORS.items() for b in THINGS.items())]
    write_shards(tmp_path / "shards", samples, per_shard=10, split="train")
    write_shards(tmp_path / "shards", samples, per_shard=10, split="val")
    cfg = compose_train(["model=open_clip", f"model.name=local-dir:{teacher}", f"++model.text_from={run_dir}",
                         "model.lock_image=true", "optim=adamw", "optim.lr=1e-3", "data=wds",
                         f"data.train={tmp_path / 'shards'}", f"data.val.domain={tmp_path / 'shards'}",
                         "data.caption_lang=any", "++data.val_caption_langs=[en,zh]", "data.workers=0",
                         "data.val_workers=0", "data.persistent_workers=false", "batch_size=10", "trainer.max_steps=3",
                         "trainer.val_check_interval=3", "export_start=false", f"out_root={tmp_path}", "name=s2",
                         "callbacks.progress.refresh_rate=0"], run_dir=tmp_path / "s2")
    result = run(cfg)
    assert set(result["after"]) == {"domain:en", "domain:zh", "domain:en~zh"}
    after = load_file(str(tmp_path / "s2" / "export" / "open_clip_model.safetensors"))
    before = load_file(str(run_dir / "export" / "open_clip_model.safetensors"))
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("visual."))
    assert not torch.equal(after["text.proj.weight"], before["text.proj.weight"])
    assert type(load_model(tmp_path / "s2").model.text).__name__ == "HFTextEncoder"


@pytest.mark.ddp
def test_two_processes_train_as_one_with_the_whole_batch(tmp_path, teacher):
    """trainer=ddp_cpu (2 gloo processes, batch 5 each) ends with the weights of 1 process at batch 10."""
    import os
    import subprocess
    import sys

    pairs = _pairs(tmp_path / "pairs.jsonl")
    common = [f"teacher.load={teacher}", f"data.train=[{pairs}]", f"data.val={pairs}", f"out_root={tmp_path}",
              "optim.lr=3e-3", "optim.warmup_steps=2", "trainer.max_steps=6", "trainer.val_check_interval=6",
              "student.build.dropout=0.0", "callbacks.progress.refresh_rate=0", *STUDENT]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    for name, extra in (("one", ["batch_size=10"]), ("two", ["batch_size=5", "trainer=ddp_cpu"])):
        # the installed command: Lightning starts rank 1 by running it again
        done = subprocess.run([str(Path(sys.executable).parent / "cliptune-distill"), *common, f"name={name}", *extra],
                              env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
    a = load_file(str(tmp_path / "one" / "export" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "export" / "open_clip_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    metrics = [json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two")]
    assert metrics[0]["global_step"] == metrics[1]["global_step"] == 6
    assert metrics[1]["after"]["parallel"]["zh_R@1"] == pytest.approx(metrics[0]["after"]["parallel"]["zh_R@1"])


# ------------------------------------------------------------------- the training machinery, shared
def _attached(module, **trainer_kw):
    import lightning as L

    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, max_steps=100, **trainer_kw)
    return module


def _modules(optim=None, seed: int = 0):
    """A ContrastiveModule and a DistillModule training the same tiny CLIP with the same settings."""
    from cliptune.train.losses import ClipLoss
    from cliptune.train.module import ContrastiveModule

    torch.manual_seed(0)
    model = build_model("cliptune-tiny-shared", arch=TINY_ARCH).model
    contrastive = ContrastiveModule(model, ClipLoss(), optim=optim, seed=seed)
    student = distill.DistillModule(model, distill.TeacherTargets(torch.nn.Linear(2, 2), lambda t: t), ("en", "zh"),
                                    optim=optim, seed=seed)
    return contrastive, student


class _Stop(Exception):
    pass


def test_both_modules_seed_a_step_from_seed_step_and_rank():
    """The RNG state a training step starts from is (seed * 1_000_003 + step * 4_099 + rank) mod 2**63 in both
    modules: the reference is a generator seeded by hand."""
    from types import SimpleNamespace

    seed, step, rank_ = 5, 7, 1
    want = torch.Generator().manual_seed((seed * 1_000_003 + step * 4_099 + rank_) % 2**63).get_state()
    contrastive, student = _modules(seed=seed)
    got = {}

    def capture(name):
        def f(*args, **kwargs):
            got[name] = torch.get_rng_state()
            raise _Stop
        return f

    contrastive.optimizers = capture("train")  # the first call after the seeding in each training_step
    student.losses = capture("distill")
    for name, module in (("train", contrastive), ("distill", student)):
        module._trainer = SimpleNamespace(global_step=step, global_rank=rank_)
        torch.manual_seed(123)  # whatever the process drew before
        with pytest.raises(_Stop):
            module.training_step({"texts": [["a"], ["b"]]}, 0)
        assert torch.equal(got[name], want), name


def test_both_modules_build_the_same_optimiser_and_schedule(monkeypatch):
    from cliptune.train.optim import OptimConfig

    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=10, min_lr_ratio=0.1, lr_text=5e-4, layer_decay=0.8)
    contrastive, student = _modules(cfg)
    a, b = (_attached(m).configure_optimizers() for m in (contrastive, student))
    ga, gb = a["optimizer"].param_groups, b["optimizer"].param_groups
    assert [(g["name"], g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in ga] == \
        [(g["name"], g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in gb]
    assert a["optimizer"].defaults == b["optimizer"].defaults and b["optimizer"].defaults["fused"]
    assert {k: v for k, v in a["lr_scheduler"].items() if k != "scheduler"} == \
        {k: v for k, v in b["lr_scheduler"].items() if k != "scheduler"} == {"interval": "step", "name": "train/lr"}
    fa, fb = (d["lr_scheduler"]["scheduler"].lr_lambdas[0] for d in (a, b))
    assert [fa(s) for s in range(120)] == [fb(s) for s in range(120)]
    # the reference: linear warm-up over 10 steps to the peak, cosine down to 0.1 of it at step 100
    assert fb(0) == pytest.approx(0.1) and fb(9) == pytest.approx(1.0) and fb(100) == pytest.approx(0.1)
    assert fb(55) == pytest.approx(0.1 + 0.9 * 0.5)
    # an fp16 GradScaler: neither optimiser is fused (it would unscale inside its step, past the clipping)
    for m in (contrastive, student):
        monkeypatch.setattr(m.trainer.precision_plugin, "scaler", object(), raising=False)
        assert not m.configure_optimizers()["optimizer"].defaults["fused"]


def test_a_nonfinite_gradient_stops_distillation_before_the_update(tmp_path, teacher, monkeypatch):
    """A finite loss with a NaN gradient: the run stops at that step, as cliptune-train does, and no
    checkpoint holds a non-finite weight (the loss alone was checked: the NaN step was taken and saved)."""
    from cliptune.rundir import load_torch_file
    from cliptune.train.module import NonFiniteError, nonfinite_entries

    losses = distill.DistillModule.losses
    calls = []

    def poisoned(self, batch):
        loss, per_lang = losses(self, batch)
        calls.append(1)
        if len(calls) == 3:  # d/dx sqrt(x) at 0 is inf, times 0: NaN gradients, the loss unchanged
            loss = loss + 0 * torch.sqrt(0 * next(self.student.parameters()).sum())
        return loss, per_lang

    monkeypatch.setattr(distill.DistillModule, "losses", poisoned)
    cfg = _cfg(tmp_path, teacher, "diverged", "trainer.max_steps=6", "checkpoint_every=1", "eval.before=false",
               "data.val=null", "data.val_fraction=0.0")
    with pytest.raises(NonFiniteError, match=r"step 3: the gradient norm is nan .*optim.lr=0.003"):
        distill.run(cfg)
    ckpts = sorted((tmp_path / "diverged" / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(not nonfinite_entries(load_torch_file(c)["state_dict"]) for c in ckpts)
    assert torch.load(ckpts[0], weights_only=True)["global_step"] == 2
    assert not (tmp_path / "diverged" / "export").exists()


# ------------------------------------------------------------------- killed at a write boundary, resumed
def _kill_args(tmp: Path, teacher: Path, name: str) -> list[str]:
    pairs = _pairs(tmp / "pairs.jsonl")
    return [f"teacher.load={teacher}", f"data.train=[{pairs}]", f"data.val={pairs}", f"out_root={tmp}", f"name={name}",
            "batch_size=10", "optim.lr=3e-3", "optim.warmup_steps=2", "trainer.max_steps=8", "checkpoint_every=3",
            "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", "++trainer.accumulate_grad_batches=2",
            "callbacks.progress.refresh_rate=0", *STUDENT]


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory, teacher):
    from killpoints import distill_cmd, trace

    root = tmp_path_factory.mktemp("distill_kill")
    return root, trace(_kill_args(root, teacher, "ref"), root / "trace.txt", cmd=distill_cmd)


@pytest.mark.slow
@pytest.mark.parametrize("boundary", ["checkpoint.saved@2",
                                      *(pytest.param(b, marks=pytest.mark.exhaustive)
                                        for b in ("validation.start@2", "csv.flush@3"))])
def test_killed_at_a_boundary_and_resumed_equals_the_uninterrupted_run(kill_reference, teacher, tmp_path, boundary):
    """cliptune-distill killed (SIGKILL) at a write boundary of cliptune.faults and resumed: the weights,
    metrics.json and every metrics.csv row of the run that was never killed (two batches per optimiser step)."""
    from killpoints import assert_same_run, distill_cmd, kill_at, resume

    root, boundaries = kill_reference
    point, n = boundary.split("@")
    assert (point, int(n)) in boundaries
    args = _kill_args(tmp_path, teacher, "cut")
    kill_at(args, (point, int(n)), cmd=distill_cmd)
    resume(args, cmd=distill_cmd)
    assert_same_run(root / "ref", tmp_path / "cut", boundary)
