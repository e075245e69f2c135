"""Judges over real HTTP: a scripted judge server on loopback (chosen verdicts: noisy, biased,
malformed, hostile, failing, slow) and the `openai` client; a local judge model; `posttrain
label`'s files read by `posttrain rm` and `posttrain dpo`; a judge reward driving GRPO and PPO."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from posttrain.judges import JudgeReward
from posttrain.judges.backends import LocalBackend
from posttrain.judges.scripted import ScriptedJudge, serve_scripted
from posttrain.rewards import build_composite
from posttrain.train.metrics import read_metrics
from tests.conftest import write_jsonl

pytestmark = pytest.mark.integration
DIGITS = "tests.integration.test_grpo_runs:digit_fraction"
# Responses whose VADER compound scores are far apart, best first.
BETTER = ["What a wonderful, happy, great day!", "I love this, it is good.", "nice work."]
WORSE = ["This is terrible and I hate it.", "awful, sad and bad.", "ugly."]


def judged_pairs(n: int) -> tuple[list[str], list[str], list[str], list[float]]:
    """n distinct questions: pairs with the better response first in half of them, and
    P(first is better) by the gold rule."""
    firsts, seconds, truth = [], [], []
    for k in range(n):
        good, bad = BETTER[k % 3], WORSE[(k // 3) % 3]
        flip = k % 2 == 1
        firsts.append(bad if flip else good)
        seconds.append(good if flip else bad)
        truth.append(0.0 if flip else 1.0)
    return [f"Say something ({k})." for k in range(n)], firsts, seconds, truth


def pairwise(url: str, **options) -> JudgeReward:
    return JudgeReward(kind="pairwise", base_url=url, backoff_s=0.01, **options)


def test_retries_get_verdicts_through_malformed_hostile_and_failing_replies():
    judge = ScriptedJudge(malformed=0.25, hostile=0.15, fail=0.2, seed=3)
    with serve_scripted(judge) as url:
        reward = pairwise(url, retries=8)
        prompts, firsts, seconds, truth = judged_pairs(40)
        results = reward.judge.compare(prompts, firsts, seconds)
    assert [r.p_first for r in results] == truth  # a noise-free judge, every verdict right
    stats = reward.client.stats
    assert stats["malformed"] > 5 and stats["errors"] > 5 and stats["failed"] == 0, stats
    assert stats["asked"] == 80 + stats["malformed"] + stats["errors"]


def test_a_judge_that_never_answers_is_counted_never_a_crash():
    with serve_scripted(ScriptedJudge(fail=1.0)) as url:
        composite = build_composite([{"name": "judge", "options": {
            "kind": "pointwise", "base_url": url, "retries": 1, "backoff_s": 0.0}}])  # fmt: skip
        out = composite(["Say something."] * 3, BETTER)
    assert out.skipped == [True] * 3 and all(math.isnan(s) for s in out.scores)
    assert out.metrics["judge/failed"] == 3 and out.metrics["judge/errors"] == 6


def test_a_slow_judge_times_out_and_is_retried():
    with serve_scripted(ScriptedJudge(slow_s=1.0)) as url:
        reward = JudgeReward(kind="pointwise", base_url=url, timeout_s=0.2, retries=1, backoff_s=0.0)  # fmt: skip
        out = reward(["Say something."], [BETTER[0]])
    assert out.skipped == [True] and out.metrics["judge/errors"] == 2


def test_both_orders_cancel_a_position_bias_that_one_order_keeps():
    prompts, firsts, seconds, truth = judged_pairs(120)
    accuracy = {}
    for both in (True, False):
        judge = ScriptedJudge(position_bias=0.4, seed=1)
        with serve_scripted(judge) as url:
            results = pairwise(url, both_orders=both).judge.compare(prompts, firsts, seconds)
        decided = [(r.p_first, t) for r, t in zip(results, truth, strict=True) if r.p_first != 0.5]
        accuracy[both] = sum((p > 0.5) == (t > 0.5) for p, t in decided) / len(decided)
        if both:
            agreement = sum(r.consistent for r in results) / len(results)
    # one order: when the better response is second (half the pairs), 40% of verdicts say A
    assert accuracy[False] == pytest.approx(0.8, abs=0.08)
    # both orders: a biased verdict in one order averages to a tie (dropped), in both to a tie
    assert accuracy[True] == 1.0
    assert 0.4 < agreement < 0.8


def test_a_pairwise_reward_needs_a_reference_or_several_completions():
    reward = pairwise("http://127.0.0.1:9/v1")  # never reached
    with pytest.raises(ValueError, match="one completion and no `reference`"):
        reward(["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="no `reference` field"):
        reward(["a", "b"], ["x", "y"], reference=["r", None])


def test_ties_are_allowed():
    with serve_scripted(ScriptedJudge(tie_margin=5.0)) as url:
        out = pairwise(url)(["Say something."] * 2, BETTER[:2], reference=WORSE[:2])
    assert out.scores == [0.5, 0.5]


def test_the_verdict_cache_makes_a_rerun_free(tmp_path):
    judge = ScriptedJudge(noise=0.5, seed=2)
    cache = tmp_path / "verdicts.sqlite"
    prompts, firsts, seconds, _ = judged_pairs(12)
    with serve_scripted(judge) as url:
        first = pairwise(url, cache=str(cache))(prompts, firsts, reference=seconds)
        asked = sum(judge.requests.values())
        again = pairwise(url, cache=str(cache))(prompts, firsts, reference=seconds)
    assert asked == 24 and sum(judge.requests.values()) == 24  # nothing asked the second time
    assert again.scores == first.scores and again.metrics["judge/cached"] == 24


def test_rule_based_reward_reads_yes_probabilities_from_logprobs():
    judge = ScriptedJudge(noise=0.5)
    propositions = [{"name": "positive", "text": "sound positive", "weight": 2.0},
                    {"name": "kind", "text": "sound kind", "weight": 1.0}]  # fmt: skip
    with serve_scripted(judge) as url:
        out = JudgeReward(kind="rules", base_url=url, propositions=propositions)(
            ["Say something."] * 2, [BETTER[0], WORSE[0]]
        )
    p_yes = [1 / (1 + math.exp(-judge.gold("", r) / 0.5)) for r in (BETTER[0], WORSE[0])]
    assert out.components["positive"] == pytest.approx(p_yes, abs=1e-5)  # not rounded to 0/1
    assert out.scores == pytest.approx([3 * p for p in p_yes], abs=1e-5)


def test_pointwise_ratings_follow_the_rule():
    with serve_scripted(ScriptedJudge()) as url:
        out = JudgeReward(kind="pointwise", base_url=url)(["Say something."] * 2, [BETTER[0], WORSE[0]])  # fmt: skip
    assert 0.8 < out.scores[0] <= 1.0 and 0.0 <= out.scores[1] < 0.2


def test_a_local_model_judges_in_process(tiny_qwen2):
    """A random tiny model: its first-token log-probs are a distribution, its replies hold no
    verdict, so every question is retried, then counted; the reward marks them skipped."""
    backend = LocalBackend(str(tiny_qwen2), device="cpu")
    reply = backend.chat([{"role": "user", "content": "Yes or no?"}], max_tokens=4,
                         temperature=0.0, top_logprobs=5)  # fmt: skip
    assert len(reply.first_token_logprobs) == 5
    assert sum(math.exp(v) for v in reply.first_token_logprobs.values()) <= 1.0 + 1e-5
    reward = JudgeReward(kind="pointwise", local=str(tiny_qwen2), retries=1, backoff_s=0.0,
                         max_tokens=8, concurrency=4)  # fmt: skip
    out = reward(["Say something."] * 4, ["fine.", "good.", "bad.", "ok."])
    # four threads, one model: each question is asked twice, none raises
    assert out.skipped == [True] * 4 and out.metrics["judge/malformed"] == 8
    assert out.metrics["judge/errors"] == 0


def held_out_digits(model_dir: Path, prompt_file: Path) -> float:
    """Mean digit fraction of greedy completions of the prompt file's prompts."""
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.rollout import HFSampler, SamplingParams
    from tests.integration.test_grpo_runs import digit_fraction

    tokenizer = load_tokenizer(str(model_dir))
    rows = [json.loads(x) for x in prompt_file.read_text().splitlines()]
    ids = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    sampler = HFSampler(load_causal_lm(str(model_dir), "cpu"), tokenizer)
    texts = [c.text for c in sampler.generate(ids, SamplingParams.greedy(6)).completions]
    scores = digit_fraction([r["prompt"] for r in rows], texts).scores
    return sum(scores) / len(scores)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    rows = [{"id": str(i), "prompt": f"{i:02d}+{i % 7:02d}="} for i in range(80)]
    root = tmp_path_factory.mktemp("judge-prompts")
    write_jsonl(root / "eval.jsonl", rows[64:])
    return write_jsonl(root / "train.jsonl", rows[:64])


def test_label_writes_pairs_and_rankings_that_rm_and_dpo_train_on(tiny_qwen2, prompts, tmp_path):
    from posttrain.recipes import dpo, label, rm

    judge = ScriptedJudge(rule=[{"name": DIGITS}], position_bias=0.2, seed=4)
    with serve_scripted(judge) as url:
        made = {}
        for kind, output in (("pairwise", "pairs"), ("pointwise", "rankings")):
            made[kind] = label.run(label.LabelConfig.model_validate({
                "model": {"path": str(tiny_qwen2)},
                "data": {"train": str(prompts), "train_size": 48, "chat_template": "never"},
                "sampling": {"max_new_tokens": 8}, "responses": 3, "output": output,
                "judge": {"kind": kind, "base_url": url, "backoff_s": 0.0, "scale": [0, 100]},
                "run": {"out_dir": str(tmp_path / kind)},
            }))  # fmt: skip
    pairs = made["pairwise"]
    # 3 responses a prompt, 3 comparisons each (fewer where two samples came out alike)
    assert 0.9 * 48 * 3 <= pairs["comparisons"] <= 48 * 3 and pairs["pairs"] > 30
    assert 0.5 < pairs["order_agreement"] < 1.0  # the bias shows as disagreement across orders
    verdicts = [json.loads(x) for x in (tmp_path / "pairwise" / "verdicts.jsonl").read_text().splitlines()]  # fmt: skip
    assert len(verdicts) == pairs["comparisons"] and all(len(v["verdicts"]) == 2 for v in verdicts)
    rows = [json.loads(x) for x in Path(pairs["file"]).read_text().splitlines()]
    gold = [(judge.gold("", r["chosen"]), judge.gold("", r["rejected"])) for r in rows]
    right = [c > r for c, r in gold if c != r]  # (a bias on a gold tie leaks into a pair)
    assert len(right) > 5 and all(right)  # a biased verdict in one order averages to a tie
    rankings = [json.loads(x) for x in Path(made["pointwise"]["file"]).read_text().splitlines()]
    assert rankings and all(len(r["responses"]) >= 2 for r in rankings)
    for data, recipe, config in ((pairs["file"], dpo, dpo.DPOConfig),
                                 (made["pointwise"]["file"], rm, rm.RMConfig)):  # fmt: skip
        summary = recipe.run(config.model_validate({
            "model": {"path": str(tiny_qwen2)},
            "data": {"train": data, "eval_fraction": 0.2, "chat_template": "never"},
            "train": {"batch_size": 4, "micro_batch_size": 4},
            "run": {"out_dir": str(tmp_path / recipe.__name__), "max_steps": 2, "progress": False},
        }))  # fmt: skip
        assert summary["eval_after"], recipe.__name__


def test_a_judge_reward_drives_grpo_and_ppo(tiny_qwen2, prompts, tmp_path):
    """The judge scores digits (a rule a micro model learns in a few steps): GRPO's reward
    rises; PPO runs its steps on the judge's scores."""
    from posttrain.recipes import grpo, ppo
    from posttrain.recipes.grpo_config import GRPOConfig
    from posttrain.recipes.ppo_config import PPOConfig

    judge = ScriptedJudge(rule=[{"name": DIGITS}])
    with serve_scripted(judge) as url:
        rewards = [{"name": "judge", "options": {"kind": "pointwise", "base_url": url,
                                                 "scale": [0, 10]}}]  # fmt: skip
        common = {
            "model": {"path": str(tiny_qwen2)}, "rewards": rewards,
            "data": {"train": str(prompts), "eval": str(prompts.parent / "eval.jsonl"),
                     "eval_size": 16, "chat_template": "never"},
            "sampling": {"max_new_tokens": 6}, "optim": {"lr": 3e-3, "schedule": "constant"},
        }  # fmt: skip
        grpo.run(GRPOConfig.model_validate(common | {
            "grpo": {"group_size": 8, "prompts_per_step": 8, "micro_batch_size": 64},
            "run": {"out_dir": str(tmp_path / "grpo"), "max_steps": 25, "progress": False},
        }))  # fmt: skip
        ppo.run(PPOConfig.model_validate(common | {
            "critic": {"init": "policy"},
            "ppo": {"prompts_per_step": 16, "minibatch_size": 8, "micro_batch_size": 8},
            "run": {"out_dir": str(tmp_path / "ppo"), "max_steps": 3, "progress": False},
        }))  # fmt: skip
    # the trained policy's own held-out greedy answers, judged by the rule itself (no judge)
    before, after = (held_out_digits(model, prompts.parent / "eval.jsonl")
                     for model in (tiny_qwen2, tmp_path / "grpo" / "final"))  # fmt: skip
    assert after > before + 0.2, (before, after)
    logged = read_metrics(tmp_path / "ppo")[-1]
    assert logged["judge/asked"] == 16 and logged["judge/failed"] == 0
    assert judge.requests["pointwise"] >= 25 * 64 + 3 * 16


def test_a_policy_served_by_posttrain_serve_is_a_judge_backend(tiny_qwen2):
    """`posttrain serve` (a subprocess, as a user runs it) answers the judge's chat requests
    with the first token's log-probs, the same as the model judging in process."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from posttrain.judges.backends import JudgeSetupError, OpenAIBackend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SERVE_KEY": "s3cret"}
    server = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", str(tiny_qwen2),
                               "--port", str(port), "--model-name", "policy",
                               "--api-key-env", "SERVE_KEY"], env=env)  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except urllib.error.HTTPError:  # 401: up, and asking for its key
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "serve did not start"
                time.sleep(0.2)
        messages = [{"role": "user", "content": "Is the sky blue? Yes or No."}]
        os.environ["SERVE_KEY"] = "s3cret"
        base = f"http://127.0.0.1:{port}/v1"
        served = OpenAIBackend(base, "policy", api_key_env="SERVE_KEY").chat(
            messages, max_tokens=1, temperature=0.0, top_logprobs=5
        )
        reward = JudgeReward(kind="pointwise", base_url=base, model="policy", retries=1,
                             backoff_s=0.0, max_tokens=8, api_key_env="SERVE_KEY")  # fmt: skip
        out = reward(["Say something."], ["fine."])
        # no key, or a model the server does not have: no retry helps, the run stops
        for options in ({}, {"api_key_env": "SERVE_KEY", "model": "other"}):
            composite = build_composite([{"name": "judge", "options": {
                "kind": "pointwise", "base_url": base, "model": "policy", **options}}])  # fmt: skip
            with pytest.raises(JudgeSetupError, match="refused the request"):
                composite(["Say something."], ["fine."])
    finally:
        server.terminate()
        server.wait(timeout=30)
    local = LocalBackend(str(tiny_qwen2), device="cpu").chat(
        messages, max_tokens=1, temperature=0.0, top_logprobs=5
    )
    assert served.text == local.text
    assert sorted(served.first_token_logprobs.values()) == pytest.approx(
        sorted(local.first_token_logprobs.values()), abs=1e-4
    )
    # a random tiny model gives no rating: asked twice, counted, skipped
    assert out.skipped == [True] and out.metrics["judge/malformed"] == 2
