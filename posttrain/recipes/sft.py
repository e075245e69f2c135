"""Supervised fine-tuning on demonstrations: the loss is the answer tokens' negative log-likelihood.

Reads prompt/completion or conversation records, renders them with the tokenizer's chat template,
and trains on the assistant tokens only (prompt, system and user tokens are masked out).
Batches are packed without padding by default. One optimizer step sees `train.batch_size`
sequences; the loss is the mean over all answer tokens in them (every token weighs the same,
however the sequences are split into micro-batches and processes).
"""

from __future__ import annotations

import json
import time

import torch

from posttrain.config import DataConfig, ModelConfig, OptimConfig, Section, TrainConfig, dump_config
from posttrain.data.packing import Batch, collate
from posttrain.data.splits import load_train_eval
from posttrain.data.tokenize import TokenizedExample, tokenize_sft, uses_chat_template
from posttrain.models.loading import load_causal_lm, load_tokenizer, save_pretrained
from posttrain.models.logprobs import nll_sum
from posttrain.train.distributed import Dist
from posttrain.train.learner import Learner, split_for_rank, step_indices
from posttrain.train.metrics import MetricsLogger
from posttrain.train.run import start_run


class SFTConfig(Section):
    model: ModelConfig = ModelConfig()
    """The model to fine-tune."""
    data: DataConfig = DataConfig()
    """Demonstrations: prompt/completion or conversation records."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = TrainConfig()
    """Steps, batch sizes, logging, checkpoints."""


def sft_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Summed answer-token NLL; the learner divides by the step's answer-token count."""
    return nll_sum(model, batch), {}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: list[TokenizedExample],
    dist: Dist,
    *,
    micro_batch_size: int,
    packed: bool,
    pad_id: int,
) -> float:
    """Mean answer-token NLL over `examples`, shared out across processes."""
    was_training = model.training
    model.eval()
    mine = examples[dist.rank :: dist.world_size]
    totals = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), micro_batch_size):
        batch = collate(mine[i : i + micro_batch_size], packed, pad_id).to(dist.device)
        totals += torch.tensor(
            [float(nll_sum(model, batch)), batch.num_targets], dtype=torch.float64
        )
    model.train(was_training)
    loss_sum, count = dist.all_reduce_sum(totals).cpu().tolist()
    return loss_sum / max(count, 1)


def run(cfg: SFTConfig) -> dict:
    """Train, evaluate and save; returns the summary also written to `summary.json`."""
    t = cfg.train
    dist, out = start_run(
        t.out_dir, dump_config(cfg), device=t.device, seed=t.seed, batch_size=t.batch_size,
        micro_batch_size=t.micro_batch_size,
    )  # fmt: skip

    tokenizer = load_tokenizer(cfg.model.path)
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    train_records, eval_records = load_train_eval(
        cfg.data.train,
        cfg.data.eval,
        kinds=("completion", "conversation"),
        eval_fraction=cfg.data.eval_fraction,
        seed=t.seed,
        limit=cfg.data.limit,
    )
    limits = dict(
        chat=chat,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        truncate=cfg.data.truncate,
    )
    train_set = tokenize_sft(tokenizer, train_records, source=cfg.data.train, **limits)
    eval_set = tokenize_sft(
        tokenizer, eval_records, source=cfg.data.eval or f"{cfg.data.train} (held out)", **limits
    )

    lora = cfg.model.lora
    model = load_causal_lm(
        cfg.model.path,
        dist.device,
        dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        lora_r=lora.r if lora.enabled else 0,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        lora_target_modules=lora.target_modules,
    )
    learner = Learner(model, dist, total_steps=t.max_steps, **cfg.optim.model_dump())
    start = learner.resume(out) if t.resume else 0
    logger = MetricsLogger(
        out, enabled=dist.is_main, total_steps=t.max_steps, start_step=start,
        progress=t.progress, tensorboard=t.tensorboard,
    )  # fmt: skip
    packed, pad_id = cfg.data.packing, tokenizer.pad_token_id
    eval_kw = dict(micro_batch_size=t.micro_batch_size, packed=packed, pad_id=pad_id)

    summary: dict = {"train_examples": len(train_set), "eval_examples": len(eval_set)}
    if start == 0 and eval_set:
        summary["eval_loss_before"] = evaluate(model, eval_set, dist, **eval_kw)
        logger.log(0, {"eval/loss": summary["eval_loss_before"]})
    for step in range(start, t.max_steps):
        began = time.perf_counter()
        indices = step_indices(
            step, num_examples=len(train_set), batch_size=t.batch_size, seed=t.seed
        )
        batches = [
            collate([train_set[i] for i in part], packed, pad_id).to(dist.device)
            for part in split_for_rank(indices, t.micro_batch_size, dist)
        ]
        metrics = learner.step(batches, [b.num_targets for b in batches], sft_loss)
        tokens = dist.all_reduce_sum(torch.tensor(float(sum(b.num_tokens for b in batches))))
        metrics["tokens_per_s"] = float(tokens) / (time.perf_counter() - began)
        done = step + 1
        if eval_set and t.eval_every and done % t.eval_every == 0 and done < t.max_steps:
            metrics["eval/loss"] = evaluate(model, eval_set, dist, **eval_kw)
        if done % t.log_every == 0 or "eval/loss" in metrics or done == t.max_steps:
            logger.log(done, metrics)
        else:
            logger.advance(done)
        if t.save_every and done % t.save_every == 0 and done < t.max_steps:
            learner.save(out, done, keep=t.keep_checkpoints)

    if eval_set:
        summary["eval_loss_after"] = evaluate(model, eval_set, dist, **eval_kw)
        logger.log(t.max_steps, {"eval/loss": summary["eval_loss_after"]})
    logger.close()
    if dist.is_main:
        save_pretrained(model, tokenizer, out / "final")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    dist.barrier()
    return summary
