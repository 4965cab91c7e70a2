"""Files from outside are data, never instructions: a hostile-file corpus loaded through every entry point.

Each hostile kind builds a folder (an export, a run directory, a checkpoint-only run directory, a run's
result files) that tries to run code shipped with it (a tokenizer or model config asking for remote code,
with a ``.py`` beside it that writes a marker file when imported), to make cliptune load something else
than the folder (a checkpoint whose hyperparameters name another directory, a Hub repo, a cache folder),
or that is cut short. Every entry point that takes such a folder must refuse it in one line naming the
file (and the key), and the marker must never appear.

The matrix is ``ENTRY_POINTS`` x ``KINDS`` wherever the entry point takes the kind's shape of folder: a new
entry point is covered by adding one line to ``ENTRY_POINTS``, a new hostile file by one line to ``KINDS``.
Entry points are called in process (the library function their CLI calls); ``test_cli_refuses`` runs one real
CLI subprocess per kind.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers

from cliptune.models import build_model, export_model, load_model
from cliptune.text_tower import build_text_tower_folder
from conftest import TINY_ARCH, compose_train, subprocess_env
from test_hf_clip import altclip_dir  # noqa: F401 - the tiny AltCLIP folder (a fixture) the AltCLIP kinds export

MARKER = "CODE_RAN"  # written by every payload; its presence means a hostile file ran code

TOKENIZER_PY = '''
import pathlib
pathlib.Path({marker!r}).write_text("imported " + __name__)
from transformers import PreTrainedTokenizerFast


class HostileTokenizerFast(PreTrainedTokenizerFast):
    pass
'''

CONFIG_PY = '''
import pathlib
pathlib.Path({marker!r}).write_text("imported " + __name__)
from transformers import XLMRobertaConfig, XLMRobertaModel


class HostileConfig(XLMRobertaConfig):
    model_type = "xlm-roberta"


class HostileModel(XLMRobertaModel):
    config_class = HostileConfig
'''


class ShellOnLoad:
    """Unpickling this runs a shell command that creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.system, (f"touch '{self.path}'",))


# ---------------------------------------------------------------------------------------------- base models
def _tower_arch(folder: Path) -> dict:
    """A tiny CLIP whose text tower is a Hugging Face XLM-R built on the spot (config + tokenizer, no weights)."""
    return {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder),
                         "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "hf_model_pretrained": False,
                         "context_length": 16}}


@pytest.fixture(scope="module")
def base(tmp_path_factory, altclip_dir) -> dict:  # noqa: F811 - the fixture imported above
    """Benign originals the hostile kinds are made from: an export with a Hugging Face text tower (config.json,
    tokenizer files), a plain tiny CLIP (its bundle and an export of it), the tower folder itself and an
    export of a tiny AltCLIP (a transformers folder, ``cliptune.hf_clip``)."""
    root = tmp_path_factory.mktemp("base")
    alt = build_model(str(altclip_dir), pretrained=True, context_length=24)
    export_model(alt.model, alt.model_cfg, alt.preprocess_cfg, root / "altclip_export", tokenizer=alt.tokenizer)
    tower = build_text_tower_folder(root / "tower", ["a red cat", "a blue dog", "two birds", "一只猫"] * 8,
                                    vocab_size=60, layers=1, hidden=32, heads=2, context_length=16)
    transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(tower)).save_pretrained(tower)
    hf = build_model("t-hostile-hf", arch=_tower_arch(tower))
    export_model(hf.model, hf.model_cfg, hf.preprocess_cfg, root / "hf_export", tokenizer=hf.tokenizer)
    plain = build_model("t-hostile-plain", arch=copy.deepcopy(TINY_ARCH))
    export_model(plain.model, plain.model_cfg, plain.preprocess_cfg, root / "plain_export", tokenizer=plain.tokenizer)
    return {"root": root, "tower": tower, "hf_export": root / "hf_export", "plain": plain,
            "plain_export": root / "plain_export", "altclip_export": root / "altclip_export"}


# ---------------------------------------------------------------------------------------------- hostile kinds
@dataclass
class Hostile:
    """What a kind built: the folder to load, its shape, the file the refusal must name and a key it must name."""

    target: Path
    shape: str  # export | run (hf_: a transformers export) | ckpt_run | start_run | results_run | shards
    file: Path
    key: str


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _hostile_export(base: dict, where: Path, original: str = "hf_export") -> Path:
    out = where / "export"
    shutil.copytree(base[original], out)
    return out


def _tokenizer_trust_remote_code(base: dict, where: Path, marker: Path) -> tuple[Path, Path, str]:
    """open_clip_config.json asks for remote code (tokenizer_kwargs) and the tokenizer's auto_map names a .py."""
    out = _hostile_export(base, where)
    _edit_json(out / "open_clip_config.json",
               lambda d: d["model_cfg"]["text_cfg"].update(tokenizer_kwargs={"trust_remote_code": True},
                                                           hf_tokenizer_name="."))
    _edit_json(out / "tokenizer_config.json",
               lambda d: d.update(auto_map={"AutoTokenizer": [None, "hostile_tok.HostileTokenizerFast"]}))
    (out / "hostile_tok.py").write_text(TOKENIZER_PY.format(marker=str(marker)))
    return out, out / "open_clip_config.json", "trust_remote_code"


def _tokenizer_auto_map(base: dict, where: Path, marker: Path) -> tuple[Path, Path, str]:
    """Only the tokenizer's own files ask for it: tokenizer_config.json auto_map and trust_remote_code."""
    out = _hostile_export(base, where)
    _edit_json(out / "tokenizer_config.json",
               lambda d: d.update(auto_map={"AutoTokenizer": [None, "hostile_tok.HostileTokenizerFast"]},
                                  trust_remote_code=True))
    (out / "hostile_tok.py").write_text(TOKENIZER_PY.format(marker=str(marker)))
    return out, out / "tokenizer_config.json", "auto_map"


def _config_auto_map(base: dict, where: Path, marker: Path) -> tuple[Path, Path, str]:
    """The text tower's config.json names model classes in a .py beside it."""
    out = _hostile_export(base, where)
    _edit_json(out / "config.json", lambda d: d.update(
        auto_map={"AutoConfig": "hostile_cfg.HostileConfig", "AutoModel": "hostile_cfg.HostileModel"}))
    (out / "hostile_cfg.py").write_text(CONFIG_PY.format(marker=str(marker)))
    return out, out / "config.json", "auto_map"


def _tokenizer_kwarg_outside_allow_list(base: dict, where: Path, marker: Path) -> tuple[Path, Path, str]:
    """A tokenizer kwarg that is no tokenizer setting (it would reach AutoTokenizer.from_pretrained)."""
    out = _hostile_export(base, where)
    _edit_json(out / "open_clip_config.json",
               lambda d: d["model_cfg"]["text_cfg"].update(tokenizer_kwargs={"cache_dir": str(where / "elsewhere")}))
    return out, out / "open_clip_config.json", "tokenizer_kwargs.cache_dir"


def _truncated_safetensors(base: dict, where: Path, marker: Path) -> tuple[Path, Path, str]:
    out = _hostile_export(base, where)
    weights = out / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return out, weights, "truncated"


def _altclip_tokenizer_auto_map(base: dict, where: Path, marker: Path) -> tuple[Path, Path, str]:
    """An AltCLIP export (a transformers folder) whose tokenizer asks for its own code."""
    out = _hostile_export(base, where, "altclip_export")
    _edit_json(out / "tokenizer_config.json",
               lambda d: d.update(auto_map={"AutoTokenizer": [None, "hostile_tok.HostileTokenizerFast"]}))
    (out / "hostile_tok.py").write_text(TOKENIZER_PY.format(marker=str(marker)))
    return out, out / "tokenizer_config.json", "auto_map"


def _altclip_marker_key(base: dict, where: Path, marker: Path) -> tuple[Path, Path, str]:
    """cliptune_model.json with a key cliptune never writes."""
    out = _hostile_export(base, where, "altclip_export")
    _edit_json(out / "cliptune_model.json", lambda d: d.update(cache_dir=str(where)))
    return out, out / "cliptune_model.json", "cache_dir"


def _altclip_truncated(base: dict, where: Path, marker: Path) -> tuple[Path, Path, str]:
    out = _hostile_export(base, where, "altclip_export")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return out, weights, "truncated"


def _export_kind(make: Callable, shapes: tuple[str, str] = ("export", "run")) -> Callable:
    """An export kind, placed as the export itself or as a run directory's export/ (with a checkpoint beside)."""

    def build(base: dict, root: Path, marker: Path, shape: str) -> Hostile:
        if shape == shapes[0]:
            target, file, key = make(base, root, marker)
            return Hostile(target, shape, file, key)
        run = root / "run"
        _, file, key = make(base, run, marker)
        _save_ckpt(run / "checkpoints" / "last.ckpt", base["plain"], base["plain"].spec)
        return Hostile(run, shape, file, key)

    build.shapes = shapes
    return build


def _save_ckpt(path: Path, bundle, spec: dict, extra: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v for k, v in bundle.model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model_spec": spec, "lora": None}, **(extra or {})}, path)
    return path


def _ckpt_kind(edit: Callable[[dict, dict, Path], str], shape: str = "ckpt_run") -> Callable:
    """A run directory holding only checkpoints/last.ckpt (``start_run``: with a benign export/ too) whose
    model_spec ``edit`` rewrites; ``edit`` returns the key the refusal must name."""

    def build(base: dict, root: Path, marker: Path, shape_: str) -> Hostile:
        spec = copy.deepcopy(base["plain"].spec)
        key = edit(spec, base, root)
        ckpt = _save_ckpt(root / "run" / "checkpoints" / "last.ckpt", base["plain"], spec)
        if shape == "start_run":
            shutil.copytree(base["plain_export"], root / "run" / "export")
        return Hostile(root / "run", shape, ckpt, key)

    build.shapes = (shape,)
    return build


def _name_local_dir(spec: dict, base: dict, root: Path) -> str:
    spec.update(name=f"local-dir:{base['plain_export']}", arch=None)  # the same architecture: it would load
    return "model_spec.name"


def _name_hf_hub(spec: dict, base: dict, root: Path) -> str:
    spec.update(name="hf-hub:someone/not-this-run", arch=None)
    return "model_spec.name"


def _name_folder(spec: dict, base: dict, root: Path) -> str:
    spec.update(name=str(base["plain_export"]), arch=None)
    return "model_spec.name"


def _text_from(spec: dict, base: dict, root: Path) -> str:
    spec.update(text_from=str(base["hf_export"]))
    return "model_spec.text_from"


def _cache_dir(spec: dict, base: dict, root: Path) -> str:
    spec.update(cache_dir=str(root / "someone-elses-cache"))
    return "model_spec.cache_dir"


def _arch_hf_model_name(spec: dict, base: dict, root: Path) -> str:
    spec.update(name="t-hostile-arch", arch=_tower_arch(base["tower"]))
    return "model_spec.arch.text_cfg.hf_model_name"


def _unknown_spec_key(spec: dict, base: dict, root: Path) -> str:
    spec["cache_dir_of_someone"] = "/"
    return "model_spec.cache_dir_of_someone"


def _pretrained_file(spec: dict, base: dict, root: Path) -> str:
    """The start model of WiSE-FT, rebuilt from the checkpoint: its weights from a file elsewhere."""
    root.mkdir(parents=True, exist_ok=True)
    elsewhere = root / "elsewhere.pt"
    torch.save(base["plain"].model.state_dict(), elsewhere)
    spec.update(pretrained=str(elsewhere))
    return "model_spec.pretrained"


def _pretrained_tag(spec: dict, base: dict, root: Path) -> str:
    """An open_clip tag: WiSE-FT would download it."""
    spec.update(name="RN50", arch=None, pretrained="openai")
    return "model_spec.pretrained"


def _pickle_bomb(base: dict, root: Path, marker: Path, shape: str) -> Hostile:
    ckpt = _save_ckpt(root / "run" / "checkpoints" / "last.ckpt", base["plain"], base["plain"].spec,
                      extra={"callbacks": {"x": ShellOnLoad(marker)}})
    return Hostile(root / "run", "ckpt_run", ckpt, "refused to load")


_pickle_bomb.shapes = ("ckpt_run",)


def _truncated_ckpt(base: dict, root: Path, marker: Path, shape: str) -> Hostile:
    ckpt = _save_ckpt(root / "run" / "checkpoints" / "last.ckpt", base["plain"], base["plain"].spec)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    return Hostile(root / "run", "ckpt_run", ckpt, "truncated")


_truncated_ckpt.shapes = ("ckpt_run",)


def _results_run(base: dict, root: Path, per_query: Callable[[Path], None], key: str) -> Hostile:
    run = root / "run"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"after": {"domain": {"t2i_R@1": 0.5}}, "per_query": "per_query.pt"}))
    per_query(run / "per_query.pt")
    return Hostile(run, "results_run", run / "per_query.pt", key)


def _per_query_bomb(base: dict, root: Path, marker: Path, shape: str) -> Hostile:
    return _results_run(base, root, lambda p: torch.save(
        {"domain": {"t2i_R@1": torch.ones(4, dtype=torch.bool), "x": ShellOnLoad(marker)}}, p), "refused to load")


def _per_query_truncated(base: dict, root: Path, marker: Path, shape: str) -> Hostile:
    def write(p: Path) -> None:
        torch.save({"domain": {"t2i_R@1": torch.ones(400, dtype=torch.bool)}}, p)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    return _results_run(base, root, write, "truncated")


_per_query_bomb.shapes = _per_query_truncated.shapes = ("results_run",)


def _shard_index(names: list[str], key: str) -> Callable:
    """A shard folder whose ``val.json`` index lists ``names`` (besides one real shard)."""

    def build(base: dict, root: Path, marker: Path, shape: str) -> Hostile:
        folder = root / "shards"
        folder.mkdir(parents=True)
        index = {"shards": [{"name": n.format(marker=marker, root=root), "num_samples": 4} for n in names]}
        (folder / "val.json").write_text(json.dumps(index))
        return Hostile(folder, "shards", folder / "val.json", key)

    build.shapes = ("shards",)
    return build

KINDS: dict[str, Callable] = {
    "tokenizer_trust_remote_code": _export_kind(_tokenizer_trust_remote_code),
    "tokenizer_auto_map": _export_kind(_tokenizer_auto_map),
    "config_auto_map": _export_kind(_config_auto_map),
    "tokenizer_kwarg_outside_allow_list": _export_kind(_tokenizer_kwarg_outside_allow_list),
    "truncated_safetensors": _export_kind(_truncated_safetensors),
    "altclip_tokenizer_auto_map": _export_kind(_altclip_tokenizer_auto_map, ("hf_export", "hf_run")),
    "altclip_marker_key": _export_kind(_altclip_marker_key, ("hf_export", "hf_run")),
    "altclip_truncated_safetensors": _export_kind(_altclip_truncated, ("hf_export", "hf_run")),
    "ckpt_name_local_dir": _ckpt_kind(_name_local_dir),
    "ckpt_name_hf_hub": _ckpt_kind(_name_hf_hub),
    "ckpt_name_folder": _ckpt_kind(_name_folder),
    "ckpt_text_from": _ckpt_kind(_text_from),
    "ckpt_cache_dir": _ckpt_kind(_cache_dir),
    "ckpt_arch_hf_model_name": _ckpt_kind(_arch_hf_model_name),
    "ckpt_unknown_spec_key": _ckpt_kind(_unknown_spec_key),
    "ckpt_start_pretrained_file": _ckpt_kind(_pretrained_file, shape="start_run"),
    "ckpt_start_pretrained_tag": _ckpt_kind(_pretrained_tag, shape="start_run"),
    "pickle_bomb_ckpt": _pickle_bomb,
    "truncated_ckpt": _truncated_ckpt,
    "pickle_bomb_per_query": _per_query_bomb,
    "truncated_per_query": _per_query_truncated,
    "index_pipe": _shard_index(["val-000000.tar", "pipe:touch '{marker}'; cat {root}/x.tar"], "pipe:"),
    "index_elsewhere": _shard_index(["val-000000.tar", "../../elsewhere/val-000001.tar"], "not a file beside"),
    "index_absolute": _shard_index(["/etc/hostname"], "not a file beside"),
}


# ---------------------------------------------------------------------------------------------- entry points
def _eval(target: Path, tmp: Path, base: dict) -> None:
    from cliptune.eval.runner import run

    run(compose_train(["workers=0", "device=cpu", f"load={target}", f"+sets.domain={tmp / 'no-shards-needed'}",
                       f"out={tmp / 'ev'}"], run_dir=tmp / "ev", config_name="eval"))


def _eval_sets(target: Path, tmp: Path, base: dict) -> None:
    from cliptune.eval.runner import run

    run(compose_train(["workers=0", "device=cpu", f"load={base['plain_export']}", f"+sets.domain={target}",
                       f"out={tmp / 'ev'}"], run_dir=tmp / "ev", config_name="eval"))


def _read_shards(target: Path, tmp: Path, base: dict) -> None:
    """What every loader (cliptune-train data.train / data.val, cliptune-eval, cliptune-wiseft sets) resolves first."""
    from cliptune.data.specs import resolve_sources

    resolve_sources(str(target), "val")


def _wiseft(target: Path, tmp: Path, base: dict) -> None:
    from cliptune.eval.wiseft import run

    run(compose_train(["workers=0", "device=cpu", f"run={target}", f"sets={{domain:{tmp / 'no-shards-needed'}}}",
                       f"out={tmp / 'wf'}"], run_dir=tmp / "wf", config_name="wiseft"))


def _distill(target: Path, tmp: Path, base: dict) -> None:
    from cliptune.train.distill import run

    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"en": f"a thing {i}", "zh": f"东西 {i}"}) + "\n" for i in range(20)))
    run(compose_train([f"teacher.load={target}", f"data.train=[{pairs}]", f"out_root={tmp}", "name=distill",
                       "trainer.max_steps=1"], run_dir=tmp / "distill", config_name="distill"))


def _train_text_from(target: Path, tmp: Path, base: dict | None = None) -> None:
    """What cliptune-train model.text_from=<target> builds (its config's model: instantiated as build_model)."""
    build_model("t-hostile-student-host", arch=copy.deepcopy(TINY_ARCH), text_from=str(target))


def _compare(target: Path, tmp: Path, base: dict) -> None:
    from cliptune.eval.compare_report import compare_runs

    compare_runs([str(target)], str(tmp / "cmp"), n_boot=10)


# entry point -> (the library call its CLI makes, the shapes of folder it takes)
ENTRY_POINTS: dict[str, tuple[Callable[[Path, Path, dict], None], tuple[str, ...]]] = {
    "load_model": (lambda target, tmp, base: load_model(target), ("export", "run", "hf_export", "hf_run", "ckpt_run")),
    "cliptune-eval load=": (_eval, ("export", "run", "hf_export", "hf_run", "ckpt_run")),
    "cliptune-wiseft run=": (_wiseft, ("run", "hf_run", "ckpt_run", "start_run")),
    "cliptune-distill teacher.load=": (_distill, ("export", "run", "hf_export", "hf_run", "ckpt_run")),
    "cliptune-train model.text_from=": (_train_text_from, ("export", "run")),
    "cliptune-compare": (_compare, ("results_run",)),
    "cliptune-eval sets=": (_eval_sets, ("shards",)),
    "resolve_sources": (_read_shards, ("shards",)),
}

def _cases() -> list:
    """Every (entry point, kind, folder shape) that applies. The default suite runs a covering set, each
    kind through one entry point and each entry point with one kind (and each shape once); the rest are
    marked ``exhaustive`` (``make test-all``)."""
    triples = [(entry, kind, shape) for entry, (_, takes) in ENTRY_POINTS.items() for kind, make in KINDS.items()
               for shape in make.shapes if shape in takes]
    seen: set = set()
    cases = []
    for entry, kind, shape in triples:
        new = {("kind", kind), ("entry", entry), ("shape", shape)} - seen
        seen |= new
        marks = () if new else (pytest.mark.exhaustive,)
        cases.append(pytest.param(entry, kind, shape, id=f"{entry}|{kind}|{shape}", marks=marks))
    return cases


CASES = _cases()


def _check_refusal(msg: str, hostile: Hostile, marker: Path) -> None:
    assert not marker.exists(), f"code shipped in a file ran: {marker.read_text()}"
    assert "\n" not in msg.strip(), f"not one line: {msg!r}"
    assert str(hostile.file) in msg, f"the file {hostile.file} is not named: {msg!r}"
    assert hostile.key in msg, f"{hostile.key!r} is not named: {msg!r}"
    assert "weights_only=False" not in msg


@pytest.mark.parametrize("entry, kind, shape", CASES)
def test_entry_point_refuses_hostile_file(base, tmp_path, entry, kind, shape):
    marker = tmp_path / MARKER
    hostile = KINDS[kind](base, tmp_path / "hostile", marker, shape)
    call, _ = ENTRY_POINTS[entry]
    with pytest.raises((ValueError, OSError, RuntimeError)) as e:
        call(hostile.target, tmp_path, base)
    _check_refusal(str(e.value), hostile, marker)


def _cli(name: str) -> str:
    """The installed console script ``name`` (as a user runs it), beside this interpreter."""
    return str(Path(sys.executable).parent / name)


def _cli_cmd(kind: str, target: Path, tmp: Path, base: dict) -> list[str]:
    shape = KINDS[kind].shapes[0]
    if shape == "shards":
        return [_cli("cliptune-eval"), f"load={base['plain_export']}", "device=cpu", "workers=0",
                f"+sets.domain={target}", f"out={tmp / 'ev'}"]
    if shape == "results_run":
        return [_cli("cliptune-compare"), str(target), "--out", str(tmp / "cmp"), "--n-boot", "10"]
    if shape == "start_run":
        return [_cli("cliptune-wiseft"), f"run={target}", "device=cpu", "workers=0",
                f"sets={{domain:{tmp / 'none'}}}", f"hydra.run.dir={tmp / 'wf'}"]
    return [_cli("cliptune-eval"), f"load={target}", "device=cpu", "workers=0", f"+sets.domain={tmp / 'none'}",
            f"out={tmp / 'ev'}"]


def _cli_kinds() -> list:
    """Every kind; the default suite runs the first kind each command takes, the rest are ``exhaustive``."""
    seen: set = set()
    out = []
    for kind, make in KINDS.items():
        command = _cli_cmd_name(make.shapes[0])
        out.append(pytest.param(kind, marks=() if command not in seen else (pytest.mark.exhaustive,)))
        seen.add(command)
    return out


def _cli_cmd_name(shape: str) -> str:
    return {"results_run": "cliptune-compare", "start_run": "cliptune-wiseft"}.get(shape, "cliptune-eval")


@pytest.mark.slow  # one CLI process per kind: about 8 s each, over 3 minutes in all on 2 cores
@pytest.mark.parametrize("kind", _cli_kinds())
def test_cli_refuses(base, tmp_path, kind):
    """One real command per kind (cliptune-eval; cliptune-wiseft or cliptune-compare where only they take it):
    a non-zero exit, the marker absent, the file named on stderr."""
    marker = tmp_path / MARKER
    hostile = KINDS[kind](base, tmp_path / "hostile", marker, KINDS[kind].shapes[0])
    proc = subprocess.run(_cli_cmd(kind, hostile.target, tmp_path, base), capture_output=True, text=True,
                          env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert not marker.exists(), marker.read_text()
    assert str(hostile.file) in proc.stderr and hostile.key in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- the corpus is hostile
def test_payloads_run_code_when_trusted(base, tmp_path, monkeypatch):
    """Guards the tests above: transformers with trust_remote_code=True does import the .py files (so a test
    that saw no marker saw a refusal, not a harmless file). transformers copies them into a modules folder of
    this test's own."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m.split(".")[0] == "transformers_modules"]:
        monkeypatch.delitem(sys.modules, name)
    for make, load in ((_tokenizer_auto_map, transformers.AutoTokenizer), (_config_auto_map, transformers.AutoConfig)):
        marker = tmp_path / f"{make.__name__}-{MARKER}"
        out, _, _ = make(base, tmp_path / make.__name__, marker)
        load.from_pretrained(str(out), trust_remote_code=True)
        assert marker.exists(), make.__name__


def test_benign_originals_load(base, tmp_path):
    """The corpus without its hostile edits loads through the same calls (what the refusals are measured against)."""
    hf = load_model(base["hf_export"])
    assert type(hf.model.text).__name__ == "HFTextEncoder"
    for shape in ("export", "run"):
        target = base["hf_export"] if shape == "export" else tmp_path / "run"
        if shape == "run":
            shutil.copytree(base["hf_export"], target / "export")
        _train_text_from(target, tmp_path)
    run = tmp_path / "ckpt_run"
    _save_ckpt(run / "checkpoints" / "last.ckpt", base["plain"], base["plain"].spec)
    got = load_model(run).model.state_dict()
    for k, v in base["plain"].model.state_dict().items():
        assert torch.equal(got[k], v), k


def test_a_source_the_user_allows_or_inside_the_run_loads(base, tmp_path):
    """The refusal is of what the checkpoint chooses, not of the model: the same checkpoint loads with its own
    weights once the user names the outside source (``allow=``), and a source inside the run directory needs
    no permission."""
    outside = f"local-dir:{base['plain_export']}"
    spec = {**copy.deepcopy(base["plain"].spec), "name": outside, "arch": None}
    ckpt = _save_ckpt(tmp_path / "a" / "checkpoints" / "last.ckpt", base["plain"], spec)
    with pytest.raises(ValueError, match="model_spec.name"):
        load_model(ckpt)
    got = load_model(ckpt, allow=[outside]).model.state_dict()
    inside = tmp_path / "b" / "base_export"
    shutil.copytree(base["plain_export"], inside)
    spec = {**copy.deepcopy(base["plain"].spec), "name": f"local-dir:{inside}", "arch": None}
    ckpt = _save_ckpt(tmp_path / "b" / "checkpoints" / "last.ckpt", base["plain"], spec)
    got_inside = load_model(ckpt).model.state_dict()
    for k, v in base["plain"].model.state_dict().items():
        assert torch.equal(got[k], v) and torch.equal(got_inside[k], v), k


def test_a_hub_config_passes_the_same_checks(base, tmp_path, monkeypatch):
    """``hf-hub:`` models: the downloaded open_clip_config.json is checked as an export's before open_clip reads
    it (the download is replaced by a hostile local copy)."""
    import open_clip.pretrained

    marker = tmp_path / MARKER
    out, file, key = _tokenizer_trust_remote_code(base, tmp_path / "hub", marker)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf",
                        lambda model_id, filename="open_clip_pytorch_model.bin", **_: str(out / filename))
    with pytest.raises(ValueError) as e:
        build_model("hf-hub:someone/hostile")
    _check_refusal(str(e.value), Hostile(out, "export", file, key), marker)
