"""Typed configs: a YAML file plus dotted `key=value` overrides, validated by pydantic.

Every config class forbids unknown keys, and every field's docstring is its `--help` text.
`load_config` turns pydantic's errors into messages that name the key, the expected type and,
for a misspelled key, the closest valid one.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used, with every problem named."""


class Section(BaseModel):
    """Base of every config section: unknown keys fail, field docstrings are the help text.
    A section's `renamed` maps keys it no longer has to the key that replaced them.

    A sub-section given in part keeps the recipe's defaults for the rest: with `optim:
    OptimConfig = OptimConfig(lr=1e-6)`, setting `optim.warmup_steps` leaves lr at 1e-6 (not
    OptimConfig's own 1e-4), and `run.max_steps` leaves the recipe's `run.out_dir`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _keep_section_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, info in cls.model_fields.items():
            given = data.get(name)
            if isinstance(info.default, BaseModel) and isinstance(given, dict):
                merged[name] = {**info.default.model_dump(exclude_unset=True), **given}
        return merged


class LoraConfig(Section):
    enabled: bool = False
    """Train LoRA adapters instead of the full model (the saved final model has them merged)."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or 'all-linear' for every linear layer but the output head."""


class ModelConfig(Section):
    path: str = ""
    """Hugging Face model directory (or hub id already in the local cache) to start from."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype: 'auto' is float32 weights, with bf16 autocast on GPU and fp32 compute on CPU."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to from_pretrained: 'sdpa', 'eager' or 'flash_attention_2'."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower)."""
    lora: LoraConfig = LoraConfig()
    """Parameter-efficient fine-tuning with LoRA."""


class OptimConfig(Section):
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many optimizer steps."""
    min_lr_ratio: float = 0.0
    """The schedule decays to lr * min_lr_ratio at the last step."""


class RunConfig(Section):
    """Where a run writes and its cadence: the same keys with the same meaning in every recipe."""

    out_dir: str = "runs/run"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/, summary.json."""
    seed: int = 0
    """Seeds data order, new heads, dropout and sampling (a resumed run reads and samples the
    same, since each step's draws derive from it)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run: 'auto' picks cuda when available."""
    max_steps: int = Field(100, ge=0)
    """Steps of the recipe's loop: optimizer steps (sft, rm, dpo), sampling-and-update steps
    (grpo, ppo), rounds (iterative-dpo). Each step is one line of metrics.jsonl."""
    log_every: int = Field(1, ge=1)
    """Write a metrics line (and, online, sampled completions) every this many steps."""
    eval_every: int = Field(0, ge=0)
    """Evaluate on held-out data every this many steps; always before the first and after the
    last step (0: only then)."""
    save_every: int = Field(0, ge=0)
    """Write a resumable checkpoint every this many steps (0: never; only the final model)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many most recent checkpoints to keep."""
    resume: bool = True
    """Resume from the latest checkpoint in out_dir when there is one (else start afresh,
    replacing the metrics of an earlier run there)."""
    progress: bool = True
    """Progress bar (and, online, tables of sampled completions) on the terminal."""
    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard package)."""


class TrainConfig(Section):
    """How many examples an offline step sees."""

    batch_size: int = Field(16, ge=1)
    """Examples per optimizer step (sequences; comparisons for rm and dpo), summed over all
    processes and accumulation micro-steps."""
    micro_batch_size: int = Field(8, ge=1)
    """Examples per forward pass on one process; accumulation = batch_size / (micro_batch_size
    x processes)."""


class DataConfig(Section):
    train: str = ""
    """Training records: a .jsonl, .json or .parquet file, or a datasets directory (save_to_disk)."""
    eval: str = ""
    """Held-out records in the same forms; empty: split off eval_fraction of train."""
    eval_fraction: float = 0.05
    """Fraction of train held out when no eval file is given."""
    max_length: int = 1024
    """Longest tokenized sequence (prompt + completion); longer records fail unless truncate is
    set. Capped at the model's context (`max_position_embeddings`)."""
    max_prompt_length: int = 512
    """Longest tokenized prompt; longer prompts are an error naming the row."""
    truncate: bool = False
    """Cut completions that make a sequence longer than max_length instead of failing."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """Render prompts with the tokenizer's chat template: 'auto' does so when it has one."""
    packing: bool = True
    """Padding-free batches: sequences concatenated into one row with reset position ids."""
    limit: int = 0
    """Read at most this many training records (0: all)."""


class PromptDataConfig(Section):
    """Prompts of the online recipes: a task's generated rows, or prompt files."""

    task: str = ""
    """A task of `posttrain.tasks` (e.g. 'arithmetic'): its rows are the prompts and carry the
    fields its verifiers read; with `rewards` unset, the task's own verifiers score them.
    Leave empty to read the `train` / `eval` files instead."""
    task_options: dict[str, Any] = {}
    """Keyword options of the task's generator."""
    train: str = ""
    """Prompt file (.jsonl, .json, .parquet, datasets dir): rows `{prompt, ...fields}`."""
    eval: str = ""
    """Held-out prompt file in the same form (with a task: its eval split)."""
    train_size: int = Field(2000, ge=0)
    """Training prompts: task rows generated, or the first rows of the file (0: all)."""
    eval_size: int = Field(200, ge=0)
    """Held-out prompts scored by the evaluator (0: no held-out evaluation)."""
    max_prompt_length: int = Field(512, ge=1)
    """Longest tokenized prompt; a longer one is an error naming its file and row. Capped so
    that prompt + sampling.max_new_tokens fits the model's context."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """Render prompts with the tokenizer's chat template: 'auto' does so when it has one."""


class SamplingConfig(Section):
    """How the online recipes sample completions from the policy."""

    engine: Literal["builtin", "vllm"] = "builtin"
    """The rollout engine (`posttrain.rollout.ENGINES`): 'builtin' is posttrain's sampler in
    the training process (shared-prompt KV cache; it samples with the policy's live weights);
    'vllm' runs vLLM's engine in the training process (install vLLM first; it holds its own
    copy of the weights, synced by `update_weights` after each optimizer step)."""
    max_new_tokens: int = Field(256, ge=1)
    """Longest completion; longer ones are cut (finish reason 'length': truncated)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; training log-probs use the same one."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling (1: off)."""
    top_k: int = Field(0, ge=0)
    """Top-k truncation (0: off)."""
    stop: list[str] = []
    """Strings that end a completion."""
    log_samples: int = Field(8, ge=0)
    """Sampled completions written to samples.jsonl (and shown on the console with
    run.progress) at each logged step."""


class EnvironmentConfig(Section):
    """Multi-turn rollouts (`posttrain.rollout.multiturn`, docs/tools.md): tools the policy may
    call, or an environment of your own. Neither: single-turn completions."""

    tools: list[str | dict[str, Any]] = []
    """Tools the policy may call: 'calculator', 'python' (run in the sandbox), or
    `{function: package.module:function, parameters: {JSON schema}}`."""
    factory: str | None = None
    """Instead of tools: `package.module:callable` returning a fresh environment (`reset(row)`,
    `step(turn)`) for each trajectory, called with `options`."""
    options: dict[str, Any] = {}
    """Keyword arguments of `factory`."""
    turn_stop: list[str] | None = None
    """Strings that end a turn and hand it to the environment (unset: '</tool_call>' with
    tools, none with a factory); eos and sampling.stop end turns too."""
    max_turns: int = Field(4, ge=1)
    """Turns the policy writes at most; sampling.max_new_tokens bounds the whole trajectory."""
    call_cost: float = 0.0
    """Reward subtracted per tool call."""
    timeout_s: float = Field(5.0, gt=0)
    """A tool call's wall-clock limit."""
    max_output_chars: int = Field(512, ge=1)
    """A tool's output is cut to this many characters."""
    workers: int = Field(16, ge=1)
    """Environments stepped at once."""

    @model_validator(mode="after")
    def _one_kind(self) -> EnvironmentConfig:
        if self.tools and self.factory:
            raise ValueError("environment: set tools or factory, not both")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.tools or self.factory)


class RayConfig(Section):
    """Ray workers for an online recipe (an optional extra: `pip install 'posttrain[ray]'`)."""

    address: str = ""
    """An existing Ray cluster (`ray://host:10001`, or `auto` on one of its nodes); empty: the
    recipe starts a local Ray on this machine when it needs one."""
    reward_workers: int = Field(0, ge=0)
    """Ray actors each reward function is scored in (the batch split between them; an actor
    that dies is replaced and its completions scored again); 0: rewards run in this process."""


class EvaluationConfig(Section):
    """The held-out evaluation of the online recipes (`posttrain.eval.heldout`)."""

    temperature: float = Field(0.0, ge=0)
    """0: greedy decoding; above 0, sampled at this temperature."""
    samples_per_prompt: int = Field(1, ge=1)
    """Completions per held-out prompt (sampled evaluation; greedy gives the same one)."""
    log_samples: int = Field(8, ge=0)
    """Held-out completions written to eval_samples.jsonl at each evaluation."""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _field_at(model: type[BaseModel], path: tuple) -> tuple[type[BaseModel] | None, Any]:
    """The section class holding `path[-1]` and that field's annotation (None when unknown)."""
    section: type[BaseModel] | None = model
    for key in path[:-1]:
        info = section.model_fields.get(str(key)) if section else None
        section = info.annotation if info and _is_section(info.annotation) else None
    info = section.model_fields.get(str(path[-1])) if section else None
    return section, info.annotation if info else None


def _sections_holding(model: type[BaseModel], key: str, exclude: tuple) -> list[str]:
    """The top-level sections of `model` (other than `exclude`) with a field `key`: where a
    key written in the wrong section, or under an older spelling, now lives."""
    return [
        f"'{name}.{key}'"
        for name, info in model.model_fields.items()
        if _is_section(info.annotation)
        and (name,) != tuple(exclude)
        and key in info.annotation.model_fields
    ]


def _describe(model: type[BaseModel], error: dict) -> str:
    path = tuple(p for p in error["loc"] if not isinstance(p, int))
    dotted = ".".join(str(p) for p in error["loc"])
    if not path:  # a whole-config (model-level) validator failed: its message says why
        return f"invalid config: {error['msg']}"
    if error["type"] == "extra_forbidden":
        section, _ = _field_at(model, path)
        names = list(section.model_fields) if section else []
        if renamed := getattr(section, "renamed", {}).get(str(path[-1])):
            return f"unknown key '{dotted}': it is '{renamed}' (set it there)"
        if moved := _sections_holding(model, str(path[-1]), exclude=path[:-1]):
            return f"unknown key '{dotted}': it is {' or '.join(moved)} (set it there)"
        close = difflib.get_close_matches(str(path[-1]), names, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(map(str, path[:-1] + (close[0],)))}'?" if close else ""
        return f"unknown key '{dotted}'{hint} (valid keys here: {', '.join(names)})"
    _, annotation = _field_at(model, path)
    expected = f"expected {_type_name(annotation)}, " if annotation is not None else ""
    got = error.get("input")
    return f"'{dotted}': {expected}got {got!r} ({error['msg']})"


def config_errors(model: type[BaseModel], error: ValidationError) -> str:
    """Every problem of a failed validation of `model`, each naming its key, in one line."""
    return "; ".join(_describe(model, e) for e in error.errors())


def set_dotted(data: dict, dotted_key: str, value: Any) -> None:
    """Set `data['a']['b'] = value` for `dotted_key='a.b'`, creating sections as needed."""
    *parents, leaf = dotted_key.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted_key}': '{key}' is not a section")
    node[leaf] = value


C = typing.TypeVar("C", bound=BaseModel)


def load_config(
    config_cls: type[C], path: str | Path | None = None, overrides: list[str] = ()
) -> C:
    """Read YAML at `path` (optional), apply `key=value` overrides (values parsed as YAML), validate."""
    data: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-5")
        set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    try:
        return config_cls.model_validate(data)
    except ValidationError as err:
        where = f" in {path}" if path else ""
        problems = "\n  ".join(_describe(config_cls, e) for e in err.errors())
        raise ConfigError(f"invalid config{where}:\n  {problems}") from None


def config_help(config_cls: type[BaseModel], prefix: str = "") -> str:
    """Every field as `dotted.key (type, default): docstring`, sections expanded."""
    lines = []
    for name, info in config_cls.model_fields.items():
        key = f"{prefix}{name}"
        if _is_section(info.annotation):
            lines.append(f"\n{key}: {info.description or ''}")
            lines.append(config_help(info.annotation, f"{key}."))
        else:
            default = info.get_default(call_default_factory=True)
            lines.append(
                f"  {key} ({_type_name(info.annotation)}, default {default!r})\n"
                f"      {info.description or ''}"
            )
    return "\n".join(lines)


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML, loadable again with load_config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
