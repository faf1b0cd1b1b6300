#!/usr/bin/env bash
# The finetuning demo end to end (README "Finetuning"): pretrain a small char-level Llama,
# then SFT it (full and LoRA) on the synthetic task suite and train a classification head;
# held-out exact match / accuracy before and after. Run from anywhere in a clone:
#
#     bash configs/recipes/tasks-demo.sh            # writes runs/tasks-*; RUNS=DIR to change
#
# Results land in $RUNS/demo-results.txt (and the per-run eval JSON next to it).
set -euo pipefail
cd "$(dirname "$0")/../.."
MAXTRAIN=${MAXTRAIN:-maxtrain}
RUNS=${RUNS:-runs}
EVAL=$RUNS/tasks-data/eval.jsonl
at() { echo "$RUNS/$1"; }
over() {  # the recipes' paths, moved under $RUNS
    echo "data.tokenizer.path=$(at tasks-base/tokenizer.model)" "init_from=$(at tasks-base)"
}
start=$(date +%s)
stamp() { echo "== $(( $(date +%s) - start ))s: $*"; }

stamp "task suite"
$MAXTRAIN tasks make "$(at tasks-data)"

stamp "pretrain"
$MAXTRAIN train configs/recipes/tasks-pretrain.yaml run_dir="$(at tasks-base)"

for recipe in sft lora; do
    cfg=configs/recipes/tasks-$recipe.yaml
    data="data.sources=[{type: jsonl, path: $(at tasks-data/train.jsonl)}]"
    if [ $recipe = sft ]; then
        stamp "exact match before finetuning (the pretrained base)"
        $MAXTRAIN eval $cfg $(over) "$data" --data "$EVAL" --params "$(at tasks-base)" --max-new-tokens 16 --out "$(at eval-base.json)"
    fi
    stamp "SFT $recipe"
    $MAXTRAIN train $cfg run_dir="$(at tasks-$recipe)" $(over) "$data"
    $MAXTRAIN eval $cfg run_dir="$(at tasks-$recipe)" $(over) "$data" --data "$EVAL" --max-new-tokens 16 --out "$(at eval-$recipe.json)"
done

stamp "classification"
cfg=configs/recipes/tasks-classify.yaml
data="data.sources=[{type: jsonl, path: $(at tasks-data/cls_train.jsonl)}]"
$MAXTRAIN train $cfg run_dir="$(at tasks-classify)" $(over) "$data"
$MAXTRAIN eval $cfg run_dir="$(at tasks-classify)" $(over) "$data" --data "$(at tasks-data/cls_eval.jsonl)" --out "$(at eval-classify.json)"
stamp "done"

${PYTHON:-python} - "$RUNS" <<'EOF' | tee "$RUNS/demo-results.txt"
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
acc = lambda name: json.loads((runs / f"eval-{name}.json").read_text())
base = acc("base")
print(f"exact match before finetuning: {base['accuracy']:.3f} on {base['count']} held-out prompts")
for name in ("sft", "lora"):
    r, s = acc(name), json.loads((runs / f"tasks-{name}" / "summary.json").read_text())
    tasks = ", ".join(f"{t} {a:.2f}" for t, a in r["per_task"].items())
    print(f"{name}: exact match {base['accuracy']:.3f} -> {r['accuracy']:.3f} ({tasks}); "
          f"pretraining loss {s['forgetting_loss_before']:.2f} -> {s['forgetting_loss_after']:.2f}; "
          f"trainable {s['trainable_params'] / s['total_params']:.1%}")
print(f"classification accuracy: {acc('classify')['accuracy']:.3f}")
EOF
