#!/usr/bin/env bash
# The RLHF pipeline end to end on the synthetic task suite (README "Reinforcement learning"):
#   1. SFT a small pretrained char-level Llama (tasks-pretrain.yaml -> tasks-sft.yaml),
#   2. train a reward model on preference pairs from the SFT weights (reward.yaml),
#   3. GRPO from the SFT weights with that reward model as the reward (grpo.yaml + a model reward),
#   4. GRPO from the SFT weights with the verifiable exact-match reward (grpo.yaml),
# printing held-out exact match after each stage, the reward model's held-out pairwise
# accuracy, and the mean reward curves of both GRPO runs ($RUNS/rlhf-rewards.png).
#
#     bash configs/recipes/rlhf-pipeline.sh        # RUNS=DIR (default runs), GRPO_STEPS (default: grpo.yaml's)
#
# Finished stages are reused (a run dir holding summary.json), so a second call only prints.
set -euo pipefail
cd "$(dirname "$0")/../.."
MAXTRAIN=${MAXTRAIN:-maxtrain}
RUNS=${RUNS:-runs}
at() { echo "$RUNS/$1"; }
EVAL=$(at tasks-data/eval.jsonl)
start=$(date +%s)
stamp() { echo "== $(( $(date +%s) - start ))s: $*"; }
done_run() { [ -f "$(at "$1")/summary.json" ]; }
tok="data.tokenizer.path=$(at tasks-base/tokenizer.model)"
steps=${GRPO_STEPS:+steps=$GRPO_STEPS}
exact() {  # held-out exact match (greedy) of a run -> $RUNS/eval-NAME.json
    $MAXTRAIN eval configs/recipes/tasks-sft.yaml "$tok" init_from=null "data.sources=[{type: jsonl, path: $(at tasks-data/train.jsonl)}]" \
        --checkpoint "$(at "$1")" --data "$EVAL" --max-new-tokens 16 --out "$(at "eval-$1.json")"
}

[ -f "$(at tasks-data/train.jsonl)" ] || { stamp "task suite"; $MAXTRAIN tasks make "$(at tasks-data)"; }
done_run tasks-base || { stamp "pretrain"; $MAXTRAIN train configs/recipes/tasks-pretrain.yaml run_dir="$(at tasks-base)"; }
if ! done_run tasks-sft; then
    stamp "1. SFT"
    $MAXTRAIN train configs/recipes/tasks-sft.yaml run_dir="$(at tasks-sft)" init_from="$(at tasks-base)" "$tok" \
        "data.sources=[{type: jsonl, path: $(at tasks-data/train.jsonl)}]"
fi
[ -f "$(at eval-tasks-sft.json)" ] || exact tasks-sft
if ! done_run tasks-reward; then
    stamp "2. reward model"
    $MAXTRAIN train configs/recipes/reward.yaml run_dir="$(at tasks-reward)" init_from="$(at tasks-sft)" "$tok" \
        "data.sources=[{type: jsonl, path: $(at tasks-data/pref_train.jsonl)}]"
fi
[ -f "$(at eval-tasks-reward.json)" ] || $MAXTRAIN eval configs/recipes/reward.yaml "$tok" init_from=null \
    "data.sources=[{type: jsonl, path: $(at tasks-data/pref_train.jsonl)}]" --checkpoint "$(at tasks-reward)" \
    --data "$(at tasks-data/pref_eval.jsonl)" --out "$(at eval-tasks-reward.json)"
grpo=(configs/recipes/grpo.yaml init_from="$(at tasks-sft)" "$tok" "data.sources=[{type: jsonl, path: $(at tasks-data/train.jsonl)}]" $steps)
if ! done_run tasks-grpo-rm; then
    stamp "3. GRPO with the reward model"
    # The learned reward is the one optimised; exact match rides along at weight 0 (logged, not
    # trained on) to show whether the policy gets better or only better at pleasing the model.
    # A learned reward gets a stronger KL leash (beta 0.2) than a verifiable one.
    $MAXTRAIN train "${grpo[@]}" run_dir="$(at tasks-grpo-rm)" train.rl.beta=0.2 \
        "train.rl.rewards=[{type: model, path: $(at tasks-reward), name: reward_model}, {type: exact_match, field: output, weight: 0.0}]"
fi
[ -f "$(at eval-tasks-grpo-rm.json)" ] || exact tasks-grpo-rm
if ! done_run tasks-grpo; then
    stamp "4. GRPO with the exact-match reward"
    $MAXTRAIN train "${grpo[@]}" run_dir="$(at tasks-grpo)"
fi
[ -f "$(at eval-tasks-grpo.json)" ] || exact tasks-grpo
$MAXTRAIN plot "$(at tasks-grpo-rm)" "$(at tasks-grpo)" --out "$(at rlhf-rewards.png)"
stamp "done"

${PYTHON:-python} - "$RUNS" <<'PY' | tee "$RUNS/rlhf-results.txt"
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
load = lambda name: json.loads((runs / f"eval-{name}.json").read_text())
def rewards(name, key):
    values = [r[key] for r in map(json.loads, (runs / name / "metrics.jsonl").read_text().splitlines()) if key in r]
    k = max(1, len(values) // 5)
    return sum(values[:k]) / k, sum(values[-k:]) / k
print("stage                              held-out exact match   per task")
for label, name in (("1. SFT", "tasks-sft"), ("3. GRPO, reward model", "tasks-grpo-rm"), ("4. GRPO, exact match", "tasks-grpo")):
    r = load(name)
    print(f"{label:<35}{r['accuracy']:>8.3f}               " + ", ".join(f"{t} {a:.2f}" for t, a in r["per_task"].items()))
print(f"2. reward model: held-out pairwise accuracy {load('tasks-reward')['accuracy']:.3f}")
for name, key in (("tasks-grpo-rm", "rewards/reward_model"), ("tasks-grpo-rm", "rewards/exact_match"), ("tasks-grpo", "reward")):
    a, b = rewards(name, key)
    print(f"{name} mean {key}: first fifth of the run {a:.3f} -> last fifth {b:.3f}")
PY
