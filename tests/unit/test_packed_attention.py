"""Packed attention: per-sequence blocks, and shared prompts computed once, equal to plain forwards."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.data.layout import Group, PackedLayout
from posttrain.data.packing import IGNORE, pack, pack_shared, pad
from posttrain.data.tokenize import TokenizedExample
from posttrain.models.logprobs import nll_sum, target_logprobs
from posttrain.models.packed_attention import layout_plan


def _random_ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=g).tolist()


def _groups(seed: int) -> list[tuple[list[int], list[TokenizedExample]]]:
    """Prompts with 2, 1, 0 and 3 answers of ragged lengths; every answer token is a target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt_len, answer_lens in ((7, (4, 9)), (3, (5,)), (6, ()), (1, (2, 6, 3))):
        answers = [TokenizedExample(_random_ids(g, n), [True] * n) for n in answer_lens]
        out.append((_random_ids(g, prompt_len), answers))
    return out


def _as_sequences(groups) -> list[TokenizedExample]:
    """The same data as plain `prompt + answer` sequences, the prompt repeated for each answer."""
    return [
        TokenizedExample(prompt + a.input_ids, [False] * len(prompt) + a.loss_mask)
        for prompt, answers in groups
        for a in answers
    ]


def test_layout_positions_predecessors_and_sequence_ids():
    layout = PackedLayout((Group(0, 3, (2, 2)), Group(7, 2)))
    assert layout.position_ids() == [0, 1, 2, 3, 4, 3, 4, 0, 1]
    # each answer's first token follows the prompt's last token (index 2), not the other answer
    assert layout.previous_index().tolist() == [-1, 0, 1, 2, 3, 2, 5, -1, 7]
    assert layout.sequence_ids().tolist() == [-1, -1, -1, 0, 0, 1, 1, 2, 2]


def test_pack_shared_holds_each_prompt_once():
    groups = _groups(0)
    batch = pack_shared(groups)
    total = sum(len(p) + sum(len(a.input_ids) for a in answers) for p, answers in groups)
    assert batch.input_ids.shape == (1, total)
    assert batch.cu_seqlens.tolist() == [0, 20, 28, 34, total]
    assert batch.num_targets == sum(len(a.input_ids) for _, answers in groups for a in answers)
    # the prompt-only group has no targets; prompts never are
    assert (batch.labels[0, 28:34] == IGNORE).all()
    # targets are numbered by sequence: answers, and the answerless prompt (sequence 3) counts
    counts = torch.bincount(batch.target_sequence_ids(), minlength=7).tolist()
    assert counts == [4, 9, 5, 0, 2, 6, 3]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_shared_prompt_forward_equals_separate_sequences(arch, tiny_qwen2, tiny_llama):
    """Same log-probabilities and same gradients (through the prompt's keys and values too)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2 if arch == "qwen2" else tiny_llama)
    groups = _groups(1)
    shared, separate = pack_shared(groups), pack(_as_sequences(groups))
    assert shared.input_ids.shape[1] < separate.input_ids.shape[1]
    torch.testing.assert_close(
        target_logprobs(model, shared), target_logprobs(model, separate), atol=1e-5, rtol=0
    )
    renumber = lambda ids: torch.unique(ids, return_inverse=True)[1].tolist()  # noqa: E731
    assert renumber(shared.target_sequence_ids()) == separate.target_sequence_ids().tolist()
    padded = pad(_as_sequences(groups), pad_id=259)
    assert padded.target_sequence_ids().tolist() == separate.target_sequence_ids().tolist()
    model.zero_grad()
    nll_sum(model, shared).backward()
    g_shared = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    nll_sum(model, separate).backward()
    for a, b in zip(g_shared, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prompt_len", [6, 0])
def test_many_ragged_answers_of_one_prompt_equal_separate_sequences(prompt_len, tiny_qwen2):
    """GRPO's case: eight answers of one prompt attend in one batched call, each padded to the
    longest; the padding changes no log-probability and no gradient. (Three ragged answers
    take the single masked call instead, as DPO's pairs do.)"""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    g = torch.Generator().manual_seed(3)
    answers = [TokenizedExample(_random_ids(g, n), [True] * n) for n in (8, 9, 7, 8, 8, 3, 9, 8)]
    groups = [(_random_ids(g, prompt_len), answers), (_random_ids(g, 4), answers[5:])]
    shared, separate = pack_shared(groups), pack(_as_sequences(groups))
    assert [p.branches for p in layout_plan(shared.layout, torch.device("cpu"))] == [8, 0]
    torch.testing.assert_close(
        target_logprobs(model, shared), target_logprobs(model, separate), atol=1e-5, rtol=0
    )
    grads = []
    for batch in (shared, separate):
        model.zero_grad()
        nll_sum(model, batch).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_answers_of_one_prompt_do_not_see_each_other(tiny_qwen2):
    """Changing the first answer leaves the second's log-probabilities unchanged (the second
    comes later in the row, so only the layout's mask keeps it from attending to the first)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    prompt = list(range(10, 18))
    a, b = TokenizedExample([1, 2, 3, 4], [True] * 4), TokenizedExample([5, 6, 7], [True] * 3)
    a_changed = TokenizedExample([9, 9, 9, 9], [True] * 4)
    first = target_logprobs(model, pack_shared([(prompt, [a, b])]))[4:]
    second = target_logprobs(model, pack_shared([(prompt, [a_changed, b])]))[4:]
    torch.testing.assert_close(first, second, atol=1e-6, rtol=0)


def test_a_model_without_sdpa_attention_fails_loudly(tiny_qwen2):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, attn_implementation="eager")
    with pytest.raises(ValueError, match="packed batches need attn_implementation='sdpa'"):
        target_logprobs(model, pack_shared(_groups(2)))
