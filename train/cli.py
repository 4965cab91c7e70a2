"""``cliptune-train``: the Hydra entry point.

    cliptune-train experiment=smoke                          # CPU, synthetic data, < 1 min
    cliptune-train experiment=demo                           # bundled emoji domain
    cliptune-train -m experiment=demo loss=clip,siglip       # one run per loss, then cliptune-compare
    cliptune-train experiment=demo resume=true               # continue a killed run (same command + resume)
    cliptune-train model=vit_b_32 data=wds 'data.train="shards/train-{000000..000127}.tar"' \
        'data.val.domain="shards/val-{000000..000003}.tar"' trainer=gpu   # quoted for shell and Hydra

This module imports only Hydra and cliptune's light core: ``--help``, ``--cfg job`` and tab completion
answer without loading torch, Lightning or open_clip. The run itself is `cliptune.train.run.run`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import cliptune.configs
from cliptune.config import register_configs, register_resolvers

# The configs are the package cliptune.configs, wherever it is installed; Hydra reads it as CONFIG_PACKAGE,
# and CONFIG_DIR is its folder for modules that take a path.
CONFIG_PACKAGE = "cliptune.configs"
CONFIG_DIR = str(Path(cliptune.configs.__file__).parent)

register_resolvers()
register_configs()  # the schemas configs/train.yaml and its groups build on


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_PACKAGE}", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    from cliptune.train.run import run  # noqa: PLC0415 - torch, Lightning, open_clip: only once a job runs

    result = run(cfg)
    after = result.get("after") or {}
    first = next(iter(after.values()), {})
    return first.get("mean_R")  # the value Hydra sweepers optimise


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
