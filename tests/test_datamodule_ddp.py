"""WdsDataModule under a real 2-process DDP run (Lightning, CPU, gloo).

The test writes uneven shards, then starts this file as a script twice, one process per rank, the
way torchrun does (LOCAL_RANK, WORLD_SIZE, MASTER_PORT: Lightning sees an external launcher), so the
two ranks import in parallel. Each rank records its training steps and validation keys; the
validation keys are also gathered over ranks at epoch end, as a real metric would be.

    LOCAL_RANK=0 WORLD_SIZE=2 ... python tests/test_datamodule_ddp.py <shard root> <out dir>
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers_shards import basic_samples, char_tokenizer, tiny_transform, untokenize, write_shards  # noqa: E402

BATCH, EPOCHS = 4, 2
TRAIN_PER_SHARD = 9  # 39 samples -> shards of 9, 9, 9, 9, 3: uneven, and 5 shards for 4 readers
VAL_SETS = {"a": (7, 3), "b": (11, 6)}  # name: (samples, per shard)


def write_data(root: Path) -> None:
    write_shards(root / "train", basic_samples(39, prefix="t"), TRAIN_PER_SHARD, split="train")
    for name, (n, per_shard) in VAL_SETS.items():
        write_shards(root / name, basic_samples(n, prefix=name), per_shard, split="val")


def main(root: Path, out: Path) -> None:
    import lightning as L
    import torch
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    from cliptune.data.datamodule import WdsDataModule

    torch.set_num_threads(1)

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)
            self.steps: Counter = Counter()
            self.train_texts: list[str] = []
            self.val_keys: dict[int, list[str]] = {}
            self.gathered: list[dict[str, list[str]]] = []

        def training_step(self, batch, batch_idx):
            self.steps[self.current_epoch] += 1
            self.train_texts += [untokenize(t) for t in batch["text"]]
            return self.lin(batch["image"].mean((2, 3))).mean()  # DDP all-reduces grads: a step mismatch hangs

        def on_validation_epoch_start(self) -> None:
            self.val_keys = {}

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            self.val_keys.setdefault(dataloader_idx, []).extend(batch["key"])

        def on_validation_epoch_end(self) -> None:
            names = self.trainer.datamodule.val_set_names
            mine = {names[i]: keys for i, keys in self.val_keys.items()}
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            merged = {n: [k for part in everyone for k in part.get(n, [])] for n in names}
            self.gathered.append(merged)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = WdsDataModule(
        train=str(root / "train"),
        val={name: str(root / name) for name in VAL_SETS},
        batch_size=BATCH,
        workers=2,
        resampled=False,
        sample_shuffle=10,
        tokenizer=char_tokenizer,
        train_transform=tiny_transform(),
        val_transform=tiny_transform(),
    )
    module = Probe()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"), max_epochs=EPOCHS,
        use_distributed_sampler=dm.use_distributed_sampler, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.validate(module, datamodule=dm, verbose=False)  # as cliptune-train does before fitting
    trainer.fit(module, datamodule=dm)
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "steps": {str(k): v for k, v in module.steps.items()},
        "train_texts": module.train_texts,
        "gathered": module.gathered,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


@pytest.mark.ddp
def test_wds_datamodule_two_ranks(tmp_path):
    write_data(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0", "LOCAL_RANK": str(rank),
               "RANK": str(rank)}
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, __file__, str(tmp_path), str(out)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=240)  # a rank stuck in a collective (unequal steps) ends here
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    for rank, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (out / f"rank{rank}.log").read_text()[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # training: the same number of steps on both ranks in every epoch, with 5 uneven shards
    per_epoch = 39 // (BATCH * 2)
    for r in ranks:
        assert r["steps"] == {str(e): per_epoch for e in range(EPOCHS)}
        assert r["global_step"] == per_epoch * EPOCHS
    texts = [t for r in ranks for t in r["train_texts"]]
    assert {int(t[1:6]) // TRAIN_PER_SHARD for t in texts} == set(range(5))  # every shard read
    assert set(ranks[0]["train_texts"]) != set(ranks[1]["train_texts"])

    # validation: every key exactly once over the two ranks, each time (validate + one per epoch)
    for r in ranks:
        assert len(r["gathered"]) == 1 + EPOCHS
        for merged in r["gathered"]:
            for name, (n, _) in VAL_SETS.items():
                assert sorted(merged[name]) == [f"{name}{i:05d}" for i in range(n)], (name, merged[name])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
