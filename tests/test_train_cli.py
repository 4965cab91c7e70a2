"""End to end: `cliptune-train` runs and exports for plain open_clip, and a 2-process DDP run equals
the 1-process run on the same global batch (killed-and-resumed runs: test_resume_run.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from cliptune.train import run as train_run
from conftest import compose_train, subprocess_env, train_cmd

# Deterministic preprocessing (a full-image crop of square images), so runs can be compared exactly.
NO_AUG = ["+model.aug_cfg.scale=[1.0,1.0]"]


def test_smoke_run_trains_logs_and_exports(tmp_path):
    cfg = compose_train(["experiment=smoke", f"out_root={tmp_path}", "name=smoke"], run_dir=tmp_path / "smoke")
    res = train_run.run(cfg)
    run = Path(res["run_dir"])
    assert res["global_step"] == cfg.trainer.max_steps
    # before/after on the synthetic validation set; training moves retrieval well above the start
    metrics = json.loads((run / "metrics.json").read_text())
    before, after = metrics["before"]["synthetic"], metrics["after"]["synthetic"]
    assert after["mean_R"] > before["mean_R"] + 0.05
    assert after["loss"] < before["loss"]
    # logged series
    import pandas as pd

    log = pd.read_csv(run / "csv" / "metrics.csv")
    for col in ("train/loss", "train/logit_scale", "train/samples_per_s", "val/synthetic/mean_R"):
        assert col in log.columns and log[col].notna().any(), col
    # the lr of each parameter group (test_callbacks.py checks the values)
    assert {"train/lr/image+text", "train/lr/image+text+head/no_wd"} <= set(log.columns)
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    # the export loads in plain open_clip (no cliptune code path) and reproduces the trained weights
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run / 'export'}")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained[k], msg=k)


def _export_state(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "open_clip_model.safetensors"))


@pytest.mark.ddp
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_ddp_two_processes_equal_one_process(tmp_path, loss):
    """2 ranks x B/2 equal 1 rank x B: same weights after 3 steps, same logged loss. The model
    carries a logit_bias even under the CLIP loss (a SigLIP checkpoint): it must be frozen, not
    left unused (DDP would raise) nor trained."""
    common = ["experiment=smoke", f"loss={loss}", "trainer.max_steps=3", "trainer.val_check_interval=3",
              "eval.before=false", "data.num_samples=256", "data.val_samples=32", "optim.warmup_steps=1",
              "model.init_logit_bias=-5.0", "data.workers=0", "trainer.log_every_n_steps=1", *NO_AUG]
    ddp = subprocess.run(
        train_cmd(*common, f"out_root={tmp_path}", "name=ddp", "trainer=ddp_cpu", "batch_size=16"),
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    cfg = compose_train([*common, f"out_root={tmp_path}", "name=single", "batch_size=32"], run_dir=tmp_path / "single")
    train_run.run(cfg)

    a, b = _export_state(tmp_path / "ddp"), _export_state(tmp_path / "single")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    if loss == "clip":  # frozen: the starting value, on both
        assert float(a["logit_bias"]) == pytest.approx(-5.0)
    else:  # trained
        assert float(a["logit_bias"]) != pytest.approx(-5.0)

    import pandas as pd

    la = pd.read_csv(tmp_path / "ddp" / "csv" / "metrics.csv")
    lb = pd.read_csv(tmp_path / "single" / "csv" / "metrics.csv")
    ca, cb = la["train/loss"].dropna().to_numpy(), lb["train/loss"].dropna().to_numpy()
    assert len(ca) == len(cb) > 0
    torch.testing.assert_close(torch.tensor(ca), torch.tensor(cb), atol=1e-4, rtol=1e-4)
    # validation in DDP saw each sample once: same numbers as the single process
    ma = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["after"]["synthetic"]
    mb = json.loads((tmp_path / "single" / "metrics.json").read_text())["after"]["synthetic"]
    for k in ("t2i_R@1", "i2t_R@5", "mean_R"):
        assert ma[k] == pytest.approx(mb[k], abs=1e-6), k


def test_wandb_logger_offline(tmp_path):
    cfg = compose_train(["experiment=smoke", "logger=wandb", "trainer.max_steps=4", "trainer.val_check_interval=4",
                         "eval.before=false", "export=false", "export_start=false", f"out_root={tmp_path}", "name=w"],
                        run_dir=tmp_path / "w")
    train_run.run(cfg)
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert runs, "wandb wrote no offline run"
    assert any(p.suffix == ".wandb" for p in runs[0].rglob("*"))


@pytest.mark.parametrize("max_steps,every", [(8, 4), (7, 4)])
def test_final_validation_is_run_and_logged_once(tmp_path, max_steps, every):
    """The after-training numbers are those of the weights at the last step: fit's own validation when it
    ran at that step (not repeated: one row in metrics.csv), else one more pass after fit."""
    import pandas as pd

    cfg = compose_train(["experiment=smoke", f"trainer.max_steps={max_steps}", f"trainer.val_check_interval={every}",
                         "export=false", "export_start=false", f"out_root={tmp_path}", "name=v"],
                        run_dir=tmp_path / "v")
    train_run.run(cfg)
    log = pd.read_csv(tmp_path / "v" / "csv" / "metrics.csv")
    rows = log[log["val/synthetic/mean_R"].notna()]
    assert len(rows) == 3, rows[["step", "val/synthetic/mean_R"]]  # before, at step 4, at the last step
    after = json.loads((tmp_path / "v" / "metrics.json").read_text())["after"]["synthetic"]
    last = rows.iloc[-1]
    for k in ("t2i_R@1", "i2t_R@5", "mean_R", "loss"):
        assert after[k] == pytest.approx(float(last[f"val/synthetic/{k}"]), abs=1e-6), k
    # an independent pass over the saved final weights gives the same numbers
    module = train_run.build_module(cfg, bundle := train_run.build_bundle(cfg))
    ckpt = torch.load(tmp_path / "v" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module.load_state_dict(ckpt["state_dict"])
    import lightning as L

    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        module, datamodule=train_run.build_datamodule(cfg, bundle), verbose=False)
    again = module.last_val["synthetic"]["metrics"]
    for k in ("t2i_R@1", "i2t_R@5", "mean_R"):
        assert again[k] == pytest.approx(after[k], abs=1e-6), k


# ------------------------------------------------------------------------------ errors: one line, nothing written
def test_a_missing_data_folder_is_one_line_and_writes_nothing(tmp_path):
    """The command a user types with a misspelt folder: one line naming the key and the path, exit code 2,
    before the model is built (no run directory, no export_start/, no metrics.json)."""
    runs = tmp_path / "runs"
    done = subprocess.run(train_cmd("experiment=smoke", "data=wds", f"data.train={tmp_path}/shardz",
                                    f"out_root={runs}", "name=typo"), env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    err = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert err[-1] == (f"error: data.train: shard spec '{tmp_path}/shardz' matches no shards (looked for "
                       f"'{tmp_path}/shardz'); check the path, the brace range and the split name"), done.stderr
    assert "Traceback" not in done.stderr
    assert not any(p.is_file() for p in tmp_path.rglob("*")), sorted(tmp_path.rglob("*"))


def test_a_busy_run_directory_is_one_line(tmp_path, capsys, monkeypatch):
    from cliptune.cli import _reporting
    from cliptune.rundir import RunLock

    monkeypatch.delenv("CLIPTUNE_TRACEBACK", raising=False)
    with RunLock(tmp_path / "busy"):
        job = _reporting(lambda cfg: RunLock(tmp_path / "busy").acquire(), failed := [])
        with pytest.raises(SystemExit) as info:
            job(compose_train([]))
    err = capsys.readouterr().err
    assert info.value.code == 2 and not failed
    assert err.startswith(f"error: {tmp_path / 'busy'} is in use by another run (PID ") and err.count("\n") == 1, err


@pytest.mark.parametrize("argv,problem", [
    (["name=../x"], "error: name='../x': climbs out of out_root=runs"),
    (["experiment=smoke", "out_root=/data/runs", "name=/abs"],
     "error: name='/abs': must be relative to out_root=/data/runs"),
    (["name="], "error: name='': must be a non-empty folder name"),
    (["name=a/../.."], "error: name='a/../..': climbs out of out_root=runs"),
    (["name=mine", "-m", "loss=clip,siglip"], None),
    (["-m", "name=a,../b"], None),  # a sweep: each job checks its own
    (["name=losses/loss=clip"], None),
])
def test_a_run_name_outside_the_runs_folder_stops_before_hydra_makes_it(argv, problem):
    from cliptune.cli import quote_equals
    from cliptune.train.cli import run_name_error

    error = run_name_error(quote_equals(argv))
    assert error == problem if problem is None else (error or "").startswith(problem), error
