#!/usr/bin/env bash
# The bilingual (English/Chinese) demo, AltCLIP's two-stage recipe on the emoji domain, offline on a CPU:
#   0. demo data (English and Chinese names), 1. the English CLIP of `make demo` (teacher; MiniLM reads no Chinese),
#   2. text distillation into a small XLM-R (parallel names, never a validation emoji's), 3. the student
#   plugged into the teacher's CLIP, trained on English and Chinese names with the image tower frozen.
#   bash scripts/demo_bilingual.sh                              # after `make setup`
#   DISTILL_STEPS=400 STAGE2_STEPS=200 bash scripts/demo_bilingual.sh
# Outputs: demo_data/, demo_runs/bilingual/{teacher,distill,stage2,eval_teacher}/ and summary.md (R@K per
# language before and after each stage). The teacher is demo_runs/demo/loss=clip when `make demo` made it.
# Re-running resumes: finished stages are kept, a killed one continues (delete demo_runs/bilingual to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
DATA="${DEMO_DATA:-demo_data}"
RUNS="${DEMO_RUNS:-demo_runs}"
TEACHER_STEPS="${TEACHER_STEPS:-100}"
DISTILL_STEPS="${DISTILL_STEPS:-200}"
STAGE2_STEPS="${STAGE2_STEPS:-100}"
OUT="$RUNS/bilingual"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
start=$(date +%s)
TRAINER=cpu
if "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  TRAINER=gpu
fi
mkdir -p "$OUT"
: > "$OUT/times.txt"

finished() {  # finished <run dir> <steps>: its metrics.json records that many steps and its export is complete
  [[ -f "$1/metrics.json" && -f "$1/export/open_clip_config.json" ]] && grep -q '"global_step": '"$2"',' "$1/metrics.json"
}
resume_of() {  # resume=true when the run has a checkpoint to continue from
  if [[ -f "$1/checkpoints/last.ckpt" ]]; then echo "resume=true"; else echo "overwrite=true"; fi
}
timed() {  # timed <stage> <command...>: run it, append the stage's wall-clock seconds to times.txt
  local stage="$1" t0
  shift
  t0=$(date +%s)
  "$@"
  echo "$stage $(( $(date +%s) - t0 ))" >> "$OUT/times.txt"
}

echo "== 0/3 demo data -> $DATA/"
timed data "$VENV/bin/cliptune-demo-data" --out "$DATA" --no-progress

TEACHER="$RUNS/demo/loss=clip"  # the CLIP run of `make demo`
if [[ ! -f "$TEACHER/export/open_clip_config.json" ]]; then
  TEACHER="$OUT/teacher"
  echo "== 1/3 the English CLIP (teacher): cliptune-train experiment=demo, $TEACHER_STEPS steps -> $TEACHER"
  if finished "$TEACHER" "$TEACHER_STEPS"; then
    echo "   done already"
  else
    timed teacher "$VENV/bin/cliptune-train" experiment=demo "demo_data=$DATA" "trainer=$TRAINER" \
        "trainer.max_steps=$TEACHER_STEPS" "hydra.run.dir='$TEACHER'" "$(resume_of "$TEACHER")"
  fi
else
  echo "== 1/3 the English CLIP (teacher): $TEACHER (from make demo)"
fi
if [[ ! -f "$OUT/eval_teacher/results.json" ]]; then
  timed eval_teacher "$VENV/bin/cliptune-eval" "load='$TEACHER'" "sets={emoji:'$DATA/val.json'}" \
      "caption_lang=[en,zh]" zeroshot.enabled=false workers=1 "out='$OUT/eval_teacher'"
fi

DISTILL="$OUT/distill"
echo "== 2/3 text distillation (cliptune-distill distill=demo, $DISTILL_STEPS steps) -> $DISTILL"
if finished "$DISTILL" "$DISTILL_STEPS"; then
  echo "   done already"
else
  timed distill "$VENV/bin/cliptune-distill" distill=demo "demo_data=$DATA" "teacher.load='$TEACHER'" \
      "trainer=$TRAINER" "trainer.max_steps=$DISTILL_STEPS" "hydra.run.dir='$DISTILL'" "$(resume_of "$DISTILL")"
fi

STAGE2="$OUT/stage2"
echo "== 3/3 contrastive on English and Chinese names, image tower frozen ($STAGE2_STEPS steps) -> $STAGE2"
if finished "$STAGE2" "$STAGE2_STEPS"; then
  echo "   done already"
else
  timed stage2 "$VENV/bin/cliptune-train" experiment=demo_bilingual "demo_data=$DATA" \
      "model.name='local-dir:$TEACHER/export'" "model.text_from='$DISTILL'" "trainer=$TRAINER" \
      "trainer.max_steps=$STAGE2_STEPS" "hydra.run.dir='$STAGE2'" "$(resume_of "$STAGE2")"
fi

"$VENV/bin/python" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
teacher = json.loads((out / "eval_teacher" / "results.json").read_text())["sets"]
stage2 = json.loads((out / "stage2" / "metrics.json").read_text())
rows = [("English CLIP (teacher: the demo's CLIP run)", teacher["emoji:en"]["metrics"], teacher["emoji:zh"]["metrics"],
         teacher["emoji:en~zh"]["metrics"]),
        ("after distillation (student plugged in)", *(stage2["before"][s] for s in ("emoji:en", "emoji:zh", "emoji:en~zh"))),
        ("after contrastive on en+zh", *(stage2["after"][s] for s in ("emoji:en", "emoji:zh", "emoji:en~zh")))]
chance = stage2["chance"]["emoji:zh"]
times = dict(line.split() for line in (out / "times.txt").read_text().splitlines() if line.strip())
lines = ["| model | en t2i R@1 | R@5 | R@10 | zh t2i R@1 | R@5 | R@10 | zh/en R@5 | en~zh same top-1 |",
         "|---|---|---|---|---|---|---|---|---|"]
for name, en, zh, xl in rows:
    ratio = zh["t2i_R@5"] / en["t2i_R@5"] if en["t2i_R@5"] else float("nan")
    lines.append(f"| {name} | " + " | ".join(f"{m[f't2i_R@{k}']:.3f}" for m in (en, zh) for k in (1, 5, 10))
                 + f" | {ratio:.2f} | {xl['xling_top1']:.3f} |")
lines.append("| chance | " + " | ".join(f"{chance[f't2i_R@{k}']:.3f}" for _ in (0, 1) for k in (1, 5, 10)) + " | | |")
lines += ["", "seconds per stage (wall clock, this run): " + ", ".join(f"{k} {v}" for k, v in times.items())]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "bilingual demo finished in $(( $(date +%s) - start )) s; summary in $OUT/summary.md"
