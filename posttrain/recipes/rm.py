"""Reward-model training from preference pairs and K-way rankings, under Bradley-Terry.

A scalar head on any Hugging Face backbone (`AutoModelForSequenceClassification`) learns
`r(x, y)` so that better responses score higher:

    loss = 1/G sum_g sum_h 1/|P_gh| sum_{(w, l) in P_gh} -log sigmoid(r_h(x, y_w) - r_h(x, y_l) - m)
           [+ center_coef * the same weighted mean of (r_h(x, y_w) + r_h(x, y_l))^2]

over the G comparisons (prompts) of a step, their heads h and each head's pairs P_gh. A ranking
of K responses gives K(K-1)/2 pairs, all read from one forward pass per response, and each
ranking weighs as one pair would: its pairs' losses are averaged, as InstructGPT does
(Ouyang et al. 2022, Sec. 3.5 and eq. 1: "1 / C(K, 2)"), so prompts with more responses do
not dominate and the pairs of one ranking, which are correlated, do not overfit. Margin m:
Llama 2 (Touvron et al. 2023, eq. 2); centering: Eisenstein et al. 2023 (both in
`posttrain.losses.bradley_terry_loss`). `train.batch_size` counts comparisons, not sequences.

Decoder backbones run padding-free: each prompt's tokens once, then its responses, in one packed
row (`reward.share_prompt`), with the score head applied at each response's last token only.
Encoders run padded through their own pooled forward. See `posttrain.models.reward`.

Multi-objective heads (`reward.heads`): one scalar per named attribute; a row column named after
a head ranks the responses on it (`posttrain.data.reward`). The combined reward, which the
accuracy below and `RewardModelScorer` use, is `sum_h w_h r_h` with `reward.head_weights`
(default: the mean of the heads).

Evaluation on held-out comparisons, on the rows' own order: pairwise accuracy (ties count
half), mean margin `r_c - r_r`, and the calibration of P(chosen > rejected) =
sigmoid(r_c - r_r): expected calibration error (Guo et al. 2017) over equal-width bins of the
confidence max(p, 1 - p) in [0.5, 1], with the reliability table in `summary.json`.
"""

from __future__ import annotations

import time

import torch
from pydantic import ValidationInfo, field_validator

from posttrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig, Section, TrainConfig
from posttrain.data.reward import (
    Comparison,
    Layout,
    RewardBatch,
    RewardEncoder,
    collate_comparisons,
    tokenize_comparisons,
)
from posttrain.data.splits import load_train_eval
from posttrain.data.tokenize import uses_chat_template
from posttrain.losses import bradley_terry_loss
from posttrain.models.loading import fit_to_context, load_tokenizer, save_pretrained
from posttrain.models.reward import RewardModel, load_reward_model
from posttrain.train.distributed import Dist
from posttrain.train.learner import Learner, split_for_rank, step_indices
from posttrain.train.run import Run, check_batch

RESERVED_COLUMNS = {"prompt", "chosen", "rejected", "responses", "margin", "id"}


class RewardConfig(Section):
    heads: list[str] = []
    """Named reward heads, one scalar each (e.g. [helpful, harmless]); a row column of the same
    name ranks the responses on it. Empty: one head named 'reward'."""
    head_weights: list[float] = []
    """Weights w_h of the combined reward sum_h w_h r_h; empty: 1 / (number of heads) each."""
    center_coef: float = 0.0
    """Weight of the centering term mean((r_w + r_l)^2) (Eisenstein et al. 2023 use 0.01)."""
    share_prompt: bool = True
    """Decoders: compute each prompt once for all its responses (else once per response)."""
    calibration_bins: int = 10
    """Equal-width confidence bins over [0.5, 1] for the calibration error and table."""

    @field_validator("heads")
    @classmethod
    def _distinct_heads(cls, heads: list[str]) -> list[str]:
        if len(set(heads)) != len(heads):
            raise ValueError(f"head names must be distinct, got {heads}")
        if clash := RESERVED_COLUMNS.intersection(heads):
            raise ValueError(f"head names cannot be record columns: {sorted(clash)}")
        return heads

    @field_validator("head_weights")
    @classmethod
    def _one_weight_per_head(cls, weights: list[float], info: ValidationInfo) -> list[float]:
        heads = info.data.get("heads") or ["reward"]
        if weights and len(weights) != len(heads):
            raise ValueError(f"{len(weights)} weights for {len(heads)} heads {heads}")
        return weights


class RMConfig(Section):
    model: ModelConfig = ModelConfig()
    """The backbone: a causal LM or an encoder directory; a new scalar head goes on top."""
    data: DataConfig = DataConfig()
    """Preference (prompt, chosen, rejected[, margin]) or ranking (prompt, responses) records."""
    reward: RewardConfig = RewardConfig()
    """Heads, their combination, the loss's centering term, calibration bins."""
    optim: OptimConfig = OptimConfig(lr=1e-5)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = TrainConfig()
    """Batch sizes, in comparisons (a pair, or a ranking of K responses)."""
    run: RunConfig = RunConfig(out_dir="runs/rm")
    """Output directory, seed, device, steps, logging, evaluation, checkpoints."""


def pair_loss(scores: torch.Tensor, rb: RewardBatch, center_coef: float) -> torch.Tensor:
    """Summed per-comparison Bradley-Terry loss over every head's pairs; `scores` `(S, H)`."""
    if not rb.weight.sum() > 0:  # every head tied on every pair of this micro-batch
        return scores.sum() * 0.0
    chosen, rejected = scores[rb.better, rb.head], scores[rb.worse, rb.head]
    loss, _ = bradley_terry_loss(
        chosen, rejected, margin=rb.margin, center_coef=center_coef, weights=rb.weight
    )
    return loss * rb.weight.sum()  # weighted mean x total weight = per-comparison means summed


def order_margins(scores: torch.Tensor, rb: RewardBatch, head_weights: torch.Tensor):
    """`(Q,)` combined-reward margins r(better) - r(worse) on the rows' own order."""
    combined = scores.detach() @ head_weights
    return combined[rb.order_better] - combined[rb.order_worse]


def rm_loss(
    model: torch.nn.Module, rb: RewardBatch, *, head_weights: torch.Tensor, center_coef: float
) -> tuple[torch.Tensor, dict]:
    """The loss sum (the learner divides by the comparisons), and the per-comparison accuracy
    (ties count half) and margin of the combined reward on the rows' order, summed."""
    scores = model(rb.batch, rb.last_index, rb.token_type_ids).float()  # (S, H)
    d = order_margins(scores, rb, head_weights)
    correct = (d > 0).float() + 0.5 * (d == 0).float()
    return pair_loss(scores, rb, center_coef), {
        "accuracy": (rb.order_weight * correct).sum(),
        "margin": (rb.order_weight * d).sum(),
    }


@torch.no_grad()
def evaluate(
    model: RewardModel,
    comparisons: list[Comparison],
    encoder: RewardEncoder,
    dist: Dist,
    *,
    layout: Layout,
    micro_batch_size: int,
    head_weights: torch.Tensor,
    center_coef: float,
    bins: int,
) -> dict:
    """Held-out loss, pairwise accuracy, mean margin, ECE and reliability table (see above)."""
    was_training = model.training
    model.eval()
    heads = model.heads
    n_heads = len(heads)
    # loss, comparisons, pairs, correct, margin | head correct, head pairs | bin n, conf, correct
    totals = torch.zeros(5 + 2 * n_heads + 3 * bins, dtype=torch.float64)
    mine = comparisons[dist.rank :: dist.world_size]
    for i in range(0, len(mine), micro_batch_size):
        rb = collate_comparisons(mine[i : i + micro_batch_size], encoder, layout).to(dist.device)
        scores = model(rb.batch, rb.last_index, rb.token_type_ids).float()
        loss_sum = pair_loss(scores, rb, center_coef)
        d = order_margins(scores, rb, head_weights).double().cpu()
        correct = (d > 0).double() + 0.5 * (d == 0).double()
        confidence = torch.sigmoid(d.abs())
        which = ((confidence - 0.5) * 2 * bins).long().clamp(max=bins - 1)
        by_head = (scores[rb.better, rb.head] > scores[rb.worse, rb.head]).double().cpu()
        head = rb.head.cpu()
        totals += torch.cat(
            [
                torch.tensor(
                    [float(loss_sum), rb.num_comparisons, len(d), correct.sum(), d.sum()],
                    dtype=torch.float64,
                ),
                torch.bincount(head, by_head, minlength=n_heads),
                torch.bincount(head, minlength=n_heads).double(),
                torch.bincount(which, minlength=bins).double(),
                torch.bincount(which, confidence, minlength=bins),
                torch.bincount(which, correct, minlength=bins),
            ]
        )
    model.train(was_training)
    t = dist.all_reduce_sum(totals.to(dist.device)).cpu().tolist()
    loss, groups, pairs, correct, margin = t[:5]
    head_correct, head_pairs = t[5 : 5 + n_heads], t[5 + n_heads : 5 + 2 * n_heads]
    counts, conf, hits = (t[5 + 2 * n_heads + b * bins :][:bins] for b in range(3))
    table = [
        {
            "confidence": f"{0.5 + b * 0.5 / bins:.3f}-{0.5 + (b + 1) * 0.5 / bins:.3f}",
            "pairs": int(counts[b]),
            "mean_confidence": conf[b] / counts[b] if counts[b] else None,
            "accuracy": hits[b] / counts[b] if counts[b] else None,
        }
        for b in range(bins)
    ]
    result = {
        "loss": loss / max(groups, 1),
        "accuracy": correct / max(pairs, 1),
        "mean_margin": margin / max(pairs, 1),
        "ece": sum(abs(hits[b] - conf[b]) for b in range(bins)) / max(pairs, 1),
        "pairs": int(pairs),
    }
    if n_heads > 1:
        for name, c, n in zip(heads, head_correct, head_pairs, strict=True):
            result[f"accuracy/{name}"] = c / max(n, 1)
    result["reliability"] = table
    return result


def _eval_metrics(result: dict) -> dict:
    return {f"eval/{k}": v for k, v in result.items() if isinstance(v, float | int)}


def run(cfg: RMConfig) -> dict:
    """Train, evaluate and save; returns the summary also written to `summary.json`."""
    t, r = cfg.train, cfg.reward
    run = Run(cfg.run, cfg)
    dist = run.dist
    check_batch(t, dist)

    # Read and validate the records first, so bad data fails before a model loads.
    train_records, eval_records = load_train_eval(
        cfg.data.train, cfg.data.eval, kinds=("preference", "ranking"),
        eval_fraction=cfg.data.eval_fraction, seed=cfg.run.seed, limit=cfg.data.limit,
    )  # fmt: skip
    heads = r.heads or ["reward"]
    weights = r.head_weights or [1 / len(heads)] * len(heads)
    tokenizer = load_tokenizer(cfg.model.path)
    lora = cfg.model.lora
    model = load_reward_model(
        cfg.model.path, dist.device, heads=heads, head_weights=weights,
        pad_token_id=tokenizer.pad_token_id, dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        lora_r=lora.r if lora.enabled else 0, lora_alpha=lora.alpha,
        lora_dropout=lora.dropout, lora_target_modules=lora.target_modules,
    )  # fmt: skip
    decoder = model.last_token
    layout: Layout = (
        "padded" if not (decoder and cfg.data.packing)
        else "shared" if r.share_prompt else "packed"
    )  # fmt: skip
    encoder = RewardEncoder(
        tokenizer, decoder=decoder, chat=uses_chat_template(tokenizer, cfg.data.chat_template)
    )
    max_length = fit_to_context(cfg.data.max_length, cfg.model.path, "data.max_length")
    limits = dict(
        heads=r.heads, max_length=max_length,
        max_prompt_length=min(cfg.data.max_prompt_length, max_length), truncate=cfg.data.truncate,
    )  # fmt: skip
    train_set = tokenize_comparisons(encoder, train_records, source=cfg.data.train, **limits)
    eval_source = cfg.data.eval or f"{cfg.data.train} (held out)"
    eval_set = tokenize_comparisons(encoder, eval_records, source=eval_source, **limits)

    learner = Learner(model, dist, total_steps=cfg.run.max_steps, **cfg.optim.model_dump())
    run.resume({"model": learner})
    head_weights = torch.tensor(weights, device=dist.device)
    loss_kw = dict(head_weights=head_weights, center_coef=r.center_coef)
    eval_kw = dict(layout=layout, micro_batch_size=t.micro_batch_size, bins=r.calibration_bins)

    def loss_fn(m: torch.nn.Module, rb: RewardBatch) -> tuple[torch.Tensor, dict]:
        return rm_loss(m, rb, **loss_kw)

    reliability: dict = {}

    def held_out() -> dict:
        if not eval_set:
            return {}
        result = evaluate(model, eval_set, encoder, dist, **eval_kw, **loss_kw)
        reliability["table"] = result["reliability"]
        return _eval_metrics(result)

    run.summary.update(
        train_comparisons=len(train_set), train_pairs=sum(len(c.order) for c in train_set),
        eval_comparisons=len(eval_set), heads=heads, head_weights=weights, layout=layout,
    )  # fmt: skip
    run.begin(held_out)
    for step in run.steps():
        began = time.perf_counter()
        indices = step_indices(
            step, num_examples=len(train_set), batch_size=t.batch_size, seed=cfg.run.seed
        )
        batches = [
            collate_comparisons([train_set[i] for i in part], encoder, layout).to(dist.device)
            for part in split_for_rank(indices, t.micro_batch_size, dist)
        ]
        metrics = learner.step(batches, [b.num_comparisons for b in batches], loss_fn)
        pairs = dist.all_reduce_sum(torch.tensor(float(sum(len(b.order_better) for b in batches))))
        metrics["pairs_per_s"] = float(pairs) / (time.perf_counter() - began)
        run.end_step(step + 1, metrics, held_out)
    if "table" in reliability:
        run.summary["reliability"] = reliability["table"]
    return run.finish(lambda out: save_pretrained(model.classifier, tokenizer, out))
