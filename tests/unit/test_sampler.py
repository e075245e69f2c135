"""The built-in sampler against Hugging Face `generate`, teacher forcing and exact distributions."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from posttrain.models.tiny import EOS_ID, PAD_ID, build_model, build_tokenizer
from posttrain.rollout import HFSampler, RolloutBatch, Sampler, SamplingParams, hf_sampler
from posttrain.rollout.sampling import choose_next_tokens, truncate_logprobs

# Small enough that the whole file runs in seconds; initializer_range 0.1 (HF default 0.02)
# gives logits a spread of about one nat, so greedy argmaxes are separated by more than float
# noise and the truncation tests cut real mass.
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,
)
PROMPT_LENGTHS = [3, 11, 6, 11, 1, 8]


def tiny(arch: str = "qwen2", seed: int = 0) -> torch.nn.Module:
    return build_model(arch, "tiny", seed=seed, **SHAPE)


def ragged_prompts(lengths: list[int] = PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


def hf_greedy(
    model: torch.nn.Module, prompts: list[list[int]], n: int, max_new_tokens: int, eos: int
) -> list[list[int]]:
    """HF greedy completions, each prompt repeated n times, cut after the first eos."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD_ID)
    attention_mask = torch.zeros_like(input_ids)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[i, width - len(prompt) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids.repeat_interleave(n, 0),
            attention_mask=attention_mask.repeat_interleave(n, 0),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=PAD_ID,
        )
    completions = []
    for row in out[:, width:].tolist():
        completions.append(row[: row.index(eos) + 1] if eos in row else row)
    return completions


def teacher_forced_logprobs(
    model: torch.nn.Module, prompt: list[int], completion: list[int], temperature: float
) -> list[float]:
    """log_softmax(logits / T) at each completion token from one plain forward pass."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double()
    logprobs = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return logprobs.gather(1, torch.tensor(completion)[:, None]).squeeze(1).tolist()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_matches_hf_generate_on_ragged_prompts_with_n_samples(arch: str) -> None:
    model = tiny(arch).eval()
    prompts = ragged_prompts()
    batch = HFSampler(model).generate(prompts, SamplingParams.greedy(max_new_tokens=24, n=2))
    expected = hf_greedy(model, prompts, n=2, max_new_tokens=24, eos=EOS_ID)
    assert [c.token_ids for c in batch.completions] == expected
    assert model.config._attn_implementation == "sdpa"  # the sampler's swap is undone
    assert [c.prompt_index for c in batch.completions] == [i for i in range(6) for _ in range(2)]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_matches_hf_when_rows_finish_early_and_finished_rows_leave_the_batch(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny(arch).eval()
    prompts = ragged_prompts()
    # Make a token the model greedily emits mid-way in some rows, but not all, the eos.
    free_run = hf_greedy(model, prompts, n=1, max_new_tokens=24, eos=-1)
    counts = {t: sum(t in row[2:20] for row in free_run) for t in {t for r in free_run for t in r}}
    eos = next(t for t, c in sorted(counts.items(), key=lambda kv: -kv[1]) if 2 <= c < len(prompts))

    # The rows of each decode step's logits (a hook on the model would switch off the lean
    # forward, which does not run hooks).
    batch_sizes: list[int] = []

    def recording(logits_BV: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        batch_sizes.append(logits_BV.shape[0])
        return choose_next_tokens(logits_BV, *args)

    monkeypatch.setattr(hf_sampler, "choose_next_tokens", recording)
    sampler = HFSampler(model, eos_token_ids=[eos])
    batch = sampler.generate(prompts, SamplingParams.greedy(max_new_tokens=24, n=2))
    expected = hf_greedy(model, prompts, n=2, max_new_tokens=24, eos=eos)

    assert [c.token_ids for c in batch.completions] == expected
    reasons = [c.finish_reason for c in batch.completions]
    assert reasons == ["eos" if row[-1] == eos else "length" for row in expected]
    assert "eos" in reasons and "length" in reasons
    # Step 0 feeds every row's last prompt token; step s + 1 feeds back token s of the rows
    # still running, i.e. those longer than s + 1 tokens: the cost follows the tokens generated.
    longest = max(len(row) for row in expected)
    running = [sum(len(row) > s + 1 for row in expected) for s in range(longest - 1)]
    assert batch_sizes == [len(expected)] + running
    assert running[-1] < running[0]


@pytest.mark.parametrize(
    "lengths",
    [[1, 1, 1], [150, 3, 40, 130, 1, 77, 40]],
    ids=["one-token-prompts", "long-prompts-several-prefill-calls"],
)
def test_greedy_matches_hf_with_one_token_and_long_prompts(
    lengths: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Edge cases of the packed prefill: nothing to prefill, and prompts wider than a packed
    row split over several forward calls (the token budget is shrunk to force it)."""
    monkeypatch.setattr(hf_sampler, "_PREFILL_TOKENS", 300)
    model = tiny("llama").eval()
    prompts = ragged_prompts(lengths, seed=5)
    batch = HFSampler(model).generate(prompts, SamplingParams.greedy(max_new_tokens=12, n=2))
    assert [c.token_ids for c in batch.completions] == hf_greedy(model, prompts, 2, 12, EOS_ID)


def decode_calls_of_hf_layers(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that counts the calls of the model's own decoder layers on one-token inputs
    (decode steps), by wrapping the layer class's forward (a hook would disable the lean path)."""
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    layer_class = type(layers[0])
    calls: list[int] = []
    original = layer_class.forward

    def counting(self: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
        calls.extend([1] if hidden_states.shape[1] == 1 else [])
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(layer_class, "forward", counting)
    return calls


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_llama_family_decodes_with_the_lean_forward_not_the_hf_layers(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny(arch).eval()
    # As the recipes load it: transformers then hooks the input embeddings (to mark them as
    # requiring grad), a hook the lean forward may skip while sampling.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prompts = ragged_prompts()
    calls = decode_calls_of_hf_layers(model, monkeypatch)
    batch = HFSampler(model).generate(prompts, SamplingParams.greedy(max_new_tokens=8))
    assert calls == []
    # The same model on eager attention takes the HF path: 2 layers x 8 steps (so the counter
    # does see decode steps when the HF layers run them).
    model.set_attn_implementation("eager")
    eager = HFSampler(model).generate(prompts, SamplingParams.greedy(max_new_tokens=8))
    assert len(calls) == 2 * 8
    assert [c.token_ids for c in eager.completions] == [c.token_ids for c in batch.completions]


def lora_llama() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    # Random (not zero) adapter weights, so that the adapters change the output.
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_peft_model(tiny("llama"), config)


def gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=320,
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.1,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config)


@pytest.mark.parametrize("build", [lora_llama, gpt2], ids=["lora-llama", "gpt2"])
def test_models_the_lean_forward_does_not_cover_fall_back_to_their_own_forward(
    build, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build().eval()
    prompts = ragged_prompts()
    calls = decode_calls_of_hf_layers(model, monkeypatch)
    batch = HFSampler(model).generate(prompts, SamplingParams.greedy(max_new_tokens=12, n=2))
    assert [c.token_ids for c in batch.completions] == hf_greedy(model, prompts, 2, 12, EOS_ID)
    assert len(calls) > 0  # the model's own layers ran the decode steps


def test_eager_attention_path_matches_hf_generate() -> None:
    """Models not on "sdpa" get a 2D mask and build their own attention mask every step."""
    model = tiny("llama")
    model.set_attn_implementation("eager")
    model.eval()
    prompts = ragged_prompts()
    batch = HFSampler(model).generate(prompts, SamplingParams.greedy(max_new_tokens=16))
    assert [c.token_ids for c in batch.completions] == hf_greedy(model, prompts, 1, 16, EOS_ID)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=3, max_new_tokens=20, temperature=0.7, top_k=30, top_p=0.9, min_p=0.02),
        SamplingParams(n=2, max_new_tokens=20, temperature=1.3),
        SamplingParams.greedy(max_new_tokens=20, n=1),
    ],
    ids=["truncated-T0.7", "T1.3", "greedy"],
)
def test_logprobs_equal_teacher_forced_log_softmax_of_tempered_logits(
    params: SamplingParams,
) -> None:
    model = tiny()
    prompts = ragged_prompts()
    batch = HFSampler(model, seed=3).generate(prompts, params)
    assert batch.generated_tokens == sum(len(c.token_ids) for c in batch.completions)
    for c in batch.completions:
        expected = teacher_forced_logprobs(
            model, prompts[c.prompt_index], c.token_ids, params.temperature
        )
        assert len(c.logprobs) == len(c.token_ids)
        torch.testing.assert_close(
            torch.tensor(c.logprobs, dtype=torch.float64),
            torch.tensor(expected, dtype=torch.float64),
            atol=1e-5,
            rtol=0,
        )


def test_same_seed_same_output_different_seed_different_output_global_rng_untouched() -> None:
    model = tiny()
    prompts = ragged_prompts()
    params = SamplingParams(n=2, max_new_tokens=12, seed=7)
    rng_before = torch.random.get_rng_state()
    first = HFSampler(model).generate(prompts, params)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    again = HFSampler(model).generate(prompts, params)
    other = HFSampler(model).generate(prompts, SamplingParams(n=2, max_new_tokens=12, seed=8))
    ids = [c.token_ids for c in first.completions]
    assert ids == [c.token_ids for c in again.completions]
    assert [c.logprobs for c in first.completions] == [c.logprobs for c in again.completions]
    assert ids != [c.token_ids for c in other.completions]

    # Without a per-call seed the sampler's own generator advances: two calls differ, and a
    # sampler built with the same seed replays them.
    sampler, replay = HFSampler(model, seed=1), HFSampler(model, seed=1)
    plain = SamplingParams(n=2, max_new_tokens=12)
    calls = [sampler.generate(prompts, plain) for _ in range(2)]
    replays = [replay.generate(prompts, plain) for _ in range(2)]
    as_ids = [[c.token_ids for c in b.completions] for b in calls]
    assert as_ids[0] != as_ids[1]
    assert as_ids == [[c.token_ids for c in b.completions] for b in replays]


def test_seeded_prompts_sample_the_same_however_the_call_is_split() -> None:
    # A seeded prompt's completions depend on (seed, its index) only: split over calls (or
    # processes) with `first_prompt` offsets, the prompts sample what one call samples.
    model, prompts = tiny(), ragged_prompts()
    params = SamplingParams(n=3, max_new_tokens=12, seed=4, stop_token_ids=(7, 9))
    whole = HFSampler(model).generate(prompts, params).completions
    parts = []
    for lo, hi in [(0, 1), (1, 4), (4, 6)]:
        part = HFSampler(model).generate(prompts[lo:hi], replace(params, first_prompt=lo))
        parts += part.completions
    assert [c.token_ids for c in parts] == [c.token_ids for c in whole]
    assert len({c.finish_reason for c in whole}) > 1  # rows finished at different steps
    for a, b in zip(parts, whole, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs))
    # Without the offset the second part would replay the first prompts' streams.
    shifted = HFSampler(model).generate(prompts[1:4], params).completions
    assert [c.token_ids for c in shifted] != [c.token_ids for c in whole[3:12]]


def expected_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """The truncated, renormalised next-token distribution, written out step by step (float64):
    p = softmax(logits / T); keep p_i >= min_p * max p; keep the top_k largest; then, over the
    renormalised rest sorted by probability, keep token i while the mass before it is < top_p."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if min_p > 0:
        keep &= p >= min_p * p.max()
    if top_k > 0:
        keep &= p >= torch.sort(p, descending=True).values[top_k - 1]
    if top_p < 1:
        q = torch.where(keep, p, 0.0)
        q = q / q.sum()
        mass_before = 0.0
        for i in torch.argsort(q, descending=True).tolist():
            if not keep[i]:
                continue
            keep[i] = mass_before < top_p
            mass_before += q[i].item()
    p = torch.where(keep, p, 0.0)
    return p / p.sum()


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi^2(df) by the Wilson-Hilferty approximation, accurate to about 1%
    for df >= 10: df * (1 - 2/(9 df) + z sqrt(2/(9 df)))^3. z = 3.719 is the standard normal's
    1 - 1e-4 quantile, so a correct sampler fails one test in 10,000 (the draws are seeded, so
    the test is deterministic anyway)."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p"),
    [(0.6, 0, 1.0, 0.0), (1.0, 12, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (1.0, 0, 1.0, 0.3)],
    ids=["temperature", "top-k", "top-p", "min-p"],
)
def test_next_token_frequencies_match_the_truncated_softmax(
    temperature: float, top_k: int, top_p: float, min_p: float
) -> None:
    model = tiny()
    prompt = ragged_prompts([7])[0]
    draws = 20_000
    params = SamplingParams(
        n=draws,
        max_new_tokens=1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=11,
    )
    batch = HFSampler(model).generate([prompt], params)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    probs = expected_distribution(logits, temperature, top_k, top_p, min_p)
    counts = torch.bincount(
        torch.tensor([c.token_ids[0] for c in batch.completions]), minlength=probs.numel()
    ).double()

    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token outside the truncated support"
    if top_k or top_p < 1 or min_p:
        assert 2 <= int(support.sum()) < 200, "the case should truncate a real part of the mass"
    # Pearson's statistic over bins with >= 5 expected draws; the rest pooled into one bin.
    expected = probs * draws
    big = expected >= 5
    observed_bins = torch.cat([counts[big], counts[~big & support].sum().reshape(1)])
    expected_bins = torch.cat([expected[big], expected[~big & support].sum().reshape(1)])
    if expected_bins[-1] < 5:  # too little pooled mass to be its own bin: merge it
        observed_bins[-2] += observed_bins[-1]
        expected_bins[-2] += expected_bins[-1]
        observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
    statistic = ((observed_bins - expected_bins) ** 2 / expected_bins).sum().item()
    df = observed_bins.numel() - 1
    assert df >= 10
    assert statistic < chi_square_critical(df), (statistic, df)


def test_truncation_by_hand() -> None:
    # p = [0.5, 0.25, 0.15, 0.1] (log domain).
    logprobs = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()
    kept = lambda **kw: torch.isfinite(truncate_logprobs(logprobs, **kw))[0].tolist()  # noqa: E731
    # top-k 2: the two largest.
    assert kept(top_k=2) == [True, True, False, False]
    # top-p 0.7: mass before each token is 0, 0.5, 0.75, 0.9 -> keep while < 0.7.
    assert kept(top_p=0.7) == [True, True, False, False]
    # top-p 0.75: 0.75 is not < 0.75, so the third token is still out (0.5 + 0.25 reaches it).
    assert kept(top_p=0.75) == [True, True, False, False]
    # min-p 0.3: threshold 0.3 x 0.5 = 0.15 keeps 0.15 (>=) and drops 0.1.
    assert kept(min_p=0.3) == [True, True, True, False]
    # min-p then top-p on the renormalised rest: [0.5, 0.25, 0.15] / 0.9 = [0.556, 0.278, 0.167];
    # top-p 0.8: mass before is 0, 0.556, 0.833 -> the third is dropped.
    assert kept(min_p=0.3, top_p=0.8) == [True, True, False, False]


def test_stop_strings_cut_the_text_right_before_the_stop_string() -> None:
    model, tokenizer = tiny(seed=3).eval(), build_tokenizer()
    prompt = tokenizer.encode("Hello")
    free = HFSampler(model, tokenizer).generate(
        [prompt], SamplingParams.greedy(40, ignore_eos=True)
    )
    tokens = free.completions[0].token_ids
    # The stop string: the first two different adjacent tokens that are printable ASCII. Each
    # ASCII character is one token of this tokenizer, so the first place the string appears in
    # the text is the first place that token pair appears.
    chars = [tokenizer.decode([t]) for t in tokens]
    end = next(
        i
        for i in range(1, len(tokens))
        if tokens[i - 1] != tokens[i]
        and all(len(c) == 1 and c.isprintable() for c in chars[i - 1 : i + 1])
    )
    stop = chars[end - 1] + chars[end]
    assert end >= 3  # not at the start, so there is text to keep

    params = SamplingParams.greedy(40, ignore_eos=True, stop=(stop, "never-produced"))
    out = HFSampler(model, tokenizer).generate([prompt], params).completions[0]
    assert out.finish_reason == "stop"
    # Token ids end on the token that completed the stop string; the text ends right before it.
    assert out.token_ids == tokens[: end + 1]
    assert out.text == tokenizer.decode(tokens[: end - 1], skip_special_tokens=True)
    assert stop not in out.text and (out.text + stop) in free.completions[0].text


def test_on_tokens_sees_every_sampled_token_of_every_row_as_it_is_decoded() -> None:
    """What a streaming server forwards: per step, the running rows and their new tokens; joined
    per row they are the completions' token ids, finished rows dropping out."""
    model, tokenizer = tiny(seed=1).eval(), build_tokenizer()
    prompts = ragged_prompts([3, 7, 5])
    params = SamplingParams(
        n=2, max_new_tokens=12, temperature=1.0, seed=0, stop_token_ids=(ord("e"),)
    )
    steps: list[tuple[list[int], list[int]]] = []
    batch = HFSampler(model, tokenizer).generate(
        prompts, params, on_tokens=lambda r, t: steps.append((r, t))
    )
    seen: dict[int, list[int]] = {}
    for rows, tokens in steps:
        assert len(rows) == len(tokens) and len(set(rows)) == len(rows)
        for row, token in zip(rows, tokens, strict=True):
            seen.setdefault(row, []).append(token)
    assert [seen[r] for r in range(6)] == [c.token_ids for c in batch.completions]
    assert len(steps) == max(len(c.token_ids) for c in batch.completions)
    assert HFSampler(model, tokenizer).generate(prompts, params).completions == batch.completions


def test_finish_reasons_eos_stop_token_and_length_and_their_text() -> None:
    model, tokenizer = tiny().eval(), build_tokenizer()
    prompts = ragged_prompts()
    free = HFSampler(model, tokenizer).generate(prompts, SamplingParams.greedy(10, ignore_eos=True))
    first_tokens = [c.token_ids[3] for c in free.completions]
    stop_token = first_tokens[0]

    # Length: every completion has exactly max_new_tokens tokens.
    assert all(c.finish_reason == "length" and len(c.token_ids) == 10 for c in free.completions)
    # Stop token: kept in token_ids, left out of the text.
    params = SamplingParams.greedy(10, ignore_eos=True, stop_token_ids=[stop_token])
    stopped = HFSampler(model, tokenizer).generate(prompts, params).completions[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids[-1] == stop_token and len(stopped.token_ids) <= 4
    assert stopped.text == tokenizer.decode(stopped.token_ids[:-1], skip_special_tokens=True)
    # Eos: the same token as the model's eos gives finish reason eos.
    eos_sampler = HFSampler(model, tokenizer, eos_token_ids=[stop_token])
    ended = eos_sampler.generate(prompts, SamplingParams.greedy(10)).completions[0]
    assert ended.finish_reason == "eos" and ended.token_ids == stopped.token_ids
    # ignore_eos turns it off.
    ignored = eos_sampler.generate(prompts, SamplingParams.greedy(10, ignore_eos=True))
    assert ignored.completions[0].finish_reason == "length"


def test_training_mode_is_restored_and_no_graph_is_built() -> None:
    model = tiny()
    model.train()
    batch = HFSampler(model).generate(ragged_prompts(), SamplingParams(max_new_tokens=5))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert isinstance(batch, RolloutBatch)
    model.eval()
    HFSampler(model).generate(ragged_prompts(), SamplingParams(max_new_tokens=5))
    assert not model.training


def test_identical_prompts_are_prefilled_once_and_counts_add_up() -> None:
    model = tiny()
    prompts = ragged_prompts([5, 9])
    prompts = [prompts[0], prompts[1], prompts[0]]
    batch = HFSampler(model).generate(prompts, SamplingParams(n=2, max_new_tokens=4, seed=0))
    assert batch.prompt_tokens == 5 + 9
    assert batch.generated_tokens == 3 * 2 * 4
    assert [c.prompt_index for c in batch.completions] == [0, 0, 1, 1, 2, 2]
    assert batch.prompt_ids == prompts
    assert batch.seconds > 0 and batch.tokens_per_second > 0


def test_sampler_protocol_and_input_errors() -> None:
    sampler = HFSampler(tiny())
    assert isinstance(sampler, Sampler)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        sampler.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] holds 999"):
        sampler.generate([[1, 999]], SamplingParams())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        sampler.generate([[1, 2]], SamplingParams(stop=("x",)))
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1.0)
