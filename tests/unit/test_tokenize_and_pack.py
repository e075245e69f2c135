"""Loss masks, chat templates, and packed vs padded batches on the tiny models."""

import json

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from posttrain.data.loading import load_records
from posttrain.data.packing import IGNORE, pack, pad
from posttrain.data.pairs import tokenize_pairs
from posttrain.data.records import (
    CompletionRecord,
    ConversationRecord,
    DataError,
    PreferenceRecord,
)
from posttrain.data.reward import RewardEncoder, tokenize_comparisons
from posttrain.data.tokenize import (
    Overlong,
    TokenizedExample,
    clip,
    conversation_example,
    longest_token_chars,
    over_limit,
    tokenize_sft,
)
from posttrain.models.logprobs import nll_sum, target_logprobs
from posttrain.models.tiny import EOS_ID, build_tokenizer

TOKENIZER = build_tokenizer()
LIMITS = dict(max_length=256, max_prompt_length=128)


def _ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def test_plain_completion_masks_prompt_and_ends_with_eos():
    [ex] = tokenize_sft(
        TOKENIZER, [CompletionRecord("2+2=", "4")], source="x", chat=False, **LIMITS
    )
    assert ex.input_ids == _ids("2+2=") + _ids("4") + [EOS_ID]
    assert ex.loss_mask == [False] * 4 + [True, True]


def test_chat_completion_trains_only_on_the_assistant_answer():
    [ex] = tokenize_sft(TOKENIZER, [CompletionRecord("hi", "yo")], source="x", chat=True, **LIMITS)
    head = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ex.input_ids == _ids(head) + _ids("yo<|im_end|>\n")
    targets = [t for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m]
    assert TOKENIZER.decode(targets) == "yo<|im_end|>\n"


def test_conversation_masks_every_non_assistant_turn():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "D"},
    ]
    ex = conversation_example(TOKENIZER, messages)
    full = TOKENIZER.apply_chat_template(messages, tokenize=False)
    assert TOKENIZER.decode(ex.input_ids) == full
    targets = [t for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m]
    assert TOKENIZER.decode(targets) == "B<|im_end|>\nD<|im_end|>\n"


def test_prompt_over_the_limit_names_file_row_and_field():
    records = [CompletionRecord("ok", "x", row=1), CompletionRecord("y" * 50, "x", row=7)]
    with pytest.raises(
        DataError,
        match=r"train.jsonl: row 7: field 'prompt': prompt is 50 tokens, longer than data.max_prompt_length=20",
    ):
        tokenize_sft(
            TOKENIZER,
            records,
            source="train.jsonl",
            chat=False,
            max_length=99,
            max_prompt_length=20,
        )


def test_sequence_over_max_length_names_the_completion_or_truncates():
    records = [CompletionRecord("p", "z" * 40, row=3)]
    # "p" is 1 token; the completion 40 + eos: 41 (the tiny tokenizer has a token per byte)
    with pytest.raises(
        DataError,
        match=r"^t: row 3: field 'completion': prompt \+ completion is 42 tokens \(prompt 1, "
        r"completion 41\), longer than data.max_length=10 \(set data.truncate=true to cut the "
        r"completion\)$",
    ):
        tokenize_sft(TOKENIZER, records, source="t", chat=False, max_length=10, max_prompt_length=5)
    [ex] = tokenize_sft(
        TOKENIZER,
        records,
        source="t",
        chat=False,
        max_length=10,
        max_prompt_length=5,
        truncate=True,
    )
    assert len(ex.input_ids) == 10 and ex.num_targets == 9


def _conversation_error(messages: list[dict], **limits) -> DataError:
    with pytest.raises(DataError) as caught:
        tokenize_sft(
            TOKENIZER, [ConversationRecord(messages, row=2)], source="c", chat=True, **limits
        )
    return caught.value


def test_conversation_prompt_over_the_limit_names_the_message():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "u" * 60},
        {"role": "assistant", "content": "a"},
    ]
    # <|im_start|> x 3, <|im_end|> x 2, and a token per byte of "system\n" (7), "be brief" (8),
    # "\n" x 2, "user\n" (5), 60 u's, "assistant\n" (10)
    assert 3 + 2 + 7 + 8 + 2 + 5 + 60 + 10 == 97
    err = _conversation_error(messages, max_length=999, max_prompt_length=30)
    assert str(err) == (
        "c: row 2: field 'messages[1].content': the messages before the first assistant turn are "
        "97 tokens, longer than data.max_prompt_length=30"
    )


@pytest.mark.parametrize("long_turn", [2, 3])
def test_conversation_over_max_length_names_the_message_that_passes_it(long_turn: int):
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "r"},
        {"role": "assistant", "content": "b"},
    ]
    messages[long_turn] = {**messages[long_turn], "content": "x" * 80}
    # per turn <|im_start|>, <|im_end|>, "\n"; "user\n" (5) twice, "assistant\n" (10) twice;
    # three one-letter contents and the 80 x's
    total = 4 * 3 + 2 * 5 + 2 * 10 + 3 + 80
    err = _conversation_error(messages, max_length=60, max_prompt_length=30)
    assert str(err) == (
        f"c: row 2: field 'messages[{long_turn}].content': the conversation is {total} tokens, "
        "longer than data.max_length=60, and passes it in this message (set data.truncate=true "
        "to cut it)"
    )
    [ex] = tokenize_sft(
        TOKENIZER,
        [ConversationRecord(messages, row=2)],
        source="c",
        chat=True,
        max_length=60,
        max_prompt_length=30,
        truncate=True,
    )
    assert len(ex.input_ids) == 60


class RecordingTokenizer:
    """The tiny tokenizer, noting the length of every text it tokenizes or renders: a spy that
    does no work of its own, so a test can see that a huge text never reached it whole."""

    def __init__(self) -> None:
        self.tokenizer, self.longest_input = build_tokenizer(), 0

    def __call__(self, text: str, *args, **kwargs):
        self.longest_input = max(self.longest_input, len(text))
        return self.tokenizer(text, *args, **kwargs)

    def apply_chat_template(self, messages: list[dict], **kwargs):
        self.longest_input = max(self.longest_input, sum(len(m["content"]) for m in messages))
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


HUGE = 3_000_000  # characters: tokenizing them whole takes the tiny tokenizer ~6 s
# The tiny tokenizer has a token per byte. With max_length=256, over_limit's first try is the
# first (256 + 1) x 8 = 2056 characters: 2056 tokens, over 256. clip keeps a start more than
# 2 x 256 tokens: its first try, (2 x 256 + 1) x 8 = 4104 characters, is.
PROOF = (256 + 1) * 8
CLIP = (2 * 256 + 1) * 8


def test_longest_token_chars_of_the_tiny_tokenizer():
    assert longest_token_chars(TOKENIZER) == len("<|endoftext|>") == 13


def test_huge_completion_fails_before_it_is_tokenized(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "p", "completion": "ok"}, {"prompt": "p", "completion": "z" * HUGE}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records = load_records(path, "completion")
    tokenizer = RecordingTokenizer()
    with pytest.raises(DataError) as caught:
        tokenize_sft(
            tokenizer, records, source=str(path), chat=True, max_length=256, max_prompt_length=128
        )
    assert str(caught.value) == (
        f"{path}: row 2: field 'completion': prompt + completion is at least 2056 tokens "
        f"(completion: {HUGE} characters), longer than data.max_length=256 (set "
        "data.truncate=true to cut the completion)"
    )
    assert tokenizer.longest_input <= PROOF


def test_huge_completion_is_truncated_without_tokenizing_it_whole():
    record = CompletionRecord("p", "start " + "z" * HUGE + " end", row=1)
    tokenizer = RecordingTokenizer()
    [ex] = tokenize_sft(
        tokenizer, [record], source="t", chat=True, max_length=256, max_prompt_length=128,
        truncate=True,
    )  # fmt: skip
    assert tokenizer.longest_input < CLIP + 100  # the clipped text, and the template's own
    head = _ids("<|im_start|>user\np<|im_end|>\n<|im_start|>assistant\n")
    assert ex.input_ids == head + _ids("start " + "z" * (256 - len(head) - 6))
    assert ex.loss_mask == [False] * len(head) + [True] * (256 - len(head))


def test_huge_prompt_fails_before_it_is_tokenized():
    tokenizer = RecordingTokenizer()
    with pytest.raises(DataError) as caught:
        tokenize_sft(
            tokenizer, [CompletionRecord("q" * HUGE, "a", row=4)], source="t", chat=False,
            max_length=256, max_prompt_length=128, truncate=True,
        )  # fmt: skip
    # (128 + 1) x 8 = 1032 characters, a token each
    assert str(caught.value) == (
        f"t: row 4: field 'prompt': prompt is at least 1032 tokens (prompt: {HUGE} characters), "
        "longer than data.max_prompt_length=128"
    )
    assert tokenizer.longest_input <= (128 + 1) * 8


def test_huge_conversation_message_fails_naming_it_or_is_truncated():
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "r" * HUGE},
        {"role": "assistant", "content": "b"},
    ]
    tokenizer = RecordingTokenizer()
    limits = dict(source="c", chat=True, max_length=256, max_prompt_length=128)
    with pytest.raises(DataError) as caught:
        tokenize_sft(tokenizer, [ConversationRecord(messages, row=5)], **limits)
    # the first 2056 characters: "q", "a" and 2054 r's
    assert str(caught.value) == (
        "c: row 5: field 'messages[2].content': the conversation is at least 2056 tokens "
        f"(messages[2].content: {HUGE} characters), longer than data.max_length=256 (set "
        "data.truncate=true to cut it)"
    )
    [ex] = tokenize_sft(tokenizer, [ConversationRecord(messages, row=5)], **limits, truncate=True)
    assert tokenizer.longest_input < CLIP + 100  # the clipped message, and the template's own
    start = TOKENIZER.apply_chat_template(messages[:2], tokenize=False) + "<|im_start|>user\n"
    assert ex.input_ids == _ids(start + "r" * (256 - len(_ids(start))))


def test_huge_rejected_answer_fails_before_it_is_tokenized_or_is_truncated():
    tokenizer = RecordingTokenizer()
    record = PreferenceRecord("p", "yes", "n" * HUGE, row=2)
    limits = dict(source="pairs.jsonl", chat=False, kto=False, seed=0, max_length=256,
                  max_prompt_length=128)  # fmt: skip
    with pytest.raises(DataError) as caught:
        tokenize_pairs(tokenizer, [record], **limits, truncate=False)
    assert str(caught.value) == (
        "pairs.jsonl: row 2: field 'rejected': prompt + rejected is at least 2056 tokens "
        f"(rejected: {HUGE} characters), longer than data.max_length=256 (set "
        "data.truncate=true to cut it)"
    )
    [pair] = tokenize_pairs(tokenizer, [record], **limits, truncate=True)
    assert tokenizer.longest_input <= CLIP
    assert pair.prompt == _ids("p") and pair.answers[1] == _ids("n" * 255)


def test_huge_response_fails_before_it_is_tokenized_or_keeps_its_end():
    tokenizer = RecordingTokenizer()
    encoder = RewardEncoder(tokenizer, decoder=True, chat=False)
    record = PreferenceRecord("p", "yes", "n" * HUGE + " the end", row=3)
    limits = dict(source="prefs.jsonl", heads=[], max_length=256, max_prompt_length=128)
    with pytest.raises(DataError) as caught:
        tokenize_comparisons(encoder, [record], **limits)
    assert str(caught.value) == (
        "prefs.jsonl: row 3: field 'rejected': prompt + response is at least 2056 tokens "
        f"(rejected: {HUGE + 8} characters), longer than data.max_length=256 (set "
        "data.truncate=true to cut the prompt from the left)"
    )
    [comparison] = tokenize_comparisons(encoder, [record], **limits, truncate=True)
    assert tokenizer.longest_input <= CLIP
    # a response longer than the limit alone keeps its last tokens: " the end" and the eos
    assert comparison.response_ids[1] == _ids("n" * 247 + " the end") + [EOS_ID]


def test_over_limit_does_not_trust_the_vocabulary_when_the_tokenizer_drops_text():
    # A word-level tokenizer that drops whitespace: 100,000 spaces between two words are 2
    # tokens, though its longest vocabulary entry is 5 characters.
    core = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    dropping = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    sparse = "a" + " " * 100_000 + "a"
    assert longest_token_chars(dropping) == 5 and len(dropping(sparse)["input_ids"]) == 2
    assert over_limit(dropping, [("completion", sparse)], 10, 5) is None
    assert clip(dropping, sparse, 10, 5) == sparse
    # 100,000 tokens, shown to be over 10 by the first (10 + 1) x 5 = 55 characters (28 a's),
    # and clipped to the first (2 x 10 + 1) x 5 = 105, as those are over 2 x 10 (53 a's)
    dense = "a " * 100_000
    found = over_limit(dropping, [("completion", dense)], 10, 5)
    assert found == Overlong("completion", len(dense), 28)
    assert clip(dropping, dense, 10, 5) == dense[:105]


def _examples(seed: int) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (5, 12, 3, 9):
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        mask = [False] + [i >= n // 2 for i in range(1, n)]
        out.append(TokenizedExample(ids, mask))
    return out


def test_pack_resets_positions_and_never_targets_a_sequence_start():
    batch = pack(_examples(0))
    assert batch.input_ids.shape == (1, 29)
    assert batch.position_ids[0].tolist() == [*range(5), *range(12), *range(3), *range(9)]
    assert batch.cu_seqlens.tolist() == [0, 5, 17, 20, 29]
    assert (batch.labels[0, batch.cu_seqlens[:-1]] == IGNORE).all()
    assert IGNORE not in batch.input_ids


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_and_padded_forwards_agree(arch, tiny_qwen2, tiny_llama):
    path = tiny_qwen2 if arch == "qwen2" else tiny_llama
    model = AutoModelForCausalLM.from_pretrained(path)
    examples = _examples(1)
    packed, padded = pack(examples), pad(examples, pad_id=259)
    assert padded.input_ids.shape == (4, 12)
    lp_packed = target_logprobs(model, packed)
    lp_padded = target_logprobs(model, padded)
    assert lp_packed.shape == (sum(e.num_targets for e in examples),)
    torch.testing.assert_close(lp_packed, lp_padded, atol=1e-5, rtol=0)
    # and each matches the sequence run alone, unbatched
    alone = torch.cat([target_logprobs(model, pack([e])) for e in examples])
    torch.testing.assert_close(lp_packed, alone, atol=1e-5, rtol=0)
    # gradients agree too
    model.zero_grad()
    nll_sum(model, packed).backward()
    g_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    nll_sum(model, padded).backward()
    for a, b in zip(g_packed, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_loss_is_answer_only_cross_entropy(tiny_qwen2):
    """Here's the maths: loss = sum over answer positions i of -log softmax(logits[i-1])[ids[i]]."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    examples = _examples(2)
    expected = 0.0
    for e in examples:
        logits = model(torch.tensor([e.input_ids])).logits[0]
        for i in range(1, len(e.input_ids)):
            if e.loss_mask[i]:
                expected += F.cross_entropy(logits[i - 1], torch.tensor(e.input_ids[i])).item()
    assert nll_sum(model, pack(examples)).item() == pytest.approx(expected, rel=1e-5)


def test_prompt_positions_get_no_gradient(tiny_qwen2):
    """The loss's gradient reaches the logits only at positions that predict an answer token."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    batch = pad(_examples(3), pad_id=259)
    captured = []

    def keep_logits(module, inputs, logits):
        logits.retain_grad()
        captured.append(logits)

    model.lm_head.register_forward_hook(keep_logits)
    nll_sum(model, batch).backward()
    grad = captured[0].grad.abs().sum(-1)  # (B, T)
    predicts_answer = torch.zeros_like(batch.labels, dtype=torch.bool)
    predicts_answer[:, :-1] = batch.labels[:, 1:] != IGNORE
    assert (grad[~predicts_answer] == 0).all()
    assert (grad[predicts_answer] > 0).all()
