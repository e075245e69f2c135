import string

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.cli import main
from posttrain.models.tiny import EOS_ID, build_model, build_tokenizer

TOKENIZER = build_tokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.printable, max_size=200))
def test_tokenizer_round_trips_any_ascii(text):
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    assert TOKENIZER.decode(ids) == text
    if "<|" not in text:  # special-token text such as "<|endoftext|>" is one token, on purpose
        assert len(ids) == len(text.encode())  # one token per byte: no merges to surprise a test


def test_chat_template_renders_chatml():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = TOKENIZER.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    assert ids.count(EOS_ID) == 2  # <|im_end|> is one special token, the eos


def test_same_seed_same_weights_different_seed_different():
    a, b, c = build_model(seed=0), build_model(seed=0), build_model(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_cli_builds_a_loadable_llama(tmp_path):
    assert main(["tiny-model", str(tmp_path / "m"), "--arch", "llama"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "llama"
    assert tokenizer.decode(tokenizer("a+b=3")["input_ids"]) == "a+b=3"
    assert tokenizer.eos_token_id == EOS_ID
    n_params = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < n_params < 5_000_000  # the "tiny" size: hidden 256 x 4 layers
