"""The command line every Hydra CLI of cliptune shares (``cliptune-train``, ``-eval``, ``-wiseft``, ``-distill``).

    from cliptune.cli import hydra_cli
    hydra_cli("cliptune-eval", "eval", job, sys.argv[1:], advice)   # --help, usage checks, Hydra, one-line errors

``--help`` prints the config file with its comments (`help_text`), an override of another CLI's config
stops with advice before Hydra reads it (`misused_key_error`), a value holding ``=`` is read as printed
(`quote_equals`), and cliptune's own errors are one line with exit code 2 (`user_error`). The configs are
the package ``cliptune.configs`` (``CONFIG_PACKAGE``; ``CONFIG_DIR`` is its folder).

It imports only Hydra, OmegaConf and cliptune's light core: ``--help``, ``--cfg job`` and tab completion
answer without loading torch, Lightning or open_clip, which each CLI's job imports when it runs.
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
from cliptune.config import register_configs, register_resolvers
from cliptune.rundir import RunDirBusyError
from cliptune.validate import ConfigError

# The configs are the package cliptune.configs, wherever it is installed; Hydra reads it as CONFIG_PACKAGE,
# and CONFIG_DIR is its folder for code that takes a path.
CONFIG_PACKAGE = "cliptune.configs"
CONFIG_DIR = Path(cliptune.configs.__file__).parent

# Hydra's flags that take the next word as their value (``-sc install=bash`` is no override; --info's
# optional value has no "=" and passes as an override of no key)
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--shell-completion", "-sc", "--experimental-rerun"}


# ----------------------------------------------------------------------------------------------
# The command line of the Hydra CLIs (cliptune-train, -eval, -wiseft, -distill): read before Hydra


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
    top = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml"))
    assert isinstance(top, dict), f"{config_name}.yaml: a top-level config is a mapping"
    for entry in top.get("defaults", []):
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
              f"Errors: one line on stderr, exit code 2; {TRACEBACK_ENV}=1 (or HYDRA_FULL_ERROR=1) shows the "
              "traceback."]
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
    register_resolvers()  # what the YAML files name: ${pkg:...}, ${log:...} and the schemas of their defaults lists
    register_configs()
    failed: list[str] = []
    hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name=config_name)(
        _reporting(task, failed))()
    if failed:
        sys.stderr.write(f"error: {len(failed)} job(s) of the sweep failed (above)\n")
        raise SystemExit(2)
