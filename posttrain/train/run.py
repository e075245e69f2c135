"""A run directory and the cadence every recipe shares, written once.

    run = Run(cfg.run, cfg)                        # process group, seed, out_dir/config.yaml
    start = run.resume({"policy": learner})        # latest checkpoint (exact), metrics.jsonl
    run.begin(evaluate)                            # held-out metrics at step 0 (fresh start)
    for step in run.steps():                       # start .. run.max_steps - 1
        metrics = ...one step of the recipe...
        run.end_step(step + 1, metrics, evaluate)  # evaluate, log, save on their cadence
    summary = run.finish(save_final)               # final/ model, summary.json, curves.png

Evaluation runs before the first step, every `run.eval_every` steps and after the last one;
its metrics join that step's line of metrics.jsonl and `summary.json` keeps the first and the
last as `eval_before` / `eval_after`. Checkpoints hold every learner (PPO's policy and
critic), the recipe's own state (a KL controller) and the summary so far, so a killed run
resumes exactly. A fresh start (no checkpoint) replaces the metrics of an earlier run in the
same directory; a resumed one keeps the lines up to its checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from posttrain.config import RunConfig, TrainConfig, dump_config
from posttrain.eval.curves import plot_curves
from posttrain.files import write_json_atomic
from posttrain.train import checkpoint
from posttrain.train.distributed import Dist, init_distributed
from posttrain.train.learner import Learner
from posttrain.train.metrics import MetricsLogger
from posttrain.train.randomness import seed_all
from posttrain.train.samples import SampleLog

Metrics = dict[str, Any]


class Stateful(Protocol):
    """Recipe state a checkpoint keeps beside the learners (JSON-serialisable)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Run:
    """See the module docstring. `curves`: metrics drawn into curves.png after each
    evaluation and at the end (`x_label` names the step axis)."""

    def __init__(
        self,
        cfg: RunConfig,
        config: BaseModel,
        *,
        curves: Sequence[str] = (),
        x_label: str = "step",
    ) -> None:
        self.cfg, self.curves, self.x_label = cfg, tuple(curves), x_label
        self.dist: Dist = init_distributed(cfg.device)
        seed_all(cfg.seed)
        self.out = Path(cfg.out_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(config))
        self.summary: dict[str, Any] = {}
        self.start = 0
        self.step = 0
        """Steps done: what an evaluation or a sample row belongs to."""
        self._learners: Mapping[str, Learner] = {}
        self._state: Stateful | None = None
        self._logger: MetricsLogger | None = None
        self._samples: dict[str, SampleLog] = {}

    @property
    def device(self):
        return self.dist.device

    def resume(
        self,
        learners: Mapping[str, Learner],
        state: Stateful | None = None,
        start: int | None = None,
    ) -> int:
        """Restore the latest complete checkpoint (if `run.resume` and there is one) into the
        learners and `state`; open metrics.jsonl. Returns the step to start from.

        A recipe whose steps leave their own records (iterative DPO's rounds) passes `start`,
        the steps already done, instead: the summary then comes from summary.json."""
        self._learners, self._state = learners, state
        root = self.out / "checkpoints"
        if self.dist.is_main:
            checkpoint.remove_partial(root)
        self.dist.barrier()
        found = checkpoint.list_checkpoints(root) if self.cfg.resume and start is None else []
        if start:
            self.start = start
            self.summary = json.loads((self.out / "summary.json").read_text())
        elif found:
            parts = {name: learner.part for name, learner in learners.items()}
            saved = checkpoint.load_checkpoint(found[-1], parts, self.dist)
            self.start = int(saved["step"])
            self.summary = saved["extra"].get("summary", {})
            if state is not None:
                state.load_state_dict(saved["extra"]["state"])
        self._logger = MetricsLogger(
            self.out, enabled=self.dist.is_main, total_steps=self.cfg.max_steps,
            start_step=self.start, progress=self.cfg.progress, tensorboard=self.cfg.tensorboard,
        )  # fmt: skip
        return self.start

    def steps(self) -> range:
        return range(self.start, self.cfg.max_steps)

    def begin(self, evaluate: Callable[[], Metrics] | None = None) -> None:
        """On a fresh start, held-out metrics before any training: step 0 of metrics.jsonl and
        `eval_before` of the summary."""
        self.step = self.start
        if self.start == 0 and evaluate is not None:
            metrics = evaluate()
            if metrics:
                self.summary["eval_before"] = metrics
                self.log(0, metrics)

    def log(self, step: int, metrics: Metrics) -> None:
        self._logger.log(step, metrics)

    def samples(self, step: int, rows: list[dict], name: str = "samples") -> None:
        """Append completions shown at `step` to `<name>.jsonl` (the console table with
        `run.progress`, for the training samples)."""
        if not self.dist.is_main:
            return
        if name not in self._samples:
            console = self.cfg.progress and name == "samples"
            self._samples[name] = SampleLog(
                self.out / f"{name}.jsonl", start_step=self.start, console=console
            )
        self._samples[name].write(step, rows)

    def end_step(
        self,
        step: int,
        metrics: Metrics,
        evaluate: Callable[[], Metrics] | None = None,
        samples: list[dict] | None = None,
    ) -> Metrics:
        """After `step` steps: evaluate, log and checkpoint on their cadence. `samples`: rows of
        sampled completions, written with the metrics line. Returns the step's metrics."""
        cfg, last = self.cfg, step == self.cfg.max_steps
        self.step = step
        evaluated = evaluate is not None and (
            last or (cfg.eval_every and step % cfg.eval_every == 0)
        )
        if evaluated:
            held_out = evaluate()
            metrics.update(held_out)
            if last:
                self.summary["eval_after"] = held_out
        self.summary["last"] = metrics
        if last or evaluated or step % cfg.log_every == 0:
            self.log(step, metrics)
            if samples:
                self.samples(step, samples)
        else:
            self._logger.advance(step)
        if evaluated and self.dist.is_main:
            self.plot()
        if cfg.save_every and step % cfg.save_every == 0 and not last:
            self.save(step)
        return metrics

    def done_rounds(self) -> list[dict[str, Any]]:
        """Round-based recipes (iterative DPO, RFT): the records of rounds 1, 2, ... whose
        `round-K/summary.json` exists, in order (a gap ends them; at most `max_steps`); the run
        resumes after them."""
        done: list[dict[str, Any]] = []
        while len(done) < self.cfg.max_steps:
            path = self.out / f"round-{len(done) + 1}" / "summary.json"
            if not path.exists():
                break
            done.append(json.loads(path.read_text()))
        self.resume({}, start=len(done))
        return done

    def end_round(
        self, k: int, record: Metrics, model: str, evaluate: Callable[[], Metrics] | None
    ) -> None:
        """Round `k` is done: evaluate and log it (`end_step`), write `round-K/summary.json`
        (atomically; what marks the round done) with the round's `model`, and the summary."""
        self.end_step(k, record, evaluate)
        done = {"round": k, "model": model, **record}
        if self.dist.is_main:
            write_json_atomic(self.out / f"round-{k}" / "summary.json", done)
        self.summary.setdefault("rounds", []).append(done)
        self.summary["final_model"] = model
        self.write_summary()

    def save(self, step: int) -> Path:
        """A checkpoint of every learner, the recipe state and the summary at `step`."""
        extra = {"summary": self.summary}
        if self._state is not None:
            extra["state"] = self._state.state_dict()
        parts = {name: learner.part for name, learner in self._learners.items()}
        return checkpoint.save_checkpoint(
            self.out / "checkpoints", step, parts, self.dist, extra, keep=self.cfg.keep_checkpoints
        )

    def write_summary(self) -> None:
        if self.dist.is_main:
            write_json_atomic(self.out / "summary.json", self.summary)

    def plot(self) -> None:
        if self.curves:
            plot_curves(self.out, self.curves, self.out / "curves.png", x_label=self.x_label)

    def finish(self, save_final: Callable[[Path], Any] | None = None) -> dict[str, Any]:
        """Close the logs; on the main process save the final model with `save_final(dir)`,
        write summary.json (atomically) and curves.png. Returns the summary."""
        self._logger.close()
        if self.dist.is_main:
            if save_final is not None:
                save_final(self.out / "final")
            self.plot()
        self.write_summary()
        self.dist.barrier()
        return self.summary


def check_batch(train: TrainConfig, dist: Dist) -> None:
    """An offline step's `batch_size` must split into micro-batches on every process."""
    if train.batch_size % (train.micro_batch_size * dist.world_size):
        raise ValueError(
            f"train.batch_size={train.batch_size} must be a multiple of train.micro_batch_size="
            f"{train.micro_batch_size} x {dist.world_size} processes"
        )
