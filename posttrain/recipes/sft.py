"""Supervised fine-tuning on demonstrations: the loss is the answer tokens' negative log-likelihood.

Reads prompt/completion or conversation records, renders them with the tokenizer's chat template,
and trains on the assistant tokens only (prompt, system and user tokens are masked out).
Batches are packed without padding by default. One optimizer step sees `train.batch_size`
sequences; the loss is the mean over all answer tokens in them (every token weighs the same,
however the sequences are split into micro-batches and processes).
"""

from __future__ import annotations

import time

import torch

from posttrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig, Section, TrainConfig
from posttrain.data.packing import Batch, collate
from posttrain.data.splits import load_train_eval
from posttrain.data.tokenize import tokenize_sft, uses_chat_template
from posttrain.eval.loss import heldout_nll
from posttrain.models.loading import fit_to_context, load_model, load_tokenizer, save_pretrained
from posttrain.models.logprobs import nll_sum
from posttrain.train.learner import Learner, split_for_rank, step_indices
from posttrain.train.run import Run, check_batch


class SFTConfig(Section):
    model: ModelConfig = ModelConfig()
    """The model to fine-tune."""
    data: DataConfig = DataConfig()
    """Demonstrations: prompt/completion or conversation records."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = TrainConfig()
    """Batch sizes, in sequences."""
    run: RunConfig = RunConfig(out_dir="runs/sft")
    """Output directory, seed, device, steps, logging, evaluation, checkpoints."""


def sft_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Summed answer-token NLL; the learner divides by the step's answer-token count."""
    return nll_sum(model, batch), {}


def run(cfg: SFTConfig) -> dict:
    """Train, evaluate and save; returns the summary also written to `summary.json`."""
    t = cfg.train
    run = Run(cfg.run, cfg)
    dist = run.dist
    check_batch(t, dist)

    tokenizer = load_tokenizer(cfg.model.path)
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    train_records, eval_records = load_train_eval(
        cfg.data.train,
        cfg.data.eval,
        kinds=("completion", "conversation"),
        eval_fraction=cfg.data.eval_fraction,
        seed=cfg.run.seed,
        limit=cfg.data.limit,
    )
    max_length = fit_to_context(cfg.data.max_length, cfg.model.path, "data.max_length")
    limits = dict(
        chat=chat,
        max_length=max_length,
        max_prompt_length=min(cfg.data.max_prompt_length, max_length),
        truncate=cfg.data.truncate,
    )
    train_set = tokenize_sft(tokenizer, train_records, source=cfg.data.train, **limits)
    eval_set = tokenize_sft(
        tokenizer, eval_records, source=cfg.data.eval or f"{cfg.data.train} (held out)", **limits
    )

    model = load_model(cfg.model, dist.device)
    learner = Learner(model, dist, total_steps=cfg.run.max_steps, **cfg.optim.model_dump())
    run.resume({"model": learner})
    packed, pad_id = cfg.data.packing, tokenizer.pad_token_id
    eval_kw = dict(micro_batch_size=t.micro_batch_size, packed=packed, pad_id=pad_id)

    def held_out() -> dict:
        if not eval_set:
            return {}
        return {"eval/loss": heldout_nll(model, eval_set, dist, **eval_kw)}

    run.summary.update(train_examples=len(train_set), eval_examples=len(eval_set))
    run.begin(held_out)
    for step in run.steps():
        began = time.perf_counter()
        indices = step_indices(
            step, num_examples=len(train_set), batch_size=t.batch_size, seed=cfg.run.seed
        )
        batches = [
            collate([train_set[i] for i in part], packed, pad_id).to(dist.device)
            for part in split_for_rank(indices, t.micro_batch_size, dist)
        ]
        metrics = learner.step(batches, [b.num_targets for b in batches], sft_loss)
        tokens = dist.all_reduce_sum(torch.tensor(float(sum(b.num_tokens for b in batches))))
        metrics["tokens_per_s"] = float(tokens) / (time.perf_counter() - began)
        run.end_step(step + 1, metrics, held_out)
    return run.finish(lambda out: save_pretrained(model, tokenizer, out))
