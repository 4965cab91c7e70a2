"""Every torch file cliptune reads is loaded with weights_only=True: a checkpoint whose pickle would
run code is refused (no side effect, the error names the file) by `cliptune-eval load=<run>`,
`cliptune-wiseft run=<run>` and `cliptune-compare`; real cliptune checkpoints still load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cliptune.eval.wiseft import start_model
from cliptune.models import load_model
from cliptune.rundir import load_per_query, load_torch_file
from conftest import compose_train
from test_eval_cli import train_run


class OpenOnLoad:
    """Unpickling this calls open(path, "w"): the file appears iff the pickle ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class ShellOnLoad:
    """Unpickling this runs a shell command that creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def _spec() -> dict:
    return {"name": "t-safe", "pretrained": "openai", "arch": None}


def evil_run(root: Path, payload: type) -> tuple[Path, Path, Path]:
    """A run dir whose checkpoints/last.ckpt looks like a cliptune checkpoint plus a payload."""
    marker = root / "marker"
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "hyper_parameters": {"model_spec": _spec()},
                "callbacks": {"x": payload(marker)}}, ckpt)
    return root / "run", ckpt, marker


def test_payload_really_runs_code_without_weights_only(tmp_path):
    """Guards the tests below: the payload does create its marker when loaded unrestricted."""
    _, ckpt, marker = evil_run(tmp_path, OpenOnLoad)
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("payload", [OpenOnLoad, ShellOnLoad])
def test_refused_by_every_loader(tmp_path, payload):
    run_dir, ckpt, marker = evil_run(tmp_path, payload)
    loaders = {
        "load_torch_file": lambda: load_torch_file(ckpt),
        "load_model(run dir)": lambda: load_model(run_dir),
        "load_model(.ckpt)": lambda: load_model(ckpt),
        "wiseft start_model": lambda: start_model(run_dir),
    }
    for what, fn in loaders.items():
        with pytest.raises(ValueError) as e:
            fn()
        msg = str(e.value)
        assert msg.startswith(f"{ckpt}: refused to load"), (what, msg)
        assert "weights_only=True" in msg and "never runs code" in msg, what
        assert not marker.exists(), what
    fn = open if payload is OpenOnLoad else os.system
    assert f"(it references {fn.__module__}.{fn.__name__})" in msg, msg  # io.open / posix.system


def test_refused_by_the_cli_entry_points(tmp_path):
    from cliptune.eval.runner import run as eval_run
    from cliptune.eval.wiseft import run as wiseft_run

    run_dir, ckpt, marker = evil_run(tmp_path, OpenOnLoad)
    shards = tmp_path / "no-shards-needed"  # the model is loaded before any set is read
    cfg = compose_train(["workers=0", "device=cpu", f"load={run_dir}", f"+sets.domain={shards}",
                         f"out={tmp_path / 'ev'}"], run_dir=tmp_path / "ev", config_name="eval")
    with pytest.raises(ValueError, match=f"{ckpt}: refused to load"):
        eval_run(cfg)
    cfg = compose_train(["workers=0", "device=cpu", f"run={run_dir}", f"sets={{domain:{shards}}}",
                         f"out={tmp_path / 'wf'}"], run_dir=tmp_path / "wf", config_name="wiseft")
    with pytest.raises(ValueError, match=f"{ckpt}: refused to load"):
        wiseft_run(cfg)
    assert not marker.exists()


def test_per_query_file_with_payload_is_refused(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "per_query.pt"
    torch.save({"domain": {"t2i_R@1": torch.ones(3, dtype=torch.bool), "x": OpenOnLoad(marker)}}, path)
    with pytest.raises(ValueError, match=f"{path}: refused to load"):
        load_per_query(path)
    assert not marker.exists()


def test_real_cliptune_checkpoints_still_load(tmp_path):
    """A checkpoint written by cliptune-train (LoRA: the lora hyperparameters travel too) loads
    with weights_only=True and rebuilds the exported model exactly."""
    run_dir = train_run(tmp_path, "lora", "lora=default", "eval.before=false", "export_start=false")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    raw = load_torch_file(ckpt)
    assert raw["hyper_parameters"]["lora"]["r"] == 8 and raw["global_step"] == 6
    assert raw["optimizer_states"] and raw["callbacks"]  # the full Lightning state, not only weights
    from_ckpt = load_model(ckpt).model.state_dict()
    exported = load_model(run_dir / "export").model.state_dict()
    assert set(from_ckpt) == set(exported)
    for k, v in exported.items():
        torch.testing.assert_close(from_ckpt[k], v, rtol=0, atol=0, msg=k)
