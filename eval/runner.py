"""The library side of ``cliptune-eval``: score models on shard sets, or precomputed embeddings.

    from cliptune.eval.runner import evaluate_sets, named_sets, results_table
    from cliptune.models import load_model
    res = evaluate_sets(load_model("runs/demo"), named_sets("demo_data"), ["en"], workers=0)

`evaluate_sets` embeds each set with a model (any number of processes give the same numbers),
`evaluate_embeddings` scores an external embedder's vectors (.npy or .parquet) with the same code,
and `results_table` renders either result. `run` is ``cliptune-eval``'s job: it checks the config, loads the
model, evaluates and writes ``results.json`` / ``per_query.pt`` (``cliptune.eval.cli`` is its thin Hydra entry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from cliptune import runtime
from cliptune.config import to_plain
from cliptune.data.langs import check_set_languages
from cliptune.data.wds import describe_skips, make_eval_loader, resolve_sources
from cliptune.domains import EVAL_PRECISIONS, EVAL_SPLITS
from cliptune.eval.embed import EmptyEvalSetError, embed_loader, evaluate_gathered
from cliptune.eval.retrieval import chance_recall, crosslingual_chance, crosslingual_consistency, retrieval_metrics
from cliptune.eval.zeroshot import DEFAULT_TEMPLATES
from cliptune.log import get_logger, rank_zero_print
from cliptune.models import load_model
from cliptune.rundir import RunDir
from cliptune.validate import validate_eval_config

log = get_logger(__name__)

__all__ = ["evaluate_sets", "named_sets", "evaluate_embeddings", "metrics_table", "results_table",
           "crosslingual_results", "run"]


def evaluate_sets(bundle, sets: dict[str, Any], caption_langs: list[str], batch_size: int = 128,
                  workers: int = 2, device: str | torch.device = "cpu", ks=(1, 5, 10),
                  zeroshot_templates: list[str] | None = None, autocast_dtype: torch.dtype | None = None) -> dict:
    """Embed and score each set, once per caption language (``"<set>:<lang>"`` when several).

    Every rank embeds its share of each set; the embeddings are gathered once per set and scored
    identically on every rank, so the numbers do not depend on the number of processes.
    Returns ``{name: evaluate_gathered(...) output}`` (metrics, chance, per_query, keys, counts).
    With several single languages, each pair of them adds ``"<set>:<a>~<b>"``: their cross-lingual
    consistency (:func:`crosslingual_results`).
    """

    device = torch.device(device)
    model = bundle.model.to(device).eval()

    def enc(texts: list[str]) -> torch.Tensor:
        return model.encode_text(bundle.tokenizer(texts).to(device), normalize=True).float()

    world = runtime.world_size(launcher=False)  # the ranks the loaders split each set over
    out: dict[str, dict] = {}
    for name, spec in sets.items():
        sources = resolve_sources(spec, EVAL_SPLITS, what=f"sets.{name}")  # fails early, naming the set
        check_set_languages(spec, bundle.tokenizer, caption_langs, f"sets.{name}", role="eval")  # warns once
        counts = [s.num_samples for s in sources if s.num_samples is not None]
        total = -(-sum(counts) // world) if counts and len(counts) == len(sources) else None
        gathered: dict[str, dict] = {}
        for lang in caption_langs:
            key = name if len(caption_langs) == 1 else f"{name}:{lang}"
            loader = make_eval_loader(spec, batch_size, workers, bundle.tokenizer, bundle.preprocess_val,
                                      caption_lang=lang, name=f"sets.{name}")
            col = embed_loader(model, loader, device, desc=key, total=total, autocast_dtype=autocast_dtype)
            zs = (enc, list(zeroshot_templates)) if zeroshot_templates else None
            data = col.gather()
            try:
                out[key] = evaluate_gathered(data, ks=tuple(ks), zeroshot=zs, name=f"set {key!r}")
                gathered[lang] = data
            except EmptyEvalSetError as e:  # the other sets are still evaluated; run() fails at the end
                out[key] = {"metrics": {}, "chance": {}, "n_images": 0, "n_texts": 0, "skipped": e.skipped,
                            "n_skipped": sum(e.skipped.values()), "error": str(e)}
        out.update(crosslingual_results(name, gathered))
    return out


def _single_languages(langs) -> list[str]:
    return [lang for lang in langs if lang != "any" and "," not in lang]


def crosslingual_results(name: str, gathered: dict[str, dict]) -> dict[str, dict]:
    """``{"<name>:<a>~<b>": result}`` for each pair of single languages (in order) of ``gathered``
    (``{lang: EmbeddingCollector.gather() output}`` of one set): how often an image's first caption in
    ``a`` and in ``b`` retrieve the same top-1 image (``xling_top1``) and that image is theirs
    (``xling_top1_correct``), over the images with a caption in both, searching every image of the set
    (either language's: `cliptune.eval.retrieval.crosslingual_consistency`). A result has ``metrics``,
    ``chance``, ``n_images`` (with both captions), ``n_texts``, and ``per_query`` / ``keys`` per image.
    A pair without an image captioned in both languages gives no entry."""
    langs = _single_languages(gathered)
    out: dict[str, dict] = {}
    for i, a in enumerate(langs):
        for b in langs[i + 1:]:
            da, db = gathered[a], gathered[b]
            keys = sorted(set(da["keys"]) | set(db["keys"]))
            index = {k: j for j, k in enumerate(keys)}
            img = torch.zeros(len(keys), da["img"].shape[1])
            for d in (db, da):  # an image of both sets: language a's embedding of it
                img[[index[k] for k in d["keys"]]] = d["img"]
            owner = [torch.tensor([index[d["keys"][o]] for o in d["owner"].tolist()], dtype=torch.long)
                     for d in (da, db)]
            if not set(owner[0].tolist()) & set(owner[1].tolist()):
                continue  # no image has a caption in both: nothing to compare
            key = f"{name}:{a}~{b}"
            metrics, per_image = crosslingual_consistency(img, da["txt"], owner[0], db["txt"], owner[1],
                                                          return_per_image=True, name=f"set {key!r}")
            idx = per_image.pop("xling_image_index")
            out[key] = {"metrics": metrics, "chance": crosslingual_chance(len(keys)), "n_images": int(idx.numel()),
                        "n_texts": 2 * int(idx.numel()), "per_query": per_image,
                        "keys": [keys[j] for j in idx.tolist()]}
    return out


def named_sets(value: Any, what: str = "sets") -> dict[str, Any]:
    """``{name: shard spec}`` from a config value: a mapping, or one spec (a string or list) named
    after its folder or file stem (``demo_data`` -> ``demo_data``, ``val-{0..3}.tar`` -> ``val``)."""
    if value is None:
        return {}
    value = to_plain(value)
    if isinstance(value, dict):
        # entries left null (a config's `domain: null` placeholder) are not evaluated, as in training
        return {str(k): v for k, v in value.items() if v not in (None, "", [])}
    if isinstance(value, (str, list, tuple)) and value:
        first = str(value[0] if isinstance(value, (list, tuple)) else value).rstrip("/")
        stem = Path(first).name.split(".")[0].split("-{")[0].split("{")[0] or "val"
        return {stem: value}
    raise ValueError(f"{what}={value!r}: give a shard spec (sets=<folder or tar pattern>) or named sets "
                     f"(sets='{{domain:<spec>,general:<spec>}}' or +{what}.<name>=<spec>)")


# ----------------------------------------------------------------------------- precomputed embeddings
def _read_vectors(path: str, what: str, column: str = "embedding",
                  id_columns: tuple[str, ...] = ()) -> tuple[np.ndarray, dict[str, list]]:
    """[N, D] float32 from ``.npy`` or from a ``.parquet`` list column, plus the requested id columns.

    Every problem names the file, and the column or row at fault.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"embeddings.{what}: no file at '{path}'")
    ids: dict[str, list] = {}
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"embeddings.{what} '{path}': not a plain numeric .npy array ({e})") from e
        if arr.ndim != 2:
            raise ValueError(f"embeddings.{what} '{path}': expected a 2-D [N, D] array, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"embeddings.{what} '{path}': expected numbers, got dtype {arr.dtype}")
    elif p.suffix == ".parquet":
        import pyarrow as pa  # noqa: PLC0415 - parquet embeddings only (pyarrow is a heavy import)
        import pyarrow.parquet as pq  # noqa: PLC0415 - parquet embeddings only (pyarrow is a heavy import)

        try:
            schema = pq.read_schema(p)
        except Exception as e:
            raise ValueError(f"embeddings.{what} '{path}': not a readable parquet file ({e})") from e
        wanted = [column, *id_columns]
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            also = " and " + ", ".join(map(repr, id_columns)) if id_columns else ""
            raise ValueError(f"embeddings.{what} '{path}': no column {missing[0]!r} (has {schema.names}); "
                             f"expected '{column}' (a list of floats per row){also}")
        table = pq.read_table(p, columns=wanted)
        col = table.column(column).combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
                or pa.types.is_fixed_size_list(col.type)):
            raise ValueError(f"embeddings.{what} '{path}': column '{column}' has type {col.type}; "
                             "expected a list of floats per row")
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"embeddings.{what} '{path}': column '{column}' is null in {col.null_count} rows "
                             f"(first: row {row})")
        n = len(col)
        if pa.types.is_fixed_size_list(col.type):
            d = col.type.list_size
        else:
            lengths = np.diff(col.offsets.to_numpy())
            d = int(lengths[0]) if n else 0
            bad = np.flatnonzero(lengths != d)
            if bad.size:
                raise ValueError(f"embeddings.{what} '{path}': column '{column}' row {int(bad[0])} has "
                                 f"{int(lengths[bad[0]])} values but row 0 has {d}; all rows need the same width")
        values = col.flatten()
        if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
            raise ValueError(f"embeddings.{what} '{path}': column '{column}' holds {values.type}, not numbers")
        if values.null_count:
            raise ValueError(f"embeddings.{what} '{path}': column '{column}' has {values.null_count} null values "
                             "inside its lists")
        arr = values.to_numpy(zero_copy_only=False).reshape(n, d)
        ids = {c: table.column(c).to_pylist() for c in id_columns}
    else:
        raise ValueError(f"embeddings.{what} '{path}': unknown format '{p.suffix}'; use .npy or .parquet")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"embeddings.{what} '{path}': empty ({arr.shape[0]} rows of width {arr.shape[1]})")
    arr = arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr).all(1)
    if not finite.all():
        raise ValueError(f"embeddings.{what} '{path}': row {int(np.flatnonzero(~finite)[0])} holds NaN or inf "
                         f"({int((~finite).sum())} rows in all)")
    return arr, ids


def _has_column(path: str, column: str) -> bool:
    if Path(path).suffix != ".parquet" or not Path(path).is_file():
        return False
    import pyarrow.parquet as pq  # noqa: PLC0415 - parquet embeddings only (pyarrow is a heavy import)

    try:
        return column in pq.read_schema(path).names
    except Exception:
        return False


def evaluate_embeddings(images: str, texts: str, text_to_image: str | None = None, ks=(1, 5, 10),
                        column: str = "embedding", id_column: str = "id",
                        image_id_column: str = "image_id") -> dict:
    """Score precomputed embeddings with the same code as model outputs.

    Which image each caption belongs to comes from, in order: ``text_to_image`` (a .npy of image
    row indices, one per text row); the texts parquet's ``image_id_column`` matched against the
    images parquet's ``id_column`` (or, for .npy images, against row indices); else the files
    must have as many rows as each other (row i of texts describes row i of images).
    """
    use_ids = text_to_image is None and _has_column(texts, image_id_column)
    img, img_cols = _read_vectors(images, "images", column, (id_column,) if _has_column(images, id_column) else ())
    txt, txt_cols = _read_vectors(texts, "texts", column, (image_id_column,) if use_ids else ())
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"embedding widths differ: embeddings.images '{images}' has D={img.shape[1]}, "
                         f"embeddings.texts '{texts}' has D={txt.shape[1]}")
    image_ids = [str(k) for k in img_cols[id_column]] if id_column in img_cols else None
    if image_ids is not None and len(set(image_ids)) != len(image_ids):
        seen: set[str] = set()
        dup = []  # each repeat of an id
        for k in image_ids:
            if k in seen:
                dup.append(k)
            seen.add(k)
        raise ValueError(f"embeddings.images '{images}': column '{id_column}' has duplicate ids, e.g. {dup[:3]}")
    if text_to_image is not None:
        t2i_path = Path(text_to_image)
        if not t2i_path.is_file():
            raise FileNotFoundError(f"embeddings.text_to_image: no file at '{text_to_image}'")
        owner = np.load(t2i_path, allow_pickle=False)
        if owner.ndim != 1 or owner.shape[0] != txt.shape[0] or not np.issubdtype(owner.dtype, np.integer):
            raise ValueError(f"embeddings.text_to_image '{text_to_image}': expected {txt.shape[0]} integer image "
                             f"indices (one per row of '{texts}'), got shape {owner.shape} dtype {owner.dtype}")
        bad = np.flatnonzero((owner < 0) | (owner >= img.shape[0]))
        if bad.size:
            raise ValueError(f"embeddings.text_to_image '{text_to_image}': entry {int(bad[0])} = {int(owner[bad[0]])} "
                             f"is not a row of '{images}' (0..{img.shape[0] - 1})")
        owner = owner.astype(np.int64)
    elif use_ids:
        index = {k: i for i, k in enumerate(image_ids if image_ids is not None else map(str, range(img.shape[0])))}
        refs = [str(k) for k in txt_cols[image_id_column]]
        missing = [k for k in refs if k not in index]
        if missing:
            where = f"column '{id_column}' of '{images}'" if image_ids is not None else f"the row indices of '{images}'"
            raise ValueError(f"embeddings.texts '{texts}': {len(missing)} values of column '{image_id_column}' "
                             f"are not in {where}, e.g. {missing[:3]}")
        owner = np.fromiter((index[k] for k in refs), dtype=np.int64, count=len(refs))
    elif img.shape[0] == txt.shape[0]:
        owner = np.arange(img.shape[0], dtype=np.int64)
    else:
        raise ValueError(f"embeddings: '{images}' has {img.shape[0]} rows and '{texts}' {txt.shape[0]}; say which "
                         f"image each text belongs to with embeddings.text_to_image=<.npy of row indices> or a "
                         f"'{image_id_column}' column in the texts parquet")
    i, t, o = torch.as_tensor(np.array(img)), torch.as_tensor(np.array(txt)), torch.from_numpy(owner)
    metrics, hits = retrieval_metrics(i, t, o, ks=ks, return_per_query=True)
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "per_query": hits,
            "chance": chance_recall(len(i), o, ks), "n_images": len(i), "n_texts": len(t),
            "keys": image_ids if image_ids is not None else [str(j) for j in range(len(i))]}


Row = tuple[str, "dict[str, Any] | None"]  # (label: before / after / chance / result, values)


def metrics_table(title: str, rows: dict[str, list[Row]], metrics: list[str], skipped: dict[str, dict] | None = None,
                  info: tuple[tuple[str, str], ...] = (), label: str | None = "model") -> Table:
    """The one results table of cliptune-eval, cliptune-train and cliptune-distill.

    ``rows``: per set, ``(label, values)`` rows in order; rows without values are left out. Columns: the set,
    ``label`` (the row's label; None: no such column, later rows of a set say theirs in the set column),
    ``info`` ``(header, key)`` columns (counts), then each of ``metrics`` that a row other than ``chance``
    holds (``t2i_R@1`` headed ``t2i R@1``; ``-``: not measured). ``after`` rows are bold, ``chance`` rows dim.
    ``skipped`` (``{what: {reason: n}}``) is the caption: the samples each left out, and why. A console too
    narrow for the table wraps a cell instead of cutting it to "0.0…": no value is lost."""
    present = [k for k in metrics
               if any(k in (v or {}) for sets in rows.values() for lbl, v in sets if lbl != "chance")]
    caption = "; ".join(f"{what}: {describe_skips(counts)}" for what, counts in (skipped or {}).items()) or None
    table = Table(title=title, caption=caption)
    table.add_column("set", overflow="fold")
    if label is not None:
        table.add_column(label, overflow="fold")
    for header, _ in info:
        table.add_column(header, justify="right", overflow="fold")
    for k in present:
        table.add_column(k.replace("_R@", " R@"), justify="right", overflow="fold")
    for name, set_rows in rows.items():
        for i, (lbl, vals) in enumerate((lbl, vals) for lbl, vals in set_rows if vals):
            chance = lbl == "chance"
            first = (name if i == 0 else "") if label is not None else (name if i == 0 else f"  {lbl}")
            cells = [first] + ([lbl] if label is not None else [])
            cells += ["" if chance else str(vals.get(key, "")) for _, key in info]
            cells += [("" if chance else "-") if vals.get(k) is None else f"{vals[k]:.3f}" for k in present]
            table.add_row(*cells, style="bold" if lbl == "after" else "dim" if chance else None)
    return table


def results_table(results: dict, title: str = "Retrieval", ks=(1, 5, 10)) -> Table:
    """cliptune-eval's :func:`metrics_table`: one row per set (and language), each followed by its chance level
    (dim); the samples each set left out, and why, under it."""
    cols = [f"{d}_R@{k}" for d in ("t2i", "i2t") for k in ks]
    cols += ["mean_R", "zs_top1", "xling_top1", "xling_top1_correct"]
    counts = ("n_images", "n_texts", "n_skipped")
    rows = {name: [("result", {**{k: r.get(k, "") for k in counts}, **r.get("metrics", {})}),
                   ("chance", r.get("chance"))] for name, r in results.items()}
    skipped = {name: r["skipped"] for name, r in results.items() if r.get("n_skipped")}
    return metrics_table(title, rows, cols, skipped,
                         info=(("images", "n_images"), ("texts", "n_texts"), ("skipped", "n_skipped")), label=None)


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
            emb["images"], emb["texts"], emb.get("text_to_image"), ks, column=emb.get("column") or "embedding",
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
        if cfg.precision not in EVAL_PRECISIONS:
            raise ValueError(f"precision={cfg.precision!r}: use auto, bf16 or fp32")

        device = runtime.device(cfg.device)
        own_group = runtime.init_distributed(device)
        bundle = load_model(spec, pretrained=cfg.get("pretrained"), device=device)
        if runtime.rank() == 0:
            n_params = sum(p.numel() for p in bundle.model.parameters())
            log.info("model: %s%s (%.1fM parameters) on %s", spec,
                     f" pretrained={cfg.pretrained}" if cfg.get("pretrained") else "", n_params / 1e6, device)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        amp = torch.bfloat16 if bf16 else None
        langs = [cfg.caption_lang] if isinstance(cfg.caption_lang, str) else list(cfg.caption_lang)
        templates = cfg.zeroshot.get("templates")
        zs = list(DEFAULT_TEMPLATES if templates is None else templates) if cfg.zeroshot.enabled else None
        results = evaluate_sets(bundle, sets, langs, cfg.batch_size, cfg.workers, device, ks, zs, amp)
        source = {"model": str(spec), "pretrained": cfg.get("pretrained"), "caption_lang": langs,
                  "world_size": runtime.world_size(launcher=False), "device": str(device),
                  "precision": "bf16" if amp else "fp32"}
        if own_group:
            runtime.teardown_distributed()  # every rank has its results; rank 0 writes them
    if runtime.rank() == 0:
        out = RunDir(cfg.out)
        per_query = {n: {"keys": list(r.get("keys") or []), **r["per_query"]}
                     for n, r in results.items() if r.get("per_query")}
        clean = {n: {k: v for k, v in r.items() if k not in ("per_query", "keys")} for n, r in results.items()}
        doc = {**source, "ks": list(ks), "sets": clean,
               "per_query": out.write_per_query(per_query) if per_query else None}
        path = out.write_results(doc)
        rank_zero_print(results_table(clean, ks=ks))
        log.info("results written to %s", path)
    empty = {n: r["error"] for n, r in results.items() if r.get("error")}
    if empty:
        raise EmptyEvalSetError(f"{len(empty)} of {len(results)} evaluation set(s) had nothing usable (results.json "
                                "holds the others): " + " | ".join(empty.values()))
    return results
