#!/usr/bin/env bash
# Multi-node DDP training under SLURM: one task per GPU, Lightning reads the SLURM environment.
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 scripts/slurm_train.sh \
#       model=vit_b_32 model.pretrained=laion2b_s34b_b79k data=wds \
#       'data.train="s3://bucket/train-{000000..001023}.tar"' data.val.domain=/data/val.json
# Re-submitting the same command with resume=true continues from <run>/checkpoints/last.ckpt.
#SBATCH --job-name=cliptune
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
NODES="${SLURM_JOB_NUM_NODES:-1}"
GPUS="${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
# srun starts every rank; trainer=multinode sets strategy=ddp, num_nodes and devices from these.
srun --kill-on-bad-exit=1 .venv/bin/cliptune-train trainer=multinode \
    trainer.num_nodes="$NODES" trainer.devices="$GPUS" "$@"
