"""Importing cliptune as a library changes nothing global: no warnings filters at import time.

Jobs set what they need as they start (``cliptune.log.configure_job_logging``, the trainer builder of
``cliptune.train.run``); a program that imports cliptune keeps its own warnings.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import ast, importlib, pkgutil, sys, warnings
    import cliptune

    names = sorted(m.name for m in pkgutil.walk_packages(cliptune.__path__, "cliptune.")
                   if not m.name.startswith("cliptune.configs"))
    # the libraries cliptune imports may set filters of their own: import them first, then compare
    for name in names:
        spec = importlib.util.find_spec(name)
        tree = ast.parse(open(spec.origin, encoding="utf-8").read())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for mod in mods:
                if not mod.startswith("cliptune"):
                    try:
                        importlib.import_module(mod)
                    except Exception:
                        pass
    before = list(warnings.filters)
    for name in names:
        importlib.import_module(name)
        if warnings.filters != before:
            new = [f for f in warnings.filters if f not in before]
            sys.exit(f"importing {name} changed warnings.filters: {new}")
    print(len(names))
""")


def test_importing_every_module_leaves_warnings_filters_unchanged():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 40  # every module was imported, not just a few


REGISTRY = textwrap.dedent("""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    import cliptune.cli, cliptune.train.cli, cliptune.train.distill, cliptune.train.run  # noqa: F401

    stored = sorted(ConfigStore.instance().repo)
    resolvers = [r for r in ("pkg", "log", "job_dirname") if OmegaConf.has_resolver(r)]
    print(stored, resolvers)
""")


def test_importing_the_entry_points_registers_nothing_with_hydra():
    """The schemas and resolvers are registered where a job or a compose starts, not at import."""
    proc = subprocess.run([sys.executable, "-c", REGISTRY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored, resolvers = proc.stdout.strip().rsplit("] ", 1)
    assert "_train_schema" not in stored and resolvers == "[]", proc.stdout
