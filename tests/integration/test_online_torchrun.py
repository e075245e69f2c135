"""Online recipes under torchrun (gloo, 2 processes) as a user starts them: the same steps as
one process, groups scored whole where they were sampled, exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.rewards.base import RewardOutput
from posttrain.train.metrics import read_metrics
from tests.conftest import write_jsonl

pytestmark = pytest.mark.integration
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
G = 4


def recorded_digits(prompts, completions, **fields) -> RewardOutput:  # noqa: ARG001
    """The fraction of digits in each completion; each call's process and prompts are
    appended to $REWARD_LOG (one JSON line a call), to see where groups were scored."""
    with open(os.environ["REWARD_LOG"], "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "prompts": list(prompts)}) + "\n")
    return RewardOutput([sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions])


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[Path, Path]:
    """Training prompts (sums) and held-out ones (differences), told apart in the reward log."""
    root = tmp_path_factory.mktemp("online")
    train = write_jsonl(
        root / "train.jsonl", [{"prompt": f"{i:02d}+{i % 7:02d}="} for i in range(64)]
    )
    held_out = write_jsonl(
        root / "eval.jsonl", [{"prompt": f"{i:02d}-{i % 5:02d}="} for i in range(8)]
    )
    return train, held_out


def command(
    recipe: str, model: Path, prompts: tuple[Path, Path], out: Path, *extra: str
) -> list[str]:
    common = [
        f"data.train={prompts[0]}", f"data.eval={prompts[1]}", "data.eval_size=8",
        "data.chat_template=never", f"run.out_dir={out}", "run.progress=false",
        "rewards=[{name: tests.integration.test_online_torchrun:recorded_digits}]",
        "sampling.max_new_tokens=6", "run.eval_every=2",
    ]  # fmt: skip
    # Adam's eps above rounding noise, so summation order cannot flip a near-zero update.
    optim = ["optim.lr=3e-3", "optim.schedule=constant", "optim.eps=1e-4"]
    if recipe == "grpo":
        common += [f"model.path={model}", f"grpo.group_size={G}", "grpo.prompts_per_step=6",
                   "grpo.micro_batch_size=4", *optim]  # fmt: skip
    elif recipe == "ppo":
        common += [f"model.path={model}", "ppo.prompts_per_step=6", "ppo.samples_per_prompt=2",
                   "ppo.micro_batch_size=4", "ppo.minibatch_size=6", "critic.init=policy",
                   "critic.optim.eps=1e-4", *optim]  # fmt: skip
    else:  # iterative-dpo: each round's DPO run is data-parallel too
        common += [f"dpo.model.path={model}", "iterate.prompts_per_round=8",
                    f"iterate.samples_per_prompt={G}", "iterate.chosen_truncated=true",
                    f"dpo.reference.cache_dir={out / 'cache'}", "dpo.train.batch_size=8",
                    "dpo.train.micro_batch_size=4", "dpo.run.max_steps=3",
                    *[f"dpo.{o}" for o in optim]]  # fmt: skip
    return [sys.executable, "-m", "posttrain.cli", recipe, *common, *extra]


def launch(cmd: list[str], processes: int) -> list[str]:
    return (TORCHRUN + cmd[1:]) if processes == 2 else cmd


def run(cmd: list[str], processes: int, log: Path) -> None:
    subprocess.run(launch(cmd, processes), env={**ENV, "REWARD_LOG": str(log)}, check=True)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    final = out / "final" if (out / "final").exists() else out / "round-2" / "dpo" / "final"
    return load_file(final / "model.safetensors")


def assert_same_weights(a: Path, b: Path, exact: bool = False) -> None:
    x, y = final_weights(a), final_weights(b)
    assert x.keys() == y.keys()
    for key in x:
        if exact:
            assert torch.equal(x[key], y[key]), f"{key} differs"
        else:
            torch.testing.assert_close(x[key], y[key], atol=1e-5, rtol=0, msg=key)


CASES = {
    # pi_old reused, a reference in the loss, held-out evaluation split over the processes.
    "grpo": ("grpo", ["grpo.beta=0.04", "run.max_steps=3"]),
    # Dynamic sampling refills, 2 epochs of minibatches of 10 (5 | 5 per process), pi_old
    # recomputed, the last minibatch of the step shorter.
    "dapo": (
        "grpo",
        [
            "algo=dapo",
            "grpo.minibatch_size=10",
            "grpo.epochs=2",
            "grpo.old_logprobs=recompute",
            "run.max_steps=3",
        ],
    ),  # fmt: skip
    # REINFORCE++ whitens advantages over the whole batch: it must see every process's rollouts.
    "reinforce_pp": ("grpo", ["algo=reinforce_pp", "grpo.minibatch_size=8", "run.max_steps=2"]),
    # Value model, GAE, KL penalty to the reference; two learners.
    "ppo": ("ppo", ["run.max_steps=3"]),
    # Rounds of sampling (shared out), pairs written once, DPO under DDP.
    "iterative_dpo": ("iterative-dpo", ["run.max_steps=2"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_take_the_same_steps_as_one(case, tiny_qwen2, prompts, tmp_path):
    recipe, extra = CASES[case]
    one, two = tmp_path / "one", tmp_path / "two"
    run(command(recipe, tiny_qwen2, prompts, one, *extra), 1, tmp_path / "one.jsonl")
    run(command(recipe, tiny_qwen2, prompts, two, *extra), 2, tmp_path / "two.jsonl")
    assert_same_weights(one, two)
    a, b = read_metrics(one), read_metrics(two)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b, strict=True):  # the same samples, rewards and held-out scores
        for key in ("reward", "sample/reward", "eval/accuracy", "eval/reward", "loss", "pairs"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)

    # Where rewards ran: two processes, each scoring whole groups (a prompt's G completions
    # in one call), and every process's calls together cover the one-process run's.
    calls, single = training_calls(tmp_path / "two.jsonl"), training_calls(tmp_path / "one.jsonl")
    assert len({c["pid"] for c in calls}) == 2
    per_prompt = 2 if recipe == "ppo" else G  # PPO: its samples_per_prompt
    for c in calls:
        assert all(k % per_prompt == 0 for k in Counter(c["prompts"]).values()), c
    assert Counter(p for c in calls for p in c["prompts"]) == Counter(
        p for c in single for p in c["prompts"]
    )


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    table = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    children: dict[int, list[int]] = {}
    for line in table.stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    out, todo = [], list(children.get(pid, []))
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def training_calls(log: Path) -> list[dict]:
    """The reward calls of training (held-out prompts are differences)."""
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return [c for c in calls if "+" in c["prompts"][0]]


def test_resume_after_sigkill_under_torchrun_is_exact(tiny_qwen2, prompts, tmp_path):
    extra = ["run.max_steps=12", "run.save_every=1", "run.keep_checkpoints=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(command("grpo", tiny_qwen2, prompts, straight, *extra), 2, tmp_path / "a.jsonl")

    cmd = launch(command("grpo", tiny_qwen2, prompts, killed, *extra), 2)
    env = {**ENV, "REWARD_LOG": str(tmp_path / "b.jsonl")}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((killed / "checkpoints").glob("step-*")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and its workers, mid-step
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    last = max(int(c.name.removeprefix("step-")) for c in (killed / "checkpoints").glob("step-*"))
    run(command("grpo", tiny_qwen2, prompts, killed, *extra), 2, tmp_path / "c.jsonl")
    # It went on from its last checkpoint (a restart from scratch would also end the same).
    assert len(training_calls(tmp_path / "c.jsonl")) == 2 * (12 - last)

    assert_same_weights(straight, killed, exact=True)
    logged = [m["step"] for m in read_metrics(killed) if "reward" in m]
    assert logged == list(range(1, 13)), "metrics.jsonl holds each step exactly once"
