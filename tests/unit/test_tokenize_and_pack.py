"""Loss masks, chat templates, and packed vs padded batches on the tiny models."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from posttrain.data.packing import IGNORE, pack, pad
from posttrain.data.records import CompletionRecord, ConversationRecord, DataError
from posttrain.data.tokenize import TokenizedExample, conversation_example, tokenize_sft
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


def test_sequence_over_max_length_fails_or_truncates():
    records = [CompletionRecord("p", "z" * 40, row=3)]
    with pytest.raises(
        DataError,
        match=r"row 3: field 'prompt': sequence is 42 tokens, longer than data.max_length=10",
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


def test_conversation_row_in_error():
    long = [{"role": "user", "content": "u" * 60}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DataError, match=r"row 2: field 'messages': prompt is"):
        tokenize_sft(
            TOKENIZER,
            [ConversationRecord(long, row=2)],
            source="c",
            chat=True,
            max_length=999,
            max_prompt_length=30,
        )


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
