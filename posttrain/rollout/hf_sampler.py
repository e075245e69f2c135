"""The built-in sampler: batched KV-cache generation with any Hugging Face causal LM.

One `generate` call:
  1. prefill: the distinct prompts, sorted by length and cut into buckets of similar length
     (little padding), each bucket left-padded with an attention mask and position ids that
     start at 0 on the first real token; each prompt is prefilled once, whatever n;
  2. the buckets' keys/values are copied into one preallocated `RowCache`, each prompt's row
     repeated for its n samples, all prompts right-aligned at the longest prompt's width;
  3. decode: one forward per step over the rows still running (`logits_to_keep=1`, a boolean
     4D padding mask sliced from a buffer built once, positions kept as a tensor); the next
     token and its logprob come from `choose_next_tokens`; rows that finish are dropped from
     the batch and the cache, so the cost follows the tokens generated, not the longest row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from posttrain.rollout.attention import decode_attention
from posttrain.rollout.interface import Completion, FinishReason, RolloutBatch, SamplingParams
from posttrain.rollout.kv_cache import RowCache
from posttrain.rollout.sampling import choose_next_tokens
from posttrain.rollout.stop import StopStrings

# Finish codes kept in a tensor while decoding; 0 means still running.
_RUNNING, _EOS, _STOP, _LENGTH = 0, 1, 2, 3
_REASONS: dict[int, FinishReason] = {_EOS: "eos", _STOP: "stop", _LENGTH: "length"}

# A prefill bucket grows while its padded size stays within this factor of its real tokens...
_BUCKET_PADDING = 1.25
# ...and below this many padded tokens, which bounds the prefill's activation memory.
_BUCKET_TOKENS = 16384


class HFSampler:
    """Generates completions with a Hugging Face causal LM and a KV cache shared by n samples.

    model: any `transformers` causal LM whose attention layers are full attention (or sliding
        windows longer than prompt + completion). It may be the policy being trained: it is put
        in eval mode under `torch.inference_mode` while generating, and its training mode is
        restored afterwards, so the current weights are always the ones sampled from.
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

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Sample `params.n` completions of each prompt; see `RolloutBatch` for the order."""
        prompts = [list(p) for p in prompt_ids]
        _check_prompts(prompts, self.text_config.vocab_size)
        stop_strings = StopStrings(self.tokenizer, params.stop) if params.stop else None
        generator = self.generator
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self._generate(prompts, params, generator, stop_strings)
        finally:
            self.model.train(was_training)

    def _generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator,
        stop_strings: StopStrings | None,
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
        prompt_width = int(prompt_lengths.max())
        capacity = prompt_width + max_new - 1  # the last sampled token is never fed back
        _check_attention_span(self.text_config, capacity)

        cache, first_logits_RV = self._prefill(distinct_prompts, row_source, prompt_width, capacity)
        lengths_R = prompt_lengths.index_select(0, row_source)
        # Which cache columns each row may attend to (its prompt, not the left padding, and all
        # completion columns), built once and sliced per step; None when no prompt is padded,
        # which lets attention run unmasked.
        padding_mask_RC = None
        if bool((lengths_R != prompt_width).any()):
            columns_C = torch.arange(capacity, device=device)
            padding_mask_RC = columns_C >= (prompt_width - lengths_R)[:, None]
        positions_R1 = lengths_R[:, None].clone()  # the first completion token's position
        prefill_seconds = time.perf_counter() - start

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

        with decode_attention(self.model) as grouped_attention:
            logits_BV = first_logits_RV
            for step in range(max_new):
                tokens_B, logprobs_B = choose_next_tokens(
                    logits_BV,
                    params.temperature,
                    params.top_k,
                    params.top_p,
                    params.min_p,
                    generator,
                )
                tokens_RT[active, step] = tokens_B
                logprobs_RT[active, step] = logprobs_B

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
                if step == max_new - 1:
                    break
                running_B = code_B == _RUNNING
                if not bool(running_B.all()):  # the one host sync per step
                    keep_B = running_B.nonzero().squeeze(1)
                    if keep_B.numel() == 0:
                        break
                    active = active.index_select(0, keep_B)
                    tokens_B = tokens_B.index_select(0, keep_B)
                    positions_R1 = positions_R1.index_select(0, keep_B)
                    cache.batch_select_indices(keep_B)
                    if padding_mask_RC is not None:
                        padding_mask_RC = padding_mask_RC.index_select(0, keep_B)

                mask = None
                if padding_mask_RC is not None:
                    mask = padding_mask_RC[:, : prompt_width + step + 1]
                    # A ready (B, 1, 1, k) boolean mask is passed through untouched by transformers;
                    # otherwise it builds the model's own mask from the 2D one at every step.
                    mask = mask[:, None, None, :] if grouped_attention else mask
                logits_BV = self.model(
                    input_ids=tokens_B[:, None],
                    attention_mask=mask,
                    position_ids=positions_R1,
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1]
                positions_R1 = positions_R1 + 1

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
        distinct_prompts: list[list[int]],
        row_source: torch.Tensor,
        prompt_width: int,
        capacity: int,
    ) -> tuple[RowCache, torch.Tensor]:
        """Prefill the distinct prompts in length buckets; return the filled cache (one row per
        sample) and the logits of each row's first completion token, (R, V)."""
        device = self.device
        rows = row_source.numel()
        cache: RowCache | None = None
        last_logits: list[torch.Tensor] = []
        order: list[int] = []
        for bucket in _length_buckets([len(p) for p in distinct_prompts]):
            width = len(distinct_prompts[bucket[0]])
            input_ids = torch.zeros((len(bucket), width), dtype=torch.long, device=device)
            attention_mask = torch.zeros_like(input_ids)
            for i, index in enumerate(bucket):
                prompt = distinct_prompts[index]
                input_ids[i, width - len(prompt) :] = torch.tensor(prompt, device=device)
                attention_mask[i, width - len(prompt) :] = 1
            padded = not bool(attention_mask.all())
            prefilled = DynamicCache()
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask if padded else None,
                position_ids=(attention_mask.cumsum(1) - 1).clamp_min(0),
                past_key_values=prefilled,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            if cache is None:
                keys = prefilled.layers[0].keys
                cache = RowCache(
                    num_layers=len(prefilled.layers),
                    rows=rows,
                    kv_heads=keys.shape[1],
                    head_dim=keys.shape[3],
                    prompt_width=prompt_width,
                    capacity=capacity,
                    dtype=keys.dtype,
                    device=device,
                )
            # Buffer rows whose source prompt is in this bucket, and that prompt's bucket row.
            bucket_row_of = torch.full((len(distinct_prompts),), -1, device=device)
            bucket_row_of[torch.tensor(bucket, device=device)] = torch.arange(
                len(bucket), device=device
            )
            source_rows = bucket_row_of.index_select(0, row_source)
            target_rows = (source_rows >= 0).nonzero().squeeze(1)
            cache.write_prompts(prefilled, source_rows.index_select(0, target_rows), target_rows)
            last_logits.append(logits)
            order.extend(bucket)
        assert cache is not None
        # Logits come bucket by bucket; put them back in distinct-prompt order, then per row.
        position_of = torch.empty(len(order), dtype=torch.long, device=device)
        position_of[torch.tensor(order, device=device)] = torch.arange(len(order), device=device)
        first_logits_RV = torch.cat(last_logits).index_select(
            0, position_of.index_select(0, row_source)
        )
        return cache, first_logits_RV

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
                # The eos / stop token ends the text but is not part of it.
                ends_on_token = reason == "eos" or (
                    reason == "stop" and token_ids[-1] in params.stop_token_ids
                )
                body = token_ids[:-1] if ends_on_token else token_ids
                text = self.tokenizer.decode(body, skip_special_tokens=True)
                if reason == "stop" and stop_strings is not None:
                    text = stop_strings.cut(text)
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
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    window = getattr(config, "sliding_window", None) or getattr(
        config, "attention_chunk_size", None
    )
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


def _length_buckets(lengths: list[int]) -> list[list[int]]:
    """Group prompt indices, longest first, into buckets of similar length.

    Left-padding a batch to its longest prompt wastes compute on padding; prefilling each length
    on its own costs a forward per length. A bucket grows while its padded size stays within
    `_BUCKET_PADDING` of its real tokens and under `_BUCKET_TOKENS` padded tokens.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    real = 0
    for index in order:
        if buckets:
            bucket = buckets[-1]
            width = lengths[bucket[0]]
            padded = width * (len(bucket) + 1)
            if padded <= _BUCKET_PADDING * (real + lengths[index]) and padded <= _BUCKET_TOKENS:
                bucket.append(index)
                real += lengths[index]
                continue
        buckets.append([index])
        real = lengths[index]
    return buckets
