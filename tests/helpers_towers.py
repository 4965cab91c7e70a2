"""The EfficientNet-Lite0 weights as timm's state dict: the reference the tower tests compare a loaded trunk to."""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch

from cliptune import towers
from cliptune.rundir import load_torch_file


def lite0_timm_state_dict(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The EfficientNet-Lite0 ImageNet weights as a state dict of timm's ``tf_efficientnet_lite0`` (the key
    layout of ``efficientnet_lite0`` too): 296 tensors with BatchNorm running statistics and the 1000-class
    ``classifier``. ``path`` defaults to the installed package's file."""
    path = Path(path) if path is not None else towers.efficientnet_lite0_weights_path()
    layout = timm.create_model(towers.TIMM_MODEL, pretrained=False)
    return towers._map_onto(layout, load_torch_file(path), str(path))
