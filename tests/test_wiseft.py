"""`cliptune-wiseft`: alpha = 0 / 1 are exactly the start and fine-tuned models (weights and
metrics), tables and plot are written, and the chosen model loads with plain open_clip."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cliptune.eval.runner import evaluate_sets
from cliptune.eval.wiseft import _choose, interpolate, run
from cliptune.models import load_model
from conftest import compose_train
from helpers_shards import basic_samples, write_shards
from test_eval_cli import synthetic_val_shards, train_run


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wiseft")
    write_shards(root / "general", basic_samples(24, prefix="g"), per_shard=10, split="val")
    return {"run": train_run(root, "ft", "loss=siglip", "loss.init_logit_bias=-3", "eval.before=false"),
            "domain": synthetic_val_shards(root / "domain"), "general": root / "general"}


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "open_clip_model.safetensors"))


def test_interpolate():
    s = {"w": torch.tensor([0.0, 1.0, 2.0]), "n": torch.tensor([1])}
    f = {"w": torch.tensor([1.0, 1.0, 4.0]), "n": torch.tensor([2])}
    assert torch.equal(interpolate(s, f, 0.0)["w"], s["w"]) and interpolate(s, f, 0.0)["n"].item() == 1
    assert torch.equal(interpolate(s, f, 1.0)["w"], f["w"]) and interpolate(s, f, 1.0)["n"].item() == 2
    assert torch.allclose(interpolate(s, f, 0.25)["w"], torch.tensor([0.25, 1.0, 2.5]))
    assert interpolate(s, f, 0.25)["n"].item() == 2  # integer buffers are not interpolated
    with pytest.raises(ValueError, match="only in start"):
        interpolate({**s, "x": torch.zeros(1)}, f, 0.5)
    with pytest.raises(ValueError, match="parameter 'w' has shape"):
        interpolate(s, {**f, "w": torch.zeros(2)}, 0.5)


def test_choose():
    rows = [{"alpha": 0.0, "domain/d": 0.2, "reference/r": 0.9},
            {"alpha": 0.5, "domain/d": 0.5, "reference/r": 0.8},
            {"alpha": 1.0, "domain/d": 0.6, "reference/r": 0.3}]
    assert _choose(rows, "domain") == 1.0
    assert _choose(rows, "sum") == 0.5
    assert _choose(rows, 0.0) == 0.0
    with pytest.raises(ValueError, match="select=0.3 is not one of alphas"):
        _choose(rows, 0.3)
    with pytest.raises(ValueError, match="select='best'"):
        _choose(rows, "best")


def test_endpoints_tables_plot_and_export(tuned, tmp_path):
    run_dir = tuned["run"]
    out = tmp_path / "wf"
    cfg = compose_train([f"run={run_dir}", f"sets={{domain:{tuned['domain']}}}", f"reference={tuned['general']}",
                         "alphas=[0,0.5,1]", "select=0.5", "device=cpu", "workers=0", f"out={out}"],
                        run_dir=out, config_name="wiseft")
    doc = run(cfg)

    # alpha = 0 / 1: the metrics of the start and fine-tuned exports, evaluated on their own
    sets = {"domain": str(tuned["domain"]), "general": str(tuned["general"])}
    for alpha, export in ((0.0, "export_start"), (1.0, "export")):
        ref = evaluate_sets(load_model(run_dir / export), sets, ["any"], workers=0)
        assert doc["metrics"][str(alpha)] == {n: r["metrics"] for n, r in ref.items()}, alpha
    after = json.loads((run_dir / "metrics.json").read_text())["after"]["synthetic"]
    assert doc["metrics"]["1.0"]["domain"]["mean_R"] == pytest.approx(after["mean_R"], abs=1e-6)
    assert [r["alpha"] for r in doc["alphas"]] == [0.0, 0.5, 1.0]
    assert set(doc["alphas"][0]) == {"alpha", "domain/domain", "reference/general"}

    # alpha = 0 / 1 weights: exactly the endpoints
    s, f = _state(run_dir / "export_start"), _state(run_dir / "export")
    assert set(s) == set(f)
    for alpha, want in ((0.0, s), (1.0, f)):
        got = interpolate(s, f, alpha)
        assert all(torch.equal(got[k], want[k]) for k in want), alpha

    # files
    md, csv = (out / "wiseft.md").read_text(), (out / "wiseft.csv").read_text().splitlines()
    assert csv[0] == "alpha,domain/domain,reference/general" and len(csv) == 4
    assert f"{doc['alphas'][1]['domain/domain']:.3f}" in md
    assert json.loads((out / "wiseft.json").read_text())["chosen_alpha"] == 0.5
    with Image.open(out / "wiseft.png") as im:
        assert im.format == "PNG" and min(im.size) > 100

    # the chosen model (alpha = 0.5) loads with plain open_clip, both ways, with the mixed weights
    mixed = interpolate(s, f, 0.5)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out / 'export'}")
    got = model.state_dict()
    assert all(torch.equal(got[k], mixed[k]) for k in mixed)
    assert model.logit_bias is not None  # the SigLIP bias survives the export
    cfg_json = json.loads((out / "export" / "open_clip_config.json").read_text())
    name = "t-wiseft-export"
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg_json["model_cfg"]))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    model2, _, _ = open_clip.create_model_and_transforms(
        name, pretrained=str(out / "export" / "open_clip_model.safetensors"))
    assert all(torch.equal(model2.state_dict()[k], mixed[k]) for k in mixed)
    img = preprocess(Image.new("RGB", (40, 40), (200, 30, 30))).unsqueeze(0)
    tok = open_clip.get_tokenizer(f"local-dir:{out / 'export'}")(["a red square"])
    with torch.no_grad():
        assert model.encode_image(img).shape == model.encode_text(tok).shape


def test_config_errors(tuned, tmp_path):
    def cfg(*o):
        return compose_train([*o, "device=cpu", "workers=0", f"out={tmp_path}"], run_dir=tmp_path, config_name="wiseft")

    with pytest.raises(ValueError, match="set run="):
        run(cfg(f"sets={tuned['domain']}"))
    with pytest.raises(ValueError, match="at least one domain set"):
        run(cfg(f"run={tuned['run']}"))
    with pytest.raises(ValueError, match=r"\['x'\] are used in both"):
        run(cfg(f"run={tuned['run']}", f"sets={{x:{tuned['domain']}}}", f"reference={{x:{tuned['general']}}}"))
    with pytest.raises(ValueError, match=r"alphas=\[1.5\]"):
        run(cfg(f"run={tuned['run']}", f"sets={tuned['domain']}", "alphas=[1.5]"))
    with pytest.raises(FileNotFoundError, match="pass start="):
        run(cfg(f"run={tuned['run'] / 'export'}", f"sets={tuned['domain']}"))
