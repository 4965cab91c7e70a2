"""Optimiser groups and schedule against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from cliptune.models import build_model
from cliptune.train.optim import OptimConfig, build_optimizer, lr_lambda, param_groups


def test_weight_decay_exclusions(tiny_arch):
    m = build_model("t-opt", arch=tiny_arch, init_logit_bias=-10.0).model
    groups = param_groups(m, OptimConfig(weight_decay=0.1))
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    for name in ("logit_scale", "logit_bias", "positional_embedding", "token_embedding.weight",
                 "visual.class_embedding", "visual.positional_embedding", "ln_final.weight",
                 "visual.transformer.resblocks.0.ln_1.weight", "transformer.resblocks.0.attn.in_proj_bias"):
        assert name in no_decay, name
    for name in ("visual.conv1.weight", "transformer.resblocks.0.attn.in_proj_weight",
                 "transformer.resblocks.1.mlp.c_fc.weight", "text_projection", "visual.proj"):
        assert name in decay, name
    assert decay.isdisjoint(no_decay)
    n_params = sum(1 for p in m.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_params


def test_layer_decay_multipliers(tiny_arch):
    m = build_model("t-lld", arch=tiny_arch).model
    cfg = OptimConfig(lr=1.0, layer_decay=0.5)
    lr_of = {n: g["lr"] for g in param_groups(m, cfg) for n in g["names"]}
    # 2 blocks per tower: embeddings depth 0 -> 0.5**3, block 0 -> 0.5**2, block 1 -> 0.5, head -> 1
    assert lr_of["visual.conv1.weight"] == pytest.approx(0.125)
    assert lr_of["visual.transformer.resblocks.0.mlp.c_fc.weight"] == pytest.approx(0.25)
    assert lr_of["visual.transformer.resblocks.1.mlp.c_fc.weight"] == pytest.approx(0.5)
    assert lr_of["visual.proj"] == pytest.approx(1.0)
    assert lr_of["token_embedding.weight"] == pytest.approx(0.125)
    assert lr_of["logit_scale"] == pytest.approx(1.0)


def test_schedule_warmup_cosine():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    f = lr_lambda(cfg, total_steps=110)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_lambda(OptimConfig(warmup_steps=0, schedule="linear"), 10)(5)


def test_build_optimizer_all_trainable(tiny_arch):
    m = build_model("t-opt2", arch=tiny_arch, lock_image=True).model
    opt = build_optimizer(m, OptimConfig())
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in m.parameters() if p.requires_grad}


@pytest.mark.parametrize("precision,dtype", [("bf16-true", torch.bfloat16), ("16-true", torch.float16)])
def test_sixteen_bit_weights_freeze_the_temperature(precision, dtype):
    """Why cliptune.validate refuses trainer.precision=bf16-true / 16-true: an AdamW step (about lr) on a
    temperature stored in that type rounds back to where it was; in fp32 (bf16-mixed keeps weights in fp32)
    the same step moves it."""
    from cliptune.validate import FROZEN_TEMPERATURE

    moved = {}
    for kind in (dtype, torch.float32):
        scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=kind))
        opt = torch.optim.AdamW([scale], lr=5e-4, weight_decay=0.0)
        for _ in range(10):
            scale.grad = torch.ones_like(scale)
            opt.step()
        moved[kind] = abs(scale.item() - torch.tensor(math.log(1 / 0.07), dtype=kind).item())
    assert moved[dtype] == 0.0
    assert moved[torch.float32] == pytest.approx(10 * 5e-4, rel=1e-3)
    nxt = torch.nextafter(torch.tensor(math.log(1 / 0.07), dtype=dtype), torch.tensor(4.0, dtype=dtype))
    assert float(nxt) - float(torch.tensor(math.log(1 / 0.07), dtype=dtype)) == FROZEN_TEMPERATURE[precision][1]
