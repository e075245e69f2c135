"""`posttrain label`: preference data from an AI judge (RLAIF; Bai et al. 2022, Lee et al. 2023).

For each training prompt, `responses` completions of the policy (`model.path`) are sampled and
judged; the verdicts become the files `posttrain rm` and `posttrain dpo` read:

- `pairwise`: every pair of a prompt's responses, asked in both orders (`judge.both_orders`);
  P(better) averaged over the orders, and each response scored by its mean P(better) over
  the pairs it was in that got a verdict.
- `pointwise` and `rules`: each response scored by the judge.
- `output: pairs`: every pairwise verdict that is no tie, the winner chosen (pointwise, rules:
  every two responses of a prompt whose scores differ, the higher chosen); `output:
  rankings`: each prompt's responses by score, leaving out any whose score ties another's (a
  tie is no preference), kept when at least two remain.
- `constitutional`: each response critiqued and revised; the pair (revision chosen over the
  original) goes to `pairs.jsonl` whatever `output` says.

Written to `run.out_dir`: `pairs.jsonl` or `rankings.jsonl`, `verdicts.jsonl` (every judged
comparison or score, for audit), `summary.json` (counts; the judge's agreement with itself
across the two orders; its requests, cache hits, malformed replies and failures).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from itertools import combinations, permutations
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from posttrain.config import ModelConfig, PromptDataConfig, RunConfig, SamplingConfig, Section
from posttrain.files import write_json_atomic, write_jsonl_atomic
from posttrain.judges import JudgeConfig, build_judge, win_rates


class LabelConfig(Section):
    model: ModelConfig = ModelConfig()
    """The policy whose responses are judged."""
    data: PromptDataConfig = PromptDataConfig(eval_size=0)
    """Prompts to label (a task or a prompt file; `train_size` of them)."""
    responses: int = Field(4, ge=1)
    """Responses sampled per prompt (K)."""
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=128)
    judge: JudgeConfig = JudgeConfig()
    output: Literal["pairs", "rankings"] = "pairs"
    """What to write: preference pairs, or K-way rankings (best first)."""
    run: RunConfig = RunConfig(out_dir="runs/label")


def run(cfg: LabelConfig) -> dict:
    """Sample, judge, write the files; returns the summary also written to summary.json."""

    from posttrain.data.prompts import load_prompts
    from posttrain.data.tokenize import uses_chat_template
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.online import sample_groups
    from posttrain.rollout import HFSampler, sampling_params
    from posttrain.train.distributed import pick_device

    began, out = time.time(), Path(cfg.run.out_dir)
    judge = build_judge(cfg.judge)  # a config error shows before minutes of sampling
    tokenizer = load_tokenizer(cfg.model.path)
    chat = uses_chat_template(tokenizer, cfg.data.chat_template)
    prompts, _ = load_prompts(
        cfg.data,
        tokenizer,
        chat=chat,
        max_prompt_length=cfg.data.max_prompt_length,
        seed=cfg.run.seed,
    )
    model = load_causal_lm(cfg.model.path, pick_device(cfg.run.device))
    sampler = HFSampler(model, tokenizer, seed=cfg.run.seed)
    params = sampling_params(cfg.sampling, n=cfg.responses, seed=cfg.run.seed)
    groups = [
        (prompt.text, [r.text for r in rollouts])
        for prompt, rollouts in sample_groups(sampler, prompts, params)
    ]
    del model, sampler

    rows, verdicts, summary = judge_groups(judge, cfg.judge.kind, cfg.output, groups)
    rows = [row for _, row in rows]
    name = "pairs" if cfg.output == "pairs" or cfg.judge.kind == "constitutional" else "rankings"
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / f"{name}.jsonl", rows)
    write_jsonl_atomic(out / "verdicts.jsonl", verdicts)
    summary |= {
        "prompts": len(groups),
        name: len(rows),
        "file": str(out / f"{name}.jsonl"),
        "judge": dict(judge.client.stats),
        "seconds": round(time.time() - began, 1),
    }
    write_json_atomic(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    return summary


def judge_groups(
    judge: Any, kind: str, output: str, groups: list[tuple[Any, list[str]]]
) -> tuple[list[tuple[int, dict]], list[dict], dict[str, Any]]:
    """Each group `(prompt, responses)` judged by `judge` (of `kind`): `(rows, verdicts,
    summary)`, a row `(group index, {prompt, chosen, rejected} or {prompt, responses})`.
    Responses are scored by their mean P(better) over the pairs judged (pairwise) or by the
    judge's score; a ranking orders those with a score and leaves out any whose score ties
    another's (a tie is no preference). Pairs: each pairwise verdict that is no tie, or every
    two scored responses whose scores differ."""
    if kind == "constitutional":
        flat = [(g, p, r) for g, (p, texts) in enumerate(groups) for r in texts]
        revised = judge.revise([p for _, p, _ in flat], [r for *_, r in flat])
        rows = [(g, row) for (g, *_), row in zip(flat, revised, strict=True) if row is not None]
        return (
            rows,
            [row for _, row in rows],
            {"revised": len(rows), "not_revised": len(flat) - len(rows)},
        )
    flat = [(g, i) for g, (_, texts) in enumerate(groups) for i in range(len(texts))]
    index = {key: n for n, key in enumerate(flat)}
    prompts = [groups[g][0] for g, _ in flat]
    responses = [groups[g][1][i] for g, i in flat]
    if kind == "pairwise":
        pairs = [
            (index[g, i], index[g, j])
            for g, (_, texts) in enumerate(groups)
            for i, j in combinations(range(len(texts)), 2)
        ]
        results = judge.compare(
            [prompts[a] for a, _ in pairs],
            [responses[a] for a, _ in pairs],
            [responses[b] for _, b in pairs],
        )
        values = win_rates(pairs, results, len(flat))
        # each verdict that is no tie is a pair, the winner chosen
        decided = [
            (a, b) if r.p_first > 0.5 else (b, a)
            for (a, b), r in zip(pairs, results, strict=True)
            if r.p_first is not None and r.p_first != 0.5
        ]
        verdicts = [
            {
                "prompt": prompts[a],
                "a": responses[a],
                "b": responses[b],
                "p_a": r.p_first,
                "verdicts": list(r.verdicts),
            }
            for (a, b), r in zip(pairs, results, strict=True)
        ]
        checked = [r.consistent for r in results if r.consistent is not None]
        summary = {
            "comparisons": len(pairs),
            "no_verdict": sum(r.p_first is None for r in results),
            "one_order_only": sum(r.one_order_only for r in results),
            "ties": sum(r.p_first == 0.5 for r in results),
            "order_agreement": sum(checked) / len(checked) if checked else None,
        }
    else:
        values = (
            judge.score(prompts, responses)
            if kind == "pointwise"
            else judge.score(judge.grade(prompts, responses))
        )
        verdicts = [
            {"prompt": p, "response": r, "score": v}
            for p, r, v in zip(prompts, responses, values, strict=True)
        ]
        summary = {
            "scored": sum(v is not None for v in values),
            "no_verdict": sum(v is None for v in values),
        }
        decided = [
            (index[g, a], index[g, b])
            for g, (_, texts) in enumerate(groups)
            for a, b in permutations(range(len(texts)), 2)
            if None not in (values[index[g, a]], values[index[g, b]])
            and values[index[g, a]] > values[index[g, b]]
        ]
    if all(v is None for v in values):
        raise ValueError(
            f"label: the judge gave no verdict for any of {len(flat)} responses "
            f"({dict(judge.client.stats)}); check judge.base_url, judge.model and the log"
        )
    if output == "pairs":
        rows = [
            (flat[a][0], {"prompt": prompts[a], "chosen": responses[a], "rejected": responses[b]})
            for a, b in decided
        ]
        return rows, verdicts, summary
    rows: list[tuple[int, dict]] = []
    for g, (prompt, texts) in enumerate(groups):
        scored = {
            i: values[index[g, i]] for i in range(len(texts)) if values[index[g, i]] is not None
        }
        counts = Counter(scored.values())
        ranked = sorted((i for i in scored if counts[scored[i]] == 1), key=lambda i: -scored[i])
        if len(ranked) >= 2:
            rows.append((g, {"prompt": prompt, "responses": [texts[i] for i in ranked]}))
    return rows, verdicts, summary
