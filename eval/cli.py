"""``cliptune-eval``: Recall@K (and zero-shot accuracy) of any model on retrieval sets.

    cliptune-eval model=runs/demo sets.val=demo_data                       # a cliptune run
    cliptune-eval model=ViT-B-32 pretrained=openai sets.domain='val-{000000..000003}.tar' caption_lang=[en,zh]
    cliptune-eval embeddings.images=img.parquet embeddings.texts=txt.parquet   # an external embedder's vectors
    torchrun --nproc_per_node 8 -m cliptune.eval.cli model=... sets.x=...       # exact across ranks

Writes ``results.json`` (and ``per_query.pt`` for paired bootstrap in ``cliptune-compare``) to the
output folder and prints a table. ``run(cfg)`` does the work; ``main`` wraps it for Hydra.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cliptune.eval.embed import EmbeddingCollector, embed_loader, evaluate_collected, zeroshot_from_collected
from cliptune.eval.retrieval import chance_recall, retrieval_metrics
from cliptune.log import get_logger, rank_zero_print
from cliptune.train.cli import CONFIG_DIR

log = get_logger(__name__)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _init_distributed(device: torch.device) -> None:
    """Join the process group a launcher (torchrun, srun) describes in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)


def evaluate_sets(bundle, sets: dict[str, Any], caption_langs: list[str], batch_size: int = 128,
                  workers: int = 2, device: str | torch.device = "cpu", ks=(1, 5, 10),
                  zeroshot_templates: list[str] | None = None, autocast_dtype: torch.dtype | None = None) -> dict:
    """Embed and score each set (one entry per set and caption language). Exact across ranks."""
    from cliptune.data.wds import make_eval_loader, resolve_sources

    device = torch.device(device)
    model = bundle.model.to(device).eval()
    enc = lambda texts: model.encode_text(bundle.tokenizer(texts).to(device), normalize=True).float()  # noqa: E731
    out: dict[str, dict] = {}
    for name, spec in sets.items():
        try:
            total = sum(s.num_samples or 0 for s in resolve_sources(spec, ("val", "test", "validation"), what=f"sets.{name}")) or None
        except Exception:
            total = None
        for lang in caption_langs:
            key = name if len(caption_langs) == 1 else f"{name}:{lang}"
            loader = make_eval_loader(spec, batch_size, workers, bundle.tokenizer, bundle.preprocess_val,
                                      caption_lang=lang, name=f"sets.{name}")
            col = embed_loader(model, loader, device, desc=f"{key}", total=total, autocast_dtype=autocast_dtype)
            res = evaluate_collected(col, ks=tuple(ks))
            data = col.gather()
            if data["keys"] and data["txt"].shape[0]:
                res["chance"] = chance_recall(len(data["keys"]), data["owner"], ks)
            if zeroshot_templates and data["keys"]:
                zs = zeroshot_from_collected(data, enc, zeroshot_templates)
                if zs:
                    res["metrics"].update(zs["metrics"])
                    res["per_query"] = {**(res.get("per_query") or {}), **zs["per_query"]}
                    res["n_classes"] = zs["n_classes"]
            out[key] = res
    return out


def _read_table(path: str, what: str) -> tuple[np.ndarray, list[str] | None, dict[str, list]]:
    """Embeddings from .npy ([N, D]) or .parquet (an ``embedding`` list column plus id columns)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"embeddings.{what}: no file at '{path}'")
    if p.suffix == ".npy":
        return np.load(p), None, {}
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(p).to_pydict()
        if "embedding" not in t:
            raise ValueError(f"embeddings.{what} '{path}': needs an 'embedding' column (list of floats); has {list(t)}")
        return np.asarray(t.pop("embedding"), dtype=np.float32), None, t
    raise ValueError(f"embeddings.{what} '{path}': use .npy or .parquet")


def evaluate_embeddings(images: str, texts: str, text_to_image: str | None = None, ks=(1, 5, 10)) -> dict:
    """Score precomputed embeddings: npy (+ ``text_to_image`` npy of image indices) or parquet with
    ``id`` (images) and ``image_id`` (texts) columns."""
    img, _, img_cols = _read_table(images, "images")
    txt, _, txt_cols = _read_table(texts, "texts")
    if text_to_image is not None:
        owner = np.load(text_to_image).astype(np.int64)
    elif "image_id" in txt_cols and "id" in img_cols:
        index = {str(k): i for i, k in enumerate(img_cols["id"])}
        missing = [k for k in txt_cols["image_id"] if str(k) not in index]
        if missing:
            raise ValueError(f"embeddings.texts: {len(missing)} captions name image ids absent from embeddings.images, e.g. {missing[:3]}")
        owner = np.asarray([index[str(k)] for k in txt_cols["image_id"]], dtype=np.int64)
    elif len(img) == len(txt):
        owner = np.arange(len(img))
    else:
        raise ValueError("embeddings: give embeddings.text_to_image (npy of image indices) or parquet files with "
                         "'id' (images) and 'image_id' (texts) columns")
    i, t, o = torch.from_numpy(img).float(), torch.from_numpy(txt).float(), torch.from_numpy(owner)
    metrics, hits = retrieval_metrics(i, t, o, ks=ks, return_per_query=True)
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "per_query": hits,
            "chance": chance_recall(len(i), o, ks), "n_images": len(i), "n_texts": len(t)}


def results_table(results: dict, title: str = "Retrieval"):
    from rich.table import Table

    table = Table(title=title)
    cols = ["t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "mean_R", "zs_top1"]
    present = [c for c in cols if any(c in r.get("metrics", {}) for r in results.values())]
    table.add_column("set")
    table.add_column("images", justify="right")
    for c in present:
        table.add_column(c, justify="right")
    for name, r in results.items():
        m, ch = r.get("metrics", {}), r.get("chance", {})
        cells = []
        for c in present:
            v = m.get(c)
            cells.append("-" if v is None else (f"{v:.3f}" + (f" ({ch[c]:.3f})" if c in ch else "")))
        table.add_row(name, str(r.get("n_images", "")), *cells)
    table.caption = "in brackets: chance level (a random ranking)"
    return table


def run(cfg: DictConfig) -> dict:
    """Evaluate as configured; returns the results written to ``results.json``."""
    from cliptune.log import rank

    out_dir = Path(cfg.out)
    ks = tuple(cfg.ks)
    results: dict[str, dict] = {}
    emb = cfg.get("embeddings") or {}
    if emb.get("images") or emb.get("texts"):
        if not (emb.get("images") and emb.get("texts")):
            raise ValueError("embeddings: set both embeddings.images and embeddings.texts")
        results["embeddings"] = evaluate_embeddings(emb.images, emb.texts, emb.get("text_to_image"), ks)
        source = {"embeddings": OmegaConf.to_container(emb)}
    else:
        if not cfg.get("model"):
            raise ValueError("set model=<open_clip name | local-dir:<export> | run dir | .ckpt> (or embeddings.images/texts)")
        if not cfg.get("sets"):
            raise ValueError("set at least one evaluation set: sets.<name>=<shard spec or shard folder>")
        from cliptune.train.models import load_model

        device = _device(cfg.device)
        _init_distributed(device)
        bundle = load_model(cfg.model, pretrained=cfg.get("pretrained"), device=device)
        amp = torch.bfloat16 if (cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")) else None
        langs = list(cfg.caption_lang) if not isinstance(cfg.caption_lang, str) else [cfg.caption_lang]
        zs = list(cfg.zeroshot.templates) if cfg.zeroshot.enabled else None
        results = evaluate_sets(bundle, OmegaConf.to_container(cfg.sets, resolve=True), langs, cfg.batch_size,
                                cfg.workers, device, ks, zs, amp)
        source = {"model": str(cfg.model), "pretrained": cfg.get("pretrained")}
    if rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        per_query = {n: {"keys": r.get("keys"), **(r.get("per_query") or {})} for n, r in results.items() if r.get("per_query")}
        if per_query:
            torch.save(per_query, out_dir / "per_query.pt")
        clean = {n: {k: v for k, v in r.items() if k not in ("per_query", "keys")} for n, r in results.items()}
        doc = {**source, "sets": clean, "per_query": "per_query.pt" if per_query else None}
        (out_dir / "results.json").write_text(json.dumps(doc, indent=2))
        rank_zero_print(results_table(clean))
        log.info("results written to %s", out_dir / "results.json")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
