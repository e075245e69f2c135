"""Records to token ids with loss masks: chat templates through the tokenizer, answer-only loss.

A `TokenizedExample` holds `input_ids` and a `loss_mask` of the same length: True where the
token is a training target (predicted from the tokens before it). Prompt, system and user
tokens are never targets, and neither is the first token of a sequence, which packing relies on:
a packed row's shifted labels never cross from one sequence into the next.

Chat formatting works at the text level: the template renders the conversation up to a turn
and through it; the assistant's tokens are those of the difference. This needs only that the
template renders a prefix of a conversation as a prefix of its text, which holds for the
ChatML, Llama-3 and Qwen templates; a template where it does not is reported, not guessed at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from posttrain.data.records import CompletionRecord, ConversationRecord, DataError, Message, Prompt


@dataclass
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[bool]
    """True where input_ids[i] is a target; always False at position 0."""

    @property
    def num_targets(self) -> int:
        return sum(self.loss_mask)


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, mode: str) -> bool:
    """Resolve the `data.chat_template` setting ('auto' | 'always' | 'never') for this tokenizer."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has_template:
        raise ValueError("data.chat_template='always' but the tokenizer has no chat template")
    return has_template if mode == "auto" else mode == "always"


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool):
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _as_messages(prompt: Prompt) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat: bool) -> list[int]:
    """Token ids of a prompt, ready for the model to continue with its answer."""
    if chat:
        return _encode(tokenizer, _render(tokenizer, _as_messages(prompt), True))
    if not isinstance(prompt, str):
        raise ValueError("a conversation prompt needs a tokenizer with a chat template")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _encode(tokenizer, prompt)


def completion_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str, chat: bool
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) for one answer; the completion ends with end-of-turn/eos."""
    if not chat:
        return prompt_ids(tokenizer, prompt, chat), _encode(tokenizer, completion) + [
            tokenizer.eos_token_id
        ]
    messages = _as_messages(prompt)
    head = _render(tokenizer, messages, True)
    full = _render(tokenizer, messages + [{"role": "assistant", "content": completion}], False)
    if not full.startswith(head):
        raise ValueError(
            "the chat template does not render the prompt as a prefix of prompt + answer, "
            "so the answer's tokens cannot be told apart; use data.chat_template=never"
        )
    return _encode(tokenizer, head), _encode(tokenizer, full[len(head) :])


def conversation_example(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]
) -> TokenizedExample:
    """A whole conversation with every assistant turn as a target, everything else masked."""
    ids: list[int] = []
    mask: list[bool] = []
    text = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, list(messages[:i]), True)
        through = _render(tokenizer, list(messages[: i + 1]), False)
        if not (head.startswith(text) and through.startswith(head)):
            raise ValueError(
                "the chat template does not render each turn as a prefix of the next, so the "
                "assistant's tokens cannot be told apart"
            )
        context = _encode(tokenizer, head[len(text) :])
        answer = _encode(tokenizer, through[len(head) :])
        ids += context + answer
        mask += [False] * len(context) + [True] * len(answer)
        text = through
    if mask:
        mask[0] = False
    return TokenizedExample(ids, mask)


def tokenize_sft(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[CompletionRecord | ConversationRecord],
    *,
    source: str,
    chat: bool,
    max_length: int,
    max_prompt_length: int,
    truncate: bool = False,
) -> list[TokenizedExample]:
    """Tokenize SFT records; a prompt or sequence over its limit is a DataError naming the row."""
    examples = []
    for index, record in enumerate(records):
        row = record.row or index + 1
        if isinstance(record, ConversationRecord):
            example = conversation_example(tokenizer, record.messages)
            first_target = example.loss_mask.index(True) if example.num_targets else 0
            field, n_prompt = "messages", first_target
        else:
            head, tail = completion_ids(tokenizer, record.prompt, record.completion, chat)
            example = TokenizedExample(head + tail, [False] * len(head) + [True] * len(tail))
            field, n_prompt = "prompt", len(head)
        if n_prompt > max_prompt_length:
            raise DataError(
                source, row, field,
                f"prompt is {n_prompt} tokens, longer than data.max_prompt_length={max_prompt_length}",
            )  # fmt: skip
        if len(example.input_ids) > max_length:
            if not truncate:
                raise DataError(
                    source, row, field,
                    f"sequence is {len(example.input_ids)} tokens, longer than data.max_length="
                    f"{max_length} (set data.truncate=true to cut it)",
                )  # fmt: skip
            example = TokenizedExample(
                example.input_ids[:max_length], example.loss_mask[:max_length]
            )
        if example.num_targets == 0:
            raise DataError(source, row, field, "no answer tokens left to train on")
        examples.append(example)
    return examples
