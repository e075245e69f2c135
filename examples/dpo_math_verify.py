"""DPO judged by a scorer nobody on the team wrote: arithmetic answers checked by math-verify.

    posttrain quickstart out_dir=runs/quickstart-worked operators=+ worked=true \\
        train_examples=9500 steps=150                       # a briefly SFT'd start (~31%)
    python examples/dpo_math_verify.py --sft runs/quickstart-worked/sft/final \\
        --data runs/quickstart-worked/data --out runs/dpo-math-verify

1. Sample `--samples` completions (temperature 1) from the SFT policy for `--prompts` training
   prompts.
2. Judge each with math-verify (Hugging Face's `math_verify.verify(parse(gold), parse(answer))`)
   on the completion's final answer (its last comma-separated field, so worked solutions
   `7+8=15, 3+0+1=4, 45` are judged on `45`), never with the task's own exact-match check.
3. Pairs: for each prompt with a judged-correct and a judged-wrong sample, chosen = a correct
   one, rejected = a wrong one (the first of each, in sampling order).
4. `posttrain dpo` from the SFT model on those pairs (reference log-probs cached); by default
   DPO with RPO's NLL term on the chosen answer (`--rpo-alpha 1`): plain DPO lowered held-out
   accuracy here (docs/dpo.md has the table).
5. On held-out prompts (operand pairs never seen in training), math-verify judges the greedy
   answer and `--samples` temperature-1 samples of the SFT and of the DPO policy.
Writes `report.json` in `--out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from math_verify import parse, verify

from posttrain.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from posttrain.data.loading import load_records
from posttrain.data.tokenize import prompt_ids
from posttrain.models.loading import load_causal_lm, load_tokenizer
from posttrain.recipes.dpo import DPOConfig, ReferenceConfig, run
from posttrain.rollout import HFSampler, SamplingParams
from posttrain.tasks.arithmetic import final_answer


def judged_correct(completion: str, gold: str) -> bool:
    """math-verify's verdict: does the completion's final answer equal the gold's?"""
    answer = parse(final_answer(completion))
    return bool(answer) and verify(parse(final_answer(gold)), answer)


@torch.no_grad()
def sample(
    model_dir: Path, prompts: list[str], params: SamplingParams, seed: int
) -> list[list[str]]:
    """`params.n` completions (text) per prompt from the model in `model_dir`."""
    model = load_causal_lm(str(model_dir), torch.device("cpu"))
    tokenizer = load_tokenizer(str(model_dir))
    sampler = HFSampler(model, tokenizer, seed=seed)
    out: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(prompts), 256):
        ids = [prompt_ids(tokenizer, p, chat=False) for p in prompts[start : start + 256]]
        for c in sampler.generate(ids, params).completions:
            text = tokenizer.decode(c.token_ids, skip_special_tokens=True)
            out[start + c.prompt_index].append(text)
    return out


def scores(
    model_dir: Path, prompts: list[str], golds: list[str], n: int, max_new_tokens: int
) -> dict[str, float]:
    """Held-out accuracy judged by math-verify: greedy, and the mean over n samples."""
    greedy = sample(model_dir, prompts, SamplingParams.greedy(max_new_tokens=max_new_tokens), 0)
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new_tokens)
    sampled = sample(model_dir, prompts, params, seed=1)
    return {
        "greedy_accuracy": sum(judged_correct(g[0], a) for g, a in zip(greedy, golds, strict=True)) / len(golds),
        "sampled_accuracy": sum(
            judged_correct(s, a) for ss, a in zip(sampled, golds, strict=True) for s in ss
        ) / (n * len(golds)),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft", type=Path, required=True, help="the SFT model directory")
    parser.add_argument("--data", type=Path, required=True, help="quickstart's data directory")
    parser.add_argument("--out", type=Path, default=Path("runs/dpo-math-verify"))
    parser.add_argument("--prompts", type=int, default=4000, help="training prompts to sample")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--eval-prompts", type=int, default=500)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss", default="dpo", choices=["dpo", "ipo", "hinge", "simpo", "orpo"])
    parser.add_argument("--orpo-lambda", type=float, default=0.1, help="0: NLL on chosen only")
    parser.add_argument("--rpo-alpha", type=float, default=1.0, help="chosen-NLL weight (RPO)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="worked sums need ~20")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    train = load_records(args.data / "train.jsonl", "completion")[: args.prompts]
    held_out = load_records(args.data / "eval.jsonl", "completion")[: args.eval_prompts]
    params = SamplingParams(n=args.samples, temperature=1.0, max_new_tokens=args.max_new_tokens)
    samples = sample(args.sft, [r.prompt for r in train], params, seed=2)
    pairs, judged = [], 0
    for record, texts in zip(train, samples, strict=True):
        verdicts = [judged_correct(t, record.fields["answer"]) for t in texts]
        judged += sum(verdicts)
        right = [t for t, v in zip(texts, verdicts, strict=True) if v]
        wrong = [
            t
            for t, v in zip(texts, verdicts, strict=True)
            if not v and t.strip() and t not in right
        ]
        if right and wrong:
            pairs.append({"prompt": record.prompt, "chosen": right[0], "rejected": wrong[0]})
    n_eval = max(len(pairs) // 20, 1)
    for name, rows in (("train", pairs[n_eval:]), ("eval", pairs[:n_eval])):
        (args.out / f"pairs-{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in rows))
    print(f"{len(pairs)} pairs from {len(train)} prompts; "
          f"{judged / (len(train) * args.samples):.1%} of SFT samples judged correct")  # fmt: skip

    batch = 32
    summary = run(
        DPOConfig(
            loss=args.loss,
            beta=args.beta,
            orpo_lambda=args.orpo_lambda,
            rpo_alpha=args.rpo_alpha,
            reference=ReferenceConfig(cache_dir=str(args.out / "reference-cache")),
            model=ModelConfig(path=str(args.sft)),
            data=DataConfig(
                train=str(args.out / "pairs-train.jsonl"),
                eval=str(args.out / "pairs-eval.jsonl"),
                chat_template="never",
            ),
            optim=OptimConfig(lr=args.lr, warmup_steps=10),
            train=TrainConfig(
                out_dir=str(args.out / "dpo"),
                max_steps=args.steps,
                batch_size=batch,
                micro_batch_size=batch,
                eval_every=max(args.steps // 5, 1),
                log_every=10,
                resume=False,
            ),  # fmt: skip
        )
    )
    prompts = [r.prompt for r in held_out]
    golds = [r.fields["answer"] for r in held_out]
    report = {
        "pairs": len(pairs),
        "held_out_prompts": len(held_out),
        "sft": scores(args.sft, prompts, golds, args.samples, args.max_new_tokens),
        "dpo": scores(
            args.out / "dpo" / "final", prompts, golds, args.samples, args.max_new_tokens
        ),
        "implicit_reward_accuracy": {
            "before": summary["eval_before"]["eval/rewards/accuracy"],
            "after": summary["eval_after"]["eval/rewards/accuracy"],
        },
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
