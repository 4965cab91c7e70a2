#!/usr/bin/env bash
# The README demo: build the emoji domain, fine-tune with the CLIP and the SigLIP loss, compare.
#   make demo                                   # = bash scripts/demo.sh (after `make setup`)
#   DEMO_STEPS=300 bash scripts/demo.sh         # longer runs
# Outputs: demo_data/ (shards), demo_runs/demo/loss=clip|siglip/ (runs), demo_runs/demo/compare/
# (comparison.md / .csv, bootstrap_ci.csv, recall_at_k.png, train_loss.png, val_mean_R.png).
# Re-running resumes: finished runs are kept (delete demo_runs/ to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
DATA="${DEMO_DATA:-demo_data}"
RUNS="${DEMO_RUNS:-demo_runs}"
STEPS="${DEMO_STEPS:-100}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
start=$(date +%s)
TRAINER=cpu
if "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  TRAINER=gpu  # one GPU, bf16
fi

echo "== 1/3 demo data: OpenMoji images + English/Chinese names -> $DATA/"
"$VENV/bin/cliptune-demo-data" --out "$DATA"

echo "== 2/3 fine-tune (loss=clip, then loss=siglip; $STEPS steps each)"
for loss in clip siglip; do
  run="$RUNS/demo/loss=$loss"
  if [[ -f "$run/metrics.json" ]] && grep -q '"global_step": '"$STEPS" "$run/metrics.json"; then
    echo "   $run: done already"
    continue
  fi
  resume=()
  [[ -f "$run/checkpoints/last.ckpt" ]] && resume=(resume=true)
  "$VENV/bin/cliptune-train" experiment=demo "loss=$loss" "demo_data=$DATA" "out_root=$RUNS" \
      "trainer=$TRAINER" "trainer.max_steps=$STEPS" "hydra.run.dir='$run'" "${resume[@]}"
done

echo "== 3/3 compare the two runs"
"$VENV/bin/cliptune-compare" "$RUNS/demo/loss=clip" "$RUNS/demo/loss=siglip" --out "$RUNS/demo/compare"
echo "demo finished in $(( $(date +%s) - start )) s; plots and tables in $RUNS/demo/compare/"
