"""Records to token ids with loss masks: chat templates through the tokenizer, answer-only loss.

A `TokenizedExample` holds `input_ids` and a `loss_mask` of the same length: True where the
token is a training target (predicted from the tokens before it). Prompt, system and user
tokens are never targets, and neither is the first token of a sequence, which packing relies on:
a packed row's shifted labels never cross from one sequence into the next.

Chat formatting works at the text level: the template renders the conversation up to a turn
and through it; the assistant's tokens are those of the difference. This needs only that the
template renders a prefix of a conversation as a prefix of its text, which holds for the
ChatML, Llama-3 and Qwen templates; a template where it does not is reported, not guessed at.

Length limits are checked before a row is tokenized whole: of a row far longer than its limit,
only a start is tokenized, enough to prove it is over (`over_limit`) or, with truncation, to hold
every token truncation keeps (`clip`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from jinja2 import TemplateError
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
    # verbose=False: no warning that a text is longer than the model; limits are checked here
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    generation_prompt: bool,
    tools: list[dict] | None = None,
):
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
    )


def _as_messages(prompt: Prompt) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat: bool, tools: list[dict] | None = None
) -> list[int]:
    """Token ids of a prompt, ready for the model to continue with its answer; a chat template
    also gets the schemas of the `tools` the model may call."""
    if chat:
        return _encode(tokenizer, _render(tokenizer, _as_messages(prompt), True, tools))
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


def prompt_texts(prompt: Prompt) -> list[tuple[str, str]]:
    """A prompt's texts as (field, text) pairs, the way `over_limit` and error messages name them."""
    if isinstance(prompt, str):
        return [("prompt", prompt)]
    return [(f"prompt[{i}].content", m["content"]) for i, m in enumerate(prompt)]


def longest_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters one token can stand for: the longest vocabulary entry, added tokens
    included. Byte-level BPE writes an entry with one character per byte and SentencePiece with
    one per character, so through them a text of C characters is at least C / this many tokens."""
    return max(1, max(map(len, tokenizer.get_vocab()), default=1))


@dataclass(frozen=True)
class Overlong:
    """Proof, from a row's first characters, that it is over a token limit (`over_limit`)."""

    field: str
    """The text in which the counted characters end."""
    chars: int
    """That text's length in characters."""
    tokens: int
    """How many tokens the counted characters are: a lower bound on the row's."""

    def problem(self, what: str, limit: str, hint: str = "") -> str:
        return (
            f"{what} is at least {self.tokens} tokens ({self.field}: {self.chars} characters), "
            f"longer than {limit}{hint}"
        )


def over_limit(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[tuple[str, str]], limit: int, longest: int
) -> Overlong | None:
    """Whether `texts`, (field, text) pairs in sequence order, are surely more than `limit` tokens,
    judged from their start alone (`_trial_sizes`), so that a 50 MB row fails at once instead of
    after minutes and gigabytes of tokenizing.

    A start more than `limit` tokens proves it. None when no start tried does: the texts are
    short enough to tokenize whole, or drop text as they are tokenized (BERT drops whitespace)
    so that only tokenizing them whole can tell. Proving from tokens counted, not bounding by
    arithmetic alone, is what keeps this from refusing a row that would fit."""
    for size in _trial_sizes(limit, longest, sum(len(text) for _, text in texts)):
        parts, seen = [], 0
        for field, text in texts:  # the first `size` characters, and the text they end in
            parts.append(text[: size - seen])
            seen += len(text)
            if seen >= size:
                tokens = len(_encode(tokenizer, "".join(parts)))
                if tokens > limit:
                    return Overlong(field, len(text), tokens)
                break
    return None


def clip(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    limit: int,
    longest: int,
    *,
    keep_end: bool = False,
) -> str:
    """`text`, or when a start of it (`keep_end`: an end) is more than 2 x `limit` tokens, only
    that start: truncating to `limit` tokens or fewer keeps tokens from it alone, so the rest of a
    huge text is never tokenized. The tokens kept are the whole text's unless the word cut at the
    edge is itself over `limit` tokens long (only the cut word tokenizes differently)."""
    for size in _trial_sizes(2 * limit, longest, len(text)):
        part = text[-size:] if keep_end else text[:size]
        if len(_encode(tokenizer, part)) > 2 * limit:
            return part
    return text


def _trial_sizes(limit: int, longest: int, length: int) -> list[int]:
    """How many characters of a `length`-character text to tokenize, in turn, to show it is more
    than `limit` tokens: (limit + 1) x 8, x 32, x 128... characters, then (limit + 1) x
    `longest`, which for a tokenizer that drops no text is surely over (no token stands for more
    characters than the longest vocabulary entry has). Common text, at ~4 characters a token,
    is shown over at the first or second size; sizes from `length` up are left out, as the
    whole text would be tokenized anyway."""
    most = min((limit + 1) * longest, length - 1)
    sizes = []
    size = (limit + 1) * 8
    while size < most:
        sizes.append(size)
        size *= 4
    return sizes + [most] if most == (limit + 1) * longest else sizes


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
    """Tokenize SFT records, row by row. A prompt over `max_prompt_length` or (without `truncate`)
    a sequence over `max_length` tokens is a DataError naming the row and the field that is too
    long (`prompt`, `completion`, or a conversation's `messages[i].content`), with the lengths and
    the limit; a row far over its limit fails before it is tokenized whole (`over_limit`).
    `truncate` cuts the end of a longer sequence (of the completion, or of the conversation) to
    fit `max_length`; it never cuts a prompt."""
    limits = dict(
        longest=longest_token_chars(tokenizer),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncate=truncate,
    )
    examples = []
    for index, record in enumerate(records):
        fail = partial(DataError, source, record.row or index + 1)
        if isinstance(record, ConversationRecord):
            examples.append(_sft_conversation(tokenizer, record.messages, fail, **limits))
        else:
            examples.append(_sft_completion(tokenizer, record, chat, fail, **limits))
    return examples


def _sft_completion(
    tokenizer: PreTrainedTokenizerBase,
    record: CompletionRecord,
    chat: bool,
    fail: Callable[[str, str], DataError],
    *,
    longest: int,
    max_length: int,
    max_prompt_length: int,
    truncate: bool,
) -> TokenizedExample:
    prompt_limit = f"data.max_prompt_length={max_prompt_length}"
    length_limit = f"data.max_length={max_length}"
    cut_hint = " (set data.truncate=true to cut the completion)"
    texts = prompt_texts(record.prompt)
    if found := over_limit(tokenizer, texts, max_prompt_length, longest):
        raise fail(found.field, found.problem("prompt", prompt_limit))
    completion = record.completion
    if truncate:
        completion = clip(tokenizer, completion, max_length, longest)
    elif found := over_limit(tokenizer, [*texts, ("completion", completion)], max_length, longest):
        raise fail(found.field, found.problem("prompt + completion", length_limit, cut_hint))
    head, tail = completion_ids(tokenizer, record.prompt, completion, chat)
    if len(head) > max_prompt_length:
        raise fail("prompt", f"prompt is {len(head)} tokens, longer than {prompt_limit}")
    if len(head) + len(tail) > max_length and not truncate:
        raise fail(
            "completion",
            f"prompt + completion is {len(head) + len(tail)} tokens (prompt {len(head)}, "
            f"completion {len(tail)}), longer than {length_limit}{cut_hint}",
        )
    if len(head) >= max_length:
        raise fail(
            "prompt",
            f"prompt is {len(head)} tokens, which leaves no completion tokens to train on "
            f"within {length_limit}",
        )
    mask = [False] * len(head) + [True] * len(tail)
    return TokenizedExample((head + tail)[:max_length], mask[:max_length])


def _sft_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    fail: Callable[[str, str], DataError],
    *,
    longest: int,
    max_length: int,
    max_prompt_length: int,
    truncate: bool,
) -> TokenizedExample:
    prompt_limit = f"data.max_prompt_length={max_prompt_length}"
    length_limit = f"data.max_length={max_length}"
    before_answer = "the messages before the first assistant turn"
    cut_hint = " (set data.truncate=true to cut it)"
    first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    texts = [(f"messages[{i}].content", m["content"]) for i, m in enumerate(messages)]
    if found := over_limit(tokenizer, texts[:first_answer], max_prompt_length, longest):
        raise fail(found.field, found.problem(before_answer, prompt_limit))
    if truncate:  # the answers and what follows; the prompt was checked, and is never cut
        messages = messages[:first_answer] + [
            {**m, "content": clip(tokenizer, m["content"], max_length, longest)}
            for m in messages[first_answer:]
        ]
    elif found := over_limit(tokenizer, texts, max_length, longest):
        raise fail(found.field, found.problem("the conversation", length_limit, cut_hint))
    example = conversation_example(tokenizer, messages)
    n_prompt = example.loss_mask.index(True) if example.num_targets else len(example.input_ids)
    if n_prompt > max_prompt_length:
        raise fail(
            _message_at(tokenizer, messages[:first_answer], max_prompt_length),
            f"{before_answer} are {n_prompt} tokens, longer than {prompt_limit}",
        )
    if len(example.input_ids) > max_length and not truncate:
        raise fail(
            _message_at(tokenizer, messages, max_length),
            f"the conversation is {len(example.input_ids)} tokens, longer than {length_limit}, "
            f"and passes it in this message{cut_hint}",
        )
    if n_prompt >= max_length:
        raise fail(
            _message_at(tokenizer, messages[:first_answer], max_length - 1),
            f"{before_answer} are {n_prompt} tokens, which leaves no answer tokens to train on "
            f"within {length_limit}",
        )
    return TokenizedExample(example.input_ids[:max_length], example.loss_mask[:max_length])


def _message_at(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], limit: int) -> str:
    """The field of the message in which `messages`, rendered, pass `limit` tokens (the last one
    when only the template's tokens after it do). It renders every prefix: for errors only."""
    for k in range(len(messages)):
        try:
            rendered = _render(tokenizer, list(messages[: k + 1]), False)
        except TemplateError:  # a template that refuses to render some prefixes
            return "messages"
        if len(_encode(tokenizer, rendered)) > limit:
            return f"messages[{k}].content"
    return f"messages[{len(messages) - 1}].content" if messages else "messages"
