"""Direct preference optimization and its family, one recipe: DPO, cDPO, robust DPO, IPO, hinge
(SLiC), SimPO and ORPO learn from preference pairs; KTO from unpaired thumbs up/down.

Padding-free and prompt-once: each pair is packed as its prompt, then the chosen and the
rejected answer, each attending to the prompt and to itself (`pack_shared`), so the prompt's
tokens are computed once for both answers, no pad token is computed, and the output head runs
on answer tokens only (`target_logprobs`). An answer's log-prob is the sum of its tokens'
log-probs; IPO, SimPO and ORPO use the per-token mean (sum / answer length). `data.packing=false`
runs padded `prompt + answer` rows instead, for models without sdpa attention.

Reference log-probs (SimPO and ORPO have no reference; none is loaded or computed for them):
- `reference.mode=cached` (default): one no-grad pass over the train and held-out data before
  training, saved under `reference.cache_dir` with a key hashing the reference model's files,
  the token ids, and the settings that change the numbers (dtype, device type, attention,
  packing); a run whose key exists skips the pass.
- `reference.mode=online`: computed in every step.
Either way the reference is `reference.model` if given; else the starting policy: with LoRA,
the policy with its adapters disabled (no second copy in memory), with full fine-tuning, the
model before any update (cached) or a frozen copy of it (online).

What is averaged over what: `train.batch_size` counts pairs (KTO: labelled completions). The
loss is the mean of the per-pair loss over the step's pairs on all processes (each micro-batch
returns its sum, the learner divides by the step's pair count). Metrics are means over the
same pairs: `rewards/chosen`, `rewards/rejected` (implicit rewards beta * (logp - ref_logp);
SimPO's and ORPO's own otherwise), `rewards/margin`, `rewards/accuracy` (fraction of pairs with
chosen > rejected), and the policy's summed `logps/chosen`, `logps/rejected`. The same on the
held-out pairs (`eval/...`) at the start, every `run.eval_every` steps, and at the end.

KTO (Ethayarajh et al. 2024): each completion is packed with its prompt and with a completion
written for another prompt (a seeded derangement of the data); that mismatched pair's policy
and reference log-probs estimate the reference point z0 = max(0, mean KL), per micro-batch.
KTO's `rewards/chosen` and `rewards/rejected` are means over the desirable and undesirable
completions, and `rewards/accuracy` the fraction whose log-ratio lies on its label's side of z0.
Preference pairs given to KTO become one desirable and one undesirable completion each.
"""

from __future__ import annotations

import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import ValidationInfo, field_validator

from posttrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig, Section, TrainConfig
from posttrain.data.pairs import PairBatch, PairExample, collate_pairs, tokenize_pairs
from posttrain.data.records import DataError
from posttrain.data.splits import load_train_eval
from posttrain.data.tokenize import uses_chat_template
from posttrain.losses.preference import kto_loss, pair_loss
from posttrain.models.loading import (
    fit_to_context,
    load_model,
    load_tokenizer,
    model_dir,
    save_pretrained,
)
from posttrain.models.reference import (
    Reference,
    directory_fingerprint,
    fingerprint,
    load_cached,
    save_cached,
    sequence_logprobs,
    tokens_fingerprint,
)
from posttrain.train.distributed import Dist
from posttrain.train.learner import Learner, split_for_rank, step_indices
from posttrain.train.run import Run, check_batch

LossName = Literal["dpo", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo", "kto"]
REFERENCE_FREE = ("simpo", "orpo")


class ReferenceConfig(Section):
    mode: Literal["cached", "online"] = "cached"
    """cached: computed once before training and kept on disk; online: computed every step."""
    model: str = ""
    """Reference model directory; empty: the starting policy (LoRA: adapters disabled)."""
    cache_dir: str = "~/.cache/posttrain/reference"
    """Where cached reference log-probs are kept, one file per model, data and settings."""


class DPOConfig(Section):
    loss: LossName = "dpo"
    """dpo (Rafailov et al. 2023), cdpo (label smoothing, Mitchell 2023), robust (Chowdhury et
    al. 2024), ipo (Azar et al. 2023), hinge (SLiC-HF, Zhao et al. 2023), simpo (Meng et al.
    2024), orpo (Hong et al. 2024), kto (Ethayarajh et al. 2024, unpaired labelled records)."""
    beta: float | None = None
    """Implicit-reward scale beta (IPO: its tau); empty: 2.0 for simpo, 0.1 otherwise."""
    label_smoothing: float = 0.1
    """cdpo and robust: assumed probability that a pair's label is flipped, in [0, 0.5)."""
    simpo_gamma: float = 1.0
    """simpo: target reward margin gamma (absolute; the paper tunes gamma / beta near 0.5)."""
    orpo_lambda: float = 0.1
    """orpo: weight of the odds-ratio term beside the chosen answers' NLL."""
    rpo_alpha: float = 0.0
    """Weight of the chosen answers' per-token NLL added to a pair loss (RPO: Pang et al. 2024,
    Iterative Reasoning Preference Optimization, eq. 1; TRL's rpo_alpha): keeps the chosen
    answers' likelihood from falling along with the rejected ones'. 0: off; not for kto."""
    kto_desirable_weight: float = 1.0
    """kto: weight of desirable completions' loss (the paper keeps w_D n_D / (w_U n_U) in [1, 4/3])."""
    kto_undesirable_weight: float = 1.0
    """kto: weight of undesirable completions' loss."""
    reference: ReferenceConfig = ReferenceConfig()
    """The reference policy's log-probs (not used by simpo and orpo)."""
    model: ModelConfig = ModelConfig()
    """The policy to train, full or LoRA."""
    data: DataConfig = DataConfig()
    """Preference (prompt, chosen, rejected) records; kto also takes labeled (prompt, completion, label)."""
    optim: OptimConfig = OptimConfig(lr=1e-6)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = TrainConfig()
    """Batch sizes, in pairs (kto: labelled completions)."""
    run: RunConfig = RunConfig(out_dir="runs/dpo")
    """Output directory, seed, device, steps, logging, evaluation, checkpoints."""

    @field_validator("beta")
    @classmethod
    def _default_beta(cls, beta: float | None, info: ValidationInfo) -> float:
        return beta if beta is not None else 2.0 if info.data.get("loss") == "simpo" else 0.1

    @field_validator("rpo_alpha")
    @classmethod
    def _rpo_for_pairs(cls, alpha: float, info: ValidationInfo) -> float:
        if alpha < 0 or (alpha and info.data.get("loss") == "kto"):
            raise ValueError(f"rpo_alpha must be >= 0, and 0 for kto (it needs pairs); got {alpha}")
        return alpha

    @field_validator("label_smoothing")
    @classmethod
    def _below_half(cls, eps: float) -> float:
        if not 0 <= eps < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")
        return eps


# KTO's labelled completions: policy and reference log-probs (B, 2) -> (mean loss, metrics).


def _kto(logps, ref, mb: PairBatch, c: DPOConfig):
    d = mb.desirable.to(logps.device)
    loss, m = kto_loss(
        logps[:, 0], ref[:, 0], d, logps[:, 1], ref[:, 1], beta=c.beta,
        desirable_weight=c.kto_desirable_weight, undesirable_weight=c.kto_undesirable_weight,
    )  # fmt: skip
    log_ratio, lp, n = (logps[:, 0] - ref[:, 0]).detach(), logps[:, 0].detach(), len(d)
    # Shares of the batch here; `finish_metrics` turns them into means over each label.
    return loss, {
        "desirable": d.float().mean(),
        "rewards/chosen": (c.beta * log_ratio * d).sum() / n,
        "rewards/rejected": (c.beta * log_ratio * ~d).sum() / n,
        "logps/chosen": (lp * d).sum() / n,
        "logps/rejected": (lp * ~d).sum() / n,
        "rewards/accuracy": ((log_ratio > m["kl"]) == d).float().mean(),
        "kl": m["kl"],
    }


def preference_loss(
    model: torch.nn.Module, mb: PairBatch, *, cfg: DPOConfig, reference: Reference | None
) -> tuple[torch.Tensor, dict]:
    """The loss and metrics summed over the micro-batch's pairs (the learner divides by pairs)."""
    n = mb.num_pairs
    mb.lengths = mb.lengths.to(mb.batch.input_ids.device)
    logps = sequence_logprobs(model, mb.batch, 2 * n).view(n, 2)
    ref = mb.ref_logps
    if ref is None and reference is not None:
        ref = reference.sequence_logprobs(mb.batch, 2 * n).view(n, 2)
    if cfg.loss == "kto":
        loss, metrics = _kto(logps, ref, mb, cfg)
    else:
        loss, metrics = pair_loss(
            cfg.loss, logps, ref, mb.lengths, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
            simpo_gamma=cfg.simpo_gamma, orpo_lambda=cfg.orpo_lambda,
        )  # fmt: skip
    if cfg.loss != "kto":
        metrics["logps/chosen"], metrics["logps/rejected"] = logps.detach().mean(0)
    if cfg.rpo_alpha:
        nll = -(logps[:, 0] / mb.lengths[:, 0]).mean()
        loss = loss + cfg.rpo_alpha * nll
        metrics["nll/chosen"] = nll.detach()
    return loss * n, {k: v * n for k, v in metrics.items()}


def finish_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """KTO: shares of the batch -> means over each label, and their margin (other losses
    report means over pairs already)."""
    if "desirable" in metrics:
        share = {"chosen": metrics["desirable"], "rejected": 1 - metrics["desirable"]}
        for key in ("rewards", "logps"):
            for side, s in share.items():
                metrics[f"{key}/{side}"] = metrics[f"{key}/{side}"] / s if s else float("nan")
        metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


# Reference log-probs, cached ----------------------------------------------------------------


def precompute_reference(
    splits: dict[str, list[PairExample]], reference: Reference, dist: Dist, *,
    cache_file: Path, micro_batch_size: int, packed: bool, pad_id: int,
) -> tuple[dict[str, torch.Tensor], bool]:  # fmt: skip
    """(B, 2) reference log-probs per split, from `cache_file` if it holds them (a hit), else
    computed with processes sharing the work and saved there; returns them and whether it hit."""
    cached = load_cached(cache_file)
    if cached is not None and all(
        name in cached and cached[name].shape == (len(ex), 2) for name, ex in splits.items()
    ):
        return {name: cached[name] for name in splits}, True
    out = {}
    for name, examples in splits.items():
        values = torch.zeros(len(examples), 2)
        mine = list(range(dist.rank, len(examples), dist.world_size))
        for i in range(0, len(mine), micro_batch_size):
            chunk = mine[i : i + micro_batch_size]
            mb = collate_pairs([examples[j] for j in chunk], None, packed=packed, pad_id=pad_id)
            batch = mb.batch.to(dist.device)
            values[chunk] = reference.sequence_logprobs(batch, 2 * len(chunk)).view(-1, 2).cpu()
        out[name] = dist.all_reduce_sum(values).cpu()
    if dist.is_main:
        save_cached(cache_file, out)
    dist.barrier()
    return out, False


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, examples: list[PairExample], ref_logps: torch.Tensor | None,
    dist: Dist, loss_fn, *, micro_batch_size: int, packed: bool, pad_id: int,
) -> dict[str, float]:  # fmt: skip
    """Loss and metrics as in training, means over the held-out pairs of all processes."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
    mine = list(range(dist.rank, len(examples), dist.world_size))
    for i in range(0, len(mine), micro_batch_size):
        chunk = mine[i : i + micro_batch_size]
        ref = ref_logps[chunk].to(dist.device) if ref_logps is not None else None
        mb = collate_pairs([examples[j] for j in chunk], ref, packed=packed, pad_id=pad_id)
        mb.batch = mb.batch.to(dist.device)
        loss, metrics = loss_fn(model, mb)
        for key, value in {"loss": loss, **metrics}.items():
            sums[key] += value.double().cpu()
    model.train(was_training)
    # A process with no pairs (fewer pairs than processes) has no keys: sum over every key.
    keys = sorted(set(dist.all_gather(sorted(sums)))) or ["loss"]
    totals = dist.all_reduce_sum(torch.stack([sums[k] for k in keys])).cpu().tolist()
    return finish_metrics({k: v / len(examples) for k, v in zip(keys, totals, strict=True)})


def run(cfg: DPOConfig) -> dict:
    """Train, evaluate and save; returns the summary also written to `summary.json`."""
    t = cfg.train
    run = Run(cfg.run, cfg)
    dist = run.dist
    check_batch(t, dist)

    tokenizer = load_tokenizer(cfg.model.path)
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    kto = cfg.loss == "kto"
    train_records, eval_records = load_train_eval(
        cfg.data.train, cfg.data.eval, kinds=("preference", "labeled") if kto else ("preference",),
        eval_fraction=cfg.data.eval_fraction, seed=cfg.run.seed, limit=cfg.data.limit,
    )  # fmt: skip
    max_length = fit_to_context(cfg.data.max_length, cfg.model.path, "data.max_length")
    tok = partial(
        tokenize_pairs, tokenizer, chat=chat, kto=kto, seed=cfg.run.seed, max_length=max_length,
        max_prompt_length=min(cfg.data.max_prompt_length, max_length), truncate=cfg.data.truncate,
    )  # fmt: skip
    train_set = tok(train_records, source=cfg.data.train)
    eval_set = tok(eval_records, source=cfg.data.eval or f"{cfg.data.train} (held out)")
    if kto and not ({e.desirable for e in train_set} == {True, False}):
        raise DataError(cfg.data.train, None, "label", "KTO needs desirable and undesirable rows")

    m = cfg.model
    model = load_model(m, dist.device)
    learner = Learner(model, dist, total_steps=cfg.run.max_steps, **cfg.optim.model_dump())
    packed, pad_id = cfg.data.packing, tokenizer.pad_token_id
    batching = dict(micro_batch_size=t.micro_batch_size, packed=packed, pad_id=pad_id)
    run.summary.update(loss=cfg.loss, train_pairs=len(train_set), eval_pairs=len(eval_set))

    # The reference, before any checkpoint is restored: it is the starting policy.
    reference, ref_logps = None, {"train": None, "eval": None}
    run.summary["reference"] = {"mode": "none"}
    if cfg.loss not in REFERENCE_FREE:
        r = cfg.reference
        separate = None
        if r.model:
            separate = load_model(
                m, dist.device, trainable=False, path=model_dir(r.model, "reference.model")
            )
        elif not m.lora.enabled:
            separate = model if r.mode == "cached" else load_model(m, dist.device, trainable=False)
        reference = Reference(model, separate, autocast=learner.autocast)
        if r.mode == "cached":
            began = time.perf_counter()
            key = fingerprint(
                directory_fingerprint(r.model or m.path), m.dtype, m.attn_implementation,
                dist.device.type, packed, tokens_fingerprint(
                    ids for e in train_set + eval_set for ids in (e.prompt, *e.answers)
                ), len(train_set),
            )  # fmt: skip
            cache_file = Path(r.cache_dir).expanduser() / f"{key}.pt"
            ref_logps, hit = precompute_reference(
                {"train": train_set, "eval": eval_set}, reference, dist,
                cache_file=cache_file, **batching,
            )  # fmt: skip
            run.summary["reference"] = dict(
                mode="cached", cache_file=str(cache_file), cache_hit=hit,
                seconds=round(time.perf_counter() - began, 3),
            )  # fmt: skip
            reference = separate = None  # no longer needed: free the copy
        else:
            run.summary["reference"] = {"mode": "online"}
    loss_fn = partial(preference_loss, cfg=cfg, reference=reference)
    run.resume({"model": learner})

    def held_out() -> dict[str, float]:
        if not eval_set:
            return {}
        scores = evaluate(model, eval_set, ref_logps["eval"], dist, loss_fn, **batching)
        return {f"eval/{k}": v for k, v in scores.items()}

    run.begin(held_out)
    train_ref = ref_logps["train"]
    for step in run.steps():
        began = time.perf_counter()
        indices = step_indices(
            step, num_examples=len(train_set), batch_size=t.batch_size, seed=cfg.run.seed
        )
        micro_batches = []
        for part in split_for_rank(indices, t.micro_batch_size, dist):
            ref = train_ref[list(part)].to(dist.device) if train_ref is not None else None
            mb = collate_pairs([train_set[i] for i in part], ref, packed=packed, pad_id=pad_id)
            mb.batch = mb.batch.to(dist.device)
            micro_batches.append(mb)
        metrics = learner.step(micro_batches, [mb.num_pairs for mb in micro_batches], loss_fn)
        metrics = finish_metrics(metrics)
        seconds = time.perf_counter() - began
        metrics["pairs_per_s"] = t.batch_size / seconds
        tokens = sum(mb.batch.num_tokens for mb in micro_batches)
        metrics["tokens_per_s"] = float(dist.all_reduce_sum(torch.tensor(float(tokens)))) / seconds
        run.end_step(step + 1, metrics, held_out)
    return run.finish(lambda out: save_pretrained(model, tokenizer, out))
