"""The whole feedback-training pipeline in one run directory, each stage a recipe of its own.

    posttrain quickstart                              # a tiny model, offline, ~10 min on 2 cores
    posttrain pipeline --config examples/rlhf.yaml    # your own model and data

Stages, in order (`stages` picks some; a finished stage is skipped on a rerun, an interrupted
one resumes from its last checkpoint):

1. `sft`: the base model (`base.path`, or a random tiny one built offline) fine-tuned on
   demonstrations (`data.sft_train`, or the task's rows, which carry completions).
2. `label`: `annotator.responses` temperature-1 samples of the SFT policy for each of
   `annotator.prompts` training prompts, ranked by a simulated annotator: the hidden gold rule
   (`annotator.rewards`) with Plackett-Luce noise, or an AI judge (`annotator.judge`, RLAIF).
   Writes K-way rankings (for the reward model, as InstructGPT) and best-vs-worst pairs (for
   DPO), and the annotator's agreement with the gold rule.
3. `rm`: `posttrain rm` from the SFT model on the rankings.
4. `ppo`: `posttrain ppo` from the SFT model against the reward model, per-token KL to the SFT
   policy (adaptive β), the gold rule scored beside it for monitoring.
5. `dpo`: `posttrain dpo` from the SFT model on the same preferences (the pairs).
6. `grpo`: `posttrain grpo` from the SFT model against the verifier (`verifier`).

Then every stage's model is evaluated on the same held-out prompts (the gold score, the
verifier's accuracy, the reward model's score, the KL to the SFT policy, sample completions)
and `report.html` is written beside `report.json`. Each stage's own config section is the
recipe's config: every key of `posttrain <stage> --help` applies, except the ones the
pipeline wires (model paths, data files, rewards of ppo and grpo, `run.out_dir`, `run.seed`).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config import (
    ConfigError,
    DataConfig,
    EvaluationConfig,
    OptimConfig,
    PromptDataConfig,
    RunConfig,
    SamplingConfig,
    Section,
    TrainConfig,
)
from posttrain.files import write_json_atomic, write_jsonl_atomic
from posttrain.judges import JudgeConfig
from posttrain.recipes.dpo import DPOConfig
from posttrain.recipes.grpo_config import GRPOConfig, GRPOSection
from posttrain.recipes.ppo_config import CriticSection, PPOConfig, PPOSection
from posttrain.recipes.rm import RMConfig
from posttrain.recipes.sft import SFTConfig
from posttrain.train.checkpoint import list_checkpoints

STAGES = ("sft", "label", "rm", "ppo", "dpo", "grpo")
Stage = Literal["sft", "label", "rm", "ppo", "dpo", "grpo"]


class BaseSection(Section):
    path: str = ""
    """The base model (a Hugging Face causal LM directory); empty: a random tiny qwen2 (hidden
    128, 2 layers, byte-level tokenizer) built offline."""


class PipelineDataConfig(PromptDataConfig):
    """Prompts for labelling, PPO, GRPO and the held-out evaluation (a task or prompt files),
    and the demonstrations SFT learns from."""

    task: str = "sentences"
    train_size: int = Field(20000, ge=0)
    chat_template: Literal["auto", "always", "never"] = "never"
    sft_train: str = ""
    """SFT demonstrations (prompt/completion or chat rows); empty: `sft_size` rows of the task,
    which carry completions."""
    sft_eval: str = ""
    """Held-out demonstrations for SFT's loss (empty: a split of the task's eval rows, or of
    `sft_train`)."""
    sft_size: int = Field(8000, ge=1)
    """Task rows SFT trains on when `sft_train` is empty."""


class AnnotatorConfig(Section):
    """The simulated human: a hidden gold rule, ranked with noise."""

    rewards: list[dict[str, Any]] | None = None
    """The gold rule as reward specs (unset: the task's own, VADER for `sentences`). It judges
    every stage's held-out samples too."""
    prompts: int = Field(1500, ge=1)
    """Training prompts to label."""
    responses: int = Field(4, ge=2)
    """Sampled responses ranked per prompt (K)."""
    noise: float = Field(0.5, ge=0)
    """Plackett-Luce temperature: a ranking is drawn with probabilities proportional to
    exp(gold / noise), so two responses whose gold scores differ by d come out in gold order
    with probability sigmoid(d / noise); 0 ranks by the rule exactly."""
    max_new_tokens: int = Field(48, ge=1)
    """Longest sampled response."""
    judge: JudgeConfig | None = None
    """An AI judge ranking the responses instead (RLAIF): pairwise, both orders, responses
    ordered by their mean P(better), ties left out; the gold rule then only measures its
    agreement."""

    @model_validator(mode="after")
    def _pairwise_judge(self) -> AnnotatorConfig:
        if self.judge is not None and (self.judge.kind != "pairwise" or not self.judge.both_orders):
            raise ValueError(
                "annotator.judge: the pipeline ranks with a pairwise judge asked in both orders "
                f"(kind pairwise, both_orders true); got kind {self.judge.kind!r}, "
                f"both_orders {self.judge.both_orders}"
            )
        return self


class ReportConfig(Section):
    max_new_tokens: int = Field(48, ge=1)
    """Longest held-out sample."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the held-out samples (1: the policy's own distribution, whose
    KL to the SFT policy is what PPO's penalty measures)."""
    samples_shown: int = Field(5, ge=0)
    """Held-out prompts whose completions the report shows side by side, one per stage."""


def _run(max_steps: int, **keys: Any) -> RunConfig:
    return RunConfig(max_steps=max_steps, **keys)


_PROMPTS = PromptDataConfig(chat_template="never")


class PipelineConfig(Section):
    out_dir: str = "runs/pipeline"
    """The run directory: every stage's run, the data, report.json and report.html."""
    seed: int = 0
    """Seed of the base model, the data, the annotator and every stage."""
    stages: list[Stage] = list(STAGES)
    """Stages to run, in pipeline order; the held-out evaluation and report always follow."""
    base: BaseSection = BaseSection()
    data: PipelineDataConfig = PipelineDataConfig()
    annotator: AnnotatorConfig = AnnotatorConfig()
    verifier: list[dict[str, Any]] = [
        {"name": "sentiment", "weight": 1.0, "options": {"threshold": 0.5}}
    ]
    """What GRPO trains on and the report's accuracy counts: reward specs scoring a completion
    at least 1 when right (default: VADER compound at least 0.5, a clearly positive sentence)."""
    report: ReportConfig = ReportConfig()
    sft: SFTConfig = SFTConfig(
        optim=OptimConfig(lr=3e-3, warmup_steps=30),
        train=TrainConfig(batch_size=32, micro_batch_size=32),
        run=_run(400, log_every=10, eval_every=100, save_every=100),
    )
    rm: RMConfig = RMConfig(
        data=DataConfig(eval_fraction=0.1),
        optim=OptimConfig(lr=3e-4, warmup_steps=20),
        train=TrainConfig(batch_size=32, micro_batch_size=32),
        run=_run(150, log_every=10, eval_every=50, save_every=50),
    )
    ppo: PPOConfig = PPOConfig(
        reward_model="<out_dir>/rm/final",  # wired to the rm stage's model
        sampling=SamplingConfig(max_new_tokens=48, log_samples=0),
        evaluation=EvaluationConfig(temperature=1.0),
        ppo=PPOSection(
            prompts_per_step=64,
            epochs=4,
            minibatch_size=32,
            micro_batch_size=32,
            kl_coef=0.1,
            kl_target=6.0,
            kl_horizon=100,
        ),
        critic=CriticSection(optim=OptimConfig(lr=1e-4, warmup_steps=10)),
        optim=OptimConfig(lr=5e-5, warmup_steps=10),
        run=_run(60, eval_every=20, save_every=10),
    )
    dpo: DPOConfig = DPOConfig(
        beta=0.1,
        data=DataConfig(eval_fraction=0.05),
        optim=OptimConfig(lr=1e-4, warmup_steps=10),
        train=TrainConfig(batch_size=32, micro_batch_size=32),
        run=_run(100, log_every=10, eval_every=50, save_every=50),
    )
    grpo: GRPOConfig = GRPOConfig(
        sampling=SamplingConfig(max_new_tokens=48, log_samples=0),
        evaluation=EvaluationConfig(temperature=1.0),
        grpo=GRPOSection(prompts_per_step=16, group_size=8, micro_batch_size=64),
        optim=OptimConfig(lr=5e-5, warmup_steps=5),
        run=_run(100, eval_every=25, save_every=10),
    )


class QuickstartConfig(PipelineConfig):
    """`posttrain quickstart`: the pipeline with every default, in runs/quickstart."""

    out_dir: str = "runs/quickstart"
    """The run directory: every stage's run, the data, report.json and report.html."""


# --- stages ----------------------------------------------------------------------------------


class Pipeline:
    """Where each stage's inputs and outputs lie in `cfg.out_dir`."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        self.data = self.out / "data"

    def model(self, stage: str) -> Path:
        return self.out / stage / "final"

    def done_path(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def finished(self, stage: str) -> dict | None:
        path = self.done_path(stage)
        return json.loads(path.read_text()) if path.exists() else None

    def gold_specs(self) -> list[dict[str, Any]]:
        if self.cfg.annotator.rewards is not None:
            return self.cfg.annotator.rewards
        from posttrain.tasks import TASKS

        if self.cfg.data.task not in TASKS:
            raise ValueError(
                "annotator.rewards: not set, and data.task names no task whose rule could "
                "rank responses; list the gold rule, e.g. [{name: sentiment}]"
            )
        return TASKS[self.cfg.data.task].default_rewards(self.cfg.data.task_options)

    # Each stage's recipe config: the section the user gave, wired to the pipeline's files.

    def _wired(self, section: Section, stage: str, **keys: Any) -> Any:
        """`section` with its run in `out_dir/stage`, its model the SFT stage's (unless
        `model__path` says otherwise) and `keys` (`head__key=value` or `head=value`) set."""
        raw = section.model_dump()
        raw["run"] = {**raw["run"], "out_dir": str(self.out / stage), "seed": self.cfg.seed}
        keys.setdefault("model__path", str(self.model("sft")))
        for dotted, value in keys.items():
            head, _, tail = dotted.partition("__")
            if tail:
                raw[head] = {**raw[head], tail: value}
            else:
                raw[head] = value
        return type(section).model_validate(raw)

    def _prompt_data(self) -> dict:
        keys = PromptDataConfig.model_fields
        return {k: v for k, v in self.cfg.data.model_dump().items() if k in keys}

    def sft_config(self, base: Path) -> SFTConfig:
        train, held_out = self.sft_files()
        return self._wired(
            self.cfg.sft,
            "sft",
            model__path=str(base),
            data__train=train,
            data__eval=held_out,
            data__chat_template=self.cfg.data.chat_template,
        )

    def rm_config(self) -> RMConfig:
        return self._wired(
            self.cfg.rm,
            "rm",
            data__train=str(self.data / "rankings.jsonl"),
            data__chat_template=self.cfg.data.chat_template,
        )

    def ppo_config(self) -> PPOConfig:
        return self._wired(
            self.cfg.ppo,
            "ppo",
            reward_model=str(self.model("rm")),
            rewards=None,
            gold=self.gold_specs(),
            data=self._prompt_data(),
        )

    def dpo_config(self) -> DPOConfig:
        return self._wired(
            self.cfg.dpo,
            "dpo",
            data__train=str(self.data / "pairs.jsonl"),
            data__chat_template=self.cfg.data.chat_template,
        )

    def grpo_config(self) -> GRPOConfig:
        return self._wired(
            self.cfg.grpo,
            "grpo",
            rewards=self.cfg.verifier,
            data=self._prompt_data(),
        )

    def sft_files(self) -> tuple[str, str]:
        d = self.cfg.data
        if d.sft_train:
            return d.sft_train, d.sft_eval
        return str(self.data / "sft-train.jsonl"), str(self.data / "sft-eval.jsonl")


def stage_sft(p: Pipeline) -> dict:
    from posttrain.models.tiny import save_tiny
    from posttrain.recipes import sft
    from posttrain.tasks import TASKS

    cfg = p.cfg
    base = Path(cfg.base.path) if cfg.base.path else p.out / "base"
    if not cfg.base.path and not (base / "config.json").exists():
        save_tiny(
            base,
            "qwen2",
            "tiny",
            seed=cfg.seed,
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    if not cfg.data.sft_train:
        make = TASKS[cfg.data.task].make
        options = cfg.data.task_options
        rows = {
            split: make(split, n, cfg.seed, **options)
            for split, n in (("train", cfg.data.sft_size), ("eval", 200))
        }
        if not all("completion" in r for r in rows["train"][:1]):
            raise ValueError(
                f"data.sft_train: not set, and task {cfg.data.task!r} has no demonstrations "
                "(its rows carry no `completion`); give a file of prompt/completion rows"
            )
        train, held_out = p.sft_files()
        write_jsonl_atomic(Path(train), rows["train"])
        write_jsonl_atomic(Path(held_out), rows["eval"])
    summary = sft.run(p.sft_config(base))
    return {"base": str(base), "eval/loss": _pair(summary, "eval/loss")}


def stage_label(p: Pipeline) -> dict:
    """Rankings of the SFT policy's own samples by the noisy annotator, or by the judge."""

    from posttrain.data.prompts import load_prompts
    from posttrain.data.tokenize import uses_chat_template
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.online import sample_groups
    from posttrain.rewards import build_composite
    from posttrain.rollout import HFSampler, SamplingParams
    from posttrain.train.distributed import pick_device

    cfg, a = p.cfg, p.cfg.annotator
    policy = str(p.model("sft"))
    tokenizer = load_tokenizer(policy)
    data = PromptDataConfig.model_validate({**p._prompt_data(), "eval_size": 0})
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    prompts, _ = load_prompts(
        data, tokenizer, chat=chat, max_prompt_length=data.max_prompt_length, seed=cfg.seed
    )
    prompts = [
        prompts[i]
        for i in random.Random(cfg.seed).sample(range(len(prompts)), min(a.prompts, len(prompts)))
    ]
    sampler = HFSampler(load_causal_lm(policy, pick_device("auto")), tokenizer, seed=cfg.seed)
    gold = build_composite(p.gold_specs())
    params = SamplingParams(n=a.responses, max_new_tokens=a.max_new_tokens, seed=cfg.seed)
    groups: list[tuple[Any, dict[str, float]]] = []  # (prompt, {distinct response: gold})
    for prompt, rollouts in sample_groups(sampler, prompts, params, chunk=128):
        scores = gold([prompt.text] * len(rollouts), [r.text for r in rollouts]).scores
        seen = {
            r.text: float(s) for r, s in zip(rollouts, scores, strict=True) if not math.isnan(s)
        }
        if len(seen) >= 2:
            groups.append((prompt.record.prompt, seen))
    stats: dict[str, Any] = {}
    if a.judge is None:
        # a ranking by the rule needs two responses it tells apart
        groups = [(prompt, seen) for prompt, seen in groups if len(set(seen.values())) >= 2]
        rng = random.Random(cfg.seed + 1)
        ranked = [
            [t for t, _ in _plackett_luce(list(seen.items()), a.noise, rng)] for _, seen in groups
        ]
        kept = list(range(len(groups)))
    else:
        from posttrain.judges import build_judge
        from posttrain.recipes.label import judge_groups

        judge = build_judge(a.judge)
        rows, _, summary = judge_groups(
            judge, "pairwise", "rankings", [(prompt, list(seen)) for prompt, seen in groups]
        )
        kept, ranked = [g for g, _ in rows], [row["responses"] for _, row in rows]
        stats = {"order_agreement": summary["order_agreement"], "judge": dict(judge.client.stats)}
    agree = compared = 0
    for g, order in zip(kept, ranked, strict=True):
        seen = groups[g][1]
        for x in range(len(order)):
            for y in range(x + 1, len(order)):
                if seen[order[x]] != seen[order[y]]:  # the rule tells them apart
                    compared += 1
                    agree += seen[order[x]] > seen[order[y]]
    rankings = [
        {"prompt": groups[g][0], "responses": order} for g, order in zip(kept, ranked, strict=True)
    ]
    pairs = [
        {"prompt": r["prompt"], "chosen": r["responses"][0], "rejected": r["responses"][-1]}
        for r in rankings
    ]
    if len(rankings) < 10:
        raise ValueError(
            f"label: only {len(rankings)} of {len(prompts)} prompts got a ranking; the SFT "
            "policy's samples are too alike for the gold rule (or the judge) to tell apart"
        )
    write_jsonl_atomic(p.data / "rankings.jsonl", rankings)
    write_jsonl_atomic(p.data / "pairs.jsonl", pairs)
    return {
        "rankings": len(rankings),
        "prompts": len(prompts),
        "responses": a.responses,
        "annotator_agreement": agree / max(compared, 1),
    } | stats


def _plackett_luce(items: list[tuple[str, float]], noise: float, rng: random.Random) -> list:
    """A ranking drawn best first: each next item with probability ∝ exp(score / noise) among
    those left (noise 0: sorted by score)."""
    if noise == 0:
        return sorted(items, key=lambda item: -item[1])
    # Gumbel-max: sorting by score / noise + Gumbel noise draws a Plackett-Luce ranking.
    keyed = [(s / noise - math.log(-math.log(rng.random() or 1e-300)), (t, s)) for t, s in items]
    return [item for _, item in sorted(keyed, key=lambda k: -k[0])]


def _pair(summary: dict, key: str) -> list[float | None]:
    return [summary.get(k, {}).get(key) for k in ("eval_before", "eval_after")]


def stage_rm(p: Pipeline) -> dict:
    from posttrain.recipes import rm

    summary = rm.run(p.rm_config())
    return {"eval/accuracy": _pair(summary, "eval/accuracy")}


def stage_ppo(p: Pipeline) -> dict:
    from posttrain.recipes import ppo

    summary = ppo.run(p.ppo_config())
    return {k: _pair(summary, k) for k in ("eval/reward", "eval/gold")} | {
        "kl": summary["last"].get("kl"),
        "beta": summary["last"].get("beta"),
    }


def stage_dpo(p: Pipeline) -> dict:
    from posttrain.recipes import dpo

    summary = dpo.run(p.dpo_config())
    return {"eval/rewards/accuracy": _pair(summary, "eval/rewards/accuracy")}


def stage_grpo(p: Pipeline) -> dict:
    from posttrain.recipes import grpo

    summary = grpo.run(p.grpo_config())
    return {k: _pair(summary, k) for k in ("eval/accuracy", "eval/reward")}


# The config sections each stage's result depends on, its own and its inputs'.
_SFT = ("seed", "base", "data", "sft")
_LABEL = (*_SFT, "annotator")
INPUTS = {
    "sft": _SFT,
    "label": _LABEL,
    "rm": (*_LABEL, "rm"),
    "ppo": (*_LABEL, "rm", "ppo"),
    "dpo": (*_LABEL, "dpo"),
    "grpo": (*_SFT, "verifier", "grpo"),
}


def _changed(old: Any, new: Any, key: str = "") -> list[str]:
    """The dotted keys whose values differ between two config dumps."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            k
            for name in sorted(old.keys() | new.keys())
            for k in _changed(old.get(name), new.get(name), f"{key}.{name}".lstrip("."))
        ]
    return [] if old == new else [key]


def check_unchanged(p: Pipeline, stage: str) -> None:
    """A finished stage is reused only with the config it ran with (its own sections and its
    inputs'); otherwise the stale result would pass for the new one."""
    path = p.out / "stages" / f"{stage}.config.json"
    dump = p.cfg.model_dump(mode="json")
    now = {k: dump[k] for k in INPUTS[stage]}
    then = json.loads(path.read_text()) if path.exists() else now
    if changed := _changed(then, now):
        raise ConfigError(
            f"pipeline: stage {stage!r} finished in {p.out} with other settings "
            f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}); restore them, "
            "use another out_dir, or delete "
            f"{p.done_path(stage)} and the stages after it to redo them"
        )


STAGE_RUNS = {
    "sft": stage_sft,
    "label": stage_label,
    "rm": stage_rm,
    "ppo": stage_ppo,
    "dpo": stage_dpo,
    "grpo": stage_grpo,
}


def run(cfg: PipelineConfig) -> dict:
    """Run the stages not finished yet, then evaluate every stage's model and write the
    report; returns report.json's content."""
    from posttrain.eval.report import evaluate_stages, print_summary, write_report

    began = time.time()
    p = Pipeline(cfg)
    p.out.mkdir(parents=True, exist_ok=True)
    # every stage's config, validated before the first stage spends any time
    for name in ("rm", "ppo", "dpo", "grpo"):
        if name in cfg.stages:
            getattr(p, f"{name}_config")()
    results: dict[str, dict] = {}
    for stage in STAGES:
        if stage not in cfg.stages:
            continue
        done = p.finished(stage)
        if done is not None:
            check_unchanged(p, stage)
            print(f"[pipeline] {stage}: finished earlier ({p.done_path(stage)}), skipped")
            results[stage] = done
            continue
        saved = list_checkpoints(p.out / stage / "checkpoints")
        print(f"[pipeline] {stage}: " + (f"resuming from {saved[-1]}" if saved else "starting"))
        t = time.time()
        results[stage] = STAGE_RUNS[stage](p) | {"seconds": round(time.time() - t, 1)}
        dump = cfg.model_dump(mode="json")
        write_json_atomic(
            p.out / "stages" / f"{stage}.config.json", {k: dump[k] for k in INPUTS[stage]}
        )
        write_json_atomic(p.done_path(stage), results[stage])
    evaluation = evaluate_stages(p)
    report = {"stages": results, "evaluation": evaluation, "seconds": round(time.time() - began, 1)}
    write_json_atomic(p.out / "report.json", report)
    write_report(p, report)
    print_summary(p, report)
    return report
