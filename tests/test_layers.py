"""The layers of cliptune (ARCHITECTURE.md), read from the source of every module under core/ data/ eval/
train/ with an AST walk (nothing is imported):

    cliptune core (log, runtime, rundir, faults, domains, config, validate, cli)
      <  cliptune.data
      <  cliptune.models, lora, towers, hf_clip, text_tower
      <  cliptune.eval
      <  cliptune.train

A module imports from its own layer or a lower one only (an import inside a function counts as much as one
at the top), no two modules import each other through any chain, and no module imports a ``_private`` name
of another package (``cliptune``, ``cliptune.data``, ``cliptune.eval``, ``cliptune.train``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
FOLDERS = {"core": "cliptune", "data": "cliptune.data", "eval": "cliptune.eval", "train": "cliptune.train"}
LAYERS = ("core", "data", "models", "eval", "train")  # lowest first

# The modules of core/ (the package ``cliptune``) sit in two layers: a new one is placed here by what it imports.
CORE = {"cliptune", "cliptune.log", "cliptune.runtime", "cliptune.rundir", "cliptune.faults", "cliptune.domains",
        "cliptune.config", "cliptune.validate", "cliptune.cli"}
MODELS = {"cliptune.models", "cliptune.lora", "cliptune.towers", "cliptune.hf_clip", "cliptune.text_tower"}
# Packages without Python code of their own: the YAML of cliptune.configs is below everything.
DATA_ONLY = {"cliptune.configs": "core"}

# (importer, imported) pairs allowed to go up a layer, each with its reason. None today: keep it that way.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def sources(root: Path = REPO) -> dict[str, str]:
    """``{module: its source}`` for every module of the four code folders."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path.read_text()
    return out


def layer(module: str) -> str | None:
    """The layer of a module, or None for a core module not placed in ``CORE`` or ``MODELS``."""
    if module in DATA_ONLY:
        return DATA_ONLY[module]
    for name in ("data", "eval", "train"):
        if module == f"cliptune.{name}" or module.startswith(f"cliptune.{name}."):
            return name
    return "core" if module in CORE else "models" if module in MODELS else None


def package(module: str) -> str:
    """``cliptune.data.wds`` -> ``cliptune.data``; a core module -> ``cliptune``."""
    for pkg in [*list(FOLDERS.values())[1:], *DATA_ONLY]:
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return "cliptune"


def _is_package(module: str) -> bool:
    return module in FOLDERS.values() or module in DATA_ONLY


def imports(module: str, source: str, known: set[str]) -> list[tuple[str, str | None, int]]:
    """(imported module, name taken from it or None, line) for each cliptune import of ``module``, at any depth
    of the file; ``from cliptune.eval import cli`` imports the module ``cliptune.eval.cli``; ``mod._x`` on a
    name bound to a cliptune module counts as taking ``_x`` from it."""
    tree = ast.parse(source)
    found: list[tuple[str, str | None, int]] = []
    bound: dict[str, str] = {}  # local name -> the cliptune module it is
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cliptune":
                    found.append((alias.name, None, node.lineno))
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound.setdefault("cliptune", "cliptune")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                parts = module.split(".") if _is_package(module) else module.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != "cliptune":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known or sub in DATA_ONLY:
                    found.append((sub, None, node.lineno))
                    bound[alias.asname or alias.name] = sub
                    if alias.name.startswith("_"):  # a private module of another package is private too
                        found.append((base, alias.name, node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not (node.attr.startswith("__") and node.attr.endswith("__")):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                target = ".".join([bound[value.id], *chain])
                if target in known or target in DATA_ONLY:
                    found.append((target, node.attr, node.lineno))
    return found


def problems(src: dict[str, str]) -> dict[str, list[str]]:
    """Every break of the rules in ``src`` (``{module: source}``), by rule."""
    known = set(src)
    out: dict[str, list[str]] = {"unplaced": [], "upward": [], "private": [], "cycles": []}
    graph: dict[str, set[str]] = {m: set() for m in src}
    for module, text in src.items():
        if layer(module) is None:
            out["unplaced"].append(f"{module}: a core module in no layer; add it to CORE or MODELS in "
                                   "tests/test_layers.py")
            continue
        for target, name, line in imports(module, text, known):
            if target in known and target != module:
                graph[module].add(target)
            where = layer(target)
            if where is None and target not in known:
                continue  # a name that is no module here (the import fails on its own)
            if where is not None and LAYERS.index(where) > LAYERS.index(layer(module)) \
                    and (module, target) not in EXCEPTIONS:
                out["upward"].append(f"{module}:{line} imports {target} ({layer(module)} layer < {where} layer)")
            if name and name.startswith("_") and not name.startswith("__") and package(target) != package(module):
                out["private"].append(f"{module}:{line} takes the private name {target}.{name} of another package")
    out["cycles"] = [" -> ".join(c) for c in cycles(graph)]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(_path(sorted(comp), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path(comp: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One closed path through a strongly connected component, from its first module (to name the cycle)."""
    members, start = set(comp), comp[0]
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & members):
            if w == start:
                return [*path, start]
            if w not in seen:
                seen.add(w)
                paths.append([*path, w])
    return [*comp, start]


@pytest.fixture(scope="module")
def found() -> dict[str, list[str]]:
    return problems(sources())


@pytest.mark.parametrize("rule", ["unplaced", "upward", "private", "cycles"])
def test_layers(found, rule):
    assert found[rule] == [], f"{rule}:\n" + "\n".join(found[rule])


def test_every_folder_module_is_read():
    src = sources()
    assert {"cliptune.cli", "cliptune.eval.cli", "cliptune.eval.runner", "cliptune.train.distill"} <= set(src)
    assert len(src) >= 40


def test_exceptions_are_still_needed():
    """An allowed upward import that no longer exists is taken off the list."""
    src = sources()
    for importer, imported in EXCEPTIONS:
        assert any(t == imported for t, _, _ in imports(importer, src[importer], set(src))), (importer, imported)


def test_architecture_lists_every_module():
    """ARCHITECTURE.md's table names each module in its package's row."""
    rows = {line.split("|")[1].strip().split()[0].strip("`"): line
            for line in (REPO / "ARCHITECTURE.md").read_text().splitlines() if line.startswith("| `cliptune")}
    missing = [m for m in sources() if not _is_package(m) and f"`{m.rsplit('.', 1)[1]}`" not in rows[package(m)]]
    assert missing == [], f"ARCHITECTURE.md does not list {missing}"


BROKEN = {  # what each rule exists for
    "cliptune.eval.cli": "def wiseft_main():\n    from cliptune.eval.wiseft import run  # local imports count\n",
    "cliptune.eval.wiseft": "from cliptune.eval.cli import hydra_cli\n",
    "cliptune.eval.runner": "from cliptune.data.wds import _loader\nfrom cliptune import rundir\nrundir._tmp_name()\n",
    "cliptune.data.wds": "def f():\n    from cliptune.eval import runner\n",
    "cliptune.data.specs": "from . import wds\nfrom ._x import y\n",
    "cliptune.rundir": "import cliptune.train.run as r\n",
    "cliptune.train.run": "",
    "cliptune.newthing": "",
}


def test_the_rules_catch_what_they_forbid():
    found = problems(BROKEN)
    assert found["unplaced"] == ["cliptune.newthing: a core module in no layer; add it to CORE or MODELS in "
                                 "tests/test_layers.py"]
    assert found["upward"] == ["cliptune.data.wds:2 imports cliptune.eval.runner (data layer < eval layer)",
                               "cliptune.rundir:1 imports cliptune.train.run (core layer < train layer)"]
    assert found["private"] == [
        "cliptune.eval.runner:1 takes the private name cliptune.data.wds._loader of another package",
        "cliptune.eval.runner:3 takes the private name cliptune.rundir._tmp_name of another package"]
    assert found["cycles"] == ["cliptune.data.wds -> cliptune.eval.runner -> cliptune.data.wds",
                               "cliptune.eval.cli -> cliptune.eval.wiseft -> cliptune.eval.cli"]
    assert ("cliptune.data.wds", None, 1) in imports("cliptune.data.specs", BROKEN["cliptune.data.specs"], set(BROKEN))
