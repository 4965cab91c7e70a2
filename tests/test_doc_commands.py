"""Every ``cliptune-*`` command the docs show works when pasted into a shell.

Commands come from README.md (code blocks and inline code), the comments of every YAML under
configs/, scripts/demo.sh (its variables take the values the script gives them; those set from
outside, a placeholder path) and the module docstrings of the CLI modules. Each is split with
``shlex`` as a POSIX shell splits it, after checking that the shell leaves it alone (no unquoted
braces, globs, redirections or expansions: zsh stops at an unmatched ``[...]``), and then:

- Hydra CLIs (cliptune-train, -eval, -wiseft): every override parses with Hydra's override
  parser and the config composes with them (unknown keys and options fail); interpolations are
  resolved where that needs neither the CLI's own resolvers nor a download.
- argparse CLIs (cliptune-shards, -compare, -demo-data): the module's parser accepts the arguments.

Hydra reads ``{ } [ ] ( ) , = : ' " \\ $ *`` and spaces in a value itself, after the shell has
removed one level of quotes: a shard pattern needs quotes for both, e.g.
``'data.train="/data/train-{000000..000009}.tar"'``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import itertools
import re
import shlex
import tomllib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"  # the source of the package cliptune.configs: the YAML whose comments hold commands
ENTRY_POINTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
MODULE_SCRIPT = {target.split(":")[0]: name for name, target in ENTRY_POINTS.items() if target.endswith(":main")}
HYDRA_CONFIG = {"cliptune-train": "train", "cliptune-eval": "eval", "cliptune-wiseft": "wiseft"}
LAUNCHERS = ("srun", "torchrun", "python", "python3")

DOCSTRING_MODULES = ["train/cli.py", "eval/cli.py", "eval/wiseft.py", "eval/compare.py", "data/shards.py",
                     "data/demo.py", "core/lora.py", "data/synthetic.py"]
# each of these shows at least one command; all sources together at least MIN_COMMANDS
REQUIRED_SOURCES = ["README.md", "scripts/demo.sh", "configs/train.yaml", "configs/eval.yaml",
                    "configs/wiseft.yaml", "configs/data/wds.yaml", *DOCSTRING_MODULES]
MIN_COMMANDS = 50

# Outside quotes the shell expands braces and globs, redirects, pipes, ends commands and
# substitutes variables; none of it belongs in a pasted cliptune command.
SHELL_SPECIAL = set("{}[]*?<>|;&()$`")
PLACEHOLDER_DIR = "/tmp/cliptune-docs"  # shell variables a script sets from outside


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    text: str  # as the shell gets it: continuations joined, trailing comment dropped


# ----------------------------------------------------------------------------------------------
# Reading commands out of the docs


def _unquoted(text: str) -> Iterator[tuple[int, str]]:
    """(index, char) of each character a POSIX shell reads outside quotes ($ and ` also inside "")."""
    i, quote = 0, None
    while i < len(text):
        c = text[i]
        if quote == "'":
            quote = None if c == "'" else quote
        elif quote == '"':
            if c == "\\":
                i += 1
            elif c == '"':
                quote = None
            elif c in "$`":
                yield i, c
        elif c == "\\":
            i += 1
        elif c in "'\"":
            quote = c
        else:
            yield i, c
        i += 1


def _strip_comment(text: str) -> str:
    for i, c in _unquoted(text):
        if c == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text.rstrip()


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # unbalanced quotes: reported by the test, found here all the same
        return text.split()


def _script_of(text: str) -> tuple[str, int] | None:
    """(cliptune script, index of its first argument) when ``text`` runs one, else None."""
    words = _words(text)
    i = 0
    while i < len(words) and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[i]):  # VAR=value prefixes
        i += 1
    if i < len(words) and Path(words[i]).name in LAUNCHERS:  # srun ... cliptune-x, torchrun ... -m cliptune.x
        for j in range(i + 1, len(words)):
            if words[j] == "-m" and j + 1 < len(words) and words[j + 1] in MODULE_SCRIPT:
                return MODULE_SCRIPT[words[j + 1]], j + 2
            if Path(words[j]).name in ENTRY_POINTS:
                return Path(words[j]).name, j + 1
        return None
    if i < len(words) and Path(words[i]).name in ENTRY_POINTS:
        return Path(words[i]).name, i + 1
    return None


def _logical_lines(lines: list[str], first: int) -> Iterator[tuple[int, str]]:
    """(line number, line) with backslash continuations joined."""
    buf, start = None, first
    for n, line in enumerate(lines, first):
        buf, start = (line, n) if buf is None else (buf + " " + line.strip(), start)
        if buf.rstrip().endswith("\\"):
            buf = buf.rstrip()[:-1].rstrip()
            continue
        yield start, buf
        buf = None
    if buf is not None:
        yield start, buf


def _commands_in_code(lines: list[str], first: int, path: str) -> Iterator[DocCommand]:
    """Shell lines: each one that runs a cliptune script is a command."""
    lines = ["" if line.lstrip().startswith("#") else line for line in lines]  # comments never continue
    for n, line in _logical_lines(lines, first):
        text = _strip_comment(line.strip())
        if text and _script_of(text):
            yield DocCommand(f"{path}:{n}", text)


def _commands_in_prose(lines: list[str], first: int, path: str, delim: str) -> Iterator[DocCommand]:
    """Comment or docstring text: a command starts a line or follows 2+ spaces, or fills an inline
    code span (between ``delim``)."""
    for n, line in _logical_lines(lines, first):
        for m in re.finditer(r"(?:^|(?<=\s\s))(?=\S)", line):
            text = _strip_comment(line[m.start():])
            if _script_of(text):
                yield DocCommand(f"{path}:{n}", text)
                break
    yield from _inline_commands("\n".join(lines), first, path, delim)


def _inline_commands(text: str, first: int, path: str, delim: str) -> Iterator[DocCommand]:
    """Inline code spans (may wrap lines) that run a cliptune script; its bare name is prose."""
    d = re.escape(delim)
    for m in re.finditer(rf"(?<!`){d}(?!`)(.+?)(?<!`){d}(?!`)", text, flags=re.S):
        span = " ".join(m.group(1).split())
        found = _script_of(span)
        if found and len(_words(span)) > found[1]:
            yield DocCommand(f"{path}:{first + text.count(chr(10), 0, m.start())}", span)


def _markdown(path: Path) -> Iterator[DocCommand]:
    """Fenced blocks are shell lines; elsewhere only inline code counts (prose may begin with a name)."""
    rel, lines = str(path.relative_to(REPO)), path.read_text().splitlines()
    prose: list[str] = []
    fence: list[str] | None = None
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            if fence is None:
                fence, fence_start = [], n + 1
            else:
                yield from _commands_in_code(fence, fence_start, rel)
                fence = None
            prose.append("")
        elif fence is not None:
            fence.append(line)
            prose.append("")
        else:
            prose.append(line)
    yield from _inline_commands("\n".join(prose), 1, rel, "`")


def _comments(lines: list[str]) -> list[str]:
    """The comment text of each line ('' where there is none)."""
    out = []
    for line in lines:
        m = re.search(r"(?:^|\s)#(?!!)(.*)$", line)
        out.append(m.group(1) if m else "")
    return out


def _yaml(path: Path) -> Iterator[DocCommand]:
    rel = str(path.relative_to(REPO))
    yield from _commands_in_prose(_comments(path.read_text().splitlines()), 1, rel, "`")


def _script_vars(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Values of a script's variables when run with nothing set from outside (loops: first value)."""
    scalars: dict[str, str] = {}
    arrays: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"for (\w+) in (\S+).*", line):
            scalars[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"(?:export )?(\w+)=\((.*)\)", line):
            arrays[m.group(1)] = shlex.split(m.group(2))
        elif (m := re.fullmatch(r"(?:export )?(\w+)=(\S+)", line)) and "$(" not in m.group(2):
            value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", m.group(2))  # "${X:-default}" -> default
            scalars[m.group(1)] = (_words(_substitute(value, scalars, arrays)) or [""])[0]
    return scalars, arrays


def _substitute(text: str, scalars: dict[str, str], arrays: dict[str, list[str]]) -> str:
    """Expand $X, ${X}, ${X:-default} and "${A[@]}" as the script would (unknown X: a placeholder path)."""

    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        fallback = m.group(2) if m.group(2) is not None else f"{PLACEHOLDER_DIR}/{name}"
        return scalars.get(name, fallback)

    text = re.sub(r'"\$\{(\w+)\[@\]\}"', lambda m: shlex.join(arrays.get(m.group(1), [])), text)
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", value, text)


def _shell_script(path: Path) -> Iterator[DocCommand]:
    rel, text = str(path.relative_to(REPO)), path.read_text()
    lines = text.splitlines()
    scalars, arrays = _script_vars(text)
    for cmd in _commands_in_code(lines, 1, rel):
        yield DocCommand(cmd.where, _substitute(cmd.text, scalars, arrays))
    yield from _commands_in_prose(_comments(lines), 1, rel, "`")


def _docstring(path: Path) -> Iterator[DocCommand]:
    rel, source = str(path.relative_to(REPO)), path.read_text()
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant), f"{rel}: no module docstring"
    lines = source.splitlines()[node.lineno - 1:node.end_lineno]
    yield from _commands_in_prose(lines, node.lineno, rel, "``")


def doc_commands() -> list[DocCommand]:
    found = [*_markdown(REPO / "README.md"), *_markdown(REPO / "BENCHMARKS.md"),
             *_shell_script(REPO / "scripts" / "demo.sh")]
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        found += _yaml(path)
    for rel in DOCSTRING_MODULES:
        found += _docstring(REPO / rel)
    return list(dict.fromkeys(found))  # a command in a line and in its inline code counts once


COMMANDS = doc_commands()


# ----------------------------------------------------------------------------------------------
# Checks


def test_commands_are_found():
    per_file = Counter(c.where.rsplit(":", 1)[0] for c in COMMANDS)
    assert len(COMMANDS) >= MIN_COMMANDS, f"only {len(COMMANDS)} documented commands found: {dict(per_file)}"
    assert not [s for s in REQUIRED_SOURCES if not per_file[s]], f"no command found in these: {dict(per_file)}"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_doc_command(cmd: DocCommand, monkeypatch, capsys):
    special = _unquoted_specials(cmd.text)
    assert not special, (
        f"{cmd.where}: the shell expands, redirects or splits these words (unquoted characters after each): "
        f"{special}; quote them (e.g. 'lora.towers=[text]', and for Hydra too "
        f"'data.train=\"/data/train-{{000000..000009}}.tar\"'), or write an example value for a <placeholder>"
        f"\n  {cmd.text}"
    )
    try:
        words = shlex.split(cmd.text, comments=True)
    except ValueError as e:
        words, error = [], f"{cmd.where}: the shell cannot split it ({e})\n  {cmd.text}"
    else:
        error = None
    if error:
        pytest.fail(error)
    script, first = _script_of(cmd.text)
    args = words[first:]
    if script in HYDRA_CONFIG:
        _check_hydra(cmd, script, args)
    else:
        _check_argparse(cmd, script, args, monkeypatch, capsys)


def _unquoted_specials(text: str) -> dict[str, str]:
    """{shell word as written: its characters the shell treats specially outside quotes}."""
    specials = {i: c for i, c in _unquoted(text) if c in SHELL_SPECIAL}
    cuts = [-1, *(i for i, c in _unquoted(text) if c.isspace()), len(text)]
    out = {}
    for a, b in zip(cuts, cuts[1:]):
        chars = "".join(specials[i] for i in range(a + 1, b) if i in specials)
        if chars:
            out[text[a + 1:b]] = "".join(dict.fromkeys(chars))
    return out


def _check_hydra(cmd: DocCommand, script: str, args: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args = [a for a in args if a not in ("-m", "--multirun")]
    flags = [a for a in args if a.startswith("-")]
    assert not flags, f"{cmd.where}: {flags} is not an override {script} takes\n  {cmd.text}"
    overrides, error = [], None
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except OverrideParseException as e:
        error = f"{cmd.where}: after the shell, Hydra gets {args} and fails: {e}\n  {cmd.text}"
    if error:
        pytest.fail(error)
    # a multirun composes once per job
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in overrides]
    for job in itertools.product(*choices):
        error = _compose_error(HYDRA_CONFIG[script], list(job))
        assert error is None, f"{cmd.where}: {script} with {list(job)}: {error}\n  {cmd.text}"


def _compose_error(config_name: str, overrides: list[str]) -> str | None:
    """Why the config does not compose with ``overrides``, or a value does not resolve; None if fine."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, ListConfig, open_dict
    from omegaconf.errors import MissingMandatoryValue, UnsupportedInterpolationType

    from conftest import initialize_configs

    try:
        with initialize_configs():  # the package, its schemas and resolvers, as the CLIs compose
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except Exception as e:
        return f"{config_name}.yaml does not compose: {type(e).__name__}: {e}"

    def walk(node: DictConfig | ListConfig, where: str) -> str | None:
        for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
            if where == "" and key == "hydra":
                continue
            try:
                value = node[key]
            except UnsupportedInterpolationType:  # a resolver only the CLI registers, e.g. ${pkg:...}
                continue
            except MissingMandatoryValue:
                return f"required value {where}{key} is left unset (???)"
            except Exception as e:
                return f"{where}{key} does not resolve: {type(e).__name__}: {e}"
            if isinstance(value, (DictConfig, ListConfig)) and (error := walk(value, f"{where}{key}.")):
                return error
        return None

    previous = HydraConfig.instance().cfg
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = f"{PLACEHOLDER_DIR}/run"
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...}
    try:
        return walk(cfg, "")
    finally:
        HydraConfig.instance().cfg = previous


class _Parsed(Exception):
    pass


def _check_argparse(cmd: DocCommand, script: str, args: list[str], monkeypatch, capsys) -> None:
    module_name, main_name = ENTRY_POINTS[script].split(":")
    module = importlib.import_module(module_name)
    build = getattr(module, "build_parser", None) or getattr(module, "_parser", None)
    extra: list[str] = []
    try:
        if build is not None:
            build().parse_args(args)
        else:
            extra = _parse_with_main(getattr(module, main_name), args, monkeypatch)
    except SystemExit:
        error = capsys.readouterr().err.strip().splitlines()
        pytest.fail(f"{cmd.where}: {error[-1] if error else script + ' exits'}\n  {cmd.text}")
    assert not extra, f"{cmd.where}: {script} does not know {extra}\n  {cmd.text}"


def _parse_with_main(main, args: list[str], monkeypatch) -> list[str]:
    """Run ``main(args)`` only up to its argument parsing (the module has no parser-building
    function): the first top-level parse stops it, so nothing else runs. Returns unknown args."""
    parse_known_args = argparse.ArgumentParser.parse_known_args
    depth = [0]

    def parse_then_stop(self, *a, **kw):
        depth[0] += 1
        try:
            result = parse_known_args(self, *a, **kw)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            raise _Parsed(result)
        return result

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
    with pytest.raises(_Parsed) as parsed:
        main(args)
    return parsed.value.args[0][1]
