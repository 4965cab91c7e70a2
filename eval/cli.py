"""``cliptune-eval``: Recall@K (and zero-shot accuracy) of any model on retrieval sets.

    cliptune-eval load=runs/demo sets=demo_data device=cpu out=eval/demo       # a cliptune run, on CPU
    cliptune-eval load=ViT-B-32 pretrained=openai '+sets.domain="val-{000000..000003}.tar"' 'caption_lang=[en,zh]'
    cliptune-eval embeddings.images=img.parquet embeddings.texts=txt.parquet     # an external embedder's vectors
    torchrun --nproc_per_node 8 -m cliptune.eval.cli load=runs/demo sets=demo_data     # same numbers as 1 process

Several sets: ``sets='{domain:shards/val,general:coco_val}'`` or ``+sets.domain=... +sets.general=...``;
one spec alone is named after its folder (``sets=demo_data`` -> ``demo_data``).

``load`` takes anything `cliptune.models.load_model` does: an open_clip name (+ ``pretrained``
tag or file), ``local-dir:<export>``, an export folder, a cliptune run directory or a ``.ckpt``.
(The key is not ``model``: that is cliptune-train's config group, and a ``model=`` override stops
with this advice before Hydra reads it.)

Writes ``results.json`` (and ``per_query.pt`` for paired bootstrap in ``cliptune-compare``) to the
output folder and prints a table. The job is `cliptune.eval.runner.run` (it checks the config, evaluates
and writes the files); ``main`` wraps it for Hydra with the helpers of `cliptune.cli`.

This module also holds the Hydra entry of ``cliptune-wiseft`` (``wiseft_main``; the run is
`cliptune.eval.wiseft.run`). It imports only Hydra, OmegaConf and cliptune's light core: ``--help``,
``--cfg job`` and tab completion answer without loading torch or open_clip, which a job imports when it runs.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from cliptune.cli import hydra_cli
from cliptune.log import configure_job_logging


# ----------------------------------------------------------------------------------------------
# cliptune-eval and cliptune-wiseft

_LOAD = ("the model to evaluate is load=<run dir | export folder | open_clip name> (an open_clip name with "
         "pretrained=<tag or file>), e.g. load=runs/demo or load=ViT-B-32 pretrained=openai")
EVAL_ADVICE = {
    "model": _LOAD,
    "data": "the sets to evaluate are sets=<shard folder or spec>, or several: sets='{<name>:<spec>,...}'",
    "experiment": "evaluate the run it trained: load=runs/<name> sets=<shard folder or spec>",
    "name": "the output folder is out=<folder>",
    "out_root": "the output folder is out=<folder>",
}
WISEFT_ADVICE = {
    "model": ("the models are run=<fine-tuned run dir or export> and start=<starting model> "
              "(an open_clip name with start_pretrained=<tag or file>; default: the run's export_start)"),
    "data": "the sets are sets=<domain set(s)> and reference=<reference set(s)>: a shard spec or '{<name>:<spec>,...}'",
    "name": "the output folder is out=<folder>",
    "out_root": "the output folder is out=<folder>",
}


def _eval_job(cfg: DictConfig) -> None:
    from cliptune.eval.runner import run  # noqa: PLC0415 - torch, open_clip, the data pipeline: only once a job runs

    configure_job_logging()
    run(cfg)


def _wiseft_job(cfg: DictConfig) -> None:
    from cliptune.eval.wiseft import run as wiseft_run  # noqa: PLC0415 - torch, open_clip, matplotlib: only once a job runs

    configure_job_logging()
    wiseft_run(cfg)


def main() -> None:
    """``cliptune-eval`` (the command line is ``sys.argv``, as Hydra reads it)."""
    hydra_cli("cliptune-eval", "eval", _eval_job, sys.argv[1:], EVAL_ADVICE)


def wiseft_main() -> None:
    """``cliptune-wiseft``: as `main`, for configs/wiseft.yaml and `cliptune.eval.wiseft.run`."""
    hydra_cli("cliptune-wiseft", "wiseft", _wiseft_job, sys.argv[1:], WISEFT_ADVICE)


if __name__ == "__main__":
    main()
