"""DPO judged by a scorer nobody on the team wrote: VADER sentiment (Hutto & Gilbert 2014).

    python examples/dpo_vader_sentiment.py --out runs/dpo-vader     # ~10 minutes on 2 cores

The classic "positive continuations" task (Ziegler et al. 2019 used IMDB with a sentiment
classifier), offline and small:
1. Text: sentences drawn from a fixed list of neutral, positive and negative words (no real
   corpus installs offline). A prompt is a sentence's first words, its completion the rest.
2. SFT a tiny random model on them (`posttrain sft`): it learns to continue with any words.
3. Sample `--samples` completions (temperature 1) from the SFT policy for the training prompts
   and score each with `vaderSentiment`'s compound score; chosen = the best, rejected = the
   worst (pairs whose scores tie are dropped).
4. `posttrain dpo` from the SFT model on those pairs.
5. On held-out prompts: mean VADER compound score of temperature-1 samples, SFT vs DPO.
Writes `report.json` in `--out`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from posttrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from posttrain.data.tokenize import prompt_ids
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.models.tiny import save_tiny
from posttrain.recipes import dpo, sft
from posttrain.rollout import HFSampler, SamplingParams

NEUTRAL = ["the", "model", "data", "train", "step", "batch", "code", "test", "day", "team",
           "and", "was", "is", "a", "of", "this", "run", "we", "it", "very"]  # fmt: skip
POSITIVE = ["good", "great", "happy", "love", "nice", "best", "fine", "fun", "win", "glad"]
NEGATIVE = ["bad", "sad", "hate", "awful", "poor", "worst", "ugly", "fail", "lost", "angry"]
WORDS = NEUTRAL * 2 + POSITIVE + NEGATIVE  # a third of the words carry sentiment


def make_text(count: int, seed: int) -> list[dict[str, str]]:
    """Prompt (2-3 words) and completion (4-6 words and a full stop) records."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 9))]
        cut = rng.randint(2, 3)
        rows.append(
            {"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:]) + "."}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def sample(model_dir: Path, prompts: list[str], n: int, seed: int) -> list[list[str]]:
    """`n` temperature-1 completions (text) per prompt."""
    model = load_causal_lm(str(model_dir), torch.device("cpu"))
    tokenizer = load_tokenizer(str(model_dir))
    sampler = HFSampler(model, tokenizer, seed=seed)
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=48)
    out: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(prompts), 128):
        ids = [prompt_ids(tokenizer, p, chat=False) for p in prompts[start : start + 128]]
        for c in sampler.generate(ids, params).completions:
            out[start + c.prompt_index].append(
                tokenizer.decode(c.token_ids, skip_special_tokens=True)
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/dpo-vader"))
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--prompts", type=int, default=1500, help="training prompts to sample")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--eval-prompts", type=int, default=300)
    parser.add_argument("--dpo-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    vader = SentimentIntensityAnalyzer()
    score = lambda text: vader.polarity_scores(text)["compound"]  # noqa: E731

    # 1-2. Text and the SFT policy.
    base = save_tiny(out / "base", "qwen2", "tiny", hidden_size=128, intermediate_size=352,
                     num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    text_train = write_jsonl(out / "text-train.jsonl", make_text(8000, seed=0))
    text_eval = write_jsonl(out / "text-eval.jsonl", make_text(200, seed=1))
    sft.run(
        sft.SFTConfig(
            model=ModelConfig(path=str(base)),
            data=DataConfig(train=str(text_train), eval=str(text_eval), chat_template="never"),
            optim=OptimConfig(lr=3e-3, warmup_steps=30),
            train=TrainConfig(batch_size=32, micro_batch_size=32),
            run=RunConfig(
                out_dir=str(out / "sft"), max_steps=args.sft_steps, log_every=50, resume=False
            ),
        )  # fmt: skip
    )
    policy = out / "sft" / "final"

    # 3. Pairs ranked by VADER from the SFT policy's own samples.
    rng = random.Random(2)
    prompts = [r["prompt"] for r in make_text(args.prompts, seed=2)]
    pairs = []
    for prompt, texts in zip(prompts, sample(policy, prompts, args.samples, seed=3), strict=True):
        texts = [t for t in dict.fromkeys(texts) if t.strip()]
        ranked = sorted(texts, key=lambda t: score(prompt + t))
        if len(ranked) >= 2 and score(prompt + ranked[-1]) > score(prompt + ranked[0]):
            pairs.append({"prompt": prompt, "chosen": ranked[-1], "rejected": ranked[0]})
    rng.shuffle(pairs)
    n_eval = max(len(pairs) // 20, 1)
    write_jsonl(out / "pairs-train.jsonl", pairs[n_eval:])
    write_jsonl(out / "pairs-eval.jsonl", pairs[:n_eval])

    # 4. DPO from the SFT policy.
    summary = dpo.run(
        dpo.DPOConfig(
            loss="dpo",
            beta=args.beta,
            reference=dpo.ReferenceConfig(cache_dir=str(out / "reference-cache")),
            model=ModelConfig(path=str(policy)),
            data=DataConfig(
                train=str(out / "pairs-train.jsonl"),
                eval=str(out / "pairs-eval.jsonl"),
                chat_template="never",
            ),
            optim=OptimConfig(lr=args.lr, warmup_steps=10),
            train=TrainConfig(batch_size=32, micro_batch_size=32),
            run=RunConfig(
                out_dir=str(out / "dpo"),
                max_steps=args.dpo_steps,
                eval_every=max(args.dpo_steps // 5, 1),
                log_every=10,
                resume=False,
            ),
        )  # fmt: skip
    )

    # 5. Held-out prompts: VADER on samples of each policy.
    held_out = [r["prompt"] for r in make_text(args.eval_prompts, seed=4)]
    report = {"pairs": len(pairs), "held_out_prompts": len(held_out), "samples": args.samples}
    vocabulary = set(WORDS)
    for name, model_dir in (("sft", policy), ("dpo", out / "dpo" / "final")):
        samples = sample(model_dir, held_out, args.samples, seed=5)
        scores = [score(p + t) for p, ts in zip(held_out, samples, strict=True) for t in ts]
        words = [w for ts in samples for t in ts for w in t.replace(".", " ").split()]
        report[name] = {
            "mean_vader_compound": sum(scores) / len(scores),
            "fraction_positive": sum(s > 0.05 for s in scores) / len(scores),
            "fraction_negative": sum(s < -0.05 for s in scores) / len(scores),
            # drift from the SFT distribution: words spelled as in the training text
            "fraction_words_in_vocabulary": sum(w in vocabulary for w in words)
            / max(len(words), 1),
        }
    report["implicit_reward_accuracy"] = {
        "before": summary["eval_before"]["eval/rewards/accuracy"],
        "after": summary["eval_after"]["eval/rewards/accuracy"],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
