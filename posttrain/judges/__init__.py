"""LLM judges (RLAIF): one config, the judges, and the judge as a reward function.

    rewards: [{name: judge, options: {kind: pointwise, base_url: http://127.0.0.1:8000/v1,
               model: judge, cache: runs/judge-cache.sqlite}}]

A judge is any OpenAI-compatible chat endpoint (`base_url`, `model`, a key only from the
environment variable `api_key_env`) or a Hugging Face model run in process (`local`, which
takes precedence). As a reward: pointwise scores map to [0, 1]; rule-based rewards are
sum_k w_k P(yes_k); pairwise scores are mean win rates, against a `reference` field where the
prompt rows carry one, else against the other completions of the same prompt (GRPO's group:
G(G-1)/2 pairs, twice that many requests with both orders). A completion without a verdict
after every retry is skipped (left out of the update), never scored with a made-up number.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from posttrain.config import Section, config_errors
from posttrain.judges.backends import ChatBackend, LocalBackend, OpenAIBackend, Reply
from posttrain.judges.client import JudgeClient, Question, VerdictCache
from posttrain.judges.judges import (
    DEFAULT_PRINCIPLES,
    DEFAULT_RUBRIC,
    Comparison,
    ConstitutionalReviser,
    PairwiseJudge,
    PointwiseJudge,
    Principle,
    Proposition,
    RuleJudge,
    as_text,
    win_rates,
)
from posttrain.rewards.base import RewardOutput


class JudgeConfig(Section):
    kind: Literal["pairwise", "pointwise", "rules", "constitutional"] = "pairwise"
    """pairwise: A vs B (ties allowed); pointwise: a score on `scale`; rules: yes/no
    propositions weighted (RBR); constitutional: critique-and-revise into pairs (labelling
    only)."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """An OpenAI-compatible endpoint (default: `posttrain serve`'s address)."""
    model: str = "default"
    """The model name the endpoint serves."""
    local: str = ""
    """A Hugging Face model directory to judge with in this process instead of `base_url`."""
    api_key_env: str = ""
    """The environment variable holding the endpoint's key (keys never go in configs; empty:
    no key is sent, so no key of yours reaches an endpoint you did not mean it for)."""
    concurrency: int = Field(8, ge=1)
    """Requests in flight at once."""
    retries: int = Field(3, ge=0)
    """Further tries of a request that failed or whose reply held no verdict."""
    backoff_s: float = Field(0.5, ge=0)
    """Wait before the first retry; doubled before each next one."""
    timeout_s: float = Field(60.0, gt=0)
    """Limit of one request, in seconds."""
    cache: str = ""
    """SQLite file of parsed replies: a rerun asks nothing twice (empty: no cache)."""
    rubric: str = DEFAULT_RUBRIC
    """What a better response is, in the judge's instructions."""
    both_orders: bool = True
    """Pairwise: ask A-B and B-A and average, cancelling position bias."""
    scale: tuple[float, float] = (1, 10)
    """Pointwise: the lowest and highest rating."""
    propositions: list[Proposition] = []
    """Rules: `{name, text, weight}`; `text` completes "Does the assistant's answer ...?"."""
    principles: list[Principle] = []
    """Constitutional: `{critique, revision}` requests (empty: two of Constitutional AI's)."""
    max_tokens: int = Field(512, ge=1)
    """Longest judge reply."""

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if not (self.base_url or self.local):
            raise ValueError("judge: set base_url (an endpoint) or local (a model directory)")
        if self.kind == "rules" and not self.propositions:
            raise ValueError("judge: kind 'rules' needs propositions [{name, text, weight}]")
        names = [p.name for p in self.propositions]
        if len(set(names)) != len(names):
            raise ValueError(f"judge.propositions: names must differ, got {names}")
        if not self.scale[0] < self.scale[1]:
            raise ValueError(f"judge.scale: expected low < high, got {list(self.scale)}")
        return self


def build_client(cfg: JudgeConfig) -> JudgeClient:
    if cfg.local:
        backend: ChatBackend = LocalBackend(cfg.local)
    else:
        backend = OpenAIBackend(
            cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s
        )
    return JudgeClient(
        backend,
        concurrency=cfg.concurrency,
        retries=cfg.retries,
        backoff_s=cfg.backoff_s,
        cache=cfg.cache or None,
    )


def build_judge(cfg: JudgeConfig, client: JudgeClient | None = None):
    client = client or build_client(cfg)
    if cfg.kind == "pairwise":
        return PairwiseJudge(
            client, rubric=cfg.rubric, both_orders=cfg.both_orders, max_tokens=cfg.max_tokens
        )
    if cfg.kind == "pointwise":
        return PointwiseJudge(
            client,
            rubric=cfg.rubric,
            low=cfg.scale[0],
            high=cfg.scale[1],
            max_tokens=cfg.max_tokens,
        )
    if cfg.kind == "rules":
        return RuleJudge(client, cfg.propositions)
    return ConstitutionalReviser(client, cfg.principles or DEFAULT_PRINCIPLES, cfg.max_tokens)


class JudgeReward:
    """A judge as a reward function (see the module docstring). Metrics per call: the
    client's `judge/asked`, `judge/cached`, `judge/errors`, `judge/malformed`, `judge/failed`
    in this call, and for pairwise judges asked both orders `judge/order_agreement`."""

    def __init__(self, name: str = "judge", **options: Any) -> None:
        try:
            self.name, self.cfg = name, JudgeConfig.model_validate(options)
        except ValidationError as error:
            raise ValueError(f"judge options: {config_errors(JudgeConfig, error)}") from None
        if self.cfg.kind == "constitutional":
            raise ValueError(
                "judge: kind 'constitutional' makes preference pairs (posttrain label), not rewards"
            )
        self.judge = build_judge(self.cfg)
        self.client: JudgeClient = self.judge.client

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence[Any]
    ) -> RewardOutput:
        before = dict(self.client.stats)
        components: dict[str, list[float]] = {}
        metrics: dict[str, float] = {}
        if isinstance(self.judge, PointwiseJudge):
            low, high = self.cfg.scale
            raw = self.judge.score(prompts, completions)
            scores = [None if s is None else (s - low) / (high - low) for s in raw]
        elif isinstance(self.judge, RuleJudge):
            graded = self.judge.grade(prompts, completions)
            scores = self.judge.score(graded)
            components = {
                k: [float("nan") if v is None else v for v in vs] for k, vs in graded.items()
            }
        else:
            scores, results = self._win_rates(prompts, completions, fields.get("reference"))
            checked = [r.consistent for r in results if r.consistent is not None]
            if checked:
                metrics["judge/order_agreement"] = sum(checked) / len(checked)
            metrics["judge/one_order_only"] = float(sum(r.one_order_only for r in results))
        for key in ("asked", "cached", "errors", "malformed", "failed"):
            metrics[f"judge/{key}"] = float(self.client.stats[key] - before.get(key, 0))
        skipped = [s is None for s in scores]
        return RewardOutput(
            [0.0 if s is None else float(s) for s in scores],
            components=components,
            skipped=skipped if any(skipped) else None,
            metrics=metrics,
        )

    def _win_rates(
        self, prompts: Sequence[Any], completions: Sequence[str], references: Sequence[Any] | None
    ) -> tuple[list[float | None], list[Comparison]]:
        """Each completion's mean P(better) against its reference, or against every other
        completion of the same prompt; and the comparisons."""
        if references is not None:
            if any(r is None for r in references):
                raise ValueError("pairwise judge: some prompt rows have no `reference` field")
            pairs: list[tuple[int, int | None]] = [(i, None) for i in range(len(completions))]
            others = [str(r) for r in references]
        else:
            groups: dict[str, list[int]] = {}
            for i, p in enumerate(prompts):
                groups.setdefault(as_text(p), []).append(i)
            if min(len(g) for g in groups.values()) < 2:
                raise ValueError(
                    "pairwise judge: a prompt has one completion and no `reference` field to "
                    "compare it with; give the rows a reference, or sample several per prompt"
                )
            pairs = [pair for members in groups.values() for pair in combinations(members, 2)]
            others = [completions[j] for _, j in pairs]
        results = self.judge.compare(
            [prompts[i] for i, _ in pairs], [completions[i] for i, _ in pairs], others
        )
        return win_rates(pairs, results, len(completions)), results


__all__ = [
    "ChatBackend",
    "Comparison",
    "ConstitutionalReviser",
    "JudgeClient",
    "JudgeConfig",
    "JudgeReward",
    "LocalBackend",
    "OpenAIBackend",
    "PairwiseJudge",
    "PointwiseJudge",
    "Principle",
    "Proposition",
    "Question",
    "Reply",
    "RuleJudge",
    "VerdictCache",
    "build_client",
    "build_judge",
]
