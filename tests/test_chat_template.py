"""A model's own chat template (tokenizer_config.json's jinja chat_template) renders SFT data
exactly as transformers' apply_chat_template does, with reply masks on assistant turns only."""

import json

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from maxtrain.config import load_config  # noqa: E402
from maxtrain.data.formats import RecordEncoder, prompt_and_reference, template_for  # noqa: E402
from maxtrain.data.tokenizer import load_tokenizer  # noqa: E402
from maxtrain.errors import UserError  # noqa: E402

# Llama 3's template shape: BOS, a header per turn, <|eot_id|> after each.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sort: 3 1 2"},
        {"role": "assistant", "content": "1 2 3"}, {"role": "user", "content": "reverse: a b"},
        {"role": "assistant", "content": "b a"}]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    words = "be brief sort reverse system user assistant a b 1 2 3 : . \n".split(" ")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(words)] * 20 + [json.dumps(CHAT)] * 20, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return d


def test_rendering_equals_apply_chat_template_and_masks_replies(model_dir):
    ours = load_tokenizer(str(model_dir / "tokenizer.json"), bos="<|begin_of_text|>", eos="<|eot_id|>")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    theirs.chat_template = TEMPLATE
    template = template_for("auto", "llama", ours)
    assert template.name == "model"
    enc = RecordEncoder(load_config(None, ["data.format={type: sft}", f"data.tokenizer.path={model_dir}/tokenizer.json"]).data.format, ours)
    doc = enc({"messages": CHAT}, "r")
    expected = theirs.apply_chat_template(CHAT, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else list(expected)
    np.testing.assert_array_equal(doc["tokens"], expected)
    # The trained targets decode to each reply plus its <|eot_id|>, nothing else.
    trained = doc["tokens"][1:][doc["weights"][:-1] > 0]
    assert theirs.decode(trained) == "1 2 3<|eot_id|>b a<|eot_id|>"
    # A prompt for generation ends with the assistant header, as add_generation_prompt renders it.
    ids, ref = prompt_and_reference({"messages": CHAT[:3]}, ours, template)
    want = theirs.apply_chat_template(CHAT[:2], tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if hasattr(want, "keys") else list(want)
    np.testing.assert_array_equal(ids, want)
    assert ref == "1 2 3"


def test_template_model_without_one_is_a_user_error(tmp_path):
    from maxtrain.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    tok = SentencePieceTokenizer(train_sentencepiece(["abc"] * 5, vocab_size=270, model_type="char"))
    with pytest.raises(UserError, match="has no chat_template"):
        template_for("model", "llama", tok)
    assert template_for("auto", "llama", tok).name == "llama3"  # no template of its own: the family's


def test_a_chat_template_jinja_file_beside_the_tokenizer_is_found(tmp_path):
    """transformers >= 4.50 saves the template as chat_template.jinja, not in tokenizer_config.json."""
    import json

    from maxtrain.data.tokenizer import chat_template_near

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'old' }}"}))
    assert chat_template_near(str(tmp_path / "tokenizer.json")) == "{{ 'old' }}"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert chat_template_near(str(tmp_path / "tokenizer.json")).startswith("{% for m in messages %}")
