"""Whole `posttrain ppo` runs on a micro model: learning, adaptive beta, PPO-ptx, exact resume,
the reward model as reward and as the critic's start."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.models.loading import load_tokenizer
from posttrain.recipes import ppo
from posttrain.recipes.ppo_config import PPOConfig
from posttrain.train.metrics import read_metrics
from tests.conftest import write_jsonl

pytestmark = pytest.mark.integration
# The trivially learnable verifier of the GRPO tests: the share of digits in the completion.
REWARD = "tests.integration.test_grpo_runs:digit_fraction"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Training prompts, SFT text for ptx, held-out prompts."""
    root = tmp_path_factory.mktemp("ppo")
    prompts = [{"id": str(i), "prompt": f"{i:02d}+{i % 7:02d}="} for i in range(80)]
    # ptx text: words, no digits, so the reward pulls away from it
    words = ["the cat sat.", "a dog ran far.", "we like tea.", "it is sunny."]
    sft = [
        {"prompt": w.split()[0], "completion": " " + " ".join(w.split()[1:])} for w in words * 16
    ]
    held_out = write_jsonl(root / "held-out.jsonl", prompts[64:])  # never trained on
    return (
        write_jsonl(root / "prompts.jsonl", prompts[:64]),
        write_jsonl(root / "sft.jsonl", sft),
        held_out,
    )


def config(start: Path, data: tuple[Path, ...], out: Path, **sections) -> PPOConfig:
    base = {
        "model": {"path": str(start)},
        "data": {"train": str(data[0]), "eval": str(data[-1]), "eval_size": 16,
                 "chat_template": "never"},
        "rewards": [{"name": REWARD}],
        "critic": {"init": "policy", "optim": {"lr": 3e-3, "schedule": "constant"}},
        "sampling": {"max_new_tokens": 6},
        "ppo": {"prompts_per_step": 16, "epochs": 2, "minibatch_size": 8, "micro_batch_size": 8,
                "kl_coef": 0.02},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "run": {"out_dir": str(out), "max_steps": 4, "eval_every": 0, "progress": False},
    }  # fmt: skip
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    return PPOConfig.model_validate(base)


def test_ppo_raises_the_reward_on_held_out_prompts(tiny_qwen2, data, tmp_path):
    out = tmp_path / "run"
    summary = ppo.run(config(tiny_qwen2, data, out, run={"max_steps": 25, "eval_every": 25}))
    scores = [m["score"] for m in read_metrics(out) if "score" in m]
    assert len(scores) == 25
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + 0.2, scores
    # held-out greedy completions, judged by the test's own verifier
    before, after = (summary[k]["eval/reward"] for k in ("eval_before", "eval_after"))
    assert after > before + 0.3, (before, after)
    logged = read_metrics(out)[-1]
    for key in ("kl", "beta", "entropy", "policy_loss", "value_loss", "explained_variance",
                "clip_fraction", "approx_kl", "completion_length", "value_clip_fraction"):  # fmt: skip
        assert key in logged, key
    assert (out / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("target", [1e-3, 1e6], ids=["low", "high"])
def test_adaptive_beta_follows_the_rollouts_kl(target, tiny_qwen2, data, tmp_path):
    """Each step, beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) x 16 / horizon), with KL
    the step's rollouts' KL per completion (Ziegler et al. 2019): above the target beta rises,
    below it falls, and the next step penalises with the new beta."""
    cfg = config(tiny_qwen2, data, tmp_path / "run", ppo={"kl_target": target, "kl_horizon": 100})
    ppo.run(cfg)
    logged = [m for m in read_metrics(tmp_path / "run") if "beta" in m]
    assert logged[0]["beta"] == 0.02 and len(logged) == 4
    for m, following in zip(logged, logged[1:] + [None], strict=True):
        error = min(max(m["kl"] / target - 1, -0.2), 0.2)
        assert m["next_beta"] == pytest.approx(m["beta"] * (1 + error * 16 / 100), rel=1e-9)
        assert (m["next_beta"] > m["beta"]) == (m["kl"] > target)
        if following is not None:
            assert following["beta"] == m["next_beta"]
    if target > 1:
        assert logged[-1]["next_beta"] < 0.02
    else:  # once the policy has moved from the reference, its KL passes 1e-3 and beta rises
        assert any(m["kl"] > target for m in logged), [m["kl"] for m in logged]


def test_ptx_keeps_the_held_out_sft_loss_nearer_its_start(tiny_qwen2, data, tmp_path):
    """Same runs but for ptx.coef: the NLL of held-out SFT text rises less with PPO-ptx."""
    change = {}
    for coef in (0.0, 1.0):
        out = tmp_path / f"coef-{coef}"
        cfg = config(tiny_qwen2, data, out, ptx={"train": str(data[1]), "coef": coef},
                     run={"max_steps": 15})  # fmt: skip
        summary = ppo.run(cfg)
        before, after = (summary[k]["eval/ptx_loss"] for k in ("eval_before", "eval_after"))
        change[coef] = after - before
        if coef:
            assert all("ptx/nll" in m for m in read_metrics(out)[1:])
    assert change[0.0] > 0.1, change  # the reward pulls the policy off the SFT text
    assert change[1.0] < 0.5 * change[0.0], change


def test_resume_is_exact(tiny_qwen2, data, tmp_path):
    """A run stopped after its step-2 checkpoint and resumed ends with the same policy and the
    same metrics (critic losses, adaptive beta, ptx included) as one that ran straight."""
    straight = tmp_path / "straight"
    cfg = config(tiny_qwen2, data, straight, run={"save_every": 2},
                 ppo={"kl_target": 0.01, "kl_horizon": 100},
                 ptx={"train": str(data[1]), "coef": 0.5})  # fmt: skip
    ppo.run(cfg)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "final")  # as if killed in step 4: only step-2 is complete
    shutil.rmtree(resumed / "checkpoints")
    shutil.copytree(straight / "checkpoints", resumed / "checkpoints")
    names = {f.name for f in (resumed / "checkpoints" / "step-00000002").iterdir()}
    assert {"policy.safetensors", "critic.safetensors", "critic-optimizer.pt"} <= names
    ppo.run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"out_dir": str(resumed)})}))
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def untimed(records: list[dict]) -> list[dict]:
        timed = ("time", "_s", "seconds")
        return [{k: v for k, v in m.items() if not any(t in k for t in timed)} for m in records]

    assert untimed(read_metrics(straight)) == untimed(read_metrics(resumed))


def test_the_reward_model_is_the_reward_and_the_critics_start(tiny_qwen2, tmp_path):
    """`posttrain rm`, then `posttrain ppo reward_model=...` with nothing else about rewards:
    the reward model scores, and the critic starts from its backbone and head."""
    pairs = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"} for i in range(32)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in pairs])
    rm_data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    rm_out = tmp_path / "rm"
    assert main(["rm", f"model.path={tiny_qwen2}", f"data.train={rm_data}", "data.eval_fraction=0.1",
                 "data.chat_template=never", f"run.out_dir={rm_out}", "run.max_steps=3",
                 "run.progress=false", "optim.lr=1e-3"]) == 0  # fmt: skip
    cfg = config(tiny_qwen2, (prompts, prompts), tmp_path / "ppo", rewards=None,
                 reward_model=str(rm_out / "final"), critic={"init": "reward_model"},
                 run={"max_steps": 1})  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_qwen2))
    critic = ppo.load_critic(
        cfg, torch.device("cpu"), tokenizer.pad_token_id, tokenizer.get_vocab()
    )
    head = load_file(str(rm_out / "final" / "model.safetensors"))["score.weight"]
    assert torch.equal(critic.classifier.score.weight.detach(), head)
    ppo.run(cfg)
    logged = read_metrics(tmp_path / "ppo")[-1]
    assert "reward/reward_model" in logged and logged["score"] != 0.0


@pytest.mark.slow
def test_rlhf_against_a_learned_reward_model_raises_the_gold_score_at_the_kl_target(tmp_path):
    """docs/ppo.md's demo, shortened (about 8 minutes on 2 cores), through the stages of
    `examples/ppo_sentiment.py`: SFT on word sentences, pairs of the SFT policy's samples
    labelled by VADER with 20% flipped, `posttrain rm`, then PPO with adaptive KL against that
    reward model. VADER (not posttrain's code) judges held-out samples: it rises by at least
    0.5 from about 0, and the KL ends near its target."""
    import importlib.util

    path = Path(__file__).parents[2] / "examples" / "ppo_sentiment.py"
    spec = importlib.util.spec_from_file_location("ppo_sentiment", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.stage_sft(tmp_path, steps=400)
    example.stage_pairs(tmp_path, prompts=2000, noise=0.2)
    example.stage_rm(tmp_path, steps=150)
    cfg = example.ppo_config(tmp_path, "adaptive", steps=70)
    summary = ppo.run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"eval_every": 35})}))
    before, after = (summary[k]["eval/gold"] for k in ("eval_before", "eval_after"))
    assert after >= before + 0.5, (before, after)
    assert summary["eval_after"]["eval/reward"] > summary["eval_before"]["eval/reward"] + 0.5
    kl = [m["kl"] for m in read_metrics(tmp_path / "ppo" / "adaptive") if "kl" in m][-10:]
    target = cfg.ppo.kl_target
    assert 0.6 * target < sum(kl) / len(kl) < 1.4 * target, kl


def test_lora_policy_and_critic(tiny_qwen2, data, tmp_path):
    """LoRA on both models: the reference is the policy with its adapters disabled (no copy),
    the critic trains its adapters and value head only, and the saved policy is merged."""
    lora = {"enabled": True, "r": 4, "alpha": 8}
    cfg = config(tiny_qwen2, data, tmp_path / "run", model={"path": str(tiny_qwen2), "lora": lora},
                 critic={"lora": lora}, run={"max_steps": 3})  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_qwen2))
    critic = ppo.load_critic(
        cfg, torch.device("cpu"), tokenizer.pad_token_id, tokenizer.get_vocab()
    )
    trained = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "score" in n for n in trained)
    summary = ppo.run(cfg)
    assert summary["reference"] == "adapters disabled"
    kls = [m["kl"] for m in read_metrics(tmp_path / "run") if "kl" in m]
    assert abs(kls[0]) < 1e-5 and abs(kls[-1]) > 1e-4  # zero-initialised adapters, then moving
    merged = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert not any("lora" in key for key in merged)
