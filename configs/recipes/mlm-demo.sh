#!/usr/bin/env bash
# The masked-LM demo end to end (README "Masked-LM pretraining"): pretrain a small BERT-style
# encoder on the embedded corpus, fill masks with it, then finetune it with a new
# classification layer on the corpus' replaced-word task (`tasks word-order --corruption replace`)
# and the same finetune from random weights: the transfer margin lands in $RUNS/mlm-results.txt.
#
#     bash configs/recipes/mlm-demo.sh            # writes runs/mlm-*; RUNS=DIR to change
set -euo pipefail
cd "$(dirname "$0")/../.."
MAXTRAIN=${MAXTRAIN:-maxtrain}
RUNS=${RUNS:-runs}
start=$(date +%s)
stamp() { echo "== $(( $(date +%s) - start ))s: $*"; }

stamp "masked-LM pretraining"
$MAXTRAIN train configs/recipes/mlm-pretrain.yaml run_dir="$RUNS/mlm-demo"
$MAXTRAIN fill-mask --checkpoint "$RUNS/mlm-demo" --text "Return a <mask> of the keys." \
    --text "If the <mask> is not found, raise KeyError." --text "The <mask> module provides functions for working with files."

stamp "word-order task"
$MAXTRAIN tasks word-order "$RUNS/word-order" --corruption replace --share 0.3
data="data.sources=[{type: jsonl, path: $RUNS/word-order/word_order_train.jsonl}]"
sets="eval.sets={word-order: [{type: jsonl, path: $RUNS/word-order/word_order_eval.jsonl}]}"
tok="data.tokenizer.path=$RUNS/mlm-demo/tokenizer.model"
stamp "finetune the pretrained encoder"
$MAXTRAIN train configs/recipes/mlm-classify.yaml run_dir="$RUNS/mlm-classify" init_from="$RUNS/mlm-demo" "$data" "$sets" "$tok"
stamp "the same finetune from random weights"
$MAXTRAIN train configs/recipes/mlm-classify.yaml run_dir="$RUNS/mlm-classify-scratch" init_from=null "$data" "$sets" "$tok"
stamp "done"

${PYTHON:-python} - "$RUNS" <<'PY' | tee "$RUNS/mlm-results.txt"
import json, sys
from pathlib import Path
runs = Path(sys.argv[1])
s = json.loads((runs / "mlm-demo" / "summary.json").read_text())
evals = [json.loads(l) for l in (runs / "mlm-demo" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
print(f"masked LM: held-out masked-token loss {s['first_eval_loss']:.2f} -> {s['final_eval_loss']:.2f} "
      f"(unigram entropy {s['unigram_entropy']:.2f}); accuracy {evals[0]['eval_accuracy']:.3f} -> {evals[-1]['eval_accuracy']:.3f}")
for name in ("mlm-classify", "mlm-classify-scratch"):
    final = [json.loads(l) for l in (runs / name / "metrics.jsonl").read_text().splitlines() if "eval_loss/word-order" in l][-1]
    print(f"{name}: word-order held-out accuracy {final['eval_accuracy/word-order']:.3f}")
PY
