"""cliptune.runtime: rank / world size from launcher variables and from a process group, devices."""

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from cliptune import runtime

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.fixture
def env(monkeypatch):
    """A clean launcher environment; set variables with ``env.setenv``."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_single_process_defaults(env):
    assert (runtime.rank(), runtime.world_size(), runtime.local_rank()) == (0, 1, 0)
    assert not runtime.is_distributed()


@pytest.mark.parametrize("variables, expected", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),  # torchrun
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "2"}, (5, 16, 2)),  # srun
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, (1, 2, 1)),  # Lightning's launcher: no RANK
    ({"RANK": "3", "SLURM_PROCID": "5", "WORLD_SIZE": "8", "SLURM_NTASKS": "16"}, (3, 8, 0)),  # torchrun inside srun
])
def test_rank_and_world_from_launcher_variables(env, variables, expected):
    for var, value in variables.items():
        env.setenv(var, value)
    assert (runtime.rank(), runtime.world_size(), runtime.local_rank()) == expected
    # without a process group nothing is split or gathered: the launcher alone does not count
    assert (runtime.rank(launcher=False), runtime.world_size(launcher=False)) == (0, 1)


def test_malformed_variable_is_named(env):
    env.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK='zero' is not an integer"):
        runtime.rank()


def test_process_group_wins_over_environment(env, tmp_path):
    env.setenv("RANK", "5")
    env.setenv("WORLD_SIZE", "8")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert runtime.is_distributed()
        assert (runtime.rank(), runtime.world_size()) == (0, 1)
        assert (runtime.rank(launcher=False), runtime.world_size(launcher=False)) == (0, 1)
        assert runtime.init_distributed(torch.device("cpu")) is False  # a group exists: not ours to make
    finally:
        runtime.teardown_distributed()
    assert not runtime.is_distributed()
    assert (runtime.rank(), runtime.world_size()) == (5, 8)  # after teardown the launcher's view again
    runtime.teardown_distributed()  # no group: nothing to do


def test_init_distributed_in_one_process_does_nothing(env):
    assert runtime.init_distributed(torch.device("cpu")) is False
    env.setenv("WORLD_SIZE", "1")
    assert runtime.init_distributed(torch.device("cpu")) is False
    assert not runtime.is_distributed()


def test_auto_device_is_cpu_without_cuda(env, no_cuda):
    assert runtime.device() == torch.device("cpu")
    assert runtime.device("auto") == torch.device("cpu")
    assert runtime.device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_auto_device_is_cpu_here():
    assert runtime.device("auto").type == "cpu"


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_clear_error(env, no_cuda, spec):
    with pytest.raises(ValueError, match=r"CUDA is not available .*device=cpu or device=auto"):
        runtime.device(spec)


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match=r"device='gpu0' is not a device: use auto, cpu, cuda"):
        runtime.device("gpu0")


def test_bare_cuda_under_a_launcher_is_one_gpu_per_rank(env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert runtime.device("cuda") == torch.device("cuda")  # one process: CUDA's current device
    env.setenv("WORLD_SIZE", "8")
    env.setenv("LOCAL_RANK", "2")
    assert runtime.device("cuda") == torch.device("cuda", 2)
    assert runtime.device("auto") == torch.device("cuda", 2)
    assert runtime.device("cuda:1") == torch.device("cuda", 1)  # an explicit index is kept
    with pytest.raises(ValueError, match="only 4 GPU"):
        runtime.device("cuda:7")


def test_importing_runtime_and_log_does_not_import_torch():
    code = ("import sys, cliptune.runtime, cliptune.log; cliptune.runtime.rank(); cliptune.runtime.world_size(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
