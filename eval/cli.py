"""``cliptune-eval``: Recall@K (and zero-shot accuracy) of any model on retrieval sets.

    cliptune-eval load=runs/demo sets=demo_data device=cpu out=eval/demo       # a cliptune run, on CPU
    cliptune-eval load=ViT-B-32 pretrained=openai '+sets.domain="val-{000000..000003}.tar"' 'caption_lang=[en,zh]'
    cliptune-eval embeddings.images=img.parquet embeddings.texts=txt.parquet     # an external embedder's vectors
    torchrun --nproc_per_node 8 -m cliptune.eval.cli load=runs/demo sets=demo_data     # same numbers as 1 process

Several sets: ``sets='{domain:shards/val,general:coco_val}'`` or ``+sets.domain=... +sets.general=...``;
one spec alone is named after its folder (``sets=demo_data`` -> ``demo_data``).

``load`` takes anything `cliptune.models.load_model` does: an open_clip name (+ ``pretrained``
tag or file), ``local-dir:<export>``, an export folder, a cliptune run directory or a ``.ckpt``.
(The key is not ``model``: Hydra reads ``model=`` as the training config group of that name.)

Writes ``results.json`` (and ``per_query.pt`` for paired bootstrap in ``cliptune-compare``) to the
output folder and prints a table. ``run(cfg)`` checks the config, calls `cliptune.eval.runner`
and writes the files; ``main`` wraps it for Hydra.
"""

from __future__ import annotations

from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cliptune import runtime
from cliptune.eval.embed import EmptyEvalSetError
from cliptune.eval.runner import evaluate_embeddings, evaluate_sets, named_sets, results_table
from cliptune.eval.zeroshot import DEFAULT_TEMPLATES
from cliptune.log import get_logger, rank_zero_print
from cliptune.models import load_model
from cliptune.rundir import RunDir
from cliptune.validate import validate_eval_config

log = get_logger(__name__)


def run(cfg: DictConfig) -> dict:
    """Evaluate as configured; returns ``{set: result}`` (what ``results.json`` holds, plus per-query hits).

    Rank 0 writes ``<out>/results.json`` and ``<out>/per_query.pt`` (``{set: {"keys": [...],
    "t2i_R@1": bool tensor, ...}}``, the format ``cliptune-compare`` reads) and prints the table.
    """
    validate_eval_config(cfg)  # before anything is loaded or written
    ks = tuple(int(k) for k in cfg.ks)
    emb = cfg.get("embeddings") or {}
    if emb.get("images") or emb.get("texts"):
        if not (emb.get("images") and emb.get("texts")):
            raise ValueError("embeddings: set both embeddings.images and embeddings.texts")
        results = {str(emb.get("name") or "embeddings"): evaluate_embeddings(
            emb.images, emb.texts, emb.get("text_to_image"), ks, column=emb.get("column") or "embedding",
            id_column=emb.get("id_column") or "id", image_id_column=emb.get("image_id_column") or "image_id")}
        source: dict[str, Any] = {"embeddings": OmegaConf.to_container(emb, resolve=True)}
    else:
        spec = cfg.get("load")
        if not spec:
            raise ValueError("set load=<open_clip name | local-dir:<export> | export dir | run dir | .ckpt> "
                             "(or embeddings.images=... embeddings.texts=...)")
        sets = named_sets(cfg.get("sets"))
        if not sets:
            raise ValueError("set at least one evaluation set: sets=<shard folder or spec>, "
                             "sets='{<name>:<spec>,...}' or +sets.<name>=<spec>")
        if cfg.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision={cfg.precision!r}: use auto, bf16 or fp32")

        device = runtime.device(cfg.device)
        own_group = runtime.init_distributed(device)
        bundle = load_model(spec, pretrained=cfg.get("pretrained"), device=device)
        amp = torch.bfloat16 if (cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")) else None
        langs = [cfg.caption_lang] if isinstance(cfg.caption_lang, str) else list(cfg.caption_lang)
        templates = cfg.zeroshot.get("templates")
        zs = list(DEFAULT_TEMPLATES if templates is None else templates) if cfg.zeroshot.enabled else None
        results = evaluate_sets(bundle, sets, langs, cfg.batch_size, cfg.workers, device, ks, zs, amp)
        source = {"model": str(spec), "pretrained": cfg.get("pretrained"), "caption_lang": langs,
                  "world_size": runtime.world_size(launcher=False), "device": str(device), "precision": "bf16" if amp else "fp32"}
        if own_group:
            runtime.teardown_distributed()  # every rank has its results; rank 0 writes them
    if runtime.rank() == 0:
        out = RunDir(cfg.out)
        per_query = {n: {"keys": list(r.get("keys") or []), **r["per_query"]} for n, r in results.items() if r.get("per_query")}
        clean = {n: {k: v for k, v in r.items() if k not in ("per_query", "keys")} for n, r in results.items()}
        doc = {**source, "ks": list(ks), "sets": clean, "per_query": out.write_per_query(per_query) if per_query else None}
        path = out.write_results(doc)
        rank_zero_print(results_table(clean, ks=ks))
        log.info("results written to %s", path)
    empty = {n: r["error"] for n, r in results.items() if r.get("error")}
    if empty:
        raise EmptyEvalSetError(f"{len(empty)} of {len(results)} evaluation set(s) had nothing usable (results.json "
                                "holds the others): " + " | ".join(empty.values()))
    return results


@hydra.main(version_base="1.3", config_path="pkg://cliptune.configs", config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
