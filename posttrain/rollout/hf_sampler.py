"""The built-in sampler: batched KV-cache generation with any Hugging Face causal LM.

One `generate` call:
  1. prefill: every distinct prompt but its last token, packed several to a row (first-fit
     decreasing into rows of at least `_PACK_WIDTH` tokens, a block-diagonal causal mask, and
     position ids restarting at 0 for each prompt), so padding costs almost nothing and each
     prompt is prefilled once, whatever n;
  2. one gather per layer copies each prompt's keys/values into a preallocated `RowCache`,
     right-aligned at the longest prompt's width, once for each of its n sample rows;
  3. decode: the last prompt token of every row is the first step; each step is one forward
     over the rows still running (`logits_to_keep=1`, a 4D padding mask sliced from a buffer
     built once, positions kept as a tensor); the next token and its logprob come from
     `choose_next_tokens`; rows that finish are dropped from the batch and the cache, so the
     cost follows the tokens generated, not the longest row.

Every forward (prefill and decode) of a Llama / Qwen2 / Mistral model on SDPA goes through
`LlamaFamilyForward`, the same arithmetic without transformers' per-layer module plumbing; any
other model, or one with LoRA layers or hooks, runs its own forward (`posttrain/models/llama_forward.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import Cache, DynamicCache, PreTrainedModel

from posttrain.models.decode_attention import sampling_attention
from posttrain.models.llama_forward import LlamaFamilyForward, unsupported_reason
from posttrain.rollout.interface import Completion, FinishReason, RolloutBatch, SamplingParams
from posttrain.rollout.kv_cache import RowCache
from posttrain.rollout.sampling import Noise, PromptStreams, choose_next_tokens
from posttrain.rollout.stop import StopStrings, completion_text

# Finish codes kept in a tensor while decoding; 0 means still running.
_RUNNING, _EOS, _STOP, _LENGTH = 0, 1, 2, 3
_REASONS: dict[int, FinishReason] = {_EOS: "eos", _STOP: "stop", _LENGTH: "length"}

# Packed prefill rows are at least this wide: wide enough that prompts fill them with little
# left over, narrow enough that attention over the whole row (the mask hides other prompts but
# SDPA still computes them) stays a few percent of the FLOPs. 64 and 256 were slower here.
_PACK_WIDTH = 128
# Tokens per prefill forward (rows x width), which bounds the prefill's activation memory.
_PREFILL_TOKENS = 16384
# Attention implementations whose masks the sampler can build: a boolean 4D mask for SDPA, an
# additive float one for eager. Others (flash-attention, flex) need their own mask formats.
_SUPPORTED_ATTENTION = ("sdpa", "eager")


class HFSampler:
    """Generates completions with a Hugging Face causal LM and a KV cache shared by n samples.

    model: any `transformers` causal LM on "sdpa" or "eager" attention whose layers attend to
        the whole sequence (or a sliding window longer than prompt + completion). It may be the
        policy being trained: it is put in eval mode under `torch.inference_mode` while
        generating, and its training mode is restored afterwards, so the current weights are
        always the ones sampled from.
    tokenizer: only needed for stop strings and `Completion.text`.
    eos_token_ids: ids that end a completion with finish reason `eos`; by default the model's
        `generation_config.eos_token_id`, else the tokenizer's eos.
    seed: seeds the sampler's own `torch.Generator`, used when `SamplingParams.seed` is None;
        it advances from call to call and never touches the global RNG (`self.generator` can be
        saved and restored with `get_state`/`set_state` to resume a run exactly).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any | None = None,
        *,
        eos_token_ids: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(
            _default_eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids
        )
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.text_config = model.config.get_text_config(decoder=True)

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        on_tokens: Callable[[list[int], list[int]], None] | None = None,
    ) -> RolloutBatch:
        """Sample `params.n` completions of each prompt; see `RolloutBatch` for the order.
        `on_tokens(rows, tokens)`, when given, is called after every decoding step with the
        rows still running (indices in that order) and the token each just sampled, before
        stop strings are checked: what a streaming server sends on (one host sync per step)."""
        prompts = [list(p) for p in prompt_ids]
        _check_prompts(prompts, self.text_config.vocab_size)
        implementation = self.text_config._attn_implementation
        if implementation not in _SUPPORTED_ATTENTION:
            raise NotImplementedError(
                f"HFSampler builds masks for attention implementations {_SUPPORTED_ATTENTION}; "
                f"the model uses {implementation!r}: load it with attn_implementation='sdpa'"
            )
        stop_strings = StopStrings(self.tokenizer, params.stop) if params.stop else None
        generator: Noise = self.generator
        if params.seed is not None:
            generator = PromptStreams(
                params.seed, params.first_prompt, len(prompts), params.n, self.device
            )
        was_training = self.model.training
        self.model.eval()
        # Llama-family models run a lean forward (models/llama_forward.py); other models, and those it
        # does not cover (LoRA-wrapped, hooked, eager attention...), their own forward.
        lean = None if unsupported_reason(self.model) else LlamaFamilyForward(self.model)
        try:
            with torch.inference_mode(), sampling_attention(self.model):
                return self._generate(prompts, params, generator, stop_strings, lean, on_tokens)
        finally:
            self.model.train(was_training)

    def close(self) -> None:
        """Nothing to release: the sampler holds only the model, which the caller owns."""

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean (B, 1, q, k) "may attend" mask in the form the model's attention takes:
        transformers passes 4D masks through untouched; eager adds them to the scores."""
        if self.text_config._attn_implementation != "eager":
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )

    def _generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        generator: Noise,
        stop_strings: StopStrings | None,
        lean: LlamaFamilyForward | None,
        on_tokens: Callable[[list[int], list[int]], None] | None = None,
    ) -> RolloutBatch:
        start = time.perf_counter()
        device, n, max_new = self.device, params.n, params.max_new_tokens
        # Identical prompts are prefilled once: `distinct_of[i]` is prompt i's distinct index.
        distinct: dict[tuple[int, ...], int] = {}
        distinct_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        distinct_prompts = [list(p) for p in distinct]
        rows = len(prompts) * n
        row_source = torch.tensor(distinct_of, device=device).repeat_interleave(n)
        prompt_lengths = torch.tensor([len(p) for p in distinct_prompts], device=device)
        lengths_R = prompt_lengths.index_select(0, row_source)
        prompt_width = int(prompt_lengths.max())
        capacity = prompt_width + max_new - 1  # the last sampled token is never fed back
        _check_attention_span(self.text_config, capacity)

        cache = RowCache(self.text_config.num_hidden_layers, rows, prompt_width, capacity)
        self._prefill(cache, distinct_prompts, row_source, prompt_width, lean)
        # Which cache columns each row may attend to (its prompt, not the left padding, and all
        # completion columns), built once and sliced per step; None when no prompt is padded,
        # which lets attention run unmasked.
        mask_RC = None
        if bool((lengths_R != prompt_width).any()):
            columns_C = torch.arange(capacity, device=device)
            mask_RC = self._mask((columns_C >= (prompt_width - lengths_R)[:, None])[:, None, None])
        last_prompt_tokens = torch.tensor([p[-1] for p in distinct_prompts], device=device)
        tokens_B = last_prompt_tokens.index_select(0, row_source)
        positions_B1 = (lengths_R - 1)[:, None]

        stop_ids = sorted(set(params.stop_token_ids))
        eos_ids = [] if params.ignore_eos else sorted(set(self.eos_token_ids))
        stop_ids_t = torch.tensor(stop_ids, device=device, dtype=torch.long)
        eos_ids_t = torch.tensor(eos_ids, device=device, dtype=torch.long)
        tokens_RT = torch.zeros((rows, max_new), dtype=torch.long, device=device)
        logprobs_RT = torch.zeros((rows, max_new), dtype=torch.float32, device=device)
        finish_R = torch.zeros(rows, dtype=torch.long, device=device)
        length_R = torch.zeros(rows, dtype=torch.long, device=device)
        active = torch.arange(rows, device=device)  # buffer rows of the rows still running
        texts_so_far: list[list[int]] = [[] for _ in range(rows)] if stop_strings else []

        prefill_seconds = 0.0
        for step in range(max_new):
            # Feed the previous token (the last prompt token at step 0) at cache column
            # prompt_width - 1 + step.
            mask = None if mask_RC is None else mask_RC[..., : prompt_width + step]
            logits_BV = self._forward(lean, tokens_B[:, None], positions_B1, mask, cache)
            positions_B1 = positions_B1 + 1
            if step == 0:  # prefill ends with the first logits (synchronised to time it)
                if logits_BV.device.type != "cpu":
                    torch.accelerator.synchronize(logits_BV.device)
                prefill_seconds = time.perf_counter() - start

            tokens_B, logprobs_B = choose_next_tokens(
                logits_BV, params.temperature, params.top_k, params.top_p, params.min_p, generator
            )
            tokens_RT[active, step] = tokens_B
            logprobs_RT[active, step] = logprobs_B
            if on_tokens is not None:
                on_tokens(active.tolist(), tokens_B.tolist())

            code_B = torch.zeros_like(tokens_B)
            if stop_strings is not None:
                code_B = self._stop_string_codes(
                    stop_strings, texts_so_far, active, tokens_B, code_B
                )
            if stop_ids:
                code_B = torch.where(torch.isin(tokens_B, stop_ids_t), _STOP, code_B)
            if eos_ids:
                code_B = torch.where(torch.isin(tokens_B, eos_ids_t), _EOS, code_B)
            if step == max_new - 1:
                code_B = torch.where(code_B == _RUNNING, _LENGTH, code_B)
            finish_R[active] = code_B
            length_R[active] = step + 1
            running_B = code_B == _RUNNING
            if not bool(running_B.all()):  # the one host sync per step
                keep_B = running_B.nonzero().squeeze(1)
                if keep_B.numel() == 0:
                    break
                active = active.index_select(0, keep_B)
                if isinstance(generator, PromptStreams):
                    generator.keep(active.tolist())
                tokens_B = tokens_B.index_select(0, keep_B)
                positions_B1 = positions_B1.index_select(0, keep_B)
                cache.batch_select_indices(keep_B)
                if mask_RC is not None:
                    mask_RC = mask_RC.index_select(0, keep_B)

        completions = self._completions(
            n, tokens_RT, logprobs_RT, finish_R, length_R, stop_strings, params
        )
        decode_seconds = time.perf_counter() - start - prefill_seconds
        return RolloutBatch(
            prompt_ids=prompts,
            completions=completions,
            prompt_tokens=sum(len(p) for p in distinct_prompts),
            generated_tokens=sum(len(c.token_ids) for c in completions),
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
        )

    def _prefill(
        self,
        cache: RowCache,
        distinct_prompts: list[list[int]],
        row_source: torch.Tensor,
        prompt_width: int,
        lean: LlamaFamilyForward | None,
    ) -> None:
        """Prefill every distinct prompt but its last token, packed, into `cache`."""
        device = self.device
        prefixes = [p[:-1] for p in distinct_prompts]
        columns = prompt_width - 1  # the prefix columns of the cache
        if columns == 0:
            return  # every prompt is one token: nothing to prefill
        width = max(_PACK_WIDTH, columns)
        packed_rows = _pack(prefixes, width)
        rows_per_call = max(1, _PREFILL_TOKENS // width)
        for first in range(0, len(packed_rows), rows_per_call):
            chunk = packed_rows[first : first + rows_per_call]
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
            position_ids = torch.zeros_like(input_ids)
            segment = torch.full_like(input_ids, -1)
            # Flat (row * width + offset) position of each distinct prompt's first prefix token,
            # minus its left padding, so that column c of the cache reads start + c.
            start_of = torch.zeros(len(distinct_prompts), dtype=torch.long)
            in_chunk = torch.zeros(len(distinct_prompts), dtype=torch.bool)
            for row, members in enumerate(chunk):
                offset = 0
                for number, index in enumerate(members):
                    prefix = prefixes[index]
                    end = offset + len(prefix)
                    input_ids[row, offset:end] = torch.tensor(prefix)
                    position_ids[row, offset:end] = torch.arange(len(prefix))
                    segment[row, offset:end] = number
                    start_of[index] = row * width + offset - (columns - len(prefix))
                    in_chunk[index] = True
                    offset = end
            # Causal within each prompt, nothing across prompts; padding attends to itself
            # (a fully masked row would give NaN, which would leak through the values).
            causal = torch.ones((width, width), dtype=torch.bool).tril_()
            allowed = (segment[:, :, None] == segment[:, None, :]) & causal
            allowed |= torch.eye(width, dtype=torch.bool)
            packed = DynamicCache()
            mask = self._mask(allowed[:, None].to(device))
            ids, positions = input_ids.to(device), position_ids.to(device)
            self._forward(lean, ids, positions, mask, packed)
            target_rows = in_chunk.to(device).index_select(0, row_source).nonzero().squeeze(1)
            start_T = start_of.to(device).index_select(0, row_source.index_select(0, target_rows))
            source_TC = start_T[:, None] + torch.arange(columns, device=device)
            # Left-padding columns point before their prompt; any valid position will do.
            source_TC = source_TC.clamp_(0, len(chunk) * width - 1)
            cache.write_packed(packed, source_TC, target_rows)

    def _forward(
        self,
        lean: LlamaFamilyForward | None,
        input_ids_BS: torch.Tensor,
        position_ids_BS: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache,
    ) -> torch.Tensor:
        """Logits (B, V) of the last position after one forward that appends to `cache`."""
        if lean is not None:
            return lean(input_ids_BS, position_ids_BS, mask, cache)
        return self.model(
            input_ids=input_ids_BS,
            attention_mask=mask,
            position_ids=position_ids_BS,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]

    def _stop_string_codes(
        self,
        stop_strings: StopStrings,
        texts_so_far: list[list[int]],
        active: torch.Tensor,
        tokens_B: torch.Tensor,
        code_B: torch.Tensor,
    ) -> torch.Tensor:
        """Append the new tokens to the host-side completions and mark stop-string hits."""
        active_rows = active.tolist()
        for row, token in zip(active_rows, tokens_B.tolist(), strict=True):
            texts_so_far[row].append(token)
        hits = stop_strings.hits([texts_so_far[row] for row in active_rows])
        if any(hits):
            code_B = torch.where(torch.tensor(hits, device=code_B.device), _STOP, code_B)
        return code_B

    def _completions(
        self,
        n: int,
        tokens_RT: torch.Tensor,
        logprobs_RT: torch.Tensor,
        finish_R: torch.Tensor,
        length_R: torch.Tensor,
        stop_strings: StopStrings | None,
        params: SamplingParams,
    ) -> list[Completion]:
        """Turn the (rows, max_new) buffers into per-completion lists (one device->host copy)."""
        tokens = tokens_RT.cpu()
        logprobs = logprobs_RT.cpu()
        reasons = [_REASONS[code] for code in finish_R.tolist()]
        completions = []
        for row, (reason, length) in enumerate(zip(reasons, length_R.tolist(), strict=True)):
            token_ids = tokens[row, :length].tolist()
            text = None
            if self.tokenizer is not None:
                text = completion_text(
                    self.tokenizer, token_ids, reason, params.stop_token_ids, stop_strings
                )
            completions.append(
                Completion(
                    prompt_index=row // n,
                    token_ids=token_ids,
                    logprobs=logprobs[row, :length].tolist(),
                    finish_reason=reason,
                    text=text,
                )
            )
        return completions


def _default_eos_ids(model: PreTrainedModel, tokenizer: Any | None) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def _check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts:
        raise ValueError("prompt_ids is empty: expected at least one prompt")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt_ids[{i}] is empty: expected at least one token id")
        bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < vocab_size)]
        if bad:
            raise ValueError(
                f"prompt_ids[{i}] holds {bad[0]!r}: expected int token ids in [0, {vocab_size})"
            )


def _check_attention_span(config: Any, capacity: int) -> None:
    """Refuse models whose attention is not plain causal over the whole sequence, because the
    sampler passes one 4D padding mask to every layer and keeps every position in the cache."""
    window = getattr(config, "sliding_window", None) or getattr(
        config, "attention_chunk_size", None
    )
    # Configs without `layer_types` (Mistral) apply their `sliding_window` to every layer.
    layer_types = getattr(config, "layer_types", None) or [
        "sliding_attention" if window else "full_attention"
    ]
    for layer_type in set(layer_types):
        if layer_type == "full_attention":
            continue
        if (
            layer_type in ("sliding_attention", "chunked_attention")
            and window
            and capacity <= window
        ):
            continue  # the window covers prompt + completion, so it is full attention here
        raise NotImplementedError(
            f"HFSampler supports full-attention layers; {type(config).__name__} has "
            f"{layer_type!r} layers (window {window}) and prompt + completion needs {capacity} "
            "positions. Use a shorter max_new_tokens or the vLLM engine."
        )


def _pack(prefixes: list[list[int]], width: int) -> list[list[int]]:
    """First-fit decreasing: indices of the non-empty prefixes, grouped into rows of `width`."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(prefixes)), key=lambda i: -len(prefixes[i])):
        size = len(prefixes[index])
        if size == 0:
            continue
        row = next((r for r, room in enumerate(free) if room >= size), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= size
    return rows
