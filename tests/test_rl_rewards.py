"""RL rewards (maxtrain/rl/rewards.py): each type's values on hand-made completions, weights sum into the total, a
user's function gets TRL's arguments, every mistake is one UserError line naming the reward, and a maxtrain reward
model's scores come through unchanged."""

import json
import textwrap

import numpy as np
import pytest

from maxtrain.errors import UserError
from maxtrain.rl.config import RLConfig
from maxtrain.rl.rewards import build_rewards


def rewards_of(*specs):
    """The train.rl.rewards tuple of these dicts, validated by the real config."""
    return RLConfig.model_validate({"rewards": list(specs)}).rewards


def write_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))


def one_line_error(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


RECORDS = [{"prompt": "2+2=", "answer": 4}, {"prompt": "2+2=", "answer": 4},
           {"prompt": [{"role": "user", "content": "say hi"}], "answer": " hi ", "level": 3}]  # fmt: skip
COMPLETIONS = [" 4\n", "5", "hi"]
PROMPTS = [r["prompt"] for r in RECORDS]


def test_exact_match_and_format_values():
    rs = build_rewards(rewards_of({"type": "exact_match"}, {"type": "format", "pattern": r"\d+"},
                                  {"type": "exact_match", "field": "level", "name": "level"}))  # fmt: skip
    assert rs.names == ("exact_match", "format", "level")
    records = [dict(r, level=r.get("level", "x")) for r in RECORDS]
    total, parts = rs(PROMPTS, COMPLETIONS, records)
    # " 4\n" == str(4) after strip; "5" != "4"; "hi" == " hi ".strip()
    np.testing.assert_array_equal(parts["exact_match"], [1.0, 0.0, 1.0])
    # fullmatch on the stripped completion: digits only
    np.testing.assert_array_equal(parts["format"], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(parts["level"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(total, [2.0, 1.0, 1.0])
    assert total.dtype == np.float32 and all(v.dtype == np.float32 for v in parts.values())
    # A partial match is no match: the pattern must cover the whole completion.
    _, parts = build_rewards(rewards_of({"type": "format", "pattern": "<a>.*</a>"}))(
        ["p"] * 3, ["<a>x</a>", "<a>x</a> tail", "  <a></a>\n"], [{}] * 3)
    np.testing.assert_array_equal(parts["format"], [1.0, 0.0, 1.0])


def test_function_gets_prompts_completions_and_every_record_field(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "rw_fields", """
        SEEN = []

        def length(prompts, completions, **fields):
            SEEN.append((prompts, completions, fields))
            return [len(c if isinstance(c, str) else c[0]["content"]) for c in completions]
    """)
    rs = build_rewards(rewards_of({"type": "function", "function": "rw_fields:length"}))
    assert rs.names == ("length",)  # the default name is the function's
    total, parts = rs(PROMPTS, COMPLETIONS, RECORDS)
    np.testing.assert_array_equal(parts["length"], [3.0, 1.0, 2.0])
    np.testing.assert_array_equal(total, [3.0, 1.0, 2.0])
    import rw_fields

    (prompts, completions, fields), = rw_fields.SEEN
    assert prompts == PROMPTS  # chat-message prompts as the record has them
    # TRL's convention: a chat prompt's completion arrives as the assistant message
    assert completions == [" 4\n", "5", [{"role": "assistant", "content": "hi"}]]
    assert fields == {"answer": [4, 4, " hi "], "level": [None, None, 3]}  # every key but the prompt, in order


def test_weights_combine_into_the_total(tmp_path, monkeypatch):
    write_module(tmp_path, monkeypatch, "rw_weights", """
        import numpy as np

        def quarter(prompts, completions, **fields):
            return np.full(len(completions), 0.25)
    """)
    rs = build_rewards(rewards_of({"type": "exact_match", "weight": 2.0},
                                  {"type": "format", "pattern": r"\d", "weight": -0.5},
                                  {"type": "function", "function": "rw_weights:quarter", "weight": 4.0, "name": "q"},
                                  {"type": "format", "pattern": "h.", "weight": 0.0, "name": "logged_only"}))  # fmt: skip
    total, parts = rs(PROMPTS, COMPLETIONS, RECORDS)
    np.testing.assert_array_equal(parts["q"], [0.25] * 3)
    np.testing.assert_array_equal(parts["logged_only"], [0.0, 0.0, 1.0])  # weight 0: still logged
    # 2 x [1, 0, 1] - 0.5 x [1, 1, 0] + 4 x 0.25
    np.testing.assert_array_equal(total, [2.5, 0.5, 3.0])


def test_a_module_in_the_current_directory_imports(tmp_path, monkeypatch):
    (tmp_path / "rw_cwd.py").write_text("def one(prompts, completions, **kw):\n    return [1] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    total, _ = build_rewards(rewards_of({"type": "function", "function": "rw_cwd:one"}))(["p"], ["c"], [{}])
    np.testing.assert_array_equal(total, [1.0])


BAD_FUNCTIONS = """
    import math

    def boom(prompts, completions, **kw):
        raise ValueError("boom\\nsecond line")

    def quiet(prompts, completions, **kw):
        raise KeyError

    def short(prompts, completions, **kw):
        return [1.0] * (len(completions) - 1)

    def word(prompts, completions, **kw):
        return [1.0, "good", 0.0]

    def missing(prompts, completions, **kw):
        return [1.0, None, 0.0]

    def nan(prompts, completions, **kw):
        return [0.0, 1.0, math.nan]

    def inf(prompts, completions, **kw):
        return [math.inf, 1.0, 0.0]

    def scalar(prompts, completions, **kw):
        return 1.0

    def text(prompts, completions, **kw):
        return "1.0"
"""


@pytest.mark.parametrize("fn, why", [
    ("boom", "raised ValueError: boom; fix the function"),
    ("quiet", "raised KeyError; fix the function"),
    ("short", "returned 2 values for 3 completions"),
    ("word", "returned a non-number at index 1 ('good')"),
    ("missing", "returned a non-number at index 1 (None)"),
    ("nan", "returned nan at index 2; return finite numbers"),
    ("inf", "returned inf at index 0; return finite numbers"),
    ("scalar", "returned float; return a list of one number per completion (3)"),
    ("text", "returned str; return a list"),
])  # fmt: skip
def test_bad_function_results_are_one_line_naming_the_reward(tmp_path, monkeypatch, fn, why):
    write_module(tmp_path, monkeypatch, "rw_bad", BAD_FUNCTIONS)
    rs = build_rewards(rewards_of({"type": "format", "pattern": ".*"},
                                  {"type": "function", "function": f"rw_bad:{fn}", "name": "my_reward"}))  # fmt: skip
    msg = one_line_error(rs, PROMPTS, COMPLETIONS, RECORDS)
    assert msg.startswith(f"reward 'my_reward' (rw_bad:{fn}) ") and why in msg, msg


def test_missing_exact_match_field_names_the_field_and_the_fix():
    rs = build_rewards(rewards_of({"type": "exact_match", "field": "solution"}))
    msg = one_line_error(rs, PROMPTS, COMPLETIONS, RECORDS)
    assert msg.startswith("reward 'exact_match': a prompt record has no field 'solution' (it has: prompt, answer)")
    assert "train.rl.rewards[0].field" in msg


@pytest.mark.parametrize("specs, why", [
    ([], "train.rl.rewards is empty; add at least one reward"),
    ([{"type": "format", "pattern": "a"}, {"type": "format", "pattern": "b"}],
     "two rewards are named 'format' (train.rl.rewards[0] and [1]); set a distinct `name`"),
    ([{"type": "format", "pattern": "x", "name": "r"}, {"type": "exact_match", "name": "r"}], "two rewards are named 'r'"),
    ([{"type": "format", "pattern": "(unclosed"}], "train.rl.rewards[0].pattern '(unclosed' is not a regular expression"),
    ([{"type": "function", "function": "rw_build_no_colon"}], "must be 'module:function'"),
    ([{"type": "function", "function": "rw_nowhere_xyz:f"}], "no module 'rw_nowhere_xyz' on sys.path or in the current"),
    ([{"type": "function", "function": "rw_build:absent"}], "rw_build.py has no 'absent'; check the function's name"),
    ([{"type": "function", "function": "rw_build:CONSTANT"}], "is a int, not a function"),
    ([{"type": "function", "function": "rw_build_raises:f"}], "importing 'rw_build_raises' raised RuntimeError: no GPU"),
    ([{"type": "function", "function": "rw_build_imports:f"}],
     "importing 'rw_build_imports' raised ModuleNotFoundError: No module named 'not_installed_pkg'"),
    ([{"type": "model", "path": "/nonexistent/reward-run"}], "reward 'model' (/nonexistent/reward-run): "),
])  # fmt: skip
def test_build_time_errors_are_one_line(tmp_path, monkeypatch, specs, why):
    write_module(tmp_path, monkeypatch, "rw_build", "CONSTANT = 3\n\ndef f(prompts, completions, **kw):\n    return []\n")
    write_module(tmp_path, monkeypatch, "rw_build_raises", "raise RuntimeError('no GPU')\n")
    write_module(tmp_path, monkeypatch, "rw_build_imports", "import not_installed_pkg\n")
    msg = one_line_error(build_rewards, rewards_of(*specs))
    assert why in msg, msg


# -- a reward model trained by maxtrain ------------------------------------------------------------------------------

TEXT = "abcdefghijklmnopqrstuvwxyz0123456789 :+=\nUSERAsistn"
TINY_RM = ["model=tiny-llama", "model.num_heads=4", "model.num_kv_heads=2", "model.d_model=32", "model.ffn_dim=64",
           "model.vocab_size=320", "model.max_seq_len=64", "train.global_batch=8", "train.seq_len=64",
           "optimizer.warmup_steps=1", "optimizer.lr=1e-2", "optimizer.weight_decay=0", "steps=4",
           "train.objective=reward", "finetune.classifier={num_labels: 1, pooling: last}", "data.eval_fraction=0.25",
           "train.attention_query_block=0", "eval.every=0", "log.tensorboard=false"]  # fmt: skip
# eval_fraction > 0: the trainer's unigram-entropy baseline then reads the finite eval split; on the repeating train
# split it reads 2M tokens (minutes for 32 short pairs).


def test_model_reward_passes_the_reward_models_scores_through(tmp_path):
    from maxtrain.cli import main
    from maxtrain.data.tokenizer import train_sentencepiece
    from maxtrain.reward_model import RewardModel

    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(32):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        pairs.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + int(rng.integers(1, 9)))})
    (tmp_path / "tok.model").write_bytes(train_sentencepiece([TEXT * 3] * 20, vocab_size=80, model_type="char"))
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    run = tmp_path / "run"
    assert main(["train", *TINY_RM, f"run_dir={run}", f"data.tokenizer.path={tmp_path / 'tok.model'}",
                 f"data.sources=[{{type: jsonl, path: {tmp_path / 'pref.jsonl'}}}]",
                 "data.format={type: preference, template: plain}"]) == 0  # fmt: skip

    rs = build_rewards(rewards_of({"type": "model", "path": str(run), "weight": 2.0},
                                  {"type": "exact_match", "field": "sum", "weight": 0.5}))  # fmt: skip
    assert rs.names == ("model", "exact_match")
    prompts = ["3+4=", "3+4=", [{"role": "user", "content": "10+5="}], [{"role": "user", "content": "10+5="}]]
    completions = ["7", "9", "15", "16"]
    records = [{"prompt": p, "sum": s} for p, s in zip(prompts, [7, 7, 15, 15])]
    total, parts = rs(prompts, completions, records)

    expected = RewardModel.load(run).score(prompts, completions)
    np.testing.assert_array_equal(parts["model"], expected)  # unchanged, bit for bit
    assert np.std(expected) > 1e-4  # distinct scores: a real comparison
    np.testing.assert_allclose(total, 2.0 * expected + 0.5 * np.array([1, 0, 1, 0]), rtol=1e-6)
