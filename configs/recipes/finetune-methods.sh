#!/usr/bin/env bash
# Every finetuning method on one base and one task suite, at matched step budgets (issue 19):
# full, partial (frozen embeddings + first 2 layers), LoRA, bottleneck adapters (Houlsby),
# (IA)^3, prompt tuning and prefix tuning, each SFT'd from the same pretrained char-level
# Llama (configs/recipes/methods-base.yaml: the corpus plus the tasks solved in plain text) on the
# synthetic suite (`maxtrain tasks make`) in the instruction template, then a table: held-out exact match,
# trainable parameters (% of the base), optimizer-state bytes, step time, peak memory (max
# RSS of the training process) and forgetting (pretraining held-out loss before -> after).
#
#     bash configs/recipes/finetune-methods.sh        # RUNS=DIR (default runs/methods), STEPS=per method, BASE_STEPS
#
# The base is cached: $RUNS/base is reused when it holds a finished run. The table lands in
# $RUNS/methods-table.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
MAXTRAIN=${MAXTRAIN:-maxtrain}
RUNS=${RUNS:-runs/methods}
STEPS=${STEPS:-200}
BASE_STEPS=${BASE_STEPS:-1500}
EVAL=$RUNS/data/eval.jsonl
mkdir -p "$RUNS"
start=$(date +%s)
stamp() { echo "== $(( $(date +%s) - start ))s: $*"; }

[ -f "$RUNS/data/train.jsonl" ] || { stamp "task suite"; $MAXTRAIN tasks make "$RUNS/data"; }
# The base learns the skills from the tasks solved in plain text ("d h b backwards is b h d"),
# mixed half and half with the corpus; the held-out prompts never appear in it.
[ -f "$RUNS/data/plain.jsonl" ] || $MAXTRAIN tasks plain "$RUNS/data/plain.jsonl" --exclude "$EVAL"
if [ ! -f "$RUNS/base/summary.json" ]; then
    stamp "pretrain the base ($BASE_STEPS steps)"
    $MAXTRAIN train configs/recipes/methods-base.yaml run_dir="$RUNS/base" steps="$BASE_STEPS" \
        "data.sources=[{type: embedded}, {type: jsonl, path: $RUNS/data/plain.jsonl, weight: 1}]"
fi

# name | lr | the method's overrides (on configs/recipes/tasks-sft.yaml)
METHODS=(
  "full|1e-3|"
  "partial|1e-3|finetune.freeze=[embeddings] finetune.freeze_layers=2"
  "lora|5e-3|finetune.lora={rank: 16, alpha: 32, targets: [q, k, v, o, gate, up, down]}"
  "adapter|5e-3|finetune.adapter={size: 32, placement: houlsby}"
  "ia3|1e-2|finetune.ia3={targets: [k, v, down]}"
  "prompt|3e-2|finetune.prompt_tuning={num_virtual_tokens: 16, init: vocab}"
  "prefix|1e-2|finetune.prefix_tuning={num_virtual_tokens: 16, reparameterize: true}"
)
common=("data.sources=[{type: jsonl, path: $RUNS/data/train.jsonl}]" "data.tokenizer.path=$RUNS/base/tokenizer.model"
        "init_from=$RUNS/base" "steps=$STEPS" "optimizer.warmup_steps=$(( STEPS / 10 ))")
cfg=configs/recipes/tasks-sft.yaml
stamp "exact match of the base"
$MAXTRAIN eval $cfg "${common[@]}" --data "$EVAL" --params "$RUNS/base" --max-new-tokens 16 --out "$RUNS/eval-base.json"
for row in "${METHODS[@]}"; do
    IFS='|' read -r name lr method <<< "$row"
    stamp "$name"
    args=("${common[@]}" "run_dir=$RUNS/$name" "optimizer.lr=$lr")
    if [ -n "$method" ]; then
        # split the overrides on ' finetune.' so values with spaces stay whole
        mapfile -t extra < <(echo "$method" | sed 's/ finetune\./\nfinetune./g')
        args=("${common[@]}" "run_dir=$RUNS/$name" "optimizer.lr=$lr" "${extra[@]}")
    fi
    /usr/bin/time -f "%M" -o "$RUNS/$name.maxrss" $MAXTRAIN train $cfg "${args[@]}"
    $MAXTRAIN eval $cfg "${args[@]}" --data "$EVAL" --max-new-tokens 16 --out "$RUNS/eval-$name.json"
done
stamp "done"

${PYTHON:-python} - "$RUNS" "$STEPS" "$(( $(date +%s) - start ))" <<'PY' | tee "$RUNS/methods-table.md"
import json, sys
from pathlib import Path
runs, steps, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
base = json.loads((runs / "eval-base.json").read_text())
print(f"base exact match {base['accuracy']:.3f}; {steps} steps per method; the script took {seconds // 60} min {seconds % 60} s\n")
print("| method | held-out exact match | per task (reverse, sort, add, lookup) | trainable (% of base) | optimizer state | step time | peak memory | pretraining loss before -> after |")
print("|---|---|---|---|---|---|---|---|")
for name in ("full", "partial", "lora", "adapter", "ia3", "prompt", "prefix"):
    s = json.loads((runs / name / "summary.json").read_text())
    ev = json.loads((runs / f"eval-{name}.json").read_text())
    em, per = ev["accuracy"], ev.get("per_task", {})
    per_task = " / ".join(f"{per[t]:.2f}" if t in per else "-" for t in ("reverse", "sort", "add", "lookup"))
    base_params = s["params"]
    step_ms = 4 * 256 / s["tokens_per_s"] * 1e3 if s.get("tokens_per_s") else float("nan")
    rss = int((runs / f"{name}.maxrss").read_text().split()[-1]) / 1024
    print(f"| {name} | {em:.3f} | {per_task} | {s['trainable_params']:,} ({100 * s['trainable_params'] / base_params:.2f}%) | "
          f"{s['optimizer_state_bytes'] / 2**20:.2f} MB | {step_ms:.0f} ms | {rss:.0f} MB | "
          f"{s['forgetting_loss_before']:.2f} -> {s['forgetting_loss_after']:.2f} |")
PY
