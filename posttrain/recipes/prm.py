"""Process reward models: step labels by Monte-Carlo rollouts, then a PRM trained on them.

Labelling (Math-Shepherd, Wang et al. 2024, Sec. 3.2), skipped when `labels.train` names a
step-label file:
1. Sample `labels.solutions_per_prompt` solutions of each prompt from `policy` (the online
   core), keep the distinct ones, and score each with the verifier (`rewards`, unset: the
   task's own). Split each into steps at `labels.separator` (`posttrain.data.steps`).
2. From the prefix ending with each step k but the last, sample `labels.rollouts_per_step`
   completions and verify each: the step's label is the fraction that reach a correct answer
   (the last step's label is the solution's own verdict). A step that leaves the right answer
   within reach scores above 0; one that made an unrecoverable mistake scores 0.
3. Write `labels-train.jsonl` and `labels-eval.jsonl` (rows `{prompt, steps, labels}`) and,
   for prompts with both a correct and a wrong solution, `outcome-pairs.jsonl` (correct chosen,
   wrong rejected), on which `posttrain rm` trains the outcome reward model it is compared with.

Training: a sequence classifier with one head on the `model.path` backbone reads each step's
last token and learns P(correct answer | prefix) with binary cross-entropy against the hard
label 1[label > 0] (Math-Shepherd's "hard estimation") or the soft label itself
(`train_on: soft`), every step weighing the same. Held out (`step_metrics`): step-label accuracy
(the PRM's p > 0.5 against the hard label) beside always answering the commoner label, ROC AUC,
and the loss. The saved model records its separator, so
`{name: prm, options: {path: runs/prm/final}}` scores completions step by step
(`posttrain.rewards.process`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from posttrain.config import (
    ModelConfig,
    OptimConfig,
    PromptDataConfig,
    RunConfig,
    SamplingConfig,
    Section,
    TrainConfig,
)
from posttrain.data.prompts import Prompt, load_prompts
from posttrain.data.steps import (
    StepBatch,
    StepRecord,
    collate_steps,
    encode_steps,
    load_step_records,
    split_steps,
)
from posttrain.data.tokenize import uses_chat_template
from posttrain.files import write_jsonl_atomic
from posttrain.models.loading import fit_to_context, load_model, load_tokenizer, save_pretrained
from posttrain.models.reward import RewardModel, load_reward_model
from posttrain.online import Rollout, sample, sample_groups, score, task_reward
from posttrain.rewards import CompositeReward
from posttrain.rollout import Sampler, build_sampler, sampling_params
from posttrain.train.learner import Learner, step_indices
from posttrain.train.run import Run, check_batch

CURVES = ("loss", "eval/loss", "eval/step_accuracy", "eval/step_auc")


class LabelsSection(Section):
    train: str = ""
    """A step-label file to train on (rows {prompt, steps, labels}); empty: make one by
    Monte-Carlo rollouts from `policy`."""
    eval: str = ""
    """A held-out step-label file; empty with `train` set: no held-out evaluation."""
    separator: str = "\n"
    """What ends a reasoning step (kept with the step it closes); saved with the PRM."""
    solutions_per_prompt: int = Field(4, ge=1)
    """Solutions sampled per prompt (distinct ones are labelled)."""
    rollouts_per_step: int = Field(8, ge=1)
    """Completions sampled from each step prefix to estimate its label."""
    chunk: int = Field(64, ge=1)
    """Prompts per sampler call while labelling."""


class PRMConfig(Section):
    policy: str = ""
    """The model whose solutions are labelled (and that completes each prefix); default:
    model.path."""
    model: ModelConfig = ModelConfig()
    """The PRM's backbone (a decoder; a new score head is added)."""
    data: PromptDataConfig = PromptDataConfig()
    """Prompts to label: a task, or prompt files; the held-out ones make labels-eval.jsonl."""
    rewards: list[dict[str, Any]] | None = None
    """The verifier that decides a correct final answer (unset: the task's own); the first
    reward decides `correct`."""
    sampling: SamplingConfig = SamplingConfig()
    """How solutions and prefix completions are sampled."""
    labels: LabelsSection = LabelsSection()
    """Where step labels come from."""
    train_on: Literal["hard", "soft"] = "hard"
    """The BCE target: 1[label > 0] (Math-Shepherd's hard estimation), or the label itself."""
    optim: OptimConfig = OptimConfig(lr=3e-4)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = TrainConfig(batch_size=32, micro_batch_size=32)
    """Solutions per optimizer step and per forward pass."""
    run: RunConfig = RunConfig(out_dir="runs/prm", max_steps=200, eval_every=50)
    """Output directory, seed, device, steps, logging, evaluation, checkpoints."""


@torch.no_grad()
def monte_carlo_labels(
    sampler: Sampler,
    groups: list[tuple[Prompt, list[Rollout]]],
    reward: CompositeReward,
    separator: str,
    tokenizer,
    cfg: PRMConfig,
    seed: int,
) -> list[dict]:
    """One row `{prompt, steps, labels, correct}` per scored solution in `groups` (see the
    module docstring); each step prefix's completions are verified as prefix + completion."""
    tokens = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    solutions, prefixes = [], []
    for prompt, rollouts in groups:
        for r in rollouts:
            steps = split_steps(r.text, separator)
            solutions.append((prompt, r, steps))
            ids, text = list(prompt.token_ids), ""
            for step in steps[:-1]:
                ids, text = ids + tokens(step), text + step
                prefixes.append((len(solutions) - 1, replace(prompt, token_ids=ids), text))
    M = cfg.labels.rollouts_per_step
    hits = [[] for _ in solutions]
    for start in range(0, len(prefixes), cfg.labels.chunk):
        part = prefixes[start : start + cfg.labels.chunk]
        params = sampling_params(cfg.sampling, n=M, seed=seed + start)
        rollouts = sample(sampler, [p for _, p, _ in part], params)
        for r in rollouts:
            r.text = part[r.group][2] + r.text
        score(rollouts, reward)
        for k, (owner, _, _) in enumerate(part):
            hits[owner].append(sum(r.correct for r in rollouts[k * M : (k + 1) * M]) / M)
    return [
        {"prompt": prompt.text, "steps": steps, "labels": [*hit, float(r.correct)],
         "correct": r.correct}
        for (prompt, r, steps), hit in zip(solutions, hits, strict=True)
    ]  # fmt: skip


def outcome_pairs(rows: list[dict]) -> list[dict]:
    """Per prompt, each correct solution paired with a wrong one (in turn), for `posttrain rm`."""
    by_prompt: dict[str, tuple[list[str], list[str]]] = {}
    for row in rows:
        right, wrong = by_prompt.setdefault(row["prompt"], ([], []))
        (right if row["correct"] else wrong).append("".join(row["steps"]))
    return [
        {"prompt": prompt, "chosen": c, "rejected": wrong[i % len(wrong)]}
        for prompt, (right, wrong) in by_prompt.items()
        if wrong
        for i, c in enumerate(right)
    ]


def make_labels(cfg: PRMConfig, run: Run) -> tuple[str, str]:
    """Label the train and held-out prompts by Monte-Carlo rollouts; the two files' paths."""
    policy, seed = cfg.policy or cfg.model.path, cfg.run.seed
    tokenizer = load_tokenizer(policy, "policy")
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    max_prompt = fit_to_context(
        cfg.data.max_prompt_length, policy, "data.max_prompt_length", cfg.sampling.max_new_tokens
    )
    train, held_out = load_prompts(
        cfg.data, tokenizer, chat=chat, max_prompt_length=max_prompt, seed=seed
    )
    model = load_model(cfg.model, run.device, trainable=False, path=policy)
    sampler = build_sampler(cfg.sampling, model, tokenizer, seed)
    reward = task_reward(cfg.rewards, cfg.data)
    params = sampling_params(cfg.sampling, n=cfg.labels.solutions_per_prompt, seed=seed)
    paths, made = [], {}
    for name, prompts in (("train", train), ("eval", held_out)):
        began = time.perf_counter()
        groups = sample_groups(sampler, prompts, params, chunk=cfg.labels.chunk)
        for _, rollouts in groups:
            score(rollouts, reward)
        rows = monte_carlo_labels(
            sampler, groups, reward, cfg.labels.separator, tokenizer, cfg, seed + 7919
        )
        path = run.out / f"labels-{name}.jsonl"
        write_jsonl_atomic(path, rows)
        paths.append(str(path) if rows else "")
        steps = [x for row in rows for x in row["labels"]]
        made[name] = {
            "solutions": len(rows), "steps": len(steps),
            "correct_fraction": sum(r["correct"] for r in rows) / max(len(rows), 1),
            "positive_steps": sum(x > 0 for x in steps) / max(len(steps), 1),
            "seconds": time.perf_counter() - began,
        }  # fmt: skip
        if name == "train":
            write_jsonl_atomic(run.out / "outcome-pairs.jsonl", outcome_pairs(rows))
    run.summary["labels"] = made
    sampler.close()
    del model, sampler
    return paths[0], paths[1]


def prm_loss(
    model: torch.nn.Module, sb: StepBatch, targets: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Summed BCE over the batch's steps (the learner divides by the step count), and the
    number of steps whose prediction p > 0.5 agrees with target > 0.5."""
    logits = model(sb.batch, sb.positions)[:, 0].float()
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    agree = ((logits > 0) == (targets > 0.5)).sum()
    return loss, {"step_accuracy": agree.detach()}


def step_metrics(logits: torch.Tensor, records: list[StepRecord], loss_sum: float) -> dict:
    """Held-out numbers against the hard labels 1[label > 0]: the mean BCE, the accuracy of
    p > 0.5, the accuracy of always answering the commoner label (the bar to clear), and the
    ROC AUC (the chance that a positive step outscores a negative one, ties half)."""
    hard = torch.tensor([x > 0 for r in records for x in r.labels])
    positives, negatives = logits[hard], logits[~hard]
    metrics = {
        "eval/loss": loss_sum / len(hard),
        "eval/step_accuracy": float(((logits > 0) == hard).float().mean()),
        "eval/majority_accuracy": max(float(hard.float().mean()), 1 - float(hard.float().mean())),
    }
    if len(positives) and len(negatives):
        above = (positives[:, None] > negatives[None]).float().mean()
        ties = (positives[:, None] == negatives[None]).float().mean()
        metrics["eval/step_auc"] = float(above + 0.5 * ties)
    return metrics


def run(cfg: PRMConfig) -> dict:
    """Label (unless given labels), train, evaluate and save; returns the summary."""
    t = cfg.train
    run = Run(cfg.run, cfg, curves=CURVES)
    dist = run.dist
    check_batch(t, dist)
    if dist.world_size > 1:
        raise NotImplementedError("posttrain prm runs in one process; start it without torchrun")
    train_path, eval_path = cfg.labels.train, cfg.labels.eval
    if not train_path:
        done = run.out / "labels-train.jsonl"
        if done.exists():  # a rerun or resume reuses the labels already made
            eval_done = run.out / "labels-eval.jsonl"
            train_path, eval_path = str(done), str(eval_done) if eval_done.exists() else ""
        else:
            train_path, eval_path = make_labels(cfg, run)
    train_set = load_step_records(train_path)
    eval_set = load_step_records(eval_path) if eval_path else []

    tokenizer = load_tokenizer(cfg.model.path)
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    model: RewardModel = load_reward_model(
        cfg.model.path, dist.device, heads=["step"], head_weights=[1.0],
        pad_token_id=tokenizer.pad_token_id, dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
    )  # fmt: skip
    if not model.last_token:
        raise ValueError(f"model.path: {cfg.model.path!r} is not a decoder; a PRM needs one")

    def target(record: StepRecord) -> list[float]:
        return [float(x > 0) if cfg.train_on == "hard" else x for x in record.labels]

    def batch_of(records: list[StepRecord]) -> tuple[StepBatch, torch.Tensor]:
        encoded = [encode_steps(tokenizer, r.prompt, r.steps, chat) for r in records]
        targets = torch.tensor([x for r in records for x in target(r)])
        return collate_steps(encoded).to(dist.device), targets.to(dist.device)

    learner = Learner(model, dist, total_steps=cfg.run.max_steps, **cfg.optim.model_dump())
    run.resume({"model": learner})

    def loss_fn(m: torch.nn.Module, item: tuple[StepBatch, torch.Tensor]) -> tuple:
        return prm_loss(m, *item)

    @torch.no_grad()
    def held_out() -> dict:
        if not eval_set:
            return {}
        model.eval()
        loss, logits = 0.0, []
        for i in range(0, len(eval_set), t.micro_batch_size):
            sb, targets = batch_of(eval_set[i : i + t.micro_batch_size])
            part = model(sb.batch, sb.positions)[:, 0].float()
            loss += float(F.binary_cross_entropy_with_logits(part, targets, reduction="sum"))
            logits.append(part.cpu())
        model.train()
        return step_metrics(torch.cat(logits), eval_set, loss)

    run.summary.update(train_solutions=len(train_set), eval_solutions=len(eval_set))
    run.begin(held_out)
    for step in run.steps():
        indices = step_indices(
            step, num_examples=len(train_set), batch_size=t.batch_size, seed=cfg.run.seed
        )
        items = [
            batch_of([train_set[i] for i in indices[j : j + t.micro_batch_size]])
            for j in range(0, len(indices), t.micro_batch_size)
        ]
        metrics = learner.step(items, [len(targets) for _, targets in items], loss_fn)
        run.end_step(step + 1, metrics, held_out)

    def save(out) -> None:
        model.classifier.config.prm_step_separator = cfg.labels.separator
        save_pretrained(model.classifier, tokenizer, out)

    return run.finish(save)
