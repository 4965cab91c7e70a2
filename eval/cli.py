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
output folder and prints a table. ``run(cfg)`` checks the config, calls `cliptune.eval.runner`
and writes the files; ``main`` wraps it for Hydra.

This module also holds the Hydra entry of ``cliptune-wiseft`` (``wiseft_main``; the run is
`cliptune.eval.wiseft.run`) and the command-line helpers the Hydra CLIs share: ``--help`` prints the
config file with its comments, and keys of another CLI's config stop with advice. It imports only
Hydra, OmegaConf and cliptune's light core: ``--help``, ``--cfg job`` and tab completion answer without
loading torch or open_clip, which ``run`` imports when a job runs.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import cliptune.configs
from cliptune import runtime
from cliptune.log import configure_job_logging, get_logger, rank_zero_print
from cliptune.rundir import RunDir, RunDirBusyError
from cliptune.validate import ConfigError, validate_eval_config

log = get_logger(__name__)

CONFIG_PACKAGE = "cliptune.configs"
CONFIG_DIR = Path(cliptune.configs.__file__).parent

# Hydra's flags that take the next word as their value (``-sc install=bash`` is no override; --info's
# optional value has no "=" and passes as an override of no key)
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--shell-completion", "-sc", "--experimental-rerun"}


# ----------------------------------------------------------------------------------------------
# The library call


def run(cfg: DictConfig) -> dict:
    """Evaluate as configured; returns ``{set: result}`` (what ``results.json`` holds, plus per-query hits).

    Rank 0 writes ``<out>/results.json`` and ``<out>/per_query.pt`` (``{set: {"keys": [...],
    "t2i_R@1": bool tensor, ...}}``, the format ``cliptune-compare`` reads) and prints the table.
    """
    # torch, open_clip and the data pipeline: imported once a job runs, not for --help or completion
    import torch  # noqa: PLC0415 - heavy: only once a job runs

    from cliptune.eval.embed import EmptyEvalSetError  # noqa: PLC0415 - imports torch
    from cliptune.eval.runner import evaluate_embeddings, evaluate_sets, named_sets, results_table  # noqa: PLC0415 - torch
    from cliptune.eval.zeroshot import DEFAULT_TEMPLATES  # noqa: PLC0415 - imports torch
    from cliptune.models import load_model  # noqa: PLC0415 - torch, open_clip, transformers

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
        if runtime.rank() == 0:
            n_params = sum(p.numel() for p in bundle.model.parameters())
            log.info("model: %s%s (%.1fM parameters) on %s", spec,
                     f" pretrained={cfg.pretrained}" if cfg.get("pretrained") else "", n_params / 1e6, device)
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


# ----------------------------------------------------------------------------------------------
# The command line of the Hydra CLIs (cliptune-train, -eval, -wiseft): read before Hydra


def hydra_overrides(argv: Sequence[str]) -> list[str]:
    """The words of a Hydra command line that are overrides (not flags, nor a flag's value)."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = word in _VALUE_FLAGS
        else:
            out.append(word)
    return out


def quote_equals(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of each override that holds ``=`` quoted for Hydra: the folders cliptune names
    itself hold one (a sweep's ``runs/losses/loss=clip``), and Hydra's grammar stops at an unquoted ``=``
    ("mismatched input '='"), so ``load=runs/losses/loss=clip`` is read as ``load='runs/losses/loss=clip'``.
    Only an override that does not parse as typed and parses once quoted changes; quoted values, lists,
    dicts and interpolations stay Hydra's to read. A sweep's folder of two keys
    (``runs/x/loss=clip,optim.lr=1e-4``) is one path too."""
    parser = OverridesParser.create()

    def parses(word: str) -> bool:
        try:
            parser.parse_overrides([word])
        except OverrideParseException:
            return False
        return True

    out, skip = [], False
    for word in argv:
        if skip or word.startswith("-") or "=" not in word:
            skip = not skip and word in _VALUE_FLAGS
            out.append(word)
            continue
        key, _, value = word.partition("=")
        if "=" in value and value[:1] not in "'\"[{(" and "\\" not in value and "${" not in value and not parses(word):
            quote = "'" if "'" not in value else '"' if '"' not in value else None
            if quote and parses(f"{key}={quote}{value}{quote}"):
                word = f"{key}={quote}{value}{quote}"
        out.append(word)
    return out


def override_key(override: str) -> str:
    """The config key an override sets: ``+sets.a=x`` -> ``sets.a``, ``~model`` -> ``model``."""
    key = override.split("=", 1)[0].lstrip("~+")
    return key.split("@", 1)[0]


def wants_help(argv: Sequence[str]) -> bool:
    """``--help``/``-h`` on a Hydra CLI (``--hydra-help`` is Hydra's own)."""
    return "-sc" not in argv and "--shell-completion" not in argv and any(a in ("--help", "-h") for a in argv)


def config_text(config_name: str) -> str:
    """The config file of a CLI as shipped (its comments are the documentation)."""
    return (CONFIG_DIR / f"{config_name}.yaml").read_text()


def config_sections(config_name: str) -> tuple[list[str], list[str]]:
    """(the opening comment lines, the top-level keys with their comments) of a config file; its
    defaults list and Hydra's own ``hydra:`` section are left out."""
    blocks: dict[str, list[str]] = {"head": [], "keys": [], "defaults": [], "hydra": []}
    block = "head"
    for line in config_text(config_name).splitlines():
        if block == "head" and line.startswith("#"):
            blocks["head"].append(line)
            continue
        if re.match(r"[A-Za-z_]", line):  # a top-level key starts a block
            block = {"defaults:": "defaults", "hydra:": "hydra"}.get(line.split()[0], "keys")
        elif block == "head":
            block = "keys"
        blocks[block].append(line)
    return blocks["head"], [k for k in blocks["keys"] if k.strip()]


def config_groups(config_name: str) -> list[tuple[str, list[str], str | None]]:
    """(group, its options, the default option) of each config group a config's defaults list names."""
    groups = []
    for entry in OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml")).get("defaults", []):
        if not isinstance(entry, dict):
            continue
        (group, choice), = entry.items()
        if " " in group or not (CONFIG_DIR / group).is_dir():  # "override hydra/...": Hydra's own
            continue
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))
        groups.append((group, options, choice))
    return groups


def help_text(script: str, config_name: str, groups: bool = False) -> str:
    """``<script> --help``: the config file's opening comments (commands), its config groups and their
    options (``groups``), then every top-level key with its comment, and Hydra's flags that matter."""
    head, keys = config_sections(config_name)
    first = head[0].lstrip("# ").rstrip() if head else script
    lines = [f"{script}: {first}", ""]
    for h in head[1:]:
        text = h.removeprefix("#").removeprefix(" ")
        if text[:1].strip() and lines[-1][:1] == " ":  # prose after commands: a blank line between
            lines.append("")
        lines.append(text)
    if groups:
        found = config_groups(config_name)
        width = max(len(g) for g, _, _ in found)
        lines += ["", "Config groups (group=option; * marks the default):"]
        for group, options, choice in found:
            shown = ", ".join(o + ("*" if o == choice else "") for o in options)
            lines.append(f"  {group:<{width}}  {shown}" + ("" if choice else "   (none by default)"))
        lines += ["", f"Top-level keys (configs/{config_name}.yaml); a group's keys are <group>.<key>=value, "
                      "e.g. optim.lr=1e-4 (see them all with --cfg job):"]
    else:
        lines += ["", f"Keys (configs/{config_name}.yaml); key=value on the command line:"]
    lines += ["  " + k for k in keys]
    lines += ["", "Flags: --cfg job prints the config these overrides compose (--resolve: with values filled in);",
              "       -m runs one job per value of a comma list (key=a,b); --hydra-help lists Hydra's other flags;",
              f"       tab completion: eval \"$({script} -sc install=bash)\"",
              f"Errors: one line on stderr, exit code 2; {TRACEBACK_ENV}=1 (or HYDRA_FULL_ERROR=1) shows the traceback."]
    return "\n".join(lines) + "\n"


def training_only_keys() -> set[str]:
    """The top-level keys and groups of cliptune-train's config."""
    train = OmegaConf.load(CONFIG_DIR / "train.yaml")
    return {str(k) for k in train if k not in ("defaults", "hydra")} | {g for g, _, _ in config_groups("train")}


def misused_key_error(script: str, config_name: str, argv: Sequence[str],
                      advice: dict[str, str]) -> str | None:
    """Why an override of cliptune-train's config cannot go to ``script`` and what to write instead, or None.

    Hydra would answer ``model=minilm`` with "use +model=minilm" (add a key), which is the wrong advice:
    ``model`` is the training config group, and ``script`` reads its model from another key.
    """
    own = {str(k) for k in OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml")} | {"hydra"}
    foreign = training_only_keys() - own
    for override in hydra_overrides(argv):
        key = override_key(override)
        top = key.split(".", 1)[0]
        if top in foreign:
            hint = advice.get(top) or (f"{script} has no key '{top}' ({', '.join(sorted(own - {'hydra'}))}; "
                                       f"see {script} --help)")
            return f"{script}: '{override}' is a cliptune-train setting; {hint}"
    return None


# An error cliptune raises for the user (a bad setting, a missing file, a busy or finished run directory)
# is printed as "error: <message>" with exit code 2; with this variable set (or HYDRA_FULL_ERROR=1), the
# traceback instead. Errors raised elsewhere (a library, a bug) keep their traceback.
TRACEBACK_ENV = "CLIPTUNE_TRACEBACK"
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RunDirBusyError)


def user_error(e: BaseException) -> str | None:
    """``"error: <message>"`` when ``e`` is one of cliptune's own errors for the user (``USER_ERRORS``, with
    a message, raised by cliptune's code), else None: the caller then lets it show its traceback."""
    if not isinstance(e, USER_ERRORS) or not str(e).strip():
        return None
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    tb, module = e.__traceback__, ""
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next
    if module != "cliptune" and not module.startswith("cliptune."):
        return None
    if isinstance(e, ConfigError) and len(e.problems) == 1:
        return f"error: {e.problems[0]}"  # one problem, one line
    return f"error: {e}"


def _reporting(task: Callable[[DictConfig], Any], failed: list[str]) -> Callable[[DictConfig], Any]:
    """``task``, with cliptune's own errors printed as one line (`user_error`): a run stops with exit code 2,
    a sweep's job is recorded in ``failed`` and the sweep goes on to its next job."""

    def job(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except USER_ERRORS as e:
            line = user_error(e)
            if line is None:
                raise
            sys.stderr.write(line + "\n")
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                failed.append(line)
                return None
            raise SystemExit(2) from None
        except Exception as e:
            # a run stopped from outside (SIGTERM: cliptune.train.checkpointing.Preempted) says where it can
            # resume and exits with its own code, so a scheduler never records it as finished
            code = getattr(e, "exit_code", None)
            if not isinstance(code, int) or not str(e).strip():
                raise
            sys.stderr.write(f"error: {e}\n")
            raise SystemExit(code) from None

    return job


def hydra_cli(script: str, config_name: str, task: Callable[[DictConfig], Any], argv: Sequence[str],
              advice: dict[str, str] | None = None, groups: bool = False) -> None:
    """Run a Hydra CLI: its own ``--help`` (``help_text``), then the misused-key check (``advice``: per
    cliptune-train key, what to write instead), then Hydra with ``task`` as the job, reading values that hold
    ``=`` as printed (`quote_equals`) and reporting cliptune's own errors in one line (`user_error`)."""
    if wants_help(argv):
        sys.stdout.write(help_text(script, config_name, groups=groups))
        return
    if advice is not None and "-sc" not in argv and "--shell-completion" not in argv:
        error = misused_key_error(script, config_name, argv, advice)
        if error:
            sys.stderr.write(error + "\n")
            raise SystemExit(2)  # a usage error, as argparse's
    sys.argv[1:] = quote_equals(sys.argv[1:])  # Hydra reads sys.argv
    failed: list[str] = []
    hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name=config_name)(
        _reporting(task, failed))()
    if failed:
        sys.stderr.write(f"error: {len(failed)} job(s) of the sweep failed (above)\n")
        raise SystemExit(2)


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
