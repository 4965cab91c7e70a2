"""The mixed-precision and GPU paths of training. ``trainer.precision=bf16-mixed`` on CPU always runs; the
``gpu`` tests (bf16 on CUDA, fused AdamW, channels-last for convolutional towers, ``compile=true``) run when
``torch.cuda.is_available()`` and are skipped otherwise, each compared with the CPU fp32 reference::

    pytest -q tests/test_gpu.py            # on a GPU machine: everything here
    pytest -q -m gpu                       # the GPU tests alone
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from cliptune.models import build_model
from cliptune.train import run as train_run
from cliptune.train.losses import ClipLoss
from cliptune.train.module import ContrastiveModule
from cliptune.train.optim import OptimConfig, build_optimizer
from conftest import compose_train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STEPS = 4


class _Capture(Callback):
    """The weights as training starts and ends (on the CPU), and the optimiser that ran."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = {k: v.detach().float().cpu().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module) -> None:
        self.after = {k: v.detach().float().cpu().clone() for k, v in pl_module.state_dict().items()}
        self.dtypes = {n: p.dtype for n, p in pl_module.named_parameters()}
        self.fused = trainer.optimizers[0].defaults.get("fused")
        self.channels_last = pl_module.channels_last


def _train(tmp_path, name: str, *overrides: str) -> SimpleNamespace:
    """A few steps of the smoke experiment; the loss of every step, and what ``_Capture`` saw."""
    cfg = compose_train(["experiment=smoke", f"out_root={tmp_path}", f"name={name}", "export=false",
                         "export_start=false", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}",
                         f"checkpoint_every={STEPS}", "trainer.log_every_n_steps=1", *overrides],
                        run_dir=tmp_path / name)
    capture = _Capture()
    build = train_run.build_callbacks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_run, "build_callbacks", lambda cfg, dm: [*build(cfg, dm), capture])
        train_run.run(cfg)
    log = pd.read_csv(tmp_path / name / "csv" / "metrics.csv")
    losses = log[["step", "train/loss"]].dropna()
    assert losses["step"].tolist() == list(range(STEPS))
    return SimpleNamespace(losses=losses["train/loss"].tolist(), cap=capture)


def _changed(cap) -> list[str]:
    return [k for k in cap.before if not torch.equal(cap.before[k], cap.after[k])]


# ------------------------------------------------------------------------------------ CPU, always
@pytest.fixture(scope="module")
def cpu_fp32(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("fp32"), "fp32")


def test_bf16_mixed_trains_on_cpu(tmp_path, cpu_fp32):
    bf16 = _train(tmp_path, "bf16", "trainer.precision=bf16-mixed")
    assert all(math.isfinite(v) for v in bf16.losses)
    assert "model.logit_scale" in _changed(bf16.cap) and len(_changed(bf16.cap)) > len(bf16.cap.before) // 2
    # autocast computes in bf16; the weights, the temperature above all, stay fp32 (cliptune.validate refuses
    # bf16-true for that reason)
    assert bf16.cap.dtypes["model.logit_scale"] == torch.float32
    assert set(bf16.cap.dtypes.values()) == {torch.float32}
    # the same weights and batch: the first loss (before any update) is the fp32 one to bf16's precision
    assert bf16.losses[0] == pytest.approx(cpu_fp32.losses[0], rel=3e-2)


@pytest.fixture
def tiny_resnet(tiny_arch):
    """The tiny test model with a convolutional image tower (open_clip's ModifiedResNet)."""
    arch = copy.deepcopy(tiny_arch)
    arch["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 8}
    return build_model("t-resnet", arch=arch)


def test_cpu_keeps_contiguous_convolutions(tiny_resnet):
    m = ContrastiveModule(copy.deepcopy(tiny_resnet.model), ClipLoss())
    m.setup("fit")
    assert not m.channels_last  # channels-last pays on CUDA only


# ------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@cuda
def test_bf16_mixed_on_cuda_matches_the_cpu_fp32_run(tmp_path, cpu_fp32):
    gpu = _train(tmp_path, "gpu", "trainer=gpu")  # bf16-mixed, one device
    assert all(math.isfinite(v) for v in gpu.losses)
    assert gpu.losses[0] == pytest.approx(cpu_fp32.losses[0], rel=3e-2)
    assert gpu.cap.dtypes["model.logit_scale"] == torch.float32
    assert "model.logit_scale" in _changed(gpu.cap)
    assert gpu.cap.fused is True  # the optimiser builder picks torch's fused AdamW on CUDA
    # a ViT tower has one convolution: left as it is
    assert gpu.cap.channels_last is False


@pytest.mark.gpu
@cuda
def test_fused_adamw_on_cuda_takes_the_cpu_step(tiny_arch):
    bundle = build_model("t-fused", arch=tiny_arch)
    cfg = OptimConfig(lr=1e-3)
    models = {d: copy.deepcopy(bundle.model).to(d) for d in ("cpu", "cuda")}
    opts = {"cpu": build_optimizer(models["cpu"], cfg, fused=False), "cuda": build_optimizer(models["cuda"], cfg)}
    assert opts["cuda"].defaults["fused"] is True and not opts["cpu"].defaults["fused"]
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=g) for n, p in models["cpu"].named_parameters()}
    for d, model in models.items():
        for n, p in model.named_parameters():
            p.grad = grads[n].to(d)
        opts[d].step()
    cpu = dict(models["cpu"].named_parameters())
    for n, p in models["cuda"].named_parameters():
        torch.testing.assert_close(p.detach().cpu(), cpu[n].detach(), rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.gpu
@cuda
def test_convolutional_tower_runs_channels_last_on_cuda(tiny_resnet):
    batch = {"image": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
             "text": tiny_resnet.tokenizer([f"caption {i}" for i in range(8)])}
    losses = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        m = ContrastiveModule(copy.deepcopy(tiny_resnet.model), ClipLoss()).to(device)
        m.setup("fit")
        assert m.channels_last == (device == "cuda")
        if device == "cuda":
            conv = next(x for x in m.model.visual.modules() if isinstance(x, torch.nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        m.train()
        on_device = {k: v.to(device) for k, v in batch.items()}
        losses[device] = float(m.contrastive_backward(on_device, lambda loss: loss.backward()))
    # cuDNN may compute the convolutions in TF32
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-2)


@pytest.mark.gpu
@cuda
def test_compiled_towers_train_as_eager_ones(tmp_path):
    eager = _train(tmp_path, "eager", "trainer=gpu", "trainer.precision=32-true")
    compiled = _train(tmp_path, "compiled", "trainer=gpu", "trainer.precision=32-true", "compile=true")
    assert all(math.isfinite(v) for v in compiled.losses)
    assert compiled.losses[0] == pytest.approx(eager.losses[0], rel=1e-2)  # fused kernels round differently
    assert "model.logit_scale" in _changed(compiled.cap)
