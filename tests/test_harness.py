"""lm-evaluation-harness on a maxtrain model: a local task YAML through the harness, checked by hand against transformers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")
from tests.test_scoring import BOS, EOS, _hf_loglikelihood, _words, model, torch  # noqa: E402,F401  (model: fixture)

RECORDS = [
    {"context": "w5 w9 w17", "choices": ["w33", "w40 w41 w42", "w7"], "label": 1},
    {"context": "w8", "choices": ["w8 w8", "w12"], "label": 0},
    {"context": "w20 w21 w22 w23", "choices": ["w30", "w31", "w32", "w33 w34"], "label": 3},
    {"context": "w60 w61", "choices": ["w10 w11", "w12"], "label": 1},
]
TASK_YAML = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""


@pytest.mark.slow
def test_local_multiple_choice_task_equals_a_hand_computation(model, tmp_path):
    hf, mt = model
    (tmp_path / "tasks").mkdir()
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "tasks" / "local_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "mc.jsonl"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0", HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))  # no network, no cache outside tmp_path
    cmd = [sys.executable, "-m", "maxtrain.cli", "harness", "--checkpoint", str(mt), "--tasks", "local_mc",
           "--include-path", str(tmp_path / "tasks"), "--batch-size", "4"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])["local_mc"]

    hits = hits_norm = 0
    for r in RECORDS:  # lm-eval: continuation " " + choice; acc_norm divides by the choice's length
        ll = [_hf_loglikelihood(hf, [BOS, *_words(r["context"])], _words(c)) for c in r["choices"]]
        hits += int(np.argmax(ll)) == r["label"]
        hits_norm += int(np.argmax([x / len(c) for x, c in zip(ll, r["choices"])])) == r["label"]
    assert (result["acc"], result["acc_norm"]) == (hits / 4, hits_norm / 4) and hits != hits_norm


def test_lm_requests_equal_transformers(model):
    from lm_eval.api.instance import Instance

    from maxtrain.harness_lm import MaxtrainLM

    hf, mt = model
    lm = MaxtrainLM(checkpoint=str(mt), batch_size=2)

    def req(kind, *args):
        return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)

    ll = lm.loglikelihood([req("loglikelihood", "", "w5 w6"), req("loglikelihood", "w5 w9 ", "w17 w3")])
    assert ll[0][0] == pytest.approx(_hf_loglikelihood(hf, [BOS], [5, 6]), abs=1e-4)
    assert ll[1][0] == pytest.approx(_hf_loglikelihood(hf, [BOS, 5, 9], [17, 3]), abs=1e-4)
    text = "w4 w5 w6 w7 w8 w9 w10"
    [rolling] = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert rolling == pytest.approx(_hf_loglikelihood(hf, [BOS], _words(text)), abs=1e-4)

    prompts = ["w5 w9 w17", "w40", "w7 w7 w7 w7 w11"]  # three prompts, batches of two: padded rows
    gen = {"until": ["w13"], "max_gen_toks": 6, "do_sample": False}
    outs = lm.generate_until([req("generate_until", p, gen) for p in prompts])
    tok = lm.tokenizer
    for prompt, out in zip(prompts, outs):
        ids = [BOS, *_words(prompt)]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=0)
        new = [t for t in ref[0, len(ids):].tolist() if t != EOS]
        assert out == tok.decode(new).split("w13")[0]
